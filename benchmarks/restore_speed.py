"""Restoration and super-resolution speed: images/s of a restorer beside the classical
method it is compared with, measured in one run on the same images.

- super-resolution: the sr-shapes-x4 recipe's network (16x16 -> 64x64, random weights
  unless --sr-run: the speed does not depend on them) against Pillow's bicubic
  upsampling, which is what its PSNR is measured against;
- denoising: the restore-shapes-noise recipe's network at 32x32 (or --denoise-run)
  against SciPy's 3x3 median filter, its classical baseline;
- SR3 super-resolution (--sr3-run, a trained sr3-shapes-x4 run): the diffusion U-Net
  over the run's sampler and steps (--sr3-steps), beside the regression network above;
- translation 32x32: the cyclegan-shapes and pix2pix-shapes generators (random weights
  unless --cyclegan-run / --pix2pix-run), one direction.

Each figure is the median of --repeats batches of --batch images after one warm-up
batch, through the pipeline's own path (``RestorePipeline.restore`` for a run, the
model's forward for random weights) on --threads torch threads.

    python benchmarks/restore_speed.py
    python benchmarks/restore_speed.py --sr-run runs/sr-shapes-x4 --batch 256
    python benchmarks/restore_speed.py --sr3-run runs/sr3-shapes-x4 --cyclegan-run runs/cyclegan-shapes
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import aigc
from aigc.config import load_config
from aigc.data.degrade import bicubic_upsample, median_filter
from aigc.data.images import to_tensor, to_uint8
from aigc.data.shapes import generate_shapes
from aigc.models.cyclegan import CycleGAN
from aigc.models.pix2pix import Pix2Pix
from aigc.models.restore import Restorer
from machine import describe

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "aigc" / "configs"


def rate(fn: Callable[[], object], n: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n / statistics.median(times)


def recipe_model(recipe: str, size: int) -> Any:
    """The recipe's model config for RGB images of ``size`` pixels."""
    cfg = load_config(f"{CONFIGS}/{recipe}.yaml").model
    cfg.image_size, cfg.channels = size, 3
    return cfg


def on_uint8(net: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """A network of [-1, 1] tensors as a function of (N, H, W, C) uint8 arrays."""
    net.eval()

    def run_model(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return to_uint8(net(to_tensor(x)).clamp(-1, 1))

    return run_model


def restorer(run: str | None, recipe: str, size: int) -> Callable[[np.ndarray], np.ndarray]:
    """images (N, h, w, C) uint8 -> restored uint8, by a trained run or random weights."""
    if run:
        pipe = aigc.load(run)
        return lambda x: np.stack(pipe.restore(list(x), output="uint8"))
    cfg = recipe_model(recipe, size)
    cfg.scale = 4 if recipe.startswith("sr-") else 1
    return on_uint8(Restorer(cfg))


def translator(run: str | None, recipe: str, size: int) -> Callable[[np.ndarray], np.ndarray]:
    """images (N, size, size, 3) uint8 -> translated uint8 (a2b), by a run or random weights."""
    if run:
        pipe = aigc.load(run)
        return lambda x: np.stack(pipe.translate(list(x), output="uint8"))
    cfg = recipe_model(recipe, size)
    return on_uint8(CycleGAN(cfg).g_ab if recipe.startswith("cyclegan") else Pix2Pix(cfg).g)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--sr-run", default=None, help="a trained super-resolution run")
    p.add_argument("--denoise-run", default=None, help="a trained denoising run")
    p.add_argument("--sr3-run", default=None, help="a trained SR3 run (sr3-shapes-x4)")
    p.add_argument("--sr3-steps", type=int, default=None, help="its sampler's steps")
    p.add_argument("--cyclegan-run", default=None, help="a trained CycleGAN run")
    p.add_argument("--pix2pix-run", default=None, help="a trained pix2pix run")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(describe("cpu"))
    print(f"batches of {args.batch}, median of {args.repeats}, {args.threads} torch threads\n")
    print(f"{'task':<28} {'method':<26} {'images/s':>10} {'ratio':>8}")

    high = generate_shapes(args.batch, 64, seed=0).images
    low = np.ascontiguousarray(high[:, ::4, ::4])  # any 16x16 input will do
    sr = restorer(args.sr_run, "sr-shapes-x4", 64)
    ours = rate(lambda: sr(low), args.batch, args.repeats)
    base = rate(lambda: bicubic_upsample(low, 4), args.batch, args.repeats)
    print(
        f"{'super-resolution 16->64':<28} {'aigc sr-shapes-x4':<26} {ours:>10,.0f} {ours / base:>7.2f}x"
    )
    print(f"{'':<28} {'Pillow bicubic':<26} {base:>10,.0f} {1:>7.2f}x")
    if args.sr3_run:
        pipe = aigc.load(args.sr3_run)
        steps = args.sr3_steps or pipe.config.model.sample_steps
        slow = rate(lambda: pipe.restore(list(low), num_inference_steps=steps, output="uint8"),
                    args.batch, args.repeats)  # fmt: skip
        name = f"aigc sr3-shapes-x4, {steps} steps"
        print(f"{'':<28} {name:<26} {slow:>10,.1f} {slow / base:>7.4f}x")
        print(f"{'':<28} (the regression network: {ours / slow:,.0f}x the SR3 model's images/s)")

    noisy = generate_shapes(args.batch, 32, seed=1).images
    den = restorer(args.denoise_run, "restore-shapes-noise", 32)
    ours = rate(lambda: den(noisy), args.batch, args.repeats)
    base = rate(lambda: median_filter(noisy), args.batch, args.repeats)
    print(
        f"{'denoising 32x32':<28} {'aigc restore-shapes-noise':<26} {ours:>10,.0f} {ours / base:>7.2f}x"
    )
    print(f"{'':<28} {'SciPy median 3x3':<26} {base:>10,.0f} {1:>7.2f}x")

    filled = generate_shapes(args.batch, 32, seed=2).images
    for recipe, run in (
        ("cyclegan-shapes", args.cyclegan_run),
        ("pix2pix-shapes", args.pix2pix_run),
    ):
        net = translator(run, recipe, 32)
        got = rate(functools.partial(net, filled), args.batch, args.repeats)
        task = "translation 32x32" if recipe.startswith("cyclegan") else ""
        print(f"{task:<28} {'aigc ' + recipe:<26} {got:>10,.0f}")


if __name__ == "__main__":
    main()
