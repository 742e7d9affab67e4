"""GAN: generative adversarial networks, unconditional or label-conditional.

A generator G maps noise z ~ N(0, I) (and labels) to an image in [-1, 1]; a
discriminator D maps an image (and labels) to one real-valued score per image.
Two architectures:

- ``mlp``: the fully connected networks of the original GAN (Goodfellow et al.
  2014): z -> hidden layers -> C*H*W with tanh; D mirrors it with dropout.
- ``dcgan`` (Radford et al. 2016): G projects z to a 4x4 map and doubles the
  resolution with stride-2 transposed convolutions (BatchNorm + ReLU, tanh out);
  D halves it with stride-2 convolutions (LeakyReLU 0.2, BatchNorm except on the
  first layer), no pooling, and a linear layer to one score. Weights start from
  N(0, 0.02).

Three objectives, with s = D(x) a raw score (a logit for bce):

- ``bce``: D minimises -log sigmoid(D(x)) - log(1 - sigmoid(D(G(z)))), the
  minimax value of Goodfellow et al. 2014 (eq. 1); G minimises the
  non-saturating -log sigmoid(D(G(z))) of the same paper (section 3).
- ``hinge`` (Lim & Ye 2017; Miyato et al. 2018): D minimises
  relu(1 - D(x)) + relu(1 + D(G(z))); G minimises -D(G(z)).
- ``wgan-gp`` (Gulrajani et al. 2017, algorithm 1): the critic minimises
  D(G(z)) - D(x) + lambda * (||grad_xhat D(xhat)||_2 - 1)^2 on random
  interpolates xhat of real and fake images; G minimises -D(G(z)). The penalty is
  per image, so the critic has no BatchNorm (it would couple the images).

Conditioning on A label attributes (``num_classes``, one class count each): G gets
z concatenated with one learned embedding per attribute (concatenated, not summed,
so attributes stay apart). D either takes the embeddings as extra input (``concat``:
extra channels broadcast over the image for dcgan, extra features for mlp) or uses
the projection discriminator of Miyato & Koyama 2018 (eq. 3):
D(x, y) = w . phi(x) + sum_a <E_a(y_a), phi(x)>.

The step (``GAN.training_step``) follows the trainer's step contract: n_critic
discriminator updates on the same real batch with fresh noise each time, then one
generator update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.parametrizations import spectral_norm

from aigc.errors import ConfigError
from aigc.models.layers import (
    LabelEmbedding,
    LatentSampling,
    check_image_ready,
    check_latent_image_config,
    check_pow2_size,
    slerp,
)

ARCHS = ("mlp", "dcgan")
LOSSES = ("bce", "hinge", "wgan-gp")
COND_D = ("concat", "projection")


@dataclass
class GANConfig:
    arch: Literal["mlp", "dcgan"] = "dcgan"
    z_dim: int = 100  # size of the latent z ~ N(0, I)
    image_size: int = 32  # 0 = set from the data by the caller; dcgan: a power of two >= 16
    channels: int = 1  # 0 = set from the data by the caller
    conditional: bool = False  # condition G and D on the data's labels
    num_classes: list[int] = field(default_factory=list)  # classes per attribute, set from data
    embed_dim: int = 16  # width of each attribute's label embedding (G, and D with concat)
    cond_d: Literal["concat", "projection"] = "projection"  # how D sees the labels
    loss: Literal["bce", "hinge", "wgan-gp"] = "bce"
    gp_weight: float = 10.0  # lambda of the WGAN-GP gradient penalty
    n_critic: int = 1  # discriminator updates per generator update (5 for wgan-gp)
    spectral_norm: bool = False  # spectral normalisation of D's weights (Miyato et al. 2018)
    d_batch_norm: bool = True  # dcgan D: batch norm after each strided conv but the first
    g_width: int = 64  # dcgan: channels of G's last hidden layer (doubling towards z)
    d_width: int = 64  # dcgan: channels of D's first layer (doubling with depth)
    hidden: list[int] = field(default_factory=lambda: [256, 512, 1024])  # mlp G; D reversed
    d_dropout: float = 0.3  # mlp D: dropout after each hidden layer

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key."""
        check_latent_image_config(
            self, {"arch": ARCHS, "loss": LOSSES, "cond_d": COND_D},
            ints=(("n_critic", 1), ("g_width", 1), ("d_width", 1)),
            flags=("spectral_norm",), numbers=("gp_weight", "d_dropout"),
        )  # fmt: skip
        if self.arch == "dcgan":
            check_pow2_size(self.image_size, "dcgan", "doubles a 4x4 map")
        if not (math.isfinite(self.gp_weight) and self.gp_weight >= 0):
            raise ConfigError(f"model.gp_weight={self.gp_weight} must be finite and >= 0")
        if not 0.0 <= self.d_dropout < 1.0:
            raise ConfigError(f"model.d_dropout={self.d_dropout} must be in [0, 1)")

    def check_ready(self) -> None:
        """Raise ConfigError if a value the caller sets from the data is still unset."""
        check_image_ready(self)


# ---------------------------------------------------------------------------
# Blocks


def _latent_with_labels(z: Tensor, labels: Tensor | None, embed: LabelEmbedding | None) -> Tensor:
    """G's input: z (B, Z), concatenated with the label embeddings (B, A*E) when conditional."""
    if embed is None:
        return z
    if labels is None:
        raise ValueError("this GAN is conditional: pass labels of shape (B, A)")
    return torch.cat([z, embed(labels).flatten(1).to(z.dtype)], dim=1)


def _score(
    head: nn.Linear, embed: LabelEmbedding | None, cond: str | None, phi: Tensor, labels: Tensor
) -> Tensor:
    """D's score (B,) from features phi (B, F); projection adds sum_a <E_a(y_a), phi>."""
    score = head(phi).squeeze(1)  # (B,)
    if cond == "projection":
        if labels is None:
            raise ValueError("this GAN is conditional: pass labels of shape (B, A)")
        score = score + (embed(labels).sum(1) * phi).sum(1)  # Miyato & Koyama 2018, eq. 3
    return score


class MLPGenerator(nn.Module):
    def __init__(self, cfg: GANConfig, num_classes: list[int]) -> None:
        super().__init__()
        self.shape = (cfg.channels, cfg.image_size, cfg.image_size)
        self.embed = LabelEmbedding(num_classes, cfg.embed_dim) if num_classes else None
        width = cfg.z_dim + len(num_classes) * cfg.embed_dim
        layers: list[nn.Module] = []
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.LeakyReLU(0.2)]
            width = h
        layers += [nn.Linear(width, math.prod(self.shape)), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """z (B, Z), labels (B, A) -> images (B, C, H, W) in [-1, 1]."""
        return self.net(_latent_with_labels(z, labels, self.embed)).view(-1, *self.shape)


class MLPDiscriminator(nn.Module):
    def __init__(self, cfg: GANConfig, num_classes: list[int]) -> None:
        super().__init__()
        self.cond = cfg.cond_d if num_classes else None
        width = cfg.channels * cfg.image_size**2
        self.embed: LabelEmbedding | None = None
        if self.cond == "concat":
            self.embed = LabelEmbedding(num_classes, cfg.embed_dim)
            width += len(num_classes) * cfg.embed_dim
        layers: list[nn.Module] = []
        for h in reversed(cfg.hidden):
            layers += [nn.Linear(width, h), nn.LeakyReLU(0.2), nn.Dropout(cfg.d_dropout)]
            width = h
        self.features = nn.Sequential(*layers)  # phi(x): (B, F)
        self.head = nn.Linear(width, 1)
        if self.cond == "projection":
            self.embed = LabelEmbedding(num_classes, width)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """x (B, C, H, W), labels (B, A) -> scores (B,)."""
        h = x.flatten(1)  # (B, C*H*W)
        if self.cond == "concat":
            if labels is None:
                raise ValueError("this GAN is conditional: pass labels of shape (B, A)")
            h = torch.cat([h, self.embed(labels).flatten(1).to(h.dtype)], dim=1)
        return _score(self.head, self.embed, self.cond, self.features(h), labels)


class DCGANGenerator(nn.Module):
    def __init__(self, cfg: GANConfig, num_classes: list[int]) -> None:
        super().__init__()
        n_up = int(math.log2(cfg.image_size)) - 2  # 4 -> image_size by doubling
        ch = cfg.g_width * 2 ** (n_up - 1)
        self.embed = LabelEmbedding(num_classes, cfg.embed_dim) if num_classes else None
        self.project = nn.Linear(cfg.z_dim + len(num_classes) * cfg.embed_dim, ch * 16, bias=False)
        self.project_bn = nn.BatchNorm2d(ch)
        layers: list[nn.Module] = []
        for _ in range(n_up - 1):
            layers += [
                nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(ch // 2),
                nn.ReLU(),
            ]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, cfg.channels, 4, stride=2, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """z (B, Z), labels (B, A) -> images (B, C, H, W) in [-1, 1]."""
        h = self.project(_latent_with_labels(z, labels, self.embed))  # (B, ch*16)
        h = F.relu(self.project_bn(h.view(h.size(0), -1, 4, 4)))  # (B, ch, 4, 4)
        return self.net(h)


class DCGANDiscriminator(nn.Module):
    def __init__(self, cfg: GANConfig, num_classes: list[int]) -> None:
        super().__init__()
        self.cond = cfg.cond_d if num_classes else None
        batch_norm = cfg.d_batch_norm and cfg.loss != "wgan-gp"  # the gradient penalty is per image
        n_down = int(math.log2(cfg.image_size)) - 2  # image_size -> 4 by halving
        in_ch = cfg.channels
        self.embed: LabelEmbedding | None = None
        if self.cond == "concat":
            self.embed = LabelEmbedding(num_classes, cfg.embed_dim)
            in_ch += len(num_classes) * cfg.embed_dim
        ch = cfg.d_width
        layers: list[nn.Module] = [nn.Conv2d(in_ch, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for _ in range(n_down - 1):
            layers.append(nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(2 * ch))
            layers.append(nn.LeakyReLU(0.2))
            ch *= 2
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)  # phi(x): (B, ch*16)
        self.head = nn.Linear(ch * 16, 1)  # the same as DCGAN's final 4x4 convolution
        if self.cond == "projection":
            self.embed = LabelEmbedding(num_classes, ch * 16)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """x (B, C, H, W), labels (B, A) -> scores (B,)."""
        if self.cond == "concat":
            if labels is None:
                raise ValueError("this GAN is conditional: pass labels of shape (B, A)")
            e = self.embed(labels).flatten(1).to(x.dtype)  # (B, A*E)
            x = torch.cat([x, e[:, :, None, None].expand(-1, -1, *x.shape[2:])], dim=1)
        return _score(self.head, self.embed, self.cond, self.features(x), labels)


def _dcgan_init(module: nn.Module) -> None:
    """Radford et al. 2016: weights from N(0, 0.02); BatchNorm scales from N(1, 0.02)."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------
# Sampling helpers


# ---------------------------------------------------------------------------
# The model


class GAN(LatentSampling, nn.Module):
    """Generator G and discriminator D with their losses; the trainer keeps an EMA of G."""

    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        cfg.validate()
        cfg.check_ready()
        self.cfg = cfg
        self.num_classes = list(cfg.num_classes) if cfg.conditional else []
        if cfg.arch == "mlp":
            self.G = MLPGenerator(cfg, self.num_classes)
            self.D = MLPDiscriminator(cfg, self.num_classes)
        else:
            self.G = DCGANGenerator(cfg, self.num_classes)
            self.D = DCGANDiscriminator(cfg, self.num_classes)
            self.G.apply(_dcgan_init)
            self.D.apply(_dcgan_init)
        if self.num_classes and cfg.cond_d == "projection":
            # the projection term starts near zero, like the rest of D's output
            for table in self.D.embed.tables:
                nn.init.normal_(table.weight, 0.0, 0.02)
        if cfg.spectral_norm:
            for m in list(self.D.modules()):
                if isinstance(m, nn.Conv2d | nn.Linear | nn.Embedding):
                    spectral_norm(m)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def param_groups(self) -> dict[str, dict[str, Any]]:
        """Two optimizers (the step contract): Adam betas (0.5, 0.999) as in DCGAN, or
        (0, 0.9) for wgan-gp as in Gulrajani et al. 2017; no weight decay."""
        betas = (0.0, 0.9) if self.cfg.loss == "wgan-gp" else (0.5, 0.999)
        return {
            name: {"params": list(net.parameters()), "betas": betas, "weight_decay": 0.0}
            for name, net in (("discriminator", self.D), ("generator", self.G))
        }

    # losses ------------------------------------------------------------------
    def gradient_penalty(
        self, real: Tensor, fake: Tensor, labels: Tensor | None = None, eps: Tensor | None = None
    ) -> Tensor:
        """Mean of (||grad_xhat D(xhat)||_2 - 1)^2 over xhat = eps*real + (1-eps)*fake.

        eps (B, 1, 1, 1) ~ U[0, 1] per image unless given (Gulrajani et al. 2017, alg. 1).
        The graph is kept (create_graph) so the penalty trains D.
        """
        if eps is None:
            shape = (real.size(0),) + (1,) * (real.dim() - 1)
            eps = torch.rand(shape, device=real.device, dtype=real.dtype)
        xhat = (eps * real + (1 - eps) * fake).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.D(xhat, labels).sum(), xhat, create_graph=True)
        return ((grad.float().flatten(1).norm(2, dim=1) - 1) ** 2).mean()

    def d_loss(
        self, real: Tensor, labels: Tensor | None = None, fake: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Discriminator loss on real images (B, C, H, W) and fakes with the same labels.

        Fakes are drawn from G without gradients unless given. Returns the loss and
        detached stats: d_loss, d_real, d_fake (mean sigmoid(D) for bce, mean raw
        score otherwise), d_acc_real, d_acc_fake (share with the right sign), gp.
        """
        if fake is None:
            with torch.no_grad():
                fake = self.G(self.sample_z(real.size(0)), labels)
        fake = fake.detach()
        s_real = self.D(real, labels).float()  # (B,)
        s_fake = self.D(fake, labels).float()  # (B,)
        stats: dict[str, Tensor] = {}
        if self.cfg.loss == "bce":
            # -log sigmoid(s) = softplus(-s) and -log(1 - sigmoid(s)) = softplus(s)
            loss = F.softplus(-s_real).mean() + F.softplus(s_fake).mean()
            stats["d_real"], stats["d_fake"] = s_real.sigmoid().mean(), s_fake.sigmoid().mean()
        else:
            if self.cfg.loss == "hinge":
                loss = F.relu(1 - s_real).mean() + F.relu(1 + s_fake).mean()
            else:
                gp = self.gradient_penalty(real, fake, labels)
                loss = s_fake.mean() - s_real.mean() + self.cfg.gp_weight * gp
                stats["gp"] = gp
            stats["d_real"], stats["d_fake"] = s_real.mean(), s_fake.mean()
        stats["d_acc_real"] = (s_real > 0).float().mean()
        stats["d_acc_fake"] = (s_fake < 0).float().mean()
        stats["d_loss"] = loss
        return loss, {k: v.detach() for k, v in stats.items()}

    def g_loss(
        self, batch_size: int, labels: Tensor | None = None, fake: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Generator loss on batch_size fresh fakes (or on ``fake``, still attached to G's
        graph): -log sigmoid(D(G(z))) for bce (the non-saturating loss), -D(G(z)) for hinge
        and wgan-gp. Stats: g_loss."""
        if fake is None:
            fake = self.G(self.sample_z(batch_size), labels)
        s_fake = self.D(fake, labels).float()
        loss = F.softplus(-s_fake).mean() if self.cfg.loss == "bce" else -s_fake.mean()
        return loss, {"g_loss": loss.detach()}

    def training_step(self, batch: Any, step: Any) -> dict[str, Tensor]:
        """n_critic D updates, then one G update (the step contract).

        batch["images"] is (B, C, H, W) in [-1, 1]; batch["labels"] (B, A) int64, absent
        for unlabelled data. Every critic update sees the same real images with fresh noise, so
        the batch size D trains on does not depend on n_critic. Noise comes from
        torch's global RNG, which the trainer seeds per step.
        """
        images, labels = batch["images"], batch.get("labels")
        if not self.num_classes:
            labels = None  # labelled data, unconditional model
        totals: dict[str, Tensor] = {}
        # With one critic step, the fakes D learns from are the ones G learns from, as in
        # the DCGAN paper's loop: one G forward per step instead of two.
        fake = self.G(self.sample_z(images.size(0)), labels) if self.cfg.n_critic == 1 else None
        for _ in range(self.cfg.n_critic):
            loss, stats = self.d_loss(images, labels, fake=fake)
            step.update("discriminator", loss)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v / self.cfg.n_critic
        loss, stats = self.g_loss(images.size(0), labels, fake=fake)
        step.update("generator", loss)
        return {**totals, **stats}

    # sampling ----------------------------------------------------------------
    @torch.no_grad()
    def generate(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """Images (n, C, H, W) in [-1, 1] from latents z (n, z_dim), with G in eval mode."""
        self.check_labels(labels, z.size(0))
        was_training = self.G.training
        self.G.eval()
        try:
            return self.G(z.to(self.device), None if labels is None else labels.to(self.device))
        finally:
            self.G.train(was_training)

    def interpolate(self, z0: Tensor, z1: Tensor, steps: int) -> Tensor:
        """steps latents (steps, z_dim) on the great circle from z0 to z1 (both (z_dim,))."""
        if steps < 2:
            raise ValueError(f"steps={steps} must be at least 2 (the two endpoints)")
        return slerp(z0, z1, torch.linspace(0.0, 1.0, steps, device=z0.device))

    def num_params(self) -> dict[str, int]:
        """Parameter counts of G and D."""
        return {
            "generator": sum(p.numel() for p in self.G.parameters()),
            "discriminator": sum(p.numel() for p in self.D.parameters()),
        }
