"""Do generated chorales avoid parallel fifths and octaves as Bach does? For each
music-chorales run: --n chorales of --bars bars at each temperature, their parallel
fifths and octaves per pair move, notes in the key and in range, beside the held-out
real chorales' rates; and the model's belief on held-out music: the probability mass it
puts on notes that would make parallels, at every held-out position where such notes
exist (a teacher-forced figure, free of the drift of sampling).

    python benchmarks/chorale_voice_leading.py runs/music-chorales --n 64 --bars 4
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

import aigc
from aigc.data.music import BOS, decode, in_range_rate, parallels, unlikely_tokens
from aigc.tasks.music import STEPS_PER_BAR
from machine import describe


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95%) of a rate of k in n."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return mid - half, mid + half


def stream_rate(tokens: np.ndarray, order: tuple[int, ...]) -> tuple[int, int, float]:
    """(parallels, pair moves, bars) over every chorale of a token stream whose voices
    are written in ``order``."""
    found = moves = steps = 0
    starts = np.nonzero(tokens == BOS)[0]
    for s, e in zip(starts, [*starts[1:].tolist(), len(tokens)], strict=True):
        c = decode(tokens[s:e], order=order)
        q = parallels(c)
        found, moves, steps = found + q.fifths + q.octaves, moves + q.moves, steps + len(c)
    return found, moves, steps / STEPS_PER_BAR


def parallel_mass(pipe, block: int) -> tuple[float, int, float]:
    """Mean probability of the parallel-forming notes over the held-out positions that
    have some, reading the held-out tokens in windows of ``block`` (as evaluation does);
    the number of such positions, and the share of them where Bach wrote one."""
    tokens = pipe.task.val_tokens.astype(np.int64)
    mask = unlikely_tokens(tokens, pipe.model.cfg.vocab_size, order=pipe.config.data.order)
    total, count = 0.0, 0
    model = pipe.model
    with torch.inference_mode():
        for start in range(0, len(tokens) - 1, block):
            ids = torch.from_numpy(tokens[start : start + block])[None]
            logits = model(ids)[0][0].float()
            probs = torch.softmax(logits, -1).numpy()  # (T, V): the next token's
            m = mask[start + 1 : start + 1 + ids.size(1)]
            probs = probs[: len(m)]
            has = m.any(-1)
            total += float((probs * m)[has].sum())
            count += int(has.sum())
    written = mask[np.arange(1, len(tokens)), tokens[1:]][mask[1:].any(-1)]
    return total / max(count, 1), count, float(written.mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--bars", type=int, default=4)
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.8])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(describe())
    for run in args.runs:
        pipe = aigc.load(run)
        pipe.task.load_data()
        meta = pipe.task.meta
        weight = pipe.config.data.unlikely_parallels
        print(f"\n{run}: data.unlikely_parallels={weight}, "
              f"voice order {pipe.config.data.voice_order}, real held-out chorales: "
              f"parallels {100 * meta['real']['parallels']:.2f}% of pair moves, in key "
              f"{100 * meta['real']['in_key']:.1f}%, in range {100 * meta['real']['in_range']:.1f}%")  # fmt: skip
        for name, tokens in (("training chorales (every transposition)", pipe.task.train_tokens),
                             ("held-out chorales", pipe.task.val_tokens)):  # fmt: skip
            k, m, bars = stream_rate(tokens.astype(np.int64), pipe.config.data.order)
            lo, hi = wilson(k, m)
            print(f"  real {name}: {k} parallels in {m} pair moves, {100 * k / m:.3f}% "
                  f"(95% {100 * lo:.3f}-{100 * hi:.3f}%), {m / bars:.1f} pair moves per bar")  # fmt: skip
        t0 = time.perf_counter()
        mass, positions, bach = parallel_mass(pipe, pipe.config.model.block_size)
        print(
            f"  held-out belief: {100 * mass:.2f}% of probability on parallel-forming notes, "
            f"mean over {positions} positions that have some (Bach wrote one at "
            f"{100 * bach:.2f}% of them; {time.perf_counter() - t0:.0f} s)"
        )
        from aigc.tasks.music import _in_key

        for temp in args.temperatures:
            t0 = time.perf_counter()
            out = pipe.generate(n=args.n, bars=args.bars, temperature=temp, seed=args.seed)
            par = [parallels(c) for c in out.chorales]
            moves = sum(q.moves for q in par)
            found = sum(q.fifths + q.octaves for q in par)
            rate = found / max(moves, 1)
            lo, hi = wilson(found, moves)
            print(f"  T {temp:g}: {args.n} chorales of {args.bars} bars, parallels "
                  f"{100 * rate:.3f}% of {moves} pair moves (95% {100 * lo:.3f}-{100 * hi:.3f}%; "
                  f"{rate / meta['real']['parallels']:.2f}x the held-out rate), fifths "
                  f"{sum(q.fifths for q in par)}, octaves {sum(q.octaves for q in par)}; "
                  f"{moves / (args.n * args.bars):.1f} pair moves per bar; in key "
                  f"{100 * np.nanmean([_in_key(c) for c in out.chorales]):.1f}%, in range "
                  f"{100 * np.nanmean([in_range_rate(c) for c in out.chorales]):.1f}% "
                  f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
