"""What bench/quality.py prints for sets whose quality is known: the calibration table.

    python bench/calibrate.py [--dataset fashion-mnist] [--sizes 1000 10000]

Prints a Markdown table for bench/README.md. Every set but the held-out one is built from
training images (so the test split, the reference, stays unseen), seeded:

  real (train)        N training images: the floor of FD/KID/IS/P/R for a perfect sampler, and
                      what a perfect memoriser gets (nearest training image 0).
  real (held-out)     N test images scored against the rest of the test split (N <= 5,000 only):
                      the floor without the classifier having seen the images.
  blurred             Gaussian blur, sigma 1 pixel (kernel 5).
  noised              + 0.3 N(0, 1) per pixel, clamped to [-1, 1].
  pure noise          uniform in [-1, 1].
  5 classes           training images of classes 0-4 only: half the modes dropped.
  one class           training images of class 0 (cycled when N exceeds the class's 6,000).
  10 images           one training image per class, each repeated N / 10 times.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from torchvision.transforms import functional as TF

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from bench import quality  # noqa: E402


def calibration_sets(train_x, train_y, test_x, n, seed=0):
    """Yields (name, samples, reference or None for the test split)."""
    g = torch.Generator().manual_seed(seed)
    real = train_x[torch.randperm(len(train_x), generator=g)[:n]]
    yield "real (train)", real, None
    if n <= len(test_x) // 2:
        order = torch.randperm(len(test_x), generator=g)
        yield "real (held-out test)", test_x[order[:n]], test_x[order[n:]]
    yield "blurred (σ = 1 px)", TF.gaussian_blur(real, kernel_size=5, sigma=1.0), None
    yield "noised (+ 0.3 N(0,1))", (real + 0.3 * torch.randn(real.shape, generator=g)).clamp(-1, 1), None
    yield "pure noise (uniform)", torch.rand(real.shape, generator=g) * 2 - 1, None
    five = torch.nonzero(train_y < 5).squeeze(1)
    yield "5 of 10 classes", train_x[five[torch.randperm(len(five), generator=g)[:n]]], None
    one = torch.nonzero(train_y == 0).squeeze(1)
    one = one[torch.randperm(len(one), generator=g)]
    yield "one class (0)", train_x[one[torch.arange(n) % len(one)]], None
    firsts = torch.stack([torch.nonzero(train_y == c)[0, 0] for c in range(10)])
    yield "10 images, repeated", train_x[firsts[torch.arange(n) % 10]], None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion-mnist", choices=quality.DATASETS)
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    classifier, acc, test_x, train_x = quality.reference(args.dataset, args.data_dir, args.device)
    train_y = common.load_dataset(args.dataset, args.data_dir, train=True)[0].labels
    rows = []
    for n in args.sizes:
        for name, samples, ref in calibration_sets(train_x, train_y, test_x, n):
            start = time.time()
            r = quality.score(samples, args.dataset, args.data_dir, args.device, test_images=ref)
            quality.log(f"{name}, N={n}: {time.time() - start:.0f}s")
            rows.append(
                f"| {name} | {n:,} | {r['fd']:.3f} | {1e3 * r['kid']:.2f} | {r['inception_score']:.2f} "
                f"| {r['class_entropy']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} "
                f"| {r['coverage']:.3f} | {r['nn_train_median']:.2f} | {r['nn_train_copies']:.1%} |")
            held_out = r["nn_train_median_real"]
    print(f"{args.dataset}, classifier test accuracy {acc:.2%}; held-out test images' median "
          f"distance to their nearest training image: {held_out:.2f}\n")
    print("| set | N | FD | KID ×10³ | IS | class entropy | precision | recall | coverage "
          "| nearest train (median L2) | likely copies |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
