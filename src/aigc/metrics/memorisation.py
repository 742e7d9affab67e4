"""Memorisation: how many generated images are copies of training images.

A generated image counts as memorised when its nearest training image (in a judge's
feature space) is closer than any two distinct training images are to each other: no
pair of real images is that alike, so the sample is better explained as a copy than as
a new draw from the data distribution. The threshold is the training set's own nearest
pair, computed exactly over all pairs, a chunk of rows at a time.
"""

from __future__ import annotations

import numpy as np
import torch

CHUNK = 1024  # rows of the pairwise distance matrix held at once: (CHUNK, N) float64


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) Euclidean distances, from the differences themselves rather
    than |a|^2 + |b|^2 - 2ab, whose cancellation would blur the smallest distances."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def nearest_pair_distance(feats: np.ndarray | torch.Tensor, chunk: int = CHUNK) -> float:
    """The smallest distance between two distinct rows of feats (N, D).

    Rows with identical features are one image (a data set's exact duplicates), so the
    answer is positive; ValueError when there are fewer than two distinct rows.
    """
    x = np.unique(np.asarray(torch.as_tensor(feats, dtype=torch.float64)), axis=0)
    if len(x) < 2:
        raise ValueError(f"{len(x)} distinct feature vector(s): a nearest pair needs two")
    t = torch.from_numpy(x)
    best = float("inf")
    for i in range(0, len(t) - 1, chunk):
        rows = t[i : i + chunk]  # (c, D) against themselves and every later row
        d = _distances(rows, t[i:])  # (c, N - i)
        d = d.masked_fill(torch.ones_like(d, dtype=torch.bool).tril(), float("inf"))
        best = min(best, float(d.min()))
    return best


def nearest_distances(
    queries: np.ndarray | torch.Tensor, feats: np.ndarray | torch.Tensor, chunk: int = CHUNK
) -> np.ndarray:
    """(M,) distance from each row of queries (M, D) to its nearest row of feats (N, D)."""
    q = torch.as_tensor(queries, dtype=torch.float64)
    t = torch.as_tensor(feats, dtype=torch.float64)
    out = [_distances(q[i : i + chunk], t).min(dim=1).values for i in range(0, len(q), chunk)]
    return torch.cat(out).numpy() if out else np.zeros(0)


def memorisation_share(
    generated_feats: np.ndarray | torch.Tensor,
    train_feats: np.ndarray | torch.Tensor,
    threshold: float | None = None,
) -> tuple[float, float]:
    """(share, threshold): the share of generated images (M, D) whose nearest training
    image (N, D) is strictly closer than ``threshold``, by default the nearest pair of
    distinct training images (``nearest_pair_distance``; pass it to skip recomputing)."""
    if threshold is None:
        threshold = nearest_pair_distance(train_feats)
    near = nearest_distances(generated_feats, train_feats)
    return (float((near < threshold).mean()) if len(near) else 0.0), float(threshold)
