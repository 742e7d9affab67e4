"""VAE: variational autoencoders, plain (Kingma & Welling 2014), conditional (Sohn et
al. 2015) and beta-weighted (Higgins et al. 2017).

An encoder q(z|x) = N(mu(x), diag sigma^2(x)) and a decoder p(x|z) are trained
together by maximising the evidence lower bound (Kingma & Welling 2014, eq. 10)

    ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || N(0, I)) <= log p(x),

with one reparameterised sample z = mu + sigma * eps, eps ~ N(0, I). The training
objective is -log p(x|z) + beta_t * KL, where beta_t ramps linearly from 0 to
``beta`` over ``kl_warmup_steps`` (KL annealing, Bowman et al. 2016); beta > 1 is
the beta-VAE of Higgins et al. 2017. The logged ``elbo`` always uses beta = 1.

Two architectures:

- ``mlp``: flat image -> hidden layers -> (mu, log-variance); z -> reversed hidden
  layers -> likelihood parameters for every pixel.
- ``conv``: stride-2 convolutions halve the image down to 4x4 (channels start at
  ``width`` and double with depth), then a linear layer to (mu, log-variance); the
  decoder mirrors it with stride-2 transposed convolutions. No batch norm, so each
  image's bound depends on that image alone (needed for exact per-image ELBOs).

Three likelihoods log p(x|z), each summed over pixels, in nats per image. Images are
8-bit values p in 0..255 mapped to x = p / 127.5 - 1:

- ``bernoulli``: BCE-with-logits on the target (x + 1) / 2. A proper likelihood only
  for binary data; on grey values it is a reconstruction loss, not a log-probability.
- ``gaussian``: the Normal(mean, std) density of x, std fixed (``gaussian_std`` > 0)
  or a learned per-pixel log-std from the decoder. A density on a continuous x, not a
  probability of the 8-bit value, so its bits per dimension are not comparable.
- ``discretized_logistic`` (Salimans et al. 2017, PixelCNN++, one component): the
  probability of p's bin [x - 1/255, x + 1/255] under Logistic(mean, scale), with the
  bins of 0 and 255 extended to -inf and +inf so the 256 probabilities sum to one. A
  true discrete likelihood: bits per dimension = nll / (C*H*W*ln 2) are honest.

Conditioning on A label attributes (``num_classes``): one learned embedding per
attribute, concatenated (as extra channels broadcast over the image for conv, as extra
features for mlp) to the encoder's input and to z for the decoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from aigc.errors import ConfigError
from aigc.models.layers import (
    LabelEmbedding,
    LatentSampling,
    check_image_ready,
    check_latent_image_config,
    check_pow2_size,
    slerp,
)

ARCHS = ("mlp", "conv")
LIKELIHOODS = ("bernoulli", "gaussian", "discretized_logistic")
LOGVAR_RANGE = (-12.0, 8.0)  # q's log-variance: sigma in [2.5e-3, 55]
LOGSCALE_RANGE = (-7.0, 3.0)  # decoder log-scale / log-std (PixelCNN++ floors at -7)
LOG_2PI = math.log(2 * math.pi)


@dataclass
class VAEConfig:
    arch: Literal["mlp", "conv"] = "conv"
    z_dim: int = 16  # size of the latent z
    image_size: int = 32  # 0 = set from the data by the caller; conv: a power of two >= 16
    channels: int = 1  # 0 = set from the data by the caller
    hidden: list[int] = field(default_factory=lambda: [512, 256])  # mlp encoder; decoder reversed
    width: int = 32  # conv: channels of the first encoder layer (doubling with depth)
    conditional: bool = False  # condition encoder and decoder on the data's labels
    num_classes: list[int] = field(default_factory=list)  # classes per attribute, set from data
    embed_dim: int = 16  # width of each attribute's label embedding
    likelihood: Literal["bernoulli", "gaussian", "discretized_logistic"] = "discretized_logistic"
    gaussian_std: float = 0.0  # gaussian: 0 = learned per-pixel log-std; > 0 = fixed std
    beta: float = 1.0  # weight of the KL term (1 = the ELBO; > 1 = beta-VAE)
    kl_warmup_steps: int = 0  # beta ramps linearly from 0 to beta over these steps

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key."""
        check_latent_image_config(
            self, {"arch": ARCHS, "likelihood": LIKELIHOODS},
            ints=(("width", 1), ("kl_warmup_steps", 0)), numbers=("beta", "gaussian_std"),
        )  # fmt: skip
        if self.arch == "conv":
            check_pow2_size(self.image_size, "conv", "halves the image to 4x4")
        for key in ("beta", "gaussian_std"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"model.{key}={value} must be finite and >= 0")

    def check_ready(self) -> None:
        """Raise ConfigError if a value the caller sets from the data is still unset."""
        check_image_ready(self)


# ---------------------------------------------------------------------------
# Likelihoods: x (B, C, H, W) in [-1, 1] -> log p(x|z) (B,) in nats


def discretized_logistic_log_prob(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Per-pixel log P(x) of 8-bit x under a discretized Logistic(mean, exp(log_scale)).

    Salimans et al. 2017 (PixelCNN++, section 2.1), one mixture component: the mass of
    x's bin [x - 1/255, x + 1/255]; the bin of p = 0 reaches down to -inf and that of
    p = 255 up to +inf. Same shape as x. With a = (x - mean + 1/255) / s and
    b = (x - mean - 1/255) / s, log(sigmoid(a) - sigmoid(b)) is computed as
    b + log(expm1(a - b)) - softplus(a) - softplus(b), exact and stable in both tails
    (no pdf fallback needed).
    """
    x, mean, log_scale = x.float(), mean.float(), log_scale.float()
    inv_s = torch.exp(-log_scale)
    a = (x - mean + 1 / 255) * inv_s
    b = (x - mean - 1 / 255) * inv_s
    log_mid = b + torch.log(torch.expm1(a - b)) - F.softplus(a) - F.softplus(b)
    log_low = -F.softplus(-a)  # log sigmoid(a) = log P(X < x + 1/255), for p = 0
    log_high = -F.softplus(b)  # log (1 - sigmoid(b)) = log P(X > x - 1/255), for p = 255
    p = torch.round((x + 1) * 127.5)
    return torch.where(p <= 0, log_low, torch.where(p >= 255, log_high, log_mid))


def gaussian_log_prob(x: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """Per-pixel log N(x; mean, exp(log_std)^2), a density (not a bin probability)."""
    x, mean, log_std = x.float(), mean.float(), log_std.float()
    return -0.5 * (((x - mean) * torch.exp(-log_std)) ** 2 + LOG_2PI) - log_std


def bernoulli_log_prob(x: Tensor, logits: Tensor) -> Tensor:
    """Per-pixel -BCE(logits, (x + 1) / 2); a log-probability only for binary x."""
    return -F.binary_cross_entropy_with_logits(
        logits.float(), (x.float() + 1) / 2, reduction="none"
    )


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per latent dimension (Kingma & Welling 2014,
    appendix B): 0.5 * (mu^2 + sigma^2 - 1 - log sigma^2). Same shape as mu."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu**2 + logvar.exp() - 1 - logvar)


def active_units(mus: Tensor, threshold: float = 0.01) -> int:
    """Number of active latent units (Burda et al. 2016, section 5.2).

    mus (N, z_dim): posterior means E_q[z|x] over N data points. A unit u is active
    when Var_x(E_q[z_u]) > threshold.
    """
    return int((mus.double().var(dim=0, unbiased=True) > threshold).sum())


# ---------------------------------------------------------------------------
# Blocks


def _with_labels(h: Tensor, e: Tensor | None) -> Tensor:
    """Concatenate label embeddings e (B, A*E) to h: as features for (B, F), as extra
    channels broadcast over the image for (B, C, H, W)."""
    if e is None:
        return h
    e = e.to(h.dtype)
    if h.dim() == 4:
        e = e[:, :, None, None].expand(-1, -1, *h.shape[2:])
    return torch.cat([h, e], dim=1)


class MLPEncoder(nn.Module):
    def __init__(self, cfg: VAEConfig, cond_dim: int) -> None:
        super().__init__()
        width = cfg.channels * cfg.image_size**2 + cond_dim
        layers: list[nn.Module] = []
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.SiLU()]
            width = h
        layers.append(nn.Linear(width, 2 * cfg.z_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, e: Tensor | None) -> Tensor:
        """x (B, C, H, W), e (B, A*E) or None -> (B, 2*z_dim)."""
        return self.net(_with_labels(x.flatten(1), e))


class MLPDecoder(nn.Module):
    def __init__(self, cfg: VAEConfig, cond_dim: int, out_channels: int) -> None:
        super().__init__()
        self.shape = (out_channels, cfg.image_size, cfg.image_size)
        width = cfg.z_dim + cond_dim
        layers: list[nn.Module] = []
        for h in reversed(cfg.hidden):
            layers += [nn.Linear(width, h), nn.SiLU()]
            width = h
        layers.append(nn.Linear(width, math.prod(self.shape)))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor, e: Tensor | None) -> Tensor:
        """z (B, Z), e (B, A*E) or None -> likelihood parameters (B, out_channels, H, W)."""
        return self.net(_with_labels(z, e)).view(-1, *self.shape)


class ConvEncoder(nn.Module):
    def __init__(self, cfg: VAEConfig, cond_dim: int) -> None:
        super().__init__()
        n_down = int(math.log2(cfg.image_size)) - 2  # image_size -> 4 by halving
        in_ch, ch = cfg.channels + cond_dim, cfg.width
        layers: list[nn.Module] = []
        for _ in range(n_down):
            layers += [nn.Conv2d(in_ch, ch, 4, stride=2, padding=1), nn.SiLU()]
            in_ch, ch = ch, 2 * ch
        layers += [nn.Flatten(), nn.Linear(in_ch * 16, 2 * cfg.z_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, e: Tensor | None) -> Tensor:
        """x (B, C, H, W), e (B, A*E) or None -> (B, 2*z_dim)."""
        return self.net(_with_labels(x, e))


class ConvDecoder(nn.Module):
    def __init__(self, cfg: VAEConfig, cond_dim: int, out_channels: int) -> None:
        super().__init__()
        n_up = int(math.log2(cfg.image_size)) - 2  # 4 -> image_size by doubling
        ch = cfg.width * 2 ** (n_up - 1)  # the encoder's last width
        self.project = nn.Linear(cfg.z_dim + cond_dim, ch * 16)
        layers: list[nn.Module] = [nn.SiLU()]
        for _ in range(n_up - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1), nn.SiLU()]
            ch //= 2
        layers.append(nn.ConvTranspose2d(ch, out_channels, 4, stride=2, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor, e: Tensor | None) -> Tensor:
        """z (B, Z), e (B, A*E) or None -> likelihood parameters (B, out_channels, H, W)."""
        h = self.project(_with_labels(z, e))  # (B, ch*16)
        return self.net(h.view(h.size(0), -1, 4, 4))


# ---------------------------------------------------------------------------
# The model


class VAE(LatentSampling, nn.Module):
    """Encoder q(z|x), decoder p(x|z) and the (beta-weighted) negative ELBO."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        cfg.validate()
        cfg.check_ready()
        self.cfg = cfg
        self.num_classes = list(cfg.num_classes) if cfg.conditional else []
        self.embed = LabelEmbedding(self.num_classes, cfg.embed_dim) if self.num_classes else None
        cond_dim = len(self.num_classes) * cfg.embed_dim
        # the decoder outputs a mean (or logits) per pixel, plus a log-scale where learned
        learned_scale = cfg.likelihood == "discretized_logistic" or (
            cfg.likelihood == "gaussian" and cfg.gaussian_std == 0
        )
        out_channels = cfg.channels * (2 if learned_scale else 1)
        if cfg.arch == "mlp":
            self.encoder = MLPEncoder(cfg, cond_dim)
            self.decoder = MLPDecoder(cfg, cond_dim, out_channels)
        else:
            self.encoder = ConvEncoder(cfg, cond_dim)
            self.decoder = ConvDecoder(cfg, cond_dim, out_channels)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def num_dims(self) -> int:
        """Pixels per image, C*H*W (the 'dimensions' of bits per dimension)."""
        return self.cfg.channels * self.cfg.image_size**2

    def param_groups(self) -> dict[str, dict[str, Any]]:
        """One optimizer (the step contract), with the trainer's defaults."""
        return {"model": {"params": list(self.parameters())}}

    # networks ----------------------------------------------------------------
    def _embed(self, labels: Tensor | None) -> Tensor | None:
        if self.embed is None:
            return None
        if labels is None:
            raise ValueError("this VAE is conditional: pass labels of shape (B, A)")
        return self.embed(labels).flatten(1)  # (B, A*E)

    def encode(self, x: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """q(z|x): x (B, C, H, W) in [-1, 1] -> mu, logvar, each (B, z_dim)."""
        mu, logvar = self.encoder(x, self._embed(labels)).chunk(2, dim=1)
        return mu, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """p(x|z)'s parameters: mean (logits for bernoulli) (B, C, H, W) and a log-scale
        (log-std for gaussian) of the same shape, or None where it is not learned."""
        out = self.decoder(z, self._embed(labels))
        if out.size(1) == self.cfg.channels:
            return out, None
        mean, log_scale = out.chunk(2, dim=1)
        return mean, log_scale.clamp(*LOGSCALE_RANGE)

    def log_likelihood(self, x: Tensor, mean: Tensor, log_scale: Tensor | None) -> Tensor:
        """log p(x|z) summed over pixels: (B,) in nats, float32."""
        lik = self.cfg.likelihood
        if lik == "bernoulli":
            per_pixel = bernoulli_log_prob(x, mean)
        elif lik == "gaussian":
            if log_scale is None:
                log_scale = torch.full_like(mean, math.log(self.cfg.gaussian_std))
            per_pixel = gaussian_log_prob(x, mean, log_scale)
        else:
            per_pixel = discretized_logistic_log_prob(x, mean, log_scale)
        return per_pixel.flatten(1).sum(1)

    # losses ------------------------------------------------------------------
    def elbo_terms(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        """One-sample ELBO terms per image (B,), in nats, without beta: recon = -log p(x|z)
        at z = mu + sigma * eps (eps from torch's global RNG), kl = KL(q(z|x) || N(0, I))
        in closed form, nelbo = recon + kl; also kl_dims (B, z_dim), the KL of each latent
        unit (near 0 for a collapsed unit), and mu (B, z_dim). Differentiable."""
        mu, logvar = self.encode(x, labels)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)  # reparameterisation
        recon = -self.log_likelihood(x, *self.decode(z, labels))
        kl_dims = gaussian_kl(mu, logvar)
        kl = kl_dims.sum(1)
        return {"recon": recon, "kl": kl, "nelbo": recon + kl, "kl_dims": kl_dims, "mu": mu}

    def beta_at(self, index: int) -> float:
        """beta_t: linear from 0 at step 0 to beta at step kl_warmup_steps, then beta."""
        warmup = self.cfg.kl_warmup_steps
        if warmup == 0:
            return float(self.cfg.beta)
        return float(self.cfg.beta) * min(1.0, index / warmup)

    def training_step(self, batch: Any, step: Any) -> dict[str, Tensor]:
        """One update of the batch-mean recon + beta_t * kl (the step contract).

        batch["images"] is (B, C, H, W) in [-1, 1]; batch["labels"] (B, A) int64, absent
        for unlabelled data; beta_t follows step.index. Returns detached scalars, per image: loss
        (the weighted objective), elbo (negative ELBO, beta = 1, nats), recon, kl, beta,
        bpd (the negative ELBO in bits per dimension) and kl_dim/u, the KL of latent unit
        u (a unit whose KL stays near 0 has collapsed to the prior).
        """
        images, labels = batch["images"], batch.get("labels")
        if not self.num_classes:
            labels = None  # labelled data, unconditional model
        beta = self.beta_at(int(step.index))
        terms = self.elbo_terms(images, labels)
        recon, kl = terms["recon"].mean(), terms["kl"].mean()
        loss = recon + beta * kl
        step.update("model", loss)
        nelbo = recon + kl
        stats = {
            "loss": loss,
            "elbo": nelbo,
            "recon": recon,
            "kl": kl,
            "beta": torch.tensor(beta),
            "bpd": nelbo / (self.num_dims * math.log(2)),
        }
        for u, v in enumerate(terms["kl_dims"].detach().mean(0)):
            stats[f"kl_dim/{u}"] = v
        return {k: v.detach() for k, v in stats.items()}

    @torch.no_grad()
    def iwae_nll(
        self, x: Tensor, labels: Tensor | None = None, k: int = 100, max_batch: int = 2048
    ) -> Tensor:
        """Importance-weighted bound on -log p(x) (Burda et al. 2016, eq. 8): (B,) nats.

        -log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x), decoding at most
        ``max_batch`` images (samples x data points) per pass so memory stays bounded;
        log-weights are combined with logsumexp in float64. k = 1 is the negative ELBO
        (in expectation); the bound tightens as k grows. Noise comes from torch's global RNG.
        """
        if k < 1 or max_batch < 1:
            raise ValueError(f"k={k} and max_batch={max_batch} must be at least 1")
        B = x.size(0)
        chunk = max(1, max_batch // B)  # importance samples decoded per pass
        mu, logvar = self.encode(x, labels)
        std = torch.exp(0.5 * logvar)
        log_w: list[Tensor] = []
        for start in range(0, k, chunk):
            c = min(chunk, k - start)
            eps = torch.randn(c, *mu.shape, device=mu.device, dtype=mu.dtype)  # (c, B, Z)
            z = mu + std * eps
            log_q = (-0.5 * (eps.double() ** 2 + LOG_2PI + logvar.double())).sum(-1)  # (c, B)
            log_prior = (-0.5 * (z.double() ** 2 + LOG_2PI)).sum(-1)  # (c, B)
            xs = x.expand(c, *x.shape).reshape(c * B, *x.shape[1:])
            ys = None if labels is None else labels.expand(c, *labels.shape).reshape(c * B, -1)
            log_lik = self.log_likelihood(xs, *self.decode(z.reshape(c * B, -1), ys))
            log_w.append(log_lik.double().view(c, B) + log_prior - log_q)
        log_w_all = torch.cat(log_w, dim=0)  # (k, B)
        return -(torch.logsumexp(log_w_all, dim=0) - math.log(k))

    # sampling ----------------------------------------------------------------
    def decode_mean(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """The decoder's mean image (B, C, H, W), clamped to [-1, 1]: 2*sigmoid(logits) - 1
        for bernoulli, the location (mean = mode) for gaussian and discretized_logistic."""
        mean, _ = self.decode(z, labels)
        if self.cfg.likelihood == "bernoulli":
            mean = 2 * torch.sigmoid(mean) - 1
        return mean.clamp(-1, 1)

    @torch.no_grad()
    def generate(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """Images (n, C, H, W) in [-1, 1] from latents z (n, z_dim), in eval mode."""
        self.check_labels(labels, z.size(0))
        was_training = self.training
        self.eval()
        try:
            y = None if labels is None else labels.to(self.device)
            return self.decode_mean(z.to(self.device), y)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Decode the posterior mean: x (B, C, H, W) -> images (B, C, H, W) in [-1, 1]."""
        self.check_labels(labels, x.size(0))
        y = None if labels is None else labels.to(self.device)
        mu, _ = self.encode(x.to(self.device), y)
        return self.generate(mu, y)

    def interpolate(self, z0: Tensor, z1: Tensor, steps: int) -> Tensor:
        """steps latents (steps, z_dim) from z0 to z1 (both (z_dim,)) by slerp, which keeps
        a Gaussian latent at a typical norm; endpoints are exactly z0 and z1."""
        if steps < 2:
            raise ValueError(f"steps={steps} must be at least 2 (the two endpoints)")
        return slerp(z0, z1, torch.linspace(0.0, 1.0, steps, device=z0.device))

    @staticmethod
    def traverse(z: Tensor, dim_values: Tensor, dims: list[int]) -> Tensor:
        """Latent traversal grid: z (z_dim,), dim_values (V,), dims (D indices) ->
        (D*V, z_dim); row d*V + j is z with unit dims[d] set to dim_values[j]."""
        V = dim_values.numel()
        out = z.expand(len(dims) * V, -1).clone()  # (D*V, Z)
        for d, u in enumerate(dims):
            out[d * V : (d + 1) * V, u] = dim_values.to(z)
        return out

    def num_params(self) -> dict[str, int]:
        """Parameter counts of the encoder and decoder (the label embedding apart)."""
        counts = {
            "encoder": sum(p.numel() for p in self.encoder.parameters()),
            "decoder": sum(p.numel() for p in self.decoder.parameters()),
        }
        if self.embed is not None:
            counts["embed"] = sum(p.numel() for p in self.embed.parameters())
        return counts
