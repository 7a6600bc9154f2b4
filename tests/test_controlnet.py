"""Tests for controlnet.py: the locked base's schedule, zero convolutions that start exactly at the
pretrained model, a locked base that never moves, the conditions, a small learning check (a
ControlNet puts a blob where its condition says), and the command line on a tiny ddpm.py base."""
import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import controlnet as cn  # noqa: E402
import ddpm  # noqa: E402  (only to check that the schedules are ddpm.py's own)
from common import UserError  # noqa: E402

ARGS = {"width": 16, "mults": (1, 2), "res_blocks": 1, "attn": (4,), "dropout": 0.0, "T": 100,
        "schedule": "linear"}  # the fields ddpm.py's make_model and make_schedule read


def perturb(net, scale=0.05, seed=0):
    """A fresh U-Net's output conv and residual branches start at zero: wake them up, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


def ddpm_checkpoint(net, args=ARGS, shape=(1, 8, 8)):
    """The parts of a ddpm.py checkpoint that locked_base reads."""
    return {"method": "ddpm", "args": dict(args), "step": 0, "shape": list(shape), "ema": net.state_dict()}


def tiny_base(seed=0, attn=(4,)):
    torch.manual_seed(seed)
    net = perturb(common.UNet(1, 16, (1, 2), 1, attn, image_size=8), seed=seed)
    return cn.locked_base(ddpm_checkpoint(net, {**ARGS, "attn": attn}))


def inputs(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    c = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    return x, torch.randint(1, 101, (n,), generator=g), c, torch.randint(0, 3, (n,), generator=g)


class Draws:
    """ddpm.py's Draws for one process: per-example draws of n."""

    def __init__(self, n):
        self.n = n

    def randn(self, *shape):
        return torch.randn(self.n, *shape)

    def rand(self):
        return torch.rand(self.n)

    def randint(self, low, high):
        return torch.randint(low, high, (self.n,))


# ----------------------------------------------------------------------------------------------
# The locked base's diffusion
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("T", [1000, 100, 10])
def test_schedule_is_ddpm_pys(kind, T):
    sch = cn.base_schedule({"T": T, "schedule": kind})
    ref = (ddpm.linear_schedule if kind == "linear" else ddpm.cosine_schedule)(T)
    assert sch.T == T and sch.alpha_bar.shape == (T + 1,) and sch.alpha_bar[0] == 1
    assert torch.equal(sch.alpha_bar, ref.alpha_bar)


def test_unknown_schedule_is_a_user_error():
    with pytest.raises(UserError, match="unknown schedule 'quadratic'"):
        cn.base_schedule({"T": 10, "schedule": "quadratic"})


def test_q_sample_noise_coefficient_and_its_inverse():
    sch = cn.base_schedule({"T": 100, "schedule": "linear"})
    x0, eps, t = torch.rand(3, 1, 4, 4) * 2 - 1, torch.randn(3, 1, 4, 4), torch.tensor([1, 50, 100])
    ab = sch.alpha_bar[t].float().view(-1, 1, 1, 1)
    # sqrt(1 - alpha_bar_t) eps, not the notes' (1 - alpha_bar_t) eps
    assert torch.allclose(cn.q_sample(torch.zeros_like(x0), t, eps, sch), (1 - ab).sqrt() * eps)
    assert torch.allclose(cn.predict_x0(cn.q_sample(x0, t, eps, sch), t, eps, sch), x0, atol=1e-4)


def test_locked_base_rebuilds_a_ddpm_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = perturb(common.UNet(1, 16, (1, 2), 1, (4,), image_size=8)).eval()
    torch.save(ddpm_checkpoint(net), tmp_path / "ckpt.pt")  # through a file, as the command line reads it
    base = cn.locked_base(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    x, t, _, _ = inputs()
    with torch.no_grad():
        assert torch.equal(base(x, t), net(x, t))
    assert not base.training and not any(p.requires_grad for p in base.parameters())
    assert base.class_embed is None  # ddpm.py's base is unconditional: the class lives in the ControlNet


def test_locked_base_refuses_other_checkpoints():
    net = common.UNet(1, 16, (1, 2), 1, (4,), image_size=8)
    with pytest.raises(UserError, match="must be a ddpm.py checkpoint, this one is from dit") as e:
        cn.locked_base({**ddpm_checkpoint(net), "method": "dit"})
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="lacks ema"):
        cn.locked_base({**ddpm_checkpoint(net), "ema": None})


# ----------------------------------------------------------------------------------------------
# Zero convolutions: training starts exactly at the pretrained model
# ----------------------------------------------------------------------------------------------

def test_at_init_the_controlnet_changes_nothing():
    base = tiny_base()
    net = cn.ControlNet(base, 1, num_classes=3)
    x, t, c, y = inputs()
    with torch.no_grad():
        residuals = net(x, t, c, y)
        assert len(residuals) == len(base.down) + 2
        assert all(r.abs().max() == 0 for r in residuals)
        assert torch.equal(cn.eps_theta(base, [(net, c)], x, t, y), base(x, t))


def test_without_zero_convolutions_the_output_moves_at_init():
    base = tiny_base()
    torch.manual_seed(0)
    net = cn.ControlNet(base, 1, num_classes=3, zero=False)
    x, t, c, y = inputs()
    with torch.no_grad():
        assert (cn.eps_theta(base, [(net, c)], x, t, y) - base(x, t)).abs().max() > 1e-3


def test_the_copy_starts_as_the_locked_encoder():
    base = tiny_base()
    net = cn.ControlNet(base, 1, num_classes=3)
    for mine, theirs in [(net.conv_in, base.conv_in), (net.down, base.down), (net.mid, base.mid),
                         (net.time_embed, base.time_embed)]:
        assert mine.state_dict().keys() == theirs.state_dict().keys()
        for a, b in zip(mine.state_dict().values(), theirs.state_dict().values(), strict=True):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()  # equal, and a copy of its own
    assert net.class_embed.weight.abs().max() == 0
    assert all(p.requires_grad for p in net.parameters()) and all(m.training for m in net.modules())


def test_sampling_at_init_gives_the_locked_models_samples():
    base = tiny_base()
    net = cn.ControlNet(base, 1, num_classes=3)
    _, _, c, y = inputs()
    sch = cn.base_schedule(ARGS)
    plain = cn.sample_ddim(base, [], (4, 1, 8, 8), sch, 5, generator=torch.Generator().manual_seed(0))
    steps = []
    guided = cn.sample_ddim(base, [(net, c)], (4, 1, 8, 8), sch, 5, y=y, guidance=3.0,
                            generator=torch.Generator().manual_seed(0), on_step=lambda x, i, n: steps.append((i, n)))
    assert torch.equal(guided, plain)
    assert steps == [(i, 5) for i in range(1, 6)]
    assert plain.abs().max() <= 1  # the last step returns the clipped x_0


def test_zero_convolutions_get_gradients_at_the_first_step():
    # dZ/dW = the input (non-zero), so Z(.; Theta_z2) learns at once; everything before it sees
    # dZ/dinput = W = 0 at the first step, and starts learning once W has moved.
    base = tiny_base()
    net = cn.ControlNet(base, 1, num_classes=3)
    x0, t, c, y = inputs()
    sch = cn.base_schedule(ARGS)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    cn.loss(base, net, x0, c, y, t, eps, sch).backward()
    for z in [*net.z_skips, net.z_mid]:
        assert z.weight.grad.abs().max() > 0 and z.bias.grad.abs().max() > 0
    before = [net.z_c, net.encoder, net.conv_in, net.down]
    assert all(p.grad.abs().max() == 0 for m in before for p in m.parameters())
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    net.zero_grad()
    cn.loss(base, net, x0, c, y, t, eps, sch).backward()
    assert net.z_c.weight.grad.abs().max() > 0 and net.conv_in.weight.grad.abs().max() > 0


def test_the_locked_weights_never_change():
    base = tiny_base()
    locked = {k: v.clone() for k, v in base.state_dict().items()}
    net = cn.ControlNet(base, 1, num_classes=3)
    start = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x0, _, c, y = inputs()
    sch = cn.base_schedule(ARGS)
    for _ in range(3):
        opt.zero_grad()
        cn.training_step(base, net, x0, c, y, sch, Draws(4)).backward()
        opt.step()
    assert all(torch.equal(v, locked[k]) for k, v in base.state_dict().items())
    assert all(p.grad is None for p in base.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), start))


# ----------------------------------------------------------------------------------------------
# The objective, composition and the control scale
# ----------------------------------------------------------------------------------------------

def test_training_step_draws_and_label_dropout():
    base = tiny_base()
    torch.manual_seed(0)
    net = perturb(cn.ControlNet(base, 1, num_classes=3))
    x0, t, c, y = inputs()
    sch = cn.base_schedule(ARGS)
    eps = torch.randn_like(x0)
    calls = []

    class Recording:
        def randint(self, low, high):
            calls.append(("randint", low, high))
            return t

        def randn(self, *shape):
            calls.append(("randn", shape))
            return eps

        def rand(self):
            calls.append(("rand",))
            return torch.tensor([0.2, 0.7, 0.4, 0.9])  # drop the labels of examples 0 and 2

    got = cn.training_step(base, net, x0, c, y, sch, Recording())
    assert calls == [("randint", 1, 101), ("randn", (1, 8, 8)), ("rand",)]
    null = torch.where(torch.tensor([True, False, True, False]), 3, y)
    assert torch.equal(got, cn.loss(base, net, x0, c, null, t, eps, sch))
    assert not torch.equal(got, cn.loss(base, net, x0, c, y, t, eps, sch))
    everyone = torch.ones(4, dtype=torch.bool)
    assert torch.equal(cn.loss(base, net, x0, c, y, t, eps, sch, drop=everyone),
                       cn.loss(base, net, x0, c, None, t, eps, sch))


def test_composition_adds_the_residuals_and_control_scale_scales_them():
    base = tiny_base()
    torch.manual_seed(0)
    a, b = perturb(cn.ControlNet(base, 1), seed=1), perturb(cn.ControlNet(base, 3), seed=2)
    x, t, c, _ = inputs()
    c3 = torch.rand(4, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        ra, rb = a(x, t, c), b(x, t, c3)
        both = base(x, t, residuals=[0.5 * u + 2 * v for u, v in zip(ra, rb)])
        assert torch.allclose(cn.eps_theta(base, [(a, c), (b, c3)], x, t, control_scale=[0.5, 2.0]), both, atol=1e-6)
        assert torch.equal(cn.eps_theta(base, [(a, c)], x, t, control_scale=0.0), base(x, t))
        assert (cn.eps_theta(base, [(a, c)], x, t) - base(x, t)).abs().max() > 1e-3


def test_guidance_combines_the_two_passes():
    base = tiny_base()
    torch.manual_seed(0)
    net = perturb(cn.ControlNet(base, 1, num_classes=3))
    x, t, c, y = inputs()
    with torch.no_grad():
        eps_c = cn.eps_theta(base, [(net, c)], x, t, y)
        eps_uc = cn.eps_theta(base, [(net, c)], x, t, None)
        got = cn.guided_eps(base, [(net, c)], x, t, y, 2.5, 1.0)
    assert (eps_c - eps_uc).abs().max() > 1e-4
    assert torch.allclose(got, eps_uc + 2.5 * (eps_c - eps_uc))


# ----------------------------------------------------------------------------------------------
# The conditions and their fidelity measures
# ----------------------------------------------------------------------------------------------

def square(size=12, lo=3, hi=9, value=1.0):
    x = -torch.ones(1, 1, size, size)
    x[..., lo:hi, lo:hi] = value
    return x


def disk(size=28, radius=8, value=0.3):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    inside = (yy - 13.5) ** 2 + (xx - 12) ** 2 <= radius ** 2
    return torch.where(inside, value, -1.0)[None, None], inside


def test_edges_of_a_filled_square_are_its_outline():
    outline = torch.zeros(12, 12, dtype=torch.bool)
    outline[3:9, 3:9] = True
    outline[4:8, 4:8] = False  # the square's one-pixel border: the inside and the background are no edge
    e = cn.edges(square())
    assert e.shape == (1, 1, 12, 12) and set(e.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(e[0, 0] > 0, outline)
    thick = cn.edges(square(), thin=False)[0, 0] > 0  # unthinned: the background's ring too
    assert (thick & ~outline).any() and not thick[5:7, 5:7].any()
    assert (cn.edges(torch.full((1, 3, 12, 12), 0.3)) < 0).all()  # a flat image has no edges
    assert torch.equal(cn.edges(square().expand(2, 3, -1, -1)), cn.edges(square()).expand(2, -1, -1, -1))


def test_mask_of_a_filled_disk_is_the_disk():
    x, inside = disk()
    assert torch.equal(cn.mask(x)[0, 0] > 0, inside)
    x[0, 0, 13, 12] = -1.0  # a dark pixel inside the garment stays in its silhouette
    assert torch.equal(cn.mask(x)[0, 0] > 0, inside)
    assert (cn.mask(x, close=False)[0, 0] > 0).sum() == inside.sum() - 1
    for lo, hi in [(1, 4), (0, 3), (5, 8)]:  # near the border and touching it: the closing keeps the shape
        x = square(8, lo, hi)
        assert torch.equal(cn.mask(x), x)


def test_lowres_keeps_the_size_and_averages_4x4_blocks():
    x = torch.rand(2, 3, 28, 28) * 2 - 1
    low = cn.lowres(x)
    assert low.shape == x.shape and low.abs().max() <= 1
    assert torch.allclose(low[..., 4:8, 8:12], x[..., 4:8, 8:12].mean((-1, -2), keepdim=True).expand(-1, -1, 4, 4))


def test_fidelity_measures():
    x, _ = disk()
    other, _ = disk(radius=4)
    assert cn.edge_f1(x, cn.edges(x)).item() == 1 and cn.mask_iou(x, cn.mask(x)).item() == 1
    assert cn.edge_f1(-torch.ones_like(x), cn.edges(x)).item() == 0
    blank = -torch.ones_like(x)
    assert cn.edge_f1(blank, cn.edges(blank)).item() == 1  # nothing to find, and nothing found
    # an edge pixel one pixel off counts as found; two pixels off does not
    assert cn.edge_f1(x.roll(1, -1), cn.edges(x)).item() == 1 > cn.edge_f1(x.roll(2, -1), cn.edges(x)).item()
    assert cn.mask_iou(other, cn.mask(x)).item() == pytest.approx((4 / 8) ** 2, abs=0.05)
    assert cn.lowres_psnr(x, cn.lowres(x)).item() > 60 > cn.lowres_psnr(other, cn.lowres(x)).item()
    assert set(cn.CONDITIONS) == set(cn.FIDELITY) == {"edges", "mask", "lowres"}


# ----------------------------------------------------------------------------------------------
# Learning: a ControlNet on a locked base puts a blob where its condition says
# ----------------------------------------------------------------------------------------------

def blobs(quadrant):
    """8x8 images with a 3x3 white blob in quadrant 0 (top left), 1, 2 or 3 (bottom right)."""
    x = -torch.ones(len(quadrant), 1, 8, 8)
    for i, q in enumerate(quadrant.tolist()):
        r, c = 1 + 3 * (q // 2), 1 + 3 * (q % 2)
        x[i, 0, r:r + 3, c:c + 3] = 1
    return x


def quadrant_of(x):
    halves = x[:, 0].unflatten(1, (2, 4)).unflatten(3, (2, 4))  # (B, 2, 4, 2, 4)
    return halves.mean((2, 4)).flatten(1).argmax(1)


def test_a_controlnet_puts_the_blob_where_the_condition_says():
    torch.manual_seed(0)
    sch = cn.base_schedule(ARGS)
    # The pretrained model: DDPM on blobs in any of the four quadrants (ddpm.py's loss, 200 steps).
    net = common.UNet(1, 16, (1, 2), 1, (), image_size=8)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(200):
        x0 = blobs(torch.randint(0, 4, (32,)))
        t, eps = torch.randint(1, sch.T + 1, (32,)), torch.randn_like(x0)
        opt.zero_grad()
        (eps - net(cn.q_sample(x0, t, eps, sch), t)).square().mean().backward()
        opt.step()
    base = cn.locked_base(ddpm_checkpoint(net, {**ARGS, "attn": ()}))
    # The ControlNet: the blob's silhouette as the condition, the quadrant as the class.
    control = cn.ControlNet(base, 1, num_classes=4)
    opt = torch.optim.Adam(control.parameters(), lr=2e-3)
    for _ in range(120):
        q = torch.randint(0, 4, (32,))
        x0 = blobs(q)
        opt.zero_grad()
        cn.training_step(base, control, x0, cn.mask(x0), q, sch, Draws(32)).backward()
        opt.step()
    want = torch.arange(32) % 4
    c = cn.mask(blobs(want))
    g = torch.Generator().manual_seed(1)
    free = cn.sample_ddim(base, [], (32, 1, 8, 8), sch, 20, generator=g)
    g = torch.Generator().manual_seed(1)
    steered = cn.sample_ddim(base, [(control.eval(), c)], (32, 1, 8, 8), sch, 20, generator=g)
    # The locked base alone puts the blob anywhere; with the ControlNet, in the condition's quadrant.
    assert (quadrant_of(free) == want).float().mean() < 0.6 and free[c > 0].mean() < 0
    # (Seeds 0-8 give 0.84 to 1 and a blob mean of 0.6 to 0.9; chance is 0.25.)
    assert (quadrant_of(steered) == want).float().mean() >= 0.75
    assert steered[c > 0].mean() > 0.4 and steered[c < 0].mean() < -0.7  # a blob there, dark elsewhere


# ----------------------------------------------------------------------------------------------
# The command line, on a ddpm.py base of a few steps (12x12 shapes in two class folders)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """16 12x12 grayscale PNGs, ellipses and rectangles in two class folders."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    for i in range(16):
        kind = root / ("rect" if i % 2 else "ellipse")
        kind.mkdir(exist_ok=True)
        im = Image.new("L", (12, 12), int(rng.integers(0, 40)))
        x, y = (int(v) for v in rng.integers(0, 5, 2))
        w, h = (int(v) for v in rng.integers(4, 7, 2))
        (ImageDraw.Draw(im).rectangle if i % 2 else ImageDraw.Draw(im).ellipse)(
            [x, y, x + w, y + h], fill=int(rng.integers(150, 256)))
        im.save(kind / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def base(folder, tmp_path_factory):
    """A ddpm.py checkpoint of 4 steps (at a high --lr: its output layer, zero at first, must pass the
    ControlNet's residuals on): the locked base."""
    out = tmp_path_factory.mktemp("base")
    with pytest.warns(UserWarning, match="mostly memorises"):
        ddpm.main(["--dataset", str(folder), "--image-size", "12", "--width", "8", "--mults", "1,2",
                   "--res-blocks", "1", "--attn", "6", "--T", "20", "--batch-size", "8", "--steps", "4", "--lr", "1e-2",
                   "--sampler", "ddim", "--sampling-steps", "2", "--n", "2", "--out", str(out), "--device", "cpu"])
    return out / "ckpt.pt"


def argv(folder, base, out, *extra, steps="4"):
    """2 batches an epoch; a high --lr so that 4 steps move the ControlNet visibly."""
    return ["--base", str(base), "--dataset", str(folder), "--image-size", "12", "--batch-size", "8",
            "--lr", "1e-2", "--steps", steps, "--sampling-steps", "2", "--n", "4", "--out", str(out),
            "--device", "cpu", *extra]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def exit_message(args):
    """The message main() exits with, or None if it returned normally."""
    try:
        cn.main(args)
    except SystemExit as e:
        return str(e.code)
    return None


pytestmark = pytest.mark.filterwarnings("ignore:.*mostly memorises:UserWarning")


@pytest.fixture(scope="module")
def trained(folder, base, tmp_path_factory):
    """An uninterrupted 4-step edges run (epochs end at steps 2 and 4), and what it printed."""
    out = tmp_path_factory.mktemp("trained") / "run"
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        cn.main(argv(folder, base, out, "--fidelity-every", "1"))
    return out, log.getvalue()


def test_cli_trains_the_controlnet_alone_and_writes_grids_and_fidelity_lines(trained, base):
    out, log = trained
    ckpt = load(out / "ckpt.pt")
    assert ckpt["method"] == "controlnet" and ckpt["step"] == 4 and ckpt["shape"] == [1, 12, 12]
    assert ckpt["base"] == str(base.resolve()) and ckpt["base_step"] == 4 and ckpt["num_classes"] == 2
    assert not any(k.startswith(("up.", "out.")) for k in ckpt["model"])  # no decoder: the base is not saved
    assert any(k.startswith("z_skips.") for k in ckpt["model"])
    assert sorted(p.name for p in out.glob("samples_epoch*.png")) == ["samples_epoch001.png", "samples_epoch002.png"]
    with Image.open(out / "samples_epoch002.png") as im:  # 4 conditions above 3 x 4 samples, 12 px + 2 px pads
        assert im.size == (4 * 14 + 2, 4 * 14 + 2)
    floor = "edge F1 of the locked base alone on 4 test conditions: "
    assert floor in log, log
    lines = [line for line in log.splitlines() if line.startswith("step ") and "edge F1" in line]
    assert [line.split(":")[0] for line in lines] == [f"step {s}" for s in (1, 2, 3, 4)], log  # --fidelity-every 1
    assert all(f"(the locked base alone: {log.split(floor)[1][:5]})" in line for line in lines)


def test_resume_is_bit_for_bit(folder, base, trained, tmp_path):
    out = tmp_path / "run"
    cn.main(argv(folder, base, out, steps="2"))
    cn.main(argv(folder, base, out, "--resume", steps="4"))
    resumed, straight = load(out / "ckpt.pt"), load(trained[0] / "ckpt.pt")
    assert resumed["step"] == 4
    for part in ("model", "ema"):
        for k, v in straight[part].items():
            assert torch.equal(v, resumed[part][k]), f"{part}.{k}"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_and_exits_130_or_143(folder, base, tmp_path, sig):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-u", str(ROOT / "controlnet.py"), "--log-every", "0",
                             *argv(folder, base, out, steps="100000")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(("step 2/", "error")):  # training has begun
                break
        proc.send_signal(sig)
        lines += proc.stdout.readlines()
        assert proc.wait(timeout=60) == 128 + sig, "".join(lines)
    finally:
        proc.kill()
    step = load(out / "ckpt.pt")["step"]
    assert step >= 2 and lines[-1].strip() == f"interrupted at step {step}; checkpoint {out / 'ckpt.pt'}", lines[-3:]


def write_png(path, size=12):
    im = Image.new("L", (size, size), 0)
    ImageDraw.Draw(im).rectangle([3, 3, 8, 8], outline=255)
    im.save(path)
    return path


def sample(trained, tmp_path, *flags, save="x.pt"):
    cn.main(["--sample", "--ckpt", str(trained[0] / "ckpt.pt"), "--sampling-steps", "2", "--device", "cpu",
             "--save", str(tmp_path / save), *flags])
    return load(tmp_path / save) if save.endswith(".pt") else tmp_path / save


def test_sample_from_a_png_or_a_pt_of_conditions(trained, base, tmp_path):
    x = sample(trained, tmp_path, "--control", str(write_png(tmp_path / "c.png")), "--n", "3")
    assert x.shape == (3, 1, 12, 12) and x.dtype == torch.float32 and x.abs().max() <= 1
    c = cn.edges(torch.rand(2, 1, 12, 12) * 2 - 1)
    torch.save(c, tmp_path / "c.pt")
    png = sample(trained, tmp_path, "--control", str(tmp_path / "c.pt"), "--n", "4", save="x.png")
    with Image.open(png) as im:  # the 2 conditions above 2 x 2 samples
        assert im.size == (2 * 14 + 2, 3 * 14 + 2)
    # --control-scale 0 is the locked base alone, from the same noise; 1 is not
    scaled = [sample(trained, tmp_path, "--control", str(tmp_path / "c.pt"), "--n", "2", "--control-scale", s)
              for s in ("0", "1")]
    locked, sch = cn.locked_base(load(base)), cn.base_schedule(load(base)["args"])
    alone = cn.sample_ddim(locked, [], (2, 1, 12, 12), sch, 2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(scaled[0], alone, atol=1e-6) and not torch.allclose(scaled[1], alone, atol=1e-3)
    guided, plain = [sample(trained, tmp_path, "--control-from-test", "3", "--n", "3", "--cfg-scale", s)
                     for s in ("2", "1")]
    assert guided.shape == (3, 1, 12, 12) and not torch.equal(guided, plain)  # a barely trained class: small
    msg = exit_message(["--sample", "--ckpt", str(trained[0] / "ckpt.pt"), "--control", str(tmp_path / "c.pt"),
                        "--cfg-scale", "2", "--save", str(tmp_path / "y.pt"), "--device", "cpu"])
    assert msg and "--control-from-test" in msg and "\n" not in msg, msg


def test_two_controlnets_compose(folder, base, trained, tmp_path):
    cn.main(argv(folder, base, tmp_path / "mask", "--condition", "mask", steps="2"))
    a, b = str(trained[0] / "ckpt.pt"), str(tmp_path / "mask" / "ckpt.pt")
    one = sample(trained, tmp_path, "--control-from-test", "2", "--n", "2")
    both = sample(trained, tmp_path, "--ckpt", b, "--control-from-test", "2", "--n", "2")
    assert both.shape == one.shape == (2, 1, 12, 12) and not torch.allclose(both, one, atol=1e-3)
    torch.save(cn.mask(torch.rand(2, 1, 12, 12) * 2 - 1), tmp_path / "m.pt")
    png = sample(trained, tmp_path, "--ckpt", b, "--control", str(write_png(tmp_path / "e.png")), "--control",
                 str(tmp_path / "m.pt"), "--n", "4", save="x.png")  # one edge map for both masks
    with Image.open(png) as im:  # the edge map twice and the 2 masks above 2 x 2 samples
        assert im.size == (2 * 14 + 2, 4 * 14 + 2)
    moved = load(b)
    moved["base_step"] = 7
    torch.save(moved, tmp_path / "other.pt")
    msg = exit_message(["--sample", "--ckpt", a, "--ckpt", str(tmp_path / "other.pt"), "--control-from-test", "2",
                        "--save", str(tmp_path / "y.pt"), "--device", "cpu"])
    assert msg and "share one locked base" in msg and "\n" not in msg, msg


def test_bad_input_is_one_line(folder, base, trained, tmp_path, capsys):
    msgs = {"no --base": exit_message(argv(folder, base, tmp_path / "a")[2:])}
    torch.save({"method": "vae", "args": {}, "step": 1}, tmp_path / "vae.pt")
    msgs["a vae base"] = exit_message(argv(folder, tmp_path / "vae.pt", tmp_path / "b"))
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint" * 100)
    msgs["a damaged base"] = exit_message(argv(folder, tmp_path / "garbage.pt", tmp_path / "c"))
    sample = ["--sample", "--ckpt", str(trained[0] / "ckpt.pt"), "--save", str(tmp_path / "x.png"), "--device", "cpu"]
    msgs["an 8x8 control"] = exit_message([*sample, "--control", str(write_png(tmp_path / "c8.png", 8))])
    torch.save(torch.zeros(2, 3, 12, 12), tmp_path / "rgb.pt")
    msgs["a 3-channel control"] = exit_message([*sample, "--control", str(tmp_path / "rgb.pt")])
    msgs["no control"] = exit_message(sample)
    for what, words in [("no --base", "training needs --base CKPT"), ("a vae base", "checkpoint of vae, not of ddpm"),
                        ("a damaged base", "cannot read checkpoint"),
                        ("an 8x8 control", "c8.png is 8x8: this ControlNet takes 12x12 conditions with 1 channel"),
                        ("a 3-channel control", "holds a (2, 3, 12, 12) torch.float32 tensor: this ControlNet takes "
                                                "float (N, 1, 12, 12)"),
                        ("no control", "--sample needs --control")]:
        assert msgs[what] and msgs[what].startswith("error: ") and words in msgs[what], (what, msgs[what])
        assert "\n" not in msgs[what], what
    for flags, words in [(["--control-scale", "-1"], "--control-scale must be 0 or more, got -1.0"),
                         (["--ckpt", "a", "--ckpt", "b"], "two --ckpt compose ControlNets for --sample")]:
        with pytest.raises(SystemExit) as e:
            cn.main(argv(folder, base, tmp_path / "d", *flags))
        assert e.value.code == 2 and words in capsys.readouterr().err.strip().splitlines()[-1]


def test_resume_refuses_a_base_that_changed(folder, base, tmp_path):
    shutil.copy(base, tmp_path / "base.pt")
    cn.main(argv(folder, tmp_path / "base.pt", tmp_path / "run", steps="1"))
    retrained = load(tmp_path / "base.pt")
    retrained["step"] = 9
    torch.save(retrained, tmp_path / "base.pt")
    msg = exit_message(argv(folder, tmp_path / "base.pt", tmp_path / "run", "--resume", steps="2"))
    assert msg and "at step 4, but it now holds step 9" in msg and "\n" not in msg, msg


def test_lowres_refuses_sides_that_are_not_whole_4x4_blocks(folder, tmp_path):
    base = tmp_path / "base"
    with pytest.warns(UserWarning, match="mostly memorises"):
        ddpm.main(["--dataset", str(folder), "--image-size", "10", "--width", "8", "--mults", "1,2",
                   "--res-blocks", "1", "--attn", "5", "--T", "4", "--batch-size", "8", "--steps", "1",
                   "--sampler", "ddim", "--sampling-steps", "1", "--n", "1", "--out", str(base), "--device", "cpu"])
    msg = exit_message(argv(folder, base / "ckpt.pt", tmp_path / "run", "--image-size", "10", "--condition", "lowres"))
    assert msg and "--condition lowres pools 4x4 blocks: 10x10 images" in msg and "\n" not in msg, msg
