"""Chat fine-tuning: conversations in the chat template, loss on the assistant's tokens only.

Usually a fine-tune (``aigc finetune BASE --task chat``): the base's tokenizer
grows by the template's four special tokens (``aigc.data.chat``) and the
model's token embedding by four rows. The data are a JSON Lines file of
conversations (``data.path``) or, by default, the demonstrations built from the
Python documentation topics.

A conversation is tokenised message by message (marker id, content, ``<|end|>``
id, newline), which gives exactly the ids of encoding ``render(messages)`` as
one text, because the markers are special tokens. A conversation longer than
the context is cut into windows of block_size + 1 tokens every block_size / 2
tokens; each window trains only on the targets the one before did not reach,
so every assistant token is trained once, with at least half a context before
it: the context the sampler keeps when it crops a long conversation.

Prepared data in the run folder::

    data/meta.json               counts, special ids, source
    data/{train,val}_ids.npy     token ids of all conversations, concatenated (int32)
    data/{train,val}_mask.npy    1 where a token is trained on (assistant content and end)
    data/{train,val}_windows.npy (start, end, first trained target) per window (int64)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aigc.config import Config
from aigc.data.chat import (
    CHAT_SPECIAL_TOKENS,
    END_MARKER,
    ROLE_MARKERS,
    TURN_SEPARATOR,
    Conversation,
    Message,
    render,
)
from aigc.data.tokenizers import (
    Tokenizer,
    add_special_tokens,
    encode_replacing,
    load_tokenizer,
    train_bpe_tokenizer,
    train_char_tokenizer,
)
from aigc.errors import CheckpointError, ConfigError, DataError, RequestError
from aigc.models.gpt import GPT, GPTConfig
from aigc.models.lora import merged_copy
from aigc.runs import RunDir
from aigc.tasks import batch_rows
from aigc.tasks.base import DataFiles, TokenSplitsTask
from aigc.tasks.lm import fit_vocab


@dataclass
class ChatDataConfig:
    """Where the conversations come from and how they become tokens."""

    path: str | None = None  # JSON Lines of {"messages": [...]}; None = Python docs Q&A
    system: str = ""  # a system message opening every embedded demonstration ("" = none)
    max_answer_chars: int = 1000  # embedded demonstrations: answers cut at a sentence end
    val_fraction: float = 0.1  # the held-out share of conversations (data.split_seed)
    split_seed: int = 0
    tokenizer: Literal["char", "bpe"] = "char"  # random initialisation only
    vocab_size: int = 4096  # BPE only
    unknown_chars: Literal["error", "replace"] = "replace"  # text the base can't encode
    eval_batch_size: int = 32  # windows per forward pass during validation

    def validate(self) -> None:
        if not 0.0 < self.val_fraction <= 0.5:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 0.5]")
        if self.eval_batch_size < 1:
            raise ConfigError(f"data.eval_batch_size={self.eval_batch_size} must be at least 1")


SAMPLED_CONVERSATIONS = 3  # held-out questions answered in each sample


def read_chat_data(d: ChatDataConfig) -> tuple[list[Conversation], str]:
    """The conversations of data.path, or the embedded demonstrations; and the source."""
    from aigc.data.chat import pydoc_demonstrations, read_conversations

    if d.path is None:
        return (
            pydoc_demonstrations(d.split_seed, d.system or None, d.max_answer_chars),
            "pydoc demonstrations",
        )
    return read_conversations(d.path), str(d.path)


def split_chat_data(d: ChatDataConfig) -> tuple[list[Conversation], list[Conversation], str]:
    """(training, held-out, source): data.val_fraction of the conversations (at least one)
    held out by a permutation seeded with data.split_seed, both in file order."""
    conversations, source = read_chat_data(d)
    if len(conversations) < 2:
        raise DataError(f"{source}: needs at least two conversations (one is held out)")
    order = np.random.default_rng(d.split_seed).permutation(len(conversations))
    n_val = max(1, round(len(conversations) * d.val_fraction))
    val = [conversations[i] for i in sorted(order[:n_val].tolist())]
    train = [conversations[i] for i in sorted(order[n_val:].tolist())]
    return train, val, source


def chat_tokenizer(base: Tokenizer) -> Tokenizer:
    """``base`` with the chat template's markers as special tokens (added at the end)."""
    return add_special_tokens(base, CHAT_SPECIAL_TOKENS)


def encode_conversation(
    tokenizer: Tokenizer, conversation: Conversation, replace: bool = True
) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids, mask, replaced characters) of a conversation in the chat template.

    mask[t] is True for the tokens of assistant contents and their end markers,
    the tokens the loss covers.
    """
    end = tokenizer.token_to_id(END_MARKER)
    try:
        sep = tokenizer.encode_array(TURN_SEPARATOR)
    except DataError:  # a char vocabulary without "\n": turns follow each other directly
        sep = np.zeros(0, dtype=np.int64)
    ids, mask, replaced = [], [], 0
    for m in conversation:
        if replace:
            content, n = encode_replacing(tokenizer, m.content)
            replaced += n
        else:
            content = tokenizer.encode_array(m.content)
        marker = tokenizer.token_to_id(ROLE_MARKERS[m.role])
        trained = m.role == "assistant"
        ids += [np.array([marker]), content, np.array([end]), sep]
        mask += [[False], [trained] * len(content), [trained], [False] * len(sep)]
    return (np.concatenate(ids).astype(np.int64),
            np.concatenate([np.asarray(x, dtype=bool) for x in mask]), replaced)  # fmt: skip


def windows(length: int, block: int) -> list[tuple[int, int, int]]:
    """(start, end, first trained target) of the windows over a conversation of
    ``length`` tokens; see the module docstring."""
    if length <= block + 1:
        return [(0, length, 0)]
    half = max(1, block // 2)
    out, start = [], 0
    while True:
        end = min(start + block + 1, length)
        out.append((start, end, 0 if start == 0 else block - half))
        if end == length:
            return out
        start += half


class ChatTask(TokenSplitsTask):
    """Trains a GPT on conversations; evaluates the loss on held-out assistant tokens."""

    name = "chat"
    data_config = ChatDataConfig
    model_config = GPTConfig
    model_class = GPT
    split_parts = ("ids", "mask", "windows")
    item_name = "windows"
    pipeline_class = "aigc.pipelines.text:ChatPipeline"
    headline_metric = "loss"
    lora_targets = ("c_attn", "c_proj", "c_fc")

    # construction ---------------------------------------------------------------
    @classmethod
    def prepare_data(cls, config: Config, data_dir: Path, progress: bool = True) -> None:
        """Reads, splits and tokenises the conversations; writes ids, masks and windows."""
        d: ChatDataConfig = config.data
        train, val, source = split_chat_data(d)
        if config.train.init_from:  # fine-tuning keeps the base run's tokenizer
            base = load_tokenizer(Path(config.train.init_from) / "tokenizer.json")
        else:
            texts = [m.content for c in train for m in c] + [TURN_SEPARATOR]
            base = (train_char_tokenizer(texts) if d.tokenizer == "char"
                    else train_bpe_tokenizer(texts, d.vocab_size))  # fmt: skip
        tokenizer = chat_tokenizer(base)
        block = config.model.block_size
        stats = {"replaced": 0, "assistant_tokens": 0, "tokens": 0, "windows": 0}
        for name, convs in (("train", train), ("val", val)):
            ids, masks, wins, at = [], [], [], 0
            for c in convs:
                try:
                    row, mask, n = encode_conversation(tokenizer, c, d.unknown_chars == "replace")
                except DataError as e:
                    raise DataError(
                        f"{source}: {e}; set data.unknown_chars=replace to write such "
                        "characters as '?'"
                    ) from None
                stats["replaced"] += n
                ids.append(row)
                masks.append(mask)
                wins += [
                    (at + s, at + e, k)
                    for s, e, k in windows(len(row), block)
                    if mask[s + 1 + k : e].any()
                ]  # a window of user text only: no loss
                at += len(row)
            all_ids = np.concatenate(ids)
            all_mask = np.concatenate(masks)
            np.save(data_dir / f"{name}_ids.npy", all_ids.astype(np.int32))
            np.save(data_dir / f"{name}_mask.npy", all_mask.astype(np.uint8))
            np.save(data_dir / f"{name}_windows.npy", np.asarray(wins, dtype=np.int64))
            stats[f"{name}_assistant_tokens"] = int(all_mask.sum())
            stats["tokens"] += len(all_ids)
            stats["windows"] += len(wins)
        # the held-out questions that samples() answers, kept so that a run never needs
        # its source again
        rows = [{"messages": [{"role": m.role, "content": m.content} for m in c]}
                for c in val[:SAMPLED_CONVERSATIONS]]  # fmt: skip
        (data_dir / "val_samples.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
        meta = {"source": source, "n_train": len(train), "n_val": len(val),
                "special_ids": {t: tokenizer.token_to_id(t) for t in CHAT_SPECIAL_TOKENS},
                **stats}  # fmt: skip
        (data_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        tokenizer.save(data_dir / "tokenizer.json")
        if progress:
            print(f"{source}: {len(train)} training and {len(val)} held-out conversations, "
                  f"{stats['tokens']:,} tokens in {stats['windows']} windows", flush=True)  # fmt: skip

    @classmethod
    def finish_config(cls, config: Config, files: DataFiles) -> None:
        fit_vocab(config.model, load_tokenizer(files.tokenizer_path))

    @classmethod
    def open(cls, config: Config, run: RunDir, with_data: bool = True) -> ChatTask:
        tokenizer = load_tokenizer(run.tokenizer_path)
        if tokenizer.token_to_id(END_MARKER) is None:
            raise CheckpointError(f"{run.tokenizer_path} lacks the chat template's tokens")
        fit_vocab(config.model, tokenizer)
        return cls(config, run, tokenizer, with_data)

    # batches -----------------------------------------------------------------------
    def _batch(self, split: str, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows ``rows``: inputs (B, T) and targets (B, T), -1 where not trained on."""
        ids, mask, wins = self.splits[split]
        width = int((wins[rows, 1] - wins[rows, 0]).max()) - 1
        x = np.zeros((len(rows), width), dtype=np.int64)
        y = np.full((len(rows), width), -1, dtype=np.int64)
        for i, (s, e, first) in enumerate(wins[rows].tolist()):
            n = e - s - 1
            x[i, :n] = ids[s : e - 1]
            target = ids[s + 1 : e].astype(np.int64)
            keep = mask[s + 1 : e].astype(bool)
            keep[:first] = False
            y[i, :n] = np.where(keep, target, -1)
        return torch.from_numpy(x), torch.from_numpy(y)

    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        """Windows drawn at random, a pure function of (seed, step); each (micro-step,
        rank) takes its slice of the step's global batch, as in LMTask.train_batch."""
        n = len(self.splits["train"][2])
        rows = batch_rows(self.config.train, n, step, micro, rank, world)
        x, y = self._batch("train", rows)
        return {"input_ids": x, "targets": y}

    # evaluation --------------------------------------------------------------------
    def eval_sums(
        self, model: nn.Module, rank: int, world: int, device: torch.device
    ) -> dict[str, float]:
        """Summed cross-entropy over every held-out assistant token (each exactly once)."""
        rows = np.arange(len(self.splits["val"][2]))[rank::world]
        nll, count = 0.0, 0
        bs = self.config.data.eval_batch_size
        for i in range(0, len(rows), bs):
            x, y = (t.to(device) for t in self._batch("val", rows[i : i + bs]))
            logits, _ = model(x)
            nll += float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                         y.reshape(-1), ignore_index=-1, reduction="sum"))  # fmt: skip
            count += int((y >= 0).sum())
        return {"nll": nll, "count": float(count)}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Loss and perplexity per assistant token."""
        if not sums["count"]:
            return {}
        loss = sums["nll"] / sums["count"]
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}

    def samples(self, model: nn.Module, step: int, device: torch.device) -> dict[str, str]:
        """Answers to the first held-out questions (greedy), beside the reference answers."""
        from aigc.sampling import SamplingParams, generate

        held = self._sampled_conversations()
        out = {}
        model = merged_copy(model)
        for i, conv in enumerate(held):
            last = max(j for j, m in enumerate(conv) if m.role == "assistant")
            prompt = chat_prompt(self.tokenizer, conv[:last])
            params = SamplingParams(max_new_tokens=200, temperature=0.0, stop=stop_strings())
            answer = generate(model, self.tokenizer, prompt, params)[0]
            out[f"held-out {i}"] = (f"{conv[last - 1].content}\n--- model:\n{answer}\n"
                                    f"--- reference:\n{conv[last].content}")  # fmt: skip
        return out

    def _sampled_conversations(self) -> list[Conversation]:
        """The first held-out conversations, as prepared; a run prepared before they were
        kept reads them from its source again, and samples nothing if that is gone."""
        from aigc.data.chat import read_conversations

        kept = self.run.data_dir / "val_samples.jsonl"
        if kept.is_file():
            return read_conversations(kept)
        try:
            return split_chat_data(self.config.data)[1][:SAMPLED_CONVERSATIONS]
        except DataError:
            return []


def stop_strings() -> tuple[str, ...]:
    """Where an answer ends: its end marker, or a marker that would start another turn."""
    return (END_MARKER, *ROLE_MARKERS.values())


def chat_prompt(tokenizer: Tokenizer, messages: list[Message]) -> str:
    """The prompt from which the model writes the next answer: the conversation in the
    template, ending with the assistant marker. Characters the vocabulary lacks become
    "?" (as in training), so any typed text can be sent."""
    clean = [Message(m.role, tokenizer.decode(encode_replacing(tokenizer, m.content)[0]))
             for m in messages]  # fmt: skip
    return render(clean, add_generation_prompt=True)[0]


def as_messages(messages: object) -> list[Message]:
    """Messages from a request (dicts with "role" and "content", or Messages), checked as a
    conversations file is; RequestError naming the message otherwise."""
    from aigc.data.chat import _message_problem

    if not isinstance(messages, list | tuple) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages, 1):
        if isinstance(m, Message):
            m = m.to_dict()
        problem = _message_problem(i, m)
        if problem is not None:
            raise RequestError(problem)
        out.append(Message(m["role"], m["content"]))
    if out[-1].role == "assistant":
        raise RequestError("the last message is the assistant's; end with a user message")
    return out
