"""The denoising pipeline: any audio file (or array) in, the same length and sample rate
out, denoised at the model's 16 kHz. Long files go through in overlapping chunks,
cross-faded, so memory stays bounded."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aigc.errors import DataError, RequestError
from aigc.pipelines.base import AudioOutput, Pipeline

MODEL_RATE = 16000
CHUNK_SECONDS = 10.0
OVERLAP_SECONDS = 1.0
MAX_SECONDS = 3600.0  # of one request


class DenoisePipeline(Pipeline):
    """A trained speech denoiser: ``denoise`` a file, bytes or array; ``evaluate``."""

    kind = "denoise"
    verbs = frozenset({"denoise"})

    def denoise(
        self,
        audio: Any,
        sample_rate: int | None = None,
        max_seconds: float = MAX_SECONDS,
    ) -> AudioOutput:
        """The denoised ``audio``: a path, the bytes of an audio file (WAV, FLAC, OGG,
        MP3), or a float array (T,) or (C, T) with its ``sample_rate``. Channels are
        averaged; the result has the input's sample rate and length. RequestError for
        what is not audio, silence, or more than ``max_seconds``."""
        wave, rate = read_input(audio, sample_rate, max_seconds)
        if not np.any(wave):
            raise RequestError("the audio is silent: there is nothing to denoise")
        from aigc.data.audio import resample

        x = resample(wave, rate, MODEL_RATE) if rate != MODEL_RATE else wave
        y = self.enhance(x)
        if rate != MODEL_RATE:
            y = resample(y, MODEL_RATE, rate)
        y = np.pad(y[: len(wave)], (0, max(0, len(wave) - len(y))))
        return self.postprocess(AudioOutput([np.clip(y, -1, 1).astype(np.float32)], rate))

    def format_eval(self, result: dict[str, Any]) -> str:
        """A row per noise kind: SI-SDR, STOI and PESQ, noisy -> denoised."""
        from aigc.data.noisy_speech import NOISES

        metrics = [m for m in ("si_sdr", "stoi", "pesq") if m in result]
        lines = [f"{self.run.path} at step {result['step']}: noisy -> denoised, held-out mixtures",
                 f"  {'noise':<8}" + "".join(f"{m:>18}" for m in metrics)]  # fmt: skip
        for kind in (*NOISES, None):
            sfx = f"/{kind}" if kind else ""
            if f"si_sdr{sfx}" not in result:
                continue
            cells = "".join(f"{result[f'{m}_noisy{sfx}']:>8.2f} -> {result[f'{m}{sfx}']:<6.2f}"
                            for m in metrics)  # fmt: skip
            lines.append(f"  {kind or 'all':<8}{cells}")
        return "\n".join(lines)

    def enhance(self, wave: np.ndarray) -> np.ndarray:
        """The model on a 16 kHz waveform (T,) of any length: chunks of CHUNK_SECONDS
        overlapping by OVERLAP_SECONDS, cross-faded linearly (the fades sum to one)."""
        chunk = round(CHUNK_SECONDS * MODEL_RATE)
        overlap = round(OVERLAP_SECONDS * MODEL_RATE)
        if len(wave) <= chunk:
            return self._run(wave)
        hop = chunk - overlap
        starts = list(range(0, len(wave) - overlap, hop))
        out = np.zeros(len(wave), np.float64)
        fade = np.linspace(0.0, 1.0, overlap, endpoint=False) + 0.5 / overlap
        for k, s in enumerate(starts):
            seg = self._run(wave[s : s + chunk]).astype(np.float64)
            weight = np.ones(len(seg))
            if k > 0:
                weight[:overlap] = fade[: len(seg)]
            if k < len(starts) - 1:
                weight[-overlap:] = 1.0 - fade
            out[s : s + len(seg)] += seg * weight
        return out.astype(np.float32)

    def _run(self, wave: np.ndarray) -> np.ndarray:
        n_fft = self.config.model.n_fft
        padded = np.pad(wave, (0, max(0, n_fft - len(wave))))
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(padded, np.float32))[None].to(self.device)
            y = self.model.enhance(x)[0].float().cpu().numpy()
        return y[: len(wave)]


def read_input(audio: Any, sample_rate: int | None, max_seconds: float) -> tuple[np.ndarray, int]:
    """(mono float32 (T,), rate) of a path, audio-file bytes or an array; RequestError
    saying what is wrong."""
    from aigc.data.audio import read_audio

    if isinstance(audio, str | os.PathLike):
        if sample_rate is not None:
            raise RequestError("sample_rate is for arrays; a file says its own")
        try:
            return read_audio(Path(audio), max_seconds=max_seconds)
        except DataError as e:
            raise RequestError(str(e)) from None
    if isinstance(audio, bytes | bytearray):
        import soundfile as sf

        try:
            data, rate = sf.read(io.BytesIO(bytes(audio)), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, TypeError) as e:
            raise RequestError(f"the upload is not audio soundfile can read ({e})") from None
        wave = data.T.mean(axis=0)
    else:
        if sample_rate is None:
            raise RequestError("an array needs its sample_rate")
        wave, rate = np.asarray(audio, dtype=np.float32), sample_rate
        if wave.ndim == 2:
            wave = wave.mean(axis=0)
        if wave.ndim != 1:
            raise RequestError(f"an array must be (T,) or (C, T), got shape {wave.shape}")
    if isinstance(rate, bool) or not isinstance(rate, int | np.integer) or rate <= 0:
        raise RequestError(f"the sample rate is {rate}: it must be a positive integer")
    if len(wave) == 0:
        raise RequestError("the audio holds no samples")
    if len(wave) > max_seconds * rate:
        raise RequestError(f"{len(wave) / rate:.1f} s is longer than the limit of "
                           f"{max_seconds:g} s")  # fmt: skip
    if not np.isfinite(wave).all():
        raise RequestError("the samples hold NaN or infinite values")
    return np.ascontiguousarray(wave, np.float32), int(rate)
