"""Image data in a run folder, shared by the image families (GAN now, VAE next).

``prepare`` reads the configured source once (embedded ``digits`` or ``shapes``,
an image folder, MNIST IDX or CIFAR binary files), holds out a deterministic
validation share and writes it into the run's ``data/`` folder:

    data/images.npy    (N, H, W, C) uint8, training images first, then validation
    data/labels.npy    (N, A) int64, one column per labelled attribute (absent if unlabelled)
    data/meta.json     source, attributes and class names, split sizes, content hash

so a run trains, resumes and evaluates on exactly the images it started with,
read memory-mapped and never unpickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aigc.errors import CheckpointError, ConfigError, DataError


@dataclass
class ImageDataConfig:
    """Where the images come from and how they are shaped."""

    source: str = "digits"  # digits, shapes, or a path: image folder, MNIST IDX, CIFAR binary
    split: str = "train"  # the split of a source that has them (MNIST, CIFAR)
    image_size: int = 32  # images are resized to image_size x image_size
    channels: int = 0  # 1 (grey) or 3 (RGB); 0 = the source's own
    crop: bool = True  # centre-crop to a square before resizing (false: squash)
    flip: bool = False  # random horizontal flips while training
    skip_bad: bool = False  # skip (and count) unreadable files instead of stopping
    n: int = 10000  # shapes only: how many images to generate
    val_fraction: float = 0.1  # held out for evaluation
    labels: list[str] = field(default_factory=list)  # attributes a conditional model gets; [] = all
    eval_samples: int = 1000  # generated images per evaluation

    def validate(self) -> None:
        if not 8 <= self.image_size <= 1024:
            raise ConfigError(f"data.image_size={self.image_size} must be in [8, 1024]")
        if self.channels not in (0, 1, 3):
            raise ConfigError(f"data.channels={self.channels} must be 1, 3 or 0 (the source's own)")
        if not 0.0 < self.val_fraction <= 0.5:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 0.5]")
        if self.n < 1:
            raise ConfigError(f"data.n={self.n} must be at least 1")
        if self.eval_samples < 10:
            raise ConfigError(f"data.eval_samples={self.eval_samples} must be at least 10")


@dataclass
class ImageData:
    """A run's prepared images: memory-mapped arrays plus what they are."""

    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray | None  # (N, A) int64
    attributes: list[str]  # names of the label columns
    classes: dict[str, list[str]]  # attribute -> value names
    n_train: int
    meta: dict[str, Any]

    @property
    def train_images(self) -> np.ndarray:
        return self.images[: self.n_train]

    @property
    def val_images(self) -> np.ndarray:
        return self.images[self.n_train :]

    def split_labels(self, which: str) -> np.ndarray | None:
        if self.labels is None:
            return None
        return self.labels[: self.n_train] if which == "train" else self.labels[self.n_train :]

    @property
    def channels(self) -> int:
        return int(self.images.shape[-1])

    @property
    def num_classes(self) -> list[int]:
        return [len(self.classes[a]) for a in self.attributes]


def _source_spec(d: ImageDataConfig) -> str:
    if d.source in ("digits", "shapes"):
        return d.source
    return str(Path(d.source).expanduser().resolve())


def prepare(d: ImageDataConfig, data_dir: Path, seed: int) -> ImageData:
    """Reads the source, splits it and writes it into ``data_dir``."""
    from aigc.data.images import load_image_set, split_indices

    source = _source_spec(d)
    if source not in ("digits", "shapes") and not Path(source).exists():
        raise DataError(f"data.source={d.source!r}: no such file or folder (or use digits, shapes)")
    channels = d.channels or 3
    images = load_image_set(
        source,
        image_size=d.image_size,
        channels=channels,
        crop=d.crop,
        skip_bad=d.skip_bad,
        split=d.split,
        n=d.n,
        seed=seed,
    )
    if len(images) < 2:
        raise DataError(f"{images.source}: {len(images)} image(s); at least 2 are needed")
    pixels = images.images
    if d.channels == 0 and pixels.shape[-1] == 3 and _is_grey(pixels):
        pixels = np.ascontiguousarray(pixels[..., :1])  # a grey source keeps one channel
    attributes = list(images.labels)
    if d.labels:
        unknown = [a for a in d.labels if a not in attributes]
        if unknown:
            have = ", ".join(attributes) or "none: the images are unlabelled"
            raise ConfigError(
                f"data.labels: {unknown[0]!r} is not an attribute of {images.source} ({have})"
            )
        attributes = list(d.labels)
    train_idx, val_idx = split_indices(len(images), d.val_fraction, seed)
    order = np.concatenate([train_idx, val_idx])
    data_dir.mkdir(parents=True, exist_ok=True)
    pixels = np.ascontiguousarray(pixels[order])
    np.save(data_dir / "images.npy", pixels, allow_pickle=False)
    labels = None
    if attributes:
        labels = np.stack(
            [np.asarray(images.labels[a], dtype=np.int64)[order] for a in attributes], 1
        )
        np.save(data_dir / "labels.npy", labels, allow_pickle=False)
    meta = {
        "source": images.source,
        "spec": {"source": source, "split": d.split, "image_size": d.image_size,
                 "channels": int(pixels.shape[-1]), "crop": d.crop, "n": d.n},
        "attributes": attributes,
        "classes": {a: list(images.classes[a]) for a in attributes},
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "skipped": int(images.skipped),
        "sha256": hashlib.sha256(pixels.tobytes()).hexdigest(),
    }  # fmt: skip
    if images.captions is not None:
        meta["captions"] = [images.captions[i] for i in order]
    (data_dir / "meta.json").write_text(json.dumps(meta) + "\n", encoding="utf-8")
    if images.skipped:
        print(f"data: skipped {images.skipped} unreadable file(s) in {images.source}", flush=True)
    return open_data(data_dir)


def _is_grey(pixels: np.ndarray) -> bool:
    return bool(
        (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    )


def open_data(data_dir: Path) -> ImageData:
    """The prepared images of a run, memory-mapped."""
    meta = read_meta(data_dir)
    try:
        images = np.load(data_dir / "images.npy", mmap_mode="r", allow_pickle=False)
        labels_path = data_dir / "labels.npy"
        labels = np.load(labels_path, allow_pickle=False) if labels_path.exists() else None
    except FileNotFoundError as e:
        raise CheckpointError(f"{e.filename} is missing; the run folder is incomplete") from None
    except ValueError as e:
        raise CheckpointError(f"{data_dir}: prepared data is damaged ({e})") from None
    if images.ndim != 4 or images.dtype != np.uint8:
        raise CheckpointError(f"{data_dir / 'images.npy'}: expected (N, H, W, C) uint8 images")
    return ImageData(
        images, labels, list(meta["attributes"]), meta["classes"], int(meta["n_train"]), meta
    )


_META_KEYS = ("source", "spec", "attributes", "classes", "n_train", "sha256")


def read_meta(data_dir: Path) -> dict[str, Any]:
    path = data_dir / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the run folder is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged ({e})") from None
    missing = [k for k in _META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise CheckpointError(f"{path} is damaged: no {missing[0]!r}")
    return meta


def epoch_batch_indices(n: int, step: int, size: int, seed: int) -> np.ndarray:
    """Indices of global batch ``step`` of ``size``, walking a fresh permutation each epoch.

    A pure function of (n, step, size, seed): each epoch visits every image once,
    and a resumed run draws exactly the batches an uninterrupted run would.
    """
    pos = step * size + np.arange(size)
    epoch, within = pos // n, pos % n
    out = np.empty(size, dtype=np.int64)
    for e in np.unique(epoch):
        perm = np.random.default_rng([seed, int(e)]).permutation(n)
        sel = epoch == e
        out[sel] = perm[within[sel]]
    return out


def to_model_batch(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float32 in [-1, 1]."""
    from aigc.data.images import to_tensor

    return to_tensor(np.ascontiguousarray(images))
