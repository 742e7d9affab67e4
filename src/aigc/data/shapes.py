"""Procedural shapes: a labelled, captioned RGB image set made from a seed, no download.

Each image is one filled shape on a black background with four attributes, each
an integer label: ``shape``, ``colour``, ``size`` and ``position`` (a 3×3 grid),
and a caption such as "a small red circle at the top left". It is the embedded
data for conditional and text-to-image models.

Rendering is vectorised over images: every pixel gets the signed distance from
its centre to the shape's edge (negative inside; exact outside every shape) and
the coverage ``clip(0.5 - d, 0, 1)`` is a box-filtered, anti-aliased edge one
pixel wide. Geometry is drawn in units of the image width, so the same seed gives
the same labels, captions and layout at every ``image_size``, and the first ``k``
images of a set of ``n`` are the set of ``k``.

Jitter (size ±8 %, position ±5 % of the width, colour ±12 per channel) never
makes a label ambiguous: a shape's centre always lies inside its third of the
image (with a margin) and the whole shape inside the image.

A shape is drawn ``filled`` (the default) or ``outlined``: only a band of
OUTLINE_WIDTH inside its edge, from the same distance function. The same seed draws
the same scenes in either style, so the two styles are an exact pair of domains for
image-to-image translation (pix2pix), or two unpaired ones (CycleGAN); ``style="both"``
draws each image's style at random and labels it (a fifth attribute, ``style``), from
a stream of its own so the scenes stay those of the same seed.
"""

from __future__ import annotations

from collections.abc import Generator

import numpy as np

from aigc.data.images import ImageSet, ImageSetInfo, ImageStream
from aigc.errors import ConfigError

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "white")
SIZES = ("small", "large")
STYLES = ("filled", "outlined")
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "centre",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
# How each position reads in a caption ("at the top left", "on the left", "in the centre").
_PREPOSITIONS = ("at", "at", "at", "on", "in", "on", "at", "at", "at")

# RGB of each colour before jitter; chosen to stay far apart after ±12 per channel.
PALETTE = np.array(
    [
        (220, 40, 40),  # red
        (40, 190, 60),  # green
        (50, 90, 235),  # blue
        (235, 225, 40),  # yellow
        (215, 50, 215),  # magenta
        (40, 210, 220),  # cyan
        (245, 135, 25),  # orange
        (235, 235, 235),  # white
    ],
    dtype=np.float32,
)

RADIUS = (0.11, 0.20)  # nominal radius of small / large shapes, in image widths
# Distance from the centre to the farthest point along x or y, per unit radius
# (square: half-side; triangle: circumradius; diamond: half-diagonal; cross: arm).
# The other proportions give every shape roughly the area of its circle.
EXTENT = (1.0, 0.88, 1.25, 1.2, 1.0)
CROSS_HALF_WIDTH = 0.36  # half the thickness of a cross arm, per unit radius
SIZE_JITTER = 0.08  # radius × U(1 - 0.08, 1 + 0.08)
POSITION_JITTER = 0.05  # centre ± U(0.05) image widths
COLOUR_JITTER = 12.0  # ± per channel, of 255
BORDER = 0.03  # gap between a shape and the image edge, in image widths
MARGIN = 0.02  # a centre stays this far inside its third of the image
# Largest shape: 0.20 × 1.08 × 1.25 = 0.27 wide from its centre; 0.27 + BORDER <= 1/3 - MARGIN,
# so a corner shape always fits with its centre inside its own third.
assert RADIUS[1] * (1 + SIZE_JITTER) * max(EXTENT) + BORDER <= 1 / 3 - MARGIN

OUTLINE_WIDTH = 0.05  # an outline's thickness, in image widths (1.6 pixels at 32x32)
_N_DRAWS = 10  # uniform draws per image (one row each): see generate_shapes
_CHUNK = 2048  # images rendered at once; bounds memory at about 20 float32 (chunk, S, S) arrays


def caption(shape: int, colour: int, size: int, position: int, style: int = 0) -> str:
    """The caption of one image from its labels, e.g. "a small red circle at the top left"
    ("a small red outlined circle ..." for an outlined one)."""
    for name, value, names in (
        ("shape", shape, SHAPES),
        ("colour", colour, COLOURS),
        ("size", size, SIZES),
        ("position", position, POSITIONS),
        ("style", style, STYLES),
    ):
        if not 0 <= int(value) < len(names):
            raise ValueError(f"{name} label must be in 0..{len(names) - 1}, got {value}")
    drawn = "outlined " if style else ""
    return (
        f"a {SIZES[size]} {COLOURS[colour]} {drawn}{SHAPES[shape]} "
        f"{_PREPOSITIONS[position]} the {POSITIONS[position]}"
    )


def generate_shapes(n: int, image_size: int = 32, seed: int = 0, style: str = "filled") -> ImageSet:
    """``n`` labelled, captioned RGB images of ``image_size``² pixels, deterministic in ``seed``.

    Labels: ``shape``, ``colour``, ``size``, ``position`` (indices into ``SHAPES``,
    ``COLOURS``, ``SIZES``, ``POSITIONS``), each drawn uniformly and independently;
    ``style`` "filled", "outlined", or "both" (each image's style drawn, and labelled
    ``style``, an index into ``STYLES``).
    """
    return shapes_stream(n, image_size, seed, style).collect()


def shapes_stream(
    n: int, image_size: int = 32, seed: int = 0, style: str = "filled", star: bool = False
) -> ImageStream:
    """The images of ``generate_shapes`` drawn ``_CHUNK`` at a time (labels and captions at
    once). ``star``: every shape is a five-pointed star instead, a shape the set lacks
    ("a small red star at the top left"; labels colour, size and position), to teach a
    trained model a new word (concept fine-tuning)."""
    if style not in (*STYLES, "both"):
        raise ConfigError(f"shapes style {style!r}: choose filled, outlined or both")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"data.n (number of shapes images) must be an integer >= 1, got {n!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 4:
        raise ConfigError(f"data.image_size must be an integer >= 4, got {image_size!r}")

    # One row of uniform draws per image, so a longer set starts with the shorter one.
    u = np.random.default_rng(seed).random((n, _N_DRAWS))
    shape = (u[:, 0] * len(SHAPES)).astype(np.int64)
    colour = (u[:, 1] * len(COLOURS)).astype(np.int64)
    size = (u[:, 2] * len(SIZES)).astype(np.int64)
    position = (u[:, 3] * len(POSITIONS)).astype(np.int64)

    if star:
        shape = np.full(n, len(SHAPES), dtype=np.int64)
    radius = np.asarray(RADIUS)[size] * (1 + SIZE_JITTER * (2 * u[:, 4] - 1))
    extent = radius * np.asarray((*EXTENT, STAR_EXTENT))[shape]
    cx = _place(position % 3, extent, u[:, 5])  # column 0..2, left to right
    cy = _place(position // 3, extent, u[:, 6])  # row 0..2, top to bottom
    rgb = np.clip(PALETTE[colour] + COLOUR_JITTER * (2 * u[:, 7:10] - 1), 0, 255)
    if style == "both":  # a stream of its own: the scenes are the same seed's
        drawn = (np.random.default_rng([seed, 1]).random(n) < 0.5).astype(np.int64)
    else:
        drawn = np.full(n, STYLES.index(style), dtype=np.int64)

    if star:
        captions = [caption(0, *row).replace(f" {SHAPES[0]} ", " star ", 1)
                    for row in zip(colour, size, position, drawn, strict=True)]  # fmt: skip
        labels = {"colour": colour, "size": size, "position": position}
        classes = {"colour": list(COLOURS), "size": list(SIZES), "position": list(POSITIONS)}
    else:
        captions = [caption(*row) for row in zip(shape, colour, size, position, drawn, strict=True)]
        labels = {"shape": shape, "colour": colour, "size": size, "position": position}
        classes = {"shape": list(SHAPES), "colour": list(COLOURS), "size": list(SIZES),
                   "position": list(POSITIONS)}  # fmt: skip
    if style == "both":
        labels["style"], classes["style"] = drawn, list(STYLES)
    kind = "" if style == "filled" else f", {style}" if style == "outlined" else ", both styles"
    kind += ", stars" if star else ""
    info = ImageSetInfo(
        labels=labels,
        classes=classes,
        captions=captions,
        source=f"shapes (n={n}, {image_size}x{image_size}, seed={seed}{kind})",
    )

    def chunks() -> Generator[np.ndarray, None, ImageSetInfo]:
        for a in range(0, n, _CHUNK):
            b = min(a + _CHUNK, n)
            cover = _coverage(shape[a:b], cx[a:b], cy[a:b], radius[a:b], image_size,
                              drawn[a:b])  # (m, S, S)  # fmt: skip
            pixels = cover[..., None] * rgb[a:b, None, None, :].astype(np.float32)  # (m, S, S, 3)
            yield np.rint(pixels).astype(np.uint8)
        return info

    return ImageStream(chunks())


def _place(cell: np.ndarray, extent: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Centre coordinates (image widths) for grid cells 0..2 along one axis.

    The nominal centres spread the shape from touching the near border to touching
    the far one; jitter is then clipped so the shape stays inside the image and its
    centre inside its own third (with MARGIN), keeping the position label exact.
    """
    lo = extent + BORDER
    hi = 1.0 - extent - BORDER
    nominal = lo + cell * (hi - lo) / 2
    jittered = nominal + POSITION_JITTER * (2 * u - 1)
    return np.clip(
        jittered, np.maximum(lo, cell / 3 + MARGIN), np.minimum(hi, (cell + 1) / 3 - MARGIN)
    )


def _coverage(
    shape: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    radius: np.ndarray,
    size: int,
    outlined: np.ndarray | None = None,
) -> np.ndarray:
    """(m, S, S) float32 fraction of each pixel covered by each image's shape (by the band
    of OUTLINE_WIDTH inside its edge where ``outlined``)."""
    m = len(shape)
    grid = (np.arange(size, dtype=np.float32) + 0.5)[None, :]  # pixel centres, (1, S)
    sdf = np.empty((m, size, size), dtype=np.float32)
    for k in range(len(_SDF)):
        idx = np.flatnonzero(shape == k)
        if idx.size == 0:
            continue
        # Offsets from the centre in pixels: x grows right, y grows down. (m_k, 1, S) and (m_k, S, 1)
        dx = (grid - (cx[idx] * size).astype(np.float32)[:, None])[:, None, :]
        dy = (grid - (cy[idx] * size).astype(np.float32)[:, None])[:, :, None]
        r = (radius[idx] * size).astype(np.float32)[:, None, None]
        sdf[idx] = _SDF[k](dx, dy, r)
    if outlined is not None and outlined.any():
        t = np.float32(OUTLINE_WIDTH * size)
        band = np.abs(sdf + t / 2) - t / 2  # inside the edge, t thick ("onion" of the sdf)
        sdf = np.where(outlined.astype(bool)[:, None, None], band, sdf)
    return np.clip(0.5 - sdf, 0.0, 1.0)


# Signed distances in pixels (negative inside), after Inigo Quilez's 2D distance functions.


def _sdf_circle(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.sqrt(dx * dx + dy * dy) - r


def _sdf_box(dx: np.ndarray, dy: np.ndarray, hx: np.ndarray, hy: np.ndarray) -> np.ndarray:
    qx = np.abs(dx) - hx
    qy = np.abs(dy) - hy
    outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
    return outside + np.minimum(np.maximum(qx, qy), 0)


def _sdf_square(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    h = EXTENT[1] * r
    return _sdf_box(dx, dy, h, h)


def _sdf_triangle(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    # Equilateral, pointing up, centroid at the centre, circumradius EXTENT[2] * r.
    k = np.float32(np.sqrt(3.0))
    half_side = EXTENT[2] * r * k / 2
    px = np.abs(dx) - half_side
    py = -dy + half_side / k  # y up
    fold = px + k * py > 0  # nearer the slanted edge: reflect onto the base edge's frame
    px, py = np.where(fold, (px - k * py) / 2, px), np.where(fold, (-k * px - py) / 2, py)
    px = px - np.clip(px, -2 * half_side, 0)
    return -np.sqrt(px * px + py * py) * np.sign(py)


def _sdf_diamond(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    # A square turned 45°: its half-diagonal is EXTENT[3] * r.
    s = np.float32(np.sqrt(0.5))
    h = EXTENT[3] * r * s
    return _sdf_box((dx + dy) * s, (dx - dy) * s, h, h)


def _sdf_cross(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    # Union of two bars (min of their distances): exact outside, where anti-aliasing happens.
    arm = EXTENT[4] * r
    w = CROSS_HALF_WIDTH * r
    return np.minimum(_sdf_box(dx, dy, arm, w), _sdf_box(dx, dy, w, arm))


STAR_EXTENT = 1.2  # a star's outer radius per unit radius
STAR_INNER = 0.45  # its inner radius, a share of the outer one


def _sdf_star(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    # A five-pointed star, one point up: the distance to its ten-sided polygon, negative
    # inside by the even-odd crossing rule (Quilez's sdPolygon).
    k = np.arange(10)
    angle = -np.pi / 2 + k * np.pi / 5
    reach = np.where(k % 2 == 0, 1.0, STAR_INNER).astype(np.float32)
    outer = STAR_EXTENT * r  # (m, 1, 1)
    vx = [outer * np.float32(reach[i] * np.cos(angle[i])) for i in range(10)]
    vy = [outer * np.float32(reach[i] * np.sin(angle[i])) for i in range(10)]
    d2 = None
    inside = np.zeros(np.broadcast_shapes(dx.shape, dy.shape), dtype=bool)
    for i in range(10):
        j = (i + 9) % 10
        ex, ey = vx[j] - vx[i], vy[j] - vy[i]
        wx, wy = dx - vx[i], dy - vy[i]
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0, 1)
        bx, by = wx - ex * t, wy - ey * t
        dist = bx * bx + by * by
        d2 = dist if d2 is None else np.minimum(d2, dist)
        crosses = (dy >= vy[i]) != (dy >= vy[j])
        left = ex * wy > ey * wx
        inside ^= crosses & (left == (vy[j] > vy[i]))
    return np.where(inside, -1.0, 1.0).astype(np.float32) * np.sqrt(d2)


# every shape the generator draws, and after them the one the embedded set lacks
_SDF = (_sdf_circle, _sdf_square, _sdf_triangle, _sdf_diamond, _sdf_cross, _sdf_star)
assert len(_SDF) == len(SHAPES) + 1 == len(EXTENT) + 1
