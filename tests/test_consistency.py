"""Tests for consistency.py: the parameterisation and its boundary condition, the discretisation,
the ODE step and the exact consistency function of a Gaussian, the CT schedules, the target
network, EDM's and iCT's weights and log-normal draws, Algorithm 1, CD and CT learning a 2-D
mixture, and the command line."""
import math
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import consistency as cm  # noqa: E402


def unet(dropout=0.0):
    net = common.UNet(1, 8, (1, 2), 1, (4,), dropout, image_size=8)
    with torch.no_grad():  # nudge every weight, so that the zero-initialised output layer passes signal
        g = torch.Generator().manual_seed(0)
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net


# ----------------------------------------------------------------------------------------------
# The parameterisation and the discretisation
# ----------------------------------------------------------------------------------------------

def test_the_boundary_condition_holds_exactly_for_any_network():
    x = torch.randn(4, 1, 8, 8)
    eps = torch.full((4,), cm.EPS)
    f = cm.Preconditioned(unet(), boundary=True)
    assert torch.equal(f(x, eps), x)
    huge = cm.Preconditioned(lambda x, c: 1e6 * torch.ones_like(x), boundary=True)
    assert torch.equal(huge(x, eps), x)
    assert not torch.allclose(f(x, torch.full((4,), 0.01)), x)  # and not at other t
    D = cm.Preconditioned(unet(), boundary=False)  # EDM's D only nearly: c_out(eps) = eps sigma_data / ...
    assert not torch.equal(D(x, eps), x)


def test_the_scalings_at_eps_and_at_T():
    t = torch.tensor([cm.EPS, cm.T_MAX, 1e4], dtype=torch.float32)
    c_skip, c_out = cm.consistency_scalings(t, 0.5)
    assert c_skip[0] == 1 and c_out[0] == 0
    assert c_skip[1] < 1e-4 and c_out[1] == pytest.approx(0.5, abs=1e-3)   # x_T says almost nothing
    assert c_skip[2] < 1e-8 and c_out[2] == pytest.approx(0.5, abs=1e-6)   # t -> inf: 0 and sigma_data
    edm_skip, edm_out = cm.edm_scalings(t, 0.5)
    # the consistency scalings are EDM's shifted by eps: equal to 1e-4 at T
    assert torch.allclose(c_skip[1:], edm_skip[1:], atol=1e-6) and torch.allclose(c_out[1:], edm_out[1:], atol=1e-4)
    # c_in gives the network unit-variance inputs: x_t = x + t z with std(x) = sigma_data
    x_t = 0.5 * torch.randn(20000) + 80 * torch.randn(20000)
    assert (cm.c_in(torch.tensor(80.0), 0.5) * x_t).std().item() == pytest.approx(1, abs=0.02)


def test_karras_discretisation():
    t = cm.karras_times(18)
    assert len(t) == 19 and t[0] == 0
    assert t[1].item() == pytest.approx(cm.EPS, rel=1e-12) and t[18].item() == pytest.approx(cm.T_MAX, rel=1e-12)
    assert (t[1:] > t[:-1]).all()
    assert torch.allclose(cm.karras_times(5, rho=1)[1:], torch.linspace(cm.EPS, cm.T_MAX, 5, dtype=torch.float64))
    # rho = 7 spends its points at small t: the median is far below T / 2
    assert t[9] < 2.5 < cm.T_MAX / 30
    with pytest.raises(common.UserError, match="N >= 2"):
        cm.karras_times(1)


# ----------------------------------------------------------------------------------------------
# The ODE with an exact denoiser: a Gaussian data set N(m, s^2)
# ----------------------------------------------------------------------------------------------

M, S = 0.3, 0.4


def gaussian_denoiser(x, t):
    """E[x_0 | x_t] for x_0 ~ N(M, S^2), x_t = x_0 + t z."""
    return M + S ** 2 / (S ** 2 + cm.view(t, x) ** 2) * (x - M)


def exact_trajectory(x_T, t):
    """The probability-flow ODE solved: dx/dt = t (x - M) / (S^2 + t^2), x - M ~ sqrt(S^2 + t^2)."""
    return M + (x_T - M) * cm.view(((S ** 2 + t ** 2) / (S ** 2 + cm.T_MAX ** 2)).sqrt(), x_T)


def test_one_ode_step_follows_the_exact_trajectory_and_the_error_shrinks_with_the_step():
    x_T = torch.randn(1000, 1, dtype=torch.float64) * math.sqrt(S ** 2 + cm.T_MAX ** 2) + M
    t1 = torch.full((1000,), 2.0, dtype=torch.float64)
    x1 = exact_trajectory(x_T, t1)
    errors = {}
    for solver in ("euler", "heun"):
        for h in (0.4, 0.2, 0.1):
            t0 = t1 - h
            step = cm.ode_step(gaussian_denoiser, x1, t1, t0, solver)
            errors[solver, h] = (step - exact_trajectory(x_T, t0)).abs().max().item()
    # local errors O(h^2) for Euler and O(h^3) for Heun: halving h divides them by about 4 and 8
    assert errors["euler", 0.2] / errors["euler", 0.1] == pytest.approx(4, rel=0.15)
    assert errors["heun", 0.2] / errors["heun", 0.1] == pytest.approx(8, rel=0.2)
    assert errors["heun", 0.1] < errors["euler", 0.1] / 10


def test_the_exact_consistency_function_maps_a_whole_trajectory_to_one_point():
    """f(x_t, t) = M + (x_t - M) sqrt((S^2 + eps^2) / (S^2 + t^2)): every x_t of one trajectory,
    here integrated with 400 small Heun steps of ode_step, goes to the same x_eps."""
    def f(x, t):
        return M + (x - M) * cm.view(((S ** 2 + cm.EPS ** 2) / (S ** 2 + t ** 2)).sqrt(), x)
    x = torch.randn(8, 1, dtype=torch.float64) * math.sqrt(S ** 2 + cm.T_MAX ** 2) + M
    ts = cm.karras_times(401)[1:].flip(0)
    ends, means = [], []
    for t_from, t_to in zip(ts[:-1], ts[1:]):
        ends.append(f(x, t_from.expand(8)))
        means.append(gaussian_denoiser(x, t_from.expand(8)))
        x = cm.ode_step(gaussian_denoiser, x, t_from.expand(8), t_to.expand(8), "heun")
    ends, means = torch.stack(ends), torch.stack(means)
    assert (ends - ends[-1]).abs().max() < 2e-4  # the ODE solver's error
    assert torch.allclose(ends[-1], x, atol=2e-4)  # and it is where the trajectory ends, x_eps
    assert (means - means[-1]).abs().max() > 0.1  # the denoiser E[x_0 | x_t] is not consistent


def test_cd_loss_of_the_exact_consistency_function_is_near_zero_and_of_a_wrong_one_is_not():
    class Exact(nn.Module):
        boundary = True

        def forward(self, x, t):
            return M + (x - M) * cm.view(((S ** 2 + cm.EPS ** 2) / (S ** 2 + t ** 2)).sqrt(), x)

    class Denoiser(nn.Module):  # the posterior mean: right at eps, not consistent above it
        boundary = True

        def forward(self, x, t):
            return gaussian_denoiser(x, t)
    torch.manual_seed(0)
    x = M + S * torch.randn(512, 1, 4, 4)
    t = cm.karras_times(18)
    n, z = cm.draw_n(t, cm.Draws(512, "cpu"), ict=False), torch.randn(x.shape)
    exact = cm.cd_loss(Exact(), Exact(), gaussian_denoiser, x, t, n, z, "heun", "l2")
    wrong = cm.cd_loss(Denoiser(), Denoiser(), gaussian_denoiser, x, t, n, z, "heun", "l2")
    assert exact.mean() < wrong.mean() / 100 and wrong.mean() > 1e-3, (exact.mean(), wrong.mean())


# ----------------------------------------------------------------------------------------------
# The schedules of CT and iCT, the target network
# ----------------------------------------------------------------------------------------------

def test_ct_schedules_are_appendix_c_s_formulas():
    K = 100
    assert cm.ct_N(0, K) == 2 and cm.ct_N(K, K) == 151
    # k = 50: ceil(sqrt(0.5 (151^2 - 4) + 4) - 1) + 1 = ceil(105.78) + 1 = 107
    assert cm.ct_N(50, K) == 107
    assert all(cm.ct_N(k, K) <= cm.ct_N(k + 1, K) for k in range(K))
    assert cm.ct_mu(0, K) == pytest.approx(0.9)  # mu(0) = mu_0
    assert cm.ct_mu(50, K) == pytest.approx(0.9 ** (2 / 107))
    assert cm.ct_mu(K, K) > cm.ct_mu(50, K) > cm.ct_mu(0, K)


def test_ict_schedule_doubles_n_and_samples_n_log_normally():
    K = 1000  # K' = floor(1000 / (log2(128) + 1)) = 125
    assert [cm.ict_N(k, K) for k in (0, 124, 125, 250, 874, 875, 999)] == [11, 11, 21, 41, 641, 1281, 1281]
    t = cm.karras_times(41)
    w = cm.ict_n_weights(t)
    assert w.shape == (40,) and (w > 0).all()
    # the most likely interval holds exp(P_mean) = exp(-1.1) = 0.33, and t below it
    n = int(w.argmax()) + 1
    assert t[n] <= 0.6 and t[n + 1] >= 0.2


def test_the_target_gets_no_gradient_and_follows_the_ema():
    f = cm.Preconditioned(unet(), boundary=True)
    # other weights, so that the EMA shows; left requiring gradients: the loss must not give them any
    f_minus = cm.Preconditioned(unet(), boundary=True)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    t = cm.karras_times(10)
    n = cm.draw_n(t, cm.Draws(4, "cpu"), False)
    losses = cm.ct_loss(f, f_minus, x, t, n, torch.randn(x.shape), "l2", ict=False)
    losses.mean().backward()
    assert all(p.grad is None for p in f_minus.parameters())
    assert all(p.grad is not None for p in f.parameters() if p.requires_grad)
    before = [p.clone() for p in f_minus.parameters()]
    cm.update_target(f_minus, f, 0.9)
    for b, p_minus, p in zip(before, f_minus.parameters(), f.parameters()):
        assert torch.allclose(p_minus, 0.9 * b + 0.1 * p.detach())
    cm.update_target(f_minus, f, 0.0)  # mu = 0 (iCT): theta^- = theta
    assert all(torch.equal(a, b.detach()) for a, b in zip(f_minus.parameters(), f.parameters()))


def test_student_and_target_see_the_same_dropout_mask():
    f = cm.Preconditioned(unet(dropout=0.5), boundary=True).train()
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 3.0)
    assert not torch.equal(f(x, t), f(x, t))  # dropout is on
    loss = cm.consistency_loss(f, f, x, t, x, t, "l2", 1.0)
    assert torch.equal(loss, torch.zeros(4))


def test_pseudo_huber_is_l2_near_zero_and_l1_far_away():
    a = torch.zeros(1, 1, 28, 28)
    c = 0.00054 * 28
    small, large = a + 1e-4, a + 1.0
    assert cm.distance(a, small, "huber").item() == pytest.approx(784 * 1e-8 / (2 * c), rel=1e-2)
    assert cm.distance(a, large, "huber").item() == pytest.approx(28 - c, rel=1e-4)


# ----------------------------------------------------------------------------------------------
# The losses' weights and draws: EDM's lambda(t) and log-normal t, iCT's lambda and log-normal n
# ----------------------------------------------------------------------------------------------

class Recorder(nn.Module):
    """A network that outputs `out(x)` and keeps what it was called with."""
    boundary = True

    def __init__(self, out):
        super().__init__()
        self.out, self.calls = out, []

    def forward(self, x, t):
        self.calls.append((x, t))
        return self.out(x)


def test_edm_lambda_by_value_and_the_noisy_input():
    """lambda(t) = (t^2 + sigma_d^2) / (t sigma_d)^2: 8 at t = 0.5 and 5 at t = 1 for sigma_d = 0.5,
    so a denoiser off by 0.1 everywhere has losses 8 * 0.01 and 5 * 0.01."""
    x, z = torch.rand(2, 1, 4, 4) * 2 - 1, torch.randn(2, 1, 4, 4)
    u = (torch.tensor([0.5, 1.0]).log() + 1.2) / 1.2  # ln t = -1.2 + 1.2 u
    D = Recorder(lambda x_t: x + 0.1)
    losses = cm.edm_loss(D, x, u, z, 0.5)
    (x_t, t), = D.calls
    assert torch.allclose(t, torch.tensor([0.5, 1.0]))
    assert torch.allclose(x_t, x + t.view(-1, 1, 1, 1) * z)  # x + n, n ~ N(0, t^2 I)
    assert torch.allclose(losses, torch.tensor([0.08, 0.05]))


def test_the_teacher_draws_ln_t_from_n_of_minus_1_2_and_1_2_squared():
    D = Recorder(lambda x_t: torch.zeros_like(x_t))
    torch.manual_seed(0)
    cm.teacher_step(D, torch.zeros(40000, 1, 1, 1), 0.5, cm.Draws(40000, "cpu"))
    ln_t = D.calls[0][1].log()
    assert ln_t.mean().item() == pytest.approx(-1.2, abs=0.02)
    assert ln_t.std().item() == pytest.approx(1.2, abs=0.02)
    assert (((ln_t + 1.2) / 1.2) ** 4).mean().item() == pytest.approx(3, abs=0.2)  # a normal's kurtosis


def test_ict_lambda_is_one_over_the_interval_and_the_loss_lambda_times_d():
    t = torch.tensor([0.0, 0.002, 0.5, 1.0, 3.0], dtype=torch.float64)  # t_0 = 0, t_1..t_4
    n = torch.tensor([1, 2, 3])  # lambda = 1 / (t_{n+1} - t_n) = 1 / 0.498, 1 / 0.5, 1 / 2
    x, z = torch.rand(3, 1, 4, 4) * 2 - 1, torch.randn(3, 1, 4, 4)
    c = 0.00054 * 4  # pseudo-Huber's c for 16 pixels
    for metric, d in (("l2", 0.09), ("huber", math.sqrt(16 * 0.09 + c ** 2) - c)):
        f, f_minus = Recorder(lambda x: torch.full_like(x, 0.3)), Recorder(torch.zeros_like)
        losses = cm.ct_loss(f, f_minus, x, t, n, z, metric, ict=True)
        assert torch.allclose(losses, d * torch.tensor([1 / 0.498, 2.0, 0.5])), metric
        assert torch.allclose(cm.ct_loss(f, f_minus, x, t, n, z, metric, ict=False), torch.full((3,), d))
    # Algorithm 3: the student sees x + t_{n+1} z at t_{n+1}, the target x + t_n z at t_n
    (x_next, t_next), (x_n, t_n) = f.calls[0], f_minus.calls[0]
    assert torch.allclose(t_next, torch.tensor([0.5, 1.0, 3.0]))
    assert torch.allclose(t_n, torch.tensor([0.002, 0.5, 1.0]))
    assert torch.allclose(x_next, x + t_next.view(-1, 1, 1, 1) * z)
    assert torch.allclose(x_n, x + t_n.view(-1, 1, 1, 1) * z)


def test_ict_draws_n_from_the_papers_erf_differences_which_bin_a_log_normal():
    """iCT, Sec. 3.5: p(n) proportional to erf((ln t_{n+1} - P_mean) / (sqrt 2 P_std)) - erf((ln t_n -
    P_mean) / (sqrt 2 P_std)) with P_mean = -1.1, P_std = 2: the share of a log-normal sigma,
    ln sigma ~ N(-1.1, 2^2), that falls in [t_n, t_{n+1})."""
    t = cm.karras_times(11)
    def cdf(s):
        return math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0))
    p = torch.tensor([cdf(t[n + 1]) - cdf(t[n]) for n in range(1, 11)], dtype=torch.float64)
    p /= p.sum()
    g = torch.Generator().manual_seed(0)
    sigma = (-1.1 + 2.0 * torch.randn(400000, dtype=torch.float64, generator=g)).exp()
    sigma = sigma[(sigma >= t[1]) & (sigma < t[-1])]
    binned = torch.bincount(torch.searchsorted(t[1:], sigma, right=True) - 1, minlength=10).double() / len(sigma)
    assert torch.allclose(binned, p, atol=3e-3)  # the formula is the log-normal binned
    w = cm.ict_n_weights(t).double()
    assert torch.allclose(w / w.sum(), p, atol=1e-6)
    torch.manual_seed(0)
    n = cm.draw_n(t, cm.Draws(200000, "cpu"), ict=True)
    assert n.min() >= 1 and n.max() <= 10
    assert torch.allclose(torch.bincount(n - 1, minlength=10) / len(n), p.float(), atol=4e-3)
    n = cm.draw_n(t, cm.Draws(100000, "cpu"), ict=False)  # Algorithms 2 and 3: n ~ U[1, N - 1]
    assert torch.allclose(torch.bincount(n, minlength=11)[1:] / len(n), torch.full((10,), 0.1), atol=4e-3)


# ----------------------------------------------------------------------------------------------
# Sampling: Algorithm 1 and the teacher's Heun sampler
# ----------------------------------------------------------------------------------------------

def test_multistep_sampling_adds_the_right_noise_before_each_step():
    calls = []

    class Recorder(nn.Module):
        def forward(self, x, t):
            calls.append((x.clone(), t[0].item()))
            return torch.full_like(x, 0.25 * len(calls))  # a different "clean image" each call

    z = torch.randn(3, 1, 4, 4)
    taus = (5.0, 0.5)
    out = cm.sample_multistep(Recorder(), z, taus, clip=False, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    assert torch.equal(calls[0][0], cm.T_MAX * z) and calls[0][1] == cm.T_MAX
    for i, tau in enumerate(taus, start=1):
        expected = 0.25 * i + math.sqrt(tau ** 2 - cm.EPS ** 2) * torch.randn(3, 1, 4, 4, generator=g)
        assert torch.allclose(calls[i][0], expected) and calls[i][1] == pytest.approx(tau)
    assert torch.equal(out, torch.full_like(z, 0.75))


def test_heun_sampler_uses_35_evaluations_and_solves_the_gaussian_ode():
    calls = []

    def D(x, t):
        calls.append(t[0].item())
        return gaussian_denoiser(x, t)
    z = torch.randn(2000, 1, dtype=torch.float64)
    x = cm.sample_heun(D, z, steps=18)
    assert len(calls) == 35 and calls[0] == pytest.approx(cm.T_MAX) and calls[-1] == pytest.approx(cm.EPS)
    # the ODE carries N(M, S^2 + T^2) to N(M, S^2); Heun is second order: twice the steps, a
    # quarter of the error at the end of each trajectory
    end = exact_trajectory(cm.T_MAX * z, torch.zeros(2000, dtype=torch.float64))
    errors = [(cm.sample_heun(gaussian_denoiser, z, steps) - end).abs().max().item() for steps in (18, 36, 72)]
    assert errors[0] < 0.15 and (x - end).abs().max().item() == errors[0]
    assert errors[0] / errors[1] == pytest.approx(4, rel=0.25) and errors[1] / errors[2] == pytest.approx(4, rel=0.25)


def test_taus_are_checked():
    assert cm.check_taus(None, 1) == () and len(cm.check_taus(None, 4)) == 3
    assert cm.check_taus([2.0, 0.5], 3) == (2.0, 0.5)
    for taus, steps, words in [([0.5], 3, "needs 2 --taus"), ([0.5, 2.0], 3, "decrease"),
                               ([90.0], 2, "lie in"), ([0.001], 2, "lie in"), (None, 7, "needs --taus")]:
        with pytest.raises(common.UserError, match=words):
            cm.check_taus(taus, steps)


# ----------------------------------------------------------------------------------------------
# Learning: CD (from the exact denoiser of a mixture) and CT learn a 2-D mixture
# ----------------------------------------------------------------------------------------------

MODES = torch.tensor([[0.6, 0.6], [-0.6, 0.6], [0.6, -0.6], [-0.6, -0.6]])
SPREAD = 0.03


def mixture(n, g):
    return MODES[torch.randint(0, 4, (n,), generator=g)] + SPREAD * torch.randn(n, 2, generator=g)


def mixture_denoiser(x, t):
    """E[x_0 | x_t] for the mixture: each mode's posterior mean, weighted by its responsibility."""
    v = SPREAD ** 2 + t[:, None, None] ** 2                       # (B, 1, 1)
    d = x[:, None, :] - MODES[None]                               # (B, 4, 2)
    w = torch.softmax(-d.square().sum(-1, keepdim=True) / (2 * v), dim=1)
    return (w * (MODES[None] + SPREAD ** 2 / v * d)).sum(1)


class MLP(nn.Module):
    """F_theta for 2-D points: the point and the noise input c_noise / 250 = ln t."""

    def __init__(self, width=128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x, c):
        return self.net(torch.cat([x, c[:, None] / 250], 1))


def distance_to_modes(x):
    return torch.cdist(x, MODES).min(1).values


def train_2d(stage, steps=1500):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    f = cm.Preconditioned(MLP(), boundary=True)
    f_minus = cm.Preconditioned(MLP(), boundary=True).requires_grad_(False)
    f_minus.load_state_dict(f.state_dict())
    opt = torch.optim.Adam(f.parameters(), lr=2e-3)
    if stage == "cd":
        algorithm = cm.Distillation(f, f_minus, mixture_denoiser, N=18, mu=0.95)
    else:  # Algorithm 3 with Appendix C's schedules (s1 = 20 for a short run), or iCT
        algorithm = cm.Training(f, f_minus, steps, "huber" if stage == "ict" else "l2", stage == "ict", s1=20)
    for k in range(steps):
        loss = algorithm.loss(mixture(256, g), k, cm.Draws(256, "cpu"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        algorithm.update_target(k)
    return f


def one_and_two_steps(f):
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    one = cm.sample_multistep(f, z, (), clip=False)
    two = cm.sample_multistep(f, z, (0.8,), clip=False, generator=torch.Generator().manual_seed(2))
    return one, distance_to_modes(one), distance_to_modes(two)


def test_distillation_learns_a_2d_mixture_in_one_and_two_steps():
    one, d1, d2 = one_and_two_steps(train_2d("cd"))
    # the points land on the modes (an untrained f puts them near 0, 0.85 from every mode) ...
    assert (d1 < 0.15).float().mean() > 0.8, d1.median()
    assert d2.median() <= d1.median() + 0.02, (d1.median(), d2.median())
    # ... and on all four, in about equal shares
    share = torch.bincount(torch.cdist(one, MODES).argmin(1), minlength=4) / len(one)
    assert (share > 0.15).all(), share


@pytest.mark.parametrize("stage, median", [("ct", 0.6), ("ict", 0.3)])
def test_consistency_training_moves_one_step_samples_towards_the_modes(stage, median):
    """CT learns from data alone, and slowly: its target averages f_theta^- over the data points
    that could have made x_{t_{n+1}}, a bias that vanishes only as N grows (Theorem 2), so early,
    coarse N pulls every output to the data mean (0.85 from each mode). In 1,500 steps Algorithm 3
    gets about halfway to the modes, iCT (N to 1281, no EMA target) most of the way."""
    one, d1, d2 = one_and_two_steps(train_2d(stage))
    assert d1.median() < median, d1.median()
    assert d2.median() <= d1.median() + 0.02, (d1.median(), d2.median())


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------

NET = ["--width", "8", "--mults", "1,2", "--res-blocks", "1", "--attn", "4", "--batch-size", "8",
       "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """32 8x8 images: a bright square on the left or on the right."""
    g = torch.Generator().manual_seed(0)
    x = torch.full((32, 1, 8, 8), -1.0)
    x[:16, :, 2:6, 0:4] = 1
    x[16:, :, 2:6, 4:8] = 1
    x = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    path = tmp_path_factory.mktemp("data") / "squares.pt"
    torch.save(((x + 1) * 127.5).round().to(torch.uint8), path)
    return path


def argv(stage, data, out, *extra, steps="6"):
    return ["--stage", stage, "--dataset", str(data), *NET, "--steps", steps, "--out", str(out), *extra]


def exit_message(args):
    try:
        cm.main(args)
    except SystemExit as e:
        return str(e.code)
    return None


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    cm.main(argv("teacher", data, out, "--lr", "2e-3"))
    return out / "ckpt.pt"


@pytest.fixture(scope="module")
def distilled(data, teacher, tmp_path_factory):
    """An uninterrupted 6-step CD run: 4 batches per epoch, so grids after steps 4 and 6."""
    out = tmp_path_factory.mktemp("cd") / "run"
    cm.main(argv("cd", data, out, "--teacher", str(teacher)))
    return out


def test_cd_starts_from_the_teacher_and_carries_it(teacher, distilled):
    ckpt, t_ckpt = load(distilled / "ckpt.pt"), load(teacher)
    assert ckpt["method"] == "consistency-cd" and ckpt["step"] == 6 and ckpt["shape"] == [1, 8, 8]
    assert all(torch.equal(v, t_ckpt["ema"][k]) for k, v in ckpt["teacher"]["ema"].items())
    assert set(ckpt["target"]) == set(ckpt["model"])
    assert sorted(p.name for p in distilled.glob("samples_epoch*.png")) == ["samples_epoch001.png",
                                                                           "samples_epoch002.png"]
    assert not list(distilled.glob("*.tmp"))


def test_ct_and_ict_train_without_a_teacher(data, tmp_path):
    cm.main(argv("ct", data, tmp_path / "ct"))
    cm.main(argv("ct", data, tmp_path / "ict", "--ict"))
    ct, ict = load(tmp_path / "ct" / "ckpt.pt"), load(tmp_path / "ict" / "ckpt.pt")
    assert ct["method"] == ict["method"] == "consistency-ct" and ct["teacher"] is None
    assert ict["args"]["metric"] == "huber" and ct["args"]["metric"] == "l2"


@pytest.mark.parametrize("stage, sig", [("cd", signal.SIGINT), ("teacher", signal.SIGTERM)])
def test_resume_after_a_signal_is_bit_for_bit(data, teacher, distilled, tmp_path, monkeypatch, stage, sig):
    out, real, calls = tmp_path / "run", cm.learning_rate, []

    def learning_rate_then_signal(*a):
        calls.append(1)
        if len(calls) == 3:  # during step 3: it finishes, then the run saves and stops
            os.kill(os.getpid(), sig)
        return real(*a)

    extra = ["--teacher", str(teacher)] if stage == "cd" else ["--lr", "2e-3"]
    monkeypatch.setattr(cm, "learning_rate", learning_rate_then_signal)
    with pytest.raises(SystemExit) as stop:
        cm.main(argv(stage, data, out, *extra))
    assert stop.value.code == 128 + sig  # interrupted, not done: 130 after Ctrl-C, 143 after SIGTERM
    assert load(out / "ckpt.pt")["step"] == 3
    monkeypatch.setattr(cm, "learning_rate", real)
    cm.main(argv(stage, data, out, "--resume"))
    resumed = load(out / "ckpt.pt")
    straight = load(distilled / "ckpt.pt" if stage == "cd" else teacher)
    assert resumed["step"] == straight["step"] == 6
    for part in ("model", "ema", "target") if stage == "cd" else ("model", "ema"):
        for k, v in straight[part].items():
            assert torch.equal(v, resumed[part][k]), f"{part}.{k}"


@pytest.mark.parametrize("steps, taus", [("1", []), ("2", []), ("4", ["--taus", "10,1,0.1"])])
def test_sample_with_1_2_and_4_steps(distilled, tmp_path, steps, taus):
    pt = tmp_path / "x.pt"
    cm.main(["--sample", "--ckpt", str(distilled / "ckpt.pt"), "--n", "5", "--save", str(pt),
             "--sampling-steps", steps, *taus, "--device", "cpu"])
    x = load(pt)
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.float32 and x.abs().max() <= 1


def test_sample_from_the_teacher(teacher, tmp_path):
    cm.main(["--sample", "--ckpt", str(teacher), "--n", "3", "--save", str(tmp_path / "new" / "t.png"),
             "--sampling-steps", "4", "--device", "cpu"])
    assert (tmp_path / "new" / "t.png").is_file()


def test_bad_input(data, teacher, distilled, tmp_path):
    out = tmp_path / "run"
    other = tmp_path / "ddpm.pt"
    torch.save({"method": "ddpm"}, other)
    sample = ["--sample", "--ckpt", str(distilled / "ckpt.pt"), "--save", str(tmp_path / "x.png"),
              "--device", "cpu"]
    cases = [
        (argv("cd", data, out), "--stage cd needs --teacher CKPT"),
        (argv("cd", data, out, "--teacher", str(other)), "is a checkpoint of ddpm, not of consistency-teacher"),
        (argv("cd", data, out, "--teacher", str(distilled / "ckpt.pt")), "consistency-cd, not of consistency-teacher"),
        (argv("cd", data, out, "--teacher", str(tmp_path / "none.pt")), "no checkpoint at"),
        (sample + ["--sampling-steps", "3", "--taus", "0.5,2"], "decrease"),
        (sample + ["--sampling-steps", "2", "--taus", "100"], "lie in"),
        (sample + ["--sampling-steps", "2", "--taus", "1,0.5"], "needs 1 --taus"),
        (sample + ["--sampling-steps", "6"], "needs --taus"),
    ]
    for args, words in cases:
        msg = exit_message(args)
        assert msg and words in msg, (args, msg)
    for args, words in [(argv("ct", data, out, "--N", "1"), "--N must be at least 2"),
                        (argv("cd", data, out, "--mu", "1"), "[0, 1)"),
                        (argv("cd", data, out, "--ict"), "--ict improves consistency training")]:
        with pytest.raises(SystemExit):
            cm.main(args)
    msg = exit_message(["--sample", "--ckpt", str(teacher), "--save", str(tmp_path / "x.png"),
                        "--sampling-steps", "1", "--device", "cpu"])
    assert msg and "N >= 2" in msg


def test_a_teacher_of_other_images_and_resume_on_other_data(data, teacher, distilled, tmp_path):
    torch.save((torch.rand(16, 1, 4, 4) * 255).to(torch.uint8), tmp_path / "small.pt")
    msg = exit_message(argv("cd", tmp_path / "small.pt", tmp_path / "run", "--teacher", str(teacher),
                            "--attn", "2"))
    assert msg and "was trained on (1, 8, 8) images" in msg
    msg = exit_message(["--stage", "cd", "--resume", "--out", str(distilled), "--dataset",
                        str(tmp_path / "small.pt")])
    assert msg and "--dataset" in msg and "leave the flag out" in msg


def test_damaged_and_incomplete_checkpoints_and_out_are_named(data, teacher, tmp_path):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(teacher.read_bytes()[:2000])
    save = ["--save", str(tmp_path / "x.png"), "--device", "cpu"]
    msg = exit_message(["--sample", "--ckpt", str(cut), *save])
    assert msg and "damaged or incomplete" in msg
    ckpt = load(teacher)
    del ckpt["ema"]
    torch.save(ckpt, tmp_path / "no_ema.pt")
    msg = exit_message(["--sample", "--ckpt", str(tmp_path / "no_ema.pt"), *save])
    assert msg and "incomplete consistency-teacher checkpoint: no ema" in msg
    (tmp_path / "file").write_text("")
    msg = exit_message(argv("teacher", data, tmp_path / "file", steps="1"))
    assert msg and "is a file" in msg


def parse_error(args, capsys):
    with pytest.raises(SystemExit) as e:
        cm.parse_args(args)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_flags_out_of_range_are_one_line_from_parse_args(capsys):
    for args, words in [(["--grad-clip", "-1"], "--grad-clip must be 0 (off) or positive, got -1.0"),
                        (["--ema", "2"], "--ema must be in [0, 1), got 2.0"),
                        (["--ema", "-1"], "--ema must be in [0, 1)"),
                        (["--dropout", "2"], "--dropout must lie in [0, 1), got 2.0"),
                        (["--mults", "0,1"], "must be a positive integer, got '0'"),
                        (["--warmup", "-1"], "--warmup must be 0 or more, got -1")]:
        assert words in parse_error(args, capsys), args
    args = cm.parse_args(["--warmup", "0", "--grad-clip", "0"])
    assert [cm.learning_rate(args, k, 1000) for k in (0, 1)] == [args.lr, args.lr]  # no warm-up
    args.warmup = 1000  # the default: over a tenth of the run at most
    assert cm.learning_rate(args, 0, 1000) == pytest.approx(args.lr / 100)
    assert cm.learning_rate(args, 99, 1000) == args.lr


def test_grad_clip_0_is_off_and_the_default_clips_at_1(data, tmp_path, monkeypatch):
    clips = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, g: clips.append(g) or real(p, g))
    cm.main(argv("ct", data, tmp_path / "off", "--grad-clip", "0", steps="2"))
    assert clips == []
    cm.main(argv("ct", data, tmp_path / "on", steps="2"))
    assert clips == [1.0, 1.0]
    off, on = load(tmp_path / "off" / "ckpt.pt"), load(tmp_path / "on" / "ckpt.pt")
    assert any(not torch.equal(a, b) for a, b in zip(off["model"].values(), on["model"].values()))


def test_a_diverging_teacher_stops_without_saving(data, tmp_path):
    """--lr 1e9: the loss stays finite but grows by many orders of magnitude, which is divergence too."""
    msg = exit_message(argv("teacher", data, tmp_path / "run", "--lr", "1e9", "--grad-clip", "0", steps="3"))
    assert msg and "diverged" in msg and "try a lower --lr" in msg, msg
    assert "has written no checkpoint yet" in msg and not (tmp_path / "run" / "ckpt.pt").exists()


def test_non_finite_data_and_teachers_are_named_not_the_lr(data, teacher, tmp_path):
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    x[5, 0, 3, 3] = float("nan")
    torch.save(x, tmp_path / "nan.pt")
    msg = exit_message(argv("teacher", tmp_path / "nan.pt", tmp_path / "a", steps="2"))
    assert msg and "the data hold NaN or inf" in msg and "--lr" not in msg, msg
    ckpt = load(teacher)
    ckpt["ema"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                   for k, v in ckpt["ema"].items()}
    torch.save(ckpt, tmp_path / "nan_teacher.pt")
    msg = exit_message(argv("cd", data, tmp_path / "b", "--teacher", str(tmp_path / "nan_teacher.pt")))
    assert msg and "the teacher (" in msg and "holds non-finite weights" in msg, msg
    ckpt = load(teacher)  # finite weights whose outputs overflow: the last convolution's at 3e38
    last = [k for k, v in ckpt["ema"].items() if v.dim() == 4][-1]
    ckpt["ema"][last] = torch.full_like(ckpt["ema"][last], 3e38)
    torch.save(ckpt, tmp_path / "inf_teacher.pt")
    msg = exit_message(argv("cd", data, tmp_path / "c", "--teacher", str(tmp_path / "inf_teacher.pt")))
    assert msg and "the teacher's ODE step gave non-finite values" in msg and "--lr" not in msg, msg


def test_network_flags_the_teacher_or_the_checkpoint_sets_are_refused(data, teacher, distilled, tmp_path):
    msg = exit_message(["--stage", "cd", "--resume", "--out", str(distilled), "--width", "16"])
    assert msg and "--resume continues the run with its --width 8, not 16" in msg, msg
    msg = exit_message(argv("cd", data, tmp_path / "run", "--teacher", str(teacher), "--mults", "1,2,2"))
    assert msg and "--stage cd's student is the teacher's network: the teacher has --mults 1,2" in msg, msg
    assert not (tmp_path / "run").exists()


def test_a_signal_during_the_teachers_grid_stops_it_at_the_next_step(data, tmp_path, monkeypatch, capsys):
    real, calls = cm.ode_step, []

    def ode_step_then_signal(*a):  # the teacher trains without ODE steps: these are the grid's
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a)
    monkeypatch.setattr(cm, "ode_step", ode_step_then_signal)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        cm.main(argv("teacher", data, out, "--lr", "2e-3"))
    assert stop.value.code == 143 and len(calls) == 1
    assert f"stopped while drawing the grid; {out / 'ckpt.pt'} holds step 4" in capsys.readouterr().out
    assert load(out / "ckpt.pt")["step"] == 4 and not list(out.glob("samples_*.png"))


def test_ctrl_c_while_sampling_is_one_line_and_130(distilled, tmp_path, monkeypatch, capsys):
    real = cm.sample_multistep

    def interrupted(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)
    monkeypatch.setattr(cm, "sample_multistep", interrupted)
    with pytest.raises(SystemExit) as e:
        cm.main(["--sample", "--ckpt", str(distilled / "ckpt.pt"), "--n", "2", "--save", str(tmp_path / "x.pt"),
                 "--device", "cpu"])
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "interrupted: nothing saved"
    assert not (tmp_path / "x.pt").exists()


def test_sampling_flags_are_checked_before_sampling(teacher, distilled, tmp_path, capsys, monkeypatch):
    def no_sampling(*a, **k):
        raise AssertionError("sampling started")
    monkeypatch.setattr(cm, "sample_heun", no_sampling)
    monkeypatch.setattr(cm, "sample_multistep", no_sampling)
    for folder in ("grid.png", "runs"):
        (tmp_path / folder).mkdir()
        msg = exit_message(["--sample", "--ckpt", str(distilled / "ckpt.pt"), "--save", str(tmp_path / folder),
                            "--device", "cpu"])
        assert msg and f"{folder} is a folder" in msg and "images" not in capsys.readouterr().out, msg
    msg = exit_message(["--sample", "--ckpt", str(teacher), "--save", str(tmp_path / "x.png"),
                        "--sampling-steps", "1000000", "--device", "cpu"])
    assert msg and "at most 1000 steps" in msg, msg


def test_checkpoints_missing_parts_name_them(teacher, distilled, tmp_path):
    ckpt = load(distilled / "ckpt.pt")
    del ckpt["teacher"], ckpt["target"]
    (tmp_path / "run").mkdir()
    torch.save(ckpt, tmp_path / "run" / "ckpt.pt")
    msg = exit_message(["--stage", "cd", "--resume", "--out", str(tmp_path / "run")])
    assert msg and "incomplete consistency-cd checkpoint: no teacher, target" in msg, msg
    save = ["--save", str(tmp_path / "x.png"), "--device", "cpu"]
    ckpt = load(teacher)
    del ckpt["args"]
    torch.save(ckpt, tmp_path / "no_args.pt")
    msg = exit_message(["--sample", "--ckpt", str(tmp_path / "no_args.pt"), *save])
    assert msg and "incomplete consistency-teacher checkpoint: no args" in msg, msg
    ckpt = load(teacher)
    ckpt["args"]["width"] = 16  # weights of another network than its args describe
    torch.save(ckpt, tmp_path / "other.pt")
    msg = exit_message(["--sample", "--ckpt", str(tmp_path / "other.pt"), *save])
    assert msg and "does not fit the network its args describe" in msg, msg
