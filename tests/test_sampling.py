"""Sampling: each strategy against an independent computation, text out, parameters."""

from __future__ import annotations

import pytest
import torch

from aigc.data.tokenizers import CharTokenizer, train_bpe_tokenizer
from aigc.errors import RequestError
from aigc.models.gpt import GPT, GPTConfig
from aigc.sampling import (
    BatchDecoder,
    SamplingParams,
    apply_repetition_penalty,
    choose_next,
    generate,
    stream,
    stream_batch,
    top_k_filter,
    top_p_filter,
)
from aigc.sampling.text import _Row

CHARS = "abcdefghijklmnopqrstuvwxyz .\n"
GREEDY = SamplingParams(max_new_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer(CHARS)


def tiny(vocab: int, block: int = 32, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        # Weights far larger than GPT-2's init make a model whose next token depends
        # strongly on the context: greedy text varies, and the top two logits stay
        # far apart compared with float32 rounding, so paths can be compared exactly.
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.35)
    return model.eval()


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    return tiny(tok.vocab_size)


def reference_greedy(model: GPT, ids: list[int], n: int) -> list[int]:
    """Greedy decoding with the full forward at every step, cropping the context as
    the sampler does: when `block` tokens are in context, keep the last block // 2."""
    block = model.cfg.block_size
    ctx, out = ids[-block:], []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ctx]))
            token = int(logits[0, -1].argmax())
            out.append(token)
            ctx = [*ctx, token]
            if len(ctx) > block:
                ctx = ctx[-(block // 2) :]
    return out


def test_greedy_is_argmax_of_full_forward(model, tok):
    prompt = "the cat sat"
    expected = tok.decode(reference_greedy(model, tok.encode(prompt), 24))
    assert generate(model, tok, prompt, GREEDY) == [expected]


def test_greedy_past_block_size_recrops_context(tok):
    model = tiny(tok.vocab_size, block=16)
    prompt = "a long prompt longer than the block"
    expected = tok.decode(reference_greedy(model, tok.encode(prompt), 70))
    (text,) = generate(model, tok, prompt, SamplingParams(max_new_tokens=70, temperature=0))
    assert len(text) == 70
    assert text == expected


def test_top_k_1_and_tiny_top_p_are_greedy(model, tok):
    greedy = generate(model, tok, "hello", GREEDY)
    base = dict(max_new_tokens=24, temperature=1.3, seed=5)
    assert generate(model, tok, "hello", SamplingParams(top_k=1, **base)) == greedy
    assert generate(model, tok, "hello", SamplingParams(top_p=1e-6, **base)) == greedy


def test_seed_makes_sampling_reproducible(model, tok):
    def sample(seed):
        return generate(model, tok, ["one", "two"], SamplingParams(max_new_tokens=40, seed=seed))

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    # each row draws from its own generator: a seeded row does not depend on its batch
    one = generate(model, tok, "two", SamplingParams(max_new_tokens=40, seed=1))
    assert one == sample(1)[1:]
    torch.manual_seed(0)  # without a seed, torch's global generator decides
    a = generate(model, tok, "x", SamplingParams(max_new_tokens=40))
    torch.manual_seed(0)
    assert generate(model, tok, "x", SamplingParams(max_new_tokens=40)) == a


def test_temperature_samples_follow_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(40_000, 4)
    torch.manual_seed(0)
    for t in (0.5, 2.0):
        picks = choose_next(logits, SamplingParams(temperature=t))
        freq = torch.bincount(picks, minlength=4).double() / len(picks)
        torch.testing.assert_close(freq, (logits[0].double() / t).softmax(-1), atol=0.01, rtol=0)


def test_filters_against_a_direct_computation():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    inf = float("-inf")
    assert top_k_filter(logits, 2).tolist() == [[inf, 3.0, inf, 2.0, inf]]
    assert top_k_filter(logits, 9).tolist() == logits.tolist()
    probs = logits.softmax(-1)[0].tolist()  # sorted: 3.0 (.63), 2.0 (.23), 0.5, 0.1, -1.0
    p = probs[1] + probs[3] - 1e-3  # the two most likely tokens hold just over p
    assert top_p_filter(logits, p).tolist() == [[inf, 3.0, inf, 2.0, inf]]
    assert top_p_filter(logits, probs[1] - 1e-3).tolist() == [[inf, 3.0, inf, inf, inf]]
    seen = torch.tensor([[True, True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    torch.testing.assert_close(out, torch.tensor([[0.05, 1.5, -2.0, 2.0, 0.5]]))


def test_repetition_penalty_breaks_a_greedy_loop(model, tok):
    (plain,) = generate(model, tok, "hello", GREEDY)
    assert "oooo" in plain  # this model and prompt repeat themselves
    params = SamplingParams(max_new_tokens=24, temperature=0, repetition_penalty=3.0)
    (penalized,) = generate(model, tok, "hello", params)
    assert penalized != plain
    assert len(set(penalized)) > 2 * len(set(plain))


def test_stop_strings_cut_the_text_and_never_appear(model, tok):
    params = SamplingParams(max_new_tokens=60, seed=3)
    (full,) = generate(model, tok, "go", params)
    stop = full[10:13]
    cut = full[: full.find(stop)]
    params.stop = (stop, "never-there")
    assert generate(model, tok, "go", params) == [cut]
    pieces = list(stream(model, tok, "go", params))
    assert "".join(pieces) == cut
    assert all(stop not in "".join(pieces[: i + 1]) for i in range(len(pieces)))


def test_streamed_pieces_join_to_the_generated_text(model, tok):
    for params in (
        SamplingParams(max_new_tokens=50, seed=11),
        SamplingParams(max_new_tokens=50, seed=11, stop=("zz",)),
    ):
        (text,) = generate(model, tok, "abc", params)
        assert "".join(stream(model, tok, "abc", params)) == text
        pieces = list(stream_batch(model, tok, ["q", "abc"], params))
        assert "".join(d for row, d in pieces if row == 1) == text


def test_batch_of_different_lengths_equals_one_by_one(model, tok):
    # prompt + output within block_size: past it, a batch re-crops all rows at once
    prompts = ["a longer prompt", "hi", "", "mid len"]
    for params in (
        SamplingParams(max_new_tokens=16, temperature=0),
        SamplingParams(max_new_tokens=16, temperature=0.8, top_k=10, top_p=0.9, seed=4),
    ):
        alone = [generate(model, tok, p, params)[0] for p in prompts]
        assert generate(model, tok, prompts, params) == alone
        # a stop string that ends row 0 early: the finished row leaves the batch
        params.stop = (alone[0][3:5],)
        alone = [generate(model, tok, p, params)[0] for p in prompts]
        assert len(alone[0]) <= 3
        assert generate(model, tok, prompts, params) == alone


class EosChars(CharTokenizer):
    """Char tokenizer whose end-of-text id is one of its characters."""

    def __init__(self, chars: str, eos: str):
        super().__init__(chars)
        self.eos_id = self.encode(eos)[0]


def test_eos_ends_a_row_and_starts_an_empty_prompt(model, tok):
    prompts = ["x", "yy", "the", "mid len"]
    free = generate(model, tok, prompts, GREEDY)
    eos = free[0][2]  # a character that the model does produce
    rows = generate(model, EosChars(CHARS, eos), prompts, GREEDY)
    assert rows == [f.split(eos)[0] for f in free]
    assert rows != free
    # an empty prompt starts from eos if there is one, else from "\n"
    assert len(generate(model, EosChars(CHARS, "q"), "", GREEDY)[0]) > 0
    assert len(generate(model, tok, "", GREEDY)[0]) == 24
    with pytest.raises(RequestError, match="empty"):
        generate(model, CharTokenizer(CHARS.replace("\n", "")), "", GREEDY)


def test_max_new_tokens_and_mode_restored(model, tok):
    assert generate(model, tok, ["a", "b"], SamplingParams(max_new_tokens=0)) == ["", ""]
    assert generate(model, tok, [], GREEDY) == []
    model.train()
    try:
        assert generate(model, tok, "a", GREEDY) == generate(model, tok, "a", GREEDY)
        assert model.training
    finally:
        model.eval()
    assert not model.training


def test_incremental_decoding_emits_whole_characters_only():
    text = "héllo wörld ✓ 日本"
    bpe = train_bpe_tokenizer([text], vocab_size=257)  # bytes only: é is two tokens
    ids = bpe.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    row = _Row(0, [0], bpe, stop=(), incremental=True)
    pieces = [row.push(i) for i in ids] + [row.finish()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # some bytes were held back until their character was whole


def test_byte_level_bpe_stream_joins_to_generate():
    text = "naïve café – 日本語 ✓ " * 3
    bpe = train_bpe_tokenizer([text], vocab_size=280)
    model = tiny(bpe.vocab_size, block=24)
    for seed in range(3):  # random bytes: split and invalid UTF-8 sequences happen
        params = SamplingParams(max_new_tokens=60, seed=seed)
        (out,) = generate(model, bpe, "café", params)
        pieces = list(stream(model, bpe, "café", params))
        assert "".join(pieces) == out
        assert all(not p.endswith("\ufffd") for p in pieces[:-1])


def test_tiny_temperature_is_greedy(model, tok):
    params = SamplingParams(max_new_tokens=24, temperature=1e-30, seed=0)
    assert generate(model, tok, "abc", params) == generate(model, tok, "abc", GREEDY)


def test_stop_prefix_is_held_back_while_streaming(tok):
    row = _Row(0, [0], tok, stop=("lo",), incremental=True)
    pieces = [row.push(i) for i in tok.encode("hello")]
    assert pieces == ["h", "e", "", "l", ""]
    assert row.done and row.finish() == ""
    row = _Row(0, [0], tok, stop=("lox",), incremental=True)
    pieces = [row.push(i) for i in tok.encode("hello")] + [row.finish()]
    assert "".join(pieces) == "hello"  # never completed: the held-back "lo" comes out


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"max_new_tokens": 2.0}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"stop": "\n"}, "stop"),
        ({"stop": ("",)}, "stop"),
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),
    ],
)
def test_bad_parameters_raise_request_error(model, tok, change, field):
    params = SamplingParams(**change)
    with pytest.raises(RequestError, match=field):
        params.validate()
    with pytest.raises(RequestError, match=field):
        stream(model, tok, "a", params)  # raises at the call, before any text


def test_bad_prompts_raise_request_error(model, tok):
    with pytest.raises(RequestError, match="encode"):
        generate(model, tok, "UPPER", GREEDY)  # not in the vocabulary
    with pytest.raises(RequestError, match="string"):
        generate(model, tok, [3], GREEDY)


def test_a_row_in_a_mixed_continuous_batch_gives_its_text_alone(model, tok):
    """Rows with their own parameters, joining a running batch at different steps and
    leaving it as they end (stop string, end token, max_new_tokens, cancel), each give
    exactly the text `generate` gives them alone; past block_size too (re-cropping)."""
    P = SamplingParams
    rows = [
        ("a longer prompt", P(max_new_tokens=40, temperature=0)),  # 15 + 40 > block 32
        ("hi", P(max_new_tokens=16, temperature=0.8, top_k=10, top_p=0.9, seed=4)),
        ("", P(max_new_tokens=30, temperature=1.3, seed=7, repetition_penalty=1.5)),
        ("mid len", P(max_new_tokens=60, temperature=1.0, seed=1)),
        ("the cat sat on the mat and it was a very long prompt indeed", P(max_new_tokens=50, seed=9)),
        ("x", P(max_new_tokens=0)),
        ("q", P(max_new_tokens=70, temperature=0, repetition_penalty=2.0)),
        ("go", P(max_new_tokens=60, seed=3)),
    ]  # fmt: skip
    (full,) = generate(model, tok, "go", rows[7][1])
    rows[7][1].stop = (full[10:13],)  # ends early, in the middle of the others
    alone = [generate(model, tok, p, params)[0] for p, params in rows]
    assert len(alone[7]) < 13
    decoder = BatchDecoder(model, tok)
    join_at = {0: [0, 1], 2: [2, 3, 7], 5: [4, 5], 9: [6], 12: [99]}
    texts, ends, sizes, step = {}, {}, [], 0
    while decoder or step <= max(join_at):
        for i in join_at.get(step, []):
            prompt, params = rows[i % len(rows)]
            decoder.add(i, tok.encode(prompt), params, stream=i % 2 == 0)
        if step == 20:
            assert decoder.cancel(99) and not decoder.cancel(99)  # row 99 leaves mid-way
        for event in decoder.step():
            texts[event.key] = texts.get(event.key, "") + event.text
            if event.finish_reason:
                ends[event.key] = (event.finish_reason, event.tokens)
        sizes.append(decoder.last_step_rows)
        step += 1
    assert [texts.get(i, "") for i in range(len(rows))] == alone
    assert max(sizes) >= 6  # they really ran together
    assert ends[0] == ("length", 40) and ends[5] == ("length", 0) and ends[7][0] == "stop"
    assert 99 not in ends  # cancelled rows end silently


def test_the_cache_grows_by_doubling_up_to_max_rows_and_is_kept(model, tok):
    """Rows joining one by one double the cache's slots, never past max_rows; an empty
    batch keeps its slots, and rows that come later decode as alone in them."""
    params = SamplingParams(max_new_tokens=3, temperature=0)
    for max_rows, expected in ((None, [1, 2, 4, 4, 8]), (5, [1, 2, 4, 4, 5])):
        decoder, slots = BatchDecoder(model, tok, max_rows), []
        for i in range(5):
            decoder.add(i, tok.encode("ab"), SamplingParams(max_new_tokens=20, temperature=0))
            decoder.step()
            slots.append(decoder.slots)
        assert slots == expected
        while decoder:
            decoder.step()
        assert decoder.slots == expected[-1]  # kept
        decoder.add("late", tok.encode("cd"), params, stream=False)
        (event,) = decoder.step() + decoder.step() + decoder.step()
        assert event.text == generate(model, tok, "cd", params)[0]


def test_an_end_token_ends_a_row_of_a_mixed_batch(model, tok):
    eos_tok = EosChars(CHARS, generate(model, tok, "x", GREEDY)[0][2])
    decoder = BatchDecoder(model, eos_tok)
    decoder.add("a", eos_tok.encode("x"), GREEDY)
    decoder.add("b", eos_tok.encode("yy"), SamplingParams(max_new_tokens=24, seed=2))
    texts, ends = {"a": "", "b": ""}, {}
    while decoder:
        for event in decoder.step():
            texts[event.key] += event.text
            if event.finish_reason:
                ends[event.key] = (event.finish_reason, event.tokens)
    assert texts["a"] == generate(model, eos_tok, "x", GREEDY)[0] and len(texts["a"]) <= 2
    assert ends["a"] == ("stop", len(texts["a"]) + 1)  # its characters, then the end token
    assert (
        texts["b"] == generate(model, eos_tok, "yy", SamplingParams(max_new_tokens=24, seed=2))[0]
    )
    with pytest.raises(RequestError, match="vocabulary"):
        decoder.add("c", [tok.vocab_size], GREEDY)
    with pytest.raises(RequestError, match="temperature"):
        decoder.add("c", [1], SamplingParams(temperature=-1))
