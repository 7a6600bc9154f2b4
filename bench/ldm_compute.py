"""Latent against pixel diffusion at the same budget (Rombach et al. 2022's compute argument, measured).

ddpm.py's CPU-recipe U-Net (width 32, one block a level, attention at 7x7) on 28x28 pixels, and the
same U-Net on ldm.py's f = 2 and f = 4 latents (as many of its levels as the latent grid halves
to): Gflops per denoising step, training images/s, sampling ms per image (DDIM, 50 steps, decoding
included), and FD (bench/quality.py) after the same wall-clock training budget. Every model
trains and samples through its own command line, unconditional, with the recipe's optimiser
(Adam 2e-3, warm-up, cosine decay over the run); the budget is turned into steps with the
images/s measured here first. The autoencoders are trained beforehand (the README's stage-1
recipes); their cost is paid once and reported beside the table, not inside the budget.

    python ldm.py --stage ae --f 2 ... --out runs/ldm_ae_f2
    python ldm.py --stage ae --f 4 ... --out runs/ldm_ae_f4
    python bench/ldm_compute.py --ae runs/ldm_ae_f2/ckpt.pt runs/ldm_ae_f4/ckpt.pt --minutes 5

Run it alone: two torch processes on the same cores slow each other down several times.
"""
import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import quality  # noqa: E402

import ddpm  # noqa: E402
import ldm  # noqa: E402

UNET = ["--width", "32", "--res-blocks", "1"]
RECIPE = ["--batch-size", "64", "--lr", "2e-3", "--warmup", "100", "--lr-decay", "cosine"]
BATCH = 64


def contenders(ae_paths):
    """(name, network, input shape, train command, sample command) for pixels and each autoencoder."""
    args = ddpm.parse_args(UNET + ["--mults", "1,2,3"])
    ddpm.fill_model_defaults(args, argparse.Namespace(size=28))
    rows = [("pixels 1x28x28", ddpm.make_model(args, 1, 28), (1, 28, 28),
             [sys.executable, str(ROOT / "ddpm.py"), *UNET, "--mults", "1,2,3", *RECIPE,
              "--sampler", "ddim", "--sampling-steps", "50"],  # the end-of-run grid too
             ["--sampler", "ddim", "--sampling-steps", "50"])]
    for path in ae_paths:
        ae = ldm.load_stage(path, "ae", "--ae")
        a = argparse.Namespace(**ae["args"])
        shape = (a.latent_channels, 28 // a.f, 28 // a.f)
        args = ldm.parse_args(UNET + ["--heads", "1", "--cond", "none"])
        ldm.fill_model_defaults(args, shape[-1])
        rows.append((f"f = {a.f} latents {'x'.join(map(str, shape))}", ldm.make_model(args, shape, None), shape,
                     [sys.executable, str(ROOT / "ldm.py"), "--stage", "ldm", "--ae", str(path), "--cond", "none",
                      "--heads", "1", *UNET, *RECIPE], ["--sampling-steps", "50"]))
    return rows


def gflops(net, shape):
    """Giga multiply-adds of one forward pass on one image, as the papers (and dit.py) count."""
    t = torch.full((1,), 500)
    with FlopCounterMode(display=False) as counter:
        net(torch.randn(1, *shape), t)
    return counter.get_total_flops() / 2e9


def train_speed(net, shape, steps=12, warmup=3):
    """Images/s of loss + backward + Adam on batches of 64 (random data: speed only)."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x, start = torch.randn(BATCH, *shape), None
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        t = torch.randint(1, 1001, (BATCH,))
        loss = (net(x, t) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * BATCH / (time.perf_counter() - start)


def run(cmd, log):
    start = time.time()
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed: see {log}")
    return time.time() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ae", nargs="+", required=True, help="ldm.py stage-1 checkpoints (f = 2, f = 4)")
    p.add_argument("--minutes", type=float, default=5.0, help="training budget per model")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_ldm"))
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "ldm_compute.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    out, rows = Path(args.out), []
    out.mkdir(parents=True, exist_ok=True)
    for name, net, shape, train_cmd, sample_flags in contenders(args.ae):
        speed = train_speed(net, shape)
        steps = int(args.minutes * 60 * speed / BATCH)
        run_dir = out / re.sub(r"\W+", "_", name)
        print(f"{name}: {gflops(net, shape):.4f} Gflops per step, {speed:.0f} img/s: {steps} steps", flush=True)
        train_s = run(train_cmd + ["--steps", str(steps), "--out", str(run_dir)], run_dir.with_suffix(".log"))
        samples = run_dir / "samples.pt"
        sample_s = run([train_cmd[0], train_cmd[1], "--sample", "--ckpt", str(run_dir / "ckpt.pt"), "--n",
                        str(args.n), "--seed", "1000", "--save", str(samples), *sample_flags],
                       run_dir.with_suffix(".sample.log"))
        q = quality.score(torch.load(samples, weights_only=True))
        rows.append({"name": name, "params_M": sum(p.numel() for p in net.parameters()) / 1e6,
                     "gflops_per_step": gflops(net, shape), "train_img_per_s": speed, "steps": steps,
                     "train_wall_s": train_s, "sample_ms_per_img": 1000 * sample_s / args.n,
                     **{k: q[k] for k in ("fd", "kid", "precision", "recall", "class_entropy")}})
        print(json.dumps(rows[-1]), flush=True)
    machine = f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    Path(args.results).write_text(json.dumps({"minutes": args.minutes, "n": args.n, "rows": rows,
                                              "machine": machine}, indent=1))
    base = rows[0]
    print("\n| input | params | Gflops/step | train img/s | sampling ms/img | steps in budget | FD |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['name']} | {r['params_M']:.2f}M | {r['gflops_per_step']:.3f} "
              f"({base['gflops_per_step'] / r['gflops_per_step']:.1f}x less) | {r['train_img_per_s']:.0f} "
              f"({r['train_img_per_s'] / base['train_img_per_s']:.1f}x) | {r['sample_ms_per_img']:.1f} | "
              f"{r['steps']} | {r['fd']:.1f} |")


if __name__ == "__main__":
    main()
