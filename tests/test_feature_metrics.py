"""Feature-based image metrics against independent computations; the reference cache."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.linalg

from aigc.metrics import reference as ref_mod
from aigc.metrics.image import (
    SingularCovarianceWarning,
    Statistics,
    class_coverage,
    density_coverage,
    features_to_statistics,
    fid_from_features,
    fid_from_statistics,
    inception_score_from_logits,
    kid_from_features,
    precision_recall,
)


def gaussian(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """n samples of a correlated Gaussian in d dimensions; the distribution depends only
    on (d, shift, scale), the samples on seed."""
    mix = np.random.default_rng(d).normal(size=(d, d)) / np.sqrt(d)
    return np.random.default_rng(seed).normal(size=(n, d)) @ (np.eye(d) + mix) * scale + shift


# FID -------------------------------------------------------------------------------


def test_fid_matches_sqrtm_of_the_product():
    f1, f2 = gaussian(60, 12, 0), gaussian(80, 12, 1, shift=0.3, scale=1.5)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert fid_from_features(f1, f2) == pytest.approx(expected, rel=1e-9)
    assert fid_from_features(f2, f1) == pytest.approx(expected, rel=1e-9)  # symmetric


def test_fid_is_zero_for_identical_statistics_and_matches_diagonal_closed_form():
    stats = features_to_statistics(gaussian(50, 10, 2))
    assert fid_from_statistics(stats, stats) == pytest.approx(0.0, abs=1e-9)
    # diagonal Gaussians: ||mu1 - mu2||^2 + sum_i (sqrt(v1_i) - sqrt(v2_i))^2
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    a, b = Statistics(mu1, np.diag(v1), 100), Statistics(mu2, np.diag(v2), 100)
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert fid_from_statistics(a, b) == pytest.approx(closed, rel=1e-12)


def test_fid_of_samples_approaches_the_closed_form_as_n_grows():
    """Samples of two known Gaussians (full covariances): the estimate's error shrinks with
    n, towards the exact Fréchet distance of the two distributions."""
    rng = np.random.default_rng(7)
    d = 8
    a1, a2 = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = a1 @ a1.T / d + np.eye(d), a2 @ a2.T / d + 0.5 * np.eye(d)
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    exact = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(root)
    errors = []
    for n in (100, 1_000, 50_000):
        f1 = rng.multivariate_normal(mu1, s1, size=n)
        f2 = rng.multivariate_normal(mu2, s2, size=n)
        errors.append(abs(fid_from_features(f1, f2) - exact))
    assert errors[2] < errors[0] and errors[2] < 0.02 * exact, (errors, exact)
    assert fid_from_features(f1, f1) == pytest.approx(0.0, abs=1e-6)


def test_statistics_do_not_depend_on_row_order():
    f = gaussian(40, 6, 3)
    a = features_to_statistics(f)
    b = features_to_statistics(f[np.random.default_rng(0).permutation(40)])
    assert a.n == b.n == 40
    np.testing.assert_allclose(a.mu, b.mu, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(a.sigma, b.sigma, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(a.sigma, np.cov(f.T, ddof=1), rtol=1e-12)  # unbiased


def test_fid_warns_on_singular_covariance():
    small, big = gaussian(8, 16, 4), gaussian(100, 16, 5)
    with pytest.warns(SingularCovarianceWarning, match="8 samples for 16 feature dimensions"):
        fid = fid_from_features(small, big)
    assert np.isfinite(fid) and fid > 0
    dependent = np.concatenate([big, big[:, :1]], axis=1)  # 17 columns, rank 16
    with pytest.warns(SingularCovarianceWarning, match="rank 16 < 17"):
        fid_from_features(dependent, dependent + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough samples: no warning
        fid_from_features(big, gaussian(100, 16, 6))


def test_fid_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        features_to_statistics(np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="one dimension"):
        fid_from_features(gaussian(20, 3, 0), gaussian(20, 4, 0))


# KID -------------------------------------------------------------------------------


def naive_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d, m = x.shape[1], len(x)

    def k(a, b):
        return (sum(ai * bi for ai, bi in zip(a, b, strict=True)) / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_a_double_loop():
    x, y = gaussian(6, 3, 0), gaussian(6, 3, 1, shift=0.5)
    # one subset of the full size is a permutation of each set: MMD does not change
    mean, std = kid_from_features(x, y, subsets=1, subset_size=6)
    assert mean == pytest.approx(naive_mmd2(x, y), rel=1e-10)
    assert std == 0.0


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    real, other = gaussian(400, 8, 0), gaussian(400, 8, 1)  # one distribution
    near = kid_from_features(real, other, subsets=50, subset_size=100, seed=1)
    far = kid_from_features(real, other + 1.0, subsets=50, subset_size=100, seed=1)
    assert abs(near.mean) < 3 * near.std
    assert far.mean > 3 * far.std and far.mean > 20 * abs(near.mean)


def test_kid_is_reproducible_for_a_seed():
    x, y = gaussian(50, 4, 0), gaussian(70, 4, 1)
    assert kid_from_features(x, y, 5, 20, seed=3) == kid_from_features(x, y, 5, 20, seed=3)
    assert kid_from_features(x, y, 5, 20, seed=3) != kid_from_features(x, y, 5, 20, seed=4)
    assert kid_from_features(x, y, 5, 1000).mean == kid_from_features(x, y, 5, 50).mean  # cap


# Inception Score ---------------------------------------------------------------------


def naive_inception_score(logits: np.ndarray, splits: int) -> tuple[float, float]:
    scores = []
    for part in np.array_split(logits, splits):
        probs = []
        for row in part:
            e = [math.exp(v) for v in row]
            probs.append([v / sum(e) for v in e])
        marginal = [sum(p[c] for p in probs) / len(probs) for c in range(len(probs[0]))]
        kls = [
            sum(pc * math.log(pc / mc) for pc, mc in zip(p, marginal, strict=True)) for p in probs
        ]
        scores.append(math.exp(sum(kls) / len(kls)))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_bounds():
    assert inception_score_from_logits(np.zeros((100, 7))).mean == pytest.approx(1.0)
    k = 10
    confident = 40.0 * np.eye(k)[np.arange(1000) % k]  # every class equally often
    assert inception_score_from_logits(confident, splits=1).mean == pytest.approx(k, rel=1e-9)
    ordered = inception_score_from_logits(confident, splits=10, seed=None)  # cyclic: even splits
    assert ordered.mean == pytest.approx(k, rel=1e-9) and ordered.std < 1e-9
    # generated class by class: unshuffled splits each hold one class, shuffled ones all
    by_class = confident[np.argsort(np.arange(1000) % k, kind="stable")]
    assert inception_score_from_logits(by_class, seed=None).mean == pytest.approx(1.0)
    assert inception_score_from_logits(by_class).mean > 0.9 * k


def test_inception_score_matches_a_loop():
    logits = np.random.default_rng(0).normal(scale=3.0, size=(53, 6))
    mean, std = inception_score_from_logits(logits, splits=4, seed=None)
    assert (mean, std) == pytest.approx(naive_inception_score(logits, 4), rel=1e-10)
    perm = np.random.default_rng(5).permutation(53)
    assert inception_score_from_logits(logits, splits=4, seed=5) == pytest.approx(
        naive_inception_score(logits[perm], 4), rel=1e-10
    )


# Precision, recall, density, coverage ---------------------------------------------------


def brute_radius(points: np.ndarray, i: int, k: int) -> float:
    others = sorted(np.linalg.norm(points[i] - points[j]) for j in range(len(points)) if j != i)
    return others[k - 1]


def brute_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    r_real = [brute_radius(real, i, k) for i in range(len(real))]
    r_fake = [brute_radius(fake, j, k) for j in range(len(fake))]

    def dist(a, b):
        return float(np.linalg.norm(a - b))

    in_balls = [
        sum(dist(f, r) <= r_real[i] for i, r in enumerate(real)) for f in fake
    ]  # per fake: real balls holding it
    precision = sum(c > 0 for c in in_balls) / len(fake)
    recall = sum(any(dist(r, f) <= r_fake[j] for j, f in enumerate(fake)) for r in real) / len(real)
    density = sum(in_balls) / (k * len(fake))
    coverage = sum(min(dist(r, f) for f in fake) <= r_real[i] for i, r in enumerate(real)) / len(
        real
    )
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


@pytest.mark.parametrize("k", [1, 3, 5])
def test_manifold_metrics_match_brute_force(k):
    real, fake = gaussian(30, 4, 0), gaussian(25, 4, 1, shift=1.0, scale=1.3)
    brute = brute_prdc(real, fake, k)
    p, r = precision_recall(real, fake, k=k, block_size=4)
    d, c = density_coverage(real, fake, k=k, block_size=4)
    assert (p, r) == pytest.approx((brute["precision"], brute["recall"]), abs=1e-12)
    assert (d, c) == pytest.approx((brute["density"], brute["coverage"]), abs=1e-12)
    assert 0 < p < 1 and 0 < c < 1 and r > 0  # neither empty nor saturated


def test_manifold_metrics_on_identical_and_far_apart_sets():
    x = gaussian(40, 5, 2)
    assert precision_recall(x, x) == (1.0, 1.0)
    density, coverage = density_coverage(x, x)
    assert coverage == 1.0 and density >= 1.0 / 5  # every fake lies at least in its own ball
    far = x + 1e3
    assert precision_recall(x, far) == (0.0, 0.0)
    assert density_coverage(x, far) == (0.0, 0.0)


def test_manifold_metrics_do_not_depend_on_block_size_or_order():
    real, fake = gaussian(120, 6, 3), gaussian(90, 6, 4, shift=0.2)
    for k in (3, 5):
        assert precision_recall(real, fake, k, block_size=7) == precision_recall(
            real, fake, k, block_size=1000
        )
        assert density_coverage(real, fake, k, block_size=7) == density_coverage(
            real, fake, k, block_size=1000
        )
    perm = np.random.default_rng(0).permutation(90)
    assert precision_recall(real, fake[perm]) == pytest.approx(precision_recall(real, fake))


def test_manifold_radii_exclude_self_but_count_duplicates():
    # each point twice: its duplicate is its nearest other point, at distance 0
    x = np.repeat(gaussian(10, 3, 5), 2, axis=0)
    far = x + 100.0
    assert precision_recall(x, x, k=1) == (1.0, 1.0)  # radius 0 still holds the duplicate
    assert precision_recall(x, far, k=1) == (0.0, 0.0)


# class coverage ----------------------------------------------------------------------


def test_class_coverage():
    even = class_coverage(np.arange(40) % 4, 4)
    assert even == pytest.approx({"classes_seen": 1.0, "class_entropy": 1.0})
    one = class_coverage(np.zeros(10, dtype=int), 4)
    assert one == pytest.approx({"classes_seen": 0.25, "class_entropy": 0.0})
    skew = class_coverage(np.array([0, 0, 0, 1]), 2)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    assert skew["class_entropy"] == pytest.approx(h)


# reference cache -----------------------------------------------------------------------


def test_reference_statistics_are_cached_and_checked(tmp_path):
    feats = gaussian(30, 5, 0).astype(np.float32)
    calls = []

    def compute():
        calls.append(1)
        return feats

    key = {"extractor": "toy-5", "spec": "gauss:30", "count": 30}
    stats, f = ref_mod.reference_statistics(key, compute, cache_dir=tmp_path)
    again, f_again = ref_mod.reference_statistics(key, compute, cache_dir=tmp_path)
    assert len(calls) == 1  # the second call read the file
    assert again.n == stats.n == 30
    np.testing.assert_array_equal(again.mu, stats.mu)
    np.testing.assert_array_equal(again.sigma, stats.sigma)
    np.testing.assert_array_equal(f_again, f)
    np.testing.assert_array_equal(f, feats)
    np.testing.assert_allclose(stats.mu, feats.astype(np.float64).mean(0))

    path = ref_mod.reference_path(key, tmp_path)
    with np.load(path, allow_pickle=False) as npz:  # no pickles inside
        assert str(npz["key_extractor"]) == "toy-5" and str(npz["key_spec"]) == "gauss:30"
        assert int(npz["n"]) == 30 and npz["key_count"].ndim == 0

    # another extractor or spec is another key: computed afresh
    ref_mod.reference_statistics({**key, "extractor": "toy-6"}, compute, cache_dir=tmp_path)
    ref_mod.reference_statistics({**key, "spec": "gauss:31"}, compute, cache_dir=tmp_path)
    assert len(calls) == 3
    # a file at this key's path that was made for another key is recomputed, not used
    other = ref_mod.reference_path({**key, "spec": "gauss:31"}, tmp_path)
    path.write_bytes(other.read_bytes())
    ref_mod.reference_statistics(key, compute, cache_dir=tmp_path)
    assert len(calls) == 4
    ref_mod.reference_statistics(key, compute, cache_dir=tmp_path)  # ... and replaced
    assert len(calls) == 4
    path.write_bytes(b"not a zip file")  # damaged: recomputed
    ref_mod.reference_statistics(key, compute, cache_dir=tmp_path)
    assert len(calls) == 5


def test_reference_features_cap_and_key_checks(tmp_path):
    feats = gaussian(30, 5, 1)
    stats, f = ref_mod.reference_statistics(
        {"extractor": "toy", "spec": "s"}, lambda: feats, tmp_path, max_features=10
    )
    assert f is None and stats.n == 30
    with np.load(ref_mod.reference_path({"extractor": "toy", "spec": "s"}, tmp_path)) as npz:
        assert "features" not in npz.files
    _, f = ref_mod.reference_statistics({"extractor": "toy", "spec": "s"}, lambda: feats, tmp_path)
    assert f is not None and f.shape == (30, 5)  # a larger cap: features computed and kept
    with pytest.raises(ref_mod.ReferenceKeyError, match="spec"):
        ref_mod.reference_statistics({"extractor": "toy"}, lambda: feats, tmp_path)
    with pytest.raises(ValueError, match="count=31"):
        ref_mod.reference_statistics(
            {"extractor": "toy", "spec": "s", "count": 31}, lambda: feats, tmp_path
        )


def test_reference_default_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("AIGC_CACHE_DIR", str(tmp_path))
    path = ref_mod.reference_path({"extractor": "inception/pool3", "spec": "x"})
    assert path.parent == tmp_path / "reference" and path.name.startswith("inception_pool3-")
