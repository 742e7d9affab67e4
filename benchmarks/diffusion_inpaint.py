"""Image completion with a diffusion run: held-out images with a region masked (the
lower half by default), filled by RePaint, and judged by the run's domain classifier:
the share of completions judged as the image's own class (a digit completed from its
upper half should still be that digit), beside the judge's verdict on the masked image
itself (the region left black) and on the originals, and the PSNR of the filled region
to the truth. Rows: the plain replacement method (resample 1) and RePaint at each
--resample count, each with its network calls and images/s.

    python benchmarks/diffusion_inpaint.py runs/ddpm-digits --n 500
    python benchmarks/diffusion_inpaint.py runs/ddpm-digits --region left-half --resample 1 5 10
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import aigc
from aigc.schedulers.loops import repaint_calls
from aigc.tasks.images import open_data, to_model_batch
from machine import describe

REGIONS = ("lower-half", "upper-half", "left-half", "right-half", "centre")


def region_mask(name: str, size: int) -> torch.Tensor:
    """(1, 1, size, size) float, 1 where to fill."""
    m = torch.zeros(size, size)
    h = size // 2
    if name == "lower-half":
        m[h:] = 1
    elif name == "upper-half":
        m[:h] = 1
    elif name == "left-half":
        m[:, :h] = 1
    elif name == "right-half":
        m[:, h:] = 1
    else:  # the centre square of half the side
        q = size // 4
        m[q : q + h, q : q + h] = 1
    return m.view(1, 1, size, size)


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean PSNR (dB, peak 2 for [-1, 1]) over images of the masked pixels."""
    m = mask.expand_as(a)
    mse = ((a - b) ** 2 * m).flatten(1).sum(1) / m.flatten(1).sum(1)
    return float((10 * torch.log10(4.0 / mse.clamp(min=1e-10))).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a trained diffusion run of a labelled data set")
    p.add_argument("--n", type=int, default=500, help="held-out images completed")
    p.add_argument("--region", choices=REGIONS, default="lower-half")
    p.add_argument("--steps", type=int, default=50, help="DDPM steps")
    p.add_argument("--jump-length", type=int, default=5)
    p.add_argument("--resample", type=int, nargs="+", default=[1, 5])
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    pipe = aigc.load(args.run, device=args.device)
    torch.set_grad_enabled(False)
    model, task = pipe.model, pipe.task
    data = open_data(pipe.run.data_dir)
    clf = task.classifier()
    labels = data.split_labels("val")
    if clf is None or labels is None:
        raise SystemExit(f"{args.run}: its data has no labels for a judge to read")
    rng = np.random.default_rng(args.seed)
    idx = np.sort(rng.choice(len(labels), min(args.n, len(labels)), replace=False))
    truth = to_model_batch(np.asarray(data.val_images[idx]))
    want = torch.from_numpy(labels[idx, 0]).long()
    attr = data.attributes[0]
    size = model.cfg.image_size
    mask = region_mask(args.region, size)
    print(describe(pipe.device))
    print(f"{args.run} at step {pipe.step}: {len(idx)} held-out images, {args.region} masked, "
          f"judged by the {attr} classifier; ddpm, {args.steps} steps, jump length "
          f"{args.jump_length}")  # fmt: skip

    def judged(images: torch.Tensor) -> float:
        return float((clf.model.predict(images.cpu())[attr] == want).float().mean())

    print(f"\n{'filled by':<26} {'calls':>6} {'judged as own ' + attr:>20} "
          f"{'PSNR (dB)':>10} {'images/s':>9}")  # fmt: skip
    print(f"{'(originals)':<26} {'':>6} {judged(truth):>20.1%}")
    print(f"{'(masked region black)':<26} {'':>6} {judged(truth * (1 - mask) - mask):>20.1%}")
    for r in args.resample:
        out = []
        t0 = time.perf_counter()
        for i in range(0, len(idx), args.batch):
            part = truth[i : i + args.batch]
            gen = torch.Generator().manual_seed(args.seed + i)
            z = torch.randn(len(part), model.cfg.z_dim, generator=gen)
            lab = None
            if model.cfg.conditional:  # a class-conditional run draws its labels at random
                lab = model.random_labels(len(part), gen).cpu()
            out.append(model.inpaint(part, mask.expand(len(part), -1, -1, -1), z, lab,
                                     "ddpm", args.steps, generator=gen,
                                     jump_length=args.jump_length, resample=r).cpu())  # fmt: skip
        dt = time.perf_counter() - t0
        filled = torch.cat(out)
        name = "replacement (resample 1)" if r == 1 else f"RePaint, resample {r}"
        calls = repaint_calls(args.steps, args.jump_length, r)
        print(f"{name:<26} {calls:>6} {judged(filled):>20.1%} {psnr(filled, truth, mask):>10.2f} "
              f"{len(idx) / dt:>9.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
