"""Diffusion models of images: a U-Net denoiser trained to predict the noise (Ho et al.
2020), sampled by any discrete-time scheduler (aigc.schedulers: DDPM, DDIM).

The U-Net follows Ho et al.'s (itself PixelCNN++'s): residual blocks with group norm
and SiLU, the timestep as a sinusoidal embedding (Vaswani et al. 2017) through an MLP
added inside every block, self-attention at the low resolutions, skip connections
from each down block to its up block. A class-conditional model adds one learned
embedding per label attribute to the time embedding; labels are dropped to a "null"
class with probability ``cond_drop`` during training, which is what classifier-free
guidance (Ho & Salimans 2022) needs at sampling time:
eps = eps(x, null) + w (eps(x, y) - eps(x, null)).

Training objective (``prediction_type``): the noise ("epsilon", Ho et al. eq. 14),
x_0 ("sample") or v (Salimans & Ho 2022), optionally weighted by min-SNR-gamma (Hang et
al. 2023: min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aigc.errors import ConfigError
from aigc.models.layers import (
    LatentSampling,
    check_choices,
    check_image_ready,
    check_int,
    check_pow2_size,
)
from aigc.schedulers import SCHEDULERS, get_scheduler
from aigc.schedulers.ddpm import BETA_SCHEDULES, PREDICTION_TYPES


@dataclass
class DiffusionConfig:
    image_size: int = 32  # 0 = set from the data; a power of two >= 16
    channels: int = 1  # 0 = set from the data
    width: int = 64  # channels at full resolution
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 2])  # per resolution
    num_res_blocks: int = 2  # residual blocks per resolution
    attn_resolutions: list[int] = field(default_factory=lambda: [8])  # self-attention here
    dropout: float = 0.0
    groups: int = 8  # group norm groups
    conditional: bool = False
    num_classes: list[int] = field(default_factory=list)  # set from the data
    cond_drop: float = 0.1  # label dropout for classifier-free guidance
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    min_snr_gamma: float = 0.0  # 0 = plain MSE; 5 is Hang et al.'s choice
    sampler: str = "ddim"  # the scheduler evaluation and `generate` use by default
    sample_steps: int = 50  # its steps
    guidance: float = 1.0  # classifier-free guidance scale at sampling; 1 = none

    @property
    def z_dim(self) -> int:
        """The size of the starting noise x_T, flattened (the latent of this model)."""
        return self.channels * self.image_size**2

    def validate(self) -> None:
        check_choices(self, {"beta_schedule": BETA_SCHEDULES, "prediction_type": PREDICTION_TYPES})
        for key, low in (("image_size", 0), ("channels", 0), ("width", 1), ("num_res_blocks", 1),
                         ("groups", 1), ("num_train_timesteps", 2), ("sample_steps", 1)):  # fmt: skip
            check_int(f"model.{key}", getattr(self, key), low)
        for key in ("dropout", "cond_drop", "min_snr_gamma", "guidance"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"model.{key}={value!r} must be a number >= 0")
        if not isinstance(self.conditional, bool):
            raise ConfigError(f"model.conditional={self.conditional!r} must be true or false")
        if self.num_classes and not self.conditional:
            raise ConfigError("model.num_classes is set but model.conditional=false")
        for i, n in enumerate(self.num_classes):
            check_int(f"model.num_classes[{i}]", n, 2)
        check_pow2_size(self.image_size, "unet", "halves the image per resolution")
        if not self.channel_mults or any(int(m) < 1 for m in self.channel_mults):
            raise ConfigError(f"model.channel_mults={self.channel_mults!r}: positive integers")
        if self.width % self.groups:
            raise ConfigError(f"model.width={self.width} must be a multiple of model.groups")
        if not 0.0 <= self.cond_drop < 1.0:
            raise ConfigError(f"model.cond_drop={self.cond_drop} must be in [0, 1)")
        if self.sampler not in SCHEDULERS:
            raise ConfigError(f"model.sampler={self.sampler!r}: choose {', '.join(SCHEDULERS)}")
        if not 1 <= self.sample_steps <= self.num_train_timesteps:
            raise ConfigError(
                f"model.sample_steps={self.sample_steps} must be in [1, {self.num_train_timesteps}]"
            )

    def check_ready(self) -> None:
        check_image_ready(self)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of timesteps t (B,) -> (B, dim) (Vaswani et al. 2017, §3.5)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added between, and a skip."""

    def __init__(self, c_in: int, c_out: int, t_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(t_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, c_out, H, W)
        h = h + self.time(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        return x + self.out(h.transpose(1, 2).reshape(B, C, H, W))


class UNet(nn.Module):
    """x_t (B, C, H, W), timesteps (B,), labels (B, A) or None -> (B, C, H, W)."""

    def __init__(self, cfg: DiffusionConfig, num_classes: list[int]) -> None:
        super().__init__()
        w, g = cfg.width, cfg.groups
        t_dim = 4 * w
        self.time_mlp = nn.Sequential(nn.Linear(w, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        # one row more per attribute: the "null" label of classifier-free guidance
        self.label_tables = nn.ModuleList(nn.Embedding(n + 1, t_dim) for n in num_classes)
        self.inp = nn.Conv2d(cfg.channels, w, 3, padding=1)
        self.down = nn.ModuleList()
        chans, c, res = [w], w, cfg.image_size
        for level, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                blocks = [ResBlock(c, w * mult, t_dim, g, cfg.dropout)]
                c = w * mult
                if res in cfg.attn_resolutions:
                    blocks.append(AttentionBlock(c, g))
                self.down.append(nn.ModuleList(blocks))
                chans.append(c)
            if level < len(cfg.channel_mults) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(c, c, 3, stride=2, padding=1)]))
                chans.append(c)
                res //= 2
        self.mid = nn.ModuleList(
            [ResBlock(c, c, t_dim, g, cfg.dropout), AttentionBlock(c, g),
             ResBlock(c, c, t_dim, g, cfg.dropout)]
        )  # fmt: skip
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            for i in range(cfg.num_res_blocks + 1):
                blocks = [ResBlock(c + chans.pop(), w * mult, t_dim, g, cfg.dropout)]
                c = w * mult
                if res in cfg.attn_resolutions:
                    blocks.append(AttentionBlock(c, g))
                if level and i == cfg.num_res_blocks:
                    blocks.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    blocks.append(nn.Conv2d(c, c, 3, padding=1))
                    res *= 2
                self.up.append(nn.ModuleList(blocks))
        self.out = nn.Sequential(
            nn.GroupNorm(g, c), nn.SiLU(), nn.Conv2d(c, cfg.channels, 3, padding=1)
        )
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self.width = w

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.width))  # (B, 4w)
        for a, table in enumerate(self.label_tables):
            emb = emb + table(labels[:, a])
        h = self.inp(x)
        skips = [h]
        for blocks in self.down:
            for b in blocks:
                h = b(h, emb) if isinstance(b, ResBlock) else b(h)
            skips.append(h)
        for b in self.mid:
            h = b(h, emb) if isinstance(b, ResBlock) else b(h)
        for blocks in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            for b in blocks:
                h = b(h, emb) if isinstance(b, ResBlock) else b(h)
        return self.out(h)


class Diffusion(LatentSampling, nn.Module):
    """The denoiser and the training schedule; ``generate`` runs a scheduler from noise."""

    def __init__(self, cfg: DiffusionConfig) -> None:
        super().__init__()
        cfg.validate()
        cfg.check_ready()
        self.cfg = cfg
        self.num_classes = list(cfg.num_classes) if cfg.conditional else []
        self.unet = UNet(cfg, self.num_classes)
        self.register_buffer(
            "alphas_cumprod", self.scheduler("ddpm").alphas_cumprod.float(), persistent=False
        )

    @property
    def device(self) -> torch.device:
        return self.unet.inp.weight.device

    def scheduler(self, name: str | None = None, **overrides: Any):
        """A scheduler of the training schedule: ``name`` (default cfg.sampler)."""
        c = self.cfg
        kw = {"num_train_timesteps": c.num_train_timesteps, "beta_schedule": c.beta_schedule,
              "prediction_type": c.prediction_type, **overrides}  # fmt: skip
        return get_scheduler(name or c.sampler)(**kw)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"model": list(self.parameters())}

    def _null(self, n: int) -> Tensor:
        return torch.tensor(self.num_classes, device=self.device).expand(n, -1)

    def training_step(self, batch: dict[str, Tensor], step: Any) -> dict[str, Tensor]:
        """The denoising loss at uniformly drawn timesteps (Ho et al. 2020, Algorithm 1)."""
        x0 = batch["images"]
        B = x0.size(0)
        labels = batch.get("labels") if self.num_classes else None
        if labels is not None and self.cfg.cond_drop > 0:  # classifier-free guidance
            drop = torch.rand(B, device=x0.device) < self.cfg.cond_drop
            labels = torch.where(drop[:, None], self._null(B), labels)
        t = torch.randint(0, self.cfg.num_train_timesteps, (B,), device=x0.device)
        noise = torch.randn_like(x0)
        a = self.alphas_cumprod[t].view(B, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise  # eq. 4
        pred = self.unet(xt, t, labels)
        kind = self.cfg.prediction_type
        target = {"epsilon": noise, "sample": x0,
                  "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0}[kind]  # fmt: skip
        per = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))  # (B,)
        if self.cfg.min_snr_gamma > 0:  # Hang et al. 2023, eq. 7 and §3.4
            snr = (a / (1 - a)).view(B)
            clipped = snr.clamp(max=self.cfg.min_snr_gamma)
            weight = {"epsilon": clipped / snr, "sample": clipped,
                      "v_prediction": clipped / (snr + 1)}[kind]  # fmt: skip
            per = per * weight
        loss = per.mean()
        step.update("model", loss)
        return {"loss": loss.detach()}

    def denoise(self, x: Tensor, t: Tensor, labels: Tensor | None, guidance: float) -> Tensor:
        """The network's output at (x, t), guided (Ho & Salimans 2022, eq. 6) when
        ``guidance`` != 1 for a conditional model."""
        tt = t.expand(x.size(0)) if t.dim() == 0 else t
        if labels is None or guidance == 1.0:
            return self.unet(x, tt.to(x.device), labels)
        both = self.unet(torch.cat([x, x]), torch.cat([tt, tt]).to(x.device),
                         torch.cat([labels, self._null(len(x))]))  # fmt: skip
        cond, uncond = both.chunk(2)
        return uncond + guidance * (cond - uncond)

    @torch.no_grad()
    def generate(
        self,
        z: Tensor,
        labels: Tensor | None = None,
        scheduler: Any = None,
        steps: int | None = None,
        guidance: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Images (n, C, H, W) in [-1, 1] from starting noise z (n, z_dim) (x_T), by
        ``scheduler`` (a name or instance; default cfg.sampler) over ``steps`` steps."""
        self.check_labels(labels, z.size(0))
        c = self.cfg
        s = scheduler if scheduler is not None and not isinstance(scheduler, str) else (
            self.scheduler(scheduler)
        )  # fmt: skip
        s.set_timesteps(steps or c.sample_steps)
        x = z.to(self.device).view(-1, c.channels, c.image_size, c.image_size) * s.init_noise_sigma
        lab = None if labels is None else labels.to(self.device)
        w = c.guidance if guidance is None else guidance
        was = self.training
        self.eval()
        try:
            for t in s.timesteps:
                out = self.denoise(s.scale_model_input(x, t), t, lab, w)
                x = s.step(out, t, x, generator=generator).prev_sample
        finally:
            self.train(was)
        return x.clamp(-1.0, 1.0)

    def interpolate(self, z0: Tensor, z1: Tensor, steps: int) -> Tensor:
        from aigc.models.layers import slerp

        return slerp(z0, z1, torch.linspace(0, 1, steps))
