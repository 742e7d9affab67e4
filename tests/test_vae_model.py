"""The VAE family: shapes, config checks, the likelihoods and KL against independent
computations, the step contract and beta warm-up, a short real training, the IWAE
bound, active units and latent helpers. Tiny sizes, CPU, seconds."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from aigc.errors import ConfigError
from aigc.models.vae import (
    VAE,
    VAEConfig,
    active_units,
    discretized_logistic_log_prob,
    gaussian_kl,
)

TINY = dict(z_dim=4, width=4, hidden=[32, 16], embed_dim=3)


def tiny(**kw) -> VAEConfig:
    return VAEConfig(**{**TINY, **kw})


def images(n: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    """8-bit images mapped to [-1, 1], as the data readers deliver them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), generator=g).float() / 127.5 - 1


def labels_for(vae: VAE, n: int, seed: int = 0) -> torch.Tensor | None:
    return vae.random_labels(n, torch.Generator().manual_seed(seed)) if vae.num_classes else None


class Step:
    """Stands in for the trainer's Step: an index, and one optimizer per group (or none)."""

    def __init__(self, vae: VAE, index: int = 0, lr: float | None = None):
        self.index = index
        self.calls: list[str] = []
        self.params = vae.param_groups()["model"]["params"]
        self.opt = torch.optim.Adam(self.params, lr=lr) if lr else None

    def update(self, group: str, loss: torch.Tensor) -> None:
        self.calls.append(group)
        torch.autograd.backward(loss, inputs=self.params)
        if self.opt is not None:
            self.opt.step()
        for p in self.params:
            p.grad = None


# ---------------------------------------------------------------------------
# shapes and config


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "discretized_logistic"])
def test_shapes(arch, channels, size, likelihood):
    torch.manual_seed(0)
    vae = VAE(tiny(arch=arch, channels=channels, image_size=size, likelihood=likelihood))
    x = images(2, channels, size)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (2, 4)
    out = vae.generate(vae.sample_z(2))
    assert out.shape == (2, channels, size, size) and out.abs().max() <= 1
    assert vae.reconstruct(x).shape == x.shape
    terms = vae.elbo_terms(x)
    assert all(terms[k].shape == (2,) for k in ("recon", "kl", "nelbo"))
    assert terms["kl_dims"].shape == terms["mu"].shape == (2, 4)
    assert all(torch.isfinite(v).all() for v in terms.values())


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_labels_change_the_decoder_output(arch):
    torch.manual_seed(0)
    vae = VAE(tiny(arch=arch, image_size=16, conditional=True, num_classes=[3, 5]))
    z, y = vae.sample_z(4), labels_for(vae, 4)
    other = (y + 1) % torch.tensor(vae.num_classes)
    assert not torch.allclose(vae.generate(z, y), vae.generate(z, other))
    x = images(4, 1, 16)
    assert not torch.allclose(vae.encode(x, y)[0], vae.encode(x, other)[0])
    with pytest.raises(ValueError, match="conditional"):
        vae.generate(z)


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(z_dim=0), "model.z_dim"),
        (dict(beta=-1.0), "model.beta"),
        (dict(arch="conv", image_size=48), "model.image_size"),
        (dict(conditional=True, num_classes=[1]), "model.num_classes[0]"),
        (dict(num_classes=[3]), "model.num_classes"),
        (dict(likelihood="poisson"), "model.likelihood"),
        (dict(gaussian_std=-0.1), "model.gaussian_std"),
        (dict(kl_warmup_steps=-1), "model.kl_warmup_steps"),
        (dict(hidden=[8, 0]), "model.hidden[1]"),
    ],
)
def test_validate_names_the_bad_key(kw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        tiny(**kw).validate()


def test_check_ready_and_mlp_accepts_any_size():
    tiny(arch="mlp", image_size=48).validate()
    with pytest.raises(ConfigError, match=r"model\.channels=0"):
        VAE(tiny(channels=0))
    with pytest.raises(ConfigError, match=r"num_classes is empty"):
        VAE(tiny(conditional=True))


# ---------------------------------------------------------------------------
# KL and likelihoods against independent computations


def test_closed_form_kl_matches_torch_and_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    q = Normal(mu.double(), (0.5 * logvar.double()).exp())
    ref = kl_divergence(q, Normal(0.0, 1.0))
    assert torch.allclose(gaussian_kl(mu, logvar).double(), ref, atol=1e-5)
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - Normal(0.0, 1.0).log_prob(z)).mean(0)
    assert torch.allclose(gaussian_kl(mu, logvar).double(), mc, atol=0.05)


@pytest.mark.parametrize("mean, log_scale", [(0.0, -3.0), (0.9, -1.0), (-0.3, 0.5), (1.5, -6.0)])
def test_discretized_logistic_bins_sum_to_one(mean, log_scale):
    x = torch.arange(256).float() / 127.5 - 1
    logp = discretized_logistic_log_prob(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
    assert torch.isfinite(logp).all()
    assert abs(logp.double().exp().sum().item() - 1) < 1e-5


def test_discretized_logistic_matches_the_sigmoid_cdf():
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([0, 1, 17, 128, 200, 254, 255], dtype=torch.float64)
    x = p / 127.5 - 1
    mean = torch.rand(7, generator=g, dtype=torch.float64) * 2 - 1
    log_scale = torch.rand(7, generator=g, dtype=torch.float64) * 3 - 4
    s = log_scale.exp()
    cdf_hi = torch.where(p == 255, torch.ones_like(x), torch.sigmoid((x + 1 / 255 - mean) / s))
    cdf_lo = torch.where(p == 0, torch.zeros_like(x), torch.sigmoid((x - 1 / 255 - mean) / s))
    ref = torch.log(cdf_hi - cdf_lo)
    got = discretized_logistic_log_prob(x.float(), mean.float(), log_scale.float()).double()
    assert torch.allclose(got, ref, atol=1e-4)


def test_likelihoods_against_torch_distributions():
    torch.manual_seed(0)
    x = images(2, 1, 16)
    vae = VAE(tiny(image_size=16, likelihood="gaussian", gaussian_std=0.2))
    mean = torch.randn(2, 1, 16, 16)
    ref = Normal(mean, 0.2).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(vae.log_likelihood(x, mean, None), ref, atol=1e-3)
    vae = VAE(tiny(image_size=16, likelihood="bernoulli"))
    xb = (x > 0).float() * 2 - 1
    ref = torch.distributions.Bernoulli(logits=mean).log_prob((xb + 1) / 2).flatten(1).sum(1)
    assert torch.allclose(vae.log_likelihood(xb, mean, None), ref, atol=1e-3)


# ---------------------------------------------------------------------------
# the step contract, beta and warm-up


def test_training_step_updates_once_and_returns_detached_stats():
    torch.manual_seed(0)
    vae = VAE(tiny(image_size=16, conditional=True, num_classes=[2, 3]))
    step = Step(vae)
    out = vae.training_step({"images": images(4, 1, 16), "labels": labels_for(vae, 4)}, step)
    assert step.calls == ["model"]
    per_dim = {f"kl_dim/{u}" for u in range(4)}
    assert set(out) == {"loss", "elbo", "recon", "kl", "beta", "bpd"} | per_dim
    assert torch.allclose(sum(out[k] for k in per_dim), out["kl"])
    for k, v in out.items():
        assert v.dim() == 0 and not v.requires_grad and torch.isfinite(v), k
    assert torch.allclose(out["elbo"], out["recon"] + out["kl"])
    assert torch.allclose(out["bpd"], out["elbo"] / (256 * math.log(2)))
    assert len(vae.param_groups()["model"]["params"]) == len(list(vae.parameters()))


def test_kl_warmup_and_beta_zero():
    torch.manual_seed(0)
    vae = VAE(tiny(arch="mlp", image_size=8, beta=4.0, kl_warmup_steps=10))
    x = images(4, 1, 8)
    betas = {
        i: vae.training_step({"images": x}, Step(vae, index=i))["beta"].item()
        for i in (0, 5, 10, 50)
    }
    assert betas == {0: 0.0, 5: 2.0, 10: 4.0, 50: 4.0}
    out = vae.training_step({"images": x}, Step(vae, index=0))
    assert torch.equal(out["loss"], out["recon"]) and out["kl"] > 0
    vae = VAE(tiny(arch="mlp", image_size=8, beta=0.0))
    out = vae.training_step({"images": x}, Step(vae, index=100))
    assert torch.equal(out["loss"], out["recon"])
    vae = VAE(tiny(arch="mlp", image_size=8, beta=2.0))
    out = vae.training_step({"images": x}, Step(vae, index=0))
    assert torch.allclose(out["loss"], out["recon"] + 2 * out["kl"])


# ---------------------------------------------------------------------------
# real training and the IWAE bound


def binary_blobs(n: int, seed: int = 0) -> torch.Tensor:
    """n 8x8 binary images: one of four fixed templates with 5% of pixels flipped."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(4, 1, 8, 8, generator=g) > 0.5
    pick = torch.randint(0, 4, (n,), generator=g)
    flip = torch.rand(n, 1, 8, 8, generator=g) < 0.05
    return (templates[pick] ^ flip).float() * 2 - 1


@pytest.fixture(scope="module")
def trained():
    """A tiny mlp VAE trained with plain Adam for 150 steps, and its first/last nelbo."""
    torch.manual_seed(0)
    data = binary_blobs(64)
    vae = VAE(tiny(arch="mlp", image_size=8, z_dim=4, hidden=[64], likelihood="bernoulli"))
    step = Step(vae, lr=3e-3)
    history = []
    for i in range(150):
        step.index = i
        history.append(vae.training_step({"images": data}, step)["elbo"].item())
    return vae, data, history


def test_training_lowers_the_negative_elbo(trained):
    _, _, history = trained
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last < 0.7 * first, (first, last)


def test_iwae_bound_is_tighter_than_the_elbo(trained):
    vae, data, _ = trained
    torch.manual_seed(1)
    with torch.no_grad():
        nelbo = torch.stack([vae.elbo_terms(data)["nelbo"] for _ in range(20)]).mean(0)
    iwae1 = torch.stack([vae.iwae_nll(data, k=1) for _ in range(20)]).mean(0)
    iwae50 = vae.iwae_nll(data, k=50, max_batch=7 * 64)  # passes of 7 samples do not divide k
    iwae500 = vae.iwae_nll(data, k=500, max_batch=100 * 64)
    assert iwae50.shape == (64,) and iwae50.dtype == torch.float64
    assert abs(iwae1.mean().item() - nelbo.double().mean().item()) < 0.05 * nelbo.mean().item()
    assert iwae50.mean() <= nelbo.double().mean() + 0.1
    assert iwae50.mean() < nelbo.double().mean() - 0.05  # strictly tighter on a trained model
    assert iwae500.mean() <= iwae50.mean() + 0.1


def test_iwae_with_labels_runs():
    torch.manual_seed(0)
    vae = VAE(tiny(image_size=16, conditional=True, num_classes=[3]))
    x, y = images(3, 1, 16), labels_for(vae, 3)
    out = vae.iwae_nll(x, y, k=5, max_batch=6)
    assert out.shape == (3,) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------
# analysis and latent helpers


def test_active_units_counts_varying_posterior_means():
    g = torch.Generator().manual_seed(0)
    mus = torch.zeros(500, 6)
    mus[:, 0] = torch.randn(500, generator=g)  # variance ~1: active
    mus[:, 3] = 0.5 * torch.randn(500, generator=g)  # variance ~0.25: active
    mus[:, 4] = 0.01 * torch.randn(500, generator=g)  # variance ~1e-4: inactive
    mus[:, 5] = 7.0  # constant offset: inactive
    assert active_units(mus) == 2
    assert active_units(mus, threshold=1e-5) == 3


def test_traverse_and_interpolate():
    vae = VAE(tiny(arch="mlp", image_size=8))
    z = torch.randn(4)
    values = torch.tensor([-2.0, 0.0, 2.0])
    grid = vae.traverse(z, values, [1, 3])
    assert grid.shape == (6, 4)
    assert torch.equal(grid[:3, 1], values) and torch.equal(grid[3:, 3], values)
    assert torch.equal(grid[:3, [0, 2, 3]], z[[0, 2, 3]].expand(3, -1))
    assert torch.equal(grid[3:, :3], z[:3].expand(3, -1))
    z1 = torch.randn(4)
    path = vae.interpolate(z, z1, 5)
    assert path.shape == (5, 4)
    assert torch.allclose(path[0], z, atol=1e-6) and torch.allclose(path[-1], z1, atol=1e-6)
    assert vae.generate(path).shape == (5, 1, 8, 8)


def test_conv_discretized_logistic_training_lowers_bpd():
    """The default path (conv, discretized logistic) learns: bits per dimension fall."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 255, 16).round()  # a smooth 8-bit gradient, shifted per image
    shift = torch.randint(-40, 40, (32, 1, 1, 1), generator=g)
    data = ((ramp.view(1, 1, 1, 16) + shift).clamp(0, 255) / 127.5 - 1).expand(-1, -1, 16, -1)
    vae = VAE(tiny(arch="conv", image_size=16, width=8))
    step = Step(vae, lr=3e-3)
    history = []
    for i in range(60):
        step.index = i
        history.append(vae.training_step({"images": data}, step)["bpd"].item())
    assert history[-1] < 0.7 * history[0], (history[0], history[-1])
    # per-image terms do not depend on the rest of the batch (no batch norm)
    torch.manual_seed(2)
    full = vae.elbo_terms(data[:4])["kl"]
    assert torch.allclose(full[:2], vae.elbo_terms(data[:2])["kl"], atol=1e-5)
