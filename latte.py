"""Latte: Latent Diffusion Transformer for Video Generation (Ma et al. 2024, arXiv:2401.03048).

Latte is DiT (dit.py) for video. An image DiT cuts one image into N = H W / p^2 patches; a clip of
F frames cut the same way ("uniform frame patch embedding", Sec. 3.2) gives F N tokens, and cutting
t x p x p tubelets instead ("compression frame patch embedding": ViViT's tubelet embedding, the
spacetime patches of OpenAI's 2024 Sora report) gives F/t N. The transformer, its adaLN-Zero
blocks (the paper's S-AdaLN: shift, scale and gate regressed from the time step and the class) and
the diffusion stay DiT's. What changes is the attention: over all F N tokens it costs (F N)^2 per
layer, F^2 times an image's N^2. Factorised, spatial attention among the N tokens of each frame
(F N^2 for the clip) and temporal attention among the F tokens at each position (N F^2) cost
F N^2 + N F^2, nearly linear in F while F < N (F N^2 dominates). Sec. 3.1 puts the two together
in four ways (in brief):

    Variant 1: spatial Transformer blocks and temporal Transformer blocks, interleaved
               ("interleaved fusion");
    Variant 2: the same blocks, the spatial ones first, then the temporal ones ("late fusion");
    Variant 3: one kind of block whose multi-head attention is factorised: self-attention over
               space, then over time, in every block;
    Variant 4: one kind of block whose heads are factorised: half of them attend within each frame,
               the other half across frames, their outputs concatenated.
    (Variant 0, this file's baseline: full spatio-temporal attention over all F/t N tokens.)

The paper's ablations favour Variant 1, which its released models use, and uniform frame patches.

    Training (DDPM's Algorithm 1; the label dropped for classifier-free guidance, Ho & Salimans 2022):
    1: repeat
    2:   x_0 ~ q(x_0), a clip, and its class y; y = null with probability p_uncond
    3:   t ~ Uniform({1, ..., T})
    4:   eps ~ N(0, I)
    5:   take a gradient step on ||eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t, y)||^2

    Sampling (DDIM, Song et al. 2021, Eq. 12 with eta = 0, on S of the T steps, guided with scale s):
    1: x_T ~ N(0, I)
    2: for t = tau_S, ..., tau_1 (tau_0 = 0) do
    3:   eps = eps_theta(x_t, null) + s (eps_theta(x_t, y) - eps_theta(x_t, null))
    4:   x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
    5:   x_prev = sqrt(alpha_bar_prev) x_0 + sqrt(1 - alpha_bar_prev) eps
    6: end for

Time runs as in DDPM: t = 1..T, and alpha_bar[t] is the paper's alpha_bar_t, alpha_bar[0] = 1.

Run (moving Fashion-MNIST garments: common.MovingClips, 8 frames of 40 x 40):
    python latte.py --steps 3000 --variant 3 --frames 8             # factorised attention
    python latte.py --steps 3000 --variant 0 --frames 8             # the full-attention baseline
    python latte.py --steps 3000 --variant 1 --tubelet 2            # compression frame patches
    python latte.py --sample --ckpt runs/latte/ckpt.pt --n 16 --save clips.gif
        (.gif: the clips animated in one grid; .png: one row of frames per clip; .pt: (N, F, C, H, W))

Differences from the paper:
- Pixels of small made-up clips (a garment moving in a straight line and bouncing), not the latents
  of a video autoencoder over real videos; latents can come in as --dataset FILE.pt (N, F, C, H, W).
- The noise is predicted with DDPM's fixed variance (L_simple) and sampled with DDIM, where the
  paper keeps DiT's learned covariance (L_hybrid) and its 250-step DDPM sampler.
- Small sizes; `depth` counts the blocks of every variant, so Variant 3's blocks, with two
  attentions each, make a slightly larger network at the same depth.
- The fixed sine-cosine temporal positions are added with the spatial ones to the input tokens (the
  official code adds them before the first temporal block; the paper also tries RoPE).
- Compression frame patches are decoded by a linear layer to t p p C values per token, rearranged
  into the tubelet: a 3-D transposed convolution with kernel = stride = (t, p, p) (with a bias per
  output value rather than per channel).
- No joint image-video training and no ImageNet-pretrained DiT to start from.
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
import torchvision
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from torch.utils.flop_counter import FlopCounterMode

from common import UserError, bounce, load_clips, pick_device, save_grid, seed_everything, timestep_embedding

# ==== the paper ====================================================================================

MODELS = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16),
          "T": (4, 128, 4)}  # (depth, width, heads) as DiT's Table 1; T is this file's CPU size
VARIANTS = {0: "full spatio-temporal attention (the baseline)", 1: "spatial and temporal blocks interleaved",
            2: "spatial blocks, then temporal blocks (late fusion)",
            3: "spatial, then temporal attention in every block (factorised attention)",
            4: "half the heads spatial, half temporal (factorised heads)"}
FREQ_DIM = 256  # the sinusoidal time features before the time MLP, as DiT


# Diffusion (DDPM, Ho et al. 2020): no network needed

class Schedule:
    """beta_t, alpha_t and alpha_bar_t in float64, indexed by the paper's t (index 0: no noise)."""

    def __init__(self, beta):  # beta: (T,) for t = 1..T
        self.T = len(beta)
        self.beta = torch.cat([torch.zeros(1, dtype=torch.float64), beta])
        self.alpha = 1 - self.beta
        self.alpha_bar = torch.cumprod(self.alpha, dim=0)


def linear_schedule(T=1000):
    """DDPM Sec. 4, as DiT and Latte: beta from 1e-4 to 0.02 over T = 1000 (rescaled by 1000 / T)."""
    s = 1000 / T
    return Schedule(torch.linspace(s * 1e-4, s * 0.02, T, dtype=torch.float64).clamp(max=0.999))


def extract(a, t, x):
    """a[t] for a batch of times t, as float32 on x's device, shaped to broadcast against x."""
    return a.to(x.device)[t].float().view(-1, *([1] * (x.dim() - 1)))


def q_sample(x0, t, eps, sch):
    """DDPM Eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
    return extract(sch.alpha_bar.sqrt(), t, x0) * x0 + extract((1 - sch.alpha_bar).sqrt(), t, x0) * eps


def predict_x0(x_t, t, eps, sch):
    """DDPM Eq. 4 solved for x_0."""
    return (x_t - extract((1 - sch.alpha_bar).sqrt(), t, x_t) * eps) / extract(sch.alpha_bar.sqrt(), t, x_t)


def ddim_timesteps(T, steps):
    """DDIM's tau_1 < ... < tau_S = T, evenly spaced."""
    if not 1 <= steps <= T:
        raise UserError(f"--sampling-steps must be between 1 and T = {T}, got {steps}")
    return sorted({T - i * T // steps for i in range(steps)})


# The network: patches, positions, factorised attention, the variants' blocks (Sec. 3.1-3.2)

def patchify(x, p, t=1):
    """(B, F, C, H, W) -> (B, F/t, H/p * W/p, C t p p): one token per t x p x p tubelet (t = 1: a
    frame's p x p patch), row by row, its values ordered as a Conv3d's weight (C, t, p, p)."""
    B, Fr, C, H, W = x.shape
    x = x.reshape(B, Fr // t, t, C, H // p, p, W // p, p).permute(0, 1, 4, 6, 3, 2, 5, 7)  # (B, f, h, w, C, t, p, p)
    return x.reshape(B, Fr // t, (H // p) * (W // p), C * t * p * p)


def unpatchify(tokens, p, t, C):
    """(B, F', h * h, C t p p) -> (B, F' t, C, h p, h p), the inverse of patchify."""
    B, f, N, _ = tokens.shape
    h = math.isqrt(N)
    x = tokens.reshape(B, f, h, h, C, t, p, p).permute(0, 1, 5, 4, 2, 6, 3, 7)  # (B, f, t, C, h, p, w, p)
    return x.reshape(B, f * t, C, h * p, h * p)


def sincos(dim, pos):
    """Fixed sine-cosine features (len(pos), dim): [sin(pos omega_i), cos(pos omega_i)], omega_i =
    10000^(-i / (dim / 2)), as the Transformer's and ViT's positions."""
    omega = 10000 ** (-torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angle = pos.double()[:, None] * omega[None]
    return torch.cat([angle.sin(), angle.cos()], dim=1).float()


def pos_embed_2d(dim, h, w):
    """ViT's and DiT's spatial positions (h * w, dim): half the channels the column, half the row."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([sincos(dim // 2, cols.flatten()), sincos(dim // 2, rows.flatten())], 1)


def modulate(x, shift, scale):
    """adaLN: the layer norm's output shifted and scaled by values regressed from c."""
    return x * (1 + scale) + shift


def mlp(d, ratio):
    return nn.Sequential(nn.Linear(d, int(d * ratio)), nn.GELU(approximate="tanh"), nn.Linear(int(d * ratio), d))


def layer_norm(d):
    return nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)  # adaLN brings the shift and scale


def attend(q, k, v, axis):
    """Attention of q, k, v (B, heads, F', N, d_h) along `axis`: 'spatial' among the N tokens of each
    frame, 'temporal' among the F' tokens at each spatial position, 'full' among all F' N tokens."""
    if axis == "spatial":  # the last two dimensions attend: (N, d_h), one attention per frame
        return F.scaled_dot_product_attention(q, k, v)
    if axis == "temporal":  # (B, heads, N, F', d_h): one attention per position
        q, k, v = (a.transpose(2, 3) for a in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(2, 3)
    if axis == "full":  # (B, heads, F' N, d_h): one attention over the whole clip
        out = F.scaled_dot_product_attention(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3))
        return out.unflatten(2, q.shape[2:4])
    raise ValueError(f"unknown attention axis {axis!r}")


class Attention(nn.Module):
    """Multi-head self-attention of tokens (B, F', N, d) along `axis` ('spatial', 'temporal' or
    'full', see attend), or 'heads': Variant 4's factorised heads, half of them spatial, half temporal."""

    def __init__(self, d, heads, axis):
        super().__init__()
        self.heads, self.axis = heads, axis
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):  # x: (B, F', N, d)
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(3, 0, 4, 1, 2, 5)  # (B, heads, F', N, d_h)
        if self.axis == "heads":
            h = self.heads // 2
            out = torch.cat([attend(q[:, :h], k[:, :h], v[:, :h], "spatial"),
                             attend(q[:, h:], k[:, h:], v[:, h:], "temporal")], dim=1)
        else:
            out = attend(q, k, v, self.axis)
        return self.proj(out.permute(0, 2, 3, 1, 4).flatten(3))  # (B, F', N, d): the heads concatenated


class LatteBlock(nn.Module):
    """DiT's adaLN-Zero block (DiT Fig. 3) attending along `axis`: a spatial Transformer block, a
    temporal one, Variant 4's block ('heads') or full attention. S-AdaLN: the shift, scale and gate
    are regressed from c and applied to every token; init_weights zeroes the regression, so the
    gates are 0 and the block is the identity at the start."""

    def __init__(self, d, heads, axis, mlp_ratio=4.0):
        super().__init__()
        self.norm1, self.attn = layer_norm(d), Attention(d, heads, axis)
        self.norm2, self.mlp = layer_norm(d), mlp(d, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c):  # x: (B, F', N, d) tokens; c: (B, d)
        mod = self.adaLN_modulation(c)[:, None, None]  # (B, 1, 1, 6 d): the same for every token
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, -1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FactorisedBlock(nn.Module):
    """Variant 3's block, factorised attention: self-attention over space, then over time, then the
    MLP, each branch with its own adaLN-Zero shift, scale and gate (TimeSformer's divided attention,
    in the paper's order: space first, then time)."""

    def __init__(self, d, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm_s, self.attn_s = layer_norm(d), Attention(d, heads, "spatial")
        self.norm_t, self.attn_t = layer_norm(d), Attention(d, heads, "temporal")
        self.norm2, self.mlp = layer_norm(d), mlp(d, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 9 * d))

    def forward(self, x, c):  # x: (B, F', N, d) tokens; c: (B, d)
        mod = self.adaLN_modulation(c)[:, None, None]  # (B, 1, 1, 9 d)
        shift_s, scale_s, gate_s, shift_t, scale_t, gate_t, shift_mlp, scale_mlp, gate_mlp = mod.chunk(9, -1)
        x = x + gate_s * self.attn_s(modulate(self.norm_s(x), shift_s, scale_s))
        x = x + gate_t * self.attn_t(modulate(self.norm_t(x), shift_t, scale_t))
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


def block_axes(variant, depth):
    """What each of the `depth` blocks of a variant attends along, first block first."""
    return {0: ["full"] * depth,
            1: ["spatial", "temporal"] * (depth // 2),  # interleaved fusion
            2: ["spatial"] * (depth // 2) + ["temporal"] * (depth // 2),  # late fusion
            3: ["factorised"] * depth,
            4: ["heads"] * depth}[variant]


class FinalLayer(nn.Module):
    """adaLN, then a zero-initialised linear decoder of each token into its t x p x p x C values: a
    fresh network outputs exactly 0."""

    def __init__(self, d, values):
        super().__init__()
        self.norm = layer_norm(d)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.linear = nn.Linear(d, values)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None, None].chunk(2, -1)
        return self.linear(modulate(self.norm(x), shift, scale))


class Latte(nn.Module):
    """x (B, F, C, H, W), t (B,) in 1..T, y (B,) classes (y = K or None: the null class) -> eps_theta
    (B, F, C, H, W). Tokens are t x p x p tubelets (tubelet t = 1: uniform frame patches)."""

    def __init__(self, in_channels, image_size, frames, patch=2, tubelet=1, depth=4, width=128, heads=4,
                 num_classes=None, variant=3, mlp_ratio=4.0):
        super().__init__()
        if variant not in VARIANTS:
            raise UserError(f"--variant {variant} is not one of {sorted(VARIANTS)}")
        if image_size % patch or frames % tubelet:
            raise UserError(f"--patch {patch} must divide the {image_size}x{image_size} frames and --tubelet "
                            f"{tubelet} the {frames} frames")
        if width % heads or width % 4 or (variant == 4 and heads % 2) or (variant in (1, 2) and depth % 2):
            raise UserError(f"width {width} must be divisible by 4 and by the {heads} heads; Variant 4 needs an "
                            f"even number of heads, Variants 1 and 2 an even depth (got {depth})")
        self.patch, self.tubelet, self.in_channels, self.num_classes = patch, tubelet, in_channels, num_classes
        self.variant, self.frames, self.image_size = variant, frames, image_size
        # Sec. 3.2: a 3-D convolution with kernel = stride = (t, p, p) embeds each tubelet
        self.x_embed = nn.Conv3d(in_channels, width, (tubelet, patch, patch), stride=(tubelet, patch, patch))
        h = image_size // patch
        self.register_buffer("pos_embed", pos_embed_2d(width, h, h), persistent=False)  # (N, d)
        self.register_buffer("temp_embed", sincos(width, torch.arange(frames // tubelet))[:, None],
                             persistent=False)  # (F', 1, d)
        self.t_embed = nn.Sequential(nn.Linear(FREQ_DIM, width), nn.SiLU(), nn.Linear(width, width))
        # the label embedding has one extra row, y = K, the "null" class of classifier-free guidance
        self.y_embed = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.blocks = nn.ModuleList([FactorisedBlock(width, heads, mlp_ratio) if axis == "factorised"
                                     else LatteBlock(width, heads, axis, mlp_ratio)
                                     for axis in block_axes(variant, depth)])
        self.final = FinalLayer(width, in_channels * tubelet * patch * patch)
        self.init_weights()

    def init_weights(self):
        """As DiT's official code: Xavier-uniform linears (and the patch embedding, seen as one) with zero
        bias, N(0, 0.02) embeddings, and zero for every adaLN modulation and the final layer (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for m in self.t_embed[::2]:
            nn.init.normal_(m.weight, std=0.02)
        zeroed = [m.adaLN_modulation[-1] for m in self.modules() if hasattr(m, "adaLN_modulation")]
        for m in (*zeroed, self.final.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, t, y=None):
        x = self.x_embed(x.transpose(1, 2))  # (B, d, F', h, w): one token per tubelet
        x = x.flatten(3).permute(0, 2, 3, 1) + self.pos_embed + self.temp_embed  # (B, F', N, d)
        c = self.t_embed(timestep_embedding(t, FREQ_DIM))  # (B, d)
        if self.y_embed is not None:
            y = torch.full_like(t, self.num_classes).long() if y is None else y  # (B,): None is the null class
            c = c + self.y_embed(y)  # (B, d): c = t_emb + y_emb
        for block in self.blocks:
            x = block(x, c)  # (B, F', N, d)
        x = self.final(x, c)  # (B, F', N, C t p p)
        return unpatchify(x, self.patch, self.tubelet, self.in_channels)  # (B, F, C, H, W)


def multiply_adds(f, *args):
    """Multiply-adds of f(*args), in billions (torch's counter reports 2 flops per multiply-add;
    attention is counted through its matmuls)."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        f(*args)
    return counter.get_total_flops() / 2e9


def gflops(net, shape, y=None):
    """Gflops of one forward pass of one clip of `shape` (F, C, H, W), counted as DiT counts them."""
    return multiply_adds(net, torch.zeros(1, *shape), torch.full((1,), 500), y)


# The objective (DDPM's Algorithm 1, with the label dropped for classifier-free guidance)

def loss(model, x0, y, t, eps, sch):
    """Algorithm 1, line 5, per clip: ||eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,
    t, y)||^2 (mean over the clip's values), for the draws t and eps."""
    return (eps - model(q_sample(x0, t, eps, sch), t, y)).square().flatten(1).mean(1)


def training_step(model, x0, y, sch, draw, null=None, p_uncond=0.1):
    """Algorithm 1, lines 2-5, for a batch of clips x_0 (B, F, C, H, W) with labels y (None:
    unconditional; `null`: the null class K), its random draws from `draw` (.rand(), .randint(low,
    high), .randn(*shape): one per clip); the caller takes the gradient step."""
    # line 2: y = null with probability p_uncond (Ho & Salimans 2022, Algorithm 1, line 3)
    drop = draw.rand() < p_uncond
    if y is not None:
        y = torch.where(drop, null, y)
    # line 3: t ~ Uniform({1, ..., T})
    t = draw.randint(1, sch.T + 1)
    # line 4: eps ~ N(0, I)
    eps = draw.randn(*x0.shape[1:])
    # line 5: the gradient step's objective
    return loss(model, x0, y, t, eps, sch).mean()


# The sampler: classifier-free guidance and DDIM

def guided(model, y, scale):
    """Sampling, line 3 (Ho & Salimans 2022; DiT Sec. 3.1): eps = eps(x, null) + s (eps(x, y) - eps(x, null));
    s = 1 is the conditional model, s = 0 the unconditional one."""
    def f(x, t):
        if y is None or scale == 1:
            return model(x, t, y)
        eps_y, eps_null = model(torch.cat([x, x]), torch.cat([t, t]),
                                torch.cat([y, torch.full_like(y, model.num_classes)])).chunk(2)
        return eps_null + scale * (eps_y - eps_null)
    return f


@torch.no_grad()
def sample_ddim(f, shape, sch, steps, clip_x0=True, device="cpu", generator=None, on_step=None):
    """Sampling, lines 1-6: DDIM (Song et al. 2021, Eq. 12, eta = 0; DDIM's alpha is DDPM's alpha_bar)
    from x_T drawn with `generator`. on_step(x, done, total), if given, follows every step."""
    taus = ddim_timesteps(sch.T, steps)
    # line 1: x_T ~ N(0, I)
    x = torch.randn(shape, device=device, generator=generator)
    # line 2: for t = tau_S, ..., tau_1 (and tau_0 = 0: no noise)
    for done, (t, t_prev) in enumerate(zip(reversed(taus), [*reversed(taus[:-1]), 0]), 1):
        tt = torch.full((shape[0],), t, device=device)
        # line 3: the guided eps
        eps = f(x, tt)
        # line 4: the predicted x_0, clipped to the data's [-1, 1] with eps made consistent with it
        x0 = predict_x0(x, tt, eps, sch)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = (x - sch.alpha_bar[t].sqrt().item() * x0) / (1 - sch.alpha_bar[t]).sqrt().item()
        # line 5: x_prev = sqrt(alpha_bar_prev) x_0 + sqrt(1 - alpha_bar_prev) eps
        x = sch.alpha_bar[t_prev].sqrt().item() * x0 + (1 - sch.alpha_bar[t_prev]).sqrt().item() * eps
        if on_step:
            on_step(x, done, len(taus))
    return x


# Video measures: does a clip keep one object and move it as the data moves?

def temporal_consistency(labels):
    """The share of clips a classifier puts in one class in every frame: labels (B, F) predicted per frame."""
    return (labels == labels[:, :1]).all(1).float().mean().item()


def centre_of_mass(clips):
    """(B, F, C, H, W) in [-1, 1] -> (B, F, 2): each frame's brightness-weighted (row, column), black
    (-1) weighing nothing."""
    w = (clips + 1).sum(2)  # (B, F, H, W)
    mass = w.sum((2, 3)).clamp(min=1e-8)
    rows = (w.sum(3) * torch.arange(w.shape[2], device=w.device)).sum(2) / mass
    cols = (w.sum(2) * torch.arange(w.shape[3], device=w.device)).sum(2) / mass
    return torch.stack([rows, cols], -1)


def bounce_fit(path, travel, max_speed=4.0, grid=4):
    """The RMS distance (B,) of paths (B, F) (one coordinate per frame) to the nearest straight path
    bouncing between two walls `travel` apart, o + bounce(p_0 + v f, travel): p_0 and v searched on a
    grid of 1/grid pixel, the offset o fitted by least squares."""
    p0 = torch.arange(0, travel * grid + 1) / grid
    v = torch.arange(-max_speed * grid, max_speed * grid + 1) / grid
    f = torch.arange(path.shape[1])
    model = bounce(p0[:, None, None] + v[None, :, None] * f, travel).flatten(0, 1)  # (candidates, F)
    r = path[:, None].cpu() - model[None]  # (B, candidates, F)
    r = r - r.mean(-1, keepdim=True)  # the best offset o
    return r.square().mean(-1).min(1).values.sqrt()


def motion(clips, travel, max_speed=4.0):
    """The motion of clips (B, F, C, H, W): (residual, speed), each (B,): how far the centre of mass is
    from a straight bouncing path (the mean of the two coordinates' bounce_fit, in pixels) and how far
    it moves a frame (pixels). A clip that stands still fits perfectly: read the two together."""
    com = centre_of_mass(clips).float()  # (B, F, 2)
    residual = (bounce_fit(com[..., 0], travel, max_speed) + bounce_fit(com[..., 1], travel, max_speed)) / 2
    speed = (com[:, 1:] - com[:, :-1]).norm(dim=-1).mean(1)
    return residual, speed.cpu()


def save_gif(clips, path, nrow=None, fps=4):
    """An animated GIF of clips (N, F, C, H, W) in [-1, 1]: frame f shows every clip's frame f in one grid."""
    from PIL import Image  # torchvision's dependency; only this function needs it
    nrow = nrow or math.ceil(math.sqrt(len(clips)))
    frames = []
    for f in range(clips.shape[1]):
        grid = torchvision.utils.make_grid(((clips[:, f].detach().float().cpu() + 1) / 2).clamp(0, 1), nrow=nrow,
                                           pad_value=1.0)  # (3, H', W') in [0, 1]
        frames.append(Image.fromarray((grid * 255).round().byte().permute(1, 2, 0).numpy()))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=1000 // fps, loop=0)


def save_strip(clips, path):
    """A PNG of clips (N, F, C, H, W) in [-1, 1]: one row of F frames per clip."""
    save_grid(clips.flatten(0, 1), path, nrow=clips.shape[1])


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

KEYS = ("classes", "model", "ema", "optimizer")  # of a latte.py checkpoint, besides the harness's
CLIPS_PER_CLASS = 4  # the columns of the epoch's GIF, one row per class


def model_name(s):
    """S/2, B/4, XL/2, T/4 ... (DiT's Table 1 size / the patch size) or a size alone (patch 2)."""
    size, _, patch = s.upper().partition("/")
    if size not in MODELS or (patch and not (patch.isdigit() and int(patch) > 0)):
        raise argparse.ArgumentTypeError(f"unknown model {s!r}: use SIZE/PATCH with SIZE one of "
                                         f"{', '.join(MODELS)} (e.g. T/4, S/2, XL/2)")
    return f"{size}/{patch or 2}"


def fill_model_defaults(args):
    """The model name's patch, depth, width and heads where no flag overrides them."""
    size, patch = args.model.split("/")
    depth, width, heads = MODELS[size]
    args.patch, args.depth = args.patch or int(patch), args.depth or depth
    args.width, args.heads = args.width or width, args.heads or heads


def load_data(args):
    """Clips (F, C, H, W) and their DataInfo: a tensor file's, or --dataset's images moving on a
    --canvas for --frames frames."""
    if args.dataset.endswith(".pt"):
        dataset, info = load_clips(args.dataset)
        given = [f"--{k.replace('_', '-')}" for k in ("frames", "canvas", "image_size") if getattr(args, k)]
        if given:
            raise UserError(f"{' and '.join(given)} make moving clips of images, but {args.dataset} holds clips "
                            f"of {info.frames} frames of {info.size}x{info.size} already: leave {given[0]} out")
        return dataset, info
    args.frames, args.canvas = args.frames or 8, args.canvas or 40
    return load_clips(args.dataset, args.data_dir, True, args.frames, args.canvas, image_size=args.image_size)


def check_tiles(args, shape):
    """--patch tiles each frame and --tubelet each clip (F, C, H, W), or one line."""
    frames, size = shape[0], shape[-1]
    if size % args.patch:
        fits = [p for p in range(1, size + 1) if size % p == 0]
        raise UserError(f"--patch {args.patch} does not divide the {size}x{size} frames: use one of {fits}")
    if frames % args.tubelet:
        fits = [t for t in range(1, frames + 1) if frames % t == 0]
        raise UserError(f"--tubelet {args.tubelet} does not divide the {frames} frames of each clip: "
                        f"use one of {fits}")


def make_model(args, shape, num_classes):
    return Latte(shape[1], shape[-1], shape[0], args.patch, args.tubelet, args.depth, args.width, args.heads,
                 num_classes, args.variant)


def sampling_steps(args, T):
    """--sampling-steps, or DDIM's 50 (T if smaller)."""
    return args.sampling_steps or min(50, T)


def draw(ema, y, n, shape, sch, args, device, seed, scale, on_step=None):
    """n clips from fixed noise (seed) of classes y (None: unconditional), DDIM guided at `scale`."""
    g = torch.Generator(device).manual_seed(seed)
    x = sample_ddim(guided(ema, y, scale), (n, *shape), sch, sampling_steps(args, sch.T), args.clip_x0, device, g,
                    on_step)
    return x.clamp(-1, 1) if args.clip_x0 else x


def pictures(run, classes, sch, data_motion, epoch, progress):
    """The epoch's clips (EMA weights, fixed noise): a GIF with one row per class (the first 10) of
    CLIPS_PER_CLASS clips, or 16 unconditional clips; a PNG strip of each row's first clip, frame by
    frame; and, for moving images, the samples' motion beside the data's."""
    ema, args = run.ema.eval(), run.args
    y = torch.arange(min(len(classes), 10), device=run.device).repeat_interleave(CLIPS_PER_CLASS) if classes else None
    x = draw(ema, y, 16 if y is None else len(y), run.shape, sch, args, run.device, 0, args.cfg_scale, progress)
    path = Path(args.out) / f"samples_epoch{epoch + 1:03d}"
    save_gif(x[:, :, :3], path.with_suffix(".gif"), nrow=CLIPS_PER_CLASS)
    save_strip(x[::CLIPS_PER_CLASS, :, :3], path.with_suffix(".png"))
    note = ""
    if data_motion is not None:
        residual, speed = motion(x, run.dataset.travel)
        note = (f"; motion {residual.mean():.2f} px off a bouncing path at {speed.mean():.2f} px a frame "
                f"(data: {data_motion[0]:.2f} px at {data_motion[1]:.2f})")
    print(f"epoch {epoch + 1}: clips in {path}.gif, frames in {path}.png{note}")


def train_command(args, p):
    run = begin(args, p, "latte", KEYS)
    args = run.args
    sch = linear_schedule(args.T)
    ddim_timesteps(sch.T, sampling_steps(args, sch.T))  # a clear error before any work
    if run.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    run.dataset, info = load_data(args)
    run.shape, classes = (info.frames, info.channels, info.size, info.size), info.classes if info.num_classes else None
    fill_model_defaults(args)
    check_tiles(args, run.shape)
    # pixels live in [-1, 1] and the predicted x_0 is clipped there; a tensor file's float clips (latents) are not
    held = getattr(run.dataset, "images", None)  # a tensor file's clips (MovingClips hold a data set of images)
    args.clip_x0 = not (torch.is_tensor(held) and held.is_floating_point())
    K = len(classes) if classes else None
    run.model = make_model(args, run.shape, K)
    frames, tokens = run.shape[0] // args.tubelet, (run.shape[-1] // args.patch) ** 2
    print(f"model: Latte {args.model}, Variant {args.variant} ({VARIANTS[args.variant]}), depth {args.depth}, "
          f"width {args.width}, {args.heads} heads, {frames} x {tokens} tokens, "
          f"{sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M parameters, "
          f"{gflops(run.model, run.shape, torch.zeros(1, dtype=torch.long) if K else None):.3f} Gflops a clip")
    run.model.to(run.device)
    run.ema = copy.deepcopy(run.model).requires_grad_(False)
    run.opt = torch.optim.AdamW(run.model.parameters(), lr=args.lr, weight_decay=0)
    run.extra = lambda: {"classes": classes}
    run.loss = lambda batch, draws: training_step(run.net, batch[0], batch[1] if K else None, sch, draws, K,
                                                  args.p_uncond)
    data_motion = None  # moving images' motion, on the first 64 clips: what the samples' should be
    if hasattr(run.dataset, "travel"):
        clips = torch.stack([run.dataset[i][0] for i in range(min(64, len(run.dataset)))])
        data_motion = [m.mean().item() for m in motion(clips, run.dataset.travel)]
    run.pictures = lambda epoch, progress: pictures(run, classes, sch, data_motion, epoch, progress)
    train(run)


def sample(args):
    columns = []  # the checkpoint's classes, once loaded: one column of the GIF per class

    def load(ckpt, device):
        train_args = argparse.Namespace(**{**ckpt["args"], "sampling_steps": args.sampling_steps})
        classes, shape = ckpt["classes"], tuple(ckpt["shape"])
        sch = linear_schedule(train_args.T)
        ddim_timesteps(sch.T, sampling_steps(train_args, sch.T))  # a clear error before any work
        ema = make_model(train_args, shape, len(classes) if classes else None)
        ema.load_state_dict(ckpt["ema"])
        ema.to(device).eval()
        columns.append(len(classes) if classes else None)

        def draw_chunk(first, n, progress):  # the classes in turn
            y = torch.arange(first, first + n, device=device) % len(classes) if classes else None
            return draw(ema, y, n, shape, sch, train_args, device, args.seed + first, args.cfg_scale, progress)
        return ema, draw_chunk

    def write(x, path):
        """.gif: the clips animated in one grid; .png: one row of frames per clip; .pt: (N, F, C, H, W)."""
        if path.endswith(".pt"):
            torch.save(x, path)
        elif path.endswith(".gif"):
            save_gif(x[:, :, :3], path, nrow=columns[0])
        else:
            save_strip(x[:, :, :3], path)
    write.suffixes = (".gif",)

    sample_command(args, ["latte"], KEYS, load, write=write)


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    shared_flags(p, "runs/latte", lr=1e-4, batch_size=32)
    p.add_argument("--model", type=model_name, default="T/4", help="T/4 (default), S/2, B/2, L/2, XL/2, ...")
    p.add_argument("--patch", type=positive_int, help="patch size p (overrides the model name's)")
    p.add_argument("--tubelet", type=positive_int, default=1,
                   help="frames t of a tubelet (1: uniform frame patches; more: compression frame patches)")
    p.add_argument("--depth", type=positive_int, help="blocks (overrides the model's)")
    p.add_argument("--width", type=positive_int, help="hidden size d (overrides the model's)")
    p.add_argument("--heads", type=positive_int, help="attention heads (overrides the model's)")
    p.add_argument("--variant", type=int, choices=sorted(VARIANTS), default=1,
                   help="; ".join(f"{k}: {v}" for k, v in VARIANTS.items()))
    p.add_argument("--frames", type=positive_int, help="frames F of a moving-image clip (default 8)")
    p.add_argument("--canvas", type=positive_int, help="side of a moving-image clip's frames (default 40)")
    p.add_argument("--T", type=positive_int, default=1000)
    p.add_argument("--sampling-steps", type=positive_int, help="DDIM steps S (default 50, or T if smaller)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="guidance s (1: none)")
    p.add_argument("--p-uncond", type=float, default=0.1, help="label dropout for guidance")
    p.epilog = "--save FILE.gif (the clips animated), FILE.png (one row of frames per clip) or FILE.pt"
    return p


def parse_args(argv=None, p=None):
    p = p or parser()
    args = p.parse_args(argv)
    check_shared_flags(p, args)
    if args.sampling_steps is not None and args.sampling_steps > args.T:
        p.error(f"--sampling-steps must be between 1 and --T ({args.T}), got {args.sampling_steps}")
    if not 0 <= args.p_uncond < 1:
        p.error(f"--p-uncond must be in [0, 1), got {args.p_uncond}")
    if args.cfg_scale < 0:
        p.error(f"--cfg-scale must be >= 0, got {args.cfg_scale}")
    return args


def main(argv=None):
    p = parser()
    args = parse_args(argv, p)
    run_command(sample if args.sample else lambda a: train_command(a, p), args)


if __name__ == "__main__":
    main()
