"""Pipelines: what ``aigc.load(run)`` returns, one class per kind of output.

``base.Pipeline`` holds what every kind shares (the run, task, model and device;
``evaluate``; the ``postprocess`` hook; output dataclasses); ``text`` (language and
chat models), ``classify`` (text classifiers), ``image`` (image generators) and ``vae``
add their verbs. A task names its pipeline in ``Task.pipeline_class``.
"""

from __future__ import annotations

import importlib
from typing import Any

from aigc.pipelines.base import EvalResult, ImageOutput, Pipeline, TextOutput

__all__ = ["EvalResult", "ImageOutput", "Pipeline", "TextOutput", "pipeline_class"]


def pipeline_class(path: str) -> Any:
    """The class named by a task's ``pipeline_class`` ("module:Class")."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)
