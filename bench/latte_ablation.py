"""latte.py's variants at equal minutes: full attention and the paper's four factorisations (Sec. 3.1).

Each variant trains for --minutes on the CPU recipe's clips (28-pixel garments on a 32x32 canvas,
4 frames) in uniform frame patches, at equal depth and width (T/4: depth 4, width 128, 4 heads,
which Variant 4 splits in halves), for the --steps a short probe run says fit, and is scored as
bench/latte_eval.py scores a checkpoint: per-frame FD on bench/quality.py, the share of clips in
one class in every frame, and the motion; beside real clips of held-out test garments, the floor.

    python bench/latte_ablation.py [--minutes 4] [--variants 0,1,2,3,4]

Run it alone: two torch processes on the same cores slow each other down several times.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import latte  # noqa: E402
from bench import latte_eval, tour  # noqa: E402

RECIPE = ["--canvas", "32", "--frames", "4", "--model", "T/4", "--batch-size", "32", "--lr", "1e-3",
          "--warmup", "100", "--lr-decay", "cosine", "--ema", "0.999"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=4.0, help="training minutes of each variant")
    p.add_argument("--variants", default="0,1,2,3,4")
    latte_eval.add_flags(p, out="runs/latte_ablation")
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "latte_ablation.json"))
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    if args.minutes <= 0 or any(v not in map(str, latte.VARIANTS) for v in variants):
        p.error(f"--minutes must be > 0 and --variants comma-separated among {sorted(latte.VARIANTS)}, "
                f"got --minutes {args.minutes:g} --variants {args.variants}")
    args.variants = [int(v) for v in variants]
    args.budget_minutes = args.minutes                  # what tour.probe_steps reads
    return args


def variant_row(variant, args, out):
    """Train one variant for about args.minutes and score its clips."""
    stage = tour.Stage(f"variant{variant}", "latte.py", [*RECIPE, "--variant", str(variant),
                                                         "--out", f"variant{variant}"], f"variant{variant}/ckpt.pt")
    steps = tour.probe_steps(stage, args, out)
    _, seconds = tour.run(tour.training_command(stage, args, out, steps, 1.0), out / "logs" / f"{stage.key}.log")
    row = latte_eval.drawn_row(out / stage.ckpt, args, out, f"Variant {variant}: {latte.VARIANTS[variant]}")
    return {**row, "variant": variant, "steps": steps, "train_minutes": seconds / 60}


def table(rows, minutes):
    lines = [f"Each variant trained {minutes:g} minutes (T/4, 4 frames of 32x32); {rows[0]['n']} frames "
             f"of {rows[0]['clips']} clips per row.", "",
             "| variant | steps | train min | per-frame FD | one class | px off a bouncing path | px a frame |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        own = r["own"]
        steps = f"{r['steps']:,}" if "steps" in r else "-"
        train = f"{r['train_minutes']:.1f}" if "steps" in r else "-"
        lines.append(f"| {r['model']} | {steps} | {train} | {r['fd']:.1f} | {own['one class']:.0%} | "
                     f"{own['px off a bouncing path']:.2f} | {own['px a frame']:.2f} |")
    return "\n".join(lines) + "\n"


def save(rows, args):
    """Every row reaches the disk as soon as it exists."""
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps({"machine": tour.machine(), "minutes": args.minutes,
                                              "recipe": RECIPE, "rows": rows}, indent=1))
    Path(args.results).with_suffix(".md").write_text(table(rows, args.minutes))
    print(table(rows, args.minutes), flush=True)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    rows = []
    for v in args.variants:
        rows.append(variant_row(v, args, out))
        save(rows, args)
    rows.append(latte_eval.real_row(out / f"variant{args.variants[0]}" / "ckpt.pt", args))
    save(rows, args)


if __name__ == "__main__":
    main()
