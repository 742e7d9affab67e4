"""Image sets for the GAN and VAE families: embedded sources and real formats, as uint8 arrays.

``load_image_set`` turns a source into an ``ImageSet`` of same-sized (N, H, W, C)
uint8 images with integer labels; ``image_stream`` reads the same images a chunk
at a time, so that a set larger than memory can be written to disk. Sources:

- ``"digits"`` (the default): scikit-learn's 1,797 handwritten 8×8 digits, no download,
  captioned from their class ("a handwritten seven").
- ``"shapes"``: procedural coloured shapes with four labels and a caption each
  (``aigc.data.shapes``), any number, deterministic in a seed.
- an image folder: one sub-folder per class (``root/<class>/**/*.png``), or the
  images directly in ``root`` for an unlabelled set; PNG, JPEG, WebP, BMP, GIF.
  A folder holding ``train`` and ``test`` (or ``val``) sub-folders is split by them.
  A ``metadata.jsonl`` or ``metadata.csv`` with ``file_name`` and ``text`` columns
  (Hugging Face's imagefolder convention, ``aigc.data.captions``) captions every image.
- an audio folder (clips in one sub-folder per class, .wav, .flac, .ogg or .mp3): each
  clip's one-second log-mel picture, made as the ``spoken-digits`` pictures are
  (``aigc.data.speech.audio_folder_pictures``), labelled ``class``.
- MNIST / Fashion-MNIST IDX files, gzipped or not: an ``*-images-idx3-ubyte[.gz]``
  file (its ``*-labels-idx1-ubyte[.gz]`` found beside it) or the folder holding them.
- CIFAR-10 / CIFAR-100 **binary** version: ``cifar-10-batches-bin`` or
  ``cifar-100-binary`` (or one ``.bin`` file of them). The pickled Python version
  is refused: unpickling a downloaded file can run arbitrary code.

Every image is converted to RGB or L, centre-cropped to a square (or squashed)
and resized with Pillow (LANCZOS when shrinking, BICUBIC when enlarging). Bad
files raise ``DataError`` naming the file and the fault; with ``skip_bad`` they
are skipped and counted in ``ImageSet.skipped``. Nothing is ever downloaded.

Training code uses ``to_tensor`` (uint8 -> [-1, 1] float), ``random_flip`` for
augmentation, ``to_uint8`` / ``image_grid`` / ``save_png`` for samples and
``split_indices`` for a deterministic validation split.
"""

from __future__ import annotations

import math
import os
import re
import zlib
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image

from aigc.data.captions import captions_for, find_metadata
from aigc.errors import ConfigError, DataError

EMBEDDED = ("digits", "shapes", "shapes-outlined", "shapes-styled", "shapes-stars", "spoken-digits")
# the shapes sources: each style, or both (labelled "style")
SHAPES_STYLES = {"shapes": "filled", "shapes-outlined": "outlined", "shapes-styled": "both",
                 "shapes-stars": "filled"}  # fmt: skip
SPLITS = ("train", "test")
CHANNELS = {1: "L", 3: "RGB"}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
PIL_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")  # Pillow never guesses other formats
# Files an image folder may hold besides images, never read: metadata and OS clutter.
IGNORED_SUFFIXES = (".txt", ".md", ".json", ".jsonl", ".csv", ".tsv", ".yaml", ".yml")
IGNORED_NAMES = ("Thumbs.db", "desktop.ini")
# Sub-folder names that mean "a split of the data", not "a class".
SPLIT_DIRS = {"train": ("train",), "test": ("test", "val", "valid", "validation")}
_PARALLEL_FROM = 64  # image files; fewer are decoded on the calling thread
CHUNK_BYTES = 1 << 22  # decoded pixels a stream holds at once (4 MiB)
_READ_BLOCK = 1 << 20  # bytes read from a file at once

# IDX (MNIST family): "train-images-idx3-ubyte.gz", also "train-images.idx3-ubyte".
IDX_IMAGES = re.compile(r"(?P<prefix>.*)images[.-]idx3[.-]ubyte(\.gz)?", re.IGNORECASE)
IDX_LABELS = re.compile(r".*labels[.-]idx1[.-]ubyte(\.gz)?", re.IGNORECASE)
IDX_UBYTE = 0x08  # element type code of unsigned bytes, the only one images use
IDX_SPLIT_WORDS = {"train": ("train",), "test": ("t10k", "test")}

# CIFAR binary version: records of label byte(s) then 32×32 R plane, G plane, B plane.
CIFAR_PIXELS = 3 * 32 * 32
CIFAR10_BATCH = re.compile(r"data_batch_(\d+)\.bin")
CIFAR_PICKLED_DIRS = ("cifar-10-batches-py", "cifar-100-python")
CIFAR_PICKLED_FILES = re.compile(r"data_batch_\d+|test_batch|batches\.meta")
CIFAR_BINARY_HELP = (
    "aigc reads only the binary version (unpickling a downloaded file can run arbitrary "
    "code): download cifar-10-binary.tar.gz or cifar-100-binary.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html, extract it and pass the folder "
    "cifar-10-batches-bin or cifar-100-binary"
)


# --------------------------------------------------------------------------- the result


@dataclass
class ImageSet:
    """Same-sized images with integer labels per attribute, as loaded by ``load_image_set``."""

    images: np.ndarray  # (N, H, W, C) uint8, C = 1 or 3
    labels: dict[str, np.ndarray]  # attribute -> (N,) int64; {} when unlabelled; one label: "class"
    classes: dict[str, list[str]]  # attribute -> names of its values (index = label value)
    captions: list[str] | None  # one per image, or None
    source: str  # where it came from, for logs and reports
    skipped: int = 0  # bad files skipped with skip_bad

    def __post_init__(self) -> None:
        n = len(self.images)
        if (
            self.images.dtype != np.uint8
            or self.images.ndim != 4
            or self.images.shape[3] not in (1, 3)
        ):
            raise ValueError(
                f"images must be (N, H, W, 1 or 3) uint8, got {self.images.shape} {self.images.dtype}"
            )
        for key, values in self.labels.items():
            if values.shape != (n,):
                raise ValueError(f"labels[{key!r}] has shape {values.shape}, expected ({n},)")
            if key not in self.classes:
                raise ValueError(f"labels[{key!r}] has no class names")
        if self.captions is not None and len(self.captions) != n:
            raise ValueError(f"{len(self.captions)} captions for {n} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def is_labelled(self) -> bool:
        """False for an unlabelled set (e.g. images directly in a folder), unusable for conditioning."""
        return bool(self.labels)

    def require_labels(self, key: str = "class") -> np.ndarray:
        """The (N,) labels of ``key``, or a DataError saying why a conditional model cannot use this set."""
        if key in self.labels:
            return self.labels[key]
        if not self.labels:
            raise DataError(
                f"{self.source} has no labels, but a conditional model needs them: put each "
                "class's images in its own sub-folder (root/<class>/...), or train an "
                "unconditional model"
            )
        raise DataError(
            f"{self.source} has no {key!r} labels; it has {', '.join(map(repr, self.labels))}"
        )

    def subset(self, idx: np.ndarray) -> ImageSet:
        """The images at integer indices (or a boolean mask) ``idx``, with their labels and captions."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return ImageSet(
            images=self.images[idx],
            labels={k: v[idx] for k, v in self.labels.items()},
            classes={k: list(v) for k, v in self.classes.items()},
            captions=None if self.captions is None else [self.captions[i] for i in idx],
            source=self.source,
            skipped=self.skipped,
        )


@dataclass
class ImageSetInfo:
    """What an ImageSet holds besides its pixels (the fields of ``ImageSet`` but ``images``)."""

    labels: dict[str, np.ndarray]
    classes: dict[str, list[str]]
    captions: list[str] | None
    source: str
    skipped: int = 0


class ImageStream:
    """A source's images a chunk at a time, so that a set larger than memory can be written out.

    Iterate it once: it yields (m, H, W, C) uint8 chunks of about ``CHUNK_BYTES``, in the
    order ``load_image_set`` returns the images; once it is exhausted, ``info`` holds
    their labels, classes, captions, source and skip count. Its errors are those of
    ``load_image_set``, but one found late (a truncated file) may come after some chunks.
    """

    def __init__(self, reader: Generator[np.ndarray, None, ImageSetInfo]):
        self._reader = reader  # yields the chunks, returns the info
        self.info: ImageSetInfo | None = None

    def __iter__(self) -> Iterator[np.ndarray]:
        self.info = yield from self._reader

    def map(self, convert: Callable[[np.ndarray], np.ndarray]) -> ImageStream:
        """This stream with ``convert`` (a per-image conversion) applied to every chunk."""

        def converted() -> Generator[np.ndarray, None, ImageSetInfo]:
            while True:
                try:
                    chunk = next(self._reader)
                except StopIteration as end:
                    return end.value
                yield convert(chunk)

        return ImageStream(converted())

    def collect(self) -> ImageSet:
        """All the images in memory, as one ImageSet."""
        images = np.concatenate(list(self))
        info = self.info
        return ImageSet(images, info.labels, info.classes, info.captions, info.source, info.skipped)


def chunk_rows(image_bytes: int) -> int:
    """How many images of ``image_bytes`` bytes make a chunk of about ``CHUNK_BYTES``."""
    return max(1, CHUNK_BYTES // max(1, image_bytes))


def _whole(images: np.ndarray, info: ImageSetInfo) -> Generator[np.ndarray, None, ImageSetInfo]:
    """A set already in memory, as a stream of one chunk."""
    yield images
    return info


# --------------------------------------------------------------------------- loading


def load_image_set(
    source: str | os.PathLike | None,
    *,
    image_size: int = 32,
    channels: int = 3,
    crop: bool = True,
    skip_bad: bool = False,
    split: str = "train",
    n: int = 10000,
    seed: int = 0,
) -> ImageSet:
    """Read ``source`` as ``image_size``² images with ``channels`` channels, all in memory.

    source: None or "digits", "shapes", or a path: an image folder, an IDX images
        file (its labels file found beside it by name), a folder of IDX files
        (MNIST layout), or a CIFAR binary folder or ``.bin`` file.
    channels: 1 (greyscale, "L") or 3 ("RGB"); grey sources are repeated to 3
        channels, colour sources converted with ITU-R 601-2 luma (as Pillow does).
    crop: centre-crop non-square images to a square before resizing (else squash).
    skip_bad: skip (and count) undecodable or unsupported files instead of raising.
    split: "train" or "test": MNIST train / t10k files, CIFAR data_batch_* / test_batch
        or train.bin / test.bin, an image folder's train / test (or val) sub-folder.
        The embedded sources have no split and ignore it.
    n, seed: number of images and seed of "shapes".
    """
    return image_stream(
        source,
        image_size=image_size,
        channels=channels,
        crop=crop,
        skip_bad=skip_bad,
        split=split,
        n=n,
        seed=seed,
    ).collect()


def image_stream(
    source: str | os.PathLike | None,
    *,
    image_size: int = 32,
    channels: int = 3,
    crop: bool = True,
    skip_bad: bool = False,
    split: str = "train",
    n: int = 10000,
    seed: int = 0,
) -> ImageStream:
    """The images ``load_image_set`` reads (same arguments), a chunk at a time.

    Image files are decoded a chunk at a time, MNIST IDX (gzipped or not) and CIFAR
    files read a block at a time and "shapes" drawn a chunk at a time; "digits" is
    one small chunk.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 4:
        raise ConfigError(f"data.image_size must be an integer >= 4, got {image_size!r}")
    if channels not in CHANNELS:
        raise ConfigError(f"data.channels must be 1 (greyscale) or 3 (RGB), got {channels!r}")
    if split not in SPLITS:
        raise ConfigError(f"data.split must be one of {SPLITS}, got {split!r}")

    if source is None or source == "digits":
        images, labels = _digits_raw()
        info = ImageSetInfo(
            labels={"class": labels.copy()},
            classes={"class": [str(i) for i in range(10)]},
            captions=[f"a handwritten {DIGIT_WORDS[y]}" for y in labels],
            source="digits (scikit-learn handwritten digits, 1,797 images of 8x8)",
        )
        return ImageStream(_whole(_prepare(images, image_size, channels, crop), info))
    if source == "spoken-digits":
        return ImageStream(_whole(*_spoken_digit_pictures(image_size, channels)))
    if source in SHAPES_STYLES:
        from aigc.data.shapes import shapes_stream

        stream = shapes_stream(n, image_size=image_size, seed=seed, style=SHAPES_STYLES[source],
                               star=source == "shapes-stars")  # fmt: skip
        return stream if channels == 3 else stream.map(lambda x: _to_channels(x, channels))

    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"no such file or folder: {path}; use an embedded source ({', '.join(EMBEDDED)}) "
            "or a path to an image folder, MNIST IDX files or CIFAR binary files "
            "(aigc never downloads data)"
        )
    if _is_pickled_cifar(path):
        raise DataError(f"{path} is the pickled Python version of CIFAR; {CIFAR_BINARY_HELP}")
    opts = {"image_size": image_size, "channels": channels, "crop": crop}
    if path.is_file():
        return ImageStream(_file_reader(path, **opts))
    names = {p.name for p in path.iterdir()}
    if any(CIFAR10_BATCH.fullmatch(name) for name in names) or "test_batch.bin" in names:
        return ImageStream(_cifar10_folder_reader(path, split, skip_bad, **opts))
    if "train.bin" in names or "test.bin" in names:
        return ImageStream(_cifar100_reader(path / f"{split}.bin", **opts))
    if any(IDX_IMAGES.fullmatch(name) for name in names):
        return ImageStream(_idx_chunks(_idx_images_in(path, split), **opts))
    if _holds_audio(_split_folder(path, split)):
        return ImageStream(_whole(*_audio_folder_pictures(path, image_size, channels, split,
                                                          skip_bad)))  # fmt: skip
    return ImageStream(_image_folder_reader(path, split, skip_bad=skip_bad, **opts))


Reader = Generator[np.ndarray, None, ImageSetInfo]  # yields chunks, returns what they are


def _file_reader(path: Path, **opts) -> Reader:
    """A single file given as the source: IDX images or one CIFAR binary file."""
    name = path.name
    if IDX_IMAGES.fullmatch(name):
        return _idx_chunks(path, **opts)
    if IDX_LABELS.fullmatch(name):
        raise DataError(f"{path} is an IDX labels file; pass its images file (*-images-idx3-ubyte)")
    if CIFAR10_BATCH.fullmatch(name) or name == "test_batch.bin":
        return _cifar10_chunks([path], skip_bad=False, **opts)
    if name in ("train.bin", "test.bin"):
        return _cifar100_reader(path, **opts)
    if name.endswith((".tar.gz", ".tgz", ".tar", ".zip")):
        raise DataError(f"{path} is an archive; extract it and pass the extracted folder")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise DataError(f"{path} is a single image; pass the folder of images that holds it")
    raise DataError(
        f"{path}: not a supported image source (an image folder, MNIST *-images-idx3-ubyte[.gz], "
        "or CIFAR binary data_batch_*.bin / test_batch.bin / train.bin / test.bin)"
    )


# --------------------------------------------------------------------------- embedded digits


@lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as read-only (1797, 8, 8, 1) uint8 in 0..255 and (1797,) int64."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # a broken install: scikit-learn is a dependency
        raise DataError("the digits source needs scikit-learn: pip install scikit-learn") from e
    digits = load_digits()  # read from a CSV file bundled with scikit-learn
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[..., None]  # 0..16 -> 0..255
    labels = digits.target.astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _spoken_digit_pictures(size: int, channels: int) -> tuple[np.ndarray, ImageSetInfo]:
    """The embedded spoken digits as log-mel pictures (a row per mel band, a column per
    frame), labelled by digit, voice, rate and pitch."""
    from aigc.data.speech import DIGITS, PITCHES, RATES, VOICES, spoken_digit_pictures

    pictures, clips = spoken_digit_pictures(size)
    labels = {"digit": clips.digit, "voice": clips.voice, "rate": clips.rate, "pitch": clips.pitch}
    classes = {"digit": list(DIGITS), "voice": list(VOICES), "rate": [f"{r:g}" for r in RATES],
               "pitch": [f"{p:g}" for p in PITCHES]}  # fmt: skip
    captions = [
        f"{DIGITS[d]} spoken by {VOICES[v]}" for d, v in zip(clips.digit, clips.voice, strict=True)
    ]
    info = ImageSetInfo(
        labels={k: np.array(v, dtype=np.int64) for k, v in labels.items()},
        classes=classes,
        captions=captions,
        source=f"spoken-digits (flite, {len(pictures):,} one-second clips as log-mel pictures)",
    )
    return _to_channels(pictures, channels), info


def _audio_folder_pictures(
    root: Path, size: int, channels: int, split: str, skip_bad: bool
) -> tuple[np.ndarray, ImageSetInfo]:
    """A folder of audio files, one sub-folder per class, as log-mel pictures made as the
    spoken digits' are (``aigc.data.speech.audio_folder_pictures``), labelled by class."""
    from aigc.data.speech import audio_folder_pictures

    pictures, folder = audio_folder_pictures(root, size, split, skip_bad)
    cut = f"; {folder.cut} longer than a second, their middle kept" if folder.cut else ""
    info = ImageSetInfo(
        labels={"class": np.array(folder.labels)},
        classes={"class": list(folder.classes)},
        captions=None,
        source=f"{folder.root} (audio folder, {len(pictures):,} clips of {len(folder.classes)} "
        f"classes as one-second log-mel pictures{cut})",
        skipped=folder.skipped,
    )
    return _to_channels(pictures, channels), info


# --------------------------------------------------------------------------- image folders


def _holds_audio(root: Path) -> bool:
    """Whether the first file of a folder (in sorted walk order, ignored files passed
    over) with an image or audio suffix is audio: the folder is then read as audio."""
    from aigc.data.audio import AUDIO_SUFFIXES

    for _, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            suffix = Path(name).suffix.lower()
            if suffix in AUDIO_SUFFIXES:
                return True
            if suffix in IMAGE_SUFFIXES:
                return False
    return False


def _image_folder_reader(
    root: Path, split: str, *, image_size: int, channels: int, crop: bool, skip_bad: bool
) -> Reader:
    top, root = root, _split_folder(root, split)
    # captions: a metadata file beside the images, or above the split folders
    metadata = find_metadata(root) or (find_metadata(top) if root != top else None)
    children = sorted(p for p in root.iterdir() if not _ignored(p))
    loose = [p for p in children if p.is_file()]
    by_class = {d.name: _files_under(d) for d in children if d.is_dir()}
    by_class = {name: files for name, files in by_class.items() if files}
    if loose and by_class:
        raise DataError(
            f"{root} holds files directly in it (e.g. {loose[0].name}) and class sub-folders "
            f"({', '.join(list(by_class)[:3])}); move the loose files into a class folder, "
            "or point at one folder"
        )
    if not loose and not by_class:
        raise DataError(
            f"{root} holds no images; put images ({', '.join(IMAGE_SUFFIXES)}) in it, "
            "or one sub-folder of images per class"
        )
    class_names = list(by_class)  # sorted, as children are
    if by_class:
        files = [(f, i) for i, name in enumerate(class_names) for f in by_class[name]]
    else:
        files = [(f, -1) for f in loose]
    # (file, label, caption); files of other types have none: they are refused or skipped
    captions: dict[Path, str] = {}
    if metadata is not None:
        images = [f for f, _ in files if f.suffix.lower() in IMAGE_SUFFIXES]
        captions = dict(zip(images, captions_for(images, root, metadata), strict=True))
    files = [(f, y, captions.get(f)) for f, y in files]
    mode = CHANNELS[channels]

    def read(item: tuple[Path, int, str | None]) -> np.ndarray | None:
        try:
            return _read_image_file(item[0], mode, image_size, crop)
        except DataError:
            if skip_bad:
                return None
            raise

    def chunks() -> Reader:
        # Pillow releases the GIL while decoding and resizing
        parallel = len(files) >= _PARALLEL_FROM
        pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) if parallel else None
        per_chunk = chunk_rows(image_size * image_size * channels)
        kept_labels, kept_captions = [], []
        try:
            for start in range(0, len(files), per_chunk):
                batch = files[start : start + per_chunk]
                arrays = list(pool.map(read, batch)) if pool else [read(item) for item in batch]
                keep = [i for i, a in enumerate(arrays) if a is not None]
                kept_labels.extend(batch[i][1] for i in keep)
                kept_captions.extend(batch[i][2] for i in keep)
                if keep:
                    yield np.stack([arrays[i] for i in keep])
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        skipped = len(files) - len(kept_labels)
        if not kept_labels:
            raise DataError(
                f"{root}: none of its {len(files)} files could be read ({skipped} skipped)"
            )
        what = f"{len(class_names)} classes" if class_names else "unlabelled"
        if by_class:
            labels = {"class": np.array(kept_labels, dtype=np.int64)}
            classes = {"class": class_names}
        else:
            labels, classes = {}, {}
        if metadata is None:
            return ImageSetInfo(labels, classes, None, f"{root} (image folder, {what})", skipped)
        source = f"{root} (image folder, {what}, captions from {metadata})"
        return ImageSetInfo(labels, classes, kept_captions, source, skipped)

    return chunks()


def _split_folder(root: Path, split: str) -> Path:
    """``root/<split>`` when root holds a train folder and a test/val folder, else root."""
    names = {p.name for p in root.iterdir() if p.is_dir()}
    if "train" not in names or not names.intersection(SPLIT_DIRS["test"]):
        return root
    return root / next(name for name in SPLIT_DIRS[split] if name in names)


def _ignored(path: Path) -> bool:
    """Hidden files and folders, OS clutter and metadata files are never read."""
    name = path.name
    return (
        name.startswith(".")
        or name in IGNORED_NAMES
        or (path.suffix.lower() in IGNORED_SUFFIXES and not path.is_dir())
    )


def _files_under(folder: Path) -> list[Path]:
    """All files below ``folder`` (recursively, sorted), except ignored ones."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath)
        found.extend(base / f for f in sorted(filenames) if not _ignored(base / f))
    return found


def _read_image_file(path: Path, mode: str, size: int, crop: bool) -> np.ndarray:
    """One image file as a (size, size, C) uint8 array, or a DataError naming the fault."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type; image folders hold {', '.join(IMAGE_SUFFIXES)} files "
            "(remove it, or skip such files with data.skip_bad=true)"
        )
    try:
        with Image.open(path, formats=PIL_FORMATS) as img:
            img.draft(None, (size, size))  # JPEG: decode at a reduced scale when much larger
            img.load()
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
            out = _to_mode(img, mode)
            if orientation != 1:  # camera photos store their rotation in EXIF
                from PIL import ImageOps

                out = ImageOps.exif_transpose(out)
            out = _resize_square(out, size, crop)
            array = np.asarray(out)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(
            f"{path}: cannot decode image ({e}); replace or remove the file, "
            "or skip bad files with data.skip_bad=true"
        ) from e
    return array.reshape(size, size, len(mode))


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Converts to L or RGB; transparent pixels are composited over black."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return img if img.mode == mode else img.convert(mode)


def _resize_square(img: Image.Image, size: int, crop: bool) -> Image.Image:
    """Centre-crops to a square (when ``crop``) and resizes to ``size``²."""
    w, h = img.size
    box = None
    side = min(w, h) if crop else max(w, h)
    if crop and w != h:
        left, top = (w - side) // 2, (h - side) // 2
        box = (left, top, left + side, top + side)
    if box is None and (w, h) == (size, size):
        return img
    # Pillow's LANCZOS widens its kernel when shrinking, so it anti-aliases.
    resample = Image.Resampling.LANCZOS if side > size else Image.Resampling.BICUBIC
    return img.resize((size, size), resample, box=box)


# --------------------------------------------------------------------------- MNIST IDX


def _idx_images_in(folder: Path, split: str) -> Path:
    """The IDX images file of ``split`` in an MNIST-layout folder (plain preferred to .gz)."""
    by_prefix: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        m = IDX_IMAGES.fullmatch(p.name)
        if m and any(w in m["prefix"].lower() for w in IDX_SPLIT_WORDS[split]):
            by_prefix.setdefault(m["prefix"], []).append(p)
    if not by_prefix:
        raise DataError(
            f"{folder} has no {split} IDX images file (a name with "
            f"{' or '.join(IDX_SPLIT_WORDS[split])} and images-idx3-ubyte)"
        )
    if len(by_prefix) > 1:
        names = ", ".join(files[0].name for files in by_prefix.values())
        raise DataError(
            f"{folder} has several {split} IDX images files ({names}); pass one of them"
        )
    (files,) = by_prefix.values()
    return min(files, key=lambda p: p.suffix.lower() == ".gz")


def _idx_labels_for(images_path: Path) -> Path | None:
    """The labels file beside an images file: same prefix, labels-idx1-ubyte, .gz or not."""
    prefix = IDX_IMAGES.fullmatch(images_path.name)["prefix"]
    pattern = re.compile(re.escape(prefix) + r"labels[.-]idx1[.-]ubyte(\.gz)?", re.IGNORECASE)
    found = [p for p in sorted(images_path.parent.iterdir()) if pattern.fullmatch(p.name)]
    if not found:
        return None
    same_gz = [p for p in found if (p.suffix == ".gz") == (images_path.suffix == ".gz")]
    return (same_gz or found)[0]


def _idx_chunks(path: Path, *, image_size: int, channels: int, crop: bool) -> Reader:
    """An IDX images file read a block at a time, its labels file (beside it) at the end."""
    out_bytes = image_size * image_size * channels
    n = 0
    for raw in _idx_items(path, ndim=3, what="images", out_item_bytes=out_bytes):
        yield _prepare(raw[..., None], image_size, channels, crop)  # (m, rows, cols, 1) in
        n += len(raw)
    if n == 0:  # a header of 0 images: still a set, of none
        yield np.zeros((0, image_size, image_size, channels), dtype=np.uint8)
    labels_path = _idx_labels_for(path)
    if labels_path is None:
        labels, classes, note = {}, {}, "no labels file beside it, unlabelled"
    else:
        items = list(_idx_items(labels_path, ndim=1, what="labels"))
        y = np.concatenate(items).astype(np.int64) if items else np.zeros(0, np.int64)
        if len(y) != n:
            raise DataError(
                f"{labels_path} has {len(y):,} labels but {path.name} has {n:,} images; "
                "use the labels file of the same split"
            )
        n_classes = max(10, int(y.max(initial=0)) + 1)
        labels, classes = {"class": y}, {"class": [str(i) for i in range(n_classes)]}
        note = f"labels from {labels_path.name}"
    return ImageSetInfo(labels, classes, None, f"{path} (IDX, {note})")


def _idx_items(
    path: Path, *, ndim: int, what: str, out_item_bytes: int = 0
) -> Generator[np.ndarray, None, None]:
    """The items of an IDX file of unsigned bytes with ``ndim`` dimensions (an image of
    rows x cols, or one label), as (m, *dims[1:]) uint8 chunks of about ``CHUNK_BYTES``
    (counting an item as ``out_item_bytes`` when that is larger). Its size is checked
    against its header once it has been read through, so a truncated file fails late.

    Header: two zero bytes, the element type (0x08 = unsigned byte), the number of
    dimensions, then each dimension as a big-endian 32-bit integer.
    """
    blocks = _file_blocks(path)
    header = 4 + 4 * ndim
    data = bytearray()  # the header, then items not yet yielded
    ended = gz_truncated = False
    while len(data) < header and not ended:
        try:
            data += next(blocks)
        except StopIteration as end:
            ended, gz_truncated = True, end.value
    expected_magic = (IDX_UBYTE << 8) | ndim  # 2051 for images, 2049 for labels
    if gz_truncated and len(data) < header:
        raise DataError(
            f"{path}: truncated: the gzip stream ends after {len(data)} bytes, inside the "
            f"{header}-byte IDX header; download it again"
        )
    if len(data) < 4 or data[:2] != b"\0\0" or data[3] != ndim:
        raise DataError(
            f"{path}: not an IDX {what} file: magic number 0x{data[:4].hex() or '(none)'}, "
            f"expected 0x{expected_magic:08x} ({expected_magic}); check the file name and download"
        )
    if data[2] != IDX_UBYTE:
        raise DataError(
            f"{path}: IDX element type 0x{data[2]:02x} is not supported (only unsigned bytes, 0x08)"
        )
    dims = tuple(int(d) for d in np.frombuffer(bytes(data[4:header]).ljust(4 * ndim, b"\0"), ">u4"))
    expected = header + math.prod(dims)
    size = len(data)  # bytes read so far
    del data[:header]
    item = math.prod(dims[1:])
    per_chunk = chunk_rows(max(item, out_item_bytes))
    left = dims[0] if item else 0  # items not yet yielded
    while True:
        while left and len(data) >= min(per_chunk, left) * item:
            k = min(per_chunk, left)
            yield np.frombuffer(bytes(data[: k * item]), np.uint8).reshape(k, *dims[1:])
            del data[: k * item]
            left -= k
        if ended:
            break
        try:
            block = next(blocks)
        except StopIteration as end:
            ended, gz_truncated = True, end.value
            continue
        size += len(block)
        if left:  # bytes past the header's items are only counted
            data += block
    if size != expected:
        fault = "truncated" if size < expected else "longer than its header says"
        where = " after decompressing (the gzip stream ends early)" if gz_truncated else ""
        raise DataError(
            f"{path}: {fault}: its header ({' x '.join(map(str, dims))}) needs {expected:,} bytes, "
            f"it has {size:,}{where}; download it again"
        )
    if dims[0] and not item:
        raise DataError(f"{path}: its header ({' x '.join(map(str, dims))}) gives empty {what}")


def _file_blocks(path: Path) -> Generator[bytes, None, bool]:
    """The file's bytes a block at a time, gunzipped when it starts with the gzip magic;
    returns whether a gzip stream ended early (its end-of-stream marker missing)."""
    with open(path, "rb") as f:
        block = f.read(_READ_BLOCK)
        if block[:2] != b"\x1f\x8b":
            while block:
                yield block
                block = f.read(_READ_BLOCK)
            return False
        member = None  # decompressor of the gzip member being read; a file may hold several
        try:
            while True:
                if not block:
                    block = f.read(_READ_BLOCK)
                    if not block:
                        break
                if member is None:
                    block = block.lstrip(b"\0")  # some tools pad with zeros between members
                    if not block:
                        continue
                    member = zlib.decompressobj(wbits=31)
                out = member.decompress(block)
                if out:
                    yield out
                if member.eof:
                    block, member = member.unused_data, None
                else:
                    block = b""
            if member is not None and (out := member.flush()):
                yield out
        except zlib.error as e:
            raise DataError(f"{path}: corrupt gzip data ({e}); download it again") from e
        return member is not None


# --------------------------------------------------------------------------- CIFAR binary


def _is_pickled_cifar(path: Path) -> bool:
    """The CIFAR "python version" folder or one of its files (which are pickles)."""
    if path.name in CIFAR_PICKLED_DIRS or CIFAR_PICKLED_FILES.fullmatch(path.name):
        return True
    if path.is_dir():
        files = {p.name for p in path.iterdir() if p.is_file()}
        return any(CIFAR_PICKLED_FILES.fullmatch(x) for x in files) or {"meta", "train"} <= files
    if path.name in ("train", "test", "meta"):  # CIFAR-100 python: pickles start with 0x80
        with open(path, "rb") as f:
            return f.read(1) == b"\x80"
    return False


def _cifar10_folder_reader(folder: Path, split: str, skip_bad: bool, **opts) -> Reader:
    if split == "train":
        batches = [p for p in folder.iterdir() if CIFAR10_BATCH.fullmatch(p.name)]
        files = sorted(batches, key=lambda p: int(CIFAR10_BATCH.fullmatch(p.name)[1]))
    else:
        files = [folder / "test_batch.bin"] if (folder / "test_batch.bin").is_file() else []
    if not files:
        want = "data_batch_1.bin .. data_batch_5.bin" if split == "train" else "test_batch.bin"
        raise DataError(f"{folder} has no CIFAR-10 {split} files ({want})")
    return _cifar10_chunks(files, skip_bad=skip_bad, **opts)


def _cifar10_chunks(
    files: list[Path], *, skip_bad: bool, image_size: int, channels: int, crop: bool
) -> Reader:
    labels, skipped = [], 0
    for path in files:
        try:  # a bad file is found before any of its images is yielded, so it skips whole
            y = _cifar_labels(path, n_label_bytes=1, limits=(10,), name="CIFAR-10")
        except DataError:
            if not skip_bad:
                raise
            skipped += 1
            continue
        labels.append(y[:, 0])
        for x in _cifar_images(path, n_label_bytes=1, out_item_bytes=image_size**2 * channels):
            yield _prepare(x, image_size, channels, crop)
    if not labels:
        raise DataError(f"none of {', '.join(str(p) for p in files)} could be read")
    names = _class_names(files[0].parent / "batches.meta.txt", 10)
    where = files[0] if len(files) == 1 else files[0].parent
    return ImageSetInfo(
        labels={"class": np.concatenate(labels)},
        classes={"class": names},
        captions=None,
        source=f"{where} (CIFAR-10 binary, {len(files) - skipped} files)",
        skipped=skipped,
    )


def _cifar100_reader(path: Path, *, image_size: int, channels: int, crop: bool) -> Reader:
    if not path.is_file():
        raise DataError(f"{path} not found: a CIFAR-100 binary folder holds train.bin and test.bin")

    def chunks() -> Reader:
        y = _cifar_labels(path, n_label_bytes=2, limits=(20, 100), name="CIFAR-100")
        for x in _cifar_images(path, n_label_bytes=2, out_item_bytes=image_size**2 * channels):
            yield _prepare(x, image_size, channels, crop)
        return ImageSetInfo(
            labels={"class": y[:, 1], "coarse": y[:, 0]},  # record: coarse byte, fine byte
            classes={
                "class": _class_names(path.parent / "fine_label_names.txt", 100),
                "coarse": _class_names(path.parent / "coarse_label_names.txt", 20),
            },
            captions=None,
            source=f"{path} (CIFAR-100 binary)",
        )

    return chunks()


def _cifar_records(path: Path, record: int, out_item_bytes: int = 0) -> Iterator[np.ndarray]:
    """(m, record) uint8 chunks of a file of fixed-size records, about ``CHUNK_BYTES`` each."""
    per_chunk = chunk_rows(max(record, out_item_bytes))
    with open(path, "rb") as f:
        while block := f.read(per_chunk * record):
            yield np.frombuffer(block, np.uint8).reshape(-1, record)


def _cifar_labels(
    path: Path, *, n_label_bytes: int, limits: tuple[int, ...], name: str
) -> np.ndarray:
    """(N, n_label_bytes) int64 labels of a CIFAR .bin file, its size and labels checked."""
    record = n_label_bytes + CIFAR_PIXELS
    size = path.stat().st_size
    if size == 0 or size % record:
        whole = size // record
        raise DataError(
            f"{path}: {size:,} bytes, expected a multiple of {record:,} ({name} binary records of "
            f"{n_label_bytes} label byte(s) + {CIFAR_PIXELS:,} pixel bytes; {whole + 1:,} records "
            f"= {(whole + 1) * record:,} bytes): the file is truncated or not {name} binary"
        )
    labels = np.concatenate(
        [rows[:, :n_label_bytes].astype(np.int64) for rows in _cifar_records(path, record)]
    )
    for j, limit in enumerate(limits):
        bad = np.flatnonzero(labels[:, j] >= limit)
        if bad.size:
            i = int(bad[0])
            raise DataError(
                f"{path}: label {labels[i, j]} of record {i} (byte {i * record + j:,}) is not below "
                f"{limit}; is this {name} binary?"
            )
    return labels


def _cifar_images(path: Path, *, n_label_bytes: int, out_item_bytes: int) -> Iterator[np.ndarray]:
    """(m, 32, 32, 3) uint8 chunks of the images of a CIFAR .bin file (checked by _cifar_labels)."""
    for rows in _cifar_records(path, n_label_bytes + CIFAR_PIXELS, out_item_bytes):
        # Each record stores the red plane, then green, then blue, row-major: (N, C, H, W) -> (N, H, W, C)
        images = rows[:, n_label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        yield np.ascontiguousarray(images)


def _class_names(path: Path, count: int) -> list[str]:
    """Names, one a line, from ``path`` when it exists, else "0", "1", ..."""
    if not path.is_file():
        return [str(i) for i in range(count)]
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != count:
        raise DataError(f"{path}: {len(names)} class names, expected {count}; fix or remove it")
    return names


# --------------------------------------------------------------------------- arrays


def _prepare(images: np.ndarray, size: int, channels: int, crop: bool) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, size, size, channels), a fresh writable array."""
    if channels == 1:
        images = _to_channels(images, 1)  # fewer pixels to resize
    images = _resize_array(images, size, crop)
    images = _to_channels(images, channels)
    return images if images.flags.writeable and images.flags.owndata else images.copy()


def _to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """Repeats grey to RGB, or converts RGB to L with Pillow's ITU-R 601-2 luma and rounding."""
    if images.shape[3] == channels:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=3)
    rgb = images.astype(np.uint32)
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return luma.astype(np.uint8)[..., None]


def _resize_array(images: np.ndarray, size: int, crop: bool) -> np.ndarray:
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    out = np.empty((n, size, size, c), dtype=np.uint8)
    for i in range(n):
        img = Image.fromarray(images[i, :, :, 0] if c == 1 else images[i])
        out[i] = np.asarray(_resize_square(img, size, crop)).reshape(size, size, c)
    return out


# --------------------------------------------------------------------------- tensors and files


def binarize(images: np.ndarray) -> np.ndarray:
    """Threshold uint8 images at half intensity: every pixel becomes 0 or 255 (the fixed
    binarisation of binary-likelihood baselines such as the Bernoulli VAE)."""
    return np.where(images >= 128, 255, 0).astype(np.uint8)


def is_binary(images: np.ndarray) -> bool:
    """True when every pixel of the uint8 images is 0 or 255."""
    return bool(((images == 0) | (images == 255)).all())


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) float32 in [-1, 1] (0 -> -1, 255 -> 1)."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected (N, H, W, C) uint8, got {images.shape} {images.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return (x.float() / 127.5 - 1.0).contiguous()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8; values outside are clamped, NaN -> 0."""
    if images.ndim != 4:
        raise ValueError(f"expected (N, C, H, W), got shape {tuple(images.shape)}")
    x = torch.nan_to_num(images.detach().to("cpu", torch.float32), nan=-1.0)
    x = ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def random_flip(images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Mirrors each (N, C, H, W) image left-right with probability 1/2, drawn from ``rng``."""
    flip = torch.from_numpy(rng.random(len(images)) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def image_grid(
    images: np.ndarray, nrow: int | None = None, pad: int = 2, pad_value: int = 255
) -> np.ndarray:
    """(N, H, W, C) or (N, H, W) uint8 -> one (H', W', C) uint8 grid, ``nrow`` images a row.

    nrow defaults to ceil(sqrt(N)); ``pad`` pixels of ``pad_value`` surround every image.
    """
    if images.ndim == 3:
        images = images[..., None]
    n, h, w, c = images.shape
    if n == 0:
        raise ValueError("image_grid needs at least one image")
    per_row = min(n, nrow or math.ceil(math.sqrt(n)))
    rows = math.ceil(n / per_row)
    grid = np.full(
        (rows * (h + pad) + pad, per_row * (w + pad) + pad, c), pad_value, dtype=np.uint8
    )
    for i in range(n):
        r, q = divmod(i, per_row)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    """Writes an (H, W, C) or (H, W) uint8 image as PNG, atomically (temporary name, rename)."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"expected (H, W[, C]) uint8, got {array.shape} {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) indices of a seeded random split of ``range(n)``.

    Disjoint and covering; val has round(n * val_fraction) indices, at least one when
    val_fraction > 0 and n > 1, and train is never empty.
    """
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction!r}")
    n_val = round(n * val_fraction)
    if val_fraction > 0:
        n_val = max(n_val, 1)
    n_val = max(0, min(n_val, n - 1))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
