"""Tests for rectified_flow.py: the paper's math, a 2-D mixture learned and reflowed, and the CLI."""
import copy
import hashlib
import os
import shutil
import signal
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import rectified_flow as rf  # noqa: E402

# The made-up image folders are far below 1,000 images; common.py warns about that.
pytestmark = pytest.mark.filterwarnings("ignore:.*mostly memorises:UserWarning")


# ----------------------------------------------------------------------------------------------
# Exact velocity fields
# ----------------------------------------------------------------------------------------------

def single_point_velocity(a):
    """pi_1 = a point a: X_t = t a + (1 - t) X_0, so E[X_1 - X_0 | X_t = z] = (a - z) / (1 - t)."""
    return lambda z, t: (a - z) / (1 - t)[:, None]


M, S = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 3.0])  # pi_1 = N(M, diag(S^2))


def gaussian_velocity(m=M, s=S):
    """pi_1 = N(m, s^2): (X_1 - X_0, X_t) are jointly Gaussian, so the optimal field is linear,
    v*(z, t) = m + Cov / Var (z - t m), Cov = t s^2 - (1 - t), Var = t^2 s^2 + (1 - t)^2. Its flow is
    Z_t = t m + sqrt(Var_t) Z_0, so Z_1 = m + s Z_0 exactly."""
    def v(z, t):
        t = t[:, None]
        return m + (t * s ** 2 - (1 - t)) / (t ** 2 * s ** 2 + (1 - t) ** 2) * (z - t * m)
    return v


def noise(n, d=2, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# The paper's math
# ----------------------------------------------------------------------------------------------

def test_single_point_one_euler_step_with_exact_velocity_lands_on_it():
    a = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    z0, v = noise(256), single_point_velocity(a)
    for steps in (1, 3, 10):
        assert torch.allclose(rf.euler(v, z0, steps), a.expand_as(z0), atol=1e-9)
    velocities = []
    rf.euler(v, z0, 10, velocities)
    assert rf.straightness(z0, a.expand_as(z0), velocities) < 1e-12  # the paths are straight lines
    # Eq. 1's target X_1 - X_0 at X_t = t X_1 + (1 - t) X_0 is exactly this field: zero loss
    t = torch.rand(256, dtype=torch.float64) * 0.99
    assert rf.rf_loss(v, z0, a.expand_as(z0), t) < 1e-12


def test_interpolation_runs_from_noise_at_0_to_data_at_1():
    x0, x1 = torch.zeros(2, 3), torch.ones(2, 3)
    assert torch.equal(rf.interpolate(x0, x1, torch.tensor([0.0, 1.0])), torch.tensor([[0.0] * 3, [1.0] * 3]))
    assert torch.allclose(rf.interpolate(x0, x1, torch.tensor([0.25, 0.25])), torch.full((2, 3), 0.25))


def test_gaussian_closed_form_attains_the_minimum_of_eq1():
    # The least-squares minimum is int_0^1 E Var(X_1 - X_0 | X_t) dt = int s^2 / (t^2 s^2 + (1 - t)^2) dt.
    t = torch.linspace(0, 1, 100001, dtype=torch.float64)[:, None]
    minimum = torch.trapezoid(S.double() ** 2 / (t ** 2 * S.double() ** 2 + (1 - t) ** 2), t, dim=0).mean()
    n, g = 400000, torch.Generator().manual_seed(1)
    x0, x1 = noise(n, seed=2), M + S * noise(n, seed=3)
    t = torch.rand(n, generator=g, dtype=torch.float64)
    v = gaussian_velocity(M.double(), S.double())
    loss = rf.rf_loss(v, x0, x1, t)
    assert loss.item() == pytest.approx(minimum.item(), rel=0.02)
    assert rf.rf_loss(lambda z, t: v(z, t) + 0.1, x0, x1, t) > loss + 0.005  # and it is a minimum


def test_euler_and_rk45_carry_gaussian_to_gaussian():
    z0, v = noise(5000), gaussian_velocity(M.double(), S.double())
    exact = M + S * z0
    z_euler, nfe_euler = rf.solve(v, z0, "euler", 1000)
    z_rk, nfe_rk = rf.solve(v, z0, "rk45", rtol=1e-5, atol=1e-5)
    for z in (z_euler, z_rk):  # N(m, s^2), up to the sampling error of 5,000 draws
        assert torch.allclose(z.mean(0), M.double(), atol=0.15)
        assert torch.allclose(z.std(0), S.double(), rtol=0.04)
    assert (z_euler - exact).abs().max() < 0.05             # Euler's error is O(1 / N)
    assert (z_rk - exact).abs().max() < 5e-4
    assert (z_rk - z_euler).abs().max() < 0.05              # RK45 agrees with 1,000 Euler steps...
    assert nfe_euler == 1000 and nfe_rk < 100               # ...with far fewer evaluations


def test_heun_is_second_order_and_euler_first():
    z0, v = noise(1000), gaussian_velocity(M.double(), S.double())
    exact = M + S * z0
    err = {(solver, n): (rf.solve(v, z0, solver, n)[0] - exact).abs().max().item()
           for solver in ("euler", "heun") for n in (20, 40)}
    assert 1.7 < err["euler", 20] / err["euler", 40] < 2.3
    assert 3.4 < err["heun", 20] / err["heun", 40] < 4.6
    assert err["heun", 20] < err["euler", 40] / 10


def test_dormand_prince_tableau_and_accuracy():
    for a, c in zip(rf.DP_A, rf.DP_C):
        assert sum(a) == pytest.approx(c, abs=1e-12)           # each stage at its node c_i
    assert sum(rf.DP_B) == pytest.approx(1) and sum(rf.DP_B_HAT) == pytest.approx(1)
    # dz/dt = (2 cos(4t) - 1) z: z(1) = z(0) exp(sin(4) / 2 - 1), a curved path
    z0 = noise(64, 1)
    exact = z0 * np.exp(np.sin(4) / 2 - 1)
    v = lambda z, t: (2 * torch.cos(4 * t[:, None]) - 1) * z  # noqa: E731
    errors, nfes = [], []
    for tol in (1e-4, 1e-7):
        z1, nfe = rf.rk45(v, z0, tol, tol)
        errors.append((z1 - exact).abs().max().item())
        nfes.append(nfe)
    assert errors[0] < 1e-3 and errors[1] < 1e-6 and nfes[1] < 150
    assert nfes[0] < nfes[1] and (nfes[1] - 1) % 6 == 0   # FSAL: 1 + 6 evaluations a step


def test_straightness_matches_its_closed_form_on_the_gaussian_flow():
    # Z_t = t m + sigma_t Z_0 with sigma_t = sqrt(t^2 s^2 + (1 - t)^2): Z_1 - Z_0 - dZ_t/dt =
    # (s - 1 - sigma_t') Z_0, so S = int_0^1 mean_d (s_d - 1 - sigma_t,d')^2 dt (E Z_0^2 = 1).
    s = S.double()
    t = torch.linspace(0, 1, 100001, dtype=torch.float64)[:, None]
    d_sigma = (t * s ** 2 - (1 - t)) / (t ** 2 * s ** 2 + (1 - t) ** 2).sqrt()
    expected = torch.trapezoid((s - 1 - d_sigma) ** 2, t, dim=0).mean()
    z0, velocities = noise(5000), []
    z1 = rf.euler(gaussian_velocity(M.double(), s), z0, 1000, velocities)
    assert rf.straightness(z0, z1, velocities) == pytest.approx(expected.item(), rel=0.05)


def test_t_sampling():
    torch.manual_seed(0)
    u = rf.sample_t(rf.Draws(200000, "cpu"), "uniform")
    assert 0 <= u.min() and u.max() < 1
    assert u.mean().item() == pytest.approx(0.5, abs=0.005) and u.var().item() == pytest.approx(1 / 12, rel=0.02)
    ln = rf.sample_t(rf.Draws(200000, "cpu"), "logit-normal")
    logit = torch.log(ln / (1 - ln))  # Esser et al.: logit(t) ~ N(0, 1)
    assert logit.mean().item() == pytest.approx(0, abs=0.01) and logit.std().item() == pytest.approx(1, rel=0.01)


class LabelNet(nn.Module):
    """A stand-in network whose output is its label (K = 3 classes, null label 3), times x."""
    num_classes = 3

    def forward(self, x, t, y):
        return x * y.float().view(-1, 1)


def test_classifier_free_guidance():
    z, y = torch.ones(2, 1), torch.tensor([0, 2])
    t = torch.zeros(2)
    null = torch.full((2, 1), 3.0)
    assert torch.equal(rf.velocity(LabelNet(), y, 1.0)(z, t), y.float()[:, None])
    assert torch.equal(rf.velocity(LabelNet(), y, 0.0)(z, t), null)
    # w = 4: v_null + 4 (v_y - v_null)
    assert torch.equal(rf.velocity(LabelNet(), y, 4.0)(z, t), null + 4 * (y.float()[:, None] - null))


# ----------------------------------------------------------------------------------------------
# Learning: a 2-D mixture, 1-RF then reflow
# ----------------------------------------------------------------------------------------------

MODES = torch.tensor([[-4.0, -4.0], [-4.0, 4.0], [4.0, -4.0], [4.0, 4.0]])


def mixture(n, seed):
    g = torch.Generator().manual_seed(seed)
    return MODES[torch.randint(4, (n,), generator=g)] + 0.5 * torch.randn(n, 2, generator=g)


class MLP(nn.Module):
    def __init__(self, width=128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, z, t):
        return self.net(torch.cat([z, t[:, None]], 1))


def fit(model, x0, x1, steps, fresh_noise, seed):
    """Eq. 1 by Adam; fresh_noise: the independent coupling (1-RF), else the fixed pairs (x0, x1)."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        i = torch.randint(len(x1), (256,))
        b0 = torch.randn(256, 2) if fresh_noise else x0[i]
        loss = rf.rf_loss(model, b0, x1[i], rf.sample_t(rf.Draws(256, "cpu")))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model


def mmd(x, y, bandwidths=(0.5, 1.0, 2.0)):
    """MMD^2 (biased) with a sum of Gaussian kernels."""
    xy = torch.cat([x, y])
    d2 = torch.cdist(xy, xy).square()
    k = sum(torch.exp(-d2 / (2 * b * b)) for b in bandwidths)
    n = len(x)
    return (k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()).item()


@pytest.fixture(scope="module")
def toy():
    torch.set_num_threads(2)
    flow1 = fit(MLP(), None, mixture(20000, 0), 800, True, 0)
    # Reflow: Z_0 ~ N(0, I), Z_1 = Flow_1(Z_0), drawn once; the 2-RF starts from the 1-RF
    z0 = torch.randn(8000, 2, generator=torch.Generator().manual_seed(1))
    z1, _ = rf.solve(flow1, z0, "rk45", rtol=1e-4, atol=1e-4)
    flow2 = fit(copy.deepcopy(flow1), z0, z1, 500, False, 1)
    return {"flow1": flow1, "flow2": flow2}


def evaluate(flow, steps, n=2000):
    z0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(7))
    velocities = []
    z1 = rf.euler(flow, z0, steps, velocities)
    return z1, rf.straightness(z0, z1, velocities)


def test_1rf_learns_the_mixture(toy):
    x, _ = evaluate(toy["flow1"], 100)
    data = mixture(2000, 5)
    assert mmd(x, data) < 0.01 < mmd(torch.randn(2000, 2), data)
    counts = torch.bincount(torch.cdist(x, MODES).argmin(1), minlength=4) / len(x)
    assert (counts - 0.25).abs().max() < 0.06
    assert torch.cdist(x, MODES).min(1).values.median() < 1.0


def test_reflow_straightens_and_one_step_samples_improve(toy):
    data = mixture(2000, 5)
    _, s1 = evaluate(toy["flow1"], 100)
    _, s2 = evaluate(toy["flow2"], 100)
    one1, _ = evaluate(toy["flow1"], 1)
    one2, _ = evaluate(toy["flow2"], 1)
    assert s2 < s1 / 3
    assert mmd(one2, data) < mmd(one1, data) / 2


# ----------------------------------------------------------------------------------------------
# The command line, on tiny made-up images
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """24 8x8 grey images in two class folders (6 batches of 4): dark noise in a/, bright bars in b/."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir()
        for i in range(12):
            im = rng.integers(0, 60, (8, 8)) if cls == "a" else np.tile(rng.integers(150, 256, (1, 8)), (8, 1))
            Image.fromarray(im.astype(np.uint8), "L").save(root / cls / f"{i}.png")
    return root


def tiny(images, out):
    return ["--dataset", str(images), "--image-size", "8", "--width", "8", "--mults", "1,2",
            "--res-blocks", "1", "--attn", "4", "--batch-size", "4", "--warmup", "2",
            "--device", "cpu", "--out", str(out)]


PAIRS = ["--pairs", "24", "--solver", "euler", "--sampling-steps", "3"]


@pytest.fixture(scope="module")
def stages(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("stages")
    rf.main(tiny(images, out) + ["--steps", "3", "--class-cond"])
    rf.main(tiny(images, out) + ["--reflow", "--ckpt", str(out / "ckpt_1rf.pt"), "--steps", "3"] + PAIRS)
    rf.main(tiny(images, out) + ["--distill", "--ckpt", str(out / "ckpt_2rf.pt"), "--steps", "2"] + PAIRS)
    return out


def load(path):
    return torch.load(path, weights_only=True)


def test_each_stage_writes_its_checkpoint_pairs_and_pictures(stages):
    for name, k, distilled in (("1rf", 1, False), ("2rf", 2, False), ("2rf_distilled", 2, True)):
        ckpt = load(stages / f"ckpt_{name}.pt")
        assert (ckpt["method"], ckpt["k"], ckpt["distilled"]) == ("rectified_flow", k, distilled)
        assert ckpt["num_classes"] == 2
        assert (stages / f"{name}_steps_epoch001.png").is_file()
        assert (stages / f"{name}_trajectory.png").is_file()
        grid = Image.open(stages / f"{name}_steps_epoch001.png")
        assert grid.size[1] == 2 + 5 * (8 + 2)  # one row per N in 1, 2, 4, 8, 100
    for k in (1, 2):
        pairs = load(stages / f"pairs_{k}rf.pt")
        assert pairs["z0"].shape == pairs["z1"].shape == (24, 1, 8, 8) and pairs["y"].shape == (24,)


def test_reflow_and_distillation_train_on_the_stored_pairs_only(stages, images, tmp_path, monkeypatch):
    seen = []

    def recording_loss(v, x0, x1, t):
        seen.append((x0.detach().clone(), x1.detach().clone(), t.clone()))
        return real_loss(v, x0, x1, t)
    real_loss = rf.rf_loss
    monkeypatch.setattr(rf, "rf_loss", recording_loss)
    for stage, steps in (("--reflow", "5"), ("--distill", "3")):
        seen.clear()
        rf.main(tiny(images, tmp_path) + [stage, "--ckpt", str(stages / "ckpt_1rf.pt"), "--steps", steps] + PAIRS)
        pairs = load(tmp_path / "pairs_1rf.pt")
        digest = hashlib.sha256((tmp_path / "pairs_1rf.pt").read_bytes()).hexdigest()
        assert len(seen) == int(steps)
        for x0, x1, t in seen:
            for a, b in zip(x0, x1):
                j = (pairs["z0"] == a).flatten(1).all(1).nonzero()
                assert len(j) == 1 and torch.equal(pairs["z1"][j[0, 0]], b)
            assert (t == 0).all() if stage == "--distill" else (t > 0).any()
        assert torch.equal(pairs["z0"], load(stages / "pairs_1rf.pt")["z0"])  # same seed, same pairs
    # resuming reuses the stored pairs without drawing any
    def no_solving(*args, **kwargs):
        raise AssertionError("pairs drawn again")
    monkeypatch.setattr(rf, "solve", no_solving)
    rf.main(tiny(images, tmp_path) + ["--distill", "--ckpt", str(stages / "ckpt_1rf.pt"), "--resume",
                                      "--steps", "5"] + PAIRS)
    assert hashlib.sha256((tmp_path / "pairs_1rf.pt").read_bytes()).hexdigest() == digest
    # fewer --pairs than stored: training reads the first ones only
    seen.clear()
    (tmp_path / "fewer").mkdir()
    (tmp_path / "fewer" / "pairs_1rf.pt").write_bytes((tmp_path / "pairs_1rf.pt").read_bytes())
    rf.main(tiny(images, tmp_path / "fewer") + ["--reflow", "--ckpt", str(stages / "ckpt_1rf.pt"),
                                                "--steps", "4", "--pairs", "8"] + PAIRS[2:])
    first = pairs["z0"][:8].flatten(1)
    assert all((first == a.flatten()).all(1).any() for x0, _, _ in seen for a in x0)


def test_1rf_trains_on_data_and_fresh_noise(images, tmp_path, monkeypatch):
    seen = []

    def recording_loss(v, x0, x1, t):
        seen.append((x0.detach().clone(), x1.detach().clone()))
        return real_loss(v, x0, x1, t)
    real_loss = rf.rf_loss
    monkeypatch.setattr(rf, "rf_loss", recording_loss)
    rf.main(tiny(images, tmp_path) + ["--steps", "3"])
    data = torch.stack([x for x, _ in common.load_dataset(str(images), "unused", True, 8)[0]]).flatten(1)
    for x0, x1 in seen:  # X_1 are the images (Algorithm 1's pi_1), X_0 ~ N(0, I) is not
        assert all((data == x.flatten()).all(1).any() for x in x1)
        assert not any((data == x.flatten()).all(1).any() for x in x0) and x0.abs().max() > 1


def test_reflow_of_a_2rf_trains_a_3rf_on_pairs_from_the_2rf(stages, images, tmp_path):
    rf.main(tiny(images, tmp_path) + ["--reflow", "--ckpt", str(stages / "ckpt_2rf.pt"), "--steps", "2"] + PAIRS)
    ckpt = load(tmp_path / "ckpt_3rf.pt")
    assert (ckpt["k"], ckpt["distilled"]) == (3, False)
    # the same teacher, seed and solver as the distillation's pairs in `stages`: the same pairs
    assert torch.equal(load(tmp_path / "pairs_2rf.pt")["z1"], load(stages / "pairs_2rf.pt")["z1"])
    assert not torch.equal(load(tmp_path / "pairs_2rf.pt")["z1"], load(stages / "pairs_1rf.pt")["z1"])


def test_resume_of_a_stage_stopped_while_drawing_pairs_starts_it(stages, images, tmp_path):
    rf.main(tiny(images, tmp_path) + ["--reflow", "--ckpt", str(stages / "ckpt_1rf.pt"), "--resume",
                                      "--steps", "2"] + PAIRS)
    assert load(tmp_path / "ckpt_2rf.pt")["step"] == 2


def states(path):
    ckpt = load(path)
    flat = {**{f"model.{k}": v for k, v in ckpt["model"].items()},
            **{f"ema.{k}": v for k, v in ckpt["ema"].items()}}
    for i, s in ckpt["optimizer"]["state"].items():
        flat.update({f"opt.{i}.{k}": v for k, v in s.items()})
    return ckpt["step"], flat


@pytest.mark.parametrize("stage", ["1rf", "2rf"])
def test_resume_is_bit_for_bit(stages, images, tmp_path, stage):
    extra = ["--class-cond"] if stage == "1rf" else ["--reflow", "--ckpt", str(stages / "ckpt_1rf.pt")] + PAIRS
    rf.main(tiny(images, tmp_path / "straight") + extra + ["--steps", "6"])
    rf.main(tiny(images, tmp_path / "split") + extra + ["--steps", "3"])  # stops mid-epoch
    rf.main(tiny(images, tmp_path / "split") + extra + ["--steps", "6", "--resume"])
    step_a, a = states(tmp_path / "straight" / f"ckpt_{stage}.pt")
    step_b, b = states(tmp_path / "split" / f"ckpt_{stage}.pt")
    assert step_a == step_b == 6 and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sample_png_pt_solvers_and_guidance(stages, tmp_path, capsys):
    for name, extra in (("1rf", ["--solver", "rk45"]), ("1rf", ["--solver", "heun", "--sampling-steps", "2"]),
                        ("2rf", ["--solver", "euler", "--sampling-steps", "4", "--cfg-scale", "2"]),
                        ("2rf_distilled", [])):
        rf.main(["--sample", "--ckpt", str(stages / f"ckpt_{name}.pt"), "--n", "5", "--device", "cpu",
                 "--save", str(tmp_path / "x.pt")] + extra)
        x = load(tmp_path / "x.pt")
        assert x.shape == (5, 1, 8, 8) and x.dtype == torch.float32 and x.abs().max() <= 1
    out = capsys.readouterr().out
    assert "with euler (N = 1, NFE 1)\n" in out  # distilled: one step, and no S (0 for any one step)
    assert "with euler (N = 4, NFE 4); straightness S = " in out
    rf.main(["--sample", "--ckpt", str(stages / "ckpt_2rf.pt"), "--n", "4", "--save", str(tmp_path / "x.png")])
    assert Image.open(tmp_path / "x.png").size == (2 + 2 * 10, 2 + 2 * 10)


def test_all_runs_the_three_stages(images, tmp_path):
    rf.main(tiny(images, tmp_path) + ["--all", "--steps", "2", "--pairs", "8", "--solver", "euler",
                                      "--sampling-steps", "2"])
    assert all((tmp_path / f"ckpt_{n}.pt").is_file() for n in ("1rf", "2rf", "2rf_distilled"))
    assert load(tmp_path / "ckpt_2rf_distilled.pt")["k"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--reflow"], "--reflow needs --ckpt"),
    (["--distill"], "--distill needs --ckpt"),
    (["--reflow", "--ckpt", "MISSING"], "no checkpoint at"),
    (["--reflow", "--ckpt", "DISTILLED"], "distilled one-step model"),
    (["--distill", "--ckpt", "DDPM"], "checkpoint of ddpm, not of rectified_flow"),
    (["--distill", "--ckpt", "GARBAGE"], "cannot read checkpoint"),
    (["--sample"], "--sample needs --ckpt"),
    (["--sample", "--ckpt", "1RF", "--save", "x.jpg"], "--save FILE.png"),
    (["--sample", "--ckpt", "UNCOND", "--save", "x.png", "--cfg-scale", "3"], "needs a class-conditional"),
    (["--resume"], "no checkpoint at"),
    (["--class-cond", "--dataset", "FLAT"], "--class-cond needs labels"),
    (["--cfg-scale", "2"], "--cfg-scale needs a class-conditional flow"),
])
def test_bad_inputs_give_clear_errors(argv, message, stages, images, tmp_path):
    (tmp_path / "flat").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "flat" / "0.png")
    torch.save({"method": "ddpm"}, tmp_path / "ddpm.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    names = {"MISSING": tmp_path / "missing.pt", "DISTILLED": stages / "ckpt_2rf_distilled.pt",
             "DDPM": tmp_path / "ddpm.pt", "GARBAGE": tmp_path / "garbage.pt", "FLAT": tmp_path / "flat",
             "1RF": stages / "ckpt_1rf.pt", "UNCOND": tmp_path / "uncond" / "ckpt_1rf.pt"}
    if "UNCOND" in argv:
        rf.main(tiny(images, tmp_path / "uncond") + ["--steps", "1"])
    argv = [str(names.get(a, a)) for a in argv]
    with pytest.raises(SystemExit) as e:
        rf.main(tiny(images, tmp_path / "out") + argv)
    assert str(e.value.code).startswith("error: ") and message in str(e.value.code)


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--reflow", "--distill"], ["--all", "--reflow"],
                                  ["--pairs", "-3"], ["--rtol", "0"], ["--p-uncond", "1"],
                                  ["--sample", "--reflow"], ["--sampling-steps", "0"],
                                  ["--ema", "1"]])
def test_bad_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        rf.main(argv)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_sigterm_saves_and_resume_refuses_other_data(images, tmp_path, monkeypatch):
    real, calls = rf.ema_update, []

    def ema_update_then_sigterm(*a):
        real(*a)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(rf, "ema_update", ema_update_then_sigterm)
    with pytest.raises(SystemExit) as e:
        rf.main(tiny(images, tmp_path) + ["--steps", "5"])
    assert e.value.code == 143  # 128 + SIGTERM, after saving: not a finished run's 0
    assert load(tmp_path / "ckpt_1rf.pt")["step"] == 2
    monkeypatch.setattr(rf, "ema_update", real)
    with pytest.raises(SystemExit) as e:
        rf.main(tiny(images, tmp_path) + ["--steps", "5", "--resume", "--image-size", "4"])
    assert "--image-size 8" in str(e.value.code) and "leave the flag out" in str(e.value.code)


def test_nonfinite_loss_and_a_diverged_checkpoint_are_named(stages, images, tmp_path, monkeypatch):
    real = rf.rf_loss
    monkeypatch.setattr(rf, "rf_loss", lambda *a: real(*a) * float("nan"))
    with pytest.raises(SystemExit) as e:
        rf.main(tiny(images, tmp_path / "a") + ["--steps", "3"])
    # NaN from step 1, read back at the run's end (step 3), before its checkpoint
    assert "to nan" in str(e.value.code) and "at step 3" in str(e.value.code), e.value.code
    assert "no checkpoint yet" in str(e.value.code) and not (tmp_path / "a" / "ckpt_1rf.pt").exists()
    monkeypatch.undo()
    ckpt = load(stages / "ckpt_1rf.pt")
    next(iter(ckpt["ema"].values())).fill_(float("nan"))
    torch.save(ckpt, tmp_path / "broken.pt")
    for argv in (["--sample", "--ckpt", str(tmp_path / "broken.pt"), "--save", str(tmp_path / "x.pt"),
                  "--solver", "euler"],
                 tiny(images, tmp_path / "b") + ["--reflow", "--ckpt", str(tmp_path / "broken.pt")] + PAIRS):
        with pytest.raises(SystemExit) as e:
            rf.main(argv)
        assert "broken.pt holds non-finite weights" in str(e.value.code)
    rf.main(["--sample", "--ckpt", str(stages / "ckpt_1rf.pt"), "--n", "2", "--solver", "euler",
             "--sampling-steps", "2", "--save", str(tmp_path / "new" / "x.pt")])
    assert load(tmp_path / "new" / "x.pt").shape == (2, 1, 8, 8)


def test_damaged_pairs_checkpoints_and_out_are_named(stages, images, tmp_path):
    shutil.copy(stages / "pairs_1rf.pt", tmp_path / "pairs_1rf.pt")
    with open(tmp_path / "pairs_1rf.pt", "r+b") as f:
        f.truncate(3000)
    cases = [(tiny(images, tmp_path) + ["--reflow", "--ckpt", str(stages / "ckpt_1rf.pt"), "--steps", "1"] + PAIRS,
              "damaged or incomplete; delete it")]
    ckpt = load(stages / "ckpt_1rf.pt")
    del ckpt["optimizer"]
    torch.save(ckpt, tmp_path / "no_opt.pt")
    cases.append((["--sample", "--ckpt", str(tmp_path / "no_opt.pt"), "--save", str(tmp_path / "x.png")],
                  "incomplete rectified_flow checkpoint: no optimizer"))
    (tmp_path / "file").write_text("")
    cases.append((tiny(images, tmp_path / "file") + ["--steps", "1"], "is a file"))
    for argv, words in cases:
        with pytest.raises(SystemExit) as e:
            rf.main(argv)
        assert words in str(e.value.code), e.value.code


def test_sampling_many_images_says_how_far_it_is(stages, tmp_path, capsys):
    rf.main(["--sample", "--ckpt", str(stages / "ckpt_2rf_distilled.pt"), "--n", "300",
             "--save", str(tmp_path / "x.pt")])
    assert "sampling: 256/300 images" in capsys.readouterr().out


@pytest.mark.parametrize("p_uncond", [0.0, 0.3])
def test_label_dropout_gives_the_null_label_to_a_fraction_p_uncond(p_uncond):
    """Guidance needs v(z, t, null): training hands the null label K to p_uncond of the images."""
    seen = []

    class Spy(nn.Module):
        num_classes = 3

        def forward(self, z, t, y):
            seen.append(y)
            return torch.zeros_like(z)

    args = rf.parse_args(["--class-cond", "--p-uncond", str(p_uncond)])
    args.stage_k, args.distilled = 1, False
    torch.manual_seed(0)
    rf.stage_step(args, 3)(Spy(), (torch.zeros(20000, 1, 1, 1), torch.full((20000,), 1)), rf.Draws(20000, "cpu"))
    y = seen[0]
    assert set(y.unique().tolist()) <= {1, 3}
    assert (y == 3).float().mean().item() == pytest.approx(p_uncond, abs=0.01)


def test_sampling_reports_how_far_the_solver_is(stages, tmp_path, capsys):
    rf.main(["--sample", "--ckpt", str(stages / "ckpt_1rf.pt"), "--n", "3", "--solver", "euler",
             "--sampling-steps", "4", "--log-every", "0", "--save", str(tmp_path / "x.pt")])
    out = capsys.readouterr().out
    assert "samples 1-3 of 3: t = 0.25" in out and "t = 0.75" in out


def test_a_long_run_on_a_cpu_says_so_at_once(images, tmp_path, monkeypatch, capsys):
    clock = iter(range(0, 10 ** 9, 600))  # every reading of the clock 10 minutes later: a slow CPU
    monkeypatch.setattr(rf, "time", types.SimpleNamespace(time=lambda: float(next(clock))))
    rf.main(tiny(images, tmp_path) + ["--steps", "6", "--log-every", "0"])
    out = capsys.readouterr().out
    assert out.count("note: this stage needs about") == 1 and "CPU recipe" in out


def test_ctrl_c_while_drawing_pairs_keeps_them_and_exits_130(stages, images, tmp_path, monkeypatch, capsys):
    real = rf.solve

    def solve_then_ctrl_c(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)  # caught by train(): the chunk ends, the pairs are saved
        return real(*a, **k)

    monkeypatch.setattr(rf, "solve", solve_then_ctrl_c)
    with pytest.raises(SystemExit) as e:
        rf.main(tiny(images, tmp_path) + ["--reflow", "--ckpt", str(stages / "ckpt_1rf.pt"), "--steps", "2"] + PAIRS)
    assert e.value.code == 130 and "interrupted while drawing pairs" in capsys.readouterr().out
    assert len(load(tmp_path / "pairs_1rf.pt")["z0"]) == 24 and not (tmp_path / "ckpt_2rf.pt").exists()


def test_ctrl_c_while_sampling_prints_one_line_and_exits_130(stages, tmp_path, monkeypatch, capsys):
    def solve_then_ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(rf, "solve", solve_then_ctrl_c)
    try:
        rf.main(["--sample", "--ckpt", str(stages / "ckpt_1rf.pt"), "--save", str(tmp_path / "x.png")])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C while sampling reached the caller: a traceback")
    except SystemExit as e:
        assert e.code == 130
    else:
        pytest.fail("Ctrl-C while sampling exited 0")
    assert capsys.readouterr().err == "interrupted: nothing saved\n" and not (tmp_path / "x.png").exists()


def test_a_rank_stopped_by_another_ranks_signal_exits_as_after_sigterm(monkeypatch):
    monkeypatch.setattr(rf.dist, "all_reduce", lambda x: x.add_(1))  # the other rank was interrupted
    stop = []
    assert rf.stopped(stop, 2, "cpu") and 128 + stop[0] == 143


def test_grad_clip_0_is_off_and_a_negative_one_is_refused(images, tmp_path, monkeypatch, capsys):
    real, initial = rf.make_model, {}

    def make_model_kept(*a):
        model = real(*a)
        initial.update({k: v.clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(rf, "make_model", make_model_kept)
    rf.main(tiny(images, tmp_path) + ["--steps", "1", "--grad-clip", "0"])
    after = load(tmp_path / "ckpt_1rf.pt")["model"]
    # (at step 1 only the zero-initialised output layer has gradients: the rest waits on it)
    moved = [k for k, v in after.items() if not torch.equal(v, initial[k])]
    assert "out.2.weight" in moved, "--grad-clip 0 left the weights where they were: gradients zeroed"
    with pytest.raises(SystemExit) as e:
        rf.main(["--grad-clip", "-1", "--dataset", "no-such-data"])  # (accepted, it would not train)
    assert e.value.code == 2 and "--grad-clip must be 0 (off) or positive, got -1" in capsys.readouterr().err


def test_a_finite_but_absurd_loss_is_divergence(images, tmp_path, monkeypatch):
    real, calls = rf.rf_loss, []

    def loss_blows_up_at_step_3(*a):
        calls.append(1)
        return real(*a) * (1e9 if len(calls) >= 3 else 1)  # finite: about 1e9, not inf

    monkeypatch.setattr(rf, "rf_loss", loss_blows_up_at_step_3)
    with pytest.raises(SystemExit) as e:
        rf.main(tiny(images, tmp_path) + ["--steps", "5"])
    msg = str(e.value.code)
    # about 1e9 from step 3, read back at the run's end (step 5), before its checkpoint
    assert "at step 5" in msg and "diverged" in msg and "lower --lr" in msg, msg
    assert not (tmp_path / "ckpt_1rf.pt").exists()


def test_non_finite_data_or_pairs_are_named_not_the_learning_rate(stages, images, tmp_path, monkeypatch):
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    x[:, 0, 0, 0] = float("nan")  # float images with one NaN pixel each
    torch.save(x, tmp_path / "nan.pt")
    argv = tiny(tmp_path / "nan.pt", tmp_path / "a") + ["--steps", "2"]
    del argv[argv.index("--image-size"):argv.index("--image-size") + 2]  # a tensor file keeps its size
    with pytest.raises(SystemExit) as e:
        rf.main(argv)
    messages = [str(e.value.code)]
    assert "the data hold NaN or inf" in messages[-1] and "without saving" in messages[-1], messages
    # pairs stored from a flow whose outputs were NaN (drawn before this check)
    pairs = load(stages / "pairs_1rf.pt")
    pairs["z1"][:, 0, 0, 0] = float("nan")
    (tmp_path / "b").mkdir()
    torch.save(pairs, tmp_path / "b" / "pairs_1rf.pt")
    reflow = ["--reflow", "--ckpt", str(stages / "ckpt_1rf.pt"), "--steps", "2"] + PAIRS
    with pytest.raises(SystemExit) as e:
        rf.main(tiny(images, tmp_path / "b") + reflow)
    messages.append(str(e.value.code))
    assert f"the pairs in {tmp_path / 'b' / 'pairs_1rf.pt'} hold NaN or inf" in messages[-1], messages
    # a 1-RF whose outputs are NaN: the pairs say so as they are drawn
    monkeypatch.setattr(rf, "solve", lambda v, z, *a: (torch.full_like(z, float("nan")), 3))
    with pytest.raises(SystemExit) as e:
        rf.main(tiny(images, tmp_path / "c") + reflow)
    messages.append(str(e.value.code))
    assert "reflow pairs drawn from" in messages[-1] and "checkpoint is broken" in messages[-1], messages
    assert not any("try a lower --lr" in msg.lower() for msg in messages), messages
