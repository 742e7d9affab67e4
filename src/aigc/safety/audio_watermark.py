"""A keyed invisible watermark for generated audio (16 kHz speech, one-second spoken
digits, rendered chorales), and its detector: spread spectrum (Cox et al., "Secure
spread spectrum watermarking for multimedia", IEEE TIP 1997) on the short-time
log-magnitude spectrum, as image_watermark does on luma.

Marking. The sound is taken to the key's reference rate (16 kHz) and cut into frames of
512 samples every 256 (Hann). Between 500 and 3,500 Hz (the band speech fills and that a
telephone, MP3 or an 8 kHz resampling keeps) the bins are grouped in bands of 4; the key
seeds (SHA-256 -> NumPy's PCG64) a (BANDS, PERIOD) grid of random signs, one per band and
pair of frames, repeating every PERIOD pairs (about a second). Each bin's magnitude is
multiplied by ``exp(+a)`` or ``exp(-a)`` by its sign, phases kept, and the sound is put
back together (inverse STFT) and taken back to its own rate. A change of the magnitude by
a factor follows the sound's own loudness in each band and frame, so it hides under it
(silence stays silent) and a gain does not touch it. ``a`` starts at ``strength`` (0.08:
8%); as image_watermark does (informed embedding, Cox, Miller and McKellop, Proc. IEEE
1999), the embedder raises it in steps of 1.5, at most to MAX_BOOST times ``strength``,
until the detector scores TARGET_Z on the marked sound: short or hard clips get a
stronger mark, long sentences keep the base one. On flite's sentences the marked sound is
24 dB from the unmarked on average (16 dB at worst; benchmarks/audio_watermark.py): a
spectral change of 0.7 dB (8%) at most, not an added noise floor.

Detecting. The log-magnitude (floored at 1e-3 of the sound's RMS, so that silence is
flat) is summed over each band of each pair of frames, less the mean of the 3 x 3 cells
around it (the sound's own spectral envelope is smooth from cell to cell, the signs are
not), and summed again over the cells the period repeats: one weight ``G_c`` per sign
``P_c``, and the score

    z = sum_c P_c G_c / sqrt(sum_c G_c^2).

The search covers where the sound starts (a trimmed start, a sound cut out of a longer
one): OFFSETS sub-frame offsets of the framing times the 2 x PERIOD frame shifts of the
pattern, ``tests`` alignments in all.

Honest p-values. For a sound made without the key, the key's signs are fair coins
independent of it, so ``z`` is a sum of random signs with weights of unit norm; Bentkus
and Dzindzalieta ("A tight Gaussian bound for weighted sums of Rademacher random
variables", Bernoulli 2015) bound its tail by 3.178 times the Gaussian's, and the union
bound multiplies by ``tests`` (image_watermark.p_bound). The verdict "marked" at ``fpr``
1e-3 is wrong at most once in a thousand unmarked sounds; tests and
benchmarks/audio_watermark.py measure the rate on unmarked speech with fixed keys too.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from aigc.errors import RequestError
from aigc.safety.image_watermark import check_key, p_bound, z_threshold

RATE = 16000  # Hz: the reference rate the pattern lives at
N_FFT = 512  # samples per frame (32 ms)
HOP = 256  # samples between frames
LOW_HZ, HIGH_HZ = 500.0, 3500.0  # the band that carries the mark
BAND_BINS = 4  # STFT bins per sign (125 Hz)
FRAMES_PER_SIGN = 2  # frames per sign (a sign spans 48 ms of sound)
PERIOD = 32  # sign columns before the pattern repeats (64 frames, about 1 s)
OFFSETS = 4  # sub-frame offsets the detector tries (every HOP / OFFSETS samples)
DEFAULT_STRENGTH = 0.08  # natural-log change of the magnitude (8%)
MAX_BOOST = 2.5  # informed embedding raises the strength to at most this times it
TARGET_Z = 8.0  # ... until the detector scores this on the marked sound
FLOOR = 1e-3  # magnitudes are floored at this times the sound's RMS before the log
ENERGY_FLOOR = 1e-3  # added to the local energy of the residual
FPR = 1e-3  # the false-positive rate a verdict is made at
MIN_SECONDS = 0.5  # shorter sounds get no verdict

_BIN_LO = math.ceil(LOW_HZ * N_FFT / RATE)  # 16
BANDS = int((HIGH_HZ * N_FFT / RATE - _BIN_LO) // BAND_BINS)  # 24
_BIN_HI = _BIN_LO + BANDS * BAND_BINS


@dataclass(frozen=True)
class AudioWatermarkVerdict:
    """What the detector found in one sound for one key.

    z: the largest score over the alignments searched; p_value: its significance for a
    sound made without the key, a bound corrected for the ``tests`` alignments searched;
    marked: ``p_value <= fpr``; threshold: the z that ``fpr`` needs; offset (samples at
    16 kHz) and frame_shift: the alignment of the best score; seconds: the sound's length."""

    z: float
    p_value: float
    marked: bool
    threshold: float
    fpr: float
    tests: int
    offset: int
    frame_shift: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"z": self.z, "p_value": self.p_value, "marked": self.marked,
                "threshold": self.threshold, "fpr": self.fpr, "tests": self.tests,
                "offset": self.offset, "frame_shift": self.frame_shift,
                "seconds": self.seconds}  # fmt: skip


def key_signs(key: str) -> np.ndarray:
    """The key's (BANDS, PERIOD) pattern of +1/-1 (float64), the same on every machine."""
    check_key(key)
    digest = hashlib.sha256(b"aigc audio watermark v1\0" + key.encode("utf-8")).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))
    return rng.integers(0, 2, size=(BANDS, PERIOD)).astype(np.float64) * 2.0 - 1.0


def _wave(wave: Any, sample_rate: Any, what: str = "sound") -> np.ndarray:
    """A mono float wave at RATE (resampled when ``sample_rate`` differs); RequestError
    naming what is wrong."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer) or not (
        1000 <= sample_rate <= 384000
    ):  # fmt: skip
        raise RequestError(f"sample_rate={sample_rate!r} must be an integer in [1000, 384000] Hz")
    if hasattr(wave, "detach"):  # a torch tensor
        wave = wave.detach().cpu().numpy()
    if not isinstance(wave, np.ndarray) or wave.dtype.kind != "f":
        raise RequestError(f"the {what} must be a float array of samples, not "
                           f"{type(wave).__name__} {getattr(wave, 'dtype', '')}".rstrip())  # fmt: skip
    if wave.ndim != 1:
        raise RequestError(f"the {what} has shape {wave.shape}; expected mono samples (T,)")
    if not np.isfinite(wave).all():
        raise RequestError(f"the {what} has samples that are NaN or infinite")
    x = wave.astype(np.float64)
    if sample_rate != RATE:
        from aigc.data.audio import resample

        x = resample(x, int(sample_rate), RATE).astype(np.float64)
    return x


def _stft(x: np.ndarray) -> np.ndarray:
    """(frames, N_FFT // 2 + 1) complex STFT of frames starting at 0, HOP, 2 HOP, ...
    (the last partial frame padded with zeros), Hann window."""
    frames = max(1, -(-(len(x) - N_FFT) // HOP) + 1) if len(x) > N_FFT else 1
    padded = np.zeros((frames - 1) * HOP + N_FFT)
    padded[: len(x)] = x
    idx = np.arange(frames)[:, None] * HOP + np.arange(N_FFT)[None, :]
    return np.fft.rfft(padded[idx] * np.hanning(N_FFT + 1)[:-1], axis=1)


def _istft(spec: np.ndarray, length: int) -> np.ndarray:
    """Weighted overlap-add inverse of ``_stft`` (least squares, Griffin and Lim 1984)."""
    window = np.hanning(N_FFT + 1)[:-1]
    frames = np.fft.irfft(spec, n=N_FFT, axis=1) * window
    total = (len(spec) - 1) * HOP + N_FFT
    out, norm = np.zeros(total), np.zeros(total)
    for i, frame in enumerate(frames):
        out[i * HOP : i * HOP + N_FFT] += frame
        norm[i * HOP : i * HOP + N_FFT] += window * window
    return (out / np.maximum(norm, 1e-8))[:length]


def pattern_gain(key: str, frames: int) -> np.ndarray:
    """(frames, BANDS * BAND_BINS) signs of the marking for frames 0, 1, ... (frame i
    starting at sample i * HOP of the sound at RATE)."""
    signs = key_signs(key)
    cols = (np.arange(frames) // FRAMES_PER_SIGN) % PERIOD
    return np.repeat(signs[:, cols].T, BAND_BINS, axis=1)


def mark_audio(
    wave: np.ndarray, sample_rate: int, key: str, strength: float = DEFAULT_STRENGTH
) -> np.ndarray:
    """``wave`` (mono float samples, (T,)) at ``sample_rate`` Hz with the key's inaudible
    watermark; the same length, rate and dtype come back (float32 for float32).
    ``strength``: the natural-log change of the magnitude in the marked band (0.08: 8%), raised up to MAX_BOOST times for short clips (module doc)."""
    check_key(key)
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not (
        0 < strength <= 1
    ):  # fmt: skip
        raise RequestError(f"strength={strength!r} must be a number in (0, 1] (log magnitude)")
    x = _wave(wave, sample_rate)
    if len(x) < N_FFT:
        raise RequestError(f"the sound has {len(wave)} samples; the watermark needs at "
                           f"least {N_FFT / RATE:.3f} s")  # fmt: skip
    # Frames start HOP before the sound so that its first samples are covered twice
    padded = np.concatenate([np.zeros(N_FFT - HOP), x, np.zeros(N_FFT)])
    spec = _stft(padded)
    signs = pattern_gain(key, len(spec))
    amplitude = float(strength)
    for _ in range(_MAX_STEPS):
        marked = spec.copy()
        marked[:, _BIN_LO:_BIN_HI] *= np.exp(amplitude * signs)
        y = _istft(marked, len(padded))[N_FFT - HOP : N_FFT - HOP + len(x)]
        if amplitude >= MAX_BOOST * strength or len(x) < MIN_SECONDS * RATE:
            break
        if _aligned_z(y, key) >= TARGET_Z:
            break
        amplitude = min(amplitude * 1.5, MAX_BOOST * strength)
    delta = y - x  # the mark alone, taken back to the sound's own rate
    if sample_rate != RATE:
        from aigc.data.audio import resample

        delta = resample(delta, RATE, int(sample_rate))
        delta = np.resize(delta, len(wave)) if len(delta) != len(wave) else delta
    return (wave.astype(np.float64) + delta).astype(wave.dtype)


_MAX_STEPS = 1 + math.ceil(math.log(MAX_BOOST) / math.log(1.5))


def _aligned_z(x: np.ndarray, key: str) -> float:
    """The score at the marking's own alignment (offset 0, the first frame HOP before
    the sound)."""
    rms = math.sqrt(float((x * x).mean()))
    folded = _folded(_band_cells(x, 0, FLOOR * rms if rms > 0 else 1e-12), 1)
    norm = math.sqrt(float((folded * folded).sum()))
    return float((key_signs(key) * folded).sum()) / norm if norm > 0 else 0.0


def _band_cells(x: np.ndarray, offset: int, floor: float) -> np.ndarray:
    """(frames, BANDS) log-magnitude of the marked band summed over each band's bins, for
    frames starting at ``offset``, ``offset + HOP``, ..."""
    spec = _stft(x[offset:])[:, _BIN_LO:_BIN_HI]
    logmag = np.log(np.abs(spec) + floor)
    cells = logmag.reshape(len(logmag), BANDS, BAND_BINS).sum(axis=2)
    return cells


def _folded(cells: np.ndarray, parity: int) -> np.ndarray:
    """(BANDS, PERIOD) weights: frames paired from ``parity`` (a frame before the first
    counts nothing), each pair's cells less the mean of the 3 x 3 around them, and summed
    over the columns the period repeats (column m of the sound at column m of the grid)."""
    from scipy import ndimage

    frames = np.concatenate([np.zeros((parity, BANDS)), cells])
    frames = np.concatenate([frames, np.zeros((len(frames) % 2, BANDS))])
    pairs = frames.reshape(-1, FRAMES_PER_SIGN, BANDS).sum(axis=1).T  # (BANDS, columns)
    pairs = pairs - ndimage.uniform_filter(pairs, 3, mode="reflect")
    # onsets and silences leave large residuals the mark cannot outshout: weigh them less
    energy = ndimage.uniform_filter(pairs * pairs, (3, 5), mode="reflect")
    pairs = pairs / np.sqrt(energy + ENERGY_FLOOR)
    folded = np.zeros((BANDS, PERIOD))
    np.add.at(folded, (slice(None), np.arange(pairs.shape[1]) % PERIOD), pairs)
    return folded


def tests_searched() -> int:
    """How many alignments the detector tries (the union bound's factor)."""
    return OFFSETS * FRAMES_PER_SIGN * PERIOD


def detect_audio(
    wave: np.ndarray, sample_rate: int, key: str, fpr: float = FPR
) -> AudioWatermarkVerdict:
    """Is ``wave`` (mono float samples at ``sample_rate`` Hz, at least MIN_SECONDS long)
    marked with ``key``? The verdict holds the best score over the alignments searched
    and its p-value (a bound, corrected for the search; see the module's docstring)."""
    check_key(key)
    if isinstance(fpr, bool) or not isinstance(fpr, int | float) or not 0 < fpr < 1:
        raise RequestError(f"fpr={fpr!r} must be a number in (0, 1)")
    x = _wave(wave, sample_rate)
    seconds = len(x) / RATE
    if seconds < MIN_SECONDS:
        raise RequestError(f"the sound is {seconds:.2f} s long; the detector needs at least "
                           f"{MIN_SECONDS} s for a verdict")  # fmt: skip
    signs = key_signs(key)
    rms = math.sqrt(float((x * x).mean()))
    floor = FLOOR * rms if rms > 0 else 1e-12
    best, where = -math.inf, (0, 0)
    step = HOP // OFFSETS
    for o in range(OFFSETS):
        cells = _band_cells(x, o * step, floor)
        for parity in range(FRAMES_PER_SIGN):
            folded = _folded(cells, parity)
            norm = math.sqrt(float((folded * folded).sum()))
            if norm == 0:
                continue
            # roll r: grid column (m + r) % PERIOD under the sound's column m
            scores = np.array([(np.roll(signs, -r, axis=1) * folded).sum()
                               for r in range(PERIOD)]) / norm  # fmt: skip
            r = int(scores.argmax())
            if scores[r] > best:
                best, where = float(scores[r]), (o * step, r * FRAMES_PER_SIGN - parity)
    tests = tests_searched()
    best = best if math.isfinite(best) else 0.0
    p = p_bound(best, tests)
    return AudioWatermarkVerdict(z=best, p_value=p, marked=p <= fpr,
                                 threshold=z_threshold(fpr, tests), fpr=float(fpr),
                                 tests=tests, offset=where[0], frame_shift=where[1],
                                 seconds=seconds)  # fmt: skip


def snr_db(reference: np.ndarray, other: np.ndarray) -> float:
    """Signal-to-noise ratio in dB of ``other`` against ``reference`` (one shape): the
    reference's energy over that of their difference (inf if equal)."""
    a, b = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"snr of sounds of shapes {a.shape} and {b.shape}")
    noise = float(((a - b) ** 2).sum())
    return math.inf if noise == 0 else 10.0 * math.log10(float((a * a).sum()) / noise)


def mark_output(output: Any, key: str, strength: float = DEFAULT_STRENGTH) -> Any:
    """An AudioOutput (aigc.pipelines.base) with each of its waveforms marked with ``key``
    (clips shorter than one frame, 32 ms, are left as they are)."""
    from dataclasses import replace

    check_key(key)
    waves = [mark_audio(np.asarray(w, dtype=np.float32), int(output.sample_rate), key, strength)
             if len(w) >= N_FFT * output.sample_rate / RATE else w
             for w in output.waveforms]  # fmt: skip
    return replace(output, waveforms=waves)
