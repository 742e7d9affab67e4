"""Domain adaptation from the quickstart's pretrained GPT to Python source code.

Starting from a pretrained run (default: the quickstart's, trained on the Python
documentation), fine-tunes on the standard library's sources (`data.path=stdlib`)
twice with the same steps and data order: every weight (`--method full`), and LoRA
adapters only. Prints the held-out loss on the stdlib validation files before
fine-tuning (the base's weights), after each, the share of the gap that LoRA closes,
and the trainable share.

    python benchmarks/finetune.py --base runs/quickstart --steps 500
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import aigc

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--base", type=Path, default=ROOT / "runs" / "quickstart")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--rank", type=int, default=3)  # < 5% of the quickstart model
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "finetune-bench")
    args = ap.parse_args()
    shutil.rmtree(args.runs, ignore_errors=True)
    rows = {}
    for method in ("full", "lora"):
        t0 = time.perf_counter()
        out = aigc.finetune(
            args.base, [f"train.max_steps={args.steps}"], method=method,
            run_dir=args.runs / method, lora_rank=args.rank, progress=False,
        )  # fmt: skip
        gen = aigc.load(out.run_dir)
        trainable = sum(p.numel() for p in gen.model.parameters())
        rows[method] = (gen.evaluate(n=1, save=False)["loss"], out.train_time,
                        time.perf_counter() - t0)  # fmt: skip
    # before: the base's weights on the same held-out stdlib split
    gen = aigc.load(args.runs / "full")
    gen.model.load_state_dict(aigc.load(args.base).model.state_dict())
    before = gen.evaluate(n=1, save=False)["loss"]
    import json

    first = json.loads((args.runs / "lora" / "metrics.jsonl").read_text().splitlines()[0])
    share = first["trainable_params"] / first["total_params"]
    print(f"base {args.base}; {args.steps} steps each; stdlib held-out loss (nats/char):")
    print(f"  before fine-tuning      {before:.4f}")
    print(f"  full fine-tuning        {rows['full'][0]:.4f}  ({rows['full'][1]:.0f} s training, "
          f"{trainable:,} parameters)")  # fmt: skip
    print(f"  LoRA rank {args.rank}             {rows['lora'][0]:.4f}  ({rows['lora'][1]:.0f} s "
          f"training, {first['trainable_params']:,} trainable = {100 * share:.2f}%)")  # fmt: skip
    gap = before - rows["full"][0]
    print(f"  LoRA closes {100 * (before - rows['lora'][0]) / gap:.0f}% of the gap full closes")


if __name__ == "__main__":
    main()
