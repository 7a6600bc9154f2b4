"""The cost of attention over a clip: Gflops per clip and training clips/s of every Latte variant.

Full spatio-temporal attention (variant 0) attends over all F N tokens, (F N)^2 pairs a layer; the
factorised variants (1-4) attend within frames and across frames, F N^2 + N F^2. For F = 4, 8 and
16 frames at equal depth and width: the forward pass's Gflops (torch's flop counter) and, with
--speed, the training clips/s of latte.py's own training step on random clips (a few timed steps
after a warm-up). Writes a Markdown table, and with --json the figures.

    python bench/latte_cost.py --model T/4 --image-size 32 --speed [--json bench/results/latte_cost.json]
                               [--plot assets/latte_cost.png]

Run it alone: two torch processes on the same cores slow each other down several times.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import latte  # noqa: E402


def clips_per_second(model, shape, batch, steps=5):
    """Training clips/s of latte.training_step with Adam, after one warm-up step."""
    sch = latte.linear_schedule(1000)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x0, y = torch.randn(batch, *shape), torch.zeros(batch, dtype=torch.long)
    draws = latte.Draws(batch, "cpu")
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        loss = latte.training_step(model, x0, y, sch, draws, model.num_classes, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="T/4")
    p.add_argument("--image-size", type=int, default=32, help="frame size H = W")
    p.add_argument("--frames", default="4,8,16")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--speed", action="store_true", help="also time training steps (minutes)")
    p.add_argument("--json")
    p.add_argument("--plot", metavar="PNG", help="Gflops per clip against F, one line a variant")
    a = p.parse_args()
    args = latte.parse_args(["--model", a.model])
    latte.fill_model_defaults(args)
    rows = []
    for F in map(int, a.frames.split(",")):
        shape = (F, 1, a.image_size, a.image_size)
        for variant in latte.VARIANTS:
            args.variant = variant
            torch.manual_seed(0)
            model = latte.make_model(args, shape, 10)
            row = {"frames": F, "variant": variant, "tokens": F * (a.image_size // args.patch) ** 2,
                   "gflops": latte.gflops(model, shape, torch.zeros(1, dtype=torch.long))}
            if a.speed:
                row["clips_per_s"] = clips_per_second(model, shape, a.batch_size)
            rows.append(row)
            print(row, flush=True)
    print(f"\nLatte {a.model}, {a.image_size}x{a.image_size} frames, {torch.get_num_threads()} CPU threads\n")
    print("| frames | tokens | " + " | ".join(f"variant {v}" for v in latte.VARIANTS) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in latte.VARIANTS) + " |")
    for F in sorted({r["frames"] for r in rows}):
        mine = [r for r in rows if r["frames"] == F]
        cells = [f"{r['gflops']:.2f} Gflops" + (f", {r['clips_per_s']:.0f} clips/s" if a.speed else "") for r in mine]
        print(f"| {F} | {mine[0]['tokens']} | " + " | ".join(cells) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "image_size": a.image_size, "rows": rows}, indent=1))
    if a.plot:
        plot(rows, a.plot, f"Latte {a.model}, {a.image_size}x{a.image_size} frames")


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for variant, name in latte.VARIANTS.items():
        mine = [r for r in rows if r["variant"] == variant]
        ax.plot([r["frames"] for r in mine], [r["gflops"] for r in mine], marker="o", label=f"{variant}: {name}")
    ax.set(xscale="log", yscale="log", xlabel="frames F", ylabel="Gflops per clip (forward)", title=title)
    ax.set_xticks(sorted({r["frames"] for r in rows}), [str(f) for f in sorted({r["frames"] for r in rows})])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=6, title="variant (1, 2 and 4 cost the same)", title_fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
