"""Spoken-word generation (SC09-style): the diffusion family on one-second log-mel
pictures of the embedded spoken digits, turned back into sound by Griffin-Lim.

The pictures are the house's images (``data.source: spoken-digits``, a row per mel band,
a column per 16 ms frame), so training, sampling, guidance and the pipeline are the
diffusion family's own. What is new is the evaluation, made on the sound: each
generated picture becomes a waveform and the cached audio judge
(``aigc.metrics.audio_classifier``) says which digit it hears. Reported:

- ``digit_accuracy``: the share of clips judged as the digit asked for (digits asked
  for in turn, so every digit is drawn equally), ``digit_accuracy_min`` the worst digit's;
- ``judge_score``: an Inception-score-like exp E[KL(p(y|x) || p(y))] of the judge (10 at
  best);
- ``frechet/heldout``: the Fréchet distance between the judge's features of generated
  clips and of the held-out real clips; ``frechet/vocoded`` the same against the
  Griffin-Lim reconstructions of those real clips' pictures (what a perfect picture
  model would reach through this vocoder); ``frechet/vocoder_floor`` between the
  reconstructions and the real clips (the vocoder's own cost). Named for the judge's
  features, not FAD (VGGish features, which cannot be downloaded here);
- ``vocoded_accuracy``: the judge's accuracy on the reconstructions (the ceiling).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aigc.config import Config
from aigc.errors import ConfigError, DataError
from aigc.metrics.classifier import JudgeWarning
from aigc.tasks.diffusion import DiffusionDataConfig, DiffusionTask
from aigc.tasks.images import open_data

HELDOUT_ROWS = "spoken_heldout.json"  # the held-out pictures' rows in the embedded clips
SOURCE = "spoken-digits"


@dataclass
class SpokenDataConfig(DiffusionDataConfig):
    """The spoken digits as pictures, and how generated clips are judged."""

    source: str = SOURCE
    image_size: int = 64  # mel bands = frames per second
    labels: list[str] = field(default_factory=lambda: ["digit"])
    eval_samples: int = 500  # generated clips per evaluation
    eval_metrics: list[str] = field(default_factory=list)  # picture metrics: none by default
    judge_steps: int = 600  # training steps of the cached audio judge
    vocoder_iters: int = 64  # Griffin-Lim iterations from picture to sound

    def validate(self) -> None:
        super().validate()
        if self.source != SOURCE:
            raise ConfigError(f"data.source={self.source!r}: a spoken run reads {SOURCE!r}")
        if self.judge_steps < 1 or self.vocoder_iters < 1:
            raise ConfigError(
                f"data.judge_steps={self.judge_steps} and data.vocoder_iters="
                f"{self.vocoder_iters} must be at least 1"
            )


class SpokenTask(DiffusionTask):
    """DiffusionTask on spoken-digit pictures, evaluated by ear (the audio judge)."""

    name = "spoken"
    data_config = SpokenDataConfig
    pipeline_class = "aigc.pipelines.spoken:SpokenPipeline"
    headline_metric = "digit_accuracy"
    item_name = "clips"
    sample_hint = "--class seven --n 8 --out sevens/"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._judge = None
        self._reference: dict[str, np.ndarray] | None = None

    @classmethod
    def prepare_data(cls, config: Config, data_dir: Path, progress: bool = True) -> None:
        super().prepare_data(config, data_dir, progress)
        # which embedded clip each held-out picture is, found by its pixels
        from aigc.data.speech import spoken_digit_pictures

        data = open_data(data_dir)
        pictures, _ = spoken_digit_pictures(int(data.meta["spec"]["image_size"]))
        by_hash: dict[str, int] = {}
        for i, p in enumerate(pictures):
            by_hash.setdefault(hashlib.sha256(p.tobytes()).hexdigest(), i)
        rows = [by_hash.get(hashlib.sha256(p[..., :1].tobytes()).hexdigest(), -1)
                for p in data.val_images]  # fmt: skip
        if min(rows, default=0) < 0:
            raise DataError("spoken-digits: a held-out picture matches no clip (flite changed?)")
        (data_dir / HELDOUT_ROWS).write_text(json.dumps({"rows": rows}))

    @classmethod
    def check_data_fit(cls, config: Config, meta: dict[str, Any]) -> None:
        if "digit" not in meta["attributes"]:
            raise ConfigError("a spoken run is judged by digit: keep 'digit' in data.labels")
        if not config.model.conditional and not config.model.text:
            raise ConfigError(
                "a spoken run makes the digit it is asked for: set model.conditional=true "
                "(or model.text=true with captions)"
            )

    # the judge and the real clips -------------------------------------------------
    def judge(self):
        """The audio judge of the embedded digits (trained once, then cached)."""
        if self._judge is None:
            from aigc.metrics.audio_classifier import spoken_digit_judge

            self._judge = spoken_digit_judge(steps=self.config.data.judge_steps)
        return self._judge

    def reference(self) -> dict[str, np.ndarray]:
        """The judge's features of the held-out real clips ("real") and of their
        pictures' Griffin-Lim reconstructions ("vocoded"), with the reconstructions'
        judged digits ("vocoded_pred") and the true digits ("digit")."""
        if self._reference is None:
            from aigc.data.speech import pictures_to_waves, spoken_digits

            data = self.data or open_data(self.run.data_dir)
            path = self.run.data_dir / HELDOUT_ROWS
            if not path.is_file():
                raise DataError(f"{path} is missing: prepare the run's data again")
            rows = np.asarray(json.loads(path.read_text())["rows"], dtype=np.int64)
            clips = spoken_digits()
            real = clips.waves[rows]
            vocoded = pictures_to_waves(data.val_images, iters=self.config.data.vocoder_iters)
            judge = self.judge()
            self._reference = {
                "real": judge.features(real).numpy(),
                "vocoded": judge.features(vocoded).numpy(),
                "vocoded_pred": judge.predict(vocoded)["digit"].numpy(),
                "digit": np.asarray(clips.digit[rows]),
            }
        return self._reference

    # evaluation ---------------------------------------------------------------------
    def eval_sums(
        self, model: nn.Module, rank: int, world: int, device: torch.device
    ) -> dict[str, float]:
        """This rank's share of ``data.eval_samples`` clips, the digits asked for in turn,
        judged by ear; the Fréchet distances on rank 0's clips."""
        from aigc.data.speech import DIGITS, pictures_to_waves
        from aigc.sampling.latent import sample_images

        n = max(1, self.config.data.eval_samples // world)
        col = self.attributes.index("digit")
        labels = torch.full((n, len(self.attributes)), -1, dtype=torch.long)
        labels[:, col] = (torch.arange(n) + rank * n) % len(DIGITS)
        seed = self.config.train.seed + 1_000_003 * (rank + 1)
        pictures, requested = sample_images(model, n, labels, seed, device)
        waves = pictures_to_waves(pictures.cpu(), iters=self.config.data.vocoder_iters)
        return self.judge_waves(waves, requested[:, col].numpy(), first=rank == 0)

    def judge_waves(self, waves: np.ndarray, asked: np.ndarray, first: bool) -> dict[str, float]:
        """Additive counts of the judge's verdict on ``waves`` (N, 16000) asked to say
        ``asked`` (N,) digits; with ``first``, the Fréchet distances too."""
        from aigc.data.speech import DIGITS
        from aigc.metrics.image import fid_from_features

        judge = self.judge()
        probs = judge.probabilities(waves, "digit").double()
        pred = probs.argmax(1).numpy()
        sums: dict[str, float] = {"n": float(len(waves))}
        for d in range(len(DIGITS)):
            sel = asked == d
            sums[f"asked/{d}"] = float(sel.sum())
            sums[f"correct/{d}"] = float((pred[sel] == d).sum())
            sums[f"prob/{d}"] = float(probs[:, d].sum())
        sums["plogp"] = float((probs * probs.clamp_min(1e-12).log()).sum())
        for k in ("frechet/heldout", "frechet/vocoded", "frechet/vocoder_floor",
                  "vocoded_accuracy", "frechet_weight"):  # fmt: skip
            sums[k] = 0.0
        if first:
            ref = self.reference()
            feats = judge.features(waves).numpy()
            sums["frechet/heldout"] = fid_from_features(feats, ref["real"])
            sums["frechet/vocoded"] = fid_from_features(feats, ref["vocoded"])
            sums["frechet/vocoder_floor"] = fid_from_features(ref["vocoded"], ref["real"])
            sums["vocoded_accuracy"] = float((ref["vocoded_pred"] == ref["digit"]).mean())
            sums["frechet_weight"] = 1.0
        return sums

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        from aigc.data.speech import DIGITS

        n = max(sums.get("n", 0.0), 1.0)
        per_digit = [sums[f"correct/{d}"] / sums[f"asked/{d}"]
                     for d in range(len(DIGITS)) if sums.get(f"asked/{d}", 0) > 0]  # fmt: skip
        out = {
            "digit_accuracy": sum(sums.get(f"correct/{d}", 0.0) for d in range(len(DIGITS))) / n,
            "digit_accuracy_min": float(min(per_digit, default=0.0)),
        }
        marginal = np.array([sums.get(f"prob/{d}", 0.0) for d in range(len(DIGITS))]) / n
        # E_x[KL(p(y|x) || p(y))] = E_x[sum p log p] - sum_y p(y) log p(y)
        kl = sums.get("plogp", 0.0) / n - float(
            (marginal * np.log(np.clip(marginal, 1e-12, None))).sum()
        )
        out["judge_score"] = float(np.exp(kl))
        weight = sums.get("frechet_weight", 0.0)
        if weight:
            for k in ("frechet/heldout", "frechet/vocoded", "frechet/vocoder_floor",
                      "vocoded_accuracy"):  # fmt: skip
                out[k] = sums[k] / weight
        judge = self.judge()
        out["judge_accuracy"] = float(judge.accuracy["digit"])
        for why in judge.weaknesses():
            warnings.warn(why, JudgeWarning, stacklevel=2)
        return out

    # samples during training --------------------------------------------------------
    def samples(self, model: nn.Module, step: int, device: torch.device) -> dict[str, Any]:
        """The picture grid (a row per digit) and the ten digits said in turn as sound."""
        from aigc.data.speech import DIGITS, SAMPLE_RATE, pictures_to_waves
        from aigc.samples import AudioSample
        from aigc.sampling.latent import sample_images

        out = super().samples(model, step, device)
        if self.coder is not None:
            return out
        col = self.attributes.index("digit")
        labels = torch.full((len(DIGITS), len(self.attributes)), -1, dtype=torch.long)
        labels[:, col] = torch.arange(len(DIGITS))
        pictures, _ = sample_images(model, len(DIGITS), labels, self.config.train.seed, device)
        waves = pictures_to_waves(pictures.cpu(), iters=self.config.data.vocoder_iters)
        gap = np.zeros(SAMPLE_RATE // 10, dtype=np.float32)
        said = np.concatenate([x for w in waves for x in (w, gap)])
        out["digits"] = AudioSample(said, SAMPLE_RATE)
        return out
