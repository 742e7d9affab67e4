"""GPT: a decoder-only transformer language model in the GPT-2 shape.

Learned absolute position embeddings, pre-norm blocks (LayerNorm -> causal
self-attention -> residual; LayerNorm -> 4x MLP with GELU -> residual), a
final LayerNorm and an LM head tied to the token embedding (Radford et al. 2019).
Module names follow GPT-2 (transformer.wte, h.{i}.attn.c_attn, ...) so exporting to
Hugging Face GPT2LMHeadModel is a rename plus a transpose of the Conv1D weights.

Generation uses a KV cache: `GPT.make_kv_cache` preallocates keys and values for
every layer, one slot per row, and `GPT.forward_cached` feeds new tokens through it.
Each slot has its own length, so rows at different points of their text decode in one
batch, and rows join and leave without copying the others; prompts of different
lengths are right-padded, which causal attention already keeps away from real tokens.
`forward_cached` is `forward`'s mathematics written with torch.nn.functional over
weights fetched once into the cache, because module dispatch would double the CPU
decode step (see _BlockWeights); the tests hold the two paths equal to 1e-5.
"""

from __future__ import annotations

import math
import os
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from aigc.errors import ConfigError


@dataclass
class GPTConfig:
    vocab_size: int = 0  # 0 = set from the tokenizer by the caller before building
    block_size: int = 128  # longest context the model sees (position embeddings)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key."""
        for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"model.{key}={value!r} must be an integer")
            low = 0 if key == "vocab_size" else 1  # vocab_size 0: set later from the tokenizer
            if value < low:
                raise ConfigError(f"model.{key}={value} must be at least {low}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float):
            raise ConfigError(f"model.dropout={self.dropout!r} must be a number")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        if not isinstance(self.bias, bool):
            raise ConfigError(f"model.bias={self.bias!r} must be true or false")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # fused q, k, v
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hd)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        # Exact (erf) GELU: 2.2x faster than GPT-2's tanh approximation on CPU here;
        # Hugging Face GPT-2 takes it as activation_function="gelu".
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


# ---------------------------------------------------------------------------
# KV cache and the cached forward used for generation


# oneDNN takes a product of 2 rows or more with a weight of at least ONEDNN_MIN_WEIGHT
# entries, or of at least ONEDNN_MIN_MACS multiply-adds (rows x in x out) whatever its
# weight: measured crossovers, see _Linear
ONEDNN_MIN_WEIGHT = 1 << 17
ONEDNN_MIN_MACS = 1 << 20
_onednn = {"on": os.environ.get("AIGC_ONEDNN", "1") != "0"}  # off after a failure, too


class _Linear:
    """A Linear's weight and bias as the cached path applies them.

    On CPU in float32, a product of several rows goes through
    oneDNN (PyTorch's mkldnn backend, as torch.compile's CPU code uses it) with the
    weight packed once into oneDNN's blocked layout, when the weight or the product is
    large enough (the constants above). Smaller ones, one row's above all, stay on
    torch's default path (MKL), whose call costs 6-8 us less. On the 2-core AMD
    EPYC we develop on, MKL multiplied 2 or 4 rows in twice or 3.5 times one row's time,
    so batched decoding hardly gained from its batch there; oneDNN took 16 rows of a
    512 -> 2048 layer in 144 us, MKL in 366, and 3 rows of 256 -> 768 in 18 us, MKL in
    26; but MKL stayed ahead below about a million multiply-adds for 96-wide layers. The
    packed copy is redone when the weight changes (its version or storage), so training
    between samples is seen. AIGC_ONEDNN=0 keeps every product on torch's default path.
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
    """One block's weights, fetched once per model (`GPT._cached_weights`).

    The cached step calls torch.nn.functional on these instead of going through the
    modules: at batch 1 on CPU a module call or attribute lookup costs about as much
    as a small op, and skipping them halves the decode step (1.3 -> 0.6 ms for the
    4-layer, 128-wide model on 2 cores).
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

    Made by `GPT.make_kv_cache`; fed by `GPT.forward_cached`. Slot b holds its row's
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
        self.weights = model._cached_weights()  # shared by the model's caches

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


class GPT(nn.Module):
    """GPT-2-shaped language model; `forward` trains, `forward_cached` decodes."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        cfg.validate()
        if cfg.vocab_size < 1:
            raise ConfigError("model.vocab_size=0: set it from the tokenizer before building")
        self.cfg = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # weight tying (Press & Wolf 2017): one matrix embeds tokens and scores them
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer), two per block,
        # so the residual stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) token ids, T <= block_size; targets (B, T) with -1 = ignore.

        Returns logits (B, T, V) and the mean cross-entropy (None without targets).
        """
        T = idx.size(1)
        if self.cfg.block_size < T:
            raise ValueError(f"sequence of {T} tokens exceeds block_size={self.cfg.block_size}")
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe.weight[:T]  # (T, C), broadcast over the batch
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
            )
        return logits, loss

    def make_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty cache for `batch_size` rows of up to `max_len` (<= block_size) tokens."""
        max_len = self.cfg.block_size if max_len is None else max_len
        if not 1 <= max_len <= self.cfg.block_size:
            raise ValueError(f"max_len={max_len} must be in [1, block_size={self.cfg.block_size}]")
        return KVCache(self, batch_size, max_len)

    def _cached_weights(self) -> _CachedWeights:
        """The weights `forward_cached` reads, fetched once and kept while the model
        holds the same parameters (oneDNN's packed copies with them)."""
        params = tuple(id(p) for p in self.parameters())
        cached = _CACHED_WEIGHTS.get(self)
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
                for b in self.transformer.h
            ]
            cached = _CachedWeights(
                self.transformer.wte.weight,
                self.transformer.wpe.weight,
                blocks,
                _weight_and_bias(self.transformer.ln_f),
                _Linear(*_weight_and_bias(self.lm_head)),
                params,
            )
            _CACHED_WEIGHTS[self] = cached
        return cached

    def forward_cached(
        self,
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
        mathematics as `forward`, written over the weights the cache fetched.
        """
        R, T = idx.shape
        C, nh = self.cfg.n_embd, self.cfg.n_head
        w = cache.weights
        if w.lm_head.weight is not self.lm_head.weight:
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

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """One optimizer group for the whole model (the step contract)."""
        return {"model": list(self.parameters())}

    def training_step(self, batch: dict[str, Tensor], step: Any) -> dict[str, Tensor]:
        """Next-token cross-entropy of batch["input_ids"] against batch["targets"],
        both (B, T); targets of -1 are not trained on."""
        _, loss = self(batch["input_ids"], batch["targets"])
        step.update("model", loss)
        return {"loss": loss.detach()}

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count. non_embedding drops the position embeddings; the token
        embedding stays, as it is also the LM head (nanoGPT's convention)."""
        n = sum(p.numel() for p in self.parameters())  # tied weights counted once
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N for the weights (forward + backward) plus
        12 * n_layer * n_embd * T for attention scores (PaLM, appendix B)."""
        T = self.cfg.block_size if seq_len is None else seq_len
        return 6 * self.num_params() + 12 * self.cfg.n_layer * self.cfg.n_embd * T


def grow_vocab(weight: Tensor, vocab_size: int) -> Tensor:
    """A token embedding of ``vocab_size`` rows from a smaller one: the old rows kept,
    each new row the mean of the old ones (Hewitt 2021), so new tokens such as a chat
    template's markers start as an average token instead of noise that the tied LM head
    would score arbitrarily. (V, C) -> (vocab_size, C)."""
    old = weight.shape[0]
    if vocab_size < old:
        raise ValueError(f"cannot shrink a vocabulary of {old} to {vocab_size}")
    extra = weight.mean(0, keepdim=True).expand(vocab_size - old, -1)
    return torch.cat([weight, extra.to(weight.dtype)])


# ---------------------------------------------------------------------------
# Sequence classification: the same network with a head on a pooled hidden state


@dataclass
class GPTClassifierConfig(GPTConfig):
    n_classes: int = 0  # 0 = set from the data's labels by the caller before building
    pooling: Literal["last", "mean"] = (
        "last"  # last: the last real token's state (it has seen all); mean: average
    )

    def validate(self) -> None:
        super().validate()
        if self.pooling not in POOLINGS:
            raise ConfigError(
                f"model.pooling={self.pooling!r}: choose one of {', '.join(POOLINGS)}"
            )
        if isinstance(self.n_classes, bool) or not isinstance(self.n_classes, int):
            raise ConfigError(f"model.n_classes={self.n_classes!r} must be an integer")
        if self.n_classes < 0 or self.n_classes == 1:
            raise ConfigError(f"model.n_classes={self.n_classes} must be 0 (from the data) or 2+")


POOLINGS = ("last", "mean")


class GPTClassifier(GPT):
    """A GPT whose final hidden states are pooled into one vector per text and scored by a
    linear head (Radford et al. 2018 classify from the last token). Keeps GPT's module
    names, so a pretrained GPT's weights load into it as they are and only ``score`` is
    new. The LM head stays (it is the token embedding, tied) but is not used."""

    def __init__(self, cfg: GPTClassifierConfig) -> None:
        super().__init__(cfg)
        if cfg.n_classes < 2:
            raise ConfigError("model.n_classes must be set from the data (2 or more) first")
        self.score = nn.Linear(cfg.n_embd, cfg.n_classes)
        nn.init.normal_(self.score.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.score.bias)

    def classify(self, idx: Tensor, lengths: Tensor) -> Tensor:
        """idx (B, T) token ids, right-padded; lengths (B,) real tokens per row (>= 1).
        Returns class logits (B, n_classes). Padding never reaches a real token: attention
        is causal and pads come after."""
        T = idx.size(1)
        if self.cfg.block_size < T:
            raise ValueError(f"sequence of {T} tokens exceeds block_size={self.cfg.block_size}")
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe.weight[:T])
        for block in self.transformer.h:
            x = block(x)
        h = self.transformer.ln_f(x)  # (B, T, C)
        if self.cfg.pooling == "last":
            pooled = h[torch.arange(h.size(0), device=h.device), lengths - 1]  # (B, C)
        else:
            real = torch.arange(T, device=h.device)[None, :] < lengths[:, None]  # (B, T)
            pooled = (h * real[..., None]).sum(1) / lengths[:, None].to(h.dtype)
        return self.score(pooled)

    def training_step(self, batch: dict[str, Tensor], step: Any) -> dict[str, Tensor]:
        """Cross-entropy of batch["input_ids"] (B, T) right-padded to batch["lengths"]
        (B,) against batch["labels"] (B,); also logs the batch accuracy."""
        idx, lengths, labels = batch["input_ids"], batch["lengths"], batch["labels"]
        logits = self.classify(idx, lengths)
        loss = F.cross_entropy(logits.float(), labels)
        step.update("model", loss)
        acc = (logits.argmax(-1) == labels).float().mean()
        return {"loss": loss.detach(), "acc": acc.detach()}
