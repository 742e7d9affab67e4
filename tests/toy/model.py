"""The toy family: a diagonal Gaussian over pixels, the smallest latent image model.

x = mean + exp(log_std) * z with z ~ N(0, I) of the image's size; a conditional
model adds one learned mean image per class of each attribute. Trained by maximum
likelihood (the Gaussian's negative log-likelihood per pixel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from aigc.errors import ConfigError
from aigc.models.layers import LatentSampling


@dataclass
class ToyConfig:
    image_size: int = 0  # set from the data
    channels: int = 0  # set from the data
    conditional: bool = False
    num_classes: list[int] = field(default_factory=list)  # set from the data

    @property
    def z_dim(self) -> int:
        return self.channels * self.image_size**2

    def validate(self) -> None:
        if self.num_classes and not self.conditional:
            raise ConfigError("model.num_classes is set but model.conditional=false")


class ToyGaussian(LatentSampling, nn.Module):
    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = list(cfg.num_classes) if cfg.conditional else []
        shape = (cfg.channels, cfg.image_size, cfg.image_size)
        self.mean = nn.Parameter(torch.zeros(shape))
        self.log_std = nn.Parameter(torch.zeros(shape))
        self.class_means = nn.ParameterList(
            [nn.Parameter(torch.zeros(k, *shape)) for k in self.num_classes]
        )

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def _mean(self, labels: Tensor | None, n: int) -> Tensor:
        mu = self.mean.expand(n, -1, -1, -1)
        for a, table in enumerate(self.class_means):
            mu = mu + table[labels[:, a]]
        return mu

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"model": list(self.parameters())}

    def training_step(self, batch: dict[str, Tensor], step: Any) -> dict[str, Tensor]:
        x = batch["images"]
        labels = batch.get("labels") if self.num_classes else None
        mu = self._mean(labels, len(x))
        nll = (0.5 * ((x - mu) / self.log_std.exp()) ** 2 + self.log_std).mean()
        nll = nll + 0.5 * math.log(2 * math.pi)
        step.update("model", nll)
        return {"nll": nll.detach()}

    def generate(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        self.check_labels(labels, z.size(0))
        z = z.to(self.device).view(len(z), *self.mean.shape)
        mu = self._mean(None if labels is None else labels.to(self.device), len(z))
        return (mu + self.log_std.exp() * z).clamp(-1.0, 1.0)

    def interpolate(self, z0: Tensor, z1: Tensor, steps: int) -> Tensor:
        t = torch.linspace(0, 1, steps)[:, None]
        return (1 - t) * z0 + t * z1
