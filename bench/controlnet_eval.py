"""A ControlNet's condition fidelity against its locked base's floor, and the FD of both.

Each checkpoint draws one sample for each of the first N test images' conditions through
controlnet.py's own command line (`--sample --control-from-test N`, seed 1000); `--control-scale 0`
on the same noise is the locked base alone, the floor (its samples ignore the conditions). The
samples' conditions are scored against the ones they were drawn from (edge F1, mask IoU or
low-res PSNR, as the checkpoint's --condition), and bench/quality.py scores the samples.

    python bench/controlnet_eval.py runs/controlnet-cpu/ckpt.pt [more ControlNets] [--n 1000] [--json F]
    python bench/controlnet_eval.py --plot assets/controlnet_convergence.png zero.log plain.log

--plot draws the fidelity lines of training logs (`step N: edge F1 ...`, --fidelity-every) against
the step, one curve a log, with the locked base's floor: where the paper's "sudden convergence" is.

Run it alone: two torch processes on the same cores slow each other down several times.
"""
import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import quality  # noqa: E402

import controlnet  # noqa: E402
from common import load_dataset  # noqa: E402

FIELDS = ("fd", "precision", "recall", "class_entropy")


def draw(ckpt, n, scale, out):
    """n samples, one per test condition, and the seconds they took (as the command prints them)."""
    cmd = [sys.executable, str(ROOT / "controlnet.py"), "--sample", "--ckpt", str(ckpt), "--n", str(n),
           "--control-from-test", str(n), "--control-scale", str(scale), "--seed", "1000", "--save", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    return torch.load(out, weights_only=True), float(re.search(r"samples in ([\d.]+) s", r.stdout).group(1))


def evaluate(path, n):
    """The ControlNet's and the floor's fidelity and scores on the first n test conditions."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    args = argparse.Namespace(**ckpt["args"])
    test, _ = load_dataset(args.dataset, args.data_dir, False, args.image_size)
    c = controlnet.CONDITIONS[args.condition](torch.stack([test[i][0] for i in range(n)]))
    rows = {}
    for name, scale in [("controlnet", 1.0), ("locked base (floor)", 0.0)]:
        x, seconds = draw(path, n, scale, Path(path).with_name(f"eval_scale{scale:g}.pt"))
        q = quality.score(x)
        rows[name] = {"fidelity": controlnet.FIDELITY[args.condition](x, c).mean().item(), "seconds": seconds,
                      **{k: q[k] for k in FIELDS}}
    return {"ckpt": str(path), "condition": args.condition, "zero_conv": args.zero_conv, "step": ckpt["step"],
            "n": n, "rows": rows}


def plot(path, logs):
    """The fidelity lines of each training log against the step, and the floor, in one figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for log in logs:
        text = Path(log).read_text()
        points = [(int(s), float(v)) for s, m, v in re.findall(r"^step (\d+): (.+?) ([\d.]+) on", text, re.M)]
        measure = re.search(r"^step \d+: (.+?) [\d.]+ on", text, re.M).group(1)
        floor = float(re.search(r"locked base alone: ([\d.]+)", text).group(1))
        ax.plot(*zip(*points), marker=".", label=Path(log).stem)
    ax.axhline(floor, color="grey", linestyle="--", label="locked base alone")
    ax.set(xlabel="training step", ylabel=measure, title="condition fidelity on 64 test conditions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ckpts", nargs="+", help="checkpoints, or with --plot training logs")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--plot", metavar="PNG", help="plot the fidelity lines of the logs given")
    a = p.parse_args()
    if a.plot:
        return plot(a.plot, a.ckpts)
    results = [evaluate(path, a.n) for path in a.ckpts]
    for r in results:
        measure = controlnet.MEASURES[r["condition"]]
        print(f"{r['ckpt']} (step {r['step']}, {'zero' if r['zero_conv'] else 'plain'} convolutions):")
        for name, row in r["rows"].items():
            print(f"  {name:20s} {measure} {row['fidelity']:.3f}  FD {row['fd']:.2f}  precision "
                  f"{row['precision']:.2f}  recall {row['recall']:.2f}  ({row['seconds']:.0f} s for {r['n']})")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
