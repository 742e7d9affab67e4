"""GANs on images: prepared image data + the GAN family, as the trainer and loaders see it.

Everything but the family comes from ImageTask (aigc.tasks.images), including the
evaluation: a domain classifier's verdict on generated images.
"""

from __future__ import annotations

from torch import nn

from aigc.models.gan import GAN, GANConfig
from aigc.tasks.images import ImageTask


class GANTask(ImageTask):
    """Trains a GAN on a run's images; evaluates its samples with a domain classifier."""

    name = "gan"
    model_config = GANConfig
    model_class = GAN
    pipeline_class = "aigc.pipelines.image:ImagePipeline"
    headline_metric = "fid"
    loss_keys = frozenset({"d_loss", "g_loss"})

    def ema_module(self) -> nn.Module:
        return self.model.G  # the generator is what samples; D's average is never used
