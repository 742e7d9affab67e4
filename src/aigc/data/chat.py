"""Conversations: a JSON Lines format, a chat template and an assistant-only loss mask.

A conversations file has one JSON object per line (blank lines are skipped)::

    {"messages": [{"role": "user", "content": "What does pass do?"},
                  {"role": "assistant", "content": "Nothing; it is a placeholder."}]}

Roles are ``system``, ``user`` and ``assistant``; every conversation needs at
least one assistant message, the text the model is trained to write. Other
keys of the line's object (an ``id``, a source) are metadata and ignored; a
message has exactly ``role`` and ``content``, since a key we dropped
(``weight``, ``name``, ``tool_calls``) would change what the message means.

The template writes each message as a role marker, the content and an end
marker, and turns are separated by a newline::

    <|system|>You answer questions about Python.<|end|>
    <|user|>What does pass do?<|end|>
    <|assistant|>Nothing; it is a placeholder.<|end|>

The markers (``CHAT_SPECIAL_TOKENS``) must be special tokens of the tokenizer
(e.g. ``hf.add_special_tokens(list(CHAT_SPECIAL_TOKENS))`` on a Hugging Face
tokenizer): each one is then a single id, the model learns to end
its answer by writing ``<|end|>`` (the stop token at inference), and token
boundaries always fall on both sides of a marker, so the assistant spans
below are made of whole tokens. With no text between a role marker and the
content, even content that starts with a space or a newline cannot merge
with template text into one token. Content may not contain a marker (nor
``<|endoftext|>``): it would be read as a turn boundary.

The loss covers the assistant contents and their end markers only: the model
learns to answer, not to predict the user's words or the system prompt.
"""

from __future__ import annotations

import json
import keyword
import os
import random
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aigc.data.text import json_record, normalize_text
from aigc.data.tokenizers import EOS_TOKEN
from aigc.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")
ROLE_MARKERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_MARKER = "<|end|>"
TURN_SEPARATOR = "\n"  # after each end marker; template text, never trained on
CHAT_SPECIAL_TOKENS = (*ROLE_MARKERS.values(), END_MARKER)
RESERVED = (*CHAT_SPECIAL_TOKENS, EOS_TOKEN)  # strings that may not appear in content

_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: str  # "system", "user" or "assistant"
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


Conversation = list[Message]


# --------------------------------------------------------------------------- files


def _message_problem(index: int, message: object) -> str | None:
    """What is wrong with the ``index``-th (1-based) message, or None."""
    if not isinstance(message, dict):
        return (
            f"message {index} is {type(message).__name__}, "
            "expected an object with 'role' and 'content'"
        )
    for key in ("role", "content"):
        if key not in message:
            return f"message {index} has no {key!r}"
    extra = [key for key in message if key not in ("role", "content")]
    if extra:
        return f"message {index} has unknown key {extra[0]!r}; only 'role' and 'content' are read"
    return _content_problem(index, message["role"], message["content"])


def _content_problem(index: int, role: object, content: object) -> str | None:
    if role not in ROLES:
        return f"message {index} has role {role!r}; expected system, user or assistant"
    if not isinstance(content, str):
        return f"message {index} has content of type {type(content).__name__}; expected a string"
    if not content.strip():
        return f"message {index} has empty content"
    if not content.isascii() and _SURROGATE.search(content):
        return f"message {index} has an unpaired surrogate escape in its content"
    for marker in RESERVED:
        if marker in content:
            return (
                f"message {index} contains {marker!r}, a special token of the chat template; "
                "remove it or write it differently"
            )
    return None


def _parse_line(line: str, where: str) -> Conversation:
    record = json_record(line, where, "messages")
    messages = record["messages"]
    if not isinstance(messages, list):
        raise DataError(
            f"{where}: 'messages' is {type(messages).__name__}; expected a list of messages"
        )
    if not messages:
        raise DataError(f"{where}: 'messages' is an empty list")
    conversation = []
    for i, message in enumerate(messages, 1):
        problem = _message_problem(i, message)
        if problem is not None:
            raise DataError(f"{where}: {problem}")
        conversation.append(Message(message["role"], normalize_text(message["content"])))
    if not any(m.role == "assistant" for m in conversation):
        raise DataError(f"{where}: no assistant message; there is nothing to train on")
    return conversation


def read_conversations(path: str | os.PathLike) -> list[Conversation]:
    """Read and validate a JSON Lines file of conversations.

    Each non-blank line is ``{"messages": [{"role": ..., "content": ...}, ...]}``.
    Contents are normalised like other text (``\\n`` newlines, NFC). Any
    mistake raises DataError naming the file, the line and the message
    (1-based), e.g. ``chat.jsonl:7: message 2 has role 'bot'; expected
    system, user or assistant``.
    """
    name = str(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed by the with below; open errors reworded)
    except OSError as e:
        raise DataError(f"{name}: cannot read ({e.strerror})") from None
    conversations = []
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"{name}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: invalid UTF-8 at byte {e.start} of the line") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if line.strip():
                conversations.append(_parse_line(line, where))
    if not conversations:
        raise DataError(f"{name}: no conversations (the file is empty or blank)")
    return conversations


def write_conversations(path: str | os.PathLike, conversations: Sequence[Conversation]) -> None:
    """Write conversations as JSON Lines that ``read_conversations`` reads back."""
    with open(path, "w", encoding="utf-8") as f:
        for conversation in conversations:
            record = {"messages": [m.to_dict() for m in conversation]}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- template


def render(
    messages: Sequence[Message], add_generation_prompt: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """The chat template: (text, assistant spans).

    Each message becomes ``<|role|>content<|end|>\\n``. ``spans`` holds one
    half-open character range ``(start, end)`` per assistant message, covering
    its content and its ``<|end|>`` marker: ``text[start:end] == content + "<|end|>"``.
    With ``add_generation_prompt`` the text ends with ``<|assistant|>``, the
    prompt from which a model writes the next answer.
    """
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for i, message in enumerate(messages, 1):
        problem = (
            _content_problem(i, message.role, message.content)
            if isinstance(message, Message)
            else f"message {i} is {type(message).__name__}, expected a Message"
        )
        if problem is not None:
            raise DataError(f"render: {problem}")
        marker = ROLE_MARKERS[message.role]
        start = pos + len(marker)
        end = start + len(message.content) + len(END_MARKER)
        if message.role == "assistant":
            spans.append((start, end))
        parts += [marker, message.content, END_MARKER, TURN_SEPARATOR]
        pos = end + len(TURN_SEPARATOR)
    if add_generation_prompt:
        parts.append(ROLE_MARKERS["assistant"])
    return "".join(parts), spans


def assistant_mask(
    text: str, spans: Sequence[tuple[int, int]], offsets: Sequence[tuple[int, int]] | np.ndarray
) -> np.ndarray:
    """Which tokens are trained on: a (T,) bool array.

    offsets: (T, 2) character offsets ``(start, end)`` of each token in
        ``text``, as a tokenizer reports them (``Encoding.offsets`` in
        Hugging Face ``tokenizers``).

    Boundary rule: token t is trained on iff it lies entirely inside one
    assistant span, ``span_start <= start and end <= span_end``, and covers at
    least one character. A token that straddles a span edge is not trained on
    (it would teach the model to write template or user text); tokens with
    empty offsets, such as a BOS id added by a post-processor, are not either.
    With the chat markers as special tokens no token straddles an edge. The
    mask is over tokens, not over next-token targets: in a causal LM the
    target at position t is token t + 1, so the loss mask is ``mask[1:]``.
    """
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if len(offsets) and (offsets.min() < 0 or offsets.max() > len(text)):
        raise ValueError(f"token offsets must lie in [0, {len(text)}], the text's length")
    bounds = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    if len(bounds) and (
        bounds.min() < 0
        or bounds.max() > len(text)
        or np.any(bounds[:, 0] > bounds[:, 1])
        or np.any(bounds[1:, 0] < bounds[:-1, 1])
    ):
        raise ValueError("spans must be sorted, non-overlapping (start, end) ranges in the text")
    start, end = offsets[:, 0], offsets[:, 1]
    if len(bounds) == 0:
        return np.zeros(len(offsets), dtype=bool)
    # The last span that starts at or before each token's start, if any.
    k = np.searchsorted(bounds[:, 0], start, side="right") - 1
    span_end = np.where(k >= 0, bounds[np.maximum(k, 0), 1], -1)
    return (k >= 0) & (end <= span_end) & (end > start)


# --------------------------------------------------------------------------- pydoc


QUESTION_TEMPLATES = (
    "Can you explain {subject} in Python?",
    "Tell me about {subject} in Python.",
    "What does the Python documentation say about {subject}?",
    "I'm learning Python. What should I know about {subject}?",
    "Please give me a short explanation of {subject} in Python.",
)
MAX_ANSWER_CHARS = 1000


def _is_heading(paragraph: str) -> bool:
    lines = paragraph.split("\n")
    rule = lines[-1].strip()
    return len(lines) == 2 and len(set(rule)) == 1 and rule[0] in "=*-^~"


_SIGNATURE = re.compile(r"[\w.]+\(.*\)")  # object.__call__(self[, args...])
_LIST_ITEM = re.compile(r"(\* |- |\d+\. )")
_NOTE = re.compile(r"(New|Changed) in version|Deprecated since|\*\*Source code:\*\*")


def _is_prose(paragraph: str) -> bool:
    """A paragraph of sentences: not a heading, grammar, code, signature, list or note."""
    lines = paragraph.split("\n")
    return not (
        paragraph[:1].isspace()  # grammar and code blocks are indented
        or _is_heading(paragraph)
        or "::=" in paragraph
        or _NOTE.match(lines[0])
        or _SIGNATURE.fullmatch(lines[0])
        or _LIST_ITEM.match(lines[0])
        or any(line[:1].isspace() for line in lines[1:])  # a definition-list entry
        or len(paragraph.split()) < 6
    )


def _is_block(paragraph: str) -> bool:
    """Grammar, code or a list item, as a colon at the end of a paragraph introduces."""
    return paragraph[:1].isspace() or bool(_LIST_ITEM.match(paragraph))


def _clean_prose(paragraph: str) -> str:
    """One line of plain text: wrapped lines joined, emphasis stars and footnote marks removed."""
    text = " ".join(line.strip() for line in paragraph.split("\n"))
    text = re.sub(r"\*\*(\S[^*]*?)\*\*", r"\1", text)  # **PEP 3131**
    text = re.sub(r"(?<![\w*])\*(?=\S)([^*]+?)(?<=\S)\*(?![\w*])", r"\1", text)  # *coroutine*
    text = re.sub(r"\s*\[\d+\]", "", text)  # footnote references
    text = re.sub(r"(?<=\w)- (?=[a-z])", "-", text)  # hyphen at a line end: "non- numeric"
    return re.sub(r" {2,}", " ", text).strip()


def _last_sentence_end(text: str, limit: int) -> int:
    """Index just after the last ". " sentence end before ``limit``; 0 if none."""
    cut = text.rfind(". ", 0, limit)
    return cut + 1 if cut > 0 else 0


def _topic_answer(text: str, max_chars: int) -> str | None:
    """The opening prose paragraph of a topic, cleaned; None if it has none.

    When the paragraph ends with a colon that introduces grammar, code or a
    list, those paragraphs follow it if the whole fits in ``max_chars``;
    otherwise the answer ends at the last full sentence before the colon.
    Topics that open with a method signature (``object.__call__(self[,
    args...])``) answer with the signature and its description.
    """
    paragraphs = [p for p in re.split(r"\n[ \t]*\n", text.strip("\n")) if p.strip()]
    body = paragraphs[1:]  # paragraphs[0] is the heading
    lead = ""
    first = next((i for i, p in enumerate(body) if _is_prose(p)), None)
    if first is None:
        first = next(
            (
                i + 1
                for i, p in enumerate(body[:-1])
                if _SIGNATURE.fullmatch(p.strip()) and body[i + 1][:1].isspace()
            ),
            None,
        )
        if first is None:
            return None
        lead = body[first - 1].strip() + "\n\n"
    answer = lead + _clean_prose(textwrap.dedent(body[first]))
    if answer.endswith(":"):
        block = []
        for p in body[first + 1 :]:
            if not _is_block(p):
                break
            block.append(textwrap.dedent(p).strip("\n") if p[:1].isspace() else _clean_prose(p))
        whole = "\n\n".join([answer, *block])
        if block and len(whole) <= max_chars:
            return whole
    if not answer.endswith((".", "!", "?", ")", '"', "”")) and _last_sentence_end(
        answer, len(answer)
    ):
        answer = answer[: _last_sentence_end(answer, len(answer))]  # no dangling colon or clause
    if len(answer) > max_chars:
        cut = _last_sentence_end(answer, max_chars)
        answer = answer[:cut] if cut else answer[: max_chars - 1] + "…"
    return answer


def _topic_heading(text: str) -> str:
    """The first line of a topic: its title, e.g. 'Augmented assignment statements'."""
    return text.strip().split("\n", 1)[0].strip()


def _topic_subject(key: str, heading: str) -> str:
    """How a question names the topic: the keyword itself, or its heading in lower case."""
    if keyword.iskeyword(key) or keyword.issoftkeyword(key):
        return f'the "{key}" keyword'
    words = heading.split()
    # "The Null Object" -> "the null object", but keep names such as "Python" and "pdb".
    return " ".join(
        w if w in ("Python", "Unicode") or w.startswith('"') else w.lower() for w in words
    )


def pydoc_demonstrations(
    seed: int = 0, system: str | None = None, max_answer_chars: int = MAX_ANSWER_CHARS
) -> list[Conversation]:
    """Question-and-answer conversations built from the Python documentation topics.

    For every topic of ``pydoc_data.topics`` (sorted by key): a user question
    naming it (a keyword as ``the "with" keyword``, other topics by their
    heading, e.g. ``augassign`` -> "augmented assignment statements"), in one
    of ``QUESTION_TEMPLATES`` chosen by ``seed``, and as the answer the
    topic's opening prose paragraph, cleaned (see ``_topic_answer``) and at
    most ``max_answer_chars`` characters. ``system``, when given, opens each
    conversation. Deterministic for a given seed and Python version.
    """
    from pydoc_data.topics import topics

    if isinstance(max_answer_chars, bool) or not isinstance(max_answer_chars, int):
        raise ConfigError(f"max_answer_chars must be an integer, got {max_answer_chars!r}")
    if max_answer_chars < 20:
        raise ConfigError(f"max_answer_chars must be at least 20, got {max_answer_chars}")
    rng = random.Random(seed)
    conversations = []
    for key in sorted(topics):
        text = normalize_text(topics[key])
        template = rng.choice(QUESTION_TEMPLATES)  # drawn for every topic: stable choices
        answer = _topic_answer(text, max_answer_chars)
        if answer is None:
            continue
        question = template.format(subject=_topic_subject(key, _topic_heading(text)))
        conversation = [Message("system", system)] if system else []
        conversation += [Message("user", question), Message("assistant", answer)]
        conversations.append(conversation)
    return conversations
