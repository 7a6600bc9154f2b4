"""Consistency Models (Song, Dhariwal, Chen, Sutskever 2023, arXiv:2303.01469).

A diffusion model's probability-flow ODE carries every noisy x_t along one trajectory back to one
data point. A consistency function f(x_t, t) maps every point of a trajectory straight to its end
x_eps, so one network call turns pure noise into an image. It must satisfy f(x_eps, eps) = x_eps
(the boundary condition, built into the parameterisation below so that it holds exactly for any
network) and f(x_t, t) = f(x_t', t') on each trajectory (self-consistency, what training enforces
between neighbouring times t_n < t_{n+1}). Distillation (CD) gets the neighbour x_{t_n} from a
trained diffusion model's ODE step; training (CT) gets it from the same data point and noise alone.

    Algorithm 2 Consistency Distillation (CD)              Algorithm 3 Consistency Training (CT)
    1 theta^- <- theta                                     1 theta^- <- theta and k <- 0
    2 repeat                                               2 repeat
    3   x ~ D, n ~ U[1, N - 1]                             3   x ~ D, n ~ U[1, N(k) - 1]
    4   x_{t_{n+1}} ~ N(x; t_{n+1}^2 I)                    4   z ~ N(0, I)
    5   x^_{t_n} <- x_{t_{n+1}} + (t_n - t_{n+1})          5   L <- lambda(t_n) d(f_theta(x + t_{n+1} z, t_{n+1}),
                    Phi(x_{t_{n+1}}, t_{n+1}; phi)                                f_theta^-(x + t_n z, t_n))
    6   L <- lambda(t_n) d(f_theta(x_{t_{n+1}}, t_{n+1}),  6   theta <- theta - eta grad L
                           f_theta^-(x^_{t_n}, t_n))       7   theta^- <- stopgrad(mu(k) theta^-
    7   theta <- theta - eta grad L                                              + (1 - mu(k)) theta)
    8   theta^- <- stopgrad(mu theta^- + (1 - mu) theta)   8   k <- k + 1
    9 until convergence                                    9 until convergence

    Algorithm 1 Multistep Consistency Sampling: x <- f_theta(x^_T, T); for n = 1 .. N - 1:
    z ~ N(0, I); x^_{tau_n} <- x + sqrt(tau_n^2 - eps^2) z; x <- f_theta(x^_{tau_n}, tau_n).

Time is EDM's noise level (Karras et al. 2022, arXiv:2206.00364): x_t = x + t z, t in [eps, T],
eps = 0.002, T = 80, data in [-1, 1]. (A DDPM/VP x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps
is this x_t divided by sqrt(1 + t^2), with t = sqrt((1 - alpha_bar) / alpha_bar).) The teacher
for CD is an EDM denoiser D(x, t) trained here too (--stage teacher).

Run:
    python consistency.py --stage teacher --epochs 10                   # runs/cm_teacher/ckpt.pt
    python consistency.py --stage cd --teacher runs/cm_teacher/ckpt.pt  # runs/cm_cd/ckpt.pt
    python consistency.py --stage ct --epochs 10 [--ict]                # runs/cm_ct/ckpt.pt
    python consistency.py --sample --ckpt runs/cm_cd/ckpt.pt --sampling-steps 2 --save x.png
    torchrun --standalone --nproc_per_node 8 consistency.py --stage cd --teacher ...      # 8 GPUs
    CPU recipe (about 15 minutes a stage on 2 cores; one-step FD 2.4x the teacher's; docs/consistency.md):
    python consistency.py --stage teacher --width 32 --mults 1,2,3 --res-blocks 1 --batch-size 64 \
                          --lr 2e-3 --warmup 100 --lr-decay cosine --steps 1500
    python consistency.py --stage cd --teacher runs/cm_teacher/ckpt.pt --batch-size 64 \
                          --lr-decay cosine --warmup 50 --steps 700

Outputs in --out: ckpt.pt and samples_epochNNN.png per epoch, from fixed noise: the teacher's
Heun samples (stage teacher); for cd and ct one row per sampler, the teacher at 35 evaluations
(when there is one) and the consistency model at 1, 2 and 4 steps, the same noise in each column.

Differences from the paper:
- d is squared L2 or pseudo-Huber: LPIPS, the paper's best metric, needs downloaded weights.
- The networks are common.py's DDPM U-Net (the paper uses EDM's NCSN++), much smaller, and runs are
  far shorter than 800k steps; the EMA decay of the evaluated weights warms up as in ddpm.py.
- mu(k) is Appendix C's exp(s_0 log mu_0 / N(k)); the official code divides by N(k) - 1.
- CD's student (and its target) start from the teacher's weights, as the official code does.
- Gradients are clipped at norm 1 (--grad-clip), and the learning rate warms up linearly over 1,000
  steps, capped at a tenth of the run (--warmup); the official code uses RAdam with neither, and EDM
  (the teacher) ramps its rate up over 10M images without clipping. --grad-clip 0 and --warmup 0
  turn each off.
"""
import argparse
import contextlib
import copy
import math
import os
import random
import signal
import sys
import time
from pathlib import Path
from signal import SIGINT, SIGTERM

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from common import UNet, UserError, load_dataset, pick_device, save_grid, seed_everything

# ==== the paper ====================================================================================
# Time, the parameterisation and the probability-flow ODE (no network needed)

EPS, T_MAX, RHO = 0.002, 80.0, 7.0  # eps, T and rho of Sec. 5 (EDM's sigma_min, sigma_max, rho)


def karras_times(N, eps=EPS, T=T_MAX, rho=RHO):
    """t_i = (eps^(1/rho) + (i - 1)/(N - 1) (T^(1/rho) - eps^(1/rho)))^rho for i = 1..N (Sec. 5,
    EDM's Eq. 5), in float64, with t_0 = 0 in front so that t[i] is the paper's t_i."""
    if N < 2:
        raise UserError(f"the discretisation needs N >= 2 points (eps and T), got {N}")
    i = torch.arange(1, N + 1, dtype=torch.float64)
    t = (eps ** (1 / rho) + (i - 1) / (N - 1) * (T ** (1 / rho) - eps ** (1 / rho))) ** rho
    return torch.cat([torch.zeros(1, dtype=torch.float64), t])


def edm_scalings(t, sigma_data):
    """EDM's preconditioning (Table 1): D(x, t) = c_skip x + c_out F(c_in x, c_noise)."""
    c_skip = sigma_data ** 2 / (t ** 2 + sigma_data ** 2)
    c_out = t * sigma_data / (t ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out


def consistency_scalings(t, sigma_data):
    """Appendix C: EDM's c_skip and c_out moved so that c_skip(eps) = 1 and c_out(eps) = 0, which
    makes f(x, eps) = x exactly (the boundary condition) whatever the network outputs."""
    c_skip = sigma_data ** 2 / ((t - EPS) ** 2 + sigma_data ** 2)
    c_out = sigma_data * (t - EPS) / (t ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out


def c_in(t, sigma_data):
    """1 / sqrt(t^2 + sigma_data^2): the network sees inputs of unit variance at every t."""
    return 1 / (t ** 2 + sigma_data ** 2).sqrt()


def c_noise(t):
    """EDM's noise input, 1/4 ln t, times 1000 (as the official code) so that it spans about
    -1550..1100 like the integer times the U-Net's sinusoidal embedding was built for."""
    return 250 * t.log()


def view(c, x):
    """Per-example coefficients (B,), in x's dtype, shaped to broadcast against x."""
    return c.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def ode_step(D, x, t_from, t_to, solver="heun"):
    """One step of the probability-flow ODE dx/dt = -t grad log p_t(x) = (x - D(x, t)) / t (Eq. 3
    in EDM's form): Euler, or Heun's second-order correction (EDM's Algorithm 1, lines 4-8)."""
    d = (x - D(x, t_from)) / view(t_from, x)
    x_next = x + view(t_to - t_from, x) * d
    if solver == "heun":
        d_next = (x_next - D(x_next, t_to)) / view(t_to, x)
        x_next = x + view(t_to - t_from, x) * (d + d_next) / 2
    return x_next


# The network: c_skip(t) x + c_out(t) F_theta(c_in(t) x, c_noise(t)), F_theta common.py's U-Net

class Preconditioned(nn.Module):
    """The teacher's D_theta (boundary=False, EDM's scalings) or the consistency model f_theta
    (boundary=True, Appendix C's)."""

    def __init__(self, F_theta, sigma_data=0.5, boundary=True):
        super().__init__()
        self.F_theta, self.sigma_data, self.boundary = F_theta, sigma_data, boundary

    def forward(self, x, t):  # x: (B, C, H, W); t: (B,) noise levels
        t = t.to(x.device, x.dtype)
        c_skip, c_out = (consistency_scalings if self.boundary else edm_scalings)(t, self.sigma_data)
        F_x = self.F_theta(view(c_in(t, self.sigma_data), x) * x, c_noise(t))
        return view(c_skip, x) * x + view(c_out, x) * F_x


def make_model(args, channels, size, boundary):
    F_theta = UNet(channels, args.width, args.mults, args.res_blocks, args.attn, args.dropout,
                   image_size=size)
    return Preconditioned(F_theta, args.sigma_data, boundary)


# The teacher: EDM's loss and Heun sampler

def edm_loss(D, x, u, z, sigma_data, P_mean=-1.2, P_std=1.2):
    """EDM's training loss (Sec. 5, Table 1), per example, from the draws u ~ N(0, 1) (B,) and
    z ~ N(0, I) like x: ln t ~ N(P_mean, P_std^2), weighted by
    lambda(t) = (t^2 + sigma_data^2) / (t sigma_data)^2 so every t contributes about equally."""
    t = (P_mean + P_std * u).exp()  # ln t ~ N(P_mean, P_std^2)
    lam = (t ** 2 + sigma_data ** 2) / (t * sigma_data) ** 2
    return lam * (D(x + view(t, x) * z, t) - x).square().flatten(1).mean(1)  # the mean over pixels


def teacher_step(D, x, sigma_data, draw):
    """EDM's loss on a batch x, its t and noise z ~ N(0, I) drawn by draw (a Draws)."""
    return edm_loss(D, x, draw.randn(), draw.randn(*x.shape[1:]), sigma_data).mean()


@torch.no_grad()
def sample_heun(D, z, steps=18, on_step=None):
    """EDM's Algorithm 1 (deterministic): t_0 = T > ... > t_{N-1} = eps (the Karras times, reversed),
    t_N = 0; Heun steps, the last one Euler. 2 N - 1 network evaluations (35 for N = 18).
    on_step(done, steps), if given, is called after each step (progress lines, a stop)."""
    t = karras_times(steps).flip(0)  # t_0 = T, ..., t_{N-1} = eps, t_N = 0
    x = z * t[0]  # line 1: x_0 ~ N(0, t_0^2 I)
    for i in range(steps):
        t_i, t_next = (torch.full((len(x),), v.item(), device=x.device) for v in t[i:i + 2])
        x = ode_step(D, x, t_i, t_next, "heun" if t[i + 1] > 0 else "euler")  # lines 4-8
        if on_step is not None:
            on_step(i + 1, steps)
    return x


# Consistency distillation (Algorithm 2) and consistency training (Algorithm 3): the losses

def distance(a, b, metric):
    """d(x, y): squared L2 (mean over pixels) or pseudo-Huber sqrt(|x - y|^2 + c^2) - c with
    c = 0.00054 sqrt(dim) (Song & Dhariwal 2023, Sec. 3.3): L2 near 0, L1 far from it."""
    if metric == "l2":
        return (a - b).square().flatten(1).mean(1)
    c = 0.00054 * math.sqrt(a[0].numel())
    return ((a - b).square().flatten(1).sum(1) + c ** 2).sqrt() - c


def consistency_loss(f, f_minus, x_next, t_next, x_hat, t_n, metric, lam):
    """lambda(t_n) d(f_theta(x_{t_{n+1}}, t_{n+1}), f_theta^-(x^_{t_n}, t_n)), per example. The target
    network sees the same dropout mask as the student (the RNG is rewound between the two calls,
    as the official code does): the two outputs then differ only through t and x, not the mask."""
    with torch.random.fork_rng(devices=[x_next.device] if x_next.device.type == "cuda" else []):
        student = f(x_next, t_next)
    with torch.no_grad():  # theta^- gets no gradient: it follows theta only through the EMA
        target = f_minus(x_hat, t_n)
    return lam * distance(student, target.float(), metric)


def cd_loss(f, f_minus, D_phi, x, t, n, z, solver, metric):
    """Algorithm 2, lines 4-6, on the N-point discretisation t (t[i] = t_i), from the draws n and
    z ~ N(0, I)."""
    t = t.to(x.device, x.dtype)
    t_n, t_next = t[n], t[n + 1]
    # Algorithm 2, line 4: x_{t_{n+1}} ~ N(x; t_{n+1}^2 I)
    x_next = x + view(t_next, x) * z
    # Algorithm 2, line 5: x^_{t_n} <- x_{t_{n+1}} + (t_n - t_{n+1}) Phi(x_{t_{n+1}}, t_{n+1}; phi),
    # one step of the teacher's ODE solver
    with torch.no_grad():
        x_hat = ode_step(D_phi, x_next, t_next, t_n, solver)
    # Algorithm 2, line 6: L <- lambda(t_n) d(f_theta(x_{t_{n+1}}, t_{n+1}), f_theta^-(x^_{t_n}, t_n)),
    # lambda = 1 (the paper's choice)
    return consistency_loss(f, f_minus, x_next, t_next, x_hat, t_n, metric, 1.0)


def ct_loss(f, f_minus, x, t, n, z, metric, ict):
    """Algorithm 3, line 5, on the discretisation t of N(k) points, from the draws n and z ~ N(0, I)."""
    t = t.to(x.device, x.dtype)
    t_n, t_next = t[n], t[n + 1]
    # iCT, Sec. 3.4: lambda(t_n) = 1 / (t_{n+1} - t_n); Algorithm 3 as the paper ran it: lambda = 1
    lam = 1 / (t_next - t_n) if ict else 1.0
    # Algorithm 3, line 5: L <- lambda(t_n) d(f_theta(x + t_{n+1} z, t_{n+1}), f_theta^-(x + t_n z, t_n))
    return consistency_loss(f, f_minus, x + view(t_next, x) * z, t_next, x + view(t_n, x) * z, t_n,
                            metric, lam)


# The schedules of N(k) and mu(k), the draw of n and the target's update

def ct_N(k, K, s0=2, s1=150):
    """Appendix C: N(k) = ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1, from s0 to s1 + 1."""
    return math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1) + 1


def ct_mu(k, K, s0=2, s1=150, mu0=0.9):
    """Appendix C: mu(k) = exp(s0 log mu0 / N(k)), mu0 at k = 0, nearer 1 as N(k) grows."""
    return math.exp(s0 * math.log(mu0) / ct_N(k, K, s0, s1))


def ict_N(k, K, s0=10, s1=1280):
    """iCT, Sec. 3.5: N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2 floor(s1 / s0)
    + 1)): N doubles from s0 + 1 at K' evenly spaced steps, up to s1 + 1."""
    K_prime = max(1, math.floor(K / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (k // K_prime), s1) + 1


def ict_n_weights(t, P_mean=-1.1, P_std=2.0):
    """iCT, Sec. 3.5: p(n) proportional to erf((ln t_{n+1} - P_mean) / (sqrt 2 P_std))
    - erf((ln t_n - P_mean) / (sqrt 2 P_std)), n = 1..N - 1: a log-normal over the intervals."""
    cdf = torch.erf((t[1:].log() - P_mean) / (math.sqrt(2) * P_std))
    return (cdf[1:] - cdf[:-1]).float()


def draw_n(t, draw, ict):
    """n in 1..N - 1 for each example, for the discretisation t of N points; draw: a Draws."""
    if not ict:
        return draw.randint(1, len(t) - 1)  # Algorithms 2 and 3: n ~ U[1, N - 1]
    # iCT, Sec. 3.5: n from a discretised log-normal, its CDF inverted at u ~ U[0, 1)
    cdf = ict_n_weights(t).cumsum(0)
    u = draw.rand() * cdf[-1].item()
    return torch.searchsorted(cdf.to(u.device), u, right=True).clamp(max=len(cdf) - 1) + 1


@torch.no_grad()
def update_target(f_minus, f, mu):
    """theta^- <- stopgrad(mu theta^- + (1 - mu) theta) (mu = 0: theta^- = theta)."""
    for p_minus, p in zip(f_minus.parameters(), f.parameters()):
        p_minus.lerp_(p, 1 - mu)


# Algorithms 2 and 3, one training step each: loss(x, k, draw), the caller's gradient step on
# theta (line 7 of Algorithm 2, line 6 of Algorithm 3), then update_target(k)

class Distillation:
    """Algorithm 2 with the teacher D_phi: N and mu stay fixed, whatever the step k."""

    def __init__(self, f, f_minus, D_phi, N=18, mu=0.95, solver="heun", metric="l2"):
        self.f, self.f_minus, self.D_phi, self.t = f, f_minus, D_phi, karras_times(N)
        self.mu, self.solver, self.metric = mu, solver, metric

    def loss(self, x, k, draw):
        # Algorithm 2, line 3: x ~ D (the batch), n ~ U[1, N - 1]; line 4's noise z ~ N(0, I)
        n, z = draw_n(self.t, draw, ict=False), draw.randn(*x.shape[1:])
        # Algorithm 2, lines 4-6: x_{t_{n+1}}, the teacher's step to x^_{t_n}, and L
        return cd_loss(self.f, self.f_minus, self.D_phi, x, self.t, n, z, self.solver, self.metric).mean()

    def update_target(self, k):
        # Algorithm 2, line 8: theta^- <- stopgrad(mu theta^- + (1 - mu) theta)
        update_target(self.f_minus, self.f, self.mu)


class Training:
    """Algorithm 3 over K steps with Appendix C's N(k) and mu(k), or with ict Song & Dhariwal
    2023's improvements (iCT: N(k) doubling, n log-normal, mu = 0, lambda = 1 / (t_{n+1} - t_n))."""

    def __init__(self, f, f_minus, K, metric="l2", ict=False, s0=2, s1=150, mu0=0.9):
        self.f, self.f_minus, self.K, self.metric, self.ict = f, f_minus, K, metric, ict
        self.s0, self.s1, self.mu0 = s0, s1, mu0

    def N(self, k):
        return ict_N(k, self.K) if self.ict else ct_N(k, self.K, self.s0, self.s1)

    def mu(self, k):  # iCT: 0, the target is theta itself
        return 0.0 if self.ict else ct_mu(k, self.K, self.s0, self.s1, self.mu0)

    def loss(self, x, k, draw):
        t = karras_times(self.N(k))
        # Algorithm 3, line 3: x ~ D (the batch), n ~ U[1, N(k) - 1] (iCT: its log-normal)
        n = draw_n(t, draw, self.ict)
        # Algorithm 3, line 4: z ~ N(0, I)
        z = draw.randn(*x.shape[1:])
        # Algorithm 3, line 5: L <- lambda(t_n) d(f_theta(x + t_{n+1} z, t_{n+1}), f_theta^-(x + t_n z, t_n))
        return ct_loss(self.f, self.f_minus, x, t, n, z, self.metric, self.ict).mean()

    def update_target(self, k):
        # Algorithm 3, line 7: theta^- <- stopgrad(mu(k) theta^- + (1 - mu(k)) theta)
        update_target(self.f_minus, self.f, self.mu(k))


# Sampling: Algorithm 1

@torch.no_grad()
def sample_multistep(f, z, taus=(), clip=True, generator=None):
    """Algorithm 1. z ~ N(0, I) gives the initial noise x^_T = T z; taus: tau_1 > ... > tau_{N-1}.
    With clip, each f output is clamped to the data range [-1, 1] (as the official sampler)."""
    def f_clipped(x, t):
        x = f(x, torch.full((len(x),), t, device=x.device))
        return x.clamp(-1, 1) if clip else x
    # Algorithm 1, line 1: x <- f_theta(x^_T, T)
    x = f_clipped(T_MAX * z, T_MAX)
    for tau in taus:  # Algorithm 1, line 2: for n = 1 to N - 1
        # Algorithm 1, line 3: z ~ N(0, I)
        z = torch.randn(x.shape, device=x.device, generator=generator)
        # Algorithm 1, line 4: x^_{tau_n} <- x + sqrt(tau_n^2 - eps^2) z
        x_hat = x + math.sqrt(tau ** 2 - EPS ** 2) * z
        # Algorithm 1, line 5: x <- f_theta(x^_{tau_n}, tau_n)
        x = f_clipped(x_hat, tau)
    return x


# tau_1 > ... > tau_{k-1} for k steps, when --taus is not given. The paper searched its taus on FID
# (Sec. 6); tau_1 = 1.5 scored best of 0.3, 0.8, 1.5 and 3 for two steps on Fashion-MNIST (docs/consistency.md)
DEFAULT_TAUS = {1: (), 2: (1.5,), 3: (3.0, 0.8), 4: (5.0, 1.5, 0.4)}


# ==== harness: the same text in every method file (tests/test_harness.py compares the copies) ====
# Processes and devices, a global batch's random draws, checkpoints and resume, signals, EMA, the
# learning rate, the training loop's bookkeeping, progress lines, --sample's frame and shared flags.


def setup_processes(device_name):
    """(rank, world, device): 0 of 1, or under torchrun one process per device, NCCL on GPUs and
    gloo on CPUs, of which only rank 0 prints."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device_name)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if rank > 0:
        sys.stdout = open(os.devnull, "w")
    if device_name in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = pick_device("cpu" if device_name == "auto" else device_name)
    if not dist.is_initialized():  # (a caller may have set the group up already)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        print(f"distributed: {world} processes ({dist.get_backend()})")
    return rank, world, device


class Draws:
    """A global batch of n's random draws: every process draws all n and keeps its slice, so that
    N processes compute what one process computes on the whole batch."""

    def __init__(self, n, device, rank=0, world=1):
        self.n, self.device = n, device
        self.mine = slice(rank * n // world, (rank + 1) * n // world)

    def randn(self, *shape):  # (n / world, *shape)
        return torch.randn(self.n, *shape, device=self.device)[self.mine]

    def rand(self):
        return torch.rand(self.n, device=self.device)[self.mine]

    def randint(self, low, high):
        return torch.randint(low, high, (self.n,), device=self.device)[self.mine]


def epoch_batches(dataset, args, epoch, skip, rank=0, world=1):
    """Epoch `epoch`'s shuffled batches from the `skip`-th on, rank r's slice of each global batch.
    The loader has its own generator: the global RNG's draws would differ after a resume."""
    g = torch.Generator().manual_seed(args.seed * 100003 + epoch)
    order = torch.randperm(len(dataset), generator=g)[skip * args.batch_size:]
    b = args.batch_size // world
    mine = order[:len(order) // args.batch_size * args.batch_size].view(-1, world, b)[:, rank].flatten()
    return DataLoader(Subset(dataset, mine.tolist()), b, drop_last=True, generator=g)


@torch.no_grad()
def ema_update(ema, model, n, max_decay):
    """EMA of the weights, its decay warmed up as min(max_decay, (1 + n) / (10 + n))."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - min(max_decay, (1 + n) / (10 + n)))


def learning_rate(args, step, total):
    """Linear warm-up over --warmup steps (a tenth of a shorter run), then constant or cosine."""
    warmup = min(args.warmup, total // 10)
    lr = args.lr * min(1.0, (step + 1) / warmup) if warmup else args.lr
    return lr * 0.5 * (1 + math.cos(math.pi * step / total)) if args.lr_decay == "cosine" else lr


def load_checkpoint(path, methods, keys, flag="--ckpt"):
    """A checkpoint of one of `methods` with `keys`, read as data (weights_only), or one line."""
    if not Path(path).is_file():
        raise UserError(f"no checkpoint at {path}: train first, or pass {flag} PATH")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}): it is damaged or "
                        f"incomplete (a copy cut short?), or not a checkpoint at all") from None
    method = ckpt.get("method", "unknown") if isinstance(ckpt, dict) else "unknown"
    if method not in methods:
        raise UserError(f"{path} is a checkpoint of {method}, not of {' or '.join(methods)}")
    missing = [k for k in ("args", "step", "rng", *keys) if k not in ckpt]
    if missing:
        raise UserError(f"{path} is an incomplete {method} checkpoint: no {', '.join(missing)}")
    return ckpt


def resumed_args(p, args, ckpt, free=("device", "out", "resume", "ckpt", "data_dir", "log_every",
                                      "save_every", "compile", "bf16")):
    """The checkpoint's flags, with the `free` ones and a new length given now; any other flag
    given now that differs from the checkpoint's is refused."""
    saved = ckpt["args"]
    for k, v in vars(args).items():
        if k not in (*free, "epochs", "steps") and v not in (p.get_default(k), saved.get(k)):
            raise UserError(f"--resume continues the run with its --{k.replace('_', '-')} {saved.get(k)}, "
                            f"not {v}: leave the flag out, or start a new run with another --out")
    length = ("epochs", "steps") if args.epochs or args.steps else ()
    print("--resume: the flags left out are the checkpoint's")
    return argparse.Namespace(**{**saved, **{k: getattr(args, k) for k in (*free, *length)}})


@contextlib.contextmanager
def signals_to(stop):
    """Ctrl-C and SIGTERM append their number to `stop`: the run ends its step, saves and exits."""
    old = {s: signal.signal(s, lambda signum, frame: stop.append(signum)) for s in (SIGINT, SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


class SamplingStopped(Exception):
    """Ctrl-C or SIGTERM arrived while a sampler ran."""


class Progress:
    """Called after each step of a long loop, as progress(done, total) or as a sampler's on_step(x,
    done, total): a line with the time left every few seconds; SamplingStopped once `stop` is set."""

    def __init__(self, what, stop=(), every=5.0):
        self.what, self.stop, self.every = what, stop, every
        self.start = self.last = time.time()

    def __call__(self, *step):
        done, total = step[-2:]
        if self.stop:
            raise SamplingStopped
        if time.time() - self.last >= self.every:
            left = (time.time() - self.start) / done * (total - done)
            print(f"{self.what}: step {done}/{total}, {left / 60:.1f} min left", flush=True)
            self.last = time.time()


class Run(argparse.Namespace):
    """A training run: args, method, rank, world, device, path (of its checkpoint), ckpt (resumed, or
    None), stop, shape (of an example), model, opt, dataset, loss(batch, draws) -> a scalar, and
    optionally ema, after_step(step), pictures(epoch, progress) and extra() (more to checkpoint)."""
    ckpt = ema = after_step = pictures = first = None
    step, saved, grid = 0, 0, 0.0

    def extra(self):
        return {}


def begin(args, p, method, keys):
    """A Run: its processes, --out, and with --resume its checkpoint and flags; then the seed, the
    same on every process (see Draws)."""
    rank, world, device = setup_processes(args.device)
    run = Run(method=method, rank=rank, world=world, device=device, stop=[], path=out_folder(args.out) / "ckpt.pt")
    if args.resume:
        run.ckpt = load_checkpoint(args.ckpt or run.path, [method], ("shape", *keys))
        args = resumed_args(p, args, run.ckpt)
    seed_everything(args.seed)
    run.args = args
    return run


def prepare(run):
    """A resumed run's weights, optimizer, step and RNG, and run.net: the network as training calls it."""
    args, ckpt = run.args, run.ckpt
    if args.batch_size % run.world:
        raise UserError(f"--batch-size {args.batch_size} (the global batch) must divide evenly over "
                        f"{run.world} processes")
    if len(run.dataset) < args.batch_size:
        raise UserError(f"{len(run.dataset)} training examples, fewer than --batch-size {args.batch_size}")
    if ckpt is not None:
        if tuple(ckpt["shape"]) != tuple(run.shape):
            raise UserError(f"the checkpoint was trained on {tuple(ckpt['shape'])} data, not {tuple(run.shape)}: "
                            f"resume on the data it was trained on")
        try:
            run.model.load_state_dict(ckpt["model"])
        except RuntimeError:
            raise UserError(f"{run.path}'s weights do not fit the network its flags build: damaged?") from None
        if run.ema is not None:
            run.ema.load_state_dict(ckpt["ema"])
        run.opt.load_state_dict(ckpt["optimizer"])
        run.step = run.saved = ckpt["step"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        if ckpt["rng"]["cuda"] is not None and run.device.type == "cuda":  # each rank continues rank 0's
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], run.device)
        print(f"resumed from step {run.step}")
    run.per_epoch = len(run.dataset) // args.batch_size
    run.total = args.steps or args.epochs * run.per_epoch
    run.net = run.model
    if run.world > 1:  # averages the gradients over the processes in backward()
        run.net = DistributedDataParallel(run.model, [run.device.index] if run.device.type == "cuda" else None)
    if args.compile:
        run.net = torch.compile(run.net)


def train(run):
    """From run.step to the end: global batches, run.loss, gradient steps, EMA. The loss and the stop
    flag are read from the device every 10 steps and at each epoch's end, whose checkpoint and pictures
    follow. Ctrl-C or SIGTERM: the step ends, the run saves and exits 128 + the signal's number."""
    prepare(run)
    losses, run.bad_data, run.last_log = [], torch.zeros((), device=run.device), time.time()
    run.last_save = run.last_log
    with signals_to(run.stop):
        while run.step < run.total and not run.stop:
            epoch, skip = divmod(run.step, run.per_epoch)
            for batch in epoch_batches(run.dataset, run.args, epoch, skip, run.rank, run.world):
                losses.append(gradient_step(run, [b.to(run.device) for b in batch]))
                end = run.step % run.per_epoch == 0 or run.step == run.total
                if (end or run.step % 10 == 0 or run.world == 1 and run.stop) and check(run, losses) or end:
                    break
            if run.step % run.per_epoch == 0 or run.step == run.total:
                end_of_epoch(run, epoch)
        save(run)
    if run.world > 1:  # the others wait for rank 0's checkpoint: the next command may read it
        dist.barrier()
    print(f"{'interrupted' if run.stop else 'done'} at step {run.step}; checkpoint {run.path}")
    if run.stop:
        raise SystemExit(128 + run.stop[0])


def gradient_step(run, batch):
    run.bad_data += (~torch.isfinite(batch[0])).any()
    for group in run.opt.param_groups:
        group["lr"] = learning_rate(run.args, run.step, run.total)
    with torch.autocast("cuda", torch.bfloat16, enabled=run.args.bf16 and run.device.type == "cuda"):
        loss = run.loss(batch, Draws(run.args.batch_size, run.device, run.rank, run.world))
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if run.args.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.args.grad_clip)
    run.opt.step()
    run.step += 1
    if run.ema is not None:
        ema_update(run.ema, run.model, run.step, run.args.ema)
    if run.after_step is not None:
        run.after_step(run.step)
    run.first = loss.detach().float() if run.first is None else run.first
    return loss.detach().float()


def check(run, losses):
    """Stops a diverged run (a loss over 1000 x its first, or 1) without saving; prints progress; saves
    every --save-every minutes. Returns whether any process was asked to stop."""
    stop = torch.tensor(float(len(run.stop)), device=run.device)
    x = torch.stack([torch.stack(losses).mean(), run.first, run.bad_data, stop])
    if run.world > 1:
        dist.all_reduce(x)
        x /= run.world
    (loss, first, bad, stop), now = x.tolist(), time.time()
    if bad or not math.isfinite(loss) or loss > 1000 * max(first, 1):
        held = f"{run.path} holds step {run.saved}" if run.saved else "this run has written no checkpoint yet"
        why = "the data hold NaN or inf" if bad else f"the loss went from {first:.3g} to {loss:.3g} " \
            f"(diverged: try a lower --lr)"
        raise UserError(f"stopped at step {run.step} without saving, as {why}; {held}")
    if now - run.last_log >= run.args.log_every or stop or run.step == run.total:
        speed = len(losses) * run.args.batch_size / (now - run.last_log)
        left = (run.total - run.step) * (run.args.batch_size / speed + run.grid / run.per_epoch)
        print(f"step {run.step}/{run.total}  loss {loss:.4f}  {speed:.0f} img/s  {left / 60:.1f} min left",
              flush=True)
        losses.clear()
        run.last_log = now
    if stop and not run.stop:  # another process's signal: exit as after SIGTERM
        run.stop.append(SIGTERM)
    if now - run.last_save >= 60 * run.args.save_every or stop:
        save(run)
    return bool(stop)


def save(run):
    """The run and the RNG states, written to a temporary file and renamed: a crash leaves no broken file."""
    if run.rank == 0 and run.saved != run.step:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        torch.save({"method": run.method, "args": vars(run.args), "step": run.step, "shape": list(run.shape),
                    "model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "rng": rng,
                    "ema": None if run.ema is None else run.ema.state_dict(), **run.extra()}, f"{run.path}.tmp")
        os.replace(f"{run.path}.tmp", run.path)
    run.saved, run.last_save = run.step, time.time()


def end_of_epoch(run, epoch):
    save(run)
    if run.pictures is None or run.rank > 0:  # the other processes wait meanwhile
        return
    start = time.time()
    try:
        run.pictures(epoch, Progress(f"epoch {epoch + 1} grid", run.stop))
    except SamplingStopped:
        print(f"stopped while drawing the grid; {run.path} holds step {run.step}")
    run.grid, run.last_log = time.time() - start, time.time()  # img/s counts training alone


def sample_command(args, methods, keys, load, nrow=None, write=None):
    """--sample: load(ckpt, device) of --ckpt gives (net, draw); --n samples drawn 256 at a time by
    draw(first, n, progress), checked and written to --save as a tensor, a grid nrow wide (nrow: a
    number, or a function of the checkpoint), or by write(x, path) for a method's own kinds of file."""
    if not args.ckpt:
        raise UserError(f"--sample needs --ckpt PATH, a checkpoint its training wrote (in {args.out})")
    check_save(args.save, (".png", ".pt", *getattr(write, "suffixes", ())))
    ckpt = load_checkpoint(args.ckpt, methods, ("shape", *keys))
    net, draw = load(ckpt, pick_device(args.device))
    if not all(torch.isfinite(w).all() for w in net.parameters()):
        raise UserError(f"{args.ckpt} holds non-finite weights (its run diverged): retrain with a lower --lr")
    start, chunks = time.time(), []
    for i in range(0, args.n, 256):
        progress = Progress(f"samples {i + 1}-{min(i + 256, args.n)} of {args.n}")
        chunks.append(draw(i, min(256, args.n - i), progress).float().cpu())
    x = torch.cat(chunks)
    if not torch.isfinite(x).all():
        raise UserError(f"the samples of {args.ckpt} came out non-finite: the checkpoint is broken, retrain it")
    print(f"{args.n} samples in {time.time() - start:.2f} s")
    if write is not None:
        write(x, args.save)
    elif args.save.endswith(".pt"):
        torch.save(x, args.save)
    else:
        save_grid(x[:, :3], args.save, nrow=nrow(ckpt) if callable(nrow) else nrow)
    print(f"saved {args.save}")


def positive_int(s):
    if not s.strip().isdigit() or int(s) == 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}")
    return int(s)


def int_list(s):
    if not s.replace(",", "").strip():
        raise argparse.ArgumentTypeError(f"must be comma-separated integers such as 1,2,2, got {s!r}")
    return tuple(positive_int(x) for x in s.split(",") if x.strip())


def shared_flags(p, out, lr, batch_size=128, warmup=0, ema=0.9999, grad_clip=1.0):
    """DESIGN.md's command line: the flags of every method file, with the method's defaults."""
    p.add_argument("--dataset", help="mnist | fashion-mnist (default) | cifar10 | FOLDER | FILE.pt")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--image-size", type=positive_int, help="for image folders")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_int)
    length.add_argument("--steps", type=positive_int)
    p.add_argument("--batch-size", type=positive_int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=warmup, help="steps of linear warm-up (0: none)")
    p.add_argument("--lr-decay", choices=["none", "cosine"], default="none")
    p.add_argument("--ema", type=float, default=ema, help="EMA decay of the weights")
    p.add_argument("--grad-clip", type=float, default=grad_clip, help="gradient norm clip (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--out", default=out)
    p.add_argument("--resume", action="store_true", help="continue OUT's checkpoint (or --ckpt)")
    p.add_argument("--log-every", type=float, default=5.0, help="seconds between progress lines")
    p.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoints")
    p.add_argument("--sample", action="store_true", help="only sample from --ckpt")
    p.add_argument("--ckpt")
    p.add_argument("--n", type=positive_int, default=64, help="images to sample")
    p.add_argument("--save", help="FILE.png (a grid) or FILE.pt (a tensor) for --sample")


def check_shared_flags(p, args):
    for flag, ok, what in [("lr", args.lr > 0, "positive"), ("warmup", args.warmup >= 0, "0 or more"),
                           ("grad_clip", args.grad_clip >= 0, "0 (off) or positive"),
                           ("ema", 0 <= args.ema < 1, "in [0, 1)")]:
        if not ok:
            p.error(f"--{flag.replace('_', '-')} must be {what}, got {getattr(args, flag)}")
    if not args.resume:
        args.dataset = args.dataset or "fashion-mnist"
        args.epochs = args.epochs or (None if args.steps else 10)


def out_folder(path):
    if Path(path).exists() and not Path(path).is_dir():
        raise UserError(f"--out {path} is a file: give a folder for the run's outputs")
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def check_save(path, suffixes=(".png", ".pt")):
    if path and Path(path).is_dir():
        raise UserError(f"--save {path} is a folder: give a file name ending in {' or '.join(suffixes)}")
    if not path or Path(path).suffix not in suffixes:
        raise UserError(f"--sample needs --save FILE{' or FILE'.join(suffixes)}")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write --save {path}: {e.strerror}") from None


def run_command(command, args):
    """main()'s body: a user's error is one line, and so is Ctrl-C before training or while
    sampling (status 130); the process group, if any, is closed."""
    try:
        command(args)
    except UserError as e:
        sys.exit(f"error: {e}")
    except (KeyboardInterrupt, SamplingStopped):
        print("interrupted: nothing saved", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
# ==== end of harness ===============================================================================


# ==== the command line =============================================================================

METHODS = {"teacher": "consistency-teacher", "cd": "consistency-cd", "ct": "consistency-ct"}
KEYS = ("model", "ema", "optimizer", "teacher", "target")  # besides the harness's; a teacher's: the first 3
NETWORK = ("width", "mults", "res_blocks", "attn", "dropout", "sigma_data")  # the args make_model reads
MAX_HEUN_STEPS = 1000  # --sampling-steps of the teacher: a bound, so that a typo is no day's work


def check_taus(taus, steps):
    """Algorithm 1's times for `steps` steps: --taus checked, or the defaults."""
    if taus is None:
        if steps not in DEFAULT_TAUS:
            raise UserError(f"--sampling-steps {steps} needs --taus with {steps - 1} decreasing times "
                            f"in ({EPS}, {T_MAX:g}) (defaults exist for 1 to 4 steps)")
        return DEFAULT_TAUS[steps]
    if len(taus) != steps - 1:
        raise UserError(f"--sampling-steps {steps} needs {steps - 1} --taus, got {len(taus)}")
    if not all(EPS < tau < T_MAX for tau in taus) or any(a <= b for a, b in zip(taus, taus[1:])):
        raise UserError(f"--taus must decrease strictly and lie in ({EPS}, {T_MAX:g}): "
                        f"tau_1 > tau_2 > ..., got {', '.join(map(str, taus))}")
    return tuple(taus)


def fixed_noise(n, shape, device, seed=0):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed)).to(device)


def pictures(ema, teacher, args, shape, device, epoch, progress, n=10):
    """The teacher: 64 Heun samples. A consistency model: the teacher at 35 evaluations (if any) above
    the model at 1, 2 and 4 steps, the same noise in each column."""
    path = Path(args.out) / f"samples_epoch{epoch + 1:03d}.png"
    if args.stage == "teacher":
        save_grid(sample_heun(ema.eval(), fixed_noise(64, shape, device), on_step=progress), path)
    else:
        z = fixed_noise(n, shape, device)
        rows = [sample_heun(teacher, z, on_step=progress).clamp(-1, 1)] if teacher is not None else []
        for steps in (1, 2, 4):
            g = torch.Generator(device).manual_seed(1)
            rows.append(sample_multistep(ema.eval(), z, DEFAULT_TAUS[steps], args.clip_x0, g))
        save_grid(torch.cat(rows), path, nrow=n)
    print(f"epoch {epoch + 1}: samples in {path}")


def load_weights(module, state, path, part):
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{path}: its {part} state does not fit the network its args describe "
                        f"(a damaged checkpoint)") from None


def as_flag(v):
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def training_data(args):
    dataset, info = load_dataset(args.dataset, args.data_dir, True, args.image_size, flip=args.dataset == "cifar10")
    return dataset, info, (info.channels, info.size, info.size)


def teacher_of(args, shape):
    """--teacher's {args, shape, ema}, checked against the data's shape (CT needs none: one given only
    draws the grid's first row). CD's student takes the teacher's network flags."""
    if args.stage == "cd" and not args.teacher:
        raise UserError("--stage cd needs --teacher CKPT: train one first with "
                        "python consistency.py --stage teacher (runs/cm_teacher/ckpt.pt)")
    if args.stage == "teacher" or not args.teacher:
        return None
    t_ckpt = load_checkpoint(args.teacher, ["consistency-teacher"], ("shape", "ema"), "--teacher")
    if tuple(t_ckpt["shape"]) != shape:
        raise UserError(f"--teacher {args.teacher} was trained on {tuple(t_ckpt['shape'])} images, "
                        f"{args.dataset} has {shape}: distil on the teacher's data set")
    for k in NETWORK if args.stage == "cd" else ():
        flag, was = "--" + k.replace("_", "-"), as_flag(t_ckpt["args"][k])
        if getattr(args, k) is not None and as_flag(getattr(args, k)) != was:
            raise UserError(f"--stage cd's student is the teacher's network: the teacher has {flag} {was}; "
                            f"leave out {flag}")
        setattr(args, k, t_ckpt["args"][k])
    return {k: t_ckpt[k] for k in ("args", "shape", "ema")}


def load_teacher(state, N, device, source):
    """The teacher's D_phi (its EMA weights), frozen, and checked finite before any training."""
    D_phi = make_model(argparse.Namespace(**state["args"]), *state["shape"][:2], boundary=False)
    load_weights(D_phi, state["ema"], source, "teacher")
    D_phi.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    if not all(torch.isfinite(p).all() for p in D_phi.parameters()):
        raise UserError(f"the teacher ({source}) holds non-finite weights (its run diverged): "
                        f"retrain the teacher with a lower --lr")
    t = karras_times(N).to(device, torch.float32)
    z = fixed_noise(N - 1, state["shape"], device)
    if not torch.isfinite(ode_step(D_phi, view(t[2:], z) * z, t[2:], t[1:-1])).all():  # from x = 0, n = 1..N - 1
        raise UserError(f"the teacher's ODE step gave non-finite values: the teacher ({source}) is broken, "
                        f"retrain it")
    return D_phi


def fill_model_defaults(args, info):
    """ddpm.py's defaults by image size: 28x28 gets a 6.5M U-Net; 32x32 the DDPM CIFAR-10 one."""
    big = info.size >= 32
    args.width = args.width or (128 if big else 64)
    args.mults = args.mults or ((1, 2, 2, 2) if big else (1, 2, 2))
    args.attn = args.attn or ((16,) if big else (info.size // 4,))
    args.dropout = args.dropout if args.dropout is not None else (0.1 if args.dataset == "cifar10" else 0.0)
    args.res_blocks = args.res_blocks or 2
    args.sigma_data = args.sigma_data or 0.5


def train_command(args, p):
    data = None if args.resume else training_data(args)  # a new run's data and teacher are checked
    state = None if args.resume else teacher_of(args, data[2])  # before begin() makes --out
    run = begin(args, p, METHODS[args.stage], KEYS[:3] if args.stage == "teacher" else KEYS)
    args, source = run.args, args.teacher
    if run.ckpt is not None:  # the checkpoint's flags, and its copy of the teacher (CD's; CT's, if any)
        data, state, source = training_data(args), run.ckpt["teacher"], "the checkpoint's copy"
    run.dataset, info, run.shape = data
    fill_model_defaults(args, info)
    if args.clip_x0 is None:  # clamp samples to [-1, 1] for pixels, not for a file of float latents
        args.clip_x0 = not (args.dataset.endswith(".pt") and run.dataset.images.is_floating_point())
    run.model = make_model(args, *run.shape[:2], boundary=args.stage != "teacher")
    run.model.to(run.device, memory_format=torch.channels_last)
    teacher = state and load_teacher(state, args.N, run.device, source)
    if args.stage == "cd" and run.ckpt is None:  # as the official code: the student starts as the teacher
        run.model.load_state_dict(teacher.state_dict())
    target = copy.deepcopy(run.model).requires_grad_(False)  # Algorithms 2 and 3, line 1: theta^- <- theta
    if run.ckpt is not None and args.stage != "teacher" and tuple(run.ckpt["shape"]) == run.shape:
        load_weights(target, run.ckpt["target"], run.path, "target")  # (other data: train() refuses the resume)
    run.ema = copy.deepcopy(run.model).requires_grad_(False)
    adam = torch.optim.Adam if args.stage == "teacher" else torch.optim.RAdam  # EDM's; the paper's (Appendix C)
    run.opt = adam(run.model.parameters(), lr=args.lr)
    print(f"stage {args.stage}: {sum(w.numel() for w in run.model.parameters()) / 1e6:.2f}M parameters"
          + (f", teacher {source}" if teacher else ""))
    run.extra = lambda: {"teacher": state, "target": None if args.stage == "teacher" else target.state_dict()}
    run.pictures = lambda epoch, progress: pictures(run.ema, teacher, args, run.shape, run.device, epoch, progress)
    if args.stage == "teacher":
        run.loss = lambda batch, draws: teacher_step(run.net, batch[0], args.sigma_data, draws)
    else:
        def algorithm(f):  # f: run.net (DDP, --compile) for the loss, run.model for the target's update
            if args.stage == "cd":
                return Distillation(f, target, teacher, args.N, args.mu, args.ode_solver, args.metric)
            return Training(f, target, run.total, args.metric, args.ict, args.s0, args.s1, args.mu0)
        run.loss = lambda batch, draws: algorithm(run.net).loss(batch[0], run.step, draws)
        run.after_step = lambda step: algorithm(run.model).update_target(step - 1)  # k: the step just taken
    train(run)


def sample(args):
    def load(ckpt, device):
        train_args, shape = argparse.Namespace(**ckpt["args"]), tuple(ckpt["shape"])
        teacher = ckpt["method"] == "consistency-teacher"
        steps = args.sampling_steps or (18 if teacher else 1)
        if teacher:
            karras_times(steps)  # a clear error before any work
            if steps > MAX_HEUN_STEPS:
                raise UserError(f"--sampling-steps {steps}: the teacher's Heun sampler takes at most "
                                f"{MAX_HEUN_STEPS} steps (EDM uses 18 on CIFAR-10, the default)")
            taus, what = (), f"Heun, {steps} steps = {2 * steps - 1} evaluations"
        else:
            taus = check_taus(args.taus, steps)
            what = f"{steps} step{'s' if steps > 1 else ''}" + (f", taus {as_flag(taus)}" if taus else "")
        model = make_model(train_args, *shape[:2], boundary=not teacher)
        load_weights(model, ckpt["ema"], args.ckpt, "EMA")
        model.to(device, memory_format=torch.channels_last).eval()
        print(f"sampling: {what}")

        def draw(first, n, progress):
            g = torch.Generator(device).manual_seed(args.seed + first)
            z = torch.randn(n, *shape, device=device, generator=g)
            if teacher:
                x = sample_heun(model, z, steps, progress)
            else:
                x = sample_multistep(model, z, taus, train_args.clip_x0, g)
            return x.clamp(-1, 1) if train_args.clip_x0 and x.isfinite().all() else x  # else sample_command names it
        return model, draw

    sample_command(args, list(METHODS.values()), KEYS[:3], load)


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    shared_flags(p, None, lr=None, warmup=1000)  # --out and --lr: the stage's defaults, in parse_args
    p.add_argument("--stage", choices=["teacher", "cd", "ct"], default="cd",
                   help="teacher: EDM diffusion; cd: distil it (Algorithm 2); ct: train alone (Algorithm 3)")
    p.add_argument("--sampling-steps", type=positive_int,
                   help="consistency model: steps of Algorithm 1 (default 1); teacher: Heun steps (18)")
    p.add_argument("--taus", type=lambda s: tuple(float(x) for x in s.split(",") if x.strip()),
                   help="tau_1,...,tau_{k-1} for k > 1 steps, decreasing")
    p.add_argument("--teacher", help="a --stage teacher checkpoint (cd; ct: only for the grid)")
    p.add_argument("--N", type=int, default=18, help="cd: points of the discretisation")
    p.add_argument("--mu", type=float, default=0.95, help="cd: EMA decay of the target theta^-")
    p.add_argument("--ode-solver", choices=["euler", "heun"], default="heun", help="cd: Phi")
    p.add_argument("--metric", choices=["l2", "huber"], help="d: default l2 (huber with --ict)")
    p.add_argument("--s0", type=positive_int, default=2, help="ct: N(k) from s0 ...")
    p.add_argument("--s1", type=positive_int, default=150, help="ct: ... to s1 + 1")
    p.add_argument("--mu0", type=float, default=0.9, help="ct: mu(0)")
    p.add_argument("--ict", action="store_true", help="ct: Song & Dhariwal 2023's improvements")
    p.add_argument("--sigma-data", type=float, help="the data's std (default 0.5, EDM's for pixels)")
    p.add_argument("--clip-x0", action=argparse.BooleanOptionalAction,
                   help="clamp samples to [-1, 1] (default: yes for images, no for float latents)")
    p.add_argument("--width", type=positive_int, help="U-Net base channels")
    p.add_argument("--mults", type=int_list, help="channel multipliers per level, e.g. 1,2,2")
    p.add_argument("--res-blocks", type=positive_int, help="residual blocks per level (default 2)")
    p.add_argument("--attn", type=int_list, help="resolutions with self-attention, e.g. 7")
    p.add_argument("--dropout", type=float)
    return p


def parse_args(argv=None, p=None):
    p = p or parser()
    known = p.parse_known_args(argv)[0]  # the stage's defaults (which --resume compares with)
    p.set_defaults(out=f"runs/cm_{known.stage}", lr=1e-3 if known.stage == "teacher" else 4e-4,
                   metric="huber" if known.ict else "l2")
    args = p.parse_args(argv)
    check_shared_flags(p, args)
    if args.N < 2:
        p.error(f"--N must be at least 2 (eps and T), got {args.N}")
    if not 0 <= args.mu < 1 or not 0 <= args.mu0 < 1:
        p.error(f"--mu and --mu0 must lie in [0, 1), got {args.mu} and {args.mu0}")
    if args.s1 < args.s0:
        p.error(f"--s1 must be at least --s0, got {args.s1} < {args.s0}")
    if args.sigma_data is not None and not args.sigma_data > 0:
        p.error(f"--sigma-data must be positive, got {args.sigma_data}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        p.error(f"--dropout must lie in [0, 1), got {args.dropout}")
    if args.ict and args.stage != "ct":
        p.error("--ict improves consistency training: use it with --stage ct")
    return args


def main(argv=None):
    p = parser()
    args = parse_args(argv, p)
    run_command(sample if args.sample else lambda a: train_command(a, p), args)


if __name__ == "__main__":
    main()
