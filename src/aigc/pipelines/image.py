"""The image pipeline: a trained image generator (GAN, and the base of the VAE's)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from aigc.errors import ConfigError, RequestError
from aigc.pipelines.base import (
    EvalResult,
    ImageOutput,
    Pipeline,
    check_count,
    is_index,
    save_eval,
)


class ImagePipeline(Pipeline):
    """A trained image generator: sample, interpolate, save and evaluate.

    Labels (for a conditional run) are given as a class index or name when the run
    has one labelled attribute (``3``, ``"3"``), as ``"attribute=value"`` strings, or
    as a dict ``{"colour": "red", "shape": "circle"}``; attributes left out are drawn
    at random (from the seed).
    """

    kind = "image"
    verbs: ClassVar[frozenset[str]] = frozenset({"generate", "interpolate"})

    @property
    def image_size(self) -> int:
        """The side of the (square) images it makes, in pixels."""
        return int(self.config.model.image_size)

    @property
    def conditional(self) -> bool:
        return bool(self.task.attributes)

    @property
    def classes(self) -> dict[str, list[str]]:
        """Attribute -> its value names, for a conditional run ({} otherwise)."""
        return self.task.classes

    def labels_for(self, n: int, labels: Any = None) -> torch.Tensor | None:
        """The (n, A) label tensor for a label request (see the class docstring); -1 marks
        an attribute left to chance. None when nothing is asked."""

        if labels is None or (isinstance(labels, dict | list | tuple) and not labels):
            return None
        if not self.conditional:
            raise RequestError(
                f"{self.run.path} is not a conditional model; it takes no class or labels"
            )
        attrs, classes = self.task.attributes, self.classes
        wanted: dict[str, Any] = {}
        items = labels if isinstance(labels, list | tuple) else [labels]
        for item in items:
            if isinstance(item, dict):
                wanted.update(item)
            elif isinstance(item, str) and "=" in item:
                key, value = item.split("=", 1)
                wanted[key.strip()] = value.strip()
            elif len(attrs) == 1:
                wanted[attrs[0]] = item
            else:
                raise RequestError(
                    f"label {item!r} is ambiguous: this run has several attributes "
                    f"({', '.join(attrs)}); give attribute=value"
                )
        out = torch.full((n, len(attrs)), -1, dtype=torch.long)  # -1: drawn at random
        for key, value in wanted.items():
            if key not in attrs:
                raise RequestError(
                    f"unknown label attribute {key!r}; this run has {', '.join(attrs)}"
                )
            names = classes[key]
            if isinstance(value, str) and value in names:
                index = names.index(value)
            elif is_index(value):
                index = int(value)
                if not 0 <= index < len(names):
                    raise RequestError(
                        f"{key}={value} is out of range: {key} has {len(names)} classes"
                    )
            else:
                shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
                raise RequestError(f"{key}={value!r} is not one of: {shown}")
            out[:, attrs.index(key)] = index
        return out

    def generate(
        self,
        n: int = 64,
        labels: Any = None,
        seed: int | None = None,
        output: str = "tensor",
        watermark: str | None = None,
    ) -> Any:
        """n images: a (n, C, H, W) float tensor in [-1, 1] (``output="tensor"``), a list of
        PIL images (``"pil"``) or a (n, H, W, C) uint8 array (``"uint8"``). ``watermark``:
        a key that marks each image invisibly (``aigc.safety.image_watermark``)."""
        from aigc.sampling.latent import sample_images

        check_count(n)
        check_watermark(watermark)
        lab = self.labels_for(n, labels)
        with torch.inference_mode():
            images, drawn = sample_images(self.model, n, lab, seed, self.device)
        drawn = None if drawn is None else drawn.cpu()
        out = self.postprocess(ImageOutput(images.cpu(), drawn, seed), watermark)
        return image_output(out.images, output)

    def interpolate(
        self,
        steps: int = 8,
        rows: int = 1,
        labels: Any = None,
        seed: int | None = None,
        output: str = "tensor",
        watermark: str | None = None,
    ) -> Any:
        """``rows`` strips of ``steps`` images walking (spherically) between two random
        latent points; the labels stay fixed along a strip. Shape (rows * steps, ...).
        ``watermark``: a key that marks each image (as ``generate``)."""

        if not isinstance(steps, int) or not 2 <= steps <= 64:
            raise RequestError(f"interpolate={steps!r} must be an integer in [2, 64]")
        check_count(rows * steps)
        check_watermark(watermark)
        gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        m = self.model
        ends = m.sample_z(2 * rows, gen)
        z = torch.cat([m.interpolate(ends[2 * r], ends[2 * r + 1], steps) for r in range(rows)])
        lab = self._labels_drawn(rows, labels, gen)
        if lab is not None:
            lab = lab.repeat_interleave(steps, dim=0)
        with torch.inference_mode():
            images = m.generate(z.to(self.device), None if lab is None else lab.to(self.device))
        out = self.postprocess(ImageOutput(images.cpu(), lab, seed), watermark)
        return image_output(out.images, output)

    def _labels_drawn(self, n: int, labels: Any, gen: torch.Generator) -> torch.Tensor | None:
        """labels_for(n, labels) with every attribute left to chance drawn from ``gen``
        (all of them when nothing is asked); None for an unconditional run."""
        lab = self.labels_for(n, labels)
        if not self.model.cfg.conditional:
            return lab
        random = self.model.random_labels(n, gen).cpu()
        return random if lab is None else torch.where(lab < 0, random, lab)

    def save(self, images: torch.Tensor, out: str | Path, nrow: int | None = None) -> list[Path]:
        """Writes a grid PNG (``out`` ends in .png) or one PNG per image into folder ``out``."""
        from aigc.data.images import image_grid, save_png, to_uint8

        out = Path(out)
        if out.suffix and out.suffix.lower() != ".png":
            raise RequestError(f"{out}: images are written as PNG; give a .png file or a folder")
        pixels = to_uint8(images)
        try:
            if out.suffix:
                save_png(image_grid(pixels, nrow=nrow), out)
                return [out]
            out.mkdir(parents=True, exist_ok=True)
            paths = []
            for i, img in enumerate(pixels):
                paths.append(out / f"{i:05d}.png")
                save_png(img, paths[-1])
            return paths
        except OSError as e:
            raise RequestError(f"{out}: cannot write there ({e.strerror or e})") from None

    def evaluate(
        self,
        n: int | None = None,
        save: bool = True,
        iwae_k: int | None = None,
        metrics: Sequence[str] | None = None,
        against: str | None = None,
        inception_weights: str | None = None,
        fid_protocol: str | None = None,
        scheduler: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> EvalResult:
        """Evaluate the run and save eval.json (and a row in metrics.jsonl).

        n generated images (default data.eval_samples) are compared with the reference
        images (the run's training images, or ``against``: a data source such as
        ``digits`` or a folder, prepared like the run's) by the feature ``metrics``
        (default data.eval_metrics: fid, kid, pr; also is, dc) in the features of the
        FID Inception network when ``inception_weights`` (or $AIGC_INCEPTION_WEIGHTS) is
        given, else of the run's domain classifier; ``extractor`` in the result names
        which. ``fid_protocol`` (default data.fid_protocol, "pytorch-fid") is how the
        Inception network's input is resized and scaled: "pytorch-fid", or "tf" as the
        original TensorFlow code and torch-fidelity do; the result records it.
        Labelled runs also get the classifier's checks: label accuracy (conditional runs),
        class shares and variety. ``iwae_k`` is for VAE runs (VAEPipeline).
        ``scheduler`` and ``steps`` (diffusion runs) sample with another scheduler of
        aigc.schedulers.SCHEDULERS and step count than the run's, without retraining; the
        result records them (``sampler``, ``sample_steps``, ``variant`` "<name>-<steps>")
        and is saved to eval-<variant>.json, leaving eval.json to the run's own sampler.
        ``guidance`` (conditional diffusion runs) is the classifier-free guidance scale;
        given, the variant is "<name>-<steps>-g<guidance>".
        """
        from aigc.tasks.images import check_metric_names

        if n is not None:
            check_count(n, limit=100_000)
            self.config.data.eval_samples = n
        if metrics is not None:
            names = [m.strip() for m in metrics if m.strip()]
            try:
                check_metric_names(names, "metrics")
            except ConfigError as e:
                raise RequestError(str(e)) from None
            self.config.data.eval_metrics = names
        if inception_weights is not None:
            self.config.data.inception_weights = str(inception_weights)
            self.task._extractor = None
        if fid_protocol is not None:
            from aigc.metrics.features import check_fid_protocol

            try:
                check_fid_protocol(fid_protocol, "fid_protocol")
            except ConfigError as e:
                raise RequestError(str(e)) from None
            self.config.data.fid_protocol = fid_protocol
            self.task._extractor = None
        self.task.against = against
        if iwae_k is not None:
            raise RequestError(
                f"iwae_k (--iwae-k) is for VAE runs; {self.run.path} is a {self.task.name} run"
            )
        chosen = None
        with contextlib.ExitStack() as stack:
            if scheduler is not None or steps is not None or guidance is not None:
                try:
                    chosen = stack.enter_context(
                        self.task.sampling_with(self.model, scheduler, steps, guidance)
                    )
                except ConfigError as e:
                    raise RequestError(str(e)) from None
            with torch.inference_mode():
                sums = self.task.eval_sums(self.model, 0, 1, self.device)
        values = self.task.eval_metrics(sums)
        if not values:
            raise RequestError(
                f"{self.run.path} was trained on unlabelled images, so there is no domain "
                "classifier to judge its samples: give --inception-weights PATH for FID/KID/PR"
            )
        result = EvalResult(step=self.step, samples=self.config.data.eval_samples)
        result.update({**self.task.eval_info(), **values})
        if chosen is not None:
            name, steps, w = chosen
            variant = f"{name}-{steps}" if guidance is None else f"{name}-{steps}-g{w:g}"
            result.update(sampler=name, sample_steps=steps, guidance=w, variant=variant)
        if save:
            save_eval(self.run, result)
        return result

    def format_eval(self, result: dict[str, Any]) -> str:
        head = f"{self.run.path} at step {result['step']}"
        if "sampler" in result:
            head += f", sampled by {result['sampler']} in {result['sample_steps']} steps"
            if "guidance" in result:
                head += f" at guidance {result['guidance']:g}"
        skip = frozenset(k for k in result if k in _SAMPLE_CHECKS)
        return "\n".join([head, *self._judged_lines(result, skip), *_sample_check_lines(result)])

    @staticmethod
    def _judged_lines(result: dict[str, Any], skip: frozenset[str] = frozenset()) -> list[str]:
        """What the features and the domain classifier judged, under a line naming the
        extractor, and the judging classifier's own held-out accuracy beside them."""
        judge = {k: v for k, v in result.items() if k.startswith("classifier_accuracy")}
        skip = skip | {"step", "samples", "extractor", "fid_protocol", "classifier_heldout"}
        rest = {k: v for k, v in result.items() if k not in skip and k not in judge}
        if not rest:
            return []
        by = result.get("extractor", "the domain classifier")
        if "fid_protocol" in result:
            by += f" (FID protocol {result['fid_protocol']})"
        lines = [f"  {result['samples']:,} generated images, features and classes from {by}:"]
        if judge:  # how far the judge itself can be trusted, beside what it judged
            said = ", ".join(f"{k.partition('/')[2] or 'class'} {v:.1%}" for k, v in judge.items())
            held = int(result.get("classifier_heldout", 0))
            lines.append(
                f"    (the judging classifier's held-out accuracy: {said} on {held} images)"
            )
        lines += [f"    {k:<30} {v:.4f}" for k, v in rest.items()]
        return lines


# printed by _sample_check_lines rather than as plain numbers
_SAMPLE_CHECKS = frozenset({"sampler", "sample_steps", "variant", "memorised", "clip_score",
                            "clip_retrieval", "clip_retrieval_chance", "real/clip_score",
                            "real/clip_retrieval"})  # fmt: skip


def _sample_check_lines(result: dict[str, Any]) -> list[str]:
    """The CLIP judge's verdict beside its ceiling on real images, and memorisation."""
    lines = []
    if "clip_score" in result:
        score, retrieved = f"{result['clip_score']:.2f}", f"{result['clip_retrieval']:.1%}"
        if "real/clip_score" in result:
            score += f" (real images {result['real/clip_score']:.2f})"
            retrieved += f" (real images {result['real/clip_retrieval']:.1%})"
        chance = result["clip_retrieval_chance"]
        lines += [
            "  CLIP-style judge trained on the run's captions, images from validation captions:",
            f"    {'clip_score':<30} {score}",
            f"    {'clip_retrieval':<30} {retrieved}: own caption among 32, chance {chance:.1%}",
        ]
    if "memorised" in result:
        lines.append(
            f"    {'memorised':<30} {result['memorised']:.1%} (nearer a training image than any "
            "two training images are)"
        )
    return lines


def check_watermark(watermark: Any) -> None:
    """RequestError unless ``watermark`` is None or a non-empty key string (checked
    before sampling, so that a bad key costs no generation)."""
    if watermark is not None:
        from aigc.safety.image_watermark import check_key

        check_key(watermark)


def image_output(images: torch.Tensor, output: str) -> Any:
    """(N, C, H, W) floats in [-1, 1] as asked: "tensor" (as they are), "uint8" (an
    (N, H, W, C) array) or "pil" (a list of images)."""
    if output == "tensor":
        return images
    from aigc.data.images import to_uint8

    pixels = to_uint8(images)
    if output == "uint8":
        return pixels
    if output == "pil":
        from PIL import Image

        return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
    raise RequestError(f"output={output!r} must be tensor, pil or uint8")
