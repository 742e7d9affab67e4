"""Restoration and super-resolution: clean images the user gives, damaged on the fly,
and a model (aigc.models.restore) that learns to undo the damage.

The run's prepared images are the truth. Every training step damages its batch afresh
(aigc.data.degrade: Gaussian noise, JPEG, missing blocks or downsampling), seeded by
(run seed, step, row), so a resumed run sees the damage an uninterrupted one would.
Evaluation damages each held-out image once, from its own seed, and reports PSNR and
SSIM (aigc.metrics.restoration) of the model's 8-bit output against the truth, beside
those of the damaged input (for super-resolution: of bicubic upsampling) and of the
classical baseline (aigc.data.degrade.classical), so a run's gain is read off one table.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from aigc.config import Config
from aigc.data.degrade import Degradation, baseline_name, classical
from aigc.errors import ConfigError
from aigc.models.restore import Restorer, RestorerConfig
from aigc.tasks.images import ImageDataConfig, ImageTask, epoch_batch_indices, open_data

VAL_SEED = 7919  # mixed into each held-out image's damage seed
EVAL_BATCH = 64
MIN_SIZE = 16  # SSIM's 11x11 window must fit


@dataclass
class RestoreDataConfig(ImageDataConfig):
    """The clean images (as for every image task) and the damage to undo."""

    degradation: str = "noise"  # noise, jpeg, blocks or downsample (super-resolution)
    noise_sigma: float = 0.2  # noise: standard deviation, a fraction of the pixel range
    jpeg_quality: int = 20  # jpeg: Pillow's quality, 1..95
    blocks: int = 2  # blocks: how many squares are lost (set to black)
    block_size: int = 8  # blocks: their side in pixels
    scale: int = 1  # downsample: 2, 3 or 4 (image_size is the high-resolution side)

    def validate(self) -> None:
        super().validate()
        if self.image_size < MIN_SIZE:
            raise ConfigError(
                f"data.image_size={self.image_size}: restoration needs at least {MIN_SIZE} "
                "pixels (SSIM's 11x11 window)"
            )
        self.degradation_spec().validate(self.image_size)

    def degradation_spec(self) -> Degradation:
        return Degradation(self.degradation, float(self.noise_sigma), int(self.jpeg_quality),
                           int(self.blocks), int(self.block_size), int(self.scale))  # fmt: skip


class RestoreTask(ImageTask):
    """Learns to restore the run's images from their damaged versions."""

    name = "restore"
    data_config = RestoreDataConfig
    model_config = RestorerConfig
    model_class = Restorer
    pipeline_class = "aigc.pipelines.restore:RestorePipeline"
    headline_metric = "psnr"
    loss_keys = frozenset({"loss", "pixel", "critic", "adversarial"})
    sample_verb = "restore"
    sample_hint = "--image damaged.png --out restored.png"
    resumable_keys = frozenset({"data.eval_samples"})

    def __init__(self, config: Config, run: Any, data: Any, meta: dict[str, Any]):
        super().__init__(config, run, data, meta)
        self.degradation = config.data.degradation_spec()

    @classmethod
    def _fit_model_to_data(cls, config: Config, meta: dict[str, Any]) -> None:
        m = config.model
        m.image_size = int(meta["spec"]["image_size"])
        m.channels = int(meta["spec"]["channels"])
        m.scale = config.data.degradation_spec().factor
        m.validate()

    @property
    def input_size(self) -> int | None:
        """The side of the damaged images the model takes; None: any (convolutional)."""
        return None

    @property
    def attributes(self) -> list[str]:
        return []  # a restorer is conditioned on its input image only

    # training ---------------------------------------------------------------
    def pair(self, clean: np.ndarray, seeds: list) -> dict[str, torch.Tensor]:
        """``degraded`` and ``clean`` model batches (B, C, h, w), (B, C, H, W) in [-1, 1]
        from clean (B, H, W, C) uint8 images, image i damaged from ``seeds[i]``."""
        from aigc.data.images import to_tensor

        return {"degraded": to_tensor(self.degradation.apply(clean, seeds)),
                "clean": to_tensor(clean)}  # fmt: skip

    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        B = self.config.train.batch_size
        seed = self.config.train.seed
        train = self.data.train_images
        idx = epoch_batch_indices(len(train), step, B * self.config.train.grad_accum * world, seed)
        part = micro * world + rank
        clean = np.array(train[idx[part * B : (part + 1) * B]])
        if self.config.data.flip:
            flip = np.random.default_rng([seed, step, part, 1]).random(len(clean)) < 0.5
            clean[flip] = clean[flip, :, ::-1]
        return self.pair(clean, [[seed, step, part, r] for r in range(len(clean))])

    # evaluation -------------------------------------------------------------
    def val_seeds(self, rows: np.ndarray) -> list[list[int]]:
        """The damage seed of each held-out image: fixed per image, whatever the batch."""
        return [[self.config.train.seed, VAL_SEED, int(r)] for r in rows]

    def restore_batch(self, model: nn.Module, degraded: np.ndarray, device: torch.device,
                      seeds: list) -> torch.Tensor:  # fmt: skip
        """Damaged (B, h, w, C) uint8 -> restored (B, C, H, W) float32 in [-1, 1] on the
        CPU, by ``model`` (a family that samples draws image i's randomness from
        ``seeds[i]``)."""
        from aigc.data.images import to_tensor

        with torch.no_grad():  # a large image a tile at a time (Restorer.tiled)
            return model.tiled(to_tensor(degraded).to(device)).float().clamp(-1, 1).cpu()

    def sampling_with(
        self, model: nn.Module, scheduler: str | None, steps: int | None
    ) -> contextlib.AbstractContextManager[Any]:
        """A regression restorer does not sample: ConfigError when a scheduler or steps
        are asked for (a sampling family overrides this)."""
        if scheduler is not None or steps is not None:
            raise ConfigError(
                f"{self.run.path} is a regression restorer ({self.name}); it takes no "
                "scheduler or steps (those are for family restore_diffusion)"
            )
        return contextlib.nullcontext()

    def eval_sums(
        self, model: nn.Module, rank: int, world: int, device: torch.device
    ) -> dict[str, float]:
        """Summed PSNR (dB) and SSIM over this rank's share of the held-out images, of the
        model's output, the damaged input (scale 1) and the classical baseline; and in one
        process, FID/KID/precision/recall (data.eval_metrics) of the restored and of the
        baseline's images against the training images, in the domain classifier's features
        (distortion and perception side by side: Blau & Michaeli 2018)."""
        from aigc.data.images import to_tensor, to_uint8
        from aigc.metrics.restoration import psnr, ssim

        data = self.data or open_data(self.run.data_dir)
        val = data.val_images[: self.config.data.eval_samples]
        rows = np.arange(rank, len(val), world)
        keys = ["psnr", "ssim", "psnr_baseline", "ssim_baseline"]
        if self.degradation.factor == 1:
            keys += ["psnr_degraded", "ssim_degraded"]
        sums = dict.fromkeys(["count", *keys], 0.0)
        kept: dict[str, list[np.ndarray]] = {"": [], "_baseline": []}
        for i in range(0, len(rows), EVAL_BATCH):
            part = rows[i : i + EVAL_BATCH]
            clean = np.array(val[part])
            seeds = self.val_seeds(part)
            degraded = self.degradation.apply(clean, seeds)
            found = {"": to_uint8(self.restore_batch(model, degraded, device, seeds)),
                     "_baseline": classical(self.degradation, degraded)}  # fmt: skip
            if self.degradation.factor == 1:
                found["_degraded"] = degraded
            for suffix, images in found.items():
                sums[f"psnr{suffix}"] += float(psnr(images, clean).sum())
                sums[f"ssim{suffix}"] += float(ssim(images, clean).sum())
                if suffix in kept:
                    kept[suffix].append(images)
            sums["count"] += len(part)
        if world == 1 and len(rows):
            for suffix, images in kept.items():
                got = self.feature_sums(model, device, to_tensor(np.concatenate(images)))
                sums.update({f"{k}{suffix}": v for k, v in got.items()})
        return sums

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Means per image, and psnr_gain: dB over the damaged input (over bicubic for
        super-resolution), psnr_over_baseline: dB over the classical filter; fid, kid, ...
        and fid_baseline, ... where measured."""
        n = sums.get("count", 0.0)
        if not n:
            return {}
        out = {k: v / n for k, v in sums.items() if k != "count" and not k.startswith("feature/")}
        reference = out.get("psnr_degraded", out["psnr_baseline"])
        out["psnr_gain"] = out["psnr"] - reference
        out["psnr_over_baseline"] = out["psnr"] - out["psnr_baseline"]
        out["count"] = n
        out.update({k[len("feature/") :]: v for k, v in sums.items() if k.startswith("feature/")})
        return out

    def eval_info(self) -> dict[str, str]:
        return {"degradation": self.degradation.describe(),
                "baseline": baseline_name(self.degradation)}  # fmt: skip

    def samples(self, model: nn.Module, step: int, device: torch.device) -> dict[str, Any]:
        """Eight held-out images in three rows: damaged (enlarged by pixel repetition for
        super-resolution), restored, and the truth."""
        from aigc.data.images import image_grid, to_uint8

        data = self.data or open_data(self.run.data_dir)
        rows = np.arange(min(8, len(data.val_images)))
        clean = np.array(data.val_images[rows])
        degraded = self.degradation.apply(clean, self.val_seeds(rows))
        restored = to_uint8(self.restore_batch(model, degraded, device, self.val_seeds(rows)))
        f = self.degradation.factor
        degraded = degraded.repeat(f, axis=1).repeat(f, axis=2)
        grid = image_grid(np.concatenate([degraded, restored, clean]), nrow=len(rows))
        return {"restorations": grid}
