"""GPT's KV cache and the cached forward that decodes with it.

`make_kv_cache` preallocates keys and values for every layer, one slot per row, and
`forward_cached` feeds new tokens through it (GPT.make_kv_cache and
GPT.forward_cached call these). Each slot has its own length, so rows at different
points of their text decode in one batch, and rows join and leave without copying
the others; prompts of different lengths are right-padded, which causal attention
already keeps away from real tokens.

`forward_cached` is GPT.forward's mathematics written with torch.nn.functional over
weights fetched once per model (`cached_weights`), because module dispatch would
double the CPU decode step (see _BlockWeights); on CPU in float32 the larger products
go through oneDNN (see _Linear). tests/test_gpt.py holds the two paths equal to 1e-5.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from aigc.models.gpt import GPT

# oneDNN takes a product of 2 rows or more with a weight of at least ONEDNN_MIN_WEIGHT
# entries, or of at least ONEDNN_MIN_MACS multiply-adds (rows x in x out) whatever its
# weight: crossovers measured with benchmarks/gpt_sample.py (see _Linear)
ONEDNN_MIN_WEIGHT = 1 << 17
ONEDNN_MIN_MACS = 1 << 20
_onednn = {"on": os.environ.get("AIGC_ONEDNN", "1") != "0"}  # off after a failure, too


class _Linear:
    """A Linear's weight and bias as the cached path applies them.

    On CPU in float32, a product of several rows goes through oneDNN (PyTorch's mkldnn
    backend, as torch.compile's CPU code uses it) with the weight packed once into
    oneDNN's blocked layout, when the weight or the product is large enough (the
    constants above); smaller ones, one row's above all, stay on torch's default path
    (MKL), whose call is cheaper. Why: MKL multiplies a few rows in about the time of
    as many single rows, so batched decoding would hardly beat one row at a time
    (`python benchmarks/gpt_sample.py` prints the batch with oneDNN and with "torch's
    matmul"). The packed copy is
    redone when the weight changes (its version or storage), so training between
    samples is seen. AIGC_ONEDNN=0 keeps every product on torch's default path.
    """

    __slots__ = ("_big", "_key", "_out", "_packed", "bias", "weight")

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        self.weight, self.bias = weight, bias
        self._out = weight.shape[0]  # x.numel() * _out = rows * in * out multiply-adds
        self._big = weight.numel() >= ONEDNN_MIN_WEIGHT
        self._packed: Tensor | None = None
        self._key: tuple[int, int] | None = None  # (storage, version) the copy was made from

    def __call__(self, x: Tensor) -> Tensor:
        w = self.weight
        if (
            x.numel() > x.shape[-1]  # more than one row
            and (self._big or x.numel() * self._out >= ONEDNN_MIN_MACS)
            and w.dtype == torch.float32
            and w.device.type == "cpu"
            and _onednn["on"]
        ):
            # weights made in inference mode track no version: their storage must do
            key = (w.data_ptr(), -1 if w.is_inference() else w._version)
            try:
                if key != self._key:
                    self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
                    self._key = key
                return torch.ops.mkldnn._linear_pointwise(
                    x, self._packed, self.bias, "none", [], ""
                )
            except (RuntimeError, AttributeError) as e:  # a torch built without oneDNN
                _onednn["on"] = False
                warnings.warn(
                    f"oneDNN linear unavailable, using torch's default: {e}", stacklevel=2
                )
        return F.linear(x, w, self.bias)


class _BlockWeights(NamedTuple):
    """One block's weights, fetched once per model (`cached_weights`).

    The cached step calls torch.nn.functional on these instead of going through the
    modules: at batch 1 on CPU a module call or attribute lookup costs about as much
    as a small op, and skipping them halves the decode step (`python
    benchmarks/gpt_sample.py`, "batch 1, KV cache").
    """

    ln_1: tuple[Tensor, Tensor | None]
    c_attn: _Linear
    attn_proj: _Linear
    ln_2: tuple[Tensor, Tensor | None]
    c_fc: _Linear
    mlp_proj: _Linear


class _CachedWeights(NamedTuple):
    """All the weights the cached path reads, shared by every cache of a model."""

    wte: Tensor
    wpe: Tensor
    blocks: list[_BlockWeights]
    ln_f: tuple[Tensor, Tensor | None]
    lm_head: _Linear
    params: tuple[int, ...]  # ids of the parameters they were fetched from


# kept beside the models, not on them: a deepcopy or state_dict of a model that has
# sampled must not meet oneDNN's packed copies (they have no storage to copy)
_CACHED_WEIGHTS: weakref.WeakKeyDictionary[nn.Module, _CachedWeights] = weakref.WeakKeyDictionary()


def _weight_and_bias(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    # an adapter wrapping a Linear would be silently skipped by the cached path
    if type(module) not in (nn.Linear, nn.LayerNorm):
        raise TypeError(
            f"the KV-cache path reads plain nn.Linear/nn.LayerNorm weights, found "
            f"{type(module).__name__}; merge adapters into the weights before sampling"
        )
    return module.weight, module.bias


class KVCache:
    """Preallocated keys and values of every layer, in slots: one slot per row.

    Made by `make_kv_cache`; fed by `forward_cached`. Slot b holds its row's
    tokens at positions 0 .. lengths[b]-1, and every slot has a length of its own, so
    rows at different points of their text decode together without padding in the
    cache, and a row joins or leaves without touching the others (`move`, `clear`).
    Position ids are the slot positions; a query sees the keys of its own slot up to
    its position, which also hides whatever a longer earlier occupant left behind.
    """

    def __init__(self, model: GPT, batch_size: int, max_len: int) -> None:
        cfg = model.cfg
        w = model.lm_head.weight
        # a layer's keys and values share one tensor, so one copy writes both
        shape = (2, batch_size, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        self.kv = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in range(cfg.n_layer)]
        self.max_len = max_len
        self.lengths = [0] * batch_size  # positions filled, per slot
        self.weights = cached_weights(model)  # shared by the model's caches

    @property
    def batch_size(self) -> int:
        """The number of slots."""
        return len(self.lengths)

    def clear(self, first: int = 0, count: int | None = None) -> None:
        """Empty `count` slots from `first` (all from `first` when None); no copy."""
        stop = self.batch_size if count is None else first + count
        self.lengths[first:stop] = [0] * (stop - first)

    def move(self, src: int, dst: int, source: KVCache | None = None) -> None:
        """Copy slot `src` of `source` (this cache when None), its filled positions, into
        slot `dst`: e.g. the last row into the slot of a row that left, so that the rows
        stay in slots 0 .. n-1, or rows prefilled together elsewhere into their slots."""
        source = self if source is None else source
        n = source.lengths[src]
        for kv, kv_src in zip(self.kv, source.kv, strict=True):
            kv[:, dst, :, :n] = kv_src[:, src, :, :n]
        self.lengths[dst] = n

    def flat_index(self, first: int, positions: Tensor) -> Tensor:
        """Where the keys and values of new tokens go, as rows of `kv[layer].view(-1, hd)`:
        positions (R, T) of slots first .. first+R-1 -> (2 * R * n_head * T,), in the
        order of the (2, R, n_head, T) tokens the attention computes."""
        _, B, nh, L, _ = self.kv[0].shape
        R, device = positions.shape[0], positions.device
        part = torch.arange(2, device=device)[:, None, None, None]  # keys, values
        slot = torch.arange(first, first + R, device=device)[None, :, None, None]
        head = torch.arange(nh, device=device)[None, None, :, None]
        return (((part * B + slot) * nh + head) * L + positions[None, :, None, :]).reshape(-1)

    def grown(self, model: GPT, batch_size: int) -> KVCache:
        """A cache of `batch_size` slots (at least this one's) holding this one's rows."""
        out = KVCache(model, batch_size, self.max_len)
        n = self.batch_size
        for dst, src in zip(out.kv, self.kv, strict=True):
            dst[:, :n] = src
        out.lengths[:n] = self.lengths
        return out


def make_kv_cache(model: GPT, batch_size: int, max_len: int | None = None) -> KVCache:
    """An empty cache for `batch_size` rows of up to `max_len` (<= block_size) tokens."""
    max_len = model.cfg.block_size if max_len is None else max_len
    if not 1 <= max_len <= model.cfg.block_size:
        raise ValueError(f"max_len={max_len} must be in [1, block_size={model.cfg.block_size}]")
    return KVCache(model, batch_size, max_len)


def cached_weights(model: GPT) -> _CachedWeights:
    """The weights `forward_cached` reads, fetched once and kept (beside the model, in
    _CACHED_WEIGHTS) while the model holds the same parameters, oneDNN's packed copies
    with them. TypeError for a layer that is not a plain Linear or LayerNorm."""
    params = tuple(id(p) for p in model.parameters())
    cached = _CACHED_WEIGHTS.get(model)
    if cached is None or cached.params != params:
        blocks = [
            _BlockWeights(
                _weight_and_bias(b.ln_1),
                _Linear(*_weight_and_bias(b.attn.c_attn)),
                _Linear(*_weight_and_bias(b.attn.c_proj)),
                _weight_and_bias(b.ln_2),
                _Linear(*_weight_and_bias(b.mlp.c_fc)),
                _Linear(*_weight_and_bias(b.mlp.c_proj)),
            )
            for b in model.transformer.h
        ]
        cached = _CachedWeights(
            model.transformer.wte.weight,
            model.transformer.wpe.weight,
            blocks,
            _weight_and_bias(model.transformer.ln_f),
            _Linear(*_weight_and_bias(model.lm_head)),
            params,
        )
        _CACHED_WEIGHTS[model] = cached
    return cached


def forward_cached(
    model: GPT,
    idx: Tensor,
    cache: KVCache,
    first: int = 0,
    lengths: Sequence[int] | None = None,
    last_only: bool = False,
) -> Tensor:
    """Feed tokens that follow those already in the cache's slots; return their logits.

    idx (R, T) new token ids for slots first .. first+R-1, each row continuing its
    slot; lengths (R,) how many of each row's T tokens are real (padding follows
    them), None = all T. Appends to the slots. Returns logits (R, T, V), or (R, 1, V)
    with `last_only`: each row's last real token, its next-token scores. Padding
    never reaches a real token (it comes after them), and a padding query sees at
    least its own key, so nothing turns NaN. Inference only: no dropout. Same
    mathematics as `GPT.forward`, written over the weights the cache fetched.
    """
    R, T = idx.shape
    C, nh = model.cfg.n_embd, model.cfg.n_head
    w = cache.weights
    if w.lm_head.weight is not model.lm_head.weight:
        raise ValueError("this cache was made by another model (or before its weights changed)")
    if not 0 <= first <= first + R <= cache.batch_size:
        raise ValueError(f"slots {first}..{first + R - 1} are not among the cache's "
                         f"{cache.batch_size}")  # fmt: skip
    if lengths is not None and (len(lengths) != R or not all(1 <= n <= T for n in lengths)):
        raise ValueError(f"lengths must be {R} counts in [1, {T}], got {list(lengths)}")
    starts = cache.lengths[first : first + R]
    top = max(starts) + T  # keys any query of this call may see
    if top > cache.max_len:
        raise ValueError(
            f"a slot holds {max(starts)} of {cache.max_len} positions; {T} more do not fit"
        )
    rows, s0, device = slice(first, first + R), starts[0], idx.device
    if starts.count(s0) == R:
        # lean path: every row at the same position, nothing to mask at T == 1
        pos_emb = w.wpe[s0 : s0 + T]  # (T, C)
        attn_mask = None
        if T > 1 and s0 > 0:  # a chunk after cached keys: causal, offset by s0
            at = torch.arange(top, device=device)
            attn_mask = at[None, :] <= at[s0:, None]  # (T, S)
        at_slots = (slice(None), rows, slice(None), slice(s0, top))
    else:
        # rows at their own positions: each query sees its slot's keys up to itself
        positions = torch.tensor(starts, device=device)[:, None] + torch.arange(
            T, device=device
        )  # (R, T)
        pos_emb = F.embedding(positions, w.wpe)  # (R, T, C)
        seen = torch.arange(top, device=device) <= positions[:, None, :, None]
        # additive, made once: SDPA would convert a bool mask in every layer
        attn_mask = torch.zeros(seen.shape, dtype=w.wte.dtype, device=device)
        attn_mask.masked_fill_(~seen, float("-inf"))  # (R, 1, T, S)
        at_slots = cache.flat_index(first, positions)  # rows of kv.view(-1, hd)
    x = F.embedding(idx, w.wte) + pos_emb  # (R, T, C)
    for b, kv_cache in zip(w.blocks, cache.kv, strict=True):
        qkv = b.c_attn(F.layer_norm(x, (C,), *b.ln_1))  # (R, T, 3C)
        qkv = qkv.view(R, T, 3, nh, C // nh).permute(2, 0, 3, 1, 4)  # (3, R, nh, T, hd)
        if isinstance(at_slots, tuple):
            kv_cache[at_slots] = qkv[1:]  # keys and values in one copy
        else:  # each (key or value, row, head, token) to its place
            kv_cache.view(-1, C // nh).index_copy_(0, at_slots, qkv[1:].reshape(-1, C // nh))
        k, v = kv_cache[:, rows, :, :top]  # each (R, nh, S, hd)
        # is_causal aligns its triangle top-left: right only when queries start at key 0
        is_causal = attn_mask is None and T > 1
        y = F.scaled_dot_product_attention(qkv[0], k, v, attn_mask, is_causal=is_causal)
        x = x + b.attn_proj(y.transpose(1, 2).reshape(R, T, C))
        h = F.gelu(b.c_fc(F.layer_norm(x, (C,), *b.ln_2)))
        x = x + b.mlp_proj(h)  # (R, T, C)
    added = [T] * R if lengths is None else lengths
    cache.lengths[rows] = [s + n for s, n in zip(starts, added, strict=True)]
    if last_only:
        if lengths is None:
            x = x[:, -1:]
        else:  # each row's last real token
            last = torch.tensor(lengths, device=device) - 1
            x = x[torch.arange(R, device=device), last][:, None]
    return w.lm_head(F.layer_norm(x, (C,), *w.ln_f))
