"""Speech made on the machine by Debian's ``flite`` synthesiser: the embedded spoken
digits (SC09-like: one-second clips of "zero" … "nine").

Each clip is one digit word in one of flite's 16 kHz voices (awb, kal16, rms, slt) at
one speaking rate (``duration_stretch``) and one pitch. Pitch is a factor of the
voice's own mean F0, given to flite as ``int_f0_target_mean``; the rms voice ignores
that setting, so its pitch is moved by playing the clip faster or slower (resampling,
which also changes its length, as a speed perturbation does). The speech is centred
in one second and peak-normalised; the grid (10 digits x 4 voices x 5 rates x 5
pitches = 1,000 clips) is deterministic, and the split is by voice so that held-out
speakers are unseen in training.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aigc.data.audio import peak_normalise, read_audio, resample
from aigc.errors import DataError

SAMPLE_RATE = 16000
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOICES = ("awb", "kal16", "rms", "slt")
RATES = (0.8, 0.9, 1.0, 1.12, 1.25)  # duration_stretch: above 1 is slower
PITCHES = (0.84, 0.92, 1.0, 1.09, 1.19)  # factors of the voice's mean F0
# each voice's mean F0 in Hz near flite's own, so that factor 1 keeps its natural pitch
VOICE_F0 = {"awb": 140.0, "kal16": 100.0, "rms": 85.0, "slt": 170.0}
PITCH_BY_RESAMPLING = frozenset({"rms"})
FLITE_INSTALL = "sudo apt-get install flite"


def flite_binary() -> str:
    """The path of ``flite``; DataError with the install command when it is missing."""
    path = shutil.which("flite")
    if path is None:
        raise DataError(f"the flite speech synthesiser is not installed: run `{FLITE_INSTALL}`"
                        " (or `make test`, which installs it)")  # fmt: skip
    return path


def synthesise(text: str, voice: str = "slt", rate: float = 1.0, pitch: float = 1.0) -> np.ndarray:
    """``text`` spoken by flite's ``voice`` at ``rate`` (duration stretch) and ``pitch``
    (factor of the voice's mean F0): float32 samples at 16 kHz, as flite makes them."""
    if voice not in VOICES:
        raise DataError(f"voice {voice!r}: flite's 16 kHz voices are {', '.join(VOICES)}")
    if not 0.25 <= rate <= 4.0 or not 0.5 <= pitch <= 2.0:
        raise DataError(f"rate {rate} must be in [0.25, 4] and pitch {pitch} in [0.5, 2]")
    args = [flite_binary(), "-voice", voice, "--setf", f"duration_stretch={rate:g}"]
    if voice not in PITCH_BY_RESAMPLING:
        args += ["--setf", f"int_f0_target_mean={VOICE_F0[voice] * pitch:.1f}"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speech.wav"
        done = subprocess.run([*args, "-t", text, "-o", str(out)], capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        if done.returncode != 0 or not out.exists():
            raise DataError(f"flite failed on {text!r} ({voice}): {done.stderr.strip()[:200]}")
        wave, _ = read_audio(out, SAMPLE_RATE)
    if voice in PITCH_BY_RESAMPLING and pitch != 1.0:
        # played `pitch` times faster: every frequency times pitch, the length / pitch
        wave = resample(wave, round(SAMPLE_RATE * pitch), SAMPLE_RATE)
    return wave


def trim_silence(wave: np.ndarray, threshold: float = 0.01, margin: int = 160) -> np.ndarray:
    """``wave`` without the leading and trailing samples quieter than ``threshold`` of
    its peak, keeping ``margin`` samples (10 ms at 16 kHz) either side."""
    loud = np.nonzero(np.abs(wave) > threshold * max(float(np.abs(wave).max()), 1e-12))[0]
    if len(loud) == 0:
        return wave[:0]
    return wave[max(0, loud[0] - margin) : loud[-1] + 1 + margin]


def fit_length(wave: np.ndarray, samples: int) -> np.ndarray:
    """``wave`` centred in ``samples`` samples: zero-padded either side, or its middle
    kept when it is longer."""
    if len(wave) >= samples:
        start = (len(wave) - samples) // 2
        return wave[start : start + samples]
    out = np.zeros(samples, dtype=np.float32)
    start = (samples - len(wave)) // 2
    out[start : start + len(wave)] = wave
    return out


@dataclass(frozen=True)
class SpokenDigits:
    """The embedded spoken digits: ``waves`` (N, 16000) float32; ``digit``, ``voice``,
    ``rate`` and ``pitch`` (N,) int indices into DIGITS, VOICES and the rates and pitches
    the set was made with (RATES and PITCHES by default)."""

    waves: np.ndarray
    digit: np.ndarray
    voice: np.ndarray
    rate: np.ndarray
    pitch: np.ndarray

    def __len__(self) -> int:
        return len(self.waves)

    def select(self, rows: np.ndarray) -> SpokenDigits:
        return SpokenDigits(self.waves[rows], self.digit[rows], self.voice[rows],
                            self.rate[rows], self.pitch[rows])  # fmt: skip

    def split(
        self, heldout_voices: tuple[str, ...] = ("slt",)
    ) -> tuple[SpokenDigits, SpokenDigits]:
        """(train, held-out): the held-out part is every clip of ``heldout_voices``."""
        for v in heldout_voices:
            if v not in VOICES:
                raise DataError(f"held-out voice {v!r}: the voices are {', '.join(VOICES)}")
        held = np.isin(self.voice, [VOICES.index(v) for v in heldout_voices])
        return self.select(np.nonzero(~held)[0]), self.select(np.nonzero(held)[0])


def spoken_digits(
    voices: tuple[str, ...] = VOICES,
    rates: tuple[float, ...] = RATES,
    pitches: tuple[float, ...] = PITCHES,
    seconds: float = 1.0,
) -> SpokenDigits:
    """Every digit in every voice, rate and pitch (digit-major order), each clip
    trimmed of silence, centred in ``seconds`` and peak-normalised to 0.9. About a
    millisecond of flite per clip: the whole grid takes a few seconds."""
    samples = round(seconds * SAMPLE_RATE)
    grid = [(d, v, r_i, p_i) for d in range(len(DIGITS)) for v in voices
            for r_i in range(len(rates)) for p_i in range(len(pitches))]  # fmt: skip

    def clip(row: tuple[int, str, int, int]) -> np.ndarray:
        d, v, r_i, p_i = row
        spoken = trim_silence(synthesise(DIGITS[d], v, rates[r_i], pitches[p_i]))
        return peak_normalise(fit_length(spoken, samples))

    # flite is a process per clip: run as many at once as there are cores
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        waves = list(pool.map(clip, grid))
    labels = np.asarray([(d, VOICES.index(v), r_i, p_i) for d, v, r_i, p_i in grid],
                        dtype=np.int64).reshape(-1, 4)  # fmt: skip
    return SpokenDigits(np.stack(waves).astype(np.float32), *labels.T)
