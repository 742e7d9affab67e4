"""Euler (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models"): the Euler method on the probability-flow ODE in sigma, for a VP-trained network.

With sigma(t) = t and scale 1 the ODE (Karras eq. 1, its score by eq. 3) is
dx/dsigma = (x - D(x; sigma)) / sigma, in VE coordinates x = x_VP sqrt(sigma^2 + 1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from aigc.schedulers.base import SchedulerOutput
from aigc.schedulers.sigmas import SigmaScheduler


class EulerScheduler(SigmaScheduler):
    """Karras et al. 2022, Algorithm 2 without churn (gamma_i = 0): one network evaluation
    and one Euler step per noise level, the last from sigma_{n-1} to 0, where it returns
    D(x; sigma_{n-1}).

    Samples are VE: sampling starts at x = z sqrt(sigma_0^2 + 1) (`init_noise_sigma`) and
    the network sees x / sqrt(sigma^2 + 1), its VP input (`scale_model_input`). Timesteps:
    the fractional network time t(sigma_i) of each of the n noise levels (sigmas.py);
    `add_noise` makes the VE x_0 + sigma(t) eps at those times.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        prediction_type: str = "epsilon",
        clip_sample: bool = False,
        sigma_spacing: str = "karras",
        rho: float = 7.0,
    ) -> None:
        super().__init__(num_train_timesteps, beta_schedule, beta_start, beta_end,
                         prediction_type, clip_sample, sigma_spacing, rho)  # fmt: skip

    def set_timesteps(
        self, num_inference_steps: int, device: torch.device | str | None = None
    ) -> None:
        super().set_timesteps(num_inference_steps, device)
        # x_0 ~ N(0, sigma_0^2 I) in Algorithm 2 line 2, plus the data's unit variance
        self.init_noise_sigma = math.sqrt(float(self.sigmas[0]) ** 2 + 1)

    def scale_model_input(self, sample: Tensor, timestep: int | Tensor) -> Tensor:
        """The VP input x / sqrt(sigma^2 + 1) the network was trained on."""
        sigma = float(self.model_sigmas[self._call_index(timestep)])
        return sample / math.sqrt(sigma**2 + 1)

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        generator: torch.Generator | None = None,
    ) -> SchedulerOutput:
        k = self._call_index(timestep)
        sigma, sigma_next = float(self.sigmas[k]), float(self.sigmas[k + 1])
        # 1. D(x; sigma): x_0 from the network's output at the VP input x / sqrt(sigma^2 + 1)
        #    (Karras et al. Table 1, VP scale s = 1 / sqrt(sigma^2 + 1))
        x0 = self._denoised(model_output, sample / math.sqrt(sigma**2 + 1), sigma)
        # 2. d = (x - D(x; sigma)) / sigma, dx/dsigma of the ODE (Algorithm 2 line 7, gamma = 0)
        d = (sample - x0) / sigma
        # 3. the Euler step x + (sigma_next - sigma) d (Algorithm 2 line 8); to sigma = 0
        #    it lands on D(x; sigma) itself
        prev_sample = sample + (sigma_next - sigma) * d
        self._calls += 1
        return SchedulerOutput(prev_sample, x0)

    def add_noise(self, original: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The VE x_0 + sigma(t) eps at network times t (B,): the sample `step` takes."""
        return original + self._sigmas_at(timesteps, original) * noise
