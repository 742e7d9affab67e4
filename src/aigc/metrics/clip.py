"""A CLIP-style judge for captioned images without attribute labels.

Where a text-to-image run's images carry captions but no labels (an image folder with
a metadata.jsonl), no domain classifier can say whether an image shows its caption. A
small dual encoder can (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision"): a conv image encoder and a byte-level text encoder, each
projected to a shared space, trained with the symmetric InfoNCE loss and a learned
temperature on the run's training image-caption pairs. Like the domain classifier it
is trained once per data set and cached as safetensors (the settings as JSON in the
file's metadata) under the cache folder.

Two numbers judge generated images against the captions they were made from:

- **CLIP score** (Hessel et al. 2021, "CLIPScore"): 100 · max(cos(image, caption), 0),
  averaged. Hessel et al. scale by w = 2.5; 100 is torchmetrics' and most papers' scale.
- **Caption retrieval**: among 32 candidate captions (the image's own and 31 others of
  the validation set, 32 different texts), the share of images whose own caption
  is the nearest. Chance is 1/32 when the captions are varied enough to fill 31 distinct
  others; ``retrieval_chance`` says what it is for the candidates drawn.

Both are only as good as the judge, so they are reported beside the same numbers on
the real validation images: the ceiling a perfect generator would reach.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from aigc.metrics.classifier import _images_to_tensor, _shift, cache_dir, read_cached, write_cached

CLIP_VERSION = 1  # part of the cache key: bump when training or architecture change
RETRIEVAL_CANDIDATES = 32  # captions an image is matched against (its own among them)
MAX_LOGIT_SCALE = math.log(100.0)  # Radford et al.: the temperature is clipped at 100
CLIP_STEPS = 400  # updates of the cached judge: a few hundred suffice for small images


@dataclass
class ClipConfig:
    """The dual encoder's sizes; saved with the weights."""

    channels: int = 3  # image channels
    width: int = 16  # image trunk width (stages of width, 2·width, 4·width)
    text_width: int = 64  # byte embedding and text conv width
    text_layers: int = 3  # residual 1-D conv blocks over the bytes
    embed_dim: int = 64  # the shared space
    max_bytes: int = 96  # captions are cut to this many UTF-8 bytes


def caption_bytes(captions: list[str], max_bytes: int) -> Tensor:
    """Captions as (N, L) int64 byte ids: UTF-8 byte + 1, 0 padding, L <= max_bytes."""
    rows = [list(c.encode("utf-8")[:max_bytes]) for c in captions]
    out = torch.zeros(len(rows), max(1, max((len(r) for r in rows), default=1)), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long) + 1
    return out


class ImageEncoder(nn.Module):
    """Conv trunk (three stride-2 stages, as the domain classifier's), global average
    pooling and a linear projection: (B, C, H, W) in [-1, 1] -> (B, embed_dim)."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, stride=2, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            )

        w = cfg.width
        self.trunk = nn.Sequential(stage(cfg.channels, w), stage(w, 2 * w), stage(2 * w, 4 * w))
        self.proj = nn.Linear(4 * w, cfg.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.trunk(x).mean(dim=(2, 3)))


class TextEncoder(nn.Module):
    """Byte embeddings, residual 1-D convolutions (kernel 5: each layer widens the view
    by four bytes, enough to read words and "top left"), max pooling over the caption's
    bytes and a linear projection: (B, L) byte ids -> (B, embed_dim)."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        w = cfg.text_width
        self.embed = nn.Embedding(257, w, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(cfg.max_bytes, w))
        self.convs = nn.ModuleList(nn.Conv1d(w, w, 5, padding=2) for _ in range(cfg.text_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(w) for _ in range(cfg.text_layers))
        self.proj = nn.Linear(w, cfg.embed_dim)

    def forward(self, ids: Tensor) -> Tensor:
        mask = (ids > 0).unsqueeze(-1)  # (B, L, 1)
        h = self.embed(ids) + self.pos[: ids.size(1)]  # (B, L, w)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            h = h + F.gelu(conv(norm(h).transpose(1, 2)).transpose(1, 2)) * mask
        h = h.masked_fill(~mask, float("-inf")).amax(dim=1)  # (B, w)
        return self.proj(torch.nan_to_num(h, neginf=0.0))  # an empty caption: zeros


class DualEncoder(nn.Module):
    """Image and text encoders into one space, and the learned temperature
    (logit_scale = log(1/T), Radford et al.: initialised at T = 0.07)."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.image = ImageEncoder(cfg)
        self.text = TextEncoder(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, x: Tensor) -> Tensor:
        return F.normalize(self.image(x), dim=-1)

    def encode_text(self, ids: Tensor) -> Tensor:
        return F.normalize(self.text(ids), dim=-1)

    @torch.no_grad()
    def image_features(self, x: Tensor, batch_size: int = 500) -> Tensor:
        """Unit image embeddings (B, embed_dim) of x (B, C, H, W) in [-1, 1]; eval mode."""
        return self._batched(self.encode_image, x, batch_size)

    @torch.no_grad()
    def text_features(self, captions: list[str], batch_size: int = 500) -> Tensor:
        """Unit caption embeddings (N, embed_dim)."""
        return self._batched(self.encode_text, caption_bytes(captions, self.cfg.max_bytes),
                             batch_size)  # fmt: skip

    def _batched(self, fn, x: Tensor, batch_size: int) -> Tensor:
        was = self.training
        self.eval()
        device = self.logit_scale.device
        out = [fn(x[i : i + batch_size].to(device)).float().cpu()
               for i in range(0, len(x), batch_size)]  # fmt: skip
        self.train(was)
        return torch.cat(out) if out else torch.zeros(0, self.cfg.embed_dim)


def clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, same: Tensor) -> Tensor:
    """Symmetric InfoNCE (Radford et al. 2021, Figure 3) over a batch of unit embeddings
    (B, D). ``same`` (B, B) bool marks pairs with identical captions: they share the
    target probability rather than count as negatives of each other (a data set such as
    digits has ten captions for all its images)."""
    logits = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp() * image_emb @ text_emb.T  # (B, B)
    target = same.float() / same.float().sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@dataclass
class TrainedClip:
    model: DualEncoder
    key: str  # what it was trained on (data set and settings)


def train_clip(
    images: np.ndarray,
    captions: list[str],
    key: str = "",
    steps: int = CLIP_STEPS,
    batch_size: int = 128,
    seed: int = 0,
    cfg: ClipConfig | None = None,
) -> TrainedClip:
    """Trains a DualEncoder on (N, H, W, C) uint8 images and their N captions for
    ``steps`` updates of ``batch_size`` pairs. Deterministic for a seed."""
    if len(images) != len(captions) or len(images) < 2:
        raise ValueError(f"{len(images)} images and {len(captions)} captions: need >= 2 pairs")
    cfg = cfg or ClipConfig(channels=int(images.shape[-1]))
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DualEncoder(cfg)
    ids = caption_bytes(list(captions), cfg.max_bytes)  # (N, L)
    _, caption_class = np.unique(
        np.asarray(captions, dtype=object).astype(str), return_inverse=True
    )
    caption_class = torch.from_numpy(caption_class.reshape(-1))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    batch_size = max(2, min(batch_size, len(images)))
    model.train()
    done = 0
    while done < steps:
        perm = torch.randperm(len(images), generator=gen)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            if done == steps:
                break
            idx = perm[i : i + batch_size].sort().values
            x = _shift(_images_to_tensor(images[idx.numpy()]), rng)  # (B, C, H, W)
            c = caption_class[idx]
            loss = clip_loss(model.encode_image(x), model.encode_text(ids[idx]),
                             model.logit_scale, c[:, None] == c[None, :])  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            done += 1
    model.eval()
    return TrainedClip(model, key)


def _cache_path(key: str) -> Path:
    digest = hashlib.sha256(f"clip-v{CLIP_VERSION}|{key}".encode()).hexdigest()[:20]
    return cache_dir() / "clip" / f"{digest}.safetensors"


def save_clip(judge: TrainedClip, path: Path) -> None:
    meta = {"key": judge.key, "version": CLIP_VERSION, "config": asdict(judge.model.cfg)}
    write_cached(judge.model, meta, path)


def load_clip(path: Path) -> TrainedClip | None:
    """A cached judge, or None when the file is missing or unreadable (it is retrained)."""
    cached = read_cached(path)
    if cached is None:
        return None
    state, meta = cached
    try:
        model = DualEncoder(ClipConfig(**meta["config"]))
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError):
        return None
    model.eval()
    return TrainedClip(model, meta["key"])


def cached_clip(
    key: str, images: np.ndarray, captions: list[str], seed: int = 0, steps: int | None = None
) -> TrainedClip:
    """The judge for data set ``key`` from the cache, trained (``steps`` updates, default
    CLIP_STEPS) and stored first if absent. ``key`` must describe the data exactly (its
    sha256, the training split's size); the seed and steps join it."""
    steps = CLIP_STEPS if steps is None else steps
    key = f"{key}|seed={seed}|steps={steps}"
    path = _cache_path(key)
    judge = load_clip(path) if path.is_file() else None
    if judge is not None and judge.key == key:
        return judge
    judge = train_clip(images, captions, key=key, seed=seed, steps=steps)
    with contextlib.suppress(OSError):  # a read-only cache only costs retraining next time
        save_clip(judge, path)
    return judge


# ---------------------------------------------------------------------------
# Metrics on embeddings


def clip_score(image_emb: Tensor, text_emb: Tensor) -> float:
    """Mean of 100 · max(cos(image_i, text_i), 0) over paired rows (N, D) (Hessel et
    al. 2021, with torchmetrics' scale 100 in place of w = 2.5)."""
    cos = F.cosine_similarity(image_emb.double(), text_emb.double(), dim=-1)
    return float(100.0 * cos.clamp(min=0.0).mean()) if len(cos) else 0.0


def retrieval_candidates(
    own: np.ndarray, pool: list[str], k: int = RETRIEVAL_CANDIDATES, seed: int = 0
) -> np.ndarray:
    """(n, k) indices into ``pool`` (the validation captions): column 0 is each query's
    own caption ``own`` (n,), the other k - 1 are distinct texts of the pool other than
    it (one index each), so that no candidate ties with the right answer by being the
    same words. A pool with fewer than k - 1 other texts gives every one of them."""
    rng = np.random.default_rng(seed)
    text = np.asarray(pool, dtype=object).astype(str)
    unique, first = np.unique(text, return_index=True)
    out = np.empty((len(own), k), dtype=np.int64)
    for i, j in enumerate(np.asarray(own, dtype=np.int64)):
        others = first[unique != text[j]]
        if len(others) == 0:
            raise ValueError("every validation caption is the same: nothing to retrieve among")
        out[i, 0] = j
        if len(others) >= k - 1:
            out[i, 1:] = rng.choice(others, k - 1, replace=False)
        else:  # every other text, repeated to fill the row: a (1 + len(others))-way choice
            out[i, 1:] = np.resize(rng.permutation(others), k - 1)
    return out


def retrieval_accuracy(image_emb: Tensor, pool_emb: Tensor, candidates: np.ndarray) -> float:
    """Share of images (n, D) whose own caption (column 0 of candidates (n, k), rows of
    pool_emb (m, D)) is strictly more similar to them than every other candidate."""
    if len(candidates) == 0:
        return 0.0
    cand = pool_emb.double()[torch.from_numpy(candidates)]  # (n, k, D)
    sim = torch.einsum("nd,nkd->nk", F.normalize(image_emb.double(), dim=-1),
                       F.normalize(cand, dim=-1))  # fmt: skip
    return float((sim[:, 0] > sim[:, 1:].amax(dim=1)).double().mean())


def retrieval_chance(candidates: np.ndarray, pool: list[str]) -> float:
    """What guessing scores on these candidates: mean over rows of 1 / (distinct captions)."""
    text = np.asarray(pool, dtype=object).astype(str)
    return (
        float(np.mean([1.0 / len(set(text[row])) for row in candidates]))
        if len(candidates)
        else 0.0
    )
