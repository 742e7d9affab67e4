"""How fast the evaluation is: feature extraction and FID, side by side with baselines.

- features of --n 32x32 images (the embedded digits, repeated) with the digits
  domain classifier, and of --inception-n images with the FID Inception-v3 (random
  weights in the published layout: speed does not depend on the values), in images
  per second and the time for 10,000 images;
- FID from (10,000, 2048) features: aigc's statistics and Fréchet distance (Cholesky
  congruence + eigenvalues) against the textbook route with scipy.linalg.sqrtm of
  S1 S2 (as pytorch-fid computes it), and the difference between the two values.

    python benchmarks/metrics.py
    python benchmarks/metrics.py --n 2000 --inception-n 100
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import scipy.linalg
import torch

from aigc.data.images import load_image_set, to_tensor
from aigc.metrics.features import FIDInceptionV3, classifier_extractor, inception_extractor
from aigc.metrics.image import features_to_statistics, fid_from_statistics


def timed(fn, repeats: int = 1):
    """(result of the last call, best wall seconds over repeats)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def scipy_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """The textbook route: covariances with np.cov and sqrtm of their product."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2)
    root = root.real if np.iscomplexobj(root) else root
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=10_000, help="images for the classifier")
    ap.add_argument("--inception-n", type=int, default=500, help="images for Inception")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("AIGC_CACHE_DIR", tempfile.mkdtemp(prefix="aigc-bench-"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    digits = load_image_set("digits", image_size=32, channels=1, crop=True)
    reps = -(-args.n // len(digits.images))
    images = to_tensor(np.concatenate([digits.images] * reps)[: args.n])  # (n, 1, 32, 32)

    from aigc.metrics.classifier import cached_classifier

    clf = cached_classifier(
        "benchmark-digits",
        digits.images,
        {"class": np.asarray(digits.labels["class"])},
        {"class": [str(i) for i in range(10)]},
    )
    ext = classifier_extractor(clf)
    feats, sec = timed(lambda: ext.features(images, batch_size=500), args.repeats)
    print(f"domain classifier: {len(images):,} images in {sec:.2f} s = {len(images) / sec:,.0f} "
          f"images/s ({feats.shape[1]}-d); 10,000 images: {10_000 / (len(images) / sec):.2f} s")  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "inception.pth")
        torch.save(FIDInceptionV3().state_dict(), path)
        inc = inception_extractor(path, verify=False)
    few = images[: args.inception_n]
    feats, sec = timed(lambda: inc.features(few, batch_size=50), 1)
    rate = len(few) / sec
    print(f"FID Inception-v3: {len(few):,} images in {sec:.2f} s = {rate:,.1f} images/s "
          f"({feats.shape[1]}-d); 10,000 images: {10_000 / rate:.0f} s at that rate")  # fmt: skip

    rng = np.random.default_rng(0)
    f1 = rng.standard_normal((10_000, 2048))
    f2 = rng.standard_normal((10_000, 2048)) @ (
        np.eye(2048) + 0.01 * rng.standard_normal((2048, 2048))
    )
    ours, t_ours = timed(lambda: fid_from_statistics(features_to_statistics(f1), features_to_statistics(f2)), args.repeats)  # fmt: skip
    stats = features_to_statistics(f1), features_to_statistics(f2)
    _, t_dist = timed(lambda: fid_from_statistics(*stats), args.repeats)
    ref, t_ref = timed(lambda: scipy_fid(f1, f2), 1)
    print(f"FID of two (10,000, 2048) feature sets: aigc {t_ours:.2f} s (of which the distance "
          f"from cached statistics {t_dist:.2f} s); scipy sqrtm route {t_ref:.2f} s; "
          f"speed-up {t_ref / t_ours:.1f}x; values {ours:.6f} vs {ref:.6f} "
          f"(relative difference {abs(ours - ref) / abs(ref):.1e})")  # fmt: skip


if __name__ == "__main__":
    main()
