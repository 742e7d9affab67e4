"""Spoken-word generation (SC09-style): the diffusion family on one-second log-mel
pictures of the embedded spoken digits, or of the user's own clips, turned back into
sound by Griffin-Lim.

The pictures are the house's images (``data.source: spoken-digits``, a row per mel band,
a column per 16 ms frame), so training, sampling, guidance and the pipeline are the
diffusion family's own. ``data.source`` may instead be a folder of audio files, one
sub-folder per class (``root/<class>/<file>.wav``, Hugging Face's audiofolder layout;
``aigc.data.speech.read_audio_folder``): each clip is made a one-second picture as the
digits are, the classes are what the model is asked for (``--class NAME``), and a
seeded ``data.val_fraction`` of the clips is held out. What is new is the evaluation,
made on the sound: each generated picture becomes a waveform and the cached audio judge
(``aigc.metrics.audio_classifier``) says which digit (or class) it hears. Reported (for
a folder, ``class_*`` in place of ``digit_*``, and the judge learns from the run's own
training clips):

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
from aigc.errors import CheckpointError, ConfigError, DataError
from aigc.metrics.classifier import JudgeWarning
from aigc.tasks.diffusion import DiffusionDataConfig, DiffusionTask
from aigc.tasks.images import open_data

HELDOUT_ROWS = "spoken_heldout.json"  # the held-out pictures' rows in the embedded clips
CLIPS_FILE = "spoken_clips.npy"  # a folder's clips (N, 16000) int16, in the pictures' order
SOURCE = "spoken-digits"


def word_attribute(source: str) -> str:
    """The label that names what is said: "digit" for the embedded digits, "class" for a
    folder of audio files."""
    return "digit" if source == SOURCE else "class"


@dataclass
class SpokenDataConfig(DiffusionDataConfig):
    """The spoken digits (or a folder of audio files) as pictures, and how generated
    clips are judged."""

    source: str = SOURCE  # spoken-digits, or a folder of audio files, one sub-folder per class
    image_size: int = 64  # mel bands = frames per second
    # what the model is asked for; [] = what is said: digit (spoken-digits), class (a folder)
    labels: list[str] = field(default_factory=list)
    eval_samples: int = 500  # generated clips per evaluation
    eval_metrics: list[str] = field(default_factory=list)  # picture metrics: none by default
    judge_steps: int = 600  # training steps of the cached audio judge
    vocoder_iters: int = 64  # Griffin-Lim iterations from picture to sound

    def validate(self) -> None:
        from aigc.data.images import EMBEDDED

        super().validate()
        if (self.source in EMBEDDED and self.source != SOURCE) or not self.source.strip():
            raise ConfigError(f"data.source={self.source!r}: a spoken run reads {SOURCE!r} or "
                              "a folder of audio files, one sub-folder per class")  # fmt: skip
        if not self.labels:  # filled here so that the saved config says it
            self.labels = [word_attribute(self.source)]
        if self.judge_steps < 1 or self.vocoder_iters < 1:
            raise ConfigError(
                f"data.judge_steps={self.judge_steps} and data.vocoder_iters="
                f"{self.vocoder_iters} must be at least 1"
            )


class SpokenTask(DiffusionTask):
    """DiffusionTask on spoken-word pictures, evaluated by ear (the audio judge)."""

    name = "spoken"
    data_config = SpokenDataConfig
    pipeline_class = "aigc.pipelines.spoken:SpokenPipeline"
    headline_metric = "digit_accuracy"  # class_accuracy for a folder of audio files
    item_name = "clips"
    sample_hint = "--class seven --n 8 --out sevens/"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._judge = None
        self._reference: dict[str, np.ndarray] | None = None

    @property
    def headline(self) -> str:
        return f"{self.word}_accuracy"

    @property
    def word(self) -> str:
        """The label the judge names: "digit", or "class" for a folder of audio files."""
        return word_attribute(self.meta["spec"]["source"])

    @property
    def embedded(self) -> bool:
        return self.meta["spec"]["source"] == SOURCE

    @classmethod
    def prepare_data(cls, config: Config, data_dir: Path, progress: bool = True) -> None:
        from aigc.data.speech import (
            audio_folder_pictures,
            forget_audio_folders,
            spoken_digit_pictures,
        )

        d = config.data
        if d.source != SOURCE:
            # read as audio first, so that a bad folder is named as one (and the pictures
            # are cached for the image reader below)
            audio_folder_pictures(d.source, d.image_size, d.split, d.skip_bad)
        super().prepare_data(config, data_dir, progress)
        # which clip each picture is, found by its pixels
        data = open_data(data_dir)
        size = int(data.meta["spec"]["image_size"])
        if d.source == SOURCE:
            pictures, clips = spoken_digit_pictures(size)
            waves, wanted = clips.waves, data.val_images
        else:
            pictures, folder = audio_folder_pictures(d.source, size, d.split, d.skip_bad)
            waves, wanted = folder.waves, data.images
        by_hash: dict[str, int] = {}
        for i, p in enumerate(pictures):
            by_hash.setdefault(hashlib.sha256(p.tobytes()).hexdigest(), i)
        rows = [by_hash.get(hashlib.sha256(np.ascontiguousarray(p[..., :1]).tobytes())
                            .hexdigest(), -1) for p in wanted]  # fmt: skip
        if min(rows, default=0) < 0:
            raise DataError(f"{d.source}: a prepared picture matches no clip (flite changed?)")
        if d.source == SOURCE:
            (data_dir / HELDOUT_ROWS).write_text(json.dumps({"rows": rows}))
        else:  # the clips themselves: the judge learns from them, the held-out are the reference
            pcm = np.round(np.clip(waves[rows], -1, 1) * 32767).astype(np.int16)
            np.save(data_dir / CLIPS_FILE, pcm, allow_pickle=False)
            forget_audio_folders()  # training reads the prepared files, not the cache

    @classmethod
    def check_data_fit(cls, config: Config, meta: dict[str, Any]) -> None:
        word = word_attribute(meta["spec"]["source"])
        if word not in meta["attributes"]:
            raise ConfigError(f"a spoken run is judged by {word}: keep {word!r} in data.labels")
        if not config.model.conditional and not config.model.text:
            raise ConfigError(
                f"a spoken run makes the {word} it is asked for: set model.conditional=true "
                "(or model.text=true with captions)"
            )

    # the judge and the real clips -------------------------------------------------
    def clips(self) -> np.ndarray:
        """A folder run's clips (N, 16000) float32 in [-1, 1], training clips first."""
        path = self.run.data_dir / CLIPS_FILE
        try:
            pcm = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: the prepared clips are missing or damaged ({e}); "
                                  "prepare the run's data again") from None  # fmt: skip
        return np.asarray(pcm, dtype=np.float32) / 32767

    def judge(self):
        """The audio judge: of the embedded digits, or of a folder run's own clips (it
        learns from the training clips and is measured on the held-out ones); trained
        once, then cached."""
        if self._judge is None:
            from aigc.metrics.audio_classifier import cached_audio_judge, spoken_digit_judge

            steps = self.config.data.judge_steps
            if self.embedded:
                self._judge = spoken_digit_judge(steps=steps)
            else:
                data = self.data or open_data(self.run.data_dir)
                col = data.attributes.index("class")
                n = len(data.images)
                key = f"audio-folder|{self.meta['sha256']}|n={n}|train={data.n_train}"
                self._judge = cached_audio_judge(
                    key, self.clips(), {"class": np.asarray(data.labels[:, col])},
                    {"class": list(data.classes["class"])}, np.arange(n) >= data.n_train,
                    steps=steps,
                )  # fmt: skip
        return self._judge

    def reference(self) -> dict[str, np.ndarray]:
        """The judge's features of the held-out real clips ("real") and of their
        pictures' Griffin-Lim reconstructions ("vocoded"), with the reconstructions'
        judged words ("vocoded_pred") and the true ones ("truth")."""
        if self._reference is None:
            from aigc.data.speech import pictures_to_waves, spoken_digits

            data = self.data or open_data(self.run.data_dir)
            if self.embedded:
                path = self.run.data_dir / HELDOUT_ROWS
                if not path.is_file():
                    raise DataError(f"{path} is missing: prepare the run's data again")
                rows = np.asarray(json.loads(path.read_text())["rows"], dtype=np.int64)
                clips = spoken_digits()
                real, truth = clips.waves[rows], np.asarray(clips.digit[rows])
            else:
                real = self.clips()[data.n_train :]
                truth = np.asarray(data.split_labels("val")[:, data.attributes.index("class")])
            vocoded = pictures_to_waves(data.val_images, iters=self.config.data.vocoder_iters)
            judge = self.judge()
            self._reference = {
                "real": judge.features(real).numpy(),
                "vocoded": judge.features(vocoded).numpy(),
                "vocoded_pred": judge.predict(vocoded)[self.word].numpy(),
                "truth": truth,
            }
        return self._reference

    # evaluation ---------------------------------------------------------------------
    def eval_sums(
        self, model: nn.Module, rank: int, world: int, device: torch.device
    ) -> dict[str, float]:
        """This rank's share of ``data.eval_samples`` clips, the words asked for in turn,
        judged by ear; the Fréchet distances on rank 0's clips."""
        from aigc.data.speech import pictures_to_waves
        from aigc.sampling.latent import sample_images

        n = max(1, self.config.data.eval_samples // world)
        col = self.attributes.index(self.word)
        labels = torch.full((n, len(self.attributes)), -1, dtype=torch.long)
        labels[:, col] = (torch.arange(n) + rank * n) % len(self.classes[self.word])
        seed = self.config.train.seed + 1_000_003 * (rank + 1)
        pictures, requested = sample_images(model, n, labels, seed, device)
        waves = pictures_to_waves(pictures.cpu(), iters=self.config.data.vocoder_iters)
        return self.judge_waves(waves, requested[:, col].numpy(), first=rank == 0)

    def judge_waves(self, waves: np.ndarray, asked: np.ndarray, first: bool) -> dict[str, float]:
        """Additive counts of the judge's verdict on ``waves`` (N, 16000) asked to say
        ``asked`` (N,) words (class indices); with ``first``, the Fréchet distances too."""
        from aigc.metrics.image import fid_from_features

        judge = self.judge()
        probs = judge.probabilities(waves, self.word).double()
        pred = probs.argmax(1).numpy()
        sums: dict[str, float] = {"n": float(len(waves))}
        for d in range(probs.shape[1]):
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
            sums["vocoded_accuracy"] = float((ref["vocoded_pred"] == ref["truth"]).mean())
            sums["frechet_weight"] = 1.0
        return sums

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        word = self.word
        n = max(sums.get("n", 0.0), 1.0)
        count = sum(1 for k in sums if k.startswith("asked/"))  # the classes judged
        per_class = [sums[f"correct/{d}"] / sums[f"asked/{d}"]
                     for d in range(count) if sums[f"asked/{d}"] > 0]  # fmt: skip
        out = {
            f"{word}_accuracy": sum(sums[f"correct/{d}"] for d in range(count)) / n,
            f"{word}_accuracy_min": float(min(per_class, default=0.0)),
        }
        marginal = np.array([sums[f"prob/{d}"] for d in range(count)]) / n
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
        out["judge_accuracy"] = float(judge.accuracy[word])
        for why in judge.weaknesses():
            warnings.warn(why, JudgeWarning, stacklevel=2)
        return out

    # samples during training --------------------------------------------------------
    def samples(self, model: nn.Module, step: int, device: torch.device) -> dict[str, Any]:
        """The picture grid, and each digit (or class, the first 16) said in turn as sound."""
        from aigc.data.speech import SAMPLE_RATE, pictures_to_waves
        from aigc.samples import AudioSample
        from aigc.sampling.latent import sample_images

        out = super().samples(model, step, device)
        if self.coder is not None:
            return out
        col = self.attributes.index(self.word)
        k = min(len(self.classes[self.word]), 16)
        labels = torch.full((k, len(self.attributes)), -1, dtype=torch.long)
        labels[:, col] = torch.arange(k)
        pictures, _ = sample_images(model, k, labels, self.config.train.seed, device)
        waves = pictures_to_waves(pictures.cpu(), iters=self.config.data.vocoder_iters)
        gap = np.zeros(SAMPLE_RATE // 10, dtype=np.float32)
        said = np.concatenate([x for w in waves for x in (w, gap)])
        out["digits" if self.embedded else "classes"] = AudioSample(said, SAMPLE_RATE)
        return out
