"""GPT: shapes, loss, tying, causality, the KV-cache path against the plain forward."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from aigc.errors import ConfigError
from aigc.models.gpt import GPT, GPTConfig

V = 11


def tiny(seed: int = 0, **kw) -> GPT:
    cfg = dict(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=16)
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


def test_shapes_and_no_loss_without_targets():
    model = tiny()
    logits, loss = model(torch.randint(0, V, (3, 7)))
    assert logits.shape == (3, 7, V)
    assert loss is None


def test_loss_is_mean_cross_entropy_ignoring_minus_one():
    model = tiny()
    idx = torch.randint(0, V, (2, 8))
    targets = torch.randint(0, V, (2, 8))
    targets[0, :3] = -1
    logits, loss = model(idx, targets)
    # independent: -log softmax at the target, averaged over the kept positions
    logp = logits.double().log_softmax(-1)
    keep = targets >= 0
    nll = -logp[keep].gather(-1, targets[keep][:, None]).squeeze(-1)
    assert loss.item() == pytest.approx(nll.mean().item(), rel=1e-5)


def test_lm_head_is_tied_to_token_embedding():
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight
    # one matrix: the head's scores are dot products with the token embeddings
    x = torch.randn(1, 1, 16)
    ln_f = model.transformer.ln_f
    torch.testing.assert_close(model.lm_head(ln_f(x)), ln_f(x) @ model.transformer.wte.weight.T)


def test_gpt2_module_names():
    names = set(dict(tiny().named_modules()))
    for name in ["transformer.wte", "transformer.wpe", "transformer.ln_f", "lm_head"]:
        assert name in names
    for name in ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"]:
        assert f"transformer.h.1.{name}" in names


def test_future_tokens_do_not_change_past_logits():
    model = tiny()
    idx = torch.randint(0, V, (2, 10))
    changed = idx.clone()
    changed[:, 6] = (changed[:, 6] + 1) % V
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_residual_projections_get_scaled_init():
    model = tiny(n_layer=3, n_embd=64, n_head=4)
    std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(2 * 3), rel=0.1)
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize("bias", [False, True])
def test_param_count_formula(bias: bool):
    model = tiny(bias=bias)
    C, L, T = 16, 2, 16
    b = 1 if bias else 0
    per_layer = (
        2 * (C + b * C)  # ln_1, ln_2
        + (3 * C * C + b * 3 * C)  # c_attn
        + (C * C + b * C)  # attn.c_proj
        + (4 * C * C + b * 4 * C)  # c_fc
        + (4 * C * C + b * C)  # mlp.c_proj
    )
    total = V * C + T * C + L * per_layer + (C + b * C)  # wte (= lm_head), wpe, blocks, ln_f
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - T * C
    assert model.flops_per_token() == 6 * (total - T * C) + 12 * L * C * T
    assert model.flops_per_token(seq_len=4) == 6 * (total - T * C) + 12 * L * C * 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_embd": 130}, "model.n_embd=130 is not divisible by model.n_head=4"),
        ({"vocab_size": -1}, "model.vocab_size=-1"),
        ({"n_layer": True}, "model.n_layer"),
        ({"block_size": 2.5}, "model.block_size"),
        ({"dropout": 1.0}, "model.dropout"),
        ({"bias": "yes"}, "model.bias"),
    ],
)
def test_config_validation_names_the_key(change, message):
    cfg = GPTConfig(**{"vocab_size": V, "n_head": 4, "n_embd": 128, **change})
    with pytest.raises(ConfigError, match=message):
        cfg.validate()
    with pytest.raises(ConfigError):
        GPT(cfg)


def test_vocab_size_zero_validates_but_does_not_build():
    cfg = GPTConfig()  # vocab_size 0: the caller sets it from the tokenizer
    cfg.validate()
    with pytest.raises(ConfigError, match=r"model\.vocab_size=0"):
        GPT(cfg)


def test_training_step_updates_the_model_group():
    model = tiny().train()
    calls = []

    class Step:
        def update(self, group, loss):
            calls.append((group, loss))

    x, y = torch.randint(0, V, (2, 8)), torch.randint(0, V, (2, 8))
    out = model.training_step({"input_ids": x, "targets": y}, Step())
    assert [g for g, _ in calls] == ["model"]
    assert calls[0][1].requires_grad
    assert not out["loss"].requires_grad
    assert out["loss"].item() == pytest.approx(model(x, y)[1].item())
    groups = model.param_groups()
    assert list(groups) == ["model"]
    assert len(groups["model"]) == len(list(model.parameters()))


# ---------------------------------------------------------------------------
# KV cache


@torch.inference_mode()
def test_cached_forward_matches_full_forward():
    model = tiny()
    idx = torch.randint(0, V, (3, 14))
    full, _ = model(idx)
    cache = model.make_kv_cache(3)
    pieces = [model.forward_cached(idx[:, :5], cache)]  # prefill
    pieces.append(model.forward_cached(idx[:, 5:9], cache))  # a chunk after cached keys
    for t in range(9, 14):  # single tokens
        pieces.append(model.forward_cached(idx[:, t : t + 1], cache))
    assert cache.lengths == [14, 14, 14]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)
    # last_only gives the last position alone
    cache.clear()
    last = model.forward_cached(idx[:, :14], cache, last_only=True)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=0)


@torch.inference_mode()
def test_rows_of_different_lengths_in_one_cache_match_each_row_alone():
    model = tiny(bias=True)
    lengths = [7, 4, 1]
    rows = [torch.randint(0, V, (n + 8,)) for n in lengths]  # prompt + 8 more tokens
    width = max(lengths)
    idx = torch.zeros(3, width, dtype=torch.long)  # right-padded
    for b, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        idx[b, :n] = row[:n]
    cache = model.make_kv_cache(3)
    prefill = model.forward_cached(idx, cache, lengths=lengths)  # (3, width, V)
    assert cache.lengths == lengths
    last = torch.stack([prefill[b, n - 1] for b, n in enumerate(lengths)])
    out = [[prefill[b, :n]] for b, n in enumerate(lengths)]
    head = model.forward_cached(idx, model.make_kv_cache(3), lengths=lengths, last_only=True)
    torch.testing.assert_close(head[:, 0], last)  # last_only picks each row's last real token
    assert torch.isfinite(prefill).all()  # padding queries too: no NaN
    for t in range(5):  # single tokens, each row at its own position
        step = torch.stack([row[n + t] for row, n in zip(rows, lengths, strict=True)])
        logits = model.forward_cached(step[:, None], cache)
        for b in range(3):
            out[b].append(logits[b])
    chunk = torch.stack([row[n + 5 : n + 8] for row, n in zip(rows, lengths, strict=True)])
    logits = model.forward_cached(chunk, cache)  # a chunk at different positions
    assert cache.lengths == [n + 8 for n in lengths]
    for b, row in enumerate(rows):
        alone, _ = model(row[None])
        got = torch.cat([*out[b], logits[b]])
        torch.testing.assert_close(got, alone[0], atol=1e-5, rtol=0)


@torch.inference_mode()
def test_cache_slots_move_clear_and_grow_without_touching_other_rows():
    model = tiny()
    idx = torch.randint(0, V, (3, 10))
    full, _ = model(idx)
    other = torch.randint(0, V, (4,))
    cache = model.make_kv_cache(3)
    model.forward_cached(idx[:, :6], cache)
    cache.move(2, 0)  # row 2 takes slot 0 (a row that left), its 6 keys copied
    cache.clear(1, 1)  # slot 1 starts over, shorter than its 6 stale keys
    model.forward_cached(other[None, :3], cache, first=1)
    assert cache.lengths[:2] == [6, 3]
    out = model.forward_cached(torch.stack([idx[2, 6], other[3]])[:, None], cache, 0, None)
    torch.testing.assert_close(out[0, 0], full[2, 6], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, 0], model(other[None])[0][0, 3], atol=1e-5, rtol=0)
    bigger = cache.grown(model, 5)
    assert bigger.batch_size == 5 and bigger.lengths == [7, 4, 6, 0, 0]
    out = model.forward_cached(idx[2, 7:9][None], bigger, first=0)
    torch.testing.assert_close(out[0], full[2, 7:9], atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")
@torch.inference_mode()
def test_onednn_products_give_the_plain_forward(monkeypatch):
    import aigc.models.gpt_cache as gpt_cache

    monkeypatch.setattr(gpt_cache, "ONEDNN_MIN_WEIGHT", 0)  # every product of 2+ rows on oneDNN
    with torch.inference_mode(False):  # weights as a loaded model has them
        model = tiny(bias=True)
    idx = torch.randint(0, V, (3, 12))
    full, _ = model(idx)
    cache = model.make_kv_cache(3)
    pieces = [model.forward_cached(idx[:, :5], cache)]
    pieces += [model.forward_cached(idx[:, t : t + 1], cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)
    linears = [model.make_kv_cache(1).weights.lm_head, *cache.weights.blocks[0][1:3]]
    assert all(lin._packed is not None for lin in linears)  # the oneDNN path ran
    assert model.make_kv_cache(2).weights is cache.weights  # packed once per model

    # the packed copy follows weights changed in place (as training between samples does)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight.mul_(-1.5)
        model.lm_head.weight.add_(0.1)
    full, _ = model(idx)
    out = model.forward_cached(idx, model.make_kv_cache(3))
    torch.testing.assert_close(out, full, atol=1e-5, rtol=0)

    # a model that sampled still deep-copies (LoRA merging does): the packed copies,
    # which have no storage to copy, are kept beside the model, not on it
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin.forward_cached(idx, twin.make_kv_cache(3)), full)


@torch.inference_mode()
def test_one_row_stays_on_the_default_product(monkeypatch):
    import aigc.models.gpt_cache as gpt_cache

    monkeypatch.setattr(gpt_cache, "ONEDNN_MIN_WEIGHT", 0)
    model = tiny()
    cache = model.make_kv_cache(2)
    model.forward_cached(torch.randint(0, V, (1, 1)), cache)  # one row, one token
    assert cache.weights.lm_head._packed is None
    monkeypatch.setitem(gpt_cache._onednn, "on", False)  # AIGC_ONEDNN=0
    model.forward_cached(torch.randint(0, V, (2, 3)), cache)
    assert cache.weights.lm_head._packed is None


def test_cache_overflow_and_overlong_input_raise():
    model = tiny()
    cache = model.make_kv_cache(1, max_len=4)
    with torch.inference_mode():
        model.forward_cached(torch.zeros(1, 4, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="do not fit"):
            model.forward_cached(torch.zeros(1, 1, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="not among the cache's 1"):
            model.forward_cached(torch.zeros(1, 1, dtype=torch.long), cache, first=1)
        with pytest.raises(ValueError, match="lengths must be"):
            model.forward_cached(torch.zeros(1, 2, dtype=torch.long), cache, lengths=[3])
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="max_len"):
        model.make_kv_cache(1, max_len=17)


def test_cache_belongs_to_its_model():
    cache = tiny(seed=1).make_kv_cache(1)
    with pytest.raises(ValueError, match="another model"):
        tiny(seed=2).forward_cached(torch.zeros(1, 1, dtype=torch.long), cache)


def test_cached_path_refuses_wrapped_layers():
    model = tiny()

    class Adapter(torch.nn.Linear):
        pass

    model.transformer.h[0].attn.c_attn.__class__ = Adapter
    with pytest.raises(TypeError, match="merge adapters"):
        model.make_kv_cache(1)


def test_dropout_only_in_training():
    model = tiny(dropout=0.5)
    idx = torch.randint(0, V, (2, 8))
    torch.testing.assert_close(model(idx)[0], model(idx)[0])
    model.train()
    assert not torch.allclose(model(idx)[0], model(idx)[0])
    loss = F.cross_entropy(model(idx)[0].view(-1, V), idx.view(-1))
    loss.backward()
    assert model.transformer.wte.weight.grad is not None
