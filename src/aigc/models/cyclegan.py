"""CycleGAN: unpaired image-to-image translation between two domains A and B
(Zhu et al. 2017, "Unpaired Image-to-Image Translation using Cycle-Consistent
Adversarial Networks").

Two generators, G_ab: A -> B and G_ba: B -> A, and two PatchGAN critics, D_b (is this
a real B image?) and D_a. With no pairs to compare against, each generator is held to
its input by cycle consistency: G_ba(G_ab(a)) should give back a and G_ab(G_ba(b))
should give back b. The paper's defaults are kept:

- generator (§4 and App. 7.2): c7s1-w, d2w, d4w, R4w x ``blocks``, u2w, uw, c7s1-C:
  reflection-padded 7x7 convolutions at both ends, two stride-2 convolutions down and
  two transposed ones up, residual blocks between them, instance norm and ReLU, tanh
  out (Johnson et al. 2016's network); 9 blocks for 256-pixel images, 6 for 128;
- critics: the 70x70 PatchGAN (models.layers.PatchDiscriminator);
- least-squares adversarial losses (Mao et al. 2017) instead of the log likelihood;
- loss of the generators: L_GAN(G_ab, D_b) + L_GAN(G_ba, D_a) + lambda * L_cyc with
  lambda = ``cycle_weight`` = 10 (eq. 3, L1 cycle loss of eq. 2), plus the identity
  loss of §5.2, ``identity_weight`` * lambda * (|G_ab(b) - b| + |G_ba(a) - a|), with
  0.5 as the paper's code does, which keeps colours;
- the critics see a history of generated images, a pool of the latest ``pool_size``
  = 50 (Shrivastava et al. 2017): each new fake is stored, and with probability 1/2
  the critic sees an older one in its place. The pools are buffers of the model, so a
  checkpoint carries them and a resumed run continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from aigc.errors import ConfigError
from aigc.models.layers import (
    PatchDiscriminator,
    check_int,
    check_weights,
    least_squares_critic_loss,
    least_squares_generator_loss,
)

DIRECTIONS = ("a2b", "b2a")


@dataclass
class CycleGANConfig:
    image_size: int = 0  # training images' side; 0 = set from the data
    channels: int = 0  # of both domains; 0 = set from the data
    width: int = 64  # the generators' first width (w above)
    blocks: int = 9  # residual blocks (the paper: 9 at 256 pixels, 6 at 128 and below)
    downsample: int = 2  # stride-2 convolutions down (and transposed ones up)
    d_width: int = 64  # the critics' first width
    d_layers: int = 3  # the critics' strided layers (3: 70x70 patches; 2: 34x34)
    cycle_weight: float = 10.0  # lambda of the cycle loss (eq. 3)
    identity_weight: float = 0.5  # the identity loss, as a multiple of lambda; 0 = off
    pool_size: int = 50  # generated images each critic's history holds; 0 = none

    def validate(self) -> None:
        for key, low in (("image_size", 0), ("channels", 0), ("width", 1), ("blocks", 0),
                         ("downsample", 0), ("d_width", 1), ("d_layers", 1),
                         ("pool_size", 0)):  # fmt: skip
            check_int(f"model.{key}", getattr(self, key), low)
        check_weights(self, ("cycle_weight", "identity_weight"))
        if self.image_size and self.image_size % 2**self.downsample:
            raise ConfigError(
                f"model.downsample={self.downsample} halves the image {self.downsample} times: "
                f"image_size={self.image_size} must be a multiple of {2**self.downsample}"
            )
        if self.image_size and self.image_size < 2 ** (self.d_layers + 2):
            raise ConfigError(
                f"model.d_layers={self.d_layers} halves {self.image_size}-pixel images below "
                f"one patch; use model.d_layers={max(1, self.image_size.bit_length() - 4)}"
            )


class ResnetBlock(nn.Module):
    """x + IN(conv(relu(IN(conv(x))))), 3x3 convolutions with reflection padding."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(width, width, 3),
            nn.InstanceNorm2d(width),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(width, width, 3),
            nn.InstanceNorm2d(width),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class ResnetGenerator(nn.Module):
    """Image (B, C, H, W) in [-1, 1] -> image (B, C, H, W) in [-1, 1]; H and W multiples
    of 2^downsample. Instance norm (no affine, as the paper's code) makes every image
    independent of the others in its batch."""

    def __init__(self, channels: int, width: int, blocks: int, downsample: int) -> None:
        super().__init__()
        mods: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(channels, width, 7),
            nn.InstanceNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        ch = width
        for _ in range(downsample):  # d2w, d4w: 3x3, stride 2
            mods += [nn.Conv2d(ch, ch * 2, 3, 2, 1), nn.InstanceNorm2d(ch * 2), nn.ReLU(True)]
            ch *= 2
        mods += [ResnetBlock(ch) for _ in range(blocks)]
        for _ in range(downsample):  # u2w, uw: 3x3 transposed, stride 1/2
            mods += [
                nn.ConvTranspose2d(ch, ch // 2, 3, 2, 1, output_padding=1),
                nn.InstanceNorm2d(ch // 2),
                nn.ReLU(True),
            ]
            ch //= 2
        mods += [nn.ReflectionPad2d(3), nn.Conv2d(ch, channels, 7), nn.Tanh()]
        self.net = nn.Sequential(*mods)
        for m in self.modules():  # N(0, 0.02) as the CycleGAN code
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ImagePool(nn.Module):
    """The critic's history of generated images (Shrivastava et al. 2017, §2.3), as the
    CycleGAN code keeps it: until full, every new image is stored and returned; then
    each is, with probability 1/2, swapped for a random stored one (which is returned
    and replaced by it). Randomness from torch's global generator on the CPU, which the
    trainer seeds per step."""

    def __init__(self, size: int, channels: int, image_size: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("images", torch.zeros(size, channels, image_size, image_size))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def query(self, fakes: Tensor) -> Tensor:
        """fakes (B, C, H, W) -> what the critic sees (B, C, H, W), detached."""
        fakes = fakes.detach()
        if self.size == 0 or fakes.shape[1:] != self.images.shape[1:]:
            return fakes
        out = fakes.clone()
        coin = torch.rand(len(fakes)).tolist()
        pick = torch.randint(self.size, (len(fakes),)).tolist()
        for i in range(len(fakes)):
            n = int(self.count)
            if n < self.size:
                self.images[n] = fakes[i].to(self.images.dtype)
                self.count += 1
            elif coin[i] > 0.5:
                out[i] = self.images[pick[i]].to(out.dtype)
                self.images[pick[i]] = fakes[i].to(self.images.dtype)
        return out


class CycleGAN(nn.Module):
    """Two generators (``g_ab``, ``g_ba``), two critics (``d_a``, ``d_b``), two pools."""

    directions = DIRECTIONS

    def __init__(self, cfg: CycleGANConfig) -> None:
        super().__init__()
        cfg.validate()
        if cfg.channels < 1 or cfg.image_size < 1:
            raise ConfigError("model.channels and model.image_size: set them from the data")
        self.cfg = cfg
        c = cfg.channels
        self.g_ab = ResnetGenerator(c, cfg.width, cfg.blocks, cfg.downsample)
        self.g_ba = ResnetGenerator(c, cfg.width, cfg.blocks, cfg.downsample)
        self.d_a = PatchDiscriminator(c, cfg.d_width, cfg.d_layers)
        self.d_b = PatchDiscriminator(c, cfg.d_width, cfg.d_layers)
        self.pool_a = ImagePool(cfg.pool_size, c, cfg.image_size)
        self.pool_b = ImagePool(cfg.pool_size, c, cfg.image_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def multiple(self) -> int:
        """Input sides must be multiples of this (the generators' downsampling)."""
        return 2**self.cfg.downsample

    def param_groups(self) -> dict[str, dict[str, Any]]:
        """The generators ("model") and the critics ("critic"): Adam betas (0.5, 0.999)
        as the paper, no weight decay."""
        spec = {"betas": (0.5, 0.999), "weight_decay": 0.0}
        gens = [*self.g_ab.parameters(), *self.g_ba.parameters()]
        critics = [*self.d_a.parameters(), *self.d_b.parameters()]
        return {"model": {"params": gens, **spec}, "critic": {"params": critics, **spec}}

    def translate(self, x: Tensor, direction: str = "a2b") -> Tensor:
        """Images of one domain (B, C, H, W) in [-1, 1] -> the other's, "a2b" or "b2a"."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction={direction!r}: choose a2b or b2a")
        return (self.g_ab if direction == "a2b" else self.g_ba)(x)

    def training_step(self, batch: Any, step: Any) -> dict[str, Tensor]:
        """One update of both generators, then of both critics (the order of the paper's
        code; the critics judge the fakes made before the generators' update).
        batch["a"], batch["b"]: (B, C, H, W) in [-1, 1], unpaired. Returns detached
        scalars: loss (the generators'), adversarial, cycle, identity, critic."""
        a, b = batch["a"], batch["b"]
        cfg = self.cfg
        fake_b, fake_a = self.g_ab(a), self.g_ba(b)
        adversarial = least_squares_generator_loss(self.d_b(fake_b))
        adversarial = adversarial + least_squares_generator_loss(self.d_a(fake_a))
        cycle = (self.g_ba(fake_b) - a).abs().float().mean() + (
            self.g_ab(fake_a) - b
        ).abs().float().mean()
        loss = adversarial + cfg.cycle_weight * cycle
        stats: dict[str, Tensor] = {}
        if cfg.identity_weight > 0:
            identity = (self.g_ab(b) - b).abs().float().mean() + (
                self.g_ba(a) - a
            ).abs().float().mean()
            loss = loss + cfg.identity_weight * cfg.cycle_weight * identity
            stats["identity"] = identity.detach()
        step.update("model", loss)
        critic = least_squares_critic_loss(self.d_a(a), self.d_a(self.pool_a.query(fake_a)))
        critic = critic + least_squares_critic_loss(
            self.d_b(b), self.d_b(self.pool_b.query(fake_b))
        )
        step.update("critic", critic)
        return {"loss": loss.detach(), "adversarial": adversarial.detach(),
                "cycle": cycle.detach(), "critic": critic.detach(), **stats}  # fmt: skip
