"""The task contract: what every task provides, so that the shared layers (trainer,
training, loading, CLI, server, report) never name a family.

A task is what a run trains. It glues a data source, a model family, an evaluation
and a pipeline; several tasks may share one family (gpt, chat and classifier are three
tasks over the GPT family). Its three sides:

- class side: ``name`` (what ``family:`` in a recipe and in run.json says), its config
  types, ``prepare_data`` (source -> prepared files), ``finish_config`` (fill what
  follows from the prepared data, the same at creation and on resume) and ``open``
  (the task of a run folder);
- instance side: the model, ``train_batch`` (a dict of named tensors; the model's
  ``training_step`` reads it), ``eval_sums`` (additive, so ranks can be summed),
  ``eval_metrics`` (sums -> numbers) and ``samples`` (what the trainer writes to
  samples/: text, or an image as an (H, W, C) uint8 array);
- presentation: ``pipeline_class`` (what ``aigc.load`` returns), ``headline_metric``
  (the held-out number the progress bar and report show first), ``loss_keys`` (logged
  keys that are losses: lower is better, drawn together), ``resumable_keys`` (config
  keys that may change when a run continues), ``lora_targets`` (linear layers LoRA
  adapts by default; empty where LoRA does not apply), ``sample_verb`` and
  ``sample_hint`` (the command, ``aigc sample`` by default, and its arguments suggested
  when a run is made).

Adding a family is then a model file, a task file, a pipeline file (if its verbs are
new), one line in ``aigc.tasks.TASKS`` (or an ``aigc.tasks`` entry point), recipes and
tests.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from aigc.config import Config
from aigc.runs import RunDir

TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class DataFiles:
    """Where a task's prepared data lies: the data folder, and the tokenizer file of the
    tasks that have one. The same task reads both while a run is being created (a
    temporary folder) and once it exists (the run folder)."""

    data_dir: Path
    tokenizer_path: Path

    @classmethod
    def prepared_in(cls, folder: Path) -> DataFiles:
        """A folder that ``prepare_data`` wrote, the tokenizer beside the data."""
        return cls(folder, folder / TOKENIZER_FILE)

    @classmethod
    def of_run(cls, run: RunDir) -> DataFiles:
        return cls(run.data_dir, run.tokenizer_path)

    def install(self, run: RunDir) -> None:
        """Moves prepared files into a new run folder (the tokenizer to the run's top)."""
        if self.tokenizer_path.is_file():
            shutil.move(str(self.tokenizer_path), run.tokenizer_path)
        shutil.move(str(self.data_dir), run.data_dir)


# Keys that may change when any run continues; anything else would make the continued
# run a different experiment, so it needs a new run folder. Tasks add their own.
RESUMABLE_KEYS: frozenset[str] = frozenset({
    "train.max_steps",
    "train.max_time",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.sample_every",
    "train.nan_tolerance",
    "train.device",
    "train.compile",
})  # fmt: skip


class Task(ABC):
    """The contract every task implements (see the module docstring)."""

    # class side --------------------------------------------------------------
    name: ClassVar[str]  # the family: in recipes, config.yaml and run.json
    data_config: ClassVar[type]  # the dataclass of config.data
    model_config: ClassVar[type]  # the dataclass of config.model
    item_name: ClassVar[str]  # what items_per_batch counts: "tokens", "images", ...

    # presentation ------------------------------------------------------------
    pipeline_class: ClassVar[str]  # "module:Class" of what aigc.load returns
    headline_metric: ClassVar[str]  # e.g. "loss"; held-out, from eval_metrics
    loss_keys: ClassVar[frozenset[str]] = frozenset({"loss"})  # logged losses
    resumable_keys: ClassVar[frozenset[str]] = frozenset()  # beyond RESUMABLE_KEYS
    lora_targets: ClassVar[tuple[str, ...]] = ()  # () = LoRA does not apply
    sample_hint: ClassVar[str] = ""  # arguments of the `aigc sample` a new run suggests
    sample_verb: ClassVar[str] = "sample"  # the CLI verb it suggests (restore, translate, ...)

    # instance side -----------------------------------------------------------
    config: Config
    run: RunDir
    model: nn.Module
    items_per_batch: int  # items (item_name) in one micro-batch of one process

    @property
    def headline(self) -> str:
        """This run's headline metric: ``headline_metric``, unless what the run learnt
        changes what it is measured by (a spoken run on a folder of classes)."""
        return self.headline_metric

    @classmethod
    @abstractmethod
    def prepare_data(cls, config: Config, data_dir: Path, progress: bool = True) -> None:
        """Reads the data source of ``config.data`` and writes the prepared data into
        ``data_dir`` (and ``data_dir/tokenizer.json`` where the task has a tokenizer).
        DataError naming the file and what to do when the source is unusable."""

    @classmethod
    @abstractmethod
    def finish_config(cls, config: Config, files: DataFiles) -> None:
        """Fills the config values that follow from the prepared data (vocabulary size,
        image size, classes, ...), in place; used at creation, on resume and on load."""

    @classmethod
    @abstractmethod
    def open(cls, config: Config, run: RunDir, with_data: bool = True) -> Task:
        """The task of an existing run folder; ``with_data=False`` skips reading the
        prepared data (enough to load the model and sample)."""

    @abstractmethod
    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, Any]:
        """This (micro-step, rank)'s share of step ``step``'s batch: named tensors (on the
        CPU; the trainer moves them), a pure function of (seed, step, micro, rank)."""

    @abstractmethod
    def eval_sums(
        self, model: nn.Module, rank: int, world: int, device: torch.device
    ) -> dict[str, float]:
        """Additive sums over this rank's share of the held-out data; every rank returns
        the same keys (the trainer all-reduces them by position)."""

    @abstractmethod
    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """The held-out metrics from the summed ``eval_sums``."""

    @abstractmethod
    def samples(self, model: nn.Module, step: int, device: torch.device) -> dict[str, Any]:
        """Named samples written during training: text (str) or an image ((H, W, C) uint8
        array); see aigc.trainer.SAMPLE_WRITERS."""

    # hooks with defaults -----------------------------------------------------
    def eval_info(self) -> dict[str, str]:
        """What the evaluation's numbers depend on beyond the run (e.g. the feature
        extractor's name), logged and saved beside them."""
        return {}

    def ema_module(self) -> nn.Module:
        """The module whose weights an EMA follows (a GAN's generator, say)."""
        return self.model

    def fresh_modules(self) -> tuple[str, ...]:
        """Submodules that a run initialised from a base run starts fresh (a new head)."""
        return ()

    def lora_extras(self, base: RunDir) -> int:
        """Parameters beyond the adapters that a LoRA fine-tune from ``base`` trains
        (made trainable here, after the adapters froze the rest); returns their count.
        None by default (a text-to-image run: the embeddings of words new to the base)."""
        return 0


class TokenSplitsTask(Task):
    """What the tasks over labelled or masked token data share (chat, classifier): a
    tokenizer in the run, a model built from ``model_class``, and train/val arrays
    ``data/{split}_{part}.npy`` for each of ``split_parts``, read into ``splits``."""

    model_class: ClassVar[type]
    split_parts: ClassVar[tuple[str, ...]]

    def __init__(self, config: Config, run: RunDir, tokenizer: Any, with_data: bool = True):
        self.config = config
        self.run = run
        self.tokenizer = tokenizer
        self.model: nn.Module = self.model_class(config.model)
        self.items_per_batch = config.train.batch_size
        self.splits: dict[str, tuple] = {}
        if with_data:
            self.load_data()

    def load_data(self) -> None:
        """Reads the prepared splits into ``splits``: {split: (part arrays, ...)}."""
        from aigc.tasks import load_splits

        self.splits = load_splits(self.run.data_dir, self.split_parts)
