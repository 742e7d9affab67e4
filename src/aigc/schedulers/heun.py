"""Heun's second-order method (Karras et al. 2022, Algorithm 1) on the probability-flow
ODE in sigma, fitted to the one-network-call-per-timestep loop as diffusers fits it."""

from __future__ import annotations

import torch
from torch import Tensor

from aigc.schedulers.base import SchedulerOutput
from aigc.schedulers.euler import EulerScheduler


class HeunScheduler(EulerScheduler):
    """Karras et al. 2022, Algorithm 1 with sigma(t) = t, s(t) = 1: an Euler predictor to
    sigma_{i+1}, then the trapezoidal corrector with the slope there; the last interval,
    to sigma_n = 0, is Euler alone (the slope at 0 is undefined).

    `num_inference_steps` = n sigma intervals, and 2n - 1 network evaluations: the loop
    calls the network once per timestep, so `timesteps` repeats each interior level,
    t(sigma_0), t(sigma_1), t(sigma_1), ..., t(sigma_{n-1}), t(sigma_{n-1}) (2n - 1
    entries, n distinct). The first call at a level is a predictor (its prev_sample is the
    Euler guess x~_{i+1}); the second, at the guess, corrects it, from the predictor's
    x_i and slope kept between the two calls. VE samples and inputs as in EulerScheduler.
    """

    def _model_sigmas(self) -> Tensor:
        # sigma_0, then each later nonzero sigma twice: corrector of one interval,
        # predictor of the next
        inner = self.sigmas[1:-1].repeat_interleave(2)
        return torch.cat([self.sigmas[:1], inner])

    order = 2  # two network calls per interval (the last interval's one call aside)

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Heun begins at a predictor call: an even index (interval begin_index // 2)."""
        if isinstance(begin_index, int) and begin_index % 2:
            raise ValueError(
                f"begin_index={begin_index} is a corrector call; Heun begins at an even index"
            )
        super().set_begin_index(begin_index)

    def _reset(self) -> None:
        self._predictor: tuple[Tensor, Tensor] | None = None  # (x_i, d_i) of the open interval

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        generator: torch.Generator | None = None,
    ) -> SchedulerOutput:
        k = self._call_index(timestep)
        i = (k + 1) // 2  # calls 2i - 1 (corrector) and 2i (predictor) are at sigma_i
        sigma = float(self.sigmas[i])
        # 1. D(x; sigma) at the VP input (Karras et al. Table 1, s = 1 / sqrt(sigma^2 + 1))
        x0 = self._denoised(model_output, sample / (sigma**2 + 1) ** 0.5, sigma)
        # 2. the slope (x - D(x; sigma)) / sigma (Algorithm 1 line 4, or line 7 at x~_{i+1})
        d = (sample - x0) / sigma
        if k % 2 == 0:  # predictor of the interval sigma_i -> sigma_{i+1}
            sigma_next = float(self.sigmas[i + 1])
            # 3. the Euler step x_i + (sigma_{i+1} - sigma_i) d_i (Algorithm 1 line 5)
            prev_sample = sample + (sigma_next - sigma) * d
            # 4. a corrector follows unless sigma_{i+1} = 0 (Algorithm 1 line 6)
            self._predictor = (sample, d) if sigma_next > 0 else None
        else:  # corrector: sample is the guess x~_i at sigma_i, d its slope d'
            assert self._predictor is not None, "a corrector call without its predictor"
            x_prev, d_prev = self._predictor
            sigma_prev = float(self.sigmas[i - 1])
            # 3. x_i = x_{i-1} + (sigma_i - sigma_{i-1}) (d/2 + d'/2) (Algorithm 1 line 8)
            prev_sample = x_prev + (sigma - sigma_prev) * (0.5 * d_prev + 0.5 * d)
            self._predictor = None
        self._calls += 1
        return SchedulerOutput(prev_sample, x0)
