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
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from aigc.data.audio import MelSpec, peak_normalise, read_audio, resample
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
    args = _flite_args(voice, rate, pitch)
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


def _flite_args(voice: str, rate: float, pitch: float) -> list[str]:
    args = [flite_binary(), "-voice", voice, "--setf", f"duration_stretch={rate:g}"]
    if voice not in PITCH_BY_RESAMPLING:
        args += ["--setf", f"int_f0_target_mean={VOICE_F0[voice] * pitch:.1f}"]
    return args


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


@lru_cache(maxsize=2)
def spoken_digits(
    voices: tuple[str, ...] = VOICES,
    rates: tuple[float, ...] = RATES,
    pitches: tuple[float, ...] = PITCHES,
    seconds: float = 1.0,
) -> SpokenDigits:
    """Every digit in every voice, rate and pitch (digit-major order), each clip
    trimmed of silence, centred in ``seconds`` and peak-normalised to 0.9. About a
    millisecond of flite per clip: the whole grid takes a few seconds. Cached: callers
    share the arrays and must not write to them."""
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


# --------------------------------------------------------------------------- as pictures

MEL_RANGE = 80 / 20 * np.log(10)  # 80 dB of magnitude kept below each clip's loudest cell
MEL_REFERENCE = 2.0  # the natural-log level a picture's brightest pixel stands for


def mel_picture_spec(size: int) -> MelSpec:
    """The log-mel analysis behind a ``size`` x ``size`` picture of one second at 16 kHz:
    ``size`` mel bands (rows) and ``size`` frames (columns) one hop apart."""
    if size < 8:
        raise DataError(f"a spoken-digit picture needs at least 8 bands and frames, got {size}")
    hop = SAMPLE_RATE // size
    return MelSpec(sample_rate=SAMPLE_RATE, n_fft=max(1024, 2 * hop), hop=hop, n_mels=size)


def waves_to_pictures(waves: np.ndarray, size: int) -> np.ndarray:
    """(N, T) waves -> (N, size, size, 1) uint8 log-mel pictures, low bands at the bottom:
    each clip's loudest cell is 255 and MEL_RANGE below it (and quieter) is 0. A clip
    longer or shorter than a second is centred in one first."""
    import torch

    spec = mel_picture_spec(size)
    waves = np.stack([fit_length(np.asarray(w, np.float32), SAMPLE_RATE) for w in waves])
    mel = spec(torch.from_numpy(waves))[..., :size]  # (N, size, frames=size)
    mel = (mel - mel.amax(dim=(-2, -1), keepdim=True)).clamp_min(-MEL_RANGE)
    level = ((mel / MEL_RANGE + 1) * 255).round().to(torch.uint8).numpy()
    return np.ascontiguousarray(level[:, ::-1, :, None])


def pictures_to_log_mel(pictures: np.ndarray | Any) -> Any:
    """(N, size, size[, 1]) pictures (uint8, or floats in [-1, 1] as a model makes them)
    -> (N, size, size + 1) natural-log mel magnitudes, the frame the picture drops
    repeated at the end so that the frames cover the whole second."""
    import torch

    x = pictures if isinstance(pictures, torch.Tensor) else torch.from_numpy(np.array(pictures))
    if x.dim() == 4:  # (N, H, W, 1) uint8 or (N, 1, H, W) floats
        x = x[..., 0] if x.shape[-1] == 1 and x.dtype == torch.uint8 else x[:, 0]
    unit = x.float() / 255 if x.dtype == torch.uint8 else (x.float().clamp(-1, 1) + 1) / 2
    mel = unit.flip(-2) * MEL_RANGE - MEL_RANGE + MEL_REFERENCE
    return torch.cat([mel, mel[..., -1:]], dim=-1)


def pictures_to_waves(pictures: np.ndarray | Any, iters: int = 64, seed: int = 0) -> np.ndarray:
    """(N, size, size[, 1]) log-mel pictures -> (N, 16000) float32 waves by Griffin-Lim,
    each peak-normalised to 0.9."""
    mel = pictures_to_log_mel(pictures)
    spec = mel_picture_spec(mel.shape[-2])
    waves = spec.to_wave(mel, SAMPLE_RATE, iters=iters, seed=seed).numpy()
    return np.stack([peak_normalise(w) for w in waves]).astype(np.float32)


def spoken_digit_pictures(size: int) -> tuple[np.ndarray, SpokenDigits]:
    """The embedded spoken digits as (1000, size, size, 1) log-mel pictures, and the
    clips they were made from."""
    digits = spoken_digits()
    return waves_to_pictures(digits.waves, size), digits


# --------------------------------------------------------------------------- phones

# flite's US English phone set (CMU lexicon), "pau" for a pause
PHONES = ("pau", "aa", "ae", "ah", "ao", "aw", "ax", "axr", "ay", "b", "ch", "d", "dh", "eh",
          "el", "em", "en", "er", "ey", "f", "g", "hh", "ih", "iy", "jh", "k", "l", "m", "n",
          "ng", "nx", "ow", "oy", "p", "r", "s", "sh", "t", "th", "uh", "uw", "v", "w", "y",
          "z", "zh")  # fmt: skip
_UNSAYABLE = re.compile(r"[^A-Za-z0-9 ,.?!'\-]")
MAX_TEXT = 1000  # characters of one utterance


def normalise_text(text: str) -> str:
    """``text`` as flite should read it: each digit as its word ("427" -> "four two
    seven", as digit strings are read out), spaces collapsed. DataError naming a
    character outside letters, digits, spaces and , . ? ! ' -"""
    text = " ".join(str(text).split())
    bad = _UNSAYABLE.search(text)
    if bad:
        raise DataError(f"{bad.group()!r} (at character {bad.start() + 1}) cannot be said: "
                        "use letters, digits, spaces and , . ? ! ' -")  # fmt: skip
    if not text.strip(" ,.?!'-"):
        raise DataError("the text is empty: give words or digits to say")
    if len(text) > MAX_TEXT:
        raise DataError(f"the text has {len(text):,} characters; the most is {MAX_TEXT:,}")
    return " ".join(re.sub(r"\d", lambda m: f" {DIGITS[int(m.group())]} ", text).split())


@dataclass(frozen=True)
class Utterance:
    """Speech from flite with its phones: ``wave`` (T,) at 16 kHz, ``phones`` and each
    phone's end time ``ends`` (seconds, increasing)."""

    wave: np.ndarray
    phones: tuple[str, ...]
    ends: np.ndarray


def _parse_segments(printed: str, where: str) -> tuple[tuple[str, ...], np.ndarray]:
    phones, ends = [], []
    for item in printed.split():
        name, _, end = item.partition(":")
        if name not in PHONES:
            raise DataError(f"flite gave the phone {name!r} for {where}, not in aigc's phone set")
        phones.append(name)
        ends.append(float(end) if end else np.nan)
    return tuple(phones), np.asarray(ends, dtype=np.float64)


def speak_with_timing(text: str, voice: str = "slt", rate: float = 1.0) -> Utterance:
    """``text`` (normalised first) spoken by flite's ``voice``, with the phones it said
    and when each ended (flite's -psdur)."""
    if voice not in VOICES:
        raise DataError(f"voice {voice!r}: flite's 16 kHz voices are {', '.join(VOICES)}")
    text = normalise_text(text)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speech.wav"
        done = subprocess.run([*_flite_args(voice, rate, 1.0), "-psdur", "-t", text, "-o",
                               str(out)], capture_output=True, text=True, timeout=60)  # fmt: skip
        if done.returncode != 0 or not out.exists():
            raise DataError(f"flite failed on {text!r} ({voice}): {done.stderr.strip()[:200]}")
        wave, _ = read_audio(out, SAMPLE_RATE)
    phones, ends = _parse_segments(done.stdout, repr(text))
    return Utterance(wave, phones, ends)


def phone_frames(ends: np.ndarray, hop: int) -> np.ndarray:
    """Phone end times (seconds) -> frames of ``hop`` samples per phone (ends rounded to
    frames, never going back)."""
    edges = np.round(np.asarray(ends) * SAMPLE_RATE / hop).astype(np.int64)
    return np.diff(np.concatenate([[0], np.maximum.accumulate(edges)]))


@lru_cache(maxsize=4096)
def phones_of(text: str) -> tuple[str, ...]:
    """The phones flite's front end reads ``text`` (normalised first) as; the same in
    every voice (one lexicon and letter-to-sound rules)."""
    text = normalise_text(text)
    done = subprocess.run([flite_binary(), "-voice", "slt", "-ps", "-t", text, "-o", "none"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    if done.returncode != 0:
        raise DataError(f"flite failed on {text!r}: {done.stderr.strip()[:200]}")
    return _parse_segments(done.stdout, repr(text))[0]


def digit_words(phones: tuple[str, ...] | list[str]) -> list[tuple[int, int, int]]:
    """(digit, first phone, end phone) for each digit word in a phone sequence of
    digits said in a row (pauses between words skipped); DataError when the phones are
    not digit words."""
    words = {DIGITS.index(w): phones_of(w)[1:-1] for w in DIGITS}  # without the pauses
    out, i = [], 0
    while i < len(phones):
        if phones[i] == "pau":
            i += 1
            continue
        match = [d for d, p in words.items() if tuple(phones[i : i + len(p)]) == p]
        if not match:
            raise DataError(f"phones {' '.join(phones[i : i + 4])} ... are not a digit word")
        d = max(match, key=lambda d: len(words[d]))
        out.append((d, i, i + len(words[d])))
        i += len(words[d])
    return out
