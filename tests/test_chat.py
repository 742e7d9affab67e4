"""Chat fine-tuning: template tokens, assistant-only loss, windows, `aigc chat`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import aigc
from aigc.data.chat import CHAT_SPECIAL_TOKENS, Message, assistant_mask, render
from aigc.data.tokenizers import (
    CharTokenizer,
    add_special_tokens,
    load_tokenizer,
    train_bpe_tokenizer,
)
from aigc.errors import RequestError
from aigc.models.gpt import GPT, GPTConfig, grow_vocab
from aigc.tasks.chat import as_messages, encode_conversation, windows

from .conftest import run_cli

CONV = [
    Message("system", "Be brief."),
    Message("user", "What does pass do?"),
    Message("assistant", "Nothing at all."),
    Message("user", "And break?"),
    Message("assistant", "It leaves the loop."),
]


@pytest.fixture(scope="module")
def base_run(pretrained_tiny_gpt) -> Path:
    return pretrained_tiny_gpt


def test_char_special_tokens_are_single_ids_after_the_characters(tmp_path):
    base = CharTokenizer("abc <>|\n")
    tok = add_special_tokens(base, CHAT_SPECIAL_TOKENS)
    assert tok.vocab_size == base.vocab_size + 4
    assert tok.encode("ab c") == base.encode("ab c")  # old ids keep their meaning
    ids = tok.encode("<|user|>ab<|end|>\n")
    assert ids[0] == tok.token_to_id("<|user|>") and ids[3] == tok.token_to_id("<|end|>")
    assert len(ids) == 5 and tok.decode(ids) == "<|user|>ab<|end|>\n"
    assert tok.encode("<|a|>") == base.encode("<|a|>")  # not a special: its characters
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.specials == tok.specials and again.encode("a<|end|>") == tok.encode("a<|end|>")
    assert add_special_tokens(tok, CHAT_SPECIAL_TOKENS).vocab_size == tok.vocab_size


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_conversation_ids_equal_the_rendered_text_and_the_mask_its_assistant_spans(kind):
    text, spans = render(CONV)
    if kind == "char":
        tok = add_special_tokens(CharTokenizer(text), CHAT_SPECIAL_TOKENS)
    else:
        tok = add_special_tokens(train_bpe_tokenizer([text] * 5, 300), CHAT_SPECIAL_TOKENS)
    ids, mask, replaced = encode_conversation(tok, CONV)
    assert replaced == 0
    assert ids.tolist() == tok.encode(text)  # message by message == the whole text
    # independent: offsets of each token in the text, then data.chat.assistant_mask
    offsets, pos = [], 0
    for i in ids.tolist():
        piece = tok.decode([i])
        assert text.startswith(piece, pos)
        offsets.append((pos, pos + len(piece)))
        pos += len(piece)
    assert mask.tolist() == assistant_mask(text, spans, offsets).tolist()
    trained = tok.decode(ids[mask].tolist())
    assert trained == "Nothing at all.<|end|>It leaves the loop.<|end|>"


def test_windows_train_every_target_once_with_half_a_context():
    for length, block in [(10, 16), (17, 16), (18, 16), (100, 16), (101, 7), (64, 2)]:
        seen = np.zeros(length, dtype=int)
        for start, end, first in windows(length, block):
            assert end - start <= block + 1
            targets = np.arange(start + 1, end)[first:]  # token positions predicted
            seen[targets] += 1
            if start > 0:
                assert first >= block // 2  # each trained target has half a context or more
        assert seen[0] == 0 and (seen[1:] == 1).all(), (length, block)


def test_grow_vocab_keeps_rows_and_adds_their_mean():
    w = torch.randn(5, 3)
    g = grow_vocab(w, 8)
    assert torch.equal(g[:5], w) and torch.allclose(g[5:], w.mean(0).expand(3, 3))


def test_bad_chat_requests_are_request_errors():
    with pytest.raises(RequestError, match="role 'bot'"):
        as_messages([{"role": "bot", "content": "hi"}])
    with pytest.raises(RequestError, match="empty content"):
        as_messages([{"role": "user", "content": "  "}])
    with pytest.raises(RequestError, match="end with a user message"):
        as_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(RequestError, match="non-empty list"):
        as_messages([])


def test_chat_finetune_grows_the_embedding_and_masks_the_loss(base_run, tmp_path):
    still = ["train.lr=0", "train.min_lr=0", "train.max_steps=1", "train.batch_size=4"]
    out = aigc.finetune(base_run, still, task="chat", run_dir=tmp_path / "c", progress=False)
    chat, base = aigc.load(out.run_dir), aigc.load(base_run)
    assert chat.is_chat and not base.is_chat
    V = base.model.cfg.vocab_size
    assert chat.model.cfg.vocab_size == V + 4
    wte, old = chat.model.transformer.wte.weight, base.model.transformer.wte.weight
    assert torch.equal(wte[:V], old) and torch.allclose(wte[V:], old.mean(0).expand(4, -1))
    # targets: exactly the assistant tokens (contents and end markers), each once
    task = chat.task
    task.load_data()
    meta = json.loads((Path(out.run_dir) / "data" / "meta.json").read_text())
    _, y = task._batch("val", np.arange(len(task.splits["val"][2])))
    kept = y[y >= 0]
    assert len(kept) == meta["val_assistant_tokens"] == int(task.splits["val"][1].sum())
    markers = [chat.tokenizer.token_to_id(t) for t in ("<|user|>", "<|assistant|>", "<|system|>")]
    assert not any(m in kept.tolist() for m in markers)
    assert (kept == chat.tokenizer.token_to_id("<|end|>")).sum() == meta["n_val"]
    meta = json.loads((Path(out.run_dir) / "data" / "meta.json").read_text())
    assert meta["source"] == "pydoc demonstrations" and meta["n_val"] >= 1


def test_a_chat_model_learns_to_answer_and_stop(base_run, tmp_path):
    """A conversations file whose assistant always says the same: after a short full
    fine-tune, greedy decoding says it and stops at the end marker."""
    rows = [{"messages": [{"role": "user", "content": f"question {i} about {w}?"},
                          {"role": "assistant", "content": "yes."}]}
            for i, w in enumerate(["loops", "files", "lists", "sets", "dicts", "types"] * 5)]  # fmt: skip
    data = tmp_path / "yes.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = aigc.finetune(base_run, [f"data.path={data}", "train.max_steps=150", "train.lr=3e-3",
                                   "train.batch_size=16"], task="chat",
                        run_dir=tmp_path / "yes", progress=False)  # fmt: skip
    chat = aigc.load(out.run_dir)
    answer = chat.chat([{"role": "user", "content": "question 99 about loops?"}],
                       max_new_tokens=40, temperature=0)  # fmt: skip
    assert answer == "yes."
    assert out.metrics["loss"] < 0.1  # held-out assistant tokens, nats per token
    r = run_cli("chat", str(out.run_dir), "--temperature", "0", input_text="question 5?\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "assistant> yes." in r.stdout
    r = run_cli("eval", str(out.run_dir))
    assert r.returncode == 0 and "held-out assistant tokens" in r.stdout
    # the run no longer needs its source: it continues, and samples its held-out questions
    data.unlink()
    aigc.train(None, ["train.max_steps=151"], run_dir=out.run_dir, progress=False)
    sample = (Path(out.run_dir) / "samples" / "step-00000151.txt").read_text()
    assert "--- model:\nyes." in sample, sample


def test_bad_conversations_file_stops_before_a_run_exists(base_run, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, '
                    '{"role": "assistant", "content": "hello"}]}\n'
                    '{"messages": [{"role": "robot", "content": "beep"}]}\n')  # fmt: skip
    target = tmp_path / "never"
    r = run_cli("finetune", str(base_run), "--task", "chat", f"data.path={data}",
                "--run-dir", str(target))  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "bad.jsonl:2: message 1 has role 'robot'" in r.stderr
    assert not target.exists()


def test_chat_on_a_plain_gpt_is_refused(base_run):
    gen = aigc.load(base_run)
    with pytest.raises(RequestError, match="not a chat model"):
        gen.chat([{"role": "user", "content": "hi"}])
    r = run_cli("chat", str(base_run), input_text="hi\n")
    assert r.returncode == 2 and "not a chat run" in r.stderr


def test_a_gpt_with_a_grown_vocab_is_the_same_model_on_old_tokens():
    torch.manual_seed(0)
    small = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8)).eval()
    big = GPT(GPTConfig(vocab_size=14, block_size=8, n_layer=1, n_head=2, n_embd=8)).eval()
    state = small.state_dict()
    state["lm_head.weight"] = grow_vocab(state["lm_head.weight"], 14)
    state["transformer.wte.weight"] = state["lm_head.weight"]
    big.load_state_dict(state)
    idx = torch.randint(0, 10, (2, 8))
    torch.testing.assert_close(big(idx)[0][..., :10], small(idx)[0])


def test_a_chat_run_exports_to_transformers_with_its_template(base_run, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aigc.export import export_hf

    out = aigc.finetune(base_run, ["train.max_steps=2", "train.batch_size=4"], task="chat",
                        run_dir=tmp_path / "c", progress=False)  # fmt: skip
    folder = export_hf(out.run_dir, tmp_path / "hf")
    ours = aigc.load(out.run_dir)
    tok = AutoTokenizer.from_pretrained(folder)
    known = "".join(c for c in "What is a list?" if ours.tokenizer.token_to_id(c) is not None)
    messages = [{"role": "user", "content": known}]
    prompt = ours.chat_prompt(messages)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == prompt
    assert tok(text)["input_ids"] == ours.tokenizer.encode(prompt)
    assert tok.eos_token == "<|end|>" and tok.eos_token_id == ours.tokenizer.token_to_id("<|end|>")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    x = torch.tensor([ours.tokenizer.encode(prompt)[-ours.model.cfg.block_size :]])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ours.model(x)[0], atol=1e-4, rtol=0)


def test_lora_chat_trains_the_new_token_rows_only(base_run, tmp_path):
    out = aigc.finetune(base_run, ["train.max_steps=5", "train.batch_size=4"], task="chat",
                        method="lora", lora_rank=2, run_dir=tmp_path / "l", progress=False)  # fmt: skip
    chat, base = aigc.load(out.run_dir), aigc.load(base_run)
    V = base.model.cfg.vocab_size
    wte, old = chat.model.transformer.wte.weight, base.model.transformer.wte.weight
    assert torch.equal(wte[:V], old)  # the base's rows untouched
    assert not torch.allclose(wte[V:], old.mean(0).expand(4, -1))  # the markers' rows learnt
