"""Typed configs: dataclasses, YAML recipes, dotted overrides and validation.

A run's config has four parts: ``family`` (which model family trains), ``data``
and ``model`` (dataclasses that the family declares) and ``train`` (the
trainer's, shared by every family). Everything is checked when it is read: an
unknown key names the closest valid one, a wrong type names key, value and the
expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from aigc.errors import ConfigError


@dataclass
class TrainConfig:
    """Settings of the shared training loop (every family uses the same ones)."""

    max_steps: int = 1000  # optimizer steps; training stops at max_steps or max_time
    max_time: float = 0.0  # seconds of training (0 = no time limit)
    batch_size: int = 32  # sequences or images per process per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # the cosine schedule decays to this
    warmup_steps: int = 100  # linear warm-up from 0 to lr
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = 0.1  # applied to matrices only, never to biases or norms
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm per parameter group (0 = off)
    ema: float = 0.0  # decay of an exponential moving average of weights (0 = off)
    seed: int = 1337  # fixes data order, initialisation and sampling
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA
    compile: bool = False  # torch.compile the model (pays on GPU; slow to start on CPU)
    log_every: int = 10  # steps between lines in metrics.jsonl
    eval_every: int = 250  # steps between validations (0 = only at the end)
    checkpoint_every: int = 250  # steps between checkpoints (always one at the end)
    keep_checkpoints: int = 2  # older checkpoints are deleted
    sample_every: int = 0  # steps between samples in samples/ and TensorBoard (0 = at the end)
    nan_tolerance: int = 5  # stop after this many non-finite steps in a row
    # fine-tuning (aigc finetune sets these): start from another run's latest weights
    init_from: str = ""  # the base run folder ("" = random initialisation)
    init_sha256: str = ""  # sha256 of the base's model.safetensors, checked at start
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank only, the base frozen
    lora_alpha: float = 16.0  # adapter scale alpha / rank
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"])

    def validate(self) -> None:
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"train.seed={self.seed} must be in [0, 2**63)")
        for key in ("batch_size", "grad_accum", "log_every", "nan_tolerance"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be at least 1")
        if self.lora_rank < 0:
            raise ConfigError(f"train.lora_rank={self.lora_rank} must be 0 (off) or more")
        if self.lora_rank and not self.init_from:
            raise ConfigError("train.lora_rank needs a base model: use aigc finetune BASE_RUN")
        if self.lora_rank:
            self.lora().validate()

    def lora(self):
        """The LoRA settings as an aigc.models.lora.LoRAConfig."""
        from aigc.models.lora import LoRAConfig

        return LoRAConfig(
            rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
            targets=list(self.lora_targets),
        )  # fmt: skip


@dataclass
class Config:
    """A whole run: the family, its data and model configs, and the trainer's."""

    family: str = "gpt"
    data: Any = None
    model: Any = None
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "data": dataclasses.asdict(self.data),
            "model": dataclasses.asdict(self.model),
            "train": dataclasses.asdict(self.train),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

# ---------------------------------------------------------------------------
# Building dataclasses from plain data, with errors that say what and where


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Returns ``value`` as type ``tp`` or raises ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}={value!r} is not allowed; expected one of {_type_name(tp)}")
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {_type_name(tp)}")
    if origin in (list, tuple):
        if isinstance(value, str):  # a single string where a list is expected
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected {_type_name(tp)}")
        (arg, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected a mapping")
        (_, arg) = typing.get_args(tp) or (str, Any)
        return {k: _coerce(v, arg, f"{key}.{k}") for k, v in value.items()}
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}={value!r} has the wrong type; expected null")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    else:  # pragma: no cover - a config class used a type this module does not know
        raise TypeError(f"unsupported config type {tp!r} for {key}")
    raise ConfigError(f"{key}={value!r} has the wrong type; expected {_type_name(tp)}")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Builds dataclass ``cls`` from a mapping; unknown keys and wrong types raise."""
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(_unknown_key_message(full, str(key), fields, prefix))
        kwargs[key] = _coerce(value, hints[key], full)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


# Keys that mean the same in another kind of run: text reads data.path, images data.source.
SAME_MEANING = {"path": "source", "source": "path", "folder": "source", "dir": "source",
                "file": "path", "files": "path"}  # fmt: skip


def _unknown_key_message(full: str, key: str, valid: Iterable[str], prefix: str) -> str:
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close and SAME_MEANING.get(key) in valid:
        close = [SAME_MEANING[key]]
    hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
    return f"unknown config key {full!r}{hint}"


# ---------------------------------------------------------------------------
# Overrides, files and the family registry


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parses ``a.b.c=value``; the value is read as YAML (``2000`` is an int)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.max_steps=2000")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: take it as a string
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Returns a copy of ``data`` with dotted ``key=value`` overrides applied."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[: i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return out


RECIPES_DIR = Path(__file__).parent / "configs"


def shipped_recipe(name: str | Path) -> Path | None:
    """The recipe that ships with aigc under ``name`` (``cgan-digits`` or
    ``cgan-digits.yaml``), or None."""
    p = Path(name)
    if p.is_file() or len(p.parts) != 1:
        return None
    for candidate in (RECIPES_DIR / p.name, RECIPES_DIR / f"{p.name}.yaml"):
        if candidate.is_file() and candidate.suffix == ".yaml":
            return candidate
    return None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML mapping, with errors naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{where}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{p}: a config must be a mapping of sections (family, data, model, train)"
        )
    return data


def build_config(data: dict[str, Any]) -> Config:
    """Validates plain data into a Config, using the family's data and model classes."""
    from aigc.tasks import get_task

    data = dict(data)
    family = data.get("family", "gpt")
    if not isinstance(family, str):
        raise ConfigError(f"family={family!r} must be a string")
    task = get_task(family)
    top = {"family", "data", "model", "train"}
    for key in data:
        if key not in top:
            raise ConfigError(_unknown_key_message(str(key), str(key), top, ""))
    return Config(
        family=family,
        data=from_dict(task.data_config, data.get("data"), "data"),
        model=from_dict(task.model_config, data.get("model"), "model"),
        train=from_dict(TrainConfig, data.get("train"), "train"),
    )


def load_config(
    source: str | Path | dict[str, Any] | Config, overrides: Iterable[str] = ()
) -> Config:
    """Reads a recipe (a YAML path, a dict or a Config) and applies dotted overrides."""
    if isinstance(source, Config):
        data = source.to_dict()
    elif isinstance(source, dict):
        data = source
    else:
        data = read_yaml(shipped_recipe(source) or source)
    return build_config(apply_overrides(data, overrides))
