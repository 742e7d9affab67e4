"""Image completion with a diffusion run: held-out images with a region masked (the
lower half by default), filled by RePaint, and judged by the run's domain classifier:
the share of completions judged as the image's own class (a digit completed from its
upper half should still be that digit), beside the judge's verdict on the masked image
itself (the region left black), on the originals and on the region copied from the
training image nearest on the kept pixels (how often the kept part decides the class),
and the PSNR of the filled region to the truth. Rows: the plain replacement method
(resample 1) and RePaint at each --resample count, each without and with reconstruction
guidance at each --reconstruction weight, with its network calls and images/s.

    python benchmarks/diffusion_inpaint.py runs/ddpm-digits --batch 250
    python benchmarks/diffusion_inpaint.py runs/ddpm-digits --region left-half --resample 1 5 10

``--replace`` (a text-to-image run of the shapes): each held-out shape is masked out (a
square of 0.6 of the side around it) and the prompt asks for another shape in another
colour, of a random size, in the same place ("a large green triangle at the top
right"); the run's judge reads all four attributes of the result against the prompt,
beside the same prompts drawn from nothing, and every kept pixel is compared with the
input's.

    python benchmarks/diffusion_inpaint.py runs/t2i-shapes --replace --n 500
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


def replacement_edits(
    images: np.ndarray, labels: np.ndarray, seed: int
) -> tuple[torch.Tensor, list[str], np.ndarray]:
    """For shapes (N, S, S, C) uint8 with labels (N, 4) (shape, colour, size, position):
    masks (N, 1, S, S) of a square of 0.6 S around each shape's centroid, and prompts
    (and their labels) asking for another shape and colour, any size, same position."""
    from aigc.data.shapes import COLOURS, SHAPES, SIZES, caption

    rng = np.random.default_rng(seed)
    n, size = len(images), images.shape[1]
    shape = (labels[:, 0] + rng.integers(1, len(SHAPES), n)) % len(SHAPES)
    colour = (labels[:, 1] + rng.integers(1, len(COLOURS), n)) % len(COLOURS)
    sizes = rng.integers(0, len(SIZES), n)
    want = np.stack([shape, colour, sizes, labels[:, 3]], 1)
    prompts = [caption(*row) for row in want]
    masks = torch.zeros(n, 1, size, size)
    half = round(0.3 * size)
    for i in range(n):
        ys, xs = np.nonzero(images[i].max(axis=-1) > 16)
        cy, cx = (round(ys.mean()), round(xs.mean())) if len(ys) else (size // 2, size // 2)
        masks[i, 0, max(0, cy - half) : cy + half, max(0, cx - half) : cx + half] = 1
    return masks, prompts, want


def replace(args, pipe, data, clf) -> None:
    """The --replace benchmark (see the module's docstring)."""
    from aigc.data.images import to_uint8

    model, task = pipe.model, pipe.task
    labels = data.split_labels("val")
    rng = np.random.default_rng(args.seed)
    idx = np.sort(rng.choice(len(labels), min(args.n, len(labels)), replace=False))
    given = np.asarray(data.val_images[idx])
    masks, prompts, want = replacement_edits(given, labels[idx], args.seed + 1)
    truth = to_model_batch(given)
    attrs = data.attributes
    print(f"{args.run} at step {pipe.step}: {len(idx)} held-out shapes replaced by another "
          f"shape and colour at the same place; ddpm, {args.steps} steps, jump length "
          f"{args.jump_length}, guidance {model.cfg.guidance}")  # fmt: skip

    def judged(images: torch.Tensor) -> tuple[float, dict[str, float]]:
        predicted = clf.model.predict(images.cpu())
        right = np.ones(len(images), bool)
        each = {}
        for j, a in enumerate(attrs):
            ok = predicted[a].numpy() == want[:, j]
            each[a] = float(ok.mean())
            right &= ok
        return float(right.mean()), each

    ids = task.coder.encode(prompts)
    head = f"{'filled by':<26} {'calls':>9} {'all four':>9} " + " ".join(f"{a:>9}" for a in attrs)
    print(f"\n{head} {'kept exact':>11} {'images/s':>9}")
    drawn = torch.cat([task.generate_from(model, ids[i : i + args.batch], args.seed + i,
                                          pipe.device).cpu() for i in range(0, len(idx), args.batch)])  # fmt: skip
    total, each = judged(drawn)
    print(f"{'(drawn from nothing)':<26} {'':>9} {total:>9.1%} "
          + " ".join(f"{each[a]:>9.1%}" for a in attrs))  # fmt: skip
    for r, w in [(r, w) for w in args.reconstruction for r in args.resample]:
        out = []
        t0 = time.perf_counter()
        for i in range(0, len(idx), args.batch):
            part = slice(i, i + args.batch)
            gen = torch.Generator().manual_seed(args.seed + i)
            z = torch.randn(len(truth[part]), model.cfg.z_dim, generator=gen)
            out.append(model.inpaint(truth[part], masks[part], z, None, "ddpm", args.steps,
                                     generator=gen, text=ids[part].to(pipe.device),
                                     jump_length=args.jump_length, resample=r,
                                     reconstruction=w).cpu())  # fmt: skip
        dt = time.perf_counter() - t0
        filled = torch.cat(out)
        got = to_uint8(filled)
        keep = (masks[:, 0] < 0.5).numpy()[..., None]
        exact = float(np.mean([np.array_equal(got[k] * keep[k], given[k] * keep[k])
                               for k in range(len(idx))]))  # fmt: skip
        total, each = judged(filled)
        name, calls = row_name(args, r, w)
        print(f"{name:<26} {calls:>9} {total:>9.1%} " + " ".join(f"{each[a]:>9.1%}" for a in attrs)
              + f" {exact:>11.1%} {len(idx) / dt:>9.2f}", flush=True)  # fmt: skip


def row_name(args: argparse.Namespace, resample: int, weight: float) -> tuple[str, str]:
    """A row's name and its network calls ("+grad": each call also back-propagated)."""
    name = "replacement (resample 1)" if resample == 1 else f"RePaint, resample {resample}"
    if weight > 0:
        name = f"{'replacement' if resample == 1 else f'RePaint {resample}'} + recon. {weight:g}"
    calls = repaint_calls(args.steps, args.jump_length, resample)
    return name, f"{calls}{'+grad' if weight > 0 else ''}"


def nearest_fill(truth: torch.Tensor, train: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each image's region filled from the training image nearest to it on the kept pixels:
    what a sampler of the training set's own posterior would draw at its sharpest, so a
    reference for how often the kept part alone decides the class."""
    keep = (1 - mask).expand_as(truth[:1]).flatten(1).bool()[0]
    near = torch.cdist(truth.flatten(1)[:, keep], train.flatten(1)[:, keep]).argmin(1)
    return truth * (1 - mask) + train[near] * mask


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
    p.add_argument("--resample", type=int, nargs="+", default=[1])
    p.add_argument(
        "--reconstruction",
        type=float,
        nargs="+",
        default=[0.0, 16.0],
        help="reconstruction guidance weights (0: none), each with each --resample",
    )
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--replace", action="store_true", help="shapes: ask for another shape")
    args = p.parse_args()

    pipe = aigc.load(args.run, device=args.device)
    torch.set_grad_enabled(False)
    model, task = pipe.model, pipe.task
    data = open_data(pipe.run.data_dir)
    clf = task.classifier()
    labels = data.split_labels("val")
    if clf is None or labels is None:
        raise SystemExit(f"{args.run}: its data has no labels for a judge to read")
    if args.replace:
        if task.coder is None or data.attributes[:4] != ["shape", "colour", "size", "position"]:
            raise SystemExit(f"{args.run}: --replace needs a text-to-image run of the shapes")
        print(describe(pipe.device))
        replace(args, pipe, data, clf)
        return
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

    print(f"\n{'filled by':<26} {'calls':>9} {'judged as own ' + attr:>20} "
          f"{'PSNR (dB)':>10} {'images/s':>9}")  # fmt: skip
    print(f"{'(originals)':<26} {'':>9} {judged(truth):>20.1%}")
    print(f"{'(masked region black)':<26} {'':>9} {judged(truth * (1 - mask) - mask):>20.1%}")
    nearest = nearest_fill(truth, to_model_batch(np.asarray(data.train_images)), mask)
    print(f"{'(nearest training image)':<26} {'':>9} {judged(nearest):>20.1%} "
          f"{psnr(nearest, truth, mask):>10.2f}")  # fmt: skip
    for r, w in [(r, w) for w in args.reconstruction for r in args.resample]:
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
                                     jump_length=args.jump_length, resample=r,
                                     reconstruction=w).cpu())  # fmt: skip
        dt = time.perf_counter() - t0
        filled = torch.cat(out)
        name, calls = row_name(args, r, w)
        print(f"{name:<26} {calls:>9} {judged(filled):>20.1%} {psnr(filled, truth, mask):>10.2f} "
              f"{len(idx) / dt:>9.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
