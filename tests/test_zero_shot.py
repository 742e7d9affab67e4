"""Fast-DetectGPT's curvature against a direct computation, AUROC against scikit-learn,
and `aigc detect --run` without a key."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from aigc.errors import RequestError
from aigc.models.gpt import GPT, GPTConfig
from aigc.safety.zero_shot import auroc, curvature_of_ids
from tests.conftest import RECIPE, TINY, run_cli


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    pass


def model(block: int) -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=11, block_size=block, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return m.eval()


def by_hand(m: GPT, context: list[int], ids: list[int]) -> float:
    """d(x) token by token in float64, each token seeing everything before it."""
    ll = mu = var = 0.0
    seq = context + ids
    for t in range(len(context), len(seq)):
        with torch.no_grad():
            logits, _ = m(torch.tensor([seq[:t]]))
        p = torch.softmax(logits[0, -1].double(), -1).numpy()
        lp = np.log(p)
        ll += lp[seq[t]]
        e = float((p * lp).sum())
        mu += e
        var += float((p * lp * lp).sum()) - e * e
    return (ll - mu) / math.sqrt(var)


def test_curvature_equals_the_definition_within_the_block():
    m = model(block=32)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 11, size=20).tolist()
    got = curvature_of_ids(m, [3], ids)
    assert got.tokens == 20
    assert got.score == pytest.approx(by_hand(m, [3], ids), rel=1e-4)


def test_long_texts_are_scored_once_per_token_in_windows():
    m = model(block=8)
    ids = np.random.default_rng(1).integers(0, 11, size=30).tolist()
    got = curvature_of_ids(m, [0], ids)
    # the first 7 tokens fit in the first window: their part equals the direct sums
    first = curvature_of_ids(m, [0], ids[:7])
    assert got.tokens == 30 and math.isfinite(got.score)
    assert got.log_likelihood < first.log_likelihood < 0  # 23 more tokens add log-probs
    with pytest.raises(RequestError, match="empty"):
        curvature_of_ids(m, [0], [])


def test_sampled_text_scores_above_text_of_another_distribution():
    """Text the model samples has higher curvature than uniform random tokens."""
    m = model(block=64)
    torch.manual_seed(1)
    sampled, rand = [], []
    rng = np.random.default_rng(2)
    for _ in range(20):
        seq = [0]
        with torch.no_grad():
            for _ in range(40):
                logits, _ = m(torch.tensor([seq]))
                seq.append(int(torch.multinomial(torch.softmax(logits[0, -1], -1), 1)))
        sampled.append(curvature_of_ids(m, [0], seq[1:]).score)
        rand.append(curvature_of_ids(m, [0], rng.integers(0, 11, 40).tolist()).score)
    assert abs(np.mean(sampled)) < 1.0  # d of the model's own samples is ~N(0, 1)
    assert auroc(sampled, rand) > 0.9


def test_auroc_against_scikit_learn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    pos = np.round(rng.normal(1, 1, 57), 1)  # rounded: ties
    neg = np.round(rng.normal(0, 1, 43), 1)
    want = roc_auc_score([1] * 57 + [0] * 43, np.concatenate([pos, neg]))
    assert auroc(pos, neg) == pytest.approx(want, abs=1e-12)


def test_detect_without_a_key_scores_zero_shot(tmp_path, corpus_file):
    import aigc

    run = tmp_path / "run"
    aigc.train(RECIPE, [*TINY, f"data.path={corpus_file}", "train.max_steps=3",
                        "train.eval_every=0"], run_dir=run, progress=False)  # fmt: skip
    text = aigc.load(run).generate("The ", max_new_tokens=60, seed=0)
    done = run_cli("detect", "--text", text, "--run", str(run), "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["tokens"] == len(text) and 0 <= out["human_share_at_or_above"] <= 1
    assert out["human_windows"] == 200
    done = run_cli("detect", "--text", text)
    assert done.returncode == 2 and "--run" in done.stderr
