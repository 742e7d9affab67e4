"""Sequence classification: labelled texts + tokenizer + a GPT with a classification head.

Usually a fine-tune (``aigc finetune BASE --task classify``): the base's tokenizer
and weights, a new head. Trained from random initialisation it builds its own
tokenizer from the training texts. Prepared data in the run folder::

    data/meta.json                classes, counts, source, truncation
    data/{train,val}_ids.npy      token ids of all texts, concatenated (int32)
    data/{train,val}_offsets.npy  where each text starts (int64, one more than texts)
    data/{train,val}_labels.npy   class index per text (int64)

Texts longer than model.block_size keep their first block_size tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aigc.config import Config
from aigc.data.tokenizers import (
    Tokenizer,
    encode_replacing,
    load_tokenizer,
    train_bpe_tokenizer,
    train_char_tokenizer,
)
from aigc.errors import CheckpointError, ConfigError, DataError
from aigc.models.gpt import GPTClassifier, GPTClassifierConfig
from aigc.runs import RunDir
from aigc.tasks import batch_rows
from aigc.tasks.base import DataFiles, TokenSplitsTask
from aigc.tasks.lm import fit_vocab


@dataclass
class ClassifyDataConfig:
    """Where the labelled texts come from and how they become tokens."""

    path: str | None = None  # JSON Lines of {"text", "label"}; None = stdlib docstrings
    text_field: str = "text"
    label_field: str = "label"
    n_classes: int = 10  # the embedded docstrings: this many largest packages
    val_fraction: float = 0.1  # per class, after a seeded shuffle (data.split_seed)
    split_seed: int = 0
    tokenizer: Literal["char", "bpe"] = "char"  # random initialisation only
    vocab_size: int = 4096  # BPE only
    unknown_chars: Literal["error", "replace"] = "replace"  # text the base can't encode
    eval_batch_size: int = 64

    def validate(self) -> None:
        if not 0.0 < self.val_fraction <= 0.5:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 0.5]")
        for key in ("n_classes", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key}={getattr(self, key)} must be at least 1")


def read_examples(d: ClassifyDataConfig) -> tuple[list[tuple[str, int]], list[tuple[str, int]],
                                                  list[str], str]:  # fmt: skip
    """(train, val, class names, source description) with labels as class indices."""
    from aigc.data.labels import check_label_set, read_labelled, stratified_split

    if d.path is None:
        from aigc.data.stdlib import docstring_dataset

        train, val, names = docstring_dataset(d.n_classes, d.split_seed, d.val_fraction)
        source = f"stdlib docstrings, {len(names)} packages"
    else:
        examples = read_labelled(d.path, d.text_field, d.label_field)
        names = check_label_set([label for _, label in examples], d.path)
        index = {name: i for i, name in enumerate(names)}
        tr, va = stratified_split(examples, d.val_fraction, d.split_seed)
        train = [(t, index[label]) for t, label in tr]
        val = [(t, index[label]) for t, label in va]
        source = str(d.path)
    check_label_set([names[label] for _, label in train], f"{source} (training split)")
    if not val:
        raise DataError(f"{source}: no held-out examples; use more data or a larger val_fraction")
    return train, val, names, source


class ClassifyTask(TokenSplitsTask):
    """Trains a GPTClassifier; evaluates loss, accuracy and macro-F1 on the held-out split."""

    name = "classifier"
    data_config = ClassifyDataConfig
    model_config = GPTClassifierConfig
    model_class = GPTClassifier
    split_parts = ("ids", "offsets", "labels")
    item_name = "texts"
    pipeline_class = "aigc.pipelines.classify:ClassifyPipeline"
    headline_metric = "accuracy"
    lora_targets = ("c_attn", "c_proj", "c_fc")

    def __init__(self, config: Config, run: RunDir, tokenizer: Tokenizer, with_data: bool = True):
        self.meta = json.loads((run.data_dir / "meta.json").read_text(encoding="utf-8"))
        self.classes: list[str] = self.meta["classes"]
        super().__init__(config, run, tokenizer, with_data)

    def fresh_modules(self) -> tuple[str, ...]:
        return ("score",)  # the head a pretrained GPT lacks: initialised here, always trained

    # construction -------------------------------------------------------------
    @classmethod
    def prepare_data(cls, config: Config, data_dir: Path, progress: bool = True) -> None:
        """Reads and splits the labelled texts, and writes their token ids."""
        d: ClassifyDataConfig = config.data
        train, val, names, source = read_examples(d)
        if config.train.init_from:  # fine-tuning keeps the base run's tokenizer
            tokenizer = load_tokenizer(Path(config.train.init_from) / "tokenizer.json")
        elif d.tokenizer == "char":
            tokenizer = train_char_tokenizer(t for t, _ in train)
        else:
            tokenizer = train_bpe_tokenizer((t for t, _ in train), d.vocab_size)
        block = config.model.block_size
        counts = {"replaced": 0, "truncated": 0}
        for name, examples in (("train", train), ("val", val)):
            ids, offsets = [], [0]
            for text, _ in examples:
                if d.unknown_chars == "replace":
                    row, n = encode_replacing(tokenizer, text)
                    counts["replaced"] += n
                else:
                    try:
                        row = tokenizer.encode_array(text)
                    except DataError as e:
                        raise DataError(
                            f"{source}: {e}; set data.unknown_chars=replace to write such "
                            "characters as '?'"
                        ) from None
                counts["truncated"] += len(row) > block
                row = row[:block]
                ids.append(row)
                offsets.append(offsets[-1] + len(row))
            np.save(data_dir / f"{name}_ids.npy", np.concatenate(ids).astype(np.int32))
            np.save(data_dir / f"{name}_offsets.npy", np.asarray(offsets, dtype=np.int64))
            labels = np.asarray([label for _, label in examples], dtype=np.int64)
            np.save(data_dir / f"{name}_labels.npy", labels)
        meta = {
            "classes": names, "source": source, "n_train": len(train), "n_val": len(val),
            "train_counts": np.bincount([lb for _, lb in train], minlength=len(names)).tolist(),
            "truncated_to_block": counts["truncated"], "replaced_chars": counts["replaced"],
        }  # fmt: skip
        (data_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        tokenizer.save(data_dir / "tokenizer.json")
        if progress:
            print(
                f"{source}: {len(train):,} training and {len(val):,} held-out texts in "
                f"{len(names)} classes; {counts['truncated']:,} cut to {block} tokens",
                flush=True,
            )

    @staticmethod
    def _set_sizes(config: Config, tokenizer: Tokenizer, meta: dict[str, Any]) -> None:
        m: GPTClassifierConfig = config.model
        fit_vocab(m, tokenizer)
        n = len(meta["classes"])
        if m.n_classes == 0:
            m.n_classes = n
        elif m.n_classes != n:
            raise ConfigError(f"model.n_classes={m.n_classes} but the data has {n} classes")

    @classmethod
    def finish_config(cls, config: Config, files: DataFiles) -> None:
        meta = json.loads((files.data_dir / "meta.json").read_text(encoding="utf-8"))
        cls._set_sizes(config, load_tokenizer(files.tokenizer_path), meta)

    @classmethod
    def open(cls, config: Config, run: RunDir, with_data: bool = True) -> ClassifyTask:
        try:
            tokenizer = load_tokenizer(run.tokenizer_path)
            meta = json.loads((run.data_dir / "meta.json").read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError) as e:
            raise CheckpointError(
                f"{run.data_dir}: prepared data is missing or damaged ({e})"
            ) from None
        cls._set_sizes(config, tokenizer, meta)
        return cls(config, run, tokenizer, with_data)

    # batches -------------------------------------------------------------------
    def _batch(self, split: str, rows: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Texts ``rows`` of ``split`` right-padded: ids (B, T), lengths (B,), labels (B,)."""
        ids, offsets, labels = self.splits[split]
        starts, ends = offsets[rows], offsets[rows + 1]
        lengths = np.maximum(ends - starts, 1)  # an empty text reads token 0
        out = np.zeros((len(rows), int(lengths.max())), dtype=np.int64)
        for i, (s, e) in enumerate(zip(starts, ends, strict=True)):
            out[i, : e - s] = ids[s:e]
        return (torch.from_numpy(out), torch.from_numpy(lengths.astype(np.int64)),
                torch.from_numpy(labels[rows]))  # fmt: skip

    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        """Texts drawn at random, a pure function of (seed, step); each (micro-step, rank)
        takes its slice of the step's global batch, as in LMTask.train_batch: input_ids
        (B, T) right-padded, lengths (B,), labels (B,)."""
        n = len(self.splits["train"][2])
        rows = batch_rows(self.config.train, n, step, micro, rank, world)
        ids, lengths, labels = self._batch("train", rows)
        return {"input_ids": ids, "lengths": lengths, "labels": labels}

    # evaluation -------------------------------------------------------------------
    def eval_sums(
        self, model: nn.Module, rank: int, world: int, device: torch.device
    ) -> dict[str, float]:
        """Summed loss, correct predictions and per-class true/false positives over every
        held-out text (this rank's share)."""
        labels_all = self.splits["val"][2]
        K = len(self.classes)
        rows = np.arange(len(labels_all))[rank::world]
        tp, fp, fn = np.zeros(K), np.zeros(K), np.zeros(K)
        nll, correct = 0.0, 0
        bs = self.config.data.eval_batch_size
        for i in range(0, len(rows), bs):
            idx, lengths, labels = (t.to(device) for t in self._batch("val", rows[i : i + bs]))
            logits = model.classify(idx, lengths).float()
            nll += float(F.cross_entropy(logits, labels, reduction="sum"))
            pred = logits.argmax(-1).cpu().numpy()
            true = labels.cpu().numpy()
            correct += int((pred == true).sum())
            np.add.at(tp, true[pred == true], 1)
            np.add.at(fp, pred[pred != true], 1)
            np.add.at(fn, true[pred != true], 1)
        sums = {"nll": nll, "count": float(len(rows)), "correct": float(correct)}
        for k in range(K):
            sums.update({f"tp_{k}": tp[k], f"fp_{k}": fp[k], f"fn_{k}": fn[k]})
        return sums

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Loss (nats per text), accuracy and macro-F1 (the unweighted mean of per-class
        F1 = 2TP / (2TP + FP + FN); a class never predicted nor present scores 0)."""
        if not sums["count"]:
            return {}
        f1 = []
        for k in range(len(self.classes)):
            tp, fp, fn = sums[f"tp_{k}"], sums[f"fp_{k}"], sums[f"fn_{k}"]
            f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        return {
            "loss": sums["nll"] / sums["count"],
            "accuracy": sums["correct"] / sums["count"],
            "macro_f1": float(np.mean(f1)),
        }

    def samples(self, model: nn.Module, step: int, device: torch.device) -> dict[str, str]:
        """The first held-out texts with their true and predicted labels."""
        rows = np.arange(min(8, len(self.splits["val"][2])))
        idx, lengths, labels = (t.to(device) for t in self._batch("val", rows))
        with torch.inference_mode():
            probs = model.classify(idx, lengths).float().softmax(-1).cpu()
        ids, offsets, _ = self.splits["val"]
        lines = []
        for i, r in enumerate(rows.tolist()):
            text = self.tokenizer.decode(ids[offsets[r] : offsets[r + 1]].tolist())
            p, k = probs[i].max(0)
            mark = "ok " if int(k) == int(labels[i]) else "NO "
            lines.append(f"{mark} true {self.classes[int(labels[i])]!r}, predicted "
                         f"{self.classes[int(k)]!r} ({float(p):.2f}): {text[:100]!r}")  # fmt: skip
        return {"held-out predictions": "\n".join(lines)}
