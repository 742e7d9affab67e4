"""An audio judge: a small CNN on log-mel spectrograms, trained once on labelled real
clips and cached, as the image domain classifiers are (``metrics/classifier.py``).

It says which digit a generated clip speaks (accuracy against the requested digit, an
Inception-score-like figure) and gives the features in which a Fréchet distance is
measured. Its accuracy is measured on speakers it never heard (the held-out voices), so
what it judges is the word, not the voice. The spectrogram of each clip is made
loudness-free (its loudest band-frame set to 0 dB, 60 dB of range kept) before the
network, and the network learns from clips shifted in time and mixed with noise at
10-40 dB SNR, the departures generated clips have.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from aigc.data.audio import MelSpec
from aigc.metrics.classifier import (
    JUDGE_MIN_ACCURACY,
    DomainClassifier,
    cache_dir,
    read_cached,
    write_cached,
)

AUDIO_CLASSIFIER_VERSION = 1  # part of the cache key: bump when training or network change
RANGE_NATS = 60 / 20 * np.log(10)  # 60 dB of magnitude range, in natural-log units
JUDGE_SPEC = MelSpec(sample_rate=16000, n_fft=512, hop=160, n_mels=64)  # 10 ms frames


def judge_input(waves: Tensor | np.ndarray, spec: MelSpec = JUDGE_SPEC) -> Tensor:
    """(N, T) waveforms -> (N, 1, n_mels, frames) in about [-1, 1]: log-mel relative to
    each clip's loudest cell, the bottom RANGE_NATS clipped."""
    x = torch.as_tensor(np.asarray(waves) if not isinstance(waves, Tensor) else waves).float()
    mel = spec(x)
    mel = mel - mel.amax(dim=(-2, -1), keepdim=True)
    return (mel.clamp_min(-RANGE_NATS) / (RANGE_NATS / 2) + 1).unsqueeze(1)


def _augment(waves: Tensor, gen: torch.Generator, max_shift: int = 1600) -> Tensor:
    """Each clip rolled by up to ``max_shift`` samples (100 ms at 16 kHz) and mixed with
    white noise at a random 10-40 dB SNR."""
    out = torch.empty_like(waves)
    shifts = torch.randint(-max_shift, max_shift + 1, (len(waves),), generator=gen)
    for i, s in enumerate(shifts.tolist()):
        out[i] = torch.roll(waves[i], s)
    snr_db = 10 + 30 * torch.rand(len(waves), 1, generator=gen)
    power = out.pow(2).mean(-1, keepdim=True).clamp_min(1e-10)
    noise = torch.randn(out.shape, generator=gen) * (power / 10 ** (snr_db / 10)).sqrt()
    return out + noise


def _warp(x: Tensor, gen: torch.Generator, max_factor: float = 1.25) -> Tensor:
    """Each judge input (B, 1, n_mels, frames) stretched along frequency by a factor in
    [1/max_factor, max_factor] anchored at 0 Hz (vocal tract length perturbation: a
    longer or shorter tract moves every formant by one factor) and along time by a
    factor in [0.87, 1.15] (a slower or faster speaker)."""
    b = len(x)
    log_f = (2 * torch.rand(b, generator=gen) - 1) * np.log(max_factor)
    log_t = (2 * torch.rand(b, generator=gen) - 1) * np.log(1.15)
    alpha, beta = log_f.exp(), log_t.exp()
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = 1 / beta  # x (time) about the centre
    theta[:, 1, 1] = 1 / alpha  # y (mel band) about the lowest band
    theta[:, 1, 2] = 1 / alpha - 1
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=True)


@dataclass
class AudioJudge:
    """A trained audio classifier: ``accuracy`` per attribute on ``heldout`` clips of
    unseen speakers; ``classes`` the names per attribute."""

    model: DomainClassifier
    accuracy: dict[str, float]
    classes: dict[str, list[str]]
    key: str
    heldout: int = 0

    @torch.no_grad()
    def predict(self, waves: Tensor | np.ndarray, batch_size: int = 256) -> dict[str, Tensor]:
        """The predicted class per attribute of (N, T) waveforms, each (N,) long."""
        return self.model.predict(judge_input(waves), batch_size)

    @torch.no_grad()
    def probabilities(self, waves: Tensor | np.ndarray, attribute: str) -> Tensor:
        """(N, classes) softmax of one attribute's head."""
        self.model.eval()
        x = judge_input(waves)
        return torch.cat([F.softmax(self.model(x[i : i + 256])[attribute], -1)
                          for i in range(0, len(x), 256)])  # fmt: skip

    @torch.no_grad()
    def features(self, waves: Tensor | np.ndarray) -> Tensor:
        """(N, feature_dim) penultimate features, where Fréchet distances are measured."""
        self.model.eval()
        x = judge_input(waves)
        return torch.cat([self.model.features(x[i : i + 256]) for i in range(0, len(x), 256)])

    def weaknesses(self) -> list[str]:
        """Why its verdicts should not be trusted, one sentence each; [] when they can."""
        weak = {a: v for a, v in self.accuracy.items() if v < JUDGE_MIN_ACCURACY}
        if not weak:
            return []
        said = ", ".join(f"{a} {v:.1%}" for a, v in weak.items())
        return [f"the audio classifier scores only {said} on {self.heldout} held-out clips "
                f"(below {JUDGE_MIN_ACCURACY:.0%}): its verdicts mean little"]  # fmt: skip


def train_audio_judge(
    waves: np.ndarray,
    labels: dict[str, np.ndarray],
    classes: dict[str, list[str]],
    heldout: np.ndarray,
    key: str = "",
    steps: int = 600,
    batch_size: int = 64,
    seed: int = 0,
) -> AudioJudge:
    """Trains on the clips where ``heldout`` (N,) bool is false and measures accuracy on
    the rest. Deterministic for a seed."""
    gen = torch.Generator().manual_seed(seed)
    train_idx = np.nonzero(~heldout)[0]
    val_idx = np.nonzero(heldout)[0]
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise ValueError("the audio judge needs clips to train on and held-out clips")
    x_all = torch.from_numpy(np.asarray(waves, dtype=np.float32))
    y_all = {a: torch.from_numpy(np.asarray(v, dtype=np.int64)) for a, v in labels.items()}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DomainClassifier(1, {a: len(classes[a]) for a in labels}, width=24)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    batch_size = min(batch_size, len(train_idx))
    model.train()
    for _ in range(steps):
        idx = torch.from_numpy(train_idx)[
            torch.randint(len(train_idx), (batch_size,), generator=gen)
        ]
        logits = model(_warp(judge_input(_augment(x_all[idx], gen)), gen))
        loss = sum(F.cross_entropy(logits[a], y_all[a][idx]) for a in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    pred = model.predict(judge_input(x_all[val_idx]))
    accuracy = {a: float((pred[a] == y_all[a][val_idx]).float().mean()) for a in labels}
    return AudioJudge(model, accuracy, dict(classes), key, heldout=len(val_idx))


def _cache_path(key: str):
    digest = hashlib.sha256(f"audio-v{AUDIO_CLASSIFIER_VERSION}|{key}".encode()).hexdigest()[:20]
    return cache_dir() / "classifiers" / f"audio-{digest}.safetensors"


def _read_judge(key: str, path) -> AudioJudge | None:
    """The judge cached at ``path`` for ``key``; None when absent or unreadable."""
    cached = read_cached(path) if path.is_file() else None
    if cached is None:
        return None
    state, meta = cached
    try:
        model = DomainClassifier(1, {a: len(v) for a, v in meta["classes"].items()}, width=24)
        model.load_state_dict(state)
        if meta["key"] != key:
            return None
    except (KeyError, TypeError, ValueError, RuntimeError):
        return None  # unreadable: trained again
    model.eval()
    return AudioJudge(model, meta["accuracy"], meta["classes"], key, int(meta["heldout"]))


def cached_audio_judge(
    key: str,
    waves: np.ndarray,
    labels: dict[str, np.ndarray],
    classes: dict[str, list[str]],
    heldout: np.ndarray,
    seed: int = 0,
    steps: int = 600,
    batch_size: int = 64,
) -> AudioJudge:
    """The judge for data set ``key`` from the cache, trained and stored first if absent;
    ``key`` must describe the clips exactly."""
    path = _cache_path(f"{key}|steps={steps}|batch={batch_size}|seed={seed}")
    judge = _read_judge(key, path)
    if judge is not None:
        return judge
    # trained outside the caller's inference mode and autocast (an evaluation): fp32
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        judge = train_audio_judge(waves, labels, classes, heldout, key=key, steps=steps,
                                  batch_size=batch_size, seed=seed)  # fmt: skip
    meta = {"key": key, "accuracy": judge.accuracy, "classes": judge.classes,
            "heldout": judge.heldout, "version": AUDIO_CLASSIFIER_VERSION}  # fmt: skip
    with contextlib.suppress(OSError):  # a read-only cache only costs retraining next time
        write_cached(judge.model, meta, path)
    return judge


def spoken_digit_judge(
    heldout_voices: tuple[str, ...] = (), seed: int = 0, steps: int = 600
) -> AudioJudge:
    """The judge of the embedded spoken digits' digit. By default it learns from every
    voice and its accuracy is measured on a seeded 15% of the clips it never heard (other
    rates and pitches of the same voices: generated clips imitate the training voices);
    with ``heldout_voices`` it never hears those voices and is measured on them (how
    well it judges a speaker it does not know)."""
    from aigc.data.speech import DIGITS, VOICES, spoken_digits

    digits = spoken_digits()
    if heldout_voices:
        held = np.isin(digits.voice, [VOICES.index(v) for v in heldout_voices])
    else:
        held = np.zeros(len(digits), bool)
        held[np.random.default_rng(seed).permutation(len(digits))[: len(digits) * 15 // 100]] = True
    key = f"spoken-digits|heldout={','.join(heldout_voices) or '15%'}|n={len(digits)}"
    return cached_audio_judge(key, digits.waves, {"digit": digits.digit},
                              {"digit": list(DIGITS)}, held, seed=seed, steps=steps)  # fmt: skip


def cut_words(wave: np.ndarray, phones: list[str] | tuple[str, ...], frames: np.ndarray,
              hop: int) -> tuple[np.ndarray, list[int]]:  # fmt: skip
    """The digit words of one utterance of digits said in a row, cut at the phone
    boundaries (``frames`` per phone, ``hop`` samples a frame) and each centred in one
    second: ((words, 16000) float32, their digits)."""
    from aigc.data.speech import SAMPLE_RATE, digit_words, fit_length

    edges = np.concatenate([[0], np.cumsum(np.asarray(frames)[: len(phones)])]) * hop
    words = digit_words(list(phones))
    if not words:
        return np.zeros((0, SAMPLE_RATE), np.float32), []
    cuts = [fit_length(np.asarray(wave[edges[a] : edges[b]], np.float32), SAMPLE_RATE)
            for _, a, b in words]  # fmt: skip
    return np.stack(cuts), [d for d, _, _ in words]


def digit_word_judge(
    strings: list[str], voices: list[str], hop: int, seed: int = 0, steps: int = 600
) -> AudioJudge:
    """A judge of digits said in a row: it learns from the words of ``strings`` said by
    flite in ``voices``, cut at flite's phone boundaries (``hop`` samples a frame), and
    from the isolated spoken digits; its accuracy is measured on the words of a seeded
    15% of the strings it never heard. Cached by the strings, voices and hop."""
    from aigc.data.speech import DIGITS, spoken_digits

    held_strings = set(
        np.random.default_rng(seed)
        .permutation(len(strings))[: max(1, len(strings) * 15 // 100)]
        .tolist()
    )
    key = hashlib.sha256(json.dumps([strings, voices, hop]).encode()).hexdigest()[:16]
    key = f"digit-words|{key}|n={len(strings)}"
    judge = _read_judge(key, _cache_path(f"{key}|steps={steps}|batch=64|seed={seed}"))
    if judge is not None:
        return judge
    # speak the strings only when the judge must be trained
    from concurrent.futures import ThreadPoolExecutor

    from aigc.data.speech import phone_frames, speak_with_timing

    jobs = [(i, s, v) for i, s in enumerate(strings) for v in voices]
    with ThreadPoolExecutor(max_workers=4) as ex:
        said = list(ex.map(lambda job: speak_with_timing(job[1], job[2]), jobs))
    waves, digits, held = [], [], []
    for (i, _, _), u in zip(jobs, said, strict=True):
        cuts, ds = cut_words(u.wave, u.phones, phone_frames(u.ends, hop), hop)
        waves.append(cuts)
        digits += ds
        held += [i in held_strings] * len(ds)
    isolated = spoken_digits()
    waves.append(isolated.waves)
    digits += isolated.digit.tolist()
    held += [False] * len(isolated)
    return cached_audio_judge(key, np.concatenate(waves), {"digit": np.asarray(digits)},
                              {"digit": list(DIGITS)}, np.asarray(held), seed=seed,
                              steps=steps)  # fmt: skip
