"""Tests for ldm.py: the autoencoder's posterior and KL, the scale factor, the latent schedule,
cross-attention and guidance, the samplers, small learning checks, and the command line."""
import argparse
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
import common  # noqa: E402
import ldm  # noqa: E402


def perturbed(net, std=0.05, seed=0):
    """The network with every parameter nudged, so that zero-initialised layers pass signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return net


# ----------------------------------------------------------------------------------------------
# Stage 1: shapes, the posterior, the KL term, the scale factor
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("f", [1, 2, 4, 8])
def test_encoder_and_decoder_shapes_for_each_f(f):
    ae = ldm.Autoencoder(3, f, latent_channels=4, width=8, res_blocks=1)
    x = torch.randn(2, 3, 32, 32)
    posterior = ae.encode(x)
    assert posterior.mean.shape == posterior.log_var.shape == (2, 4, 32 // f, 32 // f)
    assert ae.decode(posterior.sample(torch.randn_like(posterior.mean))).shape == x.shape


def test_f_must_be_a_power_of_two():
    for f in (3, 6, 32):
        with pytest.raises(common.UserError, match="power of 2"):
            ldm.Autoencoder(1, f)


def test_kl_equals_the_gaussian_closed_form_and_a_monte_carlo_estimate():
    g = torch.Generator().manual_seed(0)
    mean, log_var = torch.randn(3, 2, 2, 2, generator=g), 0.5 * torch.randn(3, 2, 2, 2, generator=g)
    posterior = ldm.DiagonalGaussian(torch.cat([mean, log_var], 1))
    q = torch.distributions.Normal(mean, (0.5 * log_var).exp())
    p = torch.distributions.Normal(0.0, 1.0)
    closed = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    assert torch.allclose(posterior.kl(), closed, atol=1e-5)
    z = torch.stack([posterior.sample(torch.randn(mean.shape, generator=g)) for _ in range(20000)])  # KL = E_q[...]
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).flatten(2).sum(2).mean(0)
    assert torch.allclose(monte_carlo, closed, rtol=0.05, atol=0.05), (monte_carlo, closed)


def test_the_log_variance_is_clamped_and_the_sample_is_reparameterised():
    moments = torch.cat([torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 100.0)], 1)
    assert ldm.DiagonalGaussian(moments).log_var.max() == 20
    assert torch.isfinite(ldm.DiagonalGaussian(moments).kl()).all()
    mean = torch.zeros(1, 1, 2, 2, requires_grad=True)
    log_var = torch.zeros(1, 1, 2, 2, requires_grad=True)
    ldm.DiagonalGaussian(torch.cat([mean, log_var], 1)).sample(torch.randn(1, 1, 2, 2)).sum().backward()
    assert mean.grad is not None and log_var.grad is not None and log_var.grad.abs().sum() > 0


def test_stage_1_step_is_the_l1_of_the_reparameterised_reconstruction_plus_the_weighted_kl():
    torch.manual_seed(0)
    ae = ldm.Autoencoder(1, 2, latent_channels=2, width=8, res_blocks=1)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    torch.manual_seed(1)
    loss = ldm.stage_1_step(ae, x, (2, 4, 4), 0.5, 0.0, ldm.Draws(4, "cpu"))
    torch.manual_seed(1)
    eps = torch.randn(4, 2, 4, 4)  # the step's draw
    posterior = ae.encode(x)
    x_rec = ae.decode(posterior.mean + (0.5 * posterior.log_var).exp() * eps)
    expected = ((x - x_rec).abs().flatten(1).sum(1) + 0.5 * posterior.kl()).mean()
    assert torch.allclose(loss, expected, atol=1e-4)


def test_psnr():
    x = torch.zeros(2, 1, 4, 4)
    assert ldm.psnr(x, x + 0.2)[0].item() == pytest.approx(10 * math.log10(4 / 0.04), abs=1e-4)


def test_without_the_scale_factor_the_schedule_s_signal_to_noise_ratios_are_wrong():
    """z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps has SNR(t) = alpha_bar_t var(z_0) /
    (1 - alpha_bar_t): the schedule is designed for var(z_0) = 1. Latents of std ~8 keep the signal
    dominant for far more of the T steps; scaled by scale_by_std, they match the design."""
    torch.manual_seed(0)
    ae = ldm.Autoencoder(1, 2, latent_channels=2, width=8, res_blocks=1)
    with torch.no_grad():
        out = ae.encoder.layers[-1]  # its channels: 2 means, then 2 log-variances
        out.weight[:2].mul_(50)  # a wide latent, as a weakly regularised encoder gives
        out.weight[2:].zero_()
        out.bias[2:].fill_(-10)
    x = torch.rand(64, 1, 8, 8) * 2 - 1
    eps = torch.randn(64, 2, 4, 4)
    z = ae.encode(x).sample(eps)
    scale = ldm.scale_by_std(ae, x, eps)
    assert z.std() > 4, z.std()
    assert (scale * z).std().item() == pytest.approx(1, abs=0.1)
    ab = ldm.Schedule(1000).alpha_bar[1:]

    def steps_where_signal_dominates(latent):
        return (ab * latent.var() / (1 - ab) > 1).sum().item()

    designed = (ab / (1 - ab) > 1).sum().item()
    assert abs(steps_where_signal_dominates(scale * z) - designed) <= 10
    assert steps_where_signal_dominates(z) > designed + 150


# ----------------------------------------------------------------------------------------------
# Stage 2: the schedule, cross-attention, guidance, samplers
# ----------------------------------------------------------------------------------------------

def test_schedule_is_linear_in_sqrt_beta_with_the_official_end_points():
    sch = ldm.Schedule(1000)
    assert sch.alpha_bar[0] == 1 and sch.beta[0] == 0
    assert sch.beta[1].item() == pytest.approx(0.0015) and sch.beta[1000].item() == pytest.approx(0.0195)
    steps = sch.beta[1:].sqrt().diff()
    assert torch.allclose(steps, steps[0].expand_as(steps))
    assert torch.allclose(sch.alpha_bar[1:], torch.cumprod(1 - sch.beta[1:], 0))


def test_q_sample_has_the_right_mean_and_variance_and_predict_z0_inverts_it():
    sch = ldm.Schedule(1000)
    t = torch.full((20000,), 300)
    z0 = torch.full((20000, 1, 1, 1), 2.0)
    eps = torch.randn_like(z0)
    z_t = ldm.q_sample(z0, t, eps, sch)
    ab = sch.alpha_bar[300].item()
    assert z_t.mean().item() == pytest.approx(math.sqrt(ab) * 2, abs=0.02)
    assert z_t.var().item() == pytest.approx(1 - ab, rel=0.05)  # sqrt(1 - alpha_bar) eps, not (1 - alpha_bar) eps
    assert torch.allclose(ldm.predict_z0(z_t, t, eps, sch), z0, atol=1e-4)


def test_stage_2_step_noises_the_scaled_posterior_draw_and_drops_the_condition_at_p_uncond():
    """z_0 = scale * z (a posterior of sigma ~ 0: z = mu), t in 1..T, z_t by Eq. 4, the loss against
    the eps that z_t holds, and the null condition (the table's last row) with probability p_uncond."""
    sch, n, seen = ldm.Schedule(100), 4000, {}
    mean = torch.randn(n, 2, 2, 2)
    moments = torch.cat([mean, torch.full_like(mean, -30.0)], 1)

    def eps_theta(z_t, t, cond):
        seen.update(z_t=z_t, t=t, cond=cond)
        return torch.zeros_like(z_t)

    y = torch.randint(0, 2, (n,))
    torch.manual_seed(0)
    loss = ldm.stage_2_step(eps_theta, moments, y, 0.5, torch.arange(3), 0.25, sch, ldm.Draws(n, "cpu"))
    t = seen["t"]
    assert t.min() >= 1 and t.max() <= 100 and len(t.unique()) == 100
    eps = (seen["z_t"] - ldm.extract(sch.alpha_bar.sqrt(), t, mean) * 0.5 * mean) \
        / ldm.extract((1 - sch.alpha_bar).sqrt(), t, mean)
    assert loss.item() == pytest.approx(eps.square().mean().item(), rel=1e-4)
    assert abs(eps.mean()) < 0.03 and abs(eps.std() - 1) < 0.03, (eps.mean(), eps.std())
    dropped = seen["cond"] == 2
    assert dropped.float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert torch.equal(seen["cond"][~dropped], y[~dropped])


def test_cross_attention_with_keys_and_values_from_the_features_is_self_attention():
    torch.manual_seed(0)
    C, heads = 16, 2
    self_attn = perturbed(common.Attention(C, heads))
    cross = ldm.CrossAttention(C, C, heads)
    with torch.no_grad():
        self_attn.qkv.bias.zero_()
        W = self_attn.qkv.weight[:, :, 0, 0]
        cross.W_Q.weight.copy_(W[:C])
        cross.W_K.weight.copy_(W[C:2 * C])
        cross.W_V.weight.copy_(W[2 * C:])
        cross.out.weight.copy_(self_attn.proj.weight[:, :, 0, 0])
        cross.out.bias.copy_(self_attn.proj.bias)
    x = torch.randn(2, C, 4, 4)
    phi = self_attn.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
    out = cross(phi, phi).transpose(1, 2).reshape(x.shape)
    assert torch.allclose(self_attn(x), x + out, atol=1e-5)


def test_cross_attention_depends_on_the_condition_and_starts_as_the_identity():
    torch.manual_seed(0)
    block = ldm.SpatialTransformer(16, 2, context_dim=8)
    x, c1, c2 = torch.randn(2, 16, 4, 4), torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    assert torch.equal(block(x, c1), x)  # zero-initialised output projection
    perturbed(block)
    assert not torch.allclose(block(x, c1), block(x, c2), atol=1e-3)
    assert torch.allclose(block(x, c1), block(x, c1[:, [2, 0, 1]]), atol=1e-5)  # keys are a set


def test_one_class_token_makes_cross_attention_a_per_class_offset():
    """softmax over a single key is 1: every position receives W_V tau(y), whatever it asks."""
    torch.manual_seed(0)
    attn = ldm.CrossAttention(16, 8, 2)
    out = attn(torch.randn(1, 5, 16), torch.randn(1, 1, 8))
    assert torch.allclose(out, out[:, :1].expand_as(out), atol=1e-6)


def tiny_model(cond="class", classes=2, size=8, C=2):
    args = ldm.parse_args(["--width", "16", "--res-blocks", "1", "--heads", "2", "--context-dim", "16",
                           "--cond", cond])
    args.text_len = 16
    ldm.fill_model_defaults(args, size)
    return perturbed(ldm.make_model(args, (C, size, size), classes))


@pytest.mark.parametrize("cond", ["class", "text"])
def test_guidance_at_1_is_conditional_at_0_unconditional(cond):
    torch.manual_seed(0)
    model = tiny_model(cond).eval()
    y = torch.tensor([0, 1]) if cond == "class" else ldm.tokenize(["square", "bar"], 16)
    null = ldm.null_condition(y, 2)
    assert torch.equal(null, torch.tensor([2, 2]) if cond == "class" else torch.zeros_like(y))
    z, t = torch.randn(2, 2, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        assert torch.allclose(ldm.guided(model, y, 1.0, 2)(z, t), model(z, t, y), atol=1e-5)
        assert torch.allclose(ldm.guided(model, y, 0.0, 2)(z, t), model(z, t, null), atol=1e-5)
        s3 = ldm.guided(model, y, 3.0, 2)(z, t)
        assert torch.allclose(s3, model(z, t, null) + 3 * (model(z, t, y) - model(z, t, null)), atol=1e-4)
        assert not torch.allclose(model(z, t, y), model(z, t, null), atol=1e-3)


def test_unconditional_model_is_a_plain_unet():
    model = tiny_model(classes=None)
    assert model.tau is None
    assert any(isinstance(m, common.Attention) for m in model.modules())
    assert not any(isinstance(m, ldm.SpatialTransformer) for m in model.modules())


def test_samplers_return_the_single_data_point_given_its_exact_noise():
    """For data that is one point z*, eps(z_t, t) = (z_t - sqrt(alpha_bar_t) z*) / sqrt(1 - alpha_bar_t)
    exactly; DDIM and DDPM's Algorithm 2 must both end at z*."""
    sch = ldm.Schedule(100)
    z_star = torch.randn(1, 2, 4, 4)

    def oracle(z, t):
        ab = ldm.extract(sch.alpha_bar, t, z)
        return (z - ab.sqrt() * z_star) / (1 - ab).sqrt()

    z_T = torch.randn(3, 2, 4, 4)
    assert torch.allclose(ldm.sample_ddim(oracle, z_T, sch, 10), z_star.expand(3, -1, -1, -1), atol=1e-3)
    out = ldm.sample_ddpm(oracle, z_T, sch, torch.Generator().manual_seed(0))
    assert torch.allclose(out, z_star.expand(3, -1, -1, -1), atol=1e-3)


def wiggly_eps(z, t):
    """A fixed, nonlinear eps_theta that depends on z and t (no network needed)."""
    return 0.8 * torch.tanh(2 * z) + 0.1 * torch.cos(t.float() / 7).view(-1, 1, 1, 1)


def posterior_mean(z_t, t, sch):
    """Eq. 7 of DDPM: mu_tilde_t = sqrt(ab_{t-1}) beta_t / (1 - ab_t) z_0 + sqrt(alpha_t) (1 - ab_{t-1}) /
    (1 - ab_t) z_t, with z_0 predicted from wiggly_eps; and beta_tilde_t = (1 - ab_{t-1}) / (1 - ab_t) beta_t."""
    tt = torch.full((len(z_t),), t)
    z0 = ldm.predict_z0(z_t, tt, wiggly_eps(z_t, tt), sch)
    ab, ab_prev, beta = sch.alpha_bar[t].item(), sch.alpha_bar[t - 1].item(), sch.beta[t].item()
    mean = math.sqrt(ab_prev) * beta / (1 - ab) * z0 + math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab) * z_t
    return mean, (1 - ab_prev) / (1 - ab) * beta


def test_one_ddpm_step_draws_the_posterior_mean_with_variance_beta_t():
    """Algorithm 2 with sigma_t^2 = beta_t: from a fixed z_t, z_{t-1} ~ N(mu_tilde_t, beta_t) at t > 1,
    over many draws; at t = 1 it is the mean itself. (The whole chain's end, checked above, would
    hide a wrong variance: the oracle's last step lands on z* whatever came before.)"""
    sch, n = ldm.Schedule(100), 40000
    g = torch.Generator().manual_seed(0)
    z_t = torch.randn(1, 2, 2, 2, generator=g)
    for t in (2, 10, 50, 100):
        mean, _ = posterior_mean(z_t, t, sch)
        beta = sch.beta[t].item()
        z_prev = ldm.ddpm_step(wiggly_eps, z_t.expand(n, -1, -1, -1), t, sch, g)
        assert (z_prev.mean(0) - mean[0]).abs().max() < 5 * math.sqrt(beta / n), t
        assert (z_prev.var(0) / beta - 1).abs().max() < 0.05, (t, z_prev.var(0).flatten() / beta)
    mean, _ = posterior_mean(z_t, 1, sch)
    z_0 = ldm.ddpm_step(wiggly_eps, z_t.expand(3, -1, -1, -1), 1, sch, g)
    assert torch.allclose(z_0, mean.expand(3, -1, -1, -1), atol=1e-5)


def test_ddim_eta_1_on_every_step_is_ddpm_with_beta_tilde():
    """DDIM's Eq. 16 at eta = 1 with S = T is sigma_t^2 = beta_tilde_t, and Eq. 12's mean is then
    Eq. 7's posterior mean: the chain is DDPM's ancestral sampler with beta_tilde, draw for draw."""
    sch = ldm.Schedule(100)
    z_T = torch.randn(64, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    out = ldm.sample_ddim(wiggly_eps, z_T, sch, 100, eta=1.0, generator=torch.Generator().manual_seed(5))
    g, z = torch.Generator().manual_seed(5), z_T
    for t in range(100, 0, -1):
        mean, beta_tilde = posterior_mean(z, t, sch)
        z = mean + math.sqrt(beta_tilde) * torch.randn(z.shape, generator=g) if t > 1 else mean
    torch.testing.assert_close(out, z, atol=1e-4, rtol=1e-4)


def test_a_tiny_ldm_learns_two_classes_through_cross_attention():
    """Latents 2x4x4: class 0 is +1 in channel 0 and -1 in channel 1, class 1 the reverse. Guided
    samples must land on their own class's pattern: the class reaches the U-Net only through the
    cross-attention to tau_theta(y), so a broken condition gives the wrong class half the time."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    sch = ldm.Schedule(1000)
    model = ldm.make_model(ldm.parse_args(["--width", "16", "--res-blocks", "1", "--heads", "2",
                                           "--context-dim", "16", "--mults", "1", "--attn", "4"]),
                           (2, 4, 4), 2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    pattern = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])[:, :, None, None].expand(-1, -1, 4, 4)
    for _ in range(300):
        y = torch.randint(0, 2, (64,), generator=g)
        z0 = pattern[y] + 0.1 * torch.randn(64, 2, 4, 4, generator=g)
        cond = torch.where(torch.rand(64, generator=g) < 0.1, 2, y)  # the null label 10% of the time
        t, eps = torch.randint(1, 1001, (64,), generator=g), torch.randn(64, 2, 4, 4, generator=g)
        loss = ldm.ldm_loss(model, z0, cond, t, eps, sch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    y = torch.tensor([0] * 16 + [1] * 16)
    z = ldm.sample_ddim(ldm.guided(model, y, 2.0, 2), torch.randn(32, 2, 4, 4, generator=g), sch, 20)
    own_class = (z[:, 0].mean((1, 2)) > z[:, 1].mean((1, 2))) == (y == 0)
    assert own_class.float().mean() >= 0.9, z.mean((2, 3))
    assert (z - pattern[y]).abs().mean((1, 2, 3)).median() < 0.25


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def two_kinds(n, g, size=8):
    """Images: class 0 bright on the left half, class 1 bright on the right half."""
    y = torch.randint(0, 2, (n,), generator=g)
    left = (torch.arange(size) < size // 2).float()
    x = torch.where(y[:, None, None, None] == 0, left, 1 - left).expand(n, 1, size, size)
    return (x * 1.6 - 0.8 + 0.1 * torch.randn(n, 1, size, size, generator=g)).clamp(-1, 1), y


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """32 8x8 uint8 images of two named classes, saved as a tensor file: a data set."""
    x, y = two_kinds(32, torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("data") / "two.pt"
    torch.save({"x": ((x + 1) * 127.5).round().to(torch.uint8), "y": y, "classes": ["Left", "Right"]}, path)
    return path


def ae_argv(data, out, *extra, steps="40"):
    return ["--stage", "ae", "--dataset", str(data), "--f", "2", "--latent-channels", "2", "--ae-width", "8",
            "--ae-res-blocks", "1", "--batch-size", "8", "--steps", steps, "--lr", "3e-3",
            "--out", str(out), "--device", "cpu", *extra]


def ldm_argv(ae, out, *extra, steps="6"):
    return ["--stage", "ldm", "--ae", str(ae), "--width", "16", "--res-blocks", "1", "--heads", "2",
            "--context-dim", "16", "--T", "20", "--sampling-steps", "3", "--batch-size", "8",
            "--steps", steps, "--lr", "1e-3", "--out", str(out), "--device", "cpu", *extra]


def exit_message(args):
    try:
        ldm.main(args)
    except SystemExit as e:
        return str(e.code)
    return None


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def ae(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ae") / "run"
    ldm.main(ae_argv(data, out))
    return out / "ckpt.pt"


@pytest.fixture(scope="module")
def trained(ae, tmp_path_factory):
    """An uninterrupted 6-step stage-2 run: 4 batches per epoch, so grids after steps 4 and 6."""
    out = tmp_path_factory.mktemp("ldm") / "run"
    ldm.main(ldm_argv(ae, out))
    return out


def test_stage_1_reconstructs_better_than_the_mean_image_and_stores_its_scale(data, ae):
    ckpt = load(ae)
    assert ckpt["method"] == "ldm-ae" and ckpt["step"] == 40 and ckpt["shape"] == [1, 8, 8]
    assert sorted(p.name for p in ae.parent.glob("reconstructions_epoch*.png"))[-1] == "reconstructions_epoch010.png"
    x = common.load_dataset(str(data))[0].images.float() / 127.5 - 1
    model = ldm.make_autoencoder(argparse.Namespace(**ckpt["args"]), 1)
    model.load_state_dict(ckpt["model"])
    with torch.no_grad():
        posterior = model.encode(x)
        rec = model.decode(posterior.mean)
        scaled = ckpt["scale"] * posterior.sample(torch.randn_like(posterior.mean))
    assert (x - rec).square().mean() < 0.5 * (x - x.mean(0)).square().mean()
    assert scaled.std().item() == pytest.approx(1, abs=0.15)


def test_stage_2_trains_and_carries_the_decoder(trained):
    ckpt = load(trained / "ckpt.pt")
    assert ckpt["method"] == "ldm" and ckpt["step"] == 6 and ckpt["classes"] == ["Left", "Right"]
    assert ckpt["shape"] == [2, 4, 4] and ckpt["ae"]["shape"] == [1, 8, 8] and "decoder" in ckpt["ae"]
    assert sorted(p.name for p in trained.glob("samples_epoch*.png")) == ["samples_epoch001.png",
                                                                         "samples_epoch002.png"]
    assert not list(trained.glob("*.tmp"))


@pytest.mark.parametrize("stage, sig", [("ldm", signal.SIGINT), ("ae", signal.SIGTERM)])
def test_resume_after_a_signal_is_bit_for_bit(data, ae, trained, tmp_path, monkeypatch, stage, sig):
    out, real, calls = tmp_path / "run", ldm.learning_rate, []

    def learning_rate_then_signal(*a):
        calls.append(1)
        if len(calls) == 4:  # during step 4: it finishes, then the run saves and stops
            os.kill(os.getpid(), sig)
        return real(*a)

    make = (lambda *e: ldm_argv(ae, out, *e)) if stage == "ldm" else (lambda *e: ae_argv(data, out, *e))
    monkeypatch.setattr(ldm, "learning_rate", learning_rate_then_signal)
    with pytest.raises(SystemExit) as stop:
        ldm.main(make())
    assert stop.value.code == 128 + sig  # 130 after Ctrl-C, 143 after SIGTERM: not "done"
    assert load(out / "ckpt.pt")["step"] == 4
    monkeypatch.setattr(ldm, "learning_rate", real)
    ldm.main(make("--resume"))
    resumed = load(out / "ckpt.pt")
    straight = load(trained / "ckpt.pt" if stage == "ldm" else ae)
    assert resumed["step"] == straight["step"]
    for part in ("model", "ema") if stage == "ldm" else ("model",):
        for k, v in straight[part].items():
            assert torch.equal(v, resumed[part][k]), f"{part}.{k}"
    if stage == "ae":
        assert resumed["scale"] == straight["scale"]


def test_sample_needs_only_the_stage_2_checkpoint(ae, trained, tmp_path):
    moved = tmp_path / "alone.pt"
    moved.write_bytes((trained / "ckpt.pt").read_bytes())
    pt = tmp_path / "x.pt"
    ldm.main(["--sample", "--ckpt", str(moved), "--n", "5", "--save", str(pt), "--cfg-scale", "2",
              "--sampling-steps", "4", "--device", "cpu"])
    x = load(pt)
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.float32 and x.abs().max() <= 1
    ldm.main(["--sample", "--ckpt", str(moved), "--n", "2", "--save", str(tmp_path / "new" / "x.png"),
              "--sampler", "ddpm", "--device", "cpu"])
    assert (tmp_path / "new" / "x.png").is_file()


def test_text_conditioning_trains_and_samples(ae, tmp_path):
    out = tmp_path / "text"
    ldm.main(ldm_argv(ae, out, "--cond", "text", steps="2"))
    ckpt = load(out / "ckpt.pt")
    assert ckpt["args"]["cond"] == "text" and ckpt["args"]["text_len"] == 16
    ldm.main(["--sample", "--ckpt", str(out / "ckpt.pt"), "--n", "2", "--save", str(tmp_path / "t.png"),
              "--cfg-scale", "3", "--sampling-steps", "2", "--device", "cpu"])


def test_encode_writes_a_data_set_and_decode_turns_it_back_into_images(data, ae, tmp_path):
    z_path, x_path = tmp_path / "latents.pt", tmp_path / "images.pt"
    ldm.main(["--encode", "--ae", str(ae), "--save", str(z_path), "--device", "cpu"])
    ds, info = common.load_dataset(str(z_path))
    assert (info.channels, info.size, info.count, info.classes) == (2, 4, 32, ["Left", "Right"])
    assert ds.images.dtype == torch.float32 and ds.images.std().item() == pytest.approx(1, abs=0.2)
    assert torch.equal(ds.labels, load(data)["y"])
    ldm.main(["--decode", "--ae", str(ae), "--ckpt", str(z_path), "--save", str(x_path), "--device", "cpu"])
    x, real = load(x_path), load(data)["x"].float() / 127.5 - 1
    assert x.shape == (32, 1, 8, 8)
    assert (x - real).square().mean() < 0.5 * (real - real.mean(0)).square().mean()
    torch.save(torch.zeros(3, 5, 4, 4), tmp_path / "wrong.pt")
    msg = exit_message(["--decode", "--ae", str(ae), "--ckpt", str(tmp_path / "wrong.pt"),
                        "--save", str(x_path), "--device", "cpu"])
    assert msg and "(N, 2, 4, 4)" in msg and "(3, 5, 4, 4)" in msg


def test_bad_input(data, ae, trained, tmp_path):
    out = str(tmp_path / "run")
    cases = [
        (ldm_argv(ae, out)[:2] + ldm_argv(ae, out)[4:], "stage 2 needs a stage-1 autoencoder"),
        (ldm_argv(trained / "ckpt.pt", out), "is a checkpoint of ldm, not of ldm-ae"),  # stage 2's as --ae
        (ae_argv(data, out, "--f", "3"), "power of 2"),
        (ae_argv(data, out, "--f", "16"), "does not divide the 8x8 images"),
        (ldm_argv(ae, out, "--mults", "1,2,3"), "too small to halve 2 times"),
    ]
    for args, words in cases:
        msg = exit_message(args)
        assert msg and words in msg, (args, msg)
    other = tmp_path / "ddpm.pt"
    torch.save({"method": "ddpm"}, other)
    msg = exit_message(ldm_argv(other, out))
    assert msg and str(other) in msg and "is a checkpoint of ddpm, not of ldm-ae" in msg
    msg = exit_message(["--sample", "--ckpt", str(ae), "--save", str(tmp_path / "x.png"), "--device", "cpu"])
    assert msg and "is a checkpoint of ldm-ae, not of ldm" in msg


def test_resume_refuses_another_data_set(ae, trained, tmp_path, data):
    out = tmp_path / "run"
    ldm.main(ldm_argv(ae, out, steps="1"))
    msg = exit_message(ldm_argv(ae, out, "--resume", "--dataset", str(tmp_path / "other.pt")))
    assert msg and "--dataset" in msg and "leave the flag out" in msg


def test_guidance_on_an_unconditional_model(ae, tmp_path):
    x = (torch.rand(16, 1, 8, 8) * 255).to(torch.uint8)
    torch.save(x, tmp_path / "plain.pt")
    ldm.main(ae_argv(tmp_path / "plain.pt", tmp_path / "ae", steps="2"))
    ldm.main(ldm_argv(tmp_path / "ae" / "ckpt.pt", tmp_path / "run", steps="1"))
    msg = exit_message(["--sample", "--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--save",
                        str(tmp_path / "x.png"), "--cfg-scale", "3", "--device", "cpu"])
    assert msg and "--cfg-scale needs a conditional model" in msg


def test_damaged_and_incomplete_checkpoints_and_out_are_named(data, ae, tmp_path):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(ae.read_bytes()[:2000])
    msg = exit_message(["--encode", "--ae", str(cut), "--save", str(tmp_path / "z.pt"), "--device", "cpu"])
    assert msg and "damaged or incomplete" in msg
    ckpt = load(ae)
    del ckpt["model"]
    torch.save(ckpt, tmp_path / "no_model.pt")
    msg = exit_message(["--encode", "--ae", str(tmp_path / "no_model.pt"), "--save", str(tmp_path / "z.pt")])
    assert msg and "incomplete ldm-ae checkpoint: no model" in msg
    (tmp_path / "file").write_text("")
    msg = exit_message(ae_argv(data, tmp_path / "file", steps="1"))
    assert msg and "is a file" in msg


def test_sigterm_while_a_slow_grid_is_drawn_keeps_the_checkpoint_and_exits_143(ae, tmp_path):
    """The checkpoint is written before the end-of-epoch grid, and the grid's sampler checks the stop
    flag every step: a kill that follows SIGTERM within seconds loses nothing. DDPM with T = 2000
    makes the grid of a tiny model take a minute; the signal must end it at once."""
    out = tmp_path / "run"
    argv = ldm_argv(ae, out, "--sampler", "ddpm", "--T", "2000", "--log-every", "0", steps="8")
    proc = subprocess.Popen([sys.executable, str(ROOT / "ldm.py"), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 30
        while not (out / "ckpt.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert (out / "ckpt.pt").exists(), "no checkpoint before the grid"
        time.sleep(0.2)  # into the grid
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 143, output
    assert "stopped while drawing the grid" in output and "interrupted at step 4" in output, output
    assert load(out / "ckpt.pt")["step"] == 4 and not (out / "samples_epoch001.png").exists()


def parse_error(capsys, argv):
    """parse_args's one line for bad flags (argparse exits 2), and no traceback."""
    with pytest.raises(SystemExit) as e:
        ldm.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("argv, words", [
    (["--heads", "3"], "--heads 3 must divide the channels of every U-Net level: 64"),
    (["--width", "16", "--mults", "2,3", "--heads", "32"], "48 (--width 16 x multiplier 3) is not divisible"),
    (["--width", "18", "--heads", "2"], "GroupNorm cannot split"),
    (["--mults", ""], "--mults: must be comma-separated integers"),
    (["--mults", ","], "--mults: must be comma-separated integers"),
    (["--mults", "0,1"], "--mults: must be a positive integer, got '0'"),
    (["--attn", "x"], "--attn: must be a positive integer, got 'x'"),
    (["--dropout", "2"], "--dropout must be at least 0 and below 1, got 2.0"),
    (["--dropout", "-1"], "--dropout must be at least 0 and below 1, got -1.0"),
    (["--cfg-scale", "-1"], "--cfg-scale must be 0 or more"),
    (["--grad-clip", "-1"], "--grad-clip must be 0 (off) or positive, got -1.0"),
    (["--eta", "1.5"], "--eta must be between 0 (DDIM) and 1"),
    (["--lr", "nan"], "--lr must be positive"),
    (["--T", "20", "--sampling-steps", "50"], "--sampling-steps must be between 1 and --T (20), got 50"),
    (["--cond", "text", "--context-dim", "10"], "--context-dim must be a multiple of 4"),
])
def test_bad_flags_are_one_line_from_parse_args(capsys, argv, words):
    line = parse_error(capsys, argv)
    assert "error: " in line and words in line, line


def test_grad_clip_0_is_no_clipping(data, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(a[1]))
    ldm.main(ae_argv(data, tmp_path / "a", "--grad-clip", "0", steps="1"))
    assert calls == []
    ldm.main(ae_argv(data, tmp_path / "b", "--grad-clip", "0.5", steps="1"))
    assert calls == [0.5]


def test_divergence_and_non_finite_data_are_named(data, ae, tmp_path):
    msg = exit_message(ldm_argv(ae, tmp_path / "run", "--lr", "1e9", steps="8"))
    assert msg and "without saving, as the loss went from" in msg and "(diverged: try a lower --lr)" in msg, msg
    assert not (tmp_path / "run" / "ckpt.pt").exists()  # it diverged before its first epoch ended
    x = torch.zeros(16, 1, 8, 8)
    x[:, :, 0, 0] = float("nan")
    torch.save(x, tmp_path / "nan.pt")
    msg = exit_message(ae_argv(tmp_path / "nan.pt", tmp_path / "ae", steps="2"))
    # read back at the epoch's end (step 2), before its checkpoint
    assert msg and "stopped at step 2 without saving, as the data hold NaN or inf" in msg, msg
    assert "--lr" not in msg
    msg = exit_message(ldm_argv(ae, tmp_path / "run2", "--dataset", str(tmp_path / "nan.pt")))
    assert msg and "hold non-finite values: the data set has NaN or inf" in msg, msg


def test_resume_refuses_a_flag_it_would_ignore(ae, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(ae.read_bytes())  # stage 1 was run with --f 2
    for f in ("8", "4"):  # 4 is the default: given all the same
        msg = exit_message(["--stage", "ae", "--resume", "--out", str(out), "--f", f, "--device", "cpu"])
        assert msg and f"--resume continues the run with its --f 2, not {f}: leave the flag out" in msg, msg
    msg = exit_message(["--stage", "ae", "--resume", "--out", str(out), "--f", "2", "--ae-width", "16",
                        "--device", "cpu", "--steps", "40"])
    assert msg and "--resume continues the run with its --ae-width 8, not 16: leave the flag out" in msg, msg


def test_ctrl_c_during_sampling_is_one_line_and_exit_130(trained, tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(ldm, "draw", interrupted)
    with pytest.raises(SystemExit) as e:
        try:
            ldm.main(["--sample", "--ckpt", str(trained / "ckpt.pt"), "--save", str(tmp_path / "x.png"),
                      "--device", "cpu"])
        except KeyboardInterrupt:  # (pytest would take it for the user's own Ctrl-C)
            pytest.fail("KeyboardInterrupt escaped main()")
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "interrupted: nothing saved"
    assert not (tmp_path / "x.png").exists()


def test_sample_checks_its_flags_and_the_checkpoint_before_any_work(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(ldm, "draw", lambda *a, **k: pytest.fail("sampled before the error"))
    ckpt = str(trained / "ckpt.pt")
    (tmp_path / "d.png").mkdir()
    (tmp_path / "file").write_text("")
    cases = [
        (["--save", str(tmp_path / "d.png")], "is a folder: give a file name"),
        (["--save", str(tmp_path / "file" / "x.png")], "is a file, not a folder"),
        (["--save", str(tmp_path / "x.png"), "--sampling-steps", "50"], "between 1 and T = 20, got 50"),
    ]
    for extra, words in cases:
        msg = exit_message(["--sample", "--ckpt", ckpt, "--device", "cpu", *extra])
        assert msg and words in msg, (extra, msg)
    full = load(trained / "ckpt.pt")
    for part, key in (("", "ema"), ("", "args"), ("args", "T"), ("ae", "decoder")):
        broken = {k: (dict(v) if isinstance(v, dict) else v) for k, v in full.items()}
        del (broken[part] if part else broken)[key]
        torch.save(broken, tmp_path / "broken.pt")
        msg = exit_message(["--sample", "--ckpt", str(tmp_path / "broken.pt"), "--save", str(tmp_path / "x.png"),
                            "--device", "cpu"])
        name = f"{part}.{key}" if part else key
        assert msg and f"incomplete ldm checkpoint: no {name}" in msg, msg


def test_decode_names_damaged_and_non_finite_latents(ae, tmp_path):
    good = tmp_path / "good.pt"
    torch.save(torch.zeros(3, 2, 4, 4), good)
    files = {"text.pt": b"not a tensor file", "cut.pt": good.read_bytes()[:300]}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    torch.save(torch.zeros(2, 4, 4), tmp_path / "3d.pt")
    torch.save({"y": torch.zeros(3)}, tmp_path / "no_x.pt")
    torch.save(torch.full((3, 2, 4, 4), float("nan")), tmp_path / "nan.pt")
    cases = [("text.pt", "cannot read"), ("cut.pt", "damaged or incomplete"),
             ("3d.pt", "must hold latents (N, 2, 4, 4)"), ("no_x.pt", 'without an "x" entry (its keys: y)'),
             ("nan.pt", "non-finite latents")]
    for name, words in cases:
        msg = exit_message(["--decode", "--ae", str(ae), "--ckpt", str(tmp_path / name),
                            "--save", str(tmp_path / "x.png"), "--device", "cpu"])
        assert msg and words in msg, (name, msg)
    assert not (tmp_path / "x.png").exists()
