"""The teacher against its consistency models: FD at 35 evaluations and at 1, 2 and 4 steps.

Each checkpoint samples 1,000 images from seed 1000 through consistency.py's own command line
(`--sample --save FILE.pt`), timed, and bench/quality.py scores them. A teacher checkpoint is
sampled with Heun (18 steps, 35 evaluations); a CD or CT checkpoint with Algorithm 1 at 1, 2 and 4
steps (the default taus). `--search-taus` also scores two-step sampling at several tau_1 (the
paper chose its taus by a search on FID, Sec. 6), the way the defaults were picked.

    python bench/consistency_eval.py runs/cm_teacher/ckpt.pt runs/cm_cd/ckpt.pt runs/cm_ct/ckpt.pt

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

FIELDS = ("fd", "kid", "precision", "recall", "class_entropy")


def sample_and_score(ckpt, flags, n, out):
    """Sample n images with `flags` through the command line; the seconds sampling took (as the
    command prints it: start-up and loading excluded) and the scores."""
    cmd = [sys.executable, str(ROOT / "consistency.py"), "--sample", "--ckpt", str(ckpt), "--n", str(n),
           "--seed", "1000", "--save", str(out), *flags]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    seconds = float(re.search(r"samples in ([\d.]+) s", r.stdout).group(1))
    q = quality.score(torch.load(out, weights_only=True))
    return seconds, {k: q[k] for k in FIELDS}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ckpts", nargs="+", help="consistency.py checkpoints (teacher, cd, ct)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], help="Algorithm 1 step counts")
    p.add_argument("--search-taus", type=float, nargs="*", help="two-step tau_1 values to score")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_cm"))
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "consistency_cpu.json"))
    args = p.parse_args()
    out, rows = Path(args.out), []
    out.mkdir(parents=True, exist_ok=True)
    for ckpt in args.ckpts:
        c = torch.load(ckpt, map_location="cpu", weights_only=True)
        stage, step = c["args"]["stage"], c["step"]
        name = f"{stage}{' (iCT)' if c['args'].get('ict') else ''} {Path(ckpt).parent.name}"
        if stage == "teacher":
            settings = [("Heun 18 steps", 35, [])]
        else:
            settings = [(f"{k} step{'s' if k > 1 else ''}", k, ["--sampling-steps", str(k)]) for k in args.steps]
            settings += [(f"2 steps, tau {tau:g}", 2, ["--sampling-steps", "2", "--taus", str(tau)])
                         for tau in args.search_taus or []]
        for label, nfe, flags in settings:
            seconds, q = sample_and_score(ckpt, flags, args.n, out / f"{Path(ckpt).parent.name}_{len(rows)}.pt")
            rows.append({"checkpoint": str(ckpt), "name": name, "train_steps": step, "sampler": label,
                         "nfe": nfe, "sample_ms_per_img": 1000 * seconds / args.n, **q})
            print(json.dumps(rows[-1]), flush=True)
    Path(args.results).write_text(json.dumps({"n": args.n, "rows": rows, "machine":
                                              f"{torch.get_num_threads()} threads, torch {torch.__version__}"},
                                             indent=1))
    print("\n| model | sampler | evaluations | ms/img | FD | KID | precision | recall | class entropy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['name']} | {r['sampler']} | {r['nfe']} | {r['sample_ms_per_img']:.1f} | {r['fd']:.1f} | "
              f"{r['kid']:.4f} | {r['precision']:.2f} | {r['recall']:.2f} | {r['class_entropy']:.3f} |")


if __name__ == "__main__":
    main()
