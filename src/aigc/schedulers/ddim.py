"""DDIM (Song et al. 2021): a non-Markovian sampler for a DDPM-trained network that
takes large strides; eta interpolates between deterministic sampling (eta = 0) and
DDPM's ancestral sampling (eta = 1)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from aigc.schedulers.base import SchedulerOutput
from aigc.schedulers.ddpm import DiscreteScheduler, _noise


class DDIMScheduler(DiscreteScheduler):
    """DDIM's update (Song et al. 2021, eq. 12) with sigma from eq. 16 times ``eta``."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        prediction_type: str = "epsilon",
        clip_sample: bool = True,
        eta: float = 0.0,
    ) -> None:
        if isinstance(eta, bool) or not (isinstance(eta, int | float) and 0.0 <= eta <= 1.0):
            raise ValueError(f"eta={eta!r} must be in [0, 1]")
        self.eta = float(eta)
        super().__init__(num_train_timesteps, beta_schedule, beta_start, beta_end,
                         prediction_type, clip_sample)  # fmt: skip

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
        # 1. x_0 and eps from the network's output ("predicted x_0", eq. 12's first term)
        x0, eps = self._x0_eps(model_output, t, sample)
        # 2. sigma_t(eta) = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
        #    (eq. 16); eta = 1 gives DDPM's posterior variance
        sigma = self.eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        # 3. x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z (eq. 12)
        prev_sample = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            prev_sample = prev_sample + sigma * _noise(sample, generator)
        return SchedulerOutput(prev_sample, x0)

    def to_config(self) -> dict[str, Any]:
        return {**super().to_config(), "eta": self.eta}
