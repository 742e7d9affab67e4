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
al. 2023: min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v); or
EDM's preconditioned denoiser (Karras et al. 2022, Table 1): D(x; sigma) = c_skip x +
c_out F(c_in x, c_noise), trained at log-normal sigmas with the weight lambda(sigma) =
1 / c_out^2. Whatever the objective, the model answers schedulers in the same units
(VP input at a training timestep, output in the scheduler's parameterisation), so every
scheduler samples every model.

Text-to-image: a caption's tokens are encoded by a small bidirectional Transformer
trained with the U-Net, or by a frozen aigc GPT (model.text_encoder, as DALL-E 2 and
Imagen use a frozen pretrained text encoder); the U-Net reads the token states through
cross-attention at the low resolutions and their mean through the time embedding
(Imagen, Saharia et al. 2022, §2.1 and App. F). Captions are dropped to the empty
caption with probability ``cond_drop`` for classifier-free guidance, and a negative
prompt takes the empty caption's place at sampling.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
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
from aigc.schedulers.loops import denoise_loop, img2img_start, repaint

# Rows per U-Net call when sampling on a CPU: a batch that stays in the caches runs 2.6x
# faster per image than 500 rows at once (benchmarks/diffusion_sample.py --net-batch)
CPU_NET_BATCH = 64


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
    preconditioning: str = "none"  # "edm": Karras et al. 2022's denoiser and sigma law
    sigma_data: float = 0.5  # EDM: the data's standard deviation
    p_mean: float = -1.2  # EDM: training ln(sigma) ~ N(p_mean, p_std^2)
    p_std: float = 1.2
    text: bool = False  # condition on captions (text-to-image)
    text_encoder: str = ""  # "" = a Transformer trained with the U-Net; or a GPT run (frozen)
    text_width: int = 128  # the trained text encoder's width
    text_layers: int = 2
    text_heads: int = 4
    text_context: int = 0  # tokens per caption, the start token included; 0 = from the data
    text_vocab_size: int = 0  # set from the run's tokenizer
    text_start_id: int = -1  # the token every caption starts with; set from the tokenizer
    text_gpt: dict[str, Any] = field(default_factory=dict)  # the frozen GPT's config (set)
    cross_attn_resolutions: list[int] = field(default_factory=lambda: [16, 8])
    # channels of an image the model is conditioned on, concatenated to x_t (SR3, Saharia
    # et al. 2021: the upsampled low-resolution image; Palette: any damaged image); 0 = none
    cond_channels: int = 0
    # an inpainting model: the condition is the image with the region to fill blanked and
    # the mask (cond_channels = channels + 1), as Stable Diffusion's inpainting model
    inpainting: bool = False

    @property
    def z_dim(self) -> int:
        """The size of the starting noise x_T, flattened (the latent of this model)."""
        return self.channels * self.image_size**2

    def validate(self) -> None:
        check_choices(self, {"beta_schedule": BETA_SCHEDULES, "prediction_type": PREDICTION_TYPES,
                             "preconditioning": PRECONDITIONINGS})  # fmt: skip
        for key, low in (("image_size", 0), ("channels", 0), ("width", 1), ("num_res_blocks", 1),
                         ("groups", 1), ("num_train_timesteps", 2), ("sample_steps", 1),
                         ("cond_channels", 0)):  # fmt: skip
            check_int(f"model.{key}", getattr(self, key), low)
        for key in ("dropout", "cond_drop", "min_snr_gamma", "guidance", "sigma_data", "p_std"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"model.{key}={value!r} must be a number >= 0")
        if not isinstance(self.conditional, bool):
            raise ConfigError(f"model.conditional={self.conditional!r} must be true or false")
        if self.num_classes and not self.conditional:
            raise ConfigError("model.num_classes is set but model.conditional=false")
        if not isinstance(self.text, bool):
            raise ConfigError(f"model.text={self.text!r} must be true or false")
        if not isinstance(self.inpainting, bool):
            raise ConfigError(f"model.inpainting={self.inpainting!r} must be true or false")
        if self.inpainting and self.cond_channels not in (0, self.channels + 1):
            raise ConfigError(
                f"model.inpainting=true reads the masked image and the mask: "
                f"model.cond_channels must be {self.channels + 1} (or 0, set from the data), "
                f"got {self.cond_channels}"
            )
        if self.text and self.conditional:
            raise ConfigError(
                "model.text=true and model.conditional=true: condition on captions or on "
                "class labels, not both (captions can name the class)"
            )
        if self.text_encoder and not self.text:
            raise ConfigError("model.text_encoder is set but model.text=false")
        for key in ("text_width", "text_layers", "text_heads"):
            check_int(f"model.{key}", getattr(self, key), 1)
        if self.text_width % self.text_heads:
            raise ConfigError(
                f"model.text_width={self.text_width} must be a multiple of model.text_heads"
            )
        if self.preconditioning == "edm" and (
            self.prediction_type != "epsilon" or self.min_snr_gamma
        ):
            raise ConfigError(
                "model.preconditioning=edm trains EDM's own target and weight; leave "
                "model.prediction_type and model.min_snr_gamma at their defaults"
            )
        if self.preconditioning == "edm" and self.sigma_data <= 0:
            raise ConfigError(f"model.sigma_data={self.sigma_data} must be > 0")
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
        if self.inpainting and self.cond_channels != self.channels + 1:
            raise ConfigError("model.cond_channels of an inpainting model is set from the data")
        if self.text and (self.text_vocab_size < 1 or self.text_context < 2):
            raise ConfigError(
                "model.text_vocab_size and model.text_context are set from the run's "
                "tokenizer and captions; build the model through its task"
            )


PRECONDITIONINGS = ("none", "edm")


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


class CrossAttention(nn.Module):
    """Multi-head attention from the H*W positions (queries) to a caption's token states
    (keys and values), with a residual; padding tokens are masked out."""

    def __init__(self, channels: int, context_dim: int, groups: int) -> None:
        super().__init__()
        self.heads = max(1, channels // 32)
        self.norm = nn.GroupNorm(groups, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, context: TextContext) -> Tensor:
        B, C, H, W = x.shape
        nh = self.heads
        q = self.q(self.norm(x)).reshape(B, nh, C // nh, H * W).transpose(2, 3)  # (B, nh, HW, c)
        L = context.states.size(1)
        k, v = self.kv(context.states).reshape(B, L, 2, nh, C // nh).permute(2, 0, 3, 1, 4)
        mask = context.mask[:, None, None, :]  # (B, 1, 1, L): True = attend
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, HW, c)
        return x + self.out(h.transpose(2, 3).reshape(B, C, H, W))


@dataclass
class TextContext:
    """An encoded caption batch: token states (B, L, D), mask (B, L) True for real tokens
    (at least one per row), and their mean (B, D)."""

    states: Tensor
    mask: Tensor
    pooled: Tensor

    @classmethod
    def of(cls, states: Tensor, mask: Tensor) -> TextContext:
        m = mask[..., None].to(states.dtype)
        return cls(states, mask, (states * m).sum(1) / m.sum(1).clamp(min=1.0))

    def cat(self, other: TextContext) -> TextContext:
        """Both batches in one, the shorter padded (masked out) to the longer length."""
        L = max(self.states.size(1), other.states.size(1))

        def pad(c: TextContext) -> tuple[Tensor, Tensor]:
            extra = L - c.states.size(1)
            return F.pad(c.states, (0, 0, 0, extra)), F.pad(c.mask, (0, extra), value=False)

        (s1, m1), (s2, m2) = pad(self), pad(other)
        return TextContext(torch.cat([s1, s2]), torch.cat([m1, m2]),
                           torch.cat([self.pooled, other.pooled]))  # fmt: skip

    def rows(self, start: int, stop: int) -> TextContext:
        return TextContext(self.states[start:stop], self.mask[start:stop], self.pooled[start:stop])


class TextEncoder(nn.Module):
    """A small bidirectional Transformer (pre-norm, GELU) over caption tokens, trained
    with the U-Net. ids (B, L) int64 with -1 = padding -> TextContext."""

    def __init__(self, cfg: DiffusionConfig) -> None:
        super().__init__()
        d = cfg.text_width
        self.tok = nn.Embedding(cfg.text_vocab_size, d)
        self.pos = nn.Parameter(torch.randn(cfg.text_context, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, cfg.text_heads, 4 * d, cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)  # fmt: skip
        self.blocks = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.dim = d

    def forward(self, ids: Tensor) -> TextContext:
        mask = ids >= 0
        h = self.tok(ids.clamp(min=0)) + self.pos[: ids.size(1)]  # (B, L, D)
        h = self.norm(self.blocks(h, src_key_padding_mask=~mask))
        return TextContext.of(h, mask)


class FrozenGPTEncoder(nn.Module):
    """A trained aigc GPT's final hidden states (after its last layer norm), never trained:
    its weights are copied from model.text_encoder into this run when it is made."""

    def __init__(self, gpt_config: dict[str, Any]) -> None:
        super().__init__()
        from aigc.models.gpt import GPT, GPTConfig

        self.gpt = GPT(GPTConfig(**gpt_config))
        self.dim = self.gpt.cfg.n_embd

    def forward(self, ids: Tensor) -> TextContext:
        mask = ids >= 0  # padding sits after the tokens: causal attention never sees it
        tr = self.gpt.transformer
        with torch.no_grad():
            x = tr.wte(ids.clamp(min=0)) + tr.wpe.weight[: ids.size(1)]
            for block in tr.h:
                x = block(x)
            return TextContext.of(tr.ln_f(x), mask)


def _run(block: nn.Module, h: Tensor, emb: Tensor, context: TextContext | None) -> Tensor:
    if isinstance(block, ResBlock):
        return block(h, emb)
    if isinstance(block, CrossAttention):
        return block(h, context)
    return block(h)


class UNet(nn.Module):
    """x_t (B, C, H, W), timesteps (B,), labels (B, A) or None, a TextContext or None,
    an image condition (B, cond_channels, H, W) or None -> (B, C, H, W)."""

    def __init__(self, cfg: DiffusionConfig, num_classes: list[int], context_dim: int = 0) -> None:
        super().__init__()
        w, g = cfg.width, cfg.groups
        t_dim = 4 * w
        self.time_mlp = nn.Sequential(nn.Linear(w, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        # one row more per attribute: the "null" label of classifier-free guidance
        self.label_tables = nn.ModuleList(nn.Embedding(n + 1, t_dim) for n in num_classes)
        if context_dim:  # the caption's mean joins the time embedding (Imagen App. F)
            self.text_pool = nn.Sequential(nn.LayerNorm(context_dim), nn.Linear(context_dim, t_dim))

        def attention(c: int, res: int) -> list[nn.Module]:
            out: list[nn.Module] = []
            if res in cfg.attn_resolutions:
                out.append(AttentionBlock(c, g))
            if context_dim and res in cfg.cross_attn_resolutions:
                out.append(CrossAttention(c, context_dim, g))
            return out

        self.inp = nn.Conv2d(cfg.channels + cfg.cond_channels, w, 3, padding=1)
        self.down = nn.ModuleList()
        chans, c, res = [w], w, cfg.image_size
        for level, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                blocks = [ResBlock(c, w * mult, t_dim, g, cfg.dropout)]
                c = w * mult
                blocks += attention(c, res)
                self.down.append(nn.ModuleList(blocks))
                chans.append(c)
            if level < len(cfg.channel_mults) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(c, c, 3, stride=2, padding=1)]))
                chans.append(c)
                res //= 2
        mid_cross = [CrossAttention(c, context_dim, g)] if context_dim else []
        self.mid = nn.ModuleList(
            [ResBlock(c, c, t_dim, g, cfg.dropout), AttentionBlock(c, g), *mid_cross,
             ResBlock(c, c, t_dim, g, cfg.dropout)]
        )  # fmt: skip
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            for i in range(cfg.num_res_blocks + 1):
                blocks = [ResBlock(c + chans.pop(), w * mult, t_dim, g, cfg.dropout)]
                c = w * mult
                blocks += attention(c, res)
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

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        labels: Tensor | None = None,
        context: TextContext | None = None,
        cond: Tensor | None = None,
    ) -> Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.width))  # (B, 4w)
        for a, table in enumerate(self.label_tables):
            emb = emb + table(labels[:, a])
        if context is not None:
            emb = emb + self.text_pool(context.pooled)
        h = self.inp(x if cond is None else torch.cat([x, cond.to(x.dtype)], dim=1))
        skips = [h]
        for blocks in self.down:
            for b in blocks:
                h = _run(b, h, emb, context)
            skips.append(h)
        for b in self.mid:
            h = _run(b, h, emb, context)
        for blocks in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            for b in blocks:
                h = _run(b, h, emb, context)
        return self.out(h)


def inpainting_condition(image: Tensor, fill: Tensor) -> Tensor:
    """An inpainting model's condition (B, C + 1, H, W): the image with the region to fill
    set to 0 (mid-grey), then the mask (1 = fill). image (B, C, H, W) in [-1, 1], fill
    (B, 1, H, W) in {0, 1}."""
    return torch.cat([image * (1 - fill), fill], dim=1)


class Diffusion(LatentSampling, nn.Module):
    """The denoiser and the training schedule; ``generate`` runs a scheduler from noise.

    Conditions: ``labels`` (B, A) int64 for a class-conditional model; ``text`` (B, L)
    int64 caption tokens, -1 = padding, each row starting with ``cfg.text_start_id``,
    for a text-conditional one (the empty caption is the start token alone)."""

    def __init__(self, cfg: DiffusionConfig) -> None:
        super().__init__()
        cfg.validate()
        cfg.check_ready()
        self.cfg = cfg
        self.num_classes = list(cfg.num_classes) if cfg.conditional else []
        self.text_encoder: nn.Module | None = None
        if cfg.text:
            self.text_encoder = FrozenGPTEncoder(cfg.text_gpt) if cfg.text_gpt else TextEncoder(cfg)
        dim = self.text_encoder.dim if self.text_encoder is not None else 0
        self.unet = UNet(cfg, self.num_classes, context_dim=dim)
        abar = self.scheduler("ddpm").alphas_cumprod
        self.register_buffer("alphas_cumprod", abar.float(), persistent=False)
        # ln sigma_t of the training schedule, sigma_t = sqrt((1 - abar_t) / abar_t): the
        # noise level an EDM model reads at a scheduler's timestep t
        self.register_buffer("log_sigmas", (0.5 * ((1 - abar) / abar).log()).float(),
                             persistent=False)  # fmt: skip

    @property
    def device(self) -> torch.device:
        return self.unet.inp.weight.device

    def scheduler(self, name: str | None = None, **overrides: Any):
        """A scheduler of the training schedule: ``name`` (default cfg.sampler), clamping
        its x_0 estimates to the images' range. An EDM model answers with x_0 (the
        "sample" parameterisation)."""
        c = self.cfg
        kind = "sample" if c.preconditioning == "edm" else c.prediction_type
        # images live in [-1, 1]: every rule clamps its x_0 estimate. Unclamped, an
        # epsilon model's x_0 = x - sigma eps at sigma ~ 157 (the linear schedule's top)
        # left Euler's and DPM-Solver++'s digits speckled with noise
        kw = {"num_train_timesteps": c.num_train_timesteps, "beta_schedule": c.beta_schedule,
              "prediction_type": kind, "clip_sample": True, **overrides}  # fmt: skip
        return get_scheduler(name or c.sampler)(**kw)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """One group; a frozen GPT text encoder's weights are left out (never trained)."""
        frozen = isinstance(self.text_encoder, FrozenGPTEncoder)
        skip = {id(p) for p in self.text_encoder.parameters()} if frozen else set()
        return {"model": [p for p in self.parameters() if id(p) not in skip]}

    def _null(self, n: int) -> Tensor:
        return torch.tensor(self.num_classes, device=self.device).expand(n, -1)

    def null_text(self, n: int, length: int = 1) -> Tensor:
        """n empty captions (n, length): the start token, then padding."""
        ids = torch.full((n, length), -1, dtype=torch.long, device=self.device)
        ids[:, 0] = self.cfg.text_start_id
        return ids

    def encode_text(self, ids: Tensor) -> TextContext:
        """Caption tokens (B, L) -> their TextContext (check_text first for user input)."""
        return self.text_encoder(ids.to(self.device))

    def check_text(self, ids: Tensor | None, n: int) -> None:
        """ValueError unless ids suit n samples of this model (None for a non-text one)."""
        if not self.cfg.text:
            if ids is not None:
                raise ValueError("this model is not text-conditional; it takes no prompt")
            return
        if ids is None:
            return
        c = self.cfg
        if ids.dim() != 2 or ids.size(0) != n or not 1 <= ids.size(1) <= c.text_context:
            raise ValueError(f"text ids must be ({n}, L) with 1 <= L <= {c.text_context}")
        if ids.min() < -1 or ids.max() >= c.text_vocab_size or (ids[:, 0] < 0).any():
            raise ValueError(f"text ids must be in [0, {c.text_vocab_size}), -1 padding after")

    # -- the denoiser in a scheduler's units --------------------------------------
    def _precondition(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """c_skip, c_out, c_in, c_noise of EDM (Karras et al. 2022, Table 1), sigma (B,)."""
        sd = self.cfg.sigma_data
        s2 = sigma**2 + sd**2
        return sd**2 / s2, sigma * sd / s2.sqrt(), 1 / s2.sqrt(), sigma.log() / 4

    def _edm_net(
        self, x: Tensor, sigma: Tensor, labels, context, cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """F's output, c_skip and c_out at VE input x = x_0 + sigma n, sigma (B,)."""
        c_skip, c_out, c_in, c_noise = (v.view(-1, 1, 1, 1) for v in self._precondition(sigma))
        # c_noise = ln(sigma) / 4, times 1000 for the same sinusoidal embedding as t
        f = self.unet(c_in * x, 1000 * c_noise.view(-1), labels, context, cond)
        return f, c_skip, c_out

    def sigma_at(self, t: Tensor) -> Tensor:
        """sigma of the training schedule at (fractional) timesteps t (B,), interpolating
        ln sigma linearly between integer steps."""
        t = t.float().clamp(0, self.cfg.num_train_timesteps - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.cfg.num_train_timesteps - 1)
        w = t - lo.float()
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()

    def net(
        self, x: Tensor, t: Tensor, labels: Tensor | None, context, cond: Tensor | None = None
    ) -> Tensor:
        """The output a scheduler expects for VP input x at timesteps t (B,): the network
        itself, or for an EDM model its x_0 estimate D(x sqrt(1 + sigma^2); sigma). On a
        CPU the rows go through in slices of CPU_NET_BATCH (each row's output is its own)."""
        k = CPU_NET_BATCH if x.device.type == "cpu" else 0
        if not k or len(x) <= k:
            return self._net(x, t, labels, context, cond)
        return torch.cat([
            self._net(x[i : i + k], t[i : i + k], None if labels is None else labels[i : i + k],
                      None if context is None else context.rows(i, i + k),
                      None if cond is None else cond[i : i + k])
            for i in range(0, len(x), k)
        ])  # fmt: skip

    def _net(
        self, x: Tensor, t: Tensor, labels: Tensor | None, context, cond: Tensor | None
    ) -> Tensor:
        if self.cfg.preconditioning != "edm":
            return self.unet(x, t, labels, context, cond)
        sigma = self.sigma_at(t.to(x.device))
        ve = x * (1 + sigma**2).sqrt().view(-1, 1, 1, 1)
        f, c_skip, c_out = self._edm_net(ve, sigma, labels, context, cond)
        return c_skip * ve + c_out * f

    def check_cond(self, cond: Tensor | None, n: int) -> Tensor | None:
        """The image condition on the device; ValueError unless it suits n samples (None
        for a model without one)."""
        c = self.cfg
        if not c.cond_channels:
            if cond is not None:
                raise ValueError("this model is not conditioned on an image")
            return None
        shape = (n, c.cond_channels, c.image_size, c.image_size)
        if cond is None and c.inpainting:  # nothing kept: plain generation
            return inpainting_condition(
                torch.zeros(n, c.channels, c.image_size, c.image_size, device=self.device),
                torch.ones(n, 1, c.image_size, c.image_size, device=self.device),
            )
        if cond is None or tuple(cond.shape) != shape:
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(f"this model is conditioned on an image: pass cond {shape}, got {got}")
        return cond.to(self.device, torch.float32)

    # -- training --------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], step: Any) -> dict[str, Tensor]:
        """The denoising loss at uniformly drawn timesteps (Ho et al. 2020, Algorithm 1),
        or at log-normal sigmas for EDM (Karras et al. 2022, §5 and Table 1)."""
        x0 = batch["images"]
        B = x0.size(0)
        labels = batch.get("labels") if self.num_classes else None
        cond = batch["cond"] if self.cfg.cond_channels else None  # never dropped (SR3)
        drop = (
            torch.rand(B, device=x0.device) < self.cfg.cond_drop
            if self.cfg.cond_drop > 0 else torch.zeros(B, dtype=torch.bool, device=x0.device)
        )  # fmt: skip
        if labels is not None:  # classifier-free guidance: some conditions dropped
            labels = torch.where(drop[:, None], self._null(B), labels)
        context = None
        if self.cfg.text:
            ids = batch["text"]
            ids = torch.where(drop[:, None], self.null_text(B, ids.size(1)), ids)
            context = self.encode_text(ids)
        noise = torch.randn_like(x0)
        if self.cfg.preconditioning == "edm":
            c = self.cfg
            sigma = (torch.randn(B, device=x0.device) * c.p_std + c.p_mean).exp()
            xn = x0 + sigma.view(B, 1, 1, 1) * noise
            f, c_skip, c_out = self._edm_net(xn, sigma, labels, context, cond)
            # lambda(sigma) c_out^2 = 1: the weighted D-loss is F's plain MSE to its target
            target = (x0 - c_skip * xn) / c_out
            loss = ((f.float() - target.float()) ** 2).mean()
            step.update("model", loss)
            return {"loss": loss.detach()}
        t = torch.randint(0, self.cfg.num_train_timesteps, (B,), device=x0.device)
        a = self.alphas_cumprod[t].view(B, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise  # eq. 4
        pred = self.unet(xt, t, labels, context, cond)
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

    # -- sampling ----------------------------------------------------------------------
    def denoise(
        self,
        x: Tensor,
        t: Tensor,
        labels: Tensor | None,
        guidance: float | Tensor,
        context: TextContext | None = None,
        uncond: TextContext | None = None,
        cond: Tensor | None = None,
    ) -> Tensor:
        """The network's output at (x, t), guided (Ho & Salimans 2022, eq. 6) when
        ``guidance`` != 1 for a conditional model (a float, or (B,) one per row). For
        text, ``uncond`` is the empty caption's context, or a negative prompt's. ``cond``:
        the image condition (B, cond_channels, H, W) of an image-conditioned model, the
        same in both halves of a guided batch."""
        tt = (t.expand(x.size(0)) if t.dim() == 0 else t).to(x.device)
        if isinstance(guidance, Tensor):  # one scale per row (requests batched together)
            guidance = guidance.to(x.device, x.dtype).view(-1, *[1] * (x.dim() - 1))
        elif guidance == 1.0:
            return self.net(x, tt, labels, context, cond)
        if labels is None and context is None:
            return self.net(x, tt, labels, context, cond)
        cond2 = None if cond is None else torch.cat([cond, cond])
        if context is not None:
            both = self.net(torch.cat([x, x]), torch.cat([tt, tt]), None, context.cat(uncond),
                            cond2)  # fmt: skip
        else:
            both = self.net(torch.cat([x, x]), torch.cat([tt, tt]),
                            torch.cat([labels, self._null(len(x))]), None, cond2)  # fmt: skip
        cond, unc = both.chunk(2)
        return unc + guidance * (cond - unc)

    def _conditions(self, n: int, labels: Tensor | None, text: Tensor | None,
                    negative: Tensor | None) -> tuple[Tensor | None, Any, Any]:  # fmt: skip
        """Checked labels on the device, and the text and negative (or empty) contexts."""
        self.check_labels(labels, n)
        self.check_text(text, n)
        self.check_text(negative, n)
        lab = None if labels is None else labels.to(self.device)
        context = uncond = None
        if self.cfg.text:
            context = self.encode_text(text if text is not None else self.null_text(n))
            uncond = self.encode_text(negative if negative is not None else self.null_text(n))
        return lab, context, uncond

    @contextlib.contextmanager
    def _guided(self, n: int, labels: Tensor | None, text: Tensor | None,
                negative: Tensor | None, guidance: float | Tensor | None,
                cond: Tensor | None = None) -> Iterator[Any]:  # fmt: skip
        """In eval mode: the guided network net(x, t) for these conditions."""
        w = self.cfg.guidance if guidance is None else guidance
        was = self.training
        self.eval()
        try:
            lab, context, uncond = self._conditions(n, labels, text, negative)
            cond = self.check_cond(cond, n)
            yield lambda x, t: self.denoise(x, t, lab, w, context, uncond, cond)
        finally:
            self.train(was)

    def _as_scheduler(self, scheduler: Any) -> Any:
        if scheduler is not None and not isinstance(scheduler, str):
            return scheduler
        return self.scheduler(scheduler)

    def check_images(self, images: Tensor, n: int, what: str = "image") -> Tensor:
        """(n, C, H, W) of this model's size in [-1, 1] on the device; ValueError else."""
        c = self.cfg
        shape = (n, c.channels, c.image_size, c.image_size)
        if tuple(images.shape) != shape:
            raise ValueError(f"{what} must be {shape}, got {tuple(images.shape)}")
        if not bool(torch.isfinite(images).all()) or images.abs().max() > 1:
            raise ValueError(f"{what} values must be finite and in [-1, 1]")
        return images.to(self.device, torch.float32)

    @torch.no_grad()
    def generate(
        self,
        z: Tensor,
        labels: Tensor | None = None,
        scheduler: Any = None,
        steps: int | None = None,
        guidance: float | Tensor | None = None,
        generator: torch.Generator | None = None,
        text: Tensor | None = None,
        negative: Tensor | None = None,
        callback: Callable[[int, int, Tensor], None] | None = None,
        image: Tensor | None = None,
        strength: float = 1.0,
        cond: Tensor | None = None,
    ) -> Tensor:
        """Images (n, C, H, W) in [-1, 1] from starting noise z (n, z_dim) (x_T), by
        ``scheduler`` (a name or instance; default cfg.sampler) over ``steps`` steps.

        text (n, L): caption tokens for a text model (None: the empty caption);
        negative (n, L): a negative prompt's tokens, in the empty caption's place in
        guidance. callback(i, count, x0_estimate) after each of the scheduler's calls.

        image (n, C, H, W) in [-1, 1]: image-to-image (SDEdit, Meng et al. 2022): the
        image is noised (with z) to the level where the last ``strength`` of the steps
        begin, and only those run (see img2img_begin); strength 1 starts from almost
        pure noise, a small strength keeps the image's layout and colours.

        cond (n, cond_channels, H, W): the image an image-conditioned model (SR3) reads.
        """
        n = z.size(0)
        c = self.cfg
        s = self._as_scheduler(scheduler)
        s.set_timesteps(steps or c.sample_steps)
        noise = z.to(self.device).view(-1, c.channels, c.image_size, c.image_size)
        if image is None:
            x = noise * s.init_noise_sigma
        else:
            x = img2img_start(s, self.check_images(image, n), noise, strength)
        with self._guided(n, labels, text, negative, guidance, cond) as net:
            x = denoise_loop(net, s, x, generator, callback)
        return x.clamp(-1.0, 1.0)

    @torch.no_grad()
    def inpaint(
        self,
        image: Tensor,
        mask: Tensor,
        z: Tensor,
        labels: Tensor | None = None,
        scheduler: Any = "ddpm",
        steps: int | None = None,
        guidance: float | Tensor | None = None,
        generator: torch.Generator | None = None,
        text: Tensor | None = None,
        negative: Tensor | None = None,
        jump_length: int = 5,
        resample: int = 5,
        callback: Callable[[int, int, Tensor], None] | None = None,
        reconstruction: float = 0.0,
    ) -> Tensor:
        """The masked region of ``image`` (n, C, H, W) in [-1, 1] filled in by RePaint
        (Lugmayr et al. 2022, Algorithm 1), any run conditioned as for ``generate``.

        mask (n, 1, H, W) or (n, C, H, W): true (or >= 0.5) where to fill. After every
        step the known region is replaced by the image noised to that step's level
        (line 5 and 7), and every ``jump_length`` steps the sample jumps back that many
        steps through the forward process (line 8) to be denoised again, ``resample``
        times in all, so the filled region is harmonised with what is kept (§4.2).
        Jumping back needs a scheduler that steps by timestep value (ddpm, ddim); others
        take resample=1. The known pixels come back exactly as given. ``reconstruction``
        > 0 adds reconstruction guidance of that weight (aigc.schedulers.loops
        `reconstruction_guided`), which needs gradients and so runs outside inference
        mode whatever the caller's.

        An inpainting model (cfg.inpainting) reads the kept pixels and the mask instead
        and fills in one pass of the scheduler (``jump_length`` and ``resample`` unused).
        """
        n = z.size(0)
        c = self.cfg
        image = self.check_images(image, n)
        s = self._as_scheduler(scheduler)
        s.set_timesteps(steps or c.sample_steps)
        if c.inpainting:
            fill = (mask.to(self.device).float() >= 0.5).float()[:, :1].expand(n, 1, -1, -1)
            cond = inpainting_condition(image, fill)
            x = z.to(self.device).view_as(image) * s.init_noise_sigma
            with self._guided(n, labels, text, negative, guidance, cond) as net:
                x = denoise_loop(net, s, x, generator, callback)
            return (1 - fill) * image + fill * x.clamp(-1.0, 1.0)
        grads = torch.inference_mode(False) if reconstruction > 0 else contextlib.nullcontext()
        with grads, self._guided(n, labels, text, negative, guidance) as net:
            return repaint(net, s, image, mask.to(self.device), z.to(self.device).view_as(image),
                           generator, jump_length, resample, callback, reconstruction)  # fmt: skip

    def interpolate(self, z0: Tensor, z1: Tensor, steps: int) -> Tensor:
        from aigc.models.layers import slerp

        return slerp(z0, z1, torch.linspace(0, 1, steps))
