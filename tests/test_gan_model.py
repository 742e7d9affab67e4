"""The GAN family: shapes, config checks, losses against hand computations, the step
contract, a short real training, and latent interpolation. Tiny sizes, CPU, seconds."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from aigc.config import Config, TrainConfig
from aigc.errors import ConfigError
from aigc.models.gan import GAN, GANConfig
from aigc.models.layers import slerp
from aigc.runs import RunDir
from aigc.tasks.gan import GANTask
from aigc.trainer import DistInfo, Trainer

TINY = dict(z_dim=8, g_width=4, d_width=4, hidden=[16, 32], embed_dim=4)


def tiny(**kw) -> GANConfig:
    return GANConfig(**{**TINY, **kw})


def images(n: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g) * 2 - 1


def labels_for(gan: GAN, n: int, seed: int = 0) -> torch.Tensor | None:
    return gan.random_labels(n, torch.Generator().manual_seed(seed)) if gan.num_classes else None


def is_batchnorm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


# ---------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize(
    "arch,size,channels",
    [("mlp", 32, 1), ("mlp", 32, 3), ("dcgan", 16, 1), ("dcgan", 32, 1), ("dcgan", 64, 3)],
)
def test_generator_and_discriminator_shapes(arch, size, channels):
    torch.manual_seed(0)
    gan = GAN(tiny(arch=arch, image_size=size, channels=channels))
    x = gan.G(gan.sample_z(5))
    assert x.shape == (5, channels, size, size)
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0
    assert gan.D(x).shape == (5,)
    assert gan.generate(gan.sample_z(3)).shape == (3, channels, size, size)


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
@pytest.mark.parametrize("loss", ["bce", "hinge", "wgan-gp"])
@pytest.mark.parametrize("cond_d", [None, "concat", "projection"])
def test_discriminator_scores_one_per_image_in_every_variant(arch, loss, cond_d):
    torch.manual_seed(0)
    cond = dict(conditional=True, num_classes=[3, 5], cond_d=cond_d) if cond_d else {}
    gan = GAN(tiny(arch=arch, image_size=16, channels=3, loss=loss, **cond))
    y = labels_for(gan, 4)
    scores = gan.D(images(4, 3, 16), y)
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    d, d_stats = gan.d_loss(images(4, 3, 16), y)
    g, _ = gan.g_loss(4, y)
    assert d.dim() == 0 and g.dim() == 0 and torch.isfinite(d) and torch.isfinite(g)
    assert ("gp" in d_stats) == (loss == "wgan-gp")
    if cond_d:  # D reads the labels
        other = (y + 1) % torch.tensor(gan.num_classes)
        assert not torch.allclose(scores, gan.D(images(4, 3, 16), other))


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
def test_each_label_attribute_changes_the_generator_output(arch):
    torch.manual_seed(0)
    gan = GAN(tiny(arch=arch, image_size=16, conditional=True, num_classes=[3, 6, 2]))
    z = gan.sample_z(1).expand(3, -1)
    base = torch.tensor([[0, 0, 0], [0, 0, 0], [0, 0, 0]])
    changed = base.clone()
    changed[0, 0], changed[1, 1], changed[2, 2] = 2, 5, 1  # one attribute per row
    a, b = gan.generate(z, base), gan.generate(z, changed)
    assert torch.equal(a[0], a[1])  # same z, same labels: same image
    scale = a.abs().max()  # an untrained DCGAN in eval mode outputs values near 0
    for row in range(3):
        assert (a[row] - b[row]).abs().max() > 0.1 * scale, f"attribute {row} is ignored"
    with pytest.raises(ValueError, match="conditional"):
        gan.generate(z)
    with pytest.raises(ValueError, match="attribute 1"):
        gan.generate(z, torch.tensor([[0, 6, 0]] * 3))


# ---------------------------------------------------------------------------
# config checks


@pytest.mark.parametrize(
    "kw,key",
    [
        (dict(arch="dcgan", image_size=48), "model.image_size"),
        (dict(arch="dcgan", image_size=8), "model.image_size"),
        (dict(z_dim=0), "model.z_dim"),
        (dict(z_dim=True), "model.z_dim"),
        (dict(n_critic=0), "model.n_critic"),
        (dict(conditional=True, num_classes=[10, 1]), "model.num_classes[1]"),
        (dict(num_classes=[10]), "model.num_classes"),  # given, but conditional is false
        (dict(d_dropout=1.0), "model.d_dropout"),
        (dict(d_dropout=-0.1), "model.d_dropout"),
        (dict(hidden=[16, 0]), "model.hidden[1]"),
        (dict(gp_weight=-1.0), "model.gp_weight"),
        (dict(loss="wgan"), "model.loss"),
        (dict(cond_d="sum"), "model.cond_d"),
        (dict(embed_dim=0), "model.embed_dim"),
    ],
)
def test_validate_names_the_bad_key(kw, key):
    with pytest.raises(ConfigError) as e:
        tiny(**kw).validate()
    assert key in str(e.value)


def test_valid_configs_and_values_set_later_from_data():
    tiny(arch="mlp", image_size=48).validate()  # mlp takes any size
    tiny(arch="dcgan", image_size=128).validate()
    tiny(image_size=0, channels=0, conditional=True).validate()  # the caller fills them in
    with pytest.raises(ConfigError, match=r"model\.image_size=0"):
        GAN(tiny(image_size=0))
    with pytest.raises(ConfigError, match=r"model\.channels=0"):
        GAN(tiny(channels=0))
    with pytest.raises(ConfigError, match=r"model\.num_classes is empty"):
        GAN(tiny(conditional=True))


# ---------------------------------------------------------------------------
# architecture details


def test_wgan_gp_critic_has_no_batchnorm_and_dcgan_has_it_after_the_first_layer():
    critic = GAN(tiny(arch="dcgan", image_size=32, loss="wgan-gp")).D
    assert not any(is_batchnorm(m) for m in critic.modules())
    dcgan = GAN(tiny(arch="dcgan", image_size=32, loss="bce"))
    assert sum(is_batchnorm(m) for m in dcgan.D.modules()) == 2  # 32 -> 16 -> 8 -> 4
    assert isinstance(dcgan.D.features[0], nn.Conv2d)
    assert isinstance(dcgan.D.features[1], nn.LeakyReLU)  # no norm on the first layer
    assert any(is_batchnorm(m) for m in dcgan.G.modules())
    # DCGAN initialisation: N(0, 0.02)
    w = dcgan.D.features[2].weight
    assert abs(float(w.detach().std()) - 0.02) < 0.003 and abs(float(w.detach().mean())) < 0.003


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
def test_spectral_norm_on_every_discriminator_weight(arch):
    torch.manual_seed(0)
    cfg = tiny(arch=arch, image_size=16, conditional=True, num_classes=[3], spectral_norm=True)
    gan = GAN(cfg)
    layers = [m for m in gan.D.modules() if isinstance(m, nn.Conv2d | nn.Linear | nn.Embedding)]
    assert len(layers) >= 3
    assert all(parametrize.is_parametrized(m, "weight") for m in layers)
    assert not any(parametrize.is_parametrized(m) for m in gan.G.modules())
    assert not any(
        parametrize.is_parametrized(m) for m in GAN(tiny(arch=arch, image_size=16)).D.modules()
    )
    # power iteration runs once per training forward; the largest singular value -> 1
    x, y = images(4, 1, 16), gan.random_labels(4)
    for _ in range(60):
        gan.D(x, y)
    for m in layers:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert abs(float(sigma) - 1) < 0.05, f"{m}: sigma {float(sigma):.3f}"


# ---------------------------------------------------------------------------
# losses against independent computations


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
@pytest.mark.parametrize("loss", ["bce", "hinge"])
def test_losses_match_hand_computation(arch, loss):
    torch.manual_seed(0)
    cfg = tiny(arch=arch, image_size=16, loss=loss, d_dropout=0.0)
    cfg.conditional, cfg.num_classes = True, [3, 4]
    gan = GAN(cfg)
    real, y = images(6, 1, 16), labels_for(gan, 6)
    fake = gan.G(gan.sample_z(6), y).detach()

    got, stats = gan.d_loss(real, y, fake)
    s_real, s_fake = gan.D(real, y), gan.D(fake, y)
    if loss == "bce":
        want = (
            -torch.log(torch.sigmoid(s_real)).mean() - torch.log(1 - torch.sigmoid(s_fake)).mean()
        )
        assert torch.allclose(stats["d_real"], torch.sigmoid(s_real).mean())
        assert torch.allclose(stats["d_fake"], torch.sigmoid(s_fake).mean())
    else:
        want = torch.clamp(1 - s_real, min=0).mean() + torch.clamp(1 + s_fake, min=0).mean()
        assert torch.allclose(stats["d_real"], s_real.mean())
    assert torch.allclose(got, want, atol=1e-6)
    assert stats["d_acc_real"] == (s_real > 0).float().mean()
    assert stats["d_acc_fake"] == (s_fake < 0).float().mean()

    # without `fake`, D sees G's output on fresh noise from the global RNG
    torch.manual_seed(7)
    got, _ = gan.d_loss(real, y)
    torch.manual_seed(7)
    fake = gan.G(gan.sample_z(6), y)
    s_fake = gan.D(fake, y)
    if loss == "bce":
        want = (
            -torch.log(torch.sigmoid(s_real)).mean() - torch.log(1 - torch.sigmoid(s_fake)).mean()
        )
    else:
        want = torch.clamp(1 - s_real, min=0).mean() + torch.clamp(1 + s_fake, min=0).mean()
    assert torch.allclose(got, want, atol=1e-6)

    # generator: non-saturating -log D(G(z)) for bce, -D(G(z)) for hinge
    torch.manual_seed(8)
    got, stats = gan.g_loss(6, y)
    torch.manual_seed(8)
    s_fake = gan.D(gan.G(gan.sample_z(6), y), y)
    want = -torch.log(torch.sigmoid(s_fake)).mean() if loss == "bce" else -s_fake.mean()
    assert torch.allclose(got, want, atol=1e-6) and torch.equal(stats["g_loss"], got.detach())


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
def test_gradient_penalty_matches_autograd_by_hand(arch):
    torch.manual_seed(0)
    cfg = tiny(arch=arch, image_size=16, channels=2, loss="wgan-gp", gp_weight=10.0)
    cfg.conditional, cfg.num_classes, cfg.cond_d, cfg.d_dropout = True, [3], "concat", 0.0
    gan = GAN(cfg)
    real, y = images(5, 2, 16), labels_for(gan, 5)
    fake = gan.G(gan.sample_z(5), y).detach()

    torch.manual_seed(3)
    got, stats = gan.d_loss(real, y, fake)
    torch.manual_seed(3)
    eps = torch.rand(5, 1, 1, 1)  # the one random draw: interpolation weights
    xhat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(gan.D(xhat, y).sum(), xhat)
    gp = ((grad.reshape(5, -1).pow(2).sum(1).sqrt() - 1) ** 2).mean()
    want = gan.D(fake, y).mean() - gan.D(real, y).mean() + 10.0 * gp
    assert torch.allclose(stats["gp"], gp, atol=1e-6)
    assert torch.allclose(got, want, atol=1e-5)

    # a fake passed with its graph is detached: D's loss never reaches G
    got, _ = gan.d_loss(real, y, gan.G(gan.sample_z(5), y))
    reach = torch.autograd.grad(got, list(gan.G.parameters()), allow_unused=True)
    assert all(g is None for g in reach)

    # the penalty is differentiable in D's weights (create_graph), so it trains D
    penalty = gan.gradient_penalty(real, fake, y, eps)
    grads = torch.autograd.grad(penalty, list(gan.D.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_gradient_penalty_vanishes_for_a_unit_gradient_linear_critic():
    # hidden=[]: D(x) = w . flatten(x) + b, whose input gradient is w everywhere
    gan = GAN(tiny(arch="mlp", image_size=4, channels=1, hidden=[], loss="wgan-gp"))
    w = torch.randn(1, 16)
    real, fake = images(8, 1, 4, seed=1), images(8, 1, 4, seed=2)
    with torch.no_grad():
        gan.D.head.weight.copy_(w / w.norm())
    assert float(gan.gradient_penalty(real, fake).detach()) < 1e-10
    with torch.no_grad():
        gan.D.head.weight.copy_(3 * w / w.norm())  # ||grad|| = 3: (3 - 1)^2 = 4
    assert float(gan.gradient_penalty(real, fake).detach()) == pytest.approx(4.0, rel=1e-5)


# ---------------------------------------------------------------------------
# the step contract


class RecordingStep:
    """Stands in for the trainer's Step: records the order of updates and checks that
    each loss reaches only its own group when backpropagated like the trainer does."""

    def __init__(self, gan: GAN):
        self.params = {k: v["params"] for k, v in gan.param_groups().items()}
        self.calls: list[str] = []

    def update(self, group: str, loss: torch.Tensor) -> None:
        self.calls.append(group)
        other = "generator" if group == "discriminator" else "discriminator"
        if group == "discriminator":  # fakes are detached: G is not even in the graph
            reach = torch.autograd.grad(
                loss, self.params[other], retain_graph=True, allow_unused=True
            )
            assert all(g is None for g in reach), "D's loss reaches G's parameters"
        torch.autograd.backward(loss, inputs=self.params[group])
        assert all(p.grad is None for p in self.params[other]), f"{group} update touched {other}"
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in self.params[group])
        for p in self.params[group]:
            p.grad = None


@pytest.mark.parametrize("loss", ["bce", "hinge", "wgan-gp"])
def test_training_step_runs_n_critic_d_updates_then_one_g_update(loss):
    torch.manual_seed(0)
    cfg = tiny(arch="dcgan", image_size=16, loss=loss, n_critic=3)
    cfg.conditional, cfg.num_classes = True, [2, 3]
    gan = GAN(cfg)
    step = RecordingStep(gan)
    y = labels_for(gan, 4)
    out = gan.training_step({"images": images(4, 1, 16), "labels": y}, step)
    assert step.calls == ["discriminator"] * 3 + ["generator"]
    keys = {"d_loss", "g_loss", "d_real", "d_fake", "d_acc_real", "d_acc_fake"}
    assert set(out) == keys | ({"gp"} if loss == "wgan-gp" else set())
    for k, v in out.items():
        assert v.dim() == 0 and not v.requires_grad and torch.isfinite(v), k
    assert set(gan.param_groups()) == {"discriminator", "generator"}
    groups = gan.param_groups()
    betas = (0.0, 0.9) if loss == "wgan-gp" else (0.5, 0.999)
    assert all(g["betas"] == betas and g["weight_decay"] == 0.0 for g in groups.values())
    n = sum(len(g["params"]) for g in groups.values())
    assert n == len(list(gan.parameters()))  # every parameter in exactly one group


class AdamStep:
    """A minimal trainer: one Adam per group, with the family's betas."""

    def __init__(self, gan: GAN, lr: float):
        self.groups = {
            k: (v["params"], torch.optim.Adam(v["params"], lr=lr, betas=v["betas"]))
            for k, v in gan.param_groups().items()
        }

    def update(self, group: str, loss: torch.Tensor) -> None:
        params, opt = self.groups[group]
        torch.autograd.backward(loss, inputs=params)
        opt.step()
        opt.zero_grad(set_to_none=True)


DATA_MEAN = torch.tensor([0.5, -0.4])


def toy_batch(n: int) -> torch.Tensor:
    """A 2-D Gaussian blob, as (n, 2, 1, 1) 'images' of one pixel with two channels."""
    return (DATA_MEAN + 0.1 * torch.randn(n, 2)).clamp(-1, 1).view(n, 2, 1, 1)


def toy_gan(loss: str, n_critic: int = 1) -> GAN:
    cfg = GANConfig(
        arch="mlp", z_dim=4, image_size=1, channels=2, hidden=[32, 32], d_dropout=0.0,
        loss=loss, n_critic=n_critic,
    )  # fmt: skip
    return GAN(cfg)


def fake_mean_error(gan: GAN) -> float:
    z = gan.sample_z(512, torch.Generator().manual_seed(1))
    return float((gan.generate(z).flatten(1).mean(0) - DATA_MEAN).norm())


@pytest.mark.parametrize("loss", ["bce", "hinge"])
def test_short_training_moves_the_generator_to_the_data(loss):
    torch.manual_seed(0)
    gan = toy_gan(loss)
    step = AdamStep(gan, lr=1e-3)
    before = fake_mean_error(gan)
    for _ in range(200):
        gan.training_step({"images": toy_batch(64)}, step)
    after = fake_mean_error(gan)
    assert before > 0.4 and after < 0.3 * before, (before, after)


@pytest.mark.parametrize("loss", ["bce", "hinge", "wgan-gp"])
def test_trained_critic_scores_data_higher_and_pulls_the_generator_to_it(loss):
    # Sign check phase by phase (a full WGAN-GP run oscillates too much for a test):
    # with G frozen, D learns to score the data higher; with D frozen, G moves to it.
    torch.manual_seed(0)
    gan = toy_gan(loss)
    d_params = list(gan.D.parameters())
    opt = torch.optim.Adam(d_params, lr=1e-3, betas=gan.param_groups()["discriminator"]["betas"])
    for _ in range(150):
        d, stats = gan.d_loss(toy_batch(64))
        torch.autograd.backward(d, inputs=d_params)
        opt.step()
        opt.zero_grad(set_to_none=True)
    before = fake_mean_error(gan)
    if loss == "wgan-gp":  # a critic's scores have no meaningful sign, only differences
        # D(x) - D(G(z)) estimates W1, here near the distance between the two blobs
        assert stats["d_real"] - stats["d_fake"] > 0.7 * before and stats["gp"] < 0.1
    else:
        assert stats["d_acc_real"] > 0.9 and stats["d_acc_fake"] > 0.9
    g_params = list(gan.G.parameters())
    opt = torch.optim.Adam(g_params, lr=1e-3)
    for _ in range(20):
        g, _ = gan.g_loss(64)
        torch.autograd.backward(g, inputs=g_params)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert fake_mean_error(gan) < 0.8 * before


class StubGANTask(GANTask):
    """The GAN task with made-up data instead of a run's: what the trainer asks of a
    task (batches, evaluation, samples, the EMA's module) and nothing else."""

    items_per_batch = 4

    def __init__(self, model: GAN):
        self.model = model

    def train_batch(self, step, micro, rank, world):
        g = torch.Generator().manual_seed(step)
        images = torch.rand(4, 1, 16, 16, generator=g) * 2 - 1
        return {"images": images, "labels": torch.randint(3, (4, 1), generator=g)}

    def eval_sums(self, model, rank, world, device):
        return {"n": 1.0}

    def eval_metrics(self, sums):
        return dict(sums)

    def eval_info(self):
        return {}

    def samples(self, model, step, device):
        return {}


def test_real_trainer_drives_the_gan_and_restores_it(tmp_path):
    def build() -> GAN:
        cfg = tiny(arch="dcgan", image_size=16, conditional=True, num_classes=[3])
        cfg.spectral_norm, cfg.loss, cfg.n_critic = True, "hinge", 2
        return GAN(cfg)

    def trainer(model: GAN) -> Trainer:
        train = TrainConfig(max_steps=3, warmup_steps=0, log_every=1, eval_every=0, ema=0.9)
        config = Config(family="gan", data=None, model=model.cfg, train=train)
        run = RunDir(tmp_path / "run")
        if not run.path.exists():
            run.create("gan", "family: gan\n")
        return Trainer(StubGANTask(model), config, run, DistInfo(), torch.device("cpu"), False)

    torch.manual_seed(0)
    gan = build()
    t = trainer(gan)
    assert t.ema.module is gan.G  # GANTask.ema_module
    assert t.groups["discriminator"].optimizer.param_groups[0]["betas"] == (0.5, 0.999)
    g_before = {k: v.clone() for k, v in gan.G.state_dict().items()}
    t.fit()
    rows = [r for r in t.run.read_metrics() if "g_loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"d_loss", "d_real", "d_fake", "grad_norm/generator"} <= set(rows[0])
    assert any(not torch.equal(v, gan.G.state_dict()[k]) for k, v in g_before.items())

    torch.manual_seed(1)
    again = build()
    trainer(again).restore()  # the run folder round-trips, spectral norm state included
    z, y = gan.sample_z(3, torch.Generator().manual_seed(0)), torch.tensor([[0], [1], [2]])
    assert torch.equal(gan.generate(z, y), again.generate(z, y))
    x = images(3, 1, 16)
    assert torch.equal(gan.D.eval()(x, y), again.D.eval()(x, y))


# ---------------------------------------------------------------------------
# sampling


def test_checkpoint_keys_are_stable():
    keys = set(
        GAN(tiny(arch="dcgan", image_size=16, conditional=True, num_classes=[3])).state_dict()
    )
    for k in (
        "G.embed.tables.0.weight", "G.project.weight", "G.project_bn.running_mean",
        "G.net.0.weight", "G.net.3.bias", "D.features.0.weight", "D.features.3.running_var",
        "D.head.weight", "D.embed.tables.0.weight",
    ):  # fmt: skip
        assert k in keys, k
    keys = set(GAN(tiny(arch="mlp", image_size=4)).state_dict())
    assert keys == {
        "G.net.0.weight", "G.net.0.bias", "G.net.2.weight", "G.net.2.bias", "G.net.4.weight",
        "G.net.4.bias", "D.features.0.weight", "D.features.0.bias", "D.features.3.weight",
        "D.features.3.bias", "D.head.weight", "D.head.bias",
    }  # fmt: skip


def test_generate_is_deterministic_in_eval_mode_and_restores_training_mode():
    torch.manual_seed(0)
    gan = GAN(tiny(arch="dcgan", image_size=16))
    gan.train()
    z = gan.sample_z(4, torch.Generator().manual_seed(0))
    assert torch.equal(z, gan.sample_z(4, torch.Generator().manual_seed(0)))
    one = gan.generate(z[:1])
    assert gan.G.training  # put back
    assert torch.allclose(gan.generate(z)[:1], one, atol=1e-6)  # eval BN: batch-independent
    assert not gan.generate(z).requires_grad
    with pytest.raises(ValueError, match="unconditional"):
        gan.generate(z, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="conditional GAN"):
        gan.random_labels(3)


def test_random_labels_cover_each_attribute_in_range():
    gan = GAN(tiny(arch="mlp", image_size=4, conditional=True, num_classes=[3, 6, 2, 9]))
    y = gan.random_labels(500, torch.Generator().manual_seed(0))
    assert y.shape == (500, 4) and y.dtype == torch.int64
    for a, n in enumerate([3, 6, 2, 9]):
        assert set(y[:, a].tolist()) == set(range(n))
    assert torch.equal(y, gan.random_labels(500, torch.Generator().manual_seed(0)))


def test_interpolate_is_spherical():
    gan = GAN(tiny(arch="mlp", image_size=4, z_dim=128))
    z0, z1 = gan.sample_z(2, torch.Generator().manual_seed(0))
    path = gan.interpolate(z0, z1, 9)
    assert path.shape == (9, 128)
    assert torch.allclose(path[0], z0, atol=1e-6) and torch.allclose(path[-1], z1, atol=1e-6)
    norms = path.norm(dim=1)
    lo, hi = min(z0.norm(), z1.norm()), max(z0.norm(), z1.norm())
    assert (norms > 0.97 * lo).all() and (norms < 1.03 * hi).all()
    lerp_mid = (z0 + z1) / 2  # a straight line cuts through the ball's low-density middle
    assert norms[4] > 1.3 * lerp_mid.norm()
    # on the unit circle, the midpoint of two orthogonal vectors is at 45 degrees
    u, v = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = slerp(u, v, torch.tensor([0.5]))[0]
    assert torch.allclose(mid, torch.tensor([1.0, 1.0]) / math.sqrt(2), atol=1e-6)
    angles = torch.atan2(*slerp(u, v, torch.linspace(0, 1, 5)).T.flip(0))
    assert torch.allclose(angles, torch.linspace(0, math.pi / 2, 5), atol=1e-6)  # even steps
    assert torch.allclose(slerp(u, 2 * u, torch.tensor([0.5])), torch.tensor([[1.5, 0.0]]))
    with pytest.raises(ValueError, match="steps"):
        gan.interpolate(z0, z1, 1)


def test_a_diverging_gan_stops_with_the_step_named(tmp_path):
    # A known GAN failure: D's scores blow up. The trainer's guard skips each non-finite
    # update, keeps the last checkpoint and stops after nan_tolerance in a row.
    from aigc.errors import TrainingError

    torch.manual_seed(0)
    gan = GAN(tiny(arch="dcgan", image_size=16, conditional=True, num_classes=[3]))
    train = TrainConfig(max_steps=10, warmup_steps=0, log_every=1, eval_every=0, nan_tolerance=3)
    config = Config(family="gan", data=None, model=gan.cfg, train=train)
    run = RunDir(tmp_path / "run")
    run.create("gan", "family: gan\n")
    t = Trainer(StubGANTask(gan), config, run, DistInfo(), torch.device("cpu"), False)
    with torch.no_grad():
        gan.D.head.weight.fill_(float("inf"))
    d_before = {k: v.clone() for k, v in gan.D.state_dict().items()}
    with pytest.raises(TrainingError, match=r"3 steps in a row \(last at step 3"):
        t.fit()
    assert t.nonfinite_total == 3 and t.step == 3
    for k, v in gan.D.state_dict().items():  # skipped updates left D untouched
        assert torch.equal(v, d_before[k]) or "running" in k or "num_batches" in k, k
