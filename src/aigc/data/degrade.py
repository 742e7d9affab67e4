"""Degradations a restoration model learns to undo, and the classical filters it must beat.

Each degradation maps clean 8-bit images (N, H, W, C) to degraded 8-bit images, as a
user's damaged file would be: Gaussian noise (rounded and clipped to 0..255), JPEG
compression at a chosen quality (Pillow's encoder), missing square blocks (set to
black), or downsampling by a factor (Pillow's antialiased bicubic, the usual
super-resolution protocol). Image i's damage comes from its own seed ``seeds[i]``, so
a batch is degraded the same whatever its size, and training draws fresh damage at
every step from (run seed, step, row).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from aigc.errors import ConfigError

KINDS = ("noise", "jpeg", "blocks", "downsample")
SCALES = (2, 3, 4)


@dataclass(frozen=True)
class Degradation:
    """What damage, and how much: ``kind`` one of KINDS; ``sigma`` the noise's standard
    deviation as a fraction of the pixel range (0.2 = 51 grey levels); ``quality`` JPEG's
    1..95; ``blocks`` and ``block_size`` how many squares of how many pixels are lost;
    ``scale`` the downsampling factor (2, 3 or 4)."""

    kind: str = "noise"
    sigma: float = 0.2
    quality: int = 20
    blocks: int = 2
    block_size: int = 8
    scale: int = 1

    def validate(self, image_size: int | None = None, where: str = "data") -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"{where}.degradation={self.kind!r}: choose {', '.join(KINDS)}")
        if self.kind == "noise" and not 0.0 < self.sigma <= 1.0:
            raise ConfigError(f"{where}.noise_sigma={self.sigma} must be in (0, 1]")
        if self.kind == "jpeg" and not 1 <= self.quality <= 95:
            raise ConfigError(f"{where}.jpeg_quality={self.quality} must be in [1, 95]")
        if self.kind == "blocks" and (self.blocks < 1 or self.block_size < 1):
            raise ConfigError(f"{where}.blocks and {where}.block_size must be at least 1")
        if self.kind == "downsample":
            if self.scale not in SCALES:
                raise ConfigError(
                    f"{where}.scale={self.scale}: super-resolution factors are 2, 3 and 4"
                )
            if image_size is not None and image_size % self.scale:
                raise ConfigError(
                    f"data.image_size={image_size} is not a multiple of {where}.scale="
                    f"{self.scale}; choose a size the factor divides"
                )
        elif self.scale != 1:
            raise ConfigError(
                f"{where}.scale={self.scale} is for degradation=downsample; "
                f"{self.kind} keeps the size (scale 1)"
            )
        if self.kind == "blocks" and image_size is not None and self.block_size > image_size:
            raise ConfigError(
                f"{where}.block_size={self.block_size} is larger than the images ({image_size})"
            )

    @property
    def factor(self) -> int:
        """How much larger the restored image is than the degraded one."""
        return self.scale if self.kind == "downsample" else 1

    def describe(self) -> str:
        return {
            "noise": f"Gaussian noise, sigma {self.sigma:g}",
            "jpeg": f"JPEG at quality {self.quality}",
            "blocks": f"{self.blocks} missing {self.block_size}x{self.block_size} blocks",
            "downsample": f"{self.scale}x bicubic downsampling",
        }[self.kind]

    def apply(self, images: np.ndarray, seeds: Sequence[Sequence[int] | int]) -> np.ndarray:
        """(N, H, W, C) uint8 -> degraded (N, H', W', C) uint8, image i from ``seeds[i]``
        (H' = H / scale for downsampling, H otherwise)."""
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"expected (N, H, W, C) uint8, got {images.shape} {images.dtype}")
        if len(seeds) != len(images):
            raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
        if self.kind == "downsample":
            h, w = images.shape[1:3]
            return np.stack([resize(im, h // self.scale, w // self.scale) for im in images])
        if self.kind == "jpeg":
            return np.stack([jpeg(im, self.quality) for im in images])
        out = np.array(images)
        for i, seed in enumerate(seeds):
            rng = np.random.default_rng(seed)
            if self.kind == "noise":
                noisy = out[i] + rng.standard_normal(out[i].shape) * (self.sigma * 255.0)
                out[i] = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
            else:
                h, w = out.shape[1:3]
                s = self.block_size
                for _ in range(self.blocks):
                    y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
                    out[i, y : y + s, x : x + s] = 0
        return out


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)


def _array(img: Image.Image, channels: int) -> np.ndarray:
    a = np.asarray(img, dtype=np.uint8)
    return a[..., None] if channels == 1 else a


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """(H, W, C) uint8 through Pillow's JPEG encoder and decoder at ``quality``."""
    buf = io.BytesIO()
    _pil(image).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as img:
        return _array(img.convert("L" if image.shape[2] == 1 else "RGB"), image.shape[2])


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) uint8 -> (height, width, C) by Pillow's bicubic filter (antialiased when
    shrinking: its support widens with the factor, as MATLAB's imresize)."""
    img = _pil(image).resize((width, height), Image.Resampling.BICUBIC)
    return _array(img, image.shape[2])


# ---------------------------------------------------------------------------
# Classical baselines: what a restoration model is compared with


def median_filter(images: np.ndarray, size: int = 3) -> np.ndarray:
    """Each channel of (N, H, W, C) uint8 through a size x size median (SciPy; edges
    reflected): the classical answer to impulse and Gaussian noise."""
    from scipy.ndimage import median_filter as scipy_median

    return scipy_median(images, size=(1, size, size, 1), mode="reflect")


def bicubic_upsample(images: np.ndarray, factor: int) -> np.ndarray:
    """(N, h, w, C) uint8 -> (N, h*factor, w*factor, C) by Pillow's bicubic filter: the
    baseline of super-resolution papers."""
    h, w = images.shape[1:3]
    return np.stack([resize(im, h * factor, w * factor) for im in images])


def baseline_name(degradation: Degradation) -> str:
    """What ``classical`` does for this degradation."""
    return "bicubic" if degradation.kind == "downsample" else "median 3x3"


def classical(degradation: Degradation, degraded: np.ndarray) -> np.ndarray:
    """The classical restoration of ``degraded`` that a model is compared with: bicubic
    upsampling for super-resolution, a 3x3 median filter otherwise."""
    if degradation.kind == "downsample":
        return bicubic_upsample(degraded, degradation.scale)
    return median_filter(degraded, 3)
