"""Consistency Models (Song, Dhariwal, Chen, Sutskever 2023, arXiv:2303.01469).

A diffusion model's probability-flow ODE carries every noisy x_t along one trajectory back to one
data point. A consistency function f(x_t, t) maps every point of a trajectory straight to its end
x_eps, so one network call turns pure noise into an image. It must satisfy f(x_eps, eps) = x_eps
(the boundary condition, built into the parameterisation below so that it holds exactly for any
network) and f(x_t, t) = f(x_t', t') on each trajectory (self-consistency, what training enforces
between neighbouring times t_n < t_{n+1}). Distillation (CD) gets the neighbour x_{t_n} from a
trained diffusion model's ODE step; training (CT) gets it from the same data point and noise alone.

    Algorithm 2 Consistency Distillation (CD)      Algorithm 3 Consistency Training (CT)
    theta^- <- theta                               theta^- <- theta and k <- 0
    repeat                                         repeat
      x ~ D, n ~ U[1, N - 1]                         x ~ D, n ~ U[1, N(k) - 1]
      x_{t_{n+1}} ~ N(x; t_{n+1}^2 I)                z ~ N(0, I)
      x^_{t_n} <- x_{t_{n+1}} + (t_n - t_{n+1})      L <- lambda(t_n) d(f_theta(x + t_{n+1} z, t_{n+1}),
                  Phi(x_{t_{n+1}}, t_{n+1}; phi)                        f_theta^-(x + t_n z, t_n))
      L <- lambda(t_n) d(f_theta(x_{t_{n+1}}, t_{n+1}),  theta <- theta - eta grad L
                         f_theta^-(x^_{t_n}, t_n))     theta^- <- stopgrad(mu(k) theta^-
      theta <- theta - eta grad L                                      + (1 - mu(k)) theta)
      theta^- <- stopgrad(mu theta^- + (1 - mu) theta)  k <- k + 1
    until convergence                              until convergence

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
    CPU recipe (about 15 minutes a stage on 2 cores; one-step FD 2.4x the teacher's; README.md):
    python consistency.py --stage teacher --width 32 --mults 1,2,3 --res-blocks 1 --batch-size 64 \
                          --lr 2e-3 --warmup 100 --lr-decay cosine --steps 1500
    python consistency.py --stage cd --teacher runs/cm_teacher/ckpt.pt --batch-size 64 \
                          --lr-decay cosine --warmup 50 --steps 700

Ctrl-C or SIGTERM stops a run at the end of its current step (or of the end-of-epoch grid's current
sampling step): it saves ckpt.pt, which --resume continues, and exits 130 or 143 (128 + the signal's
number); a finished run exits 0.

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
import copy
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from common import UNet, UserError, load_dataset, pick_device, save_grid, seed_everything

EPS, T_MAX, RHO = 0.002, 80.0, 7.0  # eps, T and rho of Sec. 5 (EDM's sigma_min, sigma_max, rho)

# ----------------------------------------------------------------------------------------------
# Time discretisation, parameterisation and the probability-flow ODE (no network needed)
# ----------------------------------------------------------------------------------------------


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
    """1 / sqrt(t^2 + sigma_data^2): the network sees inputs of unit variance at every t (at T = 80
    an unscaled x_t has std 80)."""
    return 1 / (t ** 2 + sigma_data ** 2).sqrt()


def c_noise(t):
    """EDM's noise input, 1/4 ln t, times 1000 (as the official code) so that it spans about
    -1550..1100 like the integer times the U-Net's sinusoidal embedding was built for."""
    return 250 * t.log()


def mine(draw, x, rank, world):
    """This rank's rows of `draw(world * len(x))`: under torchrun every rank draws t, n and z for
    the whole global batch and keeps its slice, so N processes compute what one process would."""
    return draw(world * len(x))[rank * len(x):(rank + 1) * len(x)]


def view(c, x):
    """Per-example coefficients (B,), in x's dtype, shaped to broadcast against x."""
    return c.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


class Preconditioned(nn.Module):
    """c_skip(t) x + c_out(t) F_theta(c_in(t) x, c_noise(t)): the teacher's D_theta (boundary=False,
    EDM's scalings) or the consistency model f_theta (boundary=True, Appendix C's)."""

    def __init__(self, F_theta, sigma_data=0.5, boundary=True):
        super().__init__()
        self.F_theta, self.sigma_data, self.boundary = F_theta, sigma_data, boundary

    def forward(self, x, t):  # x: (B, C, H, W); t: (B,) noise levels
        t = t.to(x.device, x.dtype)
        c_skip, c_out = (consistency_scalings if self.boundary else edm_scalings)(t, self.sigma_data)
        F_x = self.F_theta(view(c_in(t, self.sigma_data), x) * x, c_noise(t))
        return view(c_skip, x) * x + view(c_out, x) * F_x


def ode_step(D, x, t_from, t_to, solver="heun"):
    """One step of the probability-flow ODE dx/dt = -t grad log p_t(x) = (x - D(x, t)) / t (Eq. 3
    in EDM's form): Euler, or Heun's second-order correction (EDM's Algorithm 1, lines 4-8)."""
    d = (x - D(x, t_from)) / view(t_from, x)
    x_next = x + view(t_to - t_from, x) * d
    if solver == "heun":
        d_next = (x_next - D(x_next, t_to)) / view(t_to, x)
        x_next = x + view(t_to - t_from, x) * (d + d_next) / 2
    return x_next


# ----------------------------------------------------------------------------------------------
# The network: common.py's DDPM U-Net as F_theta
# ----------------------------------------------------------------------------------------------

def make_model(args, channels, size, boundary):
    F_theta = UNet(channels, args.width, args.mults, args.res_blocks, args.attn, args.dropout,
                   image_size=size)
    return Preconditioned(F_theta, args.sigma_data, boundary)


# ----------------------------------------------------------------------------------------------
# The teacher: EDM's loss and Heun sampler
# ----------------------------------------------------------------------------------------------

def edm_loss(D, x, u, z, sigma_data, P_mean=-1.2, P_std=1.2):
    """EDM's training loss (Sec. 5, Table 1), per example, from the caller's draws u ~ N(0, 1) (B,)
    and z ~ N(0, I) like x: ln t ~ N(P_mean, P_std^2), weighted by
    lambda(t) = (t^2 + sigma_data^2) / (t sigma_data)^2 so every t contributes about equally."""
    t = (P_mean + P_std * u).exp()  # ln t ~ N(P_mean, P_std^2)
    lam = (t ** 2 + sigma_data ** 2) / (t * sigma_data) ** 2
    return lam * (D(x + view(t, x) * z, t) - x).square().flatten(1).mean(1)  # Note: the mean over pixels


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


# ----------------------------------------------------------------------------------------------
# Consistency distillation (Algorithm 2) and consistency training (Algorithm 3)
# ----------------------------------------------------------------------------------------------

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
    devices = [x_next.device] if x_next.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        student = f(x_next, t_next)
    with torch.no_grad():  # theta^- gets no gradient: it follows theta only through the EMA
        target = f_minus(x_hat, t_n)
    return lam * distance(student, target.float(), metric)


def cd_loss(f, f_minus, D_phi, x, t, n, z, solver, metric):
    """Algorithm 2, lines 3-6, on the N-point discretisation t (t[i] = t_i), from the caller's draws
    n ~ U[1, N - 1] (draw_n) and z ~ N(0, I). Returns the losses and x^_{t_n}, the teacher's step."""
    t_n, t_next = t[n].to(x.device, x.dtype), t[n + 1].to(x.device, x.dtype)
    # Algorithm 2: x_{t_{n+1}} ~ N(x; t_{n+1}^2 I)
    x_next = x + view(t_next, x) * z
    # Algorithm 2: x^_{t_n} <- x_{t_{n+1}} + (t_n - t_{n+1}) Phi(x_{t_{n+1}}, t_{n+1}; phi), one
    # step of the teacher's ODE solver
    with torch.no_grad():
        x_hat = ode_step(D_phi, x_next, t_next, t_n, solver)
    # Algorithm 2: L <- lambda(t_n) d(f_theta(x_{t_{n+1}}, t_{n+1}), f_theta^-(x^_{t_n}, t_n)),
    # lambda = 1 (the paper's choice)
    return consistency_loss(f, f_minus, x_next, t_next, x_hat, t_n, metric, 1.0), x_hat


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


def draw_n(t, B, ict):
    """B draws of n in 1..N - 1 for the discretisation t of N points."""
    if ict:  # iCT (Song & Dhariwal 2023, Sec. 3.5): n drawn from a discretised log-normal
        return torch.multinomial(ict_n_weights(t), B, replacement=True) + 1
    return torch.randint(1, len(t) - 1, (B,))  # Algorithms 2 and 3: n ~ U[1, N - 1]


def ct_loss(f, f_minus, x, t, n, z, metric, ict):
    """Algorithm 3, lines 3-5, on the discretisation t of N(k) points, from the caller's draws
    n (draw_n) and z ~ N(0, I) like x."""
    t_n, t_next = t[n].to(x.device, x.dtype), t[n + 1].to(x.device, x.dtype)
    # iCT, Sec. 3.4: lambda(t_n) = 1 / (t_{n+1} - t_n); Algorithm 3 as the paper ran it: lambda = 1
    lam = 1 / (t_next - t_n) if ict else 1.0
    # Algorithm 3: L <- lambda(t_n) d(f_theta(x + t_{n+1} z, t_{n+1}), f_theta^-(x + t_n z, t_n))
    return consistency_loss(f, f_minus, x + view(t_next, x) * z, t_next, x + view(t_n, x) * z, t_n,
                            metric, lam)


@torch.no_grad()
def update_target(f_minus, f, mu):
    """theta^- <- stopgrad(mu theta^- + (1 - mu) theta), after every step (mu = 0: theta^- = theta)."""
    for p_minus, p in zip(f_minus.parameters(), f.parameters()):
        p_minus.lerp_(p, 1 - mu)


# ----------------------------------------------------------------------------------------------
# Sampling: Algorithm 1
# ----------------------------------------------------------------------------------------------

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


MAX_HEUN_STEPS = 1000  # --sampling-steps of the teacher: a bound, so that a typo is no day's work

# tau_1 > ... > tau_{k-1} for k steps, when --taus is not given. The paper searched its taus on FID
# (Sec. 6); tau_1 = 1.5 scored best of 0.3, 0.8, 1.5 and 3 for two steps on Fashion-MNIST (README.md)
DEFAULT_TAUS = {1: (), 2: (1.5,), 3: (3.0, 0.8), 4: (5.0, 1.5, 0.4)}


def check_taus(taus, steps):
    """The times of Algorithm 1 for `steps` steps: given, or the defaults, checked."""
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


def draw(model, z, steps, taus, clip, generator, on_step=None):
    """Samples from noise z: a consistency model with Algorithm 1, a teacher with Heun."""
    if model.boundary:
        return sample_multistep(model, z, taus, clip, generator)
    return sample_heun(model, z, steps, on_step)


# ----------------------------------------------------------------------------------------------
# Checkpoints, data, EMA and learning rate
# ----------------------------------------------------------------------------------------------

METHODS = {"teacher": "consistency-teacher", "cd": "consistency-cd", "ct": "consistency-ct"}
WHAT = {"consistency-teacher": "consistency.py --stage teacher", "consistency-cd": "consistency.py "
        "--stage cd", "consistency-ct": "consistency.py --stage ct"}
NETWORK = ("width", "mults", "res_blocks", "attn", "dropout", "sigma_data")  # the args make_model reads
# what each checkpoint holds besides args, shape, step, model, ema, optimizer and rng
PARTS = {"consistency-teacher": (), "consistency-cd": ("teacher", "target"), "consistency-ct": ("target",)}


def save_checkpoint(path, run, step):
    state = {"method": METHODS[run.args.stage], "args": vars(run.args), "shape": list(run.shape),
             "step": step, "model": run.model.state_dict(), "ema": run.ema.state_dict(),
             "optimizer": run.opt.state_dict(), "teacher": run.teacher_state,
             "target": run.target.state_dict() if run.target is not None else None,
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                     "mps": torch.mps.get_rng_state() if torch.backends.mps.is_available() else None}}
    tmp = Path(str(path) + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a broken ckpt.pt
    run.saved = step


def restore_device_rng(rng):
    """The CUDA generators of the devices this machine has (a checkpoint from a machine with more
    GPUs restores the first ones), and MPS's."""
    for i, state in enumerate(rng["cuda"][:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(state, i)
    if rng.get("mps") is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(rng["mps"])


def load_checkpoint(path, methods, flag="--ckpt"):
    """A checkpoint whose method is one of `methods`, or a clear error."""
    if not Path(path).is_file():
        raise UserError(f"no checkpoint at {path}: train it first ({WHAT[methods[0]]}) or pass {flag} PATH")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}): it is damaged or incomplete "
                        f"(a copy cut short?), or not a checkpoint at all") from None
    found = ckpt.get("method", "unknown") if isinstance(ckpt, dict) else "unknown"
    if found not in methods:
        raise UserError(f"{flag} {path} is a checkpoint of {WHAT.get(found, found)}, not of "
                        f"{' or '.join(WHAT[m] for m in methods)}")
    missing = [k for k in ("args", "shape", "step", "model", "ema", "optimizer", "rng", *PARTS[found])
               if ckpt.get(k) is None]
    if isinstance(ckpt.get("args"), dict):
        missing += [f"args['{k}']" for k in NETWORK if k not in ckpt["args"]]
    if isinstance(ckpt.get("teacher"), dict):
        missing += [f"teacher['{k}']" for k in ("args", "shape", "ema") if k not in ckpt["teacher"]]
    if missing:
        raise UserError(f"{path} is an incomplete consistency.py checkpoint: no {', '.join(missing)}")
    return ckpt


def load_weights(module, state, path, part):
    """module.load_state_dict(state), or a clear error for a checkpoint whose weights do not fit."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{path}: its {part} state does not fit the network its args describe "
                        f"(a damaged checkpoint)") from None


def teacher_from_state(state, device, source):
    """The teacher's D_phi (its EMA weights), frozen, from its checkpoint or a CD checkpoint's copy."""
    D_phi = make_model(argparse.Namespace(**state["args"]), *state["shape"][:2], boundary=False)
    load_weights(D_phi, state["ema"], source, "teacher")
    return D_phi.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)


def epoch_batches(dataset, args, epoch, skip, rank=0, world=1):
    """Epoch `epoch`'s shuffled batches from the `skip`-th on, the same order on every run; under
    torchrun, rank r's slice r of each global batch of --batch-size."""
    g = torch.Generator().manual_seed(args.seed * 100003 + epoch)
    order = torch.randperm(len(dataset), generator=g)[skip * args.batch_size:]
    b = args.batch_size // world
    mine = order[:len(order) // args.batch_size * args.batch_size].view(-1, world, b)[:, rank].flatten()
    # its own generator: a DataLoader otherwise draws a seed from the global RNG, and a resumed
    # run, which starts one more loader, would then draw other noise
    return DataLoader(Subset(dataset, mine.tolist()), b, drop_last=True, generator=g)


@torch.no_grad()
def ema_update(ema, model, n, max_decay):
    """EMA of the weights with a warm-up of the decay, min(max_decay, (1 + n) / (10 + n))."""
    decay = min(max_decay, (1 + n) / (10 + n))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def learning_rate(args, step, total):
    """Linear warm-up over min(--warmup, a tenth of the run) steps (0: none), then constant or
    cosine decay to 0."""
    lr = args.lr * min(1.0, (step + 1) / max(1, min(args.warmup, total // 10)))
    if args.lr_decay == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * step / total))
    return lr


# ----------------------------------------------------------------------------------------------
# Many GPUs (torchrun): one process per device; without torchrun, one process and none of this
# ----------------------------------------------------------------------------------------------

def setup_distributed(device_name):
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is rank 0 of 1. NCCL on
    GPUs, gloo on CPUs. Ranks > 0 print nothing. Returns (rank, world, device)."""
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


def all_sum(x, world):
    """The sum of a tensor over all ranks (itself for one process)."""
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def stopped(run):
    """Whether Ctrl-C or SIGTERM reached any rank: all ranks then stop after the same step."""
    anyone = run.world > 1 and all_sum(torch.tensor(float(len(run.stop)), device=run.device),
                                       run.world).item()
    if anyone and not run.stop:  # stopped by another rank's signal: exits 143, as after SIGTERM
        run.stop.append(signal.SIGTERM)
    return bool(run.stop)


# ----------------------------------------------------------------------------------------------
# Training: the three stages share one loop
# ----------------------------------------------------------------------------------------------

def normal(run, x, *shape):
    """This rank's rows of N(0, I) draws of shape (B, *shape) for the global batch (see mine())."""
    return mine(lambda B: torch.randn(B, *shape, device=x.device), x, run.rank, run.world)


def setup_teacher(run, ckpt):
    run.model = make_model(run.args, *run.shape[:2], boundary=False)
    run.target, run.teacher, run.teacher_state = None, None, None

    def loss(x, k, total):
        # EDM: ln t ~ N(P_mean, P_std^2) from u ~ N(0, 1), and the noise z ~ N(0, I)
        u, z = normal(run, x), normal(run, x, *x.shape[1:])
        return edm_loss(run.ddp, x, u, z, run.args.sigma_data).mean(), ""
    run.loss = loss


def setup_consistency(run, ckpt):
    args = run.args
    if args.stage == "cd":
        if ckpt is not None:
            run.teacher_state, source = ckpt["teacher"], f"the copy in {run.ckpt_path}"
        elif not args.teacher:
            raise UserError("--stage cd needs --teacher CKPT: train one first with "
                            "python consistency.py --stage teacher (runs/cm_teacher/ckpt.pt)")
        else:
            t_ckpt = load_checkpoint(args.teacher, ["consistency-teacher"], "--teacher")
            if tuple(t_ckpt["shape"]) != run.shape:
                raise UserError(f"--teacher {args.teacher} was trained on {tuple(t_ckpt['shape'])} images, "
                                f"{args.dataset} has {run.shape}: distil on the teacher's data set")
            run.teacher_state, source = {k: t_ckpt[k] for k in ("args", "shape", "ema")}, args.teacher
            refuse_other_network(run.given, t_ckpt["args"], "--stage cd's student is the teacher's network",
                                 "the teacher has")
        for k in NETWORK:
            setattr(args, k, run.teacher_state["args"][k])  # the student is the teacher's network
    elif args.teacher:  # CT learns without one; a teacher given here only draws the grid's first row
        t_ckpt, source = load_checkpoint(args.teacher, ["consistency-teacher"], "--teacher"), args.teacher
        run.teacher_state = {k: t_ckpt[k] for k in ("args", "shape", "ema")}
    else:
        run.teacher_state = None
    run.teacher = teacher_from_state(run.teacher_state, run.device, source) if run.teacher_state else None
    if run.teacher is not None and not all(torch.isfinite(p).all() for p in run.teacher.parameters()):
        raise UserError(f"the teacher ({source}) holds non-finite weights (its run diverged): "
                        f"retrain the teacher with a lower --lr")
    run.model = make_model(args, *run.shape[:2], boundary=True)
    if args.stage == "cd" and ckpt is None:
        # as the official code: the student starts from the teacher's weights (F_theta of both)
        run.model.load_state_dict(run.teacher.state_dict())
    run.target = copy.deepcopy(run.model).requires_grad_(False)  # Algorithm 2/3: theta^- <- theta
    t_fixed = karras_times(args.N)

    def loss(x, k, total):
        if args.stage == "cd":
            t, run.mu = t_fixed, args.mu
        else:
            t = karras_times(ict_N(k, total) if args.ict else ct_N(k, total, args.s0, args.s1))
            run.mu = 0.0 if args.ict else ct_mu(k, total, args.s0, args.s1, args.mu0)
        # Algorithms 2 and 3: n ~ U[1, N - 1] (iCT: its log-normal), then z ~ N(0, I)
        n = mine(lambda B: draw_n(t, B, args.ict), x, run.rank, run.world)
        z = normal(run, x, *x.shape[1:])
        if args.stage == "cd":
            losses, x_hat = cd_loss(run.ddp, run.target, run.teacher, x, t, n, z, args.ode_solver,
                                    args.metric)
            run.teacher_finite = torch.isfinite(x_hat).all()
        else:
            losses = ct_loss(run.ddp, run.target, x, t, n, z, args.metric, args.ict)
        return losses.mean(), f"N {len(t) - 1}  mu {run.mu:.4f}"
    run.loss = loss


def refuse_other_network(given, saved, why, where):
    """A network flag given on the command line that `saved` (a checkpoint's args) overrides is an
    error rather than silently ignored."""
    for k, v in given.items():
        if tuple_if_list(v) != tuple_if_list(saved[k]):
            flag, was = "--" + k.replace("_", "-"), saved[k]
            was = ",".join(map(str, was)) if isinstance(was, (list, tuple)) else was
            raise UserError(f"{why}: {where} {flag} {was}; leave out {flag}")


def tuple_if_list(v):
    return tuple(v) if isinstance(v, list) else v


def train(args):
    """Trains the stage of args; returns the exit status: 0 when done, 128 + the signal's number
    when interrupted (the checkpoint saved)."""
    rank, world, device = setup_distributed(args.device)
    args.out = args.out or f"runs/cm_{args.stage}"
    given = {k: getattr(args, k) for k in NETWORK if getattr(args, k) is not None}
    ckpt, ckpt_path = None, None
    if args.resume:
        ckpt_path = args.ckpt or Path(args.out) / "ckpt.pt"
        ckpt = load_checkpoint(ckpt_path, [METHODS[args.stage]])
        for k in ("dataset", "image_size", "teacher"):
            if getattr(args, k) is not None and getattr(args, k) != ckpt["args"].get(k):
                raise UserError(f"the run was started with --{k.replace('_', '-')} {ckpt['args'].get(k)}; "
                                f"--resume continues it as it was (leave out --{k.replace('_', '-')})")
        refuse_other_network(given, ckpt["args"], "--resume continues the run's network", "it has")
        keep = {k: getattr(args, k) for k in ("device", "out", "resume", "ckpt", "data_dir")}
        if args.epochs is not None or args.steps is not None:  # a new length for the run
            keep["epochs"], keep["steps"] = args.epochs, args.steps
        args = argparse.Namespace(**{**ckpt["args"], **keep})
    else:
        args.dataset = args.dataset or "fashion-mnist"
        args.epochs = args.epochs if args.epochs or args.steps else 10
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} (the global batch) must divide evenly over "
                        f"{world} processes")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a file: give a folder for the run's outputs")
    seed_everything(args.seed)  # the same on every rank: see mine()
    dataset, info = load_dataset(args.dataset, args.data_dir, True, args.image_size,
                                 flip=args.dataset == "cifar10")
    run = argparse.Namespace(args=args, device=device, shape=(info.channels, info.size, info.size),
                             saved=None, mu=None, rank=rank, world=world, given=given, ckpt_path=ckpt_path,
                             teacher_finite=torch.tensor(True))
    if ckpt is not None and tuple(ckpt["shape"]) != run.shape:
        raise UserError(f"the checkpoint was trained on {tuple(ckpt['shape'])} images, {args.dataset} "
                        f"has {run.shape}: use the same --dataset and --image-size")
    if len(dataset) < args.batch_size:
        raise UserError(f"{args.dataset} has {len(dataset)} images, fewer than --batch-size {args.batch_size}")
    fill_model_defaults(args, info)
    if args.clip_x0 is None:  # clamp samples to [-1, 1] for pixels, not for a file of float latents
        args.clip_x0 = not (args.dataset.endswith(".pt") and dataset.images.is_floating_point())
    (setup_teacher if args.stage == "teacher" else setup_consistency)(run, ckpt)
    run.model.to(device, memory_format=torch.channels_last)
    if run.target is not None:
        run.target.to(device, memory_format=torch.channels_last)
    run.ema = copy.deepcopy(run.model).requires_grad_(False)  # the weights that are evaluated
    # EDM trains with Adam; the consistency paper with RAdam (Appendix C)
    opt_class = torch.optim.Adam if args.stage == "teacher" else torch.optim.RAdam
    run.opt = opt_class(run.model.parameters(), lr=args.lr)
    print(f"stage {args.stage}: {sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M parameters"
          + (f", teacher {args.teacher}" if run.teacher is not None else ""))
    step = 0
    if ckpt is not None:
        for part, module in (("model", run.model), ("ema", run.ema), ("target", run.target),
                             ("optimizer", run.opt)):
            if module is not None:
                load_weights(module, ckpt[part], ckpt_path, part)
        step = run.saved = ckpt["step"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        restore_device_rng(ckpt["rng"])
        if world > 1 and device.type == "cuda":  # every rank continues rank 0's stream (device 0)
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][0], device)
        print(f"resumed from step {step}")
    run.ddp = DistributedDataParallel(run.model, device_ids=[device.index] if device.type == "cuda"
                                      else None) if world > 1 else run.model  # averages gradients
    Path(args.out).mkdir(parents=True, exist_ok=True)
    run.path = Path(args.out) / "ckpt.pt"
    run.stop = []  # the number of the signal (Ctrl-C, SIGTERM) that finishes the step, saves, exits
    handlers = {s: signal.signal(s, lambda signum, _: run.stop.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        step = run_epochs(run, dataset, step)
        if rank == 0:
            save_checkpoint(run.path, run, step)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if world > 1:
            dist.destroy_process_group()
    print(f"{'interrupted' if run.stop else 'done'} at step {step}; checkpoint {run.path}")
    return 128 + run.stop[0] if run.stop else 0


def run_epochs(run, dataset, step):
    args, device = run.args, run.device
    per_epoch = len(dataset) // args.batch_size
    total = args.steps or args.epochs * per_epoch
    amp = torch.autocast("cuda", torch.bfloat16, enabled=args.bf16 and device.type == "cuda")
    last_log = last_save = t_log = time.time()
    seen, first = 0, None  # first: the loss of this process's first step, divergence's yardstick
    while step < total:
        epoch, skip = divmod(step, per_epoch)
        for x, _ in epoch_batches(dataset, args, epoch, skip, run.rank, run.world):
            x = x.to(device, memory_format=torch.channels_last)
            for group in run.opt.param_groups:
                group["lr"] = learning_rate(args, step, total)
            with amp:
                loss, detail = run.loss(x, step, total)
            value = (all_sum(loss.detach(), run.world) / run.world).item()  # the same on every rank
            first = value if first is None else first
            if not math.isfinite(value) or value > 1000 * max(first, 1.0):
                raise UserError(divergence(run, x, value, first, step + 1))
            run.opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
            run.opt.step()
            step += 1
            if run.target is not None:  # Algorithm 2/3: theta^- <- stopgrad(mu theta^- + (1 - mu) theta)
                update_target(run.target, run.model, run.mu)
            ema_update(run.ema, run.model, step, args.ema)
            seen += args.batch_size
            now = time.time()
            if now - last_log >= args.log_every or step == total:
                speed = seen / (now - t_log)
                print(f"step {step}/{total}  epoch {epoch + 1}  loss {value:.4f}  {detail}  "
                      f"{speed:.0f} img/s  {(total - step) * args.batch_size / speed / 60:.1f} min left",
                      flush=True)
                last_log, seen, t_log = now, 0, now
            if now - last_save >= 60 * args.save_every and run.rank == 0:
                save_checkpoint(run.path, run, step)
                last_save = now
            if step == total or stopped(run):
                break
        if (step % per_epoch == 0 or step == total) and run.rank == 0:  # the others wait meanwhile
            save_checkpoint(run.path, run, step)
            try:
                save_epoch_grid(run, epoch)
            except SamplingStopped:
                print(f"stopped while drawing the grid; {run.path} holds step {step}", flush=True)
            seen, t_log = 0, time.time()  # images/s and time left count training alone
        if stopped(run):
            break
    return step


def divergence(run, x, value, first, step):
    """Why the run stops at `step`: the non-finite input (the batch, the teacher's ODE step) where
    there is one, since a lower --lr cannot help then; else the loss, non-finite or absurd."""
    kept = f"{run.path} holds step {run.saved}" if run.saved else "no checkpoint was written yet"
    bad = torch.stack([~torch.isfinite(x).all(), ~run.teacher_finite.to(device=x.device)]).float()
    bad_batch, bad_teacher = all_sum(bad, run.world).tolist()  # on any rank
    if bad_batch:
        return (f"the batch at step {step} holds non-finite values: the data set {run.args.dataset} has NaN "
                f"or inf in it; stopped without saving, {kept}")
    if bad_teacher:
        return (f"the teacher's ODE step at step {step} gave non-finite values: the teacher "
                f"({run.args.teacher}) is broken, retrain it; stopped without saving, {kept}")
    how = f"over 1000 times the first step's {first:.4g}" if math.isfinite(value) else "not finite"
    return (f"the loss became {value:.4g} at step {step} ({how}); stopped without saving, {kept}. "
            f"Try a lower --lr.")


class SamplingStopped(Exception):
    """Ctrl-C or SIGTERM arrived while training drew its grid (the checkpoint was saved before)."""


class Progress:
    """A sampler's on_step(done, total): a line every few seconds, and the end of the sampling at
    the next step once `stop` is set."""

    def __init__(self, what, stop=(), every=5.0):
        self.what, self.stop, self.every = what, stop, every
        self.start = self.last = time.time()

    def __call__(self, done, total):
        if self.stop:
            raise SamplingStopped
        now = time.time()
        if now - self.last >= self.every:
            left = (now - self.start) / done * (total - done)
            print(f"{self.what}: step {done}/{total}, {left:.0f} s left", flush=True)
            self.last = now


def fixed_noise(n, shape, device, seed=0):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed)).to(device)


def comparison_rows(f, D_phi, n, shape, device, clip, on_step=None):
    """n samples per row, from the same noise z: the teacher's Heun (if any), then f at 1, 2, 4 steps."""
    z = fixed_noise(n, shape, device)
    rows = [sample_heun(D_phi, z, on_step=on_step).clamp(-1, 1)] if D_phi is not None else []
    for steps in (1, 2, 4):
        g = torch.Generator(device).manual_seed(1)
        rows.append(sample_multistep(f, z, DEFAULT_TAUS[steps], clip, g))
    return torch.cat(rows)


def save_epoch_grid(run, epoch, n=10):
    """The teacher: 64 Heun samples. A consistency model: from the same noise in every column, the
    teacher at 35 evaluations (if there is one) above the consistency model at 1, 2 and 4 steps.
    A signal ends the teacher's sampling at its next step (SamplingStopped)."""
    path = Path(run.args.out) / f"samples_epoch{epoch + 1:03d}.png"
    progress = Progress(f"epoch {epoch + 1} grid", run.stop)
    try:
        if run.args.stage == "teacher":
            x = sample_heun(run.ema.eval(), fixed_noise(64, run.shape, run.device), on_step=progress)
            save_grid(x, path)
        else:
            save_grid(comparison_rows(run.ema.eval(), run.teacher, n, run.shape, run.device,
                                      run.args.clip_x0, progress), path, nrow=n)
    finally:
        run.ema.train()
    print(f"epoch {epoch + 1}: samples in {path}")


# ----------------------------------------------------------------------------------------------
# Sampling from a checkpoint
# ----------------------------------------------------------------------------------------------

def sample(args):
    if not args.ckpt:
        raise UserError("--sample needs --ckpt PATH (e.g. runs/cm_cd/ckpt.pt)")
    if args.save and Path(args.save).is_dir():
        raise UserError(f"--save {args.save} is a folder: give a file name, such as "
                        f"{Path(args.save) / 'samples.png'}")
    if not args.save or Path(args.save).suffix not in (".png", ".pt"):
        raise UserError("--sample needs --save FILE.png (a grid) or FILE.pt (a tensor)")
    if any(d.exists() and not d.is_dir() for d in Path(args.save).parents):
        raise UserError(f"--save {args.save} lies inside a file: give a path in a folder")
    ckpt = load_checkpoint(args.ckpt, list(WHAT))
    train_args = argparse.Namespace(**ckpt["args"])
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
        what = f"{steps} step{'s' if steps > 1 else ''}" + (f", taus {', '.join(f'{t:g}' for t in taus)}" if taus else "")
    device = pick_device(args.device)
    shape = tuple(ckpt["shape"])
    model = make_model(train_args, *shape[:2], boundary=not teacher)
    load_weights(model, ckpt["ema"], args.ckpt, "EMA")
    model.to(device, memory_format=torch.channels_last).eval()
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise UserError(f"{args.ckpt} holds non-finite weights (its run diverged): retrain with a lower --lr")
    start, xs = time.time(), []
    for i in range(0, args.n, 256):
        g = torch.Generator(device).manual_seed(args.seed + i)
        z = torch.randn(min(256, args.n - i), *shape, device=device, generator=g)
        batch = f"images {i + 1}-{i + len(z)} of {args.n}"
        xs.append(draw(model, z, steps, taus, train_args.clip_x0, g, Progress(batch)).cpu())
        print(f"{batch} ({what})", flush=True)
    x = torch.cat(xs)
    if not torch.isfinite(x).all():
        raise UserError(f"the samples of {args.ckpt} came out non-finite: the checkpoint is broken, retrain it")
    x = x.clamp(-1, 1) if train_args.clip_x0 else x
    print(f"{args.n} samples in {time.time() - start:.2f} s")
    Path(args.save).parent.mkdir(parents=True, exist_ok=True)
    if args.save.endswith(".pt"):
        torch.save(x, args.save)
    else:
        save_grid(x, args.save)
    print(f"saved {args.save}")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def positive_int(s):
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def int_list(s):
    v = tuple(int(x) for x in s.split(",") if x.strip())
    if not v or min(v) <= 0:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers such as 1,2,2, "
                                         f"got {s!r}")
    return v


def non_negative_int(s):
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (off) or a positive integer, got {s}")
    return v


def float_list(s):
    return tuple(float(x) for x in s.split(",") if x.strip())


def fill_model_defaults(args, info):
    """ddpm.py's defaults by image size: 28x28 gets a 6.5M U-Net; 32x32 the DDPM CIFAR-10 one."""
    big = info.size >= 32
    args.width = args.width or (128 if big else 64)
    args.mults = args.mults or ((1, 2, 2, 2) if big else (1, 2, 2))
    args.attn = args.attn or ((16,) if big else (info.size // 4,))
    args.dropout = args.dropout if args.dropout is not None else (0.1 if args.dataset == "cifar10" else 0.0)
    args.res_blocks = args.res_blocks or 2
    args.sigma_data = args.sigma_data or 0.5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["teacher", "cd", "ct"], default="cd",
                   help="teacher: EDM diffusion; cd: distil it (Algorithm 2); ct: train alone (Algorithm 3)")
    p.add_argument("--dataset", help="mnist | fashion-mnist (default) | cifar10 | PATH")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--image-size", type=positive_int, help="for image folders")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_int)
    length.add_argument("--steps", type=positive_int, help="training steps")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=float, help="default 1e-3 (teacher, EDM), 4e-4 (cd, ct: the paper)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="default runs/cm_STAGE")
    p.add_argument("--resume", action="store_true", help="continue OUT/ckpt.pt (or --ckpt)")
    p.add_argument("--sample", action="store_true", help="only sample from --ckpt")
    p.add_argument("--ckpt")
    p.add_argument("--n", type=positive_int, default=64)
    p.add_argument("--save")
    p.add_argument("--sampling-steps", type=positive_int,
                   help="consistency model: steps of Algorithm 1 (default 1); teacher: Heun steps (18)")
    p.add_argument("--taus", type=float_list, help="tau_1,...,tau_{k-1} for k > 1 steps, decreasing")
    # consistency
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
    # network and optimisation
    p.add_argument("--width", type=positive_int, help="U-Net base channels")
    p.add_argument("--mults", type=int_list, help="channel multipliers per level, e.g. 1,2,2")
    p.add_argument("--res-blocks", type=positive_int, help="residual blocks per level (default 2)")
    p.add_argument("--attn", type=int_list, help="resolutions with self-attention, e.g. 7")
    p.add_argument("--dropout", type=float)
    p.add_argument("--warmup", type=non_negative_int, default=1000,
                   help="learning-rate warm-up steps (0: off)")
    p.add_argument("--lr-decay", choices=["none", "cosine"], default="none")
    p.add_argument("--ema", type=float, default=0.9999, help="EMA decay of the evaluated weights")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast on CUDA")
    p.add_argument("--log-every", type=float, default=5.0, help="seconds")
    p.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoints")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 1e-3 if args.stage == "teacher" else 4e-4
    if not args.lr > 0:
        p.error(f"--lr must be positive, got {args.lr}")
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
    if not 0 <= args.ema < 1:
        p.error(f"--ema must lie in [0, 1), got {args.ema}")
    if not args.grad_clip >= 0:
        p.error(f"--grad-clip must be 0 (off) or positive, got {args.grad_clip}")
    if args.ict and args.stage != "ct":
        p.error("--ict improves consistency training: use it with --stage ct")
    args.metric = args.metric or ("huber" if args.ict else "l2")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        status = sample(args) if args.sample else train(args)
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C while sampling, or before training's handlers are set
        print("interrupted: nothing saved", file=sys.stderr)
        sys.exit(130)
    if status:  # 128 + the signal's number: an interrupted run, its checkpoint saved
        sys.exit(status)


if __name__ == "__main__":
    main()
