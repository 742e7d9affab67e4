"""Speech denoising on the noisy speech every install can make (aigc.data.noisy_speech).

Training mixes on the fly: each row of a batch is a 2-second crop of a training
sentence in one of flite's four voices plus a crop of one of the six noise kinds at one
of the training SNRs, drawn from (seed, step), so no two epochs repeat a mixture and
resumed training equals uninterrupted training. The held-out mixtures are fixed: held-
out sentences (a tenth of them, never heard in training), fresh noise, and the test
SNRs, which differ from the training ones as in VoiceBank-DEMAND. Evaluation reports
SI-SDR, STOI and PESQ of the denoised speech beside the noisy input's, overall and per
noise kind."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aigc.config import Config
from aigc.errors import CheckpointError, ConfigError
from aigc.models.denoiser import DenoiserConfig, MaskDenoiser
from aigc.runs import RunDir
from aigc.tasks.base import DataFiles, Task

META_FILE = "noisy_speech.json"
SAMPLE_RATE = 16000
NOISE_BANK_SECONDS = 60.0


@dataclass
class DenoiseDataConfig:
    """How the mixtures are made and held out."""

    seconds: float = 2.0  # length of a training crop and of a held-out mixture
    val_mixtures: int = 180  # held-out mixtures, spread evenly over the noise kinds
    val_fraction: float = 0.1  # of the sentences, held out
    split_seed: int = 0
    limit_sentences: int = 0  # train on only the first N training sentences (0 = all)
    eval_pesq: bool = True  # PESQ (the pesq package) in the evaluation

    def validate(self) -> None:
        if not 0.5 <= self.seconds <= 10.0:
            raise ConfigError(f"data.seconds={self.seconds} must be in [0.5, 10]")
        if self.val_mixtures < 6:
            raise ConfigError(f"data.val_mixtures={self.val_mixtures} must be at least 6")
        if self.limit_sentences < 0:
            raise ConfigError(f"data.limit_sentences={self.limit_sentences} must be >= 0")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 0.5)")


def _pcm(wave: np.ndarray) -> np.ndarray:
    return np.round(np.clip(wave, -1, 1) * 32767).astype(np.int16)


def _float(pcm: np.ndarray) -> np.ndarray:
    return pcm.astype(np.float32) / 32767


def sentence_split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) sentence indices: a seeded ``val_fraction`` of the n held out."""
    order = np.random.default_rng(seed).permutation(n)
    k = max(1, round(val_fraction * n))
    return sorted(order[k:].tolist()), sorted(order[:k].tolist())


class DenoiseTask(Task):
    """Trains a spectral-mask denoiser; evaluates SI-SDR, STOI and PESQ."""

    name = "denoise"
    data_config = DenoiseDataConfig
    model_config = DenoiserConfig
    item_name = "clips"
    pipeline_class = "aigc.pipelines.denoise:DenoisePipeline"
    headline_metric = "si_sdr"
    sample_verb = "denoise"
    sample_hint = "--audio noisy.wav --out clean.wav"
    resumable_keys = frozenset({"data.eval_pesq"})

    def __init__(self, config: Config, run: RunDir, with_data: bool = True):
        self.config = config
        self.run = run
        self.model: nn.Module = MaskDenoiser(config.model)
        self.items_per_batch = config.train.batch_size
        self.data: dict[str, np.ndarray] = {}
        if with_data:
            self.load_data()

    def load_data(self) -> None:
        """Reads the prepared speech, noise bank and held-out mixtures."""
        d = self.run.data_dir
        try:
            self.data = {name: np.load(d / f"{name}.npy", allow_pickle=False) for name in
                         ("speech", "speech_offsets", "noise", "val_clean", "val_noisy",
                          "val_kind")}  # fmt: skip
            self.meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{d}: the prepared noisy speech is missing or damaged "
                                  f"({e})") from None  # fmt: skip

    # construction -----------------------------------------------------------
    @classmethod
    def prepare_data(cls, config: Config, data_dir: Path, progress: bool = True) -> None:
        """Speaks every training sentence in every voice, makes a minute of each noise
        kind, and the fixed held-out mixtures (held-out sentences, test SNRs)."""
        from aigc.data.noisy_speech import NOISES, TEST_SNRS, make_noise, noisy_speech, sentences
        from aigc.data.speech import VOICES, synthesise, trim_silence

        d: DenoiseDataConfig = config.data
        pool = sentences()
        train_ids, val_ids = sentence_split(len(pool), d.val_fraction, d.split_seed)
        train_ids = train_ids[: d.limit_sentences or None]
        jobs = [(pool[i], v) for i in train_ids for v in VOICES]
        with ThreadPoolExecutor(max_workers=4) as ex:  # flite runs as a process per clip
            clips = list(ex.map(lambda job: trim_silence(synthesise(*job)), jobs))
        offsets = np.cumsum([0] + [len(c) for c in clips])
        bank = np.stack([make_noise(k, round(NOISE_BANK_SECONDS * SAMPLE_RATE), 1000 + i)
                         for i, k in enumerate(NOISES)])  # fmt: skip
        bank = bank / np.abs(bank).max(axis=1, keepdims=True)  # peak 1: fits int16
        val = noisy_speech(d.val_mixtures, seed=10_000 + d.split_seed, snrs=TEST_SNRS,
                           seconds=d.seconds, pool=tuple(val_ids))  # fmt: skip
        data_dir.mkdir(parents=True, exist_ok=True)
        arrays = {"speech": _pcm(np.concatenate(clips)), "speech_offsets": offsets,
                  "noise": _pcm(bank), "val_clean": _pcm(val.clean), "val_noisy": _pcm(val.noisy),
                  "val_kind": val.noise}  # fmt: skip
        for name, a in arrays.items():
            np.save(data_dir / f"{name}.npy", a, allow_pickle=False)
        meta = {"source": "flite sentences from pydoc_data with aigc.data.noisy_speech noises",
                "train_sentences": len(train_ids), "val_sentences": len(val_ids),
                "voices": list(VOICES), "noises": list(NOISES), "test_snrs": list(TEST_SNRS),
                "train_clips": len(clips), "train_seconds": float(offsets[-1] / SAMPLE_RATE),
                "val_mixtures": d.val_mixtures}  # fmt: skip
        (data_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def finish_config(cls, config: Config, files: DataFiles) -> None:
        """Nothing follows from the data: the model reads 16 kHz audio."""

    @classmethod
    def open(cls, config: Config, run: RunDir, with_data: bool = True) -> DenoiseTask:
        return cls(config, run, with_data)

    # training -----------------------------------------------------------------
    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        """This share of the step's mixtures, made from (seed, step): ``noisy`` and
        ``clean`` (B, samples)."""
        from aigc.data.noisy_speech import TRAIN_SNRS, mix_at_snr

        t = self.config.train
        B, total = t.batch_size, t.batch_size * t.grad_accum * world
        rng = np.random.default_rng([t.seed, step, 17])
        n_clips, kinds, bank_len = len(self.data["speech_offsets"]) - 1, *self.data["noise"].shape
        draws = {"clip": rng.integers(0, n_clips, total), "at": rng.random(total),
                 "kind": rng.integers(0, kinds, total), "noise_at": rng.random(total),
                 "snr": rng.choice(np.asarray(TRAIN_SNRS), total)}  # fmt: skip
        part = slice((micro * world + rank) * B, (micro * world + rank + 1) * B)
        n = round(self.config.data.seconds * SAMPLE_RATE)
        noisy, clean = [], []
        for c, at, k, nat, snr in zip(*(v[part] for v in draws.values()), strict=True):
            a, b = self.data["speech_offsets"][c], self.data["speech_offsets"][c + 1]
            speech = _float(self.data["speech"][a:b])
            start = int(at * max(len(speech) - n, 0))
            speech = np.pad(speech[start : start + n], (0, max(0, n - (len(speech) - start))))
            speech = speech[:n]
            s0 = int(nat * (bank_len - n))
            noise = _float(self.data["noise"][k, s0 : s0 + n])
            mixture = mix_at_snr(speech, noise, float(snr))
            scale = min(1.0, 0.9 / max(float(np.abs(mixture).max()), 1e-9))
            noisy.append(mixture * scale)
            clean.append(speech * scale)
        return {"noisy": torch.from_numpy(np.stack(noisy)),
                "clean": torch.from_numpy(np.stack(clean))}  # fmt: skip

    def eval_sums(
        self, model: nn.Module, rank: int, world: int, device: torch.device
    ) -> dict[str, float]:
        """Per held-out mixture (this rank's share): SI-SDR, STOI and PESQ of the
        denoised speech and of the noisy input, summed overall and per noise kind."""
        from aigc.data.noisy_speech import NOISES

        if not self.data:
            self.load_data()
        clean = _float(self.data["val_clean"])
        noisy = _float(self.data["val_noisy"])
        kinds = self.data["val_kind"]
        rows = list(range(rank, len(clean), world))
        enhanced = np.zeros_like(noisy)
        for i in range(0, len(rows), 32):
            part = rows[i : i + 32]
            x = torch.from_numpy(noisy[part]).to(device)
            enhanced[part] = model.enhance(x).float().cpu().numpy()
        keys = [f"{m}{w}" for m in ("si_sdr", "stoi", "pesq") for w in ("", "_noisy")]
        sums = {f"{k}/{kind}": 0.0 for k in keys for kind in NOISES}
        sums.update({f"count/{kind}": 0.0 for kind in NOISES})
        for r in rows:
            kind = NOISES[int(kinds[r])]
            for suffix, wave in (("", enhanced[r]), ("_noisy", noisy[r])):
                for metric, value in speech_quality(
                    wave, clean[r], self.config.data.eval_pesq
                ).items():
                    sums[f"{metric}{suffix}/{kind}"] += value
            sums[f"count/{kind}"] += 1
        return sums

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Means overall and per noise kind; ``*_noisy`` are the noisy input's."""
        from aigc.data.noisy_speech import NOISES

        out: dict[str, float] = {}
        total = sum(sums[f"count/{k}"] for k in NOISES)
        if not total:
            return out
        metrics = ["si_sdr", "stoi"] + (["pesq"] if self.config.data.eval_pesq else [])
        for m in metrics:
            for w in ("", "_noisy"):
                out[f"{m}{w}"] = sum(sums[f"{m}{w}/{k}"] for k in NOISES) / total
        out["si_sdr_improvement"] = out["si_sdr"] - out["si_sdr_noisy"]
        for k in NOISES:
            n = sums[f"count/{k}"]
            for m in metrics:
                for w in ("", "_noisy"):
                    out[f"{m}{w}/{k}"] = sums[f"{m}{w}/{k}"] / n if n else math.nan
        return out

    def eval_info(self) -> dict[str, str]:
        pesq = "PESQ wide-band (pesq package)" if self.config.data.eval_pesq else "no PESQ"
        return {"speech_metrics": f"SI-SDR (aigc), STOI (pystoi), {pesq}; 16 kHz"}

    def samples(self, model: nn.Module, step: int, device: torch.device) -> dict[str, Any]:
        """Two held-out mixtures (babble and music) and their denoised speech."""
        from aigc.data.noisy_speech import NOISES
        from aigc.samples import AudioSample

        if not self.data:
            self.load_data()
        out: dict[str, Any] = {}
        for kind in ("babble", "music"):
            r = int(np.nonzero(self.data["val_kind"] == NOISES.index(kind))[0][0])
            noisy = _float(self.data["val_noisy"][r])
            with torch.no_grad():
                clean = model.enhance(torch.from_numpy(noisy)[None].to(device))[0].float().cpu()
            out[f"{kind}-noisy"] = AudioSample(noisy, SAMPLE_RATE)
            out[f"{kind}-denoised"] = AudioSample(np.clip(clean.numpy(), -1, 1), SAMPLE_RATE)
        return out


def speech_quality(estimate: np.ndarray, clean: np.ndarray, with_pesq: bool = True) -> dict:
    """SI-SDR (dB), STOI and, when asked, wide-band PESQ of ``estimate`` against
    ``clean``, both (T,) at 16 kHz. PESQ of a clip it cannot score (no speech found) is
    its floor, 1.0."""
    from pystoi import stoi

    from aigc.metrics.audio import si_sdr

    out = {"si_sdr": float(si_sdr(estimate, clean)),
           "stoi": float(stoi(clean, estimate, SAMPLE_RATE, extended=False))}  # fmt: skip
    if with_pesq:
        from pesq import PesqError, pesq

        try:
            out["pesq"] = float(pesq(SAMPLE_RATE, clean, estimate, "wb"))
        except PesqError:
            out["pesq"] = 1.0
    return out
