"""Export to Hugging Face transformers and ONNX: the same logits, token ids and greedy text."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import aigc
from aigc.data.tokenizers import CharTokenizer
from aigc.errors import AigcError, CheckpointError, RequestError
from aigc.export import MissingExtraError, char_tokenizer_to_hf, export_hf, export_onnx

from .conftest import RECIPE, ROOT, TINY

# Text the runs learn and the tokenizers must encode alike: newlines, a tab, runs of
# spaces and characters outside ASCII (two- to four-byte UTF-8).
EXTRA = "\tnaïve café — 日本語 ✓ 😀\n\ndef f(x):\n    return x  # done\n\n"
SAMPLE = "def f(x):\n\treturn x  # naïve café — 日本語 ✓ 😀\n\n  end"

RUNS = {
    # enough steps that greedy decoding of the char run is more than one repeated token
    "char": ["train.max_steps=600"],
    "bpe": ["train.max_steps=40", "data.tokenizer=bpe", "data.vocab_size=300"],
    "bias": ["train.max_steps=40", "model.bias=true"],
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models run fastest on one thread (see conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, corpus_file) -> Path:
    path = tmp_path_factory.mktemp("text") / "docs.txt"
    path.write_text(corpus_file.read_text(encoding="utf-8") + EXTRA * 20, encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=list(RUNS))
def gpt_run(request, tmp_path_factory, text_file) -> Path:
    run = tmp_path_factory.mktemp("gpt") / request.param
    overrides = [*TINY, f"data.path={text_file}", "train.eval_every=0", *RUNS[request.param]]
    aigc.train(RECIPE, overrides, run_dir=run, progress=False)
    return run


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory) -> Path:
    """A GAN on unlabelled squares: no domain classifier to train, so a second or two."""
    base = tmp_path_factory.mktemp("gan")
    folder = base / "squares"
    folder.mkdir()
    for i in range(16):
        img = np.zeros((32, 32), np.uint8)
        img[i : i + 8, i : i + 8] = 255
        Image.fromarray(img).save(folder / f"{i:02d}.png")
    run = base / "gan-run"
    overrides = ["model.z_dim=8", "model.hidden=[16,16]", "train.batch_size=8",
                 "train.max_steps=2", "train.checkpoint_every=2", "train.sample_every=0",
                 "train.eval_every=0", f"data.source={folder}"]  # fmt: skip
    aigc.train(ROOT / "configs" / "gan-mlp-digits.yaml", overrides, run_dir=run, progress=False)
    return run


def _ours(run: Path):
    return aigc.load(run, device="cpu")


# ---------------------------------------------------------------------------
# Hugging Face transformers


def test_char_tokenizer_converts_to_the_same_ids():
    ours = CharTokenizer(SAMPLE)
    theirs = char_tokenizer_to_hf(ours)
    assert theirs.encode(SAMPLE).ids == ours.encode(SAMPLE)
    assert theirs.decode(ours.encode(SAMPLE)) == SAMPLE
    with pytest.raises(Exception, match="UNK"):  # like ours, no unknown token to fall back on
        theirs.encode("Z")


def test_hf_model_gives_our_logits(gpt_run, tmp_path):
    out = export_hf(gpt_run, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert config["activation_function"] == "gelu" and config["tie_word_embeddings"]

    ours = _ours(gpt_run)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    block, vocab = ours.model.cfg.block_size, ours.model.cfg.vocab_size
    assert type(theirs).__name__ == "GPT2LMHeadModel"
    text_ids = torch.tensor([ours.tokenizer.encode(SAMPLE)[:block]])
    random_ids = torch.randint(0, vocab, (3, block), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for ids in (text_ids, random_ids, random_ids[:, :5]):
            torch.testing.assert_close(theirs(ids).logits, ours.model(ids)[0], atol=1e-4, rtol=0)


def test_hf_tokenizer_gives_our_ids(gpt_run, tmp_path):
    out = export_hf(gpt_run, tmp_path / "hf")
    ours = _ours(gpt_run).tokenizer
    ids = ours.encode(SAMPLE)
    for theirs in (
        AutoTokenizer.from_pretrained(out),
        PreTrainedTokenizerFast.from_pretrained(out),
    ):
        assert theirs(SAMPLE)["input_ids"] == ids
        assert theirs.decode(ids) == SAMPLE
        assert theirs.eos_token_id == ours.eos_id
    if ours.eos_id is not None:  # BPE: a literal <|endoftext|> is the end-of-text token
        assert theirs("a<|endoftext|>b")["input_ids"] == ours.encode("a<|endoftext|>b")


def test_hf_greedy_generation_equals_ours(gpt_run, tmp_path):
    out = export_hf(gpt_run, tmp_path / "hf")
    ours = _ours(gpt_run)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = "The "
    n = ours.model.cfg.block_size - len(ours.tokenizer.encode(prompt))  # stay within positions
    expected = ours.generate(prompt, max_new_tokens=n, temperature=0)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    got = tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert got == expected
    if gpt_run.name == "char":
        assert len(set(expected)) > 1, "the char run should be trained past one repeated token"


# ---------------------------------------------------------------------------
# ONNX


def test_onnx_gives_our_logits_for_any_batch_and_length(gpt_run, tmp_path):
    path = export_onnx(gpt_run, tmp_path / "model.onnx")
    ours = _ours(gpt_run).model
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    gen = torch.Generator().manual_seed(1)
    for shape in ((1, ours.cfg.block_size), (3, 7)):
        ids = torch.randint(0, ours.cfg.vocab_size, shape, generator=gen)
        (logits,) = session.run(None, {"input_ids": ids.numpy()})
        assert logits.dtype == np.float32 and logits.shape == (*shape, ours.cfg.vocab_size)
        with torch.no_grad():
            np.testing.assert_allclose(logits, ours(ids)[0].numpy(), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------
# Refusals


def test_a_non_gpt_run_is_refused(gan_run, tmp_path):
    for export, out in ((export_hf, tmp_path / "hf"), (export_onnx, tmp_path / "m.onnx")):
        with pytest.raises(CheckpointError, match=r"gan-run.*'gan' run"):
            export(gan_run, out)
        assert not out.exists()


@pytest.fixture(scope="module")
def char_run(tmp_path_factory, text_file) -> Path:
    run = tmp_path_factory.mktemp("gpt") / "small"
    overrides = [*TINY, f"data.path={text_file}", "train.eval_every=0", "train.max_steps=2"]
    aigc.train(RECIPE, overrides, run_dir=run, progress=False)
    return run


def test_existing_output_is_kept_unless_overwrite(char_run, tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    export_hf(char_run, folder)  # an empty folder is fine
    (folder / "README.md").write_text("mine")
    with pytest.raises(RequestError, match="overwrite=True"):
        export_hf(char_run, folder)
    export_hf(char_run, folder, overwrite=True)
    assert (folder / "README.md").read_text() == "mine"  # files not ours are left alone
    assert AutoModelForCausalLM.from_pretrained(folder) is not None

    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"not a model")
    with pytest.raises(RequestError, match="overwrite=True"):
        export_onnx(char_run, onnx_file)
    assert onnx_file.read_bytes() == b"not a model"
    export_onnx(char_run, onnx_file, overwrite=True)
    assert ort.InferenceSession(str(onnx_file)).get_outputs()[0].name == "logits"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_a_missing_extra_names_the_install_command(char_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'aigc\[export\]'") as caught:
        export_onnx(char_run, tmp_path / "m.onnx")
    assert isinstance(caught.value, ImportError) and isinstance(caught.value, AigcError)
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export_writes_both_formats_and_refuses_bad_requests(char_run, tmp_path):
    from .conftest import run_cli

    r = run_cli("export", str(char_run), "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
    assert r.returncode == 0 and (tmp_path / "m.onnx").stat().st_size > 0, r.stderr
    r = run_cli("export", str(char_run), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0 and (tmp_path / "hf" / "config.json").is_file(), r.stderr
    r = run_cli("export", str(char_run), "--format", "gguf", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "choose hf or onnx" in r.stderr, r.stderr
    r = run_cli("export", str(char_run), "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
    assert r.returncode == 2 and "overwrite" in r.stderr and "Traceback" not in r.stderr
