"""Shared parts of every method file: data, image grids, device and seed, and the U-Net.

Nothing else lives here. Schedules, losses, samplers, EMA and training loops belong to each
method file, written in its own paper's words, so that `METHOD.py` + `common.py` can be copied
into another project and just work.

    loader, info = load_data("fashion-mnist", "./data", batch_size=128)
    net = UNet(info.channels, 32, (1, 2, 3), 1, (7,), image_size=info.size)
    eps = net(x_t, t)                      # t: (B,) integer or float times
"""
import gzip
import math
import os
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import functional as TF


class UserError(Exception):
    """Bad input from the person running a script. main() prints it without a traceback."""


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
SMALL_FOLDER = 1000  # below this many images a generative model mostly memorises


@dataclass
class DataInfo:
    channels: int
    size: int
    count: int
    num_classes: int | None  # None: the data set has no labels (its loader yields y = -1)
    name: str
    classes: list | None = None  # the class names, where the data set has them
    frames: int | None = None  # clips: the frames of each (F, C, H, W) item; None: images


class ImageTensors(Dataset):
    """Images (N, C, H, W) and labels held in memory; yields (x, y). uint8 pixels are scaled to
    [-1, 1]; float tensors (an autoencoder's latents, say) are used as they are."""

    def __init__(self, images, labels, flip=False):
        self.images, self.labels, self.flip = images, labels, flip

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i]
        x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()
        if self.flip and random.random() < 0.5:
            x = x.flip(-1)
        return x, self.labels[i]


class ImageFolder(Dataset):
    """Any images PIL reads, of any size: resized and centre-cropped to `size`, in [-1, 1].

    Files in class subfolders (folder/cat/1.png, folder/dog/2.png) get labels; loose files get -1.
    """

    def __init__(self, files, labels, size, channels, flip=False):
        self.files, self.labels, self.size, self.flip = files, labels, size, flip
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as im:
            im = im.convert(self.mode)
        im = TF.center_crop(TF.resize(im, self.size, antialias=True), self.size)
        x = TF.to_tensor(im) * 2 - 1
        if self.flip and random.random() < 0.5:
            x = x.flip(-1)
        return x, self.labels[i]


def _torchvision_dataset(name, data_dir, train):
    """MNIST, Fashion-MNIST or CIFAR-10 from a local copy, else a download, else a clear error."""
    cls, folder, files = {
        "mnist": (torchvision.datasets.MNIST, "MNIST/raw", MNIST_FILES),
        "fashion-mnist": (torchvision.datasets.FashionMNIST, "FashionMNIST/raw", MNIST_FILES),
        "cifar10": (torchvision.datasets.CIFAR10, "cifar-10-batches-py",
                    ["data_batch_1", "...", "data_batch_5", "test_batch"]),
    }[name]
    raw = Path(data_dir) / folder
    if Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise UserError(f"--data-dir {data_dir} is a file: give a folder (the data sets are kept in it)")
    if name == "fashion-mnist":
        try:
            _unpack_debian_fashion_mnist(raw)
        except OSError as e:
            raise UserError(f"cannot write the data set into {raw} ({e.strerror}): give --data-dir a "
                            f"folder you can write to") from None
    try:
        return cls(data_dir, train=train, download=False)
    except RuntimeError:  # not there: try the network
        pass
    try:
        return cls(data_dir, train=train, download=True)
    except Exception as e:  # URLError, HTTPError, timeouts, checksum failures...
        hint = (f"\n  or install Debian's copy: apt-get install dataset-fashion-mnist "
                f"(read from {DEBIAN_FASHION_MNIST})" if name == "fashion-mnist" else "")
        raise UserError(
            f"cannot find or download {name} ({type(e).__name__}: {e}).\n"
            f"  Put these files (unpacked, without .gz) in {raw.resolve()}/: {', '.join(files)}"
            + (f"\n  or cifar-10-python.tar.gz in {Path(data_dir).resolve()}/" if name == "cifar10" else "")
            + hint) from None


def _unpack_debian_fashion_mnist(raw):
    """torchvision rejects Debian's recompressed .gz (other checksums) but reads them unpacked."""
    for f in MNIST_FILES:
        src = Path(DEBIAN_FASHION_MNIST) / (f + ".gz")
        if not (raw / f).exists() and src.exists():
            raw.mkdir(parents=True, exist_ok=True)
            tmp = raw / (f + ".tmp")
            with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            os.replace(tmp, raw / f)


def _folder_dataset(path, image_size, flip):
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    readable, modes = [], set()
    for p in files:
        try:
            with Image.open(p) as im:
                im.load()  # decodes the whole file: a truncated image fails here, not mid-training
                modes.add(im.mode)
            readable.append(p)
        except Exception:  # PIL raises several types for broken files
            warnings.warn(f"skipping unreadable image {p}")
    if not readable:
        raise UserError(f"no readable images in {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    if image_size is None:
        raise UserError("an image folder needs --image-size (e.g. --image-size 32 or 64)")
    top = [p.relative_to(root).parts[0] if p.parent != root else None for p in readable]
    classes = sorted(set(top) - {None})
    if len(classes) >= 2 and None not in top:
        labels = [classes.index(c) for c in top]
    else:
        classes, labels = [], [-1] * len(readable)
    channels = 1 if modes <= {"1", "L", "LA", "I", "I;16", "F"} else 3
    if len(readable) < SMALL_FOLDER:
        warnings.warn(f"{root} holds only {len(readable)} images: a generative model trained on "
                      f"under {SMALL_FOLDER} images mostly memorises them")
    ds = ImageFolder(readable, labels, image_size, channels, flip)
    return ds, DataInfo(channels, image_size, len(ds), len(classes) or None, str(root), classes or None)


def _tensor_file_dataset(path, clips=False):
    """A saved tensor (N, C, H, W), or a dict {"x": (N, C, H, W), "y": (N,) labels, "classes": names}
    with "y" and "classes" optional: how method files pass data (latents, samples) to each other.
    clips=True: the tensor holds clips (N, F, C, H, W) instead."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {path} as a saved tensor ({type(e).__name__}): save images "
                        f"with torch.save(x, path) or torch.save({{'x': x, 'y': y}}, path)") from None
    x, y, classes = (obj.get("x"), obj.get("y"), obj.get("classes")) if isinstance(obj, dict) else (obj, None, None)
    shape = "(N, F, C, H, W)" if clips else "(N, C, H, W)"
    if not torch.is_tensor(x) or x.ndim != 4 + clips or x.shape[-1] != x.shape[-2] or not len(x):
        got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise UserError(f"{path} must hold a tensor {shape} with H = W (or a dict with one under "
                        f"'x'), got {got}")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise UserError(f"{path} holds {x.dtype} images: save uint8 pixels or float values")
    if y is not None:
        if not torch.is_tensor(y) or y.shape != (len(x),) or y.is_floating_point() or (y < 0).any():
            got = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
            raise UserError(f"{path}: 'y' must hold {len(x)} integer labels >= 0, one per image, got {got}")
        num_classes = len(classes) if classes else int(y.max()) + 1
        if int(y.max()) >= num_classes:
            raise UserError(f"{path}: label {int(y.max())} but only {num_classes} class names")
        classes = list(classes) if classes else [str(i) for i in range(num_classes)]
    ds = ImageTensors(x, y.long() if y is not None else torch.full((len(x),), -1), flip=False)
    return ds, DataInfo(x.shape[-3], x.shape[-1], len(x), len(classes) if y is not None else None,
                        str(path), classes if y is not None else None, x.shape[1] if clips else None)


def load_dataset(name, data_dir="./data", train=True, image_size=None, flip=False):
    """`name` is mnist | fashion-mnist | cifar10 | a folder of images | a saved tensor FILE.pt.
    Returns (Dataset, DataInfo)."""
    if name in ("mnist", "fashion-mnist", "cifar10"):
        ds = _torchvision_dataset(name, data_dir, train)
        images = torch.as_tensor(np.asarray(ds.data))
        images = images.permute(0, 3, 1, 2) if images.ndim == 4 else images[:, None]  # (N, C, H, W)
        if image_size is not None and image_size != images.shape[-1]:
            images = TF.resize(images, [image_size, image_size], antialias=True)
        labels = torch.as_tensor(ds.targets)
        tensors = ImageTensors(images.contiguous(), labels, flip)
        return tensors, DataInfo(images.shape[1], images.shape[-1], len(images), 10, name,
                                 list(ds.classes))
    if os.path.isdir(name):
        return _folder_dataset(name, image_size, flip)
    if name.endswith(".pt"):
        if not os.path.isfile(name):
            raise UserError(f"no tensor file {name}")
        if image_size is not None:
            raise UserError("--image-size does not apply to a tensor file: its images keep their size")
        return _tensor_file_dataset(name)
    raise UserError(f"unknown data set {name!r}: use mnist, fashion-mnist, cifar10, "
                    f"the path of a folder of images or of a saved tensor FILE.pt")


def load_data(name, data_dir="./data", batch_size=128, train=True, image_size=None, flip=False,
              shuffle=True, drop_last=True, num_workers=0):
    """A DataLoader of (x, y) with x in [-1, 1], shape (B, C, H, W), and the data set's DataInfo."""
    ds, info = load_dataset(name, data_dir, train, image_size, flip)
    if len(ds) < batch_size and drop_last:
        raise UserError(f"{info.name} has {len(ds)} images, fewer than --batch-size {batch_size}")
    print(f"data: {info.name} ({'train' if train else 'test'}), {info.count} images, "
          f"{info.channels}x{info.size}x{info.size}, "
          f"{info.num_classes or 'no'} classes")
    loader = DataLoader(ds, batch_size, shuffle=shuffle, drop_last=drop_last,
                        num_workers=num_workers, persistent_workers=num_workers > 0)
    return loader, info


# ----------------------------------------------------------------------------------------------
# Device, seed, image grids
# ----------------------------------------------------------------------------------------------

def pick_device(name="auto"):
    """auto: cuda, then mps, then cpu. Says which it picked."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
                 "cpu": True}
    if name == "auto":
        name = next(d for d in ("cuda", "mps", "cpu") if available[d])
    elif name not in available:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or mps")
    elif not available[name]:
        raise UserError(f"--device {name} is not available on this machine: use --device auto")
    detail = torch.cuda.get_device_name() if name == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device: {name} ({detail})")
    return torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def save_grid(x, path, nrow=None):
    """Save images in [-1, 1] of shape (N, C, H, W) as one PNG grid (square unless nrow is given)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or math.ceil(math.sqrt(len(x)))
    torchvision.utils.save_image(((x.detach().float().cpu() + 1) / 2).clamp(0, 1), path,
                                 nrow=nrow, pad_value=1.0)


# ----------------------------------------------------------------------------------------------
# U-Net parts (Ho et al. 2020, Appendix B; the PixelCNN++-style Wide-ResNet U-Net)
# ----------------------------------------------------------------------------------------------

def timestep_embedding(t, dim, max_period=10000):
    """Transformer sinusoidal embedding of (B,) times, integer or real: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def norm(channels):
    """GroupNorm (Wu & He 2018) with up to 32 groups of at least 4 channels. With one channel per
    group it would be instance norm, which subtracts the per-channel time embedding added before it."""
    return nn.GroupNorm(math.gcd(32, max(channels // 4, 1)), channels)


def zero(module):
    """Zero-initialise a layer, so that the residual branch it ends starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Two 3x3 convs with GroupNorm, SiLU and dropout; the time (+ class) embedding is added between.
    emb_dim=None: no embedding (an autoencoder's block)."""

    def __init__(self, in_ch, out_ch, emb_dim=None, dropout=0.0):
        super().__init__()
        self.in_layers = nn.Sequential(norm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch)) if emb_dim else None
        self.out_layers = nn.Sequential(norm(out_ch), nn.SiLU(), nn.Dropout(dropout),
                                        zero(nn.Conv2d(out_ch, out_ch, 3, padding=1)))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x, emb=None):
        h = self.in_layers(x)
        if self.emb is not None:
            h = h + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class Attention(nn.Module):
    """Self-attention over the H*W positions of a feature map, with a residual connection."""

    def __init__(self, ch, num_heads=1):
        super().__init__()
        if ch % num_heads:
            raise UserError(f"attention width {ch} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm = norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, H*W, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The blocks at one resolution: a ResBlock, optionally followed by an attention block
    (`attention_block(channels, num_heads)`, self-attention unless the U-Net is given another)."""

    def __init__(self, in_ch, out_ch, emb_dim, dropout, attention_block, num_heads):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, dropout)
        self.attn = attention_block(out_ch, num_heads) if attention_block else None

    def forward(self, x, emb, context=None):
        h = self.res(x, emb)
        if self.attn is None:
            return h
        return self.attn(h) if context is None else self.attn(h, context)


class UNet(nn.Module):
    """The DDPM U-Net (Ho et al. 2020, Appendix B), time- and optionally class-conditional.

    Each level i runs at image_size / 2**i with base_width * channel_mults[i] channels and
    num_res_blocks ResBlocks; levels at attention_resolutions (in pixels) add self-attention.
    The DDPM CIFAR-10 network is UNet(3, 128, (1, 2, 2, 2), 2, (16,), 0.1, image_size=32): 35.7M.
    With num_classes=K, y in 0..K-1 picks a class and y = K (or y=None) means "no class", the
    null label that classifier-free guidance trains with. attention_block(channels, num_heads)
    builds the attention of the attention levels and the middle (default: self-attention); a block
    that also reads a condition, such as LDM's cross-attention, gets forward(x, t, context=c).
    """

    def __init__(self, in_channels, base_width=64, channel_mults=(1, 2, 2), num_res_blocks=2,
                 attention_resolutions=(7,), dropout=0.0, num_classes=None, image_size=28,
                 out_channels=None, num_heads=1, attention_block=Attention):
        super().__init__()
        levels = len(channel_mults)
        if image_size % 2 ** (levels - 1):
            fits = (image_size & -image_size).bit_length()  # 1 + the times it halves evenly
            raise UserError(f"image size {image_size} cannot be halved {levels - 1} times for "
                            f"channel_mults {tuple(channel_mults)}: use at most {fits} levels "
                            f"(e.g. 28x28: (1, 2, 2); 32x32 or 64x64: (1, 2, 2, 2)) or another size")
        sizes = [image_size // 2 ** i for i in range(levels)]
        if not set(attention_resolutions) <= set(sizes):
            raise UserError(f"attention_resolutions {tuple(attention_resolutions)} must be among the "
                            f"U-Net's resolutions {sizes}")
        self.num_classes, self.image_size, self.in_channels = num_classes, image_size, in_channels
        if base_width % 2:
            raise UserError(f"base_width must be even (the sinusoidal embedding), got {base_width}")
        ch = base_width
        emb_dim = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        self.down, skips, widths = nn.ModuleList(), [ch], [base_width * m for m in channel_mults]
        for i, w in enumerate(widths):
            for _ in range(num_res_blocks):
                attn = attention_block if sizes[i] in attention_resolutions else None
                self.down.append(Level(ch, w, emb_dim, dropout, attn, num_heads))
                ch = w
                skips.append(ch)
            if i < levels - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)
        self.mid = nn.ModuleList([Level(ch, ch, emb_dim, dropout, attention_block, num_heads),
                                  Level(ch, ch, emb_dim, dropout, None, num_heads)])
        self.up = nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks + 1):
                attn = attention_block if sizes[i] in attention_resolutions else None
                self.up.append(Level(ch + skips.pop(), w, emb_dim, dropout, attn, num_heads))
                ch = w
            if i > 0:
                self.up.append(Upsample(ch))
        self.out = nn.Sequential(norm(ch), nn.SiLU(),
                                 zero(nn.Conv2d(ch, out_channels or in_channels, 3, padding=1)))

    def forward(self, x, t, y=None, context=None, residuals=None):
        """x: (B, C, H, W); t: (B,) times (a float t in [0, 1] should be scaled up, e.g. by 1000);
        context: what the attention blocks attend to besides x, if they take it; residuals: a list
        of feature maps added to the skip connections (in the order the encoder makes them) and,
        last, to the middle's output (ControlNet's zero-convolution outputs)."""
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise UserError(f"this U-Net was built for {self.image_size}x{self.image_size} images, "
                            f"got {tuple(x.shape[-2:])}")
        emb = self.time_embed(timestep_embedding(t, self.time_embed[0].in_features))
        if self.class_embed is not None:
            y = torch.full_like(t, self.num_classes, dtype=torch.long) if y is None else y
            emb = emb + self.class_embed(y)
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb, context) if isinstance(layer, Level) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb, context)
        if residuals is not None:
            hs = [s + r for s, r in zip(hs, residuals[:-1], strict=True)]
            h = h + residuals[-1]
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb, context) if isinstance(layer, Level) else layer(h)
        return self.out(h)


# ----------------------------------------------------------------------------------------------
# Moving-garment clips (the video data set of latte.py)
# ----------------------------------------------------------------------------------------------

def bounce(p, travel):
    """Positions p folded into [0, travel]: a point moving in a straight line and reflected by the
    walls at 0 and travel (a triangle wave of period 2 travel)."""
    u = p % (2 * travel)
    return torch.minimum(u, 2 * travel - u)


class MovingClips(Dataset):
    """Clips (F, C, canvas, canvas) in [-1, 1], labelled with the image's class: image i of `images`
    (a data set of (x, y), x (C, S, S) in [-1, 1], such as load_dataset's Fashion-MNIST) moving in a
    straight line on a black canvas (-1) and bouncing off its edges. The whole S x S image stays on
    the canvas, at whole pixels: nothing is cut off or blurred. Clip i's start and its velocity (1 to
    max_speed pixels a frame along each axis, either way) come from a generator seeded by (seed, i),
    so the data set is the same on every run. A 28 x 28 garment on the 40 x 40 canvas travels 12
    pixels each way."""

    def __init__(self, images, frames=8, canvas=40, seed=0, max_speed=3):
        size = images[0][0].shape[-1]
        if canvas <= size:
            raise UserError(f"the canvas ({canvas}) must be larger than the {size}x{size} images")
        self.images, self.frames, self.canvas, self.seed = images, frames, canvas, seed
        self.travel = canvas - size
        self.max_speed = min(max_speed, self.travel)

    def __len__(self):
        return len(self.images)

    def path(self, i):
        """Clip i's top-left corners (F, 2), as (row, column) per frame."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        start = torch.randint(0, self.travel + 1, (2,), generator=g)
        speed = torch.randint(1, self.max_speed + 1, (2,), generator=g)
        sign = torch.randint(0, 2, (2,), generator=g) * 2 - 1
        return bounce(start + sign * speed * torch.arange(self.frames)[:, None], self.travel)

    def __getitem__(self, i):
        x, y = self.images[i]
        S = x.shape[-1]
        clip = torch.full((self.frames, x.shape[0], self.canvas, self.canvas), -1.0)
        for f, (r, c) in enumerate(self.path(i).tolist()):
            clip[f, :, r:r + S, c:c + S] = x
        return clip, y


def load_clips(name, data_dir="./data", train=True, frames=8, canvas=40, seed=0, image_size=None):
    """Clips (F, C, H, W) in [-1, 1] and their DataInfo (with .frames): a saved tensor FILE.pt of
    clips (N, F, C, H, W) (or a dict with them under 'x'), else MovingClips of load_dataset(name)'s
    images (image_size: a folder's, which must be smaller than the canvas)."""
    if name.endswith(".pt"):
        if not os.path.isfile(name):
            raise UserError(f"no tensor file {name}")
        return _tensor_file_dataset(name, clips=True)
    images, info = load_dataset(name, data_dir, train, image_size)
    clips = MovingClips(images, frames, canvas, seed)
    return clips, DataInfo(info.channels, canvas, len(clips), info.num_classes, f"moving {info.name}",
                           info.classes, frames)
