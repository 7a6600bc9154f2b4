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
    CPU recipe (15 minutes on 2 cores, clear garments; see README.md):
    python ddpm.py --width 32 --mults 1,2,3 --res-blocks 1 --batch-size 64 --lr 2e-3 \
                   --warmup 100 --lr-decay cosine --steps 800 --sampler ddim --sampling-steps 50

Outputs in --out (runs/ddpm): samples_epochNNN.png per epoch (EMA weights, fixed noise),
forward.png (x_0 -> x_T), reverse.png (x_T -> x_0), ckpt.pt, and the loss per timestep bin.

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
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from common import UNet, UserError, load_dataset, pick_device, save_grid, seed_everything

# ----------------------------------------------------------------------------------------------
# The noise schedule and the forward process (no network needed)
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# The network: the DDPM U-Net of common.py
# ----------------------------------------------------------------------------------------------

def make_model(args, channels, size):
    return UNet(channels, args.width, args.mults, args.res_blocks, args.attn, args.dropout,
                image_size=size)


# ----------------------------------------------------------------------------------------------
# Training objective (Algorithm 1) and samplers (Algorithm 2, DDIM)
# ----------------------------------------------------------------------------------------------

def loss_per_example(eps_theta, x0, sch, rank=0, world=1):
    """Algorithm 1, lines 2-5, for a batch x0. Returns each example's loss and its t. Under
    torchrun, x0 is this rank's slice of the global batch: every rank draws t and eps for the whole
    batch and keeps its slice, so N processes compute what one process computes on all of it."""
    mine = slice(rank * len(x0), (rank + 1) * len(x0))
    # Algorithm 1, line 3: t ~ Uniform({1, ..., T})
    t = torch.randint(1, sch.T + 1, (world * len(x0),), device=x0.device)[mine]
    # Algorithm 1, line 4: eps ~ N(0, I)
    eps = torch.randn(world * len(x0), *x0.shape[1:], device=x0.device)[mine]
    # Algorithm 1, line 5: || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t) ||^2
    # Note: the mean over pixels instead of the sum (L_simple up to a constant factor).
    return (eps - eps_theta(q_sample(x0, t, eps, sch), t)).square().flatten(1).mean(1), t


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
    """Algorithm 2. sigma: 'beta' (sigma_t^2 = beta_t) or 'beta_tilde' (sigma_t^2 = beta_tilde_t), Sec. 3.2."""
    var = sch.beta if sigma == "beta" else sch.beta_tilde
    # Algorithm 2, line 1: x_T ~ N(0, I)
    x = torch.randn(shape, device=device, generator=generator)
    for t in range(sch.T, 0, -1):  # Algorithm 2, line 2: for t = T, ..., 1
        tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
        mean = p_mean(eps_theta, x, tt, sch, clip_x0)
        if t > 1:
            # Algorithm 2, lines 3-4: z ~ N(0, I); x_{t-1} = mu_theta(x_t, t) + sigma_t z
            z = torch.randn(shape, device=device, generator=generator)
            x = mean + var[t].sqrt().item() * z
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
        tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
        ab, ab_prev = sch.alpha_bar[t].item(), sch.alpha_bar[t_prev].item()
        eps = eps_theta(x, tt)
        x0 = predict_x0(x, tt, eps, sch)  # Eq. 12, "predicted x_0"
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


def draw(eps_theta, n, shape, sch, args, device, seed=0, on_step=None):
    """n images with the sampler chosen on the command line, from a fixed seed."""
    g = torch.Generator(device).manual_seed(seed)
    if args.sampler == "ddim":
        steps = args.sampling_steps or min(50, sch.T)
        return sample_ddim(eps_theta, (n, *shape), sch, steps, args.eta, args.clip_x0, device, g, on_step)
    return sample_ddpm(eps_theta, (n, *shape), sch, args.sigma, args.clip_x0, device, g, on_step)


class SamplingStopped(Exception):
    """Ctrl-C or SIGTERM arrived while training drew its grid (the checkpoint was saved before)."""


def duration(seconds):
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


class Progress:
    """Called after every sampling step: says how far sampling is every few seconds, keeps the first
    image of each step (for reverse.png), and ends the sampling at the next step once `stop` is set."""

    def __init__(self, what, stop=(), every=5.0):
        self.what, self.stop, self.every, self.frames = what, stop, every, []
        self.start = self.last = time.time()

    def __call__(self, x, done, total):
        self.frames.append(x[:1].cpu())
        if self.stop:
            raise SamplingStopped
        now = time.time()
        if now - self.last >= self.every:
            left = (now - self.start) / done * (total - done)
            print(f"{self.what}: step {done}/{total}, {duration(left)} left", flush=True)
            self.last = now


def save_strip(frames, path, count=10):
    """`count` frames spread evenly over a list of (1, C, H, W) images, in one row."""
    idx = torch.linspace(0, len(frames) - 1, count).round().long().tolist()
    save_grid(torch.cat([frames[i] for i in idx]), path, nrow=count)


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


# ----------------------------------------------------------------------------------------------
# Training loop: EMA, learning-rate warm-up, logging, checkpoints, grids
# ----------------------------------------------------------------------------------------------

def make_schedule(args):
    return (linear_schedule if args.schedule == "linear" else cosine_schedule)(args.T)


@torch.no_grad()
def ema_update(ema, model, n, max_decay):
    """EMA of the weights with a warm-up of the decay, min(max_decay, (1 + n) / (10 + n))."""
    decay = min(max_decay, (1 + n) / (10 + n))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def learning_rate(args, step, total, warmup):
    """Linear warm-up over `warmup` steps, then constant (the paper) or cosine decay to 0."""
    lr = args.lr * min(1.0, (step + 1) / warmup)
    if args.lr_decay == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * step / total))
    return lr


def save_checkpoint(path, model, ema, opt, step, args, shape):
    state = {"method": "ddpm", "args": vars(args), "shape": list(shape), "step": step,
             "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                     "mps": torch.mps.get_rng_state() if torch.backends.mps.is_available() else None}}
    tmp = Path(str(path) + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a broken ckpt.pt


def restore_device_rng(rng):
    """The CUDA generators of the devices this machine has (a checkpoint from a machine with more
    GPUs restores the first ones), and MPS's."""
    for i, state in enumerate(rng["cuda"][:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(state, i)
    if rng.get("mps") is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(rng["mps"])


def load_checkpoint(path):
    if not Path(path).is_file():
        raise UserError(f"no checkpoint at {path}: train first (python ddpm.py) or pass --ckpt PATH")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}): it is damaged or "
                        f"incomplete (a copy cut short?), or not a checkpoint at all") from None
    if not isinstance(ckpt, dict) or ckpt.get("method") != "ddpm":
        method = ckpt.get("method", "unknown") if isinstance(ckpt, dict) else "unknown"
        raise UserError(f"{path} is a checkpoint of {method}, not of ddpm.py")
    missing = [k for k in ("args", "shape", "step", "model", "ema", "optimizer", "rng") if k not in ckpt]
    if missing:
        raise UserError(f"{path} is an incomplete ddpm.py checkpoint: no {', '.join(missing)}")
    return ckpt


def epoch_batches(dataset, args, epoch, skip, rank=0, world=1):
    """Epoch `epoch`'s shuffled batches from the `skip`-th on, the same order on every run; under
    torchrun, rank r's slice r of each global batch of --batch-size."""
    g = torch.Generator().manual_seed(args.seed * 100003 + epoch)
    order = torch.randperm(len(dataset), generator=g)[skip * args.batch_size:]
    b = args.batch_size // world
    mine = order[:len(order) // args.batch_size * args.batch_size].view(-1, world, b)[:, rank].flatten()
    # its own generator: a DataLoader iterator otherwise draws a seed from the global RNG, and a
    # resumed run, which starts one more iterator, would then draw other t and eps
    return DataLoader(Subset(dataset, mine.tolist()), b, drop_last=True, generator=g)


def train(args):
    rank, world, device = setup_distributed(args.device)
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.ckpt or Path(args.out) / "ckpt.pt")
        if args.dataset is not None and args.dataset != ckpt["args"]["dataset"]:
            raise UserError(f"the run was trained on --dataset {ckpt['args']['dataset']}; --resume continues "
                            f"it on the same data (leave out --dataset, or start a new run with another --out)")
        keep = {k: getattr(args, k) for k in ("device", "out", "resume", "ckpt", "data_dir",
                                              "dataset", "image_size")
                if getattr(args, k) is not None}  # the data flags given, so the shape is checked
        if args.epochs is not None or args.steps is not None:  # a new length for the run
            keep["epochs"], keep["steps"] = args.epochs, args.steps
        args = argparse.Namespace(**{**ckpt["args"], **keep})
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} (the global batch) must divide evenly over "
                        f"{world} processes")
    seed_everything(args.seed)  # the same on every rank: see loss_per_example
    dataset, info = load_dataset(args.dataset, args.data_dir, True, args.image_size,
                                 flip=args.dataset == "cifar10")
    shape = (info.channels, info.size, info.size)
    if ckpt is not None and tuple(ckpt["shape"]) != shape:
        raise UserError(f"the checkpoint was trained on {tuple(ckpt['shape'])} images, "
                        f"{args.dataset} has {shape}: use the same --dataset and --image-size")
    if len(dataset) < args.batch_size:
        raise UserError(f"{args.dataset} has {len(dataset)} images, fewer than --batch-size {args.batch_size}")
    fill_model_defaults(args, info)

    sch = make_schedule(args)
    print(f"schedule: {args.schedule}, T = {args.T}, sqrt(alpha_bar_T) = {sch.alpha_bar[-1].sqrt():.2e}")
    model = make_model(args, *shape[:2]).to(device, memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False)  # starts as an exact copy
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    per_epoch = len(dataset) // args.batch_size
    total = args.steps or args.epochs * per_epoch
    warmup = max(1, min(args.warmup, total // 10))
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        restore_device_rng(ckpt["rng"])
        if world > 1 and device.type == "cuda":  # every rank continues rank 0's stream (device 0)
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][0], device)
        print(f"resumed from step {step}")
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model  # averages the gradients over the ranks in backward()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder for the run's outputs")
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt.pt"
    if step == 0 and rank == 0:
        save_forward_strip(dataset[0][0], sch, out / "forward.png")

    stop = []  # Ctrl-C or SIGTERM (kill, timeout, a cluster's scheduler) finishes the step, saves, exits
    handlers = {s: signal.signal(s, lambda signum, _: stop.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    ranks = argparse.Namespace(ddp=ddp, rank=rank, world=world)
    try:
        step = run_epochs(args, model, ema, opt, sch, dataset, device, shape, step, total, warmup,
                          per_epoch, ckpt_path, stop, ranks)
        if rank == 0:
            save_checkpoint(ckpt_path, model, ema, opt, step, args, shape)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if world > 1:
            dist.destroy_process_group()
    print(f"{'interrupted' if stop else 'done'} at step {step}; checkpoint {ckpt_path}")
    if stop:  # 130 after Ctrl-C, 143 after SIGTERM: a script or a scheduler tells it from "done"
        sys.exit(128 + stop[0])


def run_epochs(args, model, ema, opt, sch, dataset, device, shape, step, total, warmup, per_epoch,
               ckpt_path, stop, ranks):
    """The training loop. ranks: the model to call (DistributedDataParallel under torchrun), this
    process's rank and the world size; rank 0 alone logs, saves and draws the grids."""
    amp = torch.autocast("cuda", torch.bfloat16, enabled=args.bf16 and device.type == "cuda")
    last_log = last_save = time.time()
    seen, t_log = 0, time.time()
    saved = step or None  # the step ckpt_path holds from this run (a resumed run: where it resumed)
    grid_s, noted = None, False  # seconds one epoch's grid takes (measured once one is drawn)
    first = None  # the loss of this process's first step, the scale of the divergence rule
    while step < total:
        epoch, skip = divmod(step, per_epoch)
        bins = torch.zeros(2, 10, device=device)  # loss sum and count per tenth of 1..T
        for x0, _ in epoch_batches(dataset, args, epoch, skip, ranks.rank, ranks.world):
            # Algorithm 1, line 2: x_0 ~ q(x_0)
            x0 = x0.to(device).contiguous(memory_format=torch.channels_last)
            for group in opt.param_groups:
                group["lr"] = learning_rate(args, step, total, warmup)
            with amp:
                losses, t = loss_per_example(ranks.ddp, x0, sch, ranks.rank, ranks.world)
            loss = losses.mean()
            loss_all = all_sum(loss.detach(), ranks.world) / ranks.world  # the same on every rank
            first = loss_all.item() if first is None else first
            if diverged(loss_all.item(), first):
                kept = f"{ckpt_path} holds step {saved}" if saved else "this run has written no checkpoint yet"
                raise divergence_error(loss_all.item(), first, (x0,), step + 1, kept, ranks, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip:  # 0: no clipping (clip_grad_norm_ to 0 would zero every gradient)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()  # Algorithm 1, line 5: a gradient descent step (Adam)
            step += 1
            ema_update(ema, model, step, args.ema)
            b = ((t - 1) * 10 // sch.T)
            bins[0].index_add_(0, b, losses.detach().float())
            bins[1].index_add_(0, b, torch.ones_like(losses, dtype=torch.float))
            seen += args.batch_size
            now = time.time()
            if now - last_log >= args.log_every or step == total:
                speed = seen / (now - t_log)
                left = time_left(args, sch, step, total, per_epoch, speed, grid_s)
                print(f"step {step}/{total}  epoch {epoch + 1}  loss {loss_all.item():.4f}  "
                      f"{speed:.0f} img/s  {duration(left)} left", flush=True)
                if device.type == "cpu" and not noted and left > 1800:
                    print(f"note: this run needs about {duration(left)} on this CPU (sample grids "
                          f"included); README.md's CPU recipe shows real results in about 15 minutes")
                last_log, seen, t_log, noted = now, 0, now, True
            if now - last_save >= 60 * args.save_every and ranks.rank == 0:
                save_checkpoint(ckpt_path, model, ema, opt, step, args, shape)
                last_save, saved = now, step
            if step == total or stopped(stop, ranks, device):
                break
        print_loss_bins(all_sum(bins, ranks.world), sch.T)
        if (step % per_epoch == 0 or step == total) and ranks.rank == 0:  # the others wait meanwhile
            start = time.time()
            try:
                end_of_epoch(args, model, ema, opt, sch, device, shape, step, epoch, ckpt_path, stop)
            except SamplingStopped:
                print(f"stopped while drawing the grid; {ckpt_path} holds step {step}")
            finally:
                saved = step
            grid_s, seen, t_log = time.time() - start, 0, time.time()  # img/s counts training alone
        if stopped(stop, ranks, device):
            break
    return step


def stopped(stop, ranks, device):
    """Whether Ctrl-C or SIGTERM reached any rank: all ranks then stop after the same step."""
    if ranks.world > 1 and all_sum(torch.tensor(float(len(stop)), device=device), ranks.world).item():
        stop.append(signal.SIGTERM)  # every rank's list then says so; a rank not signalled exits 143
    return bool(stop)


def diverged(loss, first):
    """The loss is non-finite, or finite but absurd: over 1000 x the first step's (at least 1). A run
    at 1e22 stays finite, trains nothing and would sample noise."""
    return not math.isfinite(loss) or loss > 1000 * max(first, 1.0)


def divergence_error(loss, first, batch, step, kept, ranks, device, data="the data set has NaN or inf in it"):
    """What a diverged loss means: a batch holding NaN or inf on any rank (a lower --lr cannot help
    that), or else training that blew up."""
    bad = sum(float(not torch.isfinite(x).all()) for x in batch if x.is_floating_point())
    if all_sum(torch.tensor(bad, device=device), ranks.world).item():
        return UserError(f"the batch at step {step} holds non-finite values: {data}; stopped without "
                         f"saving ({kept})")
    scale = f" (over 1000 x the first step's {first:.4g})" if math.isfinite(loss) else ""
    return UserError(f"the loss became {loss:.4g}{scale} at step {step}; stopped without saving ({kept}). "
                     f"Try a lower --lr.")


def time_left(args, sch, step, total, per_epoch, speed, grid_s):
    """Seconds of training left, and of the grids still to draw at the ends of epochs. Before the
    first grid is timed, one grid's network calls are guessed from a training step's: a forward and
    backward pass on a batch cost about 3 forward passes."""
    grids = -(-(total - step) // per_epoch) if step < total else 0
    if grid_s is None:
        calls = (args.sampling_steps or min(50, args.T)) if args.sampler == "ddim" else sch.T
        grid_s = calls * min(args.n, 64) / (3 * speed)
    return (total - step) * args.batch_size / speed + grids * grid_s


def end_of_epoch(args, model, ema, opt, sch, device, shape, step, epoch, ckpt_path, stop):
    save_checkpoint(ckpt_path, model, ema, opt, step, args, shape)
    ema.eval()
    progress = Progress(f"epoch {epoch + 1} grid", stop)
    x = draw(ema, min(args.n, 64), shape, sch, args, device, seed=0, on_step=progress)
    save_grid(x, Path(args.out) / f"samples_epoch{epoch + 1:03d}.png")
    save_strip(progress.frames, Path(args.out) / "reverse.png")
    print(f"epoch {epoch + 1}: samples in {Path(args.out) / f'samples_epoch{epoch + 1:03d}.png'}")


def print_loss_bins(bins, T):
    """Bin i holds the t with (t - 1) * 10 // T = i: t from ceil(i T / 10) + 1 to ceil((i + 1) T / 10)."""
    parts = []
    for i, (total, count) in enumerate(zip(*bins.tolist())):
        lo, hi = -(-i * T // 10) + 1, -(-(i + 1) * T // 10)
        if lo <= hi:
            label = f"{lo}-{hi}" if hi > lo else f"{lo}"
            parts.append(f"{label}: {total / count:.4f}" if count else f"{label}: —")
    print("loss by t: " + "  ".join(parts))


def save_forward_strip(x0, sch, path, count=10):
    """One data image noised by q(x_t | x_0) at `count` times from 0 to T (shared noise eps)."""
    t = torch.linspace(0, sch.T, count).round().long()
    eps = torch.randn(1, *x0.shape, generator=torch.Generator().manual_seed(0)).expand(count, -1, -1, -1)
    save_grid(q_sample(x0.expand(count, -1, -1, -1), t, eps, sch), path, nrow=count)


# ----------------------------------------------------------------------------------------------
# Sampling from a checkpoint
# ----------------------------------------------------------------------------------------------

def sample(args):
    if not args.ckpt:
        raise UserError("--sample needs --ckpt PATH (e.g. runs/ddpm/ckpt.pt)")
    if not args.save or Path(args.save).suffix not in (".png", ".pt"):
        raise UserError("--sample needs --save FILE.png (a grid) or FILE.pt (a tensor)")
    ckpt = load_checkpoint(args.ckpt)
    device = pick_device(args.device)
    train_args = argparse.Namespace(**ckpt["args"])
    sch = make_schedule(train_args)
    if args.sampler == "ddim":
        args.sampling_steps = args.sampling_steps or min(50, sch.T)
        ddim_timesteps(sch.T, args.sampling_steps)  # a clear error before any work
    shape = tuple(ckpt["shape"])
    ema = make_model(train_args, *shape[:2]).to(device, memory_format=torch.channels_last)
    ema.load_state_dict(ckpt["ema"])
    ema.eval()
    if not all(torch.isfinite(p).all() for p in ema.parameters()):
        raise UserError(f"{args.ckpt} holds non-finite weights (its run diverged): retrain with a lower --lr")
    start = time.time()
    x = torch.cat([draw(ema, min(256, args.n - i), shape, sch, args, device, seed=args.seed + i,
                        on_step=Progress(f"images {i + 1}-{min(i + 256, args.n)} of {args.n}"))
                   for i in range(0, args.n, 256)]).cpu()
    if not torch.isfinite(x).all():
        raise UserError(f"the samples of {args.ckpt} came out non-finite: the checkpoint is broken, retrain it")
    x = x.clamp(-1, 1)
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
    if not v:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers such as 1,2,2, got {s!r}")
    return v


def fill_model_defaults(args, info):
    """Paper-style defaults by image size: 28x28 gets a 6.5M U-Net; 32x32 the paper's 35.7M one."""
    big = info.size >= 32
    args.width = args.width or (128 if big else 64)
    args.mults = args.mults or ((1, 2, 2, 2) if big else (1, 2, 2))
    args.attn = args.attn or ((16,) if big else (info.size // 4,))
    args.dropout = args.dropout if args.dropout is not None else (0.1 if args.dataset == "cifar10" else 0.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="mnist | fashion-mnist (default) | cifar10 | PATH")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--image-size", type=positive_int, help="for image folders")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_int)
    length.add_argument("--steps", type=positive_int)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/ddpm")
    p.add_argument("--resume", action="store_true", help="continue OUT/ckpt.pt (or --ckpt)")
    p.add_argument("--sample", action="store_true", help="only sample from --ckpt")
    p.add_argument("--ckpt")
    p.add_argument("--n", type=positive_int, default=64)
    p.add_argument("--save")
    # DDPM
    p.add_argument("--T", type=positive_int, default=1000)
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear")
    p.add_argument("--sigma", choices=["beta", "beta_tilde"], default="beta",
                   help="sigma_t^2 of Sec. 3.2")
    p.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--sampling-steps", type=int, help="DDIM steps S (default 50)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--width", type=positive_int, help="U-Net base channels")
    p.add_argument("--mults", type=int_list, help="channel multipliers per level, e.g. 1,2,2")
    p.add_argument("--res-blocks", type=positive_int, default=2)
    p.add_argument("--attn", type=int_list, help="resolutions with self-attention, e.g. 7")
    p.add_argument("--dropout", type=float)
    p.add_argument("--warmup", type=positive_int, default=5000)
    p.add_argument("--lr-decay", choices=["none", "cosine"], default="none")
    p.add_argument("--ema", type=float, default=0.9999)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast on CUDA")
    p.add_argument("--log-every", type=float, default=5.0, help="seconds")
    p.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoints")
    args = p.parse_args(argv)
    if args.sampling_steps is not None and not 1 <= args.sampling_steps <= args.T:
        p.error(f"--sampling-steps must be between 1 and --T ({args.T}), got {args.sampling_steps}")
    # --sampling-steps left out: 50, or T if smaller (the T of the checkpoint when sampling)
    if not args.lr > 0:
        p.error(f"--lr must be positive, got {args.lr}")
    if not args.grad_clip >= 0:
        p.error(f"--grad-clip must be 0 (off) or positive, got {args.grad_clip}")
    if not 0 <= args.eta <= 1:
        p.error(f"--eta must be between 0 (DDIM) and 1 (DDPM's beta_tilde), got {args.eta}")
    if not args.resume:
        args.dataset = args.dataset or "fashion-mnist"
        if args.epochs is None and args.steps is None:
            args.epochs = 10
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        sample(args) if args.sample else train(args)
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C where no checkpoint is at stake: sampling, or before training
        print("interrupted: nothing saved", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
