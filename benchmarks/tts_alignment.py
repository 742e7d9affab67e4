"""How well ``aigc.data.speech.align_to_flite`` finds the phone boundaries of a
recording it is given with its transcript (the durations a tts run on a folder of the
user's speech learns from), where the truth is known: the "recording" is flite's speech
in another voice and speaking rate, padded with 0.3 s of silence and white hiss at
-54 dBFS, and flite says where each of its phones ended (-psdur). Printed: the mean
absolute boundary error in 16 ms frames (and its median) of DTW against flite's slt,
beside cutting the recording into equal phones, and the time one alignment takes.

    python benchmarks/tts_alignment.py
"""

from __future__ import annotations

import time

import numpy as np

from aigc.data.speech import align_to_flite, phone_frames, speak_with_timing
from aigc.tasks.tts import HOP, tts_mel_spec
from machine import describe

SENTENCES = ["four two seven", "call me at nine one one, please",
             "the quick brown fox jumps over the lazy dog",
             "glue the sheet to the dark blue background"]  # fmt: skip
RECORDED = [("awb", 1.0), ("kal16", 1.25), ("rms", 0.8)]  # (voice, duration stretch)
PAD = 4800  # samples of silence either side: 0.3 s at 16 kHz


def main() -> None:
    print(describe())
    spec = tts_mel_spec()
    print(f"  {'sentence':<28}{'voice':>7}{'rate':>6}{'DTW':>8}{'median':>8}{'equal':>8}{'ms':>6}")
    dtw_all, equal_all = [], []
    for text in SENTENCES:
        for voice, rate in RECORDED:
            u = speak_with_timing(text, voice, rate)
            hiss = np.random.default_rng(0).normal(0, 0.002, len(u.wave) + 2 * PAD)
            wave = (np.pad(u.wave, PAD) + hiss).astype(np.float32)
            start = time.perf_counter()
            _, frames = align_to_flite(wave, text, spec, "slt")
            ms = 1000 * (time.perf_counter() - start)
            truth = np.cumsum(phone_frames(u.ends, HOP))[:-1] + PAD / HOP
            error = np.abs(np.cumsum(frames)[:-1] - truth)
            equal = np.abs(np.linspace(0, frames.sum(), len(frames) + 1)[1:-1] - truth)
            dtw_all.append(error.mean())
            equal_all.append(equal.mean())
            print(f"  {text[:26]:<28}{voice:>7}{rate:>6g}{error.mean():>8.2f}"
                  f"{np.median(error):>8.1f}{equal.mean():>8.1f}{ms:>6.0f}")  # fmt: skip
    print(f"mean boundary error: DTW {np.mean(dtw_all):.2f} frames (worst sentence "
          f"{np.max(dtw_all):.2f}), equal phones {np.mean(equal_all):.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
