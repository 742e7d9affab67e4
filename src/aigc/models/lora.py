"""LoRA: low-rank adapters on frozen Linear layers (Hu et al. 2021).

Fine-tuning learns, for each chosen weight W0 (out, in), a product B A of rank r
(B: out x r, A: r x in) and leaves W0 frozen, so a run trains and saves a few
percent of the parameters. Nothing here knows a model family: layers are chosen
by name, the way `LoRAConfig.targets` says, so any model built of nn.Linear works.

Life of an adapter:

    names = apply_lora(model, LoRAConfig(rank=8))  # wrap, freeze everything else
    ...train: only lora_A / lora_B have requires_grad...
    save_file(lora_state_dict(model), "adapter.safetensors")
    load_lora_state_dict(other, load_file(...))    # `other` had apply_lora too
    merge_lora(model)                              # plain nn.Linear again

`merge_lora` folds B A into W0; the merged model computes the same function and is
an ordinary model again (the GPT KV-cache path reads plain nn.Linear weights and
refuses an unmerged adapter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from aigc.errors import CheckpointError, ConfigError
from aigc.models.layers import check_int


@dataclass
class LoRAConfig:
    rank: int = 8  # r, the rank of each update B A
    alpha: float = 16.0  # the update is scaled by alpha / rank (paper, sec. 4.1)
    dropout: float = 0.0  # dropout on the adapter's input only; the base path has none
    # Linear layers to adapt: a name's last component ("c_proj") or a dotted
    # suffix of it ("attn.c_proj"). lm_head only when named, and refused while tied.
    targets: list[str] = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"])

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key."""
        check_int("lora.rank", self.rank, 1)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float):
            raise ConfigError(f"lora.alpha={self.alpha!r} must be a number")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"lora.alpha={self.alpha} must be a finite number above 0")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float):
            raise ConfigError(f"lora.dropout={self.dropout!r} must be a number")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout} must be in [0, 1)")
        if not isinstance(self.targets, list | tuple) or not self.targets:
            raise ConfigError(
                f"lora.targets={self.targets!r} must be a non-empty list of layer names"
            )
        for i, t in enumerate(self.targets):
            if not isinstance(t, str) or not t or t.startswith(".") or t.endswith("."):
                raise ConfigError(
                    f"lora.targets[{i}]={t!r} must be a layer name such as 'c_attn' or 'attn.c_proj'"
                )


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update.

    x (..., in) -> (..., out). `base` keeps its weight (out, in) and bias; the adapter
    adds lora_A (rank, in) and lora_B (out, rank) in the base's dtype and device.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank={rank} must be at least 1")
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        like = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **like))
        # The paper (sec. 4.1) draws A from a Gaussian; like the authors' loralib we
        # give A nn.Linear's own init (kaiming-uniform, bound 1/sqrt(in)). B = 0
        # either way, so B A = 0 and the wrapped layer starts as the base exactly.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.train(base.training)  # a wrapper must not switch an eval model to training

    def forward(self, x: Tensor) -> Tensor:
        # eq. (3): h = W0 x + B A x, with B A x scaled by alpha / r (sec. 4.1).
        # A then B on the activations: r (in + out) multiply-adds per token, never
        # the (out, in) product B A.
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., out)
        return self.base(x) + update * self.scaling

    def merged_weight(self) -> Tensor:
        """W0 + (alpha / rank) B A, (out, in), in the base's dtype (summed in float32 or wider)."""
        W = self.base.weight
        acc = torch.promote_types(W.dtype, torch.float32)
        delta = self.lora_B.to(acc) @ self.lora_A.to(acc)  # (out, in)
        return (W.to(acc) + delta * self.scaling).to(W.dtype)

    def extra_repr(self) -> str:
        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
        return f"rank={self.rank}, alpha={self.alpha}, dropout={p}"


def _matches(name: str, target: str) -> bool:
    """`target` is the whole qualified name or a dotted suffix of it."""
    return name == target or name.endswith("." + target)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap every nn.Linear that `cfg.targets` names in a LoRALinear, in place.

    Every other parameter gets requires_grad=False, so only the adapters train.
    Returns the qualified names of the wrapped layers, in module order. Raises
    ConfigError when a target matches no Linear layer or selects a Linear whose
    weight is tied to another parameter (GPT's lm_head shares wte's matrix).
    """
    cfg.validate()
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError(
            "the model already has LoRA adapters; merge_lora(model) before adding more"
        )
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = [n for n in linears if any(_matches(n, t) for t in cfg.targets)]
    for t in cfg.targets:
        if not any(_matches(n, t) for n in linears):
            available = ", ".join(dict.fromkeys(n.rpartition(".")[2] for n in linears)) or "none"
            raise ConfigError(
                f"lora.targets: {t!r} matches no linear layer; the model has {available}"
            )
    # A parameter reachable under two names is tied (or the layer is shared): an
    # adapter would change one use of the matrix and not the other.
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for n in chosen:
        others = [o for o in owners[id(linears[n].weight)] if o != f"{n}.weight"]
        if others:
            target = next(t for t in cfg.targets if _matches(n, t))
            raise ConfigError(
                f"lora.targets: {target!r} selects {n}, whose weight is tied to "
                f"{others[0].removesuffix('.weight')}; an adapter would untie them. "
                f"Remove {target!r} from lora.targets"
            )
    model.requires_grad_(False)
    for n in chosen:
        _set_module(model, n, LoRALinear(linears[n], cfg.rank, cfg.alpha, cfg.dropout))
    return chosen


def trainable_share(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight counts once."""
    params = list(model.parameters())  # parameters() yields a shared tensor once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, sum(p.numel() for p in params)


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors, keyed like `transformer.h.0.attn.c_attn.lora_A`.

    The tensors are detached views of the live parameters (as in `state_dict`);
    `safetensors.torch.save_file` writes them as they are.
    """
    state: dict[str, Tensor] = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            state[f"{name}.lora_A"] = m.lora_A.detach()  # (rank, in)
            state[f"{name}.lora_B"] = m.lora_B.detach()  # (out, rank)
    return state


def load_lora_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy adapter tensors saved by `lora_state_dict` into a model that has had
    `apply_lora` with the same targets and rank. Strict: a missing or unexpected
    key or a wrong shape raises CheckpointError before anything is copied.
    Tensors are cast to each adapter's dtype and device.
    """
    live = lora_state_dict(model)
    if not live:
        raise CheckpointError(
            "the model has no LoRA adapters to load into; call apply_lora(model, cfg) "
            "with the adapter's config first"
        )
    missing = sorted(set(live) - set(state))
    unexpected = sorted(set(state) - set(live))
    if missing or unexpected:
        raise CheckpointError(
            f"the adapter does not match this model's LoRA layers: missing {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
            f"{' ...' if len(unexpected) > 3 else ''}; apply_lora with the lora.targets "
            "the adapter was trained with"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(live[k].shape):
            raise CheckpointError(
                f"adapter tensor {k} has shape {tuple(v.shape)}, the model needs "
                f"{tuple(live[k].shape)}; apply_lora with the lora.rank it was trained with"
            )
    with torch.no_grad():
        for k, v in state.items():
            live[k].copy_(v)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, W0 + (alpha / rank) B A, and put
    the base nn.Linear back in the adapter's place (same dtype, device and bias).

    Works in place and returns `model`. The merged layer gets a new weight tensor,
    so a reference to the original W0 still holds the pretrained weights.
    """
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    with torch.no_grad():
        for name, m in wrapped:
            base = m.base
            base.weight = nn.Parameter(m.merged_weight(), requires_grad=base.weight.requires_grad)
            base.train(m.training)
            _set_module(model, name, base)
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """``model`` itself when it has no adapters, else a copy with them merged (for the
    KV-cached sampler during training, while the adapters keep training)."""
    if not any(isinstance(m, LoRALinear) for m in model.modules()):
        return model
    import copy

    return merge_lora(copy.deepcopy(model))
