"""A small non-autoregressive text-to-speech model in the manner of FastSpeech (Ren et
al. 2019), with the durations taken from the synthesiser that made the training
speech instead of from a teacher model.

Phones (and the voice) go through a convolutional encoder; a duration predictor says
how many frames each phone lasts; each phone's encoding is repeated that many times
(the length regulator), told where in its phone each frame is, and a convolutional
decoder turns the frames into log-mel magnitudes, which Griffin-Lim turns into sound.
Training uses the true durations and an L1 loss on the log-mel frames plus a squared
loss on log durations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aigc.errors import ConfigError

LOG_MEL_FLOOR = -9.0  # log-mel targets are floored here (about 80 dB below speech peaks)


@dataclass
class TTSConfig:
    n_phones: int = 47  # the phone set and the padding index 0; set from the data
    n_voices: int = 4  # set from the data
    n_mels: int = 64
    width: int = 192
    encoder_layers: int = 3
    decoder_layers: int = 4
    kernel: int = 5
    dropout: float = 0.1
    duration_weight: float = 1.0

    def validate(self) -> None:
        for key in ("n_phones", "n_voices", "n_mels", "width", "encoder_layers",
                    "decoder_layers", "kernel"):  # fmt: skip
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"model.{key}={v!r} must be a positive integer")
        if self.kernel % 2 == 0:
            raise ConfigError(f"model.kernel={self.kernel} must be odd (centred convolutions)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")


class _ConvBlock(nn.Module):
    """Residual: conv (same length) -> ReLU -> LayerNorm over channels -> dropout."""

    def __init__(self, width: int, kernel: int, dropout: float) -> None:
        super().__init__()
        self.conv = nn.Conv1d(width, width, kernel, padding=kernel // 2)
        self.norm = nn.LayerNorm(width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # (B, L, C), (B, L) bool
        h = F.relu(self.conv((x * mask[..., None]).transpose(1, 2))).transpose(1, 2)
        return x + self.drop(self.norm(h))


def regulate(h: Tensor, durations: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each phone's row of h (B, L, C) repeated durations (B, L) times: (B, T, C) frames,
    their mask (B, T) and each frame's place in its phone ((k + 0.5) / duration)."""
    durations = durations.clamp_min(0).long()
    total = durations.sum(1)
    T = max(int(total.max()), 1)
    frames = torch.zeros(h.size(0), T, h.size(2), dtype=h.dtype, device=h.device)
    place = torch.zeros(h.size(0), T, dtype=h.dtype, device=h.device)
    for b in range(h.size(0)):
        idx = torch.repeat_interleave(torch.arange(h.size(1), device=h.device), durations[b])
        n = len(idx)
        frames[b, :n] = h[b, idx]
        starts = torch.cumsum(durations[b], 0) - durations[b]
        k = torch.arange(n, device=h.device) - starts[idx]
        place[b, :n] = (k.to(h.dtype) + 0.5) / durations[b, idx].to(h.dtype)
    mask = torch.arange(T, device=h.device)[None] < total[:, None]
    return frames, mask, place


class PhoneTTS(nn.Module):
    """phones (B, L) long (0 = padding), voice (B,) long -> log-mel frames."""

    def __init__(self, cfg: TTSConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        w = cfg.width
        self.phone = nn.Embedding(cfg.n_phones, w, padding_idx=0)
        self.voice = nn.Embedding(cfg.n_voices, w)
        self.encoder = nn.ModuleList(_ConvBlock(w, cfg.kernel, cfg.dropout)
                                     for _ in range(cfg.encoder_layers))  # fmt: skip
        self.duration = nn.ModuleList(_ConvBlock(w, 3, cfg.dropout) for _ in range(2))
        self.duration_out = nn.Linear(w, 1)
        self.place = nn.Linear(1, w)
        self.decoder = nn.ModuleList(_ConvBlock(w, cfg.kernel, cfg.dropout)
                                     for _ in range(cfg.decoder_layers))  # fmt: skip
        self.out = nn.Linear(w, cfg.n_mels)

    def encode(self, phones: Tensor, voice: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Encodings (B, L, C), mask (B, L) and predicted log(1 + frames) (B, L)."""
        mask = phones > 0
        h = self.phone(phones) + self.voice(voice)[:, None]
        for block in self.encoder:
            h = block(h, mask)
        d = h
        for block in self.duration:
            d = block(d, mask)
        log_dur = self.duration_out(d).squeeze(-1) * mask
        return h, mask, log_dur

    def decode(self, h: Tensor, durations: Tensor) -> tuple[Tensor, Tensor]:
        """Log-mel (B, T, n_mels) and frame mask (B, T) for phone encodings and durations."""
        frames, mask, place = regulate(h, durations)
        x = frames + self.place(place[..., None])
        for block in self.decoder:
            x = block(x, mask)
        return self.out(x) * mask[..., None] + LOG_MEL_FLOOR * ~mask[..., None], mask

    def forward(self, phones: Tensor, voice: Tensor, durations: Tensor) -> Tensor:
        h, _, _ = self.encode(phones, voice)
        return self.decode(h, durations)[0]

    def predict_durations(self, phones: Tensor, voice: Tensor, speed: float = 1.0) -> Tensor:
        """Frames per phone (B, L), at least 1 for every real phone; ``speed`` above 1
        says it faster."""
        _, mask, log_dur = self.encode(phones, voice)
        frames = torch.round(torch.expm1(log_dur).clamp_min(0) / speed)
        return (frames.clamp_min(1) * mask).long()

    @torch.no_grad()
    def synthesise(
        self, phones: Tensor, voice: Tensor, speed: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """Log-mel (B, T, n_mels) and the durations (B, L) it used."""
        durations = self.predict_durations(phones, voice, speed)
        h, _, _ = self.encode(phones, voice)
        return self.decode(h, durations)[0], durations

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"model": list(self.parameters())}

    def losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        h, mask, log_dur = self.encode(batch["phones"], batch["voice"])
        mel, frame_mask = self.decode(h, batch["durations"])
        target = batch["mel"][:, : mel.size(1)].clamp_min(LOG_MEL_FLOOR)
        m = frame_mask[..., None].to(mel.dtype)
        mel_loss = ((mel - target).abs() * m).sum() / (m.sum() * mel.size(-1)).clamp_min(1)
        true_log = torch.log1p(batch["durations"].to(log_dur.dtype))
        dur_loss = ((log_dur - true_log).square() * mask).sum() / mask.sum().clamp_min(1)
        return {"mel_loss": mel_loss, "duration_loss": dur_loss}

    def training_step(self, batch: dict[str, Tensor], step: Any) -> dict[str, Tensor]:
        parts = self.losses(batch)
        loss = parts["mel_loss"] + self.cfg.duration_weight * parts["duration_loss"]
        step.update("model", loss)
        return {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()}}
