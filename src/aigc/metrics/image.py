"""Image metrics as small pure functions over predictions, labels and pixels.

``class_shares`` and ``min_class_share`` show mode collapse (an unconditional
model that never draws some class); ``label_accuracy`` measures whether a
conditional model draws what it is asked for; ``mean_pairwise_distance`` compares
the variety of generated images of a class with that of real images of that class.
"""

from __future__ import annotations

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
