"""GANs on images: prepared image data + the GAN family, as the trainer and loaders see it.

Everything but the family comes from ImageTask (aigc.tasks.images), including the
evaluation: a domain classifier's verdict on generated images.
"""

from __future__ import annotations

from aigc.models.gan import GAN, GANConfig
from aigc.tasks.images import ImageTask


class GANTask(ImageTask):
    """Trains a GAN on a run's images; evaluates its samples with a domain classifier."""

    family = "gan"
    model_config = GANConfig
    model_class = GAN
