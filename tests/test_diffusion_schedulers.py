"""DDPM and DDIM against independent computations: the schedule's closed form, DDIM
with eta = 1 equal to DDPM's posterior step, the three parameterisations agreeing, and a
Gaussian toy whose exact noise prediction is known, sampled back to its data law."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aigc.schedulers import get_scheduler
from aigc.schedulers.ddim import DDIMScheduler
from aigc.schedulers.ddpm import DDPMScheduler


def test_add_noise_is_the_closed_form_of_the_forward_process():
    s = DDPMScheduler(num_train_timesteps=200)
    betas = np.linspace(1e-4, 0.02, 200)  # Ho et al. 2020's linear schedule, rescaled length
    abar = np.cumprod(1 - betas)
    x0 = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 17, 120, 199])
    want = [math.sqrt(abar[k]) * x0[i] + math.sqrt(1 - abar[k]) * eps[i] for i, k in enumerate(t)]
    torch.testing.assert_close(s.add_noise(x0, eps, t), torch.stack(want))
    # the cosine schedule's abar is f(t) / f(0) (Nichol & Dhariwal 2021, eq. 17)
    c = DDPMScheduler(num_train_timesteps=100, beta_schedule="cosine")
    f = np.cos((np.arange(101) / 100 + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(c.alphas_cumprod.numpy()[:90], (f[1:] / f[0])[:90], rtol=1e-10)


@pytest.mark.parametrize("steps", [1000, 50])
def test_ddim_with_eta_1_is_ddpm(steps):
    """Song et al. 2021, §4.1: eta = 1 makes the DDIM update DDPM's ancestral step, at any
    stride; with the same generator the two give the same next sample."""
    ddpm = DDPMScheduler(clip_sample=False)
    ddim = DDIMScheduler(clip_sample=False, eta=1.0)
    for s in (ddpm, ddim):
        s.set_timesteps(steps)
    assert torch.equal(ddpm.timesteps, ddim.timesteps)
    x = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    out = torch.randn_like(x)
    for t in ddpm.timesteps[[0, len(ddpm.timesteps) // 2, -1]]:
        a = ddpm.step(out, t, x, generator=torch.Generator().manual_seed(3))
        b = ddim.step(out, t, x, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(a.prev_sample, b.prev_sample)
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample)


def test_ddpm_step_is_the_posterior_of_ho_et_al():
    """mean and variance of DDPM's step at t = 500 against q(x_{t-1} | x_t, x_0) written
    out from the schedule (Ho et al. 2020, eq. 6-7)."""
    s = DDPMScheduler(clip_sample=False)
    t = 500
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    x0 = torch.full((20000,), 0.3, dtype=torch.float64)
    eps = torch.randn(20000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    xt = s.add_noise(x0, eps, torch.full((20000,), t))
    mean = (math.sqrt(abar[t - 1]) * betas[t] / (1 - abar[t])) * x0 + (
        math.sqrt(1 - betas[t]) * (1 - abar[t - 1]) / (1 - abar[t])
    ) * xt
    var = (1 - abar[t - 1]) / (1 - abar[t]) * betas[t]
    out = s.step(eps, t, xt, generator=torch.Generator().manual_seed(1)).prev_sample
    z = (out - mean) / math.sqrt(var)
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1) < 0.03


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_the_three_parameterisations_agree(cls):
    s = cls(clip_sample=False, **({"eta": 0.0} if cls is DDIMScheduler else {}))
    s.set_timesteps(20)
    x0 = torch.randn(4, 2, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = int(s.timesteps[5])
    xt = s.add_noise(x0, eps, torch.full((4,), t))
    a = float(s.alphas_cumprod[t])
    outputs = {
        "epsilon": eps,
        "sample": x0,
        "v_prediction": math.sqrt(a) * eps - math.sqrt(1 - a) * x0,
    }
    results = []
    for kind, output in outputs.items():
        s.prediction_type = kind
        r = s.step(output, t, xt, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(r.pred_original_sample, x0)
        results.append(r.prev_sample)
    for r in results[1:]:
        torch.testing.assert_close(r, results[0])


def _exact_eps(s, mu: float, sd: float):
    """The exact noise prediction E[eps | x_t] for data N(mu, sd^2): x_t is Gaussian
    with mean sqrt(abar) mu and variance abar sd^2 + 1 - abar, so the regression of eps
    on x_t is sqrt(1 - abar) / (abar sd^2 + 1 - abar) (x_t - sqrt(abar) mu)."""

    def eps(x, t):
        a = float(s.alphas_cumprod[int(t)])
        return math.sqrt(1 - a) / (a * sd**2 + 1 - a) * (x - math.sqrt(a) * mu)

    return eps


def _predicted_moments(s, steps: int, eta: float, mu: float, sd: float) -> tuple[float, float]:
    """Mean and std of the samples DDIM(eta) (DDPM at eta = 1) makes from N(0, 1) with the
    exact noise prediction, from the papers' formulas alone. Both x_0 and eps estimates
    are linear in d = x_t - sqrt(abar) mu: x_0 - mu = sqrt(abar) sd^2 / v d and
    eps = sqrt(1 - abar) / v d, v = abar sd^2 + 1 - abar; so eq. 12 of Song et al. 2021
    maps d to k d + sigma z, k = sqrt(abar') A + sqrt(1 - abar' - sigma^2) B."""
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    ts = list(range(0, 1000, 1000 // steps))[::-1]
    mean, var = -math.sqrt(abar[ts[0]]) * mu, 1.0  # of d at the first timestep
    for t in ts:
        prev = t - 1000 // steps
        a, ap = abar[t], (abar[prev] if prev >= 0 else 1.0)
        v = a * sd**2 + 1 - a
        sigma = eta * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))  # eq. 16
        k = math.sqrt(ap) * math.sqrt(a) * sd**2 / v + math.sqrt(max(1 - ap - sigma**2, 0)) * (
            math.sqrt(1 - a) / v
        )
        mean, var = k * mean, k * k * var + sigma**2
    return mu + mean, math.sqrt(var)  # at the end abar' = 1: x = d + mu


@pytest.mark.parametrize(
    ("name", "steps", "eta"), [("ddim", 50, 0.0), ("ddim", 50, 1.0), ("ddim", 1000, 0.0),
                               ("ddpm", 1000, 1.0), ("ddpm", 50, 1.0)],
)  # fmt: skip
def test_gaussian_data_with_the_exact_noise_prediction(name, steps, eta):
    """Data N(0.5, 0.3^2), whose exact noise prediction is known: the samples have the
    moments the papers' formulas predict, and with every training step (or the
    ancestral sampler) the data's own."""
    mu, sd = 0.5, 0.3
    s = get_scheduler(name)(clip_sample=False, **({"eta": eta} if name == "ddim" else {}))
    s.set_timesteps(steps)
    eps = _exact_eps(s, mu, sd)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40_000, dtype=torch.float64, generator=g) * s.init_noise_sigma
    for t in s.timesteps:
        x = s.step(eps(s.scale_model_input(x, t), t), t, x, generator=g).prev_sample
    want_mean, want_sd = _predicted_moments(s, steps, eta, mu, sd)
    assert abs(float(x.mean()) - want_mean) < 0.005 and abs(float(x.std()) - want_sd) < 0.005
    if steps == 1000:  # every training step: the data's law
        assert abs(want_mean - mu) < 0.01 and abs(want_sd - sd) < 0.01
    else:  # 50 strides, with or without noise, shrink the spread (each contracts it)
        assert want_sd < sd - 0.02


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="eta"):
        DDIMScheduler(eta=1.5)
    with pytest.raises(ValueError, match="prediction_type"):
        DDPMScheduler(prediction_type="noise")
    with pytest.raises(ValueError, match="num_inference_steps"):
        DDPMScheduler(num_train_timesteps=100).set_timesteps(101)
