"""MM-DiT: the two-stream transformer of Stable Diffusion 3 (Esser et al. 2024, "Scaling Rectified
Flow Transformers for High-Resolution Image Synthesis", arXiv:2403.03206), trained with its
rectified-flow objective.

Image tokens (p x p patches) and text tokens keep their own weights (adaLN, q/k/v, MLP) but meet in
one attention over the joined sequence, so the text changes the image tokens and the image changes
the text tokens (Fig. 2b). q and k are RMS-normalised per head (Sec. 5.3.2). The time t and a pooled
text vector enter every block through adaLN-Zero modulations, as in DiT. The "text" here is the
class name cut into UTF-8 bytes, one learned embedding per byte: a very small text-to-image model
whose prompt one can type.

The objective is rectified flow (Sec. 2) with logit-normal t (Sec. 3.1), written in rectified_flow.py's
time: t = 0 is noise, t = 1 is data, x_t = t x_1 + (1 - t) x_0, and the network predicts the velocity
v = x_1 - x_0 (SD3 writes z_t = (1 - t) x_data + t noise: t_SD3 = 1 - t; the logit-normal density
is symmetric, so the same t are drawn).

    Training                                          Sampling (Euler, S steps, guidance s)
    1: x_1 ~ data, c = its prompt; c = "" w.p. 0.1    1: x ~ N(0, I)
    2: x_0 ~ N(0, I), n ~ N(0, 1), t = sigmoid(n)     2: for i = 0, ..., S - 1 do
    3: x_t = t x_1 + (1 - t) x_0                      3:   v = v(x, i/S, "") + s (v(x, i/S, c) - v(x, i/S, ""))
    4: gradient step on                               4:   x = x + v / S
         || (x_1 - x_0) - v_theta(x_t, t, c) ||^2     5: return x

Run:
    python mmdit.py --epochs 10                              # S/2 on Fashion-MNIST, prompts = class names
    python mmdit.py --sample --ckpt runs/mmdit/ckpt.pt --prompt "Ankle boot" --save boots.png
    torchrun --standalone --nproc_per_node 8 mmdit.py --model XL/2 --batch-size 256 --bf16 ...
    CPU recipe (15 minutes on 2 cores, garments of every class; see docs/mmdit.md):
    python mmdit.py --model T/4 --batch-size 64 --lr 1e-3 --warmup 100 --lr-decay cosine \\
                    --steps 1350 --ema 0.999

Outputs in --out (runs/mmdit): samples_epochNNN.png per epoch (EMA weights, fixed noise, one
column per class and one row per guidance scale 1, 1.5, 2, 4), ckpt.pt.

Differences from the paper:
- Prompts are class names read byte by byte, not CLIP and T5 embeddings; the pooled vector is the
  mean of the prompt's byte embeddings (SD3 pools CLIP's), and the empty prompt is the null one.
- Pixels by default (latents through --dataset FILE.pt); sizes from DiT's Table 1, and a small T
  for CPUs; the EMA decay warms up; an optional learning-rate warm-up (at most a tenth of the run)
  and cosine decay.
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
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from common import UserError, load_dataset, pick_device, save_grid, seed_everything, timestep_embedding

# ==== the paper ====================================================================================

MODELS = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16),
          "T": (6, 192, 3)}  # DiT's Table 1: (depth, width, heads); T is this file's CPU size
FREQ_DIM = 256  # the sinusoidal time features before the time MLP


# The prompts: one token per UTF-8 byte

def tokenize(prompts, length):
    """Text -> (B, length) token ids: each byte of the lower-cased text is one token (id = byte + 1),
    0 pads. The empty prompt, all padding, is the null condition of guidance."""
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, p in enumerate(prompts):
        b = p.lower().encode()
        if len(b) > length:
            raise UserError(f"the prompt {p!r} has {len(b)} characters; this model reads at most {length}")
        ids[i, :len(b)] = torch.tensor(list(b)) + 1
    return ids


# The network: patches and positions, the two-stream block, MM-DiT

def patchify(x, p):
    """(B, C, H, W) -> (B, H/p * W/p, p * p * C): one token per p x p patch, row by row."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(tokens, p, C):
    """(B, h * h, p * p * C) -> (B, C, h p, h p), the inverse of patchify."""
    B, N, _ = tokens.shape
    h = math.isqrt(N)
    x = tokens.reshape(B, h, h, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(B, C, h * p, h * p)


def pos_embed_2d(dim, h, w):
    """ViT's fixed 2-D sine-cosine positions, (h * w, dim): the first half of the channels encodes
    each token's column, the second half its row, each as [sin(pos omega_i), cos(pos omega_i)]."""
    def sincos(d, pos):
        omega = 10000 ** (-torch.arange(d // 2, dtype=torch.float64) / (d // 2))
        angle = pos.double()[:, None] * omega[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([sincos(dim // 2, cols.flatten()), sincos(dim // 2, rows.flatten())], 1).float()


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def split_heads(x, heads):  # (B, N, k d) -> (B, heads, N, k d / heads)
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def mlp(d, ratio):
    return nn.Sequential(nn.Linear(d, int(d * ratio)), nn.GELU(approximate="tanh"), nn.Linear(int(d * ratio), d))


class Stream(nn.Module):
    """One modality's weights in an MM-DiT block: its adaLN modulation, q/k/v with QK-norm, output
    projection and MLP. last: the text stream of the last block keeps q/k/v alone (nothing reads
    its output)."""

    def __init__(self, d, heads, mlp_ratio, qk_norm, last=False):
        super().__init__()
        self.heads, self.last = heads, last
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, (2 if last else 6) * d))
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d)
        # Sec. 5.3.2: RMSNorm of q and k keeps the attention logits from growing in long runs
        self.q_norm = nn.RMSNorm(d // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(d // heads, eps=1e-6) if qk_norm else nn.Identity()
        if not last:
            self.proj = nn.Linear(d, d)
            self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
            self.mlp = mlp(d, mlp_ratio)

    def pre_attention(self, x, c):
        """x (B, N, d), c (B, d) -> q, k, v (B, heads, N, d / heads) and the other modulations."""
        shift_msa, scale_msa, *rest = self.adaLN_modulation(c)[:, None].chunk(2 if self.last else 6, dim=-1)
        q, k, v = split_heads(self.qkv(modulate(self.norm1(x), shift_msa, scale_msa)), self.heads).chunk(3, -1)
        return self.q_norm(q), self.k_norm(k), v, rest

    def post_attention(self, x, attn, rest):
        """x (B, N, d) and this stream's part of the joint attention (B, N, d) -> (B, N, d)."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp = rest
        x = x + gate_msa * self.proj(attn)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class MMDiTBlock(nn.Module):
    """Fig. 2b: two streams with their own weights and one joint attention over [text, image]."""

    def __init__(self, d, heads, mlp_ratio, qk_norm, last=False):
        super().__init__()
        self.image = Stream(d, heads, mlp_ratio, qk_norm)
        self.text = Stream(d, heads, mlp_ratio, qk_norm, last=last)

    def forward(self, x, ctx, c):  # x: (B, N, d) image tokens; ctx: (B, L, d) text tokens; c: (B, d)
        qx, kx, vx, rest_x = self.image.pre_attention(x, c)
        qc, kc, vc, rest_c = self.text.pre_attention(ctx, c)
        joint = F.scaled_dot_product_attention(torch.cat([qc, qx], 2), torch.cat([kc, kx], 2),
                                               torch.cat([vc, vx], 2))  # (B, heads, L + N, d / heads)
        a_c, a_x = joint.transpose(1, 2).flatten(2).split([ctx.shape[1], x.shape[1]], dim=1)
        ctx = ctx if self.text.last else self.text.post_attention(ctx, a_c, rest_c)
        return self.image.post_attention(x, a_x, rest_x), ctx


class MMDiT(nn.Module):
    """x (B, C, H, W), t (B,) in [0, 1], tokens (B, L) -> the velocity v (B, C, H, W).
    c = t_emb + MLP(pooled text); the text tokens get a learned embedding and position."""

    def __init__(self, in_channels, image_size, patch=2, depth=12, width=384, heads=6,
                 text_len=16, qk_norm=True, mlp_ratio=4.0):
        super().__init__()
        if image_size % patch:
            fits = [p for p in range(1, image_size) if image_size % p == 0]
            raise UserError(f"--patch {patch} does not divide the {image_size}x{image_size} images: use one of {fits}")
        if width % heads or width % 4:
            raise UserError(f"width {width} must be divisible by 4 and by the {heads} heads")
        self.patch, self.out_channels = patch, in_channels
        self.x_embed = nn.Linear(patch * patch * in_channels, width)
        h = image_size // patch
        self.register_buffer("pos_embed", pos_embed_2d(width, h, h), persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(FREQ_DIM, width), nn.SiLU(), nn.Linear(width, width))
        self.text_embed = nn.Embedding(257, width)  # 256 byte values + padding
        self.text_pos = nn.Parameter(torch.zeros(text_len, width))
        self.pooled = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList([MMDiTBlock(width, heads, mlp_ratio, qk_norm, last=i == depth - 1)
                                     for i in range(depth)])
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.final = nn.Linear(width, patch * patch * in_channels)
        self.init_weights()

    def init_weights(self):
        """As DiT's code: Xavier linears with zero bias, N(0, 0.02) embeddings, and zero for every
        modulation and the final layer: each block starts as the identity, the output at 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for m in self.t_embed[::2]:
            nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.text_pos, std=0.02)
        zeroed = [s.adaLN_modulation[-1] for s in self.modules() if isinstance(s, Stream)]
        for m in (*zeroed, self.final_modulation[-1], self.final):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, t, tokens):
        x = self.x_embed(patchify(x, self.patch)) + self.pos_embed  # (B, N, d), N = HW / p^2
        words = self.text_embed(tokens)  # (B, L, d)
        mask = (tokens > 0).unsqueeze(-1).float()  # (B, L, 1): 0 at padding
        pooled = (words * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, d): 0 for the empty prompt
        c = self.t_embed(timestep_embedding(1000 * t, FREQ_DIM)) + self.pooled(pooled)  # (B, d)
        ctx = words + self.text_pos  # (B, L, d)
        for block in self.blocks:
            x, ctx = block(x, ctx, c)  # (B, N, d), (B, L, d)
        shift, scale = self.final_modulation(c)[:, None].chunk(2, dim=-1)  # (B, 1, d) each
        x = self.final(modulate(self.final_norm(x), shift, scale))  # (B, N, p * p * C)
        return unpatchify(x, self.patch, self.out_channels)  # (B, C, H, W)


# The objective: rectified flow at logit-normal t (Sec. 2 and 3.1)

def rf_loss(v_theta, x1, tokens, x0, t):
    """Training, lines 3-4, per example: || (x_1 - x_0) - v_theta(x_t, t, c) ||^2 (mean over pixels)."""
    tt = t.view(-1, 1, 1, 1)
    # line 3: x_t = t x_1 + (1 - t) x_0
    x_t = tt * x1 + (1 - tt) * x0
    # line 4: the velocity of the straight path, x_1 - x_0, rectified flow's loss (Liu et al. 2023, Eq. 1)
    return ((x1 - x0) - v_theta(x_t, t, tokens)).square().flatten(1).mean(1)


def training_step(v_theta, x1, tokens, p_uncond, draw):
    """Training, lines 1-4, for a batch x_1 and its prompts' tokens; the caller takes the gradient
    step. draw: the random draws (torch's own, or one process's share of a global batch's)."""
    # line 1: c = "" (all padding) with probability p_uncond, for classifier-free guidance
    tokens = torch.where((draw.rand() < p_uncond)[:, None], 0, tokens)
    # line 2: x_0 ~ N(0, I)
    x0 = draw.randn(*x1.shape[1:])
    # line 2: t = sigmoid(n), n ~ N(0, 1): the logit-normal, most weight on the middle of the path
    t = torch.sigmoid(draw.randn())
    return rf_loss(v_theta, x1, tokens, x0, t).mean()


# The sampler: Euler on dx/dt = v, with classifier-free guidance

def guided(v_theta, tokens, scale):
    """Sampling, line 3: v = v(x, t, "") + s (v(x, t, c) - v(x, t, "")); s = 1: the conditional model."""
    def v(x, t):
        if scale == 1:
            return v_theta(x, t, tokens)
        v_c, v_null = v_theta(torch.cat([x, x]), torch.cat([t, t]),
                              torch.cat([tokens, torch.zeros_like(tokens)])).chunk(2)
        return v_null + scale * (v_c - v_null)
    return v


@torch.no_grad()
def sample_euler(v, x, steps, on_step=None):
    """Sampling, lines 2-5: Euler from t = 0 (noise) to t = 1 (data); on_step(x, done, total)."""
    for i in range(steps):
        x = x + v(x, torch.full((len(x),), i / steps, device=x.device)) / steps
        if on_step is not None:
            on_step(x, i + 1, steps)
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

KEYS = ("classes", "model", "ema", "optimizer")  # of an mmdit.py checkpoint, besides the harness's
GUIDANCE_ROWS = (1.0, 1.5, 2.0, 4.0)  # the rows of every grid
EULER_MAX = 1000  # the most Euler steps: Euler's error, about 1 / steps, is long invisible by then


def model_name(s):
    """S/2, B/4, XL/2, T/4 ... (Table 1's size / the patch size) or a size alone (patch 2)."""
    size, _, patch = s.upper().partition("/")
    if size not in MODELS or (patch and not (patch.isdigit() and int(patch) > 0)):
        raise argparse.ArgumentTypeError(f"unknown model {s!r}: use SIZE/PATCH with SIZE one of "
                                         f"{', '.join(MODELS)} (e.g. S/2, B/4, XL/2)")
    return f"{size}/{patch or 2}"


def fill_model_defaults(args, classes):
    """The model name's patch, depth, width and heads where no flag overrides them; prompts as long
    as the longest class name (16 bytes at least)."""
    size, patch = args.model.split("/")
    depth, width, heads = MODELS[size]
    args.patch, args.depth = args.patch or int(patch), args.depth or depth
    args.width, args.heads = args.width or width, args.heads or heads
    args.text_len = max(16, *(len(c.encode()) for c in classes))


def make_model(args, shape):
    return MMDiT(shape[0], shape[-1], args.patch, args.depth, args.width, args.heads, args.text_len, args.qk_norm)


def draw(ema, tokens, shape, args, device, seed, scale, on_step=None):
    """One image per row of tokens from fixed noise (seed), guided at `scale`."""
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(len(tokens), *shape, device=device, generator=g)
    return sample_euler(guided(ema, tokens, scale), x, args.sampling_steps, on_step)


def pictures(run, class_tokens, epoch, progress):
    """The epoch's grid: one column per class (the first 10), one row per guidance scale."""
    K, rows = min(len(class_tokens), 10), []
    for r, scale in enumerate(GUIDANCE_ROWS):  # the grid's progress counted over all its rows
        rows.append(draw(run.ema.eval(), class_tokens[:K], run.shape, run.args, run.device, 0, scale,
                         lambda x, done, total: progress(r * total + done, len(GUIDANCE_ROWS) * total)))
    path = Path(run.args.out) / f"samples_epoch{epoch + 1:03d}.png"
    save_grid(torch.cat(rows)[:, :3], path, nrow=K)
    print(f"epoch {epoch + 1}: samples in {path} (rows: guidance {', '.join(map(str, GUIDANCE_ROWS))})")


def train_command(args, p):
    run = begin(args, p, "mmdit", KEYS)
    args = run.args
    if run.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    run.dataset, info = load_dataset(args.dataset, args.data_dir, True, args.image_size,
                                     flip=args.dataset == "cifar10")
    run.shape, classes = (info.channels, info.size, info.size), info.classes
    if not classes:
        raise UserError(f"MM-DiT learns from prompts, the class names; {info.name} has no labels "
                        f"(put its images in one subfolder per class, or train dit.py)")
    fill_model_defaults(args, classes)
    # pixels live in [-1, 1] and samples are clamped there; float tensors (latents) are not
    args.pixels = not getattr(getattr(run.dataset, "images", None), "is_floating_point", bool)()
    run.model = make_model(args, run.shape).to(run.device)
    print(f"model: MM-DiT {args.model} (depth {args.depth}, width {args.width}, {args.heads} heads), "
          f"{(run.shape[-1] // args.patch) ** 2} image tokens, {args.text_len} text tokens, "
          f"{sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M parameters")
    class_tokens = tokenize(classes, args.text_len).to(run.device)
    run.ema = copy.deepcopy(run.model).requires_grad_(False)
    run.opt = torch.optim.AdamW(run.model.parameters(), lr=args.lr, weight_decay=0)
    run.loss = lambda batch, draws: training_step(run.net, batch[0], class_tokens[batch[1]], args.p_uncond, draws)
    run.pictures = lambda epoch, progress: pictures(run, class_tokens, epoch, progress)
    run.extra = lambda: {"classes": classes}
    train(run)


def sample(args):
    def load(ckpt, device):
        train_args, classes, shape = argparse.Namespace(**ckpt["args"]), ckpt["classes"], tuple(ckpt["shape"])
        if args.prompt is None:  # the classes in turn
            prompts = [classes[i % len(classes)] for i in range(args.n)]
        else:
            prompts = [args.prompt] * args.n
            if args.prompt.lower() not in [c.lower() for c in classes]:
                print(f"note: {args.prompt!r} is not a training prompt; the model has seen only the class names")
        tokens = tokenize(prompts, train_args.text_len).to(device)
        ema = make_model(train_args, shape).to(device).eval()
        ema.load_state_dict(ckpt["ema"])

        def draw_chunk(first, n, progress):
            x = draw(ema, tokens[first:first + n], shape, args, device, args.seed + first, args.cfg_scale, progress)
            return x.clamp(-1, 1) if train_args.pixels else x
        return ema, draw_chunk

    def columns(ckpt):  # a grid of the classes in turn: one column per class
        return len(ckpt["classes"]) if ckpt["classes"] and args.prompt is None else None

    sample_command(args, ["mmdit"], KEYS, load, nrow=columns)


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    shared_flags(p, "runs/mmdit", lr=1e-4, batch_size=256)
    p.add_argument("--model", type=model_name, default="S/2", help="S/2, S/4, B/2, L/4, XL/2, T/4, ...")
    p.add_argument("--patch", type=positive_int, help="patch size p (overrides the model name's)")
    p.add_argument("--depth", type=positive_int, help="blocks (overrides the model's)")
    p.add_argument("--width", type=positive_int, help="hidden size d (overrides the model's)")
    p.add_argument("--heads", type=positive_int, help="attention heads (overrides the model's)")
    p.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--p-uncond", type=float, default=0.1, help="prompt dropout for guidance")
    p.add_argument("--sampler", choices=["euler"], default="euler", help="the ODE solver (SD3's: Euler)")
    p.add_argument("--sampling-steps", type=positive_int, default=50, help=f"Euler steps, at most {EULER_MAX}")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="guidance s (1: none)")
    p.add_argument("--prompt", help="with --sample: any text (default: the class names in turn)")
    return p


def parse_args(argv=None, p=None):
    p = p or parser()
    args = p.parse_args(argv)
    check_shared_flags(p, args)
    if args.sampling_steps > EULER_MAX:
        p.error(f"--sampling-steps for the Euler sampler must be between 1 and {EULER_MAX}, "
                f"got {args.sampling_steps}")
    if not 0 <= args.p_uncond < 1:
        p.error(f"--p-uncond must be in [0, 1), got {args.p_uncond}")
    if args.cfg_scale < 0:
        p.error(f"--cfg-scale must be >= 0, got {args.cfg_scale}")
    if args.prompt is not None and not args.sample:
        p.error("--prompt is for --sample")
    return args


def main(argv=None):
    p = parser()
    args = parse_args(argv, p)
    run_command(sample if args.sample else lambda a: train_command(a, p), args)


if __name__ == "__main__":
    main()
