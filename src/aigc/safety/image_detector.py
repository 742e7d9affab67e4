"""Telling generated images from real ones without a watermark: a real-vs-generated
classifier in the style of CNNDetection (Wang et al., "CNN-generated images are
surprisingly easy to spot... for now", CVPR 2020).

Their recipe: one binary CNN, trained on real images against the images of ONE
generator, with blur and JPEG augmentation of both classes so that it learns the traces
a generator leaves rather than its particular look; it then often carries over to
generators it never saw (they report 63.9 to 100 average precision on unseen ones).
Ours is that recipe at our sizes:

- real images: the generator run's own prepared training images (``RUN/data``), the
  data the generator learnt to imitate; generated images: sampled from the run with its
  default settings (a text-to-image run is prompted with its training captions);
- a small all-convolutional network (three stages, full resolution first, since the
  traces live in the highest frequencies; global average pooling; one logit) trained
  from scratch with Adam and binary cross-entropy on balanced batches;
- augmentation of every training image, real or generated, as their "Blur+JPEG (0.5)":
  Gaussian blur with probability 0.5 (sigma uniform in [0, 1] px; theirs is [0, 3] px at
  256 px, our images are 8 times smaller), JPEG with probability 0.5 (quality uniform
  in [30, 100], as theirs), and a horizontal flip with probability 0.5.

A share of both classes is held out; the detector folder records the accuracy at 0.5 and
the average precision on it, with the generator it was trained against (run, step and
the SHA-256 of its weights). The folder holds ``detector.safetensors`` and
``detector.json``; nothing in it is ever unpickled.

A detector sees pixels at the size it was trained on; an image of another size is refused
rather than resized, because resampling leaves its own traces and erases the
generator's.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from aigc.errors import CheckpointError, RequestError

DETECTOR_JSON = "detector.json"
DETECTOR_WEIGHTS = "detector.safetensors"
FORMAT = 1  # detector.json's "format"; bumped when the folder changes shape

# Wang et al.'s "Blur+JPEG (0.5)", with the blur scaled to our image sizes (module docstring).
AUGMENTATIONS: dict[str, Any] = {
    "flip_p": 0.5,
    "blur_p": 0.5,
    "blur_sigma": [0.0, 1.0],  # pixels, uniform
    "jpeg_p": 0.5,
    "jpeg_quality": [30, 100],  # uniform integer, both ends included
}
PRECISE_BN_BATCHES = 20  # training batches that set the BatchNorm statistics at the end
VALIDATION_KEYS = ("accuracy", "average_precision", "n_real", "n_generated")
THRESHOLD = 0.5  # probability at or above which an image is called generated
_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")  # what Pillow may open for a user file


# --------------------------------------------------------------------------- the metric


def average_precision(scores: Any, labels: Any) -> float:
    """Average precision of ``scores`` (higher = more likely positive) for binary
    ``labels`` (1 = positive: generated): sum over thresholds of
    (R_k - R_{k-1}) * P_k, each distinct score one threshold (tied scores enter together),
    the definition scikit-learn's ``average_precision_score`` uses and Wang et al. report.
    """
    s, y = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    positives = int((y == 1).sum())
    if positives == 0:
        raise ValueError("average precision needs at least one positive label")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order] == 1
    tp, fp = np.cumsum(y), np.cumsum(~y)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last index of each tie group
    precision = tp[last] / (tp[last] + fp[last])
    recall = tp[last] / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


# --------------------------------------------------------------------------- the network


class RealFakeCNN(nn.Module):
    """x (B, C, S, S) in [-1, 1] -> (B,) logits of "generated".

    Three stages of two 3x3 convolutions (widths w, 2w, 4w), each followed by batch
    normalisation and LeakyReLU; the first stage at full resolution, the next two entered
    with stride 2; global average pooling and one linear unit. Without normalisation the
    network barely learns here (most pixels are a flat background that swamps the
    traces); with it, it learns in a few hundred steps (benchmarks/image_detector.py)."""

    def __init__(self, channels: int, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = channels
        for i, c in enumerate((width, 2 * width, 4 * width)):
            layers += [nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1),
                       nn.BatchNorm2d(c), nn.LeakyReLU(0.2),
                       nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.LeakyReLU(0.2)]  # fmt: skip
            c_in = c
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).mean(dim=(2, 3))).squeeze(1)  # (B,)


@torch.no_grad()
def precise_batch_norm(model: nn.Module, batches: Any) -> None:
    """Replaces the running statistics of every BatchNorm layer by their plain average
    over ``batches`` (tensors) under the final weights: "PreciseBN" (Wu and Johnson,
    "Rethinking 'Batch' in BatchNorm", 2021). The moving averages of training lag weights
    that still move, and here that lag alone left eval-mode scores on one side of 0.5."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was = model.training
    model.train()
    for x in batches:
        model(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.train(was)


# --------------------------------------------------------------------------- the detector


@dataclass
class Detector:
    """A trained real-vs-generated classifier and what it was trained on (its JSON)."""

    model: RealFakeCNN
    info: dict[str, Any]

    @property
    def image_size(self) -> int:
        return int(self.info["image_size"])

    @property
    def channels(self) -> int:
        return int(self.info["channels"])

    def _batch(self, images: Any) -> Tensor:
        """(N, C, S, S) float in [-1, 1] from uint8 (N, S, S, C) / (S, S, C) pixels or an
        (N, C, S, S) tensor in [-1, 1]; RequestError for another size or channel count."""
        s, c = self.image_size, self.channels
        if isinstance(images, Tensor):
            x = images.detach().float().cpu()
            if x.ndim == 3:
                x = x[None]
            got = tuple(x.shape[1:])
            want = (c, s, s)
        else:
            a = np.asarray(images)
            if a.dtype != np.uint8:
                raise RequestError(f"images must be uint8 pixels (0..255), not {a.dtype}")
            if a.ndim == 2 and c == 1:
                a = a[..., None]
            if a.ndim == 3:
                a = a[None]
            got = tuple(a.shape[1:]) if a.ndim == 4 else tuple(a.shape)
            want = (s, s, c)
            x = None
        if got != want:
            raise RequestError(
                f"images of shape {got}; this detector takes {s}x{s} images with {c} "
                f"channel(s) ({'(C, H, W)' if x is not None else '(H, W, C)'} {want})"
            )
        if x is None:
            x = torch.from_numpy(np.array(a)).permute(0, 3, 1, 2).float() / 127.5 - 1  # a copy
        return x

    @torch.inference_mode()
    def score(self, images: Any, batch_size: int = 256) -> np.ndarray:
        """The probability that each image is generated, (N,) float64 in [0, 1].

        ``images``: uint8 pixels (N, S, S, C) or one (S, S, C) image, or an (N, C, S, S)
        tensor in [-1, 1] (what image pipelines generate), at the detector's size S and
        channels C."""
        x = self._batch(images)
        self.model.eval()
        out = [
            torch.sigmoid(self.model(x[i : i + batch_size])) for i in range(0, len(x), batch_size)
        ]
        return torch.cat(out).double().numpy() if out else np.zeros(0)

    def save(self, folder: str | Path) -> Path:
        """Writes detector.safetensors and detector.json into ``folder`` (made if missing)."""
        from safetensors.torch import save_file

        from aigc.runs import atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = folder / DETECTOR_WEIGHTS
        tmp = weights.with_name(f".{weights.name}.tmp")
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(tmp))
        tmp.replace(weights)
        atomic_write_text(folder / DETECTOR_JSON, json.dumps(self.info, indent=2) + "\n")
        return folder


_REQUIRED = {"format": int, "image_size": int, "channels": int, "width": int,
             "generator": dict, "validation": dict, "augmentations": dict}  # fmt: skip


def load_detector(path: str | Path) -> Detector:
    """The detector saved in folder ``path``; CheckpointError naming what is missing or
    damaged when the folder is not a detector."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such detector folder")
    meta_path, weights = folder / DETECTOR_JSON, folder / DETECTOR_WEIGHTS
    if not meta_path.is_file():
        raise CheckpointError(
            f"{folder} is not a detector folder (no {DETECTOR_JSON}); make one with "
            "`aigc train-detector RUN --out DIR`"
        )
    try:
        info = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is damaged ({e})") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{meta_path} is damaged: not a JSON object")
    for key, kind in _REQUIRED.items():
        if not isinstance(info.get(key), kind) or isinstance(info.get(key), bool):
            raise CheckpointError(f"{meta_path} is damaged: {key!r} missing or not {kind.__name__}")
    if info["format"] > FORMAT:
        raise CheckpointError(f"{meta_path}: detector format {info['format']} is newer than this "
                              f"aigc reads ({FORMAT}); upgrade aigc")  # fmt: skip
    if info["channels"] not in (1, 3) or not 4 <= info["image_size"] <= 4096 or info["width"] < 1:
        raise CheckpointError(f"{meta_path} is damaged: channels {info['channels']}, image_size "
                              f"{info['image_size']}, width {info['width']}")  # fmt: skip
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; the detector folder is incomplete")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is damaged ({e})") from None
    model = RealFakeCNN(info["channels"], info["width"])
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != want:
        wrong = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
        raise CheckpointError(f"{weights} does not fit the network {meta_path} describes "
                              f"(first difference: {wrong[0]!r})")  # fmt: skip
    model.load_state_dict(state, strict=True)
    return Detector(model.eval(), info)


def read_image(path: str | Path, detector: Detector) -> np.ndarray:
    """An image file as the detector's (S, S, C) uint8 pixels; RequestError for a file that
    is not an image, of another size (refused, not resized: module docstring), or in
    colour for a grey detector (and grey for a colour one). A grey image stored as RGB
    is read as grey; transparent pixels are composited over black."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise RequestError(f"--image {path}: no such file")
    try:
        with Image.open(path, formats=_FORMATS) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                rgba = img.convert("RGBA")
                img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
            grey = img.mode in ("1", "L", "I", "I;16", "F")
            pixels = np.asarray(img.convert("L" if grey else "RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(
            f"{path} is not an image aigc reads ({', '.join(_FORMATS)}): {e}"
        ) from None
    h, w = pixels.shape[:2]
    s, c = detector.image_size, detector.channels
    if (h, w) != (s, s):
        raise RequestError(
            f"{path} is {w}x{h}; this detector judges {s}x{s} images, the size its generator "
            "draws. Give the image at that size (resizing would erase the traces it looks for)"
        )
    if pixels.ndim == 3 and c == 1:
        if not (pixels == pixels[..., :1]).all():
            raise RequestError(f"{path} is a colour image; this detector judges grey images")
        pixels = pixels[..., 0]
    if pixels.ndim == 2 and c == 3:
        raise RequestError(f"{path} is a grey image; this detector judges colour (RGB) images")
    return pixels.reshape(s, s, c)


# --------------------------------------------------------------------------- training data


def sample_generator(pipe: Any, n: int, seed: int, batch_size: int = 100) -> np.ndarray:
    """n images (n, S, S, C) uint8 from an image pipeline with its default settings,
    in batches; a text-to-image run is prompted with captions drawn from its training
    data. Fixed by ``seed``."""
    from aigc.pipelines.diffusion import DiffusionPipeline
    from aigc.trainer import mix_seed

    prompts = None
    if isinstance(pipe, DiffusionPipeline) and pipe.text_conditional:
        from aigc.tasks.images import read_meta

        meta = read_meta(pipe.run.data_dir)
        captions = meta.get("captions")
        if not captions:
            raise RequestError(f"{pipe.run.path}: a text-to-image run without training captions")
        pick = np.random.default_rng(mix_seed(seed, 1)).integers(0, int(meta["n_train"]), size=n)
        prompts = [captions[i] for i in pick]
    out = []
    for b, start in enumerate(range(0, n, batch_size)):
        m = min(batch_size, n - start)
        kw = {} if prompts is None else {"prompt": prompts[start : start + m]}
        out.append(pipe.generate(m, seed=mix_seed(seed, 2, b), output="uint8", **kw))
    return np.concatenate(out)


def real_images(run: Any, n: int, seed: int) -> np.ndarray:
    """Up to n images (uint8, (n, S, S, C)) drawn without replacement from a run's
    prepared training split: the real images its generator learnt to imitate."""
    from aigc.tasks.images import open_data

    data = open_data(run.data_dir)
    train = data.train_images
    pick = np.sort(np.random.default_rng(seed).permutation(len(train))[: min(n, len(train))])
    return np.ascontiguousarray(train[pick])


def augment(
    images: np.ndarray, rng: np.random.Generator, aug: dict[str, Any] = AUGMENTATIONS
) -> np.ndarray:
    """Each (S, S, C) uint8 image, independently: blurred (Gaussian, sigma uniform in
    ``blur_sigma``) with probability ``blur_p``, JPEG-compressed (quality uniform in
    ``jpeg_quality``) with probability ``jpeg_p``, flipped left-right with ``flip_p``."""
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    out = images.copy()
    for i in range(len(out)):
        im = out[i]
        if rng.random() < aug["blur_p"]:
            sigma = rng.uniform(*aug["blur_sigma"])
            blurred = gaussian_filter(
                im.astype(np.float32), sigma=(sigma, sigma, 0), mode="reflect"
            )
            im = np.clip(np.rint(blurred), 0, 255).astype(np.uint8)
        if rng.random() < aug["jpeg_p"]:
            quality = int(rng.integers(aug["jpeg_quality"][0], aug["jpeg_quality"][1] + 1))
            buf = io.BytesIO()
            Image.fromarray(im[..., 0] if im.shape[2] == 1 else im).save(
                buf, "JPEG", quality=quality
            )
            im = np.asarray(Image.open(buf)).reshape(im.shape)
        if rng.random() < aug["flip_p"]:
            im = im[:, ::-1]
        out[i] = im
    return out


def _to_tensor(images: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


# --------------------------------------------------------------------------- training


@dataclass
class DetectorReport:
    """What ``train_detector`` made: the folder, the generator it was trained against,
    the images used and the held-out figures (accuracy at probability 0.5, average
    precision with "generated" as the positive class)."""

    path: Path
    generator: dict[str, Any]
    n_train: dict[str, int]  # images the network trained on: {"real": .., "generated": ..}
    n_val: dict[str, int]  # images held out, the same way
    steps: int
    val_accuracy: float
    val_average_precision: float
    seconds: float
    history: list[float] = field(default_factory=list)  # mean training loss per 50 steps

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


def fit_detector(
    real: np.ndarray,
    fake: np.ndarray,
    steps: int = 400,
    seed: int = 0,
    val_fraction: float = 0.2,
    width: int = 16,
    batch_size: int = 64,
    lr: float = 1e-3,
) -> tuple[RealFakeCNN, dict[str, Any]]:
    """A RealFakeCNN trained on uint8 (N, S, S, C) ``real`` against ``fake`` images:
    ``val_fraction`` of each class held out, ``steps`` Adam steps on batches of half real
    and half generated images, each augmented (``AUGMENTATIONS``), learning rate
    cosine-decayed to a tenth. Returns the network and its held-out figures."""
    if real.shape[1:] != fake.shape[1:]:
        raise RequestError(f"real images {real.shape[1:]} and generated {fake.shape[1:]} differ")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    n_val = [max(1, round(len(x) * val_fraction)) for x in (real, fake)]
    if min(len(real) - n_val[0], len(fake) - n_val[1]) < 2:
        raise RequestError(f"{len(real)} real and {len(fake)} generated images are too few to "
                           "train a detector and hold some out")  # fmt: skip
    splits = []
    for x, v in zip((real, fake), n_val, strict=True):
        order = rng.permutation(len(x))
        splits.append((x[order[v:]], x[order[:v]]))
    (real_tr, real_va), (fake_tr, fake_va) = splits
    model = RealFakeCNN(real.shape[-1], width)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    half = batch_size // 2
    target = torch.cat([torch.zeros(half), torch.ones(half)])

    def batch() -> Tensor:  # half real, half generated, each image augmented
        pick = np.concatenate([real_tr[rng.integers(0, len(real_tr), half)],
                               fake_tr[rng.integers(0, len(fake_tr), half)]])  # fmt: skip
        return _to_tensor(augment(pick, rng))

    losses, history = [], []
    model.train()
    for step in range(steps):
        for group in opt.param_groups:  # cosine from lr to lr / 10
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
        loss = nn.functional.binary_cross_entropy_with_logits(model(batch()), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if len(losses) == 50 or step == steps - 1:
            history.append(float(np.mean(losses)))
            losses = []
    precise_batch_norm(model, (batch() for _ in range(PRECISE_BN_BATCHES)))
    model.eval()
    probe = Detector(model, {"image_size": real.shape[1], "channels": real.shape[-1]})
    scores = np.concatenate([probe.score(real_va), probe.score(fake_va)])
    labels = np.r_[np.zeros(len(real_va)), np.ones(len(fake_va))]
    figures = {
        "accuracy": float(((scores >= THRESHOLD) == labels).mean()),
        "average_precision": average_precision(scores, labels),
        "n_real": len(real_va),
        "n_generated": len(fake_va),
        "n_train_real": len(real_tr),
        "n_train_generated": len(fake_tr),
        "history": history,
    }
    return model, figures


def generator_identity(run: Any, step: int) -> dict[str, Any]:
    """Name, path, family, step and the SHA-256 of the weights file of a run's latest
    checkpoint (model.safetensors, as ``train.init_sha256`` identifies a base)."""
    from aigc.runs import file_sha256

    ckpt = run.latest_checkpoint()
    return {"name": run.path.name, "path": str(run.path.resolve()), "step": step,
            "checkpoint": ckpt.name, "weights_sha256": file_sha256(ckpt / "model.safetensors")}  # fmt: skip


def train_detector(
    generator_run: str | Path,
    out: str | Path,
    n: int = 1000,
    steps: int = 400,
    seed: int = 0,
    width: int = 16,
    val_fraction: float = 0.2,
) -> DetectorReport:
    """Trains a detector of ``generator_run``'s images and saves it in folder ``out``.

    n generated images are sampled from the run (``sample_generator``) and up to n real
    ones drawn from its prepared training split; ``val_fraction`` of each is held out;
    ``steps`` training steps of 64 images (``fit_detector``). RequestError for a run
    that does not generate images, or bad arguments."""
    import aigc
    from aigc.pipelines.base import check_count

    check_count(n, limit=100_000, what="n")
    check_count(steps, limit=1_000_000, what="steps")
    if not 0 < val_fraction < 1:
        raise RequestError(f"val_fraction={val_fraction!r} must be in (0, 1)")
    out = Path(out)
    if (out / DETECTOR_JSON).exists() or (out.is_dir() and any(out.iterdir())):
        raise RequestError(f"{out} exists and is not empty; choose a new folder for the detector")
    t0 = time.perf_counter()
    pipe = aigc.load(generator_run)
    if pipe.kind != "image":
        raise RequestError(
            f"{generator_run} is a {pipe.kind} run; a detector is trained against a run that "
            "generates images (GAN, VAE, diffusion)"
        )
    real = real_images(pipe.run, n, seed)
    fake = sample_generator(pipe, n, seed)
    model, figures = fit_detector(real, fake, steps=steps, seed=seed, val_fraction=val_fraction,
                                  width=width)  # fmt: skip
    generator = generator_identity(pipe.run, pipe.step)
    generator["family"] = pipe.config.family
    info = {
        "format": FORMAT,
        "kind": "real-vs-generated image detector (CNNDetection-style)",
        "image_size": int(real.shape[1]),
        "channels": int(real.shape[-1]),
        "width": width,
        "generator": generator,
        "real_images": f"{pipe.run.path.name}/data, training split ({len(real)} drawn)",
        "validation": {k: figures[k] for k in VALIDATION_KEYS},
        "training": {
            "steps": steps,
            "batch_size": 64,
            "seed": seed,
            "optimizer": "adam",
            "lr": 1e-3,
            "n_real": figures["n_train_real"],
            "n_generated": figures["n_train_generated"],
        },
        "augmentations": AUGMENTATIONS,
        "threshold": THRESHOLD,
    }
    Detector(model, info).save(out)
    return DetectorReport(
        path=out, generator=generator,
        n_train={"real": figures["n_train_real"], "generated": figures["n_train_generated"]},
        n_val={"real": figures["n_real"], "generated": figures["n_generated"]}, steps=steps, val_accuracy=figures["accuracy"],
        val_average_precision=figures["average_precision"],
        seconds=time.perf_counter() - t0, history=figures["history"],
    )  # fmt: skip
