"""Blocks and checks shared by two or more model families (STYLE: never copied).

``LabelEmbedding`` conditions a generator or encoder on labelled attributes,
``slerp`` walks between Gaussian latents, ``check_int`` and ``check_lists`` are the
config checks the image families share.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from aigc.errors import ConfigError


def check_int(key: str, value: Any, low: int) -> None:
    """Raise ConfigError unless ``value`` is an integer >= low, naming ``key``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be an integer")
    if value < low:
        raise ConfigError(f"{key}={value} must be at least {low}")


def check_choices(cfg: Any, choices: dict[str, tuple[str, ...]]) -> None:
    """Raise ConfigError unless each model.<key> is one of its allowed values."""
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(
                f"model.{key}={getattr(cfg, key)!r} is not allowed; expected one of "
                + ", ".join(allowed)
            )


def check_pow2_size(size: int, arch: str, why: str) -> None:
    """A convolutional stack that halves/doubles between 4x4 and the image needs a power
    of two >= 16 (0 = set later from the data)."""
    if size and (size < 16 or size & (size - 1)):
        raise ConfigError(
            f"model.image_size={size} does not fit arch={arch}, which {why}: use a power of "
            f"two >= 16 (e.g. 32 or 64) or arch=mlp"
        )


def check_image_ready(cfg: Any) -> None:
    """Raise ConfigError if an image model's size, channels or (conditional) class counts,
    which the caller sets from the data, are still unset."""
    for key in ("image_size", "channels"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"model.{key}=0: set it from the data before building")
    if cfg.conditional and not cfg.num_classes:
        raise ConfigError(
            "model.conditional=true but model.num_classes is empty: set it from the "
            "data's labels (one class count per attribute) before building"
        )


def check_lists(cfg: Any) -> None:
    """``hidden`` widths >= 1 and ``num_classes`` entries >= 2 (one class is no condition)."""
    for key in ("hidden", "num_classes"):
        if not isinstance(getattr(cfg, key), list | tuple):
            raise ConfigError(f"model.{key}={getattr(cfg, key)!r} must be a list of integers")
    for i, width in enumerate(cfg.hidden):
        check_int(f"model.hidden[{i}]", width, 1)
    for i, n in enumerate(cfg.num_classes):
        check_int(f"model.num_classes[{i}]", n, 2)


def check_latent_image_config(
    cfg: Any,
    choices: dict[str, tuple[str, ...]],
    ints: tuple[tuple[str, int], ...] = (),
    flags: tuple[str, ...] = (),
    numbers: tuple[str, ...] = (),
) -> None:
    """The checks every latent image model's config shares (z_dim, image_size, channels,
    embed_dim, hidden, num_classes, conditional), plus a family's own: ``choices``,
    integer ``ints`` with their lower bounds, boolean ``flags`` and number-valued
    ``numbers``. ConfigError naming the first bad key."""
    check_choices(cfg, choices)
    base = (("z_dim", 1), ("image_size", 0), ("channels", 0), ("embed_dim", 1))
    for key, low in (*base, *ints):
        check_int(f"model.{key}", getattr(cfg, key), low)
    check_lists(cfg)
    for key in ("conditional", *flags):
        if not isinstance(getattr(cfg, key), bool):
            raise ConfigError(f"model.{key}={getattr(cfg, key)!r} must be true or false")
    if cfg.num_classes and not cfg.conditional:
        raise ConfigError(
            f"model.num_classes={list(cfg.num_classes)} is set but model.conditional=false; "
            f"set model.conditional=true or leave num_classes empty"
        )
    for key in numbers:
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"model.{key}={value!r} must be a number")


class LabelEmbedding(nn.Module):
    """One learned table per attribute: labels (B, A) int64 -> (B, A, dim)."""

    def __init__(self, num_classes: list[int], dim: int) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(n, dim) for n in num_classes)

    def forward(self, labels: Tensor) -> Tensor:
        return torch.stack([t(labels[:, a]) for a, t in enumerate(self.tables)], dim=1)


def slerp(z0: Tensor, z1: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation (Shoemake 1985; White 2016 for GAN latents).

    z0, z1 (Z,); t (T,) in [0, 1] -> (T, Z). Walks the great circle between the two
    directions, so a Gaussian latent keeps a typical norm (a straight line through
    the middle of the ball would not). Parallel or opposite vectors fall back to lerp.
    """
    t = t.to(z0.dtype)[:, None]  # (T, 1)
    cos = torch.dot(z0, z1) / (z0.norm() * z1.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(omega)
    if sin.abs() < 1e-6:
        return (1 - t) * z0 + t * z1
    return (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / sin


class LatentSampling:
    """Prior noise and labels for a latent-variable image model (a GAN, a VAE): the
    model has ``cfg.z_dim``, ``num_classes`` (one entry per attribute; [] =
    unconditional) and ``device``."""

    def sample_z(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n latents (n, z_dim) from the prior N(0, I), on the model's device.

        With a generator they are drawn on the generator's device, so a seed gives
        the same latents on CPU and GPU.
        """
        device = generator.device if generator is not None else self.device
        z = torch.randn(n, self.cfg.z_dim, generator=generator, device=device)
        return z.to(self.device)

    def random_labels(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n label rows (n, A) int64, each attribute uniform over its classes."""
        if not self.num_classes:
            raise ValueError(
                f"random_labels needs a conditional {type(self).__name__}; this one has no labels"
            )
        device = generator.device if generator is not None else self.device
        cols = [
            torch.randint(k, (n,), generator=generator, device=device) for k in self.num_classes
        ]
        return torch.stack(cols, dim=1).to(self.device)

    def check_labels(self, labels: Tensor | None, n: int) -> None:
        """Raise ValueError unless labels suit n samples of this model."""
        if not self.num_classes:
            if labels is not None:
                raise ValueError(
                    f"this {type(self).__name__} is unconditional: labels must be None"
                )
            return
        A = len(self.num_classes)
        if labels is None or tuple(labels.shape) != (n, A) or labels.dtype != torch.int64:
            got = None if labels is None else f"{labels.dtype} {tuple(labels.shape)}"
            raise ValueError(
                f"this {type(self).__name__} is conditional: pass int64 labels ({n}, {A}), got {got}"
            )
        high = torch.tensor(self.num_classes, device=labels.device)
        bad = (labels < 0) | (labels >= high)
        if bool(bad.any()):
            a = int(bad.any(0).nonzero()[0])
            raise ValueError(f"label attribute {a} must be in [0, {self.num_classes[a]})")


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017, §3.2.2 and App. 6.1.2): a fully convolutional critic
    whose every output scores one overlapping patch of the input as real or fake.

    C64-C128-C256-C512 with 4x4 convolutions, stride 2 except the last, instance norm on
    all but the first layer, LeakyReLU 0.2, then a 4x4 convolution to one score per
    patch; ``layers`` = 3 is the paper's 70x70 receptive field. Input (B, in_channels,
    H, W) -> scores (B, 1, H', W'), raw (least squares or logits, as the loss decides).
    Used by restoration's adversarial loss and the translation families.
    """

    def __init__(self, in_channels: int, width: int = 64, layers: int = 3) -> None:
        super().__init__()
        mods: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 4, 2, 1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        ch = width
        for i in range(1, layers + 1):
            out = width * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods += [
                nn.Conv2d(ch, out, 4, stride, 1, bias=False),
                nn.InstanceNorm2d(out, affine=True),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            ch = out
        mods.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)
        for m in self.modules():  # N(0, 0.02) as the pix2pix and CycleGAN code
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def least_squares_critic_loss(real: Tensor, fake: Tensor) -> Tensor:
    """LSGAN's critic loss (Mao et al. 2017, eq. 9 with a=0, b=1), halved as the pix2pix
    and CycleGAN code does: 0.5 * (mean((D(real) - 1)^2) + mean(D(fake)^2)), in fp32."""
    return 0.5 * (((real.float() - 1) ** 2).mean() + (fake.float() ** 2).mean())


def least_squares_generator_loss(fake: Tensor) -> Tensor:
    """LSGAN's generator loss (Mao et al. 2017, eq. 9 with c=1): mean((D(G(x)) - 1)^2)."""
    return ((fake.float() - 1) ** 2).mean()


def check_weights(cfg: Any, keys: tuple[str, ...]) -> None:
    """Raise ConfigError unless each model.<key> is a finite number >= 0."""
    import math

    for key in keys:
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"model.{key}={value!r} must be a number >= 0")
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"model.{key}={value!r} must be a finite number >= 0")
