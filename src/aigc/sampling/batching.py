"""Continuous batching: rows that join and leave one KV-cached batch between steps.

`BatchDecoder` runs every text decoding of aigc: `generate`, `stream` and
`stream_batch` (aigc.sampling.text) feed it one batch of prompts, and the HTTP
server's batcher (aigc.serve.batching) feeds it requests from many clients, each with
parameters of its own. Each step prefills the rows that joined into free slots of the
cache, picks one token per row (`choose_next`, by the row's own parameters) and feeds
it back; a row leaves when it ends, without stalling the others.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from aigc.errors import RequestError
from aigc.models.gpt import GPT
from aigc.models.gpt_cache import KVCache
from aigc.sampling.text import (
    SamplingParams,
    TokenizerLike,
    _MemoDecode,
    _newline,
    _Row,
    choose_next,
)


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
        self._marks: dict[Any, Any] = {}  # Watermark -> its keyed token hashes

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

    def _watermark(self, logits: Tensor) -> Tensor:
        """Logits with each watermarked row's green tokens raised by its delta.

        (The repetition penalty then sees the raised logits; the order matters little
        and keeps one code path for every row.)"""
        from aigc.safety.text_watermark import TokenHashes, bias_logits

        by_mark: dict[Any, list[int]] = {}
        for b, row in enumerate(self._rows):
            if row.params.watermark is not None:
                by_mark.setdefault(row.params.watermark, []).append(b)
        logits = logits.clone()
        for mark, rows in by_mark.items():
            if mark not in self._marks:
                self._marks[mark] = TokenHashes(self.tokenizer, mark, self.device)
            hashes = self._marks[mark]
            h = mark.context
            # each row's last h tokens; -1 pads a row with fewer (its start: never scored)
            ctx = [(self._rows[b].context + self._rows[b].ids)[-h:] for b in rows]
            ctx = torch.tensor([[-1] * (h - len(c)) + c for c in ctx], device=self.device)
            padded = torch.cat([hashes.table, hashes.table.new_zeros(1)])
            index = torch.tensor(rows, device=self.device)
            logits[index] = bias_logits(logits[index], padded[ctx], hashes)
        return logits

    def _choose(self, logits: Tensor) -> Tensor:
        """The next token of every row (n,), each row by its own parameters."""
        if any(row.params.watermark is not None for row in self._rows):
            logits = self._watermark(logits)
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
