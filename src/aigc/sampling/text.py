"""Text decoding strategies, shared by the CLI, the Python API and the server.

`generate` returns whole completions, `stream` and `stream_batch` yield text as it
is produced. All three run `BatchDecoder` (aigc.sampling.batching): prefill the KV
cache with the prompts (one cache slot per row), then pick a token per row and feed
it back, one step at a time.

Per step the next-token scores go through, in this order (as in Hugging Face
transformers): a watermark's green-list bias (when one is set), repetition penalty, temperature, top-k, top-p, then a draw from
the softmax (or the argmax when temperature is 0).

Text comes out in whole characters only: each row decodes its new tokens
incrementally and holds back a byte-level token that ends inside a UTF-8
character, and the tail that could still grow into a stop string.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from aigc.errors import AigcError, RequestError
from aigc.models.gpt import GPT


class TokenizerLike(Protocol):
    """What sampling needs of a tokenizer (aigc.data.tokenizers has two)."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the fewest tokens holding this much probability
    repetition_penalty: float = 1.0  # CTRL-style, for tokens in prompt + output; 1 = off
    stop: tuple[str, ...] = ()  # the text ends before the first of these
    seed: int | None = None  # same seed and settings -> same text
    # a key string or aigc.safety.text_watermark.Watermark: green-list watermark (+delta
    # on the keyed green tokens' logits, before the other steps)
    watermark: Any = None

    def validate(self) -> None:
        """Raise RequestError naming the first bad field and its allowed range."""

        def bad(field: str, allowed: str) -> RequestError:
            return RequestError(f"{field}={getattr(self, field)!r} is invalid: must be {allowed}")

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_number(x: object) -> bool:
            return (is_int(x) or isinstance(x, float)) and math.isfinite(x)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise bad("max_new_tokens", "an integer >= 0")
        if not is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", "a number >= 0 (0 = greedy)")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise bad("top_k", "an integer >= 1, or null")
        if self.top_p is not None and (not is_number(self.top_p) or not 0 < self.top_p <= 1):
            raise bad("top_p", "a number in (0, 1], or null")
        if not is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "a number > 0 (1 = off)")
        if isinstance(self.stop, str) or not isinstance(self.stop, tuple | list):
            raise bad("stop", "a list of strings")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "a list of non-empty strings")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise bad("seed", "an integer in [0, 2**63), or null")
        if self.watermark is not None:
            from aigc.safety.text_watermark import as_watermark

            self.watermark = as_watermark(self.watermark)


def generate(
    model: GPT,
    tokenizer: TokenizerLike,
    prompts: str | list[str],
    params: SamplingParams | None = None,
) -> list[str]:
    """Complete each prompt; returns the completions only (no prompt), stop strings cut.

    A single string counts as a batch of one. Prompts of different lengths run
    together, each in its own cache slot, with the same results as one by one (each
    row re-crops its context when it alone would).
    """
    prompts = [prompts] if isinstance(prompts, str) else prompts
    texts = [""] * len(prompts)
    for row, delta in _start(model, tokenizer, prompts, params, stream=False):
        texts[row] += delta
    return texts


def stream(
    model: GPT, tokenizer: TokenizerLike, prompt: str, params: SamplingParams | None = None
) -> Iterator[str]:
    """Yield the completion of `prompt` in pieces as tokens are produced; the pieces
    join to what `generate` returns. Bad parameters raise here, before any text."""
    pieces = _start(model, tokenizer, [prompt], params, stream=True)
    return (delta for _, delta in pieces)


def stream_batch(
    model: GPT, tokenizer: TokenizerLike, prompts: list[str], params: SamplingParams | None = None
) -> Iterator[tuple[int, str]]:
    """Yield (index of the prompt, text piece) as the rows of a batch produce text.
    Bad parameters raise here, before any text."""
    return _start(model, tokenizer, prompts, params, stream=True)


def _start(
    model: GPT,
    tokenizer: TokenizerLike,
    prompts: list[str],
    params: SamplingParams | None,
    stream: bool,
) -> Iterator[tuple[int, str]]:
    # checks run now; the returned generator does the work lazily
    params = params or SamplingParams()
    params.validate()
    if not isinstance(prompts, list | tuple):
        raise RequestError(f"prompts must be a string or a list of strings, got {prompts!r}")
    prompt_ids = [encode_prompt(tokenizer, p, model.cfg.vocab_size) for p in prompts]
    return _decode(model, tokenizer, prompt_ids, params, stream)


# ---------------------------------------------------------------------------
# choosing the next token


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL (Keskar et al. 2019, sec. 4.1): make every seen token less likely by dividing
    a positive score by `penalty` and multiplying a negative one. logits, seen (B, V)."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Set all but the k highest scores of each row to -inf. logits (B, V)."""
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter (Holtzman et al. 2020): keep the fewest most likely tokens whose
    probabilities sum to at least p; the most likely token always stays. logits (B, V)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    # drop a token when the tokens ranked above it already hold p of the probability
    drop = probs.cumsum(dim=-1) - probs >= p
    sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
    return logits.scatter(-1, order, sorted_logits)  # back to vocabulary order


def choose_next(
    logits: Tensor,
    params: SamplingParams,
    generators: Sequence[torch.Generator | None] | None = None,
    seen: Tensor | None = None,
) -> Tensor:
    """Next token per row (B,) from scores (B, V).

    generators: one per row (seeded sampling; a None entry draws that row from torch's
    global generator), or None for torch's global generator for the whole batch.
    seen: (B, V) bool, tokens already in prompt + output (repetition penalty).
    """
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    if params.temperature != 1.0:
        # minus the max first: a tiny temperature then gives -inf, never inf - inf
        logits = (logits - logits.amax(dim=-1, keepdim=True)) / params.temperature
    if params.top_k is not None:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p is not None:
        logits = top_p_filter(logits, params.top_p)
    probs = logits.softmax(dim=-1)  # (B, V)
    # Exponential race (the Gumbel-max trick): with E_i ~ Exp(1), argmax p_i / E_i
    # is token i with probability p_i. It is a few times cheaper than
    # torch.multinomial, and drawing each row's E from its own generator makes a
    # seeded row give the same text whatever else is in the batch.
    race = torch.empty_like(probs)
    if generators is None:
        race.exponential_()
    else:
        for row, generator in zip(race, generators, strict=True):
            row.exponential_(generator=generator)
    # an exact 0 would make p / E = 0 / 0 for a filtered token
    return (probs / race.clamp_(min=torch.finfo(race.dtype).tiny)).argmax(dim=-1)


# ---------------------------------------------------------------------------
# text out: incremental decoding and stop strings


def _stop_prefix_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the start of a stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class _MemoDecode:
    """A tokenizer's `decode`, remembered for runs of up to `max_ids` ids.

    Incremental decoding decodes one or two new ids per row and step, mostly runs seen
    before, and a tokenizer's call (numpy for the char tokenizer) costs far more than a
    dictionary look-up, in the thread that must share the GIL with the server's event
    loop. Decoding is a pure function of the ids, so the text is the same. At most
    `max_entries` runs are kept; then it starts over.
    """

    def __init__(self, tokenizer: TokenizerLike, max_ids: int = 4, max_entries: int = 16_384):
        self.tokenizer = tokenizer
        self.max_ids = max_ids
        self.max_entries = max_entries
        self._texts: dict[tuple[int, ...], str] = {}

    def decode(self, ids: Sequence[int]) -> str:
        if len(ids) > self.max_ids:
            return self.tokenizer.decode(ids)
        key = tuple(ids)
        text = self._texts.get(key)
        if text is None:
            if len(self._texts) >= self.max_entries:
                self._texts.clear()
            text = self._texts[key] = self.tokenizer.decode(ids)
        return text


class _Row:
    """One prompt's continuation: its tokens, its text, and what has been sent.

    With `incremental`, each token is decoded as it comes, the way Hugging Face's
    text-generation-inference does: decode the tokens since the last emitted
    boundary with the previous piece as left context, and emit only when the text
    grew and does not end in U+FFFD (a UTF-8 character still missing bytes).
    Without it (no streaming, no stop strings) the tokens are decoded once at the end.
    """

    def __init__(
        self,
        index: int,
        context: list[int],
        tokenizer: TokenizerLike | _MemoDecode,  # only its decode is used
        stop: Sequence[str],
        incremental: bool,
    ) -> None:
        self.index = index  # position in the caller's list of prompts
        self.context = context  # prompt tokens the model conditions on
        self.ids: list[int] = []  # generated tokens
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.incremental = incremental
        self.text = ""  # decoded so far (cut at a stop string)
        self.sent = 0  # characters of text already handed out
        self.done = False  # a stop string was found
        self._prefix = self._read = 0  # ids[_prefix:_read] decode to _prefix_text
        self._prefix_text = ""

    def push(self, token: int) -> str:
        """Add a generated token; return the text that is now safe to hand out."""
        self.ids.append(token)
        if not self.incremental:
            return ""
        text = self.tokenizer.decode(self.ids[self._prefix :])
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        new = text[len(self._prefix_text) :]
        self._prefix_text = self.tokenizer.decode(self.ids[self._prefix : self._read])
        return self._add_text(new, final=False)

    def finish(self) -> str:
        """The row is over: return all text not yet handed out (without a stop string)."""
        if not self.incremental:
            return self._add_text(self.tokenizer.decode(self.ids), final=True)
        new = ""
        if self._read < len(self.ids):  # tokens held back for an unfinished character
            new = self.tokenizer.decode(self.ids[self._prefix :])[len(self._prefix_text) :]
            self._read = len(self.ids)
        return self._add_text(new, final=True)

    def _add_text(self, new: str, final: bool) -> str:
        if self.done:
            return ""
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += new
        # a stop string not seen before must end inside the new text
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.done = True
        safe = len(self.text)
        if not (final or self.done):
            safe -= _stop_prefix_len(self.text, self.stop)  # might still become a stop string
        delta = self.text[self.sent : safe]
        self.sent = max(self.sent, safe)
        return delta


# ---------------------------------------------------------------------------
# prompts and the decoding loop


def encode_prompt(tokenizer: TokenizerLike, prompt: object, vocab: int) -> list[int]:
    """The token ids of a prompt, checked for the model's vocabulary of `vocab` ids;
    RequestError for a prompt that is not a string or cannot be encoded."""
    if not isinstance(prompt, str):
        raise RequestError(f"each prompt must be a string, got {type(prompt).__name__}")
    try:
        ids = list(tokenizer.encode(prompt))
    except AigcError as e:
        raise RequestError(f"cannot encode the prompt: {e}") from None
    if ids and max(ids) >= vocab:
        raise RequestError(
            f"prompt token id {max(ids)} is outside the model's vocabulary of {vocab}; "
            "use the tokenizer the model was trained with"
        )
    if not ids and tokenizer.eos_id is None and len(_newline(tokenizer)) != 1:
        raise RequestError(
            "the prompt is empty and this tokenizer has neither an end-of-text token "
            "nor a newline to start from; give a prompt of at least one character"
        )
    return ids


def _newline(tokenizer: TokenizerLike) -> list[int]:
    try:
        return list(tokenizer.encode("\n"))
    except AigcError:  # "\n" is not in a char vocabulary
        return []


def _decode(
    model: GPT,
    tokenizer: TokenizerLike,
    prompt_ids: list[list[int]],
    params: SamplingParams,
    stream: bool,
) -> Iterator[tuple[int, str]]:
    """Yield (prompt index, text piece); without `stream` each row yields once, at its end."""
    from aigc.sampling.batching import BatchDecoder  # built on this module's rows

    if not prompt_ids or params.max_new_tokens == 0:
        return
    decoder = BatchDecoder(model, tokenizer)
    for i, ids in enumerate(prompt_ids):
        decoder.add(i, ids, params, stream)
    while decoder:
        for event in decoder.step():
            if event.text:
                yield event.key, event.text
