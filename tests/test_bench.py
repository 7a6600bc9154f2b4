"""bench/quality.py's metrics on cases whose answer is known, with random features and a tiny
untrained classifier instead of the real one (which takes minutes to train)."""
import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import quality as Q  # noqa: E402
from common import UserError  # noqa: E402


def whitened(n, d, seed):
    """n points whose sample mean is exactly 0 and sample covariance exactly the identity."""
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(torch.cov(z.T))
    return torch.linalg.solve_triangular(chol, z.T, upper=False).T


def gaussian(n, d, seed, shift=0.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + shift


# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------

def test_fd_identical_sets_is_zero():
    f = gaussian(2000, 16, 0) @ gaussian(16, 16, 1)  # correlated dimensions
    assert abs(Q.frechet_distance(f, f)) < 1e-8


def test_fd_closed_form_for_diagonal_gaussians():
    # For diagonal covariances FD = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    d = 8
    a, b = torch.linspace(0.5, 3, d, dtype=torch.float64), torch.linspace(2, 0.2, d, dtype=torch.float64)
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.full((d,), 0.3, dtype=torch.float64)
    f1 = whitened(500, d, 0) * a.sqrt() + mu1
    f2 = whitened(700, d, 1) * b.sqrt() + mu2
    expected = (mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()
    assert Q.frechet_distance(f1, f2) == pytest.approx(expected.item(), rel=1e-9)


def test_fd_matches_eigenvalues_of_the_covariance_product():
    # tr((S1 S2)^(1/2)) = sum of sqrt of the eigenvalues of S1 S2, for non-commuting S1, S2.
    f1 = gaussian(400, 6, 0) @ gaussian(6, 6, 1)
    f2 = gaussian(500, 6, 2) @ gaussian(6, 6, 3) + 0.2
    mu1, s1 = Q.gaussian_fit(f1)
    mu2, s2 = Q.gaussian_fit(f2)
    tr_sqrt = torch.linalg.eigvals(s1 @ s2).real.clamp(min=0).sqrt().sum()
    expected = (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt
    assert Q.frechet_distance(f1, f2) == pytest.approx(expected.item(), rel=1e-7)


def test_fd_grows_with_a_shift():
    f, g = gaussian(2000, 16, 0), gaussian(2000, 16, 1)
    same = Q.frechet_distance(f, g)
    shifted = Q.frechet_distance(f, gaussian(2000, 16, 1, shift=0.5))
    assert same < 0.2
    assert shifted == pytest.approx(same + 16 * 0.25, abs=0.3)  # + |mu1 - mu2|^2 = 16 * 0.5^2


# ---------------------------------------------------------------------------------------------
# KID
# ---------------------------------------------------------------------------------------------

def test_mmd2_unbiased_matches_its_definition():
    x, y = gaussian(7, 3, 0).double(), gaussian(5, 3, 1).double()
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(5)) / (7 * 5)
    assert Q.mmd2_unbiased(x, y).item() == pytest.approx((xx + yy - 2 * xy).item(), rel=1e-10)


def test_kid_near_zero_for_the_same_distribution_and_large_for_a_shift():
    f = gaussian(1000, 16, 0)
    same, _ = Q.kid(f, f, subsets=20, subset_size=300)
    fresh, _ = Q.kid(f, gaussian(1000, 16, 1), subsets=20, subset_size=300)
    small, _ = Q.kid(f, gaussian(1000, 16, 1, shift=0.2), subsets=20, subset_size=300)
    large, _ = Q.kid(f, gaussian(1000, 16, 1, shift=0.5), subsets=20, subset_size=300)
    # Subsets of one set share points, whose large k(x, x) enters the cross term: slightly < 0.
    assert abs(same) < 0.03 * large and abs(fresh) < 0.03 * large
    assert 0.05 * large < small < 0.3 * large


# ---------------------------------------------------------------------------------------------
# Inception score, class histogram
# ---------------------------------------------------------------------------------------------

def test_inception_score_limits():
    confident_all_classes = torch.eye(10).repeat(50, 1)
    assert Q.inception_score(confident_all_classes) == pytest.approx(10, rel=1e-9)
    one_class = torch.zeros(500, 10)
    one_class[:, 3] = 1
    assert Q.inception_score(one_class) == pytest.approx(1, rel=1e-9)
    unsure = torch.full((500, 10), 0.1)
    assert Q.inception_score(unsure) == pytest.approx(1, rel=1e-9)
    # Confident over 5 of 10 classes: exp(log 5) = 5.
    assert Q.inception_score(torch.eye(10)[:5].repeat(40, 1)) == pytest.approx(5, rel=1e-9)


def test_class_histogram_and_its_normalised_entropy():
    probs = torch.eye(10).repeat(30, 1).softmax(1)  # soft, but argmax is each class 30 times
    counts = Q.class_histogram(probs)
    assert counts.tolist() == [30] * 10
    assert Q.normalized_entropy(counts) == pytest.approx(1, abs=1e-12)
    one = torch.zeros(10, dtype=torch.long)
    one[4] = 300
    assert Q.normalized_entropy(one) == pytest.approx(0, abs=1e-12)
    half = torch.tensor([60] * 5 + [0] * 5)
    assert Q.normalized_entropy(half) == pytest.approx(math.log(5) / math.log(10), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Precision, recall, coverage
# ---------------------------------------------------------------------------------------------

def test_knn_radii_exclude_the_point_itself():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    assert Q.knn_radii(x, k=1).tolist() == [1, 1, 2, 3]
    assert Q.knn_radii(x, k=2).tolist() == [3, 2, 3, 5]


def test_precision_recall_same_distribution_is_high():
    real, fake = gaussian(600, 8, 0), gaussian(600, 8, 1)
    p, r = Q.precision_recall(real, fake)
    assert p > 0.7 and r > 0.7
    assert Q.coverage(real, fake) > 0.7


def test_collapsed_set_has_low_recall_and_coverage_but_full_precision():
    real = gaussian(600, 8, 0)
    collapsed = real[:6].repeat(100, 1)  # six real points, 100 copies each
    p, r = Q.precision_recall(real, collapsed)
    assert p == 1.0
    assert r < 0.05
    assert Q.coverage(real, collapsed) < 0.1


def test_far_away_set_has_low_precision():
    real = gaussian(600, 8, 0)
    p, r = Q.precision_recall(real, gaussian(600, 8, 1, shift=3.0))
    assert p < 0.05 and r < 0.05


# ---------------------------------------------------------------------------------------------
# Memorisation: nearest training image
# ---------------------------------------------------------------------------------------------

def test_nearest_train_distance_flags_copies():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(3000, 1, 28, 28, generator=g) * 2 - 1
    picked = torch.tensor([5, 2999, 1234, 0])
    fresh = torch.rand(20, 1, 28, 28, generator=g) * 2 - 1
    # Small chunks so that the search crosses block boundaries.
    d, index = Q.nearest_train_distance(torch.cat([train[picked], fresh]), train,
                                        chunk=7, train_chunk=1000)
    assert d[:4].tolist() == [0, 0, 0, 0]
    assert index[:4].tolist() == picked.tolist()
    brute = torch.cdist(fresh.flatten(1).double(), train.flatten(1).double()).min(1)
    assert torch.allclose(d[4:].double(), brute.values, rtol=1e-5)
    assert (d[4:] > 5).all()


# ---------------------------------------------------------------------------------------------
# The whole evaluation with a tiny untrained classifier; the classifier cache
# ---------------------------------------------------------------------------------------------

def random_images(n, seed):
    g = torch.Generator().manual_seed(seed)
    # Blobs rather than white noise, so that images differ in ways a conv net sees.
    low = torch.rand(n, 1, 7, 7, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=28, mode="bilinear").clamp(-1, 1)


def test_evaluate_end_to_end_with_copies_and_fresh_images():
    torch.manual_seed(0)
    classifier = Q.Classifier().eval()
    train, test = random_images(800, 0), random_images(300, 1)
    copies = Q.evaluate(train[:200], classifier, test, train, memory_reference=200)
    fresh = Q.evaluate(random_images(200, 2), classifier, test, train, memory_reference=200)
    json.dumps(fresh)  # plain numbers and lists
    assert copies["n"] == 200 and copies["pr_points"] == 200 and sum(copies["class_counts"]) == 200
    assert copies["nn_train_median"] == 0 and copies["nn_train_copies"] == 1
    assert fresh["nn_train_median"] > 0.5 * fresh["nn_train_median_real"]
    assert fresh["nn_train_copies"] < 0.1
    assert 0 <= fresh["class_entropy"] <= 1 and 1 <= fresh["inception_score"] <= 10
    white_noise = torch.rand(200, 1, 28, 28, generator=torch.Generator().manual_seed(3)) * 2 - 1
    noise = Q.evaluate(white_noise, classifier, test, train, memory_reference=50)
    assert noise["fd"] > 10 * fresh["fd"] and noise["kid"] > 10 * fresh["kid"]
    assert noise["precision"] < 0.1


def test_classifier_is_cached_and_a_broken_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setattr(Q, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(Q, "EPOCHS", 1)
    x, y = random_images(256, 0), torch.arange(256) % 10
    trained, acc = Q.load_classifier("fashion-mnist", x, y, x[:64], y[:64])
    path = tmp_path / "classifier-fashion-mnist.pt"
    assert path.exists() and 0 <= acc <= 1
    assert trained.feature_scale.item() != 1.0
    loaded, acc2 = Q.load_classifier("fashion-mnist", None, None, None, None)  # no training data needed
    assert acc2 == acc
    for a, b in zip(trained.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    path.write_bytes(b"not a checkpoint")
    _, acc3 = Q.load_classifier("fashion-mnist", x, y, x[:64], y[:64])
    assert acc3 == acc  # retrained with the same seed


# ---------------------------------------------------------------------------------------------
# Input checks and the command line
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, message", [
    (torch.zeros(20, 3, 28, 28), "expected shape (N, 1, 28, 28)"),
    (torch.zeros(20, 28, 28), "expected shape (N, 1, 28, 28)"),
    (torch.zeros(20, 1, 28, 28, dtype=torch.uint8), "expected a float tensor"),
    (torch.full((20, 1, 28, 28), 0.5) * torch.arange(20).view(20, 1, 1, 1), "expected [-1, 1]"),
    (torch.full((20, 1, 28, 28), float("nan")), "NaN"),
    (torch.zeros(3, 1, 28, 28), "need at least"),
    ({"samples": torch.zeros(20, 1, 28, 28)}, "got a dict"),
])
def test_bad_samples_are_clear_errors(bad, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        Q.check_samples(bad)


def test_rounding_beyond_the_range_is_clamped():
    x = torch.zeros(20, 1, 28, 28)
    x[0, 0, 0, 0] = 1.0004
    assert Q.check_samples(x).max().item() == 1.0


def test_load_samples_refuses_missing_files_and_pickled_objects(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        Q.load_samples(tmp_path / "missing.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled object, not a tensor
    with pytest.raises(UserError, match="cannot read"):
        Q.load_samples(tmp_path / "module.pt")
    torch.save(torch.zeros(20, 1, 28, 28), tmp_path / "ok.pt")
    assert Q.load_samples(tmp_path / "ok.pt").shape == (20, 1, 28, 28)


def test_command_line_finds_common_by_itself_and_reports_errors(tmp_path, monkeypatch, capsys):
    # As `python bench/quality.py` would run it, minus the few seconds a fresh interpreter takes
    # to import torch: as __main__, from another folder, with the repository off sys.path.
    torch.save(torch.zeros(20, 3, 28, 28), tmp_path / "rgb.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != ROOT])
    monkeypatch.delitem(sys.modules, "common")
    monkeypatch.setattr(sys, "argv", ["quality.py", "rgb.pt"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "bench" / "quality.py"), run_name="__main__")
    assert "expected shape (N, 1, 28, 28)" in str(exit_.value.code)
    assert str(exit_.value.code).startswith("error: ")  # main() prints it, no traceback


# ---------------------------------------------------------------------------------------------
# speed.py: every method's entry still builds on its method file's paper functions
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ddpm-cpu-recipe", "vae", "rectified-flow-cpu-recipe", "dit-T/4", "mmdit-T/4",
                                  "ldm-cpu-recipe", "consistency-teacher-cpu-recipe"])
def test_every_speed_entry_trains_and_samples_on_its_method_file(name):
    from bench import speed
    build, _, shape = speed.CONFIGS[name]
    torch.manual_seed(0)
    model, loss_of, call = build()
    x = torch.randn(4, *shape)
    loss = loss_of(x)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(call(x)).all()
