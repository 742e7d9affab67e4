"""The sampling loops that drive a scheduler: from noise or from a noised image
(SDEdit), and inpainting by RePaint. They know the network only as a function
``net(x, t) -> output`` in the scheduler's units, so a test can hand them an exact
denoiser."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from aigc.schedulers.base import Scheduler
from aigc.schedulers.ddim import DDIMScheduler
from aigc.schedulers.ddpm import DDPMScheduler, DiscreteScheduler

Net = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, int, Tensor], None]


def denoise_loop(
    net: Net,
    s: Scheduler,
    x: Tensor,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """x (a sample at ``s.timesteps[s.begin_index]``, set) stepped through the rest of
    the timesteps. callback(i, count, x0_estimate clamped to [-1, 1]) after each call."""
    taus = s.timesteps[s.begin_index :]
    for i, t in enumerate(taus):
        result = s.step(net(s.scale_model_input(x, t), t), t, x, generator=generator)
        x = result.prev_sample
        if callback is not None:
            est = result.pred_original_sample
            callback(i + 1, len(taus), (est if est is not None else x).clamp(-1.0, 1.0))
    return x


def img2img_begin(s: Scheduler, strength: float) -> int:
    """The index in ``s.timesteps`` (set) where image-to-image at ``strength`` in (0, 1]
    begins: the last round(strength * n) of the n steps run, at least one, as in
    diffusers' img2img pipelines (a rule with ``order`` calls per step begins at a
    step's first call). ValueError for a strength outside (0, 1]."""
    if isinstance(strength, bool) or not isinstance(strength, int | float):
        raise ValueError(f"strength={strength!r} must be a number in (0, 1]")
    if not 0 < strength <= 1:
        raise ValueError(f"strength={strength!r} must be in (0, 1]")
    n = s.num_inference_steps
    k = min(n, max(1, round(strength * n)))
    return s.order * (n - k)


def img2img_start(s: Scheduler, image: Tensor, noise: Tensor, strength: float) -> Tensor:
    """SDEdit (Meng et al. 2022, §3): ``image`` (B, ...) noised with ``noise`` to the
    level where ``strength``'s steps begin, and ``s`` set to begin there."""
    begin = img2img_begin(s, strength)
    s.set_begin_index(begin)
    return s.add_noise(image, noise, s.timesteps[begin].expand(image.size(0)))


def _randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``like``, from ``generator`` (on its device)."""
    device = generator.device if generator is not None else like.device
    z = torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype)
    return z.to(like.device)


def repaint_calls(total: int, jump_length: int, resample: int) -> int:
    """Network calls RePaint makes over ``total`` timesteps: each stretch of
    ``jump_length`` steps that ends before the last is walked ``resample`` times."""
    return total + (resample - 1) * jump_length * len(range(jump_length, total, jump_length))


def reconstruction_guided(
    net: Net, s: DiscreteScheduler, x: Tensor, t: Tensor, known: Tensor, keep: Tensor, weight: float
) -> Tensor:
    """The network's output at (x, t) with its x_0 estimate moved by reconstruction
    guidance (Ho et al. 2022, "Video Diffusion Models", eq. 7): by
    -weight sqrt(abar_t) / 2 times the gradient in x of the squared error of the x_0
    estimate on the ``keep`` region against ``known`` (each image's own sum). Unlike
    pasting alone, this lets what is kept steer the whole x_0 estimate, so a half digit
    is completed as the digit it begins. Builds a graph through ``net`` whatever the
    caller's grad mode, except in inference mode (pass tensors made outside it)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        out = net(s.scale_model_input(xg, t), t)
        err = (keep * (known - s.x0_estimate(out, t, xg))).square().sum()
        (grad,) = torch.autograd.grad(err, xg)
    a = float(s.alphas_cumprod[int(t)])
    return s.move_x0(out.detach(), t, -weight * math.sqrt(a) / 2 * grad)


def repaint(
    net: Net,
    s: Scheduler,
    image: Tensor,
    mask: Tensor,
    noise: Tensor,
    generator: torch.Generator | None = None,
    jump_length: int = 5,
    resample: int = 5,
    callback: Callback | None = None,
    reconstruction: float = 0.0,
) -> Tensor:
    """The region of ``image`` (B, C, H, W) where ``mask`` (B, 1 or C, H, W) is true (or
    >= 0.5) filled by RePaint (Lugmayr et al. 2022, Algorithm 1) with ``s`` (timesteps
    set), starting from ``noise`` (B, C, H, W). Every step is followed by the known
    region noised to the new level (line 5) pasted in (line 7); after every
    ``jump_length`` steps but the last, the sample goes back that many steps through
    the forward process q(x_t | x_t-1) (line 8) and is denoised again, ``resample``
    times in all (§4.2). Going back needs a rule that steps by timestep value (ddpm,
    ddim); a counting one takes resample=1, the plain replacement method. The known
    pixels come back exactly as given. ``reconstruction`` > 0 adds reconstruction
    guidance of that weight to every step (see `reconstruction_guided`; ddpm or ddim),
    at about three network calls' cost per step. ValueError for a bad mask or setting."""
    if mask.dim() != image.dim() or mask.size(0) != image.size(0) or (
        mask.shape[2:] != image.shape[2:] or mask.size(1) not in (1, image.size(1))
    ):  # fmt: skip
        raise ValueError(
            f"mask must be {(image.size(0), 1, *image.shape[2:])} like the image, "
            f"got {tuple(mask.shape)}"
        )
    for name, v in (("jump_length", jump_length), ("resample", resample)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be an integer >= 1")
    if resample > 1 and not isinstance(s, DDPMScheduler | DDIMScheduler):
        raise ValueError(
            f"resampling goes back in time, which {type(s).__name__} cannot (it counts its "
            "steps): use ddpm or ddim, or resample=1"
        )
    if isinstance(reconstruction, bool) or not isinstance(reconstruction, int | float) or not (
        0 <= reconstruction < math.inf
    ):  # fmt: skip
        raise ValueError(f"reconstruction={reconstruction!r} must be a number >= 0")
    if reconstruction > 0 and not isinstance(s, DDPMScheduler | DDIMScheduler):
        raise ValueError(
            f"reconstruction guidance needs an x_0 estimate in the schedule's units, which "
            f"{type(s).__name__} does not give: use ddpm or ddim"
        )
    fill = (mask.float() >= 0.5).to(image.dtype)
    keep = 1.0 - fill
    taus = s.timesteps
    total = len(taus)
    count = repaint_calls(total, jump_length, resample)
    jumps = {i: resample - 1 for i in range(jump_length, total, jump_length)}
    x = noise * s.init_noise_sigma
    pos = calls = 0  # x is at the level of taus[pos]; pos == total: clean
    while pos < total:
        t = taus[pos]
        if reconstruction > 0:
            out = reconstruction_guided(net, s, x, t, image, keep, reconstruction)
        else:
            out = net(s.scale_model_input(x, t), t)
        result = s.step(out, t, x, generator=generator)
        pos, calls = pos + 1, calls + 1
        if pos < total:  # line 5: the known region at the new level
            known = s.add_noise(image, _randn(image, generator), taus[pos].expand(len(image)))
        else:
            known = image
        x = keep * known + fill * result.prev_sample  # line 7
        if callback is not None:
            est = result.pred_original_sample
            est = x if est is None else keep * image + fill * est
            callback(calls, count, est.clamp(-1.0, 1.0))
        if jumps.get(pos, 0) > 0:  # line 8, jump_length times
            jumps[pos] -= 1
            for _ in range(jump_length):
                r = float(s.alphas_cumprod[int(taus[pos - 1])] / s.alphas_cumprod[int(taus[pos])])
                x = math.sqrt(r) * x + math.sqrt(1 - r) * _randn(x, generator)
                pos -= 1
    return keep * image + fill * x.clamp(-1.0, 1.0)
