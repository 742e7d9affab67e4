"""Telling generated text from human text without a watermark: the conditional
probability curvature of Fast-DetectGPT (Bao et al., ICLR 2024), with one of our own
trained runs as the scoring model.

For a text x_1..x_n, the scoring model p gives each position t its next-token
distribution p_t. Text a model wrote tends to sit above what the model itself would
typically sample at each position; human text does not. The criterion is

    d(x) = (sum_t log p_t(x_t) - sum_t mu_t) / sqrt(sum_t var_t),
    mu_t = E_{v ~ p_t}[log p_t(v)],   var_t = Var_{v ~ p_t}[log p_t(v)],

the analytic form of their sampling-and-scoring step when the sampling and scoring
models are the same (their eq. 6 with the expectation taken exactly over the
vocabulary). High d means "generated". It is a score, not a calibrated probability:
`human_reference` places a text's d among held-out human windows of the same length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from aigc.errors import RequestError


@dataclass
class Curvature:
    """Fast-DetectGPT's criterion for one text and its parts."""

    score: float  # d(x): high = generated
    log_likelihood: float  # sum_t log p_t(x_t), nats
    expected: float  # sum_t mu_t
    variance: float  # sum_t var_t
    tokens: int


def _start(tokenizer: Any) -> list[int]:
    """What the model conditions a text with no prompt on (as sampling does)."""
    if tokenizer.eos_id is not None:
        return [tokenizer.eos_id]
    return tokenizer.encode("\n")


@torch.inference_mode()
def curvature_of_ids(model: Any, context: Sequence[int], ids: Sequence[int]) -> Curvature:
    """d for the tokens ``ids`` that follow ``context``, windowed to the model's block:
    each token is scored once, seeing at least half a block of what precedes it."""
    if not ids:
        raise RequestError("the text to score is empty")
    block = model.cfg.block_size
    seq = list(context) + list(ids)
    first = len(context)  # index in seq of the first scored token
    device = next(model.parameters()).device
    ll = mu = var = 0.0
    t = first
    while t < len(seq):
        lo = max(0, t - max(1, block // 2)) if t > first else max(0, t - block + 1)
        hi = min(len(seq), lo + block + 1)  # inputs seq[lo:hi-1] predict seq[lo+1:hi]
        x = torch.tensor([seq[lo : hi - 1]], device=device)
        logits, _ = model(x)
        logp = torch.log_softmax(logits[0].float(), dim=-1)  # (L, V): position j predicts j+1
        rows = torch.arange(t - lo - 1, hi - lo - 1, device=device)
        target = torch.tensor(seq[t:hi], device=device)
        lp = logp[rows]
        p = lp.exp()
        ll += float(lp.gather(1, target[:, None]).sum())
        m = (p * lp).sum(-1)
        mu += float(m.sum())
        var += float(((p * lp * lp).sum(-1) - m * m).clamp(min=0).sum())
        t = hi
    score = (ll - mu) / math.sqrt(max(var, 1e-12))
    return Curvature(score, ll, mu, var, len(ids))


def curvature(pipeline: Any, text: str) -> Curvature:
    """Fast-DetectGPT's criterion of ``text`` under a loaded text run (its scoring model)."""
    from aigc.data.tokenizers import encode_replacing

    if not isinstance(text, str) or not text:
        raise RequestError("the text to score is empty")
    ids, _ = encode_replacing(pipeline.tokenizer, text)
    return curvature_of_ids(pipeline.model, _start(pipeline.tokenizer), ids.tolist())


def human_windows(pipeline: Any, tokens: int, n: int = 200, seed: int = 0) -> list[list[int]]:
    """n windows of ``tokens`` tokens from the run's held-out (validation) split."""
    from aigc.data.text import TokenCorpus

    corpus = TokenCorpus.open(pipeline.run.data_dir)
    val = np.asarray(corpus.tokens[corpus.meta.n_train :], dtype=np.int64)
    if len(val) < tokens + 1:
        raise RequestError(f"the run's held-out split has {len(val)} tokens; need {tokens}+")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(val) - tokens, size=n)
    return [val[s : s + tokens].tolist() for s in starts]


def human_reference(pipeline: Any, tokens: int, n: int = 200, seed: int = 0) -> np.ndarray:
    """d of n held-out human windows of ``tokens`` tokens (sorted), to place a text among."""
    start = _start(pipeline.tokenizer)
    scores = [curvature_of_ids(pipeline.model, start, w).score
              for w in human_windows(pipeline, tokens, n, seed)]  # fmt: skip
    return np.sort(np.asarray(scores))


def auroc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """Area under the ROC curve: P(a positive scores above a negative), ties half."""
    pos, neg = np.asarray(positives, float), np.asarray(negatives, float)
    if not len(pos) or not len(neg):
        raise ValueError("AUROC needs at least one positive and one negative")
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks over ties
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))
