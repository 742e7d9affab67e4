"""A keyed green-list watermark for generated text, and its detector.

The scheme of Kirchenbauer et al., "A Watermark for Large Language Models" (ICML 2023):
at each step a keyed hash of the previous ``context`` tokens splits the vocabulary, a
fraction ``gamma`` of it is "green" and gets ``+delta`` on its logits before sampling.
Text written without the key has green tokens at rate ``gamma``; watermarked text has
more, and the one-proportion z-test

    z = (G - gamma T) / sqrt(T gamma (1 - gamma))

over T scored tokens with G green tells them apart. Their recommended settings are the
defaults here: gamma 0.25, delta 2.0, a context of 4 tokens, threshold z = 4.

Our hash includes the candidate token itself (the "self-hash" of their follow-up paper,
Kirchenbauer et al. 2023b): token t after context c is green when
H(key, c, t) < gamma, with H a keyed 64-bit mix (splitmix64's finaliser). Each
(context, token) pair is then green with probability gamma independently of the others,
whatever the text, and the detector scores each distinct (context + token) n-gram once,
so that text repeating itself cannot inflate z.

Tokens enter the hash by their text (a character, or a BPE token's bytes), not by their
id: a character-level run's watermark is detected from the text alone, by characters,
without the run; a BPE run's needs its tokenizer to split the text the same way.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from aigc.errors import RequestError

_M64 = (1 << 64) - 1


def _signed(c: int) -> int:
    """An unsigned 64-bit constant as the int64 torch holds it (same bits)."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MUL1, _MUL2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9,
                                               0x94D049BB133111EB))  # fmt: skip


def _shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: Tensor) -> Tensor:
    """splitmix64 (Steele et al. 2014) on int64 tensors: a bijective 64-bit hash.

    int64 products wrap modulo 2**64, so the bits equal the unsigned computation
    (tested against plain Python integers)."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MUL1
    x = (x ^ _shr(x, 27)) * _MUL2
    return x ^ _shr(x, 31)


def _digest64(data: bytes) -> int:
    return _signed(int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little"))


@dataclass(frozen=True)
class Watermark:
    """A watermark's key and settings. The key is any non-empty string (keep it secret:
    whoever has it can detect, and also forge or scrub, the mark)."""

    key: str
    gamma: float = 0.25  # share of the vocabulary that is green at each step
    delta: float = 2.0  # added to the green tokens' logits
    context: int = 4  # tokens hashed with the candidate (h)
    seed: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key.strip():
            raise RequestError("the watermark key must be a non-empty string")
        if not (isinstance(self.gamma, int | float) and 0 < self.gamma < 1):
            raise RequestError(f"watermark gamma={self.gamma!r} must be in (0, 1)")
        if not (isinstance(self.delta, int | float) and math.isfinite(self.delta)
                and self.delta >= 0):  # fmt: skip
            raise RequestError(f"watermark delta={self.delta!r} must be a number >= 0")
        if (
            isinstance(self.context, bool)
            or not isinstance(self.context, int)
            or not (1 <= self.context <= 64)
        ):
            raise RequestError(f"watermark context={self.context!r} must be an integer in [1, 64]")
        seed = _digest64(b"aigc-text-watermark-v1\0" + self.key.encode())
        object.__setattr__(self, "seed", seed)

    @property
    def threshold(self) -> int:
        """A hash below this (in [0, 2**53)) is green."""
        return int(self.gamma * (1 << 53))


def as_watermark(value: Any) -> Watermark | None:
    """A Watermark from a key string, a Watermark, a dict of its fields, or None."""
    if value is None or isinstance(value, Watermark):
        return value
    if isinstance(value, str):
        return Watermark(value)
    if isinstance(value, dict):
        unknown = set(value) - {"key", "gamma", "delta", "context"}
        if unknown or "key" not in value:
            raise RequestError(
                f"a watermark is a key string or {{key, gamma, delta, context}}; got {value!r}"
            )
        return Watermark(**value)
    raise RequestError(f"watermark must be a key string, got {type(value).__name__}")


def token_texts(tokenizer: Any) -> list[bytes]:
    """Each token id's text as bytes: what the watermark hashes."""
    if hasattr(tokenizer, "token_bytes"):  # byte-level BPE
        table = tokenizer.token_bytes()
        specials = {i: t for t, i in tokenizer.hf.get_vocab(with_added_tokens=True).items()}
        return [b if b else b"\xff" + specials.get(i, str(i)).encode() for i, b in
                enumerate(table)]  # fmt: skip
    chars = list(tokenizer.chars) + [b for b in getattr(tokenizer, "specials", [])]
    return [c.encode() if len(c) == 1 else b"\xff" + c.encode() for c in chars]


def hash_texts(texts: Sequence[bytes], watermark: Watermark) -> Tensor:
    """(n,) int64: each token text mixed with the key."""
    raw = torch.tensor([_digest64(t) for t in texts], dtype=torch.int64)
    return mix64(raw ^ watermark.seed)


class TokenHashes:
    """A vocabulary's keyed token hashes, computed once per (tokenizer, key)."""

    def __init__(self, tokenizer: Any, watermark: Watermark, device: torch.device | str = "cpu"):
        self.watermark = watermark
        self.table = hash_texts(token_texts(tokenizer), watermark).to(device)  # (V,)


def context_hash(ctx: Tensor, watermark: Watermark) -> Tensor:
    """(..., h) keyed token hashes -> (...,) one hash of the context."""
    h = torch.full(ctx.shape[:-1], watermark.seed, dtype=torch.int64, device=ctx.device)
    for i in range(ctx.shape[-1]):
        h = mix64(h ^ ctx[..., i])
    return h


def is_green(ctx_hash: Tensor, token_hash: Tensor, watermark: Watermark) -> Tensor:
    """Green or not, broadcasting ctx_hash against token_hash."""
    return _shr(mix64(ctx_hash ^ token_hash), 11) < watermark.threshold


def green_mask(ctx: Tensor, hashes: TokenHashes) -> Tensor:
    """(B, h) keyed hashes of each row's last h tokens -> (B, V) green mask."""
    wm = hashes.watermark
    return is_green(context_hash(ctx, wm)[:, None], hashes.table[None, :], wm)


def bias_logits(logits: Tensor, ctx: Tensor, hashes: TokenHashes) -> Tensor:
    """Adds delta to each row's green tokens (a new tensor)."""
    mask = green_mask(ctx, hashes)
    return logits + mask.to(logits.dtype) * hashes.watermark.delta


# ---------------------------------------------------------------------------
# detection


@dataclass
class WatermarkScore:
    """The detector's verdict on one text."""

    z: float  # the one-proportion z statistic
    p_value: float  # one-sided, under "not watermarked with this key"
    green: int  # green tokens among the scored ones
    scored: int  # distinct (context + token) n-grams scored
    tokens: int  # tokens in the text
    gamma: float
    threshold: float  # z at or above it says "watermarked"
    token_marks: list[tuple[str, bool | None]]  # each token and green/red (None: unscored)

    @property
    def green_fraction(self) -> float:
        return self.green / self.scored

    @property
    def watermarked(self) -> bool:
        return self.z >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {"watermarked": self.watermarked, "z": self.z, "p_value": self.p_value,
                "green_fraction": self.green_fraction, "green": self.green,
                "scored": self.scored, "tokens": self.tokens, "gamma": self.gamma,
                "threshold": self.threshold}  # fmt: skip


def z_score(green: int, scored: int, gamma: float) -> float:
    """(G - gamma T) / sqrt(T gamma (1 - gamma))."""
    return (green - gamma * scored) / math.sqrt(scored * gamma * (1 - gamma))


def p_value(z: float) -> float:
    """One-sided upper tail of the standard normal."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def z_for_fpr(fpr: float) -> float:
    """The z threshold whose one-sided false-positive rate is ``fpr`` (normal tail)."""
    lo, hi = -10.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(mid) > fpr else (lo, mid)
    return hi


MIN_SCORED = 16  # fewer distinct n-grams than this: no verdict


def score_hashes(
    hashes: Tensor, watermark: Watermark, threshold: float = 4.0, min_scored: int = MIN_SCORED
) -> tuple[WatermarkScore, list[bool | None]]:
    """Scores a text given as its tokens' keyed hashes (n,)."""
    h, n = watermark.context, len(hashes)
    marks: list[bool | None] = [None] * n
    if n > h:
        windows = hashes.unfold(0, h + 1, 1)  # (n - h, h + 1)
        green = is_green(context_hash(windows[:, :h], watermark), windows[:, h], watermark)
        seen: set[tuple[int, ...]] = set()
        for i, (row, g) in enumerate(zip(windows.tolist(), green.tolist(), strict=True)):
            gram = tuple(row)
            if gram not in seen:  # each distinct n-gram counts once
                seen.add(gram)
                marks[i + h] = bool(g)
    scored = sum(m is not None for m in marks)
    if scored < min_scored:
        raise RequestError(
            f"too short for a verdict: {scored} distinct scored tokens (after the first "
            f"{h}, each {h + 1}-gram once), need at least {min_scored}"
        )
    g = sum(m is True for m in marks)
    z = z_score(g, scored, watermark.gamma)
    score = WatermarkScore(z, p_value(z), g, scored, n, watermark.gamma, threshold, [])
    return score, marks


def detect_text(
    text: str,
    key: str | Watermark,
    run: Any = None,
    threshold: float = 4.0,
    min_scored: int = MIN_SCORED,
) -> WatermarkScore:
    """Is ``text`` watermarked with ``key``? Tokens are the run's (a run folder or a
    loaded text pipeline) or, without one, characters (right for character-level runs).

    Raises RequestError for an empty text or one too short for a verdict."""
    wm = as_watermark(key)
    if not isinstance(text, str) or not text:
        raise RequestError("the text to check is empty")
    if run is None:
        pieces = [c.encode() for c in text]
        hashes = hash_texts(pieces, wm)
        shown = list(text)
    else:
        tokenizer = _tokenizer_of(run)
        from aigc.data.tokenizers import encode_replacing

        ids, _ = encode_replacing(tokenizer, text)
        table = hash_texts(token_texts(tokenizer), wm)
        hashes = table[torch.as_tensor(ids, dtype=torch.long)]
        shown = [tokenizer.decode([int(i)]) for i in ids]
    score, marks = score_hashes(hashes, wm, threshold, min_scored)
    score.token_marks = list(zip(shown, marks, strict=True))
    return score


def _tokenizer_of(run: Any) -> Any:
    if hasattr(run, "tokenizer"):
        return run.tokenizer
    from aigc.data.tokenizers import load_tokenizer
    from aigc.runs import RunDir

    run = RunDir(run)
    if not run.tokenizer_path.is_file():
        raise RequestError(f"{run.path} has no tokenizer.json: is it a text run?")
    return load_tokenizer(run.tokenizer_path)
