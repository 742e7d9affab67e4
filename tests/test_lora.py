"""LoRA: exact start, frozen base, parameter count, merge, adapter files, errors."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from aigc.data.tokenizers import CharTokenizer
from aigc.errors import CheckpointError, ConfigError
from aigc.models.gpt import GPT, GPTConfig
from aigc.models.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    trainable_share,
)
from aigc.sampling import SamplingParams, generate

V = 50
DEFAULT_WRAPPED = [
    f"transformer.h.{i}.{name}"
    for i in range(2)
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
]


def tiny(seed: int = 0, vocab: int = V, **kw) -> GPT:
    cfg = dict(vocab_size=vocab, block_size=16, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


def tokens(seed: int, shape: tuple[int, int] = (3, 12), vocab: int = V) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def train(model: GPT, steps: int = 5, lr: float = 1e-2) -> list[float]:
    """A few AdamW steps on one fixed batch of random tokens; returns the losses."""
    batch = tokens(1, (4, 16), model.cfg.vocab_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0]


# ---------------------------------------------------------------------------
# applying adapters


def test_fresh_adapters_keep_outputs_and_train_only_a_and_b():
    model = tiny()
    idx = tokens(0)
    before = logits(model, idx)
    wrapped = apply_lora(model, LoRAConfig(rank=4))
    assert wrapped == DEFAULT_WRAPPED
    assert torch.equal(logits(model, idx), before)  # B = 0: B A x adds exact zeros
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{n}.lora_{ab}" for n in wrapped for ab in "AB")
    # the tied head and embedding are untouched and still one matrix
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.transformer.wte.weight
    # the adapters follow the model's mode (an eval model stays in eval)
    assert not any(m.training for m in model.modules())


def test_lora_linear_is_eq_3_with_scaling_and_linear_init():
    torch.manual_seed(0)
    base = nn.Linear(6, 5, dtype=torch.float64)  # with bias, in float64
    layer = LoRALinear(base, rank=3, alpha=6.0)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float64
    assert layer.lora_A.shape == (3, 6) and layer.lora_B.shape == (5, 3)
    assert torch.count_nonzero(layer.lora_B) == 0
    # nn.Linear's kaiming-uniform: U(-1/sqrt(in), 1/sqrt(in)), and not all zero
    assert 0 < layer.lora_A.abs().max() <= 6**-0.5
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    # independent: one dense matrix W0 + (alpha / r) B A applied to x
    W = base.weight + 2.0 * layer.lora_B @ layer.lora_A
    torch.testing.assert_close(layer(x), x @ W.T + base.bias, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.merged_weight(), W, rtol=1e-12, atol=1e-12)


def test_dropout_acts_on_the_adapter_input_in_training_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8), rank=2, alpha=2.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 8)
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    expected = layer.base(x) + x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)


def test_trainable_share_against_a_hand_count():
    C, L, block, r = 128, 2, 16, 4
    model = tiny(n_embd=C, n_layer=L)
    n_before = sum(p.numel() for p in model.parameters())
    apply_lora(model, LoRAConfig(rank=r))
    trainable, total = trainable_share(model)
    # by hand: r (in + out) per wrapped layer, for c_attn, attn.c_proj, c_fc, mlp.c_proj
    per_block = r * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    assert trainable == L * per_block == 16_384
    # the base: tied wte/lm_head once, wpe, per block 12 C^2 weights + 2 LayerNorm
    # weights (bias=False), and ln_f
    base = V * C + block * C + L * (12 * C * C + 2 * C) + C
    assert n_before == base
    assert total == base + trainable
    assert trainable / total < 0.05


def test_targets_by_dotted_suffix():
    model = tiny()
    assert apply_lora(model, LoRAConfig(targets=["attn.c_proj"])) == [
        "transformer.h.0.attn.c_proj",
        "transformer.h.1.attn.c_proj",
    ]
    assert type(model.transformer.h[0].mlp.c_proj) is nn.Linear
    model = tiny()
    assert apply_lora(model, LoRAConfig(targets=["h.1.mlp.c_fc"])) == ["transformer.h.1.mlp.c_fc"]


def test_an_untied_head_may_be_targeted_explicitly():
    model = tiny()
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untie
    assert apply_lora(model, LoRAConfig(targets=["lm_head"])) == ["lm_head"]
    assert isinstance(model.lm_head, LoRALinear)
    assert not model.transformer.wte.weight.requires_grad


# ---------------------------------------------------------------------------
# training and merging


def test_training_moves_outputs_and_never_the_base_weights():
    model = tiny()
    idx = tokens(0)
    apply_lora(model, LoRAConfig(rank=4))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = logits(model, idx)
    losses = train(model)
    assert losses[-1] < losses[0]
    assert not torch.allclose(logits(model, idx), before, atol=1e-4)
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None, n
            assert torch.equal(p, frozen[n]), n
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_merged_model_equals_the_adapted_one_and_decodes_with_the_kv_cache():
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz .\n")
    model = tiny(vocab=tok.vocab_size)
    with torch.no_grad():
        # large weights (as in test_sampling): greedy text depends on the context and
        # the top two logits stay far apart next to float32 rounding
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.35)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    train(model, lr=5e-2)
    idx = tokens(3, (2, 16), tok.vocab_size)
    adapted = logits(model, idx)
    with pytest.raises(TypeError, match="merge adapters"):
        model.make_kv_cache(2)  # the cached path refuses an unmerged adapter

    assert merge_lora(model) is model
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(b.attn.c_attn) is nn.Linear for b in model.transformer.h)
    merged = logits(model, idx)
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)

    # KV cache: an 8-token prefill, then one token at a time, against the full forward
    cache = model.make_kv_cache(2)
    with torch.no_grad():
        steps = [model.forward_cached(idx[:, :8], cache)]
        steps += [model.forward_cached(idx[:, t : t + 1], cache) for t in range(8, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), merged, rtol=0, atol=1e-5)

    # aigc.sampling.generate runs on the merged model; greedy = argmax of the full forward
    prompt = "the cat"
    [text] = generate(model, tok, prompt, SamplingParams(max_new_tokens=8, temperature=0))
    ctx = tok.encode(prompt)
    for _ in range(8):
        ctx.append(int(logits(model, torch.tensor([ctx]))[0, -1].argmax()))
    assert text == tok.decode(ctx[len(tok.encode(prompt)) :])


def test_bfloat16_adapters_and_merge_keep_the_dtype():
    model = tiny().to(torch.bfloat16)
    apply_lora(model, LoRAConfig(rank=4))
    layer = model.transformer.h[0].attn.c_attn
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.1)
    W, A, B = (t.detach().float() for t in (layer.base.weight, layer.lora_A, layer.lora_B))
    merge_lora(model)
    merged = model.transformer.h[0].attn.c_attn.weight
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, (W + (B @ A) * 4.0).to(torch.bfloat16))  # alpha / r = 16 / 4
    model(tokens(0))  # runs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_train_merge_and_decode():
    model = tiny().cuda()
    apply_lora(model, LoRAConfig(rank=4))
    assert model.transformer.h[0].attn.c_attn.lora_A.device.type == "cuda"
    batch = tokens(1, (4, 16)).cuda()
    _, loss = model(batch[:, :-1], batch[:, 1:])
    loss.backward()
    adapted = logits(model, batch)
    merge_lora(model)
    assert model.transformer.h[0].attn.c_attn.weight.device.type == "cuda"
    with torch.no_grad():
        cached = model.forward_cached(batch, model.make_kv_cache(4))
    torch.testing.assert_close(cached, adapted, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------
# adapter files


def test_adapter_round_trips_through_safetensors(tmp_path):
    cfg = LoRAConfig(rank=4)
    model = tiny()
    wrapped = apply_lora(model, cfg)
    train(model)
    state = lora_state_dict(model)
    assert sorted(state) == sorted(f"{n}.lora_{ab}" for n in wrapped for ab in "AB")
    assert state["transformer.h.0.attn.c_attn.lora_A"].shape == (4, 32)
    assert state["transformer.h.0.attn.c_attn.lora_B"].shape == (96, 4)
    save_file(state, str(tmp_path / "adapter.safetensors"))

    fresh = tiny()  # the same pretrained base, new adapters
    apply_lora(fresh, cfg)
    idx = tokens(0)
    assert not torch.equal(logits(fresh, idx), logits(model, idx))
    load_lora_state_dict(fresh, load_file(str(tmp_path / "adapter.safetensors")))
    assert torch.equal(logits(fresh, idx), logits(model, idx))


def test_strict_loading_names_the_mismatch_and_copies_nothing():
    trained = tiny()
    apply_lora(trained, LoRAConfig(rank=4))
    train(trained)
    state = {k: v.clone() for k, v in lora_state_dict(trained).items()}

    model = tiny()
    apply_lora(model, LoRAConfig(rank=4))
    missing = dict(state)
    del missing["transformer.h.1.mlp.c_fc.lora_B"]
    with pytest.raises(CheckpointError, match=r"missing \['transformer.h.1.mlp.c_fc.lora_B'\]"):
        load_lora_state_dict(model, missing)
    extra = {**state, "lm_head.lora_A": torch.zeros(4, 32)}
    with pytest.raises(CheckpointError, match=r"unexpected \['lm_head.lora_A'\]"):
        load_lora_state_dict(model, extra)
    assert all(torch.count_nonzero(v) == 0 for k, v in lora_state_dict(model).items() if "_B" in k)

    smaller = tiny()
    apply_lora(smaller, LoRAConfig(rank=2))
    with pytest.raises(CheckpointError, match=r"has shape .* needs .*lora.rank"):
        load_lora_state_dict(smaller, state)
    with pytest.raises(CheckpointError, match="no LoRA adapters"):
        load_lora_state_dict(tiny(), state)


# ---------------------------------------------------------------------------
# mistakes


@pytest.mark.parametrize(
    "targets, message",
    [
        (
            ["c_attn", "q_proj"],
            "lora.targets: 'q_proj' matches no linear layer; "
            "the model has c_attn, c_proj, c_fc, lm_head",
        ),
        (["ln_1"], "lora.targets: 'ln_1' matches no linear layer"),  # a LayerNorm
        (
            ["lm_head"],
            "lora.targets: 'lm_head' selects lm_head, whose weight is tied to transformer.wte",
        ),
    ],
)
def test_bad_targets_raise_and_leave_the_model_alone(targets, message):
    model = tiny()
    with pytest.raises(ConfigError, match=re.escape(message)):
        apply_lora(model, LoRAConfig(targets=targets))
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(rank=0), "lora.rank=0 must be at least 1"),
        (dict(rank=2.0), "lora.rank=2.0 must be an integer"),
        (dict(alpha=0.0), "lora.alpha=0.0 must be a finite number above 0"),
        (dict(alpha=True), "lora.alpha=True must be a number"),
        (dict(dropout=1.0), "lora.dropout=1.0 must be in [0, 1)"),
        (dict(targets=[]), "lora.targets=[] must be a non-empty list"),
        (dict(targets="c_attn"), "lora.targets='c_attn' must be a non-empty list"),
        (dict(targets=["c_fc", ""]), "lora.targets[1]='' must be a layer name"),
    ],
)
def test_bad_config_values_name_the_key(change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        apply_lora(tiny(), LoRAConfig(**change))


def test_applying_twice_is_refused():
    model = tiny()
    apply_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="merge_lora"):
        apply_lora(model, LoRAConfig())
