"""The audio watermark (aigc.safety.audio_watermark) on flite's speech: sentences and
one-second spoken digits at 16 kHz, as the project's audio recipes make them.

  * the cost: SNR of marked against unmarked samples (mean and worst);
  * detection at a false-positive rate of 1e-3 (each clip with its own key) after a WAV
    (16-bit) and a FLAC round trip, resampling 16 -> 8 -> 16 kHz (soxr), white noise at
    30 and 20 dB SNR, 10% trimmed from the start, a gain of -12 dB, and, not claimed, MP3 at
    64 kbit/s (libsndfile's encoder) where soundfile writes MP3;
  * the empirical false-positive rate: unmarked clips tested with 20 keys each.

    python benchmarks/audio_watermark.py --n 50
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import soundfile as sf

from aigc.data.audio import resample
from aigc.data.speech import DIGITS, synthesise
from aigc.safety import audio_watermark as aw
from machine import describe

SENTENCES = [
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It is easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.",
    "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.",
    "The girl at the booth sold fifty bonds.",
    "The small pup gnawed a hole in the sock.",
    "The fish twisted and turned on the bent hook.",
    "Press the pants and sew a button on the vest.",
    "The swan dive was far short of perfect.",
    "The beauty of the view stunned the young boy.",
]  # fmt: skip  (IEEE Harvard sentences, list 1 and 2)
VOICES = ("slt", "awb", "rms", "kal16")


def codec(wave: np.ndarray, fmt: str, **kw) -> np.ndarray:
    buf = io.BytesIO()
    sf.write(buf, np.clip(wave, -1, 1), 16000, format=fmt, **kw)
    buf.seek(0)
    return sf.read(buf, dtype="float32")[0]


def noise_at(wave: np.ndarray, snr: float, rng: np.random.Generator) -> np.ndarray:
    n = rng.normal(size=len(wave))
    n *= np.sqrt((wave**2).mean() / (n**2).mean() / 10 ** (snr / 10))
    return wave + n


def transformations(rng: np.random.Generator) -> dict:
    out = {
        "none": lambda w: w,
        "WAV 16-bit": lambda w: codec(w, "WAV", subtype="PCM_16"),
        "FLAC": lambda w: codec(w, "FLAC"),
        "16 -> 8 -> 16 kHz": lambda w: resample(resample(w, 16000, 8000), 8000, 16000),
        "white noise 30 dB": lambda w: noise_at(w, 30.0, rng),
        "white noise 20 dB": lambda w: noise_at(w, 20.0, rng),
        "10% trimmed": lambda w: w[len(w) // 10 :],
        "gain -12 dB": lambda w: w * 10 ** (-12 / 20),
    }
    if "MP3" in sf.available_formats():
        out["MP3 (not claimed)"] = lambda w: codec(w, "MP3")
    return out


def clips(n: int) -> dict[str, list[np.ndarray]]:
    sentences = [synthesise(SENTENCES[i % len(SENTENCES)], VOICES[i % len(VOICES)])
                 for i in range(n)]  # fmt: skip
    digits = []
    for i in range(20):
        w = synthesise(DIGITS[i % 10], VOICES[i % len(VOICES)])[:16000]
        digits.append(np.pad(w, (0, 16000 - len(w))))  # one second, as spoken-digits
    return {f"{n} sentences": sentences, "20 one-second digits": digits}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50)
    args = ap.parse_args()
    print(describe())
    t0 = time.perf_counter()
    for name, waves in clips(args.n).items():
        rng = np.random.default_rng(0)
        keys = [f"bench key {i}" for i in range(len(waves))]
        tm = time.perf_counter()
        marked = [aw.mark_audio(w, 16000, k) for w, k in zip(waves, keys, strict=True)]
        tm = (time.perf_counter() - tm) / len(waves)
        snr = np.array([aw.snr_db(w, m) for w, m in zip(waves, marked, strict=True)])
        secs = np.mean([len(w) / 16000 for w in waves])
        print(
            f"\n{name} (mean {secs:.1f} s): SNR marked vs unmarked mean {snr.mean():.1f} dB, "
            f"worst {snr.min():.1f} dB; marking {tm * 1000:.0f} ms per clip"
        )
        print(f"  {'transformation':<22}{'detected':>9}{'median z':>10}")
        td = time.perf_counter()
        for tname, f in transformations(rng).items():
            verdicts = [aw.detect_audio(f(m), 16000, k) for m, k in zip(marked, keys, strict=True)]
            z = np.array([v.z for v in verdicts])
            hit = np.array([v.marked for v in verdicts])
            print(f"  {tname:<22}{hit.mean():>9.0%}{np.median(z):>10.1f}")
        td = (time.perf_counter() - td) / (len(waves) * len(transformations(rng)))
        p = np.array([aw.detect_audio(w, 16000, f"null {j}").p_value
                      for w in waves for j in range(20)])  # fmt: skip
        wrong = np.array([aw.detect_audio(m, 16000, k + " wrong").marked
                          for m, k in zip(marked, keys, strict=True)])  # fmt: skip
        print(
            f"  unmarked clips x 20 keys: {len(p)} tests, flagged at 1e-3: {(p <= 1e-3).mean():.2%}"
            f", at 1e-2: {(p <= 1e-2).mean():.2%}, at 5e-2: {(p <= 5e-2).mean():.2%}; "
            f"marked clips with a wrong key flagged: {wrong.mean():.0%}; "
            f"detection {td * 1000:.0f} ms per clip"
        )
    print(
        f"\ntotal {time.perf_counter() - t0:.0f} s; threshold z {aw.z_threshold(1e-3, aw.tests_searched()):.2f} "
        f"over {aw.tests_searched()} alignments"
    )


if __name__ == "__main__":
    main()
