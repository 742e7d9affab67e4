"""Text decoding strategies, shared by the CLI, the Python API and the server.

`generate` returns whole completions, `stream` and `stream_batch` yield text as it
is produced. All three run `BatchDecoder`: prefill the KV cache with the prompts
(one cache slot per row), then pick a token per row and feed it back, one step at a
time. The decoder also takes rows with parameters of their own that join and leave a
running batch between steps (continuous batching, as the HTTP server uses it).

Per step the next-token scores go through, in this order (as in Hugging Face
transformers): repetition penalty, temperature, top-k, top-p, then a draw from
the softmax (or the argmax when temperature is 0).

Text comes out in whole characters only: each row decodes its new tokens
incrementally and holds back a byte-level token that ends inside a UTF-8
character, and the tail that could still grow into a stop string.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from aigc.errors import AigcError, RequestError
from aigc.models.gpt import GPT, KVCache


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
# the decoding loop


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


def _forward_rows(model: GPT, cache: KVCache, first: int, windows: list[list[int]]) -> Tensor:
    """Feed each window (non-empty) into its slot from `first`, right-padded together;
    each row's next-token logits (R, 1, V). Joining rows and re-cropped rows use it."""
    width = max(len(w) for w in windows)
    device = cache.kv[0].device
    idx = torch.tensor([w + [0] * (width - len(w)) for w in windows], device=device)
    lengths = None if all(len(w) == width for w in windows) else [len(w) for w in windows]
    return model.forward_cached(idx, cache, first, lengths, last_only=True)


@dataclass
class DecodeEvent:
    """What one step of a BatchDecoder did for one row."""

    key: Hashable  # the row's key, as given to BatchDecoder.add
    text: str  # text that is now safe to hand out ("" when none)
    finish_reason: str | None = None  # None: the row goes on; "stop" (end token or stop
    # string) or "length" (max_new_tokens reached): the row is over and has left the batch
    tokens: int = 0  # tokens generated for the row so far (an end token included)


class _LiveRow(_Row):
    """A row of a BatchDecoder: its text state plus its own sampling parameters."""

    def __init__(
        self,
        key: Hashable,
        prompt_ids: list[int],
        context: list[int],
        tokenizer: TokenizerLike | _MemoDecode,
        params: SamplingParams,
        generator: torch.Generator | None,
        incremental: bool,
    ) -> None:
        super().__init__(key, context, tokenizer, params.stop, incremental)  # type: ignore[arg-type]
        self.prompt_ids = prompt_ids
        self.params = params
        self.generator = generator  # seeded rows draw from their own generator
        self.steps = 0  # tokens chosen so far

    def choice_key(self) -> tuple:
        """Rows with the same key choose their next token in one choose_next call."""
        p = self.params
        return (p.temperature, p.top_k, p.top_p, p.repetition_penalty)


class BatchDecoder:
    """Continuous batching: rows, each with its own SamplingParams, decode together in one
    KV-cached batch that they join and leave between steps.

    `add` queues a row (a prompt's token ids, its parameters and a key of the caller's);
    `step` prefills the rows that joined since the last step into free slots of the
    cache, picks one token for every row and returns what each row produced
    (`DecodeEvent`). A row leaves the batch when it ends (end token, stop string,
    max_new_tokens) or is cancelled, without stalling the others.

    Each row has a cache slot of its own length (`KVCache`), and the running rows fill
    slots 0 .. n-1: a row that joins is prefilled into the next free slots, a row that
    leaves has its slot taken by the last row (one row's copy), and nothing else moves.
    A row's text is the same as when it is decoded alone (`generate` with its prompt
    and parameters): its queries see only its own slot, each seeded row draws from its
    own generator, rows with the same settings choose through one `choose_next` call,
    and a row whose context fills the block is re-cropped on its own, when it would be
    alone. (The sameness is that of `generate`'s batches: the matrix products run at
    another batch size, which may round the last bit differently.)

    Not thread-safe: one thread owns a decoder. `generate`, `stream` and `stream_batch`
    run on it; the HTTP server's batcher feeds it requests from many clients.
    """

    def __init__(self, model: GPT, tokenizer: TokenizerLike, max_rows: int | None = None) -> None:
        """max_rows: the most rows the caller will run at once, if it knows (the server's
        batch size): the cache then never holds more slots than that. The slots are kept
        when the batch empties, so a server's memory settles once its batch has been full.
        """
        self.model = model
        self.tokenizer = tokenizer
        self.max_rows = max_rows
        self._text = _MemoDecode(tokenizer)  # what rows decode their tokens with
        self.device = model.lm_head.weight.device
        self._rows: list[_LiveRow] = []  # the running batch: row b is in cache slot b
        self._joining: list[_LiveRow] = []  # added, prefilled at the next step
        self._cache: KVCache | None = None  # slots for the running rows and more
        self._next: Tensor | None = None  # (slots,) tokens chosen by the last step, not yet fed
        self._seen: Tensor | None = None  # (slots, V) bool: prompt + output tokens of each row
        self.last_step_rows = 0  # rows that got a token in the last step (its batch size)

    def __len__(self) -> int:
        """Rows running or waiting to join."""
        return len(self._rows) + len(self._joining)

    @property
    def running(self) -> int:
        """Rows in the running batch (those that joined at a step and have not ended)."""
        return len(self._rows)

    @property
    def slots(self) -> int:
        """Rows the KV cache has room for (0 before the first row)."""
        return 0 if self._cache is None else self._cache.batch_size

    def add(
        self,
        key: Hashable,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        stream: bool = True,
    ) -> None:
        """Queue a row; it joins the batch at the next `step`.

        prompt_ids: the prompt's tokens (`encode_prompt`); empty starts from end-of-text,
        else from a newline. stream: hand out text as it is produced (else at the row's
        end, unless stop strings need it earlier). Raises RequestError for bad parameters
        or token ids outside the vocabulary.
        """
        params.validate()
        ids = [int(i) for i in prompt_ids]
        vocab = self.model.cfg.vocab_size
        if ids and not 0 <= min(ids) <= max(ids) < vocab:
            raise RequestError(f"prompt token ids must be in [0, {vocab}), the vocabulary")
        eos = self.tokenizer.eos_id
        context = ids or ([eos] if eos is not None else _newline(self.tokenizer))
        if not context:
            raise RequestError(
                "the prompt is empty and this tokenizer has neither an end-of-text token "
                "nor a newline to start from; give a prompt of at least one character"
            )
        generator = None
        if params.seed is not None and params.temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        incremental = stream or bool(params.stop)
        row = _LiveRow(key, ids, context, self._text, params, generator, incremental)
        self._joining.append(row)

    def cancel(self, key: Hashable) -> bool:
        """Drop the row with this key (waiting or running); False if there is none."""
        for i, row in enumerate(self._joining):
            if row.index == key:
                del self._joining[i]
                return True
        for b, row in enumerate(self._rows):
            if row.index == key:
                self._leave([b])
                return True
        return False

    @torch.inference_mode()
    def step(self) -> list[DecodeEvent]:
        """Admit the waiting rows, pick one token per row, feed it back; what each row did.

        Only rows that produced text or ended have an event.
        """
        events, self.last_step_rows = [], 0
        for row in [r for r in self._joining if r.params.max_new_tokens == 0]:
            self._joining.remove(row)
            events.append(DecodeEvent(row.index, "", "length", 0))
        logits = self._feed() if self._rows else None  # (n, V)
        if self._joining:
            logits = self._admit(logits)
        if not self._rows:
            return events
        n = len(self._rows)
        nxt = self._choose(logits)  # (n,)
        self.last_step_rows = n
        self._seen[:n].scatter_(1, nxt[:, None], True)
        self._next[:n] = nxt
        eos, leave = self.tokenizer.eos_id, []
        for b, (row, token) in enumerate(zip(self._rows, nxt.tolist(), strict=True)):
            row.steps += 1
            text = row.push(token) if token != eos else ""
            if token == eos or row.done or row.steps == row.params.max_new_tokens:
                text += row.finish()
                reason = "stop" if token == eos or row.done else "length"
                events.append(DecodeEvent(row.index, text, reason, row.steps))
                leave.append(b)
            elif text:
                events.append(DecodeEvent(row.index, text, None, row.steps))
        self._leave(leave)
        return events

    # -- the batch ---------------------------------------------------------------------

    @torch.inference_mode()  # cancel calls it outside step
    def _leave(self, rows: list[int]) -> None:
        """Rows at these batch positions leave; the last rows move into their slots."""
        for b in sorted(rows, reverse=True):  # every row after b that leaves is gone already
            last = len(self._rows) - 1
            if b != last:
                self._cache.move(last, b)
                self._rows[b] = self._rows[last]
                self._next[b] = self._next[last]
                self._seen[b] = self._seen[last]
            self._rows.pop()

    def _feed(self) -> Tensor:
        """Feed each running row its last chosen token; next-token logits (n, V).

        A row whose context fills the block starts again from its last block/2 tokens
        (nanoGPT crops to the last block tokens at every step, at the cost of a full
        forward), so each token sees between block/2 and block tokens of context. Its
        slot is refilled with that window but the token just chosen, which is then fed
        with everyone else's.
        """
        cache, model, n = self._cache, self.model, len(self._rows)
        if full := [b for b in range(n) if cache.lengths[b] == cache.max_len]:
            keep = max(1, model.cfg.block_size // 2)
            # each window but its last token, which is _next[b]: keep - 1 tokens for every
            # full row, prefilled together, then moved into the rows' slots
            windows = [(self._rows[b].context + self._rows[b].ids)[-keep:-1] for b in full]
            cropped = model.make_kv_cache(len(full))
            if keep > 1:
                _forward_rows(model, cropped, 0, windows)
            for i, b in enumerate(full):
                cache.move(i, b, source=cropped)
        return model.forward_cached(self._next[:n, None], cache, last_only=True)[:, -1]

    def _admit(self, logits: Tensor | None) -> Tensor:
        """Prefill the waiting rows into the next free slots; logits of all rows (n, V)."""
        new, self._joining = self._joining, []
        model, n = self.model, len(self._rows)
        block = model.cfg.block_size
        if self._cache is None or self._cache.batch_size < n + len(new):
            slots = max(n + len(new), 2 * (self._cache.batch_size if self._cache else 0))
            if self.max_rows is not None:
                slots = min(slots, max(self.max_rows, n + len(new)))
            self._grow(slots)
        self._cache.clear(n, len(new))
        windows = [r.context[-block:] for r in new]
        new_logits = _forward_rows(model, self._cache, n, windows)[:, -1]
        self._seen[n : n + len(new)] = False
        for b, row in enumerate(new, start=n):
            self._seen[b, row.prompt_ids] = True
        self._rows += new
        return new_logits if logits is None else torch.cat([logits, new_logits])

    def _grow(self, slots: int) -> None:
        """Room for `slots` rows, the running ones kept in their slots."""
        n, vocab = len(self._rows), self.model.cfg.vocab_size
        if self._cache is None:
            self._cache = self.model.make_kv_cache(slots)
        else:
            self._cache = self._cache.grown(self.model, slots)
        nxt = torch.zeros(slots, dtype=torch.long, device=self.device)
        seen = torch.zeros(slots, vocab, dtype=torch.bool, device=self.device)
        if n:
            nxt[:n], seen[:n] = self._next[:n], self._seen[:n]
        self._next, self._seen = nxt, seen

    def _choose(self, logits: Tensor) -> Tensor:
        """The next token of every row (n,), each row by its own parameters."""
        groups: dict[tuple, list[int]] = {}
        for b, row in enumerate(self._rows):
            groups.setdefault(row.choice_key(), []).append(b)
        n = len(self._rows)
        nxt = torch.empty(n, dtype=torch.long, device=self.device)
        for rows in groups.values():
            params = self._rows[rows[0]].params
            generators = [self._rows[b].generator for b in rows]
            if all(g is None for g in generators):
                generators = None  # torch's global generator, drawn for the group at once
            if len(groups) == 1:
                sub, seen, index = logits, self._seen[:n], slice(None)
            else:
                index = torch.tensor(rows, device=self.device)
                sub, seen = logits[index], self._seen[index]
            seen = seen if params.repetition_penalty != 1.0 else None
            nxt[index] = choose_next(sub, params, generators, seen)
        return nxt


def _decode(
    model: GPT,
    tokenizer: TokenizerLike,
    prompt_ids: list[list[int]],
    params: SamplingParams,
    stream: bool,
) -> Iterator[tuple[int, str]]:
    """Yield (prompt index, text piece); without `stream` each row yields once, at its end."""
    if not prompt_ids or params.max_new_tokens == 0:
        return
    decoder = BatchDecoder(model, tokenizer)
    for i, ids in enumerate(prompt_ids):
        decoder.add(i, ids, params, stream)
    while decoder:
        for event in decoder.step():
            if event.text:
                yield event.key, event.text
