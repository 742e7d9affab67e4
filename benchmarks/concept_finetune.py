"""Teaching a text-to-image run a new word: how often the fine-tuned run draws it, and
what its old prompts lose (prior preservation).

1. The user's images: --images stars (the embedded ``shapes-stars``, a shape the base
   never saw) written as a folder of PNGs with metadata.jsonl captions ("a small red
   star at the top left"), as a user would bring them.
2. ``aigc finetune BASE --method lora data.path=FOLDER`` (or --method full), the
   defaults of a concept fine-tune (half of every batch replays the base's own data).
3. The concept judge: a classifier trained on the user's images against as many of the
   base's training images (aigc.metrics.classifier, shifted and tinted copies); its
   accuracy is measured on freshly drawn stars and the base's held-out images.
4. Drawn: the share of --n images for random star prompts that the concept judge calls
   a star, for the base and the fine-tuned run; and the base's own judge's verdict on
   the colour, size and position those prompts ask for.
5. Kept: the base's faithfulness evaluation (all four attributes right, held-out
   captions, --n prompts) with the base's weights and with the fine-tuned ones.

    python benchmarks/concept_finetune.py runs/t2i-shapes --n 500
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import aigc
from aigc.data.images import load_image_set, to_tensor
from aigc.data.shapes import COLOURS, POSITIONS, SIZES, caption
from aigc.metrics.classifier import train_classifier
from aigc.tasks.images import open_data
from machine import describe


def write_folder(folder: Path, n: int, size: int, seed: int) -> np.ndarray:
    """n stars as PNG files with a metadata.jsonl of captions; returns the pixels."""
    stars = load_image_set("shapes-stars", image_size=size, n=n, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        for i, (pixels, text) in enumerate(zip(stars.images, stars.captions, strict=True)):
            Image.fromarray(pixels).save(folder / f"star-{i:03d}.png")
            f.write(json.dumps({"file_name": f"star-{i:03d}.png", "text": text}) + "\n")
    return stars.images


def star_prompts(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """n random star captions and their (colour, size, position) labels."""
    rng = np.random.default_rng(seed)
    labels = np.stack([rng.integers(0, len(k), n) for k in (COLOURS, SIZES, POSITIONS)], 1)
    texts = [caption(0, *row).replace(" circle ", " star ", 1) for row in labels]
    return texts, labels


def judged(pipe, judge, base_judge, prompts, labels, seed: int) -> dict[str, float]:
    images = torch.cat([pipe(len(prompts[i : i + 100]), prompt=prompts[i : i + 100],
                             seed=seed + i).images for i in range(0, len(prompts), 100)])  # fmt: skip
    out = {"star": float((judge.model.predict(images)["star"] == 1).float().mean())}
    predicted = base_judge.model.predict(images)
    for j, a in enumerate(("colour", "size", "position")):
        out[a] = float((predicted[a].numpy() == labels[:, j]).mean())
    return out


def faithfulness(base: str, weights: dict | None, n: int) -> dict[str, float]:
    pipe = aigc.load(base)
    if weights is not None:
        pipe.model.load_state_dict(weights)
    pipe.task.config.data.eval_samples = n
    pipe.task.config.data.eval_metrics = []
    r = pipe.evaluate(save=False)
    return {
        k: r[k] for k in r if k == "all_correct" or k.startswith(("label_accuracy", "heldout/all"))
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", help="a text-to-image run of the shapes (t2i-shapes)")
    p.add_argument("--n", type=int, default=500, help="prompts judged per row")
    p.add_argument("--images", type=int, default=20, help="the new concept's images")
    p.add_argument("--method", default="lora", choices=("lora", "full"))
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--out", default="", help="the fine-tuned run's folder [a temporary one]")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    print(describe())
    base = aigc.load(args.base)
    size = base.config.model.image_size
    work = Path(tempfile.mkdtemp(prefix="concept-"))
    folder = work / "stars"
    mine = write_folder(folder, args.images, size, args.seed)
    run = Path(args.out) if args.out else work / "run"
    t = time.perf_counter()
    aigc.finetune(args.base, [f"data.path={folder}", f"train.max_steps={args.steps}"],
                  method=args.method, run_dir=run, progress=False)  # fmt: skip
    print(f"fine-tuned {args.method} in {time.perf_counter() - t:.0f} s ({args.steps} steps) "
          f"on {args.images} images: {run}")  # fmt: skip
    tuned = aigc.load(run)

    data = open_data(Path(args.base) / "data")
    rng = np.random.default_rng(args.seed + 1)
    k = min(data.n_train, 20 * len(mine))
    others = np.array(data.train_images[np.sort(rng.choice(data.n_train, k, replace=False))])
    reps = np.concatenate([mine] * 20)  # as many views of the user's images as of the base's
    judge = train_classifier(np.concatenate([reps, others]),
                             {"star": np.repeat([1, 0], [len(reps), len(others)])},
                             {"star": ["other", "star"]}, seed=args.seed)  # fmt: skip
    fresh = load_image_set("shapes-stars", image_size=size, n=200, seed=args.seed + 99).images
    val = np.array(data.val_images[:200])
    acc_star = float((judge.model.predict(to_tensor(fresh))["star"] == 1).float().mean())
    acc_other = float((judge.model.predict(to_tensor(val))["star"] == 0).float().mean())
    print(f"concept judge: {100 * acc_star:.1f}% of 200 new stars called stars, "
          f"{100 * acc_other:.1f}% of 200 held-out shapes called other")  # fmt: skip

    prompts, labels = star_prompts(args.n, args.seed + 2)
    base_judge = base.task.classifier()
    print(f"\n{'star prompts':<20} {'star':>7} {'colour':>7} {'size':>7} {'position':>9}")
    for name, pipe in (("base", base), (f"fine-tuned ({args.method})", tuned)):
        r = judged(pipe, judge, base_judge, prompts, labels, args.seed + 3)
        print(f"{name:<20} {100 * r['star']:6.1f}% {100 * r['colour']:6.1f}% "
              f"{100 * r['size']:6.1f}% {100 * r['position']:8.1f}%")  # fmt: skip

    print(f"\nold prompts ({args.n} held-out captions), judged by the base's classifier")
    before = faithfulness(args.base, None, args.n)
    after = faithfulness(args.base, tuned.model.state_dict(), args.n)
    for k in before:
        print(f"  {k:<28} base {100 * before[k]:5.1f}%   fine-tuned {100 * after[k]:5.1f}%  "
              f"({100 * (after[k] - before[k]):+.1f} points)")  # fmt: skip


if __name__ == "__main__":
    main()
