"""The floor a chorale model must beat: interpolated Kneser-Ney n-grams fitted on the
training chorales, scored on the held-out ones in nats per note (total NLL over note
onsets) and per token, beside the real chorales' music-theory rates (notes in key, in
range, parallel fifths and octaves per pair move) that samples are compared with.

    python benchmarks/music_ngram.py --orders 2 3 4 5
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from aigc.data.music import (
    VOCAB_SIZE,
    bach_chorales,
    encode,
    in_key_rate,
    in_range_rate,
    parallels,
    split_chorales,
    transpositions,
)
from aigc.metrics.ngram import KneserNey
from machine import describe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--orders", type=int, nargs="+", default=[2, 3, 4, 5])
    p.add_argument("--discount", type=float, default=0.75)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--transpose", action="store_true", help="train on every transposition")
    args = p.parse_args()
    print(describe())
    t0 = time.perf_counter()
    chorales = bach_chorales()
    print(f"{len(chorales)} four-part chorales parsed in {time.perf_counter() - t0:.1f} s")
    train, held = split_chorales(chorales, args.val_fraction, args.seed)
    seqs = [encode(c, k) for c in train for k in (transpositions(c) if args.transpose else [0])]
    held_seqs = [encode(c) for c in held]
    notes = sum(int(c.onsets.sum()) for c in held)
    print(f"train {len(train)} chorales ({len(seqs)} sequences), held out {len(held)} "
          f"({notes:,} notes, {sum(len(s) - 1 for s in held_seqs):,} tokens)")  # fmt: skip
    print(f"{'order':>5} {'nats/note':>10} {'nats/token':>11} {'fit+score s':>12}")
    for order in args.orders:
        t = time.perf_counter()
        total, n = KneserNey(order, VOCAB_SIZE, args.discount).fit(seqs).nll(held_seqs)
        print(
            f"{order:>5} {total / notes:>10.3f} {total / n:>11.4f} {time.perf_counter() - t:>12.1f}"
        )
    pars = [parallels(c) for c in held]
    moves = sum(x.moves for x in pars)
    print(f"held-out real chorales: in key {np.mean([in_key_rate(c) for c in held]):.1%}, "
          f"in range {np.mean([in_range_rate(c) for c in held]):.1%}, parallel fifths+octaves "
          f"{sum(x.fifths + x.octaves for x in pars)} in {moves:,} pair moves "
          f"({sum(x.fifths + x.octaves for x in pars) / moves:.2%})")  # fmt: skip


if __name__ == "__main__":
    main()
