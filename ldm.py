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
    CPU recipe (about 15 minutes for both stages on 2 cores; see docs/ldm.md):
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
  cost per step (and without flips). The scale factor is 1 / std of z ~ q(z | x) on the first
  training batch, with fixed noise, computed again at each checkpoint of stage 1.
- Small networks for 28x28 images; the EMA decay warms up as in ddpm.py; an optional warm-up and
  cosine decay of the learning rate (the paper: constant).
- Only the KL-regularised autoencoder; the paper's VQ-regularised one (a codebook in the decoder) is not here.
- DDIM's S timesteps run evenly over 1..T (tau_S = T) and its last step goes to alpha_bar = 1, a clean
  z_0. The official make_ddim_timesteps('uniform') takes range(0, T, T // S) + 1 in its 0-based count
  (the paper's t = 2, 22, ..., 982 for S = 50: it never starts at T), and its last step ends at
  alphas_cumprod[0] = alpha_bar_1 = 1 - beta_1, not at 1.
"""
import argparse
import contextlib
import copy
import functools
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
from torch.utils.data import DataLoader, Subset, TensorDataset

import common
from common import Attention, ResBlock, UNet, UserError, load_dataset, pick_device, save_grid, seed_everything

# ==== the paper ====================================================================================
# Stage 1: the KL-regularised autoencoder (Sec. 3.1, Appendix G)

class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(log_var))), from the encoder's 2c output channels. The
    log-variance is clamped to [-30, 20] as in the official code: a KL weight of 1e-6 barely
    constrains it, and exp() of an unclamped value overflows."""

    def __init__(self, moments):
        self.mean, log_var = moments.chunk(2, dim=1)
        self.log_var = log_var.clamp(-30.0, 20.0)

    def sample(self, eps):
        """The reparameterisation trick: z = mu + sigma * eps, differentiable in mu and sigma."""
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
                layers.append(common.Downsample(ch))
        layers += [ResBlock(ch, ch), Attention(ch), ResBlock(ch, ch),
                   common.norm(ch), nn.SiLU(), nn.Conv2d(ch, 2 * latent_channels, 3, padding=1)]
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
                layers.append(common.Upsample(ch))
        layers += [common.norm(ch), nn.SiLU(), nn.Conv2d(ch, channels, 3, padding=1)]
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

    def forward(self, x, eps):
        """Stage 1's pass in one call (as DistributedDataParallel wants): the moments of
        q(z | x) = E(x), and D(z) at z = mu + sigma * eps."""
        moments = self.encoder(x)
        return moments, self.decoder(DiagonalGaussian(moments).sample(eps))


def make_autoencoder(args, channels):
    return Autoencoder(channels, args.f, args.latent_channels, args.ae_width, args.ae_res_blocks)


@torch.no_grad()
def scale_by_std(ae, x, eps):
    """The official `scale_by_std`: 1 / std of the latents z = mu + sigma * eps of a training batch.
    Diffusion's schedule assumes data of about unit variance: at std 0.1 the latent would drown in
    noise 10 times sooner than the schedule means to, at std 10 barely at all."""
    return 1.0 / ae.encode(x).sample(eps).flatten().std().item()


def psnr(x, x_rec):
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2), per image."""
    mse = (x - x_rec.clamp(-1, 1)).square().flatten(1).mean(1)
    return 10 * torch.log10(4 / mse.clamp(min=1e-10))


# Stage 2: the noise schedule and the forward process on latents

class Schedule:
    """beta_t, alpha_t = 1 - beta_t and alpha_bar_t = prod_{s<=t} alpha_s in float64, indexed by the
    paper's t (index 0: no noise). LDM's "linear" schedule is linear in sqrt(beta):
    beta_t = (sqrt(0.0015) + (t - 1)/(T - 1) (sqrt(0.0195) - sqrt(0.0015)))^2, the official configs'
    values; it ends a little less noisy than DDPM's (sqrt(alpha_bar_T) = 0.012 against 0.006).
    Other T rescale beta by 1000 / T, as ddpm.py does, so that alpha_bar_T stays near zero."""

    def __init__(self, T=1000, beta_1=0.0015, beta_T=0.0195):
        self.T = T
        beta = torch.linspace(beta_1 ** 0.5, beta_T ** 0.5, T, dtype=torch.float64) ** 2 * 1000 / T
        self.beta = torch.cat([torch.zeros(1, dtype=torch.float64), beta.clamp(max=0.999)])
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


# Stage 2's network: common.UNet on the latent grid, with cross-attention to tau_theta(y)

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
        self.norm, self.proj_in = common.norm(ch), nn.Conv2d(ch, ch, 1)
        self.norm1, self.attn1 = nn.LayerNorm(ch), CrossAttention(ch, ch, heads)
        self.norm2, self.attn2 = nn.LayerNorm(ch), CrossAttention(ch, context_dim, heads)
        self.norm3, self.ff = nn.LayerNorm(ch), GEGLU(ch)
        self.proj_out = common.zero(nn.Conv2d(ch, ch, 1))

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


def make_model(args, latent_shape, num_classes):
    C, size = latent_shape[0], latent_shape[-1]
    block = functools.partial(SpatialTransformer, context_dim=args.context_dim) if num_classes else Attention
    unet = UNet(C, args.width, args.mults, args.res_blocks, args.attn, args.dropout, image_size=size,
                num_heads=args.heads, attention_block=block)
    if not num_classes:
        return LatentDiffusion(unet)
    if args.cond == "text":
        return LatentDiffusion(unet, TextEncoder(args.context_dim, args.text_len))
    return LatentDiffusion(unet, ClassEncoder(num_classes, args.context_dim))


# Stage 2's objective (Eq. 2 with the condition of Eq. 3), guidance and samplers

def ldm_loss(eps_theta, z0, cond, t, eps, sch):
    """L_LDM = E_{E(x), y, eps ~ N(0, 1), t} || eps - eps_theta(z_t, t, tau_theta(y)) ||^2, DDPM's
    Algorithm 1 on latents (the mean over entries, L_simple up to a constant factor)."""
    # Stage 2, line 3: z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps
    z_t = q_sample(z0, t, eps, sch)
    # Stage 2, line 4: || eps - eps_theta(z_t, t, tau_theta(y)) ||^2
    return (eps - eps_theta(z_t, t, cond)).square().mean()


def null_condition(cond, num_classes):
    """The "no condition" of classifier-free guidance: label K, or the empty prompt."""
    return torch.zeros_like(cond) if cond.dim() == 2 else torch.full_like(cond, num_classes)


def condition_table(classes, args, device):
    """Row k: what the network is conditioned on for class k, the label or its name's tokens; the
    last row (id K) is the null condition. None without classes."""
    if not classes:
        return None
    table = torch.arange(len(classes) + 1) if args.cond == "class" else tokenize(classes + [""], args.text_len)
    return table.to(device)


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


def decode(decoder, z, scale):
    """x = D(z / scale): stage 2's latents back to images in [-1, 1]."""
    return decoder(z / scale).clamp(-1, 1)


# The training steps of the two stages; the caller takes the gradient step

def stage_1_step(ae, x, latent_shape, kl_weight, l2_weight, draw):
    """Stage 1, lines 2-4, for a batch x ~ data (line 1): |x - D(z)|_1 (+ l2_weight |x - D(z)|_2^2)
    + kl_weight KL, summed over pixels and latent entries per image as the official loss (so that the
    KL weight 1e-6 means what it does there), the mean over the batch. draw: the random draws."""
    # Stage 1, line 3: eps ~ N(0, I), for z = mu + sigma * eps
    eps = draw.randn(*latent_shape)
    # Stage 1, lines 2-3: q(z | x) = N(mu, diag(sigma^2)) = E(x); z = mu + sigma * eps; D(z)
    moments, x_rec = ae(x, eps)
    # Stage 1, line 4: L = |x - D(z)|_1 + w_KL KL(q(z | x) || N(0, I))
    rec = (x - x_rec).abs().flatten(1).sum(1)
    if l2_weight:
        rec = rec + l2_weight * (x - x_rec).square().flatten(1).sum(1)
    return (rec + kl_weight * DiagonalGaussian(moments).kl()).mean()


def stage_2_step(eps_theta, moments, y, scale, table, p_uncond, sch, draw):
    """Stage 2, lines 1-4, for a batch of the frozen encoder's posteriors q(z | x) (their moments)
    and labels y. table: row k is tau_theta's input for class k, the last row the null condition
    (None: an unconditional model)."""
    posterior = DiagonalGaussian(moments)
    # Stage 2, line 1: z_0 = scale * z, z ~ q(z | x) = E(x)
    z0 = scale * posterior.sample(draw.randn(*posterior.mean.shape[1:]))
    # Stage 2, line 1: y, or the null condition with probability p_uncond (for guidance)
    cond = None if table is None else table[torch.where(draw.rand() < p_uncond, len(table) - 1, y)]
    # Stage 2, line 2: t ~ Uniform({1, ..., T}), eps ~ N(0, I)
    t = draw.randint(1, sch.T + 1)
    eps = draw.randn(*z0.shape[1:])
    # Stage 2, lines 3-4: L_LDM
    return ldm_loss(eps_theta, z0, cond, t, eps, sch)


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

METHODS = {"ae": "ldm-ae", "ldm": "ldm"}  # the "method" of each stage's checkpoint
KEYS = {"ae": ("model", "optimizer", "scale"),  # of each stage's checkpoint, besides the harness's
        "ldm": ("model", "ema", "optimizer", "classes", "ae")}
FREE = ("device", "out", "resume", "ckpt", "data_dir", "log_every", "save_every", "compile", "bf16")
GUIDANCE_ROWS = (1.0, 1.5, 2.0, 4.0)  # the rows of every class-conditional grid
CL = torch.channels_last  # convolutions run faster on CPUs and GPUs with channels innermost


def load_stage(path, stage, flag="--ckpt", ckpt=None):
    """A checkpoint of stage 1 ("ae") or 2 ("ldm"), read from path unless given, with every flag in
    its args and, for stage 2, all of the decoder it carries; or one line."""
    ckpt = ckpt or load_checkpoint(path, [METHODS[stage]], ("shape", *KEYS[stage]), flag)
    names = list(vars(parser().parse_args([])))
    if stage == "ldm":  # set by stage 2's set-up
        names += ["num_classes"] + (["text_len"] if ckpt["args"].get("cond") == "text" and ckpt["classes"] else [])
    missing = [f"args.{k}" for k in names if k not in ckpt["args"]]
    if stage == "ldm":
        missing += [f"ae.{k}" for k in ("args", "decoder", "scale", "shape") if k not in ckpt["ae"]]
    if missing:
        raise UserError(f"{path} is an incomplete {METHODS[stage]} checkpoint: no {', '.join(missing)}")
    return ckpt


def load_autoencoder(path, device, what):
    if not path:
        raise UserError(f"{what} needs a stage-1 autoencoder: train one with python ldm.py --stage ae, "
                        f"then pass --ae runs/ldm_ae/ckpt.pt")
    ckpt = load_stage(path, "ae", "--ae")
    ae_args = argparse.Namespace(**ckpt["args"])
    ae = make_autoencoder(ae_args, ckpt["shape"][0])
    ae.load_state_dict(ckpt["model"])
    return ae.to(device, memory_format=CL).eval(), ckpt, ae_args


@torch.no_grad()
def encode_all(args, ae, ckpt, ae_args, device, train=True):
    """The posterior moments (mean, log-variance) and labels of --dataset (default: the autoencoder's),
    on the CPU, and its info."""
    name = args.dataset or ae_args.dataset
    dataset, info = load_dataset(name, args.data_dir, train, args.image_size if args.dataset else ae_args.image_size)
    if [info.channels, info.size, info.size] != ckpt["shape"]:
        raise UserError(f"{args.ae} was trained on {tuple(ckpt['shape'])} images, {name} has "
                        f"{(info.channels, info.size, info.size)}")
    moments, labels, loader, progress = [], [], DataLoader(dataset, 500), Progress("encoding")
    for i, (x, y) in enumerate(loader):
        moments.append(ae.encoder(x.to(device, memory_format=CL)).float().cpu())
        labels.append(y)
        progress(i + 1, len(loader))
    moments = torch.cat(moments)
    if not torch.isfinite(moments).all():
        raise UserError(f"the latents of {name} from {args.ae} hold non-finite values: the data set "
                        f"has NaN or inf in it, or the autoencoder's weights do")
    return moments, torch.cat(labels), info


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


def fill_model_defaults(args, size):
    """Stage 2's U-Net: as many levels (up to 3) as the latent grid halves to, attention at the last;
    the latent grid must halve len(mults) - 1 times, to no less than 2x2."""
    if args.mults is None:
        levels = 1
        while levels < 3 and size % 2 ** levels == 0 and size >> levels >= 4:
            levels += 1
        args.mults = (1, 2, 3)[:levels]
    args.attn = args.attn or (size >> (len(args.mults) - 1),)
    halvings = len(args.mults) - 1
    if size % 2 ** halvings or size >> halvings < 2:
        raise UserError(f"the {size}x{size} latent grid is too small to halve {halvings} times for --mults "
                        f"{','.join(map(str, args.mults))}: give fewer multipliers, or use a smaller --f")
    problem = unet_width_problem(args.width, args.mults, args.heads)
    if problem:
        raise UserError(problem)


def draw(model, cond, n, shape, sch, args, device, seed, scale, on_step=None):
    """n latents from fixed noise (seed), guided at `scale`, with the sampler of args."""
    g = torch.Generator(device).manual_seed(seed)
    z = torch.randn(n, *shape, device=device, generator=g)  # z_T ~ N(0, I)
    eps_theta = guided(model, cond, scale, args.num_classes)
    if args.sampler == "ddpm":
        return sample_ddpm(eps_theta, z, sch, g, on_step)
    return sample_ddim(eps_theta, z, sch, args.sampling_steps, args.eta, g, on_step)


def autoencoder_run(run):
    """Stage 1's run: the images, the autoencoder, its loss, its scale factor and its pictures."""
    args, device = run.args, run.device
    ae_levels(args.f)  # a power of 2, before any work
    run.dataset, info = load_dataset(args.dataset, args.data_dir, True, args.image_size,
                                     flip=args.dataset == "cifar10")
    test = load_dataset(args.dataset, args.data_dir, False, args.image_size)[0] \
        if args.dataset in ("mnist", "fashion-mnist", "cifar10") else run.dataset
    if info.size % args.f:
        raise UserError(f"--f {args.f} does not divide the {info.size}x{info.size} images: use --f "
                        f"{max(f for f in (1, 2, 4, 8, 16) if info.size % f == 0)} or --image-size "
                        f"{math.ceil(info.size / args.f) * args.f}")
    run.shape = (info.channels, info.size, info.size)
    latent = (args.latent_channels, info.size // args.f, info.size // args.f)
    run.model = model = make_autoencoder(args, info.channels).to(device, memory_format=CL)
    print(f"stage 1: autoencoder f = {args.f}, {run.shape} -> latent {latent} "
          f"({math.prod(run.shape) / math.prod(latent):.1f}x fewer numbers), "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, KL weight {args.kl_weight:g}")
    run.opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.9))
    run.loss = lambda batch, draws: stage_1_step(run.net, batch[0].contiguous(memory_format=CL), latent,
                                                 args.kl_weight, args.l2_weight, draws)

    def scale():  # from the first training batch and fixed noise; random's state (flips) kept
        state = random.getstate()
        x = next(iter(epoch_batches(run.dataset, args, 0, 0)))[0].to(device)
        random.setstate(state)
        eps = torch.randn(len(x), *latent, generator=torch.Generator().manual_seed(0)).to(device)
        return scale_by_std(model, x, eps)
    run.extra = lambda: {"scale": scale()}
    x_test = torch.stack([test[i][0] for i in range(min(1000, len(test)))])

    @torch.no_grad()
    def pictures(epoch, progress):  # test PSNR, and test images over their reconstructions (posterior means)
        rec = torch.cat([model.decode(model.encode(x.to(device)).mean).cpu() for x in x_test.split(250)])
        print(f"epoch {epoch + 1}: test PSNR {psnr(x_test, rec).mean():.2f} dB on {len(x_test)} images")
        path = Path(args.out) / f"reconstructions_epoch{epoch + 1:03d}.png"
        save_grid(torch.cat([x_test[:8], rec[:8].clamp(-1, 1)]), path, nrow=8)
    run.pictures = pictures


def latent_diffusion_run(run):
    """Stage 2's run: the data set's posteriors under the frozen encoder, the U-Net and tau_theta,
    the loss, and grids decoded by the decoder the checkpoint carries."""
    args, device = run.args, run.device
    ae, ae_ckpt, ae_args = load_autoencoder(args.ae, device, "stage 2")
    if args.dataset is None:  # recorded in the checkpoint
        args.dataset, args.image_size = ae_args.dataset, ae_args.image_size
    moments, labels, info = encode_all(args, ae, ae_ckpt, ae_args, device)
    run.dataset = TensorDataset(moments, labels)
    run.shape = shape = (ae_args.latent_channels, info.size // ae_args.f, info.size // ae_args.f)
    classes = info.classes if info.num_classes and args.cond != "none" else None
    if args.cond == "text" and not classes:
        raise UserError(f"--cond text uses the class names as prompts; {info.name} has no labels")
    args.num_classes = len(classes) if classes else None
    if classes and args.cond == "text":
        args.text_len = max(16, max(len(c.encode()) for c in classes))
    fill_model_defaults(args, shape[-1])
    table, sch, scale = condition_table(classes, args, device), Schedule(args.T), ae_ckpt["scale"]
    run.model = make_model(args, shape, args.num_classes).to(device, memory_format=CL)
    print(f"stage 2: latents {shape} from {args.ae} (f = {ae_args.f}), scale factor {scale:.4f}; U-Net "
          f"{sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M parameters, conditioning: "
          f"{args.cond if classes else 'none'}")
    run.ema = copy.deepcopy(run.model).requires_grad_(False)
    run.opt = torch.optim.Adam(run.model.parameters(), lr=args.lr)
    extra = {"classes": classes, "ae": {"args": ae_ckpt["args"], "decoder": ae.decoder.state_dict(), "scale": scale,
                                        "shape": ae_ckpt["shape"], "path": str(args.ae)}}
    run.extra = lambda: extra
    run.loss = lambda batch, draws: stage_2_step(run.net, batch[0].contiguous(memory_format=CL), batch[1], scale,
                                                 table, args.p_uncond, sch, draws)

    @torch.no_grad()
    def pictures(epoch, progress):  # from the EMA weights: a column per class (the first 10), a row per guidance
        ema = run.ema.eval()
        if table is None:
            z, nrow, note = draw(ema, None, 64, shape, sch, args, device, 0, 1, progress), 8, ""
        else:
            K = min(args.num_classes, 10)
            z = torch.cat([draw(ema, table[:K], K, shape, sch, args, device, 0, s, progress) for s in GUIDANCE_ROWS])
            nrow, note = K, f" (rows: guidance {', '.join(map(str, GUIDANCE_ROWS))})"
        path = Path(args.out) / f"samples_epoch{epoch + 1:03d}.png"
        save_grid(decode(ae.decoder, z, scale), path, nrow=nrow)
        print(f"epoch {epoch + 1}: samples in {path}{note}")
    run.pictures = pictures


def train_command(args, argv):
    stage = args.stage
    args.out = args.out or ("runs/ldm_ae" if stage == "ae" else "runs/ldm")
    p = parser()
    if args.resume:  # a flag given even at its default is refused: p without defaults tells which were given
        p.set_defaults(**dict.fromkeys(vars(args)))
        args = argparse.Namespace(**{**vars(p.parse_args(argv)), **{k: getattr(args, k) for k in FREE}})
    run = begin(args, p, METHODS[stage], KEYS[stage])
    if run.ckpt is not None:
        load_stage(args.ckpt or run.path, stage, ckpt=run.ckpt)
    (autoencoder_run if stage == "ae" else latent_diffusion_run)(run)
    train(run)


def check_output(path, what):
    """--save names a file that can be written, before any work."""
    if not path or Path(path).suffix not in (".png", ".pt"):
        raise UserError(f"{what} needs --save FILE.png (a grid) or FILE.pt (a tensor)")
    for parent in Path(path).parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"--save {path}: {parent} is a file, not a folder")
    check_save(path)


def sample(args):
    check_output(args.save, "--sample")

    def load(ckpt, device):
        classes = load_stage(args.ckpt, "ldm", ckpt=ckpt)["classes"]
        steps = args.sampling_steps or min(50, ckpt["args"]["T"])
        train_args = argparse.Namespace(**{**ckpt["args"], "sampler": args.sampler, "eta": args.eta,
                                           "sampling_steps": steps})
        shape, ae = tuple(ckpt["shape"]), ckpt["ae"]
        if args.cfg_scale != 1 and not classes:
            raise UserError(f"--cfg-scale needs a conditional model; {args.ckpt} was trained without labels")
        sch = Schedule(train_args.T)
        if args.sampler == "ddim":
            ddim_timesteps(sch.T, steps)  # a clear error before any work
        ema = make_model(train_args, shape, train_args.num_classes).to(device, memory_format=CL).eval()
        ema.load_state_dict(ckpt["ema"])
        decoder = make_autoencoder(argparse.Namespace(**ae["args"]), ae["shape"][0]).decoder
        decoder.to(device, memory_format=CL).eval().load_state_dict(ae["decoder"])
        table = condition_table(classes, train_args, device)

        @torch.no_grad()
        def draw_chunk(first, n, progress):  # image i of class i mod K
            cond = table[torch.arange(first, first + n, device=device) % len(classes)] if classes else None
            z = draw(ema, cond, n, shape, sch, train_args, device, args.seed + first, args.cfg_scale, progress)
            return decode(decoder, z, ae["scale"])
        return ema, draw_chunk

    sample_command(args, ["ldm"], KEYS["ldm"], load,
                   nrow=lambda ckpt: min(len(ckpt["classes"]), 10) if ckpt["classes"] else None)  # a class a column


@torch.no_grad()
def encode(args):
    """Writes {"x": scale * z with z ~ q(z | x), "y": labels, "classes": names}: a data set for
    any method file (--dataset latents.pt)."""
    check_output(args.save, "--encode")
    if not args.save.endswith(".pt"):
        raise UserError("--encode writes a tensor file: --save latents.pt")
    device = pick_device(args.device)
    ae, ckpt, ae_args = load_autoencoder(args.ae, device, "--encode")
    moments, labels, info = encode_all(args, ae, ckpt, ae_args, device, args.split == "train")
    posterior = DiagonalGaussian(moments)
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(args.seed))
    z = ckpt["scale"] * posterior.sample(eps)
    out = {"x": z, "y": labels, "classes": info.classes} if info.num_classes else {"x": z}
    torch.save(out, args.save)
    print(f"saved {args.save}: {len(z)} latents {tuple(z.shape[1:])} of {info.name} ({args.split}), "
          f"std {z.std():.3f} (scale factor {ckpt['scale']:.4f})")


@torch.no_grad()
def decode_file(args):
    """Latents in a tensor file (a tensor or {"x": ...}, scaled as --encode writes them) -> images."""
    check_output(args.save, "--decode")
    path = args.ckpt
    if not path or not Path(path).is_file():
        raise UserError(f"--decode needs --ckpt LATENTS.pt (sampled or encoded latents), got {path}")
    device = pick_device(args.device)
    ae, ckpt, ae_args = load_autoencoder(args.ae, device, "--decode")
    h = ckpt["shape"][-1] // ae_args.f
    shape = (ae_args.latent_channels, h, h)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}): damaged or incomplete, or not a tensor file") \
            from None
    if isinstance(obj, dict) and "x" not in obj:
        keys = ", ".join(map(str, obj)) or "none"
        raise UserError(f"{path} holds a dict without an \"x\" entry (its keys: {keys}): give what --encode writes")
    z = obj["x"] if isinstance(obj, dict) else obj
    if not torch.is_tensor(z) or tuple(z.shape[1:]) != shape or not len(z):
        got = tuple(z.shape) if torch.is_tensor(z) else f"a {type(z).__name__}"
        raise UserError(f"{path} must hold latents (N, {', '.join(map(str, shape))}) for {args.ae}, got {got}")
    if not torch.isfinite(z.float()).all():
        raise UserError(f"{path} holds non-finite latents (NaN or inf): sample or encode them again")
    x = torch.cat([decode(ae.decoder, zb.to(device), ckpt["scale"]).cpu() for zb in z.float().split(256)])
    if args.save.endswith(".pt"):
        torch.save(x, args.save)
    else:
        save_grid(x, args.save)
    print(f"saved {args.save}")


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    shared_flags(p, None, lr=2e-4)  # --out: runs/ldm_ae (stage 1) or runs/ldm (stage 2)
    p.add_argument("--stage", choices=["ae", "ldm"], default="ldm",
                   help="ae: train the autoencoder; ldm: diffusion on its latents (needs --ae)")
    p.add_argument("--encode", action="store_true", help="write the scaled latents of --dataset")
    p.add_argument("--decode", action="store_true", help="turn the latents in --ckpt into images")
    p.add_argument("--split", choices=["train", "test"], default="train", help="for --encode")
    p.add_argument("--ae", help="a stage-1 checkpoint (stage 2, --encode, --decode)")
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
                   help="tau_theta: an embedding of the label, a transformer over the class name, or none")
    p.add_argument("--context-dim", type=positive_int, default=128, help="the width of tau_theta(y)")
    p.add_argument("--p-uncond", type=float, default=0.1, help="how often training drops the condition")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim")
    p.add_argument("--sampling-steps", type=positive_int, help="DDIM steps (default 50, or T if smaller)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale s")
    return p


def parse_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    dataset = args.dataset
    check_shared_flags(p, args)
    if args.stage == "ldm" or args.encode:  # the autoencoder's data set, unless --dataset names another
        args.dataset = dataset
    if sum((args.sample, args.encode, args.decode)) > 1:
        p.error("choose one of --sample, --encode, --decode")
    for name, ok, what in (
            ("kl_weight", args.kl_weight >= 0, "0 or more"), ("l2_weight", args.l2_weight >= 0, "0 or more"),
            ("p_uncond", 0 <= args.p_uncond <= 1, "between 0 and 1"),
            ("dropout", 0 <= args.dropout < 1, "at least 0 and below 1"),
            ("eta", 0 <= args.eta <= 1, "between 0 (DDIM) and 1 (DDPM's beta_tilde)"),
            ("cfg_scale", args.cfg_scale >= 0, "0 or more (0: unconditional, 1: no guidance)")):
        if not ok:
            p.error(f"--{name.replace('_', '-')} must be {what}, got {getattr(args, name)}")
    if args.stage == "ldm" and not (args.sample or args.encode or args.decode or args.resume):
        # what would otherwise fail only once the U-Net is built (default --mults: its first level here)
        problem = unet_width_problem(args.width, args.mults or (1,), args.heads)
        if problem:
            p.error(problem)
        if args.cond == "text" and args.context_dim % 4:
            p.error(f"--cond text: --context-dim must be a multiple of 4 (the text encoder's 4 heads), "
                    f"got {args.context_dim}")
        if args.sampler == "ddim" and args.sampling_steps and args.sampling_steps > args.T:
            p.error(f"--sampling-steps must be between 1 and --T ({args.T}), got {args.sampling_steps}")
        args.sampling_steps = args.sampling_steps or min(50, args.T)  # --sample: 50 or the checkpoint's T
    return args


def main(argv=None):
    args = parse_args(argv)
    chosen = [c for flag, c in (("sample", sample), ("encode", encode), ("decode", decode_file)) if getattr(args, flag)]
    run_command(chosen[0] if chosen else functools.partial(train_command, argv=argv), args)


if __name__ == "__main__":
    main()
