"""Tests for common.py: data loading, device, seed, image grids, and the U-Net parts."""
import os
import random
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from common import UserError  # noqa: E402

# Every made-up folder is far below 1,000 images; the warning has its own test.
pytestmark = pytest.mark.filterwarnings("ignore:.*mostly memorises:UserWarning")


# ----------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------

SIZES = [(20, 30), (40, 40), (64, 50)]  # PIL's (width, height), none of them 16x16


def make_image(mode, size, seed, value=None):
    """A random (or constant, if value is given) image of a PIL mode and (width, height)."""
    w, h = size
    if value is not None:
        return Image.new("L", size, value).convert(mode)
    rng = np.random.default_rng(seed)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    return rgb if mode == "RGB" else rgb.convert(mode)


def write_folder(folder, modes):
    folder.mkdir(parents=True, exist_ok=True)
    for i, mode in enumerate(modes):
        make_image(mode, SIZES[i % len(SIZES)], seed=i).save(folder / f"{i}.png")
    return folder


def all_batches(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("modes, channels", [
    (["L", "L", "L", "L"], 1),
    (["L", "L", "L", "RGB"], 3),
    (["L", "L", "RGBA", "L"], 3),
    (["L", "P", "L", "L"], 3),
    (["RGB", "RGBA", "P", "L", "RGB"], 3),
])
def test_folder_channels_shape_and_range(tmp_path, modes, channels):
    folder = write_folder(tmp_path / "imgs", modes)
    loader, info = common.load_data(str(folder), image_size=16, batch_size=4)
    assert (info.channels, info.size, info.count) == (channels, 16, len(modes))
    assert info.num_classes is None
    x, y = next(iter(loader))
    assert x.shape == (4, channels, 16, 16)
    assert x.dtype == torch.float32
    assert -1 <= x.min() < 0 < x.max() <= 1
    assert (y == -1).all()


def test_folder_class_subfolders_give_labels(tmp_path):
    # a/ holds black images and b/ white ones, so each label can be checked against its pixels.
    for cls, value in (("a", 0), ("b", 255)):
        (tmp_path / cls).mkdir()
        for i, size in enumerate(SIZES[:2]):
            make_image("L", size, seed=i, value=value).save(tmp_path / cls / f"{i}.png")
    loader, info = common.load_data(str(tmp_path), image_size=16, batch_size=4)
    assert info.num_classes == 2 and info.channels == 1
    x, y = all_batches(loader)
    assert sorted(y.tolist()) == [0, 0, 1, 1]
    assert (x[y == 0] == -1).all()
    assert (x[y == 1] == 1).all()


def test_folder_with_loose_files_beside_subfolders_is_unlabelled(tmp_path):
    write_folder(tmp_path / "a", ["L", "L"])
    write_folder(tmp_path / "b", ["L", "L"])
    make_image("L", (16, 16), seed=9).save(tmp_path / "loose.png")
    loader, info = common.load_data(str(tmp_path), image_size=16, batch_size=5)
    assert info.num_classes is None
    _, y = all_batches(loader)
    assert (y == -1).all()


def test_small_folder_warns_about_memorisation(tmp_path):
    folder = write_folder(tmp_path / "imgs", ["L"] * 4)
    with pytest.warns(UserWarning, match="memoris"):
        common.load_dataset(str(folder), image_size=16)


def test_empty_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no readable images") as e:
        common.load_dataset(str(tmp_path), image_size=16)
    assert str(tmp_path) in str(e.value)


def test_folder_of_only_a_corrupt_png_is_a_user_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.warns(UserWarning, match="unreadable"), \
            pytest.raises(UserError, match="no readable images") as e:
        common.load_dataset(str(tmp_path), image_size=16)
    assert str(tmp_path) in str(e.value)


def test_corrupt_png_among_good_ones_is_skipped(tmp_path):
    folder = write_folder(tmp_path, ["L"] * 4)
    (folder / "broken.png").write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.warns(UserWarning, match="broken.png"):
        ds, info = common.load_dataset(str(folder), image_size=16)
    assert len(ds) == info.count == 4


def test_folder_without_image_size_is_a_user_error(tmp_path):
    folder = write_folder(tmp_path, ["RGB"] * 4)
    with pytest.raises(UserError, match="--image-size"):
        common.load_dataset(str(folder))


def test_unknown_dataset_name_lists_the_choices(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so that 'imagenet-typo' cannot be a folder by accident
    with pytest.raises(UserError) as e:
        common.load_dataset("imagenet-typo", tmp_path)
    msg = str(e.value)
    for word in ("imagenet-typo", "mnist", "fashion-mnist", "cifar10", "folder"):
        assert word in msg


def test_tensor_file_is_a_data_set(tmp_path):
    pixels = torch.tensor([0, 255, 128], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 2, 4, 4).clone()
    torch.save(pixels, tmp_path / "pixels.pt")
    ds, info = common.load_dataset(str(tmp_path / "pixels.pt"))
    assert (info.count, info.channels, info.size, info.num_classes, info.classes) == (3, 2, 4, None, None)
    assert ds[0][0].max() == -1 and ds[1][0].min() == 1 and ds[0][1] == -1  # uint8 -> [-1, 1]
    latents = torch.randn(5, 4, 8, 8) * 3
    torch.save({"x": latents, "y": torch.tensor([0, 2, 1, 2, 0]), "classes": ["a", "b", "c"]},
               tmp_path / "latents.pt")
    ds, info = common.load_dataset(str(tmp_path / "latents.pt"))
    assert info.num_classes == 3 and info.classes == ["a", "b", "c"]
    assert torch.equal(ds[3][0], latents[3]) and ds[3][1] == 2  # float values are kept as they are
    torch.save({"x": latents, "y": torch.tensor([0, 2, 1, 2, 0])}, tmp_path / "unnamed.pt")
    assert common.load_dataset(str(tmp_path / "unnamed.pt"))[1].classes == ["0", "1", "2"]
    with pytest.raises(UserError, match="no tensor file"):
        common.load_dataset(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a tensor")
    with pytest.raises(UserError, match="cannot read"):
        common.load_dataset(str(tmp_path / "junk.pt"))


# ----------------------------------------------------------------------------------------------
# Torchvision data sets, never touching the network
# ----------------------------------------------------------------------------------------------

def test_fashion_mnist_from_debian_copy(tmp_path, monkeypatch):
    if not os.path.isdir(common.DEBIAN_FASHION_MNIST):
        pytest.skip(f"{common.DEBIAN_FASHION_MNIST} missing (apt-get install dataset-fashion-mnist)")

    def no_network(self):
        raise AssertionError("Fashion-MNIST must come from the Debian copy, not the network")
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", no_network)

    ds, info = common.load_dataset("fashion-mnist", tmp_path)
    assert (len(ds), info.count, info.channels, info.size, info.num_classes) == (60000, 60000, 1, 28, 10)
    assert info.classes[0] == "T-shirt/top" and info.classes[9] == "Ankle boot"
    assert (tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    xs, ys = zip(*(ds[i] for i in range(200)))
    x, y = torch.stack(xs), torch.as_tensor(ys)
    assert x.shape == (200, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1  # Fashion-MNIST uses the full 0..255 range
    assert set(y.tolist()) == set(range(10))

    test_ds, test_info = common.load_dataset("fashion-mnist", tmp_path, train=False)
    assert len(test_ds) == test_info.count == 10000

    loader, _ = common.load_data("fashion-mnist", tmp_path, batch_size=8)
    xb, yb = next(iter(loader))
    assert xb.shape == (8, 1, 28, 28) and yb.shape == (8,)


def offline(monkeypatch, cls):
    calls = []

    def download(self):
        calls.append(1)
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(cls, "download", download)
    return calls


def test_mnist_offline_names_folder_and_files(tmp_path, monkeypatch):
    calls = offline(monkeypatch, torchvision.datasets.MNIST)
    with pytest.raises(UserError) as e:
        common.load_dataset("mnist", tmp_path)
    assert calls, "load_dataset should have tried (the patched) download"
    msg = str(e.value)
    assert str((tmp_path / "MNIST" / "raw").resolve()) in msg
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert f in msg
    assert "offline" in msg


def test_cifar10_offline_names_folder_and_files(tmp_path, monkeypatch):
    calls = offline(monkeypatch, torchvision.datasets.CIFAR10)
    with pytest.raises(UserError) as e:
        common.load_dataset("cifar10", tmp_path)
    assert calls
    msg = str(e.value)
    assert str((tmp_path / "cifar-10-batches-py").resolve()) in msg
    for f in ("data_batch_1", "test_batch", "cifar-10-python.tar.gz"):
        assert f in msg


# ----------------------------------------------------------------------------------------------
# Device, seed, grids
# ----------------------------------------------------------------------------------------------

def test_pick_device_cpu():
    assert common.pick_device("cpu") == torch.device("cpu")


def test_pick_device_auto_says_which(capsys):
    device = common.pick_device("auto")
    assert isinstance(device, torch.device)
    assert "device:" in capsys.readouterr().out


def test_pick_device_auto_falls_back_to_cpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert common.pick_device("auto") == torch.device("cpu")
    assert "device: cpu" in capsys.readouterr().out


def test_pick_device_errors(monkeypatch):
    with pytest.raises(UserError, match="unknown device"):
        common.pick_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="not available"):
        common.pick_device("cuda")


def test_seed_everything_is_reproducible():
    def draw():
        return torch.randn(5), np.random.rand(5), [random.random() for _ in range(5)]

    common.seed_everything(123)
    a = draw()
    common.seed_everything(123)
    b = draw()
    common.seed_everything(124)
    c = draw()
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not torch.equal(a[0], c[0]) and not np.array_equal(a[1], c[1]) and a[2] != c[2]


def test_save_grid_maps_minus_one_to_0_and_one_to_255(tmp_path):
    x = torch.stack([torch.full((3, 4, 4), -1.0), torch.full((3, 4, 4), 1.0)])
    path = tmp_path / "sub" / "grid.png"
    common.save_grid(x, path)
    grid = np.asarray(Image.open(path).convert("RGB"))
    # Two images, nrow = ceil(sqrt(2)) = 2: one row, 2-pixel padding around each.
    assert grid.shape == (8, 14, 3)
    assert (grid[2:6, 2:6] == 0).all()
    assert (grid[2:6, 8:12] == 255).all()


def test_save_grid_clamps_and_centres(tmp_path):
    x = torch.stack([torch.full((1, 4, 4), v) for v in (-3.0, 0.0, 3.0, 0.0)])
    common.save_grid(x, tmp_path / "g.png")
    grid = np.asarray(Image.open(tmp_path / "g.png").convert("L")).astype(int)
    assert grid.shape == (14, 14)
    assert (grid[2:6, 2:6] == 0).all()
    assert (abs(grid[2:6, 8:12] - 128) <= 1).all()
    assert (grid[8:12, 2:6] == 255).all()


# ----------------------------------------------------------------------------------------------
# Time embedding and U-Net
# ----------------------------------------------------------------------------------------------

def test_timestep_embedding_shape_and_values():
    t = torch.tensor([0, 1, 10, 999])
    emb = common.timestep_embedding(t, 32)
    assert emb.shape == (4, 32) and emb.dtype == torch.float32
    assert torch.allclose(emb[0], torch.cat([torch.ones(16), torch.zeros(16)]))  # cos 0, sin 0
    assert torch.cdist(emb, emb).add(torch.eye(4)).min() > 1e-3  # rows pairwise distinct
    # The first frequency is 1: component 0 is cos(t), component dim/2 is sin(t).
    assert torch.allclose(emb[:, 0], torch.cos(t.float()), atol=1e-5)
    assert torch.allclose(emb[:, 16], torch.sin(t.float()), atol=1e-5)


def test_timestep_embedding_float_t():
    emb = common.timestep_embedding(torch.tensor([0.25, 0.5, 3.0]), 16)
    assert emb.shape == (3, 16) and torch.isfinite(emb).all()
    assert not torch.allclose(emb[0], emb[1])
    assert torch.allclose(emb[2], common.timestep_embedding(torch.tensor([3]), 16)[0])


def perturb(net, scale=0.05, seed=0):
    """The output conv (and every residual branch's last layer) starts at zero: wake them up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net.eval()


@pytest.mark.parametrize("width", [16, 32, 64, 128])
def test_resblock_output_depends_on_embedding(width):
    # The embedding is a per-channel shift added just before a GroupNorm: it survives only if
    # that norm's groups span several channels (one channel per group subtracts it right away).
    torch.manual_seed(0)
    block = perturb(common.ResBlock(width, width, emb_dim=16))
    x = torch.randn(2, width, 8, 8)
    with torch.no_grad():
        diff = (block(x, torch.randn(2, 16)) - block(x, torch.randn(2, 16))).abs().max()
    assert diff > 1e-3


@pytest.mark.parametrize("in_channels, size, mults, width, attn", [
    (1, 28, (1, 2, 2), 16, (7,)),
    (3, 28, (1, 2, 2), 32, (14,)),
    (3, 32, (1, 2, 2, 2), 16, (16,)),
    (1, 32, (1, 2, 2, 2), 32, ()),
    (3, 64, (1, 2, 2, 2), 16, (8,)),
])
def test_unet_shape_and_time_dependence(in_channels, size, mults, width, attn):
    torch.manual_seed(0)
    net = perturb(common.UNet(in_channels, width, mults, 1, attn, image_size=size))
    # One image three times, at t = 1, t = 500 and a float t: one forward pass keeps this fast.
    x = torch.randn(1, in_channels, size, size).expand(3, -1, -1, -1)
    with torch.no_grad():
        out = net(x, torch.tensor([1.0, 500.0, 0.5]))
    assert out.shape == x.shape
    assert out.abs().max() > 0
    assert (out[0] - out[1]).abs().max() > 1e-4
    assert (out[0] - out[2]).abs().max() > 1e-4


def test_unet_fresh_output_is_zero():
    net = common.UNet(1, 16, (1, 2), 1, (), image_size=8)
    with torch.no_grad():
        assert net(torch.randn(2, 1, 8, 8), torch.tensor([3, 7])).abs().max() == 0


def test_unet_class_conditioning_and_null_label():
    torch.manual_seed(0)
    net = perturb(common.UNet(1, 16, (1, 2, 2), 1, (7,), num_classes=10, image_size=28))
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        out = net(x.expand(3, -1, -1, -1), torch.tensor([5, 5, 5]), torch.tensor([0, 3, 10]))
        none = net(x, torch.tensor([5.0]))  # a float t must still give an integer null label
    assert (out[0] - out[1]).abs().max() > 1e-4
    assert (out[0] - out[2]).abs().max() > 1e-4
    assert torch.allclose(none[0], out[2], atol=1e-5)


def test_unet_ddpm_cifar10_parameter_count():
    net = common.UNet(3, 128, (1, 2, 2, 2), 2, (16,), 0.1, image_size=32)
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - 35.7e6) / 35.7e6 < 0.02, n


def test_unet_bad_arguments():
    with pytest.raises(UserError, match=r"image size 28 cannot be halved 3 times") as e:
        common.UNet(1, 16, (1, 2, 2, 2), 1, (), image_size=28)
    assert "(1, 2, 2, 2)" in str(e.value) and "at most 3 levels" in str(e.value)
    with pytest.raises(UserError, match=r"attention_resolutions \(5,\)") as e:
        common.UNet(1, 16, (1, 2, 2), 1, (5,), image_size=28)
    assert "[28, 14, 7]" in str(e.value)
    net = common.UNet(1, 16, (1, 2, 2), 1, (), image_size=28)
    with pytest.raises(UserError, match=r"built for 28x28 images, got \(32, 32\)"):
        net(torch.randn(1, 1, 32, 32), torch.tensor([1]))
    with pytest.raises(UserError, match="heads"):
        common.UNet(1, 16, (1, 2, 2), 1, (7,), image_size=28, num_heads=3)


def test_unet_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = perturb(common.UNet(1, 16, (1, 2), 1, (4,), num_classes=3, image_size=8, num_heads=2))
    net.train()
    x = torch.randn(4, 1, 8, 8)
    out = net(x, torch.tensor([1, 50, 200, 900]), torch.tensor([0, 1, 2, 3]))
    (out * torch.randn_like(out)).sum().backward()
    dead = [name for name, p in net.named_parameters()
            if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().max() == 0]
    assert not dead, dead


def test_unet_residuals_add_to_the_skips_and_the_middle():
    # ControlNet's hook: zeros change nothing, bit for bit; one skip's residual changes the output.
    torch.manual_seed(0)
    net = perturb(common.UNet(1, 16, (1, 2), 1, (4,), image_size=8))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 70])
    shapes = [(2, 16, 8, 8), (2, 16, 8, 8), (2, 16, 4, 4), (2, 32, 4, 4), (2, 32, 4, 4)]  # 4 skips, middle
    zeros = [torch.zeros(s) for s in shapes]
    with torch.no_grad():
        plain = net(x, t)
        assert torch.equal(net(x, t, residuals=zeros), plain)
        for i in range(len(shapes)):
            one = [torch.randn(s) if j == i else z for j, (s, z) in enumerate(zip(shapes, zeros))]
            assert (net(x, t, residuals=one) - plain).abs().max() > 1e-4, i
    with pytest.raises((ValueError, RuntimeError)):
        net(x, t, residuals=zeros[:1] + zeros[2:])  # one too few: an error, not a silent misalignment


# ----------------------------------------------------------------------------------------------
# Moving-garment clips
# ----------------------------------------------------------------------------------------------

def garments(n=12, size=28, seed=0):
    """Made-up garments: a bright random blob on black, with a soft edge, (C, S, S) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 1, size, size), -1.0)
    for i in range(n):
        h, w = torch.randint(8, size - 2, (2,), generator=g).tolist()
        r = torch.randint(0, size - h + 1, (1,), generator=g).item()
        c = torch.randint(0, size - w + 1, (1,), generator=g).item()
        x[i, :, r:r + h, c:c + w] = torch.rand(1, h, w, generator=g) * 1.8 - 0.8
    return common.ImageTensors(x, torch.arange(n) % 10)


def centre_of_mass(frames):
    """(F, C, H, W) in [-1, 1] -> (F, 2) brightness-weighted (row, column)."""
    w = (frames + 1).sum(1)  # (F, H, W): black counts 0
    rows, cols = torch.arange(w.shape[1]).float(), torch.arange(w.shape[2]).float()
    mass = w.sum((1, 2))
    return torch.stack([(w.sum(2) * rows).sum(1) / mass, (w.sum(1) * cols).sum(1) / mass], 1)


def simulate(start, v, travel, frames):
    """A point stepped frame by frame, its velocity flipped where it would leave [0, travel]."""
    p, out = start, []
    for _ in range(frames):
        out.append(p)
        p += v
        if p < 0 or p > travel:
            p, v = (-p if p < 0 else 2 * travel - p), -v
    return out


def test_moving_clips_are_deterministic_per_index_and_labelled():
    ims = garments()
    a, b = common.MovingClips(ims, frames=8, canvas=40, seed=3), common.MovingClips(ims, frames=8, canvas=40, seed=3)
    x, y = a[5]
    assert x.shape == (8, 1, 40, 40) and x.min() >= -1 and x.max() <= 1 and y == ims[5][1]
    assert torch.equal(x, b[5][0]) and torch.equal(a[7][0], b[7][0])
    assert not torch.equal(x, common.MovingClips(ims, frames=8, canvas=40, seed=4)[5][0])  # the seed matters
    assert len({tuple(a.path(i).flatten().tolist()) for i in range(len(ims))}) > len(ims) // 2  # clips differ


def test_moving_clips_keep_the_whole_garment_on_the_canvas_and_move_in_bouncing_lines():
    ims = garments()
    ds = common.MovingClips(ims, frames=12, canvas=36, seed=0, max_speed=3)
    bounced = 0
    for i in range(len(ims)):
        x, _ = ds[i]
        ink = (ims[i][0] + 1).sum()
        assert torch.allclose((x + 1).sum((1, 2, 3)), ink.expand(12))  # every frame holds all the garment
        com = centre_of_mass(x)
        path = ds.path(i).float()
        assert torch.allclose(com - com[:1], path - path[:1], atol=1e-4)  # a rigid move along the path
        for axis in range(2):
            p = path[:, axis].tolist()
            fits = [v for v in range(-3, 4) if v and simulate(p[0], v, ds.travel, 12) == p]
            assert fits, (i, axis, p)  # a straight line, reflected at 0 and at the travel
            bounced += any(a < b > c or a > b < c for a, b, c in zip(p, p[1:], p[2:]))
    assert bounced > 0


def test_clips_from_a_tensor_file_and_from_an_image_data_set(tmp_path):
    clips = torch.randint(0, 256, (3, 4, 1, 8, 8), dtype=torch.uint8)
    torch.save({"x": clips, "y": torch.tensor([0, 1, 1])}, tmp_path / "clips.pt")
    ds, info = common.load_clips(str(tmp_path / "clips.pt"))
    assert (info.frames, info.channels, info.size, info.count, info.num_classes) == (4, 1, 8, 3, 2)
    assert ds[1][0].shape == (4, 1, 8, 8) and torch.equal(ds[1][0], clips[1].float() / 127.5 - 1)
    torch.save(clips[0], tmp_path / "images.pt")  # (4, 1, 8, 8): images, not clips
    with pytest.raises(UserError, match=r"\(N, F, C, H, W\).*\(4, 1, 8, 8\)"):
        common.load_clips(str(tmp_path / "images.pt"))
    with pytest.raises(UserError, match=r"\(N, C, H, W\).*\(3, 4, 1, 8, 8\)"):
        common.load_dataset(str(tmp_path / "clips.pt"))  # an image method refuses clips
    with pytest.raises(UserError, match="larger than the 28x28"):
        common.MovingClips(garments(2), canvas=28)
    for i in range(3):
        make_image("L", (8, 8), i).save(tmp_path / f"{i}.png")
    ds, info = common.load_clips(str(tmp_path), frames=3, canvas=12, image_size=8)
    assert (info.frames, info.channels, info.size, info.count) == (3, 1, 12, 3) and ds[2][0].shape == (3, 1, 12, 12)
