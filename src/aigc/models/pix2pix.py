"""pix2pix: paired image-to-image translation (Isola et al. 2017, "Image-to-Image
Translation with Conditional Adversarial Networks").

Given pairs (x, y), a generator G learns y from x under two losses: an L1 distance
to the true y, which gets the low frequencies right, and a conditional critic D(x, y)
that judges each patch of the pair (PatchGAN), which keeps the output sharp:

    G* = arg min_G max_D  L_cGAN(G, D) + lambda * E|y - G(x)|_1,   lambda = 100  (eq. 4)

- generator (§3.2.1, App. 6.1.1): a U-Net, an encoder C64-C128-C256-C512-C512-...
  halving the image down to 1x1 (4x4 convolutions, stride 2, LeakyReLU 0.2, norm on
  all but the first and the innermost layer) and a mirrored decoder (transposed
  convolutions, ReLU) whose every layer also reads the encoder layer of its size (skip
  connections); dropout 0.5 in the decoder's widest middle layers, as the paper's code;
  tanh out. Instance norm rather than the paper's batch norm at batch size 1, which is
  the same computation, so batches of any size give each image the same output;
- critic: models.layers.PatchDiscriminator on the pair concatenated channel-wise;
- ``gan_loss``: "bce" (the paper's log likelihood, the generator's term non-saturating)
  or "lsgan" (least squares, as CycleGAN); the critic's loss is halved (§3.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aigc.errors import ConfigError
from aigc.models.layers import (
    PatchDiscriminator,
    check_choices,
    check_int,
    check_weights,
    least_squares_critic_loss,
    least_squares_generator_loss,
)

GAN_LOSSES = ("bce", "lsgan")
DIRECTIONS = ("a2b", "b2a")


@dataclass
class Pix2PixConfig:
    image_size: int = 0  # training images' side, a power of two >= 8; 0 = set from the data
    channels: int = 0  # 0 = set from the data
    direction: str = "a2b"  # which way it translates; set from data.direction
    width: int = 64  # the U-Net's first width (C64); later layers double it, up to 8x
    dropout: float = 0.5  # in the decoder's 8x-wide middle layers (none below 64 pixels)
    d_width: int = 64  # the critic's first width
    d_layers: int = 3  # the critic's strided layers (3: 70x70 patches)
    l1_weight: float = 100.0  # lambda of eq. 4
    gan_loss: str = "bce"  # bce (the paper) or lsgan

    def validate(self) -> None:
        check_choices(self, {"direction": DIRECTIONS, "gan_loss": GAN_LOSSES})
        for key, low in (("image_size", 0), ("channels", 0), ("width", 1), ("d_width", 1),
                         ("d_layers", 1)):  # fmt: skip
            check_int(f"model.{key}", getattr(self, key), low)
        check_weights(self, ("l1_weight", "dropout"))
        if self.dropout >= 1:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        size = self.image_size
        if size and (size < 8 or size & (size - 1)):
            raise ConfigError(
                f"model.image_size={size}: the U-Net halves the image down to 1x1, so it "
                "needs a power of two >= 8 (e.g. 32, 64 or 256)"
            )
        if size and size < 2 ** (self.d_layers + 2):
            raise ConfigError(
                f"model.d_layers={self.d_layers} halves {size}-pixel images below one "
                f"patch; use model.d_layers={max(1, size.bit_length() - 4)}"
            )


class UNetLevel(nn.Module):
    """One level of the U-Net: down (conv 4x4/2), the inner levels, up (transposed conv
    4x4/2), and the skip that concatenates this level's input to its output."""

    def __init__(self, outer: int, inner: int, sub: nn.Module | None, *, outermost: bool = False,
                 out_channels: int = 0, dropout: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        innermost = sub is None
        down: list[nn.Module] = [] if outermost else [nn.LeakyReLU(0.2, True)]
        down.append(nn.Conv2d(outer, inner, 4, 2, 1, bias=outermost or innermost))
        if not (outermost or innermost):
            down.append(nn.InstanceNorm2d(inner))
        up_in = inner if innermost else inner * 2  # the inner level returns its skip too
        up: list[nn.Module] = [nn.ReLU(True)]
        if outermost:
            up += [nn.ConvTranspose2d(up_in, out_channels, 4, 2, 1), nn.Tanh()]
        else:
            up += [nn.ConvTranspose2d(up_in, outer, 4, 2, 1, bias=False), nn.InstanceNorm2d(outer)]
            if dropout:
                up.append(nn.Dropout(dropout))
        self.down, self.sub, self.up = nn.Sequential(*down), sub, nn.Sequential(*up)
        self.outermost = outermost

    def forward(self, x: Tensor) -> Tensor:
        h = self.down(x)
        if self.sub is not None:
            h = self.sub(h)
        h = self.up(h)
        return h if self.outermost else torch.cat([x, h], dim=1)


class UNetGenerator(nn.Module):
    """Image (B, C, H, W) in [-1, 1] -> image (B, C, H, W) in [-1, 1]; built for
    ``image_size`` (log2 levels, down to 1x1), and any side that is a multiple of it."""

    def __init__(self, channels: int, image_size: int, width: int, dropout: float) -> None:
        super().__init__()
        levels = image_size.bit_length() - 1
        widths = [width * min(2**i, 8) for i in range(levels)]  # level i's output width
        # innermost first: level levels-1 reads widths[-2] channels and makes widths[-1]
        sub: nn.Module | None = None
        for i in range(levels - 1, 0, -1):
            wide_middle = widths[i] == width * 8 and i < levels - 1 and i >= 4
            sub = UNetLevel(widths[i - 1], widths[i], sub, dropout=dropout if wide_middle else 0)
        self.net = UNetLevel(channels, widths[0], sub, outermost=True, out_channels=channels)
        for m in self.modules():  # N(0, 0.02) as the pix2pix code
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Pix2Pix(nn.Module):
    """A U-Net generator ``g`` and a conditional PatchGAN critic ``d``."""

    def __init__(self, cfg: Pix2PixConfig) -> None:
        super().__init__()
        cfg.validate()
        if cfg.channels < 1 or cfg.image_size < 1:
            raise ConfigError("model.channels and model.image_size: set them from the data")
        self.cfg = cfg
        self.g = UNetGenerator(cfg.channels, cfg.image_size, cfg.width, cfg.dropout)
        self.d = PatchDiscriminator(2 * cfg.channels, cfg.d_width, cfg.d_layers)

    @property
    def directions(self) -> tuple[str, ...]:
        return (self.cfg.direction,)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def multiple(self) -> int:
        """Input sides must be multiples of this (the U-Net's depth)."""
        return self.cfg.image_size

    def param_groups(self) -> dict[str, dict[str, Any]]:
        """The generator ("model") and the critic ("critic"): Adam betas (0.5, 0.999)."""
        spec = {"betas": (0.5, 0.999), "weight_decay": 0.0}
        return {"model": {"params": list(self.g.parameters()), **spec},
                "critic": {"params": list(self.d.parameters()), **spec}}  # fmt: skip

    def translate(self, x: Tensor, direction: str | None = None) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] -> their translations; ``direction`` must be the
        trained one (None: it)."""
        if direction not in (None, self.cfg.direction):
            raise ValueError(
                f"this pix2pix model translates {self.cfg.direction} only, not {direction}"
            )
        return self.g(x)

    def _gan(self, scores: Tensor, real: bool) -> Tensor:
        if self.cfg.gan_loss == "lsgan":
            return least_squares_generator_loss(scores) if real else (scores.float() ** 2).mean()
        target = torch.ones_like(scores) if real else torch.zeros_like(scores)
        return F.binary_cross_entropy_with_logits(scores.float(), target.float())

    def training_step(self, batch: Any, step: Any) -> dict[str, Tensor]:
        """One critic update, then one generator update (the paper's alternation).
        batch["source"], batch["target"]: (B, C, H, W) in [-1, 1], the pairs. Returns
        detached scalars: loss (the generator's), l1, adversarial, critic."""
        x, y = batch["source"], batch["target"]
        fake = self.g(x)
        if self.cfg.gan_loss == "lsgan":
            critic = least_squares_critic_loss(
                self.d(torch.cat([x, y], 1)), self.d(torch.cat([x, fake.detach()], 1))
            )
        else:
            critic = 0.5 * (self._gan(self.d(torch.cat([x, y], 1)), True)
                            + self._gan(self.d(torch.cat([x, fake.detach()], 1)), False))  # fmt: skip
        step.update("critic", critic)
        adversarial = self._gan(self.d(torch.cat([x, fake], 1)), True)
        l1 = (fake - y).abs().float().mean()
        loss = adversarial + self.cfg.l1_weight * l1
        step.update("model", loss)
        return {"loss": loss.detach(), "l1": l1.detach(), "adversarial": adversarial.detach(),
                "critic": critic.detach()}  # fmt: skip
