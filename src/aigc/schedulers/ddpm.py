"""DDPM (Ho et al. 2020): the discrete-time variance-preserving diffusion and its
ancestral sampler, and the noise schedule other discrete-time rules (DDIM) share.

Notation as in the paper: beta_t the noise added at step t, alpha_t = 1 - beta_t,
abar_t = prod_{s <= t} alpha_s; x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
Timesteps are int indices in [0, num_train_timesteps).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from aigc.schedulers.base import Scheduler, SchedulerOutput

BETA_SCHEDULES = ("linear", "cosine")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def make_betas(kind: str, steps: int, beta_start: float, beta_end: float) -> Tensor:
    """(steps,) float64 betas: "linear" from beta_start to beta_end (Ho et al. 2020, §4),
    or "cosine" (Nichol & Dhariwal 2021, eq. 17, s = 0.008, betas capped at 0.999)."""
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    if kind == "cosine":
        t = torch.arange(steps + 1, dtype=torch.float64) / steps
        f = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"beta_schedule={kind!r}: choose {', '.join(BETA_SCHEDULES)}")


class DiscreteScheduler(Scheduler):
    """What discrete-time VP rules share: the schedule, the timesteps sampling visits
    (evenly spaced, "leading" as in diffusers: 0, k, 2k, ... with k = T // n, visited
    from the largest), the forward process, and x_0 / eps from the network's output."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        prediction_type: str = "epsilon",
        clip_sample: bool = True,
    ) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={prediction_type!r}: choose {PREDICTION_TYPES}")
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.prediction_type = prediction_type
        self.clip_sample = clip_sample  # clamp the x_0 estimate to [-1, 1] (image data)
        self.betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)  # abar_t, float64
        self.set_timesteps(num_train_timesteps)

    def set_timesteps(
        self, num_inference_steps: int, device: torch.device | str | None = None
    ) -> None:
        T = self.num_train_timesteps
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps={num_inference_steps!r} must be in [1, {T}]")
        self.num_inference_steps = num_inference_steps
        self.step_ratio = T // num_inference_steps
        steps = torch.arange(num_inference_steps, dtype=torch.int64) * self.step_ratio
        self.timesteps = steps.flip(0).to(device or "cpu")
        self.begin_index = 0

    def _abar(self, t: int) -> float:
        """abar_t; 1 before the first step (t < 0: no noise)."""
        return float(self.alphas_cumprod[t]) if t >= 0 else 1.0

    def _x0_eps(self, model_output: Tensor, t: int, sample: Tensor) -> tuple[Tensor, Tensor]:
        """x_0 and eps from the network's output at timestep t (see `_x0_eps_at`)."""
        return self._x0_eps_at(model_output, self._abar(t), sample)

    def _x0_eps_at(self, model_output: Tensor, a: float, sample: Tensor) -> tuple[Tensor, Tensor]:
        """x_0 and eps from the network's output at the noise level abar = a, for the VP
        sample x = sqrt(a) x_0 + sqrt(1 - a) eps, by the output's parameterisation: eps
        (Ho et al. eq. 15 inverted), x_0 itself, or v = sqrt(a) eps - sqrt(1 - a) x_0
        (Salimans & Ho 2022, §4)."""
        sa, s1 = math.sqrt(a), math.sqrt(1 - a)
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (sample - s1 * eps) / sa
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (sample - sa * x0) / s1
        else:
            x0 = sa * sample - s1 * model_output
            eps = sa * model_output + s1 * sample
        if self.clip_sample:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (sample - sa * x0) / s1  # consistent with the clipped x_0
        return x0, eps

    def x0_estimate(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor) -> Tensor:
        """The unclipped x_0 estimate at ``timestep``, differentiable in ``sample`` and the
        output (what a guidance gradient flows through; `_x0_eps_at` without the clamp)."""
        a = self._abar(int(timestep))
        sa, s1 = math.sqrt(a), math.sqrt(1 - a)
        if self.prediction_type == "epsilon":
            return (sample - s1 * model_output) / sa
        if self.prediction_type == "sample":
            return model_output
        return sa * sample - s1 * model_output

    def move_x0(self, model_output: Tensor, timestep: int | Tensor, delta: Tensor) -> Tensor:
        """The network output whose x_0 estimate (at the same sample) is ``model_output``'s
        plus ``delta``: a guided x_0 handed to ``step`` in the output's own units."""
        a = self._abar(int(timestep))
        sa, s1 = math.sqrt(a), math.sqrt(1 - a)
        if self.prediction_type == "epsilon":
            return model_output - (sa / s1) * delta
        if self.prediction_type == "sample":
            return model_output + delta
        return model_output - delta / s1

    def _prev(self, t: int) -> int:
        return t - self.step_ratio

    def add_noise(self, original: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4)."""
        a = self.alphas_cumprod.to(original.device)[timesteps.long()]
        shape = (-1,) + (1,) * (original.dim() - 1)
        a = a.view(shape).to(original.dtype)
        return a.sqrt() * original + (1 - a).sqrt() * noise

    def to_config(self) -> dict[str, Any]:
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": self.beta_schedule,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "prediction_type": self.prediction_type,
            "clip_sample": self.clip_sample,
        }


def _noise(sample: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like sample, drawn on the generator's device."""
    device = generator.device if generator is not None else sample.device
    z = torch.randn(sample.shape, generator=generator, device=device, dtype=sample.dtype)
    return z.to(sample.device)


class DDPMScheduler(DiscreteScheduler):
    """Ancestral sampling of DDPM (Ho et al. 2020, Algorithm 2), on any evenly spaced
    subset of the training timesteps (a stride k uses the effective beta of k steps,
    1 - abar_t / abar_{t-k}), with the posterior variance beta~ ("fixed small")."""

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        generator: torch.Generator | None = None,
    ) -> SchedulerOutput:
        t = int(timestep)
        prev = self._prev(t)
        a_t, a_prev = self._abar(t), self._abar(prev)
        beta = 1 - a_t / a_prev  # the effective beta_t of this stride
        # 1. x_0 from the network's output (Ho et al. eq. 15 for eps)
        x0, _ = self._x0_eps(model_output, t, sample)
        # 2. the posterior mean mu~(x_t, x_0) (Ho et al. eq. 7)
        c0 = math.sqrt(a_prev) * beta / (1 - a_t)
        ct = math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)
        mean = c0 * x0 + ct * sample
        if prev < 0:  # the last step returns the mean: no noise at t = 0
            return SchedulerOutput(mean, x0)
        # 3. add sigma_t z with sigma_t^2 = beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t
        #    (Ho et al. eq. 7, Algorithm 2 line 4)
        var = (1 - a_prev) / (1 - a_t) * beta
        return SchedulerOutput(mean + math.sqrt(var) * _noise(sample, generator), x0)
