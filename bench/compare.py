"""ddpm.py against Hugging Face diffusers (UNet2DModel + DDPMScheduler/DDIMScheduler).

Same data (Fashion-MNIST), same seed, same wall-clock training budget for every contender; then
1,000 samples from each with DDIM, 50 steps, scored by bench/quality.py. The contenders:

  ddpm.py CPU recipe      1.8M U-Net (32/64/96 channels, one block a level, attention at 7x7 only),
                          Adam 2e-3 with warm-up and cosine decay over the budget, EMA.
  diffusers 1.7M          equal parameters: UNet2DModel in diffusers' default style (two blocks a
                          level, attention at 14x14 and 7x7) at 32/64/64 channels, the size of
                          the usual MNIST tutorial; AdamW 2e-4, no EMA.
  diffusers 4.0M          the same style at 32/64/128 channels; AdamW 2e-4, no EMA.
  diffusers same net      (with --only) UNet2DModel built to ddpm.py's exact 1.8M architecture
                          and trained with its recipe: the two implementations side by side.

    pip install -r bench/requirements.txt
    python bench/compare.py --minutes 10 --n 1000
    python bench/compare.py --speed-only              # training img/s and ms per call only

Run it alone: two torch processes on the same cores slow each other down several times.
"""
import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import quality  # noqa: E402

import ddpm  # noqa: E402
from common import UNet, load_dataset, seed_everything  # noqa: E402

RECIPE = dict(batch_size=64, lr=2e-3, warmup=100)


def diffusers_unet(widths):
    """diffusers' default block layout, or (for "same") ddpm.py's CPU-recipe network exactly."""
    from diffusers import UNet2DModel
    if widths == "same":  # common.UNet(1, 32, (1, 2, 3), 1, (7,)): 1,805,121 parameters in both
        return UNet2DModel(sample_size=28, in_channels=1, out_channels=1, layers_per_block=1,
                           block_out_channels=(32, 64, 96), norm_num_groups=8,
                           down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
    return UNet2DModel(sample_size=28, in_channels=1, out_channels=1, layers_per_block=2,
                       block_out_channels=widths,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))


class Contender:
    """One model, its optimiser recipe, and how it turns (x_t, t) into an eps prediction."""

    def __init__(self, name, net, kind, lr, cosine, ema, channels_last):
        self.name, self.net, self.kind = name, net, kind
        self.cosine, self.use_ema, self.channels_last = cosine, ema, channels_last
        self.lr = lr
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        opt = torch.optim.Adam if kind == "ours" else torch.optim.AdamW
        self.opt = opt(self.net.parameters(), lr=lr)
        self.params = sum(p.numel() for p in self.net.parameters())

    def eps(self, net, x_t, t):
        """t is the paper's 1..T; diffusers counts from 0."""
        return net(x_t, t) if self.kind == "ours" else net(x_t, t - 1).sample


def train(c, dataset, sch, minutes, seed):
    seed_everything(seed)
    loader = DataLoader(dataset, RECIPE["batch_size"], shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    budget, start, step, images = 60 * minutes, time.time(), 0, 0
    horizon = None  # cosine decay over the steps the budget is expected to hold
    c.net.train()
    while time.time() - start < budget:
        for x0, _ in loader:
            if c.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            lr = c.lr
            if c.cosine:
                lr *= min(1.0, (step + 1) / RECIPE["warmup"])
                if horizon:
                    lr *= 0.5 * (1 + math.cos(math.pi * min(step / horizon, 1.0)))
            for g in c.opt.param_groups:
                g["lr"] = lr
            loss = ddpm.training_step(lambda x, t: c.eps(c.net, x, t), x0, sch, ddpm.Draws(len(x0), x0.device))
            c.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(c.net.parameters(), 1.0)
            c.opt.step()
            step += 1
            images += x0.shape[0]
            if c.use_ema:
                ddpm.ema_update(c.ema, c.net, step, 0.9999)
            elapsed = time.time() - start
            if step == 20:
                horizon = int(budget / (elapsed / step))
            if step % 50 == 0:
                print(f"  {c.name}: step {step}, loss {loss.item():.4f}, "
                      f"{images / elapsed:.0f} img/s", flush=True)
            if elapsed >= budget:
                break
    elapsed = time.time() - start
    return {"steps": step, "train_img_per_s": images / elapsed}


@torch.no_grad()
def sample_ours(c, sch, n, steps, seed):
    net = (c.ema if c.use_ema else c.net).eval()
    g = torch.Generator().manual_seed(seed)
    out = [ddpm.sample_ddim(lambda x, t: c.eps(net, x, t), (min(250, n - i), 1, 28, 28), sch, steps,
                            eta=0.0, clip_x0=True, generator=g) for i in range(0, n, 250)]
    return torch.cat(out)


@torch.no_grad()
def sample_diffusers(c, n, steps, seed):
    """The pipeline a diffusers user writes: DDIMScheduler with its default settings."""
    from diffusers import DDIMScheduler
    net = (c.ema if c.use_ema else c.net).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, n, 250):
        x = torch.randn(min(250, n - i), 1, 28, 28, generator=g)
        for t in scheduler.timesteps:
            x = scheduler.step(net(x, t).sample, t, x).prev_sample
        out.append(x)
    return torch.cat(out).clamp(-1, 1)


def speed_table(contenders, sch, rounds=8):
    """Training img/s from interleaved steps (so that load on the machine hits all alike)."""
    x = torch.randn(RECIPE["batch_size"], 1, 28, 28)
    times = {name: [] for name in contenders}
    for r in range(rounds + 2):
        for name, c in contenders.items():
            xc = x.contiguous(memory_format=torch.channels_last) if c.channels_last else x
            start = time.perf_counter()
            loss = ddpm.training_step(lambda x_t, t: c.eps(c.net, x_t, t), xc, sch, ddpm.Draws(len(xc), xc.device))
            c.opt.zero_grad(set_to_none=True)
            loss.backward()
            c.opt.step()
            if r >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - start)
    print(f"{'contender':22s} {'params':>7s} {'train img/s':>11s} {'ms/call/img':>11s}")
    for name, c in contenders.items():
        ips = RECIPE["batch_size"] / sorted(times[name])[len(times[name]) // 2]
        print(f"{name:22s} {c.params / 1e6:6.2f}M {ips:11.1f} {ms_per_call(c):11.2f}")


def ms_per_call(c, batch=256, repeats=3):
    net = c.ema.eval()
    x = torch.randn(batch, 1, 28, 28)
    if c.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.full((batch,), 500)
    with torch.no_grad():
        c.eps(net, x, t)
        start = time.time()
        for _ in range(repeats):
            c.eps(net, x, t)
    return 1000 * (time.time() - start) / repeats / batch


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="training budget per contender")
    p.add_argument("--n", type=int, default=1000, help="samples per contender")
    p.add_argument("--sampling-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--only", nargs="*", help="contender names to run (default: all but 'diffusers same net')")
    p.add_argument("--speed-only", action="store_true", help="interleaved training-step timings only")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    dataset, _ = load_dataset("fashion-mnist", args.data_dir)
    sch = ddpm.linear_schedule(1000)
    make = {
        "ddpm.py CPU recipe": lambda n: Contender(n, UNet(1, 32, (1, 2, 3), 1, (7,), image_size=28),
                                                  "ours", RECIPE["lr"], True, True, True),
        "diffusers 1.7M": lambda n: Contender(n, diffusers_unet((32, 64, 64)), "diffusers", 2e-4,
                                              False, False, False),
        "diffusers 4.0M": lambda n: Contender(n, diffusers_unet((32, 64, 128)), "diffusers", 2e-4,
                                              False, False, False),
        "diffusers same net": lambda n: Contender(n, diffusers_unet("same"), "diffusers",
                                                  RECIPE["lr"], True, True, False),
    }
    names = args.only or [n for n in make if n != "diffusers same net"]
    if args.speed_only:
        return speed_table({n: make[n](n) for n in (args.only or make)}, sch)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        seed_everything(args.seed)
        c = make[name](name)
        print(f"{name}: {c.params / 1e6:.2f}M parameters, training for {args.minutes} min", flush=True)
        row = {"name": name, "params": c.params, **train(c, dataset, sch, args.minutes, args.seed)}
        row["sample_ms_per_image_call"] = ms_per_call(c)
        start = time.time()
        x = sample_ours(c, sch, args.n, args.sampling_steps, args.seed) if c.kind == "ours" \
            else sample_diffusers(c, args.n, args.sampling_steps, args.seed)
        row["sampling_s"] = time.time() - start
        tag = name.split(",")[0].replace(" ", "_").replace(".", "")
        torch.save(x, out / f"compare_{tag}.pt")
        quality_scores = quality.score(x, "fashion-mnist", args.data_dir)
        row.update({k: quality_scores[k] for k in ("fd", "kid", "precision", "recall") if k in quality_scores})
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "compare.json").write_text(json.dumps(rows, indent=1))
    print_table(rows, args)


def print_table(rows, args):
    print(f"\nFashion-MNIST, {args.minutes:g} min of training each, {args.n} DDIM-{args.sampling_steps} samples")
    print(f"{'contender':22s} {'params':>7s} {'steps':>6s} {'img/s':>6s} {'ms/call':>8s} {'FD':>8s} "
          f"{'KID':>7s} {'prec':>5s} {'rec':>5s}")
    for r in rows:
        print(f"{r['name']:22s} {r['params'] / 1e6:6.2f}M {r['steps']:6d} {r['train_img_per_s']:6.1f} "
              f"{r['sample_ms_per_image_call']:8.2f} {r.get('fd', float('nan')):8.2f} "
              f"{r.get('kid', float('nan')):7.4f} {r.get('precision', float('nan')):5.2f} "
              f"{r.get('recall', float('nan')):5.2f}")


if __name__ == "__main__":
    main()
