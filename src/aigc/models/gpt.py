"""GPT: a decoder-only transformer language model in the GPT-2 shape.

Learned absolute position embeddings, pre-norm blocks (LayerNorm -> causal
self-attention -> residual; LayerNorm -> 4x MLP with GELU -> residual), a
final LayerNorm and an LM head tied to the token embedding (Radford et al. 2019).
Module names follow GPT-2 (transformer.wte, h.{i}.attn.c_attn, ...) so exporting to
Hugging Face GPT2LMHeadModel is a rename plus a transpose of the Conv1D weights.

Decoding runs through a KV cache (`make_kv_cache`, `forward_cached`), written apart
in models/gpt_cache.py with the CPU fast path it needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from aigc.errors import ConfigError
from aigc.models import gpt_cache
from aigc.models.gpt_cache import KVCache


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
        return gpt_cache.make_kv_cache(self, batch_size, max_len)

    def forward_cached(
        self,
        idx: Tensor,
        cache: KVCache,
        first: int = 0,
        lengths: Sequence[int] | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """`forward` for decoding: logits of tokens idx (R, T) that follow those in the
        cache's slots first .. first+R-1 (see gpt_cache.forward_cached)."""
        return gpt_cache.forward_cached(self, idx, cache, first, lengths, last_only)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """One optimizer group for the whole model (the step contract)."""
        return {"model": list(self.parameters())}

    def training_step(self, batch: dict[str, Tensor], step: Any) -> dict[str, Tensor]:
        """Next-token cross-entropy of batch["input_ids"] against batch["targets"],
        both (B, T); targets of -1 are not trained on.

        Where the batch carries "unlikely" (B, T, V) bool, the candidates each position
        should not take, an unlikelihood term (`unlikelihood_loss`) weighted by
        batch["unlikely_weight"] joins the loss; "loss" stays the cross-entropy."""
        logits, loss = self(batch["input_ids"], batch["targets"])
        out = {"loss": loss.detach()}
        if "unlikely" in batch:
            ul = unlikelihood_loss(logits, batch["unlikely"], batch["targets"])
            loss = loss + batch["unlikely_weight"] * ul
            out["unlikelihood"] = ul.detach()
        step.update("model", loss)
        return out

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


def unlikelihood_loss(logits: Tensor, unlikely: Tensor, targets: Tensor) -> Tensor:
    """Token-level unlikelihood (Welleck et al. 2019, eq. 4): -sum_c log(1 - p(c | x<t))
    over the negative candidates c of each position, ``unlikely`` (B, T, V) bool, the
    target itself never among them; averaged over the positions with a target (>= 0).
    Its gradient on a candidate's logit is about p(c): it pushes down what the model
    still believes, and leaves alone what it has already ruled out."""
    p = F.softmax(logits.float(), dim=-1)  # (B, T, V)
    negative = unlikely.scatter(-1, targets.clamp(min=0).unsqueeze(-1), False)
    term = -torch.log1p(-p.clamp(max=1.0 - 1e-6)) * negative  # (B, T, V)
    valid = targets >= 0
    return term.sum(-1)[valid].mean() if valid.any() else term.sum() * 0.0


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
