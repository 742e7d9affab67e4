"""Feature extractors: the fixed networks that image metrics look through.

FID (Heusel et al. 2017), KID and precision/recall compare two sets of images by
the features a fixed network gives them; the Inception Score (Salimans et al. 2016)
reads that network's class probabilities. The numbers mean something only for one
network with one set of weights, so every extractor carries a ``name`` naming both,
and every metric result records it: numbers from different extractors are never
compared by accident.

- ``inception_extractor``: Inception-v3 (Szegedy et al. 2016) as the original
  TensorFlow FID code ran it (the 2015-12-05 ImageNet graph, 1008 classes), in the
  layout of its PyTorch port (pytorch-fid, Seitzer 2020). With the published file
  ``pt_inception-2015-12-05-6726825d.pth`` it gives the standard 2048-d pool3
  features. The weights come from a file the user names, are checked against the
  published SHA-256 and are never downloaded.
- ``classifier_extractor``: our domain classifier (``aigc.metrics.classifier``),
  for data no ImageNet network suits (8×8 digits, the procedural shapes).

Both take images as (N, C, H, W) tensors (or arrays), either uint8 in [0, 255] or
floating point in [-1, 1] (the models' own range; values outside are clamped).
"""

from __future__ import annotations

import copy
import hashlib
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from aigc.errors import CheckpointError, ConfigError, DataError
from aigc.metrics.classifier import TrainedClassifier, _cache_path
from aigc.runs import file_sha256

# The published weights: the TF graph's variables, ported by pytorch-fid. torch.hub
# file names carry the first 8 hex digits of the file's SHA-256; the full digest is
# the one genforce (metrics/inception.py) and others pin for the same release file.
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILE
)
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_ENV = "AIGC_INCEPTION_WEIGHTS"  # where the CLI looks when --inception-weights is absent
INCEPTION_SIZE = 299  # the graph's input side, pixels
_GET_WEIGHTS = (
    f"download {INCEPTION_FILE} from {INCEPTION_URL} and pass its path with "
    f"--inception-weights PATH or ${INCEPTION_ENV}"
)


# ---------------------------------------------------------------------------------
# The extractor contract


@dataclass
class FeatureExtractor:
    """A fixed network that maps images to features and logits, with a stable name.

    ``network(images)`` takes a batch (B, C, H, W), uint8 in [0, 255] or float in
    [-1, 1], already on ``device``, and returns (features (B, D), logits (B, K)).
    """

    name: str  # identifies the network and its weights, e.g. "inception-v3-fid:6726825d"
    network: nn.Module
    feature_dim: int  # D
    num_logits: int  # K
    device: torch.device
    fid_protocol: str = ""  # the Inception extractor's preprocessing; "" for other networks

    def features(self, images: Tensor | np.ndarray, batch_size: int = 50) -> np.ndarray:
        """(N, C, H, W) images -> (N, D) float64 features."""
        return self.features_and_logits(images, batch_size)[0]

    def logits(self, images: Tensor | np.ndarray, batch_size: int = 50) -> np.ndarray:
        """(N, C, H, W) images -> (N, K) float64 logits."""
        return self.features_and_logits(images, batch_size)[1]

    def features_and_logits(
        self, images: Tensor | np.ndarray, batch_size: int = 50
    ) -> tuple[np.ndarray, np.ndarray]:
        """Both in one pass: (N, D) and (N, K) float64, computed ``batch_size`` images at a
        time in eval and inference mode; the result does not depend on ``batch_size``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        _check_images(images)
        feats: list[Tensor] = []
        logits: list[Tensor] = []
        was = {m: m.training for m in self.network.modules()}  # restored module by module
        self.network.eval()
        try:
            with torch.inference_mode():
                for i in range(0, len(images), batch_size):
                    x = images[i : i + batch_size]
                    if isinstance(x, np.ndarray):  # e.g. a memory-mapped file: read per batch
                        x = torch.from_numpy(np.ascontiguousarray(x))
                    f, k = self.network(x.to(self.device))
                    feats.append(f.float().cpu())
                    logits.append(k.float().cpu())
        finally:
            for m, training in was.items():
                m.training = training
        if not feats:
            return np.zeros((0, self.feature_dim)), np.zeros((0, self.num_logits))
        return torch.cat(feats).double().numpy(), torch.cat(logits).double().numpy()


def _check_images(images: Tensor | np.ndarray) -> None:
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[1] not in (1, 3):
        raise DataError(
            f"images must be (N, C, H, W) with C = 1 or 3, got shape {shape}; "
            "(N, H, W, C) uint8 arrays convert with aigc.data.images.to_tensor"
        )


def _check_dtype(x: Tensor) -> None:
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise DataError(f"images must be uint8 in [0, 255] or float in [-1, 1], got {x.dtype}")


def _to_unit_range(x: Tensor) -> Tensor:
    """uint8 in [0, 255] or float in [-1, 1] -> float32 in [0, 1]."""
    _check_dtype(x)
    if x.dtype == torch.uint8:
        return x.float() / 255.0  # as torchvision's ToTensor, which pytorch-fid reads with
    return (x.float().clamp(-1.0, 1.0) + 1.0) / 2.0


def _to_signed_range(x: Tensor) -> Tensor:
    """uint8 in [0, 255] or float in [-1, 1] -> float32 in [-1, 1] (aigc's model range)."""
    _check_dtype(x)
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0  # as aigc.data.images.to_tensor
    return x.float().clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------
# Inception-v3 as the TensorFlow FID graph has it (Szegedy et al. 2016, Fig. 5-7,
# and the 2015-12-05 graph). Module names are those of the pytorch-fid port, so its
# state dict loads key for key.


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, TF's) -> ReLU; keys ``conv.*``, ``bn.*``."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int | tuple[int, int], **kw) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, bias=False, **kw)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _pool_3x3(x: Tensor, kind: str) -> Tensor:
    """The 3×3 stride-1 pooling in front of a block's pool branch.

    TF's average pool divides by the pixels inside the image only
    (count_include_pad=False), unlike PyTorch's default; the FID graph's last block
    max-pools where the paper average-pools (both as in pytorch-fid's FID blocks).
    """
    if kind == "max":
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35×35 block: 1×1, 5×5, double 3×3 and pool branches -> 224 + pool_features channels."""

    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 64, 1)
        self.branch5x5_1 = ConvBN(c_in, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(c_in, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_pool_3x3(x, "avg"))
        return torch.cat([self.branch1x1(x), b5, b3, bp], 1)


class InceptionB(nn.Module):
    """35×35 -> 17×17 reduction: stride-2 3×3, double 3×3 and max pool -> 480 + c_in."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), b3, bp], 1)


class FIDInceptionC(nn.Module):
    """17×17 block with 7×7 convolutions factorised into 1×7 and 7×1 -> 768 channels."""

    def __init__(self, c_in: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(c_in, 192, 1)
        self.branch7x7_1 = ConvBN(c_in, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            b7d = conv(b7d)
        b7d = self.branch7x7dbl_5(b7d)
        bp = self.branch_pool(_pool_3x3(x, "avg"))
        return torch.cat([self.branch1x1(x), b7, b7d, bp], 1)


class InceptionD(nn.Module):
    """17×17 -> 8×8 reduction: 3×3 and 7×7-then-3×3 stride-2 branches, max pool -> 512 + c_in."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(c_in, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class FIDInceptionE(nn.Module):
    """8×8 block with 1×3 and 3×1 splits -> 2048 channels. ``pool`` is "avg" for Mixed_7b
    and "max" for Mixed_7c (pytorch-fid's FIDInceptionE_1 and FIDInceptionE_2)."""

    def __init__(self, c_in: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = ConvBN(c_in, 320, 1)
        self.branch3x3_1 = ConvBN(c_in, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        bp = self.branch_pool(_pool_3x3(x, self.pool))
        return torch.cat([self.branch1x1(x), b3, b3d, bp], 1)


# How images reach the graph. Published FIDs differ in it, and the difference is not
# small for small images, so every result and cached statistic names its protocol.
FID_PROTOCOLS = ("pytorch-fid", "tf")
DEFAULT_FID_PROTOCOL = "pytorch-fid"


def check_fid_protocol(protocol: str, where: str = "fid_protocol") -> str:
    """``protocol`` if it is one of FID_PROTOCOLS, else ConfigError naming them."""
    if protocol not in FID_PROTOCOLS:
        raise ConfigError(f"{where}={protocol!r}: choose from {', '.join(FID_PROTOCOLS)}")
    return protocol


def _tf1_bilinear_matrix(n_in: int, n_out: int) -> Tensor:
    """(n_out, n_in) weights of TensorFlow 1's ``resize_bilinear`` (align_corners=False,
    no half-pixel centres): output pixel d reads source position d * n_in / n_out, and
    the neighbour past the last pixel is the last pixel. Positions are computed in
    float32, as TensorFlow computes them (it matters at 1e-5 for ~300-pixel sides)."""
    scale = torch.tensor(n_in, dtype=torch.float32) / n_out
    src = torch.arange(n_out, dtype=torch.float32) * scale
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = (src - src.floor()).double()
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m.index_put_((torch.arange(n_out), lo), 1.0 - frac, accumulate=True)
    m.index_put_((torch.arange(n_out), hi), frac, accumulate=True)
    return m


def _resize_bilinear_tf1(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, C, H, W) float -> (N, C, size) resized as TensorFlow 1 does (see
    _tf1_bilinear_matrix); separable, one matrix product per axis."""
    rows = _tf1_bilinear_matrix(x.shape[2], size[0]).to(x)
    cols = _tf1_bilinear_matrix(x.shape[3], size[1]).to(x)
    return torch.matmul(torch.matmul(rows, x), cols.T)


def fid_preprocess(images: Tensor, protocol: str = DEFAULT_FID_PROTOCOL) -> Tensor:
    """What the FID graph is fed: (N, C, H, W) uint8 in [0, 255] or float in [-1, 1],
    C = 1 or 3 -> (N, 3, 299, 299) float32 in [-1, 1]. Grey images are repeated to
    three channels.

    - ``"pytorch-fid"`` (pytorch-fid 0.3): pixels to [0, 1], PyTorch's bilinear resize
      with half-pixel centres (align_corners=False), then 2x - 1.
    - ``"tf"`` (the original TTUR code on TensorFlow 1, and torch-fidelity): TF 1's
      bilinear resize (no half-pixel centres) of the 0..255 values, then (x - 128) / 128.
    """
    _check_images(images)
    check_fid_protocol(protocol)
    size = (INCEPTION_SIZE, INCEPTION_SIZE)
    if protocol == "tf":
        _check_dtype(images)
        if images.dtype == torch.uint8:
            x = images.float()  # 0..255 exactly, as torch-fidelity feeds its graph
        else:
            x = (images.float().clamp(-1.0, 1.0) + 1.0) * 127.5
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[2:] != size:
            x = _resize_bilinear_tf1(x, size)
        return (x - 128.0) / 128.0
    x = _to_unit_range(images)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return 2.0 * x - 1.0


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the TF FID graph: 94 conv+BN layers, pool3 (2048) and a 1008-way fc.

    ``forward(images)`` -> (pool3 features (B, 2048), logits (B, 1008)). The logits
    are pool3 @ fc.weight.T without the bias, as the reference Inception Score code
    reads them (openai/improved-gan, inception_score/model.py; torch-fidelity's
    "logits_unbiased"), so that our IS compares with published values;
    ``self.fc(pool3)`` gives the biased ones.
    """

    feature_dim = 2048
    num_classes = 1008  # the 2015 graph's outputs: 1000 ImageNet classes and 8 unused

    def __init__(self, protocol: str = DEFAULT_FID_PROTOCOL) -> None:
        super().__init__()
        self.protocol = check_fid_protocol(protocol)  # how forward() preprocesses
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(self.feature_dim, self.num_classes)

    def pool3(self, x: Tensor) -> Tensor:
        """x (B, 3, 299, 299) in [-1, 1] (see fid_preprocess) -> (B, 2048) pool3 features."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7a(x)  # (B, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (B, 2048, 8, 8)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 2048)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        f = self.pool3(fid_preprocess(images, self.protocol))
        return f, f @ self.fc.weight.T


# ---------------------------------------------------------------------------------
# Reading the weights: a local file, checked, never unpickled beyond tensors


def inception_weights_path(path: str | Path | None = None) -> Path:
    """The weights file: ``path`` if given, else ``$AIGC_INCEPTION_WEIGHTS``."""
    path = path or os.environ.get(INCEPTION_ENV)
    if not path:
        raise CheckpointError(f"no Inception weights given: {_GET_WEIGHTS}")
    return Path(path).expanduser()


def tensors_sha256(state: dict[str, Tensor]) -> str:
    """Hex SHA-256 of a state dict's names, dtypes, shapes and values (BatchNorm's
    step counters left out): equal for the same weights in any file format."""
    h = hashlib.sha256()
    for k in sorted(state):
        if k.endswith("num_batches_tracked"):
            continue
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_pth(path: Path) -> dict[str, Tensor]:
    try:
        # weights_only: tensors and plain containers only; any other object is refused
        # before it is built, so a file cannot run code when it is read
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message also explains how to load the file unsafely: keep only the why
        why = re.search(r"Unsupported [^.\n]*", str(e))
        raise CheckpointError(
            f"{path} holds Python objects besides tensors (or is not a PyTorch file) and "
            f"was not unpickled ({why.group(0) if why else 'refused by weights_only'}); "
            f"{_GET_WEIGHTS}"
        ) from e
    except Exception as e:  # a truncated or foreign file fails in many ways
        raise CheckpointError(
            f"{path} is not a readable PyTorch weights file ({e}); {_GET_WEIGHTS}"
        ) from e
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            f"{path} is not a state dict (a flat mapping of names to tensors); {_GET_WEIGHTS}"
        )
    return dict(state)


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - no iterator
            return state, f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from e


def _check_keys(state: dict[str, Tensor], model: nn.Module, path: Path) -> dict[str, Tensor]:
    """``state`` made to match ``model`` key for key, or a CheckpointError naming the
    difference. BatchNorm step counters may be absent (they do not change eval outputs)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            problems.append(f"{what}: {', '.join(keys[:3])}{more}")
    if problems:
        raise CheckpointError(
            f"{path} is not the FID Inception-v3 state dict ({'; '.join(problems)}); {_GET_WEIGHTS}"
        )
    full = dict(state)
    for k, v in expected.items():
        if k not in full:  # an absent step counter
            full[k] = torch.zeros(v.shape, dtype=v.dtype)
    return full


def load_fid_inception(path: str | Path, verify: bool = True) -> tuple[FIDInceptionV3, str]:
    """FIDInceptionV3 with the weights of a local ``.pth`` or ``.safetensors`` file, in
    eval mode on CPU, and the SHA-256 that identifies those weights.

    A ``.pth`` is identified by its bytes' SHA-256. A ``.safetensors`` made by
    ``inception_weights_to_safetensors`` carries the SHA-256 of the ``.pth`` it came
    from, trusted when its tensors still match the digest recorded beside it; any
    other ``.safetensors`` is identified by its own bytes. With ``verify`` (the
    default) anything but the published file is refused; ``verify=False`` is for tests.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"Inception weights file not found: {path}; {_GET_WEIGHTS}")
    sha = file_sha256(path)
    if path.suffix == ".safetensors":
        state, meta = _read_safetensors(path)
        source = meta.get("source_sha256")
        if source and meta.get("tensors_sha256") == tensors_sha256(state):
            sha = source
    else:
        if verify and sha != INCEPTION_SHA256:  # checked before anything is unpickled
            _refuse(path, sha)
        state = _read_pth(path)
    if verify and sha != INCEPTION_SHA256:
        _refuse(path, sha)
    with torch.device("meta"):  # no random init of 24M weights about to be replaced
        model = FIDInceptionV3()
    model.load_state_dict(_check_keys(state, model, path), assign=True)
    model.eval().requires_grad_(False)
    return model, sha


def _refuse(path: Path, sha: str) -> None:
    raise CheckpointError(
        f"{path} is not the published FID Inception weights: SHA-256 {sha}, expected "
        f"{INCEPTION_SHA256}; {_GET_WEIGHTS}. Other weights give FID and IS values that "
        "cannot be compared with published ones."
    )


def inception_weights_to_safetensors(src: str | Path, dst: str | Path, verify: bool = True) -> Path:
    """Writes the ``.pth`` weights at ``src`` as ``dst`` (.safetensors), recording the
    ``.pth``'s SHA-256 and a digest of the tensors, so ``dst`` verifies as the same weights."""
    model, sha = load_fid_inception(src, verify=verify)
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = {"source_sha256": sha, "tensors_sha256": tensors_sha256(state)}
    dst = Path(dst)
    save_file(state, str(dst), metadata=meta)
    return dst


def inception_extractor(
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    verify: bool = True,
    protocol: str = DEFAULT_FID_PROTOCOL,
) -> FeatureExtractor:
    """The standard FID extractor: pool3 (N, 2048) and unbiased logits (N, 1008).

    ``path`` is the weights file (``None``: ``$AIGC_INCEPTION_WEIGHTS``); see
    ``load_fid_inception`` for what is accepted. ``protocol`` is how images are resized
    and scaled on the way in (``fid_preprocess``: "pytorch-fid" or "tf"). The name is
    ``"inception-v3-fid:<first 8 hex digits of the weights' SHA-256>"``, i.e.
    ``"inception-v3-fid:6726825d"`` for the published file under the pytorch-fid
    protocol, with ``"+tf"`` appended under the tf protocol, so statistics cached under
    one protocol are never read for the other.
    """
    check_fid_protocol(protocol)
    device = torch.device(device)
    model, sha = load_fid_inception(inception_weights_path(path), verify=verify)
    model.protocol = protocol
    suffix = "" if protocol == DEFAULT_FID_PROTOCOL else f"+{protocol}"
    return FeatureExtractor(
        name=f"inception-v3-fid:{sha[:8]}{suffix}",
        network=model.to(device),
        feature_dim=FIDInceptionV3.feature_dim,
        num_logits=FIDInceptionV3.num_classes,
        device=device,
        fid_protocol=protocol,
    )


# ---------------------------------------------------------------------------------
# The domain classifier as an extractor


class _ClassifierFeatures(nn.Module):
    """A DomainClassifier seen through the contract: penultimate features and the logits
    of its first attribute's head."""

    def __init__(self, model: nn.Module, attribute: str) -> None:
        super().__init__()
        self.model = model
        self.attribute = attribute

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if images.shape[1] != self.model.channels:
            raise DataError(
                f"the domain classifier was trained on {self.model.channels}-channel images, "
                f"got {images.shape[1]} channels"
            )
        x = _to_signed_range(images)  # (B, C, H, W), the range it was trained on
        f = self.model.features(x)  # (B, feature_dim)
        return f, self.model.heads[self.attribute](f)


def classifier_extractor(
    classifier: TrainedClassifier, device: str | torch.device | None = None
) -> FeatureExtractor:
    """A trained domain classifier (``aigc.metrics.classifier.TrainedClassifier``) as an
    extractor: penultimate features (N, 4·width) and the first attribute's logits.

    The name is ``"domain-classifier:<12 hex digits>"``: the prefix of the cache file's
    digest of the classifier's key (data set and settings), or, for a classifier with no
    key, of its weights. ``device`` (default: where the model is) gets a copy of the
    model, so the classifier itself stays where it is.
    """
    model = classifier.model
    here = next(model.parameters()).device
    device = torch.device(device) if device is not None else here
    if device != here:
        model = copy.deepcopy(model).to(device)
    if classifier.key:
        ident = _cache_path(classifier.key).stem[:12]
    else:
        ident = tensors_sha256(dict(model.state_dict()))[:12]
    attribute = next(iter(model.heads))
    return FeatureExtractor(
        name=f"domain-classifier:{ident}",
        network=_ClassifierFeatures(model, attribute),
        feature_dim=model.feature_dim,
        num_logits=model.num_classes[attribute],
        device=device,
    )
