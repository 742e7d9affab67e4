"""Noisy speech made on the machine: clean flite sentences mixed with seeded noises at
chosen signal-to-noise ratios, for training and measuring denoisers.

Sentences come from the Python documentation every install carries (``pydoc_data``):
the plain ones of 4-14 words. Noises (each from its own seed, at 16 kHz):

- ``white``: flat spectrum; ``pink``: power falling as 1/f; ``brown``: as 1/f^2;
- ``hum``: mains hum at 50 or 60 Hz with decaying harmonics and a slow wobble;
- ``babble``: three to five other sentences in other voices, overlapping;
- ``music``: a synthesised melody over chords (harmonic tones with decaying envelopes).

As in VoiceBank-DEMAND, training and test mixtures use different SNRs (by default
0/5/10/15 dB against 2.5/7.5/12.5/17.5 dB) and different voices.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import numpy as np

from aigc.data.speech import SAMPLE_RATE, VOICES, synthesise, trim_silence
from aigc.errors import DataError

NOISES = ("white", "pink", "brown", "hum", "babble", "music")
TRAIN_SNRS = (0.0, 5.0, 10.0, 15.0)
TEST_SNRS = (2.5, 7.5, 12.5, 17.5)


@cache
def sentences() -> tuple[str, ...]:
    """Plain sentences of 4-14 words from the Python documentation, sorted, no repeats."""
    import pydoc_data.topics

    text = " ".join(" ".join(v.split()) for v in pydoc_data.topics.topics.values())
    found = {
        s
        for s in re.split(r"(?<=[.!?])\s+", text)
        if re.fullmatch(r"[A-Z][A-Za-z ,'-]+[a-z]\.", s) and 4 <= len(s.split()) <= 14
    }
    return tuple(sorted(found))


def coloured_noise(samples: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise whose power spectrum falls as 1/f^exponent (0 white, 1 pink, 2
    brown), shaped in the frequency domain; unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(samples))
    f = np.fft.rfftfreq(samples)
    f[0] = f[1]  # no infinite gain at 0 Hz
    noise = np.fft.irfft(spectrum / f ** (exponent / 2), samples)
    noise -= noise.mean()
    return (noise / (np.sqrt(np.mean(noise**2)) + 1e-12)).astype(np.float32)


def mains_hum(samples: int, rng: np.random.Generator) -> np.ndarray:
    """50 or 60 Hz hum and its first seven harmonics (amplitudes falling as 1/k, random
    phases), its level wobbling by ±20% at under 1 Hz; unit RMS."""
    t = np.arange(samples) / SAMPLE_RATE
    base = rng.choice([50.0, 60.0]) * (1 + rng.uniform(-0.005, 0.005))
    hum = sum(np.sin(2 * np.pi * k * base * t + rng.uniform(0, 2 * np.pi)) / k
              for k in range(1, 9))  # fmt: skip
    hum = hum * (1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.1, 1.0) * t))
    return (hum / np.sqrt(np.mean(hum**2))).astype(np.float32)


def synth_music(samples: int, rng: np.random.Generator) -> np.ndarray:
    """A melody over a chord per beat in a random major key: tones of six harmonics
    with exponential decay, at 80-140 beats per minute; unit RMS."""
    t_beat = 60.0 / rng.uniform(80, 140)
    key = rng.integers(48, 60)  # MIDI note of the tonic
    major = np.array([0, 2, 4, 5, 7, 9, 11])
    out = np.zeros(samples)
    beat = round(t_beat * SAMPLE_RATE)

    def tone(midi: float, length: int, amp: float) -> np.ndarray:
        t = np.arange(length) / SAMPLE_RATE
        f = 440.0 * 2 ** ((midi - 69) / 12)
        wave = sum(np.sin(2 * np.pi * k * f * t) / k**1.5 for k in range(1, 7) if k * f < 7000)
        return amp * wave * np.exp(-t * 3.0)

    for start in range(0, samples, beat):
        length = min(beat, samples - start)
        root = rng.integers(0, 7)
        for step in (0, 2, 4):  # a triad on a degree of the scale
            degree = (root + step) % 7
            out[start : start + length] += tone(key + major[degree], length, 0.3)
        melody = key + 12 + major[rng.integers(0, 7)]
        out[start : start + length] += tone(melody, length, 0.6)
    return (out / (np.sqrt(np.mean(out**2)) + 1e-12)).astype(np.float32)


def babble(samples: int, rng: np.random.Generator, voices: tuple[str, ...] = VOICES) -> np.ndarray:
    """Three to five sentences in random voices, each starting at a random time and
    looping, summed; unit RMS."""
    pool = sentences()
    out = np.zeros(samples, dtype=np.float64)
    for _ in range(int(rng.integers(3, 6))):
        text = pool[int(rng.integers(len(pool)))]
        voice = voices[int(rng.integers(len(voices)))]
        talk = trim_silence(synthesise(text, voice))
        talk = np.tile(talk, samples // max(len(talk), 1) + 2)
        start = int(rng.integers(len(talk) - samples))
        part = talk[start : start + samples]
        out += part / (np.sqrt(np.mean(part**2)) + 1e-12)
    return (out / (np.sqrt(np.mean(out**2)) + 1e-12)).astype(np.float32)


def make_noise(kind: str, samples: int, seed: int) -> np.ndarray:
    """``samples`` of noise ``kind`` (one of NOISES) from ``seed``, unit RMS."""
    rng = np.random.default_rng(seed)
    if kind in ("white", "pink", "brown"):
        return coloured_noise(samples, {"white": 0.0, "pink": 1.0, "brown": 2.0}[kind], rng)
    if kind == "hum":
        return mains_hum(samples, rng)
    if kind == "music":
        return synth_music(samples, rng)
    if kind == "babble":
        return babble(samples, rng)
    raise DataError(f"noise {kind!r}: choose one of {', '.join(NOISES)}")


def mix_at_snr(clean: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``clean`` plus ``noise`` scaled so that 10 log10(P_clean / P_noise) = ``snr_db``
    (powers as mean squares over the whole clip)."""
    if clean.shape != noise.shape:
        raise ValueError(f"clean {clean.shape} and noise {noise.shape} differ")
    p_clean = float(np.mean(clean.astype(np.float64) ** 2))
    p_noise = float(np.mean(noise.astype(np.float64) ** 2))
    if p_clean == 0.0:
        raise DataError("the clean signal is silent: an SNR is not defined")
    gain = np.sqrt(p_clean / (max(p_noise, 1e-20) * 10 ** (snr_db / 10)))
    return (clean + gain * noise).astype(np.float32)


@dataclass(frozen=True)
class NoisySpeech:
    """Mixtures ``noisy`` and their ``clean`` speech, (N, samples) float32; per row the
    ``noise`` index into NOISES, the ``snr`` in dB, the ``voice`` index into VOICES and
    the ``sentence`` index into :func:`sentences`."""

    clean: np.ndarray
    noisy: np.ndarray
    noise: np.ndarray
    snr: np.ndarray
    voice: np.ndarray
    sentence: np.ndarray


def noisy_speech(
    n: int,
    seed: int,
    voices: tuple[str, ...] = VOICES,
    snrs: tuple[float, ...] = TRAIN_SNRS,
    noises: tuple[str, ...] = NOISES,
    seconds: float = 2.0,
    peak: float = 0.9,
    pool: tuple[int, ...] | None = None,
) -> NoisySpeech:
    """``n`` mixtures of ``seconds`` each: a sentence in one of ``voices`` (cut or
    zero-padded to length), one of ``noises`` at one of ``snrs``, all drawn from
    ``seed``; row i uses noise kind i mod len(noises), so every kind is equally present.
    Each pair is scaled together so that the mixture peaks at most at ``peak``.
    ``pool``: the indices into :func:`sentences` to draw from (default all), so that
    test sentences can be kept out of training."""
    for v in voices:
        if v not in VOICES:
            raise DataError(f"voice {v!r}: flite's 16 kHz voices are {', '.join(VOICES)}")
    samples = round(seconds * SAMPLE_RATE)
    rng = np.random.default_rng(seed)
    every = sentences()
    pool = tuple(range(len(every))) if pool is None else tuple(pool)
    clean, noisy, rows = [], [], []
    for i in range(n):
        kind = noises[i % len(noises)]
        s_i, v_i = pool[int(rng.integers(len(pool)))], int(rng.integers(len(voices)))
        snr = float(snrs[int(rng.integers(len(snrs)))])
        speech = trim_silence(synthesise(every[s_i], voices[v_i]))[:samples]
        speech = np.pad(speech, (0, samples - len(speech)))
        mixture = mix_at_snr(speech, make_noise(kind, samples, int(rng.integers(2**31))), snr)
        scale = min(1.0, peak / max(float(np.abs(mixture).max()), 1e-12))
        clean.append(speech * scale)
        noisy.append(mixture * scale)
        rows.append((NOISES.index(kind), snr, VOICES.index(voices[v_i]), s_i))
    noise_i, snr_a, voice_i, sent_i = (np.asarray(c) for c in zip(*rows, strict=True))
    return NoisySpeech(np.stack(clean).astype(np.float32), np.stack(noisy).astype(np.float32),
                       noise_i.astype(np.int64), snr_a.astype(np.float32),
                       voice_i.astype(np.int64), sent_i.astype(np.int64))  # fmt: skip
