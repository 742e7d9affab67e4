"""The toy family's pipeline: an image pipeline with one verb of its own."""

from __future__ import annotations

from typing import ClassVar

import torch

from aigc.pipelines.image import ImagePipeline, image_output


class ToyPipeline(ImagePipeline):
    verbs: ClassVar[frozenset[str]] = ImagePipeline.verbs | {"mean_image"}

    def mean_image(self, output: str = "tensor") -> torch.Tensor:
        """The learned mean image (1, C, H, W)."""
        with torch.inference_mode():
            return image_output(self.model.mean[None].clamp(-1, 1).cpu(), output)
