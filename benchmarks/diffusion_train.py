"""Diffusion training speed: aigc's U-Net against diffusers' UNet2DModel, side by side.

Both train the ddpm-digits-cond recipe's model (class-conditional, 32×32×1, widths 32-64-64,
one residual block per resolution, single-head attention at 8×8, label dropout 0.1) on
scikit-learn's digits upsampled to 32×32 as aigc prepares them: batch 64, fp32, AdamW
(lr 2e-4, no weight decay), gradient clipping at 1, the epsilon objective at uniformly
drawn timesteps of a linear 1,000-step schedule, each library's own initialisation, and
no EMA (the recipe's 0.999 averages over more steps than a short run takes). The same
plain loop drives both, so the figures compare the two networks and their training
steps, not trainers:

- aigc: ``Diffusion.training_step`` with a step object that does what the trainer's
  ``Step.update`` does on one process (backward, clip, optimizer step);
- diffusers: ``UNet2DModel`` with a class embedding added to the time embedding (the
  same conditioning as aigc's; UNet2DConditionModel conditions through cross-attention
  on an encoder's hidden states, which this model has no use for) and
  ``DDPMScheduler.add_noise``, as diffusers' train_unconditional example, with labels
  dropped to a null class.

The diffusers network is built from aigc's config with the same block layout (see
``diffusers_unet``): its parameter count is printed beside aigc's. Each figure is the
median of --repeats alternating runs of --steps timed steps after --warmup steps.

With --wall SECONDS each library also trains a fresh model for that long, then samples
--judge-n images (the digits 0-9 in turn, the same starting noise for both) by 50-step
DDIM from its own scheduler with classifier-free guidance, and aigc's domain classifier
for digits (aigc.metrics.classifier) judges which digit each shows. --wall 0 skips it.

    python benchmarks/diffusion_train.py --steps 20 --repeats 5 --wall 120
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aigc.config import load_config
from aigc.data.images import image_grid, load_image_set, save_png, to_tensor, to_uint8
from aigc.models.diffusion import Diffusion, DiffusionConfig
from aigc.trainer import select_device
from machine import describe

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # diffusers with random weights: no downloads

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "ddpm-digits-cond.yaml"
# aigc's beta schedules by diffusers' names for them
DIFFUSERS_BETAS = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def recipe_config() -> DiffusionConfig:
    """The ddpm-digits-cond recipe's model, fitted to the digits as a run fits it."""
    cfg = load_config(RECIPE).model
    cfg.channels, cfg.num_classes = 1, [10]
    return cfg


def diffusers_unet(cfg: DiffusionConfig) -> nn.Module:
    """diffusers' UNet2DModel laid out as aigc's UNet for ``cfg``: the same widths per
    resolution, residual blocks per level (one more on the way up), attention at the
    same resolutions and in the middle (single-head: attention_head_dim None means one
    head of all channels), group norm groups, time embedding 4·width, and one class
    embedding (of the first attribute, plus the null class) added to it."""
    from diffusers import UNet2DModel

    widths = [cfg.width * m for m in cfg.channel_mults]
    attn = [cfg.image_size >> level in cfg.attn_resolutions for level in range(len(widths))]
    return UNet2DModel(
        sample_size=cfg.image_size,
        in_channels=cfg.channels,
        out_channels=cfg.channels,
        block_out_channels=tuple(widths),
        layers_per_block=cfg.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        norm_num_groups=cfg.groups,
        attention_head_dim=None,
        dropout=cfg.dropout,
        num_class_embeds=cfg.num_classes[0] + 1 if cfg.conditional else None,
    )


def diffusers_schedule(cfg: DiffusionConfig):
    """diffusers' DDPMScheduler of aigc's training schedule for ``cfg``."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=DIFFUSERS_BETAS[cfg.beta_schedule],
        prediction_type=cfg.prediction_type,
    )


@torch.no_grad()
def diffusers_sample(
    unet: nn.Module, scheduler, z: Tensor, labels: Tensor | None, steps: int, guidance: float
) -> Tensor:
    """Images (n, C, H, W) in [-1, 1] from noise z by a diffusers scheduler: the loop of
    its pipelines, with classifier-free guidance (Ho & Salimans 2022, eq. 6) for labels
    (n,) as aigc's Diffusion.denoise does it (one batch of conditional and null rows)."""
    cfg = unet.config
    scheduler.set_timesteps(steps, device=z.device)
    x = z.view(-1, cfg.in_channels, cfg.sample_size, cfg.sample_size) * scheduler.init_noise_sigma
    guided = labels is not None and guidance != 1.0
    if guided:
        both = torch.cat([labels, torch.full_like(labels, cfg.num_class_embeds - 1)])
    was = unet.training
    unet.eval()
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        if guided:
            cond, uncond = unet(torch.cat([inp, inp]), t, class_labels=both)[0].chunk(2)
            out = uncond + guidance * (cond - uncond)
        else:
            out = unet(inp, t, class_labels=labels)[0]
        x = scheduler.step(out, t, x).prev_sample
    unet.train(was)
    return x.clamp(-1.0, 1.0)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class PlainStep:
    """What aigc.trainer.Step.update does on one process without accumulation: backward,
    clip the gradient norm, step the optimizer, drop the gradients."""

    def __init__(self, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, clip: float):
        self.params, self.optimizer, self.clip = params, optimizer, clip

    def update(self, group: str, loss: Tensor) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


@dataclass
class Learner:
    """One library's model with its training step and its sampler."""

    name: str
    module: nn.Module
    step: Callable[[Tensor, Tensor], None]  # one optimizer step on images (B, C, H, W), labels (B,)
    sample: Callable[[Tensor, Tensor, int, float], Tensor]  # z, labels (n,), steps, guidance


def aigc_learner(cfg: DiffusionConfig, device: torch.device, lr: float, clip: float) -> Learner:
    torch.manual_seed(0)
    model = Diffusion(copy.deepcopy(cfg)).to(device)
    params = list(model.parameters())
    step = PlainStep(params, torch.optim.AdamW(params, lr=lr, weight_decay=0.0), clip)

    def train(x: Tensor, y: Tensor) -> None:
        model.training_step({"images": x, "labels": y[:, None]}, step)

    def sample(z: Tensor, y: Tensor, steps: int, guidance: float) -> Tensor:
        return model.generate(z, y[:, None], "ddim", steps, guidance)

    return Learner("aigc UNet", model, train, sample)


def diffusers_learner(
    cfg: DiffusionConfig, device: torch.device, lr: float, clip: float
) -> Learner:
    from diffusers import DDIMScheduler

    torch.manual_seed(0)
    unet = diffusers_unet(cfg).to(device)
    noise_scheduler = diffusers_schedule(cfg)
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    null = cfg.num_classes[0]

    def train(x: Tensor, y: Tensor) -> None:
        B = x.size(0)
        y = torch.where(torch.rand(B, device=device) < cfg.cond_drop, null, y)  # for guidance
        t = torch.randint(0, cfg.num_train_timesteps, (B,), device=device)
        noise = torch.randn_like(x)
        pred = unet(noise_scheduler.add_noise(x, noise, t), t, class_labels=y)[0]
        loss = F.mse_loss(pred, noise)  # the recipe's epsilon objective
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sample(z: Tensor, y: Tensor, steps: int, guidance: float) -> Tensor:
        ddim = DDIMScheduler.from_config(noise_scheduler.config)
        return diffusers_sample(unet, ddim, z, y, steps, guidance)

    return Learner("diffusers UNet2DModel", unet, train, sample)


def batches(
    images: Tensor, labels: Tensor, size: int, seed: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Random batches with replacement, the same sequence for the same seed."""
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(len(images), (size,), generator=g).to(images.device)
        yield images[idx], labels[idx]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(learner: Learner, data: Iterator, steps: int, device: torch.device) -> float:
    """Optimizer steps per second over ``steps`` steps."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        learner.step(*next(data))
    sync(device)
    return steps / (time.perf_counter() - t0)


def train_for(learner: Learner, data: Iterator, seconds: float, device: torch.device) -> int:
    """Trains for ``seconds`` of wall time; returns the steps taken."""
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        learner.step(*next(data))
        steps += 1
        if steps % 10 == 0:
            sync(device)  # the clock sees the device's work, not the launches
    return steps


def digit_judge(digits):
    """aigc's domain classifier for the digits, trained once and cached (as a run's
    ImageTask.classifier builds it; benchmarks/metrics.py shares the cache key)."""
    from aigc.metrics.classifier import cached_classifier

    return cached_classifier(
        "benchmark-digits",
        digits.images,
        {"class": np.asarray(digits.labels["class"])},
        {"class": digits.classes["class"]},
    )


def judge(args, cfg, device, images, labels, digits) -> None:
    clf = digit_judge(digits)
    print(f"\njudge: aigc's digit classifier, held-out accuracy {clf.accuracy['class']:.1%} "
          f"on {clf.heldout} real images")  # fmt: skip
    want = torch.arange(args.judge_n, device=device) % 10
    z = torch.randn(args.judge_n, cfg.z_dim, generator=torch.Generator().manual_seed(1)).to(device)
    print(f"each trains a fresh model for {args.wall:g} s, then samples {args.judge_n} images "
          f"(digits 0-9 in turn) by {args.sample_steps}-step DDIM, guidance {args.guidance:g}")  # fmt: skip
    print(f"{'model':<24} {'steps':>6} {'images seen':>11} {'sampling':>9} "
          f"{'judged as asked':>15} {'worst digit':>11}")  # fmt: skip
    shares = {}
    for make in (aigc_learner, diffusers_learner):
        learner = make(cfg, device, args.lr, args.clip)
        steps = train_for(learner, batches(images, labels, args.batch, 1), args.wall, device)
        sync(device)
        t0 = time.perf_counter()
        out = learner.sample(z, want, args.sample_steps, args.guidance)
        sync(device)
        sampling = time.perf_counter() - t0
        got = clf.model.predict(out.float().cpu())["class"]
        right = got == want.cpu()
        per_digit = [float(right[want.cpu() == d].float().mean()) for d in range(10)]
        worst = int(np.argmin(per_digit))
        shares[learner.name] = float(right.float().mean())
        print(f"{learner.name:<24} {steps:>6} {steps * args.batch:>11,} {sampling:>7.1f} s "
              f"{shares[learner.name]:>15.1%} {worst:>5} {per_digit[worst]:>5.0%}")  # fmt: skip
        if args.grids:
            name = learner.name.split()[0]
            save_png(image_grid(to_uint8(out), nrow=10), Path(args.grids) / f"{name}.png")
    a, d = shares.values()
    print(f"share judged as asked, aigc - diffusers: {100 * (a - d):+.1f} points")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per repeat")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first, each model")
    ap.add_argument("--repeats", type=int, default=5, help="alternating timed runs of each")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    ap.add_argument("--wall", type=float, default=120.0,
                    help="seconds each trains before its samples are judged; 0 skips it")  # fmt: skip
    ap.add_argument("--judge-n", type=int, default=200, help="images each samples for the judge")
    ap.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for the judge")
    ap.add_argument("--guidance", type=float, default=None, help="default: the recipe's")
    ap.add_argument("--grids", help="folder for a PNG grid of each model's judged samples")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = ap.parse_args()
    device = select_device(args.device)
    torch.set_flush_denormal(True)  # as aigc's training does, for both

    cfg = recipe_config()
    args.guidance = cfg.guidance if args.guidance is None else args.guidance
    print(describe(device))
    digits = load_image_set("digits", image_size=32, channels=1)
    images = to_tensor(digits.images).to(device)  # (N, 1, 32, 32) in [-1, 1]
    labels = torch.from_numpy(np.asarray(digits.labels["class"])).long().to(device)
    print(f"ddpm-digits-cond model, {len(images):,} digits at 32x32x1, batch {args.batch}, fp32, "
          f"AdamW lr {args.lr:g}, clip {args.clip:g}; {args.repeats} x {args.steps} timed steps "
          f"after {args.warmup}")  # fmt: skip

    learners = [aigc_learner(cfg, device, args.lr, args.clip),
                diffusers_learner(cfg, device, args.lr, args.clip)]  # fmt: skip
    counts = [num_params(learner.module) for learner in learners]
    for learner, n in zip(learners, counts, strict=True):
        print(f"  {learner.name:<24} {n:>10,} parameters")
    print(f"  parameter counts differ by {100 * (counts[1] / counts[0] - 1):+.1f}%")

    data = {learner.name: batches(images, labels, args.batch, 0) for learner in learners}
    for learner in learners:
        timed_steps(learner, data[learner.name], args.warmup, device)
    rates: dict[str, list[float]] = {learner.name: [] for learner in learners}
    for _ in range(args.repeats):
        for learner in learners:
            rates[learner.name].append(timed_steps(learner, data[learner.name], args.steps, device))

    print(f"\n{'model':<24} {'steps/s':>8} {'images/s':>9}   runs (steps/s)")
    medians = {}
    for name, xs in rates.items():
        medians[name] = statistics.median(xs)
        print(f"{name:<24} {medians[name]:>8.2f} {medians[name] * args.batch:>9,.0f}   "
              f"{[round(x, 2) for x in xs]}")  # fmt: skip
    a, d = medians.values()
    print(f"ratio aigc / diffusers: {a / d:.2f}x")

    if args.wall > 0:
        judge(args, cfg, device, images, labels, digits)


if __name__ == "__main__":
    main()
