"""Are generated folk tunes music? A music-folk-abc run writes --n tunes from "X:1\\n"
(temperature --temperature, up to a blank line or --max-new-tokens); each is read by
music21's ABC parser, and counted as a tune when it parses into at least 8 notes. The
same is done for as many held-out real tunes (the last tenth of the shuffled tunes,
which the run never trained on), beside the tunes' notes and the share of their notes
in the key their header names.

    python benchmarks/folk_abc.py runs/music-folk-abc --n 100
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

import aigc
from aigc.data.abc import folk_tunes
from machine import describe


def read_tune(text: str) -> tuple[int, float] | None:
    """(notes, share of notes in the header's key) of an ABC tune, None when music21
    cannot read it or finds fewer than 8 notes."""
    from music21 import converter

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            score = converter.parse(text, format="abc")
        notes = list(score.recurse().notes)
        keys = list(score.recurse().getElementsByClass("KeySignature"))
    except Exception:  # music21 raises many kinds on malformed ABC
        return None
    pitches = [p for n in notes for p in n.pitches]
    if len(pitches) < 8:
        return None
    if not keys:
        return len(pitches), float("nan")
    scale = {p.pitchClass for p in keys[0].asKey().pitches}
    return len(pitches), float(np.mean([p.pitchClass in scale for p in pitches]))


def summary(name: str, tunes: list[str]) -> None:
    read = [read_tune(t) for t in tunes]
    ok = [r for r in read if r is not None]
    key = np.nanmean([r[1] for r in ok]) if ok else float("nan")
    notes = np.median([r[0] for r in ok]) if ok else 0
    print(f"{name:<22} {len(ok) / len(tunes):>8.1%} {notes:>12.0f} {key:>12.1%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--max-new-tokens", type=int, default=600)
    args = p.parse_args()
    pipe = aigc.load(args.run, device="cpu")
    print(describe(pipe.device))
    t0 = time.perf_counter()
    made = pipe.generate(["X:1\n"] * args.n, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, stop=("\n\n",), seed=0)  # fmt: skip
    dt = time.perf_counter() - t0
    tunes = ["X:1\n" + t for t in made]
    real = [t for _, t in folk_tunes()[-args.n :]]
    print(f"{args.run} at step {pipe.step}: {args.n} tunes in {dt:.0f} s, temperature "
          f"{args.temperature}\n")  # fmt: skip
    print(f"{'':<22} {'parsed':>8} {'median notes':>12} {'notes in key':>12}")
    summary("generated", tunes)
    summary("held-out real tunes", real)
    print("\n--- a generated tune ---\n" + tunes[0])


if __name__ == "__main__":
    main()
