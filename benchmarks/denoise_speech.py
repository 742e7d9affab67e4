"""Speech denoising against the baseline users would otherwise install: the run's
held-out mixtures (held-out sentences, fresh noise, test SNRs 2.5-17.5 dB) scored as
they are, after RNNoise (the ``pyrnnoise`` package, weights inside; it works at 48 kHz
and delays its output by 20 ms, measured here by cross-correlation and taken back
before scoring) and after the run; PESQ (wide band), STOI and SI-SDR per noise kind,
and each denoiser's real-time factor on this machine.

    pip install 'aigc[bench]'     # pyrnnoise
    python benchmarks/denoise_speech.py runs/denoise-speech
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import aigc
from aigc.data.noisy_speech import NOISES
from aigc.tasks.denoise import SAMPLE_RATE, speech_quality
from machine import describe


def rnnoise(wave: np.ndarray, delay: int) -> np.ndarray:
    """RNNoise on a 16 kHz clip (it resamples to 48 kHz and back), ``delay`` samples
    taken back so that its output lines up with its input."""
    from pyrnnoise import RNNoise

    model = RNNoise(sample_rate=SAMPLE_RATE)
    out = np.concatenate([f for _, f in model.denoise_chunk(wave[None].astype(np.float32),
                                                            partial=True)], axis=-1)  # fmt: skip
    out = out[0].astype(np.float32) / (32768.0 if out.dtype == np.int16 else 1.0)
    out = np.concatenate([out[delay:], np.zeros(delay, np.float32)])
    return np.pad(out[: len(wave)], (0, max(0, len(wave) - len(out))))


def measured_delay(wave: np.ndarray) -> int:
    """RNNoise's delay in samples: the lag of best correlation of its output on clean
    speech with the input (0 to 50 ms)."""
    out = rnnoise(wave, 0)
    lags = range(0, SAMPLE_RATE // 20)
    return max(lags, key=lambda d: float(np.dot(wave[: len(wave) - d], out[d:])))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a trained denoise run")
    p.add_argument("--n", type=int, default=0, help="held-out mixtures (0 = all)")
    p.add_argument("--no-rnnoise", action="store_true")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    pipe = aigc.load(args.run, device="cpu")
    d = pipe.run.data_dir
    clean = np.load(d / "val_clean.npy").astype(np.float32) / 32767
    noisy = np.load(d / "val_noisy.npy").astype(np.float32) / 32767
    kinds = np.load(d / "val_kind.npy")
    if args.n:
        clean, noisy, kinds = clean[: args.n], noisy[: args.n], kinds[: args.n]
    print(describe(torch.device("cpu")))
    seconds = noisy.size / SAMPLE_RATE
    print(f"{args.run} at step {pipe.step}: {len(noisy)} held-out mixtures, {seconds:.0f} s")
    outputs = {"noisy": noisy}
    rtf = {}
    if not args.no_rnnoise:
        delay = measured_delay(clean[0])
        print(f"RNNoise delay measured: {delay} samples ({1000 * delay / SAMPLE_RATE:.1f} ms)")
        t0 = time.perf_counter()
        outputs["RNNoise"] = np.stack([rnnoise(w, delay) for w in noisy])
        rtf["RNNoise"] = seconds / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    outputs["aigc"] = np.stack([pipe.enhance(w) for w in noisy])
    rtf["aigc"] = seconds / (time.perf_counter() - t0)
    scores = {name: [speech_quality(o, c) for o, c in zip(out, clean, strict=True)]
              for name, out in outputs.items()}  # fmt: skip
    head = f"{'noise':<8} {'denoiser':<8} {'PESQ':>6} {'STOI':>6} {'SI-SDR':>7}"
    print("\n" + head)
    for k, kind in [*enumerate(NOISES), (None, "all")]:
        rows = np.arange(len(kinds)) if k is None else np.nonzero(kinds == k)[0]
        for name, s in scores.items():
            mean = {m: np.mean([s[r][m] for r in rows]) for m in ("pesq", "stoi", "si_sdr")}
            print(f"{kind:<8} {name:<8} {mean['pesq']:>6.2f} {mean['stoi']:>6.3f} "
                  f"{mean['si_sdr']:>7.2f}")  # fmt: skip
    print("\nreal-time factor (audio seconds per second of compute, 1 process): "
          + ", ".join(f"{k} {v:.0f}x" for k, v in rtf.items()))  # fmt: skip


if __name__ == "__main__":
    main()
