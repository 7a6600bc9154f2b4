"""Adding Conditional Control to Text-to-Image Diffusion Models (Zhang, Rao, Agrawala 2023,
arXiv:2302.05543): ControlNet.

A pretrained diffusion model is locked: its weights never change. A trainable copy of its encoder
(the input conv, the down levels and the middle) reads the noisy image as the locked model does,
plus a spatial condition c (edges, a silhouette, a low-resolution image), and its features are
added to the locked model's skip connections through "zero convolutions", 1x1 convolutions whose
weights and biases start at zero. At the first step every residual is exactly zero, so training
starts from the pretrained model itself; the copy starts from the locked weights, so it starts
from features that already understand noisy images. For one block F(.; Theta) of the network
(Sec. 3.1):

    y = F(x; Theta)                                                           (Eq. 1)
    y_c = F(x; Theta) + Z(F(x + Z(c; Theta_z1); Theta_c); Theta_z2)           (Eq. 2)

with Theta locked, Theta_c the trainable copy and Z(.; Theta_z1), Z(.; Theta_z2) the two zero
convolutions. Applied to the U-Net, Z(c; Theta_z1) joins the (encoded) condition after the copy's
input conv, and one Z(.; Theta_z2) per skip connection and one for the middle carry the copy's
features into the locked decoder. The loss is the locked model's own (Sec. 3.3):

    L = E_{x_0, t, c_t, c_f, eps ~ N(0, I)} || eps - eps_theta(x_t, t, c_t, c_f) ||^2

where c_t is the prompt, replaced by the empty prompt half of the time so that the ControlNet
learns to read the content from the condition c_f alone, and classifier-free guidance then works
at sampling time (Sec. 3.4): eps = eps_uc + beta_cfg (eps_c - eps_uc). Several ControlNets compose
by adding their residuals (Sec. 3.4, "multiple conditions").

Time runs as in ddpm.py: t = 1..T, and alpha_bar[t] is the paper's alpha_bar_t, alpha_bar[0] = 1.

Run (the locked base is a ddpm.py checkpoint):
    python controlnet.py --base runs/ddpm/ckpt.pt --condition edges --steps 600    # or mask, lowres
    python controlnet.py --sample --ckpt runs/controlnet/ckpt.pt --control IMAGE.png --save out.png
    python controlnet.py --sample --ckpt CKPT --control FILE.pt --save out.png     # conditions (N, C, H, W)
    python controlnet.py --sample --ckpt CKPT --control-from-test 16 --save out.png  # test images' conditions
    python controlnet.py --sample --ckpt CKPT --control-from-test 16 --control-scale 0.5 --save out.png
    python controlnet.py --sample --ckpt runs/edges/ckpt.pt --ckpt runs/mask/ckpt.pt \\
                         --control-from-test 16 --save out.png                     # two ControlNets composed
    python controlnet.py --base runs/ddpm/ckpt.pt --condition edges --no-zero-conv --steps 600  # ablation

Outputs in --out (runs/controlnet): samples_epochNNN.png per epoch (up to 8 test conditions above
three samples each), ckpt.pt (the ControlNet alone, with its base's path and step), and per epoch
a fidelity line beside the locked base's floor (--fidelity-every S: every S steps too).

What to expect: at step 0 the samples are exactly the locked base's (every residual is zero); the
condition takes hold within a few hundred steps, often abruptly (the paper's "sudden convergence",
Sec. 3.3), and the condition-fidelity measures (edge F1, mask IoU, low-res PSNR) rise with it.
Without zero convolutions the first steps add random features to a model that was working.

Differences from the paper:
- The locked base is ddpm.py's pixel-space, unconditional U-Net, not Stable Diffusion's latent,
  text-conditional one. A class label stands in for the text prompt, and since ddpm.py's base has
  no class input, the label enters through the ControlNet branch alone: the trainable copy gets a
  class embedding (zero-initialised, so the copy still starts as the locked encoder) added to its
  time embedding. Labels are dropped to the null class half of the time, as the paper drops
  prompts, and guidance on the class runs the ControlNet twice (with the label and with the null
  label), the condition kept in both passes.
- The condition encoder E (Sec. 3.2: "four convolution layers with 4 x 4 kernels and 2 x 2
  strides" with ReLU, taking 512x512 images to Stable Diffusion's 64x64 latents, which three such
  strides would do; the official code uses eight 3x3 convolutions with SiLU, three of stride 2) is
  four 3x3 convolutions with SiLU and stride 1: here the U-Net's first feature map has the image's
  own resolution.
- No "CFG resolution weighting" (Sec. 3.4's w_i = 64 / h_i on the residuals when no prompt is
  given); --control-scale multiplies every residual by one number instead.
- The conditions are computed in torch on the data itself: a Canny-like edge map (Sobel gradients,
  non-maximum suppression, one threshold instead of Canny's hysteresis), the garment's silhouette,
  and a 4x average-pooled image.
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
from torchvision.transforms.functional import pil_to_tensor

from common import Level, UNet, UserError, load_dataset, pick_device, save_grid, seed_everything, timestep_embedding

# ==== the paper ====================================================================================
# The locked base's diffusion (ddpm.py's schedules, rebuilt from its checkpoint's args)

class Schedule:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) in float64, indexed by the paper's t (index 0: no noise)."""

    def __init__(self, beta):  # beta: (T,) for t = 1..T
        self.T = len(beta)
        self.alpha_bar = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.float64), 1 - beta]), dim=0)


def base_schedule(args):
    """The schedule a ddpm.py checkpoint was trained with (its args' T and schedule), exactly as
    ddpm.py builds it: linear 1e-4..0.02 rescaled by 1000 / T, or cosine (Nichol & Dhariwal 2021),
    beta clipped at 0.999 in both."""
    T, kind = args["T"], args["schedule"]
    if kind == "linear":
        scale = 1000 / T
        return Schedule(torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64).clamp(max=0.999))
    if kind == "cosine":
        t, s = torch.arange(T + 1, dtype=torch.float64), 0.008
        f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        return Schedule((1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999))
    raise UserError(f"unknown schedule {kind!r} in the base checkpoint: ddpm.py writes linear or cosine")


def extract(a, t, x):
    """a[t] for a batch of times t, as float32 on x's device, shaped to broadcast against x."""
    return a.to(x.device)[t].float().view(-1, *([1] * (x.dim() - 1)))


def q_sample(x0, t, eps, sch):
    """DDPM Eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
    return extract(sch.alpha_bar.sqrt(), t, x0) * x0 + extract((1 - sch.alpha_bar).sqrt(), t, x0) * eps


def predict_x0(x_t, t, eps, sch):
    """DDPM Eq. 4 solved for x_0: (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
    return (x_t - extract((1 - sch.alpha_bar).sqrt(), t, x_t) * eps) / extract(sch.alpha_bar.sqrt(), t, x_t)


def ddim_timesteps(T, S):
    """S increasing times tau_1 < ... < tau_S = T spread evenly over 1..T, as ddpm.py's DDIM."""
    if not 1 <= S <= T:
        raise UserError(f"--sampling-steps must be between 1 and T = {T}, got {S}")
    return torch.linspace(1, T, S, dtype=torch.float64).round().long().unique().tolist() if S > 1 else [T]


# The locked model F(.; Theta)

def locked_base(ckpt, device="cpu"):
    """ddpm.py's EMA U-Net, rebuilt from its checkpoint (a loaded dict) as ddpm.py's make_model
    builds it, with every weight frozen (Sec. 3.1: "we freeze the parameters Theta of the original
    block"). It is unconditional: ddpm.py passes no num_classes."""
    method = ckpt.get("method", "unknown") if isinstance(ckpt, dict) else "unknown"
    if method != "ddpm":
        raise UserError(f"the locked base must be a ddpm.py checkpoint, this one is from {method}: "
                        f"train one with python ddpm.py and give its ckpt.pt")
    missing = [k for k in ("args", "shape", "ema") if ckpt.get(k) is None]
    if missing:
        raise UserError(f"the base checkpoint lacks {', '.join(missing)}: give a finished ddpm.py ckpt.pt")
    args, (channels, size, _) = ckpt["args"], ckpt["shape"]
    base = UNet(channels, args["width"], args["mults"], args["res_blocks"], args["attn"], args["dropout"],
                image_size=size)
    base.load_state_dict(ckpt["ema"])
    return base.to(device).requires_grad_(False).eval()


# The spatial conditions c, computed from images x in [-1, 1] of shape (B, C, H, W)

def sobel(gray):
    """The Sobel gradients (d/dx along columns, d/dy down the rows) of (B, 1, H, W) images, edges
    replicated so that the image's border is no edge."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=gray.device)
    k = torch.stack([kx, kx.T])[:, None]  # (2, 1, 3, 3)
    g = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), k)
    return g[:, :1], g[:, 1:]


def non_max_suppression(mag, gx, gy):
    """Canny's thinning: keep a pixel only where its magnitude is a maximum along the gradient.
    The direction is rounded to one of 8 neighbours; a tie between two pixels goes to the one up
    the gradient, so a step between two pixels gives one edge pixel, on its bright side (the
    garment's own outline, not the background next to it)."""
    H, W = mag.shape[-2:]
    padded = F.pad(mag, (1, 1, 1, 1))
    k = torch.round(torch.atan2(gy, gx) / (math.pi / 4)).long() % 8  # 0: brighter to the right, 2: below
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for i in range(8):
        dy, dx = round(math.sin(i * math.pi / 4)), round(math.cos(i * math.pi / 4))
        ahead = padded[..., 1 + dy:1 + dy + H, 1 + dx:1 + dx + W]  # the neighbour up the gradient
        behind = padded[..., 1 - dy:1 - dy + H, 1 - dx:1 - dx + W]
        keep |= (k == i) & (mag > ahead) & (mag >= behind)
    return mag * keep


def edges(x, threshold=0.25, thin=True):
    """Canny-like edges (B, 1, H, W) in {-1, 1}: the Sobel magnitude of the grey image, thinned by
    non-maximum suppression, above `threshold` (in units of a full -1 -> 1 step's magnitude, 8)."""
    gx, gy = sobel(x.mean(1, keepdim=True))
    mag = torch.hypot(gx, gy) / 8
    if thin:
        mag = non_max_suppression(mag, gx, gy)
    return torch.where(mag > threshold, 1.0, -1.0)


def mask(x, background=-0.9, close=True):
    """The garment's silhouette (B, 1, H, W) in {-1, 1}: pixels brighter than the background level
    (Fashion-MNIST's garments lie on black, -1) in any channel, closed (a 3x3 dilation, then an
    erosion) so that a dark pixel inside the garment stays inside the silhouette."""
    m = (x.amax(1, keepdim=True) > background).float()
    if close:  # on a background ring, so that the closing neither grows nor cuts at the image's border
        m = F.pad(m, (1, 1, 1, 1))
        m = -F.max_pool2d(-F.max_pool2d(m, 3, 1, 1), 3, 1, 1)[..., 1:-1, 1:-1]
    return m * 2 - 1


def lowres(x, factor=4):
    """A low-resolution image (B, C, H, W): `factor` x average-pooled, then upsampled back to H x W
    with nearest neighbours, so that the condition has the image's size (super-resolution)."""
    return F.interpolate(F.avg_pool2d(x, factor), size=x.shape[-2:], mode="nearest")


CONDITIONS = {"edges": edges, "mask": mask, "lowres": lowres}


# The network: the condition encoder E, the zero convolutions Z, the trainable copy Theta_c

def condition_encoder(in_channels, out_channels, widths=(16, 32, 64)):
    """E (Sec. 3.2): "a tiny network of four convolution layers" taking the condition image c_i to
    c_f with the channels of the U-Net's first feature map; stride 1 (see the module docstring)."""
    layers, ch = [], in_channels
    for w in (*widths, out_channels):
        layers += [nn.Conv2d(ch, w, 3, padding=1), nn.SiLU()]
        ch = w
    return nn.Sequential(*layers)


def zero_conv(ch):
    """Z(.; Theta_z): "a 1 x 1 convolution layer with both weight and bias initialized to zeros"."""
    conv = nn.Conv2d(ch, ch, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def out_channels(layer):
    """The channels a U-Net layer produces: those of its last convolution."""
    return [m.out_channels for m in layer.modules() if isinstance(m, nn.Conv2d)][-1]


class ControlNet(nn.Module):
    """The trainable copy Theta_c of a locked common.UNet's encoder (input conv, down levels,
    middle) with the condition encoder E, the zero convolution Z(.; Theta_z1) on E(c), and one zero
    convolution Z(.; Theta_z2) per skip connection and one for the middle. forward returns the
    residuals that UNet.forward(..., residuals=...) adds to the skips and the middle's output.
    zero=False: ordinary 1x1 convolutions of PyTorch's default random initialisation (the paper's
    ablation, which draws Gaussian weights)."""

    def __init__(self, base, cond_channels, num_classes=None, zero=True, widths=(16, 32, 64)):
        super().__init__()
        connect = zero_conv if zero else (lambda ch: nn.Conv2d(ch, ch, 1))
        # Sec. 3.1: "... and simultaneously clone the block to a trainable copy with parameters Theta_c"
        self.time_embed = copy.deepcopy(base.time_embed)
        self.conv_in, self.down, self.mid = (copy.deepcopy(m) for m in (base.conv_in, base.down, base.mid))
        # The class (our prompt) enters here: ddpm.py's base has none. Zero at first, like Z.
        self.num_classes = num_classes
        emb_dim = self.time_embed[-1].out_features
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        if self.class_embed is not None:
            nn.init.zeros_(self.class_embed.weight)
        ch = base.conv_in.out_channels
        self.encoder = condition_encoder(cond_channels, ch, widths)  # E: c_i -> c_f
        self.z_c = connect(ch)  # Z(.; Theta_z1)
        skips = [ch] + [out_channels(layer) for layer in base.down]
        self.z_skips = nn.ModuleList(connect(w) for w in skips)  # Z(.; Theta_z2), one per skip
        self.z_mid = connect(out_channels(base.mid))
        self.requires_grad_(True).train()  # the copy of a locked base comes frozen and in eval mode

    def forward(self, x_t, t, c, y=None):
        """x_t: (B, C, H, W); t: (B,); c: (B, C_c, H, W) the condition; y: (B,) labels or None
        (the null label). Returns len(down) + 2 residuals, the skips' in order, then the middle's."""
        emb = self.time_embed(timestep_embedding(t, self.time_embed[0].in_features))
        if self.class_embed is not None:
            y = torch.full_like(t, self.num_classes, dtype=torch.long) if y is None else y
            emb = emb + self.class_embed(y)
        # Eq. 2, inside: x + Z(c; Theta_z1), x being the copy's input-conv features of x_t
        h = self.conv_in(x_t) + self.z_c(self.encoder(c))
        hs = [h]
        for layer in self.down:  # F(.; Theta_c) on the encoder ...
            h = layer(h, emb) if isinstance(layer, Level) else layer(h)
            hs.append(h)
        for layer in self.mid:  # ... and the middle
            h = layer(h, emb)
        # Eq. 2, outside: Z(F(...; Theta_c); Theta_z2), added to the locked decoder's inputs
        return [z(s) for z, s in zip(self.z_skips, hs, strict=True)] + [self.z_mid(h)]


def eps_theta(base, controls, x_t, t, y=None, control_scale=1.0):
    """The locked base's eps prediction with the residuals of one or more ControlNets, each scaled by
    control_scale (a number, or one per ControlNet) and summed: "we can directly add the outputs of
    the corresponding ControlNets" (Sec. 3.4). controls: a list of (controlnet, c) pairs."""
    scales = control_scale if isinstance(control_scale, (list, tuple)) else [control_scale] * len(controls)
    residuals = None
    for (net, c), s in zip(controls, scales, strict=True):
        r = [s * r_i for r_i in net(x_t, t, c, y)]
        residuals = r if residuals is None else [a + b for a, b in zip(residuals, r, strict=True)]
    return base(x_t, t, residuals=residuals)


# The objective (Sec. 3.3)

def loss(base, controlnet, x0, c, y, t, eps, sch, drop=None, control_scale=1.0):
    """Sec. 3.3: L = || eps - eps_theta(x_t, t, c_t, c_f) ||^2 (the mean over pixels and the batch),
    with the class y as c_t and the condition c as c_f; where `drop` (B,) is True the label is the
    null class, the paper's empty prompt. Only the ControlNet's parameters receive gradients."""
    if drop is not None and y is not None and controlnet.num_classes:
        y = torch.where(drop, controlnet.num_classes, y)
    x_t = q_sample(x0, t, eps, sch)
    return (eps - eps_theta(base, [(controlnet, c)], x_t, t, y, control_scale)).square().mean()


def training_step(base, controlnet, x0, c, y, sch, draw, p_uncond=0.5):
    """DDPM's Algorithm 1 with the locked base and the ControlNet, for a batch (x_0, c, y); the
    caller takes the gradient step on the ControlNet's parameters. draw: the random draws (one
    process's share of a global batch's), with randint, randn and rand as in ddpm.py's Draws."""
    # Algorithm 1, line 2: x_0 ~ q(x_0), here with its condition c and label y (the caller's batch)
    # Algorithm 1, line 3: t ~ Uniform({1, ..., T})
    t = draw.randint(1, sch.T + 1)
    # Algorithm 1, line 4: eps ~ N(0, I)
    eps = draw.randn(*x0.shape[1:])
    # Sec. 3.3: "we randomly replace 50% text prompts c_t with empty strings" (p_uncond = 0.5)
    drop = draw.rand() < p_uncond
    # Algorithm 1, line 5: grad || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t, y, c) ||^2
    return loss(base, controlnet, x0, c, y, t, eps, sch, drop)


# The sampler: DDIM (eta = 0) with classifier-free guidance, a control scale and composition

def guided_eps(base, controls, x_t, t, y, guidance, control_scale):
    """Sec. 3.4: eps_prd = eps_uc + beta_cfg (eps_c - eps_uc), eps_uc with the null label; the
    conditions stay in both passes (the class is what is guided)."""
    eps_c = eps_theta(base, controls, x_t, t, y, control_scale)
    if guidance == 1 or y is None:
        return eps_c
    eps_uc = eps_theta(base, controls, x_t, t, None, control_scale)
    return eps_uc + guidance * (eps_c - eps_uc)


@torch.no_grad()
def sample_ddim(base, controls, shape, sch, steps, y=None, guidance=1.0, control_scale=1.0, clip_x0=True,
                device="cpu", generator=None, on_step=None):
    """Deterministic DDIM (Song et al. 2021, Eq. 12 with eta = 0) on the respaced chain tau_S = T >
    ... > tau_1 > tau_0 = 0, with the ControlNets' residuals. controls: a list of (controlnet, c)
    pairs, c of shape (n, C_c, H, W) (an empty list: the locked base alone); y: (n,) labels or None.
    The predicted x_0 is clipped to [-1, 1] as in ddpm.py. on_step(x, done, total) after each step."""
    taus = ddim_timesteps(sch.T, steps)
    x = torch.randn(shape, device=device, generator=generator)  # x_T ~ N(0, I)
    for i, (t, t_prev) in enumerate(zip(reversed(taus), list(reversed(taus))[1:] + [0])):
        ab, ab_prev = sch.alpha_bar[t].item(), sch.alpha_bar[t_prev].item()
        tt = torch.full((shape[0],), t, device=device)
        eps = guided_eps(base, controls, x, tt, y, guidance, control_scale)
        x0 = predict_x0(x, tt, eps, sch)  # Eq. 12, "predicted x_0"
        if clip_x0:  # keep eps consistent with the clipped x_0, as ddpm.py does
            x0 = x0.clamp(-1, 1)
            eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        # Eq. 12, sigma = 0: x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps
        x = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps
        if on_step is not None:
            on_step(x, i + 1, len(taus))
    return x


# Condition fidelity: how well samples follow their conditions (per image, higher is better)

def dilate(m, radius):
    """Boolean (B, 1, H, W) maps grown by `radius` pixels (a square neighbourhood)."""
    return F.max_pool2d(m.float(), 2 * radius + 1, 1, radius) > 0


def edge_f1(samples, c, tolerance=1):
    """F1 of the samples' edges against the condition edge maps c, an edge pixel counting as found
    when the other map has one within `tolerance` pixels (as edge benchmarks match boundaries);
    1 when both maps are empty."""
    pred, target = edges(samples) > 0, c > 0
    precision = (pred & dilate(target, tolerance)).sum((1, 2, 3)) / pred.sum((1, 2, 3)).clamp(min=1)
    recall = (target & dilate(pred, tolerance)).sum((1, 2, 3)) / target.sum((1, 2, 3)).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-8)
    return torch.where((pred | target).any(3).any(2).any(1), f1, 1.0)


def mask_iou(samples, c):
    """Intersection over union of the samples' silhouettes and the condition masks c (1: both empty)."""
    pred, target = mask(samples) > 0, c > 0
    union = (pred | target).sum((1, 2, 3))
    return torch.where(union > 0, (pred & target).sum((1, 2, 3)) / union.clamp(min=1), 1.0)


def lowres_psnr(samples, c):
    """PSNR in dB between the samples' low-resolution versions and the conditions c (range 2: [-1, 1])."""
    mse = (lowres(samples) - c).square().mean((1, 2, 3))
    return 10 * torch.log10(4 / mse.clamp(min=1e-10))


FIDELITY = {"edges": edge_f1, "mask": mask_iou, "lowres": lowres_psnr}


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

KEYS = ("model", "ema", "optimizer", "base", "base_step", "num_classes")  # besides the harness's
MEASURES = {"edges": "edge F1", "mask": "mask IoU", "lowres": "low-res PSNR (dB)"}
SHOWN = {"edges": "an edge map", "mask": "a silhouette", "lowres": "a low-resolution image"}


def cond_channels(condition, channels):
    """Edge maps and silhouettes have one channel; a low-resolution image has the image's."""
    return channels if condition == "lowres" else 1


def load_base(path, device, step=None, trained=None):
    """The locked base of the ddpm.py checkpoint at `path`, its schedule, shape and step; `step`:
    the one the ControlNet `trained` (a path) was trained on, refused if the file now holds another."""
    ckpt = load_checkpoint(path, ["ddpm"], ("shape", "ema"), flag="--base")
    if step is not None and ckpt["step"] != step:
        raise UserError(f"{trained} was trained on the base {path} at step {step}, but it now holds step "
                        f"{ckpt['step']}: give --base the checkpoint it was trained on")
    try:
        base = locked_base(ckpt, device)
    except (RuntimeError, KeyError, TypeError):
        raise UserError(f"{path}'s weights do not fit the U-Net its flags build: damaged?") from None
    return base, base_schedule(ckpt["args"]), tuple(ckpt["shape"]), ckpt["step"]


def make_controlnet(base, args, channels, num_classes):
    return ControlNet(base, cond_channels(args.condition, channels), num_classes, zero=args.zero_conv)


def draw(base, controls, n, shape, sch, args, device, y=None, seed=0, on_step=None):
    """n images by guided DDIM with the (controlnet, c) pairs `controls`, from a fixed seed."""
    g = torch.Generator(device).manual_seed(seed)
    steps = args.sampling_steps or min(50, sch.T)
    return sample_ddim(base, controls, (n, *shape), sch, steps, y, args.cfg_scale, args.control_scale,
                       device=device, generator=g, on_step=on_step)


def first_test_images(args, n):
    """The first n test images of args.dataset (an image folder or tensor file: its own images) and
    their labels, or None for a data set without labels."""
    test, info = load_dataset(args.dataset, args.data_dir, False, args.image_size)
    n = min(n, len(test))
    x = torch.stack([test[i][0] for i in range(n)])
    return x, torch.tensor([int(test[i][1]) for i in range(n)]) if info.num_classes else None


def shown(c, channels):
    """Conditions as images: a one-channel map repeated over the images' channels."""
    return c.expand(-1, channels, -1, -1) if c.shape[1] == 1 else c


def step_loss(run, base, sch, batch, draws):
    """training_step on a batch (x_0, y), its condition computed here from x_0: each process
    computes its own share's, so the global batch is the same for any number of processes."""
    x0, y = batch
    run.net.num_classes = run.model.num_classes  # (DistributedDataParallel hides the model's attributes)
    y = y if run.model.num_classes else None
    return training_step(base, run.net, x0, CONDITIONS[run.args.condition](x0), y, sch, draws, run.args.p_uncond)


def fidelity_line(run, base, sch, fixed, on_step=None):
    """The EMA ControlNet's condition fidelity on the fixed test conditions (noise seed 1, as the
    locked base's floor): the line from which the paper's "sudden convergence" is read."""
    c, y = fixed
    x = draw(base, [(run.ema.eval(), c)], len(c), run.shape, sch, run.args, run.device, y, 1, on_step)
    score = FIDELITY[run.args.condition](x.float(), c).mean().item()
    print(f"step {run.step}: {MEASURES[run.args.condition]} {score:.3f} on {len(c)} test conditions "
          f"(the locked base alone: {run.floor:.3f})", flush=True)


def pictures(run, base, sch, fixed, epoch, progress):
    """The epoch's grid, up to 8 test conditions above three samples each (EMA weights, fixed noise),
    and the fidelity line."""
    c, y = fixed
    k = min(8, len(c))

    def part(i):  # progress over the two samplers' steps
        return lambda x, done, total: progress(i * total + done, 2 * total)

    x = draw(base, [(run.ema.eval(), c[:k].repeat(3, 1, 1, 1))], 3 * k, run.shape, sch, run.args, run.device,
             None if y is None else y[:k].repeat(3), 0, part(0))
    path = Path(run.args.out) / f"samples_epoch{epoch + 1:03d}.png"
    save_grid(torch.cat([shown(c[:k], run.shape[0]), x]), path, nrow=k)
    print(f"epoch {epoch + 1}: conditions and samples in {path}")
    fidelity_line(run, base, sch, fixed, part(1))


def train_command(args, p):
    if not args.base and not args.resume:
        raise UserError("training needs --base CKPT, the ddpm.py checkpoint to lock (python ddpm.py writes "
                        "runs/ddpm/ckpt.pt)")
    run = begin(args, p, "controlnet", KEYS)
    args = run.args
    trained_on = None if run.ckpt is None else run.ckpt["base_step"]
    base, sch, base_shape, base_step = load_base(args.base, run.device, trained_on, args.ckpt or run.path)
    run.dataset, info = load_dataset(args.dataset, args.data_dir, True, args.image_size)
    run.shape = (info.channels, info.size, info.size)
    if run.shape != base_shape:
        raise UserError(f"the base {args.base} was trained on {base_shape} images, --dataset {args.dataset} "
                        f"holds {run.shape}: train the ControlNet on the base's data")
    if args.condition == "lowres" and info.size % 4:
        raise UserError(f"--condition lowres pools 4x4 blocks: {info.size}x{info.size} images do not divide into "
                        f"them (give --image-size a multiple of 4, or --condition edges or mask)")
    ddim_timesteps(sch.T, args.sampling_steps or min(50, sch.T))  # a clear error before any work
    run.model = make_controlnet(base, args, info.channels, info.num_classes).to(run.device)
    print(f"locked base: {args.base} (step {base_step}, {sum(w.numel() for w in base.parameters()) / 1e6:.2f}M "
          f"frozen parameters); ControlNet: {sum(w.numel() for w in run.model.parameters()) / 1e6:.2f}M trainable, "
          f"condition {args.condition}, {'zero' if args.zero_conv else 'plain'} 1x1 convolutions")
    run.ema = copy.deepcopy(run.model).requires_grad_(False)
    run.opt = torch.optim.AdamW(run.model.parameters(), lr=args.lr)  # only the ControlNet's: the base is locked
    run.extra = lambda: {"base": args.base, "base_step": base_step, "num_classes": info.num_classes}
    run.loss = lambda batch, draws: step_loss(run, base, sch, batch, draws)
    x, y = first_test_images(args, min(args.n, 64))
    fixed = (CONDITIONS[args.condition](x).to(run.device), None if y is None else y.to(run.device))
    if run.rank == 0:  # the floor: the locked base's samples, from the fidelity line's noise
        samples = draw(base, [], len(x), run.shape, sch, args, run.device, None, 1, Progress("the floor"))
        run.floor = FIDELITY[args.condition](samples.float(), fixed[0]).mean().item()
        print(f"{MEASURES[args.condition]} of the locked base alone on {len(x)} test conditions: {run.floor:.3f}")
    run.pictures = lambda epoch, progress: pictures(run, base, sch, fixed, epoch, progress)

    def after_step(step):  # (an epoch's end has its own line)
        if run.rank == 0 and step % args.fidelity_every == 0 and step % run.per_epoch and step < run.total:
            fidelity_line(run, base, sch, fixed)
    run.after_step = after_step if args.fidelity_every else None
    train(run)


def controlnet_of(path, ckpt, base, shape, device):
    """The EMA ControlNet of a controlnet.py checkpoint, on the locked base."""
    net = make_controlnet(base, argparse.Namespace(**ckpt["args"]), shape[0], ckpt["num_classes"])
    try:
        net.load_state_dict(ckpt["ema"])
    except RuntimeError:
        raise UserError(f"{path}'s weights do not fit a ControlNet of its base: damaged?") from None
    return net.to(device).eval()


def read_control(path, condition, channels, size):
    """--control's conditions (N, C, H, W) in [-1, 1]: IMAGE.png (one; an edge map or a silhouette is
    thresholded at mid-grey, an image for lowres is pooled as in training, which leaves an image
    already in 4x4 blocks as it is) or FILE.pt, of the shape the ControlNet takes, or one line."""
    need = f"{size}x{size} conditions with {channels} channel{'s' if channels > 1 else ''} ({SHOWN[condition]})"
    if not Path(path).is_file():
        raise UserError(f"no --control file {path}")
    if Path(path).suffix.lower() == ".pt":
        try:
            c = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot read --control {path} as a saved tensor ({type(e).__name__})") from None
        if not torch.is_tensor(c) or not c.is_floating_point() or c.shape[1:] != (channels, size, size) or not len(c):
            got = f"a {tuple(c.shape)} {c.dtype} tensor" if torch.is_tensor(c) else type(c).__name__
            raise UserError(f"--control {path} holds {got}: this ControlNet takes float (N, {channels}, {size}, "
                            f"{size}) tensors, {need}")
        if not torch.isfinite(c).all() or c.abs().max() > 1:
            raise UserError(f"--control {path} holds values outside [-1, 1]: conditions are images in [-1, 1]")
        return c.float()
    if Path(path).suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise UserError(f"--control takes IMAGE.png or FILE.pt, not {path}")
    from PIL import Image  # torchvision's dependency; only --control's images need it
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
    except OSError:
        raise UserError(f"cannot read --control {path} as an image: damaged?") from None
    if im.size != (size, size):
        raise UserError(f"--control {path} is {im.size[0]}x{im.size[1]}: this ControlNet takes {need}")
    c = pil_to_tensor(im)[None].float() / 127.5 - 1
    return lowres(c) if condition == "lowres" else torch.where(c > 0, 1.0, -1.0)


def sampling_conditions(args, trained, shape):
    """One (K, C_c, H, W) tensor of conditions per ControlNet (`trained`: their training flags) and
    K labels or None: --control's files in --ckpt's order (a file of one condition serves all K), or
    the conditions of --control-from-test N test images, with their labels."""
    if args.control_from_test:
        x, y = first_test_images(argparse.Namespace(**{**vars(trained[0]), "data_dir": args.data_dir}),
                          args.control_from_test)
        return [CONDITIONS[t.condition](x) for t in trained], y
    if not args.control:
        raise UserError("--sample needs --control IMAGE.png|FILE.pt (one per --ckpt) or --control-from-test N")
    if len(args.control) != len(trained):
        raise UserError(f"{len(trained)} --ckpt and {len(args.control)} --control: give one --control per "
                        f"--ckpt, in the same order")
    conds = [read_control(path, t.condition, cond_channels(t.condition, shape[0]), shape[-1])
             for path, t in zip(args.control, trained)]
    k = max(len(c) for c in conds)
    if any(len(c) not in (1, k) for c in conds):
        raise UserError(f"the --control files hold {' and '.join(str(len(c)) for c in conds)} conditions: "
                        f"give each ControlNet as many, or one for all")
    return [c.expand(k, -1, -1, -1) for c in conds], None


def sample(args):
    rows = []  # the conditions, one row per ControlNet, above the samples in a grid

    def load(ckpt, device):
        paths = [args.ckpt, *(args.compose or [])]
        ckpts = [ckpt] + [load_checkpoint(path, ["controlnet"], ("shape", *KEYS)) for path in paths[1:]]
        for path, other in zip(paths[1:], ckpts[1:]):
            if (other["base"], other["base_step"]) != (ckpt["base"], ckpt["base_step"]):
                raise UserError(f"{path} was trained on the base {other['base']} at step {other['base_step']}, "
                                f"{args.ckpt} on {ckpt['base']} at step {ckpt['base_step']}: composed "
                                f"ControlNets share one locked base")
        base, sch, shape, _ = load_base(args.base or ckpt["base"], device, ckpt["base_step"], args.ckpt)
        ddim_timesteps(sch.T, args.sampling_steps or min(50, sch.T))  # a clear error before any work
        nets = [controlnet_of(path, c, base, shape, device) for path, c in zip(paths, ckpts)]
        conds, y = sampling_conditions(args, [argparse.Namespace(**c["args"]) for c in ckpts], shape)
        y = y if any(net.num_classes for net in nets) else None
        if y is None and args.cfg_scale != 1:
            raise UserError(f"--cfg-scale {args.cfg_scale:g} guides on the class, and these samples have none "
                            f"(--control files carry no labels): give --control-from-test N or --cfg-scale 1")
        rows.extend(shown(c, shape[0]) for c in conds)
        k = len(conds[0])
        print(f"{len(nets)} ControlNet{'s' * (len(nets) > 1)} on {k} condition{'s' * (k > 1)}"
              f"{', with their test labels' if y is not None else ''}")

        def draw_chunk(first, n, progress):  # sample i follows condition i mod K
            i = torch.arange(first, first + n) % k
            controls = [(net, c[i].to(device)) for net, c in zip(nets, conds)]
            labels = None if y is None else y[i].to(device)
            return draw(base, controls, n, shape, sch, args, device, labels, args.seed + first, progress).clamp(-1, 1)
        return nn.ModuleList(nets), draw_chunk

    def write(x, path):  # a tensor, or a grid of the conditions above their samples, one column each
        if path.endswith(".pt"):
            torch.save(x, path)
        else:
            save_grid(torch.cat([*rows, x]), path, nrow=len(rows[0]))

    sample_command(args, ["controlnet"], KEYS, load, write=write)


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], conflict_handler="resolve",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    shared_flags(p, "runs/controlnet", lr=1e-4)
    p.add_argument("--ckpt", action="append", help="a ControlNet's checkpoint; with --sample, two or more compose")
    p.add_argument("--base", help="the ddpm.py checkpoint to lock (training needs one)")
    p.add_argument("--condition", choices=list(CONDITIONS), default="edges")
    p.add_argument("--no-zero-conv", dest="zero_conv", action="store_false",
                   help="1x1 convolutions of PyTorch's default (random) initialisation instead of zero ones "
                   "(the paper's ablation, Fig. 8, draws Gaussian weights)")
    p.add_argument("--p-uncond", type=float, default=0.5, help="label dropout (Sec. 3.3: 50%% empty prompts)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance on the class (1: none)")
    p.add_argument("--control-scale", type=float, default=1.0, help="the residuals' weight (0: the base alone)")
    p.add_argument("--sampling-steps", type=positive_int, help="DDIM steps S (default 50, or T if smaller)")
    p.add_argument("--fidelity-every", type=int, default=0,
                   help="steps between fidelity lines (0: at each epoch's end only)")
    control = p.add_mutually_exclusive_group()
    control.add_argument("--control", action="append",
                         help="--sample: IMAGE.png or FILE.pt (N, C, H, W) in [-1, 1]; one per --ckpt")
    control.add_argument("--control-from-test", type=positive_int, metavar="N",
                         help="--sample: the conditions of N test images")
    return p


def parse_args(argv=None, p=None):
    p = p or parser()
    args = p.parse_args(argv)
    check_shared_flags(p, args)
    for flag, ok, what in [("control_scale", args.control_scale >= 0, "0 or more"),
                           ("cfg_scale", args.cfg_scale >= 0, "0 or more"),
                           ("p_uncond", 0 <= args.p_uncond <= 1, "between 0 and 1"),
                           ("fidelity_every", args.fidelity_every >= 0, "0 (off) or more")]:
        if not ok:
            p.error(f"--{flag.replace('_', '-')} must be {what}, got {getattr(args, flag)}")
    ckpts = args.ckpt or []
    if len(ckpts) > 1 and not args.sample:
        p.error("two --ckpt compose ControlNets for --sample: training and --resume take one")
    args.ckpt, args.compose = (ckpts[0] if ckpts else None), (ckpts[1:] or None)
    if args.base:
        args.base = str(Path(args.base).resolve())  # where the checkpoint will find its base
    return args


def main(argv=None):
    p = parser()
    args = parse_args(argv, p)
    run_command(sample if args.sample else lambda a: train_command(a, p), args)


if __name__ == "__main__":
    main()
