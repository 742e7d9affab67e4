"""aigc: train, evaluate, sample and serve generative models on your own data."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Config",
    "TextGenerator",
    "TrainOutcome",
    "__version__",
    "detect_text",
    "finetune",
    "load",
    "load_config",
    "train",
]

# Imported on first use, so `aigc --help` answers without loading torch.
_LAZY = {
    "train": "aigc.api",
    "finetune": "aigc.api",
    "load": "aigc.api",
    "TextGenerator": "aigc.api",
    "TrainOutcome": "aigc.api",
    "Config": "aigc.config",
    "load_config": "aigc.config",
    "detect_text": "aigc.safety.text_watermark",
}

if TYPE_CHECKING:
    from aigc.api import TextGenerator, TrainOutcome, load, train
    from aigc.config import Config, load_config
    from aigc.safety.text_watermark import detect_text


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'aigc' has no attribute {name!r}")
