"""A keyed invisible watermark for small generated images (28 to 64 pixels a side), and
its detector: spread spectrum (Cox et al., "Secure spread spectrum watermarking for
multimedia", IEEE TIP 1997) shaped for images far below the 256 px that
invisible-watermark's DWT-DCT needs.

Marking. The key seeds a 64 x 64 grid of random signs (SHA-256 of the key seeds NumPy's
PCG64); each sign covers a cell of 2 x 2 pixels, and the grid tiles the image from its
top-left corner. The image's luma gets ``+a`` or ``-a`` grey levels per cell (the same
change in every channel of an RGB image; where a channel clips, the others make up the
luma). Cells of 2 pixels keep the pattern's energy at the lower spatial frequencies,
which JPEG quantises finely and a 2x resize keeps. The embedder knows what the detector computes
(informed embedding, Cox, Miller and McKellop, "Watermarking as communications with side
information", Proc. IEEE 1999): it raises ``a`` from ``strength`` in steps of 1.5, at most
to ``MAX_BOOST`` times it, until the detector scores at least ``TARGET_Z`` on the image
re-encoded as JPEG at quality 75. Busy images get a stronger mark; flat ones keep the
base strength.

Detecting. The luma minus its Gaussian blur (sigma 1 px) leaves the pattern and the
image's own fine detail; each pixel of that residual is divided by its local energy (the
5 x 5 mean of its square plus a floor), so that edges and texture, which the mark cannot
outshout, weigh little. Summed over each cell at an alignment, less the mean of the 3 x 3
cells around it (the image's leftovers are smooth from cell to cell, the signs are not),
this gives one weight ``G_c`` per sign ``P_c`` of the grid, and the score

    z = sum_c P_c G_c / sqrt(sum_c G_c^2).

Honest p-values. For an image made without the key, the key's signs are fair coins
independent of the image, so ``z`` is a sum of random signs with weights of unit norm,
whatever the image is. Bentkus and Dzindzalieta ("A tight Gaussian bound for weighted
sums of Rademacher random variables", Bernoulli 2015) bound its tail by
``P(z >= t) <= 3.178 * P(N(0, 1) >= t)`` for every such sum. The detector tries
``tests`` alignments (shifts of up to 12.5% of a side, for crops, at scales 1 and 2, for
an image enlarged twice) and keeps the best; the union bound multiplies by ``tests``.
The reported p-value is therefore a bound for any image (over the choice of key), and
the verdict "marked" at ``fpr`` 1e-3 is wrong at most once in a thousand unmarked images;
tests and benchmarks/image_watermark.py measure the rate with fixed keys too.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from aigc.errors import RequestError

CELL = 2  # pixels per side of one sign of the pattern
GRID = 64  # signs per side of the key's pattern (it tiles larger images)
DEFAULT_STRENGTH = 2.0  # base amplitude, grey levels (0..255) of luma
MAX_BOOST = 4.0  # informed embedding raises the amplitude to at most this times strength
TARGET_Z = 6.0  # ... until the detector scores this after JPEG at quality 75
FPR = 1e-3  # the false-positive rate a verdict is made at
SCALES = (1.0, 2.0)  # enlargements the detector undoes (2: an image resized 2x up)
SHIFT_FRACTION = 0.125  # the largest crop (of a side, top or left) the search covers
MIN_SIDE = 16  # smaller images (after undoing a scale) are not searched
RESIDUAL_SIGMA = 1.0  # px: the blur whose difference keeps the pattern's band
LOCAL_WINDOW = 5  # px: window of the local energy that weighs the residual
NOISE_FLOOR = 1.0  # grey levels^2 added to the local energy
# Bentkus & Dzindzalieta (2015): P(sum a_i e_i >= t) <= C * P(N(0,1) >= t), sum a_i^2 <= 1
RADEMACHER_GAUSS = 1.0 / (4.0 * 0.5 * math.erfc(1.0))  # 1 / (4 P(N >= sqrt 2)) = 3.178

_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, as JPEG and Pillow's "L"

ImageT = TypeVar("ImageT")


@dataclass(frozen=True)
class WatermarkVerdict:
    """What the detector found in one image for one key.

    z: the largest score over the alignments searched; p_value: its significance for
    an image made without the key, a bound corrected for the ``tests`` alignments
    searched; marked: ``p_value <= fpr``; threshold: the z that ``fpr`` needs;
    shift (dy, dx) and scale: the alignment of the best score."""

    z: float
    p_value: float
    marked: bool
    threshold: float
    fpr: float
    tests: int
    shift: tuple[int, int]
    scale: float

    def to_dict(self) -> dict[str, Any]:
        return {"z": self.z, "p_value": self.p_value, "marked": self.marked,
                "threshold": self.threshold, "fpr": self.fpr, "tests": self.tests,
                "shift": list(self.shift), "scale": self.scale}  # fmt: skip


# ---------------------------------------------------------------------------------------
# The key's pattern


def key_signs(key: str) -> np.ndarray:
    """The key's (GRID, GRID) pattern of +1/-1 (float64), the same on every machine."""
    check_key(key)
    digest = hashlib.sha256(b"aigc image watermark v1\0" + key.encode("utf-8")).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))
    return rng.integers(0, 2, size=(GRID, GRID)).astype(np.float64) * 2.0 - 1.0


def key_pattern(key: str, height: int, width: int) -> np.ndarray:
    """The (height, width) pattern of +1/-1 that marking adds (times the amplitude):
    the key's signs, each over CELL x CELL pixels, tiled from the top-left corner."""
    signs = key_signs(key)
    rows = (np.arange(height) // CELL) % GRID
    cols = (np.arange(width) // CELL) % GRID
    return signs[rows][:, cols]


def check_key(key: Any) -> None:
    if not isinstance(key, str) or not key.strip():
        raise RequestError(f"the watermark key must be a non-empty string, not {key!r}")


# ---------------------------------------------------------------------------------------
# Images in and out


@dataclass
class _Pixels:
    """An image as (H, W, C) uint8 with C in {1, 3}, its alpha kept aside, and how to
    give back the type that came in."""

    array: np.ndarray
    alpha: np.ndarray | None
    pil: bool  # came as a PIL image (else as an array)
    squeeze: bool = False  # the array came as (H, W)


def _pixels(image: Any, what: str = "image") -> _Pixels:
    """Reads a uint8 array ((H, W) or (H, W, 1|3|4)) or a PIL image (L, LA, RGB, RGBA;
    other modes through RGBA); RequestError for anything else."""
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.mode not in ("L", "LA", "RGB", "RGBA"):
            image = image.convert("RGBA")
        array = np.asarray(image)
        array = array[..., None] if array.ndim == 2 else array
        alpha = None
        if image.mode in ("LA", "RGBA"):
            alpha, array = array[..., -1].copy(), array[..., :-1]
        return _Pixels(np.ascontiguousarray(array), alpha, pil=True)
    if not isinstance(image, np.ndarray):
        raise RequestError(
            f"the {what} must be a uint8 array or a PIL image, not {type(image).__name__}"
        )
    if image.dtype != np.uint8:
        raise RequestError(f"the {what} must be uint8 pixels (0..255), not {image.dtype}")
    squeeze = image.ndim == 2
    array = image[..., None] if squeeze else image
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise RequestError(
            f"the {what} has shape {image.shape}; expected (H, W) or (H, W, C) with 1, 3 "
            "or 4 channels"
        )
    alpha = None
    if array.shape[2] == 4:
        alpha, array = array[..., 3].copy(), array[..., :3]
    return _Pixels(np.ascontiguousarray(array), alpha, pil=False, squeeze=squeeze)


def _back(px: _Pixels, array: np.ndarray) -> Any:
    """The marked pixels as the type that came in: the same array shape, or a PIL image
    in L, LA, RGB or RGBA (a palette or other mode comes back as RGBA)."""
    if px.alpha is not None:
        array = np.concatenate([array, px.alpha[..., None]], axis=2)
    if not px.pil:
        return array[..., 0] if px.squeeze else array
    from PIL import Image

    return Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)  # L, LA, RGB(A)


def luma(array: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 -> (H, W) float64 luma (BT.601; a grey image as it is)."""
    x = array.astype(np.float64)
    return x[..., 0] if x.shape[2] == 1 else x[..., :3] @ _LUMA


# ---------------------------------------------------------------------------------------
# Marking


def mark_image(image: ImageT, key: str, strength: float = DEFAULT_STRENGTH) -> ImageT:
    """``image`` (a uint8 array (H, W) or (H, W, C), or a PIL image) with the key's
    invisible watermark; the same type and shape come back (alpha kept as it was).
    ``strength``: the base amplitude in grey levels of luma (the peak-to-peak change is
    twice it); busy images get up to MAX_BOOST times it (see the module's docstring)."""
    check_key(key)
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not (
        0 < strength <= 64
    ):  # fmt: skip
        raise RequestError(f"strength={strength!r} must be a number in (0, 64] (grey levels)")
    px = _pixels(image)
    h, w = px.array.shape[:2]
    if min(h, w) < 2 * CELL:
        raise RequestError(f"the image is {w}x{h}; the watermark needs at least "
                           f"{2 * CELL}x{2 * CELL} pixels")  # fmt: skip
    pattern = key_pattern(key, h, w)
    signs = key_signs(key)
    amplitude, marked = float(strength), px.array
    for _ in range(_MAX_STEPS):
        marked = add_luma(px.array, amplitude * pattern)
        if amplitude >= MAX_BOOST * strength or min(h, w) < MIN_SIDE:
            break
        if _aligned_z(jpeg_round_trip(marked, 75), signs) >= TARGET_Z:
            break
        amplitude = min(amplitude * 1.5, MAX_BOOST * strength)
    return _back(px, marked)


_MAX_STEPS = 1 + math.ceil(math.log(MAX_BOOST) / math.log(1.5))


def add_luma(array: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 plus ``delta`` (H, W) grey levels of luma, rounded and clipped to
    0..255. For RGB the change goes to every channel; where some channels clip, the
    others take over what they could not carry (one pass), keeping the luma change."""
    x = array.astype(np.float64)
    if x.shape[2] == 1:
        return np.clip(np.rint(x + delta[..., None]), 0, 255).astype(np.uint8)
    want = x + delta[..., None]
    got = np.clip(want, 0, 255)
    short = delta - (got - x) @ _LUMA  # luma the clipped channels could not carry
    free = (want >= 0) & (want <= 255)
    weight = free.astype(np.float64) @ _LUMA
    share = np.divide(short, weight, out=np.zeros_like(short), where=weight > 0)
    got = np.clip(got + free * share[..., None], 0, 255)
    return np.rint(got).astype(np.uint8)


def jpeg_round_trip(array: np.ndarray, quality: int) -> np.ndarray:
    """(H, W, C) uint8 encoded as JPEG at ``quality`` by Pillow and decoded again."""
    from PIL import Image

    image = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    out = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
    return out[..., None] if out.ndim == 2 else out


def mark_tensor(images: Any, key: str, strength: float = DEFAULT_STRENGTH) -> Any:
    """Marks a batch (N, C, H, W) of float images in [-1, 1] (a torch tensor, as the
    pipelines make them): each is quantised to uint8 as a saved PNG would be, marked, and
    returned as floats that quantise back to exactly those pixels."""
    import torch

    from aigc.data.images import to_uint8

    pixels = to_uint8(images)  # (N, H, W, C)
    marked = np.stack([mark_image(p, key, strength) for p in pixels])
    out = torch.from_numpy(marked).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
    return out.to(images.device).contiguous()


# ---------------------------------------------------------------------------------------
# Detecting


def _weighted_residual(y: np.ndarray) -> np.ndarray:
    """The luma's fine band, each pixel divided by its local energy (see module doc)."""
    from scipy import ndimage

    r = y - ndimage.gaussian_filter(y, RESIDUAL_SIGMA, mode="reflect")
    energy = ndimage.uniform_filter(r * r, LOCAL_WINDOW, mode="reflect")
    return r / (energy + NOISE_FLOOR)


def _cell_sums(r: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """(GRID, GRID) weights, one per sign of the pattern, when pixel (0, 0) of ``r`` lies
    at (dy, dx) of the pattern's plane: ``r`` summed over each cell (cells cut by the
    border count what they have), minus the mean of the 3 x 3 cells around it, and summed
    again over the cells that tiling repeats. The signs are independent from cell to
    cell; what the image leaves in the sums (edges, shading) varies smoothly across
    cells, and subtracting the neighbours' mean removes most of it."""
    from scipy import ndimage

    h, w = r.shape
    rows, cols = -(-(h + dy) // CELL), -(-(w + dx) // CELL)
    plane = np.zeros((rows * CELL, cols * CELL))
    plane[dy : dy + h, dx : dx + w] = r
    cells = plane.reshape(rows, CELL, cols, CELL).sum(axis=(1, 3))
    cells = cells - ndimage.uniform_filter(cells, 3, mode="reflect")
    folded = np.zeros((GRID, GRID))
    if rows <= GRID and cols <= GRID:
        folded[:rows, :cols] = cells
    else:
        np.add.at(folded, (np.arange(rows)[:, None] % GRID, np.arange(cols)[None, :] % GRID),
                  cells)  # fmt: skip
    return folded


def _score(cells: np.ndarray, signs: np.ndarray) -> float:
    norm = math.sqrt(float((cells * cells).sum()))
    return float((signs * cells).sum()) / norm if norm > 0 else 0.0


def _aligned_z(array: np.ndarray, signs: np.ndarray) -> float:
    """The score at the marking's own alignment (shift 0, scale 1)."""
    return _score(_cell_sums(_weighted_residual(luma(array)), 0, 0), signs)


def _rescaled(y: np.ndarray, scale: float) -> np.ndarray | None:
    """The luma as it was before an enlargement by ``scale`` (box-averaged down), or None
    when that is smaller than MIN_SIDE."""
    if scale == 1:
        return y if min(y.shape) >= MIN_SIDE else None
    from PIL import Image

    h, w = y.shape
    size = (round(w / scale), round(h / scale))
    if min(size) < MIN_SIDE:
        return None
    image = Image.fromarray(y.astype(np.float32), mode="F")
    return np.asarray(image.resize(size, Image.Resampling.BOX), dtype=np.float64)


def alignments(height: int, width: int) -> list[tuple[float, int, int]]:
    """The (scale, dy, dx) the detector tries on an image of this size."""
    out = []
    for scale in SCALES:
        h, w = round(height / scale), round(width / scale)
        if min(h, w) < MIN_SIDE:
            continue
        reach = int(SHIFT_FRACTION * max(h, w)) + 1
        out += [(scale, dy, dx) for dy in range(reach) for dx in range(reach)]
    return out


def p_bound(z: float, tests: int) -> float:
    """The p-value bound of the best of ``tests`` scores reaching ``z``."""
    tail = 0.5 * math.erfc(z / math.sqrt(2.0))
    return min(1.0, tests * RADEMACHER_GAUSS * tail)


def z_threshold(fpr: float, tests: int) -> float:
    """The z at which ``p_bound`` falls to ``fpr``."""
    from scipy.stats import norm

    return float(norm.isf(fpr / (tests * RADEMACHER_GAUSS)))


def detect_image(image: Any, key: str, fpr: float = FPR) -> WatermarkVerdict:
    """Is ``image`` (uint8 array or PIL image; any size of at least MIN_SIDE pixels)
    marked with ``key``? The verdict holds the best score over the alignments searched
    and its p-value (a bound, corrected for the search; see the module's docstring)."""
    check_key(key)
    if isinstance(fpr, bool) or not isinstance(fpr, int | float) or not 0 < fpr < 1:
        raise RequestError(f"fpr={fpr!r} must be a number in (0, 1)")
    px = _pixels(image)
    h, w = px.array.shape[:2]
    todo = alignments(h, w)
    if not todo:
        raise RequestError(f"the image is {w}x{h}; the detector needs at least "
                           f"{MIN_SIDE}x{MIN_SIDE} pixels")  # fmt: skip
    signs = key_signs(key)
    y = luma(px.array)
    best, where = -math.inf, (1.0, 0, 0)
    residuals: dict[float, np.ndarray] = {}
    for scale, dy, dx in todo:
        if scale not in residuals:
            residuals[scale] = _weighted_residual(_rescaled(y, scale))
        z = _score(_cell_sums(residuals[scale], dy, dx), signs)
        if z > best:
            best, where = z, (scale, dy, dx)
    p = p_bound(best, len(todo))
    return WatermarkVerdict(z=best, p_value=p, marked=p <= fpr,
                            threshold=z_threshold(fpr, len(todo)), fpr=float(fpr),
                            tests=len(todo), shift=(where[1], where[2]), scale=where[0])  # fmt: skip


def psnr(reference: np.ndarray, other: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images of one shape (inf if equal)."""
    a, b = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr of images of shapes {a.shape} and {b.shape}")
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)
