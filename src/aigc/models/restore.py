"""Image restoration and super-resolution by regression: a residual CNN maps a degraded
image to the clean one.

The network is EDSR's (Lim et al. 2017) without batch norm: a head convolution,
``blocks`` residual blocks (conv-ReLU-conv, the residual scaled by ``res_scale``), a
long skip around them, then for super-resolution ESPCN's sub-pixel upsampler (Shi et
al. 2016: a convolution to s^2 times the channels and a pixel shuffle, per factor of
2, or one of 3) and a last convolution to the image's channels. Its output is added to
the input itself, or to the input upsampled bicubically, so the network learns only the
residual (Kim et al. 2016, VDSR); the last convolution starts at zero, so an untrained
model returns its input (or bicubic upsampling) exactly and training can only improve
on it.

Loss: L1 (EDSR's choice) or L2 on pixels in [-1, 1]. With ``adversarial`` > 0 a
PatchGAN critic (models.layers.PatchDiscriminator) judges restored against clean images
under least squares (Mao et al. 2017), and the restorer's loss adds ``adversarial``
times the critic's generator term, trading distortion for perceived sharpness as
SRGAN and ESRGAN do (Ledig et al. 2017; Wang et al. 2018).
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
    least_squares_critic_loss,
    least_squares_generator_loss,
)

LOSSES = ("l1", "l2")


@dataclass
class RestorerConfig:
    image_size: int = 0  # the clean (output) image's side; 0 = set from the data
    channels: int = 0  # 0 = set from the data
    scale: int = 1  # output side / input side; set from data.scale
    width: int = 64  # feature channels
    blocks: int = 8  # residual blocks
    res_scale: float = 1.0  # each block's residual is scaled by this (EDSR: 0.1 when wide)
    loss: str = "l1"  # pixel loss: l1 or l2
    adversarial: float = 0.0  # weight of the PatchGAN term; 0 = regression alone
    d_width: int = 64  # the critic's first width
    d_layers: int = 3  # the critic's strided layers (3: 70x70 patches; needs images >= 32)

    def validate(self) -> None:
        check_choices(self, {"loss": LOSSES})
        for key, low in (("image_size", 0), ("channels", 0), ("scale", 1), ("width", 1),
                         ("blocks", 0), ("d_width", 1), ("d_layers", 1)):  # fmt: skip
            check_int(f"model.{key}", getattr(self, key), low)
        if self.scale not in (1, 2, 3, 4):
            raise ConfigError(f"model.scale={self.scale} must be 1, 2, 3 or 4")
        for key in ("res_scale", "adversarial"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"model.{key}={value!r} must be a number >= 0")
        if self.adversarial and self.image_size and self.image_size < 2 ** (self.d_layers + 2):
            raise ConfigError(
                f"model.d_layers={self.d_layers} halves {self.image_size}-pixel images below "
                f"one patch; use model.d_layers={max(1, self.image_size.bit_length() - 4)} or "
                "larger images"
            )


class ResBlock(nn.Module):
    """x + res_scale * conv(relu(conv(x))), no normalisation (EDSR, Fig. 2c)."""

    def __init__(self, width: int, res_scale: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.res_scale = res_scale

    def forward(self, x: Tensor) -> Tensor:
        return x + self.res_scale * self.conv2(F.relu(self.conv1(x)))


def upsampler(width: int, scale: int) -> nn.Sequential:
    """ESPCN's sub-pixel convolution: conv to width * r^2 channels, then a pixel shuffle
    by r, once per factor of 2 (scale 2, 4) or once by 3; empty for scale 1."""
    if scale == 1:
        return nn.Sequential()
    factors = [3] if scale == 3 else [2] * (scale.bit_length() - 1)
    mods: list[nn.Module] = []
    for r in factors:
        mods += [nn.Conv2d(width, width * r * r, 3, padding=1), nn.PixelShuffle(r)]
    return nn.Sequential(*mods)


class Restorer(nn.Module):
    """degraded (B, C, h, w) in [-1, 1] -> restored (B, C, h*scale, w*scale), unclamped.
    Fully convolutional: any size of input works, not only the training size."""

    def __init__(self, cfg: RestorerConfig) -> None:
        super().__init__()
        cfg.validate()
        if cfg.channels < 1 or cfg.image_size < 1:
            raise ConfigError("model.channels and model.image_size: set them from the data")
        self.cfg = cfg
        c, w = cfg.channels, cfg.width
        self.head = nn.Conv2d(c, w, 3, padding=1)
        self.body = nn.Sequential(*[ResBlock(w, cfg.res_scale) for _ in range(cfg.blocks)])
        self.body_out = nn.Conv2d(w, w, 3, padding=1)
        self.up = upsampler(w, cfg.scale)
        self.tail = nn.Conv2d(w, c, 3, padding=1)
        nn.init.zeros_(self.tail.weight)  # start as the identity (or bicubic upsampling)
        nn.init.zeros_(self.tail.bias)
        self.critic = PatchDiscriminator(c, cfg.d_width, cfg.d_layers) if cfg.adversarial else None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def param_groups(self) -> dict[str, dict[str, Any]]:
        """One optimizer; with the adversarial term, two (the step contract), Adam betas
        (0.5, 0.999) as pix2pix and CycleGAN, no weight decay."""
        restorer = [p for n, p in self.named_parameters() if not n.startswith("critic.")]
        if self.critic is None:
            return {"model": {"params": restorer}}
        spec = {"betas": (0.5, 0.999), "weight_decay": 0.0}
        return {"critic": {"params": list(self.critic.parameters()), **spec},
                "model": {"params": restorer, **spec}}  # fmt: skip

    def base(self, x: Tensor) -> Tensor:
        """What the network adds its residual to: x, or x upsampled bicubically."""
        if self.cfg.scale == 1:
            return x
        return F.interpolate(x, scale_factor=self.cfg.scale, mode="bicubic", align_corners=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.head(x)
        h = h + self.body_out(self.body(h))  # the long skip (EDSR)
        return self.base(x) + self.tail(self.up(h))

    @property
    def receptive_radius(self) -> int:
        """How far (input pixels) an output pixel's value reaches, at most: a 3x3
        convolution adds one at its resolution (head, two per block, the block output,
        the upsampler's and the tail's), and bicubic upsampling two."""
        return 2 * self.cfg.blocks + 4

    def tiled(self, x: Tensor, tile: int = 128) -> Tensor:
        """forward(x) computed ``tile`` x ``tile`` input pixels at a time, each tile with a
        margin of receptive_radius pixels of its neighbours, so a large image needs the
        memory of a tile (equal to forward up to float rounding)."""
        B, C, h, w = x.shape
        if h <= tile and w <= tile:
            return self(x)
        s, m = self.cfg.scale, self.receptive_radius
        out = x.new_empty(B, C, h * s, w * s)
        for y0 in range(0, h, tile):
            for x0 in range(0, w, tile):
                y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
                ya, xa = max(0, y0 - m), max(0, x0 - m)
                part = self(x[:, :, ya : min(h, y1 + m), xa : min(w, x1 + m)])
                dy, dx = (y0 - ya) * s, (x0 - xa) * s
                out[:, :, y0 * s : y1 * s, x0 * s : x1 * s] = part[
                    :, :, dy : dy + (y1 - y0) * s, dx : dx + (x1 - x0) * s
                ]
        return out

    # losses ------------------------------------------------------------------
    def pixel_loss(self, restored: Tensor, clean: Tensor) -> Tensor:
        if self.cfg.loss == "l1":
            return (restored - clean).abs().mean()
        return ((restored - clean) ** 2).mean()

    def critic_loss(self, clean: Tensor, restored: Tensor) -> Tensor:
        """Least squares (Mao et al. 2017), halved as in pix2pix."""
        return least_squares_critic_loss(self.critic(clean), self.critic(restored.detach()))

    def training_step(self, batch: Any, step: Any) -> dict[str, Tensor]:
        """One update (the step contract): batch["degraded"] (B, C, h, w) and
        batch["clean"] (B, C, h*scale, w*scale), both in [-1, 1]. Returns detached
        scalars: loss (what the restorer minimised), pixel (the L1 or L2 term), psnr (of
        this batch in dB, on [-1, 1] unquantised), and critic / adversarial with the
        adversarial term."""
        degraded, clean = batch["degraded"], batch["clean"]
        restored = self(degraded)
        stats: dict[str, Tensor] = {}
        if self.critic is not None:
            c_loss = self.critic_loss(clean, restored)
            step.update("critic", c_loss)
            stats["critic"] = c_loss.detach()
        pixel = self.pixel_loss(restored.float(), clean.float())
        loss = pixel
        if self.critic is not None:
            adv = least_squares_generator_loss(self.critic(restored))
            loss = pixel + self.cfg.adversarial * adv
            stats["adversarial"] = adv.detach()
        step.update("model", loss)
        with torch.no_grad():
            mse = ((restored.float().clamp(-1, 1) - clean.float()) ** 2).mean()
            stats["psnr"] = 10 * torch.log10(4.0 / mse.clamp_min(1e-12))  # range 2 in [-1, 1]
        return {"loss": loss.detach(), "pixel": pixel.detach(), **stats}
