"""Conversations: reading JSON Lines, the chat template, the assistant-only mask, pydoc demos."""

from __future__ import annotations

import json
import re
import unicodedata

import numpy as np
import pytest

from aigc.data.chat import (
    CHAT_SPECIAL_TOKENS,
    END_MARKER,
    Message,
    assistant_mask,
    pydoc_demonstrations,
    read_conversations,
    render,
    write_conversations,
)
from aigc.data.tokenizers import BPETokenizer, train_bpe_tokenizer
from aigc.errors import ConfigError, DataError

GOOD = {
    "messages": [
        {"role": "system", "content": "You answer questions about Python."},
        {"role": "user", "content": "What does pass do?"},
        {"role": "assistant", "content": "Nothing; it is a placeholder."},
        {"role": "user", "content": "And   del?"},
        {"role": "assistant", "content": " It unbinds names.\n\nSee also: caf\u00e9, \U0001f40d."},
    ]
}


def conversation(*turns: tuple[str, str]) -> list[Message]:
    return [Message(role, content) for role, content in turns]


# --------------------------------------------------------------------------- files


def test_good_file_parses_skipping_blank_lines_and_metadata(tmp_path):
    path = tmp_path / "chat.jsonl"
    second = {
        "id": 7,  # metadata is ignored
        "messages": [
            {"role": "user", "content": "cafe\u0301\r\nline two"},
            {"role": "assistant", "content": "ok"},
        ],
    }
    lines = [json.dumps(GOOD), "", "   ", json.dumps(second)]
    path.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    convs = read_conversations(path)
    assert len(convs) == 2
    assert convs[0] == [Message(m["role"], m["content"]) for m in GOOD["messages"]]
    assert convs[1] == conversation(("user", "caf\u00e9\nline two"), ("assistant", "ok"))
    # Round trip through write_conversations.
    out = tmp_path / "out.jsonl"
    write_conversations(out, convs)
    assert read_conversations(out) == convs


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"messages": [', "not valid JSON"),
        ('["messages"]', "expected a JSON object, got list"),
        ('{"turns": []}', "no field 'messages'"),
        ('{"messages": "hello"}', "'messages' is str; expected a list of messages"),
        ('{"messages": []}', "'messages' is an empty list"),
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}',
            "message 2 has role 'bot'; expected system, user or assistant",
        ),
        ('{"messages": [{"role": "assistant", "content": ""}]}', "message 1 has empty content"),
        (
            '{"messages": [{"role": "assistant", "content": " \\n "}]}',
            "message 1 has empty content",
        ),
        ('{"messages": [{"role": "assistant", "content": 3}]}', "content of type int"),
        ('{"messages": [{"content": "x"}]}', "message 1 has no 'role'"),
        ('{"messages": ["hi"]}', "message 1 is str, expected an object"),
        (
            '{"messages": [{"role": "assistant", "content": "x", "weight": 0}]}',
            "unknown key 'weight'",
        ),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
        ('{"messages": [{"role": "assistant", "content": "a<|end|>b"}]}', "contains '<|end|>'"),
        (
            '{"messages": [{"role": "assistant", "content": "x\\ud800"}]}',
            "unpaired surrogate",
        ),
    ],
)
def test_bad_lines_raise_data_error_with_file_and_line(tmp_path, line, message):
    path = tmp_path / "conversations.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError) as err:
        read_conversations(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)


def test_unreadable_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_conversations(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n \n")
    with pytest.raises(DataError, match="no conversations"):
        read_conversations(empty)
    bad_utf8 = tmp_path / "latin1.jsonl"
    bad_utf8.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"x": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2: invalid UTF-8"):
        read_conversations(bad_utf8)


# --------------------------------------------------------------------------- template


def test_render_spans_cover_exactly_the_assistant_contents_and_end_markers():
    messages = [Message(m["role"], m["content"]) for m in GOOD["messages"]]
    text, spans = render(messages)
    assert text == (
        "<|system|>You answer questions about Python.<|end|>\n"
        "<|user|>What does pass do?<|end|>\n"
        "<|assistant|>Nothing; it is a placeholder.<|end|>\n"
        "<|user|>And   del?<|end|>\n"
        f"<|assistant|>{messages[4].content}<|end|>\n"
    )
    assistants = [m.content for m in messages if m.role == "assistant"]
    assert [text[s:e] for s, e in spans] == [c + END_MARKER for c in assistants]
    # Cutting the spans out leaves the template and the other roles' contents.
    outside = text
    for s, e in reversed(spans):
        outside = outside[:s] + outside[e:]
    assert outside == (
        "<|system|>You answer questions about Python.<|end|>\n"
        "<|user|>What does pass do?<|end|>\n<|assistant|>\n"
        "<|user|>And   del?<|end|>\n<|assistant|>\n"
    )

    # The generation prompt is the training text cut before the last answer.
    prompt, prompt_spans = render(messages[:-1], add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>")
    assert text.startswith(prompt)
    assert prompt_spans == spans[:-1]


def test_render_rejects_bad_messages():
    with pytest.raises(DataError, match="render: message 1 has role 'bot'"):
        render([Message("bot", "hi")])
    with pytest.raises(DataError, match=re.escape("message 2 contains '<|assistant|>'")):
        render(conversation(("user", "hi"), ("assistant", "a <|assistant|> b")))
    with pytest.raises(DataError, match=re.escape("contains '<|endoftext|>'")):
        render(conversation(("user", "x<|endoftext|>")))
    with pytest.raises(DataError, match="expected a Message"):
        render([{"role": "user", "content": "hi"}])  # type: ignore[list-item]


# --------------------------------------------------------------------------- mask


def test_mask_on_per_character_offsets_selects_assistant_characters():
    messages = [Message(m["role"], m["content"]) for m in GOOD["messages"]]
    text, spans = render(messages)
    offsets = [(i, i + 1) for i in range(len(text))]
    mask = assistant_mask(text, spans, offsets)
    assert mask.dtype == bool and mask.shape == (len(text),)
    inside = np.zeros(len(text), dtype=bool)
    for s, e in spans:
        inside[s:e] = True
    assert np.array_equal(mask, inside)
    trained = "".join(c for c, m in zip(text, mask, strict=True) if m)
    assert trained == "".join(m.content + END_MARKER for m in messages if m.role == "assistant")


def test_mask_boundary_rule():
    text = "0123456789"
    spans = [(2, 5), (7, 9)]
    offsets = [(0, 2), (1, 3), (2, 3), (3, 5), (4, 6), (5, 7), (7, 9), (8, 8), (9, 10), (0, 0)]
    # Inside a span, whole: trained. Straddling an edge or empty: not trained.
    expected = [False, False, True, True, False, False, True, False, False, False]
    assert assistant_mask(text, spans, offsets).tolist() == expected
    assert assistant_mask(text, [], offsets).tolist() == [False] * len(offsets)
    assert assistant_mask(text, spans, np.zeros((0, 2), dtype=np.int64)).shape == (0,)
    with pytest.raises(ValueError, match="offsets"):
        assistant_mask(text, spans, [(0, 11)])
    with pytest.raises(ValueError, match="spans"):
        assistant_mask(text, [(5, 7), (2, 4)], offsets)


@pytest.fixture(scope="module")
def chat_bpe() -> BPETokenizer:
    """A small byte-level BPE trained on rendered demonstrations, knowing the chat markers."""
    texts = [render(c)[0] for c in pydoc_demonstrations()[:30]]
    tok = train_bpe_tokenizer(texts, vocab_size=400)
    tok.hf.add_special_tokens(list(CHAT_SPECIAL_TOKENS))
    return BPETokenizer(tok.hf)  # re-wrapped: the vocabulary grew


def test_mask_on_a_real_bpe_tokenizer_trains_exactly_the_answers(chat_bpe):
    hf = chat_bpe.hf
    marker_ids = {hf.token_to_id(t) for t in CHAT_SPECIAL_TOKENS}
    assert None not in marker_ids
    convs = [
        [Message(m["role"], m["content"]) for m in GOOD["messages"]],
        *pydoc_demonstrations(system="Answer briefly.")[:5],
    ]
    for conv in convs:
        text, spans = render(conv)
        enc = hf.encode(text)
        ids = np.array(enc.ids)
        mask = assistant_mask(text, spans, enc.offsets)
        # Each marker is one token, and no token straddles a span edge.
        assert sum(i in marker_ids for i in enc.ids) == 2 * len(conv)
        for a, b in enc.offsets:
            assert not any(a < s < b or a < e < b for s, e in spans)
        # The trained tokens decode to exactly the answers and their end markers.
        answers = "".join(text[s:e] for s, e in spans)
        assert chat_bpe.decode(ids[mask]) == answers
        assert int((ids[mask] == hf.token_to_id(END_MARKER)).sum()) == len(spans)
        # Every character of every span is covered by a trained token.
        covered = np.zeros(len(text), dtype=bool)
        for (a, b), m in zip(enc.offsets, mask, strict=True):
            covered[a:b] |= bool(m)
        assert all(covered[s:e].all() for s, e in spans)
        assert covered.sum() == sum(e - s for s, e in spans)


# --------------------------------------------------------------------------- pydoc


def squash(text: str) -> str:
    """Whitespace collapsed and emphasis stars dropped, to compare cleaned and raw text."""
    return " ".join(text.replace("*", "").split())


def test_pydoc_demonstrations_are_deterministic_and_readable():
    from pydoc_data.topics import topics

    demos = pydoc_demonstrations()
    assert demos == pydoc_demonstrations(seed=0)
    assert len(demos) >= 0.9 * len(topics)
    keys = sorted(topics)  # demonstrations follow the sorted topic keys
    for conv in demos:
        assert [m.role for m in conv] == ["user", "assistant"]
        question, answer = conv[0].content, conv[1].content
        assert 20 <= len(answer) <= 1000
        assert answer == unicodedata.normalize("NFC", answer)
        assert "  " not in answer.split("\n")[0]  # wrapped lines joined, spaces collapsed
        render(conv)  # no reserved marker anywhere
    # Each question names its topic (a keyword, or the topic's heading), and the
    # answer opens with that topic's text.
    headings = {k: topics[k].strip().split("\n", 1)[0].lower() for k in keys}
    for conv in demos:
        question, answer = conv[0].content, conv[1].content
        named = [k for k in keys if f'"{k}" keyword' in question or headings[k] in question.lower()]
        assert any(squash(answer)[:25] in squash(topics[k]) for k in named), question
    questions = [c[0].content for c in demos]
    assert any('"with" keyword' in q for q in questions)
    assert any("augmented assignment statements" in q for q in questions)

    other = pydoc_demonstrations(seed=1)
    assert [c[1] for c in other] == [c[1] for c in demos]  # same answers
    assert [c[0] for c in other] != [c[0] for c in demos]  # other phrasings
    with_system = pydoc_demonstrations(system="You are a Python tutor.")
    assert all(c[0] == Message("system", "You are a Python tutor.") for c in with_system)
    assert all(len(c[1].content) <= 300 for c in pydoc_demonstrations(max_answer_chars=300))
    with pytest.raises(ConfigError, match="max_answer_chars"):
        pydoc_demonstrations(max_answer_chars=5)
