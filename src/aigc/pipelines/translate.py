"""The translation pipeline: a trained CycleGAN or pix2pix run applied to the user's
images, one domain to the other, and its held-out judged figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from aigc.errors import RequestError
from aigc.pipelines.base import ImageOutput, Pipeline, check_count

MAX_BATCH = 64  # images per forward pass
MAX_SIDE = 2048


class TranslatePipeline(Pipeline):
    """A trained translator. ``translate(images, direction="a2b")`` returns the images
    in the other domain; ``compare`` shows inputs beside their translations."""

    kind = "translate"
    verbs: ClassVar[frozenset[str]] = frozenset({"translate"})

    @property
    def directions(self) -> tuple[str, ...]:
        """What the run translates: ("a2b", "b2a") for CycleGAN, one for pix2pix."""
        return tuple(self.model.directions)

    @property
    def channels(self) -> int:
        return int(self.config.model.channels)

    @property
    def domains(self) -> dict[str, str]:
        """Each domain's data source, as prepared."""
        return dict(self.task.info["sources"])

    def check_direction(self, direction: str | None) -> str:
        """The direction to use (None: the run's first); RequestError for another."""
        if direction is None:
            return self.directions[0]
        if direction not in self.directions:
            can = " or ".join(self.directions)
            raise RequestError(f"direction={direction!r}: {self.run.path} translates {can}")
        return direction

    def _pixels(self, images: Any) -> list[np.ndarray]:
        from aigc.pipelines.editing import read_image_list

        out = read_image_list(images, self.channels, "translate", MAX_SIDE)
        k = self.model.multiple
        for i, p in enumerate(out):
            if p.shape[0] % k or p.shape[1] % k:
                size = self.config.model.image_size
                raise RequestError(
                    f"image {i} is {p.shape[1]}x{p.shape[0]}; this run translates images whose "
                    f"sides are multiples of {k} (it was trained at {size}x{size}): resize it"
                )
        return out

    def translate(self, images: Any, direction: str | None = None, output: str = "tensor") -> Any:
        """Translates ``images`` (a file path, bytes, a PIL image or a uint8 (H, W[, C])
        array, or a list of them, or (N, H, W, C) uint8 / (N, C, H, W) [-1, 1] batches)
        from one domain to the other: ``direction`` "a2b" or "b2a" (None: the run's
        first). Any size whose sides are multiples of the network's stride works; the
        output has the input's size. Deterministic (no sampling). Returns ImageOutput
        (``output="tensor"``: (N, C, H, W) in [-1, 1]) or, for "uint8" / "pil", a list of
        arrays or images."""
        from aigc.data.images import to_uint8

        direction = self.check_direction(direction)
        if output not in ("tensor", "uint8", "pil"):
            raise RequestError(f"output={output!r} must be tensor, pil or uint8")
        pixels = self._pixels(images)
        sizes = [p.shape for p in pixels]
        outs: list[torch.Tensor] = []
        with torch.inference_mode():
            i = 0
            while i < len(pixels):  # one forward per run of same-sized images
                j = i + 1
                while j < len(pixels) and j - i < MAX_BATCH and sizes[j] == sizes[i]:
                    j += 1
                batch = np.stack(pixels[i:j])
                outs += list(self.task.translate_batch(self.model, batch, direction, self.device))
                i = j
        outs = self.postprocess(outs)
        if output == "tensor":
            if len({tuple(o.shape) for o in outs}) > 1:
                raise RequestError("images of different sizes: ask for output='uint8' or 'pil'")
            return ImageOutput(torch.stack(outs), seed=0)
        arrays = [to_uint8(o[None])[0] for o in outs]
        if output == "uint8":
            return arrays
        from PIL import Image

        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]

    __call__ = translate

    def compare(self, images: Any = None, n: int = 8, direction: str | None = None) -> np.ndarray:
        """A grid, one row per image: the input, its translation, and the cycle back to
        the input's domain (CycleGAN) or the true pair (held-out images of paired data).
        ``images``: of the source domain, all of one size; None takes the first ``n``
        held-out images of the run's source domain."""
        from aigc.data.images import image_grid
        from aigc.tasks.translate import ends

        direction = self.check_direction(direction)
        src, dst = ends(direction)
        truth = None
        if images is None:
            check_count(n, limit=256)
            val = self.task.domain(src).val_images
            source = np.array(val[: min(n, len(val))])
            if self.task.info["paired"]:
                truth = np.array(self.task.domain(dst).val_images[: len(source)])
        else:
            pixels = self._pixels(images)
            if len({p.shape for p in pixels}) > 1:
                raise RequestError("compare: give images of one size")
            source = np.stack(pixels)
        out = np.stack(self.translate(list(source), direction, output="uint8"))
        columns = [source, out]
        back = f"{dst}2{src}"
        if back in self.directions:
            columns.append(np.stack(self.translate(list(out), back, output="uint8")))
        elif truth is not None:
            columns.append(truth)
        rows = np.stack(columns, axis=1).reshape(-1, *source.shape[1:])
        return image_grid(rows, nrow=len(columns))

    def save(self, images: Any, out: str | Path) -> list[Path]:
        """Writes images (ImageOutput, a tensor, or uint8 arrays) as PNG: ``out`` itself
        for one image, else out's stem with -0, -1, ... appended."""
        from aigc.pipelines.editing import save_images

        return save_images(images, out)

    def format_eval(self, result: dict[str, Any]) -> str:
        n = int(result.get("count", 0))
        lines = [f"{self.run.path} at step {result['step']}: {n} held-out images per direction",
                 f"  {result.get('domains', '')}"]  # fmt: skip
        for d in self.directions:
            parts = [f"judged as the target domain {100 * result[f'judged_target_{d}']:.1f}%"]
            if f"content_kept_{d}" in result:
                parts.append(f"content kept {100 * result[f'content_kept_{d}']:.1f}%")
            if f"psnr_{d}" in result:
                parts.append(f"PSNR to the true pair {result[f'psnr_{d}']:.2f} dB")
            src = d[0]
            if f"cycle_psnr_{src}" in result:
                parts.append(f"cycle PSNR {result[f'cycle_psnr_{src}']:.2f} dB")
            if f"fid_{d}" in result:
                parts.append(f"FID {result[f'fid_{d}']:.2f}")
            lines.append(f"  {d}: " + ", ".join(parts))
            if f"judged_target_real_{d}" in result:
                real = f"judged as the target domain {100 * result[f'judged_target_real_{d}']:.1f}%"
                if f"content_kept_real_{d}" in result:
                    real += f", labels read right {100 * result[f'content_kept_real_{d}']:.1f}%"
                lines.append(f"      (the real held-out {d[-1].upper()} images: {real})")
        return "\n".join(lines)
