"""Sample quality of rectified-flow checkpoints against the number of Euler steps.

For each checkpoint (1-RF, 2-RF, distilled, ...) and each N: --n samples with N Euler steps from
the same noise, scored by bench/quality.py; the straightness S on the 100-step paths. This is the
table in README.md's rectified-flow section.

    python bench/rf_steps.py runs/rectified_flow/ckpt_1rf.pt runs/rectified_flow/ckpt_2rf.pt \
                             runs/rectified_flow/ckpt_2rf_distilled.pt --n 1000

Run it alone: two torch processes on the same cores slow each other down several times.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import quality  # noqa: E402

import rectified_flow as rf  # noqa: E402
from common import pick_device  # noqa: E402

STEPS = (1, 2, 4, 8, 100)
CHUNK = 250


@torch.no_grad()
def draw(net, n, steps, seed, device):
    """n samples with `steps` Euler steps, noise chunk i seeded seed + i (as rectified_flow.py --sample);
    returns (samples in [-1, 1], mean straightness S, seconds)."""
    xs, s, start = [], 0.0, time.time()
    shape = net.shape
    for i in range(0, n, CHUNK):
        z0 = torch.randn(min(CHUNK, n - i), *shape,
                         generator=torch.Generator().manual_seed(seed + i)).to(device)
        velocities = []
        z1 = rf.euler(rf.velocity(net), z0, steps, velocities)
        s += rf.straightness(z0, z1, velocities) * len(z0)
        xs.append(z1.float().cpu())
    return torch.cat(xs).clamp(-1, 1), s / n, time.time() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ckpts", nargs="+", help="rectified_flow.py checkpoints")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--steps", default=",".join(map(str, STEPS)), help="Euler step counts N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    device, rows = pick_device(args.device), []
    for path in args.ckpts:
        ckpt = rf.load_checkpoint(path, ["rectified_flow"], rf.KEYS)
        net = rf.load_ema(ckpt, device, path)
        net.shape = tuple(ckpt["shape"])
        name = f"{ckpt['k']}-RF" + (" distilled" if ckpt["distilled"] else "")
        for steps in map(int, args.steps.split(",")):
            x, s, seconds = draw(net, args.n, steps, args.seed, device)
            r = quality.score(x, ckpt["args"]["dataset"], args.data_dir, str(device))
            rows.append({"model": name, "ckpt": path, "N": steps, "S": s, "FD": r["fd"],
                         "KID": r["kid"], "precision": r["precision"], "recall": r["recall"],
                         "class_entropy": r["class_entropy"], "seconds": seconds})
            print(f"{name:14s} N = {steps:3d}  FD {r['fd']:7.2f}  KID {1e3 * r['kid']:7.1f}e-3  "
                  f"precision {r['precision']:.2f}  recall {r['recall']:.2f}  "
                  f"class entropy {r['class_entropy']:.2f}  S {s:.4f}  ({seconds:.0f} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
