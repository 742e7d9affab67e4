"""VAE recipes at their full budgets: held-out likelihoods and the classifier's verdict.

For each recipe: train it as shipped (or continue a run already in --runs), then run
`aigc eval` on it: the negative ELBO and the IWAE bound (k = --iwae-k, default 1,000)
over the held-out images in nats per image and bits per dimension, active latent
units, and the domain classifier's checks of --n prior samples. The issue's bounds:

- the IWAE bound is no worse than the negative ELBO;
- conditional recipes: at least 90% of samples classified as the class asked for.

    python benchmarks/vae_quality.py                       # all VAE recipes
    python benchmarks/vae_quality.py --recipes cvae-digits --iwae-k 100
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import aigc
from aigc.runs import RunDir

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["vae-conv-digits", "cvae-digits", "vae-mlp-digits", "betavae-shapes"]


def check(result: dict) -> list[tuple[str, float, float, bool]]:
    """(metric, value, bound, passed) for the bounds that apply to this run."""
    rows = [
        ("iwae_nll", result["iwae_nll"], result["nelbo"], result["iwae_nll"] <= result["nelbo"])
    ]
    for key, value in result.items():
        if key.startswith("label_accuracy"):
            rows.append((key, value, 0.9, value >= 0.9))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipes", nargs="+", default=RECIPES)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "vae-quality")
    ap.add_argument("--n", type=int, default=1000, help="prior samples to judge")
    ap.add_argument("--iwae-k", type=int, default=1000, help="importance samples per image")
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
        t0 = time.perf_counter()
        result = aigc.load(run).evaluate(n=args.n, iwae_k=args.iwae_k)
        eval_s = time.perf_counter() - t0
        head = f"{name:<16} {out.step:>5} steps {out.train_time:>5.0f} s train {wall:>5.0f} s wall"
        block = [
            f"{head}  nelbo {result['nelbo']:8.1f} ({result['bpd']:.3f} bpd)  "
            f"iwae k={args.iwae_k} {result['iwae_nll']:8.1f} ({result['iwae_bpd']:.3f} bpd)  "
            f"active {result['active_units']:.0f}/{sum(k.startswith('kl_dim/') for k in result)}"
            f"  eval {eval_s:.0f} s"
        ]
        for metric, value, bound, ok in check(result):
            block.append(f"{'':<16} {metric:<24} {value:9.3f} (bound {bound:.3f})  "
                         f"{'PASS' if ok else 'FAIL'}")  # fmt: skip
        shares = {k: v for k, v in result.items() if k.startswith("min_class_share")}
        block.append(f"{'':<16} " + "  ".join(f"{k} {v:.3f}" for k, v in shares.items()))
        print("\n".join(block), flush=True)
        lines += block
    print("\n".join(["", *lines]))


if __name__ == "__main__":
    main()
