"""Generated images, told apart without a watermark: the cross-generator table of
CNNDetection (Wang et al., CVPR 2020) on our own runs.

For each generator run, a detector is trained against it (``train_detector``: n of its
samples against n of its real training images, blur + JPEG augmentation, a fifth held
out). Every detector is then tested on every generator: m fresh samples of that generator
(another seed than any detector saw) against m real images of the data set's validation
split, which no generator and no detector trained on (checked here, image by image,
against every run's training split). Each cell gives the average precision ("generated"
the positive class; chance is 0.5) and the accuracy at probability 0.5, as Wang et al.
report them; their anchor is 63.9 to 100 AP on generators the detector never saw. Our AP
is checked against scikit-learn's on every cell.

    OMP_NUM_THREADS=1 python benchmarks/image_detector.py \\
        --runs runs/cgan-shapes runs/dcgan-shapes runs/betavae-shapes runs/t2i-shapes
    OMP_NUM_THREADS=1 python benchmarks/image_detector.py \\
        --runs runs/ddpm-digits runs/dcgan-digits runs/vae-conv-digits runs/ddpm-digits-cond

The runs must share one data source (the held-out real images come from the first run's
validation split). The README's figures: dcgan-shapes trained with
``train.max_time=300`` (1,335 steps), dcgan-digits with 180 and vae-conv-digits with 120.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score

import aigc
from aigc.safety.image_detector import (
    THRESHOLD,
    average_precision,
    load_detector,
    sample_generator,
    train_detector,
)
from aigc.tasks.images import open_data
from machine import describe


def row_hashes(images: np.ndarray) -> set[bytes]:
    return {hashlib.sha256(im.tobytes()).digest() for im in images}


def held_out_reals(runs: list[Path], m: int, seed: int) -> np.ndarray:
    """m images of the first run's validation split, after checking that none of them is
    in any run's training split (the runs share a source, split differently)."""
    val = open_data(runs[0] / "data").val_images
    pick = np.sort(np.random.default_rng(seed).permutation(len(val))[:m])
    reals = np.ascontiguousarray(val[pick])
    mine = row_hashes(reals)
    for run in runs:
        train = open_data(run / "data").train_images
        if train.shape[1:] != reals.shape[1:]:
            raise SystemExit(f"{run}: images {train.shape[1:]}, not {reals.shape[1:]}")
        shared = len(mine & row_hashes(train))
        if shared:
            raise SystemExit(f"{shared} held-out real images are in {run}'s training split")
    return reals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", type=Path, required=True)
    ap.add_argument("--n", type=int, default=300, help="samples (and reals) per detector")
    ap.add_argument("--steps", type=int, default=300, help="detector training steps")
    ap.add_argument("--m", type=int, default=200, help="test samples per generator (and reals)")
    ap.add_argument("--out", type=Path, default=None, help="keep the detectors here")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(describe(), flush=True)
    names = [r.name for r in args.runs]
    reals = held_out_reals(args.runs, args.m, seed=7)
    print(f"{len(reals)} held-out real images ({args.runs[0].name}'s validation split, in no "
          "run's training split)", flush=True)  # fmt: skip

    out = args.out or Path(tempfile.mkdtemp(prefix="detectors-"))
    tests, detectors = {}, {}
    for run in args.runs:
        t = time.perf_counter()
        pipe = aigc.load(run)
        tests[run.name] = sample_generator(pipe, args.m, seed=1000)  # no detector saw these
        t_sample = time.perf_counter() - t
        report = train_detector(run, out / run.name, n=args.n, steps=args.steps, seed=0)
        detectors[run.name] = load_detector(out / run.name)
        print(f"{run.name}: {args.m} test samples in {t_sample:.0f} s; detector in "
              f"{report.seconds:.0f} s (sampling {args.n} included), held-out acc "
              f"{report.val_accuracy:.1%}, AP {report.val_average_precision:.3f}", flush=True)  # fmt: skip

    labels = np.r_[np.zeros(len(reals)), np.ones(args.m)]
    cells: dict[tuple[str, str], tuple[float, float, float, float]] = {}
    for trained in names:
        det = detectors[trained]
        real_scores = det.score(reals)
        for tested in names:
            scores = np.r_[real_scores, det.score(tests[tested])]
            ours = average_precision(scores, labels)
            ref = average_precision_score(labels, scores)
            assert abs(ours - ref) < 1e-12, (trained, tested, ours, ref)
            acc = float(((scores >= THRESHOLD) == labels).mean())
            real_acc = float((real_scores < THRESHOLD).mean())
            fake_acc = float((scores[len(reals) :] >= THRESHOLD).mean())
            cells[trained, tested] = (ours, acc, real_acc, fake_acc)

    print("\nAP / accuracy at 0.5 (%), rows: trained against, columns: tested on "
          f"({args.m} samples vs {len(reals)} held-out real images each)")  # fmt: skip
    print("| trained on \\ tested on | " + " | ".join(names) + " | mean unseen AP |")
    print("|---" * (len(names) + 2) + "|")
    for trained in names:
        row = [
            f"{100 * cells[trained, t][0]:.1f} / {100 * cells[trained, t][1]:.1f}" for t in names
        ]
        unseen = [cells[trained, t][0] for t in names if t != trained]
        mean = f"{100 * np.mean(unseen):.1f}" if unseen else "-"
        print(f"| {trained} | " + " | ".join(row) + f" | {mean} |")
    print("\nreal images called real / samples called generated (%) at 0.5")
    for trained in names:
        row = [
            f"{100 * cells[trained, t][2]:.0f} / {100 * cells[trained, t][3]:.0f}" for t in names
        ]
        print(f"| {trained} | " + " | ".join(row) + " |")
    print(f"\nour average precision equals scikit-learn's on all {len(cells)} cells (to 1e-12)")


if __name__ == "__main__":
    main()
