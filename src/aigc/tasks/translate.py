"""Image-to-image translation between two domains: CycleGAN (unpaired) and pix2pix
(paired), on the images of two data sources or one folder in CycleGAN's layout.

Data: ``data.source`` a folder holding ``trainA/`` and ``trainB/`` (and, where they
exist, ``testA/`` and ``testB/``, which are then the held-out splits), or two sources
``data.source_a`` and ``data.source_b``, each anything ``data.source`` of an image run
takes (an image folder, MNIST or CIFAR files, or an embedded set). Each domain is
prepared as an image run's data is, into ``data/a/`` and ``data/b/``. The embedded pair
is the shapes generator's two styles, ``shapes`` (filled) and ``shapes-outlined``: the
same seed draws the same scenes, so image i of one is image i of the other in the other
style, and pix2pix has exact pairs. ``data.paired`` says that a user's two domains pair
up image by image (in file-name order); CycleGAN ignores pairs while training (each
domain's batches are drawn on their own) and uses them only to report PSNR.

Evaluation judges each held-out image's translation with a classifier trained on both
domains' training images (aigc.metrics.classifier, cached): whether it is taken for the
target domain, and, where both domains are labelled with the same attributes (the
shapes' shape, colour, size and position), whether those are the source image's. Beside
that: the cycle's PSNR (a -> b -> a against a, for CycleGAN), PSNR and SSIM against the
true pair (paired data), and FID/KID/PR of the translations against the target domain's
training images in the classifier's features.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from aigc.config import Config
from aigc.errors import CheckpointError, ConfigError, DataError
from aigc.models.cyclegan import CycleGAN, CycleGANConfig
from aigc.models.pix2pix import Pix2Pix, Pix2PixConfig
from aigc.runs import RunDir
from aigc.tasks.base import DataFiles
from aigc.tasks.images import (
    ImageData,
    ImageDataConfig,
    ImageTask,
    epoch_batch_indices,
    open_data,
    prepare,
    read_meta,
    to_model_batch,
)

DOMAINS = ("a", "b")
DIRECTIONS = ("a2b", "b2a")
LAYOUT = {"a": ("trainA", "testA"), "b": ("trainB", "testB")}  # CycleGAN's folders
INFO_FILE = "translate.json"  # in data/: the domains' sources and whether they pair up
SHAPES_PAIR = ("shapes", "shapes-outlined", "shapes-styled")
EVAL_BATCH = 64


def ends(direction: str) -> tuple[str, str]:
    """("a", "b") for "a2b": the source and target domains of a direction."""
    return direction[0], direction[-1]


@dataclass
class TranslateDataConfig(ImageDataConfig):
    """Two domains of images; every other key (image_size, channels, n, val_fraction, ...)
    applies to both as it does to an image run's one source."""

    source: str = ""  # a folder in CycleGAN's layout (trainA/, trainB/[, testA/, testB/]), or ""
    source_a: str = "shapes"  # domain A when data.source is "": any image source
    source_b: str = "shapes-outlined"  # domain B when data.source is ""
    paired: bool = False  # image i of A and image i of B show the same thing (pix2pix needs it)
    direction: str = "a2b"  # pix2pix: the way it translates (a2b or b2a)

    def validate(self) -> None:
        super().validate()
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"data.direction={self.direction!r}: choose a2b or b2a")
        if self.holdout:
            raise ConfigError("data.holdout: translation runs hold out no combinations")
        if not self.source and not (self.source_a and self.source_b):
            raise ConfigError(
                "data: give data.source (a folder with trainA/ and trainB/) or both "
                "data.source_a and data.source_b"
            )

    def domain_sources(self) -> dict[str, tuple[str, Path | None]]:
        """Each domain's (training source, separate test folder or None)."""
        if not self.source:
            return {"a": (self.source_a, None), "b": (self.source_b, None)}
        root = Path(self.source).expanduser()
        missing = [train for train, _ in LAYOUT.values() if not (root / train).is_dir()]
        if missing:
            raise DataError(
                f"data.source={self.source!r}: no {missing[0]}/ folder; a translation source "
                "is a folder in CycleGAN's layout (trainA/, trainB/, testA/, testB/), or give "
                "data.source_a and data.source_b"
            )
        tests = [(root / test).is_dir() for _, test in LAYOUT.values()]
        if any(tests) and not all(tests):
            raise DataError(f"data.source={self.source!r}: has one of testA/ and testB/; give both")
        return {d: (str(root / train), root / test if all(tests) else None)
                for d, (train, test) in LAYOUT.items()}  # fmt: skip

    def knows_pairs(self) -> bool:
        """Whether image i of A and B show the same scene: said by data.paired, or known
        for the shapes generator's styles drawn from one seed (same n)."""
        return self.paired or (not self.source and {self.source_a, self.source_b} <= set(SHAPES_PAIR)
                               and self.source_a != self.source_b)  # fmt: skip


def read_info(data_dir: Path) -> dict[str, Any]:
    path = data_dir / INFO_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the run folder is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged ({e})") from None


class TranslateTask(ImageTask):
    """What CycleGAN and pix2pix runs share: two prepared domains, the judge, the
    evaluation and the sample grid. ``self.data`` is domain A, ``self.domains`` both."""

    data_config = TranslateDataConfig
    pipeline_class = "aigc.pipelines.translate:TranslatePipeline"
    sample_verb = "translate"
    sample_hint = "--image in.png --out out.png"
    loss_keys = frozenset({"loss", "adversarial", "cycle", "identity", "critic", "l1"})
    resumable_keys = frozenset({"data.eval_samples", "data.eval_metrics"})
    needs_pairs: ClassVar[bool] = False

    def __init__(self, config: Config, run: Any, domains: dict[str, ImageData] | None,
                 metas: dict[str, dict[str, Any]], info: dict[str, Any]) -> None:  # fmt: skip
        super().__init__(config, run, domains["a"] if domains else None, metas["a"])
        self.domains = domains
        self.metas = metas
        self.info = info

    # construction -----------------------------------------------------------
    @classmethod
    def prepare_data(cls, config: Config, data_dir: Path, progress: bool = True) -> None:
        d: TranslateDataConfig = config.data
        seed = config.train.seed
        paired = d.knows_pairs()
        data: dict[str, ImageData] = {}
        for domain, (source, test) in d.domain_sources().items():
            one = dataclasses.replace(d, source=source)
            data[domain] = prepare(one, data_dir / domain, seed, val_source=test)
        if data["a"].channels != data["b"].channels:  # a grey domain beside a colour one
            grey = min(DOMAINS, key=lambda k: data[k].channels)
            source, test = d.domain_sources()[grey]
            one = dataclasses.replace(d, source=source, channels=3)
            data[grey] = prepare(one, data_dir / grey, seed, val_source=test)
        if paired and any(data["a"].meta[k] != data["b"].meta[k] for k in ("n_train", "n_val")):
            counts = {k: (v.meta["n_train"], v.meta["n_val"]) for k, v in data.items()}
            raise DataError(
                f"data.paired=true but the domains do not pair up: (train, held-out) images "
                f"A {counts['a']}, B {counts['b']}; pairs need the same counts"
            )
        info = {"paired": paired, "sources": {k: v.meta["source"] for k, v in data.items()}}
        (data_dir / INFO_FILE).write_text(json.dumps(info) + "\n", encoding="utf-8")
        cls._fit_domains(config, {k: v.meta for k, v in data.items()}, info)
        for k, v in data.items():
            if len(v.train_images) < config.train.batch_size:
                raise DataError(
                    f"{v.meta['source']}: {len(v.train_images)} training images in domain "
                    f"{k.upper()}, fewer than train.batch_size={config.train.batch_size}"
                )

    @classmethod
    def _fit_domains(
        cls, config: Config, metas: dict[str, dict[str, Any]], info: dict[str, Any]
    ) -> None:
        m = config.model
        m.image_size = int(metas["a"]["spec"]["image_size"])
        m.channels = int(metas["a"]["spec"]["channels"])
        if config.data.flip and "position" in metas["a"]["attributes"]:
            raise ConfigError("data.flip=true would swap left and right of labelled positions")
        if cls.needs_pairs and not info["paired"]:
            raise ConfigError(
                f"family {cls.name} learns from pairs, and {info['sources']['a']} and "
                f"{info['sources']['b']} are not known to pair up; set data.paired=true if "
                "image i of one is image i of the other (in file-name order), or use cyclegan"
            )
        cls.fit_model(config)
        m.validate()

    @classmethod
    def fit_model(cls, config: Config) -> None:
        """A family's own settings from the data config (pix2pix: its direction)."""

    @classmethod
    def _read(cls, data_dir: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        return {k: read_meta(data_dir / k) for k in DOMAINS}, read_info(data_dir)

    @classmethod
    def finish_config(cls, config: Config, files: DataFiles) -> None:
        cls._fit_domains(config, *cls._read(files.data_dir))

    @classmethod
    def open(cls, config: Config, run: RunDir, with_data: bool = True) -> TranslateTask:
        metas, info = cls._read(run.data_dir)
        cls._fit_domains(config, metas, info)
        domains = {k: open_data(run.data_dir / k) for k in DOMAINS} if with_data else None
        return cls(config, run, domains, metas, info)

    @property
    def attributes(self) -> list[str]:
        return []  # a translator is conditioned on its input image only

    def domain(self, name: str) -> ImageData:
        if self.domains is None:
            self.domains = {k: open_data(self.run.data_dir / k) for k in DOMAINS}
        return self.domains[name]

    @property
    def content_attributes(self) -> list[str]:
        """Labelled attributes both domains share, with the same classes (what a
        translation must keep)."""
        a, b = self.metas["a"], self.metas["b"]
        return [x for x in a["attributes"]
                if x in b["attributes"] and a["classes"][x] == b["classes"][x]]  # fmt: skip

    # training ---------------------------------------------------------------
    def rows(self, n: int, step: int, micro: int, rank: int, world: int, stream: int) -> Any:
        """This (micro-step, rank)'s share of the step's epoch-ordered batch of [0, n);
        ``stream`` gives each domain its own order (unpaired batches)."""
        B = self.config.train.batch_size
        seed = self.config.train.seed + stream
        idx = epoch_batch_indices(n, step, B * self.config.train.grad_accum * world, seed)
        part = micro * world + rank
        return idx[part * B : (part + 1) * B]

    def flipped(self, images: np.ndarray, step: int, micro: int, rank: int, stream: int) -> Any:
        from aigc.data.images import random_flip

        batch = to_model_batch(images)
        if self.config.data.flip:
            rng = np.random.default_rng([self.config.train.seed, step, micro, rank, stream, 1])
            batch = random_flip(batch, rng)
        return batch

    # translating --------------------------------------------------------------
    def translate_batch(
        self, model: nn.Module, images: np.ndarray, direction: str, device: torch.device
    ) -> torch.Tensor:
        """(B, H, W, C) uint8 of the source domain -> (B, C, H, W) float32 in [-1, 1] on
        the CPU."""
        from aigc.data.images import to_tensor

        with torch.no_grad():
            out = model.translate(to_tensor(images).to(device), direction)
        return out.float().clamp(-1, 1).cpu()

    # evaluation -------------------------------------------------------------
    def classifier(self):
        """A classifier of both domains' training images: label ``domain`` (a, b) and the
        content attributes; cached by the domains' contents."""
        if self._classifier is None:
            from aigc.metrics.classifier import cached_classifier

            a, b = self.domain("a"), self.domain("b")
            shared = self.content_attributes
            images = np.concatenate([a.train_images, b.train_images])
            labels = {"domain": np.repeat([0, 1], [a.n_train, b.n_train])}
            for x in shared:
                labels[x] = np.concatenate([a.split_labels("train")[:, a.attributes.index(x)],
                                            b.split_labels("train")[:, b.attributes.index(x)]])  # fmt: skip
            classes = {"domain": ["a", "b"], **{x: a.classes[x] for x in shared}}
            key = (f"translate|{a.meta['sha256']}|{b.meta['sha256']}|{a.n_train}|{b.n_train}|"
                   + ",".join(shared))  # fmt: skip
            with (
                torch.inference_mode(False),
                torch.enable_grad(),
                torch.autocast("cpu", enabled=False),
            ):
                self._classifier = cached_classifier(key, images, labels, classes)
        return self._classifier

    def domain_reference(self, extractor, domain: str) -> tuple[Any, np.ndarray | None]:
        """Statistics and features of a domain's training images, cached by extractor."""
        from aigc.metrics.reference import reference_statistics

        data = self.domain(domain)
        key = {"extractor": extractor.name, "spec": f"run-data:{data.meta['sha256']}:train",
               "count": data.n_train}  # fmt: skip
        return reference_statistics(
            key, lambda: extractor.features(to_model_batch(data.train_images))
        )

    def eval_sums(
        self, model: nn.Module, rank: int, world: int, device: torch.device
    ) -> dict[str, float]:
        """Per direction, over this rank's share of the held-out source images: judged
        as the target domain, content kept (all shared attributes, and each), and PSNR and
        SSIM against the true pair (paired data); the cycle's PSNR (both directions
        learnt); FID/KID/PR of the translations (one process)."""
        from aigc.data.images import to_uint8
        from aigc.metrics.image import FeatureSets, feature_metrics
        from aigc.metrics.restoration import psnr, ssim

        clf = self.classifier()
        shared = self.content_attributes
        sums: dict[str, float] = {}
        kept: dict[str, list[np.ndarray]] = {}
        directions = model.directions
        for d in directions:
            src, dst = ends(d)
            val = self.domain(src).val_images[: self.config.data.eval_samples]
            labels = self.domain(src).split_labels("val")
            rows = np.arange(rank, len(val), world)
            keys = [f"count/{d}", f"target/{d}", f"kept/{d}", *(f"kept/{d}/{x}" for x in shared)]
            if self.info["paired"]:
                keys += [f"psnr/{d}", f"ssim/{d}"]
            if len(directions) == 2:
                keys.append(f"cycle/{src}")
            sums.update(dict.fromkeys(keys, 0.0))
            kept[d] = []
            for i in range(0, len(rows), EVAL_BATCH):
                part = rows[i : i + EVAL_BATCH]
                source = np.array(val[part])
                out = to_uint8(self.translate_batch(model, source, d, device))
                kept[d].append(out)
                domain, each = self._judged(clf, out, None if labels is None else labels[part],
                                            self.domain(src), DOMAINS.index(dst))  # fmt: skip
                sums[f"count/{d}"] += len(part)
                sums[f"target/{d}"] += float(domain.sum())
                if each:
                    for x, ok in each.items():
                        sums[f"kept/{d}/{x}"] += float(ok.sum())
                    sums[f"kept/{d}"] += float(np.all(list(each.values()), axis=0).sum())
                if self.info["paired"]:
                    truth = np.array(self.domain(dst).val_images[part])
                    sums[f"psnr/{d}"] += float(psnr(out, truth).sum())
                    sums[f"ssim/{d}"] += float(ssim(out, truth).sum())
                if len(directions) == 2:
                    back = to_uint8(self.translate_batch(model, out, f"{dst}2{src}", device))
                    sums[f"cycle/{src}"] += float(psnr(back, source).sum())
            sums.update(self._real_sums(clf, d, rank, world))
        names = self.config.data.eval_metrics
        if world == 1 and names:
            extractor = self.feature_extractor(device)
            for d, images in kept.items():
                if not images or extractor is None:
                    continue
                stats, real = self.domain_reference(extractor, ends(d)[1])
                fake, logits = extractor.features_and_logits(to_model_batch(np.concatenate(images)))
                values = feature_metrics(names, FeatureSets(stats, real, fake, logits))
                sums.update({f"feature/{k}_{d}": float(v) for k, v in values.items()})
        return sums

    def _judged(self, clf: Any, images: np.ndarray, labels: np.ndarray | None, data: ImageData,
                target: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:  # fmt: skip
        """Per image of (N, H, W, C) uint8 ``images``: taken for domain ``target``, and for
        each content attribute, read as ``labels`` (rows of ``data``'s label columns) say."""
        from aigc.data.images import to_tensor

        predicted = clf.model.predict(to_tensor(images))
        domain = predicted["domain"].numpy() == target
        if labels is None:
            return domain, {}
        return domain, {x: predicted[x].numpy() == labels[:, data.attributes.index(x)]
                        for x in self.content_attributes}  # fmt: skip

    def _real_sums(self, clf: Any, direction: str, rank: int, world: int) -> dict[str, float]:
        """The judge on the target domain's real held-out images, with their own labels:
        what a perfect translation would score (the ceiling of judged_target and
        content_kept)."""
        dst = ends(direction)[1]
        data = self.domain(dst)
        val = data.val_images[: self.config.data.eval_samples]
        labels = data.split_labels("val")
        rows = np.arange(rank, len(val), world)
        d = direction
        sums = {f"real/count/{d}": 0.0, f"real/target/{d}": 0.0}
        if self.content_attributes:
            sums[f"real/kept/{d}"] = 0.0
        for i in range(0, len(rows), EVAL_BATCH):
            part = rows[i : i + EVAL_BATCH]
            domain, each = self._judged(clf, np.array(val[part]),
                                        None if labels is None else labels[part], data,
                                        DOMAINS.index(dst))  # fmt: skip
            sums[f"real/count/{d}"] += len(part)
            sums[f"real/target/{d}"] += float(domain.sum())
            if each:
                sums[f"real/kept/{d}"] += float(np.all(list(each.values()), axis=0).sum())
        return sums

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Per direction: judged_target_<d> and content_kept_<d> (shares of the held-out
        images), content_kept_<d>/<attribute>, psnr_<d>, ssim_<d> (dB and SSIM against
        the true pair), cycle_psnr_<domain>, fid_<d>, ...; the same judge's verdicts on
        the target domain's real held-out images (judged_target_real_<d>,
        content_kept_real_<d>: the ceiling); and means over the directions without the
        suffix."""
        out: dict[str, float] = {}
        directions = [d for d in DIRECTIONS if sums.get(f"count/{d}")]
        for d in directions:
            n = sums[f"count/{d}"]
            src = ends(d)[0]
            out[f"judged_target_{d}"] = sums[f"target/{d}"] / n
            if f"kept/{d}" in sums and self.content_attributes:
                out[f"content_kept_{d}"] = sums[f"kept/{d}"] / n
                for x in self.content_attributes:
                    out[f"content_kept_{d}/{x}"] = sums[f"kept/{d}/{x}"] / n
            for k in ("psnr", "ssim"):
                if f"{k}/{d}" in sums:
                    out[f"{k}_{d}"] = sums[f"{k}/{d}"] / n
            if f"cycle/{src}" in sums:
                out[f"cycle_psnr_{src}"] = sums[f"cycle/{src}"] / n
            real = sums.get(f"real/count/{d}", 0.0)
            if real:
                out[f"judged_target_real_{d}"] = sums[f"real/target/{d}"] / real
                if f"real/kept/{d}" in sums:
                    out[f"content_kept_real_{d}"] = sums[f"real/kept/{d}"] / real
        for k in (
            "judged_target",
            "content_kept",
            "psnr",
            "ssim",
            "judged_target_real",
            "content_kept_real",
        ):
            values = [out[f"{k}_{d}"] for d in directions if f"{k}_{d}" in out]
            if values:
                out[k] = float(np.mean(values))
        cycles = [out[f"cycle_psnr_{x}"] for x in DOMAINS if f"cycle_psnr_{x}" in out]
        if cycles:
            out["cycle_psnr"] = float(np.mean(cycles))
        out.update({k[len("feature/") :]: v for k, v in sums.items() if k.startswith("feature/")})
        if directions:
            out["count"] = sums[f"count/{directions[0]}"]
            clf = self.classifier()
            out["classifier_accuracy/domain"] = float(clf.accuracy["domain"])
        return out

    def eval_info(self) -> dict[str, str]:
        info = super().eval_info()
        info["domains"] = f"A: {self.info['sources']['a']}; B: {self.info['sources']['b']}"
        return info

    def samples(self, model: nn.Module, step: int, device: torch.device) -> dict[str, Any]:
        """Eight held-out images of each source domain in rows: the input, its
        translation, and the cycle back (CycleGAN) or the true pair (paired data)."""
        from aigc.data.images import image_grid, to_uint8

        rows = []
        for d in model.directions:
            src, dst = ends(d)
            n = min(8, len(self.domain(src).val_images))
            source = np.array(self.domain(src).val_images[:n])
            out = to_uint8(self.translate_batch(model, source, d, device))
            rows += [source, out]
            if len(model.directions) == 2:
                rows.append(to_uint8(self.translate_batch(model, out, f"{dst}2{src}", device)))
            elif self.info["paired"]:
                rows.append(np.array(self.domain(dst).val_images[:n]))
        n = min(len(r) for r in rows)
        return {"translations": image_grid(np.concatenate([r[:n] for r in rows]), nrow=n)}


class CycleGANTask(TranslateTask):
    """Unpaired translation both ways (models.cyclegan)."""

    name = "cyclegan"
    model_config = CycleGANConfig
    model_class = CycleGAN
    headline_metric = "judged_target"

    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        """``a`` and ``b`` (B, C, H, W) in [-1, 1], each domain in its own order."""
        out = {}
        for stream, k in enumerate(DOMAINS):
            train = self.domain(k).train_images
            idx = self.rows(len(train), step, micro, rank, world, stream)
            out[k] = self.flipped(train[idx], step, micro, rank, stream)
        return out


class Pix2PixTask(TranslateTask):
    """Paired translation one way, data.direction (models.pix2pix)."""

    name = "pix2pix"
    model_config = Pix2PixConfig
    model_class = Pix2Pix
    headline_metric = "psnr"
    needs_pairs = True

    @classmethod
    def fit_model(cls, config: Config) -> None:
        config.model.direction = config.data.direction

    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        """``source`` and ``target`` (B, C, H, W) in [-1, 1]: pairs, flipped together."""
        src, dst = ends(self.config.data.direction)
        n = self.domain(src).n_train
        idx = self.rows(n, step, micro, rank, world, 0)
        return {"source": self.flipped(self.domain(src).train_images[idx], step, micro, rank, 0),
                "target": self.flipped(self.domain(dst).train_images[idx], step, micro, rank, 0)}  # fmt: skip
