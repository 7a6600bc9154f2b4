"""High-Resolution Image Synthesis with Latent Diffusion Models (Rombach, Blattmann, Lorenz, Esser,
Ommer 2022, arXiv:2112.10752).

Pixel-space diffusion spends most of its compute on detail the eye barely notices. LDM splits
the work in two (Sec. 3): an autoencoder first learns a "perceptual compression" of the image x
into a latent z = E(x) that is f times smaller on each side, with c channels; then a DDPM runs
on z instead of x, and the decoder D turns its samples back into images. The U-Net costs about
f^2 times less per step, and the autoencoder is trained once and reused. Conditions (a class, a
text) enter the U-Net through cross-attention (Sec. 3.3): its features ask (queries), the
condition's encoding tau_theta(y) answers (keys and values).

    Stage 1: the autoencoder (Sec. 3.1, App. G)    Stage 2: diffusion on its latents (Eq. 2, 3)
    1: x ~ data                                    1: z_0 = scale * E(x), y ~ labels (null w.p. 0.1)
    2: q(z | x) = N(mu, diag(sigma^2)) = E(x)      2: t ~ Uniform({1, ..., T}), eps ~ N(0, I)
    3: z = mu + sigma * eps (reparameterisation)   3: z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps
    4: L = |x - D(z)|_1                            4: L_LDM = || eps - eps_theta(z_t, t, tau_theta(y)) ||^2
         + w_KL KL(q(z | x) || N(0, I)), w_KL ~ 1e-6
    Cross-attention (Eq. 3): softmax(Q K^T / sqrt(d)) V, Q = W_Q phi(z_t), K = W_K tau(y), V = W_V tau(y)

Sampling is DDIM (50 steps) or DDPM's Algorithm 2 on z, guided (classifier-free, Ho & Salimans
2022) by eps = eps(z, null) + s (eps(z, y) - eps(z, null)); then x = D(z / scale).

Time runs as in DDPM: t = 1..T, alpha_bar[t] is the paper's alpha_bar_t and alpha_bar[0] = 1 (the
official code counts t - 1 = 0..999).

Run:
    python ldm.py --stage ae --f 4 --epochs 5                 # stage 1: runs/ldm_ae/ckpt.pt
    python ldm.py --stage ldm --ae runs/ldm_ae/ckpt.pt --epochs 10    # stage 2: runs/ldm/ckpt.pt
    python ldm.py --sample --ckpt runs/ldm/ckpt.pt --cfg-scale 2 --save samples.png
    python ldm.py --encode --ae runs/ldm_ae/ckpt.pt --save latents.pt  # a data set for any file
    torchrun --standalone --nproc_per_node 8 ldm.py --stage ldm --ae runs/ldm_ae/ckpt.pt ...  # 8 GPUs
    python dit.py --dataset latents.pt --model S/1 ...                  # e.g. a latent DiT
    python ldm.py --decode --ae runs/ldm_ae/ckpt.pt --ckpt sampled_latents.pt --save images.png
    CPU recipe (about 15 minutes for both stages on 2 cores; see README.md):
    python ldm.py --stage ae --f 2 --latent-channels 2 --ae-width 32 --ae-res-blocks 1 \\
                  --batch-size 64 --lr 1e-3 --steps 600
    python ldm.py --stage ldm --ae runs/ldm_ae/ckpt.pt --width 32 --res-blocks 1 \\
                  --batch-size 64 --lr 2e-3 --warmup 100 --lr-decay cosine --steps 2000

Outputs: stage 1 in runs/ldm_ae: reconstructions_epochNNN.png (test images above, their
reconstructions below), the test PSNR each epoch, ckpt.pt with the scale factor. Stage 2 in
runs/ldm: samples_epochNNN.png (one column per class, one row per guidance scale 1, 1.5, 2, 4),
ckpt.pt, which carries the decoder it needs.

Differences from the paper:
- Stage 1 drops the perceptual (LPIPS) and patch-GAN losses: they make textures sharp, but LPIPS
  needs downloaded VGG weights and a GAN is unstable on 28x28 images. L1 (+ optional L2) only,
  and no learned output variance (the official loss divides L1 by a learned scalar).
- The frozen encoder's posterior (mean, log-variance) is computed once for the data set and z_0 is
  drawn from it every step: the same z_0 distribution as encoding each batch, minus the encoder's
  cost per step (and without flips).
- Small networks for 28x28 images; the EMA decay warms up as in ddpm.py; an optional warm-up and
  cosine decay of the learning rate (the paper: constant).
- Only the KL-regularised autoencoder; the paper's VQ-regularised one (a codebook in the decoder) is not here.
- DDIM's S timesteps run evenly over 1..T (tau_S = T) and its last step goes to alpha_bar = 1, a clean
  z_0. The official make_ddim_timesteps('uniform') takes range(0, T, T // S) + 1 in its 0-based count
  (the paper's t = 2, 22, ..., 982 for S = 50: it never starts at T), and its last step ends at
  alphas_cumprod[0] = alpha_bar_1 = 1 - beta_1, not at 1.
"""
import argparse
import copy
import functools
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
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset, TensorDataset

from common import (Attention, Downsample, ResBlock, UNet, Upsample, UserError, load_dataset, norm,
                    pick_device, save_grid, seed_everything, zero)

GUIDANCE_ROWS = (1.0, 1.5, 2.0, 4.0)  # the rows of every class-conditional grid
CL = torch.channels_last  # convolutions run faster on CPUs and GPUs with channels innermost

# ----------------------------------------------------------------------------------------------
# Stage 1: the KL-regularised autoencoder (Sec. 3.1, Appendix G)
# ----------------------------------------------------------------------------------------------


def global_randn(shape, rank=0, world=1, device=None, generator=None):
    """N(0, I) noise for this rank's slice of a batch: under torchrun every rank draws the whole
    global batch's noise and keeps its slice, so N processes compute what one process would."""
    b = shape[0]
    return torch.randn(world * b, *shape[1:], device=device, generator=generator)[rank * b:(rank + 1) * b]


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(log_var))), from the encoder's 2c output channels. The
    log-variance is clamped to [-30, 20] as in the official code: a KL weight of 1e-6 barely
    constrains it, and exp() of an unclamped value overflows."""

    def __init__(self, moments):
        self.mean, log_var = moments.chunk(2, dim=1)
        self.log_var = log_var.clamp(-30.0, 20.0)

    def sample(self, generator=None, rank=0, world=1):
        # the reparameterisation trick: z = mu + sigma * eps, differentiable in mu and sigma
        eps = global_randn(self.mean.shape, rank, world, self.mean.device, generator)
        return self.mean + (0.5 * self.log_var).exp() * eps

    def kl(self):
        """KL(q(z | x) || N(0, I)) = 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2), one value per image."""
        return 0.5 * (self.mean.square() + self.log_var.exp() - 1 - self.log_var).flatten(1).sum(1)


def ae_levels(f):
    """The encoder halves the image log2(f) times: f = 1, 2, 4, 8, ... ."""
    if f & (f - 1) or f > 16:
        raise UserError(f"--f must be a power of 2 up to 16 (1, 2, 4, 8, 16), got {f}")
    return f.bit_length()


class Encoder(nn.Module):
    """x (B, C, H, W) -> the moments (B, 2c, H/f, W/f) of q(z | x): ResBlocks at each level, a
    strided conv between levels, ResBlock-attention-ResBlock in the middle (the official layout)."""

    def __init__(self, channels, f, latent_channels, width, res_blocks):
        super().__init__()
        widths = [width * m for m in (1, 2, 2, 4, 4)[:ae_levels(f)]]
        layers, ch = [nn.Conv2d(channels, width, 3, padding=1)], width
        for i, w in enumerate(widths):
            for _ in range(res_blocks):
                layers.append(ResBlock(ch, w))
                ch = w
            if i < len(widths) - 1:
                layers.append(Downsample(ch))
        layers += [ResBlock(ch, ch), Attention(ch), ResBlock(ch, ch),
                   norm(ch), nn.SiLU(), nn.Conv2d(ch, 2 * latent_channels, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class Decoder(nn.Module):
    """z (B, c, H/f, W/f) -> x (B, C, H, W): the encoder mirrored, one more ResBlock a level."""

    def __init__(self, channels, f, latent_channels, width, res_blocks):
        super().__init__()
        widths = [width * m for m in (1, 2, 2, 4, 4)[:ae_levels(f)]]
        ch = widths[-1]
        layers = [nn.Conv2d(latent_channels, ch, 3, padding=1), ResBlock(ch, ch), Attention(ch),
                  ResBlock(ch, ch)]
        for i, w in reversed(list(enumerate(widths))):
            for _ in range(res_blocks + 1):
                layers.append(ResBlock(ch, w))
                ch = w
            if i > 0:
                layers.append(Upsample(ch))
        layers += [norm(ch), nn.SiLU(), nn.Conv2d(ch, channels, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, z):
        return self.layers(z)


class Autoencoder(nn.Module):
    def __init__(self, channels, f=4, latent_channels=3, width=64, res_blocks=2):
        super().__init__()
        self.encoder = Encoder(channels, f, latent_channels, width, res_blocks)
        self.decoder = Decoder(channels, f, latent_channels, width, res_blocks)

    def encode(self, x):
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z):
        return self.decoder(z)

    def forward(self, x, rank=0, world=1):
        """Stage 1's pass (one call, as DistributedDataParallel wants): the moments of q(z | x) =
        E(x), and D(z) at z = mu + sigma * eps."""
        moments = self.encoder(x)
        return moments, self.decoder(DiagonalGaussian(moments).sample(None, rank, world))


def make_autoencoder(args, channels):
    return Autoencoder(channels, args.f, args.latent_channels, args.ae_width, args.ae_res_blocks)


def autoencoder_loss(ae, x, kl_weight, l2_weight=0.0, rank=0, world=1):
    """Stage 1's loss per image: |x - D(z)|_1 (+ l2_weight |x - D(z)|_2^2) + kl_weight KL, with
    z ~ q(z | x); summed over pixels and latent entries, as the official loss, so that the KL weight
    1e-6 means what it does there. Returns the loss, the reconstruction term and the KL term."""
    # Stage 1, lines 2-3: q(z | x) = N(mu, diag(sigma^2)) = E(x); z = mu + sigma * eps; D(z)
    moments, x_rec = ae(x, rank, world)
    posterior = DiagonalGaussian(moments)
    # Stage 1, line 4: L = |x - D(z)|_1 + w_KL KL(q(z | x) || N(0, I))
    rec = (x - x_rec).abs().flatten(1).sum(1)
    if l2_weight:
        rec = rec + l2_weight * (x - x_rec).square().flatten(1).sum(1)
    kl = posterior.kl()
    return (rec + kl_weight * kl).mean(), rec.mean(), kl.mean()


@torch.no_grad()
def scale_by_std(ae, x):
    """The official `scale_by_std`: 1 / std of the latents z ~ q(z | x) of the first training batch.
    Diffusion's schedule assumes data of about unit variance: at std 0.1 the latent would drown in
    noise 10 times sooner than the schedule means to, at std 10 barely at all."""
    return 1.0 / ae.encode(x).sample().flatten().std().item()


def psnr(x, x_rec):
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2), per image."""
    mse = (x - x_rec.clamp(-1, 1)).square().flatten(1).mean(1)
    return 10 * torch.log10(4 / mse.clamp(min=1e-10))


# ----------------------------------------------------------------------------------------------
# Stage 2: the noise schedule and the forward process on latents
# ----------------------------------------------------------------------------------------------

class Schedule:
    """beta_t, alpha_t = 1 - beta_t and alpha_bar_t = prod_{s<=t} alpha_s in float64, indexed by the
    paper's t (index 0: no noise). LDM's "linear" schedule is linear in sqrt(beta):
    beta_t = (sqrt(0.0015) + (t - 1)/(T - 1) (sqrt(0.0195) - sqrt(0.0015)))^2, the official configs'
    values; it ends a little less noisy than DDPM's (sqrt(alpha_bar_T) = 0.012 against 0.006).
    Other T rescale beta by 1000 / T, as ddpm.py does, so that alpha_bar_T stays near zero."""

    def __init__(self, T=1000, beta_1=0.0015, beta_T=0.0195):
        self.T = T
        beta = torch.linspace(beta_1 ** 0.5, beta_T ** 0.5, T, dtype=torch.float64) ** 2 * 1000 / T
        beta = beta.clamp(max=0.999)
        self.beta = torch.cat([torch.zeros(1, dtype=torch.float64), beta])
        self.alpha = 1 - self.beta
        self.alpha_bar = torch.cumprod(self.alpha, dim=0)


def extract(a, t, x):
    """a[t] for a batch of times t, as float32 on x's device, shaped to broadcast against x."""
    return a.to(x.device)[t].float().view(-1, *([1] * (x.dim() - 1)))


def q_sample(z0, t, eps, sch):
    """DDPM Eq. 4 on latents: z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps."""
    return extract(sch.alpha_bar.sqrt(), t, z0) * z0 + extract((1 - sch.alpha_bar).sqrt(), t, z0) * eps


def predict_z0(z_t, t, eps, sch):
    """Eq. 4 solved for z_0: z_0 = (z_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
    return (z_t - extract((1 - sch.alpha_bar).sqrt(), t, z_t) * eps) / extract(sch.alpha_bar.sqrt(), t, z_t)


# ----------------------------------------------------------------------------------------------
# Stage 2's network: common.UNet on the latent grid, with cross-attention to tau_theta(y)
# ----------------------------------------------------------------------------------------------

def split_heads(x, heads):  # (B, N, d) -> (B, heads, N, d / heads)
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


class CrossAttention(nn.Module):
    """Eq. 3: Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V with Q = W_Q phi(z_t) from the U-Net's
    features and K = W_K tau(y), V = W_V tau(y) from the condition; context = x is self-attention."""

    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.heads = heads
        self.W_Q = nn.Linear(dim, dim, bias=False)
        self.W_K = nn.Linear(context_dim, dim, bias=False)
        self.W_V = nn.Linear(context_dim, dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, context):  # x: (B, N, dim) features; context: (B, M, context_dim)
        q = split_heads(self.W_Q(x), self.heads)
        k, v = split_heads(self.W_K(context), self.heads), split_heads(self.W_V(context), self.heads)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, dim / heads)
        return self.out(h.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    """The feed-forward layer of LDM's transformer blocks: (a * GELU(b)) W, [a, b] = x W_in."""

    def __init__(self, dim, mult=4):
        super().__init__()
        self.proj_in, self.proj_out = nn.Linear(dim, 2 * mult * dim), nn.Linear(mult * dim, dim)

    def forward(self, x):
        a, b = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(a * F.gelu(b))


class SpatialTransformer(nn.Module):
    """LDM's attention block at the U-Net's attention levels (the official SpatialTransformer, depth
    1): the feature map becomes H*W tokens, which go through self-attention, cross-attention to
    tau_theta(y) and a feed-forward layer (each pre-normed, residual); the zero-initialised output
    projection makes the block start as the identity."""

    def __init__(self, ch, heads, context_dim):
        super().__init__()
        self.norm, self.proj_in = norm(ch), nn.Conv2d(ch, ch, 1)
        self.norm1, self.attn1 = nn.LayerNorm(ch), CrossAttention(ch, ch, heads)
        self.norm2, self.attn2 = nn.LayerNorm(ch), CrossAttention(ch, context_dim, heads)
        self.norm3, self.ff = nn.LayerNorm(ch), GEGLU(ch)
        self.proj_out = zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, H*W, C)
        n = self.norm1(h)
        h = h + self.attn1(n, n)
        h = h + self.attn2(self.norm2(h), context)
        h = h + self.ff(self.norm3(h))
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class ClassEncoder(nn.Module):
    """tau_theta for class labels: an embedding table, one token per image, as the paper's
    class-conditional ImageNet LDM. Label K is the null condition of guidance. With a single key
    the softmax is 1: cross-attention then adds W_V tau(y) to every position."""

    def __init__(self, num_classes, dim):
        super().__init__()
        self.embed = nn.Embedding(num_classes + 1, dim)

    def forward(self, y):
        return self.embed(y)[:, None]  # (B, 1, dim)


class TextEncoder(nn.Module):
    """tau_theta for text: a small transformer over the prompt's UTF-8 bytes, trained with the U-Net
    (the paper's text-to-image LDM trains a BERT-like transformer the same way). The empty prompt,
    all padding, is the null condition. Every position attends, padding included, as the paper's."""

    def __init__(self, dim, length, depth=2, heads=4):
        super().__init__()
        self.embed = nn.Embedding(257, dim)  # 256 byte values + padding
        self.pos = nn.Parameter(0.02 * torch.randn(length, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens):  # (B, L) -> (B, L, dim)
        return self.norm(self.transformer(self.embed(tokens) + self.pos))


def tokenize(prompts, length):
    """Text -> (B, length) ids: each UTF-8 byte of the lower-cased text is one token (id = byte + 1)."""
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, p in enumerate(prompts):
        b = p.lower().encode()
        if len(b) > length:
            raise UserError(f"the prompt {p!r} has {len(b)} bytes; this model reads at most {length}")
        ids[i, :len(b)] = torch.tensor(list(b)) + 1
    return ids


class LatentDiffusion(nn.Module):
    """eps_theta(z_t, t, tau_theta(y)): common.UNet whose attention blocks are SpatialTransformers,
    and the condition encoder tau_theta trained with it. Without classes: a plain U-Net."""

    def __init__(self, unet, tau=None):
        super().__init__()
        self.unet, self.tau = unet, tau

    def forward(self, z_t, t, cond=None):
        return self.unet(z_t, t, context=None if self.tau is None else self.tau(cond))


def unet_levels(size, mults):
    """Check that the latent grid halves len(mults) - 1 times, to no less than 2x2."""
    if size % 2 ** (len(mults) - 1) or size >> (len(mults) - 1) < 2:
        fits = 1
        while size % 2 ** fits == 0 and size >> fits >= 2:
            fits += 1
        raise UserError(f"the {size}x{size} latent grid is too small to halve {len(mults) - 1} times for "
                        f"--mults {','.join(map(str, mults))}: give at most {fits} multipliers "
                        f"(e.g. --mults {','.join(map(str, (1, 2, 3, 4)[:fits]))}) or use a smaller --f")


def unet_width_problem(width, mults, heads):
    """Why the levels' channels (width x each multiplier) do not fit the attention heads or
    GroupNorm's groups (common.norm), or None."""
    for m in mults:
        ch = width * m
        if ch % heads:
            return (f"--heads {heads} must divide the channels of every U-Net level: {ch} (--width {width} "
                    f"x multiplier {m}) is not divisible by {heads}")
        if ch % math.gcd(32, max(ch // 4, 1)):
            return (f"--width {width} gives a U-Net level of {ch} channels (x multiplier {m}), which GroupNorm "
                    f"cannot split into groups of 4 or more: use a multiple of 4 for --width")
    return None


def make_model(args, latent_shape, num_classes):
    C, size = latent_shape[0], latent_shape[-1]
    unet_levels(size, args.mults)
    problem = unet_width_problem(args.width, args.mults, args.heads)
    if problem:
        raise UserError(problem)
    block = functools.partial(SpatialTransformer, context_dim=args.context_dim) if num_classes else Attention
    unet = UNet(C, args.width, args.mults, args.res_blocks, args.attn, args.dropout, image_size=size,
                num_heads=args.heads, attention_block=block)
    if not num_classes:
        return LatentDiffusion(unet)
    if args.cond == "text":
        return LatentDiffusion(unet, TextEncoder(args.context_dim, args.text_len))
    return LatentDiffusion(unet, ClassEncoder(num_classes, args.context_dim))


# ----------------------------------------------------------------------------------------------
# Stage 2's objective (Eq. 2 with the condition of Eq. 3) and samplers
# ----------------------------------------------------------------------------------------------

def ldm_loss(eps_theta, z0, cond, sch, rank=0, world=1):
    """L_LDM = E_{E(x), y, eps ~ N(0, 1), t} || eps - eps_theta(z_t, t, tau_theta(y)) ||^2, DDPM's
    Algorithm 1 on latents (the mean over entries, L_simple up to a constant factor)."""
    b = len(z0)
    # Algorithm 1, line 3: t ~ Uniform({1, ..., T}) (for the global batch: see global_randn)
    t = torch.randint(1, sch.T + 1, (world * b,), device=z0.device)[rank * b:(rank + 1) * b]
    # Algorithm 1, line 4: eps ~ N(0, I)
    eps = global_randn(z0.shape, rank, world, z0.device)
    # Algorithm 1, line 5: || eps - eps_theta(sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps, t, y) ||^2
    return (eps - eps_theta(q_sample(z0, t, eps, sch), t, cond)).square().mean()


def condition_table(classes, args, device):
    """Row k: what the network is conditioned on for class k, the label or its name's tokens; the
    last row (id K) is the null condition. None without classes."""
    if not classes:
        return None
    table = torch.arange(len(classes) + 1) if args.cond == "class" else tokenize(classes + [""], args.text_len)
    return table.to(device)


def null_condition(cond, num_classes):
    """The "no condition" of classifier-free guidance: label K, or the empty prompt."""
    return torch.zeros_like(cond) if cond.dim() == 2 else torch.full_like(cond, num_classes)


def guided(model, cond, scale, num_classes):
    """Classifier-free guidance: eps = eps(z, null) + s (eps(z, y) - eps(z, null)); s = 1 is the
    conditional model, s = 0 the unconditional one."""
    def eps_theta(z, t):
        if cond is None or scale == 1:
            return model(z, t, cond)
        eps_c, eps_null = model(torch.cat([z, z]), torch.cat([t, t]),
                                torch.cat([cond, null_condition(cond, num_classes)])).chunk(2)
        return eps_null + scale * (eps_c - eps_null)
    return eps_theta


def ddim_timesteps(T, S):
    """S increasing times tau_1 < ... < tau_S = T spread evenly over 1..T."""
    if not 1 <= S <= T:
        raise UserError(f"--sampling-steps must be between 1 and T = {T}, got {S}")
    return torch.linspace(1, T, S, dtype=torch.float64).round().long().unique().tolist() if S > 1 else [T]


@torch.no_grad()
def sample_ddim(eps_theta, z, sch, steps, eta=0.0, generator=None, on_step=None):
    """DDIM (Song et al. 2021, Eq. 12), the paper's sampler, from z = z_T on tau_S > ... > tau_0 = 0.
    DDIM's alpha_t is DDPM's alpha_bar_t. Latents are not clipped: they have no fixed range.
    on_step(i, S) runs after step i of S (progress, or a stop)."""
    taus = ddim_timesteps(sch.T, steps)
    for i, (t, t_prev) in enumerate(zip(reversed(taus), list(reversed(taus))[1:] + [0])):
        tt = torch.full((len(z),), t, device=z.device)
        ab, ab_prev = sch.alpha_bar[t].item(), sch.alpha_bar[t_prev].item()
        eps = eps_theta(z, tt)
        z0 = predict_z0(z, tt, eps, sch)
        # Eq. 16: sigma = eta sqrt((1 - ab_prev) / (1 - ab)) sqrt(1 - ab / ab_prev)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        # Eq. 12: z_prev = sqrt(ab_prev) z_0 + sqrt(1 - ab_prev - sigma^2) eps + sigma noise
        z = math.sqrt(ab_prev) * z0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            z = z + sigma * torch.randn(z.shape, device=z.device, generator=generator)
        if on_step is not None:
            on_step(i + 1, len(taus))
    return z


def ddpm_step(eps_theta, z, t, sch, generator=None):
    """One step of DDPM's Algorithm 2, z_t -> z_{t-1}, with sigma_t^2 = beta_t."""
    tt = torch.full((len(z),), t, device=z.device)
    beta, alpha, ab = sch.beta[t].item(), sch.alpha[t].item(), sch.alpha_bar[t].item()
    # Algorithm 2, line 4: z_{t-1} = 1/sqrt(alpha_t) (z_t - beta_t / sqrt(1 - alpha_bar_t) eps) + sigma_t n
    z = (z - beta / math.sqrt(1 - ab) * eps_theta(z, tt)) / math.sqrt(alpha)
    if t > 1:  # Algorithm 2, line 3: no noise at the last step
        z = z + math.sqrt(beta) * torch.randn(z.shape, device=z.device, generator=generator)
    return z


@torch.no_grad()
def sample_ddpm(eps_theta, z, sch, generator=None, on_step=None):
    """DDPM's Algorithm 2 from z = z_T; on_step(i, T) runs after step i of T."""
    for t in range(sch.T, 0, -1):  # Algorithm 2, line 2: for t = T, ..., 1
        z = ddpm_step(eps_theta, z, t, sch, generator)
        if on_step is not None:
            on_step(sch.T - t + 1, sch.T)
    return z


def draw(model, cond, n, shape, sch, args, device, seed, scale, on_step=None):
    """n latents from fixed noise (seed), guided at `scale`, with the sampler of args."""
    g = torch.Generator(device).manual_seed(seed)
    z = torch.randn(n, *shape, device=device, generator=g)  # z_T ~ N(0, I)
    f = guided(model, cond, scale, args.num_classes)
    if args.sampler == "ddpm":
        return sample_ddpm(f, z, sch, g, on_step)
    return sample_ddim(f, z, sch, args.sampling_steps, args.eta, g, on_step)


def decode(decoder, z, scale):
    """x = D(z / scale): stage 2's latents back to images in [-1, 1]."""
    return decoder(z / scale).clamp(-1, 1)


# ----------------------------------------------------------------------------------------------
# Checkpoints, data, EMA and learning rate, shared by both stages
# ----------------------------------------------------------------------------------------------

METHODS = {"ae": "ldm-ae", "ldm": "ldm"}  # the "method" of each stage's checkpoint


def save_checkpoint(path, run, step):
    state = {"method": METHODS[run.args.stage], "args": vars(run.args), "step": step,
             "model": run.model.state_dict(), "optimizer": run.opt.state_dict(), **run.extra,
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                     "mps": torch.mps.get_rng_state() if torch.backends.mps.is_available() else None}}
    if run.ema is not None:
        state["ema"] = run.ema.state_dict()
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


def load_checkpoint(path, method, flag="--ckpt"):
    """A checkpoint of `method` ("ldm-ae": stage 1, "ldm": stage 2), or a clear error."""
    if not Path(path).is_file():
        hint = "python ldm.py --stage ae" if method == "ldm-ae" else "python ldm.py --stage ldm --ae ..."
        raise UserError(f"no checkpoint at {path}: train it first ({hint}) or pass {flag} PATH")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}): it is damaged or incomplete "
                        f"(a copy cut short?), or not a checkpoint at all") from None
    found = ckpt.get("method", "unknown") if isinstance(ckpt, dict) else "unknown"
    if found != method:
        what = {"ldm-ae": "ldm.py stage 1 (--stage ae)", "ldm": "ldm.py stage 2 (--stage ldm)"}
        raise UserError(f"{flag} {path} is a checkpoint of {what.get(found, found)}, "
                        f"not of {what[method]}")
    missing = missing_keys(ckpt, method)
    if missing:
        raise UserError(f"{path} is an incomplete ldm.py checkpoint: no {', '.join(missing)}")
    return ckpt


def missing_keys(ckpt, method):
    """What a checkpoint of `method` lacks of what this file writes ("args.T": the "T" of its args)."""
    need = ["args", "shape", "step", "model", "optimizer", "rng"]
    need += ["scale"] if method == "ldm-ae" else ["ema", "classes", "ae"]
    missing = [k for k in need if k not in ckpt]
    if "args" in ckpt:
        train_args = ckpt["args"] if isinstance(ckpt["args"], dict) else {}
        names = list(vars(parser().parse_args([])))
        if method == "ldm":  # set by stage 2's set-up
            text = train_args.get("cond") == "text" and ckpt.get("classes")
            names += ["num_classes"] + (["text_len"] if text else [])
        missing += [f"args.{k}" for k in names if k not in train_args]
    if "ae" in ckpt:
        ae = ckpt["ae"] if isinstance(ckpt["ae"], dict) else {}
        missing += [f"ae.{k}" for k in ("args", "decoder", "scale", "shape") if k not in ae]
    return missing


def load_autoencoder(args, device):
    if not args.ae:
        raise UserError("--encode and --decode need --ae CKPT (a stage-1 checkpoint, runs/ldm_ae/ckpt.pt)")
    ckpt = load_checkpoint(args.ae, "ldm-ae", "--ae")
    if ckpt["scale"] is None:
        raise UserError(f"{args.ae} has no scale factor yet (written at the end of its first epoch): "
                        f"train it longer (--resume)")
    ae_args = argparse.Namespace(**ckpt["args"])
    ae = make_autoencoder(ae_args, ckpt["shape"][0])
    ae.load_state_dict(ckpt["model"])
    return ae.to(device, memory_format=CL).eval(), ckpt, ae_args


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
    if run.world > 1 and all_sum(torch.tensor(float(len(run.stop)), device=run.device), run.world).item():
        run.stop.append(signal.SIGTERM)  # every rank's list then says so; a rank not signalled exits 143
    return bool(run.stop)


class SamplingStopped(Exception):
    """Ctrl-C or SIGTERM while a grid is drawn: the sampling ends at its next step."""


def sampling_progress(what, stop, every=5.0):
    """A sampler's on_step: a line every few seconds, and SamplingStopped once `stop` is set."""
    start = last = time.time()

    def on_step(done, total):
        nonlocal last
        if stop:
            raise SamplingStopped
        now = time.time()
        if now - last >= every:
            left = (now - start) / done * (total - done)
            print(f"{what}: step {done}/{total}, {left:.0f} s left", flush=True)
            last = now
    return on_step


def diverged(loss, first):
    """The loss is non-finite, or finite but absurd: over 1000 x the first step's (at least 1). A run
    at 1e22 stays finite, trains nothing and would sample noise."""
    return not math.isfinite(loss) or loss > 1000 * max(first, 1.0)


def divergence_error(run, loss, first, x, step):
    """What a diverged loss means: a batch holding NaN or inf on any rank (a lower --lr cannot help
    that), or else training that blew up."""
    kept = f"{run.path} holds step {run.saved}" if run.saved else "this run has written no checkpoint yet"
    if all_sum(torch.tensor(float(not torch.isfinite(x).all()), device=run.device), run.world).item():
        return UserError(f"the batch at step {step} holds non-finite values: the data set has NaN or inf "
                         f"in it; stopped without saving ({kept})")
    scale = f" (over 1000 x the first step's {first:.4g})" if math.isfinite(loss) else ""
    return UserError(f"the loss became {loss:.4g}{scale} at step {step}; stopped without saving ({kept}). "
                     f"Try a lower --lr.")


@torch.no_grad()
def ema_update(ema, model, n, max_decay):
    """EMA of the weights with a warm-up of the decay, min(max_decay, (1 + n) / (10 + n))."""
    decay = min(max_decay, (1 + n) / (10 + n))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def learning_rate(args, step, total):
    """Constant after an optional linear warm-up, or with a cosine decay to 0."""
    lr = args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr
    if args.lr_decay == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * step / total))
    return lr


@torch.no_grad()
def encode_all(ae, dataset, device, batch=500):
    """The posterior moments (mean, log-variance) of every image, and the labels, on the CPU."""
    moments, labels, start = [], [], time.time()
    for i, (x, y) in enumerate(DataLoader(dataset, batch)):
        moments.append(ae.encoder(x.to(device, memory_format=CL)).float().cpu())
        labels.append(y)
        if time.time() - start > 5 and i % 20 == 0:
            print(f"encoding: {(i + 1) * batch}/{len(dataset)} images", flush=True)
    return torch.cat(moments), torch.cat(labels)


# ----------------------------------------------------------------------------------------------
# Training: the two stages share one loop
# ----------------------------------------------------------------------------------------------

def setup_autoencoder(args, device, ckpt):
    ae_levels(args.f)  # a power of 2, before any work
    dataset, info = load_dataset(args.dataset, args.data_dir, True, args.image_size,
                                 flip=args.dataset == "cifar10")
    test, _ = load_dataset(args.dataset, args.data_dir, False, args.image_size) \
        if args.dataset in ("mnist", "fashion-mnist", "cifar10") else (dataset, info)
    if info.size % args.f:
        raise UserError(f"--f {args.f} does not divide the {info.size}x{info.size} images: use --f "
                        f"{max(f for f in (1, 2, 4, 8, 16) if info.size % f == 0)} or --image-size "
                        f"{math.ceil(info.size / args.f) * args.f}")
    shape = (info.channels, info.size, info.size)
    model = make_autoencoder(args, info.channels).to(device, memory_format=CL)
    latent = (args.latent_channels, info.size // args.f, info.size // args.f)
    print(f"stage 1: autoencoder f = {args.f}, {shape} -> latent {latent} "
          f"({math.prod(shape) / math.prod(latent):.1f}x fewer numbers), "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, KL weight {args.kl_weight:g}")
    x_test = torch.stack([test[i][0] for i in range(min(1000, len(test)))])

    def loss(net, x, y, rank, world):  # net: the model, or its DistributedDataParallel wrapper
        total, rec, kl = autoencoder_loss(net, x, args.kl_weight, args.l2_weight, rank, world)
        return total, f"rec {rec.item():.1f}  kl {kl.item():.0f}"

    run = argparse.Namespace(args=args, model=model, ema=None, loss=loss, betas=(0.5, 0.9),
                             extra={"shape": list(shape), "scale": ckpt["scale"] if ckpt else None},
                             before_save=lambda r: autoencoder_scale(r, dataset),
                             end_of_epoch=lambda r, epoch: autoencoder_epoch(r, epoch, x_test))
    return run, dataset


@torch.no_grad()
def autoencoder_scale(run, dataset):
    """The scale factor from the first training batch of epoch 1 (seed-fixed, so a resumed run agrees)."""
    first = next(iter(epoch_batches(dataset, run.args, 0, 0)))[0]
    run.extra["scale"] = scale_by_std(run.model, first.to(next(run.model.parameters()).device))


@torch.no_grad()
def autoencoder_epoch(run, epoch, x_test):
    """Test PSNR and a grid of test images over their reconstructions (posterior means)."""
    ae, device = run.model.eval(), next(run.model.parameters()).device
    rec = torch.cat([ae.decode(ae.encode(x.to(device)).mean).cpu() for x in x_test.split(250)])
    print(f"epoch {epoch + 1}: test PSNR {psnr(x_test, rec).mean():.2f} dB on {len(x_test)} images; "
          f"scale factor {run.extra['scale']:.4f} (latent std {1 / run.extra['scale']:.4f})")
    path = Path(run.args.out) / f"reconstructions_epoch{epoch + 1:03d}.png"
    save_grid(torch.cat([x_test[:8], rec[:8].clamp(-1, 1)]), path, nrow=8)
    ae.train()


def setup_latent_diffusion(args, device, ckpt):
    if not args.ae:
        raise UserError("stage 2 needs a stage-1 autoencoder: train one with "
                        "python ldm.py --stage ae, then pass --ae runs/ldm_ae/ckpt.pt")
    ae, ae_ckpt, ae_args = load_autoencoder(args, device)
    ae.requires_grad_(False)  # frozen: stage 2 trains the U-Net and tau_theta alone
    if args.dataset is None:
        args.dataset, args.image_size = ae_args.dataset, ae_args.image_size
    dataset, info = load_dataset(args.dataset, args.data_dir, True, args.image_size)
    if [info.channels, info.size, info.size] != ae_ckpt["shape"]:
        raise UserError(f"the autoencoder {args.ae} was trained on {tuple(ae_ckpt['shape'])} images, "
                        f"{args.dataset} has {(info.channels, info.size, info.size)}")
    scale = ae_ckpt["scale"]
    moments, labels = encode_all(ae, dataset, device)
    if not torch.isfinite(moments).all():
        raise UserError(f"the latents of {args.dataset} from {args.ae} hold non-finite values: the data set "
                        f"has NaN or inf in it, or the autoencoder's weights do")
    latents = TensorDataset(moments, labels)
    shape = (ae_args.latent_channels, info.size // ae_args.f, info.size // ae_args.f)
    classes = info.classes if info.num_classes and args.cond != "none" else None
    args.num_classes = len(classes) if classes else None
    fill_model_defaults(args, shape[-1])
    if classes and args.cond == "text":
        args.text_len = max(16, max(len(c.encode()) for c in classes))
    if args.cond == "text" and not classes:
        raise UserError(f"--cond text uses the class names as prompts; {info.name} has no labels")
    cond_of = condition_table(classes, args, device)
    model = make_model(args, shape, args.num_classes).to(device, memory_format=CL)
    z_std = (scale * DiagonalGaussian(moments[:args.batch_size]).sample()).std().item()
    print(f"stage 2: latents {shape} from {args.ae} (f = {ae_args.f}), scale factor {scale:.4f} "
          f"(scaled latent std {z_std:.3f}); U-Net {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters, conditioning: {args.cond if classes else 'none'}")
    ema = copy.deepcopy(model).requires_grad_(False)  # starts as an exact copy
    sch = Schedule(args.T)

    def loss(net, moments, y, rank, world):  # net: the model, or its DistributedDataParallel wrapper
        # z_0 = scale * z, z ~ q(z | x): the frozen encoder's posterior, sampled (Sec. 3.1)
        z0 = scale * DiagonalGaussian(moments).sample(None, rank, world)
        cond = None
        if classes:  # the null condition with probability p_uncond, for guidance
            drop = torch.rand(world * len(y), device=y.device)[rank * len(y):(rank + 1) * len(y)]
            cond = cond_of[torch.where(drop < args.p_uncond, len(classes), y)]
        return ldm_loss(net, z0, cond, sch, rank, world), ""

    extra = {"shape": list(shape), "classes": classes,
             "ae": {"args": ae_ckpt["args"], "decoder": ae.decoder.state_dict(), "scale": scale,
                    "shape": ae_ckpt["shape"], "path": str(args.ae)}}
    run = argparse.Namespace(args=args, model=model, ema=ema, loss=loss, betas=(0.9, 0.999), extra=extra,
                             before_save=lambda r: None,
                             end_of_epoch=lambda r, epoch: latent_diffusion_epoch(
                                 r, epoch, ae.decoder, scale, shape, sch, cond_of))
    return run, latents


@torch.no_grad()
def latent_diffusion_epoch(run, epoch, decoder, scale, shape, sch, cond_of):
    """A grid from the EMA weights: one column per class (the first 10), one row per guidance scale.
    Ctrl-C or SIGTERM ends it at the next sampling step (SamplingStopped)."""
    args, device = run.args, next(run.model.parameters()).device
    run.ema.eval()
    if cond_of is not None:
        K = min(args.num_classes, 10)
        z = torch.cat([draw(run.ema, cond_of[:K], K, shape, sch, args, device, 0, s,
                            sampling_progress(f"epoch {epoch + 1} grid, guidance {s}", run.stop))
                       for s in GUIDANCE_ROWS])
        nrow, note = K, f" (rows: guidance {', '.join(map(str, GUIDANCE_ROWS))})"
    else:
        progress = sampling_progress(f"epoch {epoch + 1} grid", run.stop)
        z, nrow, note = draw(run.ema, None, 64, shape, sch, args, device, 0, 1, progress), 8, ""
    path = Path(args.out) / f"samples_epoch{epoch + 1:03d}.png"
    save_grid(decode(decoder, z, scale), path, nrow=nrow)
    print(f"epoch {epoch + 1}: samples in {path}{note}")


RESUME_FLAGS = ("device", "out", "resume", "ckpt", "data_dir", "epochs", "steps", "log_every", "save_every")


def check_resume_flags(args, given, started):
    """--resume continues a run as it was started: a flag given with another value than the run's
    (other than RESUME_FLAGS) is refused rather than silently ignored."""
    def flag(k):
        return "--" + k.replace("_", "-")

    def shown(v):  # as typed: 1,2 for a list, on/off for a switch
        if isinstance(v, bool):
            return "on" if v else "off"
        return ",".join(map(str, v)) if isinstance(v, (tuple, list)) else v

    changed = [k for k in sorted(given - set(RESUME_FLAGS)) if shown(getattr(args, k)) != shown(started.get(k))]
    if changed:
        was = ", ".join(f"{flag(k)} {shown(started.get(k))}" for k in changed)
        raise UserError(f"the run was started with {was}; --resume continues it as it was "
                        f"(leave out {', '.join(map(flag, changed))})")


def train(args, given=frozenset()):
    """given: the flags on the command line (given_flags), which --resume checks against the run's."""
    rank, world, device = setup_distributed(args.device)
    args.out = args.out or ("runs/ldm_ae" if args.stage == "ae" else "runs/ldm")
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.ckpt or Path(args.out) / "ckpt.pt", METHODS[args.stage])
        check_resume_flags(args, given, ckpt["args"])
        keep = {k: getattr(args, k) for k in RESUME_FLAGS if k not in ("epochs", "steps")}
        if args.epochs is not None or args.steps is not None:  # a new length for the run
            keep["epochs"], keep["steps"] = args.epochs, args.steps
        args = argparse.Namespace(**{**ckpt["args"], **keep})
    elif args.stage == "ae":
        args.dataset = args.dataset or "fashion-mnist"
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} (the global batch) must divide evenly over "
                        f"{world} processes")
    seed_everything(args.seed)  # the same on every rank: see global_randn
    run, dataset = (setup_autoencoder if args.stage == "ae" else setup_latent_diffusion)(args, device, ckpt)
    if len(dataset) < args.batch_size:
        raise UserError(f"{args.dataset} has {len(dataset)} images, fewer than --batch-size {args.batch_size}")
    run.opt = torch.optim.Adam(run.model.parameters(), lr=args.lr, betas=run.betas)
    run.device, run.path, run.saved, step = device, Path(args.out) / "ckpt.pt", None, 0
    if ckpt is not None:
        run.model.load_state_dict(ckpt["model"])
        if run.ema is not None:
            run.ema.load_state_dict(ckpt["ema"])
        run.opt.load_state_dict(ckpt["optimizer"])
        step = run.saved = ckpt["step"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        restore_device_rng(ckpt["rng"])
        if world > 1 and device.type == "cuda":  # every rank continues rank 0's stream (device 0)
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][0], device)
        print(f"resumed from step {step}")
    run.rank, run.world = rank, world
    run.ddp = DistributedDataParallel(run.model, device_ids=[device.index] if device.type == "cuda"
                                      else None) if world > 1 else run.model  # averages gradients
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a file: give a folder for the run's outputs")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    run.stop = []  # Ctrl-C or SIGTERM finishes the current step, saves, and exits
    handlers = {s: signal.signal(s, lambda signum, _: run.stop.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        step = run_epochs(run, dataset, step)
        if rank == 0 and run.saved != step:  # (an epoch's end saved it already)
            save_checkpoint(run.path, run, step)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if world > 1:
            dist.destroy_process_group()
    print(f"{'interrupted' if run.stop else 'done'} at step {step}; checkpoint {run.path}")
    if run.stop:  # 130 after Ctrl-C, 143 after SIGTERM: a script or a scheduler tells it from "done"
        sys.exit(128 + run.stop[0])


def run_epochs(run, dataset, step):
    args, device = run.args, run.device
    per_epoch = len(dataset) // args.batch_size
    total = args.steps or args.epochs * per_epoch
    amp = torch.autocast("cuda", torch.bfloat16, enabled=args.bf16 and device.type == "cuda")
    last_log = last_save = t_log = time.time()
    seen, first = 0, None  # first: the loss of this process's first step, the divergence rule's scale
    while step < total:
        epoch, skip = divmod(step, per_epoch)
        for x, y in epoch_batches(dataset, args, epoch, skip, run.rank, run.world):
            for group in run.opt.param_groups:
                group["lr"] = learning_rate(args, step, total)
            with amp:
                loss, detail = run.loss(run.ddp, x.to(device, memory_format=CL), y.to(device), run.rank, run.world)
            loss_all = all_sum(loss.detach(), run.world) / run.world  # the same on every rank
            first = loss_all.item() if first is None else first
            if diverged(loss_all.item(), first):
                raise divergence_error(run, loss_all.item(), first, x, step + 1)
            run.opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip:  # 0: no clipping (clip_grad_norm_ to 0 would zero every gradient)
                torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
            run.opt.step()
            step += 1
            if run.ema is not None:
                ema_update(run.ema, run.model, step, args.ema)
            seen += args.batch_size
            now = time.time()
            if now - last_log >= args.log_every or step == total:
                speed = seen / (now - t_log)
                print(f"step {step}/{total}  epoch {epoch + 1}  loss {loss_all.item():.4f}  {detail}  "
                      f"{speed:.0f} img/s  {(total - step) * args.batch_size / speed / 60:.1f} min left",
                      flush=True)
                last_log, seen, t_log = now, 0, now
            if now - last_save >= 60 * args.save_every and run.rank == 0:
                save_checkpoint(run.path, run, step)
                last_save = now
            if step == total or stopped(run):
                break
        if (step % per_epoch == 0 or step == total) and run.rank == 0:  # the others wait meanwhile
            run.before_save(run)  # what the checkpoint carries beyond the weights (stage 1: the scale)
            save_checkpoint(run.path, run, step)  # before the grid: a kill while it is drawn loses nothing
            try:
                run.end_of_epoch(run, epoch)
            except SamplingStopped:
                print(f"stopped while drawing the grid; {run.path} holds step {step}")
            seen, t_log = 0, time.time()  # images/s and time left count training alone
        if stopped(run):
            break
    return step


# ----------------------------------------------------------------------------------------------
# Sampling from a stage-2 checkpoint; encoding and decoding with a stage-1 checkpoint
# ----------------------------------------------------------------------------------------------

def decoder_of(ae_state, device):
    """The stage-1 decoder, from a stage-2 checkpoint's "ae" entry, and its scale factor."""
    ae_args = argparse.Namespace(**ae_state["args"])
    decoder = Decoder(ae_state["shape"][0], ae_args.f, ae_args.latent_channels, ae_args.ae_width,
                      ae_args.ae_res_blocks)
    decoder.load_state_dict(ae_state["decoder"])
    return decoder.to(device, memory_format=CL).eval(), ae_state["scale"]


def check_save(args, what):
    """--save names a file that can be written, before any work."""
    if not args.save or Path(args.save).suffix not in (".png", ".pt"):
        raise UserError(f"{what} needs --save FILE.png (a grid) or FILE.pt (a tensor)")
    save = Path(args.save)
    if save.is_dir():
        raise UserError(f"--save {save} is a folder: name a file in it, e.g. --save {save / 'samples.png'}")
    for parent in save.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"--save {save}: {parent} is a file, not a folder")


def write(x, path, nrow=None):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if path.endswith(".pt"):
        torch.save(x, path)
    else:
        save_grid(x, path, nrow=nrow)
    print(f"saved {path}")


@torch.no_grad()
def sample(args):
    if not args.ckpt:
        raise UserError("--sample needs --ckpt PATH (a stage-2 checkpoint, e.g. runs/ldm/ckpt.pt)")
    check_save(args, "--sample")
    ckpt = load_checkpoint(args.ckpt, "ldm")
    steps = args.sampling_steps or min(50, ckpt["args"]["T"])
    train_args = argparse.Namespace(**{**ckpt["args"], "sampler": args.sampler, "eta": args.eta,
                                       "sampling_steps": steps})
    classes, shape = ckpt["classes"], tuple(ckpt["shape"])
    if args.cfg_scale != 1 and not classes:
        raise UserError(f"--cfg-scale needs a conditional model; {args.ckpt} was trained without labels")
    sch = Schedule(train_args.T)
    if args.sampler == "ddim":
        ddim_timesteps(sch.T, steps)  # a clear error before any work
    device = pick_device(args.device)
    ema = make_model(train_args, shape, train_args.num_classes)
    ema.load_state_dict(ckpt["ema"])
    ema.to(device, memory_format=CL).eval()
    if not all(torch.isfinite(p).all() for p in ema.parameters()):
        raise UserError(f"{args.ckpt} holds non-finite weights (its run diverged): retrain with a lower --lr")
    decoder, scale = decoder_of(ckpt["ae"], device)
    cond_of = condition_table(classes, train_args, device)
    start, xs = time.time(), []
    for i in range(0, args.n, 256):
        ids = torch.arange(i, min(i + 256, args.n), device=device)
        cond = cond_of[ids % len(classes)] if classes else None
        z = draw(ema, cond, len(ids), shape, sch, train_args, device, args.seed + i, args.cfg_scale)
        xs.append(decode(decoder, z, scale).float().cpu())
        print(f"sampling: {i + len(ids)}/{args.n} images, {time.time() - start:.0f} s", flush=True)
    x = torch.cat(xs)
    if not torch.isfinite(x).all():
        raise UserError(f"the samples of {args.ckpt} came out non-finite: the checkpoint is broken, retrain it")
    print(f"{args.n} samples in {time.time() - start:.2f} s (guidance {args.cfg_scale})")
    write(x, args.save, nrow=min(len(classes), 10) if classes else None)


@torch.no_grad()
def encode(args):
    """Writes {"x": scale * z with z ~ q(z | x), "y": labels, "classes": names}: a data set for
    any method file (--dataset latents.pt)."""
    check_save(args, "--encode")
    if not args.save.endswith(".pt"):
        raise UserError("--encode writes a tensor file: --save latents.pt")
    device = pick_device(args.device)
    ae, ckpt, ae_args = load_autoencoder(args, device)
    name = args.dataset or ae_args.dataset
    dataset, info = load_dataset(name, args.data_dir, args.split == "train",
                                 args.image_size if args.dataset else ae_args.image_size)
    if [info.channels, info.size, info.size] != ckpt["shape"]:
        raise UserError(f"{args.ae} was trained on {tuple(ckpt['shape'])} images, {name} has "
                        f"{(info.channels, info.size, info.size)}")
    moments, labels = encode_all(ae, dataset, device)
    g = torch.Generator().manual_seed(args.seed)
    z = ckpt["scale"] * DiagonalGaussian(moments).sample(g)
    out = {"x": z, "y": labels, "classes": info.classes} if info.num_classes else {"x": z}
    Path(args.save).parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, args.save)
    print(f"saved {args.save}: {len(z)} latents {tuple(z.shape[1:])} of {name} ({args.split}), "
          f"std {z.std():.3f} (scale factor {ckpt['scale']:.4f})")


@torch.no_grad()
def decode_file(args):
    """Latents in a tensor file (a tensor or {"x": ...}, scaled as --encode writes them) -> images."""
    check_save(args, "--decode")
    if not args.ckpt or not Path(args.ckpt).is_file():
        raise UserError(f"--decode needs --ckpt LATENTS.pt (sampled or encoded latents), got {args.ckpt}")
    device = pick_device(args.device)
    ae, ckpt, ae_args = load_autoencoder(args, device)
    z = read_latents(args.ckpt, (ae_args.latent_channels, ckpt["shape"][-1] // ae_args.f), args.ae)
    x = torch.cat([decode(ae.decoder, zb.to(device), ckpt["scale"]).cpu() for zb in z.split(256)])
    write(x, args.save)


def read_latents(path, shape, ae_path):
    """The (N, c, h, h) latents of a tensor file (a tensor or {"x": ...}), or a clear error."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}): it is damaged or incomplete (a copy cut "
                        f"short?), or not a tensor file") from None
    if isinstance(obj, dict) and "x" not in obj:
        keys = ", ".join(map(str, obj)) or "none"
        raise UserError(f"{path} holds a dict without an \"x\" entry (its keys: {keys}): --decode reads a "
                        f"tensor or {{\"x\": latents}}, as --encode writes")
    z = obj["x"] if isinstance(obj, dict) else obj
    c, h = shape
    if not torch.is_tensor(z) or z.ndim != 4 or tuple(z.shape[1:]) != (c, h, h) or not len(z):
        got = tuple(z.shape) if torch.is_tensor(z) else f"a {type(z).__name__}"
        raise UserError(f"{path} must hold latents (N, {c}, {h}, {h}) for {ae_path}, got {got}")
    z = z.float()
    if not torch.isfinite(z).all():
        raise UserError(f"{path} holds non-finite latents (NaN or inf): whatever wrote them diverged; "
                        f"sample or encode them again")
    return z


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def positive_int(s):
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def int_list(s):
    """Comma-separated positive integers such as 1,2,2."""
    try:
        v = tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        v = ()
    if not v or min(v) <= 0:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers such as 1,2,2, got {s!r}")
    return v


def fill_model_defaults(args, size):
    """Stage 2's U-Net: as many levels (up to 3) as the latent grid halves to, attention at the last."""
    if args.mults is None:
        levels = 1
        while levels < 3 and size % 2 ** levels == 0 and size >> levels >= 4:
            levels += 1
        args.mults = (1, 2, 3)[:levels]
    args.attn = args.attn or (size >> (len(args.mults) - 1),)


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["ae", "ldm"], default="ldm",
                   help="ae: train the autoencoder; ldm: diffusion on its latents (needs --ae)")
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
    p.add_argument("--out", help="default runs/ldm_ae (stage 1), runs/ldm (stage 2)")
    p.add_argument("--resume", action="store_true", help="continue OUT/ckpt.pt (or --ckpt)")
    p.add_argument("--sample", action="store_true", help="only sample from --ckpt (stage 2)")
    p.add_argument("--encode", action="store_true", help="write the scaled latents of --dataset")
    p.add_argument("--decode", action="store_true", help="turn the latents in --ckpt into images")
    p.add_argument("--split", choices=["train", "test"], default="train", help="for --encode")
    p.add_argument("--ckpt")
    p.add_argument("--ae", help="a stage-1 checkpoint (stage 2, --encode, --decode)")
    p.add_argument("--n", type=positive_int, default=64)
    p.add_argument("--save")
    # stage 1
    p.add_argument("--f", type=positive_int, default=4, help="downsampling factor (2, 4, 8, ...)")
    p.add_argument("--latent-channels", type=positive_int, default=3, help="c, the latent's channels")
    p.add_argument("--ae-width", type=positive_int, default=64)
    p.add_argument("--ae-res-blocks", type=positive_int, default=2)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--l2-weight", type=float, default=0.0, help="adds this times |x - D(z)|^2")
    # stage 2
    p.add_argument("--T", type=positive_int, default=1000)
    p.add_argument("--width", type=positive_int, default=64, help="U-Net base channels")
    p.add_argument("--mults", type=int_list, help="channel multipliers per level (default: fit the latent)")
    p.add_argument("--res-blocks", type=positive_int, default=2)
    p.add_argument("--attn", type=int_list, help="latent resolutions with attention")
    p.add_argument("--heads", type=positive_int, default=4)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--cond", choices=["class", "text", "none"], default="class",
                   help="tau_theta: an embedding of the label, a transformer over the class name, "
                        "or no condition (an unconditional LDM)")
    p.add_argument("--context-dim", type=positive_int, default=128, help="the width of tau_theta(y)")
    p.add_argument("--p-uncond", type=float, default=0.1, help="how often training drops the condition")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim")
    p.add_argument("--sampling-steps", type=positive_int, help="DDIM steps (default 50, or T if smaller)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale s")
    p.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warm-up")
    p.add_argument("--lr-decay", choices=["none", "cosine"], default="none")
    p.add_argument("--ema", type=float, default=0.9999)
    p.add_argument("--grad-clip", type=float, default=1.0, help="0: no clipping")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast on CUDA")
    p.add_argument("--log-every", type=float, default=5.0, help="seconds")
    p.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoints")
    return p


def parse_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if sum((args.sample, args.encode, args.decode)) > 1:
        p.error("choose one of --sample, --encode, --decode")
    if not args.lr > 0:
        p.error(f"--lr must be positive, got {args.lr}")
    if not args.grad_clip >= 0:
        p.error(f"--grad-clip must be 0 (off) or positive, got {args.grad_clip}")
    for name, ok, what in (
            ("kl_weight", args.kl_weight >= 0, "0 or more"), ("l2_weight", args.l2_weight >= 0, "0 or more"),
            ("p_uncond", 0 <= args.p_uncond <= 1, "between 0 and 1"), ("warmup", args.warmup >= 0, "0 or more"),
            ("ema", 0 <= args.ema < 1, "at least 0 and below 1"),
            ("dropout", 0 <= args.dropout < 1, "at least 0 and below 1"),
            ("eta", 0 <= args.eta <= 1, "between 0 (DDIM) and 1 (DDPM's beta_tilde)"),
            ("cfg_scale", args.cfg_scale >= 0, "0 or more (0: unconditional, 1: no guidance)")):
        if not ok:
            p.error(f"--{name.replace('_', '-')} must be {what}, got {getattr(args, name)}")
    if args.stage == "ldm" and not (args.sample or args.encode or args.decode or args.resume):
        check_stage_2_flags(p, args)
        args.sampling_steps = args.sampling_steps or min(50, args.T)  # --sample: 50 or the checkpoint's T
    if not args.resume and args.epochs is None and args.steps is None:
        args.epochs = 10
    return args


def check_stage_2_flags(p, args):
    """What would otherwise fail only once the U-Net is built or the first grid is drawn (default
    --mults: the first level here, the others once the latent's size is known)."""
    problem = unet_width_problem(args.width, args.mults or (1,), args.heads)
    if problem:
        p.error(problem)
    if args.cond == "text" and args.context_dim % 4:
        p.error(f"--cond text: --context-dim must be a multiple of 4 (the text encoder's 4 heads), "
                f"got {args.context_dim}")
    if args.sampler == "ddim" and args.sampling_steps and args.sampling_steps > args.T:
        p.error(f"--sampling-steps must be between 1 and --T ({args.T}), got {args.sampling_steps}")


def given_flags(argv=None):
    """The names of the flags on the command line: a namespace whose every entry is a marker keeps
    the marker wherever a flag left it alone."""
    p, unset = parser(), object()
    given = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(p.parse_args([])), unset)))
    return {k for k, v in vars(given).items() if v is not unset}


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.sample:
            sample(args)
        elif args.encode:
            encode(args)
        elif args.decode:
            decode_file(args)
        else:
            train(args, given_flags(argv))
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C where no checkpoint is at stake: sampling, or before training
        print("interrupted: nothing saved", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
