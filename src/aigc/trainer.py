"""One training loop for every model family.

The trainer owns devices, precision, optimizers, schedules, gradient
accumulation, clipping, data parallelism, EMA, logging, checkpoints, the NaN
guard and progress. A family owns only its mathematics: it declares named
parameter groups (one optimizer each) and writes its step as calls to
``step.update(group, loss)`` (shared/DESIGN.md, "The step contract").

Reproducibility: the batch and the random state of step ``s`` on rank ``r`` are
pure functions of ``(seed, s, r)``, so a resumed run repeats exactly what an
uninterrupted run would have done.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from aigc.config import Config, TrainConfig
from aigc.errors import CheckpointError, ConfigError, TrainingError, TrainingInterrupted
from aigc.runs import MetricsLog, RunDir, flatten_state, unflatten_state
from aigc.samples import write_samples
from aigc.tasks.base import Task

# ---------------------------------------------------------------------------
# Devices and processes


def select_device(name: str = "auto") -> torch.device:
    """cuda, then mps, then cpu for ``auto``; otherwise the named device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"train.device={name!r} is not a device (use auto, cpu, cuda, mps)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is available")
    return device


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistInfo:
    """Joins the process group when launched by torchrun (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(info.local_rank)
        # small CPU tensors (eval sums, logged means, the clock) go over gloo
        dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo")
    return info


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across runs, machines and Python versions."""
    return int(
        np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]
        >> 1
    )


# ---------------------------------------------------------------------------
# The step contract


@dataclass
class _Group:
    name: str
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    base_lr: float


class Step:
    """The only door from a family into the trainer during one optimizer step."""

    def __init__(self, trainer: Trainer, index: int):
        self._t = trainer
        self.index = index  # 0-based number of this optimizer step
        self.micro = 0  # current micro-step within gradient accumulation
        self.skipped: list[str] = []  # groups whose update was skipped (non-finite)
        self.grad_norms: dict[str, float] = {}

    @property
    def last_micro(self) -> bool:
        return self.micro == self._t.cfg.grad_accum - 1

    def update(self, group: str, loss: torch.Tensor) -> None:
        """Backpropagates ``loss`` into ``group`` only; on the last micro-step, clips and steps.

        A non-finite gradient norm skips the optimizer step for this group (the
        gradients are dropped) and counts against ``train.nan_tolerance``.
        """
        t = self._t
        if group not in t.groups:
            raise KeyError(
                f"unknown parameter group {group!r}; the family declared {list(t.groups)}"
            )
        g = t.groups[group]
        # Gradients flow only into this group's parameters: a generator's loss
        # must not leave gradients on the discriminator (and costs less).
        torch.autograd.backward(loss / t.cfg.grad_accum, inputs=g.params)
        if not self.last_micro:
            return
        if t.dist.world > 1:
            _all_reduce_grads(g.params, t.dist.world)
        max_norm = t.cfg.grad_clip if t.cfg.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(g.params, max_norm)
        if torch.isfinite(norm).item():
            g.optimizer.step()
            self.grad_norms[group] = float(norm)
        else:
            self.skipped.append(group)
        g.optimizer.zero_grad(set_to_none=True)


def _all_reduce_grads(params: list[nn.Parameter], world: int) -> None:
    """Averages gradients over processes in one flat all-reduce (data parallelism)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


# ---------------------------------------------------------------------------
# Exponential moving average of weights


class EMA:
    """Shadow copies of a module's floating-point parameters and buffers, updated after each step.

    Buffers (e.g. batch-norm running statistics) are averaged with the weights, so
    the averaged weights are used with statistics that follow them. With the step
    number, the decay warms up as min(decay, (1 + step) / (10 + step)), so the
    random initial weights do not linger in the average of a short run.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.module = module
        self.decay = decay
        state = module.state_dict(keep_vars=True)
        seen: set[int] = set()  # tied weights are averaged once
        self.names = []
        for n, t in state.items():
            if t.dtype.is_floating_point and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                self.names.append(n)
        self.shadow = {n: state[n].detach().clone() for n in self.names}

    def _live(self) -> dict[str, torch.Tensor]:
        state = self.module.state_dict(keep_vars=True)
        return {n: state[n].detach() for n in self.names}

    @torch.no_grad()
    def update(self, step: int | None = None) -> None:
        decay = self.decay if step is None else min(self.decay, (1 + step) / (10 + step))
        live = self._live()
        torch._foreach_lerp_(
            [self.shadow[n] for n in self.names], [live[n] for n in self.names], 1 - decay
        )

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily swaps the EMA weights into the module."""
        live = self._live()
        backup = {n: live[n].clone() for n in self.names}
        with torch.no_grad():
            for n in self.names:
                live[n].copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n in self.names:
                    live[n].copy_(backup[n])


# ---------------------------------------------------------------------------
# Weights without pickle (tied parameters stored once)


def module_tensors(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with shared tensors (tied weights) stored once, plus their aliases."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple, tuple], str] = {}
    for name, t in module.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = t
    return tensors, aliases


def copy_tensors_into(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copies named tensors (an EMA's weights, say) into ``module``'s parameters and
    buffers of the same names, in place, keeping their devices and dtypes."""
    live = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, t in tensors.items():
            live[name].copy_(t)


def load_module_tensors(
    module: nn.Module,
    tensors: dict[str, torch.Tensor],
    aliases: dict[str, str],
    where: str,
    optional: frozenset[str] = frozenset(),
) -> None:
    """Loads weights saved by :func:`module_tensors`; mismatches raise CheckpointError.
    Names in ``optional`` may be absent (frozen weights a fine-tuned run does not store)."""
    state = dict(tensors)
    for alias, target in aliases.items():
        if target in state:
            state[alias] = state[target]
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state) - optional)
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{where} does not match this model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(
                f"{where}: {k} has shape {tuple(v.shape)}, the model needs {tuple(expected[k].shape)}"
            )
    module.load_state_dict(state, strict=False)  # every key was checked above


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Holds back Ctrl-C (SIGINT) and SIGTERM until the block ends, then raises
    KeyboardInterrupt: a save or a TensorBoard flush cut in the middle could leave a
    half-written checkpoint or a writer thread that ``close`` waits on for ever."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    # a signal the process ignores (SIGINT in a background job) stays ignored
    held = [sig for sig in (signal.SIGINT, signal.SIGTERM)
            if signal.getsignal(sig) is not signal.SIG_IGN]  # fmt: skip
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
                for sig in held}  # fmt: skip
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_stops_training() -> Iterator[None]:
    """SIGTERM (a job scheduler's preemption, ``kill``, ``docker stop``) stops training as
    Ctrl-C does: the last completed step is saved. A job started in the background has
    SIGINT ignored, so SIGTERM is how it is stopped without losing work."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def frozen_names(module: nn.Module) -> frozenset[str]:
    """Names of parameters that do not train (a fine-tuned run's frozen base)."""
    return frozenset(n for n, p in module.named_parameters(remove_duplicate=False)
                     if not p.requires_grad)  # fmt: skip


# ---------------------------------------------------------------------------


@dataclass
class TrainResult:
    step: int
    train_time: float
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: str = ""


def lr_factor(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from 1 to min_lr/lr over progress."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    p = min(max(progress, 0.0), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))


def _param_groups(model: nn.Module) -> dict[str, dict[str, Any]]:
    groups = model.param_groups()  # type: ignore[operator]
    out = {}
    for name, spec in groups.items():
        spec = dict(spec) if isinstance(spec, dict) else {"params": spec}
        spec["params"] = [p for p in spec["params"] if p.requires_grad]
        out[name] = spec
    return out


def _make_optimizer(
    params: list[nn.Parameter], cfg: TrainConfig, spec: dict, device: torch.device
) -> torch.optim.Optimizer:
    # Weight decay on matrices only (embeddings and linear weights), as in GPT-2.
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    wd = spec.get("weight_decay", cfg.weight_decay)
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs: dict[str, Any] = {
        "lr": spec.get("lr", cfg.lr),
        "betas": spec.get("betas", (cfg.beta1, cfg.beta2)),
        "eps": cfg.eps,
    }
    if device.type == "cuda":
        kwargs["fused"] = True
    else:  # torch picks the per-tensor loop off CUDA; one batched update is cheaper
        kwargs["foreach"] = True
    return torch.optim.AdamW(groups, **kwargs)


class Trainer:
    """Trains ``task.model`` into ``run`` according to ``config.train``."""

    def __init__(
        self,
        task: Task,
        config: Config,
        run: RunDir,
        dist_info: DistInfo,
        device: torch.device,
        progress: bool = True,
    ):
        self.task = task
        self.progress = progress  # show a progress bar on rank 0
        self.config = config
        self.cfg = config.train
        self.run = run
        self.dist = dist_info
        self.device = device
        self.model = task.model.to(device)
        specs = _param_groups(self.model)
        if self.cfg.grad_accum > 1 and len(specs) > 1:
            raise ConfigError(
                f"train.grad_accum={self.cfg.grad_accum} needs a single-objective family; "
                f"{config.family} alternates {len(specs)} updates per step"
            )
        self.groups = {
            name: _Group(
                name,
                spec["params"],
                _make_optimizer(spec["params"], self.cfg, spec, device),
                float(spec.get("lr", self.cfg.lr)),
            )
            for name, spec in specs.items()
        }
        # frozen weights (LoRA's base) are not checkpointed: they come from the base run
        self.frozen = frozen_names(self.model)
        if self.frozen and self.cfg.ema > 0:
            raise ConfigError(
                "train.ema with frozen weights (LoRA) is not supported; set train.ema=0"
            )
        self.ema = EMA(self.task.ema_module(), self.cfg.ema) if self.cfg.ema > 0 else None
        self.autocast = self._autocast_context()
        self.step = 0
        self.train_time = 0.0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.items_seen = 0
        if self.cfg.compile:
            self.model.compile()

    def _autocast_context(self):
        precision = self.cfg.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        if precision == "bf16":
            return lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext

    # state -----------------------------------------------------------------
    def state_tensors(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        weights, aliases = module_tensors(self.model)
        if self.frozen:
            weights = {k: v for k, v in weights.items() if k not in self.frozen}
            aliases = {k: v for k, v in aliases.items() if v in weights}
        optim_tensors, optim_skeleton = flatten_state(
            {name: g.optimizer.state_dict() for name, g in self.groups.items()}
        )
        files = {"model": weights, "optim": optim_tensors}
        if self.ema is not None:
            files["ema"] = dict(self.ema.shadow)
        state = {
            "family": self.config.family,
            "train_time": self.train_time,
            "items_seen": self.items_seen,
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "world_size": self.dist.world,
            "tied": aliases,
            "optim": optim_skeleton,
        }
        return files, state

    def save(self) -> str:
        """Rank 0 writes a checkpoint of the current step; every rank waits for it."""
        name = ""
        if self.dist.is_main:
            files, state = self.state_tensors()
            path = self.run.save_checkpoint(self.step, files, state, keep=self.cfg.keep_checkpoints)
            name = path.name
        if self.dist.world > 1:
            dist.barrier()
        return name

    def restore(self) -> bool:
        """Loads the latest complete checkpoint; returns False when there is none."""
        path = self.run.latest_checkpoint()
        if path is None:
            return False
        files, state = self.run.load_checkpoint(path)
        if state.get("family") != self.config.family:
            raise CheckpointError(
                f"{path} holds a {state.get('family')!r} model, not {self.config.family!r}"
            )
        for needed in ("model", "optim"):
            if needed not in files:
                raise CheckpointError(f"{path} has no {needed}.safetensors")
        load_module_tensors(
            self.model, files["model"], state.get("tied", {}), str(path / "model.safetensors"),
            optional=self.frozen,
        )  # fmt: skip
        optim_state = unflatten_state(state["optim"], files["optim"])
        for name, g in self.groups.items():
            if name not in optim_state:
                raise CheckpointError(f"{path}: no optimizer state for group {name!r}")
            g.optimizer.load_state_dict(optim_state[name])
        if self.ema is not None:
            if "ema" in files:
                self.ema.shadow = {n: files["ema"][n].to(self.device) for n in self.ema.names}
            else:  # EMA switched on for a resumed run: start it from the current weights
                self.ema = EMA(self.ema.module, self.ema.decay)
        self.step = int(state["step"])
        self.train_time = float(state.get("train_time", 0.0))
        self.items_seen = int(state.get("items_seen", 0))
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        return True

    # evaluation ------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Validation metrics (with EMA weights when EMA is on), reduced over processes."""
        was_training = self.model.training
        self.model.eval()
        ctx = self.ema.applied() if self.ema is not None else contextlib.nullcontext()
        try:
            with ctx, torch.inference_mode(), self.autocast():
                sums = self.task.eval_sums(self.model, self.dist.rank, self.dist.world, self.device)
        finally:
            self.model.train(was_training)
        if self.dist.world > 1:
            keys = sorted(sums)
            vec = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64)
            dist.all_reduce(vec)
            sums = dict(zip(keys, vec.tolist(), strict=True))
        return self.task.eval_metrics(sums)

    def sample(self) -> dict[str, Any]:
        was_training = self.model.training
        self.model.eval()
        ctx = self.ema.applied() if self.ema is not None else contextlib.nullcontext()
        try:
            with ctx:
                return self.task.samples(self.model, self.step, self.device)
        finally:
            self.model.train(was_training)

    # the loop ----------------------------------------------------------------
    def _progress(self) -> float:
        p = self.step / self.cfg.max_steps if self.cfg.max_steps > 0 else 0.0
        if self.cfg.max_time > 0:
            p = max(p, self.train_time / self.cfg.max_time)
        return p

    def done(self) -> bool:
        """True when max_steps or max_time is reached: fit() would train no step."""
        return self._done()

    def _done(self) -> bool:
        if self.cfg.max_steps > 0 and self.step >= self.cfg.max_steps:
            return True
        return self.cfg.max_time > 0 and self.train_time >= self.cfg.max_time

    def _set_lr(self) -> float:
        factor = lr_factor(self.cfg, self.step, self._progress())
        for g in self.groups.values():
            for pg in g.optimizer.param_groups:
                pg["lr"] = g.base_lr * factor
        return factor * self.cfg.lr

    def _sync_time(self) -> None:
        """All ranks take rank 0's clock, so they stop at the same step."""
        if self.dist.world > 1 and self.cfg.max_time > 0:
            t = torch.tensor([self.train_time], dtype=torch.float64)
            dist.broadcast(t, 0)
            self.train_time = float(t.item())

    def train_step(self) -> tuple[dict[str, float], Step]:
        """One optimizer step (all micro-steps); returns the family's scalars."""
        cfg = self.cfg
        torch.manual_seed(mix_seed(cfg.seed, self.step, self.dist.rank))
        step = Step(self, self.step)
        totals: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            step.micro = micro
            batch = _to_device(
                self.task.train_batch(self.step, micro, self.dist.rank, self.dist.world),
                self.device,
            )
            with self.autocast():
                out = self.model.training_step(batch, step)  # type: ignore[operator]
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + float(v) / cfg.grad_accum
        return totals, step

    def fit(self, iter_callback: Any = None) -> TrainResult:
        """Runs until max_steps or max_time; checkpoints, evaluates and logs on the way."""
        cfg = self.cfg
        main = self.dist.is_main
        log = MetricsLog(self.run.metrics_path) if main else None
        writer = _tensorboard(self.run, self.step) if main else None
        bar = (
            _ProgressBar(cfg, self.step, self.train_time, self.task, self.progress)
            if main
            else None
        )
        self.model.train()
        window: dict[str, float] = {}
        counts: dict[str, int] = {}
        window_items = 0
        window_time = 0.0
        last_eval: dict[str, float] = {}
        signals = contextlib.ExitStack()
        try:
            signals.enter_context(sigterm_stops_training())
            while not self._done():
                # a signal waits for the step and its metrics row: a checkpoint saved on
                # interrupt then holds the weights of the step it is named after, logged
                with interrupts_deferred():
                    t0 = time.perf_counter()
                    lr = self._set_lr()
                    scalars, step = self.train_step()
                    if self.dist.world > 1:
                        _broadcast_buffers(self.model)
                    if self.ema is not None and not step.skipped:
                        self.ema.update(self.step)
                    self.step += 1
                    dt = time.perf_counter() - t0
                    self.train_time += dt
                    self._sync_time()
                    items = self.task.items_per_batch * cfg.grad_accum * self.dist.world
                    self.items_seen += items
                    self._nan_guard(step, scalars)

                    # a scalar may start mid-window (a loss term switched on at a step): each
                    # is averaged over the steps that logged it
                    for k, v in [*scalars.items(),
                                 *((f"grad_norm/{k}", v) for k, v in step.grad_norms.items())]:  # fmt: skip
                        window[k] = window.get(k, 0.0) + v
                        counts[k] = counts.get(k, 0) + 1
                    window_items += items
                    window_time += dt
                    if bar is not None:
                        bar.update(
                            self.step,
                            self.train_time,
                            scalars,
                            window_items / max(window_time, 1e-9),
                        )

                    if self.step % cfg.log_every == 0 or self._done():
                        row = {k: v / counts[k] for k, v in window.items()}
                        if self.dist.world > 1:
                            row = _all_reduce_mean(row, self.dist.world)
                        row.update(
                            step=self.step,
                            lr=lr,
                            time=round(self.train_time, 3),
                            **{
                                f"{self.task.item_name}_per_s": window_items
                                / max(window_time, 1e-9)
                            },
                        )
                        if step.skipped:
                            row["skipped"] = step.skipped
                        if main:
                            log.write(_ordered(row))
                            for k, v in row.items():
                                if isinstance(v, float | int) and k != "step":
                                    writer.add_scalar(f"train/{k}", v, self.step)
                        window, counts, window_items, window_time = {}, {}, 0, 0.0

                at_end = self._done()
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or at_end:
                    last_eval = self.evaluate()
                    if main:
                        # what the numbers depend on (e.g. the feature extractor): log only
                        info = self.task.eval_info()
                        log.write(
                            {
                                "step": self.step,
                                **{f"val_{k}": v for k, v in last_eval.items()},
                                **{f"val_{k}": v for k, v in info.items()},
                            }
                        )
                        for k, v in last_eval.items():
                            writer.add_scalar(f"val/{k}", v, self.step)
                        bar.set_eval(last_eval)
                if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or at_end:
                    with interrupts_deferred():  # Ctrl-C waits for the save to finish
                        if main:
                            log.sync()
                            writer.flush()
                        self.save()  # before sampling: a failure there loses no training
                if (cfg.sample_every and self.step % cfg.sample_every == 0) or at_end:
                    texts = self.sample()
                    if main:
                        write_samples(self.run.samples_dir, self.step, texts, writer)
                if iter_callback is not None:
                    iter_callback(self)
        except KeyboardInterrupt:
            signals.close()  # a second SIGTERM during the save ends the process (saves are atomic)
            # Keep what was learned: the last completed step becomes a checkpoint.
            if main:
                log.sync()
            name = self.save()
            where = str(self.run.checkpoints_dir / name) if name else None
            raise TrainingInterrupted(str(self.run.path), self.step, where) from None
        finally:
            signals.close()
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
            if log is not None:
                log.close()
        latest = self.run.latest_checkpoint()
        return TrainResult(self.step, self.train_time, last_eval, latest.name if latest else "")

    def _nan_guard(self, step: Step, scalars: dict[str, float]) -> None:
        if step.skipped:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            if self.dist.is_main:
                print(
                    f"warning: non-finite gradients at step {self.step} in {', '.join(step.skipped)}; "
                    f"update skipped ({self.nonfinite_in_a_row} in a row)",
                    flush=True,
                )
            if self.nonfinite_in_a_row >= self.cfg.nan_tolerance:
                raise TrainingError(
                    f"the loss or gradients were non-finite for {self.nonfinite_in_a_row} steps in a row "
                    f"(last at step {self.step}, losses {scalars}); lower train.lr or raise train.grad_clip. "
                    f"The last good checkpoint is kept."
                )
        else:
            self.nonfinite_in_a_row = 0


# ---------------------------------------------------------------------------
# helpers


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple | list):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _broadcast_buffers(model: nn.Module) -> None:
    """Every rank takes rank 0's floating buffers (batch-norm statistics), as DDP does,
    so all ranks evaluate, sample and save the same model."""
    for b in model.buffers():
        if b.dtype.is_floating_point:
            dist.broadcast(b, 0)


def _all_reduce_mean(row: dict[str, float], world: int) -> dict[str, float]:
    keys = sorted(row)
    vec = torch.tensor([row[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(vec)
    return {k: v / world for k, v in zip(keys, vec.tolist(), strict=True)}


def _ordered(row: dict[str, Any]) -> dict[str, Any]:
    first = ["step", "loss"]
    return {
        **{k: row[k] for k in first if k in row},
        **{k: v for k, v in row.items() if k not in first},
    }


def _tensorboard(run: RunDir, step: int):
    from torch.utils.tensorboard import SummaryWriter

    # purge_step drops events a crash left beyond the checkpoint we resume from.
    return SummaryWriter(log_dir=str(run.tb_dir), purge_step=step + 1 if step else None)


class _ProgressBar:
    """tqdm over steps, or over seconds when training has a time budget."""

    def __init__(self, cfg: TrainConfig, step: int, train_time: float, task: Task, enabled: bool):
        from tqdm.auto import tqdm

        self.by_time = cfg.max_time > 0
        total = cfg.max_time if self.by_time else cfg.max_steps
        initial = train_time if self.by_time else step
        fmt = (
            "{l_bar}{bar}| {n:.0f}/{total:.0f}s [{elapsed}<{remaining}{postfix}]"
            if self.by_time
            else None
        )
        self.bar = tqdm(
            total=total, initial=initial, desc="train", unit="s" if self.by_time else "step",
            bar_format=fmt, dynamic_ncols=True, mininterval=0.5, disable=not enabled,
        )  # fmt: skip
        self.item_name = task.item_name
        self.loss_keys = task.loss_keys
        self.headline = task.headline
        self.eval_text = ""

    def update(self, step: int, train_time: float, scalars: dict[str, float], rate: float) -> None:
        new = min(train_time, self.bar.total) if self.by_time else step
        self.bar.update(new - self.bar.n)
        losses = [(k, v) for k, v in scalars.items() if k in self.loss_keys][:2]
        post = f"step {step}" + "".join(f", {k} {v:.3f}" for k, v in losses)
        post += f", {rate:,.0f} {self.item_name}/s{self.eval_text}"
        self.bar.set_postfix_str(post, refresh=False)

    def set_eval(self, metrics: dict[str, float]) -> None:
        if self.headline in metrics:
            self.eval_text = f", val {self.headline} {metrics[self.headline]:.3f}"

    def close(self) -> None:
        self.bar.close()
