"""GANs on images: prepared image data + the GAN family, as the trainer and loaders see it.

Evaluation uses a domain classifier trained once on the run's own (real,
labelled) images and cached (aigc.metrics.classifier): for a conditional model,
the share of samples classified as the class they were asked for; for any model,
the share of samples per predicted class (mode collapse shows as a class never
drawn) and the variety within each class against the real images of that class.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from aigc.models.gan import GAN, GANConfig
from aigc.tasks.images import ImageTask, open_data, to_model_batch
from aigc.trainer import mix_seed


class GANTask(ImageTask):
    """Trains a GAN on a run's images; evaluates its samples with a domain classifier."""

    family = "gan"
    model_config = GANConfig
    model_class = GAN

    # evaluation -------------------------------------------------------------
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
