"""Peak memory of `aigc train` does not grow with the corpus.

Trains the same small GPT for the same number of steps on the embedded Python docs
(~0.46 MB) and on a generated corpus of --mb megabytes, each in its own process,
and samples /proc/PID/status while it runs:

- RssAnon: memory the process owns (heap, tensors): this is what must stay flat;
- VmRSS: also counts pages of the memory-mapped token file that were read, which the
  kernel can drop at any time (page cache), so it grows with how much data was seen.

    python benchmarks/train_memory.py --mb 200
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> None:
    """Writes varied English-like text: shuffled paragraphs of the Python docs."""
    import pydoc_data.topics as topics

    paras = [p for t in topics.topics.values() for p in t.split("\n\n") if p.strip()]
    rng = random.Random(seed)
    target = int(megabytes * 1e6)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            block = "\n\n".join(rng.sample(paras, 200)) + "\n\n"
            f.write(block)
            written += len(block.encode("utf-8"))


def peak_memory(args: list[str]) -> tuple[float, float, float]:
    """Runs `python -m aigc ARGS`; returns (peak RssAnon MB, peak VmRSS MB, seconds)."""
    env = {**os.environ, "AIGC_NO_PROGRESS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "aigc", *args], cwd=ROOT, env=env)
    anon = rss = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            break
        for line in status.splitlines():
            if line.startswith("RssAnon:"):
                anon = max(anon, int(line.split()[1]))
            elif line.startswith("VmRSS:"):
                rss = max(rss, int(line.split()[1]))
        time.sleep(0.05)
    if proc.wait() != 0:
        raise SystemExit(f"training failed: {args}")
    return anon / 1024, rss / 1024, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mb", type=float, default=200.0, help="size of the generated corpus")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()

    common = [
        "train",
        "configs/gpt-pydoc-char.yaml",
        f"train.max_steps={args.steps}",
        "train.max_time=0",
        "train.eval_every=0",
        "data.val_fraction=0.001",  # keep the final validation pass short on the big corpus
    ]
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.txt"
        make_corpus(big, args.mb)
        size = big.stat().st_size / 1e6
        rows = []
        for name, extra in (
            ("embedded (0.46 MB)", []),
            (f"generated ({size:.0f} MB)", [f"data.path={big}"]),
        ):
            anon, rss, secs = peak_memory(
                [*common, *extra, "--run-dir", str(Path(tmp) / name.split()[0])]
            )
            rows.append((name, anon, rss, secs))
        print(f"{'corpus':<22} {'peak RssAnon':>13} {'peak VmRSS':>11} {'wall':>7}")
        for name, anon, rss, secs in rows:
            print(f"{name:<22} {anon:>10.0f} MB {rss:>8.0f} MB {secs:>6.0f}s")
        print(f"RssAnon ratio generated/embedded: {rows[1][1] / rows[0][1]:.2f}")


if __name__ == "__main__":
    main()
