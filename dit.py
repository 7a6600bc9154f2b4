"""Scalable Diffusion Models with Transformers (Peebles & Xie 2023, arXiv:2212.09748).

DiT keeps DDPM's diffusion and replaces its U-Net with a Vision Transformer. The image (or an
autoencoder's latent) is cut into p x p patches, each patch becomes a token, and a stack of
transformer blocks predicts the noise of every patch. The time step t and the class y enter each
block through adaptive layer norm: a small network regresses a shift, a scale and a gate from
c = t_emb + y_emb, and the gates start at zero, so every block starts as the identity (adaLN-Zero,
Sec. 3.2, Fig. 3). The paper's finding: forward-pass Gflops, not parameters, predict quality, and
the cheapest way to buy Gflops is more tokens (a smaller p). (SD3's two-stream MM-DiT, trained
with rectified flow, is mmdit.py.)

    Training (DDPM's Algorithm 1, with the learned     Sampling (DDPM's Algorithm 2 on a chain
    covariance of Nichol & Dhariwal 2021):             respaced to 250 steps, Sec. 4)
    1: x_0 ~ q(x_0), y ~ labels; y = null w.p. 0.1     1: x_T ~ N(0, I)
    2: t ~ Uniform({1, ..., T}), eps ~ N(0, I)         2: for t = T, ..., 1 (respaced) do
    3: eps_theta, v = DiT(sqrt(alpha_bar_t) x_0        3:   eps = eps_theta(x_t, null)
         + sqrt(1 - alpha_bar_t) eps, t, y)                   + s (eps_theta(x_t, y) - eps_theta(x_t, null))
    4: Sigma_theta = exp(f log beta_t                  4:   x_{t-1} = mu_theta(x_t, eps)
         + (1 - f) log beta_tilde_t),                              + Sigma_theta^(1/2) z
         f = (v + 1) / 2 (the official mapping)
    5: L_hybrid = ||eps - eps_theta||^2                5: end for
         + lambda L_vlb(stopgrad(mu_theta), Sigma)

DiT's time runs as in DDPM: t = 1..T, and alpha_bar[t] is the paper's alpha_bar_t, alpha_bar[0] = 1
(the official code counts t - 1 = 0..999).

Run:
    python dit.py --epochs 10                                  # DiT-S/2 on Fashion-MNIST
    python dit.py --model B/4 --block in-context --steps 2000  # the paper's ablations in small
    python dit.py --sample --ckpt runs/dit/ckpt.pt --n 64 --cfg-scale 4 --save samples.png
    torchrun --standalone --nproc_per_node 8 dit.py --model XL/2 --batch-size 256 --bf16 ...
    CPU recipe (15 minutes on 2 cores, garments of every class; see docs/dit.md):
    python dit.py --model T/4 --batch-size 64 --lr 1e-3 --warmup 100 --lr-decay cosine \\
                  --steps 1800 --ema 0.999 --sampling-steps 100

Outputs in --out (runs/dit): samples_epochNNN.png per epoch (EMA weights, fixed noise; with
classes one column per class and one row per guidance scale 1, 1.5, 2, 4), ckpt.pt.

Differences from the paper:
- Pixels by default; latents through --dataset FILE.pt (a saved tensor: see README.md).
- A small T config (6 blocks, width 192) for CPUs; the EMA decay warms up as in ddpm.py; an
  optional learning-rate warm-up (at most a tenth of the run) and cosine decay (the paper:
  constant 1e-4, no warm-up).
- Gradients are clipped at norm 1 by default (--grad-clip 0 turns it off, as the paper).
- With --dataset FILE.pt of float latents, L_vlb's t = 1 term (the decoder NLL, DDPM Eq. 13) still
  bins every value as an 8-bit pixel of [-1, 1] (bins 2/255 wide), as the official DiT does on its
  latents, so its bits per dimension are no likelihood of the latents.
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
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from torch.utils.flop_counter import FlopCounterMode

from common import UserError, load_dataset, pick_device, save_grid, seed_everything, timestep_embedding

# ==== the paper ====================================================================================

MODELS = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16),
          "T": (6, 192, 3)}  # Table 1: (depth N, width d, heads); T is this file's CPU size
FREQ_DIM = 256  # the sinusoidal time features before the time MLP, as the official code


# Diffusion with a learned variance (DDPM, Nichol & Dhariwal 2021): no network needed

class Schedule:
    """beta_t, alpha_bar_t and beta_tilde_t (DDPM Eq. 7) in float64, indexed by t (0: no noise)."""

    def __init__(self, beta):  # beta: (T,) for t = 1..T
        self.T = len(beta)
        self.beta = torch.cat([torch.zeros(1, dtype=torch.float64), beta])
        self.alpha = 1 - self.beta
        self.alpha_bar = torch.cumprod(self.alpha, dim=0)
        self.beta_tilde = torch.zeros_like(self.beta)
        self.beta_tilde[1:] = (1 - self.alpha_bar[:-1]) / (1 - self.alpha_bar[1:]) * self.beta[1:]
        # log beta_tilde with beta_tilde_1 = 0 replaced by beta_tilde_2, as Nichol & Dhariwal's code
        first = self.beta_tilde[2:3] if self.T > 1 else self.beta[1:2]
        self.log_beta_tilde = torch.cat([first, first, self.beta_tilde[2:]]).log()


def linear_schedule(T=1000):
    """DDPM Sec. 4, as DiT: beta from 1e-4 to 0.02 over T = 1000 (rescaled by 1000 / T for other T)."""
    s = 1000 / T
    return Schedule(torch.linspace(s * 1e-4, s * 0.02, T, dtype=torch.float64).clamp(max=0.999))


def respace(sch, steps):
    """A chain on `steps` of the T times, evenly spread, ending at T: the same alpha_bar at the kept
    times, so beta_i = 1 - alpha_bar[tau_i] / alpha_bar[tau_{i-1}]. Returns (schedule, taus)."""
    if not 1 <= steps <= sch.T:
        raise UserError(f"--sampling-steps must be between 1 and T = {sch.T}, got {steps}")
    taus = torch.linspace(1, sch.T, steps, dtype=torch.float64).round().long().unique() if steps > 1 \
        else torch.tensor([sch.T])
    ab = sch.alpha_bar[taus]
    return Schedule(1 - ab / torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])), taus.tolist()


def extract(a, t, x):
    """a[t] for a batch of times t, as float32 on x's device, shaped to broadcast against x."""
    return a.to(x.device)[t].float().view(-1, *([1] * (x.dim() - 1)))


def q_sample(x0, t, eps, sch):
    """DDPM Eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
    return extract(sch.alpha_bar.sqrt(), t, x0) * x0 + extract((1 - sch.alpha_bar).sqrt(), t, x0) * eps


def predict_x0(x_t, t, eps, sch):
    """DDPM Eq. 4 solved for x_0."""
    return (x_t - extract((1 - sch.alpha_bar).sqrt(), t, x_t) * eps) / extract(sch.alpha_bar.sqrt(), t, x_t)


def q_posterior_mean(x0, x_t, t, sch):
    """DDPM Eq. 7: the mean of q(x_{t-1} | x_t, x_0)."""
    ab, ab_prev, zero = sch.alpha_bar[1:], sch.alpha_bar[:-1], torch.zeros(1, dtype=torch.float64)
    coef_x0 = torch.cat([zero, ab_prev.sqrt() * sch.beta[1:] / (1 - ab)])
    coef_xt = torch.cat([zero, sch.alpha[1:].sqrt() * (1 - ab_prev) / (1 - ab)])
    return extract(coef_x0, t, x_t) * x0 + extract(coef_xt, t, x_t) * x_t


def p_mean_variance(out, x_t, t, sch, learn_sigma, clip_x0=False):
    """The reverse step p(x_{t-1} | x_t) from the network's output: (mean, log variance). With
    learn_sigma the output is (eps, v), and Nichol & Dhariwal's Eq. 15 interpolates
    log Sigma = f log beta_t + (1 - f) log beta_tilde_t, f = (v + 1) / 2 (their code's mapping, so
    that an output in [-1, 1] spans the range); without it the variance is beta_t."""
    C = x_t.shape[1]
    log_beta = extract(sch.beta.clamp(min=1e-20).log(), t, x_t)
    if learn_sigma:
        f = (out[:, C:] + 1) / 2
        log_var = f * log_beta + (1 - f) * extract(sch.log_beta_tilde, t, x_t)
    else:
        log_var = log_beta.expand_as(x_t)
    x0 = predict_x0(x_t, t, out[:, :C], sch)
    if clip_x0:  # pixels live in [-1, 1]; latents are not clipped (the official code never clips)
        x0 = x0.clamp(-1, 1)
    return q_posterior_mean(x0, x_t, t, sch), log_var


def normal_kl(mean1, log_var1, mean2, log_var2):
    """KL(N(mean1, var1) || N(mean2, var2)) per element."""
    return 0.5 * (log_var2 - log_var1 - 1 + (log_var1 - log_var2).exp()
                  + (mean1 - mean2).square() * (-log_var2).exp())


def decoder_nll(x0, mean, log_var):
    """-log p(x_0 | x_1) per element for 8-bit data in [-1, 1] (DDPM Eq. 13): the Gaussian's mass on
    each pixel's bin of width 2/255, the outermost bins reaching to -inf and +inf."""
    inv_std = (-0.5 * log_var).exp()
    cdf_plus = torch.special.ndtr(inv_std * (x0 - mean + 1 / 255))
    cdf_minus = torch.special.ndtr(inv_std * (x0 - mean - 1 / 255))
    p = torch.where(x0 < -0.999, cdf_plus, torch.where(x0 > 0.999, 1 - cdf_minus, cdf_plus - cdf_minus))
    return -p.clamp(min=1e-12).log()


def vlb_term(out, x0, x_t, t, sch):
    """L_t of the variational bound in bits per dimension: KL(q(x_{t-1} | x_t, x_0) || p_theta) for
    t > 1 (DDPM Eq. 5), the decoder's -log p(x_0 | x_1) for t = 1."""
    mean, log_var = p_mean_variance(out, x_t, t, sch, learn_sigma=True)
    true_mean, true_log_var = q_posterior_mean(x0, x_t, t, sch), extract(sch.log_beta_tilde, t, x_t)
    kl = normal_kl(true_mean, true_log_var, mean, log_var).flatten(1).mean(1)
    nll = decoder_nll(x0, mean, log_var).flatten(1).mean(1)
    return torch.where(t == 1, nll, kl) / math.log(2)


# The network: patches, adaLN-Zero blocks and Fig. 3's other designs, DiT (Sec. 3.2)

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
    """adaLN: the layer norm's output shifted and scaled by values regressed from c."""
    return x * (1 + scale) + shift


def mlp(d, ratio):
    return nn.Sequential(nn.Linear(d, int(d * ratio)), nn.GELU(approximate="tanh"), nn.Linear(int(d * ratio), d))


class Attention(nn.Module):
    """Multi-head attention of x (B, N, d) over itself or, given ctx (B, M, d), over ctx."""

    def __init__(self, d, heads, cross=False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, d if cross else 3 * d)  # cross-attention: q alone, k and v from ctx
        self.kv = nn.Linear(d, 2 * d) if cross else None
        self.proj = nn.Linear(d, d)

    def split(self, a):  # (B, N, k d) -> (B, heads, N, k d / heads)
        return a.reshape(a.shape[0], a.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, x, ctx=None):
        if ctx is None:
            q, k, v = self.split(self.qkv(x)).chunk(3, -1)
        else:
            q, (k, v) = self.split(self.qkv(x)), self.split(self.kv(ctx)).chunk(2, -1)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))  # (B, N, d)


class DiTBlock(nn.Module):
    """Fig. 3, adaLN-Zero: the layer norms' shift and scale and the residual branches' gates are
    regressed from c; init_weights zeroes the regression, so the gates are 0 and the block is the
    identity at the start."""
    zero_init = True

    def __init__(self, d, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = mlp(d, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c):  # x: (B, N, d) tokens; c: (B, d)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(6, -1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class AdaLNBlock(DiTBlock):
    """Fig. 3, adaLN: shift and scale regressed from c, no gates, an ordinary initialisation."""
    zero_init = False

    def __init__(self, d, heads, mlp_ratio=4.0):
        super().__init__(d, heads, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 4 * d))

    def forward(self, x, c):
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c)[:, None].chunk(4, -1)
        x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class ViTBlock(nn.Module):
    """Fig. 3, in-context conditioning: a plain ViT block, c's tokens being part of the sequence;
    with cross=True, cross-attention: after self-attention the tokens attend to cond = (t_emb, y_emb)."""

    def __init__(self, d, heads, mlp_ratio=4.0, cross=False):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d, eps=1e-6), Attention(d, heads)
        self.norm_cross = nn.LayerNorm(d, eps=1e-6) if cross else None
        self.cross_attn = Attention(d, heads, cross=True) if cross else None
        self.norm2, self.mlp = nn.LayerNorm(d, eps=1e-6), mlp(d, mlp_ratio)

    def forward(self, x, cond):  # x: (B, N, d); cond: (B, 1 or 2, d)
        x = x + self.attn(self.norm1(x))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), cond)
        return x + self.mlp(self.norm2(x))


BLOCKS = {"adaln-zero": DiTBlock, "adaln": AdaLNBlock, "in-context": ViTBlock,
          "cross-attn": lambda d, heads, mlp_ratio=4.0: ViTBlock(d, heads, mlp_ratio, cross=True)}


class FinalLayer(nn.Module):
    """Layer norm (adaptive for the adaLN designs), then a zero-initialised linear decoder of each
    token into p x p x out_channels values: a fresh network outputs exactly 0."""

    def __init__(self, d, patch, out_channels, adaptive):
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=not adaptive, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d)) if adaptive else None
        self.zero_init = adaptive  # init_weights zeroes the modulation
        self.linear = nn.Linear(d, patch * patch * out_channels)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, -1) if self.zero_init else (0, 0)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """x (B, C, H, W), t (B,) in 1..T, y (B,) classes (y = K or None: the null class)
    -> (B, 2C or C, H, W): eps and, with learn_sigma, the variance interpolation v."""

    def __init__(self, in_channels, image_size, patch=2, depth=12, width=384, heads=6,
                 num_classes=None, learn_sigma=True, block="adaln-zero", mlp_ratio=4.0):
        super().__init__()
        if image_size % patch:
            fits = [p for p in range(1, image_size) if image_size % p == 0]
            raise UserError(f"--patch {patch} does not divide the {image_size}x{image_size} images: use one of {fits}")
        if width % heads or width % 4:
            raise UserError(f"width {width} must be divisible by 4 and by the {heads} heads")
        self.patch, self.num_classes, self.block = patch, num_classes, block
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.x_embed = nn.Linear(patch * patch * in_channels, width)  # the patch embedding
        h = image_size // patch
        self.register_buffer("pos_embed", pos_embed_2d(width, h, h), persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(FREQ_DIM, width), nn.SiLU(), nn.Linear(width, width))
        # the label embedding has one extra row, y = K, the "null" class of classifier-free guidance
        self.y_embed = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.blocks = nn.ModuleList([BLOCKS[block](width, heads, mlp_ratio) for _ in range(depth)])
        self.final = FinalLayer(width, patch, self.out_channels, block.startswith("adaln"))
        self.init_weights()

    def init_weights(self):
        """As the official code: Xavier-uniform linears with zero bias, N(0, 0.02) embeddings, and zero
        for adaLN-Zero's modulation and the final layer (Sec. 3.2)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for m in self.t_embed[::2]:
            nn.init.normal_(m.weight, std=0.02)
        zeroed = [m.adaLN_modulation[-1] for m in self.modules() if getattr(m, "zero_init", False)]
        for m in (*zeroed, self.final.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, t, y=None):
        N = (x.shape[-1] // self.patch) ** 2  # tokens: H W / p^2
        x = self.x_embed(patchify(x, self.patch)) + self.pos_embed  # (B, N, d)
        t_emb = self.t_embed(timestep_embedding(t, FREQ_DIM))  # (B, d)
        cond = t_emb[:, None]  # (B, 1, d): the conditioning as tokens (in-context, cross-attention)
        if self.y_embed is not None:
            y = torch.full_like(t, self.num_classes).long() if y is None else y  # (B,): None is the null class
            cond = torch.stack([t_emb, self.y_embed(y)], 1)  # (B, 2, d)
        c = cond.sum(1)  # (B, d): c = t_emb + y_emb
        if self.block == "in-context":
            x = torch.cat([cond, x], 1)  # (B, 1 or 2 + N, d)
        for block in self.blocks:
            x = block(x, c if self.block.startswith("adaln") else cond)  # (B, [1 or 2 +] N, d)
        x = self.final(x[:, -N:], c)  # (B, N, p * p * out_channels): the conditioning tokens dropped
        return unpatchify(x, self.patch, self.out_channels)  # (B, out_channels, H, W)


def gflops(net, shape, cond):
    """Multiply-adds of one forward pass of one image, in billions, as the paper counts Gflops
    (torch's counter reports 2 flops per multiply-add; attention is counted through its matmuls)."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, *shape), torch.full((1,), 500.0), cond)
    return counter.get_total_flops() / 2e9


# The objective: L_hybrid (DDPM's Algorithm 1 with Nichol & Dhariwal's learned Sigma)

def hybrid_loss(model, x0, y, t, eps, sch, learn_sigma, lambda_vlb):
    """Training, lines 3-5, per example: L_simple = ||eps - eps_theta(x_t, t, y)||^2 (mean over pixels)
    and, with learn_sigma, lambda L_vlb: Nichol & Dhariwal's L_hybrid (their Eq. 16, lambda = 0.001).
    L_vlb = sum_t L_t is estimated by T L_t at the drawn t, and trains Sigma_theta alone: the mean
    enters it through a stop-gradient of eps_theta (their Sec. 3.1)."""
    x_t = q_sample(x0, t, eps, sch)
    # line 3: eps_theta, v = DiT(x_t, t, y)
    out = model(x_t, t, y)
    C = x0.shape[1]
    # line 5: L_simple ...
    l_simple = (eps - out[:, :C]).square().flatten(1).mean(1)
    if not learn_sigma:
        return l_simple
    # line 5: ... + lambda L_vlb(stopgrad(mu_theta), Sigma_theta), Sigma_theta from v (line 4)
    frozen_mean = torch.cat([out[:, :C].detach(), out[:, C:]], dim=1)
    return l_simple + lambda_vlb * sch.T * vlb_term(frozen_mean, x0, x_t, t, sch)


def training_step(model, x0, y, sch, draw, null=None, p_uncond=0.1, learn_sigma=True, lambda_vlb=0.001):
    """Training, lines 1-5, for a batch x_0 with labels y (None: unconditional; `null`: the null
    class K), its random draws from `draw` (a Draws); the caller takes the gradient step."""
    # line 1: y = null with probability p_uncond, for classifier-free guidance
    drop = draw.rand() < p_uncond
    if y is not None:
        y = torch.where(drop, null, y)
    # line 2: t ~ Uniform({1, ..., T}), eps ~ N(0, I)
    t = draw.randint(1, sch.T + 1)
    eps = draw.randn(*x0.shape[1:])
    return hybrid_loss(model, x0, y, t, eps, sch, learn_sigma, lambda_vlb).mean()


# The samplers: classifier-free guidance, DDPM on a respaced chain, DDIM

def guided(model, y, scale):
    """Sampling, line 3, DiT Sec. 3.1: eps = eps(x, null) + s (eps(x, y) - eps(x, null)); s = 1 is the
    conditional model, s = 0 the unconditional one. Only the first C channels, the noise, are
    guided: the variance channels are the conditional model's. (The official DiT guides 3 of its 4
    latent channels, a quirk it keeps to reproduce its FID numbers; here all are guided.)"""
    def f(x, t):
        if y is None or scale == 1:
            return model(x, t, y)
        out_c, out_null = model(torch.cat([x, x]), torch.cat([t, t]),
                                torch.cat([y, torch.full_like(y, model.num_classes)])).chunk(2)
        C = x.shape[1]
        return torch.cat([out_null[:, :C] + scale * (out_c[:, :C] - out_null[:, :C]), out_c[:, C:]], 1)
    return f


@torch.no_grad()
def sample_ddpm(f, x, sch, steps, learn_sigma, clip_x0, generator=None, on_step=None):
    """Sampling, lines 1-5: DDPM's Algorithm 2 on the respaced chain from x = x_T. The network sees
    the original times tau_i; the mean and the (learned) variance use the respaced beta_i and
    beta_tilde_i (Nichol & Dhariwal). on_step(x, done, total), if given, follows every step."""
    sch_s, taus = respace(sch, steps)
    for i in range(len(taus), 0, -1):  # line 2: for t = T, ..., 1 (respaced)
        t = torch.full((len(x),), taus[i - 1], device=x.device)
        ii = torch.full((len(x),), i, device=x.device)
        # lines 3-4: the guided eps gives mu_theta, v gives Sigma_theta
        mean, log_var = p_mean_variance(f(x, t), x, ii, sch_s, learn_sigma, clip_x0)
        if i > 1:  # line 4: x_{t-1} = mu + Sigma^(1/2) z; the last step returns the mean
            x = mean + (0.5 * log_var).exp() * torch.randn(x.shape, device=x.device, generator=generator)
        else:
            x = mean
        if on_step:
            on_step(x, len(taus) - i + 1, len(taus))
    return x


@torch.no_grad()
def sample_ddim(f, x, sch, steps, clip_x0, on_step=None):
    """DDIM (Song et al. 2021, Eq. 12 with eta = 0) from the noise channels alone."""
    _, taus = respace(sch, steps)
    for done, (t, t_prev) in enumerate(zip(reversed(taus), list(reversed(taus))[1:] + [0]), 1):
        tt = torch.full((len(x),), t, device=x.device)
        eps = f(x, tt)[:, :x.shape[1]]
        x0 = predict_x0(x, tt, eps, sch)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = (x - sch.alpha_bar[t].sqrt().item() * x0) / (1 - sch.alpha_bar[t]).sqrt().item()
        x = sch.alpha_bar[t_prev].sqrt().item() * x0 + (1 - sch.alpha_bar[t_prev]).sqrt().item() * eps
        if on_step:
            on_step(x, done, len(taus))
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

KEYS = ("classes", "model", "ema", "optimizer")  # of a dit.py checkpoint, besides the harness's
GUIDANCE_ROWS = (1.0, 1.5, 2.0, 4.0)  # the rows of every class-conditional grid


def model_name(s):
    """S/2, B/4, XL/2, T/4 ... (Table 1's size / the patch size) or a size alone (patch 2)."""
    size, _, patch = s.upper().partition("/")
    if size not in MODELS or (patch and not (patch.isdigit() and int(patch) > 0)):
        raise argparse.ArgumentTypeError(f"unknown model {s!r}: use SIZE/PATCH with SIZE one of "
                                         f"{', '.join(MODELS)} (e.g. S/2, B/4, XL/2)")
    return f"{size}/{patch or 2}"


def fill_model_defaults(args):
    """The model name's patch, depth, width and heads where no flag overrides them."""
    size, patch = args.model.split("/")
    depth, width, heads = MODELS[size]
    args.patch, args.depth = args.patch or int(patch), args.depth or depth
    args.width, args.heads = args.width or width, args.heads or heads


def make_model(args, shape, num_classes):
    return DiT(shape[0], shape[-1], args.patch, args.depth, args.width, args.heads, num_classes,
               args.learn_sigma, args.block)


def sampling_steps(args):
    """--sampling-steps, or the default: 250 for DDPM (as the paper evaluates), 50 for DDIM."""
    return args.sampling_steps or min(250 if args.sampler == "ddpm" else 50, args.T)


def draw(ema, y, n, shape, sch, args, device, seed, scale, on_step=None):
    """n samples from fixed noise (seed) of classes y (None: unconditional) with the sampler of
    args, guided at `scale`."""
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(n, *shape, device=device, generator=g)
    f, steps = guided(ema, y, scale), sampling_steps(args)
    if args.sampler == "ddim":
        return sample_ddim(f, x, sch, steps, args.clip_x0, on_step)
    return sample_ddpm(f, x, sch, steps, args.learn_sigma, args.clip_x0, g, on_step)


def pictures(run, classes, sch, epoch, progress):
    """The epoch's grid: one column per class (the first 10) and one row per guidance scale, or 64
    unconditional samples."""
    ema, args = run.ema.eval(), run.args
    if classes:
        K, rows = min(len(classes), 10), []
        for r, scale in enumerate(GUIDANCE_ROWS):  # the grid's progress counted over all its rows
            rows.append(draw(ema, torch.arange(K, device=run.device), K, run.shape, sch, args, run.device, 0,
                             scale, lambda x, done, total: progress(r * total + done, len(GUIDANCE_ROWS) * total)))
        x, nrow, note = torch.cat(rows), K, f" (rows: guidance {', '.join(map(str, GUIDANCE_ROWS))})"
    else:
        x, nrow, note = draw(ema, None, 64, run.shape, sch, args, run.device, 0, 1, progress), 8, ""
    path = Path(args.out) / f"samples_epoch{epoch + 1:03d}.png"
    save_grid(x[:, :3], path, nrow=nrow)
    print(f"epoch {epoch + 1}: samples in {path}{note}")


def train_command(args, p):
    run = begin(args, p, "dit", KEYS)
    args = run.args
    sch = linear_schedule(args.T)
    respace(sch, sampling_steps(args))  # a clear error before any work
    if run.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    run.dataset, info = load_dataset(args.dataset, args.data_dir, True, args.image_size,
                                     flip=args.dataset == "cifar10")
    run.shape, classes = (info.channels, info.size, info.size), info.classes if info.num_classes else None
    fill_model_defaults(args)
    # pixels live in [-1, 1] and the predicted x_0 is clipped there; float tensors (latents) are not
    args.clip_x0 = not getattr(getattr(run.dataset, "images", None), "is_floating_point", bool)()
    K = len(classes) if classes else None
    run.model = make_model(args, run.shape, K)
    print(f"model: DiT {args.model} (depth {args.depth}, width {args.width}, {args.heads} heads, {args.block}), "
          f"{(run.shape[-1] // args.patch) ** 2} tokens, {sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M "
          f"parameters, {gflops(run.model, run.shape, torch.zeros(1, dtype=torch.long) if K else None):.3f} Gflops")
    run.model.to(run.device)
    run.ema = copy.deepcopy(run.model).requires_grad_(False)
    run.opt = torch.optim.AdamW(run.model.parameters(), lr=args.lr, weight_decay=0)
    run.extra = lambda: {"classes": classes}
    run.loss = lambda batch, draws: training_step(run.net, batch[0], batch[1] if K else None, sch, draws, K,
                                                  args.p_uncond, args.learn_sigma, args.lambda_vlb)
    run.pictures = lambda epoch, progress: pictures(run, classes, sch, epoch, progress)
    train(run)


def sample(args):
    def load(ckpt, device):
        train_args = argparse.Namespace(**{**ckpt["args"], "sampler": args.sampler,
                                           "sampling_steps": args.sampling_steps})
        classes, shape = ckpt["classes"], tuple(ckpt["shape"])
        sch = linear_schedule(train_args.T)
        respace(sch, sampling_steps(train_args))  # a clear error before any work
        fixed = None  # the class of every sample; None: the classes in turn
        if args.prompt is not None:
            if not classes:
                raise UserError(f"--prompt needs a conditional model; {args.ckpt} was trained without labels")
            if args.prompt.lower() not in [c.lower() for c in classes]:
                raise UserError(f"a DiT knows only its classes: --prompt one of {', '.join(classes)}")
            fixed = [c.lower() for c in classes].index(args.prompt.lower())
        ema = make_model(train_args, shape, len(classes) if classes else None)
        ema.load_state_dict(ckpt["ema"])
        ema.to(device).eval()

        def draw_chunk(first, n, progress):
            y = None  # an unconditional model
            if classes:
                y = torch.arange(first, first + n, device=device)
                y = y % len(classes) if fixed is None else torch.full_like(y, fixed)
            x = draw(ema, y, n, shape, sch, train_args, device, args.seed + first, args.cfg_scale, progress)
            return x.clamp(-1, 1) if train_args.clip_x0 else x
        return ema, draw_chunk

    def columns(ckpt):  # a grid of the classes in turn: one column per class
        return len(ckpt["classes"]) if ckpt["classes"] and args.prompt is None else None

    sample_command(args, ["dit"], KEYS, load, nrow=columns)


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    shared_flags(p, "runs/dit", lr=1e-4, batch_size=256)
    p.add_argument("--model", type=model_name, default="S/2", help="S/2, S/4, B/2, L/4, XL/2, T/4, ...")
    p.add_argument("--patch", type=positive_int, help="patch size p (overrides the model name's)")
    p.add_argument("--depth", type=positive_int, help="blocks N (overrides the model's)")
    p.add_argument("--width", type=positive_int, help="hidden size d (overrides the model's)")
    p.add_argument("--heads", type=positive_int, help="attention heads (overrides the model's)")
    p.add_argument("--block", choices=list(BLOCKS), default="adaln-zero", help="Fig. 3's designs")
    p.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=True,
                   help="learned Sigma_theta and L_hybrid")
    p.add_argument("--lambda-vlb", type=float, default=0.001)
    p.add_argument("--T", type=positive_int, default=1000)
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm", help="ancestral (learned Sigma) or DDIM")
    p.add_argument("--sampling-steps", type=positive_int,
                   help="default: 250 (ddpm, as the paper), 50 (ddim); at most T")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="guidance s (1: none; paper's FID: 1.5)")
    p.add_argument("--p-uncond", type=float, default=0.1, help="label dropout for guidance")
    p.add_argument("--prompt", help="with --sample: a class name")
    return p


def parse_args(argv=None, p=None):
    p = p or parser()
    args = p.parse_args(argv)
    check_shared_flags(p, args)
    if args.lambda_vlb < 0:
        p.error(f"--lambda-vlb must be >= 0, got {args.lambda_vlb}")
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
