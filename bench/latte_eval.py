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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ckpt", help="a latte.py checkpoint trained on moving images")
    p.add_argument("--clips", type=int, default=250, help="clips to draw")
    p.add_argument("--n", type=int, default=tour.N_SAMPLES, help="frames to score on bench/quality.py")
    p.add_argument("--sampling-steps", default="50")
    p.add_argument("--cfg-scale", default="1.5")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/latte_eval", help="the samples and the sampling log")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    flags = ["--sampling-steps", args.sampling_steps, "--cfg-scale", args.cfg_scale]
    label = f"DDIM {args.sampling_steps}, guidance {args.cfg_scale}"
    nfe = int(args.sampling_steps) * (1 if float(args.cfg_scale) == 1 else 2)  # guidance: two a step
    drawn = tour.Setting("latte", Path(args.ckpt).parent.name, label, "latte", flags, nfe, n=args.clips)
    real = tour.Setting("latte", "real clips (test garments)", "-", "latte", [], n=args.clips, real=True)
    x, seconds, _ = tour.sample(drawn, args.ckpt, args, out)
    rows = [{"method": "latte", "model": drawn.model, "sampler": label, "nfe": nfe,
             "params": tour.parameters(args.ckpt), "sample_ms": 1000 * seconds / len(x),
             **tour.measures(drawn, args.ckpt, x, args, quality.score)},
            {"method": "latte", "model": real.model, "sampler": "-",
             **tour.measures(real, args.ckpt, tour.real_clips(args.ckpt, args, args.clips), args, quality.score)}]
    print(tour.table({"rows": rows, "n": args.n}))
    if args.json:
        Path(args.json).write_text(json.dumps({"ckpt": str(args.ckpt), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
