"""Diffusion on images: prepared image data + the diffusion family (aigc.models.diffusion).

Everything but the model comes from ImageTask (data, batches, the domain classifier's
verdict on generated images, FID/KID/PR in its features); the model samples through a
scheduler from starting noise, which plays the latent's part.
"""

from __future__ import annotations

from aigc.models.diffusion import Diffusion, DiffusionConfig
from aigc.tasks.images import ImageTask


class DiffusionTask(ImageTask):
    """Trains a denoiser on a run's images; evaluates its samples like the GAN's."""

    name = "diffusion"
    model_config = DiffusionConfig
    model_class = Diffusion
    pipeline_class = "aigc.pipelines.diffusion:DiffusionPipeline"
    headline_metric = "fid"
    loss_keys = frozenset({"loss"})
    resumable_keys = ImageTask.resumable_keys | {
        "model.sampler",
        "model.sample_steps",
        "model.guidance",
    }
