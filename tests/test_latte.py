"""Tests for latte.py's paper part: tubelets, positions, which tokens each attention mixes,
adaLN-Zero, the Gflops of full and factorised attention, the objective, DDIM with guidance, the
video measures, the GIF, a tiny model that learns motion; and the command line: training, its
outputs, --resume, signals, --sample's three kinds of file and the bad inputs."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import latte  # noqa: E402


def perturbed(net, std=0.05, seed=0):
    """The network with every parameter nudged, so that zero-initialised layers (adaLN-Zero's
    modulations and gates, the final layer) pass signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return net


def tiny(variant=3, frames=4, size=8, patch=2, tubelet=1, depth=2, classes=None):
    return latte.Latte(1, size, frames, patch, tubelet, depth=depth, width=32, heads=2, num_classes=classes,
                       variant=variant)


class Draws:
    """Per-clip random draws, as the harness's Draws on one process."""

    def __init__(self, n):
        self.n = n

    def randn(self, *shape):
        return torch.randn(self.n, *shape)

    def rand(self):
        return torch.rand(self.n)

    def randint(self, low, high):
        return torch.randint(low, high, (self.n,))


# ----------------------------------------------------------------------------------------------
# Patches and positions
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p, t", [(1, 1), (2, 1), (4, 1), (2, 2), (4, 4)])
def test_patchify_and_unpatchify_are_inverses(p, t):
    x = torch.randn(2, 8, 3, 16, 16)
    tokens = latte.patchify(x, p, t)
    assert tokens.shape == (2, 8 // t, (16 // p) ** 2, 3 * t * p * p)
    assert torch.equal(latte.unpatchify(tokens, p, t, 3), x)
    # token (f, n) holds the tubelet of frames f t .. f t + t - 1 at patch n (row by row)
    f, row, col = 1, 2, 3
    n = row * (16 // p) + col
    tubelet = x[0, f * t:(f + 1) * t, :, row * p:(row + 1) * p, col * p:(col + 1) * p]  # (t, C, p, p)
    assert torch.equal(tokens[0, f, n], tubelet.transpose(0, 1).flatten())


@pytest.mark.parametrize("t", [1, 2])
def test_the_tubelet_embedding_is_one_linear_map_of_each_tubelet(t):
    torch.manual_seed(0)
    net = perturbed(latte.Latte(3, 8, 4, patch=2, tubelet=t, depth=2, width=32, heads=2))
    x = torch.randn(2, 4, 3, 8, 8)
    conv = net.x_embed(x.transpose(1, 2)).flatten(3).permute(0, 2, 3, 1)  # (B, F/t, N, d)
    W = net.x_embed.weight.flatten(1)  # (d, C t p p)
    assert torch.allclose(conv, latte.patchify(x, 2, t) @ W.T + net.x_embed.bias, atol=1e-5)


def test_position_embeddings_follow_their_formulas_and_tell_frames_apart():
    net = tiny(frames=4)
    assert net.pos_embed.shape == (16, 32) and net.temp_embed.shape == (4, 1, 32)
    f = 2
    omega = 10000 ** (-torch.arange(16, dtype=torch.float64) / 16)
    assert torch.allclose(net.temp_embed[f, 0], torch.cat([(f * omega).sin(), (f * omega).cos()]).float())
    n, row, col = 6, 1, 2  # token 6 of a 4 x 4 grid
    omega = 10000 ** (-torch.arange(8, dtype=torch.float64) / 8)
    want = torch.cat([(col * omega).sin(), (col * omega).cos(), (row * omega).sin(), (row * omega).cos()])
    assert torch.allclose(net.pos_embed[n], want.float())
    assert (net.temp_embed[:, 0, None] - net.temp_embed[None, :, 0]).abs().sum(-1).add(torch.eye(4)).min() > 0


@pytest.mark.parametrize("temporal_positions", [False, True])
def test_without_temporal_positions_the_network_cannot_tell_the_frames_order(temporal_positions):
    torch.manual_seed(0)
    net = perturbed(tiny(variant=3))
    if not temporal_positions:
        net.temp_embed.zero_()
    x, t, order = torch.randn(1, 4, 1, 8, 8), torch.tensor([10]), torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        same = torch.allclose(net(x[:, order], t), net(x, t)[:, order], atol=1e-5)
    assert same != temporal_positions


# ----------------------------------------------------------------------------------------------
# Which tokens each attention mixes (Sec. 3.1)
# ----------------------------------------------------------------------------------------------

def changed(module, *args, frames=4, tokens=6, d=32, at=(1, 2)):
    """Which outputs (F', N) change when the input token `at` is nudged."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, frames, tokens, d, generator=g)
    x2 = x.clone()
    x2[0, at[0], at[1]] += torch.randn(d, generator=g)
    with torch.no_grad():
        return (module(x2, *args) - module(x, *args)).abs().amax(-1)[0] > 1e-6


SAME_FRAME = torch.zeros(4, 6, dtype=torch.bool).index_fill_(0, torch.tensor(1), True)
SAME_POSITION = torch.zeros(4, 6, dtype=torch.bool).index_fill_(1, torch.tensor(2), True)
EVERY_TOKEN = torch.ones(4, 6, dtype=torch.bool)
MIXES = {"spatial": SAME_FRAME, "temporal": SAME_POSITION, "full": EVERY_TOKEN, "heads": SAME_FRAME | SAME_POSITION}


@pytest.mark.parametrize("axis", list(MIXES))
def test_each_attention_mixes_only_its_tokens(axis):
    torch.manual_seed(0)
    assert torch.equal(changed(latte.Attention(32, 4, axis)), MIXES[axis])


@pytest.mark.parametrize("axis", list(MIXES))
def test_each_block_with_adaln_mixes_only_its_attentions_tokens(axis):
    torch.manual_seed(0)
    block, c = perturbed(latte.LatteBlock(32, 4, axis), std=0.2), torch.randn(1, 32)
    assert block.adaLN_modulation(c).abs().min() > 0  # the shifts, scales and gates are on
    assert torch.equal(changed(block, c), MIXES[axis])


def test_variant_3s_block_attends_in_space_then_in_time():
    torch.manual_seed(0)
    block, c = perturbed(latte.FactorisedBlock(32, 4), std=0.2), torch.randn(1, 32)
    assert torch.equal(changed(block, c), EVERY_TOKEN)  # spatial, then temporal: everything in one block
    gate_t = block.adaLN_modulation[-1]
    with torch.no_grad():
        gate_t.weight[5 * 32:6 * 32] = 0
        gate_t.bias[5 * 32:6 * 32] = 0
    assert torch.equal(changed(block, c), SAME_FRAME)  # the temporal branch's gate shut: a spatial block
    order = []  # which is run first: the reach above is the same in either order
    block.attn_s.register_forward_hook(lambda *_: order.append("spatial"))
    block.attn_t.register_forward_hook(lambda *_: order.append("temporal"))
    block(torch.randn(1, 4, 6, 32), c)
    assert order == ["spatial", "temporal"]


@pytest.mark.parametrize("variant, axes", [(0, ["full"] * 4), (1, ["spatial", "temporal"] * 2),
                                           (2, ["spatial", "spatial", "temporal", "temporal"]),
                                           (3, ["factorised"] * 4), (4, ["heads"] * 4)])
def test_the_variants_stack_their_blocks_as_section_3_1(variant, axes):
    net = tiny(variant, depth=4)
    assert [b.attn.axis if isinstance(b, latte.LatteBlock) else "factorised" for b in net.blocks] == axes


@pytest.mark.parametrize("variant", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("tubelet", [1, 2])
def test_a_fresh_latte_outputs_exactly_zero_and_its_blocks_are_the_identity(variant, tubelet):
    net = tiny(variant, tubelet=tubelet, classes=3)
    x, t, y = torch.randn(2, 4, 1, 8, 8), torch.tensor([1, 70]), torch.tensor([0, 3])
    assert torch.equal(net(x, t, y), torch.zeros_like(x))
    tokens, c = torch.randn(2, 2 if tubelet == 2 else 4, 16, 32), torch.randn(2, 32)
    for block in net.blocks:
        assert torch.equal(block(tokens, c), tokens)
    assert net(x, t, y).requires_grad


def test_the_class_and_its_null_change_the_output():
    torch.manual_seed(0)
    net = perturbed(tiny(classes=3))
    x, t = torch.randn(1, 4, 1, 8, 8).expand(3, -1, -1, -1, -1), torch.tensor([5, 5, 5])
    with torch.no_grad():
        out, none = net(x, t, torch.tensor([0, 1, 3])), net(x[:1], t[:1])
    assert (out[0] - out[1]).abs().max() > 1e-4 and torch.allclose(none[0], out[2], atol=1e-6)
    assert (out[0] - out[2]).abs().max() > 1e-4  # the null class is a class of its own


def test_bad_shapes_are_named():
    with pytest.raises(common.UserError, match="--patch 3"):
        tiny(patch=3)
    with pytest.raises(common.UserError, match="--tubelet 3"):
        tiny(tubelet=3)
    with pytest.raises(common.UserError, match="Variant 4 needs an even number of heads"):
        latte.Latte(1, 8, 4, width=24, heads=3, variant=4)
    with pytest.raises(common.UserError, match="--variant 5"):
        tiny(variant=5)


# ----------------------------------------------------------------------------------------------
# Gflops: (F N)^2 for full attention, F N^2 + N F^2 factorised
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("axis", list(MIXES))
def test_attention_costs_its_formula_in_multiply_adds(axis):
    d, N = 32, 16
    for frames in (2, 4, 8):
        counted = latte.multiply_adds(latte.Attention(d, 4, axis), torch.zeros(1, frames, N, d)) * 1e9
        linear = 4 * d * d * frames * N  # q, k, v and the output projection, per token
        scores = {"full": 2 * (frames * N) ** 2 * d, "spatial": 2 * frames * N ** 2 * d,
                  "temporal": 2 * N * frames ** 2 * d,
                  "heads": frames * N ** 2 * d + N * frames ** 2 * d}[axis]  # q k^T and the weighted sum of v
        assert round(counted) == linear + scores, (axis, frames)


def test_full_attention_grows_quadratically_in_frames_and_factorised_nearly_linearly():
    """Gflops per clip g(F) = a + b F + c F^2: c is the attention's, 2 N^2 d per full attention, 2 N d per
    temporal one (the spatial one is linear in F). The second difference over F = 2, 4, 6 is 8 c."""
    N, d, depth = 16, 32, 2

    def quadratic_and_ratio(variant):
        g = [latte.gflops(tiny(variant, frames=F, depth=depth), (F, 1, 8, 8)) * 1e9 for F in (2, 4, 6, 8)]
        return (g[2] - 2 * g[1] + g[0]) / 8, g[3] / g[1]

    c_full, ratio_full = quadratic_and_ratio(0)
    c_fact, ratio_fact = quadratic_and_ratio(3)
    assert round(c_full) == depth * 2 * N ** 2 * d
    assert round(c_fact) == depth * 2 * N * d
    assert ratio_full > 2.4 and ratio_fact < 2.05  # doubling F from 4 to 8: 2 would be linear


# ----------------------------------------------------------------------------------------------
# The objective and the sampler
# ----------------------------------------------------------------------------------------------

def test_q_sample_and_predict_x0_invert_each_other():
    sch = latte.linear_schedule(100)
    x0, eps, t = torch.randn(3, 4, 1, 8, 8), torch.randn(3, 4, 1, 8, 8), torch.tensor([1, 50, 100])
    x_t = latte.q_sample(x0, t, eps, sch)
    ab = sch.alpha_bar[t].view(-1, 1, 1, 1, 1)  # float64
    want = ab.sqrt() * x0.double() + (1 - ab).sqrt() * eps.double()  # sqrt(1 - alpha_bar), not 1 - alpha_bar
    assert torch.allclose(x_t.double(), want, atol=1e-6)
    assert torch.allclose(latte.predict_x0(x_t, t, eps, sch), x0, atol=1e-4)
    assert sch.alpha_bar[0] == 1 and abs(sch.beta[1].item() - 1e-3) < 1e-12


def test_training_step_is_the_loss_at_its_draws_with_dropped_labels():
    torch.manual_seed(0)
    net, sch = perturbed(tiny(classes=3)), latte.linear_schedule(100)
    x0, y = torch.randn(6, 4, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    torch.manual_seed(1)
    got = latte.training_step(net, x0, y, sch, Draws(6), null=3, p_uncond=0.5)
    torch.manual_seed(1)
    drop, t, eps = torch.rand(6) < 0.5, torch.randint(1, 101, (6,)), torch.randn(6, 4, 1, 8, 8)
    assert 0 < drop.sum() < 6
    seen = []
    net.register_forward_pre_hook(lambda m, args: seen.append(args[2]))
    want = latte.loss(net, x0, torch.where(drop, 3, y), t, eps, sch).mean()
    assert torch.allclose(got, want) and torch.equal(seen[0], torch.where(drop, 3, y))
    x_t = latte.q_sample(x0, t, eps, sch)
    assert torch.allclose(want, (eps - net(x_t, t, seen[0])).square().mean())


def test_ddim_with_the_true_noise_returns_the_single_data_point():
    sch = latte.linear_schedule(100)
    x_star = torch.rand(1, 4, 1, 8, 8) * 2 - 1

    def eps_star(x, t):  # the exact eps of a one-point data set: (x_t - sqrt(alpha_bar) x*) / sqrt(1 - alpha_bar)
        ab = latte.extract(sch.alpha_bar, t, x)
        return (x - ab.sqrt() * x_star) / (1 - ab).sqrt()

    # with the true eps, DDIM keeps x_T's noise: x_tau = sqrt(alpha_bar_tau) x* + sqrt(1 - alpha_bar_tau) eps_0
    x_T = torch.randn((3, 4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    eps_0 = eps_star(x_T, torch.full((3,), 100))
    steps = []

    def on_step(x, done, total):
        ab = sch.alpha_bar[[90, 80, 70, 60, 50, 40, 30, 20, 10, 0][done - 1]]
        assert torch.allclose(x, ab.sqrt() * x_star + (1 - ab).sqrt() * eps_0, atol=1e-5)
        steps.append((done, total))
    out = latte.sample_ddim(eps_star, (3, 4, 1, 8, 8), sch, 10, generator=torch.Generator().manual_seed(0),
                            on_step=on_step)
    assert torch.allclose(out, x_star.expand_as(out), atol=1e-5)
    assert steps == [(i, 10) for i in range(1, 11)]
    assert latte.ddim_timesteps(100, 10) == list(range(10, 101, 10)) and latte.ddim_timesteps(100, 1) == [100]
    with pytest.raises(common.UserError, match="between 1 and T = 100"):
        latte.ddim_timesteps(100, 101)


def test_guidance_at_1_is_conditional_at_0_unconditional_and_extrapolates_between():
    torch.manual_seed(0)
    net = perturbed(tiny(classes=3))
    x, t, y = torch.randn(2, 4, 1, 8, 8), torch.tensor([30, 60]), torch.tensor([0, 2])
    with torch.no_grad():
        cond, null = net(x, t, y), net(x, t, torch.tensor([3, 3]))
        assert torch.allclose(latte.guided(net, y, 1.0)(x, t), cond)
        assert torch.allclose(latte.guided(net, y, 0.0)(x, t), null, atol=1e-5)
        assert torch.allclose(latte.guided(net, y, 3.0)(x, t), null + 3 * (cond - null), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Video measures and pictures
# ----------------------------------------------------------------------------------------------

def test_temporal_consistency_counts_clips_of_one_class():
    labels = torch.tensor([[1, 1, 1, 1], [2, 2, 3, 2], [0, 0, 0, 0], [4, 1, 1, 1]])
    assert latte.temporal_consistency(labels) == 0.5


def moving_squares(n=6, frames=8, canvas=20, size=12):
    g = torch.Generator().manual_seed(0)
    images = torch.full((n, 1, size, size), -1.0)
    for i in range(n):
        images[i, :, 3:9, 2 + i % 4:8 + i % 4] = torch.rand(1, 6, 6, generator=g)
    return common.MovingClips(common.ImageTensors(images, torch.zeros(n, dtype=torch.long)), frames, canvas)


def test_motion_fits_bouncing_garments_and_not_shuffled_or_still_ones():
    ds = moving_squares()
    clips = torch.stack([ds[i][0] for i in range(len(ds))])
    com = latte.centre_of_mass(clips)
    for i in range(len(ds)):  # the centre of mass moves with the garment's corner
        path = ds.path(i).float()
        assert torch.allclose(com[i] - com[i, :1], path - path[:1], atol=1e-4)
    residual, speed = latte.motion(clips, ds.travel)
    assert residual.max() < 0.1 and speed.min() >= 1
    shuffled = clips[:, torch.tensor([0, 5, 2, 7, 1, 4, 6, 3])]
    assert latte.motion(shuffled, ds.travel)[0].mean() > 0.5
    residual, speed = latte.motion(clips[:, :1].expand_as(clips), ds.travel)
    assert residual.max() < 1e-4 and speed.max() == 0  # standing still fits: speed says it does not move


def test_save_gif_and_strip(tmp_path):
    clips = torch.rand(5, 3, 1, 8, 8) * 2 - 1
    latte.save_gif(clips, tmp_path / "a" / "clips.gif", fps=5)
    with Image.open(tmp_path / "a" / "clips.gif") as im:
        assert im.n_frames == 3 and im.size == (3 * 10 + 2, 2 * 10 + 2)  # a 3 x 2 grid, 2 pixels of padding
    latte.save_strip(clips, tmp_path / "strip.png")
    with Image.open(tmp_path / "strip.png") as im:
        assert im.size == (3 * 10 + 2, 5 * 10 + 2)  # one row of frames per clip


# ----------------------------------------------------------------------------------------------
# Learning: motion needs the temporal attention
# ----------------------------------------------------------------------------------------------

def bars(n, g, frames=4, size=8):
    """Clips of a vertical bar moving right one pixel a frame, from column 0 or from column 4."""
    start = 4 * torch.randint(0, 2, (n,), generator=g)
    x = torch.full((n, frames, 1, size, size), -1.0)
    for f in range(frames):
        x[torch.arange(n), f, 0, :, start + f] = 1.0
    return x


def moving_right(x):
    """The share of clips whose brightest column moves right one pixel every frame."""
    col = x.mean(-2).flatten(2).argmax(-1)  # (B, F)
    return ((col[:, 1:] - col[:, :-1]) == 1).all(1).float().mean().item()


def test_a_tiny_latte_learns_a_bar_moving_right():
    """Each frame alone is a bar in the left or the right half; only attending across frames keeps
    the halves of one clip together (frames drawn independently would move right 1 time in 8)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    sch = latte.linear_schedule(100)
    net = latte.Latte(1, 8, 4, patch=4, depth=2, width=32, heads=2, variant=3)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0)
    assert moving_right(bars(64, g)) == 1
    for _ in range(1000):
        loss = latte.training_step(net, bars(64, g), None, sch, Draws(64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x = latte.sample_ddim(net, (64, 4, 1, 8, 8), sch, 20, generator=torch.Generator().manual_seed(1))
    assert moving_right(x) > 0.6


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """16 8x8 grayscale PNGs of two named classes (folders bar and box): moving on a 12x12 canvas,
    clips of 4 frames."""
    root = tmp_path_factory.mktemp("garments")
    for name, box in (("bar", [3, 0, 4, 7]), ("box", [1, 1, 6, 6])):
        (root / name).mkdir()
        for i in range(8):
            im = Image.new("L", (8, 8), 10 * i)
            ImageDraw.Draw(im).rectangle(box, fill=255 - 10 * i)
            im.save(root / name / f"{i}.png")
    return root


def argv(data, out, *extra, steps="4"):
    """4 clips a batch: 4 batches per epoch."""
    return ["--dataset", str(data), "--image-size", "8", "--canvas", "12", "--frames", "4", "--model", "T/4",
            "--depth", "2", "--width", "32", "--heads", "2", "--T", "20", "--sampling-steps", "3",
            "--batch-size", "4", "--steps", steps, "--out", str(out), "--device", "cpu", "--lr", "1e-3", *extra]


def exit_message(args):
    try:
        latte.main(args)
    except SystemExit as e:
        return str(e.code)
    return None


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """An uninterrupted 4-step run: one epoch."""
    out = tmp_path_factory.mktemp("trained") / "run"
    latte.main(argv(folder, out))
    return out


def test_cli_trains_and_leaves_a_checkpoint_a_gif_and_a_strip(trained):
    ckpt = load(trained / "ckpt.pt")
    assert ckpt["method"] == "latte" and ckpt["step"] == 4 and ckpt["shape"] == [4, 1, 12, 12]
    assert ckpt["classes"] == ["bar", "box"]
    with Image.open(trained / "samples_epoch001.gif") as im:  # one row per class, 4 clips each
        assert im.format == "GIF" and im.n_frames == 4 and im.size == (4 * 14 + 2, 2 * 14 + 2)
    with Image.open(trained / "samples_epoch001.png") as im:  # each row's first clip, frame by frame
        assert im.format == "PNG" and im.size == (4 * 14 + 2, 2 * 14 + 2)
    assert not list(trained.glob("*.tmp"))


def test_resume_is_bit_for_bit(folder, trained, tmp_path):
    """2 steps, then --resume to 4: the weights of 4 steps straight."""
    out = tmp_path / "run"
    latte.main(argv(folder, out, steps="2"))
    assert load(out / "ckpt.pt")["step"] == 2
    latte.main(argv(folder, out, "--resume", steps="4"))
    resumed, straight = load(out / "ckpt.pt"), load(trained / "ckpt.pt")
    assert resumed["step"] == 4
    for part in ("model", "ema"):
        for k, v in straight[part].items():
            assert torch.equal(v, resumed[part][k]), f"{part}.{k}"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_and_exits_128_plus_its_number(folder, tmp_path, sig):
    """Ctrl-C or SIGTERM to a subprocess once its first epoch is done: the step ends, the run saves
    and exits 130 or 143."""
    p = subprocess.Popen([sys.executable, "-u", str(ROOT / "latte.py"), "--log-every", "0",
                          *argv(folder, tmp_path / "run", steps="10000")],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("step ") or line.startswith("error"):
            break
    p.send_signal(sig)
    start = time.time()
    lines += p.stdout.readlines()
    assert p.wait(timeout=60) == 128 + sig, "".join(lines)
    assert time.time() - start < 10, "".join(lines)
    step = load(tmp_path / "run" / "ckpt.pt")["step"]
    assert step >= 4 and lines[-1].startswith(f"interrupted at step {step};"), "".join(lines)


def test_sample_writes_a_gif_a_strip_and_a_tensor(trained, tmp_path):
    sample = ["--sample", "--ckpt", str(trained / "ckpt.pt"), "--n", "5", "--sampling-steps", "2", "--device", "cpu"]
    for name in ("x.gif", "x.png", "x.pt"):
        latte.main([*sample, "--save", str(tmp_path / name)])
    with Image.open(tmp_path / "x.gif") as im:  # one column per class: the classes in turn
        assert im.n_frames == 4 and im.size == (2 * 14 + 2, 3 * 14 + 2)
    with Image.open(tmp_path / "x.png") as im:  # one row of 4 frames per clip
        assert im.size == (4 * 14 + 2, 5 * 14 + 2)
    x = load(tmp_path / "x.pt")
    assert x.shape == (5, 4, 1, 12, 12) and x.dtype == torch.float32 and x.abs().max() <= 1
    msg = exit_message([*sample, "--save", str(tmp_path / "x.jpg")])
    assert msg and "FILE.gif" in msg and "FILE.pt" in msg


def test_a_tensor_file_of_clips_trains_with_tubelets_and_samples(tmp_path):
    """Float clips (N, F, C, H, W) without labels: an unconditional model, its x_0 not clipped."""
    torch.save(torch.rand(8, 4, 1, 8, 8) * 2 - 1, tmp_path / "clips.pt")
    latte.main(["--dataset", str(tmp_path / "clips.pt"), "--model", "T/4", "--depth", "1", "--width", "32",
                "--heads", "2", "--variant", "0", "--tubelet", "2", "--T", "20", "--sampling-steps", "2",
                "--batch-size", "4", "--steps", "1", "--out", str(tmp_path / "run"), "--device", "cpu"])
    ckpt = load(tmp_path / "run" / "ckpt.pt")
    assert ckpt["shape"] == [4, 1, 8, 8] and ckpt["classes"] is None and not ckpt["args"]["clip_x0"]
    latte.main(["--sample", "--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--n", "3", "--device", "cpu",
                "--save", str(tmp_path / "x.pt")])
    assert load(tmp_path / "x.pt").shape == (3, 4, 1, 8, 8)


@pytest.mark.parametrize("extra, words", [
    (["--tubelet", "3"], ["--tubelet 3 does not divide the 4 frames", "[1, 2, 4]"]),
    (["--patch", "5"], ["--patch 5 does not divide the 12x12 frames", "[1, 2, 3, 4, 6, 12]"]),
    (["--variant", "2", "--depth", "3"], ["even depth (got 3)"]),
    (["--sampling-steps", "21"], ["--sampling-steps must be between 1 and --T (20), got 21"]),
    (["--model", "T/0"], ["unknown model 'T/0'"]),
])
def test_bad_training_input_is_one_line(folder, tmp_path, extra, words, capsys):
    msg = exit_message(argv(folder, tmp_path / "run", *extra))
    text = (msg or "") + capsys.readouterr().err
    assert all(w in text for w in words) and "Traceback" not in text, text
    assert not (tmp_path / "run" / "ckpt.pt").exists()


@pytest.mark.parametrize("content, extra, words", [
    (torch.zeros(5, 1, 12, 12), [], ["(N, F, C, H, W)", "(5, 1, 12, 12)"]),
    (torch.zeros(5, 4, 1, 12, 10), [], ["H = W"]),
    (torch.zeros(5, 4, 1, 12, 12), ["--frames", "8"], ["--frames", "4 frames of 12x12", "leave --frames out"]),
])
def test_a_video_file_of_the_wrong_shape_is_one_line(tmp_path, content, extra, words):
    torch.save(content, tmp_path / "bad.pt")
    msg = exit_message(["--dataset", str(tmp_path / "bad.pt"), "--batch-size", "2", "--steps", "1", "--device",
                        "cpu", "--out", str(tmp_path / "run"), *extra])
    assert msg and all(w in msg for w in words), msg
