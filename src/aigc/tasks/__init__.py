"""Tasks glue one family's data, model, evaluation and sampling for the trainer.

``models/`` holds mathematics and ``data/`` holds readers; neither imports the
other. A task is where they meet: it prepares data into a run folder, builds the
model from the config, hands batches to the trainer, evaluates, and loads a
trained run for generation. Families register here by name.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from aigc.errors import ConfigError

# family name -> "module:Class"; imported lazily so `aigc --help` stays fast.
TASKS: dict[str, str] = {
    "gpt": "aigc.tasks.lm:LMTask",
    "gan": "aigc.tasks.gan:GANTask",
    "vae": "aigc.tasks.vae:VAETask",
    "chat": "aigc.tasks.chat:ChatTask",
    "classifier": "aigc.tasks.classify:ClassifyTask",
}


def get_task(family: str) -> Any:
    """The task class of ``family``; ConfigError with the closest name if unknown."""
    if family not in TASKS:
        close = difflib.get_close_matches(family, list(TASKS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(TASKS))}"
        raise ConfigError(f"family={family!r} is not a known model family{hint}")
    module, cls = TASKS[family].split(":")
    return getattr(importlib.import_module(module), cls)
