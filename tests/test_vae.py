"""Tests for vae.py: the reparameterisation and the KL of Appendix B, the ELBO and the
importance-weighted bound on probabilistic PCA (where log p(x) is exact), learning on small
images, and the command line."""
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import vae  # noqa: E402

# Every made-up folder is far below 1,000 images.
pytestmark = pytest.mark.filterwarnings("ignore:.*mostly memorises:UserWarning")


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Sec. 2.4 and Appendix B
# ----------------------------------------------------------------------------------------------

MU = torch.tensor([[0.0, 1.5, -2.0], [0.3, -0.7, 0.0]], dtype=torch.float64)
LOGVAR = torch.tensor([[0.0, -1.0, 0.8], [-2.5, 0.4, 1.2]], dtype=torch.float64)


def test_analytic_kl_equals_monte_carlo():
    # D_KL(q || p) = E_q[log q(z) - log p(z)], estimated with 400k reparameterised samples.
    eps = torch.randn(400_000, *MU.shape, generator=gen(0), dtype=torch.float64)
    z = vae.reparameterize(MU, LOGVAR, eps)
    mc = (vae.log_normal(z, MU, LOGVAR).sum(-1) - vae.log_prior(z)).mean(0)
    kl = vae.kl_to_prior(MU, LOGVAR)
    assert kl.shape == (2,)
    torch.testing.assert_close(kl, mc, atol=0.01, rtol=0)
    assert vae.kl_to_prior(torch.zeros(1, 4), torch.zeros(1, 4)).item() == 0  # q = p


def test_reparameterised_samples_have_mean_mu_and_variance_sigma2():
    eps = torch.randn(400_000, *MU.shape, generator=gen(1), dtype=torch.float64)
    z = vae.reparameterize(MU, LOGVAR, eps)
    torch.testing.assert_close(z.mean(0), MU, atol=0.02, rtol=0)
    torch.testing.assert_close(z.var(0), LOGVAR.exp(), atol=0, rtol=0.01)


def test_gradients_reach_mu_and_logvar():
    mu, logvar = MU.clone().requires_grad_(), LOGVAR.clone().requires_grad_()
    eps = torch.randn(MU.shape, generator=gen(2), dtype=torch.float64)
    vae.reparameterize(mu, logvar, eps).sum().backward()
    # dz/dmu = 1, dz/dlog sigma^2 = sigma eps / 2
    torch.testing.assert_close(mu.grad, torch.ones_like(MU))
    torch.testing.assert_close(logvar.grad, 0.5 * (0.5 * LOGVAR).exp() * eps)


class Constant(nn.Module):
    """A decoder that ignores z and returns fixed logits or means."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, z):
        return self.out.expand(len(z), *self.out.shape[1:])


def test_decoder_likelihoods_follow_appendix_c():
    x = torch.tensor([[-1.0, -0.5, 0.0, 0.6, 1.0]]).view(1, 1, 1, 5)  # grey values in [-1, 1]
    out = torch.tensor([[2.0, -1.0, 1.5, 0.3, -3.0]]).view(1, 1, 1, 5)
    z = torch.zeros(1, 3)
    # C.1: sum_i x_i log y_i + (1 - x_i) log(1 - y_i), y = sigmoid(logits), on x_i = (x + 1) / 2
    bernoulli = vae.VAE(nn.Identity(), Constant(out), 3, "bernoulli")
    x01, y = (x + 1) / 2, out.sigmoid()
    expected = (x01 * y.log() + (1 - x01) * (1 - y).log()).sum()
    torch.testing.assert_close(bernoulli.log_p_x_given_z(x, z), expected.view(1))
    torch.testing.assert_close(bernoulli.mean(z), y * 2 - 1)
    # C.2: log N(x; mu, sigma^2 I) with the learned sigma^2
    gaussian = vae.VAE(nn.Identity(), Constant(out), 3, "gaussian")
    with torch.no_grad():
        gaussian.log_sigma2.fill_(math.log(0.3))
    normal = torch.distributions.Normal(out, math.sqrt(0.3))
    torch.testing.assert_close(gaussian.log_p_x_given_z(x, z), normal.log_prob(x).sum().view(1))


# ----------------------------------------------------------------------------------------------
# Probabilistic PCA: p(z) = N(0, I), p(x|z) = N(W z + b, sigma^2 I), so p(x) = N(b, W W^T + sigma^2 I)
# ----------------------------------------------------------------------------------------------

D, J = 5, 2


def ppca_vae(W, b, sigma2):
    """A VAE whose decoder is the pPCA model (linear, Gaussian) and whose encoder is linear."""
    model = vae.VAE(nn.Linear(D, 2 * J), nn.Linear(J, D), J, "gaussian").double()
    with torch.no_grad():
        model.decoder.weight.copy_(W)
        model.decoder.bias.copy_(b)
        model.log_sigma2.fill_(math.log(sigma2))
    return model


def set_encoder(model, A, c, logvar):
    """q(z|x) = N(A x + c, diag exp(logvar)), the form of the exact pPCA posterior."""
    with torch.no_grad():
        model.encoder.weight.copy_(torch.cat([A, torch.zeros_like(A)]))
        model.encoder.bias.copy_(torch.cat([c, logvar]))


def exact_posterior(W, b, sigma2):
    """p(z|x) = N(M^-1 W^T (x - b), sigma^2 M^-1), M = W^T W + sigma^2 I (Tipping & Bishop 1999)."""
    M_inv = torch.linalg.inv(W.T @ W + sigma2 * torch.eye(J, dtype=W.dtype))
    A = M_inv @ W.T
    return A, -A @ b, sigma2 * M_inv


def log_px(x, W, b, sigma2):
    C = W @ W.T + sigma2 * torch.eye(D, dtype=W.dtype)
    return torch.distributions.MultivariateNormal(b, C).log_prob(x)


def elbo_mc(model, x, samples, seed=0):
    """The SGVB estimate of Eq. 10 averaged over many eps per x: the ELBO itself, per x."""
    xs = x.repeat(samples, 1)
    eps = torch.randn(len(xs), J, generator=gen(seed), dtype=x.dtype)
    rec, kl = vae.sgvb(model, xs, eps)
    return (rec - kl).view(samples, len(x)).mean(0)


def ppca_data(n, W, b, sigma2, seed):
    g = gen(seed)
    z = torch.randn(n, J, generator=g, dtype=torch.float64)
    return z @ W.T + b + math.sqrt(sigma2) * torch.randn(n, D, generator=g, dtype=torch.float64)


B_TRUE = torch.tensor([0.5, -1.0, 0.0, 2.0, 0.3], dtype=torch.float64)
W_SKEW = torch.tensor([[1.0, 0.7], [0.5, 0.2], [0.9, 1.1], [-0.3, -0.5], [0.2, 0.4]],
                      dtype=torch.float64)  # W^T W is far from diagonal: z_1, z_2 correlate given x


def test_elbo_is_log_px_at_the_exact_posterior():
    # Orthogonal columns make p(z|x) diagonal, so q can equal it and D_KL(q || p(z|x)) = 0 in Eq. 1.
    W = torch.linalg.qr(W_SKEW)[0] * torch.tensor([2.0, 0.7], dtype=torch.float64)
    model = ppca_vae(W, B_TRUE, 0.3)
    A, c, cov = exact_posterior(W, B_TRUE, 0.3)
    assert torch.allclose(cov, torch.diag(cov.diagonal()))
    set_encoder(model, A, c, cov.diagonal().log())
    x = ppca_data(50, W, B_TRUE, 0.3, seed=3)
    gap = log_px(x, W, B_TRUE, 0.3) - elbo_mc(model, x, 4000)
    assert gap.abs().max() < 0.1 and gap.mean().abs() < 0.02, gap
    # and every importance weight p(x, z) / q(z|x) is p(x) itself, for any K
    g = gen(4)
    torch.testing.assert_close(vae.iw_log_likelihood(model, x, 1, g), log_px(x, W, B_TRUE, 0.3))
    torch.testing.assert_close(vae.iw_log_likelihood(model, x, 7, g), log_px(x, W, B_TRUE, 0.3))


def test_elbo_below_log_px_and_iw_bound_rises_with_K():
    model = ppca_vae(W_SKEW, B_TRUE, 0.2)
    A, c, cov = exact_posterior(W_SKEW, B_TRUE, 0.2)
    # q has the posterior's mean and marginal variances but no correlation (rho = -0.85): the ELBO
    # falls short by D_KL(q || p(z|x)) = 2.0 nats, and importance weighting recovers it.
    set_encoder(model, A, c, cov.diagonal().log())
    x = ppca_data(200, W_SKEW, B_TRUE, 0.2, seed=5)
    exact = log_px(x, W_SKEW, B_TRUE, 0.2)
    elbo = elbo_mc(model, x, 2000)
    assert ((exact - elbo) > 1).all(), (exact - elbo).min()
    g = gen(6)
    bound = {K: torch.stack([vae.iw_log_likelihood(model, x, K, g) for _ in range(5)]).mean().item()
             for K in (1, 5, 50, 1000)}
    assert abs(bound[1] - elbo.mean().item()) < 0.2, bound  # L_1 is the ELBO
    assert bound[1] + 1 < bound[5] < bound[50] - 0.05 and bound[50] + 0.01 < bound[1000], bound
    assert abs(bound[1000] - exact.mean().item()) < 0.01, (bound, exact.mean())


def test_vae_trained_on_ppca_data_reaches_the_maximum_likelihood():
    torch.manual_seed(0)
    x = ppca_data(2000, W_SKEW, B_TRUE, 0.1, seed=7)
    # Tipping & Bishop 1999: with the eigenvalues l_1 >= ... >= l_D of the sample
    # covariance, sigma^2_ML is the mean of the D - J smallest and the maximum of the average log p(x)
    # is -1/2 (D log 2 pi + sum_{j <= J} log l_j + (D - J) log sigma^2_ML + D).
    lam = torch.linalg.eigvalsh(torch.cov(x.T, correction=0)).flip(0)
    sigma2_ml = lam[J:].mean()
    max_ll = -0.5 * (D * math.log(2 * math.pi) + lam[:J].log().sum() + (D - J) * sigma2_ml.log() + D)
    model = vae.VAE(nn.Linear(D, 2 * J), nn.Linear(J, D), J, "gaussian").double()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1500)
    for _ in range(1500):
        rec, kl = vae.sgvb(model, x, torch.randn(len(x), J, dtype=x.dtype))
        loss = -(rec - kl).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    elbo = elbo_mc(model, x, 200).mean()
    assert max_ll - 0.03 < elbo < max_ll + 0.01, (elbo.item(), max_ll.item())
    torch.testing.assert_close(model.log_sigma2.exp(), sigma2_ml, rtol=0.05, atol=0)


# ----------------------------------------------------------------------------------------------
# Learning small images
# ----------------------------------------------------------------------------------------------

def bar_images(n, seed):
    """8x8 images, one horizontal and one vertical bar at random rows and columns, in [-1, 1]."""
    g = gen(seed)
    x = torch.full((n, 1, 8, 8), -1.0)
    rows, cols = torch.randint(0, 8, (n,), generator=g), torch.randint(0, 8, (n,), generator=g)
    x[torch.arange(n), 0, rows, :] = 1
    x[torch.arange(n), 0, :, cols] = 1
    return x


def test_learns_small_images_elbo_improves_and_reconstructions_beat_the_mean():
    torch.manual_seed(0)
    train, test = bar_images(512, seed=8), bar_images(256, seed=9)
    args = type("Args", (), dict(arch="mlp", latent_dim=4, hidden=128, likelihood="bernoulli"))
    model = vae.make_model(args, (1, 8, 8))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def test_elbo():
        with torch.no_grad():
            rec, kl = vae.sgvb(model, test, torch.randn(len(test), 4, generator=gen(10)))
        return (rec - kl).mean().item()

    before = test_elbo()
    for step in range(400):
        x = train[torch.randint(0, len(train), (64,))]
        rec, kl = vae.sgvb(model, x, torch.randn(64, 4))
        loss = -(rec - kl).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = test_elbo()
    assert after > before + 15, (before, after)
    with torch.no_grad():
        recon = model.mean(model.encode(test)[0])
    mean_image_error = (test - train.mean(0)).square().mean()
    assert (recon - test).square().mean() < 0.5 * mean_image_error


def test_training_step_is_algorithm_1_and_n_processes_compute_what_one_does():
    torch.manual_seed(0)
    model = vae.VAE(nn.Linear(D, 2 * J), nn.Linear(J, D), J, "bernoulli")
    x = torch.rand(6, D) * 2 - 1
    torch.manual_seed(1)
    loss = vae.training_step(model, x, J, vae.Draws(6, "cpu"), beta=0.5)
    torch.manual_seed(1)
    rec, kl = vae.sgvb(model, x, torch.randn(6, J))  # line 4: eps ~ N(0, I), one per example
    torch.testing.assert_close(loss, -(rec - 0.5 * kl).mean())  # line 5: -L~^M over M, KL weighed by beta
    # binarised afresh: the same binary images and eps, whether one process or three draw them
    parts = []
    for rank in range(3):
        torch.manual_seed(2)
        parts.append(vae.training_step(model, x[2 * rank:2 * rank + 2], J, vae.Draws(6, "cpu", rank, 3), binary=True))
    torch.manual_seed(2)
    one = vae.training_step(model, x, J, vae.Draws(6, "cpu"), binary=True)
    torch.testing.assert_close(torch.stack(parts).mean(), one)
    torch.manual_seed(2)
    assert not torch.allclose(vae.training_step(model, x, J, vae.Draws(6, "cpu")), one)  # binary differs


def test_roc_auc():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    positive = torch.tensor([False, False, True, True])
    assert vae.roc_auc(scores, positive) == 0.75  # 3 of the 4 (positive, negative) pairs in order
    assert vae.roc_auc(-scores, positive) == 0.25
    assert vae.roc_auc(torch.ones(4), positive) == 0.5  # ties count half


# ----------------------------------------------------------------------------------------------
# Command line, on a tiny made-up folder with three classes
# ----------------------------------------------------------------------------------------------

def make_folder(root, mode="L", per_class=12, size=8):
    """Three classes of 8x8 images: a bright top half, a bright left half, a bright diagonal."""
    rng = np.random.default_rng(0)
    masks = [np.arange(size)[:, None] < size // 2, np.arange(size)[None, :] < size // 2,
             np.eye(size, dtype=bool)]
    for k, mask in enumerate(masks):
        (root / f"class{k}").mkdir(parents=True)
        for i in range(per_class):
            a = np.broadcast_to(mask, (size, size)) * 200 + rng.integers(0, 50, (size, size))
            Image.fromarray(a.astype(np.uint8), "L").convert(mode).save(root / f"class{k}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data") / "imgs")


TINY = ["--image-size", "8", "--batch-size", "8", "--hidden", "16", "--iw-samples", "20",
        "--iw-images", "10", "--log-every", "0"]


def run(argv, capsys):
    vae.main([str(a) for a in argv])
    return capsys.readouterr().out


def error_of(argv, capsys):
    with pytest.raises(SystemExit) as e:
        vae.main([str(a) for a in argv])
    return str(e.value.code) + capsys.readouterr().err


def test_cli_train_resume_and_sample(folder, tmp_path, capsys):
    common = ["--dataset", folder, *TINY, "--latent-dim", "2", "--likelihood", "bernoulli"]
    out = run([*common, "--steps", 6, "--out", tmp_path / "a"], capsys)  # 4 steps per epoch
    assert "test: ELBO" in out and "importance-weighted, K = 20" in out
    for f in ("ckpt.pt", "samples_epoch001.png", "samples_epoch002.png", "recon.png",
              "interpolation.png", "manifold.png"):
        assert (tmp_path / "a" / f).is_file(), f
    # stopped mid-epoch at step 3, resumed to 6: the same weights, optimizer state and RNG, bit for bit
    run([*common, "--steps", 3, "--out", tmp_path / "b"], capsys)
    assert "resumed from step 3" in run([*common, "--steps", 6, "--out", tmp_path / "b", "--resume"], capsys)
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a["method"] == "vae" and a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, s in a["optimizer"]["state"].items():
        assert torch.equal(s["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])

    run(["--sample", "--ckpt", tmp_path / "a" / "ckpt.pt", "--n", 5, "--save", tmp_path / "s.pt"], capsys)
    x = torch.load(tmp_path / "s.pt", weights_only=True)
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    run(["--sample", "--ckpt", tmp_path / "a" / "ckpt.pt", "--save", tmp_path / "s.png"], capsys)
    assert Image.open(tmp_path / "s.png").size[0] > 8 * 8


def test_cli_anomaly_and_retrieval(folder, tmp_path, capsys):
    out = run(["--dataset", folder, *TINY, "--arch", "conv", "--steps", 30, "--lr", "3e-3",
               "--anomaly-class", 2, "--retrieval", 3, "--out", tmp_path], capsys)
    assert "training on 24 images without class 2" in out
    assert "gaussian decoder" in out  # the default for image folders
    auc = float(out.split("ROC AUC ")[1].split()[0])
    precision = float(out.split("precision@3 (same label) over 36 queries: ")[1].split()[0])
    assert 0 <= auc <= 1 and 0 <= precision <= 1
    assert Image.open(tmp_path / "retrieval.png").size[0] > 4 * 8  # query + 3 neighbours per row


def test_bad_inputs(folder, tmp_path, capsys):
    rgb = make_folder(tmp_path / "rgb", mode="RGB")
    err = error_of(["--dataset", rgb, *TINY, "--likelihood", "bernoulli", "--out", tmp_path / "o"], capsys)
    assert "error:" in err and "use --likelihood gaussian" in err

    assert "must be a positive integer" in error_of(["--latent-dim", "0"], capsys)
    assert "must be a positive integer" in error_of(["--latent-dim", "-3"], capsys)

    other = tmp_path / "ddpm.pt"
    torch.save({"method": "ddpm", "args": {}, "model": {}}, other)
    for argv in (["--sample", "--ckpt", other, "--save", tmp_path / "x.png"],
                 ["--resume", "--ckpt", other, "--out", tmp_path / "o"]):
        assert "error: " in error_of(argv, capsys) and "checkpoint of ddpm, not of vae" in error_of(argv, capsys)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "cannot read checkpoint" in error_of(["--sample", "--ckpt", tmp_path / "junk.pt",
                                                  "--save", tmp_path / "x.png"], capsys)

    assert "--anomaly-class must be 0..2" in error_of(
        ["--dataset", folder, *TINY, "--anomaly-class", 3, "--out", tmp_path / "o"], capsys)
    assert "divisible by 4" in error_of(
        ["--dataset", folder, *TINY, "--image-size", 10, "--arch", "conv", "--out", tmp_path / "o"], capsys)


def test_error_is_one_line_without_traceback(tmp_path):
    other = tmp_path / "ddpm.pt"
    torch.save({"method": "ddpm"}, other)
    r = subprocess.run([sys.executable, str(ROOT / "vae.py"), "--sample", "--ckpt", str(other),
                        "--save", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_sigterm_saves_and_resume_keeps_the_runs_evaluation_flags(folder, tmp_path, capsys, monkeypatch):
    base = ["--dataset", folder, "--image-size", "8", "--batch-size", "8", "--hidden", "16",
            "--log-every", "0", "--latent-dim", "2", "--out", tmp_path / "a"]
    real, calls = vae.sgvb, []

    def sgvb_then_sigterm(*a):
        calls.append(1)
        if len(calls) == 2:  # during step 2: it finishes, saves, and the run stops
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a)

    monkeypatch.setattr(vae, "sgvb", sgvb_then_sigterm)
    with pytest.raises(SystemExit) as e:
        run([*base, "--steps", 6, "--iw-samples", 7, "--iw-images", 5], capsys)
    assert e.value.code == 143  # 128 + SIGTERM, after saving: not a finished run's 0
    assert "interrupted at step 2" in capsys.readouterr().out
    monkeypatch.setattr(vae, "sgvb", real)
    out = run(["--resume", "--out", tmp_path / "a"], capsys)  # no evaluation flags given again
    assert "resumed from step 2" in out and "K = 7" in out
    assert torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["args"]["iw_images"] == 5
    err = error_of(["--resume", "--out", tmp_path / "a", "--dataset", "mnist"], capsys)
    assert "--dataset" in err and "leave the flag out" in err


def test_nonfinite_loss_and_a_diverged_checkpoint_are_named(folder, tmp_path, capsys, monkeypatch):
    real = vae.sgvb
    monkeypatch.setattr(vae, "sgvb", lambda model, x, eps: tuple(t * float("nan") for t in real(model, x, eps)))
    err = error_of(["--dataset", folder, *TINY, "--steps", 3, "--out", tmp_path / "a"], capsys)
    # the loss is read back from the device every 10 steps and at the run's end (step 3)
    assert "nan" in err and "at step 3" in err and "has written no checkpoint" in err, err
    monkeypatch.undo()
    run(["--dataset", folder, *TINY, "--steps", 1, "--out", tmp_path / "b"], capsys)
    ckpt = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    name = next(iter(ckpt["model"]))
    ckpt["model"][name].fill_(float("nan"))
    torch.save(ckpt, tmp_path / "broken.pt")
    err = error_of(["--sample", "--ckpt", tmp_path / "broken.pt", "--save", tmp_path / "x.pt"], capsys)
    assert "non-finite weights" in err
    run(["--sample", "--ckpt", tmp_path / "b" / "ckpt.pt", "--n", 2, "--save", tmp_path / "new" / "x.pt"], capsys)
    assert torch.load(tmp_path / "new" / "x.pt", weights_only=True).shape == (2, 1, 8, 8)
    assert "--lr must be positive" in error_of(["--lr", "-1"], capsys)


def test_damaged_and_incomplete_checkpoints_and_out_are_named(folder, tmp_path, capsys):
    run(["--dataset", folder, *TINY, "--steps", 1, "--out", tmp_path / "a"], capsys)
    data = (tmp_path / "a" / "ckpt.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    assert "damaged or incomplete" in error_of(["--sample", "--ckpt", tmp_path / "cut.pt",
                                                "--save", tmp_path / "x.png"], capsys)
    ckpt = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    del ckpt["model"]
    torch.save(ckpt, tmp_path / "no_model.pt")
    assert "incomplete vae checkpoint: no model" in error_of(["--sample", "--ckpt", tmp_path / "no_model.pt",
                                                                  "--save", tmp_path / "x.png"], capsys)
    (tmp_path / "file").write_text("")
    assert "is a file" in error_of(["--dataset", folder, *TINY, "--steps", 1, "--out", tmp_path / "file"], capsys)


def test_the_log_likelihood_evaluation_says_how_far_it_is(tmp_path, capsys):
    root = make_folder(tmp_path / "many", per_class=40)  # 120 images: 3 batches of up to 50
    out = run(["--dataset", root, "--image-size", "8", "--batch-size", "8", "--hidden", "16",
               "--iw-samples", "4", "--iw-images", "120", "--log-every", "0", "--steps", "1",
               "--out", tmp_path / "a"], capsys)
    assert "log p(x) on test images: step 50/120" in out and "log p(x) on test images: step 100/120" in out


def test_binarize_trains_and_evaluates_on_binary_images(folder, tmp_path, capsys, monkeypatch):
    seen = []
    real = vae.sgvb

    def spy(model, x, eps):
        seen.append(x.clone())
        return real(model, x, eps)

    monkeypatch.setattr(vae, "sgvb", spy)
    out = run(["--dataset", folder, *TINY, "--likelihood", "bernoulli", "--binarize", "--steps", 4,
               "--out", tmp_path / "a"], capsys)
    assert all(set(x.unique().tolist()) <= {-1.0, 1.0} for x in seen)
    assert not torch.equal(seen[0], seen[-1])  # a fresh draw each time
    assert "pseudo-likelihood" not in out
    test = vae.binarized(common.load_dataset(str(folder), image_size=8)[0])
    again = vae.binarized(common.load_dataset(str(folder), image_size=8)[0])
    assert torch.equal(test.tensors[0], again.tensors[0])  # the test set: binarised once, seeded
    grey = torch.full((20000,), 0.5)  # grey value 0.75 in [0, 1]: a 1 three times in four
    coins = ((vae.binarize(grey, torch.randn(20000, generator=gen(0))) + 1) / 2).mean().item()
    assert coins == pytest.approx(0.75, abs=0.01)
    assert "--likelihood bernoulli" in error_of(["--dataset", folder, *TINY, "--likelihood", "gaussian",
                                                 "--binarize", "--out", tmp_path / "b"], capsys)


def test_a_finite_but_absurd_loss_is_divergence(folder, tmp_path, capsys, monkeypatch):
    real, calls = vae.sgvb, []

    def sgvb_blows_up_at_step_3(model, x, eps):
        rec, kl = real(model, x, eps)
        calls.append(1)
        return (rec * 1e9 if len(calls) >= 3 else rec), kl  # finite: about -1e11 nats, not -inf

    monkeypatch.setattr(vae, "sgvb", sgvb_blows_up_at_step_3)
    err = error_of(["--dataset", folder, *TINY, "--steps", 6, "--out", tmp_path / "a"], capsys)
    # read back at the epoch's end (step 4): the mean of steps 1-4, over 1000 x the first step's
    assert "at step 4" in err and "diverged" in err and "lower --lr" in err, err
    assert not (tmp_path / "a" / "ckpt.pt").exists()


def test_a_batch_holding_nan_is_named_not_the_learning_rate(tmp_path, capsys):
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    x[:, 0, 0, 0] = float("nan")  # float images with one NaN pixel each
    torch.save(x, tmp_path / "nan.pt")
    err = error_of(["--dataset", tmp_path / "nan.pt", "--batch-size", 8, "--hidden", 16, "--likelihood",
                    "gaussian", "--steps", 2, "--out", tmp_path / "a"], capsys)
    assert "the data hold NaN or inf" in err, err
    assert "lower --lr" not in err


def test_ctrl_c_while_sampling_or_evaluating_is_one_line_and_exits_130(folder, tmp_path, capsys, monkeypatch):
    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    def code_of(argv):
        try:
            vae.main([str(a) for a in argv])
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C reached the caller: a traceback")
        except SystemExit as e:
            return e.code
        pytest.fail("Ctrl-C exited 0")

    run(["--dataset", folder, *TINY, "--steps", 1, "--out", tmp_path / "a"], capsys)
    monkeypatch.setattr(vae.VAE, "mean", ctrl_c)
    assert code_of(["--sample", "--ckpt", tmp_path / "a" / "ckpt.pt", "--save", tmp_path / "x.png"]) == 130
    assert capsys.readouterr().err == "interrupted: nothing saved\n" and not (tmp_path / "x.png").exists()
    monkeypatch.undo()
    monkeypatch.setattr(vae, "evaluate", ctrl_c)  # the checkpoint is saved: it says so
    assert code_of(["--dataset", folder, *TINY, "--steps", 1, "--out", tmp_path / "b"]) == 130
    assert f"interrupted during the evaluation; {tmp_path / 'b' / 'ckpt.pt'} holds step 1" in capsys.readouterr().err
