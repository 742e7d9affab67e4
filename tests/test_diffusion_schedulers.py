"""DDPM, DDIM and the ODE solvers (euler, heun, dpm++2m) against independent
computations: the schedule's closed form, DDIM with eta = 1 equal to DDPM's posterior
step, the three parameterisations agreeing, a Gaussian toy whose exact noise prediction
is known, sampled back to its data law (DDPM, DDIM) or along its exact probability-flow
map at each method's order (the ODE solvers), Karras et al.'s sigma spacing, Heun's
layout, configs and the registry, and the diffusion model sampling with each by name."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aigc.errors import ConfigError
from aigc.schedulers import SCHEDULERS, get_scheduler
from aigc.schedulers.ddim import DDIMScheduler
from aigc.schedulers.ddpm import DDPMScheduler
from aigc.schedulers.dpmsolver import DPMSolverMultistepScheduler
from aigc.schedulers.euler import EulerScheduler
from aigc.schedulers.heun import HeunScheduler


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


# --- the ODE solvers: euler, heun, dpm++2m -------------------------------------------

ODE_SOLVERS = ("euler", "heun", "dpm++2m")
BETAS = np.linspace(1e-4, 0.02, 1000)  # Ho et al. 2020's linear schedule, the default
LOG_SIGMAS = 0.5 * np.log((1 - np.cumprod(1 - BETAS)) / np.cumprod(1 - BETAS))


def _sigma_at(t: float) -> float:
    """sigma(t) = sqrt((1 - abar_t) / abar_t), log sigma interpolated linearly between the
    training schedule's integer t: written here with numpy, apart from sigmas.py."""
    return math.exp(np.interp(t, np.arange(len(LOG_SIGMAS)), LOG_SIGMAS))


def _exact_network(kind: str, mu: float, sd: float):
    """The exact output of a VP network for data N(mu, sd^2), in parameterisation `kind`,
    at (possibly fractional) time t: eps = E[eps | x_t] (see _exact_eps), x_0 = E[x_0 |
    x_t] = (x_t - sqrt(1 - abar) eps) / sqrt(abar), v = sqrt(abar) eps - sqrt(1 - abar) x_0."""

    def net(x, t):
        a = 1 / (1 + _sigma_at(float(t)) ** 2)
        eps = math.sqrt(1 - a) / (a * sd**2 + 1 - a) * (x - math.sqrt(a) * mu)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        return {
            "epsilon": eps,
            "sample": x0,
            "v_prediction": math.sqrt(a) * eps - math.sqrt(1 - a) * x0,
        }[kind]

    return net


def _sample(s, steps: int, net, z):
    """The generate loop of base.py; returns the sample and the network calls made."""
    s.set_timesteps(steps)
    x, calls = z * s.init_noise_sigma, 0
    for t in s.timesteps:
        x = s.step(net(s.scale_model_input(x, t), t), t, x).prev_sample
        calls += 1
    return x, calls


def _flow_endpoint(z, mu: float, sd: float):
    """Where the probability-flow ODE takes each start: every solver starts at the VP
    sample z at t = T - 1 (euler and heun from the VE z sqrt(sigma_max^2 + 1), the same
    point), and for Gaussian data the flow keeps u = (x_t - sqrt(abar) mu) / sqrt(abar sd^2
    + 1 - abar) fixed, so x_0 = mu + sd u with u from abar_{T-1}."""
    a = float(np.cumprod(1 - BETAS)[-1])
    return mu + sd * (z - math.sqrt(a) * mu) / math.sqrt(a * sd**2 + 1 - a)


def _flow_error(name: str, kind: str, steps: int, **settings) -> float:
    mu, sd = 0.5, 0.5
    z = torch.linspace(-3, 3, 25, dtype=torch.float64)  # starting points, per sample
    s = get_scheduler(name)(prediction_type=kind, **settings)
    x, _ = _sample(s, steps, _exact_network(kind, mu, sd), z)
    return float((x - _flow_endpoint(z, mu, sd)).abs().max())


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize(
    ("name", "steps", "order", "tol"),
    [("euler", (20, 40, 80), 1, 0.07), ("heun", (20, 40, 80), 2, 5e-3),
     ("dpm++2m", (40, 80, 160), 2, 1e-2)],
)  # fmt: skip
def test_ode_solvers_follow_the_exact_flow_at_their_order(name, steps, order, tol, kind):
    """Gaussian data, the exact network in each parameterisation: each sample lands on the
    exact flow's endpoint, its error shrinking at the method's order (the log-log slope
    of the error against the steps: 1 for Euler, 2 for Heun and DPM-Solver++(2M)). The
    remaining floor, sd u sigma_min^2 / (2 sd^2) ~ 3e-4 from the last step's D(x;
    sigma(0)), is below these errors."""
    # DPM-Solver++ on its uniform-t grid: on Karras sigmas it meets the floor too soon
    settings = {"sigma_spacing": "uniform-t"} if name == "dpm++2m" else {}
    errors = [_flow_error(name, kind, n, **settings) for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.25, (errors, slope)
    assert errors[-1] < tol


def test_second_order_solvers_beat_euler_at_equal_steps():
    """On the same Karras spacing and number of steps (Heun spends 2n - 1 evaluations),
    Heun and DPM-Solver++(2M) land five times closer or better than Euler."""
    for n in (40, 80):
        euler = _flow_error("euler", "epsilon", n)
        for name in ("heun", "dpm++2m"):
            assert _flow_error(name, "epsilon", n, sigma_spacing="karras") < euler / 5


def test_karras_sigmas_are_eq_5():
    """sigma_i = (sigma_max^(1/7) + i/(n-1) (sigma_min^(1/7) - sigma_max^(1/7)))^7, sigma_n
    = 0 (Karras et al. 2022, eq. 5), between sigma(0) and sigma(T - 1) of the training
    schedule; uniform-t: sigma at t evenly spaced from T - 1 to 0."""
    s_min, s_max = math.exp(LOG_SIGMAS[0]), math.exp(LOG_SIGMAS[-1])
    n = 12
    i = np.arange(n)
    want = (s_max ** (1 / 7) + i / (n - 1) * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
    for name in ODE_SOLVERS:
        s = get_scheduler(name)(sigma_spacing="karras")
        s.set_timesteps(n)
        np.testing.assert_allclose(s.sigmas.numpy(), np.append(want, 0.0), rtol=1e-12)
        s = get_scheduler(name)(sigma_spacing="uniform-t")
        s.set_timesteps(n)
        uniform = [_sigma_at(t) for t in np.linspace(999, 0, n)]
        np.testing.assert_allclose(s.sigmas.numpy(), np.append(uniform, 0.0), rtol=1e-10)
    e = EulerScheduler()
    e.set_timesteps(1)  # one level: sigma_max, then 0
    np.testing.assert_allclose(e.sigmas.numpy(), [s_max, 0.0], rtol=1e-12)
    assert e.init_noise_sigma == pytest.approx(math.sqrt(s_max**2 + 1), rel=1e-12)


def test_time_of_sigma_inverts_the_schedule():
    s = EulerScheduler()
    t = torch.arange(1000, dtype=torch.float64)
    train = torch.from_numpy(np.exp(LOG_SIGMAS))
    torch.testing.assert_close(s.sigma_of_t(t), train, rtol=1e-12, atol=0)
    torch.testing.assert_close(s.t_of_sigma(train), t, rtol=0, atol=1e-9)
    frac = torch.tensor([0.25, 3.5, 417.3, 998.9], dtype=torch.float64)  # log-linear between
    torch.testing.assert_close(
        s.sigma_of_t(frac), torch.tensor([_sigma_at(x) for x in frac], dtype=torch.float64)
    )
    torch.testing.assert_close(s.t_of_sigma(s.sigma_of_t(frac)), frac)
    # the network times of the levels visited are t(sigma_i)
    s.set_timesteps(7)
    got = [_sigma_at(float(t)) for t in s.timesteps]
    np.testing.assert_allclose(got, s.sigmas[:-1].numpy(), rtol=1e-5)


def test_heun_layout_and_evaluations():
    """n intervals: timesteps t0, t1, t1, ..., t_{n-1}, t_{n-1}, 2n - 1 network evaluations."""
    s = HeunScheduler()
    e = EulerScheduler()
    for n in (1, 2, 5):
        s.set_timesteps(n)
        e.set_timesteps(n)  # the same levels, each once
        t = e.timesteps
        want = torch.cat([t[:1], t[1:].repeat_interleave(2)])
        assert torch.equal(s.timesteps, want) and len(s.timesteps) == 2 * n - 1
        _, calls = _sample(s, n, _exact_network("epsilon", 0.0, 1.0), torch.zeros(3))
        assert calls == 2 * n - 1
    with pytest.raises(ValueError, match="next to visit"):  # a step out of turn
        s.set_timesteps(3)
        s.step(torch.zeros(2), s.timesteps[1], torch.zeros(2))


@pytest.mark.parametrize("name", ODE_SOLVERS)
def test_set_timesteps_starts_over(name):
    """A loop abandoned halfway (Heun between predictor and corrector, DPM++ with a
    buffered x_0) leaves nothing behind: set_timesteps again samples as a fresh one."""
    net = _exact_network("epsilon", 0.3, 0.6)
    z = torch.linspace(-2, 2, 9, dtype=torch.float64)
    fresh, _ = _sample(get_scheduler(name)(), 6, net, z)
    s = get_scheduler(name)()
    s.set_timesteps(9)
    x = z * s.init_noise_sigma
    for t in s.timesteps[:3]:
        x = s.step(net(s.scale_model_input(x, t), t), t, x).prev_sample
    again, _ = _sample(s, 6, net, z)
    assert torch.equal(again, fresh)
    with pytest.raises(ValueError, match="set_timesteps"):  # the loop is over
        s.step(torch.zeros(9), s.timesteps[-1], z)


def test_dpm_solver_steps_are_lu_et_al_algorithm_2():
    """DPM-Solver++(2M) against its formulas written in abar: the first step (Algorithm 2
    line 4) is DDIM with eta = 0 (Song et al. 2021, eq. 12); the next ones use
    D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}, r = h_{i-1} / h_i (lines 7-9); the final one,
    from t = 0, returns x0 itself. The network's output here is arbitrary noise."""
    s = DPMSolverMultistepScheduler(sigma_spacing="uniform-t")
    s.set_timesteps(21)  # uniform-t: 999, 949.05, ..., 0
    ts = np.linspace(999, 0, 21)
    np.testing.assert_allclose(s.timesteps.numpy(), ts, rtol=1e-6)
    abar = [1 / (1 + _sigma_at(t) ** 2) for t in ts] + [1.0]
    lam = [0.5 * math.log(a / (1 - a)) for a in abar[:-1]]  # log(alpha_t / sigma_t)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, dtype=torch.float64, generator=g)
    x0_prev = None
    for k, t in enumerate(s.timesteps):
        eps = torch.randn(6, dtype=torch.float64, generator=g)
        a, a_next = abar[k], abar[k + 1]
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        if k == len(ts) - 1:
            want = x0
        elif k == 0:
            want = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps  # DDIM
        else:
            h, h_prev = lam[k + 1] - lam[k], lam[k] - lam[k - 1]
            D = (1 + h / (2 * h_prev)) * x0 - h / (2 * h_prev) * x0_prev
            want = (math.sqrt((1 - a_next) / (1 - a)) * x
                    - math.sqrt(a_next) * (math.exp(-h) - 1) * D)  # fmt: skip
        out = s.step(eps, t, x)
        torch.testing.assert_close(out.prev_sample, want, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out.pred_original_sample, x0, rtol=1e-9, atol=1e-9)
        x, x0_prev = want, x0


def test_dpm_solver_lower_order_final():
    """With at most 15 timesteps the last step into t = 0 is first order (DDIM) unless
    lower_order_final is off; with more it is second order either way."""

    def last_finite_step(n: int, lower: bool):
        s = DPMSolverMultistepScheduler(sigma_spacing="uniform-t", lower_order_final=lower)
        s.set_timesteps(n)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4, dtype=torch.float64, generator=g)
        for t in s.timesteps[:-1]:
            eps = torch.randn(4, dtype=torch.float64, generator=g)
            x_before, x = x, s.step(eps, t, x).prev_sample
        a, a_next = 1 / (1 + float(s.sigmas[-3]) ** 2), 1 / (1 + float(s.sigmas[-2]) ** 2)
        x0 = (x_before - math.sqrt(1 - a) * eps) / math.sqrt(a)
        ddim = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
        return torch.allclose(x, ddim, rtol=1e-9, atol=1e-9)

    assert last_finite_step(15, True) and not last_finite_step(15, False)
    assert not last_finite_step(16, True) and not last_finite_step(16, False)


@pytest.mark.parametrize("name", ODE_SOLVERS)
def test_add_noise_is_in_the_schedulers_own_units(name):
    """add_noise at a timestep gives the sample `step` expects there: the noise fed back
    as the network's eps output gives back x_0 exactly."""
    s = get_scheduler(name)()
    s.set_timesteps(8)
    x0 = torch.randn(4, 3, dtype=torch.float64)
    noise = torch.randn_like(x0)
    x = s.add_noise(x0, noise, s.timesteps[:1].expand(4))
    sigma = float(s.sigmas[0])
    if name == "dpm++2m":  # VP at abar = 1 / (1 + sigma^2)
        torch.testing.assert_close(x, (x0 + sigma * noise) / math.sqrt(1 + sigma**2))
    else:  # VE
        torch.testing.assert_close(x, x0 + sigma * noise)
    t = s.timesteps[0]
    s.scale_model_input(x, t)
    torch.testing.assert_close(s.step(noise, t, x).pred_original_sample, x0)
    # at integer times the VP form is DDPM's closed form
    ddpm = DDPMScheduler()
    ts = torch.tensor([0, 250, 999])
    torch.testing.assert_close(
        DPMSolverMultistepScheduler().add_noise(x0[:3], noise[:3], ts),
        ddpm.add_noise(x0[:3], noise[:3], ts),
    )


@pytest.mark.parametrize(
    ("name", "settings"),
    [("euler", {"sigma_spacing": "uniform-t", "prediction_type": "v_prediction"}),
     ("heun", {"rho": 5.0, "beta_schedule": "cosine", "clip_sample": True}),
     ("dpm++2m", {"sigma_spacing": "karras", "lower_order_final": False,
                  "prediction_type": "sample", "num_train_timesteps": 500})],
)  # fmt: skip
def test_ode_solver_configs_round_trip(name, settings):
    cls = get_scheduler(name)
    assert SCHEDULERS[name].endswith(cls.__name__)
    s = cls(**settings)
    twin = cls.from_config(s.to_config())
    assert twin.to_config() == s.to_config() and s.to_config().items() >= settings.items()
    net = _exact_network("epsilon", 0.2, 0.4)  # a stand-in: any fixed function will do
    z = torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_sample(s, 7, net, z)[0], _sample(twin, 7, net, z)[0])
    with pytest.raises(ConfigError, match="churn"):
        cls.from_config({**s.to_config(), "churn": 1.0})


def test_ode_solver_names_and_bad_settings():
    assert get_scheduler("euler") is EulerScheduler
    assert get_scheduler("heun") is HeunScheduler
    assert get_scheduler("dpm++2m") is DPMSolverMultistepScheduler
    with pytest.raises(ConfigError, match="did you mean 'dpm\\+\\+2m'"):
        get_scheduler("dpm++2")
    with pytest.raises(ConfigError, match="did you mean 'heun'"):
        get_scheduler("huen")
    for name in ODE_SOLVERS:
        s = get_scheduler(name)(num_train_timesteps=100)
        for bad in (0, 101, 2.5, True):
            with pytest.raises(ValueError, match="num_inference_steps"):
                s.set_timesteps(bad)
    with pytest.raises(ValueError, match="sigma_spacing"):
        EulerScheduler(sigma_spacing="exponential")
    with pytest.raises(ValueError, match="rho"):
        HeunScheduler(rho=0)
    with pytest.raises(ValueError, match="lower_order_final"):
        DPMSolverMultistepScheduler(lower_order_final="yes")


@pytest.mark.parametrize("name", ODE_SOLVERS)
def test_the_diffusion_model_samples_with_each_solver(name):
    from aigc.models.diffusion import Diffusion, DiffusionConfig

    torch.manual_seed(0)
    cfg = DiffusionConfig(image_size=16, channels=3, width=8, channel_mults=[1],
                          num_res_blocks=1, attn_resolutions=[], groups=4)  # fmt: skip
    model = Diffusion(cfg)
    with torch.no_grad():  # the U-Net starts at zero output; give it some
        model.unet.out[-1].weight.normal_(0, 0.1)
    z = torch.randn(2, cfg.z_dim, generator=torch.Generator().manual_seed(1))
    images = model.generate(z, scheduler=name, steps=3)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert images.abs().max() <= 1.0 and images.std() > 0
