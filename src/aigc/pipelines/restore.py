"""The restoration pipeline: a trained restorer (denoiser, JPEG-artefact remover, block
filler or super-resolver) applied to the user's images, and its held-out PSNR and SSIM."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from aigc.errors import ConfigError, RequestError
from aigc.pipelines.base import EvalResult, ImageOutput, Pipeline, check_count, save_eval

MAX_BATCH = 64  # images per forward pass
MAX_OUTPUT_SIDE = 4096


class RestorePipeline(Pipeline):
    """A trained restorer. ``restore(images)`` returns the restored images; ``degrade``
    damages clean images the way the run was trained on (to try it, or to measure it);
    ``evaluate`` reports PSNR and SSIM on the held-out split against the damaged input
    and the classical baseline."""

    kind = "restore"
    verbs: ClassVar[frozenset[str]] = frozenset({"restore"})

    @property
    def scale(self) -> int:
        """Output side / input side: 1 for a restorer, 2-4 for a super-resolver."""
        return int(self.task.degradation.factor)

    @property
    def channels(self) -> int:
        return int(self.config.model.channels)

    @property
    def input_size(self) -> int | None:
        """The side of the images it takes, or None when any size works (a convolutional
        regression network; a diffusion restorer samples at its training size)."""
        return self.task.input_size

    @property
    def degradation(self) -> Any:
        return self.task.degradation

    @contextlib.contextmanager
    def _sampling(self, scheduler: str | None, steps: int | None) -> Iterator[None]:
        """The task's sampling settings while inside; RequestError for bad ones."""
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self.task.sampling_with(self.model, scheduler, steps))
            except ConfigError as e:
                raise RequestError(str(e)) from None
            yield

    def evaluate(
        self, save: bool = True, scheduler: str | None = None, steps: int | None = None
    ) -> EvalResult:
        """PSNR, SSIM and (in the domain classifier's features) FID/KID/PR on the held-out
        split; a diffusion restorer samples with ``scheduler`` over ``steps`` (saved as
        eval-NAME-STEPS.json when either is given)."""
        with self._sampling(scheduler, steps):
            result = super().evaluate(save=False)
        if scheduler is not None or steps is not None:
            cfg = self.model.cfg
            name, n = scheduler or cfg.sampler, steps or cfg.sample_steps
            result.update(sampler=name, sample_steps=n, variant=f"{name}-{n}")
        if save:
            save_eval(self.run, result)
        return result

    def check_scale(self, scale: int | None) -> None:
        """RequestError unless ``scale`` (None: any) is the run's factor."""
        if scale is not None and scale != self.scale:
            trained = f"super-resolves {self.scale}x" if self.scale > 1 else "keeps the size (1x)"
            raise RequestError(f"{self.run.path} {trained}; it was not trained for {scale}x")

    def _pixels(self, images: Any) -> list[np.ndarray]:
        """Each input as (H, W, C) uint8 in the run's channels."""
        from aigc.pipelines.editing import read_image_list

        out = read_image_list(images, self.channels, "restore", MAX_OUTPUT_SIDE // self.scale)
        side = self.input_size
        for i, p in enumerate(out):
            if side and p.shape[:2] != (side, side):
                raise RequestError(
                    f"image {i} is {p.shape[1]}x{p.shape[0]}; this run restores {side}x{side} "
                    f"images (to {side * self.scale}x{side * self.scale}): resize it first"
                )
        return out

    def restore(
        self,
        images: Any,
        scale: int | None = None,
        output: str = "tensor",
        seed: int = 0,
        num_inference_steps: int | None = None,
        scheduler: str | None = None,
    ) -> Any:
        """Restores ``images``: a file path, bytes, a PIL image or a uint8 (H, W[, C])
        array, or a list of them, or (N, H, W, C) uint8 / (N, C, H, W) [-1, 1] batches;
        any size (the network is convolutional), converted to the run's channels with a
        warning. ``scale`` checks the super-resolution factor asked for against the
        run's. A diffusion restorer samples with ``scheduler`` over ``num_inference_steps``
        (default: the run's), image i from (seed, i). Returns
        ImageOutput (``output="tensor"``, (N, C, H*s, W*s) in [-1, 1]) or,
        for "uint8" / "pil", a list of arrays or images (sizes may differ)."""
        from aigc.data.images import to_uint8

        self.check_scale(scale)
        if output not in ("tensor", "uint8", "pil"):
            raise RequestError(f"output={output!r} must be tensor, pil or uint8")
        pixels = self._pixels(images)
        outs: list[torch.Tensor] = []
        sizes = [p.shape for p in pixels]
        with torch.inference_mode(), self._sampling(scheduler, num_inference_steps):
            i = 0
            while i < len(pixels):  # one forward per run of same-sized images
                j = i + 1
                while j < len(pixels) and j - i < MAX_BATCH and sizes[j] == sizes[i]:
                    j += 1
                seeds = [[seed, k] for k in range(i, j)]
                outs += list(self.task.restore_batch(self.model, np.stack(pixels[i:j]),
                                                     self.device, seeds))  # fmt: skip
                i = j
        outs = self.postprocess(outs)
        if output == "tensor":
            if len({tuple(o.shape) for o in outs}) > 1:
                raise RequestError("images of different sizes: ask for output='uint8' or 'pil'")
            return ImageOutput(torch.stack(outs), seed=seed)
        arrays = [to_uint8(o[None])[0] for o in outs]
        if output == "uint8":
            return arrays
        from PIL import Image

        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]

    __call__ = restore

    def degrade(self, images: Any, seed: int = 0) -> list[np.ndarray]:
        """``images`` (as ``restore`` takes them) damaged as in training, image i from
        (seed, i): a list of (h, w, C) uint8 arrays (h = H / scale)."""
        pixels = self._pixels(images)
        return [self.degradation.apply(p[None], [[seed, i]])[0] for i, p in enumerate(pixels)]

    def compare(
        self,
        images: Any = None,
        n: int = 8,
        seed: int = 0,
        num_inference_steps: int | None = None,
        scheduler: str | None = None,
    ) -> np.ndarray:
        """A grid, one row per image: damaged (enlarged by pixel repetition for
        super-resolution), restored, and the original. ``images`` are clean images to
        damage (as ``restore`` takes them, all of one size); None takes the first ``n``
        held-out images of the run, damaged from their evaluation seeds. A diffusion
        restorer samples as in ``restore``."""
        from aigc.data.images import image_grid
        from aigc.tasks.images import open_data

        if images is None:
            check_count(n, limit=256)
            val = open_data(self.run.data_dir).val_images
            rows = np.arange(min(n, len(val)))
            clean = np.array(val[rows])
            damaged = self.degradation.apply(clean, self.task.val_seeds(rows))
        else:
            pixels = self._pixels(images)
            if len({p.shape for p in pixels}) > 1:
                raise RequestError("compare: give images of one size")
            if pixels[0].shape[0] % self.scale or pixels[0].shape[1] % self.scale:
                raise RequestError(
                    f"compare: the images' sides must be multiples of the run's {self.scale}x"
                )
            clean = np.stack(pixels)
            damaged = np.stack(self.degrade(list(clean), seed))
        restored = np.stack(self.restore(list(damaged), output="uint8", seed=seed,
                                         num_inference_steps=num_inference_steps,
                                         scheduler=scheduler))  # fmt: skip
        big = damaged.repeat(self.scale, axis=1).repeat(self.scale, axis=2)
        triples = np.stack([big, restored, clean], axis=1).reshape(-1, *clean.shape[1:])
        return image_grid(triples, nrow=3)

    def save(self, images: Any, out: str | Path) -> list[Path]:
        """Writes images (ImageOutput, a tensor, or uint8 arrays) as PNG: ``out`` itself
        for one image, else out's stem with -0, -1, ... appended."""
        from aigc.pipelines.editing import save_images

        return save_images(images, out)

    def format_eval(self, result: dict[str, Any]) -> str:
        n = int(result.get("count", 0))
        lines = [f"{self.run.path} at step {result['step']}: {n} held-out images, "
                 f"{result.get('degradation', '')}"]  # fmt: skip
        rows = [("restored", "")]
        if "psnr_degraded" in result:
            rows.append(("damaged input", "_degraded"))
        rows.append((f"baseline ({result.get('baseline', '')})", "_baseline"))
        lines.append(f"  {'':<28} {'PSNR dB':>8} {'SSIM':>7}")
        for name, suffix in rows:
            lines.append(
                f"  {name:<28} {result[f'psnr{suffix}']:8.2f} {result[f'ssim{suffix}']:7.4f}"
            )
        gain = f"  gain {result['psnr_over_baseline']:+.2f} dB over the baseline"
        if "psnr_degraded" in result:
            gain += f", {result['psnr_gain']:+.2f} dB over the damaged input"
        lines.append(gain)
        return "\n".join(lines)
