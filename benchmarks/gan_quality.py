"""GAN recipes at their full budgets, judged by the domain classifier on 1,000 samples.

For each recipe: train it as shipped (or continue a run already in --runs), then
generate 1,000 images and check the issue's bounds with the digit classifier
trained on the real digits (aigc.metrics.classifier):

- conditional recipes: at least 95% of samples classified as the class asked for,
  and the variety within every class (mean pairwise pixel distance) at least half
  that of the real digits of that class;
- unconditional recipes: every class predicted for at least 5% of the samples.

    python benchmarks/gan_quality.py                      # all digit recipes
    python benchmarks/gan_quality.py --recipes cgan-digits
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import aigc
from aigc.runs import RunDir

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["cgan-digits", "dcgan-digits", "gan-mlp-digits", "wgangp-digits"]


def check(result: dict) -> list[tuple[str, float, float, bool]]:
    """(metric, value, bound, passed) for the bounds that apply to this run."""
    rows = []
    if "label_accuracy" in result:
        acc, div = result["label_accuracy"], result["diversity_min"]
        rows += [
            ("label_accuracy", acc, 0.95, acc >= 0.95),
            ("diversity_min", div, 0.5, div >= 0.5),
        ]
    else:
        share = result["min_class_share"]
        rows.append(("min_class_share", share, 0.05, share >= 0.05))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipes", nargs="+", default=RECIPES)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "gan-quality")
    ap.add_argument("--n", type=int, default=1000, help="samples to judge")
    args = ap.parse_args()
    lines = []
    for name in args.recipes:
        run = args.runs / name
        t0 = time.perf_counter()
        if RunDir(run).exists():
            out = aigc.train(None, [], run_dir=run, progress=False)
        else:
            out = aigc.train(ROOT / "configs" / f"{name}.yaml", [], run_dir=run, progress=False)
        wall = time.perf_counter() - t0
        result = aigc.load(run).evaluate(n=args.n)
        for metric, value, bound, ok in check(result):
            lines.append(
                f"{name:<16} {out.step:>6} steps {out.train_time:>6.0f} s train {wall:>6.0f} s wall  "
                f"{metric:<16} {value:6.3f} (bound {bound})  {'PASS' if ok else 'FAIL'}"
            )
            print(lines[-1], flush=True)
    print("\n".join(["", *lines]))


if __name__ == "__main__":
    main()
