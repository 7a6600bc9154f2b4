"""Latte: Latent Diffusion Transformer for Video Generation (Ma et al. 2024, arXiv:2401.03048).

Latte is DiT (dit.py) for video. An image DiT cuts one image into N = H W / p^2 patches; a clip of
F frames cut the same way ("uniform frame patch embedding", Sec. 3.2) gives F N tokens, and cutting
t x p x p tubelets instead ("compression frame patch embedding": ViViT's tubelet embedding, the
spacetime patches of OpenAI's 2024 Sora report) gives F/t N. The transformer, its adaLN-Zero
blocks (the paper's S-AdaLN: shift, scale and gate regressed from the time step and the class) and
the diffusion stay DiT's. What changes is the attention: over all F N tokens it costs (F N)^2 per
layer, F^2 times an image's N^2. Factorised, spatial attention among the N tokens of each frame
(F N^2 for the clip) and temporal attention among the F tokens at each position (N F^2) cost
F N^2 + N F^2, linear in F while F < N. Sec. 3.1 puts the two together in four ways (in brief):

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
  into the tubelet: a 3-D transposed convolution with kernel = stride = (t, p, p).
- No joint image-video training and no ImageNet-pretrained DiT to start from.
"""
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from common import UserError, bounce, save_grid, timestep_embedding

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
    MLP, each branch with its own adaLN-Zero shift, scale and gate (TimeSformer's divided attention)."""

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
