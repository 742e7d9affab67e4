"""The training schedule seen as noise levels sigma: what the ODE solvers (euler, heun,
dpm++2m) share.

A VP sample x = sqrt(abar) x_0 + sqrt(1 - abar) eps is, divided by sqrt(abar), the VE
sample x_0 + sigma eps with sigma = sqrt((1 - abar) / abar) (Karras et al. 2022, Table 1:
the VP scale s = 1 / sqrt(sigma^2 + 1)). sigma grows with the timestep t of the training
schedule; between integer t it is interpolated linearly in log sigma, so any sigma in
[sigma(0), sigma(T - 1)] has a fractional network time t(sigma), which the network's
sinusoidal embedding accepts. Timesteps are these float t (float32), visited in order.
"""

from __future__ import annotations

import math
from functools import cached_property

import torch
from torch import Tensor

from aigc.schedulers.ddpm import DiscreteScheduler

SIGMA_SPACINGS = ("karras", "uniform-t")


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """(n,) float64 noise levels from sigma_max down to sigma_min, Karras et al. 2022 eq. 5:
    sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho;
    without eq. 5's final sigma_n = 0, which the caller appends. n = 1 gives sigma_max."""
    if n == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    ramp = torch.arange(n, dtype=torch.float64) / (n - 1)  # i / (n - 1)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


class SigmaScheduler(DiscreteScheduler):
    """A discrete VP schedule walked in sigma: the noise levels sampling visits, the network
    time of each, and x_0 from the network's output at any sigma.

    `set_timesteps(n)` chooses n noise levels sigma_0 > ... > sigma_{n-1} ("karras": eq. 5
    between sigma(0) and sigma(T - 1), rho = `rho`; "uniform-t": sigma at t evenly spaced
    from T - 1 down to 0, both ends included) and appends sigma_n = 0, the clean sample:
    `self.sigmas` is (n + 1,). Each `step` call is one network evaluation; the calls are
    counted, so `step` and `scale_model_input` must follow `self.timesteps` in order
    (ValueError otherwise), and `set_timesteps` starts over. `clip_sample` is off by
    default: clamping x_0 bends the ODE's path; a clamp-worthy model may turn it on.
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
        if sigma_spacing not in SIGMA_SPACINGS:
            raise ValueError(f"sigma_spacing={sigma_spacing!r}: choose {', '.join(SIGMA_SPACINGS)}")
        if isinstance(rho, bool) or not isinstance(rho, int | float) or rho <= 0:
            raise ValueError(f"rho={rho!r} must be a number > 0 (Karras et al. use 7)")
        self.sigma_spacing = sigma_spacing
        self.rho = float(rho)
        super().__init__(num_train_timesteps, beta_schedule, beta_start, beta_end,
                         prediction_type, clip_sample)  # fmt: skip

    # --- the schedule in sigma -------------------------------------------------------

    @cached_property
    def log_train_sigmas(self) -> Tensor:
        """(T,) float64 log sigma(t) = log sqrt((1 - abar_t) / abar_t), increasing in t."""
        a = self.alphas_cumprod
        return 0.5 * (torch.log1p(-a) - torch.log(a))

    def sigma_of_t(self, t: Tensor) -> Tensor:
        """sigma at network times t (any shape, fractional allowed, clamped to [0, T - 1]):
        log sigma interpolated linearly between integer t. float64, on CPU."""
        log_s, T = self.log_train_sigmas, self.num_train_timesteps
        t = t.detach().to("cpu", torch.float64).clamp(0, T - 1)
        i = t.floor().long().clamp(max=T - 2)
        w = t - i
        return ((1 - w) * log_s[i] + w * log_s[i + 1]).exp()

    def t_of_sigma(self, sigma: Tensor) -> Tensor:
        """The network time t(sigma), the inverse of `sigma_of_t` (sigma clamped to the
        training schedule's range). float64, on CPU."""
        log_s, T = self.log_train_sigmas, self.num_train_timesteps
        x = sigma.detach().to("cpu", torch.float64).log().clamp(log_s[0], log_s[-1])
        i = (torch.searchsorted(log_s, x, right=True) - 1).clamp(0, T - 2)
        return i + (x - log_s[i]) / (log_s[i + 1] - log_s[i])

    def spaced_sigmas(self, n: int) -> Tensor:
        """(n,) float64 decreasing noise levels by `sigma_spacing`, without the final 0."""
        T = self.num_train_timesteps
        if self.sigma_spacing == "karras":
            s_min, s_max = math.exp(self.log_train_sigmas[0]), math.exp(self.log_train_sigmas[-1])
            return karras_sigmas(n, s_min, s_max, self.rho)
        return self.sigma_of_t(torch.linspace(T - 1, 0, n, dtype=torch.float64))

    # --- the timesteps and the call count --------------------------------------------

    def set_timesteps(
        self, num_inference_steps: int, device: torch.device | str | None = None
    ) -> None:
        """n = num_inference_steps noise levels and the final 0 in `self.sigmas` (n + 1,);
        `self.timesteps` the network time of each evaluation (`model_sigmas`)."""
        T = self.num_train_timesteps
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T:
            raise ValueError(f"num_inference_steps={n!r} must be an integer in [1, {T}]")
        self.num_inference_steps = n
        self.sigmas = torch.cat([self.spaced_sigmas(n), torch.zeros(1, dtype=torch.float64)])
        self.model_sigmas = self._model_sigmas()  # sigma of each network evaluation
        self.timesteps = self.t_of_sigma(self.model_sigmas).float().to(device or "cpu")
        self._calls = 0  # the index in timesteps of the next step call
        self.begin_index = 0
        self._reset()

    def set_begin_index(self, begin_index: int = 0) -> None:
        super().set_begin_index(begin_index)
        self._calls = begin_index
        self._reset()

    def _model_sigmas(self) -> Tensor:
        """sigma at each network evaluation: one per noise level but the final 0."""
        return self.sigmas[:-1]

    def _reset(self) -> None:
        """Forget what a multi-call rule kept between calls."""

    def _call_index(self, timestep: int | float | Tensor) -> int:
        """The index in `self.timesteps` of this call; ValueError if `timestep` is not the
        next one to visit."""
        k, n = self._calls, len(self.timesteps)
        if k >= n:
            raise ValueError(
                f"all {n} timesteps have been stepped; call set_timesteps to sample again"
            )
        want, got = float(self.timesteps[k]), float(timestep)
        if not math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-4):
            raise ValueError(
                f"timestep {got:g} is not the next to visit (timesteps[{k}] = {want:g}): "
                "step through self.timesteps in order, or call set_timesteps to start over"
            )
        return k

    # --- x_0 and the forward process at a sigma ---------------------------------------

    def _denoised(self, model_output: Tensor, sample_vp: Tensor, sigma: float) -> Tensor:
        """x_0 (Karras et al.'s D(x; sigma)) from the network's output for the VP sample
        at sigma, abar = 1 / (1 + sigma^2), by the prediction type (ddpm.py `_x0_eps_at`)."""
        return self._x0_eps_at(model_output, 1.0 / (1.0 + sigma**2), sample_vp)[0]

    def _sigmas_at(self, timesteps: Tensor, like: Tensor) -> Tensor:
        """sigma(t) for timesteps (B,) as (B, 1, ...) broadcastable to `like`."""
        s = self.sigma_of_t(timesteps).to(like.device, like.dtype)
        return s.view((-1,) + (1,) * (like.dim() - 1))

    def add_noise(self, original: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The VP x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps at network times t (B,),
        fractional allowed, abar = 1 / (1 + sigma(t)^2) (Ho et al. 2020, eq. 4)."""
        s = self._sigmas_at(timesteps, original)
        return (original + s * noise) / (1 + s**2).sqrt()

    def to_config(self) -> dict:
        return {**super().to_config(), "sigma_spacing": self.sigma_spacing, "rho": self.rho}
