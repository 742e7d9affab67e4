"""The green-list text watermark: its hash against plain integers, its bias against a
direct computation, the detector's z-test at its nominal level, and the round trip
through sampling, the pipeline, the CLI and the server."""

from __future__ import annotations

import hashlib
import json
import math
import random

import pytest
import torch

from aigc.data.tokenizers import CharTokenizer
from aigc.errors import RequestError
from aigc.models.gpt import GPT, GPTConfig
from aigc.safety.text_watermark import (
    TokenHashes,
    Watermark,
    as_watermark,
    bias_logits,
    detect_text,
    hash_texts,
    mix64,
    p_value,
    score_hashes,
    z_for_fpr,
    z_score,
)
from aigc.sampling import BatchDecoder, SamplingParams, generate, stream
from tests.conftest import RECIPE, TINY, run_cli, start_server

CHARS = "abcdefghijklmnopqrstuvwxyz .,\n"
M64 = (1 << 64) - 1


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    pass


def splitmix64(x: int) -> int:
    """splitmix64's finaliser on plain Python integers (the reference)."""
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def unsigned(x: int) -> int:
    return x & M64


def test_mix64_on_tensors_equals_unsigned_integer_arithmetic():
    rng = random.Random(0)
    values = [0, 1, M64, 1 << 63, (1 << 63) - 1] + [rng.getrandbits(64) for _ in range(500)]
    got = mix64(torch.tensor([signed(v) for v in values], dtype=torch.int64)).tolist()
    assert [unsigned(g) for g in got] == [splitmix64(v) for v in values]


def green_by_hand(wm: Watermark, context: list[str], token: str) -> bool:
    """Is `token` after `context` green? From the definition, in plain integers."""

    def text_hash(t: str) -> int:
        raw = int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little")
        return splitmix64(raw ^ unsigned(wm.seed))

    h = unsigned(wm.seed)
    for c in context:
        h = splitmix64(h ^ text_hash(c))
    return (splitmix64(h ^ text_hash(token)) >> 11) < int(wm.gamma * (1 << 53))


def test_green_mask_and_bias_follow_the_definition():
    tok = CharTokenizer(CHARS)
    wm = Watermark("secret", gamma=0.25, delta=2.0, context=3)
    hashes = TokenHashes(tok, wm)
    contexts = [list("the"), list("cat"), list(" a.")]
    ids = torch.tensor([[tok.token_to_id(c) for c in ctx] for ctx in contexts])
    logits = torch.randn(3, tok.vocab_size)
    biased = bias_logits(logits, hashes.table[ids], hashes)
    for row, ctx in enumerate(contexts):
        want = torch.tensor([green_by_hand(wm, ctx, c) for c in tok.chars])
        assert torch.equal(biased[row] - logits[row] > 1.0, want)
        assert torch.allclose((biased[row] - logits[row])[want], torch.tensor(2.0))
        # about gamma of the vocabulary is green (30 tokens: loose)
        assert 1 <= int(want.sum()) <= 16


def test_z_score_and_p_value_against_the_formula_and_scipy():
    from scipy.stats import norm

    assert z_score(50, 100, 0.25) == pytest.approx((50 - 25) / math.sqrt(100 * 0.25 * 0.75))
    for z in (-1.0, 0.0, 2.5, 4.0, 7.0):
        assert p_value(z) == pytest.approx(norm.sf(z), rel=1e-9)
    assert z_for_fpr(1e-3) == pytest.approx(norm.isf(1e-3), abs=1e-6)


def test_unwatermarked_text_is_flagged_at_the_nominal_rate():
    """Texts drawn without the key: the share with z above the 5% threshold is 5%
    within sampling error (2,000 texts: 3 standard errors = 1.5 points)."""
    wm = Watermark("k", context=2)
    rng = random.Random(1)
    threshold = z_for_fpr(0.05)
    flagged = 0
    n = 2000
    for _ in range(n):
        # random text over 40 symbols: repeated n-grams happen and are scored once
        hashes = hash_texts([rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 .,;").encode()
                             for _ in range(120)], wm)  # fmt: skip
        score, _ = score_hashes(hashes, wm, threshold)
        flagged += score.watermarked
    assert abs(flagged / n - 0.05) < 3 * math.sqrt(0.05 * 0.95 / n)


def test_repeated_ngrams_are_scored_once():
    wm = Watermark("k", context=4)
    score = detect_text("abcdefgh" * 40, wm, min_scored=1)
    assert score.tokens == 320
    assert score.scored == 8  # 8 distinct 5-grams in a text of period 8
    marks = [m for _, m in score.token_marks]
    assert marks[:4] == [None] * 4 and sum(m is not None for m in marks) == 8


def watermark_model(vocab: int) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=64, n_layer=1, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.05)  # near-uniform next-token distributions
    return model.eval()


def test_watermarked_samples_are_detected_and_plain_ones_are_not():
    tok = CharTokenizer(CHARS)
    model = watermark_model(tok.vocab_size)
    marked = generate(model, tok, ["the "] * 4, SamplingParams(max_new_tokens=200, seed=3,
                                                              watermark="k1"))  # fmt: skip
    plain = generate(model, tok, ["the "] * 4, SamplingParams(max_new_tokens=200, seed=3))
    for text in marked:
        score = detect_text(text, "k1")  # a character-level run: no run needed
        assert score.z > 4 and score.watermarked and score.green_fraction > 0.4
        assert not detect_text(text, "another key").watermarked
    for text in plain:
        assert detect_text(text, "k1").z < 4


def test_watermark_works_with_every_sampling_option_and_in_a_mixed_batch():
    tok = CharTokenizer(CHARS)
    model = watermark_model(tok.vocab_size)
    params = SamplingParams(max_new_tokens=200, temperature=0.9, top_k=20, top_p=0.95,
                            repetition_penalty=1.1, seed=5, watermark="k")  # fmt: skip
    alone = generate(model, tok, ["a"], params)[0]
    assert detect_text(alone, "k").z > 4
    # the same row beside unmarked rows and a row with another key gives the same text
    decoder = BatchDecoder(model, tok)
    others = SamplingParams(max_new_tokens=150, seed=9)
    other_key = SamplingParams(max_new_tokens=150, seed=9, watermark="other")
    decoder.add("marked", tok.encode("a"), params, stream=False)
    decoder.add("plain", tok.encode("b"), others, stream=False)
    decoder.add("other", tok.encode("c"), other_key, stream=False)
    texts: dict[str, str] = {}
    while decoder:
        for event in decoder.step():
            texts[event.key] = texts.get(event.key, "") + event.text
    assert texts["marked"] == alone
    assert detect_text(texts["other"], "other").z > 4
    assert detect_text(texts["plain"], "other").z < 4
    # streamed pieces are the same text
    assert "".join(stream(model, tok, "a", params)) == alone


def test_bpe_watermark_is_found_in_the_runs_tokens(tmp_path, corpus_file):
    """A byte-level BPE run: the detector splits the text with the run's tokenizer (text
    re-encoded may split differently from how it was sampled; most tokens survive)."""
    import aigc

    aigc.train(RECIPE, [*TINY, f"data.path={corpus_file}", "train.max_steps=40",
                        "data.tokenizer=bpe", "data.vocab_size=300", "train.eval_every=0"],
               run_dir=tmp_path / "bpe", progress=False)  # fmt: skip
    pipe = aigc.load(tmp_path / "bpe")
    text = pipe.generate("The ", max_new_tokens=200, seed=1, temperature=1.0, watermark="k")
    assert detect_text(text, "k", run=pipe).z > 4
    assert detect_text(text, "k", run=tmp_path / "bpe").z > 4
    assert detect_text(text, "other", run=pipe).z < 4


@pytest.mark.parametrize(
    "text, message",
    [("", "empty"), ("short text", "too short for a verdict")],
)
def test_bad_texts_say_so(text, message):
    with pytest.raises(RequestError, match=message):
        detect_text(text, "k")


@pytest.mark.parametrize(
    "value, message",
    [
        ("", "non-empty"),
        ({"key": "k", "gamma": 1.5}, "gamma"),
        ({"key": "k", "context": 0}, "context"),
        (42, "key string"),
        ({"gamma": 0.5}, "key string"),
    ],
)
def test_bad_watermarks_raise_request_error(value, message):
    with pytest.raises(RequestError, match=message):
        as_watermark(value)


@pytest.fixture(scope="module")
def char_run(tmp_path_factory, corpus_file):
    import aigc

    run = tmp_path_factory.mktemp("wm") / "run"
    aigc.train(RECIPE, [*TINY, f"data.path={corpus_file}", "train.max_steps=3",
                        "train.eval_every=0"], run_dir=run, progress=False)  # fmt: skip
    return run


def test_pipeline_generate_and_cli_sample_and_detect(char_run, tmp_path):
    import aigc

    pipe = aigc.load(char_run)
    text = pipe.generate("The ", max_new_tokens=200, seed=1, watermark="pipeline-key")
    assert aigc.detect_text(text, "pipeline-key", run=char_run).watermarked
    assert not aigc.detect_text(text, "wrong").watermarked

    out = tmp_path / "samples.jsonl"
    done = run_cli("sample", str(char_run), "--n", "2", "--max-new-tokens", "200", "--seed",
                   "4", "--watermark-key", "cli-key", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    samples = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert len(samples) == 2
    (tmp_path / "s.txt").write_text(samples[0], encoding="utf-8")
    key_file = tmp_path / "key.txt"
    key_file.write_text("cli-key\n", encoding="utf-8")
    done = run_cli("detect", "--key-file", str(key_file), "--file", str(tmp_path / "s.txt"),
                   "--run", str(char_run), "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    verdict = json.loads(done.stdout)
    assert verdict["watermarked"] and verdict["z"] > 4
    done = run_cli("detect", "--key", "wrong", "--text", samples[1])
    assert done.returncode == 0 and "not watermarked" in done.stdout
    for args, message in [(("--key", "k", "--text", "too short"), "too short"),
                          (("--key", "k"), "--text or --file"),
                          (("--key-file", str(tmp_path / "missing"), "--text", "x" * 99),
                           "missing")]:  # fmt: skip
        done = run_cli("detect", *args)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_server_watermarks_completions_for_the_openai_client(char_run, tmp_path):
    from openai import OpenAI

    key_file = tmp_path / "serve.key"
    key_file.write_text("server-key", encoding="utf-8")
    proc, url = start_server([str(char_run), "--port", "0", "--watermark-key-file",
                              str(key_file)])  # fmt: skip
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key="none")
        done = client.completions.create(model=char_run.name, prompt=["The ", "A "],
                                         max_tokens=200, seed=2)  # fmt: skip
        for choice in done.choices:
            assert detect_text(choice.text, "server-key").watermarked
        pieces = client.completions.create(model=char_run.name, prompt="The ", max_tokens=200,
                                           seed=3, stream=True)  # fmt: skip
        streamed = "".join(p.choices[0].text for p in pieces)
        assert detect_text(streamed, "server-key").watermarked
    finally:
        proc.terminate()
        proc.wait(10)
