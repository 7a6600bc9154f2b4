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
- The condition encoder E (Sec. 3.2: four 4x4 convolutions with stride 2 taking 512x512 images to
  Stable Diffusion's 64x64 latents, with ReLU) is four 3x3 convolutions with SiLU (as the official
  code) and stride 1: here the U-Net's first feature map has the image's own resolution.
- No "CFG resolution weighting" (Sec. 3.4's w_i = 64 / h_i on the residuals when no prompt is
  given); --control-scale multiplies every residual by one number instead.
- The conditions are computed in torch on the data itself: a Canny-like edge map (Sobel gradients,
  non-maximum suppression, one threshold instead of Canny's hysteresis), the garment's silhouette,
  and a 4x average-pooled image.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import Level, UNet, UserError, timestep_embedding

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
    zero=False: ordinary randomly initialised 1x1 convolutions (the paper's ablation)."""

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


def training_step(base, controlnet, x0, c, y, sch, draw):
    """DDPM's Algorithm 1 with the locked base and the ControlNet, for a batch (x_0, c, y); the
    caller takes the gradient step on the ControlNet's parameters. draw: the random draws (one
    process's share of a global batch's), with randint, randn and rand as in ddpm.py's Draws."""
    # Algorithm 1, line 2: x_0 ~ q(x_0), here with its condition c and label y (the caller's batch)
    # Algorithm 1, line 3: t ~ Uniform({1, ..., T})
    t = draw.randint(1, sch.T + 1)
    # Algorithm 1, line 4: eps ~ N(0, I)
    eps = draw.randn(*x0.shape[1:])
    # Sec. 3.3: "we randomly replace 50% text prompts c_t with empty strings"
    drop = draw.rand() < 0.5
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
    when the other map has one within `tolerance` pixels (as edge benchmarks match boundaries)."""
    pred, target = edges(samples) > 0, c > 0
    precision = (pred & dilate(target, tolerance)).sum((1, 2, 3)) / pred.sum((1, 2, 3)).clamp(min=1)
    recall = (target & dilate(pred, tolerance)).sum((1, 2, 3)) / target.sum((1, 2, 3)).clamp(min=1)
    return 2 * precision * recall / (precision + recall).clamp(min=1e-8)


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
