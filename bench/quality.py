"""Sample quality for 28x28 grey-scale generators: python bench/quality.py SAMPLES.pt

SAMPLES.pt holds a float tensor (N, 1, 28, 28) in [-1, 1], as every method file writes with
`--sample --save FILE.pt`. The numbers, in a small classifier's 128-d penultimate feature space
(the Inception network of FID/KID/IS would need downloaded weights and 299x299 RGB input):

  FD        Fréchet distance between Gaussian fits of sample and test-split features, FID's
            formula (Heusel et al. 2017, arXiv:1706.08500):
            |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).
  KID       unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, averaged over random
            subsets (Binkowski et al. 2018, arXiv:1801.01401).
  IS        exp(E_x KL(p(y|x) || p(y))) with the classifier's p(y|x) (Salimans et al. 2016,
            arXiv:1606.03498).
  classes   histogram of predicted classes and its entropy / log(10): 1 = every class equally.
  P / R     precision and recall (Kynkäänniemi et al. 2019, arXiv:1904.06991): the fraction of
            samples inside the union of k-NN balls of real features, and of real features inside
            the union of the samples' balls; coverage (Naeem et al. 2020, arXiv:2002.09797).
  memory    median pixel-space L2 distance from each sample to its nearest training image,
            beside the same median for held-out test images: copies of training images
            (memorisation) show as a much smaller value.

The classifier (about 2 minutes on 2 CPU cores) is trained once per data set, seeded, and cached
in bench/cache/; delete that folder to retrain. `score(samples, dataset, data_dir)` returns the
numbers as a dict (bench/compare.py calls it); bench/README.md explains them and lists what
real, blurred, noised and collapsed images get.

    python bench/quality.py runs/ddpm/samples.pt --dataset fashion-mnist [--json]
"""
import argparse
import contextlib
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/quality.py` finds common
import common  # noqa: E402
from common import UserError  # noqa: E402

DATASETS = ("fashion-mnist", "mnist")
CLASS_NAMES = {
    "fashion-mnist": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Boot"],
    "mnist": [str(i) for i in range(10)],
}
CACHE_DIR = Path(__file__).resolve().parent / "cache"
CACHE_FORMAT = "bench/quality.py classifier v1"  # bump when Classifier or its training changes
SEED = 0
EPOCHS = 3
BATCH_SIZE = 128
LR = 2e-3
K = 3                  # Kynkäänniemi et al. use k = 3
KID_SUBSETS = 100      # Binkowski et al.'s reference code: 100 subsets of 1000
KID_SUBSET_SIZE = 1000
MIN_SAMPLES = 10
MEMORY_REFERENCE = 1000  # held-out test images measured against the training set
RANGE_TOLERANCE = 1e-3   # float round-off beyond [-1, 1] is clamped, anything more is an error


def log(*args):
    # Progress goes to stderr so that stdout is only the report (or the JSON).
    print(*args, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# The classifier whose penultimate layer is the feature space
# ----------------------------------------------------------------------------------------------

class Classifier(nn.Module):
    """Two 3x3 conv layers, then a 128-d layer (the features), then the 10 logits."""

    def __init__(self, num_classes=10, feature_dim=128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),                                                 # (B, 32, 14, 14)
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(2),                                                 # (B, 64, 7, 7)
            nn.Flatten(),                                                    # (B, 3136)
            nn.Linear(64 * 7 * 7, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        # Features are divided by this, set after training so that training images' features have
        # mean square 1 per dimension: KID's kernel (x.y / d + 1)^3 assumes x.y / d of order 1
        # (as with Inception features); raw activations several times larger make it all noise.
        self.register_buffer("feature_scale", torch.ones(()))
        # channels_last makes the CPU convolutions about 1.4x faster (measured on 2 cores);
        # load_state_dict copies into these weights and keeps their layout.
        self.to(memory_format=torch.channels_last)

    def forward(self, x):
        """x: (B, 1, 28, 28) in [-1, 1] -> (features (B, 128), logits (B, 10))."""
        h = self.body(x.contiguous(memory_format=torch.channels_last))
        return h / self.feature_scale, self.head(h)


@torch.no_grad()
def features_and_probs(classifier, images, device="cpu", batch_size=1000):
    """Penultimate features (N, D) and class probabilities (N, C), float32 on the CPU."""
    classifier.eval()
    feats, probs = [], []
    for i in range(0, len(images), batch_size):
        h, logits = classifier(images[i:i + batch_size].to(device))
        feats.append(h.float().cpu())
        probs.append(logits.float().softmax(1).cpu())
    return torch.cat(feats), torch.cat(probs)


def accuracy(classifier, images, labels, device="cpu"):
    _, probs = features_and_probs(classifier, images, device)
    return (probs.argmax(1) == labels).double().mean().item()


def train_classifier(train_x, train_y, test_x, test_y, device="cpu", epochs=None, seed=SEED):
    """Adam on cross-entropy, seeded; returns the classifier and its test accuracy."""
    epochs = epochs or EPOCHS
    common.seed_everything(seed)
    classifier = Classifier().to(device)
    opt = torch.optim.Adam(classifier.parameters(), lr=LR)
    steps = epochs * (len(train_x) // BATCH_SIZE)
    # Cosine decay to 0: in a run this short, the last steps at a small rate settle the weights.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    start = last = time.time()
    step = 0
    for epoch in range(epochs):
        classifier.train()
        order = torch.randperm(len(train_x), generator=g)
        for i in range(0, len(order) - BATCH_SIZE + 1, BATCH_SIZE):
            idx = order[i:i + BATCH_SIZE]
            _, logits = classifier(train_x[idx].to(device))
            loss = F.cross_entropy(logits, train_y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if time.time() - last > 5 or step == steps:
                last = time.time()
                rate = step * BATCH_SIZE / (last - start)
                log(f"  classifier epoch {epoch + 1}/{epochs} step {step}/{steps} "
                    f"loss {loss.item():.3f} {rate:.0f} img/s, "
                    f"{(steps - step) * BATCH_SIZE / rate:.0f}s left")
    classifier.feature_scale.fill_(1.0)
    feats, _ = features_and_probs(classifier, train_x, device)
    classifier.feature_scale.fill_(feats.square().mean().sqrt().item())
    acc = accuracy(classifier, test_x, test_y, device)
    log(f"  classifier trained in {time.time() - start:.0f}s: test accuracy {acc:.2%}")
    return classifier, acc


def load_classifier(dataset, train_x, train_y, test_x, test_y, device="cpu"):
    """The cached classifier for `dataset`, training and caching it first if there is none."""
    path = CACHE_DIR / f"classifier-{dataset}.pt"
    classifier = Classifier().to(device)
    if path.exists():
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if ckpt.get("format") != CACHE_FORMAT or ckpt.get("dataset") != dataset:
                raise ValueError(f"written by {ckpt.get('format')!r} for {ckpt.get('dataset')!r}")
            classifier.load_state_dict(ckpt["state_dict"])
            log(f"classifier: {path} (test accuracy {ckpt['test_accuracy']:.2%})")
            return classifier.eval(), ckpt["test_accuracy"]
        except Exception as e:  # a stale or broken cache is rebuilt, never trusted
            log(f"classifier: ignoring {path} ({type(e).__name__}: {e})")
    log(f"classifier: training on the {dataset} training split ({EPOCHS} epochs, seed {SEED}), "
        f"cached in {path}")
    classifier, acc = train_classifier(train_x, train_y, test_x, test_y, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"format": CACHE_FORMAT, "dataset": dataset, "test_accuracy": acc,
                "state_dict": {k: v.cpu() for k, v in classifier.state_dict().items()}}, tmp)
    os.replace(tmp, path)
    return classifier.eval(), acc


# ----------------------------------------------------------------------------------------------
# The metrics. Features are (N, D) tensors; probabilities (N, C).
# ----------------------------------------------------------------------------------------------

def gaussian_fit(f):
    """Mean (D,) and unbiased covariance (D, D) in float64."""
    f = f.double()
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def frechet_distance(f1, f2):
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) between Gaussian fits of f1 and f2.

    S1 S2 is not symmetric, but it is similar to sqrt(S1) S2 sqrt(S1), which is symmetric PSD, so
    tr((S1 S2)^(1/2)) is the sum of the square roots of that matrix's eigenvalues.
    """
    mu1, s1 = gaussian_fit(f1)
    mu2, s2 = gaussian_fit(f2)
    w, v = torch.linalg.eigh(s1)
    sqrt_s1 = (v * w.clamp(min=0).sqrt()) @ v.T
    m = sqrt_s1 @ s2 @ sqrt_s1
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt).item()


def polynomial_kernel(x, y):
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x, y):
    """Gretton et al. 2012's unbiased MMD^2: the diagonal terms k(x_i, x_i) are left out."""
    m, n = len(x), len(y)
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    return ((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
            + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
            - 2 * kxy.mean())


def kid(f1, f2, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE, seed=SEED):
    """Kernel Inception Distance: (mean, std) of unbiased MMD^2 over random subsets.

    Each subset draws min(subset_size, len(f1), len(f2)) points from each set without replacement.
    """
    g = torch.Generator().manual_seed(seed)
    f1, f2 = f1.double(), f2.double()
    m = min(subset_size, len(f1), len(f2))
    values = torch.stack([mmd2_unbiased(f1[torch.randperm(len(f1), generator=g)[:m]],
                                        f2[torch.randperm(len(f2), generator=g)[:m]])
                          for _ in range(subsets)])
    return values.mean().item(), (values.std().item() if subsets > 1 else 0.0)


def inception_score(probs):
    """exp(E_x KL(p(y|x) || p(y))), p(y) the mean prediction: from 1 (one class, or unsure
    predictions) to the number of classes (confident and every class equally often)."""
    probs = probs.double()
    p_y = probs.mean(0, keepdim=True)
    kl = (torch.xlogy(probs, probs) - torch.xlogy(probs, p_y)).sum(1)
    return kl.mean().exp().item()


def class_histogram(probs):
    """How many samples the classifier puts in each class (argmax), as a (C,) int64 tensor."""
    return torch.bincount(probs.argmax(1), minlength=probs.shape[1])


def normalized_entropy(counts):
    """Entropy of a histogram divided by log(number of bins): 1 uniform, 0 one bin."""
    p = counts.double() / counts.sum()
    return (-torch.xlogy(p, p).sum() / math.log(len(counts))).item()


def pairwise_distances(a, b, chunk=4096):
    """Yields (start, distances of a[start:start + chunk] to every row of b)."""
    for i in range(0, len(a), chunk):
        yield i, torch.cdist(a[i:i + chunk], b)


def knn_radii(x, k=K):
    """Distance from each point to its k-th nearest neighbour in the same set, itself excluded."""
    radii = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for i, d in pairwise_distances(x, x):
        # The point itself is at distance 0, the smallest: take the (k+1)-th smallest.
        radii[i:i + len(d)] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return radii


def fraction_in_balls(points, centres, radii):
    """Fraction of `points` within distance radii[j] of some centres[j] (a union of balls)."""
    inside = torch.cat([(d <= radii[None]).any(1) for _, d in pairwise_distances(points, centres)])
    return inside.double().mean().item()


def precision_recall(real, fake, k=K):
    """Improved precision and recall (Kynkäänniemi et al. 2019) of fake against real.

    precision: fraction of fake points inside the real manifold (the union of the real points'
    k-NN balls); recall: fraction of real points inside the fake manifold.
    """
    if min(len(real), len(fake)) <= k:
        raise UserError(f"precision/recall with k={k} needs more than {k} points in each set")
    real, fake = real.float(), fake.float()
    precision = fraction_in_balls(fake, real, knn_radii(real, k))
    recall = fraction_in_balls(real, fake, knn_radii(fake, k))
    return precision, recall


def coverage(real, fake, k=K):
    """Coverage (Naeem et al. 2020): fraction of real points whose k-NN ball holds at
    least one fake point. Unlike recall it is not fooled by a few outlying fake points."""
    real, fake = real.float(), fake.float()
    radii = knn_radii(real, k)
    nearest_fake = torch.cat([d.min(1).values for _, d in pairwise_distances(real, fake)])
    return (nearest_fake < radii).double().mean().item()


@torch.no_grad()
def nearest_train_distance(samples, train, chunk=1024, train_chunk=8192):
    """L2 distance (pixel space) from each sample to its nearest training image, and its index.

    samples (N, ...) and train (M, ...) are flattened. The search uses |a|^2 + |b|^2 - 2 a.b, one
    matrix product per block; the winner's distance is then recomputed directly, so that an
    exact copy gives exactly 0 rather than float32 round-off.
    """
    a = samples.reshape(len(samples), -1).float()
    b = train.reshape(len(train), -1).float().to(a.device)
    b_sq = b.square().sum(1)
    best = torch.empty(len(a), device=a.device)
    index = torch.empty(len(a), dtype=torch.long, device=a.device)
    for i in range(0, len(a), chunk):
        x = a[i:i + chunk]
        x_sq = x.square().sum(1, keepdim=True)
        best_d2 = torch.full((len(x),), float("inf"), device=a.device)
        best_j = torch.zeros(len(x), dtype=torch.long, device=a.device)
        for j in range(0, len(b), train_chunk):
            d2 = torch.addmm(x_sq + b_sq[None, j:j + train_chunk], x, b[j:j + train_chunk].T,
                             alpha=-2)
            v, arg = d2.min(1)
            better = v < best_d2
            best_d2 = torch.where(better, v, best_d2)
            best_j = torch.where(better, arg + j, best_j)
        index[i:i + len(x)] = best_j
        best[i:i + len(x)] = (x - b[best_j]).norm(dim=1)
    return best.cpu(), index.cpu()


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------

def evaluate(samples, classifier, test_images, train_images, device="cpu", seed=SEED,
             k=K, memory_reference=MEMORY_REFERENCE):
    """Every number for `samples` (N, 1, 28, 28) against `test_images` (the real reference) and
    `train_images` (for memorisation), using `classifier`'s features. Returns a dict."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    real_f, real_p = features_and_probs(classifier, test_images, device)
    fake_f, fake_p = features_and_probs(classifier, samples, device)

    kid_mean, kid_std = kid(real_f, fake_f, seed=seed)
    counts = class_histogram(fake_p)

    # Kynkäänniemi et al. compare equal numbers of real and fake points: both k-NN radii shrink
    # as a set grows, so unequal sets would tilt precision against recall.
    n_pr = min(len(real_f), len(fake_f))
    real_pr = real_f[torch.randperm(len(real_f), generator=g)[:n_pr]].to(device)
    fake_pr = fake_f[torch.randperm(len(fake_f), generator=g)[:n_pr]].to(device)
    precision, recall = precision_recall(real_pr, fake_pr, k)

    held_out = test_images[torch.randperm(len(test_images), generator=g)[:memory_reference]]
    d_fake, _ = nearest_train_distance(samples.to(device), train_images.to(device))
    d_real, _ = nearest_train_distance(held_out.to(device), train_images.to(device))
    # Nearer to a training image than all but 1% of held-out real images are: a likely copy.
    copy_threshold = torch.quantile(d_real, 0.01).item()

    return {
        "n": len(samples),
        "n_reference": len(test_images),
        "fd": frechet_distance(real_f, fake_f),
        "kid": kid_mean,
        "kid_std": kid_std,
        "inception_score": inception_score(fake_p),
        "inception_score_real": inception_score(real_p),
        "class_counts": counts.tolist(),
        "class_entropy": normalized_entropy(counts),
        "precision": precision,
        "recall": recall,
        "coverage": coverage(real_pr, fake_pr, k),
        "pr_k": k,
        "pr_points": n_pr,
        "nn_train_median": d_fake.median().item(),
        "nn_train_median_real": d_real.median().item(),
        "nn_train_copies": (d_fake < copy_threshold).double().mean().item(),
    }


@functools.lru_cache(maxsize=2)
def reference(dataset, data_dir, device="cpu"):
    """(classifier, test accuracy, test images, training images) for a data set, loaded once."""
    if dataset not in DATASETS:
        raise UserError(f"unknown data set {dataset!r}: quality.py scores {' or '.join(DATASETS)}")
    train, _ = common.load_dataset(dataset, data_dir, train=True)
    test, _ = common.load_dataset(dataset, data_dir, train=False)
    train_x, test_x = train.images.float() / 127.5 - 1, test.images.float() / 127.5 - 1
    classifier, acc = load_classifier(dataset, train_x, train.labels, test_x, test.labels, device)
    return classifier.to(device), acc, test_x, train_x


def score(samples, dataset="fashion-mnist", data_dir="./data", device="cpu", seed=SEED,
          test_images=None):
    """Every number for `samples`, a float tensor (N, 1, 28, 28) in [-1, 1], as a dict.

    The reference is the data set's test split unless `test_images` gives another real set (the
    calibration uses this to score test images against the rest of the test split).
    """
    samples = check_samples(samples)
    classifier, acc, test_x, train_x = reference(dataset, data_dir, str(device))
    result = {"dataset": dataset, "classifier_test_accuracy": acc}
    result.update(evaluate(samples, classifier, test_x if test_images is None else test_images,
                           train_x, device, seed))
    return result


def check_samples(x, what="samples"):
    """The tensor, clamped to [-1, 1], or a UserError that says what is wrong and how to fix it."""
    if not isinstance(x, torch.Tensor):
        raise UserError(f"{what}: expected a tensor (N, 1, 28, 28), got a {type(x).__name__}")
    if not x.is_floating_point():
        raise UserError(f"{what}: expected a float tensor in [-1, 1], got {x.dtype} "
                        f"(uint8 images in 0..255 convert with x.float() / 127.5 - 1)")
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, 28, 28):
        raise UserError(f"{what}: expected shape (N, 1, 28, 28), got {tuple(x.shape)}")
    if len(x) < MIN_SAMPLES:
        raise UserError(f"{what}: {len(x)} images; need at least {MIN_SAMPLES} "
                        f"(and 1,000 or more for numbers worth comparing)")
    x = x.detach().float().cpu()
    if not torch.isfinite(x).all():
        raise UserError(f"{what}: {(~torch.isfinite(x)).sum().item()} values are NaN or infinite")
    lo, hi = x.min().item(), x.max().item()
    if lo < -1 - RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        hint = " (images in [0, 1] convert with x * 2 - 1)" if lo >= 0 else ""
        raise UserError(f"{what}: values run from {lo:.3g} to {hi:.3g}, expected [-1, 1]{hint}")
    if lo >= 0:
        log(f"note: {what} has no value below 0: if these images are in [0, 1], convert them "
            f"with x * 2 - 1 (quality.py reads -1 as black)")
    return x.clamp(-1, 1)


def load_samples(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    try:
        x = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one that holds code
        raise UserError(f"cannot read {path} as a tensor saved with torch.save "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return check_samples(x, str(path))


def report(r, names, source=""):
    """The dict from score() as a few readable lines."""
    total = max(sum(r["class_counts"]), 1)
    hist = "  ".join(f"{n} {c / total:.0%}" for n, c in zip(names, r["class_counts"]))
    ratio = r["nn_train_median"] / max(r["nn_train_median_real"], 1e-12)
    return "\n".join([
        f"{source}{r['n']} samples vs the {r['dataset']} test split ({r['n_reference']} images); "
        f"classifier test accuracy {r['classifier_test_accuracy']:.2%}",
        f"  FD                   {r['fd']:9.3f}   (0 = same feature Gaussian; depends on N, "
        f"see bench/README.md)",
        f"  KID x 1e3            {1e3 * r['kid']:9.3f}   ± {1e3 * r['kid_std']:.3f} over subsets",
        f"  Inception score      {r['inception_score']:9.3f}   (real test images: "
        f"{r['inception_score_real']:.3f}; at most 10)",
        f"  class entropy        {r['class_entropy']:9.3f}   (1 = all classes equally often)",
        f"    {hist}",
        f"  precision            {r['precision']:9.3f}   (k={r['pr_k']}, {r['pr_points']} real "
        f"vs {r['pr_points']} samples)",
        f"  recall               {r['recall']:9.3f}",
        f"  coverage             {r['coverage']:9.3f}",
        f"  nearest train image  {r['nn_train_median']:9.3f}   median L2 in pixels; held-out "
        f"test images: {r['nn_train_median_real']:.3f} (ratio {ratio:.2f})",
        f"  likely copies        {r['nn_train_copies']:9.1%}   (nearer than 99% of test images "
        f"are; ~1% for fresh images)",
    ])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help="a .pt file with a float tensor (N, 1, 28, 28) in [-1, 1]")
    p.add_argument("--dataset", default="fashion-mnist", choices=DATASETS)
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--seed", type=int, default=SEED, help="for KID subsets and P/R subsampling")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = p.parse_args(argv)
    try:
        samples = load_samples(args.samples)
        with contextlib.redirect_stdout(sys.stderr):  # pick_device prints; stdout is the report
            device = common.pick_device(args.device)
        if len(samples) < 1000:
            log(f"note: {len(samples)} samples; FD, KID and recall are noisy below 1,000")
        start = time.time()
        r = score(samples, args.dataset, args.data_dir, device, args.seed)
        log(f"scored in {time.time() - start:.0f}s")
    except UserError as e:
        sys.exit(f"error: {e}")
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print(report(r, CLASS_NAMES[args.dataset], f"{args.samples}: "))


if __name__ == "__main__":
    main()
