"""Training a run: ``train()`` makes a run folder or continues one.

A recipe (or dict, or Config) and dotted overrides become a config; the task prepares
its data into a temporary folder, fills what follows from the data, and the run
folder is created around it; the trainer then runs under the folder's writer lock.
Continuing checks that only resumable keys changed.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from aigc.config import Config, load_config
from aigc.errors import AigcError, CheckpointError, ConfigError
from aigc.runs import LOCK_NAME, MetricsLog, RunDir, atomic_write_text, run_lock
from aigc.tasks import get_task
from aigc.tasks.base import RESUMABLE_KEYS, DataFiles
from aigc.trainer import (
    DistInfo,
    Trainer,
    TrainResult,
    init_distributed,
    select_device,
)


@dataclass
class TrainOutcome:
    """What :func:`train` returns: where the run is and how it ended."""

    run_dir: Path
    step: int
    train_time: float
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0
    headline: str = ""  # the run's headline metric (Task.headline)


def default_run_dir(config_source: Any) -> Path:
    if isinstance(config_source, str | Path):
        return Path("runs") / Path(config_source).stem
    return Path("runs") / "run"


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


def _resolve_paths(config: Config) -> None:
    """Stores data paths absolute, so a run resumes from any working directory."""
    for key in ("path", "source"):  # text: data.path; images: data.source
        value = getattr(config.data, key, None)
        if isinstance(value, str) and value and Path(value).expanduser().exists():
            setattr(config.data, key, str(Path(value).expanduser().resolve()))


def _merge_for_resume(saved: Config, new: Config | None, run: RunDir) -> Config:
    if new is None:
        return saved
    task_cls = get_task(new.family)
    # values that follow from the data (vocabulary, image size, classes); a damaged
    # run folder is reported when it is opened
    with contextlib.suppress(AigcError):
        task_cls.finish_config(new, DataFiles.of_run(run))
    resumable = RESUMABLE_KEYS | task_cls.resumable_keys
    a, b = _flat(saved.to_dict()), _flat(new.to_dict())
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in resumable)
    if changed:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:3])
        raise ConfigError(
            f"{run.path} was trained with a different config ({shown}); "
            "continue it unchanged or train into a new folder with --run-dir"
        )
    for key in resumable:
        section, name = key.split(".")
        setattr(getattr(saved, section), name, getattr(getattr(new, section), name))
    return saved


def train(
    config: str | Path | dict | Config | None = None,
    overrides: Sequence[str] = (),
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainOutcome:
    """Trains a model and returns where its run folder is.

    ``config`` is a YAML recipe path, a dict, a Config, or None to continue the run
    in ``run_dir``. ``overrides`` are dotted ``key=value`` strings. Training into a
    folder that already holds a run continues it from its last complete checkpoint
    (``resume=True`` insists that there is one).
    """
    if config is None and run_dir is None:
        raise ConfigError("give a config (recipe) or a run folder to continue")
    # The switch the trainer's progress bar honours also silences the data bars.
    progress = progress and os.environ.get("AIGC_NO_PROGRESS") != "1"
    run = RunDir(run_dir if run_dir is not None else default_run_dir(config))
    new = load_config(config, overrides) if config is not None else None
    if new is not None:
        _resolve_paths(new)
    elif overrides and run.exists():  # a mistake in them is said before the writer lock
        load_config(run_config(run), overrides)
    if run.exists():  # so is a run of another family, even while another command writes it
        _check_families(run, new)

    dist_info = init_distributed(new.train.device if new else "auto")
    # one writer per run folder, for the whole command (ranks > 0 never write)
    lock = run_lock(run.path) if dist_info.is_main else contextlib.nullcontext()
    try:
        with lock:
            return _train_locked(run, new, overrides, resume, dist_info, progress)
    finally:
        if dist_info.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _check_families(run: RunDir, new: Config | None) -> Config:
    """The run's saved config, after checking that run.json, config.yaml and the new
    config (if any) name one family (reads only: safe without the writer lock)."""
    if new is not None:
        run.check_family(new.family)
    saved = run_config(run)
    if (family := run.info()["family"]) != saved.family:
        raise CheckpointError(
            f"{run.path}: run.json says {family!r}, config.yaml says {saved.family!r}"
        )
    return saved


def _train_locked(
    run: RunDir,
    new: Config | None,
    overrides: Sequence[str],
    resume: bool,
    dist_info: DistInfo,
    progress: bool,
) -> TrainOutcome:
    if run.exists():
        saved = _check_families(run, new)
        if new is None and overrides:
            new = load_config(saved, overrides)
        cfg = _merge_for_resume(saved, new, run)
    else:
        if resume or new is None:
            raise CheckpointError(f"{run.path} holds no run to resume")
        if run.path.exists() and any(p.name != LOCK_NAME for p in run.path.iterdir()):
            raise CheckpointError(
                f"{run.path} exists and is not an aigc run folder; choose another --run-dir"
            )
        cfg = new
        _create_run(cfg, run, dist_info, progress)
    return _train_in(cfg, run, dist_info, progress)


def _create_run(cfg: Config, run: RunDir, dist_info: DistInfo, progress: bool) -> None:
    """Prepares data in a temporary folder, then creates the run folder around it.

    If reading the data fails nothing is left behind, and an existing run is
    never touched.
    """
    task_cls = get_task(cfg.family)
    if dist_info.is_main:
        tmp = run.path.parent / f".{run.path.name}.preparing-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            task_cls.prepare_data(cfg, tmp, progress=progress)  # writes tokenizer.json too
            files = DataFiles.prepared_in(tmp)
            task_cls.finish_config(cfg, files)
            run.create(cfg.family, _config_yaml(cfg, run))
            files.install(run)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if dist_info.world > 1:
        dist.barrier()


def _train_in(cfg: Config, run: RunDir, dist_info: DistInfo, progress: bool) -> TrainOutcome:
    device = select_device(cfg.train.device)
    if device.type == "cuda" and dist_info.world > 1:
        device = torch.device("cuda", dist_info.local_rank)
    _set_global_modes(cfg)
    task_cls = get_task(cfg.family)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    task = task_cls.open(cfg, run)
    fresh = run.latest_checkpoint() is None
    # a full fine-tune needs its base only to start; a LoRA run always (its frozen weights)
    if cfg.train.init_from and (fresh or cfg.train.lora_rank):
        from aigc.finetuning import init_from_base

        trainable, total = init_from_base(task, cfg.train, run.path)
        if dist_info.is_main and fresh:
            print(f"fine-tuning from {cfg.train.init_from}: {trainable:,} of {total:,} "
                  f"parameters train ({100 * trainable / total:.2f}%)", flush=True)  # fmt: skip
            log = MetricsLog(run.metrics_path)
            log.write({"step": 0, "trainable_params": trainable, "total_params": total})
            log.close()
    trainer = Trainer(task, cfg, run, dist_info, device, progress=progress)
    resumed = trainer.restore()
    start = trainer.step
    if resumed and trainer.done():  # nothing to train: the run folder stays as it was
        return TrainOutcome(run.path, trainer.step, trainer.train_time, {}, start)
    if resumed and dist_info.is_main:
        run.truncate_metrics(start)
    if dist_info.is_main:
        atomic_write_text(run.config_path, _config_yaml(cfg, run))
    result: TrainResult = trainer.fit()
    return TrainOutcome(run.path, result.step, result.train_time, result.metrics, start,
                        trainer.task.headline)  # fmt: skip


def run_config(run: RunDir) -> Config:
    """A run's config.yaml, with its base run (``train.init_from``) found and made absolute.

    The base is recorded relative to the run when it was nearby, else absolute. Runs
    written before that recorded it absolute: when that path is gone (the runs folder
    moved, or is mounted elsewhere) the folder of the same name beside the run is taken;
    its weights' sha256 is checked when they are read.
    """
    cfg = load_config(run.config_path)
    if cfg.train.init_from:
        cfg.train.init_from = str(_find_base(cfg.train.init_from, run.path))
    return cfg


def _find_base(recorded: str, run_path: Path) -> Path:
    given = Path(recorded)
    where = given if given.is_absolute() else run_path / given
    if (where / "run.json").is_file():
        return where.resolve()
    beside = run_path.parent / given.name
    if given.name and (beside / "run.json").is_file():
        return beside.resolve()
    raise CheckpointError(
        f"the base run of {run_path} is missing: train.init_from is {recorded!r} and "
        f"{where} holds no run; put the base run back there, or set train.init_from in "
        f"{run_path / 'config.yaml'} to where it is now (its weights' sha256 is checked)"
    )


def _config_yaml(cfg: Config, run: RunDir) -> str:
    """config.yaml's text. A base run near the run (at most two folders up from it, as
    runs/base beside runs/base-lora) is recorded relative to the run, so that the runs
    folder can be moved or mounted elsewhere as a whole."""
    if not cfg.train.init_from:
        return cfg.to_yaml()
    rel = Path(os.path.relpath(Path(cfg.train.init_from).resolve(), run.path.resolve()))
    if rel.parts.count("..") > 2:
        return cfg.to_yaml()
    out = copy.deepcopy(cfg)
    out.train.init_from = rel.as_posix()
    return out.to_yaml()


def _set_global_modes(cfg: Config) -> None:
    # Activations that drift towards tiny values hit denormal floats, which
    # are many times slower on x86 CPUs; flush them to zero.
    torch.set_flush_denormal(True)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
