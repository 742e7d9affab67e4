"""The Python face of aigc: ``train``, ``finetune``, ``load`` and the pipelines they
make and return. The CLI and the server are thin layers over these.

Each lives in its own module (aigc.training, aigc.finetuning, aigc.loading,
aigc.pipelines); this one gathers them. The names of aigc 0.1 stay: TextGenerator,
TextClassifier and ImageGenerator are the text, classify and image pipelines.
"""

from __future__ import annotations

from aigc.finetuning import FINETUNE_TASKS, export_merged, finetune
from aigc.loading import load
from aigc.pipelines.base import EvalResult, ImageOutput, Pipeline, TextOutput, save_eval
from aigc.pipelines.classify import ClassifyPipeline
from aigc.pipelines.image import ImagePipeline
from aigc.pipelines.text import ChatPipeline, TextPipeline
from aigc.pipelines.vae import VAEPipeline
from aigc.training import TrainOutcome, default_run_dir, run_config, train

TextGenerator = TextPipeline
TextClassifier = ClassifyPipeline
ImageGenerator = ImagePipeline

__all__ = [
    "FINETUNE_TASKS",
    "ChatPipeline",
    "ClassifyPipeline",
    "EvalResult",
    "ImageGenerator",
    "ImageOutput",
    "ImagePipeline",
    "Pipeline",
    "TextClassifier",
    "TextGenerator",
    "TextOutput",
    "TextPipeline",
    "TrainOutcome",
    "VAEPipeline",
    "default_run_dir",
    "export_merged",
    "finetune",
    "load",
    "run_config",
    "save_eval",
    "train",
]
