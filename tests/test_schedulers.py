"""Schedulers: the registry, and the contract checked on every registered scheduler and on
a toy DDIM written here (there is no scheduler in src yet). The toy's own tests show the
contract carries a real rule; they test no code of src."""

from __future__ import annotations

import json
import math

import pytest
import torch

from aigc import schedulers
from aigc.errors import ConfigError
from aigc.schedulers import SCHEDULERS, Scheduler, SchedulerOutput, get_scheduler


class ToyDDIM(Scheduler):
    """Deterministic DDIM (eta = 0) over DDPM's linear betas, epsilon prediction."""

    def __init__(
        self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> None:
        self.num_train_timesteps = num_train_timesteps
        self.beta_start, self.beta_end = beta_start, beta_end
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, 0)  # abar_t (Ho et al. 2020, eq. 4)

    def to_config(self) -> dict:
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
        }

    def set_timesteps(self, num_inference_steps, device=None) -> None:
        if not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be in [1, {self.num_train_timesteps}]")
        self.stride = self.num_train_timesteps // num_inference_steps
        self.timesteps = (torch.arange(num_inference_steps) * self.stride).flip(0).to(device)

    def step(self, model_output, timestep, sample, generator=None) -> SchedulerOutput:
        t = int(timestep)
        prev = t - self.stride
        abar = self.alphas_cumprod[t].item()
        abar_prev = self.alphas_cumprod[prev].item() if prev >= 0 else 1.0
        # 1. x_0 predicted from the noise: (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
        #    (Song et al. 2021, eq. 12, first term)
        x0 = (sample - math.sqrt(1 - abar) * model_output) / math.sqrt(abar)
        # 2. the direction pointing to x_t, with sigma_t = 0 (eq. 12, second term)
        direction = math.sqrt(1 - abar_prev) * model_output
        # 3. x_{t-1} = sqrt(abar_{t-1}) x_0 + direction (eq. 12, no random noise)
        return SchedulerOutput(math.sqrt(abar_prev) * x0 + direction, x0)

    def add_noise(self, original, noise, timesteps):
        abar = self.alphas_cumprod.to(original.device)[timesteps].to(original.dtype)
        abar = abar.view(-1, *[1] * (original.dim() - 1))  # (B, 1, ...)
        return abar.sqrt() * original + (1 - abar).sqrt() * noise  # DDPM eq. 4


def check_scheduler(cls: type[Scheduler], steps: int = 10) -> None:
    """The contract of aigc.schedulers.base.Scheduler, for one scheduler class."""
    scheduler = cls()  # every setting has a default
    config = scheduler.to_config()
    assert json.loads(json.dumps(config)) == config  # JSON-ready
    twin = cls.from_config(config)
    assert twin.to_config() == config
    with pytest.raises(ConfigError, match="no_such_key"):
        cls.from_config({**config, "no_such_key": 1})

    assert isinstance(scheduler.init_noise_sigma, float) and scheduler.init_noise_sigma > 0
    shape = (3, 2, 4, 4)

    def run(s: Scheduler) -> list[SchedulerOutput]:
        s.set_timesteps(steps, device="cpu")
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g) * s.init_noise_sigma
        outs = []
        for t in s.timesteps:
            inp = s.scale_model_input(x, t)
            assert inp.shape == x.shape
            out = s.step(0.1 * inp + 0.01, t, x, generator=g)  # a stand-in network
            assert isinstance(out, SchedulerOutput)
            assert out.prev_sample.shape == x.shape and out.prev_sample.dtype == x.dtype
            assert out.pred_original_sample is None or out.pred_original_sample.shape == x.shape
            assert torch.isfinite(out.prev_sample).all()
            outs.append(out)
            x = out.prev_sample
        return outs

    first = run(scheduler)
    t = scheduler.timesteps
    assert t.dim() == 1 and len(t.unique()) == steps and t.device.type == "cpu"
    # decreasing noise; a level is repeated only by a rule that evaluates it twice (Heun)
    assert (t[1:] <= t[:-1]).all()
    # the same config and generator state give the same samples, run again included
    for again in (run(twin), run(scheduler)):
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a.prev_sample, b.prev_sample)

    x0, noise = torch.randn(shape), torch.randn(shape)
    noisy = scheduler.add_noise(x0, noise, t[:1].expand(shape[0]))
    assert noisy.shape == x0.shape and noisy.dtype == x0.dtype


@pytest.mark.parametrize("cls", [ToyDDIM] + [get_scheduler(name) for name in SCHEDULERS])
def test_scheduler_contract(cls):
    check_scheduler(cls)


def test_the_contract_cannot_be_half_written():
    class NoStep(Scheduler):
        def set_timesteps(self, num_inference_steps, device=None):
            pass

        def add_noise(self, original, noise, timesteps):
            return original

        def to_config(self):
            return {}

    with pytest.raises(TypeError, match="step"):
        NoStep()


def test_toy_ddim_takes_gaussian_noise_to_the_gaussian_data():
    # Data x_0 ~ N(0, s^2): x_t ~ N(0, v_t) with v_t = abar s^2 + 1 - abar, the exact noise
    # prediction is E[eps | x_t] = sqrt(1 - abar) x_t / v_t, and the probability-flow ODE
    # that DDIM (eta = 0) discretises maps x_T to x_0 = x_T s / sqrt(v_T). DDIM's map is
    # linear too, and approaches that one as the steps grow.
    s = 0.5
    scheduler = ToyDDIM()

    def relative_error(steps: int) -> float:
        scheduler.set_timesteps(steps)
        x = torch.ones(1, dtype=torch.float64)  # x_T = 1: x_0 is the map's factor
        for t in scheduler.timesteps:
            abar = scheduler.alphas_cumprod[t]
            eps = (1 - abar).sqrt() * x / (abar * s**2 + 1 - abar)
            x = scheduler.step(eps, t, x).prev_sample
        abar_T = scheduler.alphas_cumprod[scheduler.timesteps[0]]
        return abs(x.item() / (s / math.sqrt(abar_T * s**2 + 1 - abar_T)) - 1)

    errors = [relative_error(steps) for steps in (10, 50, 1000)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.005


def test_toy_ddim_step_inverts_add_noise():
    # given the noise add_noise used, step's x_0 is the original: the two halves of the
    # contract speak of the same timesteps
    scheduler = ToyDDIM()
    scheduler.set_timesteps(50)
    x0, noise = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    t = scheduler.timesteps[7]
    out = scheduler.step(noise, t, scheduler.add_noise(x0, noise, t.expand(4)))
    torch.testing.assert_close(out.pred_original_sample, x0)


def test_unknown_scheduler_names_the_closest(monkeypatch):
    monkeypatch.setattr(schedulers, "SCHEDULERS", {})
    with pytest.raises(ConfigError, match="none registered yet"):
        get_scheduler("ddim")
    monkeypatch.setitem(schedulers.SCHEDULERS, "ddim", f"{__name__}:ToyDDIM")
    assert get_scheduler("ddim") is ToyDDIM
    with pytest.raises(ConfigError, match="did you mean 'ddim'"):
        get_scheduler("ddmi")
    with pytest.raises(ConfigError, match="known: ddim"):
        get_scheduler("euler")
