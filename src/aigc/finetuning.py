"""Fine-tuning: a new run that starts from a base run's weights (full or LoRA), and
exporting a LoRA run with its adapters merged."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from aigc.config import load_config
from aigc.errors import CheckpointError, ConfigError, RequestError
from aigc.runs import RunDir, file_sha256, run_lock
from aigc.tasks.base import Task
from aigc.trainer import (
    copy_tensors_into,
    load_module_tensors,
)
from aigc.training import TrainOutcome, _resolve_paths, train


def init_from_base(task: Task, train_cfg: Any, where: Path) -> tuple[int, int]:
    """Fine-tuning: the base run's latest weights (its EMA weights where it kept an EMA)
    into ``model``, checked against train.init_sha256; then LoRA adapters when
    train.lora_rank > 0. A token embedding with more rows than the base's (a chat run's
    template tokens) keeps the base's rows and starts the new ones at their mean; modules
    the base lacks (``task.fresh_modules()``, e.g. a classification head) keep their
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
    model = task.model
    expected = model.state_dict()
    fresh = task.fresh_modules()
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
            elif (
                want is not None
                and t.ndim == want.ndim == 4
                and t.shape[0] == want.shape[0]
                and t.shape[2:] == want.shape[2:]
                and t.shape[1] < want.shape[1]
            ):  # a convolution reading more input channels (an inpainting model's mask and
                # masked image): the base's channels, the new ones from zero, so it starts as
                # the base (as Stable Diffusion's inpainting model was made)
                extra = t.new_zeros(t.shape[0], want.shape[1] - t.shape[1], *t.shape[2:])
                t = torch.cat([t, extra], dim=1)
            out[name] = t
        return out

    load_module_tensors(
        model, fit(files["model"]), state.get("tied", {}), str(ckpt / "model.safetensors"),
        optional=new_names,
    )  # fmt: skip
    if "ema" in files and load_config(base.config_path).train.ema > 0:
        copy_tensors_into(model, fit(files["ema"]))
    if not train_cfg.lora_rank:
        return trainable_share(model)
    apply_lora(model, train_cfg.lora())
    for name in fresh:  # a new head trains fully (PEFT's modules_to_save)
        getattr(model, name).requires_grad_(True)
    trainable, total = trainable_share(model)
    trainable += task.lora_extras(base)
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
    lora_targets: Sequence[str] | None = None,
    task: str | None = None,
    progress: bool = True,
) -> TrainOutcome:
    """Fine-tunes a GPT run into a new run that starts from its latest weights and keeps
    its tokenizer and architecture; records the base (path, sha256 of its weights).

    ``task`` is "lm" (the default: more language modelling; the data default to the standard
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
    if family == "diffusion":
        lora = (lora_rank, lora_alpha, list(lora_targets or DIFFUSION_LORA_TARGETS))
        return _finetune_diffusion(base, overrides, method, run_dir, task or "concept", lora,
                                   progress)  # fmt: skip
    task = task or "lm"
    lora_targets = list(lora_targets or ("c_attn", "c_proj", "c_fc"))
    if family not in ("gpt", "chat"):
        raise ConfigError(
            f"{base.path} is a {family!r} run; fine-tuning needs a GPT language model run "
            "or a diffusion run"
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


DIFFUSION_ARCH = ("width", "channel_mults", "num_res_blocks", "attn_resolutions", "groups",
                  "conditional", "text", "text_encoder", "text_width", "text_layers",
                  "text_heads", "cross_attn_resolutions", "preconditioning")  # fmt: skip


# a text-to-image LoRA: the cross-attention's keys and values from the text, what Custom
# Diffusion (Kumari et al. 2023) fine-tunes for a new concept, beside the new word's
# embeddings (DiffusionTask.lora_extras)
DIFFUSION_LORA_TARGETS = ("kv",)


def _finetune_diffusion(
    base: RunDir,
    overrides: Sequence[str],
    method: str,
    run_dir: str | Path | None,
    task: str,
    lora: tuple[int, float, list[str]],
    progress: bool,
) -> TrainOutcome:
    """Fine-tunes a diffusion run. ``task`` "concept": a text-to-image run learns new
    captioned images (data.path or data.source: a folder with metadata.jsonl or .csv;
    e.g. about 20 images of a new word) while half of every batch replays the base's own
    training images and captions (data.prior_share), so its old prompts keep working
    (DreamBooth's prior preservation, Ruiz et al. 2023); ``method`` full or lora (rank-r
    adapters on ``lora[2]`` plus the embeddings of the words new to the base). "inpaint":
    an inpainting model, as Stable Diffusion's inpainting model was made: the same U-Net
    reading C + 1 more channels (the image with the region blanked, and the mask) whose
    input weights start at zero, so it starts as the base and learns to use them on random
    masks (aigc.tasks.diffusion.training_masks); same data, conditions and schedule."""
    if task not in ("concept", "inpaint"):
        raise ConfigError(
            f"--task {task!r}: a diffusion run fine-tunes with --task concept or inpaint"
        )
    if method not in ("full", "lora"):
        raise ConfigError(f"--method {method!r}: choose full or lora")
    base_cfg = load_config(base.config_path)
    if base_cfg.train.lora_rank:
        raise ConfigError(f"{base.path} is itself a LoRA run; fine-tune its base")
    if base_cfg.model.inpainting:
        raise ConfigError(f"{base.path} is already an inpainting model; fine-tune the model it "
                          "came from")  # fmt: skip
    ckpt = base.latest_checkpoint()
    if ckpt is None:
        raise CheckpointError(f"the base run {base.path} has no checkpoint; train it first")
    data = base_cfg.to_dict()
    rank, alpha, targets = lora
    if task == "inpaint":
        if method != "full":
            raise ConfigError("--task inpaint trains every weight: use --method full")
        data["model"].update(inpainting=True, cond_channels=0)
        defaults = ["train.max_steps=1000", "train.max_time=0", "train.eval_every=0"]
    else:
        if not base_cfg.model.text:
            raise ConfigError(
                f"{base.path} is not a text-to-image run; --task concept teaches a new "
                "captioned concept to a run with model.text=true"
            )
        overrides = [("data.source" + o[len("data.path") :]) if o.startswith("data.path=") else o
                     for o in overrides]  # fmt: skip
        if not any(o.startswith("data.source=") for o in overrides):
            raise ConfigError(
                "--task concept needs the new images: data.path=FOLDER (images with captions "
                "in metadata.jsonl or metadata.csv: file_name, text)"
            )
        # the new images shaped as the base's (a grey folder read as colour, say)
        data["data"].update(holdout=[], labels=[], prior_share=0.5, eval_samples=64,
                            eval_metrics=[], val_fraction=0.1, binarize=False,
                            channels=base_cfg.model.channels,
                            image_size=base_cfg.model.image_size)  # fmt: skip
        lora_run = method == "lora"
        defaults = ["train.max_steps=800", "train.max_time=0", "train.eval_every=0",
                    "train.warmup_steps=20", "train.ema=0", "train.weight_decay=0.0",
                    "train.batch_size=16", "train.checkpoint_every=200",
                    f"train.lr={1e-3 if lora_run else 1e-4}",
                    f"train.min_lr={1e-4 if lora_run else 1e-5}", "train.schedule=cosine"]  # fmt: skip
    cfg = load_config(data, [*defaults, *overrides])
    changed = [k for k in DIFFUSION_ARCH if getattr(cfg.model, k) != getattr(base_cfg.model, k)]
    if changed or cfg.model.inpainting != (task == "inpaint"):
        key = changed[0] if changed else "inpainting"
        raise ConfigError(
            f"model.{key} cannot change when fine-tuning: the weights of {base.path} fit "
            "its architecture"
        )
    cfg.train.init_from = str(base.path.resolve())
    cfg.train.init_sha256 = file_sha256(ckpt / "model.safetensors")
    if method == "lora":
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"--lora-rank {rank!r} must be an integer of at least 1")
        cfg.train.lora_rank, cfg.train.lora_alpha, cfg.train.lora_targets = rank, alpha, targets
    cfg.train.validate()
    _resolve_paths(cfg)
    if run_dir is None:
        suffix = "-inpaint" if task == "inpaint" else f"-concept-{method}"
        run_dir = base.path.parent / f"{base.path.name}{suffix}"
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
    from aigc.loading import load

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
