"""The image watermark (aigc.safety.image_watermark) on our own generated images and on
real images of the embedded data sets.

For each set (samples of trained GAN, VAE and diffusion runs; real digits and shapes):
  * the cost: PSNR of marked against unmarked pixels (mean and worst);
  * detection at a false-positive rate of 1e-3 (each image with its own key) after a
    PNG round trip, JPEG at quality 90 and 75 (Pillow), a 10% crop (a window of 90% of
    each side at a random place), a 2x bicubic enlargement, 2x up then down, 2x down
    then up; and, not claimed, 2x down (16 px) and a 10% crop resized back;
  * the empirical false-positive rate: unmarked images of every set tested with two
    fixed keys, and marked images tested with other keys;
  * the effect on the recipes' own metrics: FID (in the run's domain-classifier
    features, against its training images) and judged accuracy (the classifier's
    verdict on the asked labels) of the same samples unmarked and marked, beside the
    FID of a second unmarked sample (the metric's own sampling noise);
  * invisible-watermark's DWT-DCT, the watermark Stable Diffusion ships, on the same
    images: it refuses images under 256x256; marked after an 8x enlargement to 256 px
    it is read back at 256 px, but not from the 32 px image a run delivers.

    python benchmarks/image_watermark.py --runs /work/runs/cgan-shapes \\
        /work/runs/betavae-shapes /work/runs/ddpm-digits --n 200
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import aigc
from aigc.data.images import load_image_set, to_uint8
from aigc.safety import image_watermark as wm
from aigc.sampling.latent import sample_images
from machine import describe

FPR = 1e-3


def jpeg(x: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    _pil(x).save(buf, format="JPEG", quality=quality)
    return _arr(Image.open(io.BytesIO(buf.getvalue())))


def png(x: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    _pil(x).save(buf, format="PNG")
    return _arr(Image.open(io.BytesIO(buf.getvalue())))


def crop(x: np.ndarray, rng: np.random.Generator, keep: float = 0.9) -> np.ndarray:
    h, w = x.shape[:2]
    nh, nw = round(keep * h), round(keep * w)
    y0, x0 = rng.integers(0, h - nh + 1), rng.integers(0, w - nw + 1)
    return x[y0 : y0 + nh, x0 : x0 + nw]


def resize(x: np.ndarray, factor: float | None = None, size: int | None = None) -> np.ndarray:
    h, w = x.shape[:2]
    new = (size, size) if size else (round(w * factor), round(h * factor))
    return _arr(_pil(x).resize(new, Image.Resampling.BICUBIC))


def _pil(x: np.ndarray) -> Image.Image:
    return Image.fromarray(x[..., 0] if x.ndim == 3 and x.shape[2] == 1 else x)


def _arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


TRANSFORMS = {  # name -> f(image, rng); the last two are not claimed
    "PNG": lambda x, r: png(x),
    "JPEG 90": lambda x, r: jpeg(x, 90),
    "JPEG 75": lambda x, r: jpeg(x, 75),
    "crop 10%": lambda x, r: crop(x, r),
    "2x up": lambda x, r: resize(x, 2),
    "2x up, down": lambda x, r: resize(resize(x, 2), 0.5),
    "2x down, up": lambda x, r: resize(resize(x, 0.5), 2),
    "2x down*": lambda x, r: resize(x, 0.5),
    "crop 10%, resize back*": lambda x, r: resize(crop(x, r), size=x.shape[0]),
}


def generated(pipe, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n samples of a run as (N, C, H, W) floats in [-1, 1] and the labels asked for
    (a diffusion run with its own sampler and steps)."""
    if "diffuse" in pipe.verbs:
        out = pipe(n, seed=seed)
        return out.images, out.labels
    images, labels = sample_images(pipe.model, n, None, seed, pipe.device)
    return images.cpu(), None if labels is None else labels.cpu()


def pixels(images: torch.Tensor) -> list[np.ndarray]:
    return [p[..., 0] if p.shape[-1] == 1 else p for p in to_uint8(images)]


def detection_table(sets: dict[str, list[np.ndarray]]) -> dict[str, dict[str, float]]:
    rows = {}
    for name, images in sets.items():
        rng = np.random.default_rng(0)
        t = time.perf_counter()
        marked = [wm.mark_image(x, f"{name} key {i}") for i, x in enumerate(images)]
        mark_ms = (time.perf_counter() - t) / len(images) * 1e3
        psnr = np.array([wm.psnr(a, b) for a, b in zip(images, marked, strict=True)])
        row = {"n": len(images), "psnr": psnr.mean(), "psnr_min": psnr.min(), "mark_ms": mark_ms}
        t, count = time.perf_counter(), 0
        for tname, f in TRANSFORMS.items():
            hits = []
            for i, x in enumerate(marked):
                seen = f(x, rng)
                if min(seen.shape[:2]) < wm.MIN_SIDE:  # too small to search: not found
                    hits.append(False)
                    continue
                hits.append(wm.detect_image(seen, f"{name} key {i}", FPR).marked)
                count += 1
            row[tname] = float(np.mean(hits))
        row["detect_ms"] = (time.perf_counter() - t) / max(count, 1) * 1e3
        rows[name] = row
        print(f"  {name}: done ({len(images)} images)", flush=True)
    return rows


def false_positives(sets: dict[str, list[np.ndarray]], keys: tuple[str, ...]) -> dict[str, tuple[int, int]]:  # fmt: skip
    """Unmarked images against fixed keys, and marked images against other keys:
    (flagged, tested) per set."""
    out = {}
    for name, images in sets.items():
        flagged = sum(wm.detect_image(x, k, FPR).marked for x in images for k in keys)
        out[name] = (flagged, len(images) * len(keys))
    return out


def wrong_keys(sets: dict[str, list[np.ndarray]], per_set: int) -> tuple[int, int]:
    flagged = tested = 0
    for name, images in sets.items():
        for i, x in enumerate(images[:per_set]):
            marked = wm.mark_image(x, f"{name} key {i}")
            for j in range(3):
                flagged += wm.detect_image(marked, f"{name} other {i} {j}", FPR).marked
                tested += 1
    return flagged, tested


def metric_change(pipe, images: torch.Tensor, labels: torch.Tensor | None, second: torch.Tensor) -> dict[str, float]:  # fmt: skip
    """FID (domain-classifier features vs the run's training images) and judged accuracy
    of the same samples unmarked and marked, and FID of a second unmarked sample."""
    task = pipe.task
    task.config.data.eval_metrics = ["fid"]
    marked = wm.mark_tensor(images, "metric key")
    out = {}
    for tag, x in (("plain", images), ("marked", marked), ("plain, other seed", second)):
        out[f"fid {tag}"] = task.feature_sums(pipe.model, pipe.device, x)["feature/fid"]
    clf = task.classifier()
    if labels is not None and clf is not None:
        for tag, x in (("plain", images), ("marked", marked)):
            predicted = clf.model.predict(x)
            right = [(predicted[a] == labels[:, k]).float().mean().item()
                     for k, a in enumerate(task.attributes)]  # fmt: skip
            out[f"judged {tag}"] = float(np.mean(right))
    return out


def dwtdct(images: list[np.ndarray], n: int) -> dict[str, object]:
    """invisible-watermark's DWT-DCT on our images: at their own size, and marked after an
    8x enlargement to 256 px (kept at 256 px, or delivered at the model's size)."""
    try:
        from imwatermark import WatermarkDecoder, WatermarkEncoder
    except ImportError as e:
        return {"error": f"not installed ({e})"}
    bits = [int(b) for b in f"{0xA16C5EED:032b}"]
    need = 26  # of 32 bits: P(Binomial(32, 1/2) >= 26) = 2.7e-4 <= 1e-3
    enc = WatermarkEncoder()
    enc.set_watermark("bits", bits)
    dec = WatermarkDecoder("bits", 32)

    def bgr(x: np.ndarray) -> np.ndarray:
        x = np.dstack([x] * 3) if x.ndim == 2 else x
        return np.ascontiguousarray(x[..., ::-1])

    out: dict[str, object] = {}
    try:
        enc.encode(bgr(images[0]), "dwtDct")
        out["own size"] = "marked"
    except RuntimeError as e:
        out["own size"] = f"refused: {e}"
    kept, delivered, jpeg_kept, psnr = [], [], [], []
    for x in images[:n]:
        side = x.shape[0]
        big = bgr(resize(x, size=256))
        marked = enc.encode(big, "dwtDct")
        psnr.append(wm.psnr(big, marked))
        kept.append(np.sum(np.array(dec.decode(marked, "dwtDct")) == bits) >= need)
        jpeg_kept.append(np.sum(np.array(dec.decode(jpeg(marked, 75), "dwtDct")) == bits) >= need)
        small = resize(marked, size=side)
        again = resize(small, size=256)
        delivered.append(np.sum(np.array(dec.decode(again, "dwtDct")) == bits) >= need)
    out["at 256 px"] = float(np.mean(kept))
    out["at 256 px, JPEG 75"] = float(np.mean(jpeg_kept))
    out["marked at 256 px, delivered at the model's size"] = float(np.mean(delivered))
    out["psnr at 256 px"] = float(np.mean(psnr))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="Image runs to sample.")
    ap.add_argument("--n", type=int, default=200, help="Images per set for detection.")
    ap.add_argument("--null", type=int, default=1000, help="Unmarked images per set for FPR.")
    ap.add_argument("--metric-n", type=int, default=1000, help="Samples for FID/accuracy.")
    ap.add_argument("--diffusion-n", type=int, default=250, help="... of a diffusion run.")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(describe())
    start = time.time()

    sets: dict[str, list[np.ndarray]] = {}
    metrics: dict[str, dict[str, float]] = {}
    for run in args.runs:
        t = time.time()
        pipe, name = aigc.load(run, device="cpu"), Path(run).name
        n = min(args.metric_n, args.diffusion_n) if "diffuse" in pipe.verbs else args.metric_n
        images, labels = generated(pipe, n, seed=123)
        second = generated(pipe, n, seed=456)[0]
        print(f"sampled {n} + {n} images of {name} in {time.time() - t:.0f} s", flush=True)
        metrics[name] = metric_change(pipe, images, labels, second)
        sets[f"{name} (generated)"] = pixels(images)
    digits = load_image_set("digits", image_size=32, channels=1).images
    shapes = load_image_set("shapes", image_size=32, channels=3, n=args.null, seed=9).images
    sets["digits (real)"] = pixels(torch.from_numpy(digits).permute(0, 3, 1, 2) / 127.5 - 1)
    sets["shapes (real)"] = list(shapes)

    print(f"\ndetection at FPR {FPR:g}, each image with its own key ({args.n} images a set):")
    table = detection_table({k: v[: args.n] for k, v in sets.items()})
    cols = list(TRANSFORMS)
    print(f"{'set':<28} {'PSNR dB':>13} " + " ".join(f"{c:>10}" for c in cols))
    for name, row in table.items():
        print(f"{name:<28} {row['psnr']:6.1f} ({row['psnr_min']:4.1f}) "
              + " ".join(f"{row[c]:10.3f}" for c in cols))  # fmt: skip
    times = [(r["mark_ms"], r["detect_ms"]) for r in table.values()]
    print(f"(PSNR: mean (worst); * not claimed; marking {np.mean([a for a, _ in times]):.1f} ms "
          f"and detection {np.mean([b for _, b in times]):.1f} ms per 32 px image, 1 thread)")  # fmt: skip

    keys = ("fixed key A", "fixed key B")
    fp = false_positives({k: v[: args.null] for k, v in sets.items()}, keys)
    print(f"\nempirical false-positive rate at nominal {FPR:g} (unmarked, 2 fixed keys):")
    total = [0, 0]
    for name, (flagged, tested) in fp.items():
        total[0] += flagged
        total[1] += tested
        print(f"  {name:<28} {flagged} of {tested} ({flagged / tested:.4f})")
    upper = _upper95(total[0], total[1])
    print(f"  {'all':<28} {total[0]} of {total[1]} ({total[0] / total[1]:.5f}; 95% upper "
          f"bound {upper:.5f})")  # fmt: skip
    flagged, tested = wrong_keys(sets, 100)
    print(f"  marked images, wrong keys:   {flagged} of {tested}")

    print("\nrecipe metrics, same samples unmarked and marked:")
    for name, m in metrics.items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))

    print("\ninvisible-watermark DWT-DCT (32-bit message, detected when >= 26 bits match):")
    for k, v in dwtdct(sets["shapes (real)"], 50).items():
        print(f"  {k}: {v if isinstance(v, str) else f'{v:.3f}'}")
    print(f"\ntotal {time.time() - start:.0f} s")


def _upper95(k: int, n: int) -> float:
    """One-sided 95% Clopper-Pearson upper bound of a rate seen k times in n."""
    from scipy.stats import beta

    return 1.0 if k >= n else float(beta.ppf(0.95, k + 1, n - k))


if __name__ == "__main__":
    main()
