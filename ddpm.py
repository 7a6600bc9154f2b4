"""Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel 2020, arXiv:2006.11239).

A fixed forward process adds Gaussian noise to an image x_0 over T steps until x_T is pure noise,
q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (Eq. 2). A network eps_theta(x_t, t) learns
to predict the noise in x_t; that prediction gives the mean of each reverse step (Eq. 11), and
running the reverse chain from x_T ~ N(0, I) draws new images. DDIM (Song, Meng, Ermon 2021,
arXiv:2010.02502) reuses the same network with a shorter, optionally deterministic, chain.

    Algorithm 1 Training                        Algorithm 2 Sampling
    1: repeat                                   1: x_T ~ N(0, I)
    2:   x_0 ~ q(x_0)                           2: for t = T, ..., 1 do
    3:   t ~ Uniform({1, ..., T})               3:   z ~ N(0, I) if t > 1, else z = 0
    4:   eps ~ N(0, I)                          4:   x_{t-1} = 1/sqrt(alpha_t) (x_t - (1 - alpha_t)
    5:   Take a gradient descent step on                  / sqrt(1 - alpha_bar_t) eps_theta(x_t, t))
           grad_theta || eps - eps_theta(                 + sigma_t z
           sqrt(alpha_bar_t) x_0                5: end for
           + sqrt(1 - alpha_bar_t) eps, t) ||^2 6: return x_0
    6: until converged

Time runs as in the paper: t = 1..T, and every schedule array has T + 1 entries with index 0
meaning "no noise", so alpha_bar[t] is the paper's alpha_bar_t and alpha_bar[0] = 1. (Code that
counts from 0, such as diffusers, uses t_code = t - 1.)

Run:
    python ddpm.py --epochs 10                          # Fashion-MNIST, the paper's recipe
    python ddpm.py --dataset mnist --epochs 10          # MNIST digits (a few minutes on a GPU)
    python ddpm.py --sample --ckpt runs/ddpm/ckpt.pt --n 64 --save samples.png \
                   --sampler ddim --sampling-steps 50
    torchrun --standalone --nproc_per_node 8 ddpm.py --dataset cifar10 --epochs 2000   # 8 GPUs
    CPU recipe (15 minutes on 2 cores, clear garments; see docs/ddpm.md):
    python ddpm.py --width 32 --mults 1,2,3 --res-blocks 1 --batch-size 64 --lr 2e-3 \
                   --warmup 100 --lr-decay cosine --steps 800 --sampler ddim --sampling-steps 50

Outputs in --out (runs/ddpm): samples_epochNNN.png per epoch (EMA weights, fixed noise),
forward.png (x_0 -> x_T), reverse.png (x_T -> x_0), and ckpt.pt.

Differences from the paper:
- The loss is the mean, not the sum, of squared errors over pixels (a constant factor).
- The EMA decay warms up as min(0.9999, (1 + n) / (10 + n)) so short runs sample well, and the
  learning-rate warm-up is shortened to a tenth of the run when the run is short.
- The default 28x28 network is smaller than the paper's 35.7M CIFAR-10 U-Net (--width 128
  --mults 1,2,2,2 --attn 16 on 32x32 data rebuilds that one), and runs are shorter than its
  800k steps: "the paper's recipe" means its hyperparameters, not its scale.
- Both samplers clip the predicted x_0 to [-1, 1] by default, as the official code does: the mean
  is then Eq. 7's posterior mean at the clipped x_0, not Eq. 11 (Algorithm 2, line 4) as quoted,
  and DDIM's Eq. 12 uses the clipped x_0 and the eps consistent with it (--no-clip-x0: the
  equations exactly).
- DDIM's S times are spread evenly over 1..T and end at T; the official DDIM code takes
  range(0, T, T // S), which starts at t = 1 (counting from 1) and ends before T.
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
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from common import UNet, UserError, load_dataset, pick_device, save_grid, seed_everything

# ==== the paper ====================================================================================
# The noise schedule and the forward process (no network needed)

class Schedule:
    """beta_t, alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s and the posterior variance
    beta_tilde_t (Eq. 7), computed once in float64, indexed by the paper's t (index 0: no noise)."""

    def __init__(self, beta):  # beta: (T,) for t = 1..T
        self.T = len(beta)
        self.beta = torch.cat([torch.zeros(1, dtype=torch.float64), beta])
        self.alpha = 1 - self.beta
        self.alpha_bar = torch.cumprod(self.alpha, dim=0)
        # Eq. 7: beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t; beta_tilde_1 = 0
        self.beta_tilde = torch.zeros_like(self.beta)
        self.beta_tilde[1:] = (1 - self.alpha_bar[:-1]) / (1 - self.alpha_bar[1:]) * self.beta[1:]


def linear_schedule(T=1000):
    """Sec. 4: beta_1 = 1e-4 rising linearly to beta_T = 0.02 at T = 1000; rescaled by 1000 / T
    so that other T keep alpha_bar_T near zero, and kept below 1 (T <= 20 would reach beta = 1)."""
    scale = 1000 / T
    return Schedule(torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64).clamp(max=0.999))


def cosine_schedule(T=1000, s=0.008):
    """Nichol & Dhariwal 2021, Eq. 17: alpha_bar_t = f(t) / f(0), f(t) = cos((t/T + s)/(1 + s) pi/2)^2,
    beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} clipped at 0.999: near T the unclipped beta_t reaches 1,
    alpha_t = 0, and Algorithm 2's 1/sqrt(alpha_t) would divide by zero."""
    t = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return Schedule((1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999))


def extract(a, t, x):
    """a[t] for a batch of times t, as float32 on x's device, shaped to broadcast against x."""
    return a.to(x.device)[t].float().view(-1, *([1] * (x.dim() - 1)))


def q_sample(x0, t, eps, sch):
    """Eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, a sample of q(x_t | x_0)."""
    return extract(sch.alpha_bar.sqrt(), t, x0) * x0 + extract((1 - sch.alpha_bar).sqrt(), t, x0) * eps


def q_posterior_mean(x0, x_t, t, sch):
    """Eq. 7: the mean of q(x_{t-1} | x_t, x_0)."""
    ab, ab_prev = sch.alpha_bar[1:], sch.alpha_bar[:-1]
    coef_x0 = torch.cat([torch.zeros(1, dtype=torch.float64), ab_prev.sqrt() * sch.beta[1:] / (1 - ab)])
    coef_xt = torch.cat([torch.zeros(1, dtype=torch.float64), sch.alpha[1:].sqrt() * (1 - ab_prev) / (1 - ab)])
    return extract(coef_x0, t, x_t) * x0 + extract(coef_xt, t, x_t) * x_t


def predict_x0(x_t, t, eps, sch):
    """Eq. 4 solved for x_0: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
    return (x_t - extract((1 - sch.alpha_bar).sqrt(), t, x_t) * eps) / extract(sch.alpha_bar.sqrt(), t, x_t)


def mu_from_eps(x_t, t, eps, sch):
    """Eq. 11: mu_theta = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta)."""
    coef = sch.beta / (1 - sch.alpha_bar).sqrt().clamp(min=1e-20)  # index 0 is never used
    return (x_t - extract(coef, t, x_t) * eps) / extract(sch.alpha.sqrt(), t, x_t)


# The network: the DDPM U-Net of common.py

def make_model(args, channels, size):
    return UNet(channels, args.width, args.mults, args.res_blocks, args.attn, args.dropout,
                image_size=size)


# The objective (Algorithm 1)

def loss(eps_theta, x0, t, eps, sch):
    """Algorithm 1, line 5: || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t) ||^2,
    the mean over pixels and the batch instead of the sum (L_simple up to a constant factor)."""
    return (eps - eps_theta(q_sample(x0, t, eps, sch), t)).square().mean()


def training_step(eps_theta, x0, sch, draw):
    """Algorithm 1, lines 2-5, for a batch x_0 ~ q(x_0); the caller takes the gradient step.
    draw: the random draws (torch's own, or one process's share of a global batch's)."""
    # Algorithm 1, line 3: t ~ Uniform({1, ..., T})
    t = draw.randint(1, sch.T + 1)
    # Algorithm 1, line 4: eps ~ N(0, I)
    eps = draw.randn(*x0.shape[1:])
    return loss(eps_theta, x0, t, eps, sch)


# The samplers (Algorithm 2, DDIM)

def p_mean(eps_theta, x_t, t, sch, clip_x0):
    """The mean of p_theta(x_{t-1} | x_t): Eq. 11, or, with clip_x0, Eq. 7 at the predicted x_0
    clipped to the data range [-1, 1] (as the official code does), which keeps early, poorly
    predicted steps from pushing pixels out of range."""
    eps = eps_theta(x_t, t)
    if not clip_x0:
        return mu_from_eps(x_t, t, eps, sch)
    return q_posterior_mean(predict_x0(x_t, t, eps, sch).clamp(-1, 1), x_t, t, sch)


@torch.no_grad()
def sample_ddpm(eps_theta, shape, sch, sigma="beta", clip_x0=True, device="cpu", generator=None,
                on_step=None):
    """Algorithm 2. sigma: 'beta' (sigma_t^2 = beta_t) or 'beta_tilde' (sigma_t^2 = beta_tilde_t), Sec. 3.2.
    on_step(x, done, total), if given, is called after every step."""
    var = sch.beta if sigma == "beta" else sch.beta_tilde
    # Algorithm 2, line 1: x_T ~ N(0, I)
    x = torch.randn(shape, device=device, generator=generator)
    for t in range(sch.T, 0, -1):  # Algorithm 2, line 2: for t = T, ..., 1
        mean = p_mean(eps_theta, x, torch.full((shape[0],), t, device=device), sch, clip_x0)
        if t > 1:
            # Algorithm 2, lines 3-4: z ~ N(0, I); x_{t-1} = mu_theta(x_t, t) + sigma_t z
            x = mean + var[t].sqrt().item() * torch.randn(shape, device=device, generator=generator)
        else:
            # Algorithm 2, line 3 at t = 1: z = 0, so x_0 is the mean, with no noise added
            x = mean
        if on_step is not None:
            on_step(x, sch.T - t + 1, sch.T)
    return x  # Algorithm 2, line 6: return x_0


def ddim_timesteps(T, S):
    """S increasing times tau_1 < ... < tau_S = T spread evenly over 1..T (S = T gives 1..T)."""
    if not 1 <= S <= T:
        raise UserError(f"--sampling-steps must be between 1 and T = {T}, got {S}")
    return torch.linspace(1, T, S, dtype=torch.float64).round().long().unique().tolist() if S > 1 else [T]


@torch.no_grad()
def sample_ddim(eps_theta, shape, sch, steps, eta=0.0, clip_x0=True, device="cpu", generator=None,
                on_step=None):
    """DDIM (Song et al. 2021, Eq. 12) on the respaced chain tau_S = T > ... > tau_1 > tau_0 = 0.
    DDIM's alpha_t is DDPM's alpha_bar_t. eta = 0: deterministic; eta = 1: DDPM's sigma = beta_tilde
    of the respaced chain (of the original chain when S = T)."""
    taus = ddim_timesteps(sch.T, steps)
    x = torch.randn(shape, device=device, generator=generator)  # x_T ~ N(0, I)
    for i, (t, t_prev) in enumerate(zip(reversed(taus), list(reversed(taus))[1:] + [0])):
        ab, ab_prev = sch.alpha_bar[t].item(), sch.alpha_bar[t_prev].item()
        eps = eps_theta(x, torch.full((shape[0],), t, device=device))
        x0 = predict_x0(x, torch.full((shape[0],), t, device=device), eps, sch)  # Eq. 12, "predicted x_0"
        if clip_x0:  # keep eps consistent with the clipped x_0, as DDPM's posterior mean is
            x0 = x0.clamp(-1, 1)
            eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        # Eq. 16: sigma_tau_i(eta) = eta sqrt((1 - ab_prev) / (1 - ab)) sqrt(1 - ab / ab_prev)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        # Eq. 12: x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z
        x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * torch.randn(shape, device=device, generator=generator)
        if on_step is not None:
            on_step(x, i + 1, len(taus))
    return x


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

KEYS = ("model", "ema", "optimizer")  # of a ddpm.py checkpoint, besides the harness's


def make_schedule(args):
    return (linear_schedule if args.schedule == "linear" else cosine_schedule)(args.T)


def draw(eps_theta, n, shape, sch, args, device, seed=0, on_step=None):
    """n images with the sampler chosen on the command line, from a fixed seed."""
    g = torch.Generator(device).manual_seed(seed)
    if args.sampler == "ddim":
        steps = args.sampling_steps or min(50, sch.T)
        return sample_ddim(eps_theta, (n, *shape), sch, steps, args.eta, args.clip_x0, device, g, on_step)
    return sample_ddpm(eps_theta, (n, *shape), sch, args.sigma, args.clip_x0, device, g, on_step)


@torch.no_grad()
def print_loss_by_t(eps_theta, x0, sch, bins=10):
    """Algorithm 1's loss on a fixed batch x0 and noise, t spread over each tenth of 1..T: where
    the work is."""
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(x0.device)
    edges = torch.linspace(1, sch.T + 1, bins + 1).long().tolist()
    parts = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        if lo < hi:
            t = torch.linspace(lo, hi - 1, len(x0)).round().long().to(x0.device)
            parts.append(f"{lo}-{hi - 1}: {loss(eps_theta, x0, t, eps, sch).item():.4f}")
    print("loss by t: " + "  ".join(parts))


def strips(x0, sch, frames, out, count=10):
    """forward.png, x_0 noised by q(x_t | x_0) at `count` times from 0 to T (one eps), and
    reverse.png, `count` of a sampler's frames x_T -> x_0."""
    t = torch.linspace(0, sch.T, count).round().long()
    eps = torch.randn(1, *x0.shape, generator=torch.Generator().manual_seed(0)).expand(count, -1, -1, -1)
    save_grid(q_sample(x0.expand(count, -1, -1, -1), t, eps, sch), out / "forward.png", nrow=count)
    idx = torch.linspace(0, len(frames) - 1, count).round().long().tolist()
    save_grid(torch.cat([frames[i] for i in idx]), out / "reverse.png", nrow=count)


def pictures(run, sch, x0, epoch, progress):
    """The epoch's grid (EMA weights, fixed noise), the strips of strips() and the EMA model's loss
    by t on the data's first images."""
    ema, args, frames = run.ema.eval(), run.args, []
    print_loss_by_t(ema, x0, sch)

    def on_step(x, done, total):
        frames.append(x[:1].cpu())
        progress(done, total)

    path = Path(args.out) / f"samples_epoch{epoch + 1:03d}.png"
    save_grid(draw(ema, min(args.n, 64), run.shape, sch, args, run.device, 0, on_step), path)
    strips(x0[0].cpu(), sch, frames, Path(args.out))
    print(f"epoch {epoch + 1}: samples in {path}")


def fill_model_defaults(args, info):
    """Paper-style defaults by image size: 28x28 gets a 6.5M U-Net; 32x32 the paper's 35.7M one."""
    big = info.size >= 32
    args.width = args.width or (128 if big else 64)
    args.mults = args.mults or ((1, 2, 2, 2) if big else (1, 2, 2))
    args.attn = args.attn or ((16,) if big else (info.size // 4,))
    args.dropout = args.dropout if args.dropout is not None else (0.1 if args.dataset == "cifar10" else 0.0)


def train_command(args, p):
    run = begin(args, p, "ddpm", KEYS)
    args = run.args
    run.dataset, info = load_dataset(args.dataset, args.data_dir, True, args.image_size,
                                     flip=args.dataset == "cifar10")
    run.shape = (info.channels, info.size, info.size)
    fill_model_defaults(args, info)
    sch = make_schedule(args)
    print(f"schedule: {args.schedule}, T = {args.T}, sqrt(alpha_bar_T) = {sch.alpha_bar[-1].sqrt():.2e}")
    run.model = make_model(args, *run.shape[:2]).to(run.device, memory_format=torch.channels_last)
    print(f"model: {sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M parameters")
    run.ema = copy.deepcopy(run.model).requires_grad_(False)
    run.opt = torch.optim.Adam(run.model.parameters(), lr=args.lr)
    run.loss = lambda batch, draws: training_step(run.net, batch[0], sch, draws)
    x0 = torch.stack([run.dataset[i][0] for i in range(min(64, len(run.dataset)))]).to(run.device)
    run.pictures = lambda epoch, progress: pictures(run, sch, x0, epoch, progress)
    train(run)


def sample(args):
    def load(ckpt, device):
        train_args, shape = argparse.Namespace(**ckpt["args"]), tuple(ckpt["shape"])
        sch = make_schedule(train_args)
        if args.sampler == "ddim":
            ddim_timesteps(sch.T, args.sampling_steps or min(50, sch.T))  # a clear error before any work
        ema = make_model(train_args, *shape[:2]).to(device, memory_format=torch.channels_last)
        ema.load_state_dict(ckpt["ema"])

        def draw_chunk(first, n, progress):
            return draw(ema.eval(), n, shape, sch, args, device, args.seed + first, progress).clamp(-1, 1)
        return ema, draw_chunk

    sample_command(args, ["ddpm"], KEYS, load)


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    shared_flags(p, "runs/ddpm", lr=2e-4, warmup=5000)
    p.add_argument("--T", type=positive_int, default=1000)
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear")
    p.add_argument("--sigma", choices=["beta", "beta_tilde"], default="beta", help="sigma_t^2 of Sec. 3.2")
    p.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--sampling-steps", type=positive_int, help="DDIM steps S (default 50, or T if smaller)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--width", type=positive_int, help="U-Net base channels")
    p.add_argument("--mults", type=int_list, help="channel multipliers per level, e.g. 1,2,2")
    p.add_argument("--res-blocks", type=positive_int, default=2)
    p.add_argument("--attn", type=int_list, help="resolutions with self-attention, e.g. 7")
    p.add_argument("--dropout", type=float)
    return p


def parse_args(argv=None, p=None):
    p = p or parser()
    args = p.parse_args(argv)
    check_shared_flags(p, args)
    if args.sampling_steps is not None and args.sampling_steps > args.T:
        p.error(f"--sampling-steps must be between 1 and --T ({args.T}), got {args.sampling_steps}")
    if not 0 <= args.eta <= 1:
        p.error(f"--eta must be between 0 (DDIM) and 1 (DDPM's beta_tilde), got {args.eta}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    return args


def main(argv=None):
    p = parser()
    args = parse_args(argv, p)
    run_command(sample if args.sample else lambda a: train_command(a, p), args)


if __name__ == "__main__":
    main()
