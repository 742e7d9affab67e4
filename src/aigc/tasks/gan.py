"""GANs on images: prepared image data + the GAN family, as the trainer and loaders see it.

Evaluation uses a domain classifier trained once on the run's own (real,
labelled) images and cached (aigc.metrics.classifier): for a conditional model,
the share of samples classified as the class they were asked for; for any model,
the share of samples per predicted class (mode collapse shows as a class never
drawn) and the variety within each class against the real images of that class.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aigc.config import Config
from aigc.errors import ConfigError, DataError
from aigc.models.gan import GAN, GANConfig
from aigc.runs import RunDir
from aigc.tasks.images import (
    ImageData,
    ImageDataConfig,
    epoch_batch_indices,
    open_data,
    prepare,
    read_meta,
    to_model_batch,
)
from aigc.trainer import mix_seed


class GANTask:
    """Trains a GAN on a run's images; evaluates its samples with a domain classifier."""

    family = "gan"
    data_config = ImageDataConfig
    model_config = GANConfig
    item_name = "images"

    def __init__(self, config: Config, run: RunDir, data: ImageData | None, meta: dict[str, Any]):
        self.config = config
        self.run = run
        self.data = data
        self.meta = meta
        self.model: nn.Module = GAN(config.model)
        self.items_per_batch = config.train.batch_size
        self._classifier = None

    # construction -----------------------------------------------------------
    @staticmethod
    def prepare_data(config: Config, data_dir: Path, progress: bool = True) -> None:
        data = prepare(config.data, data_dir, seed=config.train.seed)
        GANTask._fit_model_to_data(config, data.meta)
        if len(data.train_images) < config.train.batch_size:
            raise DataError(
                f"{data.meta['source']}: {len(data.train_images)} training images, fewer than "
                f"train.batch_size={config.train.batch_size}; use more images or a smaller batch"
            )

    @staticmethod
    def _fit_model_to_data(config: Config, meta: dict[str, Any]) -> None:
        """Image size, channels and label sizes follow from the data; checked before training."""
        m: GANConfig = config.model
        m.image_size = int(meta["spec"]["image_size"])
        m.channels = int(meta["spec"]["channels"])
        if m.conditional:
            if not meta["attributes"]:
                raise ConfigError(
                    f"model.conditional=true but {meta['source']} has no labels "
                    "(an image folder needs one sub-folder per class); set model.conditional=false"
                )
            for a in meta["attributes"]:
                if len(meta["classes"][a]) < 2:
                    raise DataError(
                        f"{meta['source']}: {a!r} has a single class {meta['classes'][a]!r}; a "
                        "conditional model needs two or more (or set model.conditional=false)"
                    )
            m.num_classes = [len(meta["classes"][a]) for a in meta["attributes"]]
        else:
            m.num_classes = []
        if config.data.flip and "position" in meta["attributes"]:
            raise ConfigError(
                "data.flip=true would swap left and right but keep the position labels; "
                "leave flips off for this data (or choose data.labels without position)"
            )
        m.validate()

    @staticmethod
    def complete_config(config: Config, run: RunDir) -> None:
        """Fills what follows from an existing run's data (to compare configs on resume)."""
        GANTask._fit_model_to_data(config, read_meta(run.data_dir))

    @staticmethod
    def finish_config(config: Config, data_dir: Path) -> None:
        GANTask._fit_model_to_data(config, read_meta(data_dir))

    @staticmethod
    def install_data(tmp_dir: Path, run: RunDir) -> None:
        shutil.move(str(tmp_dir), run.data_dir)

    @classmethod
    def open(cls, config: Config, run: RunDir, with_data: bool = True) -> GANTask:
        meta = read_meta(run.data_dir)
        cls._fit_model_to_data(config, meta)
        return cls(config, run, open_data(run.data_dir) if with_data else None, meta)

    # what the model is conditioned on ---------------------------------------
    @property
    def attributes(self) -> list[str]:
        return list(self.meta["attributes"]) if self.config.model.conditional else []

    @property
    def classes(self) -> dict[str, list[str]]:
        return {a: list(self.meta["classes"][a]) for a in self.attributes}

    # training ---------------------------------------------------------------
    def train_batch(
        self, step: int, micro: int, rank: int, world: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A slice of global batch ``step``: epochs of fresh permutations, flips if asked."""
        from aigc.data.images import random_flip

        B = self.config.train.batch_size
        accum = self.config.train.grad_accum
        seed = self.config.train.seed
        train = self.data.train_images
        idx = epoch_batch_indices(len(train), step, B * accum * world, seed)
        part = micro * world + rank
        idx = idx[part * B : (part + 1) * B]
        images = to_model_batch(train[idx])
        if self.config.data.flip:
            images = random_flip(images, np.random.default_rng([seed, step, part, 1]))
        labels = None
        if self.attributes:
            labels = torch.from_numpy(self.data.split_labels("train")[idx])  # (B, A)
        return images, labels

    # evaluation -------------------------------------------------------------
    def classifier(self):
        """The cached domain classifier of this run's labelled images (None if unlabelled)."""
        if self._classifier is None and self.meta["attributes"]:
            from aigc.metrics.classifier import cached_classifier

            data = self.data or open_data(self.run.data_dir)
            labels = data.split_labels("train")
            # trained outside the caller's inference mode and autocast: always fp32
            with (
                torch.inference_mode(False),
                torch.enable_grad(),
                torch.autocast("cpu", enabled=False),
            ):
                self._classifier = cached_classifier(
                    f"{self.meta['sha256']}|{self.meta['n_train']}|{','.join(data.attributes)}",
                    data.train_images,
                    {a: labels[:, i] for i, a in enumerate(data.attributes)},
                    {a: data.classes[a] for a in data.attributes},
                )
        return self._classifier

    def eval_sums(
        self, model: nn.Module, rank: int, world: int, device: torch.device
    ) -> dict[str, float]:
        """Additive counts over this rank's share of ``data.eval_samples`` generated images."""
        clf = self.classifier()
        if clf is None:
            return {}
        n = max(1, self.config.data.eval_samples // world)
        images, requested = sample_images(
            model, n, None, self.config.train.seed + 1_000_003 * (rank + 1), device
        )
        predicted = clf.model.predict(images)  # on the classifier's device (CPU)
        sums: dict[str, float] = {"n": float(n)}
        first = self.meta["attributes"][0]
        for a in self.meta["attributes"]:
            counts = np.bincount(predicted[a].numpy(), minlength=len(self.meta["classes"][a]))
            for c, k in enumerate(counts):
                sums[f"count/{a}/{c}"] = float(k)
            if a in self.attributes:
                req = requested[:, self.attributes.index(a)].cpu()
                sums[f"correct/{a}"] = float((predicted[a] == req).sum())
        # variety within each class (of the first attribute): summed pairwise distances
        group = (
            requested[:, self.attributes.index(first)].cpu()
            if first in self.attributes
            else predicted[first]
        )
        flat = images.reshape(len(images), -1).double().cpu()
        for c in range(len(self.meta["classes"][first])):
            x = flat[group == c][:200]
            # every rank sends every key: the trainer all-reduces the sums by position
            pairs = len(x) * (len(x) - 1)
            sums[f"pairdist/{c}"] = float(torch.cdist(x, x).sum()) if pairs else 0.0
            sums[f"pairs/{c}"] = float(pairs)
        return sums

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """label_accuracy (conditional), min_class_share, classes_seen, diversity; per attribute
        with a suffix when the data has several."""
        if not sums:
            return {}
        clf = self.classifier()
        attrs = self.meta["attributes"]
        multi = len(attrs) > 1
        out: dict[str, float] = {}
        for a in attrs:
            suffix = f"/{a}" if multi else ""
            k = len(self.meta["classes"][a])
            counts = np.array([sums.get(f"count/{a}/{c}", 0.0) for c in range(k)])
            shares = counts / max(counts.sum(), 1.0)
            out[f"min_class_share{suffix}"] = float(shares.min())
            out[f"classes_seen{suffix}"] = float((counts > 0).mean())
            if f"correct/{a}" in sums:
                out[f"label_accuracy{suffix}"] = sums[f"correct/{a}"] / max(sums["n"], 1.0)
            out[f"classifier_accuracy{suffix}"] = float(clf.accuracy[a])
        ratios = []
        real = self._real_pair_distances()
        for c, r in real.items():
            pairs = sums.get(f"pairs/{c}", 0.0)
            if pairs > 0 and r > 0:
                ratios.append(sums[f"pairdist/{c}"] / pairs / r)
        if ratios:
            out["diversity"] = float(np.mean(ratios))  # 1 = as varied as the real class
            out["diversity_min"] = float(np.min(ratios))
        return out

    def _real_pair_distances(self) -> dict[int, float]:
        """Mean pairwise pixel distance of real training images per class of the first attribute."""
        from aigc.metrics.image import mean_pairwise_distance

        data = self.data or open_data(self.run.data_dir)
        labels = data.split_labels("train")
        out = {}
        for c in range(len(data.classes[data.attributes[0]])):
            idx = np.flatnonzero(labels[:, 0] == c)[:200]
            if len(idx) >= 2:
                out[c] = mean_pairwise_distance(to_model_batch(data.train_images[idx]))
        return out

    # samples during training --------------------------------------------------
    def samples(self, model: nn.Module, step: int, device: torch.device) -> dict[str, Any]:
        """A grid from fixed noise (and fixed labels: one row per class when there is one
        attribute), so the same latent points can be watched as training goes on."""
        from aigc.data.images import image_grid, to_uint8

        labels = None
        nrow = 8
        if len(self.attributes) == 1:
            k = model.cfg.num_classes[0]
            rows = min(k, 10)
            labels = torch.arange(rows).repeat_interleave(8)[:, None]  # (rows*8, 1)
        images, _ = sample_images(model, 64 if labels is None else len(labels), labels,
                                  self.config.train.seed, device)  # fmt: skip
        return {"grid": image_grid(to_uint8(images.cpu()), nrow=nrow)}


def sample_images(
    model: GAN,
    n: int,
    labels: torch.Tensor | None,
    seed: int | None,
    device: torch.device,
    batch_size: int = 500,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n images (n, C, H, W) in [-1, 1] and the labels they were asked for.

    labels (n, A) long, or None: a conditional model then draws every label at
    random, and entries of -1 are drawn at random too. With a seed, image i's noise
    and random labels come from a generator seeded by (seed, i) alone, so image i
    is the same whatever n and the batch size are.
    """
    z, drawn = _latents(model, n, seed)
    if model.cfg.conditional:
        labels = drawn if labels is None else torch.where(labels < 0, drawn, labels)
    else:
        labels = None
    out = []
    for i in range(0, n, batch_size):
        lab = None if labels is None else labels[i : i + batch_size].to(device)
        out.append(model.generate(z[i : i + batch_size].to(device), lab))
    images = torch.cat(out) if out else torch.zeros(0)
    return images, labels


def _latents(model: GAN, n: int, seed: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Noise (n, z_dim) and random labels (n, A) (None if unconditional), on the CPU."""
    conditional = model.cfg.conditional
    if seed is None:
        z = model.sample_z(n).cpu()
        return z, model.random_labels(n).cpu() if conditional else None
    zs, labels = [], []
    for i in range(n):
        gen = torch.Generator().manual_seed(mix_seed(seed, i))
        zs.append(torch.randn(1, model.cfg.z_dim, generator=gen))
        if conditional:
            labels.append(torch.stack([torch.randint(k, (1,), generator=gen)
                                       for k in model.cfg.num_classes], 1))  # fmt: skip
    return torch.cat(zs), torch.cat(labels) if conditional else None
