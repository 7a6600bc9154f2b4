"""A latte.py checkpoint on the tour's yardstick: its samples scored per frame beside real clips.

Draws --clips clips (default 250) from seed 1000 through latte.py's own `--sample`, and scores
them as bench/tour.py scores its latte rows: --n frames (1,000) spread evenly over the clips, each
frame's garment window resized to 28x28, on bench/quality.py; the share of clips the classifier
puts in one class in every frame; and the centre of mass's distance from a straight bouncing path
and its speed. Real clips of held-out test garments, made as the checkpoint's training clips were,
are scored the same way: the floor.

    python bench/latte_eval.py runs/latte-cpu/ckpt.pt [--clips 250] [--cfg-scale 1.5] [--json F]

Run it alone: two torch processes on the same cores slow each other down several times.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import quality, tour  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ckpt", help="a latte.py checkpoint trained on moving images")
    add_flags(p)
    p.add_argument("--json", help="also write the rows to this file")
    return p.parse_args(argv)


def add_flags(p, out="runs/latte_eval"):
    p.add_argument("--clips", type=int, default=250, help="clips to draw")
    p.add_argument("--n", type=int, default=tour.N_SAMPLES, help="frames to score on bench/quality.py")
    p.add_argument("--sampling-steps", default="50")
    p.add_argument("--cfg-scale", default="1.5")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=out, help="the samples and the sampling logs")


def drawn_row(ckpt, args, out, model):
    """The checkpoint's clips, drawn with DDIM and guidance as the tour draws them, scored."""
    flags = ["--sampling-steps", args.sampling_steps, "--cfg-scale", args.cfg_scale]
    label = f"DDIM {args.sampling_steps}, guidance {args.cfg_scale}"
    nfe = int(args.sampling_steps) * (1 if float(args.cfg_scale) == 1 else 2)  # guidance: two a step
    drawn = tour.Setting("latte", model, label, "latte", flags, nfe, n=args.clips)
    x, seconds, _ = tour.sample(drawn, ckpt, args, out)
    return {"method": "latte", "model": model, "sampler": label, "nfe": nfe, "params": tour.parameters(ckpt),
            "sample_ms": 1000 * seconds / len(x), **tour.measures(drawn, ckpt, x, args, quality.score)}


def real_row(ckpt, args):
    """Real clips of held-out test garments, made as the checkpoint's training clips were: the floor."""
    real = tour.Setting("latte", "real clips (test garments)", "-", "latte", [], n=args.clips, real=True)
    return {"method": "latte", "model": real.model, "sampler": "-",
            **tour.measures(real, ckpt, tour.real_clips(ckpt, args, args.clips), args, quality.score)}


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    rows = [drawn_row(args.ckpt, args, out, Path(args.ckpt).parent.name), real_row(args.ckpt, args)]
    print(tour.table({"rows": rows, "n": args.n}))
    if args.json:
        Path(args.json).write_text(json.dumps({"ckpt": str(args.ckpt), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
