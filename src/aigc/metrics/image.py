"""Image metrics as small pure functions over predictions, labels and pixels.

``class_shares`` and ``min_class_share`` show mode collapse (an unconditional
model that never draws some class); ``label_accuracy`` measures whether a
conditional model draws what it is asked for; ``mean_pairwise_distance`` compares
the variety of generated images of a class with that of real images of that class;
``class_coverage`` sums up how widely predictions spread over the classes.

Feature-based metrics compare generated with real images through a feature
extractor's vectors (N, D) or logits (N, K): FID (``features_to_statistics``,
``fid_from_statistics``, ``fid_from_features``), KID (``kid_from_features``), the
Inception Score (``inception_score_from_logits``), precision and recall
(``precision_recall``) and density and coverage (``density_coverage``). They are
NumPy float64 functions and know nothing of the extractor. ``FEATURE_METRICS`` names
them for ``aigc eval --metrics`` (fid, kid, is, pr, dc); users may add their own.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


def class_shares(predicted: Tensor | np.ndarray, num_classes: int) -> np.ndarray:
    """Share of samples predicted as each class, (num_classes,) summing to 1."""
    counts = np.bincount(np.asarray(predicted, dtype=np.int64), minlength=num_classes)
    return counts / max(int(counts.sum()), 1)


def min_class_share(predicted: Tensor | np.ndarray, num_classes: int) -> float:
    """The smallest share of any class among the predictions (0 = a class never drawn)."""
    return float(class_shares(predicted, num_classes).min())


def label_accuracy(predicted: Tensor | np.ndarray, requested: Tensor | np.ndarray) -> float:
    """Share of samples whose predicted class is the class that was requested."""
    p, r = np.asarray(predicted), np.asarray(requested)
    return float((p == r).mean()) if len(p) else float("nan")


def mean_pairwise_distance(images: Tensor, max_images: int = 500) -> float:
    """Mean Euclidean distance between all pairs of images (flattened pixels).

    A set of one image repeated scores 0. Above ``max_images`` the first
    ``max_images`` are used (the pairs grow quadratically).
    """
    x = images[:max_images].reshape(min(len(images), max_images), -1).double()
    n = len(x)
    if n < 2:
        return float("nan")
    d = torch.cdist(x, x)  # (n, n), zero diagonal
    return float(d.sum() / (n * (n - 1)))


def class_coverage(predicted: Tensor | np.ndarray, num_classes: int) -> dict[str, float]:
    """How widely the predicted classes spread over ``num_classes``.

    ``classes_seen``: share of classes predicted at least once (1 = every class drawn).
    ``class_entropy``: entropy of the predicted-class shares divided by log(num_classes),
    so 1 means every class equally often and 0 a single class (nan with no predictions;
    1 when there is only one class).
    """
    shares = class_shares(predicted, num_classes)  # (num_classes,)
    if shares.sum() == 0:
        return {"classes_seen": 0.0, "class_entropy": float("nan")}
    seen = shares[shares > 0]
    entropy = -float((seen * np.log(seen)).sum())
    normalised = entropy / np.log(num_classes) if num_classes > 1 else 1.0
    return {"classes_seen": float((shares > 0).mean()), "class_entropy": float(normalised)}


# Feature-based metrics ---------------------------------------------------------
#
# Everything below works on float64 NumPy arrays: features (N, D) from a feature
# extractor (Inception pool3, a domain classifier's trunk) and logits (N, K). The
# extractors themselves live elsewhere; these functions know nothing of models.


class SingularCovarianceWarning(UserWarning):
    """A covariance in FID is singular: fewer samples than feature dimensions, or
    linearly dependent features. The score is then dominated by estimation error."""


class MeanStd(NamedTuple):
    """A score averaged over random subsets or splits, with its spread (ddof=0)."""

    mean: float
    std: float


class PrecisionRecall(NamedTuple):
    precision: float  # share of generated samples inside the real manifold
    recall: float  # share of real samples inside the generated manifold


class DensityCoverage(NamedTuple):
    density: float  # mean number of real neighbourhoods holding a generated sample, / k
    coverage: float  # share of real neighbourhoods holding at least one generated sample


@dataclass(frozen=True, eq=False)
class Statistics:
    """Gaussian summary of a feature set: mean (D,), covariance (D, D), sample count."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64, unbiased (divided by n - 1)
    n: int  # number of feature vectors it was computed from

    def __post_init__(self) -> None:
        d = self.mu.shape[0] if self.mu.ndim == 1 else -1
        if self.mu.ndim != 1 or self.sigma.shape != (d, d):
            raise ValueError(
                f"Statistics needs mu of shape (D,) and sigma of shape (D, D); "
                f"got {self.mu.shape} and {self.sigma.shape}"
            )


def _as_features(x: np.ndarray | Tensor, name: str, min_rows: int = 1) -> np.ndarray:
    """(N, D) float64 array, checked: two dimensions, enough rows, all finite."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be (N, D) feature vectors; got shape {x.shape}")
    if len(x) < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows; got {len(x)}")
    bad = int((~np.isfinite(x)).any(axis=1).sum())
    if bad:
        raise ValueError(f"{name} has {bad} rows with NaN or infinite values")
    return x


def features_to_statistics(features: np.ndarray | Tensor) -> Statistics:
    """Mean and unbiased covariance of (N, D) features, N >= 2 (Heusel et al. 2017, §3)."""
    x = _as_features(features, "features", min_rows=2)
    return Statistics(mu=x.mean(axis=0), sigma=np.cov(x, rowvar=False, ddof=1), n=len(x))


def _warn_if_singular(stats: Statistics, eigenvalues: np.ndarray, which: str) -> None:
    d = len(stats.mu)
    tol = max(float(eigenvalues.max()), 0.0) * d * np.finfo(np.float64).eps
    rank = int((eigenvalues > tol).sum())
    if stats.n <= d:
        why = f"{stats.n} samples for {d} feature dimensions"
    elif rank < d:
        why = f"rank {rank} < {d} feature dimensions, from {stats.n} samples"
    else:
        return
    warnings.warn(
        f"the {which} covariance is singular ({why}): FID is unreliable when the samples "
        f"do not span the features; use clearly more than {d} varied samples",
        SingularCovarianceWarning,
        stacklevel=3,
    )


def fid_from_statistics(a: Statistics, b: Statistics) -> float:
    """Fréchet distance between two Gaussians (Heusel et al. 2017, eq. 6):

        ||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^{1/2})

    in squared feature units. S_a S_b is not symmetric, so instead of a general matrix
    square root the trace uses that S_a S_b = L (L^T S_b) has the eigenvalues of the
    symmetric PSD matrix L^T S_b L, where S_a = L L^T (Cholesky): one factorisation,
    two products and the eigenvalues alone, ~1 s at D = 2048 on 2 cores. When S_a is
    singular (no Cholesky factor) the symmetric root S_a^{1/2} from an eigendecomposition
    takes L's place. Tiny negative eigenvalues from round-off are clipped to 0. Warns
    with SingularCovarianceWarning when either covariance is singular.
    """
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"FID needs features of one dimension; got {a.mu.shape} and {b.mu.shape}")
    factor_a = _cholesky_checked(a, "first")
    _cholesky_checked(b, "second")
    if factor_a is None:  # singular S_a: its symmetric square root instead
        w_a, v_a = np.linalg.eigh(a.sigma)  # S_a = V diag(w) V^T
        factor_a = (v_a * np.sqrt(np.clip(w_a, 0.0, None))) @ v_a.T
    m = factor_a.T @ b.sigma @ factor_a
    m = (m + m.T) / 2  # symmetric up to round-off
    trace_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh(m), 0.0, None)).sum())
    diff = a.mu - b.mu
    fid = float(diff @ diff) + float(np.trace(a.sigma) + np.trace(b.sigma)) - 2 * trace_sqrt
    return max(fid, 0.0)  # a squared distance: a tiny negative is round-off


def _cholesky_checked(stats: Statistics, which: str) -> np.ndarray | None:
    """The Cholesky factor of stats.sigma, or None when it is singular; warns (with the
    rank, from the eigenvalues, only in that case) when the covariance is singular."""
    d = len(stats.mu)
    try:
        factor = np.linalg.cholesky(stats.sigma)
    except np.linalg.LinAlgError:
        factor = None
    scale = max(float(np.diag(stats.sigma).max()), 0.0)
    if (
        factor is None
        or stats.n <= d
        or float((np.diag(factor) ** 2).min()) <= scale * d * np.finfo(np.float64).eps
    ):
        _warn_if_singular(stats, np.linalg.eigvalsh(stats.sigma), which)
        if factor is not None and stats.n <= d:
            factor = None  # the rank-deficient factor is unreliable; use the eigen root
    return factor


def fid_from_features(f1: np.ndarray | Tensor, f2: np.ndarray | Tensor) -> float:
    """FID between two feature sets (N1, D) and (N2, D); see fid_from_statistics."""
    return fid_from_statistics(features_to_statistics(f1), features_to_statistics(f2))


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x·y / D + 1)^3 for rows of x (n, D) and y (m, D) -> (n, m)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two samples of size m (Gretton et al. 2012, eq. 3): the
    within-set means leave out the diagonal k(x_i, x_i)."""
    m = len(x)
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kid_from_features(
    real: np.ndarray | Tensor,
    fake: np.ndarray | Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> MeanStd:
    """Kernel Inception Distance (Bińkowski et al. 2018, §3.2): unbiased MMD^2 with the
    cubic polynomial kernel k(x, y) = (x·y / D + 1)^3, averaged over ``subsets``
    random subsets of ``subset_size`` rows of each set (drawn without replacement by
    ``np.random.default_rng(seed)``; the size is capped at the smaller set).

    Returns the mean and standard deviation over subsets, in squared kernel units.
    Unbiased, so it can be slightly negative when the two sets match.
    """
    if subsets < 1 or subset_size < 2:
        raise ValueError(
            f"KID needs subsets >= 1 and subset_size >= 2; got {subsets}, {subset_size}"
        )
    x = _as_features(real, "real", min_rows=2)
    y = _as_features(fake, "fake", min_rows=2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"KID needs features of one dimension; got {x.shape[1]} and {y.shape[1]}")
    m = min(subset_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    scores = [
        _mmd2_unbiased(
            x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)]
        )
        for _ in range(subsets)
    ]
    return MeanStd(float(np.mean(scores)), float(np.std(scores)))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def inception_score_from_logits(
    logits: np.ndarray | Tensor, splits: int = 10, seed: int | None = 0
) -> MeanStd:
    """Inception Score (Salimans et al. 2016, §4): exp(E_x KL(p(y|x) || p(y))) where
    p(y|x) is the softmax of the (N, K) logits (in float64) and p(y) its mean over a
    split. The N rows are cut into ``splits`` near-equal parts; returns the mean and
    standard deviation (ddof=0) of the per-split scores. Ranges from 1 to K.

    Rows are shuffled first with ``np.random.default_rng(seed)`` (``seed=None`` keeps
    their order), so samples generated class by class do not give one-class splits.
    With the FID Inception network pass all 1008 logits, as torch-fidelity does, not
    the 1000 ImageNet classes.
    """
    x = _as_features(logits, "logits", min_rows=splits)
    if seed is not None:
        x = x[np.random.default_rng(seed).permutation(len(x))]
    log_p = _log_softmax(x)  # (N, K) log p(y|x)
    scores = []
    for part in np.array_split(log_p, splits):
        # log p(y) = log mean_x p(y|x), as a log-sum-exp so no class gives log 0
        top = part.max(axis=0)
        log_py = top + np.log(np.exp(part - top).mean(axis=0))  # (K,)
        kl = (np.exp(part) * (part - log_py)).sum(axis=1)  # (n,) KL(p(y|x) || p(y))
        scores.append(np.exp(kl.mean()))
    return MeanStd(float(np.mean(scores)), float(np.std(scores)))


def _squared_distances(
    x: np.ndarray, y: np.ndarray, x_sq: np.ndarray, y_sq: np.ndarray
) -> np.ndarray:
    """||x_i - y_j||^2 for rows x (b, D), y (M, D) given their squared norms -> (b, M)."""
    d = x @ y.T
    d *= -2.0
    d += x_sq[:, None]
    d += y_sq[None, :]
    return np.maximum(d, 0.0, out=d)


def _knn_radii(x: np.ndarray, x_sq: np.ndarray, k: int, block_size: int) -> np.ndarray:
    """Squared distance from each row of x (N, D) to its k-th nearest other row -> (N,).

    Rows are taken ``block_size`` at a time, so memory is (block_size, N), not (N, N).
    A row's distance to itself is excluded by index (duplicates still count).
    """
    radii = np.empty(len(x))
    for start in range(0, len(x), block_size):
        stop = start + block_size
        d = _squared_distances(x[start:stop], x, x_sq[start:stop], x_sq)  # (b, N)
        rows = np.arange(len(d))
        d[rows, start + rows] = np.inf  # not one's own neighbour
        radii[start : start + len(d)] = np.partition(d, k - 1, axis=1)[:, k - 1]
    return radii


def _manifold_pass(
    real: np.ndarray,
    fake: np.ndarray,
    real_radii: np.ndarray,
    fake_radii: np.ndarray | None,
    block_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One blocked pass over all (fake, real) pairs. Returns, from squared distances:

    - per fake sample, the number of real k-NN balls holding it (M,)
    - per real sample, whether its own ball holds some fake sample (N,)
    - per real sample, whether some fake ball holds it (N,) (None without fake_radii)
    """
    real_sq, fake_sq = (real**2).sum(axis=1), (fake**2).sum(axis=1)
    in_real_balls = np.zeros(len(fake), dtype=np.int64)
    real_covered = np.zeros(len(real), dtype=bool)
    real_in_fake = np.zeros(len(real), dtype=bool) if fake_radii is not None else None
    for start in range(0, len(fake), block_size):
        stop = start + block_size
        d = _squared_distances(fake[start:stop], real, fake_sq[start:stop], real_sq)  # (b, N)
        inside = d <= real_radii[None, :]  # fake j inside real i's ball
        in_real_balls[start:stop] = inside.sum(axis=1)
        real_covered |= inside.any(axis=0)
        if real_in_fake is not None:
            real_in_fake |= (d <= fake_radii[start:stop, None]).any(axis=0)
    return in_real_balls, real_covered, real_in_fake


def _check_manifold_inputs(
    real: np.ndarray | Tensor, fake: np.ndarray | Tensor, k: int, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    if k < 1 or block_size < 1:
        raise ValueError(f"k and block_size must be positive; got k={k}, block_size={block_size}")
    x = _as_features(real, "real", min_rows=k + 1)  # k neighbours besides oneself
    y = _as_features(fake, "fake", min_rows=k + 1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"features of one dimension needed; got {x.shape[1]} and {y.shape[1]}")
    return x, y


def precision_recall(
    real: np.ndarray | Tensor, fake: np.ndarray | Tensor, k: int = 3, block_size: int = 1000
) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019, eqs. 1-2).

    Each set's manifold is the union of balls around its samples reaching to the
    k-th nearest other sample of the same set. Precision: share of fake (M, D)
    samples inside the real manifold; recall: share of real (N, D) samples inside the
    fake manifold. Distances are taken ``block_size`` rows at a time, so memory is
    O(block_size × max(N, M)) and the result does not depend on the block size.
    """
    x, y = _check_manifold_inputs(real, fake, k, block_size)
    real_radii = _knn_radii(x, (x**2).sum(axis=1), k, block_size)
    fake_radii = _knn_radii(y, (y**2).sum(axis=1), k, block_size)
    in_real_balls, _, real_in_fake = _manifold_pass(x, y, real_radii, fake_radii, block_size)
    assert real_in_fake is not None
    return PrecisionRecall(float((in_real_balls > 0).mean()), float(real_in_fake.mean()))


def density_coverage(
    real: np.ndarray | Tensor, fake: np.ndarray | Tensor, k: int = 5, block_size: int = 1000
) -> DensityCoverage:
    """Density and coverage (Naeem et al. 2020, eqs. 3-4), from k-NN balls of the
    real samples only (radius: distance to the k-th nearest other real sample).

    Density: number of (real ball, fake sample) containments / (k M); about 1 when
    fakes are distributed like reals, above 1 when they crowd dense regions.
    Coverage: share of real balls that hold at least one fake sample, in [0, 1].
    real (N, D), fake (M, D); blocked like ``precision_recall``.
    """
    x, y = _check_manifold_inputs(real, fake, k, block_size)
    real_radii = _knn_radii(x, (x**2).sum(axis=1), k, block_size)
    in_real_balls, real_covered, _ = _manifold_pass(x, y, real_radii, None, block_size)
    return DensityCoverage(float(in_real_balls.sum() / (k * len(y))), float(real_covered.mean()))


# ---------------------------------------------------------------------------
# one table of feature metrics, shared by `aigc eval`, the trainer and the API


@dataclass(frozen=True)
class FeatureSets:
    """What a feature metric may use: the reference's statistics and (N, D) features
    (None above the reference cache's cap), and the generated images' (M, D) features
    and (M, K) logits."""

    real_stats: Statistics
    real: np.ndarray | None
    fake: np.ndarray
    fake_logits: np.ndarray


def _needs_real(sets: FeatureSets, name: str) -> np.ndarray:
    if sets.real is None:
        raise ValueError(f"{name} needs the reference's features, which are not kept above "
                         "10,000 reference images; use a smaller reference")  # fmt: skip
    return sets.real


def _fid(sets: FeatureSets) -> dict[str, float]:
    return {"fid": fid_from_statistics(sets.real_stats, features_to_statistics(sets.fake))}


def _kid(sets: FeatureSets) -> dict[str, float]:
    real = _needs_real(sets, "kid")
    kid = kid_from_features(real, sets.fake, subset_size=min(1000, len(real), len(sets.fake)))
    return {"kid": kid.mean, "kid_std": kid.std}


def _is(sets: FeatureSets) -> dict[str, float]:
    score = inception_score_from_logits(sets.fake_logits)
    return {"is": score.mean, "is_std": score.std}


def _pr(sets: FeatureSets) -> dict[str, float]:
    pr = precision_recall(_needs_real(sets, "pr"), sets.fake, k=3)
    return {"precision": pr.precision, "recall": pr.recall}


def _dc(sets: FeatureSets) -> dict[str, float]:
    dc = density_coverage(_needs_real(sets, "dc"), sets.fake, k=5)
    return {"density": dc.density, "coverage": dc.coverage}


# name (as in --metrics) -> function of FeatureSets returning named values; add your own
FEATURE_METRICS: dict[str, Callable[[FeatureSets], dict[str, float]]] = {
    "fid": _fid,
    "kid": _kid,
    "is": _is,
    "pr": _pr,
    "dc": _dc,
}


def feature_metrics(names: Sequence[str], sets: FeatureSets) -> dict[str, float]:
    """The named metrics of FEATURE_METRICS computed on ``sets``, merged into one dict."""
    out: dict[str, float] = {}
    for name in names:
        out.update(FEATURE_METRICS[name](sets))
    return out
