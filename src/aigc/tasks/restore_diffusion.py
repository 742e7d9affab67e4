"""Restoration by a conditional diffusion model: SR3 for super-resolution (Saharia et al.
2021, "Image Super-Resolution via Iterative Refinement"), Palette for other damage
(Saharia et al. 2022): the U-Net of aigc.models.diffusion reads the damaged image,
bicubically upsampled to the output's size, as extra input channels beside x_t, and
samples a clean image by any scheduler.

Data, damage, evaluation and the pipeline are the regression restorer's
(aigc.tasks.restore): the same held-out images, damaged from the same seeds, measured by
PSNR and SSIM and by FID/KID/precision/recall in the domain classifier's features. A
regression model answers with the mean of what could be there, so it wins on PSNR; the
diffusion model samples one plausible answer, so it should win on FID: the
distortion-perception trade-off (Blau & Michaeli 2018) read off one table.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from torch import nn

from aigc.config import Config
from aigc.data.degrade import bicubic_upsample
from aigc.errors import ConfigError
from aigc.models.diffusion import Diffusion, DiffusionConfig
from aigc.tasks.restore import RestoreTask
from aigc.trainer import mix_seed


class RestoreDiffusionTask(RestoreTask):
    """Learns p(clean | damaged) by denoising diffusion conditioned on the damaged image."""

    name = "restore_diffusion"
    model_config = DiffusionConfig
    model_class = Diffusion
    loss_keys = frozenset({"loss"})
    resumable_keys = RestoreTask.resumable_keys | {"model.sampler", "model.sample_steps"}

    @classmethod
    def _fit_model_to_data(cls, config: Config, meta: dict[str, Any]) -> None:
        m = config.model
        if m.conditional or m.text:
            raise ConfigError(
                "family restore_diffusion is conditioned on the damaged image only; set "
                "model.conditional=false and model.text=false"
            )
        m.image_size = int(meta["spec"]["image_size"])
        m.channels = int(meta["spec"]["channels"])
        m.cond_channels = m.channels
        m.num_classes = []
        m.validate()

    @property
    def input_size(self) -> int | None:
        """A diffusion restorer samples at its training size only."""
        return self.config.model.image_size // self.degradation.factor

    def condition(self, degraded: np.ndarray) -> torch.Tensor:
        """Damaged (B, h, w, C) uint8 -> the U-Net's image condition (B, C, H, W) in
        [-1, 1]: upsampled bicubically for super-resolution (SR3, §2), else as it is."""
        from aigc.data.images import to_tensor

        f = self.degradation.factor
        return to_tensor(bicubic_upsample(degraded, f) if f > 1 else degraded)

    def pair(self, clean: np.ndarray, seeds: list) -> dict[str, torch.Tensor]:
        """The diffusion family's batch: ``images`` (the truth) and ``cond``."""
        from aigc.data.images import to_tensor

        return {"images": to_tensor(clean), "cond": self.condition(self.degradation.apply(clean, seeds))}  # fmt: skip

    def restore_batch(self, model: nn.Module, degraded: np.ndarray, device: torch.device,
                      seeds: list) -> torch.Tensor:  # fmt: skip
        """Samples a clean image for each damaged one by model.sampler over
        model.sample_steps (see ``sampling_with``), image i from noise drawn from
        ``seeds[i]`` alone, so a batch gives each image what it would get alone (with a
        deterministic scheduler; an ancestral one draws its fresh noise per batch)."""
        c = model.cfg
        z = torch.cat([
            torch.randn(1, c.z_dim, generator=torch.Generator().manual_seed(mix_seed(*_flat(s))))
            for s in seeds
        ])  # fmt: skip
        gen = torch.Generator(device=device).manual_seed(mix_seed(*_flat(seeds[0]), 1))
        return model.generate(z.to(device), generator=gen,
                              cond=self.condition(degraded).to(device)).float().cpu()  # fmt: skip

    def sampling_with(
        self, model: nn.Module, scheduler: str | None, steps: int | None
    ) -> contextlib.AbstractContextManager[Any]:
        """The model samples with ``scheduler`` over ``steps`` while inside (ConfigError
        for an unknown scheduler or steps out of range)."""
        from aigc.tasks.diffusion import sampling_with

        return sampling_with(model, scheduler, steps)


def _flat(seed: Any) -> list[int]:
    return [int(v) for v in (seed if isinstance(seed, list | tuple) else [seed])]
