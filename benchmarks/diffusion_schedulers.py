"""The scheduler table: one trained diffusion run, every sampler at 10, 20 and 50 network
evaluations, against DDPM's ancestral sampler at 250 steps.

Each row evaluates the run as `aigc eval RUN --scheduler NAME --steps N` does (the same
starting noise and prompts for every row, so rows differ only by the sampler), and times
sampling alone: the median of --repeats batches of --batch images after a two-step warm-up.

- accuracy: what the run's judge says (all_correct for a labelled text-to-image run,
  label_accuracy for a class-conditional one, clip_retrieval for captions without
  labels; blank for an unconditional run);
- FID in the judge's features (or Inception's, with $AIGC_INCEPTION_WEIGHTS);
- images/s; each with its ratio to the DDPM-250 row;
- memorised: the share of generated images nearer a training image than any two
  training images are (aigc.metrics.memorisation).

The column is network evaluations (NFE), not scheduler steps: Heun's method makes 2n - 1
network calls over n sigma intervals, so it runs (NFE + 1) // 2 intervals (9, 19 and 49
calls for 10, 20 and 50); the "calls" column is the count measured during timing.

    python benchmarks/diffusion_schedulers.py runs/t2i-shapes --n 1000
    python benchmarks/diffusion_schedulers.py runs/ddpm-digits-cond --n 200 --nfe 10 20 --batch 32
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

import torch

import aigc
from aigc.schedulers import SCHEDULERS
from machine import describe

ACCURACY_KEYS = ("all_correct", "label_accuracy", "clip_retrieval")  # the first found


def steps_for(scheduler: str, nfe: int) -> int:
    """Scheduler steps that spend at most ``nfe`` network evaluations."""
    return max(1, (nfe + 1) // 2) if scheduler == "heun" else nfe


def timed(pipe: Any, name: str, steps: int, batch: int, repeats: int) -> tuple[float, float]:
    """(images/s, network calls per batch): the median of ``repeats`` timed batches."""
    calls = [0]
    model = pipe.model
    denoise = model.denoise  # one call a network evaluation (its CPU row slices aside)

    def counted(*a, **kw):
        calls[0] += 1
        return denoise(*a, **kw)

    pipe(batch, num_inference_steps=min(steps, 2), scheduler=name, seed=0)  # warm-up
    model.denoise = counted
    times = []
    try:
        for r in range(repeats):
            if pipe.device.type == "cuda":
                torch.cuda.synchronize(pipe.device)
            t0 = time.perf_counter()
            pipe(batch, num_inference_steps=steps, scheduler=name, seed=1 + r)
            if pipe.device.type == "cuda":
                torch.cuda.synchronize(pipe.device)
            times.append(time.perf_counter() - t0)
    finally:
        del model.denoise
    return batch / statistics.median(times), calls[0] / repeats


def measure(pipe: Any, name: str, steps: int, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if not args.time_only:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the judge's caveats, said once by `aigc eval`
            result = pipe.evaluate(n=args.n, scheduler=name, steps=steps, save=args.save)
    rate, calls = timed(pipe, name, steps, args.batch, args.repeats)
    accuracy = next((result[k] for k in ACCURACY_KEYS if k in result), None)
    return {"name": name, "steps": steps, "calls": calls, "accuracy": accuracy,
            "fid": result.get("fid"), "rate": rate, "memorised": result.get("memorised")}  # fmt: skip


def cell(value: float | None, ref: float | None, fmt: str) -> str:
    if value is None:
        return f"{'-':>16}"
    ratio = f"({value / ref:.2f}x)" if ref else ""
    return f"{format(value, fmt):>9} {ratio:>7}"


def memorised(share: float | None) -> str:
    return f"{'-':>9}" if share is None else f"{share:>9.1%}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a trained diffusion run folder")
    p.add_argument("--n", type=int, default=None, help="images per evaluation [data.eval_samples]")
    p.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50], help="network evaluations")
    p.add_argument("--reference-steps", type=int, default=250, help="DDPM's steps [250]")
    p.add_argument("--schedulers", nargs="+", default=sorted(SCHEDULERS))
    p.add_argument("--batch", type=int, default=32, help="images per timed batch")
    p.add_argument("--repeats", type=int, default=1, help="timed batches (median)")
    p.add_argument("--device", default="auto")
    p.add_argument("--save", action="store_true", help="save each eval-<name>-<steps>.json")
    p.add_argument("--time-only", action="store_true",
                   help="images/s alone (no evaluation): the timing column without the rest")  # fmt: skip
    args = p.parse_args()

    pipe = aigc.load(args.run, device=args.device)
    torch.set_grad_enabled(False)
    print(describe(pipe.device))
    print(f"{args.run} at step {pipe.step}, {args.n or pipe.config.data.eval_samples} images "
          f"per evaluation, timing batches of {args.batch}")  # fmt: skip
    print(f"\n{'scheduler':<9} {'NFE':>4} {'steps':>5} {'calls':>5} {'accuracy':>16} "
          f"{'FID':>16} {'images/s':>16} {'memorised':>9}", flush=True)  # fmt: skip
    ref = None
    plan = [("ddpm", args.reference_steps)] + [(name, steps_for(name, nfe))
                                               for nfe in args.nfe for name in args.schedulers]  # fmt: skip
    for name, steps in plan:  # each row as it is measured: a long table shows progress
        r = measure(pipe, name, steps, args)
        ref = ref or r
        nfe = r["steps"] if r["name"] != "heun" else 2 * r["steps"] - 1
        print(f"{r['name']:<9} {nfe:>4} {r['steps']:>5} {r['calls']:>5.0f} "
              f"{cell(r['accuracy'], ref['accuracy'], '.3f')} {cell(r['fid'], ref['fid'], '.3f')} "
              f"{cell(r['rate'], ref['rate'], ',.1f')} {memorised(r['memorised'])}", flush=True)  # fmt: skip
    print("\nratios are to the first row (DDPM at "
          f"{args.reference_steps} steps); NFE = network evaluations: heun makes 2n - 1 over n "
          "intervals, so it runs (NFE + 1) // 2 steps; calls = forward calls measured per "
          "timed batch")  # fmt: skip


if __name__ == "__main__":
    main()
