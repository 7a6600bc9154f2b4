"""Rectified flow: "Flow Straight and Fast" (Liu, Gong, Liu 2023, arXiv:2209.03003).

A rectified flow is an ODE dZ_t = v(Z_t, t) dt, t from 0 to 1, that carries noise Z_0 ~ pi_0 =
N(0, I) to data Z_1 ~ pi_1. Its velocity v is fitted by least squares to the straight lines from
noise X_0 to images X_1 (Eq. 1):

    min_v  int_0^1 E || (X_1 - X_0) - v(X_t, t) ||^2 dt,      X_t = t X_1 + (1 - t) X_0.

Lines between independent X_0 and X_1 cross; where they do, v learns the average direction, so
the flow's paths bend and need many Euler steps. Reflow draws pairs (Z_0, Z_1) from the trained
flow and fits a new flow to those fixed pairs: its paths are straighter, and a straight path is
followed exactly by a single Euler step.

    Algorithm 1 (Rectified flow)
    Input: draws from a coupling (X_0, X_1) of pi_0 and pi_1; a velocity model v_theta.
    1: Training: theta = argmin E || X_1 - X_0 - v_theta(t X_1 + (1 - t) X_0, t) ||^2, t ~ U[0, 1]
    2: Sampling: draw (Z_0, Z_1) following dZ_t = v_theta(Z_t, t) dt from Z_0 ~ pi_0
    3: Reflow (optional): Z^{k+1} = RectFlow((Z_0^k, Z_1^k)), from (Z_0^0, Z_1^0) = (X_0, X_1)
    4: Distill (optional): fit a one-step map T with Z_1^k ~= T(Z_0^k)

Here T(z) = z + v(z, 0), one Euler step of a flow trained at t = 0 only. The paper measures how
straight a flow is by S(Z) = int_0^1 E || (Z_1 - Z_0) - dZ_t/dt ||^2 dt, 0 exactly when every path
is a line travelled at constant speed; every stage prints it.

Time runs as in the paper: t = 0 is noise, t = 1 is data, and v points towards the data. Stable
Diffusion 3, Flux and diffusers flip it: their s = 1 - t, x_s = (1 - s) x_data + s noise, and their
network predicts noise - data = -v. The U-Net is given 1000 t, the range its time embedding expects.

Run (each stage resumes with the same command plus --resume; Ctrl-C or SIGTERM saves and exits
130 or 143):
    python rectified_flow.py --epochs 10                                          # 1-RF
    python rectified_flow.py --reflow --ckpt runs/rectified_flow/ckpt_1rf.pt --epochs 10  # 2-RF
    python rectified_flow.py --distill --ckpt runs/rectified_flow/ckpt_2rf.pt --epochs 10  # 1 step
    python rectified_flow.py --all --epochs 10                        # the three stages in a row
    torchrun --standalone --nproc_per_node 8 rectified_flow.py --all --dataset cifar10 --epochs 200
    python rectified_flow.py --sample --ckpt runs/rectified_flow/ckpt_2rf.pt --solver euler \
                             --sampling-steps 2 --n 64 --save samples.png
    CPU recipe (2 cores, Fashion-MNIST; 15 minutes for the 1-RF, 17 for each later stage, of
    which 10 draw the pairs; see docs/rectified_flow.md):
    python rectified_flow.py --width 32 --mults 1,2,3 --res-blocks 1 --batch-size 64 --lr 2e-3 \
                             --warmup 100 --lr-decay cosine --steps 800
    then --reflow and --distill with --pairs 5000 --solver heun --sampling-steps 8 --lr 1e-3 \
                             --warmup 20 --lr-decay cosine --batch-size 64 --steps 400

Outputs in --out (runs/rectified_flow) for each stage S (1rf, 2rf, 2rf_distilled, ...): ckpt_S.pt,
S_steps_epochNNN.png (one row per Euler step count N = 1, 2, 4, 8, 100 from the same noise),
S_trajectory.png (Z_t along a 100-step path; under it Z_t + (1 - t) v(Z_t, t), the straight-line
guess of Z_1), and pairs_kRF.pt, the reflow pairs drawn from the k-RF.

Differences from the paper:
- The network is the DDPM U-Net of common.py, not DDPM++; the loss is a mean over pixels.
- Fewer reflow pairs (--pairs, 50,000 by default; the paper drew 4M on CIFAR-10), and the one-step
  model is distilled with the squared error rather than LPIPS.
- RK45's default tolerances (1e-3) are looser than the 1e-5 common for reference numbers.
- Classifier-free guidance (--class-cond, --cfg-scale) and logit-normal t are later additions
  (Ho & Salimans 2022; Esser et al. 2024). The EMA decay warms up as in ddpm.py.
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
from functools import partial
from pathlib import Path
from signal import SIGINT, SIGTERM

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset, TensorDataset

from common import UNet, UserError, load_dataset, pick_device, save_grid, seed_everything

# ==== the paper ====================================================================================
# The math that needs no network: the interpolation, t, the ODE solvers and the straightness

def interpolate(x0, x1, t):
    """Eq. 1: X_t = t X_1 + (1 - t) X_0 for a (B,) batch of t."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return t * x1 + (1 - t) * x0


def sample_t(draw, how="uniform"):
    """t for each example of the batch; draw: the random draws (a harness Draws)."""
    if how == "logit-normal":
        # Esser et al. 2024, Sec. 3.1: t = sigmoid(u), u ~ N(0, 1), which favours the middle of paths
        return torch.sigmoid(draw.randn())
    return draw.rand()  # Algorithm 1, line 1: t ~ U[0, 1]


def times(z, t):
    return torch.full((len(z),), float(t), device=z.device)


@torch.no_grad()
def euler(v, z, steps, velocities=None):
    """Algorithm 1, line 2 with N Euler steps; returns Z_1. `velocities` (a list) collects each
    step's v, from which straightness() computes S."""
    for i in range(steps):
        vt = v(z, times(z, i / steps))
        if velocities is not None:
            velocities.append(vt)
        z = z + vt / steps  # Z_{t + 1/N} = Z_t + v(Z_t, t) / N
    return z


@torch.no_grad()
def heun(v, z, steps):
    """Heun's method: an Euler guess, then a step with the mean of the slopes at both ends."""
    h = 1 / steps
    for i in range(steps):
        d = v(z, times(z, i * h))
        z = z + h / 2 * (d + v(z + h * d, times(z, (i + 1) * h)))
    return z


# Dormand & Prince 1980, RK5(4)7M: nodes c, stages a, 5th-order weights b (= the last stage row:
# the step's end point is stage 7, whose slope starts the next step) and embedded 4th-order b_hat.
DP_C = (0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1)
DP_A = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
DP_B = DP_A[6] + (0,)
DP_B_HAT = (5179 / 57600, 0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


@torch.no_grad()
def rk45(v, z, rtol=1e-3, atol=1e-3):
    """Adaptive Dormand-Prince from t = 0 to 1, one step size for the whole batch, the error measured
    in the RMS norm scaled by atol + rtol |z| (Hairer, Norsett & Wanner, II.4). Returns (Z_1, NFE)."""
    def rms(x, scale):
        return (x / scale).square().mean().sqrt().item()
    k1, nfe, t = v(z, times(z, 0)), 1, 0.0
    d0, d1 = rms(z, atol + rtol * z.abs()), rms(k1, atol + rtol * z.abs())
    h = min(1.0, 0.01 * d0 / d1) if min(d0, d1) > 1e-5 else 1e-3  # Hairer's first guess, simplified
    while t < 1 - 1e-9:
        h = min(h, 1 - t)
        ks = [k1]
        for a, c in zip(DP_A[1:], DP_C[1:]):
            ks.append(v(z + h * sum(ai * k for ai, k in zip(a, ks)), times(z, t + c * h)))
        nfe += 6
        z_new = z + h * sum(b * k for b, k in zip(DP_B, ks))
        err = rms(h * sum((b - bh) * k for b, bh, k in zip(DP_B, DP_B_HAT, ks)),
                  atol + rtol * torch.maximum(z.abs(), z_new.abs()))
        if not math.isfinite(err) or h < 1e-10:
            raise UserError(f"RK45 stalled at t = {t:.4f} (error {err}): the velocity is not finite "
                            f"or not smooth: the model is broken or far from trained")
        if err <= 1:  # accept; FSAL: the slope at the new point is the last stage's
            t, z, k1 = t + h, z_new, ks[-1]
        # step-size control: h <- h * 0.9 err^(-1/5), changed by a factor between 0.2 and 10
        h *= min(10.0, max(0.2, 0.9 * err ** -0.2)) if err > 0 else 10.0
    return z, nfe


def solve(v, z, solver="rk45", steps=100, rtol=1e-3, atol=1e-3, velocities=None):
    """Z_1 from Z_0 = z with the chosen solver; returns (Z_1, number of evaluations of v)."""
    if solver == "rk45":
        return rk45(v, z, rtol, atol)
    if solver == "heun":
        return heun(v, z, steps), 2 * steps
    return euler(v, z, steps, velocities), steps


def straightness(z0, z1, velocities):
    """S(Z) = int_0^1 E || (Z_1 - Z_0) - dZ_t/dt ||^2 dt on an Euler path, dZ_t/dt being each step's v,
    the integral the mean over steps and || . ||^2 a mean over pixels. 0 iff the paths are straight
    lines travelled at constant speed (a straight path whose speed varies has S > 0)."""
    return torch.stack([((z1 - z0) - vt).square().flatten(1).mean(1)
                        for vt in velocities]).mean().item()


# The network: the U-Net of common.py as a velocity field, with classifier-free guidance

TIME_SCALE = 1000  # the U-Net's sinusoidal embedding sees 1000 t, not t in [0, 1]
ARCH = ("width", "mults", "res_blocks", "attn", "dropout")


def make_model(args, shape, num_classes):
    return UNet(shape[0], args.width, args.mults, args.res_blocks, args.attn, args.dropout,
                num_classes=num_classes, image_size=shape[-1])


def velocity(net, y=None, cfg_scale=1.0):
    """v(z, t) for t in [0, 1]. With classes, classifier-free guidance (Ho & Salimans 2022):
    v = v(z, t, null) + w (v(z, t, y) - v(z, t, null)); w = 1 is the plain class-conditional flow,
    w = 0 the unconditional one. (Ho & Salimans write the same rule with 1 + w where w is here.)"""
    def v(z, t):
        t = TIME_SCALE * t
        if y is None or cfg_scale == 1:
            return net(z, t, y)
        null = torch.full_like(y, net.num_classes)
        v_y, v_null = net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        return v_null + cfg_scale * (v_y - v_null)
    return v


def drop_labels(y, num_classes, p_uncond, draw):
    """Guidance's training: the null label K = num_classes in place of y for a fraction p_uncond."""
    return torch.where(draw.rand() < p_uncond, num_classes, y)


# The objective (Algorithm 1, line 1) and each stage's training step. labels(draw), where given,
# are the batch's labels for guidance, a fraction of them dropped (drop_labels); draw: the random
# draws (torch's own, or one process's share of a global batch's: a harness Draws).

def rf_loss(v, x0, x1, t):
    """Eq. 1 for a batch: || (X_1 - X_0) - v(X_t, t) ||^2, X_t = t X_1 + (1 - t) X_0, mean over pixels."""
    return ((x1 - x0) - v(interpolate(x0, x1, t), t)).square().flatten(1).mean(1).mean()


def rectified_flow_step(net, x1, draw, labels=None, t_sampling="uniform"):
    """The 1-RF: Algorithm 1, line 1 on the independent coupling of noise and images X_1 ~ pi_1."""
    # Algorithm 1, input: X_0 ~ pi_0 = N(0, I), drawn afresh for each image X_1
    x0 = draw.randn(*x1.shape[1:])
    y = labels(draw) if labels else None
    # Algorithm 1, line 1: t ~ U[0, 1]
    t = sample_t(draw, t_sampling)
    # Algorithm 1, line 1: || X_1 - X_0 - v_theta(t X_1 + (1 - t) X_0, t) ||^2
    return rf_loss(velocity(net, y), x0, x1, t)


def reflow_step(net, z0, z1, draw, labels=None, t_sampling="uniform"):
    """The (k+1)-RF: Algorithm 1, line 3, that is line 1 on the coupling (Z_0^k, Z_1^k) the k-RF drew:
    fixed pairs, never redrawn."""
    y = labels(draw) if labels else None
    # Algorithm 1, line 1: t ~ U[0, 1]
    t = sample_t(draw, t_sampling)
    # Algorithm 1, line 1: || Z_1^k - Z_0^k - v_theta(t Z_1^k + (1 - t) Z_0^k, t) ||^2
    return rf_loss(velocity(net, y), z0, z1, t)


def distillation_step(net, z0, z1, draw, labels=None):
    """One step: Algorithm 1, line 4, T(Z_0^k) = Z_0^k + v_theta(Z_0^k, 0) ~= Z_1^k."""
    y = labels(draw) if labels else None
    # Algorithm 1, line 4: || Z_1^k - Z_0^k - v_theta(Z_0^k, 0) ||^2, Eq. 1 at t = 0 only
    return rf_loss(velocity(net, y), z0, z1, torch.zeros(len(z0), device=z0.device))


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

KEYS = ("num_classes", "k", "distilled", "model", "ema", "optimizer")  # besides the harness's and "shape"
FREE = ("device", "out", "resume", "ckpt", "data_dir", "log_every", "save_every", "compile", "bf16", "all")
EULER_STEPS = (1, 2, 4, 8, 100)  # the rows of every stage's grid
PAIR_CHUNK = 500  # reflow pairs drawn per solver call; each chunk has its own seed
PAIR_SEED = 2 ** 40  # pair noise seeds start here, far from the seeds grids and --sample use


def read_checkpoint(path):
    return load_checkpoint(path, ["rectified_flow"], ("shape", *KEYS))


def load_ema(ckpt, device):
    net = make_model(argparse.Namespace(**ckpt["args"]), ckpt["shape"], ckpt["num_classes"])
    net.load_state_dict(ckpt["ema"])
    return net.to(device, memory_format=torch.channels_last).eval()


@torch.no_grad()
def pictures(net, args, shape, device, name, epoch, progress, n=10):
    """One row per Euler step count N in EULER_STEPS from the same Z_0, the 100-step path of three
    samples, and S on that path."""
    net.eval()
    z0 = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    y = torch.arange(n, device=device) % net.num_classes if net.num_classes else None
    v, out, rows, vs = velocity(net, y, args.cfg_scale), Path(args.out), [], []
    for i, steps in enumerate(EULER_STEPS):
        rows.append(euler(v, z0, steps, vs if steps == EULER_STEPS[-1] else None))
        progress(i + 1, len(EULER_STEPS))
    grid = out / f"{name}_steps_epoch{epoch + 1:03d}.png"
    save_grid(torch.cat(rows), grid, nrow=n)
    N, keep = len(vs), torch.linspace(0, len(vs), 11).round().long().tolist()
    vs3 = torch.stack([vt[:3] for vt in vs])  # (N, 3, C, H, W)
    z_t = z0[:3] + torch.cat([torch.zeros_like(vs3[:1]), vs3.cumsum(0)]) / N  # (N + 1, 3, C, H, W)
    guess = [z_t[i] + (1 - i / N) * vs3[min(i, N - 1)] for i in keep]  # Z_t + (1 - t) v(Z_t, t)
    strip = torch.stack([torch.stack([z_t[i] for i in keep]), torch.stack(guess)], 1)  # (11, 2, 3, ...)
    save_grid(strip.permute(2, 1, 0, 3, 4, 5).reshape(-1, *shape), out / f"{name}_trajectory.png",
              nrow=len(keep))
    print(f"{name}: grid {grid}, straightness S = {straightness(z0, rows[-1], vs):.4f} "
          f"(100 Euler steps, {n} samples)")


def stopped(stop, world, device):
    """Whether Ctrl-C or SIGTERM reached any process: all then stop after the same chunk of pairs,
    and one stopped by another exits as after SIGTERM."""
    if world > 1:
        flag = torch.tensor(float(len(stop)), device=device)
        dist.all_reduce(flag)
        if flag.item() and not stop:
            stop.append(SIGTERM)
    return bool(stop)


def read_pairs(path, source, shape, n):
    """The pairs stored at `path` if they were drawn from `source`, else none yet; short of n, whole
    chunks only (a short last chunk is drawn again, in full this time)."""
    try:
        pairs = torch.load(path, weights_only=True) if path.exists() else None
    except Exception as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}): it is damaged or incomplete; delete it "
                        f"and the pairs are drawn again") from None
    if pairs is not None and pairs["source"] == source:
        if not torch.isfinite(pairs["z1"]).all():
            raise UserError(f"the pairs in {path} hold NaN or inf (the flow they were drawn from is broken)")
        kept = len(pairs["z0"]) if len(pairs["z0"]) >= n else len(pairs["z0"]) // PAIR_CHUNK * PAIR_CHUNK
        return {**pairs, **{k: pairs[k][:kept] for k in ("z0", "z1", "y")}}
    if pairs is not None:
        print(f"{path} holds pairs of another teacher or solver: drawing new ones")
    return {"source": source, "z0": torch.zeros(0, *shape), "z1": torch.zeros(0, *shape),
            "y": torch.zeros(0, dtype=torch.long)}


def write_pairs(pairs, path):
    torch.save(pairs, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)  # a crash mid-write leaves the last complete file


@torch.no_grad()
def reflow_pairs(args, teacher, shape, num_classes, device, stop, rank, world):
    """Algorithm 1, line 3: Z_0 ~ N(0, I), Z_1 = Flow_k(Z_0), drawn once with --solver and stored in
    args.pairs_file; training only reads them. Chunk i's noise has its own seed, so an interrupted
    run continues where it stopped; under torchrun rank r draws chunk i + r of each round of N and
    rank 0 joins and stores them. Returns TensorDataset(Z_0, Z_1, y)."""
    path = Path(args.pairs_file)
    source = {"teacher": args.teacher, "teacher_step": teacher["step"], "seed": PAIR_SEED + args.seed,
              # tells a retrained teacher with the same path and step from the one the pairs came from
              "teacher_sum": sum(w.double().sum().item() for w in teacher["ema"].values()),
              "solver": [args.solver, args.sampling_steps, args.rtol, args.atol, args.cfg_scale]}
    pairs = read_pairs(path, source, shape, args.pairs)
    net = load_ema(teacher, device) if len(pairs["z0"]) < args.pairs else None
    if net is not None and not all(torch.isfinite(w).all() for w in net.parameters()):
        raise UserError(f"{args.teacher} holds non-finite weights (its run diverged): retrain it with a lower --lr")
    start = last = time.time()
    done0 = len(pairs["z0"])
    while len(pairs["z0"]) < args.pairs and not stopped(stop, world, device):
        done = len(pairs["z0"]) + rank * PAIR_CHUNK  # this rank's chunk of the round
        g = torch.Generator().manual_seed(PAIR_SEED + args.seed * 1000003 + done // PAIR_CHUNK)
        z0 = torch.randn(max(0, min(PAIR_CHUNK, args.pairs - done)), *shape, generator=g)
        y = torch.randint(num_classes, (len(z0),), generator=g) if num_classes else torch.full((len(z0),), -1)
        v = velocity(net, y.to(device) if num_classes else None, args.cfg_scale)
        z1, nfe = solve(v, z0.to(device), args.solver, args.sampling_steps, args.rtol, args.atol) \
            if len(z0) else (z0, 0)
        chunks = [(z0, z1.float().cpu(), y)]
        if world > 1:
            chunks = [None] * world
            dist.all_gather_object(chunks, (z0, z1.float().cpu(), y))
        if not all(torch.isfinite(chunk[1]).all() for chunk in chunks):  # the same verdict on every rank
            raise UserError(f"the reflow pairs drawn from {args.teacher} are NaN or inf: that "
                            f"{teacher['k']}-RF checkpoint is broken; retrain it")
        for chunk in chunks:  # in rank order: the chunks in the order one process draws them
            for key, val in zip(("z0", "z1", "y"), chunk):
                pairs[key] = torch.cat([pairs[key], val])
        left = (args.pairs - len(pairs["z0"])) / (len(pairs["z0"]) - done0) * (time.time() - start)
        print(f"pairs {len(pairs['z0'])}/{args.pairs}  {args.solver} NFE {nfe}  {left / 60:.1f} min left", flush=True)
        if time.time() - last > 60 and rank == 0:
            write_pairs(pairs, path)
            last = time.time()
    if rank == 0 and len(pairs["z0"]) > done0:
        write_pairs(pairs, path)
    if stopped(stop, world, device):
        print(f"interrupted while drawing pairs; {path} keeps them for the same command (with or without --resume)")
        raise SystemExit(128 + stop[0])  # as an interrupted training
    return TensorDataset(*(pairs[k][:args.pairs] for k in ("z0", "z1", "y")))


def stage_step(args, num_classes):
    """The stage's training step on a batch of images (X_1, y) or pairs (Z_0, Z_1, y)."""
    def step(net, batch, draw):
        labels = partial(drop_labels, batch[-1], num_classes, args.p_uncond) if args.class_cond else None
        if args.distilled:
            return distillation_step(net, batch[0], batch[1], draw, labels)
        if args.stage_k > 1:
            return reflow_step(net, batch[0], batch[1], draw, labels, args.t_sampling)
        return rectified_flow_step(net, batch[0], draw, labels, args.t_sampling)
    return step


def stage_args(args):
    """The stage's flags (a resumed stage's from its checkpoint), the checkpoint it resumes (or None)
    and its teacher, the k-RF --ckpt of --reflow and --distill (None for a 1-RF)."""
    teacher = None
    if args.reflow or args.distill:
        if not args.ckpt:
            raise UserError(f"--{'reflow' if args.reflow else 'distill'} needs --ckpt PATH, the k-RF checkpoint "
                            f"to start from (e.g. {Path(args.out) / 'ckpt_1rf.pt'})")
        teacher = read_checkpoint(args.ckpt)
        if teacher["distilled"]:
            raise UserError(f"{args.ckpt} is a distilled one-step model: reflow or distill a k-RF")
    k, out = teacher["k"] + args.reflow if teacher else 1, Path(args.out)
    path = Path(args.ckpt) if args.resume and args.ckpt and teacher is None else \
        out / f"ckpt_{k}rf{'_distilled' if args.distill else ''}.pt"
    ckpt = None
    # a reflow or distillation stopped while drawing pairs has no checkpoint yet: it starts afresh,
    # and its stored pairs are kept
    if args.resume and (path.exists() or not (args.all or teacher)):
        ckpt = read_checkpoint(path)
        args = resumed_args(parser(), args, ckpt, FREE)
    else:
        args.stage_k, args.distilled = k, args.distill
    if teacher:
        args.teacher = str(Path(args.ckpt).resolve())
    elif args.stage_k > 1 or args.distilled:  # resumed from --ckpt without --reflow or --distill
        teacher = read_checkpoint(args.teacher)
    if teacher:
        args.pairs_file = str((out / f"pairs_{teacher['k']}rf.pt").resolve())
    args.epochs = args.epochs or (None if args.steps else 10)  # a stage not begun, resumed
    args.dataset = args.dataset or "fashion-mnist"
    if args.cfg_scale != 1 and not (teacher["num_classes"] if teacher else args.class_cond):
        raise UserError("--cfg-scale needs a class-conditional flow: train the 1-RF with --class-cond")
    return args, ckpt, teacher


def fill_model_defaults(args, size):
    """As ddpm.py: 28x28 gets a 6.5M U-Net; 32x32 the DDPM CIFAR-10 one."""
    big = size >= 32
    args.width = args.width or (128 if big else 64)
    args.mults = args.mults or ((1, 2, 2, 2) if big else (1, 2, 2))
    args.attn = args.attn or ((16,) if big else (size // 4,))
    args.dropout = args.dropout if args.dropout is not None else (0.1 if args.dataset == "cifar10" else 0.0)


def stage_data(run, teacher):
    """The 1-RF's images (X_1, y), or the k-RF teacher's pairs (Z_0, Z_1, y); their shape and classes."""
    args = run.args
    if args.stage_k == 1 and not args.distilled:
        dataset, info = load_dataset(args.dataset, args.data_dir, True, args.image_size,
                                     flip=args.dataset == "cifar10")
        if args.class_cond and not info.num_classes:
            raise UserError(f"--class-cond needs labels; {info.name} has none (put its images in one "
                            f"subfolder per class)")
        fill_model_defaults(args, info.size)
        return dataset, (info.channels, info.size, info.size), info.num_classes if args.class_cond else None
    for key in ARCH + ("dataset", "image_size", "class_cond", "p_uncond"):  # the teacher's
        setattr(args, key, teacher["args"][key])
    args.solver, args.sampling_steps = args.solver or "rk45", args.sampling_steps or 100
    shape, num_classes = tuple(teacher["shape"]), teacher["num_classes"]
    with signals_to(run.stop):
        pairs = reflow_pairs(args, teacher, shape, num_classes, run.device, run.stop, run.rank, run.world)
    return pairs, shape, num_classes


def train_stage(args):
    """One stage: 1-RF on the data; with --reflow a (k+1)-RF, with --distill a one-step model, both
    on pairs from the k-RF --ckpt. Returns the checkpoint's path; interrupted, exits 130 or 143."""
    args, ckpt, teacher = stage_args(args)
    rank, world, device = setup_processes(args.device)
    seed_everything(args.seed)  # the same on every process: see Draws
    name = f"{args.stage_k}rf" + ("_distilled" if args.distilled else "")
    run = Run(args=args, method="rectified_flow", rank=rank, world=world, device=device, stop=[], ckpt=ckpt,
              path=out_folder(args.out) / f"ckpt_{name}.pt")
    run.dataset, run.shape, num_classes = stage_data(run, teacher)
    run.model = make_model(args, run.shape, num_classes).to(device, memory_format=torch.channels_last)
    if teacher is not None:  # reflow and distillation start from the k-RF
        run.model.load_state_dict(teacher["ema"])
    print(f"stage {name}: {sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(run.dataset)} training {'pairs' if teacher else 'images'}")
    run.ema = copy.deepcopy(run.model).requires_grad_(False)
    run.opt = torch.optim.Adam(run.model.parameters(), lr=args.lr)
    run.extra = lambda: {"num_classes": num_classes, "k": args.stage_k, "distilled": args.distilled}
    loss = stage_step(args, num_classes)
    run.loss = lambda batch, draws: loss(run.net, batch, draws)
    run.pictures = lambda epoch, progress: pictures(run.ema, args, run.shape, device, name, epoch, progress)
    start = time.time()

    def after_step(step):  # on a CPU, after the stage's first step: over half an hour says so at once
        run.after_step = None
        left = (time.time() - start) * (run.total - step)
        if device.type == "cpu" and left > 1800:
            print(f"note: this stage needs about {left / 3600:.1f} h on this CPU; docs/rectified_flow.md's "
                  f"CPU recipe shows real results in about 15 minutes a stage")
    run.after_step = after_step
    train(run)
    return run.path


def train_all(args):
    """1-RF, then reflow to a 2-RF, then distil the 2-RF, with the same flags for each stage."""
    path = train_stage(argparse.Namespace(**{**vars(args), "reflow": False, "distill": False}))
    for stage in ("reflow", "distill"):
        path = train_stage(argparse.Namespace(**{**vars(args), stage: True, "ckpt": str(path)}))


def reporting(v, what, every):
    """v, saying every few seconds how far along t = 0 -> 1 the solver is (sampling can be slow)."""
    start = last = time.time()

    def wrapped(z, t):
        nonlocal last
        now = time.time()
        if now - last >= every:
            s = t.flatten()[0].item()
            if s > 0:
                print(f"{what}: t = {s:.2f}, {(now - start) / s * (1 - s) / 60:.1f} min left", flush=True)
            last = now
        return v(z, t)
    return wrapped


def sample(args):
    def load(ckpt, device):
        if args.cfg_scale != 1 and not ckpt["num_classes"]:
            raise UserError(f"--cfg-scale needs a class-conditional model; {args.ckpt} was trained without "
                            f"--class-cond")
        net, shape, K = load_ema(ckpt, device), tuple(ckpt["shape"]), ckpt["num_classes"]
        # a distilled model is a one-step map: one Euler step unless told otherwise
        solver = args.solver or ("euler" if ckpt["distilled"] else "rk45")
        steps = args.sampling_steps or (1 if ckpt["distilled"] else 100)
        start, s, nfe = time.time(), 0.0, 0

        def draw(first, n, progress):
            nonlocal s, nfe
            if first:
                left = (time.time() - start) / first * (args.n - first)
                print(f"sampling: {first}/{args.n} images, {left / 60:.1f} min left", flush=True)
            z0 = torch.randn(n, *shape, generator=torch.Generator().manual_seed(args.seed + first)).to(device)
            y = torch.arange(first, first + n, device=device) % K if K else None
            vs = [] if solver == "euler" else None
            v = reporting(velocity(net, y, args.cfg_scale), progress.what, args.log_every)
            z1, n_eval = solve(v, z0, solver, steps, args.rtol, args.atol, vs)
            nfe, s = max(nfe, n_eval), s + (straightness(z0, z1, vs) * n if vs else 0.0)
            if first + n == args.n:  # (one Euler step is a straight line whatever the model: S = 0 says nothing)
                how = f"N = {steps}, NFE {nfe}" if solver != "rk45" else f"NFE {nfe}"
                straight = f"; straightness S = {s / args.n:.4f} on these paths" if vs and steps > 1 else ""
                print(f"solved with {solver} ({how}){straight}")
            return z1.clamp(-1, 1)
        return net, draw

    sample_command(args, ["rectified_flow"], KEYS, load)


def positive_float(s):
    if not float(s) > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return float(s)


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    shared_flags(p, "runs/rectified_flow", lr=2e-4, warmup=5000)
    stage = p.add_mutually_exclusive_group()
    stage.add_argument("--reflow", action="store_true", help="train a (k+1)-RF on pairs from the k-RF --ckpt")
    stage.add_argument("--distill", action="store_true", help="distil the k-RF --ckpt into one step")
    stage.add_argument("--all", action="store_true", help="1-RF, reflow, distillation in a row")
    p.add_argument("--pairs", type=positive_int, default=50000, help="reflow pairs to draw")
    p.add_argument("--solver", choices=["euler", "heun", "rk45"],
                   help="for pairs and --sample (default rk45; euler 1 step for a distilled model)")
    p.add_argument("--sampling-steps", type=positive_int, help="Euler/Heun steps N (default 100)")
    p.add_argument("--rtol", type=positive_float, default=1e-3, help="RK45")
    p.add_argument("--atol", type=positive_float, default=1e-3, help="RK45")
    p.add_argument("--t-sampling", choices=["uniform", "logit-normal"], default="uniform")
    p.add_argument("--class-cond", action="store_true", help="train with labels, for --cfg-scale")
    p.add_argument("--p-uncond", type=float, default=0.1, help="label dropout for guidance")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="guidance w (1: none)")
    p.add_argument("--width", type=positive_int, help="U-Net base channels")
    p.add_argument("--mults", type=int_list, help="channel multipliers per level, e.g. 1,2,2")
    p.add_argument("--res-blocks", type=positive_int, default=2)
    p.add_argument("--attn", type=int_list, help="resolutions with self-attention, e.g. 7")
    p.add_argument("--dropout", type=float)
    return p


def parse_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    check_shared_flags(p, args)
    if not 0 <= args.p_uncond < 1:
        p.error(f"--p-uncond must be in [0, 1), got {args.p_uncond}")
    if args.cfg_scale < 0:
        p.error(f"--cfg-scale must be >= 0, got {args.cfg_scale}")
    if args.sample and (args.reflow or args.distill or args.all):
        p.error("--sample only samples: leave out --reflow, --distill and --all")
    return args


def main(argv=None):
    args = parse_args(argv)
    run_command(sample if args.sample else train_all if args.all else train_stage, args)


if __name__ == "__main__":
    main()
