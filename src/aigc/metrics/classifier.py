"""Domain classifiers: small CNNs trained once on a labelled image set, then cached.

Where no standard feature extractor fits (8×8 digits resized to 32×32, the
procedural shapes set, a user's labelled folder) a classifier trained on the real
images is the judge of generated ones: does a conditional sample show the class
it was asked for, does an unconditional model cover every class. It is trained
once per data set and settings, stored as safetensors under the cache folder
(``$AIGC_CACHE_DIR``, default ``~/.cache/aigc``) with its held-out accuracy in
the file's metadata, and reused from then on.

One network serves every labelled attribute: a shared convolutional trunk and one
linear head per attribute (shape, colour, size, position for ``shapes``; class for
``digits``). ``features`` is the trunk's penultimate vector.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

CLASSIFIER_VERSION = 3  # part of the cache key: bump when training or architecture change
# Below this held-out accuracy the judge's verdicts (and FID in its features) are noise
JUDGE_MIN_ACCURACY = 0.9
JUDGE_MIN_HELDOUT = 20  # fewer held-out images than this: its accuracy itself is a guess


class JudgeWarning(UserWarning):
    """The domain classifier is too weak, or measured on too few images, to trust what
    is judged through it (label accuracy, class shares, FID/KID/PR in its features)."""


def cache_dir() -> Path:
    return Path(os.environ.get("AIGC_CACHE_DIR") or Path.home() / ".cache" / "aigc")


def write_cached(module: nn.Module, meta: dict, path: Path) -> None:
    """``module``'s weights as safetensors at ``path`` with ``meta`` as JSON, written to a
    temporary name and moved into place, so a reader never sees half a file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(tmp), metadata={"aigc": json.dumps(meta)})
    os.replace(tmp, path)


def read_cached(path: Path) -> tuple[dict[str, Tensor], dict] | None:
    """(weights, meta) written by write_cached, or None when unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["aigc"])
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError):
        return None
    return state, meta


class DomainClassifier(nn.Module):
    """Conv trunk (three stride-2 stages) + one linear head per labelled attribute."""

    def __init__(self, channels: int, num_classes: dict[str, int], width: int = 16) -> None:
        super().__init__()
        self.channels = channels
        self.num_classes = dict(num_classes)

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, stride=2, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            )

        self.trunk = nn.Sequential(
            stage(channels, width), stage(width, 2 * width), stage(2 * width, 4 * width)
        )
        self.feature_dim = 4 * width
        self.heads = nn.ModuleDict(
            {a: nn.Linear(self.feature_dim, k) for a, k in num_classes.items()}
        )

    def features(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) in [-1, 1] -> (B, feature_dim) after global average pooling."""
        return self.trunk(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Logits per attribute, each (B, num_classes[attribute])."""
        f = self.features(x)
        return {a: head(f) for a, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 500) -> dict[str, Tensor]:
        """Predicted class per attribute, each (B,) long; eval mode, in batches."""
        was = self.training
        self.eval()
        device = next(self.parameters()).device
        out: dict[str, list[Tensor]] = {a: [] for a in self.heads}
        for i in range(0, len(x), batch_size):
            for a, logits in self(x[i : i + batch_size].to(device)).items():
                out[a].append(logits.argmax(-1).cpu())
        self.train(was)
        return {a: torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for a, v in out.items()}


@dataclass
class TrainedClassifier:
    model: DomainClassifier
    accuracy: dict[str, float]  # held-out accuracy per attribute
    classes: dict[str, list[str]]
    key: str  # what it was trained on (data set and settings)
    heldout: int = 0  # images its accuracy was measured on

    def weaknesses(self) -> list[str]:
        """Why its verdicts should not be trusted, one sentence each; [] when they can."""
        out = []
        weak = {a: v for a, v in self.accuracy.items() if v < JUDGE_MIN_ACCURACY}
        if weak:
            said = ", ".join(f"{a} {v:.1%}" for a, v in weak.items())
            out.append(
                f"the domain classifier that judges these images scores only {said} on "
                f"{self.heldout} held-out real images (below {JUDGE_MIN_ACCURACY:.0%}): its "
                "verdicts and the FID/KID/PR in its features mean little; give it more "
                "labelled images, or Inception weights (--inception-weights) for FID"
            )
        if self.heldout < JUDGE_MIN_HELDOUT:
            out.append(
                f"the domain classifier's accuracy was measured on only {self.heldout} "
                f"held-out images (fewer than {JUDGE_MIN_HELDOUT}): treat its verdicts as rough"
            )
        return out


def _images_to_tensor(images: np.ndarray) -> Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _shift(x: Tensor, rng: np.random.Generator, max_shift: int = 2) -> Tensor:
    """Random translations of up to max_shift pixels (zero padding): robustness to
    the small misplacements generated images have."""
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    H, W = x.shape[-2:]
    dy, dx = rng.integers(0, 2 * max_shift + 1, size=2)
    return pad[..., dy : dy + H, dx : dx + W]


# Departures from the real images too faint to see, which generated images have: a tint
# and grain of a few levels on a black background, colours a little brighter or duller.
# A judge that never saw them reads labels from them (v2 judged a plainly green square on
# a background tinted 5 levels towards blue "magenta"). Each bound stays far inside the gap
# between two classes' colours (shapes' palette: 90+ levels apart) and changes no shape.
GRAIN = 0.05  # largest std of additive Gaussian grain, in [-1, 1] units (6 of 255 levels)
TINT = 0.06  # largest offset per channel (8 levels)
GAIN = 0.08  # brightness scaled by up to ±8 % (from black)


def _perturb(x: Tensor, gen: torch.Generator) -> Tensor:
    """Each image of x (B, C, H, W) in [-1, 1] with a random brightness gain, per-channel
    tint and Gaussian grain within GAIN, TINT and GRAIN; clamped to [-1, 1]."""
    b, c = x.shape[:2]
    gain = 1 + GAIN * (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1)
    tint = TINT * (2 * torch.rand(b, c, 1, 1, generator=gen) - 1)
    grain = GRAIN * torch.rand(b, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return ((x + 1) * gain - 1 + tint + grain).clamp(-1.0, 1.0)


def train_classifier(
    images: np.ndarray,
    labels: dict[str, np.ndarray],
    classes: dict[str, list[str]],
    key: str = "",
    epochs: int = 10,
    batch_size: int = 64,
    val_fraction: float = 0.15,
    seed: int = 0,
    max_images: int = 20_000,
    min_steps: int = 300,
) -> TrainedClassifier:
    """Trains a DomainClassifier on (N, H, W, C) uint8 images and per-attribute labels.

    It learns from shifted, tinted and grainy copies (``_shift``, ``_perturb``) so that
    what it judges is what can be seen. Deterministic for a seed. Accuracy is measured on
    a held-out share the network never trained on.
    """
    if not labels:
        raise ValueError("a domain classifier needs labelled images")
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    n = min(len(images), max_images)  # a large set: a random subset is plenty
    order = rng.permutation(len(images))[:n]
    n_val = max(1, round(n * val_fraction), min(JUDGE_MIN_HELDOUT, n // 4))
    val_idx, train_idx = order[:n_val], order[n_val:]
    batch_size = max(1, min(batch_size, len(train_idx)))  # a tiny set still trains
    y_all = {a: torch.from_numpy(np.asarray(v, dtype=np.int64)) for a, v in labels.items()}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DomainClassifier(images.shape[-1], {a: len(classes[a]) for a in labels})
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    # a small set gets more passes: at least min_steps updates, whatever its size
    steps = max(epochs * max(1, len(train_idx) // batch_size), min_steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    done = 0
    while done < steps:
        perm = torch.from_numpy(train_idx)[torch.randperm(len(train_idx), generator=gen)]
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            if done == steps:
                break
            idx = perm[i : i + batch_size]
            x = _images_to_tensor(images[np.sort(idx.numpy())])  # (B, C, H, W), read per batch
            idx = idx.sort().values
            logits = model(_perturb(_shift(x, rng), gen))
            loss = sum(F.cross_entropy(logits[a], y_all[a][idx]) for a in logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            done += 1
    val_idx = np.sort(val_idx)
    pred = model.predict(_images_to_tensor(images[val_idx]))
    accuracy = {
        a: float((pred[a] == y_all[a][torch.from_numpy(val_idx)]).float().mean()) for a in labels
    }
    model.eval()
    return TrainedClassifier(model, accuracy, dict(classes), key, heldout=len(val_idx))


def _cache_path(key: str) -> Path:
    digest = hashlib.sha256(f"v{CLASSIFIER_VERSION}|{key}".encode()).hexdigest()[:20]
    return cache_dir() / "classifiers" / f"{digest}.safetensors"


def save_classifier(clf: TrainedClassifier, path: Path) -> None:
    meta = {
        "key": clf.key,
        "accuracy": clf.accuracy,
        "classes": clf.classes,
        "channels": clf.model.channels,
        "version": CLASSIFIER_VERSION,
        "heldout": clf.heldout,
    }
    write_cached(clf.model, meta, path)


def load_classifier(path: Path) -> TrainedClassifier | None:
    """A cached classifier, or None when the file is missing or unreadable (it is retrained)."""
    cached = read_cached(path)
    if cached is None:
        return None
    state, meta = cached
    try:
        classes = meta["classes"]
        model = DomainClassifier(meta["channels"], {a: len(v) for a, v in classes.items()})
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError):
        return None
    model.eval()
    return TrainedClassifier(
        model, meta["accuracy"], classes, meta["key"], heldout=int(meta.get("heldout", 0))
    )


def cached_classifier(
    key: str,
    images: np.ndarray,
    labels: dict[str, np.ndarray],
    classes: dict[str, list[str]],
    seed: int = 0,
) -> TrainedClassifier:
    """The classifier for data set ``key`` from the cache, trained and stored first if absent.

    ``key`` must describe the data exactly (source, image size, channels, ...):
    two data sets with the same key share a classifier.
    """
    path = _cache_path(key)
    clf = load_classifier(path) if path.is_file() else None
    if clf is not None and clf.key == key:
        return clf
    clf = train_classifier(images, labels, classes, key=key, seed=seed)
    with contextlib.suppress(OSError):  # a read-only cache only costs retraining next time
        save_classifier(clf, path)
    return clf
