"""Audio as arrays: reading and writing real files, resampling, and log-mel spectrograms
with their way back to a waveform.

Files go through ``soundfile`` (libsndfile: WAV, FLAC, OGG/Vorbis, MP3) and sample
rates through ``soxr`` (the SoX resampler, band-limited and fast). Spectrograms use
``torch.stft`` and a mel filterbank of our own (Slaney's scale and area normalisation,
as librosa's and HTK-free torchaudio's default), so nothing here needs torchaudio. A
waveform is float32 in [-1, 1], shaped (T,) for one channel or (C, T) for several.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aigc.errors import DataError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
# what soundfile writes for each suffix: 16-bit PCM keeps files small and exact
# enough for 16 kHz speech; Vorbis and MP3 are lossy by design
_WRITE_FORMATS = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
    ".mp3": ("MP3", "MPEG_LAYER_III"),
}


def read_audio(
    path: str | os.PathLike,
    sample_rate: int | None = None,
    mono: bool = True,
    max_seconds: float | None = None,
) -> tuple[np.ndarray, int]:
    """The samples of an audio file as float32 in [-1, 1] and its sample rate:
    (T,) when ``mono`` (channels averaged), else (C, T). With ``sample_rate`` the
    samples are resampled to it. DataError naming the file when it is not audio,
    is empty, has no sample rate, or is longer than ``max_seconds``."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such audio file")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise DataError(f"{path}: not an audio file soundfile can read ({e})") from None
    if info.samplerate <= 0:
        raise DataError(f"{path}: the file declares a sample rate of {info.samplerate}")
    if info.frames == 0:
        raise DataError(f"{path}: the file holds no samples")
    if max_seconds is not None and info.frames > max_seconds * info.samplerate:
        raise DataError(
            f"{path}: {info.frames / info.samplerate:.1f} s is longer than the limit of "
            f"{max_seconds:g} s"
        )
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise DataError(f"{path}: the audio cannot be decoded ({e})") from None
    wave = data.T  # (C, T)
    if not np.isfinite(wave).all():
        raise DataError(f"{path}: the samples hold NaN or infinite values")
    if mono:
        wave = wave.mean(axis=0)
    if sample_rate is not None and sample_rate != rate:
        wave, rate = resample(wave, rate, sample_rate), sample_rate
    return np.ascontiguousarray(wave, dtype=np.float32), int(rate)


def write_audio(path: str | os.PathLike, wave: np.ndarray | torch.Tensor, sample_rate: int) -> Path:
    """Write ``wave`` ((T,) or (C, T), float in [-1, 1]; values beyond are clipped) to
    ``path`` in the format its suffix names (.wav, .flac, .ogg, .mp3), through a
    temporary file so that a crash never leaves half a file. Returns the path."""
    import soundfile as sf

    path = Path(path)
    fmt = _WRITE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: cannot write audio as {path.suffix or 'a file without a suffix'}; "
            f"use one of {', '.join(AUDIO_SUFFIXES)}"
        )
    if sample_rate <= 0:
        raise DataError(f"{path}: sample rate {sample_rate} must be positive")
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().float().cpu().numpy()
    wave = np.clip(np.nan_to_num(np.asarray(wave, dtype=np.float32)), -1.0, 1.0)
    if wave.ndim not in (1, 2):
        raise ValueError(f"a waveform is (T,) or (C, T), got shape {wave.shape}")
    tmp = path.with_name(f".{path.name}.tmp")
    sf.write(str(tmp), wave.T if wave.ndim == 2 else wave, sample_rate, format=fmt[0],
             subtype=fmt[1])  # fmt: skip
    os.replace(tmp, path)
    return path


def resample(wave: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """``wave`` ((T,) or (C, T)) from ``rate_in`` to ``rate_out`` Hz with soxr's high
    quality band-limited filter; the length becomes round(T * rate_out / rate_in)."""
    import soxr

    if rate_in <= 0 or rate_out <= 0:
        raise DataError(f"cannot resample from {rate_in} Hz to {rate_out} Hz")
    if rate_in == rate_out:
        return np.asarray(wave, dtype=np.float32)
    wave = np.asarray(wave, dtype=np.float32)
    out = soxr.resample(wave.T if wave.ndim == 2 else wave, rate_in, rate_out, quality="HQ")
    return np.ascontiguousarray(out.T if wave.ndim == 2 else out, dtype=np.float32)


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    """Slaney's mel scale (Auditory Toolbox): linear below 1 kHz (3 mels per 200 Hz),
    logarithmic above (27 mels per factor 6.4)."""
    f = np.asarray(f, dtype=np.float64)
    lin = f / (200.0 / 3)
    log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (math.log(6.4) / 27.0)
    return np.where(f >= 1000.0, log, lin)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    """The inverse of :func:`hz_to_mel`."""
    m = np.asarray(m, dtype=np.float64)
    lin = m * (200.0 / 3)
    log = 1000.0 * np.exp((m - 15.0) * (math.log(6.4) / 27.0))
    return np.where(m >= 15.0, log, lin)


def mel_filterbank(
    n_fft: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None
) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters with centres equally spaced on the
    mel scale between ``f_min`` and ``f_max`` (default Nyquist), each scaled to unit
    area in Hz (Slaney's normalisation: 2 / bandwidth), so a louder band is not
    mistaken for a wider one."""
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= {sample_rate / 2}, got {f_min}, {f_max}")
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None] - lower) / (centre - lower)
    falling = (upper - freqs[None]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (upper - lower))
    return torch.from_numpy(weights.astype(np.float32))


@dataclass(frozen=True)
class MelSpec:
    """A log-mel spectrogram and its way back: frames of ``n_fft`` samples (Hann
    window) every ``hop`` samples, ``n_mels`` bands between ``f_min`` and ``f_max``,
    magnitudes (power 1) floored at ``floor`` before the natural log. The defaults
    suit 16 kHz speech: 64 ms windows, 16 ms hop, 64 bands up to 8 kHz."""

    sample_rate: int = 16000
    n_fft: int = 1024
    hop: int = 256
    n_mels: int = 64
    f_min: float = 0.0
    f_max: float | None = None
    floor: float = 1e-5

    def frames(self, samples: int) -> int:
        """Frames :meth:`__call__` makes of ``samples`` samples (centred frames)."""
        return samples // self.hop + 1

    def filterbank(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return mel_filterbank(self.n_fft, self.n_mels, self.sample_rate, self.f_min,
                              self.f_max).to(device)  # fmt: skip

    def magnitude(self, wave: torch.Tensor) -> torch.Tensor:
        """(..., T) waveform -> (..., n_fft // 2 + 1, frames) STFT magnitude."""
        window = torch.hann_window(self.n_fft, device=wave.device)
        flat = wave.reshape(-1, wave.size(-1)).float()
        spec = torch.stft(flat, self.n_fft, self.hop, window=window, center=True,
                          pad_mode="reflect", return_complex=True)  # fmt: skip
        return spec.abs().reshape(*wave.shape[:-1], *spec.shape[-2:])

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        """(..., T) waveform -> (..., n_mels, frames) natural-log mel magnitudes."""
        mel = torch.einsum("mf,...ft->...mt", self.filterbank(wave.device), self.magnitude(wave))
        return mel.clamp_min(self.floor).log()

    def to_linear(self, log_mel: torch.Tensor) -> torch.Tensor:
        """(..., n_mels, frames) log-mel -> (..., n_fft // 2 + 1, frames) non-negative
        magnitudes whose mel projection is closest to it (least squares through the
        filterbank's pseudo-inverse, negatives set to zero)."""
        fb = self.filterbank(log_mel.device).double()
        inverse = torch.linalg.pinv(fb).float()  # (F, n_mels)
        lin = torch.einsum("fm,...mt->...ft", inverse, log_mel.exp())
        return lin.clamp_min(0.0)

    def to_wave(
        self, log_mel: torch.Tensor, samples: int, iters: int = 64, seed: int = 0
    ) -> torch.Tensor:
        """(..., n_mels, frames) log-mel -> (..., samples) waveform by Griffin-Lim."""
        return griffin_lim(self.to_linear(log_mel), self.n_fft, self.hop, samples, iters, seed)


def griffin_lim(
    magnitude: torch.Tensor,
    n_fft: int,
    hop: int,
    samples: int,
    iters: int = 64,
    seed: int = 0,
    momentum: float = 0.99,
) -> torch.Tensor:
    """A waveform (..., samples) whose STFT magnitude approaches ``magnitude``
    (..., n_fft // 2 + 1, frames): Griffin and Lim (1984) alternate projections,
    accelerated by Perraudin et al. (2013) with ``momentum`` (0 gives the original
    algorithm). Phases start from seeded random values."""
    shape = magnitude.shape
    mag = magnitude.reshape(-1, *shape[-2:]).float()
    window = torch.hann_window(n_fft, device=mag.device)
    g = torch.Generator().manual_seed(seed)
    phase = torch.rand(mag.shape, generator=g).to(mag.device) * (2 * math.pi)
    spec = torch.polar(mag, phase)
    previous = torch.zeros_like(spec)

    def to_wave(s: torch.Tensor) -> torch.Tensor:
        return torch.istft(s, n_fft, hop, window=window, center=True, length=samples)

    for _ in range(iters):
        wave = to_wave(spec)
        rebuilt = torch.stft(wave, n_fft, hop, window=window, center=True, pad_mode="reflect",
                             return_complex=True)  # fmt: skip
        # fast Griffin-Lim: step past the projection by momentum x the last change
        accelerated = rebuilt - (momentum / (1 + momentum)) * previous
        previous = rebuilt
        spec = mag * torch.exp(1j * torch.angle(accelerated))
    return to_wave(spec).reshape(*shape[:-2], samples)


def peak_normalise(wave: np.ndarray, peak: float = 0.9) -> np.ndarray:
    """``wave`` scaled so that its largest magnitude is ``peak`` (silence is left as it is)."""
    top = float(np.abs(wave).max()) if wave.size else 0.0
    return wave if top == 0.0 else (wave * (peak / top)).astype(np.float32)


def mfcc(log_mel: torch.Tensor | np.ndarray, n: int = 13) -> np.ndarray:
    """(..., n_mels, frames) natural-log mel -> (..., frames, n - 1) cepstra c1..c(n-1)
    (DCT-II, orthonormal, of the log-mel; c0, the loudness, dropped), each coefficient's
    mean over the frames removed (cepstral mean normalisation: a fixed channel or
    microphone colouring is a constant there)."""
    from scipy.fft import dct

    x = log_mel.numpy() if isinstance(log_mel, torch.Tensor) else np.asarray(log_mel)
    c = dct(x.astype(np.float64), type=2, axis=-2, norm="ortho")[..., 1:n, :]
    c = np.swapaxes(c, -1, -2)
    return c - c.mean(axis=-2, keepdims=True)


def dtw_path(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The dynamic-time-warping alignment of feature sequences x (N, D) and y (M, D):
    (L, 2) index pairs from (0, 0) to (N - 1, M - 1), each step (1, 0), (0, 1) or (1, 1),
    minimising the summed Euclidean distances of the paired frames (Sakoe and Chiba
    1978, symmetric steps without slope limits). The cumulative cost is filled one
    anti-diagonal at a time, so each step of the loop is a vector operation."""
    n, m = len(x), len(y)
    if n == 0 or m == 0:
        raise ValueError("dtw_path needs two non-empty sequences")
    sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    cost = np.sqrt(np.maximum(sq, 0.0))
    total = np.full((n + 1, m + 1), np.inf)  # total[i + 1, j + 1]: best cost ending at (i, j)
    total[0, 0] = 0.0
    for d in range(n + m - 1):  # the cells with i + j = d
        i = np.arange(max(0, d - m + 1), min(n, d + 1))
        j = d - i
        best = np.minimum(np.minimum(total[i, j], total[i, j + 1]), total[i + 1, j])
        total[i + 1, j + 1] = cost[i, j] + best
    path = [(n - 1, m - 1)]
    i, j = n - 1, m - 1
    while i > 0 or j > 0:  # back along the cheapest predecessor; ties prefer the diagonal
        steps = ((total[i, j], i - 1, j - 1), (total[i, j + 1], i - 1, j),
                 (total[i + 1, j], i, j - 1))  # fmt: skip
        _, i, j = min(steps, key=lambda s: s[0])
        path.append((i, j))
    return np.asarray(path[::-1], dtype=np.int64)
