"""The diffusion pipeline: an image pipeline whose sampling takes diffusers' arguments,
prompts for a text-to-image run, and several requests in one denoising batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from aigc.errors import ConfigError, RequestError
from aigc.pipelines.base import ImageOutput, check_count
from aigc.pipelines.image import ImagePipeline, image_output

MAX_GUIDANCE = 50.0  # beyond this classifier-free guidance only saturates images


@dataclass
class DiffusionRequest:
    """One request for images, in diffusers' words; None = the run's default."""

    n: int = 1
    prompt: str | list[str] | None = None  # text-to-image runs: one, or one per image
    negative_prompt: str | list[str] | None = None  # replaces the empty caption in guidance
    labels: Any = None  # class-conditional runs (see ImagePipeline)
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None  # a name in aigc.schedulers.SCHEDULERS
    seed: int | None = None


@dataclass
class _Prepared:
    """A checked request as tensors: noise, conditions and the loop it needs."""

    request: DiffusionRequest
    z: torch.Tensor  # (n, z_dim)
    labels: torch.Tensor | None  # (n, A)
    text: torch.Tensor | None  # (n, L) caption tokens, -1 padding
    negative: torch.Tensor | None  # (n, L)
    prompts: list[str] | None
    guidance: float
    steps: int
    scheduler: str


class DiffusionPipeline(ImagePipeline):
    """``pipe(n, prompt=..., negative_prompt=..., labels=..., num_inference_steps=...,
    guidance_scale=..., scheduler=..., seed=...)`` -> ImageOutput, with diffusers'
    argument names; ``generate`` as for every image pipeline, with the run's default
    sampler, steps and guidance. ``run_batch`` makes several requests in one loop."""

    @property
    def text_conditional(self) -> bool:
        return bool(self.model.cfg.text)

    def __call__(
        self,
        n: int = 1,
        labels: Any = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        seed: int | None = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
    ) -> ImageOutput:
        """callback(i, count, x0_estimate (n, C, H, W) in [-1, 1]) after each step."""
        req = DiffusionRequest(n, prompt, negative_prompt, labels, num_inference_steps,
                               guidance_scale, scheduler, seed)  # fmt: skip
        return self.run_batch([self.prepare(req)], callback)[0]

    def generate(
        self,
        n: int = 64,
        labels: Any = None,
        seed: int | None = None,
        output: str = "tensor",
        **kw: Any,
    ) -> Any:
        """ImagePipeline.generate, also taking __call__'s keywords (prompt, ...)."""
        out = self(n, labels=labels, seed=seed, **kw)
        return image_output(out.images, output)

    # checking and batching ------------------------------------------------------------
    def prepare(self, req: DiffusionRequest) -> _Prepared:
        """The request checked (RequestError naming what is wrong) and turned into tensors."""
        from aigc.sampling.latent import draw_latents

        m, cfg = self.model, self.model.cfg
        check_count(req.n)
        steps = cfg.sample_steps if req.num_inference_steps is None else req.num_inference_steps
        check_count(steps, limit=cfg.num_train_timesteps, what="num_inference_steps")
        name = req.scheduler or cfg.sampler
        try:
            m.scheduler(name)
        except ConfigError as e:
            raise RequestError(str(e)) from None
        w = cfg.guidance if req.guidance_scale is None else req.guidance_scale
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w <= MAX_GUIDANCE:
            raise RequestError(f"guidance_scale={w!r} must be a number in [0, {MAX_GUIDANCE:g}]")
        text = negative = prompts = None
        if self.text_conditional:
            if req.labels is not None:
                raise RequestError(
                    f"{self.run.path} is a text-to-image model: describe the image in a "
                    "prompt instead of giving labels"
                )
            prompts = self._prompts(req.prompt, req.n, "prompt")
            text = self._encode(prompts, "prompt")
            if req.negative_prompt is not None:
                negs = self._prompts(req.negative_prompt, req.n, "negative_prompt")
                negative = self._encode(negs, "negative_prompt")
        else:
            for key in ("prompt", "negative_prompt"):
                if getattr(req, key):
                    how = "labels (--class)" if cfg.conditional else "nothing: it is unconditional"
                    raise RequestError(
                        f"{self.run.path} is not a text-to-image model; it takes no {key} "
                        f"but {how}"
                    )
        lab = self.labels_for(req.n, req.labels)
        z, drawn = draw_latents(m, req.n, req.seed)
        if cfg.conditional:
            lab = drawn if lab is None else torch.where(lab < 0, drawn, lab)
        return _Prepared(req, z, lab, text, negative, prompts, float(w), steps, name)

    def _prompts(self, value: Any, n: int, key: str) -> list[str]:
        if value is None:
            return [""] * n
        items = [value] * n if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(p, str) for p in items):
            raise RequestError(f"{key} must be a string or a list of strings")
        if len(items) != n:
            raise RequestError(f"{key}: {len(items)} prompts for n={n} images; give 1 or {n}")
        return list(items)

    def _encode(self, prompts: list[str], key: str) -> torch.Tensor:
        try:
            return self.task.coder.encode(prompts)
        except ValueError as e:
            raise RequestError(f"{key}: {e}") from None

    def run_batch(
        self,
        jobs: list[_Prepared],
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
    ) -> list[ImageOutput]:
        """Prepared requests made together: those sharing a scheduler and step count run
        as one denoising batch (guidance may differ per request). A deterministic
        scheduler gives each request the images it would get alone; a stochastic one
        (ddpm) draws its fresh noise for the whole batch."""
        out: list[ImageOutput | None] = [None] * len(jobs)
        groups: dict[tuple[str, int], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((job.scheduler, job.steps), []).append(i)
        for (name, steps), members in groups.items():
            part = [jobs[i] for i in members]
            images = self._loop(part, name, steps, callback)
            start = 0
            for i, job in zip(members, part, strict=True):
                k = job.request.n
                lab = None if job.labels is None else job.labels.cpu()
                result = ImageOutput(images[start : start + k], lab, job.request.seed, job.prompts)
                out[i] = self.postprocess(result)
                start += k
        return out

    def _loop(
        self, jobs: list[_Prepared], name: str, steps: int, callback: Any
    ) -> torch.Tensor:
        m = self.model
        z = torch.cat([j.z for j in jobs])
        lab = None if jobs[0].labels is None else torch.cat([j.labels for j in jobs])
        text = negative = None
        if self.text_conditional:
            null = [m.null_text(j.request.n).cpu() for j in jobs]
            text = _cat_padded([j.text for j in jobs])
            negative = _cat_padded([j.negative if j.negative is not None else nl
                                    for j, nl in zip(jobs, null, strict=True)])  # fmt: skip
        w = torch.cat([torch.full((j.request.n,), j.guidance) for j in jobs])
        guidance = float(w[0]) if bool((w == w[0]).all()) else w.to(self.device)
        seeds = {j.request.seed for j in jobs}
        seed = next(iter(seeds)) if len(seeds) == 1 else None
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.inference_mode():
            images = m.generate(z, lab, m.scheduler(name), steps, guidance, generator=gen,
                                text=text, negative=negative, callback=callback)  # fmt: skip
        return images.cpu()


def _cat_padded(rows: list[torch.Tensor]) -> torch.Tensor:
    """Token tensors (n_i, L_i) stacked into (sum n_i, max L_i), -1 padding."""
    width = max(r.size(1) for r in rows)
    return torch.cat([torch.nn.functional.pad(r, (0, width - r.size(1)), value=-1) for r in rows])
