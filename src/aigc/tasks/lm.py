"""Language modelling: text data + tokenizer + GPT, as the trainer and loaders see it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aigc.config import Config
from aigc.data.dedup import check_near_settings, dedup_mode
from aigc.data.text import TextSource, TokenCorpus, build_corpus, pii_mode
from aigc.data.tokenizers import Tokenizer, load_tokenizer
from aigc.errors import CheckpointError, ConfigError, DataError
from aigc.models.gpt import GPT, GPTConfig
from aigc.models.lora import merged_copy
from aigc.runs import RunDir
from aigc.tasks import batch_rows
from aigc.tasks.base import DataFiles, Task
from aigc.trainer import mix_seed


def sample_keys() -> tuple[str, ...]:
    """The keys of LMTask.sample_sums: one per registered sample metric (read at call time,
    so metrics a user adds to aigc.metrics.text.SAMPLE_METRICS are computed too)."""
    from aigc.metrics.text import SAMPLE_METRICS

    return ("samples", *SAMPLE_METRICS, "mem_windows", "mem_hits")


@dataclass
class TextDataConfig:
    """Where the text comes from and how it becomes tokens."""

    path: str | None = None  # a text file, a folder of them, or JSON Lines; None = Python docs
    format: Literal["auto", "text", "jsonl"] = "auto"
    jsonl_field: str = "text"  # the field holding the text in JSON Lines
    encoding_errors: Literal["strict", "replace"] = "strict"  # replace: bad bytes -> U+FFFD
    # drop duplicate documents: exact (same text), near (MinHash-LSH over shingles, exact
    # too) or off; true/false in older configs mean exact/off
    dedup: bool | Literal["exact", "near", "off"] = "exact"
    dedup_threshold: float = 0.8  # near: Jaccard similarity at which a document is dropped
    dedup_shingle: Literal["word", "char"] = "word"  # near: shingles of words or characters
    dedup_ngram: int = 5  # near: words (or characters) per shingle
    dedup_num_perm: int = 128  # near: MinHash permutations
    # personal data and secrets (e-mail, phone, card, IBAN, IP, keys): off, report
    # (counted in corpus.json) or redact (replaced by [EMAIL], [PHONE], ...)
    pii: Literal["off", "report", "redact"] | bool = "off"
    tokenizer: Literal["char", "bpe"] = "char"
    unknown_chars: Literal["error", "replace"] = "error"  # fine-tuning: text the base can't encode
    vocab_size: int = 4096  # BPE only
    val_fraction: float = 0.1  # the last share of the token stream is held out
    eval_batch_size: int = 64  # windows per forward pass during validation
    eval_samples: int = 16  # texts generated per evaluation for diversity and memorisation
    eval_sample_tokens: int = 256  # tokens in each of them

    def __post_init__(self) -> None:
        self.dedup = dedup_mode(self.dedup)  # type: ignore[assignment]
        self.pii = pii_mode(self.pii)  # type: ignore[assignment]

    def validate(self) -> None:
        check_near_settings(
            self.dedup_threshold, self.dedup_shingle, self.dedup_ngram, self.dedup_num_perm
        )
        if not 0.0 < self.val_fraction <= 0.5:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 0.5]")
        for key in ("eval_batch_size", "eval_samples", "eval_sample_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key}={getattr(self, key)} must be at least 1")

    def source(self) -> TextSource:
        return TextSource(
            path=self.path,
            format=self.format,
            jsonl_field=self.jsonl_field,
            encoding_errors=self.encoding_errors,
            dedup=self.dedup,
            dedup_threshold=self.dedup_threshold,
            dedup_shingle=self.dedup_shingle,
            dedup_ngram=self.dedup_ngram,
            dedup_num_perm=self.dedup_num_perm,
            pii=self.pii,
        )


def fit_vocab(model: GPTConfig, tokenizer: Tokenizer) -> None:
    """Sets model.vocab_size from the tokenizer (0 = follow it); ConfigError when the
    config asks for fewer ids than the tokenizer has (its special tokens included)."""
    if model.vocab_size == 0:
        model.vocab_size = tokenizer.vocab_size
    elif model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} tokens; leave it at 0 to follow the tokenizer"
        )


def _nll(model: nn.Module, buf: torch.Tensor) -> torch.Tensor:
    logits, _ = model(buf[:, :-1])
    return (
        F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), buf[:, 1:].reshape(-1), reduction="sum"
        )
        .double()
        .cpu()
    )


def stream_nll(
    model: nn.Module,
    tokens: np.ndarray,
    block_size: int,
    batch_size: int,
    rank: int,
    world: int,
    device: torch.device,
) -> tuple[float, int]:
    """Summed cross-entropy (nats) of a GPT over a token stream, and the tokens scored:
    the stream is cut into consecutive windows of ``block_size`` tokens (the last one
    shorter), so every token but the first is predicted exactly once; this rank takes
    every ``world``-th window."""
    T = block_size
    starts = list(range(0, len(tokens) - 1, T))[rank::world]
    nll = torch.zeros((), dtype=torch.float64)
    count = 0
    full = [s for s in starts if s + T + 1 <= len(tokens)]
    tail = [s for s in starts if s + T + 1 > len(tokens)]
    for i in range(0, len(full), batch_size):
        chunk = np.asarray(full[i : i + batch_size])
        rows = tokens[chunk[:, None] + np.arange(T + 1)].astype(np.int64)
        buf = torch.from_numpy(rows).to(device)
        nll += _nll(model, buf)
        count += buf.shape[0] * T
    for s in tail:
        buf = torch.from_numpy(tokens[s:].astype(np.int64))[None].to(device)
        nll += _nll(model, buf)
        count += buf.shape[1] - 1
    return float(nll), count


class LMTask(Task):
    """Trains a GPT on a token stream; evaluates loss, perplexity and bits per character."""

    name = "gpt"
    data_config = TextDataConfig
    model_config = GPTConfig
    item_name = "tokens"
    sample_hint = "--prompt '...'"
    pipeline_class = "aigc.pipelines.text:TextPipeline"
    headline_metric = "loss"
    resumable_keys = frozenset({"data.eval_samples", "data.eval_sample_tokens"})
    lora_targets = ("c_attn", "c_proj", "c_fc")

    def __init__(
        self, config: Config, run: RunDir, corpus: TokenCorpus | None, tokenizer: Tokenizer
    ):
        self.config = config
        self.run = run
        self.corpus = corpus
        self.tokenizer = tokenizer
        self.model: nn.Module = GPT(config.model)
        self.items_per_batch = config.train.batch_size * config.model.block_size
        self._index = None  # CorpusIndex of the training text, built on first use

    # construction -----------------------------------------------------------
    @classmethod
    def prepare_data(cls, config: Config, data_dir: Path, progress: bool = True) -> None:
        """Reads the corpus, trains the tokenizer and writes memory-mapped tokens."""
        d: TextDataConfig = config.data
        base = None
        if config.train.init_from:  # fine-tuning keeps the base run's tokenizer
            base = load_tokenizer(Path(config.train.init_from) / "tokenizer.json")
        _, corpus = build_corpus(  # the tokenizer is written beside the data
            d.source(),
            data_dir,
            tokenizer=base,
            tokenizer_kind=d.tokenizer,
            vocab_size=d.vocab_size,
            val_fraction=d.val_fraction,
            progress=progress,
            unknown_chars=d.unknown_chars,
        )
        cls._check_sizes(config, corpus, data_dir)

    @staticmethod
    def _check_sizes(config: Config, corpus: TokenCorpus, where: Path) -> None:
        block = config.model.block_size
        m = corpus.meta
        if m.n_train < block + 2 or m.n_val < 2:
            raise DataError(
                f"the corpus is too short: {m.n_train} training and {m.n_val} validation tokens, "
                f"but model.block_size={block} needs at least {block + 2} training tokens "
                f"(source: {m.source}); use more text or a smaller model.block_size"
            )

    @classmethod
    def open(cls, config: Config, run: RunDir, with_data: bool = True) -> LMTask:
        """Builds the task for an existing run folder (data already prepared)."""
        try:
            tokenizer = load_tokenizer(run.tokenizer_path)
        except FileNotFoundError:
            raise CheckpointError(f"{run.tokenizer_path} is missing") from None
        corpus = TokenCorpus.open(run.data_dir) if with_data else None
        fit_vocab(config.model, tokenizer)
        if corpus is not None:
            cls._check_sizes(config, corpus, run.data_dir)
        return cls(config, run, corpus, tokenizer)

    @classmethod
    def finish_config(cls, config: Config, files: DataFiles) -> None:
        """Fills values that follow from the prepared data (the vocabulary size)."""
        fit_vocab(config.model, load_tokenizer(files.tokenizer_path))

    # training -----------------------------------------------------------------
    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        """Random windows of the training tokens, a pure function of (seed, step):
        ``input_ids`` and ``targets``, both (B, T).

        The step's global batch of ``batch_size * grad_accum * world`` windows is
        drawn identically everywhere and each (micro-step, rank) takes its slice,
        so N processes with batch B, or B with N accumulation steps, see exactly
        the windows that one process with batch N*B sees.
        """
        T = self.config.model.block_size
        train = self.corpus.train
        starts = batch_rows(self.config.train, len(train) - T, step, micro, rank, world)
        buf = torch.from_numpy(
            train[starts[:, None] + np.arange(T + 1)].astype(np.int64)
        )  # (B, T+1)
        return {"input_ids": buf[:, :-1], "targets": buf[:, 1:]}

    def eval_sums(
        self, model: nn.Module, rank: int, world: int, device: torch.device
    ) -> dict[str, float]:
        """Summed cross-entropy over the whole validation split.

        The split is cut into consecutive windows of block_size tokens (the last
        one shorter), so every token but the first is predicted exactly once.
        """
        T, bs = self.config.model.block_size, self.config.data.eval_batch_size
        nll, count = stream_nll(model, self.corpus.val, T, bs, rank, world, device)
        # generated texts are judged on rank 0; every rank sends the same keys
        judged = self.sample_sums(model) if rank == 0 else dict.fromkeys(sample_keys(), 0.0)
        return {"nll": nll, "count": float(count), **judged}

    def sample_sums(self, model: nn.Module) -> dict[str, float]:
        """data.eval_samples texts of data.eval_sample_tokens from fixed seeds, judged for
        every metric of aigc.metrics.text.SAMPLE_METRICS (distinct-1/2/3 of words,
        repetition seq-rep-4, and any a user adds) and memorisation: the 50-character
        windows found verbatim in the training text (an index, not a scan)."""
        from aigc.metrics.text import SAMPLE_METRICS, memorisation_counts
        from aigc.sampling import SamplingParams, generate

        d = self.config.data
        model = merged_copy(model)  # LoRA adapters: merged, for the KV-cached sampler
        prompt = self.sample_prompts()[-1]  # empty where the vocabulary allows
        texts = [
            generate(model, self.tokenizer, prompt, SamplingParams(
                max_new_tokens=d.eval_sample_tokens, temperature=1.0,
                seed=mix_seed(self.config.train.seed, i),
            ))[0]
            for i in range(d.eval_samples)
        ]  # fmt: skip
        mem = memorisation_counts(texts, self.corpus_index())
        return {
            "samples": float(len(texts)),
            **{k: float(metric(texts)) * len(texts) for k, metric in SAMPLE_METRICS.items()},
            "mem_windows": float(mem.n_windows),
            "mem_hits": float(mem.n_memorised),
        }

    def corpus_index(self):
        """The 50-character window index of the training text (built once per process)."""
        if self._index is None:
            from aigc.metrics.text import CorpusIndex, code_points_of_tokens

            corpus = self.corpus or TokenCorpus.open(self.run.data_dir)
            self._index = CorpusIndex.build(code_points_of_tokens(corpus.train, self.tokenizer))
        return self._index

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Loss (nats/token), perplexity, bits per character and per byte."""
        if sums["count"] == 0:
            return {}
        loss = sums["nll"] / sums["count"]
        m = self.corpus.meta
        # The sums cover all validation tokens but the first; scale characters alike.
        share = sums["count"] / max(m.n_val - 1, 1)
        bits = sums["nll"] / math.log(2)
        out = {
            "loss": loss,
            "ppl": math.exp(min(loss, 50.0)),
            "bpc": bits / max(m.val_chars * share, 1e-9),
            "bpb": bits / max(m.val_bytes * share, 1e-9),
        }
        n = sums.get("samples", 0.0)
        if n:
            for k in sample_keys()[1:-2]:
                out[k] = sums[k] / n
            windows = sums["mem_windows"]
            out["memorisation"] = sums["mem_hits"] / windows if windows else float("nan")
        return out

    def samples(self, model: nn.Module, step: int, device: torch.device) -> dict[str, str]:
        """A few fixed-seed continuations so progress can be read over time."""
        from aigc.sampling import SamplingParams, generate

        params = SamplingParams(max_new_tokens=300, temperature=0.8, seed=self.config.train.seed)
        prompts = self.sample_prompts()
        outs = generate(merged_copy(model), self.tokenizer, prompts, params)
        return {
            f"prompt {i}: {p!r}": p + o for i, (p, o) in enumerate(zip(prompts, outs, strict=True))
        }

    def sample_prompts(self) -> list[str]:
        """The start of the validation text (a real context) and an empty prompt.

        An empty prompt starts from end-of-text or a newline; a char vocabulary of
        text without line breaks has neither, so there the empty prompt is left out.
        """
        head = (
            self.tokenizer.decode(self.corpus.val[:64].tolist()) if self.corpus is not None else ""
        )
        head = head.split("\n")[0][:40] if head.strip() else ""
        try:
            can_start_empty = self.tokenizer.eos_id is not None or bool(self.tokenizer.encode("\n"))
        except DataError:  # "\n" is not in the vocabulary
            can_start_empty = False
        return [p for p in dict.fromkeys([head, ""]) if p or can_start_empty]
