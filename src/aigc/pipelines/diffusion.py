"""The diffusion pipeline: an image pipeline whose sampling takes diffusers' arguments."""

from __future__ import annotations

from typing import Any

import torch

from aigc.errors import ConfigError, RequestError
from aigc.pipelines.base import ImageOutput, check_count
from aigc.pipelines.image import ImagePipeline


class DiffusionPipeline(ImagePipeline):
    """``pipe(n, labels=..., num_inference_steps=..., guidance_scale=..., scheduler=...,
    seed=...)`` -> ImageOutput, with diffusers' argument names; ``generate`` as for
    every image pipeline, with the run's default sampler, steps and guidance."""

    def __call__(
        self,
        n: int = 1,
        labels: Any = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        seed: int | None = None,
    ) -> ImageOutput:
        from aigc.sampling.latent import draw_latents

        check_count(n)
        steps = num_inference_steps or self.config.model.sample_steps
        check_count(steps, limit=self.config.model.num_train_timesteps, what="num_inference_steps")
        try:
            sched = self.model.scheduler(scheduler)
        except ConfigError as e:
            raise RequestError(str(e)) from None
        lab = self.labels_for(n, labels)
        z, drawn = draw_latents(self.model, n, seed)
        if self.model.cfg.conditional:
            lab = drawn if lab is None else torch.where(lab < 0, drawn, lab)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.inference_mode():
            images = self.model.generate(z, lab, sched, steps, guidance_scale, generator=gen)
        return self.postprocess(ImageOutput(images.cpu(), lab, seed))
