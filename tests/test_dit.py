"""Tests for dit.py: the transformer's parts, the learned-variance diffusion, guidance, the paper's
model sizes, a small learning check, many processes, and the command line."""
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dit  # noqa: E402


def perturbed(net, std=0.05, seed=0):
    """The network with every parameter nudged, so that zero-initialised layers pass signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return net


def tiny_dit(block="adaln-zero", learn_sigma=True, classes=3, size=8, patch=2, C=1):
    return dit.DiT(C, size, patch, depth=2, width=32, heads=2, num_classes=classes,
                   learn_sigma=learn_sigma, block=block)


# ----------------------------------------------------------------------------------------------
# Patches and positions
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [1, 2, 4, 7])
def test_patchify_and_unpatchify_are_inverses(p):
    x = torch.randn(2, 3, 28, 28)
    tokens = dit.patchify(x, p)
    assert tokens.shape == (2, (28 // p) ** 2, p * p * 3)
    assert torch.equal(dit.unpatchify(tokens, p, 3), x)
    # token k is the patch at row k // (28 / p), column k % (28 / p), read row by row
    k = 28 // p + 1 if 28 // p > 1 else 0
    r, c = divmod(k, 28 // p)
    patch = x[0, :, r * p:(r + 1) * p, c * p:(c + 1) * p]  # (C, p, p)
    assert torch.equal(tokens[0, k], patch.permute(1, 2, 0).flatten())


def test_2d_position_embedding_matches_its_formula():
    d, h, w = 16, 3, 5
    pe = dit.pos_embed_2d(d, h, w)
    assert pe.shape == (h * w, d)
    for k in (0, 7, 14):
        row, col = divmod(k, w)
        for i in range(d // 4):
            omega = 1 / 10000 ** (i / (d // 4))
            assert pe[k, i].item() == pytest.approx(math.sin(col * omega), abs=1e-6)
            assert pe[k, d // 4 + i].item() == pytest.approx(math.cos(col * omega), abs=1e-6)
            assert pe[k, d // 2 + i].item() == pytest.approx(math.sin(row * omega), abs=1e-6)
            assert pe[k, 3 * d // 4 + i].item() == pytest.approx(math.cos(row * omega), abs=1e-6)


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", dit.BLOCKS)
def test_a_fresh_dit_outputs_exactly_zero_so_the_first_loss_is_about_one(block):
    torch.manual_seed(0)
    net = tiny_dit(block)
    x0 = torch.rand(64, 1, 8, 8) * 2 - 1
    t = torch.randint(1, 1001, (64,))
    out = net(torch.randn(64, 1, 8, 8), t, torch.randint(0, 4, (64,)))
    assert out.shape == (64, 2, 8, 8) and torch.count_nonzero(out) == 0
    sch = dit.linear_schedule(1000)
    eps = torch.randn_like(x0)
    l_simple = dit.hybrid_loss(net, x0, torch.zeros(64, dtype=torch.long), t, eps, sch, False, 0)
    assert l_simple.mean().item() == pytest.approx(1, abs=0.05)


def test_adaln_zero_blocks_start_as_the_identity():
    net = tiny_dit("adaln-zero")
    block, x = net.blocks[0], torch.randn(2, 16, 32)
    c = torch.randn(2, 32)
    assert torch.equal(block(x, c), x)
    assert not torch.equal(tiny_dit("adaln").blocks[0](x, c), x)


@pytest.mark.parametrize("block", dit.BLOCKS)
def test_attention_without_positions_is_permutation_equivariant(block):
    torch.manual_seed(0)
    b = perturbed(dit.BLOCKS[block](32, 2, 4.0))
    x, c = torch.randn(2, 9, 32), torch.randn(2, 32)
    cond = c if block.startswith("adaln") else c[:, None]  # c, or the conditioning tokens
    perm = torch.randperm(9)
    assert torch.allclose(b(x, cond)[:, perm], b(x[:, perm], cond), atol=1e-5)


def test_the_position_embedding_makes_the_dit_see_where_each_patch_is():
    """Swapping two patches of the input does not just swap their outputs: positions matter."""
    torch.manual_seed(0)
    net = perturbed(tiny_dit(learn_sigma=False, patch=4)).eval()
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([100])
    swapped = x.clone()
    swapped[..., :4, :4], swapped[..., :4, 4:] = x[..., :4, 4:], x[..., :4, :4]
    out, out_swapped = net(x, t), net(swapped, t)
    assert not torch.allclose(out_swapped[..., :4, :4], out[..., :4, 4:], atol=1e-4)
    net.pos_embed.zero_()  # without it, the transformer is blind to where a patch sits
    out, out_swapped = net(x, t), net(swapped, t)
    assert torch.allclose(out_swapped[..., :4, :4], out[..., :4, 4:], atol=1e-5)


def test_learned_sigma_gives_2c_channels_and_a_variance_between_beta_tilde_and_beta():
    assert tiny_dit(learn_sigma=True, C=3)(torch.randn(1, 3, 8, 8), torch.tensor([5])).shape == (1, 6, 8, 8)
    assert tiny_dit(learn_sigma=False, C=3)(torch.randn(1, 3, 8, 8), torch.tensor([5])).shape == (1, 3, 8, 8)
    sch = dit.linear_schedule(1000)
    t = torch.arange(2, 1001)
    x_t = torch.randn(len(t), 1, 2, 2)
    for v in (-1.0, -0.3, 0.5, 1.0):
        out = torch.cat([torch.randn_like(x_t), torch.full_like(x_t, v)], 1)
        _, log_var = dit.p_mean_variance(out, x_t, t, sch, learn_sigma=True)
        var = log_var.exp()[:, 0, 0, 0].double()
        lo, hi = sch.beta_tilde[t], sch.beta[t]
        assert ((var >= lo * (1 - 1e-5)) & (var <= hi * (1 + 1e-5))).all()
        if v == -1:
            assert torch.allclose(var, lo, rtol=1e-5)
        if v == 1:
            assert torch.allclose(var, hi, rtol=1e-5)


def test_model_sizes_and_gflops_match_the_paper():
    """Table 1's widths and depths on 256x256 images' 32x32x4 latents, 1,000 classes, learned sigma:
    about 33M and 130M parameters (S/2, B/2) and Table 4's Gflops 6.06 (S/2), 1.41 (S/4), 23.01 (B/2)."""
    for name, params, gflops in (("S/2", 33e6, 6.06), ("S/4", 33e6, 1.41), ("B/2", 130e6, 23.01)):
        size, patch = dit.model_name(name).split("/")
        depth, width, heads = dit.MODELS[size]
        net = dit.DiT(4, 32, int(patch), depth, width, heads, 1000, True)
        n = sum(p.numel() for p in net.parameters())
        assert n == pytest.approx(params, rel=0.01), name
        assert dit.gflops(net, (4, 32, 32), torch.tensor([3])) == pytest.approx(gflops, rel=0.01), name


# ----------------------------------------------------------------------------------------------
# Diffusion with a learned variance
# ----------------------------------------------------------------------------------------------

def test_respacing_keeps_alpha_bar_at_the_kept_times():
    sch = dit.linear_schedule(1000)
    short, taus = dit.respace(sch, 250)
    assert len(taus) == 250 and taus[-1] == 1000 and taus == sorted(taus)
    assert torch.allclose(short.alpha_bar[1:], sch.alpha_bar[taus], rtol=1e-12)
    full, all_t = dit.respace(sch, 1000)
    assert all_t == list(range(1, 1001)) and torch.allclose(full.beta, sch.beta, rtol=1e-10)
    with pytest.raises(dit.UserError, match="between 1 and T"):
        dit.respace(sch, 1001)


def test_vlb_is_zero_at_the_true_posterior_and_positive_elsewhere():
    torch.manual_seed(0)
    sch = dit.linear_schedule(1000)
    x0 = torch.rand(6, 1, 4, 4) * 2 - 1
    t = torch.tensor([2, 10, 100, 500, 900, 1000])
    eps = torch.randn_like(x0)
    x_t = dit.q_sample(x0, t, eps, sch)
    # the true eps gives the true posterior mean; v = -1 gives Sigma = beta_tilde, the true variance
    right = torch.cat([eps, -torch.ones_like(x0)], 1)
    assert dit.vlb_term(right, x0, x_t, t, sch).abs().max() < 1e-4
    wrong_var = torch.cat([eps, torch.ones_like(x0)], 1)
    wrong_mean = torch.cat([eps + 0.1, -torch.ones_like(x0)], 1)
    # beta_t and beta_tilde_t differ most for small t (and hardly at all near T)
    assert (dit.vlb_term(wrong_var, x0, x_t, t, sch)[:3] > 1e-4).all()
    assert (dit.vlb_term(wrong_var, x0, x_t, t, sch) >= -1e-6).all()
    assert (dit.vlb_term(wrong_mean, x0, x_t, t, sch) > 1e-5).all()


def test_decoder_likelihood_sums_to_one_over_the_256_pixel_values():
    values = torch.arange(256.0) / 127.5 - 1
    for mean, log_var in ((0.0, -6.0), (0.7, -3.0), (-0.99, -9.0)):
        nll = dit.decoder_nll(values, torch.full_like(values, mean), torch.full_like(values, log_var))
        assert (-nll).exp().sum().item() == pytest.approx(1, abs=1e-4)


def test_vlb_at_t_1_is_the_decoder_nll_in_bits():
    torch.manual_seed(0)
    sch = dit.linear_schedule(1000)
    x0 = torch.randint(0, 256, (3, 1, 4, 4)) / 127.5 - 1  # 8-bit pixels, the outermost bins included
    t = torch.ones(3, dtype=torch.long)
    x_t = dit.q_sample(x0, t, torch.randn_like(x0), sch)
    out = torch.cat([torch.randn_like(x0), torch.rand_like(x0) * 2 - 1], 1)
    mean, log_var = dit.p_mean_variance(out, x_t, t, sch, learn_sigma=True)
    nll = dit.decoder_nll(x0, mean, log_var).flatten(1).mean(1) / math.log(2)
    assert torch.allclose(dit.vlb_term(out, x0, x_t, t, sch), nll, rtol=1e-5)
    kl = dit.normal_kl(dit.q_posterior_mean(x0, x_t, t, sch), dit.extract(sch.log_beta_tilde, t, x_t),
                       mean, log_var).flatten(1).mean(1) / math.log(2)
    assert not torch.allclose(nll, kl, rtol=0.1)  # the test tells the two branches apart


def test_hybrid_loss_is_l_simple_plus_lambda_T_times_l_t():
    """L_hybrid = L_simple + lambda L_vlb, L_vlb estimated by T L_t at the drawn t (t = 1 included)."""
    torch.manual_seed(0)
    sch, lam = dit.linear_schedule(100), 0.003
    x0, eps = torch.randint(0, 256, (4, 1, 4, 4)) / 127.5 - 1, torch.randn(4, 1, 4, 4)
    out = torch.cat([torch.randn_like(x0), torch.rand_like(x0) * 2 - 1], 1)
    t = torch.tensor([1, 2, 50, 100])

    def net(x_t, t, y):
        return out

    hybrid = dit.hybrid_loss(net, x0, None, t, eps, sch, True, lam)
    simple = dit.hybrid_loss(net, x0, None, t, eps, sch, False, lam)
    assert torch.allclose(simple, (eps - out[:, :1]).square().flatten(1).mean(1))
    l_t = dit.vlb_term(out, x0, dit.q_sample(x0, t, eps, sch), t, sch)
    assert torch.allclose(hybrid - simple, lam * sch.T * l_t, rtol=1e-5)


def test_vlb_trains_only_the_variance():
    """The stop-gradient of L_hybrid: lambda L_vlb sends no gradient into the eps channels."""
    torch.manual_seed(0)
    sch = dit.linear_schedule(1000)
    x0, eps = torch.rand(4, 1, 4, 4) * 2 - 1, torch.randn(4, 1, 4, 4)
    out = torch.randn(4, 2, 4, 4, requires_grad=True)

    def net(x_t, t, y):
        return out

    t = torch.tensor([1, 3, 300, 999])
    hybrid = dit.hybrid_loss(net, x0, None, t, eps, sch, True, 0.001).sum()
    simple = dit.hybrid_loss(net, x0, None, t, eps, sch, False, 0.001).sum()
    g_hybrid, = torch.autograd.grad(hybrid, out)
    g_simple, = torch.autograd.grad(simple, out)
    assert torch.allclose(g_hybrid[:, :1], g_simple[:, :1])  # eps: L_simple's gradient alone
    assert g_hybrid[:, 1:].abs().sum() > 0 and g_simple[:, 1:].abs().sum() == 0


def oracle(x0, sch, v=0.0, seen=None):
    """eps_theta and v of the data set {x0}: the exact noise of x_t, and a fixed v. Records the
    times it is given, and the states x_t, in `seen`."""
    def f(x_t, t):
        if seen is not None:
            seen.append((t[0].item(), x_t.clone()))
        eps = (x_t - dit.extract(sch.alpha_bar.sqrt(), t, x_t) * x0) / dit.extract((1 - sch.alpha_bar).sqrt(), t, x_t)
        return torch.cat([eps, torch.full_like(eps, v)], 1)
    return f


@pytest.mark.parametrize("v", [-1.0, 0.0, 1.0])
def test_respaced_ancestral_sampling_returns_the_single_data_point(v):
    """The times the network sees, and DDIM's states. (The last step returns the oracle's x_0 whatever
    came before: the variance and the mean at t > 1 are checked by the one-step test below.)"""
    sch = dit.linear_schedule(1000)
    _, taus = dit.respace(sch, 25)
    x0, seen = torch.rand(1, 1, 4, 4) * 2 - 1, []
    x = dit.sample_ddpm(oracle(x0, sch, v, seen), torch.randn(3, 1, 4, 4), sch, 25, True, clip_x0=False)
    assert torch.allclose(x, x0.expand_as(x), atol=1e-3)
    assert [t for t, _ in seen] == taus[::-1]  # the network sees the original times, T first
    # DDIM with the exact eps keeps x_T's noise: x_tau = sqrt(ab) x_0 + sqrt(1 - ab) eps_T
    x_T, seen = torch.randn(3, 1, 4, 4), []
    x = dit.sample_ddim(oracle(x0, sch, 0.0, seen), x_T.clone(), sch, 10, clip_x0=False)
    assert torch.allclose(x, x0.expand_as(x), atol=1e-3)
    _, taus = dit.respace(sch, 10)
    assert [t for t, _ in seen] == taus[::-1]
    ab_T = sch.alpha_bar[1000].item()
    eps_T = (x_T - math.sqrt(ab_T) * x0) / math.sqrt(1 - ab_T)  # the noise x_T holds
    for t, x_t in seen:
        ab = sch.alpha_bar[t].item()
        assert torch.allclose(x_t, math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps_T, atol=1e-4)


class FirstStepTaken(Exception):
    pass


@pytest.mark.parametrize("steps", [2, 4, 1000])
def test_one_ancestral_step_has_the_posterior_mean_and_the_learned_variance(steps):
    """From a fixed x_T, x_{t-1} of the chain's first step over many draws: mean DDPM Eq. 7's
    posterior mean (the oracle's x_0), variance exp(f log beta_i + (1 - f) log beta_tilde_i) with
    f = (v + 1) / 2, on the respaced chain's beta_i (2 steps: beta_tilde_i / beta_i ~ 1e-4)."""
    torch.manual_seed(0)
    sch, n = dit.linear_schedule(1000), 20000
    short, _ = dit.respace(sch, steps)
    i = steps  # the first step, t = T > 1
    ab, ab_prev, beta = short.alpha_bar[i], short.alpha_bar[i - 1], short.beta[i]
    beta_tilde = (1 - ab_prev) / (1 - ab) * beta
    x0, x_T = torch.rand(1, 1, 2, 2) * 2 - 1, 2 * torch.randn(1, 1, 2, 2)
    mean = (ab_prev.sqrt() * beta / (1 - ab) * x0 + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * x_T)[0]
    for v in (-1.0, -0.5, 0.0, 0.6, 1.0):
        f = (v + 1) / 2
        var = math.exp(f * math.log(beta) + (1 - f) * math.log(beta_tilde))
        taken = []

        def first_step(x, done, total):
            taken.append(x)
            raise FirstStepTaken

        with pytest.raises(FirstStepTaken):
            dit.sample_ddpm(oracle(x0, sch, v), x_T.expand(n, -1, -1, -1).clone(), sch, steps, True,
                            clip_x0=False, generator=torch.Generator().manual_seed(1), on_step=first_step)
        x = taken[0].double()
        assert (x.mean(0) - mean).abs().max() < 5 * math.sqrt(var / n), (steps, v)
        assert (x.var(0) / var - 1).abs().max() < 5 * math.sqrt(2 / n), (steps, v)


def test_guidance_at_1_is_conditional_and_at_0_unconditional():
    torch.manual_seed(0)
    net = perturbed(tiny_dit(classes=4)).eval()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 990]), torch.tensor([0, 2, 3])
    cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, 4))
    assert torch.allclose(dit.guided(net, y, 1.0)(x, t), cond, atol=1e-5)
    g0 = dit.guided(net, y, 0.0)(x, t)
    assert torch.allclose(g0[:, :1], uncond[:, :1], atol=1e-5)
    assert torch.allclose(g0[:, 1:], cond[:, 1:], atol=1e-5)  # the variance is never guided
    g4 = dit.guided(net, y, 4.0)(x, t)
    assert torch.allclose(g4[:, :1], uncond[:, :1] + 4 * (cond[:, :1] - uncond[:, :1]), atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Learning: a tiny class-conditional DiT learns two kinds of image
# ----------------------------------------------------------------------------------------------

def two_kinds(n, g):
    """8x8 images: class 0 bright on the left half, class 1 bright on the right half."""
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.full((n, 1, 8, 8), -0.8) + 0.1 * torch.randn(n, 1, 8, 8, generator=g)
    left = torch.arange(8) < 4
    x[:, :, :, :] += 1.6 * torch.where(y[:, None, None, None] == 0, left.float(), (~left).float())
    return x.clamp(-1, 1), y


def test_a_tiny_dit_learns_two_classes():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    sch = dit.linear_schedule(100)
    net = dit.DiT(1, 8, 2, depth=2, width=64, heads=2, num_classes=2, learn_sigma=True)
    opt = torch.optim.AdamW(net.parameters(), lr=5e-3, weight_decay=0)
    for _ in range(300):
        x, y = two_kinds(64, g)
        loss = dit.training_step(net, x, y, sch, dit.Draws(64, "cpu"), null=2, p_uncond=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    y = torch.tensor([0] * 32 + [1] * 32)
    x = dit.sample_ddpm(dit.guided(net, y, 2.0), torch.randn(64, 1, 8, 8), sch, 50, True, clip_x0=True)
    left, right = x[..., :4].mean((1, 2, 3)), x[..., 4:].mean((1, 2, 3))
    assert (left[:32] > right[:32] + 0.5).float().mean() > 0.9, (left[:32], right[:32])
    assert (right[32:] > left[32:] + 0.5).float().mean() > 0.9, (left[32:], right[32:])
    for half in (x[:32], x[32:]):  # each class's images alike, up to the data's own noise (std 0.1)
        assert half.std(dim=0).mean() < 0.3


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """32 8x8 uint8 images of two named classes, saved as a tensor file: a data set."""
    x, y = two_kinds(32, torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("data") / "two.pt"
    torch.save({"x": ((x + 1) * 127.5).round().to(torch.uint8), "y": y, "classes": ["Left", "Right"]}, path)
    return path


def argv(data, out, *extra, steps="6"):
    return ["--dataset", str(data), "--model", "T/4", "--depth", "2", "--width", "32", "--heads", "2",
            "--T", "20", "--batch-size", "8", "--steps", steps, "--sampler", "ddim",
            "--sampling-steps", "3", "--out", str(out), "--device", "cpu", "--lr", "1e-3", *extra]


def exit_message(args):
    try:
        dit.main(args)
    except SystemExit as e:
        return str(e.code)
    return None


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """An uninterrupted 6-step run: 4 batches per epoch, so grids after steps 4 and 6."""
    out = tmp_path_factory.mktemp("trained") / "run"
    dit.main(argv(data, out))
    return out


def test_cli_trains_and_writes_its_outputs(trained):
    ckpt = load(trained / "ckpt.pt")
    assert ckpt["method"] == "dit" and ckpt["step"] == 6 and ckpt["classes"] == ["Left", "Right"]
    assert sorted(p.name for p in trained.glob("samples_epoch*.png")) == ["samples_epoch001.png",
                                                                         "samples_epoch002.png"]
    assert not list(trained.glob("*.tmp"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_resume_after_a_signal_is_bit_for_bit(data, trained, tmp_path, monkeypatch, sig):
    out, real, calls = tmp_path / "run", dit.ema_update, []

    def ema_update_then_signal(*a):
        real(*a)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(dit, "ema_update", ema_update_then_signal)
    with pytest.raises(SystemExit) as e:
        dit.main(argv(data, out))
    assert e.value.code == 128 + sig  # saved, then the exit status of an interrupted run
    assert load(out / "ckpt.pt")["step"] == 3
    monkeypatch.setattr(dit, "ema_update", real)
    dit.main(argv(data, out, "--resume"))
    resumed, straight = load(out / "ckpt.pt"), load(trained / "ckpt.pt")
    assert resumed["step"] == 6
    for part in ("model", "ema"):
        for k, v in straight[part].items():
            assert torch.equal(v, resumed[part][k]), f"{part}.{k}"


def test_sample_with_classes_a_prompt_and_a_tensor(trained, tmp_path):
    pt = tmp_path / "x.pt"
    dit.main(["--sample", "--ckpt", str(trained / "ckpt.pt"), "--n", "5", "--save", str(pt),
              "--sampler", "ddpm", "--sampling-steps", "4", "--device", "cpu", "--prompt", "right"])
    x = load(pt)
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.float32 and x.abs().max() <= 1
    msg = exit_message(["--sample", "--ckpt", str(trained / "ckpt.pt"), "--save", str(pt),
                        "--prompt", "Ankle boot", "--device", "cpu"])
    assert msg and "Left, Right" in msg


def test_two_processes_train_as_one_process_on_the_joined_batch(data, trained, tmp_path):
    """torchrun with 2 gloo processes, a global batch of 8 (4 each): the same weights as one process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "dit.py"), *argv(data, tmp_path / "ddp")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two, one = load(tmp_path / "ddp" / "ckpt.pt"), load(trained / "ckpt.pt")
    assert two["step"] == 6
    for k, v in one["model"].items():
        assert torch.allclose(v, two["model"][k], atol=1e-5, rtol=1e-4), k


@pytest.mark.parametrize("extra, words", [
    (["--patch", "3"], ["--patch 3", "8x8", "[1, 2, 4]"]),
    (["--grad-clip", "-1"], ["--grad-clip must be 0 (off) or positive, got -1"]),
    (["--lr", "0"], ["--lr must be positive"]),
    (["--prompt", "x"], ["--prompt is for --sample"]),
    (["--sampling-steps", "21"], ["between 1 and T = 20, got 21"]),
    (["--lr", "1e9"], ["stopped at step", "without saving", "try a lower --lr"]),
])
def test_bad_training_input(data, tmp_path, extra, words, capsys):
    msg = exit_message(argv(data, tmp_path / "run", *extra))
    text = (msg or "") + capsys.readouterr().err
    assert all(w in text for w in words), text


def test_unknown_model_is_an_argparse_error(capsys):
    for name in ("M/2", "T/0"):
        with pytest.raises(SystemExit):
            dit.parse_args(["--model", name])
        assert f"unknown model '{name}'" in capsys.readouterr().err


def test_prompt_for_an_unconditional_model(tmp_path):
    x = (torch.rand(16, 1, 8, 8) * 255).to(torch.uint8)
    torch.save(x, tmp_path / "plain.pt")
    dit.main(argv(tmp_path / "plain.pt", tmp_path / "run", steps="1"))
    msg = exit_message(["--sample", "--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--save",
                        str(tmp_path / "x.png"), "--prompt", "Bag", "--device", "cpu"])
    assert msg and "--prompt needs a conditional model" in msg
    for sampler in ("ddpm", "ddim"):  # an unconditional model samples
        dit.main(["--sample", "--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--save", str(tmp_path / "x.pt"),
                  "--n", "3", "--sampler", sampler, "--sampling-steps", "2", "--device", "cpu"])
        assert load(tmp_path / "x.pt").shape == (3, 1, 8, 8)


@pytest.mark.parametrize("content, words", [
    (torch.zeros(5, 8, 8), ["(N, C, H, W)", "(5, 8, 8)"]),
    (torch.zeros(5, 1, 8, 6), ["H = W"]),
    ({"x": torch.zeros(5, 1, 8, 8), "y": torch.zeros(4, dtype=torch.long)}, ["5 integer labels", "(4,)"]),
    ({"x": torch.zeros(5, 1, 8, 8), "y": torch.tensor([0, 1, 2, 0, 1]), "classes": ["a", "b"]},
     ["label 2", "2 class names"]),
])
def test_bad_tensor_files(tmp_path, content, words):
    torch.save(content, tmp_path / "bad.pt")
    msg = exit_message(argv(tmp_path / "bad.pt", tmp_path / "run", "--batch-size", "2"))
    assert msg and all(w in msg for w in words), msg


def test_bad_checkpoints(tmp_path):
    other = tmp_path / "ddpm.pt"
    torch.save({"method": "ddpm"}, other)
    msg = exit_message(["--sample", "--ckpt", str(other), "--save", str(tmp_path / "x.png"), "--device", "cpu"])
    assert msg and "a checkpoint of ddpm, not of dit" in msg
    msg = exit_message(["--sample", "--ckpt", str(tmp_path / "none.pt"), "--save", "x.png"])
    assert msg and "no checkpoint" in msg
    torch.save({"method": "dit", "shape": [1, 8, 8], "model": {}}, tmp_path / "part.pt")
    for extra in (["--sample", "--save", str(tmp_path / "x.png")], ["--resume"]):
        msg = exit_message(["--ckpt", str(tmp_path / "part.pt"), "--device", "cpu", *extra])
        assert msg and "incomplete dit checkpoint: no args, step, rng, classes, ema, optimizer" in msg, msg


def test_non_finite_data_is_named_as_the_data_not_the_learning_rate(tmp_path):
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    x[9] = float("nan")
    torch.save(x, tmp_path / "nan.pt")
    msg = exit_message(argv(tmp_path / "nan.pt", tmp_path / "run", steps="2"))
    assert msg and "the data hold NaN or inf" in msg and "--lr" not in msg
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_resume_refuses_another_dataset_or_block(data, trained, tmp_path):
    other = tmp_path / "other.pt"
    torch.save(load(data), other)  # the same shape and classes
    for extra, words in ((["--dataset", str(other)], f"--dataset {data}, not {other}"),
                         (["--block", "in-context"], "--block adaln-zero, not in-context")):
        msg = exit_message(["--resume", "--out", str(trained), "--device", "cpu", *extra])
        assert msg and f"--resume continues the run with its {words}" in msg and "leave the flag out" in msg, msg


def test_out_and_save_that_cannot_be_written(trained, data, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    msg = exit_message(argv(data, tmp_path / "file"))
    assert msg and "--out" in msg and "is a file" in msg
    (tmp_path / "dir.png").mkdir()
    msg = exit_message(["--sample", "--ckpt", str(trained / "ckpt.pt"), "--save", str(tmp_path / "dir.png"),
                        "--device", "cpu"])
    assert msg and "is a folder" in msg and "samples in" not in capsys.readouterr().out  # before sampling
    msg = exit_message(["--sample", "--ckpt", str(trained / "ckpt.pt"), "--save", str(tmp_path / "file" / "x.pt"),
                        "--device", "cpu"])
    assert msg and "cannot write --save" in msg


def test_ctrl_c_during_sample_is_one_line_and_exit_130(trained, tmp_path, monkeypatch, capsys):
    real = dit.guided

    def guided_then_ctrl_c(*a):
        f = real(*a)
        return lambda x, t: (os.kill(os.getpid(), signal.SIGINT), f(x, t))[1]

    monkeypatch.setattr(dit, "guided", guided_then_ctrl_c)
    with pytest.raises(SystemExit) as e:
        dit.main(["--sample", "--ckpt", str(trained / "ckpt.pt"), "--save", str(tmp_path / "x.png"),
                  "--device", "cpu"])
    assert e.value.code == 130 and "interrupted: nothing saved" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_a_signal_during_a_slow_grid_stops_it_at_the_next_step_and_exits_143(data, tmp_path):
    """SIGTERM to a subprocess once its last step is done and its grid (4 rows x 1000 steps, many
    seconds) begins: the grid stops at once, the checkpoint written before it stays."""
    p = subprocess.Popen([sys.executable, "-u", str(ROOT / "dit.py"), "--log-every", "0",
                          *argv(data, tmp_path / "run", "--T", "1000", "--sampler", "ddpm", "--sampling-steps",
                                "1000", steps="4")],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("step 4/4") or line.startswith("error"):
            break
    p.send_signal(signal.SIGTERM)
    start = time.time()
    lines += p.stdout.readlines()
    assert p.wait(timeout=60) == 143, "".join(lines)
    assert time.time() - start < 5, "".join(lines)
    assert "stopped while drawing the grid" in "".join(lines) and load(tmp_path / "run" / "ckpt.pt")["step"] == 4
    assert "interrupted at step 4" in lines[-1] and not (tmp_path / "run" / "samples_epoch001.png").exists()
