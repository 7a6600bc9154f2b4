"""Scalable Diffusion Models with Transformers (Peebles & Xie 2023, arXiv:2212.09748).

DiT keeps DDPM's diffusion and replaces its U-Net with a Vision Transformer. The image (or an
autoencoder's latent) is cut into p x p patches, each patch becomes a token, and a stack of
transformer blocks predicts the noise of every patch. The time step t and the class y enter each
block through adaptive layer norm: a small network regresses a shift, a scale and a gate from
c = t_emb + y_emb, and the gates start at zero, so every block starts as the identity (adaLN-Zero,
Sec. 3.2, Fig. 3). The paper's finding: forward-pass Gflops, not parameters, predict quality, and
the cheapest way to buy Gflops is more tokens (a smaller p).

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
    CPU recipe (15 minutes on 2 cores, garments of every class; see README.md):
    python dit.py --model T/4 --batch-size 64 --lr 1e-3 --warmup 100 --lr-decay cosine \\
                  --steps 1800 --ema 0.999 --sampling-steps 100

Outputs in --out (runs/dit): samples_epochNNN.png per epoch (EMA weights, fixed noise; with
classes one column per class and one row per guidance scale 1, 1.5, 2, 4), ckpt.pt.

Differences from the paper:
- Pixels by default; latents through --dataset FILE.pt (a saved tensor: see README.md).
- A small T config (6 blocks, width 192) for CPUs; the EMA decay warms up as in ddpm.py; an
  optional learning-rate warm-up and cosine decay (the paper: constant 1e-4, no warm-up).
- Gradients are clipped at norm 1 by default (--grad-clip 0 turns it off, as the paper).
- With --dataset FILE.pt of float latents, L_vlb's t = 1 term (the decoder NLL, DDPM Eq. 13) still
  bins every value as an 8-bit pixel of [-1, 1] (bins 2/255 wide), as the official DiT does on its
  latents, so its bits per dimension are no likelihood of the latents.

Ctrl-C or SIGTERM ends a training run after the current step with a checkpoint; the run then
exits with status 130 (SIGINT) or 143 (SIGTERM), a finished one with 0.
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
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from torch.utils.flop_counter import FlopCounterMode

from common import UserError, load_dataset, pick_device, save_grid, seed_everything, timestep_embedding

MODELS = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16),
          "T": (6, 192, 3)}  # Table 1: (depth N, width d, heads); T is this file's CPU size
BLOCKS = ("adaln-zero", "adaln", "in-context", "cross-attn")  # Fig. 3
GUIDANCE_ROWS = (1.0, 1.5, 2.0, 4.0)  # the rows of every class-conditional grid
FREQ_DIM = 256  # the sinusoidal time embedding's width before the MLP, as the official code

# ----------------------------------------------------------------------------------------------
# Diffusion (DDPM, with Nichol & Dhariwal's learned variance): no network needed
# ----------------------------------------------------------------------------------------------


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
    return (x_t - extract((1 - sch.alpha_bar).sqrt(), t, x_t) * eps) / extract(sch.alpha_bar.sqrt(), t, x_t)


def q_posterior_mean(x0, x_t, t, sch):
    """DDPM Eq. 7: the mean of q(x_{t-1} | x_t, x_0)."""
    ab, ab_prev = sch.alpha_bar[1:], sch.alpha_bar[:-1]
    zero = torch.zeros(1, dtype=torch.float64)
    coef_x0 = torch.cat([zero, ab_prev.sqrt() * sch.beta[1:] / (1 - ab)])
    coef_xt = torch.cat([zero, sch.alpha[1:].sqrt() * (1 - ab_prev) / (1 - ab)])
    return extract(coef_x0, t, x_t) * x0 + extract(coef_xt, t, x_t) * x_t


def p_mean_variance(out, x_t, t, sch, learn_sigma, clip_x0=False):
    """The reverse step p(x_{t-1} | x_t) from the network's output: (mean, log variance).
    With learn_sigma the output is (eps, v), and Nichol & Dhariwal's Eq. 15 interpolates
    log Sigma = v log beta_t + (1 - v) log beta_tilde_t, with v read as frac = (v + 1) / 2 (their
    code's mapping, so that an output in [-1, 1] spans the range); without it the
    variance is fixed to beta_t (DDPM's sigma_t^2 = beta_t)."""
    C = x_t.shape[1]
    eps = out[:, :C]
    log_beta = extract(sch.beta.clamp(min=1e-20).log(), t, x_t)
    if learn_sigma:
        frac = (out[:, C:] + 1) / 2
        log_var = frac * log_beta + (1 - frac) * extract(sch.log_beta_tilde, t, x_t)
    else:
        log_var = log_beta.expand_as(x_t)
    x0 = predict_x0(x_t, t, eps, sch)
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


# ----------------------------------------------------------------------------------------------
# The network: DiT (Sec. 3.2)
# ----------------------------------------------------------------------------------------------

def patchify(x, p):
    """(B, C, H, W) -> (B, H/p * W/p, p * p * C): one token per p x p patch, row by row."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(tokens, p, C):
    """(B, h * w, p * p * C) -> (B, C, h p, w p), the inverse of patchify (square images)."""
    B, N, _ = tokens.shape
    h = math.isqrt(N)
    x = tokens.reshape(B, h, h, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(B, C, h * p, h * p)


def sincos_1d(dim, pos):
    """(n,) positions -> (n, dim): [sin(pos omega_i), cos(pos omega_i)], omega_i = 10000^(-2i/dim)."""
    omega = 10000 ** (-torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angle = pos.double()[:, None] * omega[None]
    return torch.cat([angle.sin(), angle.cos()], dim=1)


def pos_embed_2d(dim, h, w):
    """The fixed 2-D sine-cosine position embedding of ViT/MAE: the first half of the channels
    encodes each token's column, the second half its row. (h * w, dim), tokens row by row."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], 1).float()


def split_heads(x, heads):  # (B, N, d) -> (B, heads, N, d / heads)
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def merge_heads(x):  # (B, heads, N, d / heads) -> (B, N, d)
    return x.transpose(1, 2).flatten(2)


def modulate(x, shift, scale):
    """adaLN: the layer norm's output shifted and scaled by values regressed from c."""
    return x * (1 + scale) + shift


def mlp(d, ratio):
    hidden = int(d * ratio)
    return nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))


class TimestepEmbedder(nn.Module):
    """t -> sinusoidal features (FREQ_DIM) -> MLP -> (B, d)."""

    def __init__(self, d):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, FREQ_DIM))


class DiTBlock(nn.Module):
    """A transformer block conditioned on c by one of Fig. 3's designs:
    adaln-zero: shift, scale (of both layer norms) and gates alpha (of both residual branches)
                regressed from c, the regression zero-initialised: alpha = 0, the block is the identity;
    adaln:      shift and scale only, ordinary initialisation;
    in-context: c's two vectors are two extra tokens of the sequence (a plain ViT block here);
    cross-attn: the tokens also attend to the sequence (t_emb, y_emb) after self-attention."""

    def __init__(self, d, heads, mlp_ratio, block):
        super().__init__()
        self.block, self.heads, self.adaptive = block, heads, block.startswith("adaln")
        self.zero_init = block == "adaln-zero"  # init_weights zeroes the modulation
        self.norm1 = nn.LayerNorm(d, elementwise_affine=not self.adaptive, eps=1e-6)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=not self.adaptive, eps=1e-6)
        self.mlp = mlp(d, mlp_ratio)
        if self.adaptive:
            self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(d, (6 if block == "adaln-zero" else 4) * d))
        if block == "cross-attn":
            self.norm_cross = nn.LayerNorm(d, eps=1e-6)
            self.q, self.kv, self.proj_cross = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)

    def forward(self, x, c, cond):  # x: (B, N, d) tokens; c: (B, d); cond: (B, 1 or 2, d)
        shift1 = scale1 = shift2 = scale2 = 0
        gate1 = gate2 = 1
        if self.adaptive:
            mods = self.adaLN(c)[:, None].chunk(6 if self.block == "adaln-zero" else 4, dim=-1)
            shift1, scale1, shift2, scale2 = mods[:4]
            gate1, gate2 = mods[4:] or (1, 1)
        q, k, v = split_heads(self.qkv(modulate(self.norm1(x), shift1, scale1)), self.heads).chunk(3, -1)
        x = x + gate1 * self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))
        if self.block == "cross-attn":
            q = split_heads(self.q(self.norm_cross(x)), self.heads)
            k, v = split_heads(self.kv(cond), self.heads).chunk(2, -1)
            x = x + self.proj_cross(merge_heads(F.scaled_dot_product_attention(q, k, v)))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """Layer norm (adaptive for the adaLN designs), then a zero-initialised linear decoder of each
    token into p x p x out_channels values: a fresh network outputs exactly 0."""

    def __init__(self, d, patch, out_channels, adaptive):
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=not adaptive, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d)) if adaptive else None
        self.zero_init = adaptive
        self.linear = nn.Linear(d, patch * patch * out_channels)

    def forward(self, x, c):
        shift, scale = self.adaLN(c)[:, None].chunk(2, -1) if self.adaLN else (0, 0)
        return self.linear(modulate(self.norm(x), shift, scale))


def init_weights(net):
    """As the official code: Xavier-uniform linears with zero bias, N(0, 0.02) embeddings, and zero
    for adaLN-Zero's modulation and the final layer (Sec. 3.2)."""
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
    for m in net.t_embed.mlp[::2]:
        nn.init.normal_(m.weight, std=0.02)
    for m in net.modules():
        if getattr(m, "zero_init", False):
            nn.init.zeros_(m.adaLN[-1].weight)
            nn.init.zeros_(m.adaLN[-1].bias)
    nn.init.zeros_(net.final.linear.weight)
    nn.init.zeros_(net.final.linear.bias)


def check_shape(image_size, patch, width, heads):
    if image_size % patch:
        fits = [p for p in range(1, image_size) if image_size % p == 0]
        raise UserError(f"--patch {patch} does not divide the {image_size}x{image_size} images: "
                        f"use one of {fits}")
    if width % heads or width % 4:
        raise UserError(f"width {width} must be divisible by 4 and by the {heads} heads")


class DiT(nn.Module):
    """x (B, C, H, W), t (B,) in 1..T, y (B,) classes (y = K or None: the null class)
    -> (B, 2C or C, H, W): eps and, with learn_sigma, the variance interpolation v."""

    def __init__(self, in_channels, image_size, patch=2, depth=12, width=384, heads=6,
                 num_classes=None, learn_sigma=True, block="adaln-zero", mlp_ratio=4.0):
        super().__init__()
        check_shape(image_size, patch, width, heads)
        self.patch, self.num_classes, self.block = patch, num_classes, block
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.x_embed = nn.Linear(patch * patch * in_channels, width)  # the patch embedding
        self.register_buffer("pos_embed", pos_embed_2d(width, image_size // patch, image_size // patch),
                             persistent=False)
        self.t_embed = TimestepEmbedder(width)
        # the label embedder has one extra row, y = K, the "null" class of classifier-free guidance
        self.y_embed = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.blocks = nn.ModuleList([DiTBlock(width, heads, mlp_ratio, block) for _ in range(depth)])
        self.final = FinalLayer(width, patch, self.out_channels, block.startswith("adaln"))
        init_weights(self)

    def null_condition(self, y):
        return torch.full_like(y, self.num_classes)

    def forward(self, x, t, y=None):
        tokens = self.x_embed(patchify(x, self.patch)) + self.pos_embed  # (B, N, d)
        t_emb = self.t_embed(t)
        cond = t_emb[:, None]  # (B, 1, d): the conditioning as tokens, for in-context and cross-attn
        if self.y_embed is not None:
            y = self.null_condition(t.long()) if y is None else y
            cond = torch.stack([t_emb, self.y_embed(y)], 1)  # (B, 2, d)
        c = cond.sum(1)  # c = t_emb + y_emb
        if self.block == "in-context":
            tokens = torch.cat([cond, tokens], 1)
        for block in self.blocks:
            tokens = block(tokens, c, cond)
        if self.block == "in-context":
            tokens = tokens[:, cond.shape[1]:]  # the conditioning tokens are dropped at the end
        return unpatchify(self.final(tokens, c), self.patch, self.out_channels)


def make_model(args, shape, num_classes):
    depth, width, heads = args.depth, args.width, args.heads
    return DiT(shape[0], shape[-1], args.patch, depth, width, heads, num_classes, args.learn_sigma,
               args.block)


def gflops(net, shape, cond):
    """Multiply-adds of one forward pass of one image, in billions, as the paper counts Gflops
    (torch's counter reports 2 flops per multiply-add; attention is counted through its matmuls)."""
    x = torch.zeros(1, *shape)
    t = torch.full((1,), 500.0)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(x, t, cond)
    return counter.get_total_flops() / 2e9


# ----------------------------------------------------------------------------------------------
# The training objective: L_hybrid
# ----------------------------------------------------------------------------------------------

def hybrid_loss(model, x0, y, t, eps, sch, learn_sigma, lambda_vlb):
    """Per example: L_simple = ||eps - eps_theta(x_t, t, y)||^2 (mean over pixels) and, with
    learn_sigma, lambda L_vlb, Nichol & Dhariwal's L_hybrid (their Eq. 16, lambda = 0.001).
    L_vlb = sum_t L_t is estimated by T L_t at the drawn t, and trains Sigma_theta alone: the
    mean enters it through a stop-gradient of eps_theta (their Sec. 3.1)."""
    x_t = q_sample(x0, t, eps, sch)
    out = model(x_t, t, y)
    C = x0.shape[1]
    l_simple = (eps - out[:, :C]).square().flatten(1).mean(1)
    if not learn_sigma:
        return l_simple
    frozen_mean = torch.cat([out[:, :C].detach(), out[:, C:]], dim=1)
    return l_simple + lambda_vlb * sch.T * vlb_term(frozen_mean, x0, x_t, t, sch)


def batch_loss(model, x, y, args, sch, class_tokens, rank=0, world=1):
    """The loss of this rank's share of one global batch. Every rank draws the whole batch's t,
    noise and label dropout from the same RNG and keeps its slice, so that N processes compute
    exactly what one process computes on the joined batch."""
    b = len(x)
    mine = slice(rank * b, (rank + 1) * b)
    # Algorithm 1, line 2: eps ~ N(0, I)
    eps = torch.randn(world * b, *x.shape[1:], device=x.device)[mine]
    # Algorithm 1, line 1: y = null with probability p_uncond, for classifier-free guidance
    drop = (torch.rand(world * b, device=x.device) < args.p_uncond)[mine]
    # Algorithm 1, line 2: t ~ Uniform({1, ..., T})
    t = torch.randint(1, sch.T + 1, (world * b,), device=x.device)[mine]
    if class_tokens is not None:  # class-conditional: the null label K for a fraction p_uncond
        y = torch.where(drop, len(class_tokens), y)
    else:
        y = None
    return hybrid_loss(model, x, y, t, eps, sch, args.learn_sigma, args.lambda_vlb).mean()


# ----------------------------------------------------------------------------------------------
# Samplers: classifier-free guidance, DDPM on a respaced chain, DDIM
# ----------------------------------------------------------------------------------------------

def guided(model, cond, scale):
    """Classifier-free guidance, DiT Sec. 3.1: eps = eps(x, null) + s (eps(x, c) - eps(x, null));
    s = 1 is the conditional model, s = 0 the unconditional one. Only the first C channels, the
    noise, are guided: the variance channels are the conditional model's.
    (The official DiT guides only 3 of its 4 latent channels, a quirk it keeps to reproduce its
    FID numbers; the standard, here, guides them all.)"""
    def f(x, t):
        if cond is None or scale == 1:
            return model(x, t, cond)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, model.null_condition(cond)]))
        out_c, out_null = out.chunk(2)
        C = x.shape[1]
        return torch.cat([out_null[:, :C] + scale * (out_c[:, :C] - out_null[:, :C]), out_c[:, C:]], 1)
    return f


@torch.no_grad()
def sample_ddpm(f, x, sch, steps, learn_sigma, clip_x0, generator=None, on_step=None):
    """DDPM's Algorithm 2 on the respaced chain: the network sees the original times tau_i; the
    mean and the (learned) variance use the respaced beta_i and beta_tilde_i (Nichol & Dhariwal).
    on_step(x, done, total), if given, is called after every step."""
    sch_s, taus = respace(sch, steps)
    for i in range(len(taus), 0, -1):
        t = torch.full((len(x),), taus[i - 1], device=x.device)
        ii = torch.full((len(x),), i, device=x.device)
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


def sampling_steps(args):
    """--sampling-steps, or the default: 250 for DDPM (as the paper evaluates), 50 for DDIM and Euler."""
    return args.sampling_steps or min(250 if args.sampler == "ddpm" else 50, args.T)


def check_sampling_steps(args):
    """A clear error before any work: DiT's chain has at most T steps."""
    respace(linear_schedule(args.T), sampling_steps(args))


def draw(net, cond, n, shape, sch, args, device, seed, scale, on_step=None):
    """n samples from fixed noise (seed) with the sampler of args, guided at `scale`."""
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(n, *shape, device=device, generator=g)
    f, steps = guided(net, cond, scale), sampling_steps(args)
    if args.sampler == "ddim":
        return sample_ddim(f, x, sch, steps, args.clip_x0, on_step)
    return sample_ddpm(f, x, sch, steps, args.learn_sigma, args.clip_x0, g, on_step)


def class_tokens_of(classes, args):
    """Per class, what the network is conditioned on: its label."""
    if not classes:
        return None
    return torch.arange(len(classes))


def conditions(ids, class_tokens, args):
    """Class ids -> what the network takes: the labels."""
    if class_tokens is None:
        return None
    return ids


# ----------------------------------------------------------------------------------------------
# Training loop: many GPUs, EMA, learning rate, logging, checkpoints, grids
# ----------------------------------------------------------------------------------------------

def setup_distributed(device_name):
    """Many GPUs: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is one process
    (rank 0 of 1). NCCL on GPUs, gloo on CPUs. Ranks > 0 print nothing."""
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
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    print(f"distributed: {world} processes ({dist.get_backend()})")
    return rank, world, device


def all_sum(x, world):
    """The sum of a tensor over all ranks (itself for one process)."""
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


@torch.no_grad()
def ema_update(ema, model, n, max_decay):
    """EMA of the weights with a warm-up of the decay, min(max_decay, (1 + n) / (10 + n))."""
    decay = min(max_decay, (1 + n) / (10 + n))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def learning_rate(args, step, total):
    """Constant (the paper), after an optional linear warm-up, or with a cosine decay to 0."""
    lr = args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr
    if args.lr_decay == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * step / total))
    return lr


def save_checkpoint(path, model, ema, opt, step, args, shape, classes):
    state = {"method": "dit", "args": vars(args), "shape": list(shape), "classes": classes,
             "step": step, "model": model.state_dict(), "ema": ema.state_dict(),
             "optimizer": opt.state_dict(),
             # every rank's RNGs are in the same state (see batch_loss): rank 0's serve them all
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
        raise UserError(f"no checkpoint at {path}: train first (python dit.py) or pass --ckpt PATH")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}): it is damaged or "
                        f"incomplete (a copy cut short?), or not a checkpoint at all") from None
    if not isinstance(ckpt, dict) or ckpt.get("method") != "dit":
        method = ckpt.get("method", "unknown") if isinstance(ckpt, dict) else "unknown"
        raise UserError(f"{path} is a checkpoint of {method}, not of dit.py")
    missing = [k for k in ("args", "shape", "classes", "step", "model", "ema", "optimizer", "rng")
               if k not in ckpt]
    if missing:
        raise UserError(f"{path} is an incomplete dit.py checkpoint: no {', '.join(missing)}")
    return ckpt


def epoch_batches(dataset, args, epoch, skip, rank, world):
    """This rank's part of epoch `epoch`'s shuffled global batches from the `skip`-th on: the same
    order on every run and every rank (a DistributedSampler that can start mid-epoch)."""
    g = torch.Generator().manual_seed(args.seed * 100003 + epoch)
    order = torch.randperm(len(dataset), generator=g)[skip * args.batch_size:]
    n = len(order) // args.batch_size * args.batch_size
    b = args.batch_size // world
    mine = order[:n].view(-1, world, b)[:, rank].flatten()  # rank r: slice r of each global batch
    # its own generator: a DataLoader otherwise draws a seed from the global RNG, and a resumed
    # run, which starts one more loader, would then draw other t and eps
    return DataLoader(Subset(dataset, mine.tolist()), b, drop_last=True, generator=g)


def train(args):
    rank, world, device = setup_distributed(args.device)
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.ckpt or Path(args.out) / "ckpt.pt")
        for flag, given in (("dataset", args.dataset),):
            if given is not None and given != ckpt["args"][flag]:
                raise UserError(f"the run was trained with --{flag} {ckpt['args'][flag]}; --resume keeps it "
                                f"(leave out --{flag}, or start a new run with another --out)")
        keep = {k: getattr(args, k) for k in ("device", "out", "resume", "ckpt", "data_dir", "dataset",
                                              "image_size")
                if getattr(args, k) is not None}
        if args.epochs is not None or args.steps is not None:  # a new length for the run
            keep["epochs"], keep["steps"] = args.epochs, args.steps
        args = argparse.Namespace(**{**ckpt["args"], **keep})
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} (the global batch) must divide evenly over "
                        f"{world} processes")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder for the run's outputs")
    seed_everything(args.seed)  # the same on every rank: see batch_loss
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dataset, info = load_dataset(args.dataset, args.data_dir, True, args.image_size,
                                 flip=args.dataset == "cifar10")
    shape = (info.channels, info.size, info.size)
    if ckpt is not None and tuple(ckpt["shape"]) != shape:
        raise UserError(f"the checkpoint was trained on {tuple(ckpt['shape'])} data, "
                        f"{args.dataset} has {shape}: use the same --dataset and --image-size")
    if len(dataset) < args.batch_size:
        raise UserError(f"{args.dataset} has {len(dataset)} images, fewer than --batch-size {args.batch_size}")
    classes = info.classes if info.num_classes else None
    # pixels live in [-1, 1] and the predicted x_0 is clipped there; float tensors (latents) are not
    args.clip_x0 = not getattr(getattr(dataset, "images", None), "is_floating_point", bool)()
    class_tokens = class_tokens_of(classes, args)
    sch = linear_schedule(args.T)

    model = make_model(args, shape, len(classes) if classes else None)
    cond = conditions(torch.zeros(1, dtype=torch.long), class_tokens, args)
    print(f"model: DiT {args.model} (depth {args.depth}, width {args.width}, {args.heads} heads, "
          f"{args.block}), {(shape[-1] // args.patch) ** 2} "
          f"tokens, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{gflops(model, shape, cond):.3f} Gflops per forward pass")
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)  # starts as an exact copy
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0)
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
        if world > 1 else model
    out.mkdir(parents=True, exist_ok=True)
    stop = []  # the signal: Ctrl-C or SIGTERM finishes the current step, saves, and exits 128 + it
    handlers = {s: signal.signal(s, lambda signum, _: stop.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    run = argparse.Namespace(args=args, model=model, ddp=ddp, ema=ema, opt=opt, sch=sch, shape=shape,
                             classes=classes, class_tokens=class_tokens, device=device, rank=rank,
                             world=world, path=out / "ckpt.pt", stop=stop, saved=ckpt and step)
    try:
        step = run_epochs(run, dataset, step)
        if rank == 0:
            save(run, step)
        if world > 1:  # no rank exits (and has torchrun stop the others) before the checkpoint is written
            dist.barrier()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if world > 1:
            dist.destroy_process_group()
    if stop:
        print(f"interrupted at step {step}; checkpoint {run.path}")
        sys.exit(128 + stop[0])
    print(f"done at step {step}; checkpoint {run.path}")


def stopped(run):
    """Whether Ctrl-C or SIGTERM reached any rank: all ranks then stop after the same step, and a
    rank that was told only by another exits as if sent SIGTERM."""
    if run.world > 1 and all_sum(torch.tensor(float(len(run.stop)), device=run.device), run.world).item():
        if not run.stop:
            run.stop.append(signal.SIGTERM)
    return bool(run.stop)


def save(run, step):
    save_checkpoint(run.path, run.model, run.ema, run.opt, step, run.args, run.shape, run.classes)
    run.saved = step


def diverged(run, x, loss, first, step):
    """Why the run must stop at this step: the batch (NaN or inf in the data set, which no learning
    rate cures) or the loss, non-finite or over 1000 times max(its first value, 1) (a divergence)."""
    kept = f"{run.path} holds step {run.saved}" if run.saved else "this run has written no checkpoint yet"
    bad = torch.tensor(float(not torch.isfinite(x).all()), device=run.device)
    if all_sum(bad, run.world).item():
        return (f"the batch at step {step + 1} holds non-finite values: the data set has NaN or inf in it; "
                f"stopped without saving ({kept})")
    how = "" if not math.isfinite(loss) else f", over 1000 times max(its first value {first:.4g}, 1)"
    return (f"the loss became {loss:.4g} at step {step + 1}{how}; stopped without saving ({kept}). "
            f"Try a lower --lr.")


def run_epochs(run, dataset, step):
    args, device = run.args, run.device
    per_epoch = len(dataset) // args.batch_size
    total = args.steps or args.epochs * per_epoch
    amp = torch.autocast("cuda", torch.bfloat16, enabled=args.bf16 and device.type == "cuda")
    last_log = last_save = t_log = time.time()
    seen, first = 0, None  # first: the loss of this process's first step, the divergence's yardstick
    while step < total:
        epoch, skip = divmod(step, per_epoch)
        for x, y in epoch_batches(dataset, args, epoch, skip, run.rank, run.world):
            # Algorithm 1, line 1: x_0 ~ q(x_0), with its label y
            x, y = x.to(device), y.to(device)
            for group in run.opt.param_groups:
                group["lr"] = learning_rate(args, step, total)
            with amp:
                loss = batch_loss(run.ddp, x, y, args, run.sch, run.class_tokens, run.rank, run.world)
            loss_all = all_sum(loss.detach(), run.world).item() / run.world  # the same on every rank
            first = loss_all if first is None else first
            if not loss_all <= 1000 * max(first, 1.0):  # also NaN
                raise UserError(diverged(run, x, loss_all, first, step))
            run.opt.zero_grad(set_to_none=True)
            loss.backward()  # DistributedDataParallel averages the gradients over the ranks
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
            run.opt.step()
            step += 1
            ema_update(run.ema, run.model, step, args.ema)
            seen += args.batch_size
            now = time.time()
            if now - last_log >= args.log_every or step == total:
                speed = seen / (now - t_log)
                print(f"step {step}/{total}  epoch {epoch + 1}  loss {loss_all:.4f}  "
                      f"{speed:.0f} img/s  {(total - step) * args.batch_size / speed / 60:.1f} min left",
                      flush=True)
                last_log, seen, t_log = now, 0, now
            if now - last_save >= 60 * args.save_every and run.rank == 0:
                save(run, step)
                last_save = now
            if step == total or stopped(run):
                break
        if step % per_epoch == 0 or step == total:
            end_of_epoch(run, step, epoch)
        if stopped(run):
            break
    return step


class SamplingStopped(Exception):
    pass


class Progress:
    """Called after every sampling step: says how far sampling is every few seconds, and ends the
    sampling at the next step once `stop` is set."""

    def __init__(self, what, stop=(), every=5.0):
        self.what, self.stop, self.every = what, stop, every
        self.start = self.last = time.time()

    def __call__(self, x, done, total):
        if self.stop:
            raise SamplingStopped
        now = time.time()
        if now - self.last >= self.every:
            left = (now - self.start) / done * (total - done)
            print(f"{self.what}: step {done}/{total}, {left:.0f} s left", flush=True)
            self.last = now


def end_of_epoch(run, step, epoch):
    """Checkpoint, then the sample grid (rank 0): one column per class (the first 10) and one row per
    guidance scale. The other ranks wait at their next collective call meanwhile."""
    if run.rank > 0:
        return
    save(run, step)
    run.ema.eval()
    progress = Progress(f"epoch {epoch + 1} grid", run.stop)

    def row(r):  # the grid's steps counted over all its rows
        return lambda x, done, total: progress(x, r * total + done, len(GUIDANCE_ROWS) * total)

    try:
        if run.classes:
            K = min(len(run.classes), 10)
            cond = conditions(torch.arange(K, device=run.device), run.class_tokens, run.args)
            x = torch.cat([draw(run.ema, cond, K, run.shape, run.sch, run.args, run.device, 0, s, row(r))
                           for r, s in enumerate(GUIDANCE_ROWS)])
            nrow, note = K, f" (rows: guidance {', '.join(map(str, GUIDANCE_ROWS))})"
        else:
            x = draw(run.ema, None, 64, run.shape, run.sch, run.args, run.device, 0, 1, progress)
            nrow, note = 8, ""
    except SamplingStopped:
        print(f"stopped while drawing the grid; {run.path} holds step {step}")
        return
    path = Path(run.args.out) / f"samples_epoch{epoch + 1:03d}.png"
    save_grid(x[:, :3], path, nrow=nrow)
    print(f"epoch {epoch + 1}: samples in {path}{note}")


# ----------------------------------------------------------------------------------------------
# Sampling from a checkpoint
# ----------------------------------------------------------------------------------------------

def sample(args):
    if not args.ckpt:
        raise UserError("--sample needs --ckpt PATH (e.g. runs/dit/ckpt.pt)")
    if not args.save or Path(args.save).suffix not in (".png", ".pt"):
        raise UserError("--sample needs --save FILE.png (a grid) or FILE.pt (a tensor)")
    if Path(args.save).is_dir():
        raise UserError(f"--save {args.save} is a folder: give a file name (FILE.png or FILE.pt)")
    ckpt = load_checkpoint(args.ckpt)
    train_args = argparse.Namespace(**{**ckpt["args"], "sampler": args.sampler, "cfg_scale": args.cfg_scale,
                                       "sampling_steps": args.sampling_steps})
    classes, shape = ckpt["classes"], tuple(ckpt["shape"])
    check_sampling_steps(train_args)
    class_tokens = class_tokens_of(classes, train_args)
    fixed = None  # the class of every sample; None: the classes in turn
    if args.prompt is not None:
        if not classes:
            raise UserError(f"--prompt needs a conditional model; {args.ckpt} was trained without labels")
        if args.prompt.lower() not in [c.lower() for c in classes]:
            raise UserError(f"a DiT knows only its classes: --prompt one of {', '.join(classes)}")
        fixed = [c.lower() for c in classes].index(args.prompt.lower())
    device = pick_device(args.device)
    ema = make_model(train_args, shape, len(classes) if classes else None)
    ema.load_state_dict(ckpt["ema"])
    ema.to(device).eval()
    if not all(torch.isfinite(p).all() for p in ema.parameters()):
        raise UserError(f"{args.ckpt} holds non-finite weights (its run diverged): retrain with a lower --lr")
    try:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write --save {args.save} ({e.strerror}): give a file in a folder") from None
    sch, start, xs = linear_schedule(train_args.T), time.time(), []
    for i in range(0, args.n, 256):
        cond = None  # an unconditional model
        if classes:
            ids = torch.arange(i, min(i + 256, args.n), device=device)
            ids = ids % len(classes) if fixed is None else torch.full_like(ids, fixed)
            cond = conditions(ids, class_tokens, train_args)
        progress = Progress(f"images {i + 1}-{min(i + 256, args.n)} of {args.n}")
        xs.append(draw(ema, cond, min(256, args.n - i), shape, sch, train_args, device, args.seed + i,
                       args.cfg_scale, progress).float().cpu())
    x = torch.cat(xs)
    if not torch.isfinite(x).all():
        raise UserError(f"the samples of {args.ckpt} came out non-finite: the checkpoint is broken, "
                        f"retrain it")
    x = x.clamp(-1, 1) if train_args.clip_x0 else x
    print(f"{args.n} samples in {time.time() - start:.2f} s")
    if args.save.endswith(".pt"):
        torch.save(x, args.save)
    else:
        save_grid(x[:, :3], args.save, nrow=len(classes) if classes and args.prompt is None else None)
    print(f"saved {args.save}")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def positive_int(s):
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def model_name(s):
    """S/2, B/4, XL/2, T/4 ... (Table 1 size / patch size) or a size alone."""
    size, _, patch = s.upper().partition("/")
    if size not in MODELS or (patch and not patch.isdigit()):
        raise argparse.ArgumentTypeError(f"unknown model {s!r}: use SIZE/PATCH with SIZE one of "
                                         f"{', '.join(MODELS)} (e.g. S/2, B/4, XL/2)")
    return size, int(patch) if patch else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="mnist | fashion-mnist (default) | cifar10 | PATH | FILE.pt")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--image-size", type=positive_int, help="for image folders")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_int)
    length.add_argument("--steps", type=positive_int)
    p.add_argument("--batch-size", type=positive_int, default=256, help="global, over all processes")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out")
    p.add_argument("--resume", action="store_true", help="continue OUT/ckpt.pt (or --ckpt)")
    p.add_argument("--sample", action="store_true", help="only sample from --ckpt")
    p.add_argument("--ckpt")
    p.add_argument("--n", type=positive_int, default=64)
    p.add_argument("--save")
    p.add_argument("--prompt", help="with --sample: a class name")
    p.add_argument("--model", type=model_name, default=("S", 2), help="S/2, S/4, B/2, L/4, XL/2, T/4, ...")
    p.add_argument("--patch", type=positive_int, help="patch size p (overrides the model name's)")
    p.add_argument("--depth", type=positive_int, help="blocks N (overrides the model's)")
    p.add_argument("--width", type=positive_int, help="hidden size d (overrides the model's)")
    p.add_argument("--heads", type=positive_int, help="attention heads (overrides the model's)")
    p.add_argument("--block", choices=BLOCKS, default="adaln-zero", help="Fig. 3's designs (DiT)")
    p.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=True,
                   help="learned Sigma_theta and L_hybrid (DiT)")
    p.add_argument("--lambda-vlb", type=float, default=0.001)
    p.add_argument("--T", type=positive_int, default=1000)
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm", help="ancestral (learned Sigma) or DDIM")
    p.add_argument("--sampling-steps", type=positive_int,
                   help="default: 250 (ddpm, as the paper), 50 (ddim); at most T")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="guidance s (1: none; paper's FID: 1.5)")
    p.add_argument("--p-uncond", type=float, default=0.1, help="label dropout for guidance")
    p.add_argument("--warmup", type=int, default=0, help="learning-rate warm-up steps")
    p.add_argument("--lr-decay", choices=["none", "cosine"], default="none")
    p.add_argument("--ema", type=float, default=0.9999)
    p.add_argument("--grad-clip", type=float, default=1.0, help="0: off")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast on CUDA")
    p.add_argument("--log-every", type=float, default=5.0, help="seconds")
    p.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoints")
    args = p.parse_args(argv)
    args.size, args.patch = args.model[0], args.patch or args.model[1] or 2
    args.model = f"{args.size}/{args.patch}"
    depth, width, heads = MODELS[args.size]
    args.depth, args.width, args.heads = args.depth or depth, args.width or width, args.heads or heads
    args.out = args.out or "runs/dit"
    if not args.resume and not args.sample:  # --sample checks against the checkpoint's T
        try:
            check_sampling_steps(args)
        except UserError as e:
            p.error(str(e))
    if not args.lr > 0:
        p.error(f"--lr must be positive, got {args.lr}")
    if args.grad_clip < 0:
        p.error(f"--grad-clip must be 0 (off) or positive, got {args.grad_clip}")
    for flag, value in (("--lambda-vlb", args.lambda_vlb), ("--warmup", args.warmup)):
        if value < 0:
            p.error(f"{flag} must be >= 0, got {value}")
    if not 0 <= args.p_uncond < 1:
        p.error(f"--p-uncond must be in [0, 1), got {args.p_uncond}")
    if not 0 <= args.ema < 1:
        p.error(f"--ema must be in [0, 1), got {args.ema}")
    if args.cfg_scale < 0:
        p.error(f"--cfg-scale must be >= 0, got {args.cfg_scale}")
    if args.prompt is not None and not args.sample:
        p.error("--prompt is for --sample")
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
    except KeyboardInterrupt:  # Ctrl-C while sampling, or before training set up its handlers
        print("interrupted: nothing saved", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
