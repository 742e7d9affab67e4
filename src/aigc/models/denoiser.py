"""A spectral-mask speech denoiser: the noisy waveform's short-time spectrum goes in,
a gain in [0, 1] for every time-frequency bin comes out, and the masked spectrum with
the noisy phase goes back to a waveform. The network reads log-compressed magnitudes
through a stack of dilated 1-D convolutions over time (the frequency bins are the
channels) and, optionally, a GRU that carries context forward; it is trained on the
waveform's scale-invariant SDR, so what it optimises is what it is measured by."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aigc.errors import ConfigError


@dataclass
class DenoiserConfig:
    n_fft: int = 512  # 32 ms frames at 16 kHz
    hop: int = 128
    width: int = 256
    blocks: int = 4  # dilated residual convolutions, dilation 1, 2, 4, ...
    recurrent: bool = True  # a GRU after the convolutions
    min_gain: float = 0.0  # the floor of the mask (a little floor keeps some ambience)

    def validate(self) -> None:
        for key in ("n_fft", "hop", "width", "blocks"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"model.{key}={v!r} must be a positive integer")
        if self.hop > self.n_fft:
            raise ConfigError(f"model.hop={self.hop} must not exceed model.n_fft={self.n_fft}")
        if not 0.0 <= self.min_gain < 1.0:
            raise ConfigError(f"model.min_gain={self.min_gain} must be in [0, 1)")


def si_sdr_loss(estimate: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """Minus the mean scale-invariant SDR (dB) of rows of estimate against target,
    both (B, T), each centred (Le Roux et al. 2019)."""
    estimate = estimate - estimate.mean(-1, keepdim=True)
    target = target - target.mean(-1, keepdim=True)
    scale = (estimate * target).sum(-1, keepdim=True) / (
        target.square().sum(-1, keepdim=True) + eps
    )
    projection = scale * target
    noise = estimate - projection
    ratio = projection.square().sum(-1) / (noise.square().sum(-1) + eps)
    return -(10 * torch.log10(ratio + eps)).mean()


class _FrameNorm(nn.LayerNorm):
    """LayerNorm of each frame's channels: local in time, so a clip's result does not
    depend on how long the rest of the file is (chunked files come out the same)."""

    def forward(self, x: Tensor) -> Tensor:  # (B, C, frames)
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class _Block(nn.Module):
    def __init__(self, width: int, dilation: int) -> None:
        super().__init__()
        self.norm = _FrameNorm(width)
        self.conv = nn.Conv1d(width, width, 3, padding=dilation, dilation=dilation)
        self.out = nn.Conv1d(width, width, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.out(F.gelu(self.conv(self.norm(x))))


class MaskDenoiser(nn.Module):
    """``enhance(noisy (B, T)) -> (B, T)``; ``training_step`` reads ``noisy`` and
    ``clean`` (B, T) and minimises minus SI-SDR."""

    def __init__(self, cfg: DenoiserConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        bins = cfg.n_fft // 2 + 1
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)
        self.inp = nn.Conv1d(bins, cfg.width, 5, padding=2)
        self.blocks = nn.ModuleList(_Block(cfg.width, 2**i) for i in range(cfg.blocks))
        self.gru = nn.GRU(cfg.width, cfg.width, batch_first=True) if cfg.recurrent else None
        self.head = nn.Conv1d(cfg.width, bins, 1)

    def stft(self, wave: Tensor) -> Tensor:
        c = self.cfg
        return torch.stft(wave, c.n_fft, c.hop, window=self.window, return_complex=True)

    def mask(self, spec: Tensor) -> Tensor:
        """The gain (B, F, frames) in [min_gain, 1] for a complex spectrum (B, F, frames)."""
        x = self.inp(torch.log1p(spec.abs()))
        for block in self.blocks:
            x = block(x)
        if self.gru is not None:
            x = x + self.gru(x.transpose(1, 2))[0].transpose(1, 2)
        g = torch.sigmoid(self.head(F.gelu(x)))
        return self.cfg.min_gain + (1 - self.cfg.min_gain) * g

    def enhance(self, noisy: Tensor) -> Tensor:
        """The denoised waveform (B, T) of noisy (B, T)."""
        spec = self.stft(noisy)
        c = self.cfg
        return torch.istft(spec * self.mask(spec), c.n_fft, c.hop, window=self.window,
                           length=noisy.size(-1))  # fmt: skip

    def forward(self, noisy: Tensor) -> Tensor:
        return self.enhance(noisy)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"model": list(self.parameters())}

    def training_step(self, batch: dict[str, Tensor], step: Any) -> dict[str, Tensor]:
        loss = si_sdr_loss(self.enhance(batch["noisy"]), batch["clean"])
        step.update("model", loss)
        return {"loss": loss.detach()}
