"""The toy family's task: the image tasks' data, batches and evaluation, this model."""

from __future__ import annotations

from aigc.tasks.images import ImageTask

from .model import ToyConfig, ToyGaussian


class ToyTask(ImageTask):
    name = "toy"
    model_config = ToyConfig
    model_class = ToyGaussian
    pipeline_class = "tests.toy.pipeline:ToyPipeline"
    headline_metric = "fid"
    loss_keys = frozenset({"nll"})
