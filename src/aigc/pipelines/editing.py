"""The images and masks a user hands to an editing verb (inpaint, image-to-image), read
into the model's size and channels with every fault named in one line.

An image is a file path, the file's bytes (an upload), a PIL image or a uint8 array
(H, W), (H, W, 1), (H, W, 3) or (H, W, 4). A square image of another size is resized
to the model's, and a colour image given to a grayscale model (or the reverse) is
converted; both are said in a warning. A mask follows OpenAI's convention, the
transparent pixels (alpha below 128) of a PNG with transparency marking the region to
fill, and also accepts diffusers' black-and-white mask, white (128 or more) to fill;
without a mask, the image's own transparent pixels are the region. A mask must have
the size of the image it goes with.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aigc.errors import RequestError

MAX_PIXELS = 4096 * 4096  # larger inputs are refused before they are decoded in full
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


class EditWarning(UserWarning):
    """An input was resized or converted to suit the model."""


@dataclass
class EditImage:
    """An input image as the model takes it, and what came with it."""

    pixels: np.ndarray  # (size, size, C) uint8, the model's size and channels
    alpha: np.ndarray | None  # (H, W) uint8 at the size given, when the image has one
    given_size: tuple[int, int]  # (width, height) as given

    def tensor(self, n: int) -> torch.Tensor:
        """(n, C, size, size) float32 in [-1, 1]: the image n times."""
        x = torch.from_numpy(self.pixels).permute(2, 0, 1).float() / 127.5 - 1.0
        return x.unsqueeze(0).expand(n, -1, -1, -1).contiguous()


def _open(value: Any, what: str):
    """A loaded PIL image from a path, bytes, a PIL image or a uint8 array."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        a = value
        if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4))):
            raise RequestError(
                f"{what}: an array must be uint8 (H, W) or (H, W, 1|3|4), got "
                f"{a.dtype} {tuple(a.shape)}"
            )
        a = a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a
        return Image.fromarray(np.ascontiguousarray(a))
    if isinstance(value, bytes | bytearray):
        source: Any = io.BytesIO(value)
        name = what
    elif isinstance(value, str | Path):
        source = name = str(value)
        if not Path(value).is_file():
            raise RequestError(f"{what}: {value} is not a file")
    else:
        raise RequestError(f"{what}: give a file path, bytes, a PIL image or a uint8 array")
    try:
        img = Image.open(source, formats=FORMATS)
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise RequestError(f"{name}: {w}x{h} pixels is above the {MAX_PIXELS:,} accepted")
        img.load()
    except RequestError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        kinds = ", ".join(FORMATS)
        raise RequestError(f"{name} is not an image aigc reads ({kinds}): {e}") from None
    return img


def _alpha(img) -> np.ndarray | None:
    """The alpha channel (H, W) uint8 when the image has transparency, else None."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        return np.asarray(img.convert("RGBA"))[..., 3].copy()
    return None


def has_transparency(value: Any) -> bool:
    """Whether an image (as read_image takes it) has transparent pixels; False when it
    cannot be read (read_image then says why)."""
    try:
        alpha = _alpha(_open(value, "image"))
    except RequestError:
        return False
    return alpha is not None and bool((alpha < 128).any())


def read_image(value: Any, size: int, channels: int, what: str = "image") -> EditImage:
    """``value`` as the model's (size, size, channels) uint8 pixels (see the module
    docstring); transparent pixels are composited over black. RequestError naming
    ``what`` for an unreadable file or a non-square image."""
    from PIL import Image

    img = _open(value, what)
    w, h = img.size
    if w != h:
        raise RequestError(
            f"{what} is {w}x{h}; the model draws {size}x{size} images: give a square image"
        )
    alpha = _alpha(img)
    base = _in_mode(img, alpha, channels, what)
    if (w, h) != (size, size):
        warnings.warn(f"{what}: resized from {w}x{h} to {size}x{size}, the size the model draws",
                      EditWarning, stacklevel=3)  # fmt: skip
        resample = Image.Resampling.LANCZOS if w > size else Image.Resampling.BICUBIC
        base = base.resize((size, size), resample)
    pixels = np.asarray(base, dtype=np.uint8).reshape(size, size, channels).copy()
    return EditImage(pixels, alpha, (w, h))


def _in_mode(img: Any, alpha: np.ndarray | None, channels: int, what: str) -> Any:
    """``img`` in the model's mode (L or RGB), transparent pixels over black; a warning
    when colour is dropped or made up."""
    from PIL import Image

    mode = "RGB" if channels == 3 else "L"
    base = img
    if alpha is not None:
        rgba = img.convert("RGBA")
        base = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    colour = img.mode not in ("L", "LA", "1", "I", "I;16", "F")
    if base.mode != mode:
        if colour != (channels == 3) and img.mode != "P":
            kind = "colour" if colour else "grayscale"
            to = "colour" if channels == 3 else "grayscale"
            warnings.warn(f"{what}: {kind} image converted to {to} for this model",
                          EditWarning, stacklevel=4)  # fmt: skip
        base = base.convert(mode)
    return base


def read_pixels(value: Any, channels: int, what: str = "image", max_side: int = 4096) -> np.ndarray:
    """``value`` (as read_image takes it) at its own size, in the model's channels:
    (H, W, channels) uint8, for verbs that work at any size (restoration). RequestError
    for an unreadable file or a side above ``max_side``."""
    img = _open(value, what)
    w, h = img.size
    if max(w, h) > max_side:
        raise RequestError(f"{what} is {w}x{h}; at most {max_side} pixels a side are accepted")
    base = _in_mode(img, _alpha(img), channels, what)
    return np.asarray(base, dtype=np.uint8).reshape(h, w, channels).copy()


def read_image_list(
    images: Any, channels: int, verb: str, max_side: int = 4096, limit: int = 1000
) -> list[np.ndarray]:
    """What the image-to-image verbs take (restore, translate): a file path, bytes, a PIL
    image or a uint8 (H, W[, C]) array, or a list of them, or an (N, H, W, C) uint8 /
    (N, C, H, W) [-1, 1] batch; as a list of (H, W, channels) uint8 arrays, each at its
    own size. RequestError naming the image for a bad one."""
    import torch

    from aigc.pipelines.base import check_count

    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.size(1) != channels:
            raise RequestError(
                f"a tensor of images must be (N, {channels}, H, W) in [-1, 1], got "
                f"{tuple(images.shape)}"
            )
        from aigc.data.images import to_uint8

        images = list(to_uint8(images))
    elif not isinstance(images, list | tuple):
        images = [images]
    if not images:
        raise RequestError(f"no images to {verb}")
    check_count(len(images), limit=limit, what="number of images")
    return [read_pixels(im, channels, f"image {i}", max_side=max_side)
            for i, im in enumerate(images)]  # fmt: skip


def save_images(images: Any, out: str | Path) -> list[Path]:
    """Writes images (ImageOutput, an (N, C, H, W) tensor, or uint8 arrays) as PNG:
    ``out`` itself for one image, else out's stem with -0, -1, ... appended."""
    import torch

    from aigc.data.images import save_png, to_uint8
    from aigc.pipelines.base import ImageOutput

    if isinstance(images, ImageOutput):
        images = images.images
    if isinstance(images, torch.Tensor):
        images = list(to_uint8(images))
    out = Path(out)
    if len(images) == 1:
        paths = [out]
    else:
        paths = [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(len(images))]
    for a, p in zip(images, paths, strict=True):
        save_png(a, p)
    return paths


def read_mask(value: Any, image: EditImage, size: int, what: str = "mask") -> np.ndarray:
    """The region to fill as a (size, size) bool array: from ``value`` (transparent, or
    white in a mask without transparency) or, when None, the image's transparent
    pixels. RequestError for a mask of another size than the image, or one that marks
    nothing or everything."""
    from PIL import Image

    if value is None:
        if image.alpha is None or not (image.alpha < 128).any():
            raise RequestError(
                "no mask: give a mask, or an image whose transparent pixels mark the region to fill"
            )
        fill, source = image.alpha < 128, "the image's transparency"
    else:
        img = _open(value, what)
        if img.size != image.given_size:
            gw, gh = image.given_size
            raise RequestError(f"{what} is {img.size[0]}x{img.size[1]} but the image is {gw}x{gh}; "
                               "give a mask of the image's size")  # fmt: skip
        alpha = _alpha(img)
        if alpha is not None and (alpha < 255).any():
            fill, source = alpha < 128, f"the {what} (transparent = fill)"
        else:
            fill, source = np.asarray(img.convert("L")) >= 128, f"the {what} (white = fill)"
    if fill.shape != (size, size):
        small = Image.fromarray(fill.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
        fill = np.asarray(small) >= 128
    if not fill.any():
        raise RequestError(f"{source} marks no pixel to fill")
    if fill.all():
        raise RequestError(f"{source} marks every pixel to fill, keeping nothing of the image; "
                           "generate new images instead")  # fmt: skip
    return fill
