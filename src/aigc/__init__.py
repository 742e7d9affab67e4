"""aigc: train, evaluate, sample and serve generative models on your own data."""

from __future__ import annotations

__version__ = "0.1.0"

from aigc.api import TextGenerator, TrainOutcome, load, train
from aigc.config import Config, load_config

__all__ = ["Config", "TextGenerator", "TrainOutcome", "__version__", "load", "load_config", "train"]
