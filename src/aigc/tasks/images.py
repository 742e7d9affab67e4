"""Image data in a run folder, shared by the image families (GAN now, VAE next).

``prepare`` reads the configured source once (embedded ``digits`` or ``shapes``,
an image folder, MNIST IDX or CIFAR binary files), a chunk at a time, holds out a
deterministic validation share and writes it into the run's ``data/`` folder:

    data/images.npy    (N, H, W, C) uint8, training images first, then validation
    data/labels.npy    (N, A) int64, one column per labelled attribute (absent if unlabelled)
    data/meta.json     source, attributes and class names, split sizes, content hash,
                       captions (when the source has them) and held-out combinations

so a run trains, resumes and evaluates on exactly the images it started with,
read memory-mapped and never unpickled. ``ImageTask`` is the part of a task that
every image family shares (GANTask, and the VAE's next): the model sized from the
data, batches, label names and the cached domain classifier.

With ``data.holdout`` every image of a listed combination of classes (e.g. a red
circle) goes to the validation split, so that a conditional model can be scored on
compositions it never saw; ``validation_holdout_mask`` tells them apart there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from aigc.config import Config
from aigc.errors import CheckpointError, ConfigError, DataError
from aigc.metrics.classifier import JudgeWarning
from aigc.runs import RunDir
from aigc.sampling.latent import sample_images
from aigc.tasks.base import DataFiles, Task

if TYPE_CHECKING:
    from aigc.data.images import ImageSetInfo


@dataclass
class ImageDataConfig:
    """Where the images come from and how they are shaped."""

    # digits, shapes (shapes-outlined, shapes-styled: other styles), or a path: an image
    # folder, MNIST IDX or CIFAR binary files
    source: str = "digits"
    split: str = "train"  # the split of a source that has them (MNIST, CIFAR)
    image_size: int = 32  # images are resized to image_size x image_size
    channels: int = 0  # 1 (grey) or 3 (RGB); 0 = the source's own
    crop: bool = True  # centre-crop to a square before resizing (false: squash)
    flip: bool = False  # random horizontal flips while training
    binarize: bool = False  # threshold pixels at half intensity to 0 or 255 (binary data)
    skip_bad: bool = False  # skip (and count) unreadable files instead of stopping
    n: int = 10000  # shapes only: how many images to generate
    val_fraction: float = 0.1  # held out for evaluation
    labels: list[str] = field(default_factory=list)  # attributes a conditional model gets; [] = all
    # combinations never trained on, each "attribute=class,..." (e.g. "colour=red,shape=circle"):
    # every matching image goes to the validation split, to test compositional generalisation
    holdout: list[str] = field(default_factory=list)
    eval_samples: int = 1000  # generated images per evaluation
    eval_metrics: list[str] = field(default_factory=lambda: ["fid", "kid", "pr"])  # feature metrics
    inception_weights: str = ""  # FID Inception weights file; "" = $AIGC_INCEPTION_WEIGHTS or none
    fid_protocol: str = (
        "pytorch-fid"  # Inception preprocessing: pytorch-fid or tf (TTUR, torch-fidelity)
    )

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
        check_metric_names(self.eval_metrics, "data.eval_metrics")
        parse_holdout(self.holdout)
        from aigc.metrics.features import check_fid_protocol

        check_fid_protocol(self.fid_protocol, "data.fid_protocol")


def check_metric_names(names: list[str], where: str) -> None:
    """Raise ConfigError unless every name is a registered feature metric."""
    from aigc.metrics.image import FEATURE_METRICS

    if not isinstance(names, list) or any(n not in FEATURE_METRICS for n in names):
        raise ConfigError(
            f"{where}={names!r}: choose from {', '.join(FEATURE_METRICS)} (e.g. fid,kid,pr)"
        )


def parse_holdout(items: list[str], where: str = "data.holdout") -> list[dict[str, str]]:
    """Held-out combinations ``["colour=red,shape=circle", ...]`` as ``[{"colour": "red",
    "shape": "circle"}, ...]``; a ConfigError naming the item when one is malformed.
    Attribute and class names are checked against the data by ``holdout_mask``."""
    if not isinstance(items, list):
        raise ConfigError(f"{where}={items!r} must be a list of combinations")
    out = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(
                f"{where}: {item!r} is empty; write a combination such as colour=red,shape=circle"
            )
        combo: dict[str, str] = {}
        for pair in item.split(","):
            attribute, eq, value = (part.strip() for part in pair.partition("="))
            if not eq or not attribute or not value:
                raise ConfigError(
                    f"{where}: {item!r}: {pair.strip()!r} is not attribute=class "
                    "(pairs joined by commas, e.g. colour=red,shape=circle)"
                )
            if attribute in combo:
                raise ConfigError(f"{where}: {item!r} names {attribute!r} twice")
            combo[attribute] = value
        out.append(combo)
    return out


def holdout_mask(
    holdout: list[dict[str, str]],
    labels: np.ndarray,
    attributes: list[str],
    classes: dict[str, list[str]],
    where: str = "data.holdout",
) -> np.ndarray:
    """(N,) bool: which images match any of the ``holdout`` combinations (``parse_holdout``).

    labels: (N, A) int64, column j the class index of ``attributes[j]``; classes: the
    class names of each attribute. Unknown attributes and classes are ConfigErrors.
    """
    matched = np.zeros(len(labels), dtype=bool)
    for combo in holdout:
        item = ",".join(f"{a}={v}" for a, v in combo.items())
        match = np.ones(len(labels), dtype=bool)
        for attribute, value in combo.items():
            if attribute not in attributes:
                have = ", ".join(attributes)
                raise ConfigError(
                    f"{where}: {item!r}: no attribute {attribute!r} (the data has {have})"
                )
            if value not in classes[attribute]:
                have = ", ".join(classes[attribute])
                raise ConfigError(
                    f"{where}: {item!r}: {attribute!r} has no class {value!r} (it has {have})"
                )
            column = labels[:, attributes.index(attribute)]
            match &= column == classes[attribute].index(value)
        matched |= match
    return matched


def validation_holdout_mask(meta: dict[str, Any], labels: np.ndarray) -> np.ndarray:
    """(n_val,) bool: which validation images of a prepared run are held-out combinations
    (all False when it has none), to score seen and held-out compositions apart.

    meta: the run's meta.json; labels: its stored (N, A) labels.npy, training rows first.
    """
    n_train, n_val = int(meta["n_train"]), int(meta["n_val"])
    if not meta.get("holdout"):
        return np.zeros(n_val, dtype=bool)
    if labels.shape[0] != n_train + n_val:
        raise ValueError(f"{labels.shape[0]} label rows for {n_train} + {n_val} images")
    return holdout_mask(meta["holdout"], labels[n_train:], meta["attributes"], meta["classes"])


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
    from aigc.data.images import EMBEDDED

    if d.source in EMBEDDED:
        return d.source
    return str(Path(d.source).expanduser().resolve())


def prepare(
    d: ImageDataConfig, data_dir: Path, seed: int, val_source: str | Path | None = None
) -> ImageData:
    """Reads the source, splits it and writes it into ``data_dir``.

    The images never sit in memory all at once (DESIGN.md, "Devices and scale"): they
    are decoded a chunk at a time into a scratch file in the source's order, then
    copied from it into images.npy, training images first, a chunk at a time.
    ``val_source`` (a folder of images, e.g. CycleGAN's ``testA``) is the validation
    split itself, read after the source, instead of a share of the source held out.
    """
    from aigc.data.images import EMBEDDED, binarize, image_stream, is_binary, split_indices

    sources = [_source_spec(d)]
    if val_source is not None:
        if d.holdout:
            raise ConfigError("data.holdout needs one source to split; this data has a test set")
        sources.append(str(Path(val_source).expanduser().resolve()))
    for source in sources:
        if source not in EMBEDDED and not Path(source).exists():
            raise DataError(
                f"data.source={source!r}: no such file or folder (or use {', '.join(EMBEDDED)})"
            )
    streams = [
        image_stream(source, image_size=d.image_size, channels=d.channels or 3, crop=d.crop,
                     skip_bad=d.skip_bad, split=d.split, n=d.n, seed=seed)
        for source in sources
    ]  # fmt: skip
    source = sources[0]
    data_dir.mkdir(parents=True, exist_ok=True)
    scratch = data_dir / "images.decoded.tmp"
    try:
        n, shape, grey, counts = 0, None, d.channels == 0, []
        with open(scratch, "wb") as f:
            for stream in streams:
                for chunk in stream:
                    n, shape = n + len(chunk), chunk.shape[1:]
                    grey = grey and shape[-1] == 3 and _is_grey(chunk)
                    f.write(np.ascontiguousarray(chunk).data)
                counts.append(n - sum(counts))
        found = _joined_info([s.info for s in streams]) if len(streams) > 1 else streams[0].info
        if min(counts) < 1 or n < 2:
            raise DataError(f"{found.source}: {n} image(s); at least 2 are needed")
        attributes = list(found.labels)
        if d.labels:
            unknown = [a for a in d.labels if a not in attributes]
            if unknown:
                have = ", ".join(attributes) or "none: the images are unlabelled"
                raise ConfigError(
                    f"data.labels: {unknown[0]!r} is not an attribute of {found.source} ({have})"
                )
            attributes = list(d.labels)
        if len(counts) > 1:  # the validation split is the second source
            train_idx, val_idx = np.arange(counts[0]), np.arange(counts[0], n)
        else:
            train_idx, val_idx = split_indices(n, d.val_fraction, seed)
        holdout, n_held, n_moved = parse_holdout(d.holdout), 0, 0
        if holdout:  # matching images move from the training split to the validation split
            held = _holdout_in_source(holdout, found, attributes, n)
            moved = held[train_idx]
            if moved.all():
                raise ConfigError(
                    f"data.holdout={d.holdout!r} matches {int(held.sum())} of the {n} images of "
                    f"{found.source}, leaving no training images; hold out fewer combinations"
                )
            n_held, n_moved = int(held.sum()), int(moved.sum())
            val_idx = np.sort(np.concatenate([val_idx, train_idx[moved]]))
            train_idx = train_idx[~moved]
        order = np.concatenate([train_idx, val_idx])
        in_val = np.zeros(n, dtype=bool)
        in_val[val_idx] = True
        channels = 1 if grey else shape[-1]  # a grey source keeps one channel
        digest, binary = hashlib.sha256(), True

        def ordered_chunks():  # train_idx and val_idx are sorted: two passes in file order
            nonlocal binary
            for val in (False, True):
                for start, chunk in _read_chunks(scratch, shape):
                    chunk = chunk[in_val[start : start + len(chunk)] == val, ..., :channels]
                    if d.binarize:
                        chunk = binarize(chunk)
                    chunk = np.ascontiguousarray(chunk)
                    digest.update(chunk.data)
                    binary = binary and is_binary(chunk)
                    yield chunk

        write_npy(data_dir / "images.npy", (n, *shape[:2], channels), ordered_chunks())
    finally:
        scratch.unlink(missing_ok=True)
    labels = None
    if attributes:
        labels = np.stack(
            [np.asarray(found.labels[a], dtype=np.int64)[order] for a in attributes], 1
        )
        np.save(data_dir / "labels.npy", labels, allow_pickle=False)
    meta = {
        "source": found.source,
        "spec": {"source": source, "split": d.split, "image_size": d.image_size,
                 "channels": int(channels), "crop": d.crop, "n": d.n,
                 "binarize": d.binarize},
        "binary": binary,
        "attributes": attributes,
        "classes": {a: list(found.classes[a]) for a in attributes},
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "skipped": int(found.skipped),
        "sha256": digest.hexdigest(),
    }  # fmt: skip
    if len(sources) > 1:
        meta["spec"]["val_source"] = sources[1]
    if holdout:
        meta.update(holdout=holdout, holdout_moved=n_moved, n_holdout=n_held)
    if found.captions is not None:
        meta["captions"] = [found.captions[i] for i in order]
    (data_dir / "meta.json").write_text(json.dumps(meta) + "\n", encoding="utf-8")
    if found.skipped:
        print(f"data: skipped {found.skipped} unreadable file(s) in {found.source}", flush=True)
    return open_data(data_dir)


def _joined_info(infos: list[ImageSetInfo]) -> ImageSetInfo:
    """What a training source and its separate test set hold together: labels only where
    both have the same attributes and classes, captions only where both have them."""
    from aigc.data.images import ImageSetInfo

    first, second = infos
    same = first.classes == second.classes and list(first.labels) == list(second.labels)
    labels = {a: np.concatenate([np.asarray(first.labels[a]), np.asarray(second.labels[a])])
              for a in first.labels} if same else {}  # fmt: skip
    captions = None
    if first.captions is not None and second.captions is not None:
        captions = [*first.captions, *second.captions]
    return ImageSetInfo(labels=labels, classes=first.classes if same else {}, captions=captions,
                        source=f"{first.source} + {second.source} (test)",
                        skipped=first.skipped + second.skipped)  # fmt: skip


def _holdout_in_source(
    holdout: list[dict[str, str]], found: ImageSetInfo, attributes: list[str], n: int
) -> np.ndarray:
    """(n,) bool in the source's order: the images of a held-out combination. Only the
    attributes the run stores may be named, so that ``validation_holdout_mask`` can
    find the same images from the run's labels."""
    for combo in holdout:
        item = ",".join(f"{a}={v}" for a, v in combo.items())
        if not found.labels:
            raise ConfigError(
                f"data.holdout: {item!r}: {found.source} has no labels to match; held-out "
                "combinations need labelled data (an image folder: one sub-folder per class)"
            )
        for attribute in combo:
            if attribute in found.labels and attribute not in attributes:
                raise ConfigError(
                    f"data.holdout: {item!r}: {attribute!r} is not in data.labels="
                    f"{attributes!r}; add it there to hold out by it"
                )
    labels = np.stack([np.asarray(found.labels[a], dtype=np.int64) for a in attributes], 1)
    classes = {a: list(found.classes[a]) for a in attributes}
    return holdout_mask(holdout, labels.reshape(n, len(attributes)), attributes, classes)


def _is_grey(pixels: np.ndarray) -> bool:
    return bool(
        (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    )


def _read_chunks(path: Path, shape: tuple[int, ...]) -> Iterator[tuple[int, np.ndarray]]:
    """(index of its first image, (m, *shape) uint8 chunk) of a raw file of images, in order."""
    from aigc.data.images import chunk_rows

    image_bytes = math.prod(shape)
    per_chunk = chunk_rows(image_bytes)
    with open(path, "rb") as f:
        start = 0
        while block := f.read(per_chunk * image_bytes):
            chunk = np.frombuffer(block, np.uint8).reshape(-1, *shape)
            yield start, chunk
            start += len(chunk)


def write_npy(path: Path, shape: tuple[int, ...], chunks: Iterable[np.ndarray]) -> None:
    """Writes uint8 ``chunks`` (in order, filling ``shape``) as the .npy file ``path``,
    under a temporary name renamed when complete.

    numpy lays the file out (``open_memmap``: the header np.save writes, then the
    array); the chunks are written into it with plain writes, not through the
    mapping, whose written pages would stay in this process's memory (resident set).
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        layout = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        offset, end = layout.offset, layout.offset + layout.nbytes
        del layout
        with open(tmp, "r+b") as f:
            f.seek(offset)
            for chunk in chunks:
                f.write(np.ascontiguousarray(chunk, dtype=np.uint8).data)
            if f.tell() != end:
                filled = f"{f.tell() - offset:,} of {end - offset:,}"
                raise ValueError(f"{path}: the chunks filled {filled} bytes")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


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

    return to_tensor(np.array(images))  # a copy: memory-mapped pages are read-only


class ImageTask(Task):
    """What every image family's task shares: prepared images in the run folder, the
    model sized from them, batches, label names, and the cached domain classifier.
    A family's task subclasses it and sets ``name``, ``model_config``, ``model_class``,
    ``pipeline_class``, ``headline_metric`` and ``loss_keys``."""

    data_config = ImageDataConfig
    model_class: ClassVar[type]
    item_name = "images"
    sample_hint = "--n 64 --out grid.png"
    resumable_keys = frozenset(
        {"data.eval_samples", "data.eval_metrics", "data.inception_weights", "data.fid_protocol"}
    )

    def __init__(self, config: Config, run: RunDir, data: ImageData | None, meta: dict[str, Any]):
        self.config = config
        self.run = run
        self.data = data
        self.meta = meta
        self.model: nn.Module = self.model_class(config.model)
        self.items_per_batch = config.train.batch_size
        self._classifier = None
        self._extractor = None
        self.against: str | None = None  # reference data spec for feature metrics; None = run's

    # construction -----------------------------------------------------------
    @classmethod
    def prepare_data(cls, config: Config, data_dir: Path, progress: bool = True) -> None:
        data = prepare(config.data, data_dir, seed=config.train.seed)
        cls._fit_model_to_data(config, data.meta)
        if len(data.train_images) < config.train.batch_size:
            raise DataError(
                f"{data.meta['source']}: {len(data.train_images)} training images, fewer than "
                f"train.batch_size={config.train.batch_size}; use more images or a smaller batch"
            )

    @classmethod
    def _fit_model_to_data(cls, config: Config, meta: dict[str, Any]) -> None:
        """Image size, channels and label sizes follow from the data; checked before training."""
        m = config.model
        m.image_size = int(meta["spec"]["image_size"])
        m.channels = int(meta["spec"]["channels"])
        if m.conditional:
            if not meta["attributes"]:
                raise ConfigError(
                    f"model.conditional=true but {meta['source']} has no labels "
                    "(an image folder needs one sub-folder per class); set model.conditional=false"
                )
            for a in meta["attributes"]:
                if len(meta["classes"][a]) < 2:
                    raise DataError(
                        f"{meta['source']}: {a!r} has a single class {meta['classes'][a]!r}; a "
                        "conditional model needs two or more (or set model.conditional=false)"
                    )
            m.num_classes = [len(meta["classes"][a]) for a in meta["attributes"]]
        else:
            m.num_classes = []
        if config.data.flip and "position" in meta["attributes"]:
            raise ConfigError(
                "data.flip=true would swap left and right but keep the position labels; "
                "leave flips off for this data (or choose data.labels without position)"
            )
        m.validate()
        cls.check_data_fit(config, meta)

    @classmethod
    def check_data_fit(cls, config: Config, meta: dict[str, Any]) -> None:
        """A family's own checks of its model config against the data (before training)."""

    @classmethod
    def finish_config(cls, config: Config, files: DataFiles) -> None:
        cls._fit_model_to_data(config, read_meta(files.data_dir))

    @classmethod
    def open(cls, config: Config, run: RunDir, with_data: bool = True) -> ImageTask:
        meta = read_meta(run.data_dir)
        cls._fit_model_to_data(config, meta)
        return cls(config, run, open_data(run.data_dir) if with_data else None, meta)

    # what the model is conditioned on ---------------------------------------
    @property
    def attributes(self) -> list[str]:
        return list(self.meta["attributes"]) if self.config.model.conditional else []

    @property
    def classes(self) -> dict[str, list[str]]:
        return {a: list(self.meta["classes"][a]) for a in self.attributes}

    # training ---------------------------------------------------------------
    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        """A slice of global batch ``step``: epochs of fresh permutations, flips if asked.
        ``images`` (B, C, H, W) in [-1, 1], and ``labels`` (B, A) int64 for a conditional
        model."""
        from aigc.data.images import random_flip

        B = self.config.train.batch_size
        accum = self.config.train.grad_accum
        seed = self.config.train.seed
        train = self.data.train_images
        idx = epoch_batch_indices(len(train), step, B * accum * world, seed)
        part = micro * world + rank
        idx = idx[part * B : (part + 1) * B]
        images = to_model_batch(train[idx])
        if self.config.data.flip:
            images = random_flip(images, np.random.default_rng([seed, step, part, 1]))
        batch = {"images": images}
        if self.attributes:
            batch["labels"] = torch.from_numpy(self.data.split_labels("train")[idx])  # (B, A)
        return batch

    # evaluation -------------------------------------------------------------
    def classifier(self):
        """The cached domain classifier of this run's labelled images (None if unlabelled)."""
        if self._classifier is None and self.meta["attributes"]:
            from aigc.metrics.classifier import cached_classifier

            data = self.data or open_data(self.run.data_dir)
            images, labels = data.train_images, data.split_labels("train")
            key = f"{self.meta['sha256']}|{self.meta['n_train']}|{','.join(data.attributes)}"
            if data.meta.get("holdout"):
                # the judge must know the compositions the model never saw: it learns
                # from every image of the run (a judge, not the model, sees validation)
                images, labels, key = data.images, data.labels, key + "|all"
            # trained outside the caller's inference mode and autocast: always fp32
            with (
                torch.inference_mode(False),
                torch.enable_grad(),
                torch.autocast("cpu", enabled=False),
            ):
                self._classifier = cached_classifier(
                    key,
                    images,
                    {a: labels[:, i] for i, a in enumerate(data.attributes)},
                    {a: data.classes[a] for a in data.attributes},
                )
        return self._classifier

    def load_like_run(self, source: str) -> tuple[np.ndarray, Any]:
        """Another data source (as in data.source) prepared like the run's own images:
        size, channels, crop and binarisation. Returns (N, H, W, C) uint8 and the set read."""
        from aigc.data.images import binarize, load_image_set

        spec = self.meta["spec"]
        found = load_image_set(
            source, image_size=spec["image_size"], channels=spec["channels"], crop=spec["crop"]
        )
        return (binarize(found.images) if spec.get("binarize") else found.images), found

    # feature metrics (FID, KID, precision/recall, ...) ------------------------
    def feature_extractor(self, device: torch.device):
        """The FID Inception network when weights are given (data.inception_weights or
        $AIGC_INCEPTION_WEIGHTS), else the domain classifier; None for unlabelled data
        without Inception weights."""
        if self._extractor is None:
            from aigc.metrics.features import (
                INCEPTION_ENV,
                classifier_extractor,
                inception_extractor,
            )

            path = self.config.data.inception_weights or os.environ.get(INCEPTION_ENV, "")
            if path:
                protocol = self.config.data.fid_protocol
                self._extractor = inception_extractor(path, device, protocol=protocol)
            elif self.classifier() is not None:
                self._extractor = classifier_extractor(self.classifier())
        return self._extractor

    def reference(self, extractor) -> tuple[Any, np.ndarray | None]:
        """Statistics and features of the reference images (the run's training images, or
        ``self.against``, a data source prepared like the run's), cached by extractor."""
        from aigc.metrics.reference import reference_statistics

        if self.against is None:
            images = (self.data or open_data(self.run.data_dir)).train_images
            name = f"run-data:{self.meta['sha256']}:train"
        else:
            images, found = self.load_like_run(self.against)
            spec = self.meta["spec"]
            name = f"{found.source}|{spec['image_size']}|{spec['channels']}|{spec['crop']}"
            name += f"|{hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()}"
        key = {"extractor": extractor.name, "spec": name, "count": len(images)}
        return reference_statistics(key, lambda: extractor.features(to_model_batch(images)))

    def feature_sums(
        self, model: nn.Module, device: torch.device, images: torch.Tensor | None = None
    ) -> dict[str, float]:
        """data.eval_metrics of data.eval_samples generated images (or ``images``, (N, C,
        H, W) in [-1, 1]) against the reference, as {"feature/<name>": value}; empty when
        there is no extractor or no metric."""
        from aigc.metrics.image import FeatureSets, feature_metrics

        names = self.config.data.eval_metrics
        extractor = self.feature_extractor(device) if names else None
        if extractor is None:
            return {}
        stats, real = self.reference(extractor)
        n = self.config.data.eval_samples if images is None else len(images)
        few = min(stats.n, n)
        if few < 2 * extractor.feature_dim:
            warnings.warn(
                f"{'reference' if stats.n <= n else 'generated'} set of {few} images for "
                f"{extractor.feature_dim}-dimensional features ({extractor.name}): with fewer "
                f"than {2 * extractor.feature_dim} the covariances are poorly estimated and "
                f"FID/KID/PR are unreliable; use more images" + ("" if stats.n <= n else " (--n)"),
                JudgeWarning,
                stacklevel=2,
            )
        if images is None:
            images, _ = sample_images(model, n, None, self.config.train.seed + 7_000_003, device)
        fake, logits = extractor.features_and_logits(images.cpu())
        values = feature_metrics(names, FeatureSets(stats, real, fake, logits))
        return {f"feature/{k}": float(v) for k, v in values.items()}

    def eval_info(self) -> dict[str, str]:
        """What the evaluation's numbers depend on beyond the run: the feature extractor."""
        if self._extractor is None:
            return {}
        info = {"extractor": self._extractor.name}
        if self._extractor.fid_protocol:
            info["fid_protocol"] = self._extractor.fid_protocol
        return info

    # judging generated images -------------------------------------------------
    def judge_sums(
        self, model: nn.Module, rank: int, world: int, device: torch.device
    ) -> dict[str, float]:
        """The domain classifier's verdict on this rank's share of ``data.eval_samples``
        generated images, as additive counts (empty for unlabelled data)."""
        # feature metrics (FID, ...) on rank 0 with all samples; other ranks send zeros
        clf = self.classifier()
        if clf is None:
            feats = self.feature_sums(model, device)
            return {k: v if rank == 0 else 0.0 for k, v in feats.items()}
        n = max(1, self.config.data.eval_samples // world)
        images, requested = sample_images(
            model, n, None, self.config.train.seed + 1_000_003 * (rank + 1), device
        )
        # one process: the judged images are all data.eval_samples, and the feature
        # metrics take them too rather than drawing as many again
        feats = self.feature_sums(model, device, images if world == 1 else None)
        sums: dict[str, float] = {k: v if rank == 0 else 0.0 for k, v in feats.items()}
        predicted = clf.model.predict(images)  # on the classifier's device (CPU)
        sums["n"] = float(n)
        sums.update(self.sample_sums(images))
        first = self.meta["attributes"][0]
        for a in self.meta["attributes"]:
            counts = np.bincount(predicted[a].numpy(), minlength=len(self.meta["classes"][a]))
            for c, k in enumerate(counts):
                sums[f"count/{a}/{c}"] = float(k)
            if a in self.attributes:
                req = requested[:, self.attributes.index(a)].cpu()
                sums[f"correct/{a}"] = float((predicted[a] == req).sum())
        # variety within each class (of the first attribute): summed pairwise distances
        group = (
            requested[:, self.attributes.index(first)].cpu()
            if first in self.attributes
            else predicted[first]
        )
        flat = images.reshape(len(images), -1).double().cpu()
        for c in range(len(self.meta["classes"][first])):
            x = flat[group == c][:200]
            # every rank sends every key: the trainer all-reduces the sums by position
            pairs = len(x) * (len(x) - 1)
            sums[f"pairdist/{c}"] = float(torch.cdist(x, x).sum()) if pairs else 0.0
            sums[f"pairs/{c}"] = float(pairs)
        return sums

    def sample_sums(self, images: torch.Tensor) -> dict[str, float]:
        """A family's further additive counts on this rank's judged images (N, C, H, W) in
        [-1, 1] (the same keys on every rank); none here (DiffusionTask: memorisation)."""
        return {}

    @contextlib.contextmanager
    def sampling_with(
        self,
        model: nn.Module,
        scheduler: str | None,
        steps: int | None,
        guidance: float | None = None,
    ) -> Iterator[tuple[str, int, float]]:
        """Evaluation with another sampler than the run's (diffusion runs only): a
        ConfigError here."""
        raise ConfigError(
            f"a {self.name} run has no scheduler, steps or guidance to choose; they are for "
            "diffusion runs"
        )
        yield  # pragma: no cover - a generator, for contextmanager

    def judge_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """label_accuracy (conditional), min_class_share, classes_seen, diversity; per attribute
        with a suffix when the data has several."""
        out = {k[len("feature/") :]: v for k, v in sums.items() if k.startswith("feature/")}
        if "n" not in sums:
            return out
        clf = self.classifier()
        attrs = self.meta["attributes"]
        multi = len(attrs) > 1
        for a in attrs:
            suffix = f"/{a}" if multi else ""
            k = len(self.meta["classes"][a])
            counts = np.array([sums.get(f"count/{a}/{c}", 0.0) for c in range(k)])
            shares = counts / max(counts.sum(), 1.0)
            out[f"min_class_share{suffix}"] = float(shares.min())
            out[f"classes_seen{suffix}"] = float((counts > 0).mean())
            if f"correct/{a}" in sums:
                out[f"label_accuracy{suffix}"] = sums[f"correct/{a}"] / max(sums["n"], 1.0)
            out[f"classifier_accuracy{suffix}"] = float(clf.accuracy[a])
        out["classifier_heldout"] = float(clf.heldout)
        for why in clf.weaknesses():
            warnings.warn(why, JudgeWarning, stacklevel=2)
        ratios = []
        real = self._real_pair_distances()
        for c, r in real.items():
            pairs = sums.get(f"pairs/{c}", 0.0)
            if pairs > 0 and r > 0:
                ratios.append(sums[f"pairdist/{c}"] / pairs / r)
        if ratios:
            out["diversity"] = float(np.mean(ratios))  # 1 = as varied as the real class
            out["diversity_min"] = float(np.min(ratios))
        return out

    def _real_pair_distances(self) -> dict[int, float]:
        """Mean pairwise pixel distance of real training images per class of the first attribute."""
        from aigc.metrics.image import mean_pairwise_distance

        data = self.data or open_data(self.run.data_dir)
        labels = data.split_labels("train")
        out = {}
        for c in range(len(data.classes[data.attributes[0]])):
            idx = np.flatnonzero(labels[:, 0] == c)[:200]
            if len(idx) >= 2:
                out[c] = mean_pairwise_distance(to_model_batch(data.train_images[idx]))
        return out

    # samples during training --------------------------------------------------
    def samples(self, model: nn.Module, step: int, device: torch.device) -> dict[str, Any]:
        """A grid from fixed noise (and fixed labels: one row per class when there is one
        attribute), so the same latent points can be watched as training goes on."""
        from aigc.data.images import image_grid, to_uint8

        labels = None
        nrow = 8
        if len(self.attributes) == 1:
            k = model.cfg.num_classes[0]
            rows = min(k, 10)
            labels = torch.arange(rows).repeat_interleave(8)[:, None]  # (rows*8, 1)
        images, _ = sample_images(model, 64 if labels is None else len(labels), labels,
                                  self.config.train.seed, device)  # fmt: skip
        return {"grid": image_grid(to_uint8(images.cpu()), nrow=nrow)}

    def eval_sums(
        self, model: nn.Module, rank: int, world: int, device: torch.device
    ) -> dict[str, float]:
        return self.judge_sums(model, rank, world, device)

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return self.judge_metrics(sums)
