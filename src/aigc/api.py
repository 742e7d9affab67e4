"""The Python face of aigc: ``train()``, ``load()`` and the generator objects.

The CLI and (later) the server are thin layers over these functions.
"""

from __future__ import annotations

import contextlib
import copy
import json
import operator
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from aigc.config import Config, load_config
from aigc.errors import AigcError, CheckpointError, ConfigError, RequestError
from aigc.runs import LOCK_NAME, MetricsLog, RunDir, atomic_write_text, file_sha256, run_lock
from aigc.tasks import get_task
from aigc.trainer import (
    DistInfo,
    Trainer,
    TrainResult,
    frozen_names,
    init_distributed,
    load_module_tensors,
    select_device,
)

# Keys that may change when a run is continued; anything else would make the
# continued run a different experiment, so it needs a new run folder.
RESUMABLE_KEYS = {
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
    "data.eval_samples",
    "data.eval_sample_tokens",
    "data.eval_metrics",
    "data.inception_weights",
}


@dataclass
class TrainOutcome:
    """What :func:`train` returns: where the run is and how it ended."""

    run_dir: Path
    step: int
    train_time: float
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0


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
    # values that follow from the data (vocabulary, image size, classes); a damaged
    # run folder is reported when it is opened
    with contextlib.suppress(AigcError):
        get_task(new.family).complete_config(new, run)
    a, b = _flat(saved.to_dict()), _flat(new.to_dict())
    changed = sorted(
        k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in RESUMABLE_KEYS
    )
    if changed:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:3])
        raise ConfigError(
            f"{run.path} was trained with a different config ({shown}); "
            "continue it unchanged or train into a new folder with --run-dir"
        )
    for key in RESUMABLE_KEYS:
        section, name = key.split(".")
        if hasattr(getattr(new, section), name):  # some keys belong to one family only
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

    dist_info = init_distributed(new.train.device if new else "auto")
    # one writer per run folder, for the whole command (ranks > 0 never write)
    lock = run_lock(run.path) if dist_info.is_main else contextlib.nullcontext()
    try:
        with lock:
            return _train_locked(run, new, overrides, resume, dist_info, progress)
    finally:
        if dist_info.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train_locked(
    run: RunDir,
    new: Config | None,
    overrides: Sequence[str],
    resume: bool,
    dist_info: DistInfo,
    progress: bool,
) -> TrainOutcome:
    if run.exists():
        if new is not None:
            run.check_family(new.family)
        saved = run_config(run)
        if (family := run.info()["family"]) != saved.family:
            raise CheckpointError(
                f"{run.path}: run.json says {family!r}, config.yaml says {saved.family!r}"
            )
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
            task_cls.finish_config(cfg, tmp)
            run.create(cfg.family, _config_yaml(cfg, run))
            task_cls.install_data(tmp, run)
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
        trainable, total = _init_from_base(task.model, cfg.train, run.path)
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
    return TrainOutcome(run.path, result.step, result.train_time, result.metrics, start)


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


def _init_from_base(model: torch.nn.Module, train_cfg: Any, where: Path) -> tuple[int, int]:
    """Fine-tuning: the base run's latest weights (its EMA weights where it kept an EMA)
    into ``model``, checked against train.init_sha256; then LoRA adapters when
    train.lora_rank > 0. A token embedding with more rows than the base's (a chat run's
    template tokens) keeps the base's rows and starts the new ones at their mean; modules
    the base lacks (``model.fresh_modules``, e.g. a classification head) keep their
    initialisation and always train. With LoRA, a grown embedding trains its new rows
    only (PEFT's trainable_token_indices: the old rows get zero gradient, and LoRA's
    default weight decay is 0, so they stay the base's); the run stores the whole
    embedding. Returns (trainable, total) parameter counts."""
    from aigc.models.gpt import grow_vocab
    from aigc.models.lora import apply_lora, trainable_share

    base = RunDir(train_cfg.init_from)
    ckpt = base.latest_checkpoint()
    if ckpt is None:
        raise CheckpointError(f"the base run {base.path} has no checkpoint")
    digest = file_sha256(ckpt / "model.safetensors")
    if train_cfg.init_sha256 and digest != train_cfg.init_sha256:
        raise CheckpointError(
            f"the base run {base.path} changed since {where} was fine-tuned from it "
            f"(model.safetensors sha256 {digest[:12]}, recorded {train_cfg.init_sha256[:12]})"
        )
    files, state = base.load_checkpoint(ckpt)
    expected = model.state_dict()
    fresh = tuple(getattr(model, "fresh_modules", ()))
    new_names = frozenset(k for k in expected if k.split(".")[0] in fresh)

    base_rows = []  # the base's vocabulary size, where the model's is larger

    def fit(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in tensors.items():
            want = expected.get(name)
            if (
                name.endswith(("wte.weight", "lm_head.weight"))
                and want is not None
                and t.ndim == 2
                and t.shape[1] == want.shape[1]
                and t.shape[0] < want.shape[0]
            ):
                base_rows.append(t.shape[0])
                t = grow_vocab(t, want.shape[0])  # fmt: skip
            out[name] = t
        return out

    load_module_tensors(
        model, fit(files["model"]), state.get("tied", {}), str(ckpt / "model.safetensors"),
        optional=new_names,
    )  # fmt: skip
    if "ema" in files and load_config(base.config_path).train.ema > 0:
        live = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, t in fit(files["ema"]).items():
                live[name].copy_(t)
    if not train_cfg.lora_rank:
        return trainable_share(model)
    apply_lora(model, train_cfg.lora())
    for name in fresh:  # a new head trains fully (PEFT's modules_to_save)
        getattr(model, name).requires_grad_(True)
    trainable, total = trainable_share(model)
    if base_rows:  # new tokens (chat markers) train their embedding rows; the old rows stay
        wte = model.transformer.wte.weight
        keep = base_rows[0]
        wte.requires_grad_(True)
        wte.register_hook(lambda g: torch.cat([torch.zeros_like(g[:keep]), g[keep:]]))
        trainable += (wte.shape[0] - keep) * wte.shape[1]
    return trainable, total


FINETUNE_TASKS = {"lm": "gpt", "classify": "classifier", "chat": "chat"}


def finetune(
    base_run: str | Path,
    overrides: Sequence[str] = (),
    method: str = "full",
    run_dir: str | Path | None = None,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_targets: Sequence[str] = ("c_attn", "c_proj", "c_fc"),
    task: str = "lm",
    progress: bool = True,
) -> TrainOutcome:
    """Fine-tunes a GPT run into a new run that starts from its latest weights and keeps
    its tokenizer and architecture; records the base (path, sha256 of its weights).

    ``task`` is "lm" (more language modelling; the data default to the standard
    library's sources, ``data.path=stdlib``), "classify" (a classification head on the
    pooled hidden state; the data default to the standard library's docstrings labelled
    by package) or "chat" (conversations in the chat template, loss on the assistant's
    tokens; the data default to the Python documentation demonstrations). Characters
    the base's vocabulary lacks are written as "?".
    ``method`` is "full" (every weight trains) or "lora" (only rank-``lora_rank``
    adapters on ``lora_targets`` train, plus a classification head; the run stores only
    them). ``overrides`` change data, model (pooling) and training keys.
    """
    base = RunDir(base_run)
    family = base.info()["family"]
    if family not in ("gpt", "chat"):
        raise ConfigError(
            f"{base.path} is a {family!r} run; fine-tuning needs a GPT language model run"
        )
    if task not in FINETUNE_TASKS:
        raise ConfigError(f"--task {task!r}: choose {', '.join(FINETUNE_TASKS)}")
    if method not in ("full", "lora"):
        raise ConfigError(f"--method {method!r}: choose full or lora")
    base_cfg = load_config(base.config_path)
    if base_cfg.train.lora_rank:
        raise ConfigError(f"{base.path} is itself a LoRA run; export it merged first")
    ckpt = base.latest_checkpoint()
    if ckpt is None:
        raise CheckpointError(f"the base run {base.path} has no checkpoint; train it first")
    lora = method == "lora"
    if lora and (isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1):
        raise ConfigError(f"--lora-rank {lora_rank!r} must be an integer of at least 1")
    defaults = [
        "train.max_steps=500", "train.max_time=0", "train.warmup_steps=20",
        "train.eval_every=0", "train.ema=0",
        f"train.lr={3e-3 if lora else 1e-3}", f"train.min_lr={3e-4 if lora else 1e-4}",
        "train.weight_decay=0.0" if lora else "train.weight_decay=0.1",
    ]  # fmt: skip
    data = base_cfg.to_dict()
    data["family"] = FINETUNE_TASKS[task]
    if task == "lm":
        data["family"] = "gpt"
        defaults = ["data.path=stdlib", "data.unknown_chars=replace", *defaults]
        if family == "chat":
            data["data"] = {}
    else:
        data["data"] = {}  # the task's own data section and its defaults
    if task == "chat" or family == "chat":
        data["model"]["vocab_size"] = 0  # follows the tokenizer (the chat markers added)
    cfg = load_config(data, [*defaults, *overrides])
    arch = ("block_size", "n_layer", "n_head", "n_embd", "bias")
    changed = [k for k in arch if getattr(cfg.model, k) != getattr(base_cfg.model, k)]
    if task == "lm" and family == "gpt" and cfg.model.vocab_size != base_cfg.model.vocab_size:
        changed.append("vocab_size")
    if changed:
        raise ConfigError(
            f"model.{changed[0]} cannot change when fine-tuning: the weights of "
            f"{base.path} fit its architecture"
        )
    cfg.train.init_from = str(base.path.resolve())
    cfg.train.init_sha256 = file_sha256(ckpt / "model.safetensors")
    if lora:
        cfg.train.lora_rank = lora_rank
        cfg.train.lora_alpha = lora_alpha
        cfg.train.lora_targets = list(lora_targets)
    cfg.train.validate()
    if lora:  # targets that match no layer: refused before any folder is made
        from aigc.models.gpt import GPT
        from aigc.models.lora import apply_lora

        with torch.device("meta"):
            apply_lora(GPT(base_cfg.model), cfg.train.lora())
    _resolve_paths(cfg)
    if run_dir is None:
        name = base.path.name + ("" if task == "lm" else f"-{task}") + f"-{method}"
        run_dir = base.path.parent / name
    return train(cfg, [], run_dir=run_dir, progress=progress)


def export_merged(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Writes a LoRA run as a plain run: the base's weights with the adapters merged
    (outputs equal to the unmerged model's to float rounding), its tokenizer, data and
    config without the base reference. It samples, evaluates, serves, exports and can be
    fine-tuned again; it holds no optimizer state, so it is not continued as it is."""
    from aigc.trainer import module_tensors

    src = RunDir(run_dir)
    cfg = load_config(src.config_path)
    if not cfg.train.lora_rank:
        raise RequestError(f"{src.path} has no LoRA adapters to merge (it is a plain run)")
    out = RunDir(out_dir)
    if out.path.exists() and any(out.path.iterdir()):
        raise RequestError(f"{out.path} exists and is not empty; choose another --out")
    gen = load(src.path, device="cpu", ema=False)  # base + adapters, merged
    cfg.train.init_from, cfg.train.init_sha256, cfg.train.lora_rank = "", "", 0
    with run_lock(out.path):
        out.create(cfg.family, cfg.to_yaml())
        shutil.copy2(src.tokenizer_path, out.tokenizer_path)
        shutil.copytree(src.data_dir, out.data_dir)
        weights, aliases = module_tensors(gen.model)
        state = {"family": cfg.family, "tied": aliases, "merged_from": str(src.path.resolve())}
        out.save_checkpoint(gen.step, {"model": weights}, state)
    return out.path


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


# ---------------------------------------------------------------------------
# Loading a run


def load(
    run_dir: str | Path, device: str = "auto", ema: bool | None = None
) -> TextGenerator | TextClassifier | ImageGenerator:
    """Loads a trained run: a TextGenerator for a language model (chat runs too), a
    TextClassifier for a classifier, an ImageGenerator for an image model (latest
    checkpoint; EMA weights when trained with EMA)."""
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
        _init_from_base(model, cfg.train, run.path)
    load_module_tensors(
        model, files["model"], state.get("tied", {}), str(ckpt / "model.safetensors"),
        optional=frozen_names(model),
    )  # fmt: skip
    use_ema = ema if ema is not None else cfg.train.ema > 0
    if use_ema and "ema" in files:
        scope = getattr(model, "ema_scope", None)
        target = getattr(model, scope) if scope else model
        live = target.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, t in files["ema"].items():
                live[name].copy_(t)
    if cfg.train.lora_rank:
        from aigc.models.lora import merge_lora

        merge_lora(model)  # plain weights again: the KV cache, export and serving need them
    model.to(dev).eval()
    generator_class = {"gpt": TextGenerator, "chat": TextGenerator, "classifier": TextClassifier}
    return generator_class.get(cfg.family, ImageGenerator)(run, task, dev, int(state["step"]))


class TextGenerator:
    """A trained language model with its tokenizer: generate, stream, evaluate."""

    def __init__(self, run: RunDir, task: Any, device: torch.device, step: int):
        self.run = run
        self.task = task
        self.model = task.model
        self.tokenizer = task.tokenizer
        self.config: Config = task.config
        self.device = device
        self.step = step
        self.is_chat = self.config.family == "chat"  # trained on the chat template

    def _params(self, **kw: Any):
        from aigc.sampling import SamplingParams

        if isinstance(kw.get("stop"), str):
            kw["stop"] = (kw["stop"],)
        kw["stop"] = tuple(kw.get("stop") or ())
        params = SamplingParams(**kw)
        params.validate()
        return params

    def generate(
        self,
        prompt: str | Sequence[str] = "",
        max_new_tokens: int = 256,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        stop: str | Iterable[str] = (),
        seed: int | None = None,
    ) -> str | list[str]:
        """Completes one prompt (returns a string) or a batch of prompts (a list)."""
        from aigc.sampling import generate

        params = self._params(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, stop=stop, seed=seed,
        )  # fmt: skip
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        outs = generate(self.model, self.tokenizer, prompts, params)
        return outs[0] if single else outs

    def stream(
        self,
        prompt: str = "",
        max_new_tokens: int = 256,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        stop: str | Iterable[str] = (),
        seed: int | None = None,
    ) -> Iterator[str]:
        """Yields the completion of ``prompt`` piece by piece as tokens are sampled.

        Bad parameters or a prompt the tokenizer cannot encode raise here, before any text.
        """
        from aigc.sampling import stream

        params = self._params(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, stop=stop, seed=seed,
        )  # fmt: skip
        return stream(self.model, self.tokenizer, prompt, params)

    def chat_prompt(self, messages: Sequence[Any]) -> str:
        """The conversation so far (dicts with "role" and "content", or Messages) in the
        chat template, ending where the assistant's answer starts. Chat runs only."""
        from aigc.tasks.chat import as_messages, chat_prompt

        if not self.is_chat:
            raise RequestError(
                f"{self.run.path.name} is not a chat model (family {self.config.family!r}); "
                "fine-tune it with --task chat, or complete a prompt instead"
            )
        return chat_prompt(self.tokenizer, as_messages(messages))

    def chat(
        self, messages: Sequence[Any], max_new_tokens: int = 256, temperature: float = 0.8,
        top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
        stop: str | Iterable[str] = (), seed: int | None = None,
    ) -> str:  # fmt: skip
        """The assistant's next answer to ``messages``; it ends at the end marker."""
        from aigc.tasks.chat import stop_strings

        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        return self.generate(
            self.chat_prompt(messages), max_new_tokens, temperature, top_k, top_p,
            repetition_penalty, (*stop, *stop_strings()), seed,
        )  # fmt: skip

    def chat_stream(
        self, messages: Sequence[Any], max_new_tokens: int = 256, temperature: float = 0.8,
        top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
        stop: str | Iterable[str] = (), seed: int | None = None,
    ) -> Iterator[str]:  # fmt: skip
        """:meth:`chat`, piece by piece as tokens are sampled."""
        from aigc.tasks.chat import stop_strings

        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        return self.stream(
            self.chat_prompt(messages), max_new_tokens, temperature, top_k, top_p,
            repetition_penalty, (*stop, *stop_strings()), seed,
        )  # fmt: skip

    def evaluate(self, n: int | None = None, save: bool = True) -> dict[str, Any]:
        """Validation loss, perplexity and bits per character and per byte over the whole
        held-out split; and n generated texts (default data.eval_samples) judged for
        distinct-1/2/3, repetition (rep_4) and memorisation: the share of their 50-character
        windows found verbatim in the training text. Saved to eval.json and metrics.jsonl."""
        from aigc.data.text import TokenCorpus

        if self.is_chat:  # loss and perplexity on the held-out assistant tokens
            return _evaluate_split(self, save)
        if n is not None:
            _check_count(n, limit=10_000)
            self.config.data.eval_samples = n
        if self.task.corpus is None:
            self.task.corpus = TokenCorpus.open(self.run.data_dir)
        with torch.inference_mode():
            sums = self.task.eval_sums(self.model, 0, 1, self.device)
        metrics = self.task.eval_metrics(sums)
        meta = self.task.corpus.meta
        result = {
            "step": self.step,
            "split": "validation",
            "tokens": int(sums["count"]),
            "characters": meta.val_chars,
            "samples": self.config.data.eval_samples,
            **metrics,
        }
        if save:
            save_eval(self.run, result)
        return result


def _evaluate_split(gen: Any, save: bool) -> dict[str, Any]:
    """A chat or classifier run's held-out metrics (the task's own eval_sums/eval_metrics)."""
    if not gen.task.splits:
        gen.task.load_data()
    with torch.inference_mode():
        sums = gen.task.eval_sums(gen.model, 0, 1, gen.device)
    result = {"step": gen.step, "split": "validation", "count": int(sums["count"]),
              **gen.task.eval_metrics(sums)}  # fmt: skip
    if save:
        save_eval(gen.run, result)
    return result


class TextClassifier:
    """A trained sequence classifier with its tokenizer: classify texts, evaluate."""

    def __init__(self, run: RunDir, task: Any, device: torch.device, step: int):
        self.run = run
        self.task = task
        self.model = task.model
        self.tokenizer = task.tokenizer
        self.config: Config = task.config
        self.classes: list[str] = list(task.classes)
        self.device = device
        self.step = step

    def classify(
        self, texts: str | Sequence[str], batch_size: int = 64
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """The label and the probability of every class for one text (a dict) or a list of
        texts (a list): ``{"label": NAME, "probs": {NAME: p, ...}}``. A text is cut to its
        first model.block_size tokens, as in training; characters the vocabulary lacks
        are read as "?"."""
        from aigc.data.tokenizers import encode_replacing

        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        if not items:
            raise RequestError("give at least one text to classify")
        block = self.config.model.block_size
        rows = []
        for i, t in enumerate(items):
            if not isinstance(t, str) or not t:
                raise RequestError(f"text {i} must be a non-empty string, got {t!r}")
            rows.append(encode_replacing(self.tokenizer, t)[0][:block])
        out = []
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            lengths = torch.tensor([len(r) for r in chunk])
            idx = torch.zeros(len(chunk), int(lengths.max()), dtype=torch.long)
            for j, r in enumerate(chunk):
                idx[j, : len(r)] = torch.from_numpy(r)
            with torch.inference_mode():
                logits = self.model.classify(idx.to(self.device), lengths.to(self.device))
            for p in logits.float().softmax(-1).cpu().tolist():
                k = max(range(len(p)), key=p.__getitem__)
                out.append(
                    {"label": self.classes[k], "probs": dict(zip(self.classes, p, strict=True))}
                )
        return out[0] if single else out

    def evaluate(self, save: bool = True) -> dict[str, Any]:
        """Loss, accuracy and macro-F1 over the held-out split; saved to eval.json and
        metrics.jsonl."""
        return _evaluate_split(self, save)


class ImageGenerator:
    """A trained image generator: sample, interpolate, save and evaluate.

    Labels (for a conditional run) are given as a class index or name when the run
    has one labelled attribute (``3``, ``"3"``), as ``"attribute=value"`` strings, or
    as a dict ``{"colour": "red", "shape": "circle"}``; attributes left out are drawn
    at random (from the seed).
    """

    def __init__(self, run: RunDir, task: Any, device: torch.device, step: int):
        self.run = run
        self.task = task
        self.model = task.model
        self.config: Config = task.config
        self.device = device
        self.step = step

    @property
    def conditional(self) -> bool:
        return bool(self.task.attributes)

    @property
    def classes(self) -> dict[str, list[str]]:
        """Attribute -> its value names, for a conditional run ({} otherwise)."""
        return self.task.classes

    def labels_for(self, n: int, labels: Any = None) -> torch.Tensor | None:
        """The (n, A) label tensor for a label request (see the class docstring); -1 marks
        an attribute left to chance. None when nothing is asked."""

        if labels is None or (isinstance(labels, dict | list | tuple) and not labels):
            return None
        if not self.conditional:
            raise RequestError(
                f"{self.run.path} is not a conditional model; it takes no class or labels"
            )
        attrs, classes = self.task.attributes, self.classes
        wanted: dict[str, Any] = {}
        items = labels if isinstance(labels, list | tuple) else [labels]
        for item in items:
            if isinstance(item, dict):
                wanted.update(item)
            elif isinstance(item, str) and "=" in item:
                key, value = item.split("=", 1)
                wanted[key.strip()] = value.strip()
            elif len(attrs) == 1:
                wanted[attrs[0]] = item
            else:
                raise RequestError(
                    f"label {item!r} is ambiguous: this run has several attributes "
                    f"({', '.join(attrs)}); give attribute=value"
                )
        out = torch.full((n, len(attrs)), -1, dtype=torch.long)  # -1: drawn at random
        for key, value in wanted.items():
            if key not in attrs:
                raise RequestError(
                    f"unknown label attribute {key!r}; this run has {', '.join(attrs)}"
                )
            names = classes[key]
            if isinstance(value, str) and value in names:
                index = names.index(value)
            elif _is_index(value):
                index = int(value)
                if not 0 <= index < len(names):
                    raise RequestError(
                        f"{key}={value} is out of range: {key} has {len(names)} classes"
                    )
            else:
                shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
                raise RequestError(f"{key}={value!r} is not one of: {shown}")
            out[:, attrs.index(key)] = index
        return out

    def generate(
        self,
        n: int = 64,
        labels: Any = None,
        seed: int | None = None,
        output: str = "tensor",
    ) -> Any:
        """n images: a (n, C, H, W) float tensor in [-1, 1] (``output="tensor"``), a list of
        PIL images (``"pil"``) or a (n, H, W, C) uint8 array (``"uint8"``)."""
        from aigc.sampling.latent import sample_images

        _check_count(n)
        lab = self.labels_for(n, labels)
        with torch.inference_mode():
            images, _ = sample_images(self.model, n, lab, seed, self.device)
        return _image_output(images.cpu(), output)

    def interpolate(
        self,
        steps: int = 8,
        rows: int = 1,
        labels: Any = None,
        seed: int | None = None,
        output: str = "tensor",
    ) -> Any:
        """``rows`` strips of ``steps`` images walking (spherically) between two random
        latent points; the labels stay fixed along a strip. Shape (rows * steps, ...)."""

        if not isinstance(steps, int) or not 2 <= steps <= 64:
            raise RequestError(f"interpolate={steps!r} must be an integer in [2, 64]")
        _check_count(rows * steps)
        gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        m = self.model
        ends = m.sample_z(2 * rows, gen)
        z = torch.cat([m.interpolate(ends[2 * r], ends[2 * r + 1], steps) for r in range(rows)])
        lab = self._labels_drawn(rows, labels, gen)
        if lab is not None:
            lab = lab.repeat_interleave(steps, dim=0)
        with torch.inference_mode():
            images = m.generate(z.to(self.device), None if lab is None else lab.to(self.device))
        return _image_output(images.cpu(), output)

    def _labels_drawn(self, n: int, labels: Any, gen: torch.Generator) -> torch.Tensor | None:
        """labels_for(n, labels) with every attribute left to chance drawn from ``gen``
        (all of them when nothing is asked); None for an unconditional run."""
        lab = self.labels_for(n, labels)
        if not self.model.cfg.conditional:
            return lab
        random = self.model.random_labels(n, gen).cpu()
        return random if lab is None else torch.where(lab < 0, random, lab)

    def _vae_only(self, what: str) -> None:

        if not hasattr(self.model, "reconstruct"):
            raise RequestError(f"{self.run.path} is a {self.config.family} run; only VAEs {what}")

    def reconstruct(self, source: str | None = None, n: int = 32, output: str = "tensor") -> Any:
        """Originals and reconstructions (decoded posterior means) of ``n`` images, in rows
        of 8 that alternate: originals, then theirs. ``source`` None takes the run's held-out
        images; else a data source as in ``data.source`` (a folder, IDX or CIFAR file,
        digits, shapes), prepared like the run's own. VAE runs only."""
        from aigc.tasks.images import to_model_batch

        self._vae_only("reconstruct")
        _check_count(n, limit=1000)
        labels = None
        if source is None:
            images, labels = self.task._val()
        else:
            images, found = self.task.load_like_run(source)
            if self.conditional:
                missing = [a for a in self.task.attributes if a not in found.labels]
                if missing:
                    raise RequestError(
                        f"{found.source} has no {missing[0]!r} labels, which this conditional "
                        "VAE needs to reconstruct"
                    )
                labels = np.stack([found.labels[a] for a in self.task.attributes], 1)
        images = images[:n]
        x = to_model_batch(images).to(self.device)
        y = None if labels is None else torch.from_numpy(np.asarray(labels[:n])).to(self.device)
        with torch.inference_mode():
            rec = self.model.reconstruct(x, y)
        rows = [t for i in range(0, len(x), 8) for t in (x[i : i + 8], rec[i : i + 8])]
        return _image_output(torch.cat(rows).cpu(), output)

    def traverse(
        self,
        steps: int = 8,
        span: float = 3.0,
        dims: list[int] | None = None,
        labels: Any = None,
        seed: int | None = None,
        output: str = "tensor",
    ) -> Any:
        """One row per latent dimension (default: all): that unit swept over ``steps``
        values in [-span, span] around a latent drawn from the seed, the others held.
        VAE runs only."""

        self._vae_only("traverse their latents")
        z_dim = self.model.cfg.z_dim
        dims = list(range(z_dim)) if dims is None else list(dims)
        if not 2 <= steps <= 64 or not dims or any(not 0 <= d < z_dim for d in dims):
            raise RequestError(f"traverse: steps in [2, 64] and dims in [0, {z_dim}) are needed")
        gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        z0 = self.model.sample_z(1, gen)[0].cpu()
        zs = self.model.traverse(z0, torch.linspace(-span, span, steps), dims)
        lab = self._labels_drawn(1, labels, gen)
        if lab is not None:
            lab = lab.expand(len(zs), -1).to(self.device)
        with torch.inference_mode():
            images = self.model.generate(zs.to(self.device), lab)
        return _image_output(images.cpu(), output)

    def save(self, images: torch.Tensor, out: str | Path, nrow: int | None = None) -> list[Path]:
        """Writes a grid PNG (``out`` ends in .png) or one PNG per image into folder ``out``."""
        from aigc.data.images import image_grid, save_png, to_uint8

        out = Path(out)
        if out.suffix and out.suffix.lower() != ".png":
            raise RequestError(f"{out}: images are written as PNG; give a .png file or a folder")
        pixels = to_uint8(images)
        try:
            if out.suffix:
                save_png(image_grid(pixels, nrow=nrow), out)
                return [out]
            out.mkdir(parents=True, exist_ok=True)
            paths = []
            for i, img in enumerate(pixels):
                paths.append(out / f"{i:05d}.png")
                save_png(img, paths[-1])
            return paths
        except OSError as e:
            raise RequestError(f"{out}: cannot write there ({e.strerror or e})") from None

    def evaluate(
        self,
        n: int | None = None,
        save: bool = True,
        iwae_k: int | None = None,
        metrics: Sequence[str] | None = None,
        against: str | None = None,
        inception_weights: str | None = None,
        fid_protocol: str | None = None,
    ) -> dict[str, Any]:
        """Evaluate the run and save eval.json (and a row in metrics.jsonl).

        n generated images (default data.eval_samples) are compared with the reference
        images (the run's training images, or ``against``: a data source such as
        ``digits`` or a folder, prepared like the run's) by the feature ``metrics``
        (default data.eval_metrics: fid, kid, pr; also is, dc) in the features of the
        FID Inception network when ``inception_weights`` (or $AIGC_INCEPTION_WEIGHTS) is
        given, else of the run's domain classifier; ``extractor`` in the result names
        which. ``fid_protocol`` (default data.fid_protocol, "pytorch-fid") is how the
        Inception network's input is resized and scaled: "pytorch-fid", or "tf" as the
        original TensorFlow code and torch-fidelity do; the result records it. Labelled runs also get the classifier's checks: label accuracy
        (conditional runs), class shares and variety. VAE runs also report held-out
        likelihoods: the negative ELBO and the IWAE bound with iwae_k importance samples
        per image (default 1000), in nats per image and bits per dimension, the KL per
        latent unit and active units.
        """
        from aigc.tasks.images import check_metric_names

        if n is not None:
            _check_count(n, limit=100_000)
            self.config.data.eval_samples = n
        if metrics is not None:
            names = [m.strip() for m in metrics if m.strip()]
            try:
                check_metric_names(names, "metrics")
            except ConfigError as e:
                raise RequestError(str(e)) from None
            self.config.data.eval_metrics = names
        if inception_weights is not None:
            self.config.data.inception_weights = str(inception_weights)
            self.task._extractor = None
        if fid_protocol is not None:
            from aigc.metrics.features import check_fid_protocol

            try:
                check_fid_protocol(fid_protocol, "fid_protocol")
            except ConfigError as e:
                raise RequestError(str(e)) from None
            self.config.data.fid_protocol = fid_protocol
            self.task._extractor = None
        self.task.against = against
        if iwae_k is not None and not hasattr(self.task, "iwae_k"):
            raise RequestError(
                f"iwae_k (--iwae-k) is for VAE runs; {self.run.path} is a {self.task.family} run"
            )
        if hasattr(self.task, "iwae_k"):
            k = 1000 if iwae_k is None else iwae_k
            _check_count(k, limit=100_000, what="iwae_k")
            self.task.iwae_k = k
        with torch.inference_mode():
            sums = self.task.eval_sums(self.model, 0, 1, self.device)
        values = self.task.eval_metrics(sums)
        if not values:
            raise RequestError(
                f"{self.run.path} was trained on unlabelled images, so there is no domain "
                "classifier to judge its samples: give --inception-weights PATH for FID/KID/PR"
            )
        result = {"step": self.step, "samples": self.config.data.eval_samples}
        result.update({**self.task.eval_info(), **values})
        if save:
            save_eval(self.run, result)
        return result


def _is_index(value: Any) -> bool:
    """An integer (Python, NumPy or a 0-d tensor) or a string of one."""
    if isinstance(value, str):
        return value.lstrip("-").isdigit()
    try:
        operator.index(value)
    except TypeError:
        return False
    return not isinstance(value, bool)


def save_eval(run: RunDir | str | Path, result: dict[str, Any]) -> None:
    """eval.json (the latest evaluation) and a row in metrics.jsonl (the history):
    {"step": ..., "eval_<metric>": ...}. StorageError when the run cannot be written."""
    if not isinstance(run, RunDir):
        run = RunDir(run)
    atomic_write_text(run.path / "eval.json", json.dumps(result, indent=2) + "\n")
    log = MetricsLog(run.metrics_path)
    try:
        row = {
            f"eval_{k}": v
            for k, v in result.items()
            if k != "step" and (isinstance(v, int | float) or k in ("extractor", "fid_protocol"))
        }
        log.write({"step": result["step"], **row})
    finally:
        log.close()


def _check_count(n: Any, limit: int = 10_000, what: str = "n") -> None:

    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= limit:
        raise RequestError(f"{what}={n!r} must be an integer in [1, {limit}]")


def _image_output(images: torch.Tensor, output: str) -> Any:

    if output == "tensor":
        return images
    from aigc.data.images import to_uint8

    pixels = to_uint8(images)
    if output == "uint8":
        return pixels
    if output == "pil":
        from PIL import Image

        return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
    raise RequestError(f"output={output!r} must be tensor, pil or uint8")
