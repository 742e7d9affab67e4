"""The contract of a diffusion scheduler: the step rule that turns noise into a sample.

A scheduler holds no weights and knows nothing of networks: a pipeline asks it which
timesteps to visit, feeds the network each one, and hands the network's output back
to `step`, as in diffusers:

    scheduler.set_timesteps(50)
    x = torch.randn(shape, generator=g) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = net(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, generator=g).prev_sample

Training draws timesteps and noise and calls `add_noise` for the network's input. A
scheduler is rebuilt from its config (`from_config(s.to_config())`), which the run
folder saves beside the weights, so a loaded run samples with the rule it trained for.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from aigc.errors import ConfigError


@dataclass
class SchedulerOutput:
    """What one `Scheduler.step` returns."""

    prev_sample: Tensor  # x at the next timestep sampling visits, shape and dtype of `sample`
    pred_original_sample: Tensor | None = None  # the step's estimate of x_0, same shape;
    # None for a rule that forms none


class Scheduler(ABC):
    """A diffusion step rule with diffusers' contract.

    Shapes: `sample`, `model_output`, `noise` and what comes back are (B, ...) with
    any trailing shape ((B, C, H, W) for images), in the sample's dtype and device.
    Timesteps are the network's time input, in the units the scheduler states: for a
    discrete-time rule (DDPM, DDIM) int64 indices into its training schedule, in
    [0, num_train_timesteps); a continuous-time rule says its own (e.g. sigmas).

    Configuration: `__init__` takes keyword arguments only, each with a default, so
    `cls()` is a working scheduler; `to_config` returns them and `from_config` rebuilds
    the scheduler from them. The registry name (aigc.schedulers.SCHEDULERS) is stored
    beside the config by whoever saves it, not inside it.

    Writing one: `step` is numbered steps, each citing the paper and equation it
    computes (e.g. "2. x_0 from the predicted noise, DDIM (Song et al. 2021) eq. 12"),
    as diffusers writes them. Variance-preserving rules keep the defaults of
    `init_noise_sigma` and `scale_model_input`; variance-exploding ones (Karras et al.
    2022 sigmas) override both.
    """

    # set by set_timesteps: one entry per network evaluation, non-increasing noise;
    # (num_inference_steps,) unless the rule evaluates twice at a level (Heun)
    timesteps: Tensor

    # the standard deviation of x_T, the noise sampling starts from (randn * this)
    init_noise_sigma: float = 1.0

    # network calls per step of `num_inference_steps` (2 for Heun), as diffusers' `order`
    order: int = 1

    # the index in `timesteps` of the first `step` call (set_begin_index; set_timesteps
    # resets it to 0)
    begin_index: int = 0

    @abstractmethod
    def set_timesteps(
        self, num_inference_steps: int, device: torch.device | str | None = None
    ) -> None:
        """Choose the `num_inference_steps` timesteps sampling visits and store them in
        `self.timesteps` (1-D, that length, on `device`; default CPU), in the order they
        are visited: strictly decreasing noise. A rule that evaluates the network twice
        at a noise level (Heun's corrector) repeats that timestep, one entry per call of
        `step`, and says how many entries it makes. Called before the first `step`; called
        again, it starts over. ValueError for a count the rule cannot serve."""

    @abstractmethod
    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        generator: torch.Generator | None = None,
    ) -> SchedulerOutput:
        """One step of the reverse process, from `sample` at `timestep` to the next
        timestep of `self.timesteps` (the end of sampling after the last one).

        model_output (B, ...): the network's output for `scale_model_input(sample,
        timestep)` at `timestep`, in the parameterisation the scheduler's config names
        (the noise epsilon, x_0 or v). timestep: an entry of `self.timesteps`, a Python
        int or a 0-d tensor. sample (B, ...): x_t. generator: the source of the fresh
        noise a stochastic rule adds; a deterministic rule ignores it. With the same
        generator state, the same inputs give the same output.
        """

    @abstractmethod
    def add_noise(self, original: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The forward process q(x_t | x_0) in closed form: x_t from original x_0 (B, ...)
        and standard normal noise (B, ...) at timesteps (B,), one per row, in the units
        of `self.timesteps`. E.g. sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (DDPM, Ho et
        al. 2020, eq. 4). Returns (B, ...), the dtype of `original`."""

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Sample from `self.timesteps[begin_index]` on instead of from the first entry:
        image-to-image (SDEdit, Meng et al. 2022) noises an image to that timestep with
        `add_noise` and steps through the rest. Called after `set_timesteps`; a multistep
        rule starts afresh there (first order). ValueError for an index outside the
        timesteps, or one a rule cannot begin at (Heun: a corrector's)."""
        n = len(self.timesteps)
        if isinstance(begin_index, bool) or not isinstance(begin_index, int):
            raise ValueError(f"begin_index={begin_index!r} must be an integer")
        if not 0 <= begin_index < n:
            raise ValueError(f"begin_index={begin_index} must be in [0, {n})")
        self.begin_index = begin_index

    def scale_model_input(self, sample: Tensor, timestep: int | Tensor) -> Tensor:
        """What the network sees at `timestep` for `sample` (B, ...), same shape. The
        identity for variance-preserving rules; Karras-style sigma rules divide by
        sqrt(sigma^2 + 1)."""
        return sample

    @abstractmethod
    def to_config(self) -> dict[str, Any]:
        """The keyword arguments of `__init__` that rebuild this scheduler: JSON-ready
        values (numbers, strings, booleans, lists of them). `from_config` of it steps
        exactly as this one does."""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Scheduler:
        """A scheduler of this class from `to_config`'s dict; ConfigError naming an
        unknown or missing key (never ignored, unlike diffusers)."""
        params = inspect.signature(cls).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            for key in config:
                if key not in params:
                    raise ConfigError(
                        f"scheduler config key {key!r} is not a setting of {cls.__name__}; "
                        f"known: {', '.join(params) or 'none'}"
                    )
        try:
            inspect.signature(cls).bind(**config)
        except TypeError as e:
            raise ConfigError(f"{cls.__name__} config: {e}") from None
        return cls(**config)
