"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models", Algorithm 2): the multistep second-order solver of the
probability-flow ODE in its data-prediction form, exact in the linear part.

Notation as in the paper: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) (VP),
lambda_t = log(alpha_t / sigma_t), h_i = lambda_{t_i} - lambda_{t_{i-1}}, x_theta the
network's x_0 estimate. With sigmas.py's VE sigma = sigma_t / alpha_t, lambda = -log sigma.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from aigc.schedulers.base import SchedulerOutput
from aigc.schedulers.sigmas import SigmaScheduler

LOWER_ORDER_FINAL_MAX_STEPS = 15  # at most this many steps: the last finite one is 1st order


class DPMSolverMultistepScheduler(SigmaScheduler):
    """DPM-Solver++(2M) on VP samples (init_noise_sigma 1, the network sees the sample).

    Timesteps: n network times, by default at the Karras et al. eq. 5 levels (rho = 7)
    from sigma(T - 1) to sigma(0), or evenly spaced in t from T - 1 down to 0 (both
    included; fractional unless n - 1 divides T - 1) with sigma_spacing="uniform-t". On
    the exact Gaussian flow of tests/test_diffusion_schedulers.py, Karras levels land 8
    times closer at 10 steps. Step i goes from timesteps[i] to timesteps[i + 1]; the
    final step goes from t = 0 to the clean sample (abar = 1, lambda = +inf), where the
    update is the network's x_0 estimate itself: as the official code's "denoise to
    zero". Order: the first step is first order (Algorithm 2 line 4: DDIM); so is the
    last step into t = 0 when n <= 15 and `lower_order_final` (Lu et al.'s remedy for few
    steps); the others are second order (lines 7-9). One network evaluation per step.
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
        lower_order_final: bool = True,
    ) -> None:
        if not isinstance(lower_order_final, bool):
            raise ValueError(f"lower_order_final={lower_order_final!r} must be true or false")
        self.lower_order_final = lower_order_final
        super().__init__(num_train_timesteps, beta_schedule, beta_start, beta_end,
                         prediction_type, clip_sample, sigma_spacing, rho)  # fmt: skip

    def _reset(self) -> None:
        self._x0_prev: Tensor | None = None  # x_theta at the previous timestep (the buffer Q)

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        generator: torch.Generator | None = None,
    ) -> SchedulerOutput:
        k = self._call_index(timestep)
        n = len(self.timesteps)
        s, s_next = float(self.sigmas[k]), float(self.sigmas[k + 1])  # VE sigmas
        # 1. x_theta(x_t, t), the data prediction model (x_t - sigma_t eps_theta) / alpha_t
        #    for an eps network (Lu et al. §4)
        x0 = self._denoised(model_output, sample, s)
        if s_next == 0:
            # 2. the final step, to lambda = +inf: line 4 with sigma_{t_i} = 0, e^{-h} = 0
            #    and alpha_{t_i} = 1 is x_theta itself
            prev_sample = x0
        else:
            alpha_next = 1 / math.sqrt(1 + s_next**2)
            sigma_t, sigma_t_next = s / math.sqrt(1 + s**2), s_next * alpha_next  # VP sigma_t
            h = math.log(s) - math.log(s_next)  # h_i = lambda_next - lambda_now
            first = k == self.begin_index or (
                self.lower_order_final and n <= LOWER_ORDER_FINAL_MAX_STEPS and k == n - 2
            )
            if first:
                # 3. first order: D = x_theta (Algorithm 2 line 4)
                D = x0
            else:
                # 3. r_i = h_{i-1} / h_i (line 7), and
                #    D_i = (1 + 1/(2 r_i)) x_theta(t_{i-1}) - 1/(2 r_i) x_theta(t_{i-2}) (line 8)
                h_prev = math.log(float(self.sigmas[k - 1])) - math.log(s)
                c = 1 / (2 * (h_prev / h))
                D = (1 + c) * x0 - c * self._x0_prev
            # 4. x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x - alpha_{t_i} (e^{-h_i} - 1) D
            #    (line 9; line 4 with D = x_theta)
            prev_sample = (sigma_t_next / sigma_t) * sample - alpha_next * math.expm1(-h) * D
        self._x0_prev = x0  # Q <- x_theta (lines 3, 5, 10)
        self._calls += 1
        return SchedulerOutput(prev_sample, x0)

    def to_config(self) -> dict:
        return {**super().to_config(), "lower_order_final": self.lower_order_final}
