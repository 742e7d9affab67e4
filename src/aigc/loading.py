"""Loading a run: ``load(run)`` returns its task's pipeline (see aigc.pipelines)."""

from __future__ import annotations

from pathlib import Path

from aigc.errors import CheckpointError
from aigc.finetuning import init_from_base
from aigc.pipelines import Pipeline, pipeline_class
from aigc.runs import RunDir
from aigc.tasks import get_task
from aigc.trainer import copy_tensors_into, frozen_names, load_module_tensors, select_device
from aigc.training import run_config


def load(run_dir: str | Path, device: str = "auto", ema: bool | None = None) -> Pipeline:
    """Loads a trained run's latest checkpoint (its EMA weights when it kept an EMA,
    unless ``ema=False``) into the pipeline its task names: a TextPipeline for a
    language model, a ChatPipeline for a chat model, a ClassifyPipeline for a
    classifier, an ImagePipeline for a GAN, a VAEPipeline for a VAE."""
    run = RunDir(run_dir)
    info = run.info()
    cfg = run_config(run)
    if info["family"] != cfg.family:
        raise CheckpointError(
            f"{run.path}: run.json says {info['family']!r}, config.yaml says {cfg.family!r}"
        )
    task_cls = get_task(cfg.family)
    task = task_cls.open(cfg, run, with_data=False)
    dev = select_device(device)
    ckpt = run.latest_checkpoint()
    if ckpt is None:
        raise CheckpointError(f"{run.path} has no checkpoint yet; train it first")
    files, state = run.load_checkpoint(ckpt)
    if state.get("family") != cfg.family:
        raise CheckpointError(f"{ckpt} holds a {state.get('family')!r} model, not {cfg.family!r}")
    model = task.model
    if cfg.train.lora_rank:  # LoRA: the base's frozen weights, then this run's adapters
        init_from_base(task, cfg.train, run.path)
    load_module_tensors(
        model, files["model"], state.get("tied", {}), str(ckpt / "model.safetensors"),
        optional=frozen_names(model),
    )  # fmt: skip
    use_ema = ema if ema is not None else cfg.train.ema > 0
    if use_ema and "ema" in files:
        copy_tensors_into(task.ema_module(), files["ema"])
    if cfg.train.lora_rank:
        from aigc.models.lora import merge_lora

        merge_lora(model)  # plain weights again: the KV cache, export and serving need them
    model.to(dev).eval()
    return pipeline_class(task_cls.pipeline_class)(run, task, dev, int(state["step"]))
