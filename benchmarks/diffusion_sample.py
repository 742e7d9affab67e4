"""Diffusion sampling speed: images/s per scheduler and step count, beside diffusers'.

Every scheduler registered in aigc.schedulers.SCHEDULERS when the script runs, each at
--steps steps (DDPM, whose ancestral steps need many, at --ddpm-steps instead), through
``Diffusion.generate`` with the model's classifier-free guidance (one network call a
step on a doubled batch). The model is the ddpm-digits-cond recipe's with random weights
(the speed does not depend on them), or a trained run given by --run (aigc.load).
"net calls" counts the network's forward calls per batch (a second-order rule such as
Heun makes two a step).

For comparison, where it is cheap (the --steps counts, not DDPM's): diffusers'
UNet2DModel of the same layout and size (diffusion_train.diffusers_unet) sampled by
its DDIMScheduler and DPMSolverMultistepScheduler (DPM-Solver++(2M), Lu et al. 2022)
in the loop of its pipelines, with the same guidance; the ratio is printed against
aigc's scheduler of the same rule when one is registered (ddim, dpm++2m).

Each figure is the median of --repeats batches of --batch images, after one short
warm-up batch of each library.

    python benchmarks/diffusion_sample.py --batch 64 --repeats 3
    python benchmarks/diffusion_sample.py --run runs/ddpm-digits-cond --steps 20 50
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from aigc.errors import ConfigError
from aigc.models.diffusion import Diffusion
from aigc.schedulers import SCHEDULERS
from aigc.trainer import select_device
from diffusion_train import (
    diffusers_sample,
    diffusers_schedule,
    diffusers_unet,
    num_params,
    recipe_config,
    sync,
)
from machine import describe

# aigc scheduler name -> the diffusers scheduler of the same rule
DIFFUSERS_RULES = {"ddim": "DDIMScheduler", "dpm++2m": "DPMSolverMultistepScheduler"}


def measure(
    sample: Callable[[], Tensor], net: nn.Module, n: int, repeats: int, device: torch.device
) -> tuple[float, float]:
    """(images/s, network calls per batch) of ``sample``, the median of ``repeats``."""
    calls = [0]
    hook = net.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    times = []
    try:
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            sample()
            sync(device)
            times.append(time.perf_counter() - t0)
    finally:
        hook.remove()
    return n / statistics.median(times), calls[0] / repeats


def row(name: str, steps: int, rate: float, calls: float, n: int, note: str = "") -> None:
    line = f"{name:<38} {steps:>5} {calls:>9.0f} {rate:>9,.1f} {n / rate:>8.2f} s  {note}"
    print(line.rstrip())


def server_throughput(args: argparse.Namespace) -> None:
    """Images/s of `aigc serve` answering 8 concurrent clients against 1 (not written
    yet: it is to come, as benchmarks/serve_load.py measures text generation)."""
    raise NotImplementedError("diffusion server throughput (8 clients vs 1) is still to be written")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--run", help="a trained diffusion run (default: the recipe, random weights)")
    ap.add_argument("--batch", type=int, default=64, help="images per batch")
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    ap.add_argument("--ddpm-steps", type=int, nargs="+", default=[250])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's")
    ap.add_argument("--no-diffusers", action="store_true", help="skip diffusers' rows")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = ap.parse_args()
    torch.set_flush_denormal(True)  # as aigc's training and serving do

    if args.run:
        import aigc

        model = aigc.load(args.run, device=args.device).model
        source = f"run {args.run}"
    else:
        torch.manual_seed(0)
        model = Diffusion(recipe_config()).to(select_device(args.device)).eval()
        source = "ddpm-digits-cond recipe, random weights"
    cfg, device = model.cfg, model.device
    guidance = cfg.guidance if args.guidance is None else args.guidance
    print(describe(device))
    shape = f"{cfg.image_size}x{cfg.image_size}x{cfg.channels}"
    print(f"{source}: {shape}, {num_params(model):,} parameters, "
          f"{'class-conditional, guidance ' + format(guidance, 'g') if cfg.conditional else 'unconditional'}; "
          f"batch {args.batch}, median of {args.repeats}")  # fmt: skip

    n = args.batch
    z = torch.randn(n, cfg.z_dim, generator=torch.Generator().manual_seed(0)).to(device)
    labels = None
    if model.num_classes:  # each attribute's classes in turn: (n, A)
        labels = torch.stack([torch.arange(n) % k for k in model.num_classes], 1).to(device)

    unet = None
    if not args.no_diffusers:
        import diffusers

        torch.manual_seed(0)
        unet = diffusers_unet(cfg).to(device).eval()
        train_schedule = diffusers_schedule(cfg)
        print(f"diffusers {diffusers.__version__}: UNet2DModel of the same layout, "
              f"{num_params(unet):,} parameters")  # fmt: skip
        first = None if labels is None else labels[:, 0]  # diffusers has one class embedding

        def diffusers_run(rule: str, steps: int) -> Tensor:
            scheduler = getattr(diffusers, rule).from_config(train_schedule.config)
            return diffusers_sample(unet, scheduler, z, first, steps, guidance)

        diffusers_run("DDIMScheduler", 2)  # warm-up

    model.generate(z, labels, "ddim", 2, guidance)  # warm-up
    print(f"\n{'sampler':<38} {'steps':>5} {'net calls':>9} {'images/s':>9} {'batch':>10}")
    ours: dict[tuple[str, int], float] = {}
    for name in SCHEDULERS:
        for steps in args.ddpm_steps if name == "ddpm" else args.steps:
            try:
                rate, calls = measure(
                    lambda name=name, steps=steps: model.generate(z, labels, name, steps, guidance),
                    model.unet, n, args.repeats, device,
                )  # fmt: skip
            except (ValueError, ConfigError) as e:
                print(f"aigc {name:<33} {steps:>5}  cannot serve it: {e}")
                continue
            ours[name, steps] = rate
            row(f"aigc {name}", steps, rate, calls, n)
    if unet is not None:
        for name, rule in DIFFUSERS_RULES.items():
            for steps in args.steps:
                rate, calls = measure(
                    lambda rule=rule, steps=steps: diffusers_run(rule, steps),
                    unet, n, args.repeats, device,
                )  # fmt: skip
                note = f"aigc {name} / this: {ours[name, steps] / rate:.2f}x" if (
                    (name, steps) in ours) else ""  # fmt: skip
                row(f"diffusers {rule}", steps, rate, calls, n, note)
    # server_throughput(args): 8 concurrent clients against 1, still to be written


if __name__ == "__main__":
    main()
