"""Tasks glue one family's data, model, evaluation and sampling for the trainer.

``models/`` holds mathematics and ``data/`` holds readers; neither imports the
other. A task is where they meet: it prepares data into a run folder, builds the
model from the config, hands batches to the trainer, evaluates, and loads a
trained run for generation. Families register here by name.
"""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path
from typing import Any

from aigc.errors import CheckpointError, ConfigError

# family name -> "module:Class"; imported lazily so `aigc --help` stays fast.
TASKS: dict[str, str] = {
    "gpt": "aigc.tasks.lm:LMTask",
    "gan": "aigc.tasks.gan:GANTask",
    "vae": "aigc.tasks.vae:VAETask",
    "chat": "aigc.tasks.chat:ChatTask",
    "classifier": "aigc.tasks.classify:ClassifyTask",
    "diffusion": "aigc.tasks.diffusion:DiffusionTask",
    "restore": "aigc.tasks.restore:RestoreTask",
    "restore_diffusion": "aigc.tasks.restore_diffusion:RestoreDiffusionTask",
    "cyclegan": "aigc.tasks.translate:CycleGANTask",
    "pix2pix": "aigc.tasks.translate:Pix2PixTask",
    "music": "aigc.tasks.music:MusicTask",
    "denoise": "aigc.tasks.denoise:DenoiseTask",
    "spoken": "aigc.tasks.spoken:SpokenTask",
    "tts": "aigc.tasks.tts:TTSTask",
}
ENTRY_POINTS = "aigc.tasks"  # installed packages add tasks under this entry-point group
_plugins_read = False


def register_task(name: str, target: str | type) -> None:
    """Adds a task: ``name`` is what ``family:`` says in recipes and run folders,
    ``target`` the Task subclass or its "module:Class". An installed package does the
    same with an entry point in the ``aigc.tasks`` group, e.g. in pyproject.toml:
    ``[project.entry-points."aigc.tasks"] mytask = "mypkg.task:MyTask"``."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"task name {name!r} must be an identifier")
    if isinstance(target, type):
        target = f"{target.__module__}:{target.__qualname__}"
    TASKS[name] = target


def _read_plugins() -> None:
    global _plugins_read
    if _plugins_read:
        return
    _plugins_read = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINTS):
        TASKS.setdefault(ep.name, ep.value)


def get_task(family: str) -> Any:
    """The task class of ``family``; ConfigError with the closest name if unknown."""
    if family not in TASKS:
        _read_plugins()
    if family not in TASKS:
        close = difflib.get_close_matches(family, list(TASKS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(TASKS))}"
        raise ConfigError(f"family={family!r} is not a known model family{hint}")
    module, cls = TASKS[family].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise ConfigError(
            f"family={family!r}: its task {TASKS[family]} cannot be loaded ({e})"
        ) from None


# ---------------------------------------------------------------------------
# Helpers that several tasks share


def batch_rows(train: Any, n: int, step: int, micro: int, rank: int, world: int) -> Any:
    """Indices in [0, n) of this (micro-step, rank)'s share of the step's batch.

    The step's global batch of ``batch_size * grad_accum * world`` indices is drawn
    from (seed, step) identically everywhere, and each (micro-step, rank) takes its
    slice, so N processes with batch B, or B with N accumulation steps, see exactly
    the rows that one process with batch N*B sees. ``train`` is the TrainConfig.
    """
    import numpy as np

    B = train.batch_size
    rng = np.random.default_rng([train.seed, step])
    rows = rng.integers(0, n, size=B * train.grad_accum * world)
    part = micro * world + rank
    return rows[part * B : (part + 1) * B]


def load_splits(data_dir: Path, parts: tuple[str, ...]) -> dict[str, tuple]:
    """The train and val arrays ``{split}_{part}.npy`` of a run's data folder, read
    without pickle; CheckpointError naming the folder when one is missing or damaged."""
    import numpy as np

    out = {}
    for split in ("train", "val"):
        try:
            out[split] = tuple(
                np.load(data_dir / f"{split}_{part}.npy", allow_pickle=False) for part in parts
            )
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"{data_dir}: the {split} split is missing or damaged ({e})"
            ) from None
    return out
