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

Run (each stage resumes with the same command plus --resume):
    python rectified_flow.py --epochs 10                                          # 1-RF
    python rectified_flow.py --reflow --ckpt runs/rectified_flow/ckpt_1rf.pt --epochs 10  # 2-RF
    python rectified_flow.py --distill --ckpt runs/rectified_flow/ckpt_2rf.pt --epochs 10  # 1 step
    python rectified_flow.py --all --epochs 10                        # the three stages in a row
    torchrun --standalone --nproc_per_node 8 rectified_flow.py --all --dataset cifar10 --epochs 200
    python rectified_flow.py --sample --ckpt runs/rectified_flow/ckpt_2rf.pt --solver euler \
                             --sampling-steps 2 --n 64 --save samples.png
    CPU recipe (2 cores, Fashion-MNIST; 15 minutes for the 1-RF, 17 for each later stage, of
    which 10 draw the pairs; see README.md):
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
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset, TensorDataset

from common import UNet, UserError, load_dataset, pick_device, save_grid, seed_everything

TIME_SCALE = 1000              # the U-Net's sinusoidal embedding sees 1000 t, not t in [0, 1]
EULER_STEPS = (1, 2, 4, 8, 100)  # the rows of every stage's grid
PAIR_CHUNK = 500               # reflow pairs drawn per solver call; each chunk has its own seed
PAIR_SEED = 2 ** 40            # pair noise seeds start here, far from the seeds grids and --sample use

# ----------------------------------------------------------------------------------------------
# The math that needs no network: the interpolation, t, ODE solvers and the straightness
# ----------------------------------------------------------------------------------------------


def interpolate(x0, x1, t):
    """Eq. 1: X_t = t X_1 + (1 - t) X_0 for a (B,) batch of t."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return t * x1 + (1 - t) * x0


def sample_t(n, how="uniform", device="cpu"):
    if how == "logit-normal":
        # Esser et al. 2024, Sec. 3.1: t = sigmoid(u), u ~ N(0, 1), which favours the middle of paths
        return torch.sigmoid(torch.randn(n, device=device))
    return torch.rand(n, device=device)  # Algorithm 1, line 1: t ~ U[0, 1]


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


def reporting(v, what, every=5.0):
    """v, saying every few seconds how far along t = 0 -> 1 the solver is (sampling can be slow)."""
    start = last = time.time()

    def wrapped(z, t):
        nonlocal last
        now = time.time()
        if now - last >= every:
            s = t.flatten()[0].item()
            if s > 0:
                print(f"{what}: t = {s:.2f}, {(now - start) / s * (1 - s):.0f} s left", flush=True)
            last = now
        return v(z, t)
    return wrapped


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


# ----------------------------------------------------------------------------------------------
# The network: the U-Net of common.py as a velocity field, with classifier-free guidance
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# The training objective (Algorithm 1, line 1) for each stage
# ----------------------------------------------------------------------------------------------

def rf_loss(v, x0, x1, t):
    """Eq. 1 for a batch: || (X_1 - X_0) - v(X_t, t) ||^2, X_t = t X_1 + (1 - t) X_0, mean over pixels."""
    return ((x1 - x0) - v(interpolate(x0, x1, t), t)).square().flatten(1).mean(1).mean()


def batch_loss(model, batch, args, device, rank=0, world=1):
    """Eq. 1 on this rank's slice of the global batch. Every rank draws X_0, the label dropout and t
    for the whole batch and keeps its slice, so that N processes compute what one process would."""
    b = len(batch[0])
    mine, B = slice(rank * b, (rank + 1) * b), world * b
    if args.stage_k == 1 and not args.distilled:
        x1, y = batch
        # Algorithm 1, input: the independent coupling, X_0 ~ N(0, I) drawn afresh for each X_1
        x0 = torch.randn(B, *x1.shape[1:])[mine]
    else:
        # Reflow and distillation: the stored pairs (Z_0^k, Z_1^k), never redrawn
        x0, x1, y = batch
    x0, x1, y = x0.to(device), x1.to(device), y.to(device)
    if args.class_cond:
        # classifier-free guidance: the null label y = K for a fraction p_uncond of the batch
        null = getattr(model, "module", model).num_classes  # the label K (DistributedDataParallel: .module)
        y = torch.where(torch.rand(B, device=device)[mine] < args.p_uncond, null, y)
    v = velocity(model, y if args.class_cond else None)
    if args.distilled:
        # Algorithm 1, line 4: T(Z_0) = Z_0 + v(Z_0, 0) ~= Z_1, i.e. Eq. 1 at t = 0 only
        return rf_loss(v, x0, x1, torch.zeros(len(x0), device=device))
    return rf_loss(v, x0, x1, sample_t(B, args.t_sampling, device)[mine])


# ----------------------------------------------------------------------------------------------
# Sampling pictures: the step-count grid, the trajectory strip, the straightness
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def pictures(net, args, shape, device, name, tag, n=10):
    """One row per Euler step count N in EULER_STEPS from the same Z_0, the 100-step path of three
    samples, and S on that path. Returns S."""
    net.eval()
    z0 = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    y = torch.arange(n, device=device) % net.num_classes if net.num_classes else None
    v, out = velocity(net, y, args.cfg_scale), Path(args.out)
    rows = [euler(v, z0, steps) for steps in EULER_STEPS[:-1]]
    vs = []
    rows.append(euler(v, z0, EULER_STEPS[-1], vs))
    save_grid(torch.cat(rows), out / f"{name}_steps_{tag}.png", nrow=n)
    N, keep = len(vs), torch.linspace(0, len(vs), 11).round().long().tolist()
    vs3 = torch.stack([vt[:3] for vt in vs])                             # (N, 3, C, H, W)
    z_t = z0[:3] + torch.cat([torch.zeros_like(vs3[:1]), vs3.cumsum(0)]) / N  # (N + 1, 3, C, H, W)
    guess = [z_t[i] + (1 - i / N) * vs3[min(i, N - 1)] for i in keep]  # Z_t + (1 - t) v(Z_t, t)
    strip = torch.stack([torch.stack([z_t[i] for i in keep]), torch.stack(guess)], 1)  # (11, 2, 3, ...)
    save_grid(strip.permute(2, 1, 0, 3, 4, 5).reshape(-1, *shape), out / f"{name}_trajectory.png",
              nrow=len(keep))
    s = straightness(z0, rows[-1], vs)
    print(f"{name}: grid {out / f'{name}_steps_{tag}.png'}, straightness S = {s:.4f} "
          f"(100 Euler steps, {n} samples)")
    return s


# ----------------------------------------------------------------------------------------------
# Training loop: stages, EMA, learning-rate schedule, logging, checkpoints
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def ema_update(ema, model, n, max_decay):
    """EMA of the weights with a warm-up of the decay, min(max_decay, (1 + n) / (10 + n))."""
    decay = min(max_decay, (1 + n) / (10 + n))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def learning_rate(args, step, total, warmup):
    """Linear warm-up over `warmup` steps, then constant or cosine decay to 0."""
    lr = args.lr * min(1.0, (step + 1) / warmup)
    if args.lr_decay == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * step / total))
    return lr


def atomic_save(obj, path):
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a broken file


def save_checkpoint(path, model, ema, opt, step, args, shape, num_classes):
    atomic_save({"method": "rectified_flow", "k": args.stage_k, "distilled": args.distilled,
                 "args": vars(args), "shape": list(shape), "num_classes": num_classes,
                 "step": step, "model": model.state_dict(), "ema": ema.state_dict(),
                 "optimizer": opt.state_dict(),
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                         "mps": torch.mps.get_rng_state() if torch.backends.mps.is_available() else None}},
                path)


def restore_device_rng(rng):
    """The CUDA generators of the devices this machine has (a checkpoint from a machine with more
    GPUs restores the first ones), and MPS's."""
    for i, state in enumerate(rng["cuda"][:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(state, i)
    if rng.get("mps") is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(rng["mps"])


def load_checkpoint(path):
    if not Path(path).is_file():
        raise UserError(f"no checkpoint at {path}: train first (python rectified_flow.py) "
                        f"or pass --ckpt PATH")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}): it is damaged or "
                        f"incomplete (a copy cut short?), or not a checkpoint at all") from None
    if not isinstance(ckpt, dict) or ckpt.get("method") != "rectified_flow":
        method = ckpt.get("method", "unknown") if isinstance(ckpt, dict) else "unknown"
        raise UserError(f"{path} is a checkpoint of {method}, not of rectified_flow.py")
    missing = [k for k in ("args", "shape", "num_classes", "k", "distilled", "step", "model", "ema",
                           "optimizer", "rng") if k not in ckpt]
    if missing:
        raise UserError(f"{path} is an incomplete rectified_flow.py checkpoint: no {', '.join(missing)}")
    return ckpt


def load_ema(ckpt, device, path):
    net = make_model(argparse.Namespace(**ckpt["args"]), ckpt["shape"], ckpt["num_classes"])
    net.load_state_dict(ckpt["ema"])
    if not all(torch.isfinite(p).all() for p in net.parameters()):
        raise UserError(f"{path} holds non-finite weights (its run diverged): retrain it with a lower --lr")
    return net.to(device, memory_format=torch.channels_last).eval()


@torch.no_grad()
def reflow_pairs(args, teacher, shape, num_classes, device, stop, ranks):
    """Algorithm 1, line 3: Z_0 ~ N(0, I), Z_1 = Flow_k(Z_0), drawn once with --solver and stored in
    args.pairs_file; training only reads them. Chunk i's noise has its own seed, so an interrupted
    run continues where it stopped; under torchrun rank r draws chunk i + r of each round of N and
    rank 0 joins and stores them. Returns TensorDataset(Z_0, Z_1, y), or None if interrupted."""
    path = Path(args.pairs_file)
    source = {"teacher": args.teacher, "teacher_step": teacher["step"], "seed": PAIR_SEED + args.seed,
              # tells a retrained teacher with the same path and step from the one the pairs came from
              "teacher_sum": sum(w.double().sum().item() for w in teacher["ema"].values()),
              "solver": [args.solver, args.sampling_steps, args.rtol, args.atol, args.cfg_scale]}
    try:
        pairs = torch.load(path, weights_only=True) if path.exists() else None
    except Exception as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}): it is damaged or incomplete; delete it "
                        f"and the pairs are drawn again") from None
    if pairs is None or pairs["source"] != source:
        if pairs is not None:
            print(f"{path} holds pairs of another teacher or solver: drawing new ones")
        pairs = {"source": source, "z0": torch.zeros(0, *shape), "z1": torch.zeros(0, *shape),
                 "y": torch.zeros(0, dtype=torch.long)}
    n = len(pairs["z0"])
    if n < args.pairs and n % PAIR_CHUNK:  # a short last chunk is drawn again, in full this time
        pairs = {**pairs, **{k: pairs[k][:n - n % PAIR_CHUNK] for k in ("z0", "z1", "y")}}
    net = load_ema(teacher, device, args.teacher) if len(pairs["z0"]) < args.pairs else None
    start = last = time.time()
    done0 = len(pairs["z0"])
    while len(pairs["z0"]) < args.pairs and not stopped(stop, ranks, device):
        done = len(pairs["z0"]) + ranks.rank * PAIR_CHUNK  # this rank's chunk of the round
        g = torch.Generator().manual_seed(PAIR_SEED + args.seed * 1000003 + done // PAIR_CHUNK)
        z0 = torch.randn(max(0, min(PAIR_CHUNK, args.pairs - done)), *shape, generator=g)
        y = (torch.randint(num_classes, (len(z0),), generator=g) if num_classes
             else torch.full((len(z0),), -1))
        v = velocity(net, y.to(device) if num_classes else None, args.cfg_scale)
        z1, nfe = solve(v, z0.to(device), args.solver, args.sampling_steps, args.rtol, args.atol) \
            if len(z0) else (z0, 0)
        chunks = [(z0, z1.float().cpu(), y)]
        if ranks.world > 1:
            chunks = [None] * ranks.world
            dist.all_gather_object(chunks, (z0, z1.float().cpu(), y))
        if not all(torch.isfinite(chunk[1]).all() for chunk in chunks):  # the same verdict on every rank
            raise UserError(f"the reflow pairs drawn from {args.teacher} are non-finite (NaN or inf): "
                            f"that {teacher['k']}-RF checkpoint is broken; retrain it (a lower --lr "
                            f"cannot help here)")
        for chunk in chunks:  # in rank order: the chunks in the order one process draws them
            for key, val in zip(("z0", "z1", "y"), chunk):
                pairs[key] = torch.cat([pairs[key], val])
        rate = (len(pairs["z0"]) - done0) / (time.time() - start)
        print(f"pairs {len(pairs['z0'])}/{args.pairs}  {args.solver} NFE {nfe}  "
              f"{(args.pairs - len(pairs['z0'])) / rate / 60:.1f} min left", flush=True)
        if time.time() - last > 60 and ranks.rank == 0:
            atomic_save(pairs, path)
            last = time.time()
    if ranks.rank == 0:
        atomic_save(pairs, path)
    return None if stopped(stop, ranks, device) else TensorDataset(*(pairs[k][:args.pairs] for k in ("z0", "z1", "y")))


def epoch_batches(dataset, args, epoch, skip, rank=0, world=1):
    """Epoch `epoch`'s shuffled batches from the `skip`-th on, the same order on every run; under
    torchrun, rank r's slice r of each global batch of --batch-size. The loader gets its own
    generator: one drawing from the global RNG would break --resume."""
    g = torch.Generator().manual_seed(args.seed * 100003 + epoch)
    order = torch.randperm(len(dataset), generator=g)[skip * args.batch_size:]
    b = args.batch_size // world
    mine = order[:len(order) // args.batch_size * args.batch_size].view(-1, world, b)[:, rank].flatten()
    return DataLoader(Subset(dataset, mine.tolist()), b, drop_last=True, generator=g)


# ----------------------------------------------------------------------------------------------
# Many GPUs (torchrun): one process per device; without torchrun, one process and none of this
# ----------------------------------------------------------------------------------------------

def setup_distributed(device_name):
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is rank 0 of 1. NCCL on
    GPUs, gloo on CPUs. Ranks > 0 print nothing. Returns (rank, world, device); the stages of
    --all share one process group, which main() ends."""
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
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        print(f"distributed: {world} processes ({dist.get_backend()})")
    return rank, world, device


def all_sum(x, world):
    """The sum of a tensor over all ranks (itself for one process)."""
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


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


# ----------------------------------------------------------------------------------------------
# Training: one stage, or all three
# ----------------------------------------------------------------------------------------------


def train(args):
    """One stage: 1-RF on the data; with --reflow a (k+1)-RF, with --distill a one-step model, both
    on pairs from the k-RF --ckpt. Returns the checkpoint's path; interrupted, exits 130 or 143."""
    out = Path(args.out)
    if args.reflow or args.distill:
        if not args.ckpt:
            raise UserError(f"--{'reflow' if args.reflow else 'distill'} needs --ckpt PATH, the "
                            f"k-RF checkpoint to start from (e.g. {out / 'ckpt_1rf.pt'})")
        teacher = load_checkpoint(args.ckpt)
        if teacher["distilled"]:
            raise UserError(f"{args.ckpt} is a distilled one-step model: reflow or distill a k-RF")
        args.stage_k, args.distilled = teacher["k"] + args.reflow, args.distill
        args.teacher = str(Path(args.ckpt).resolve())
        args.pairs_file = str((out / f"pairs_{teacher['k']}rf.pt").resolve())
    else:
        teacher, args.stage_k, args.distilled = None, 1, False
    rank, world, device = setup_distributed(args.device)
    ranks = argparse.Namespace(rank=rank, world=world)
    name = f"{args.stage_k}rf" + ("_distilled" if args.distilled else "")
    path = Path(args.ckpt) if args.resume and args.ckpt and teacher is None else out / f"ckpt_{name}.pt"
    ckpt = None
    # a reflow or distillation stopped while drawing pairs has no checkpoint yet: it starts afresh,
    # and its stored pairs are kept
    if args.resume and (path.exists() or not (args.all or teacher is not None)):
        ckpt = load_checkpoint(path)
        for k in ("dataset", "image_size"):
            if getattr(args, k) is not None and getattr(args, k) != ckpt["args"][k]:
                raise UserError(f"{path} was trained with --{k.replace('_', '-')} {ckpt['args'][k]}; "
                                f"--resume continues it on the same data (leave out --{k.replace('_', '-')})")
        keep = {k: getattr(args, k) for k in ("epochs", "steps", "device", "out", "resume", "all")}
        if keep["epochs"] is None and keep["steps"] is None:
            keep["epochs"], keep["steps"] = ckpt["args"]["epochs"], ckpt["args"]["steps"]
        args = argparse.Namespace(**{**ckpt["args"], **keep})
        name = f"{args.stage_k}rf" + ("_distilled" if args.distilled else "")
    if args.epochs is None and args.steps is None:  # --resume of a stage not yet begun
        args.epochs = 10
    args.dataset = args.dataset or "fashion-mnist"
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} (the global batch) must divide evenly over "
                        f"{world} processes")
    if args.cfg_scale != 1 and not (teacher["num_classes"] if teacher else args.class_cond):
        raise UserError("--cfg-scale needs a class-conditional flow: train the 1-RF with --class-cond")
    seed_everything(args.seed)  # the same on every rank: see batch_loss
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder for the run's outputs")
    out.mkdir(parents=True, exist_ok=True)
    stop = []  # Ctrl-C or SIGTERM finishes the current step (or pair chunk), saves, and exits
    handlers = {s: signal.signal(s, lambda signum, _: stop.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if args.stage_k == 1 and not args.distilled:
            dataset, info = load_dataset(args.dataset, args.data_dir, True, args.image_size,
                                         flip=args.dataset == "cifar10")
            if args.class_cond and not info.num_classes:
                raise UserError(f"--class-cond needs labels; {info.name} has none (put its images "
                                f"in one subfolder per class)")
            shape, num_classes = (info.channels, info.size, info.size), info.num_classes if args.class_cond else None
            if ckpt is not None and tuple(ckpt["shape"]) != shape:
                raise UserError(f"the checkpoint was trained on {tuple(ckpt['shape'])} images, "
                                f"{args.dataset} has {shape}: use the same --dataset and --image-size")
            fill_model_defaults(args, info.size)
        else:
            src = ckpt or teacher
            shape, num_classes = tuple(src["shape"]), src["num_classes"]
            if ckpt is None:  # the network, data set and conditioning come from the teacher
                for key in ARCH + ("dataset", "image_size", "class_cond", "p_uncond"):
                    setattr(args, key, teacher["args"][key])
            args.solver = args.solver or "rk45"
            args.sampling_steps = args.sampling_steps or 100
            dataset = reflow_pairs(args, teacher, shape, num_classes, device, stop, ranks)
            if dataset is None:
                print(f"interrupted while drawing pairs; {args.pairs_file} keeps them for the "
                      f"same command (with or without --resume)")
                sys.exit(128 + stop[0])  # as an interrupted training, below
        if len(dataset) < args.batch_size:
            raise UserError(f"{len(dataset)} training examples, fewer than --batch-size {args.batch_size}")
        model = make_model(args, shape, num_classes).to(device, memory_format=torch.channels_last)
        if teacher is not None and ckpt is None:  # reflow and distillation start from the k-RF
            model.load_state_dict(teacher["ema"])
        ema = copy.deepcopy(model).requires_grad_(False)  # starts as an exact copy
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        print(f"stage {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{len(dataset)} training {'images' if args.stage_k == 1 and not args.distilled else 'pairs'}")
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
            print(f"resumed {name} from step {step}")
        ranks.ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                            else None) if world > 1 else model  # averages gradients
        path = out / f"ckpt_{name}.pt"
        step = run_epochs(args, model, ema, opt, dataset, device, shape, num_classes, step,
                          path, name, stop, ranks)
        if rank == 0:
            save_checkpoint(path, model, ema, opt, step, args, shape, num_classes)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    print(f"{'interrupted' if stop else 'done'} at step {step}; checkpoint {path}")
    if stop:  # 130 after Ctrl-C, 143 after SIGTERM: a script or a scheduler tells it from "done"
        sys.exit(128 + stop[0])
    return path


def run_epochs(args, model, ema, opt, dataset, device, shape, num_classes, step, path, name, stop, ranks):
    """The training loop. ranks: the model to call (DistributedDataParallel under torchrun), this
    process's rank and the world size; rank 0 alone logs, saves and draws the pictures."""
    per_epoch = len(dataset) // args.batch_size
    total = args.steps or args.epochs * per_epoch
    warmup = max(1, min(args.warmup, total // 10))
    amp = torch.autocast("cuda", torch.bfloat16, enabled=args.bf16 and device.type == "cuda")
    last_log = last_save = t_log = time.time()
    seen, noted = 0, False
    saved = step or None  # the step `path` holds from this run (a resumed run: where it resumed)
    first = None  # the loss of this process's first step, the scale of the divergence rule
    data = ("the data set has NaN or inf in it" if args.stage_k == 1 and not args.distilled else
            f"the pairs in {args.pairs_file} hold NaN or inf (the flow they were drawn from is broken)")
    while step < total:
        epoch, skip = divmod(step, per_epoch)
        for batch in epoch_batches(dataset, args, epoch, skip, ranks.rank, ranks.world):
            for group in opt.param_groups:
                group["lr"] = learning_rate(args, step, total, warmup)
            with amp:
                loss = batch_loss(ranks.ddp, batch, args, device, ranks.rank, ranks.world)
            loss_all = all_sum(loss.detach(), ranks.world) / ranks.world  # the same on every rank
            first = loss_all.item() if first is None else first
            if diverged(loss_all.item(), first):
                kept = f"{path} holds step {saved}" if saved else "this stage has written no checkpoint yet"
                raise divergence_error(loss_all.item(), first, batch, step + 1, kept, ranks, device, data)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip:  # 0: no clipping (clip_grad_norm_ to 0 would zero every gradient)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            step += 1
            ema_update(ema, model, step, args.ema)
            seen += args.batch_size
            now = time.time()
            if now - last_log >= args.log_every or step == total:
                speed = seen / (now - t_log)
                left = (total - step) * args.batch_size / speed
                if device.type == "cpu" and not noted and left > 1800:
                    print(f"note: this stage needs about {left / 3600:.1f} h on this CPU; README.md's "
                          f"CPU recipe shows real results in about 15 minutes a stage")
                noted = True
                print(f"{name} step {step}/{total}  epoch {epoch + 1}  loss {loss_all.item():.4f}  {speed:.0f} img/s  "
                      + (f"{left / 3600:.1f} h left" if left >= 5400 else f"{left / 60:.1f} min left"), flush=True)
                last_log, seen, t_log = now, 0, now
            if now - last_save >= 60 * args.save_every and ranks.rank == 0:
                save_checkpoint(path, model, ema, opt, step, args, shape, num_classes)
                last_save, saved = now, step
            if step == total or stopped(stop, ranks, device):
                break
        if (step % per_epoch == 0 or step == total) and ranks.rank == 0:  # the others wait meanwhile
            save_checkpoint(path, model, ema, opt, step, args, shape, num_classes)
            saved = step
            pictures(ema, args, shape, device, name, f"epoch{epoch + 1:03d}")
        if stopped(stop, ranks, device):
            break
    return step


def train_all(args):
    """1-RF, then reflow to a 2-RF, then distil the 2-RF, with the same flags for each stage."""
    path = train(argparse.Namespace(**{**vars(args), "reflow": False, "distill": False}))
    for stage in ("reflow", "distill"):
        path = train(argparse.Namespace(**{**vars(args), stage: True, "ckpt": str(path)}))


# ----------------------------------------------------------------------------------------------
# Sampling from a checkpoint
# ----------------------------------------------------------------------------------------------

def sample(args):
    if not args.ckpt:
        raise UserError("--sample needs --ckpt PATH (e.g. runs/rectified_flow/ckpt_2rf.pt)")
    if not args.save or Path(args.save).suffix not in (".png", ".pt"):
        raise UserError("--sample needs --save FILE.png (a grid) or FILE.pt (a tensor)")
    ckpt = load_checkpoint(args.ckpt)
    if args.cfg_scale != 1 and not ckpt["num_classes"]:
        raise UserError(f"--cfg-scale needs a class-conditional model; {args.ckpt} was trained "
                        f"without --class-cond")
    device = pick_device(args.device)
    net, shape, K = load_ema(ckpt, device, args.ckpt), tuple(ckpt["shape"]), ckpt["num_classes"]
    # a distilled model is a one-step map: one Euler step unless told otherwise
    solver = args.solver or ("euler" if ckpt["distilled"] else "rk45")
    steps = args.sampling_steps or (1 if ckpt["distilled"] else 100)
    start, xs, s, nfe = time.time(), [], 0.0, 0
    for i in range(0, args.n, 256):
        z0 = torch.randn(min(256, args.n - i), *shape,
                         generator=torch.Generator().manual_seed(args.seed + i)).to(device)
        y = (torch.arange(i, i + len(z0), device=device) % K) if K else None
        vs = [] if solver == "euler" else None
        v = reporting(velocity(net, y, args.cfg_scale), f"images {i + 1}-{i + len(z0)} of {args.n}",
                      args.log_every)
        z1, n_eval = solve(v, z0, solver, steps, args.rtol, args.atol, vs)
        nfe = max(nfe, n_eval)
        s += straightness(z0, z1, vs) * len(z0) if vs else 0.0
        xs.append(z1.float().cpu())
        if i + len(z0) < args.n:
            done = i + len(z0)
            print(f"sampling: {done}/{args.n} images, {(time.time() - start) / done * (args.n - done):.0f} s left",
                  flush=True)
    x = torch.cat(xs)
    if not torch.isfinite(x).all():
        raise UserError(f"the samples of {args.ckpt} came out non-finite: the checkpoint is broken, retrain it")
    x = x.clamp(-1, 1)
    # one Euler step is a straight line whatever the model: S is 0 and says nothing
    print(f"{args.n} samples in {time.time() - start:.2f} s with {solver} ("
          + (f"N = {steps}, " if solver != "rk45" else "") + f"NFE {nfe})"
          + (f"; straightness S = {s / args.n:.4f} on these paths" if solver == "euler" and steps > 1 else ""))
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


def positive_float(s):
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


def int_list(s):
    v = tuple(int(x) for x in s.split(",") if x.strip())
    if not v:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers such as 1,2,2, got {s!r}")
    return v


def fill_model_defaults(args, size):
    """As ddpm.py: 28x28 gets a 6.5M U-Net; 32x32 the DDPM CIFAR-10 one."""
    big = size >= 32
    args.width = args.width or (128 if big else 64)
    args.mults = args.mults or ((1, 2, 2, 2) if big else (1, 2, 2))
    args.attn = args.attn or ((16,) if big else (size // 4,))
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
    p.add_argument("--lr", type=positive_float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/rectified_flow")
    p.add_argument("--resume", action="store_true",
                   help="continue this stage's OUT/ckpt_*.pt (without --reflow/--distill: or --ckpt)")
    p.add_argument("--sample", action="store_true", help="only sample from --ckpt")
    p.add_argument("--ckpt", help="with --sample: the model; with --reflow/--distill: the k-RF")
    p.add_argument("--n", type=positive_int, default=64)
    p.add_argument("--save")
    # Rectified flow
    stage = p.add_mutually_exclusive_group()
    stage.add_argument("--reflow", action="store_true", help="train a (k+1)-RF on pairs from --ckpt")
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
    p.add_argument("--warmup", type=positive_int, default=5000)
    p.add_argument("--lr-decay", choices=["none", "cosine"], default="none")
    p.add_argument("--ema", type=float, default=0.9999)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast on CUDA")
    p.add_argument("--log-every", type=float, default=5.0, help="seconds")
    p.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoints")
    args = p.parse_args(argv)
    if not 0 <= args.p_uncond < 1:
        p.error(f"--p-uncond must be in [0, 1), got {args.p_uncond}")
    if not 0 <= args.ema < 1:
        p.error(f"--ema must be in [0, 1), got {args.ema}")
    if not args.grad_clip >= 0:
        p.error(f"--grad-clip must be 0 (off) or positive, got {args.grad_clip}")
    if args.cfg_scale < 0:
        p.error(f"--cfg-scale must be >= 0, got {args.cfg_scale}")
    if args.sample and (args.reflow or args.distill or args.all):
        p.error("--sample only samples: leave out --reflow, --distill and --all")
    if not args.sample and not args.resume and args.epochs is None and args.steps is None:
        args.epochs = 10
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.sample:
            sample(args)
        elif args.all:
            train_all(args)
        else:
            train(args)
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C where no checkpoint is at stake: sampling, or before training
        print("interrupted: nothing saved", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():  # torchrun's processes
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
