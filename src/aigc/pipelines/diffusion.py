"""The diffusion pipeline: an image pipeline whose sampling takes diffusers' arguments,
prompts for a text-to-image run, and several requests in one denoising batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from aigc.errors import ConfigError, RequestError
from aigc.pipelines.base import ImageOutput, check_count
from aigc.pipelines.editing import has_transparency, read_image, read_mask
from aigc.pipelines.image import ImagePipeline, check_watermark, image_output

MAX_GUIDANCE = 50.0  # beyond this classifier-free guidance only saturates images
DEFAULT_STRENGTH = 0.6  # image-to-image: how much of the denoising the image goes through
INPAINT_STEPS = 50  # inpainting's DDPM steps; each stretch of INPAINT_JUMP_LENGTH steps is
INPAINT_JUMP_LENGTH = 5  # walked INPAINT_RESAMPLE times (RePaint's resampling)
INPAINT_RESAMPLE = 1
MAX_RESAMPLE = 100
# reconstruction guidance's weight (0: off): digits completed from their upper half 62% ->
# 91% at 50 steps, above RePaint's 20 walks (79%) at a sixth of the time
# (benchmarks/diffusion_inpaint.py)
INPAINT_RECONSTRUCTION = 16.0
MAX_RECONSTRUCTION = 1000.0


def check_guidance(w: Any, what: str, error: type[Exception]) -> float:
    """``w`` as a float when it is a guidance scale in [0, MAX_GUIDANCE], else ``error``
    naming ``what`` (the argument's name where the caller gave it)."""
    if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w <= MAX_GUIDANCE:
        raise error(f"{what}={w!r} must be a number in [0, {MAX_GUIDANCE:g}]")
    return float(w)


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
    watermark: str | None = None  # a key that marks the images (aigc.safety.image_watermark)


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
    guidance_scale=..., scheduler=..., seed=..., watermark=...)`` -> ImageOutput, with
    diffusers' argument names (``watermark``: a key that marks each image invisibly);
    ``generate`` as for every image pipeline, with the run's default sampler, steps and
    guidance. ``run_batch`` makes several requests in one loop."""

    verbs: ClassVar[frozenset[str]] = frozenset({"generate", "diffuse", "edit"})

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
        watermark: str | None = None,
    ) -> ImageOutput:
        """callback(i, count, x0_estimate (n, C, H, W) in [-1, 1]) after each step."""
        req = DiffusionRequest(n, prompt, negative_prompt, labels, num_inference_steps,
                               guidance_scale, scheduler, seed, watermark)  # fmt: skip
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
        check_watermark(req.watermark)
        steps = cfg.sample_steps if req.num_inference_steps is None else req.num_inference_steps
        check_count(steps, limit=cfg.num_train_timesteps, what="num_inference_steps")
        name = req.scheduler or cfg.sampler
        try:
            m.scheduler(name)
        except ConfigError as e:
            raise RequestError(str(e)) from None
        w = cfg.guidance if req.guidance_scale is None else req.guidance_scale
        w = check_guidance(w, "guidance_scale", RequestError)
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
                        f"{self.run.path} is not a text-to-image model; it takes no {key} but {how}"
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
                out[i] = self.postprocess(result, job.request.watermark)
                start += k
        return out

    def _inputs(self, jobs: list[_Prepared]) -> dict[str, Any]:
        """The model's keyword arguments for prepared requests made together."""
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
        return {"z": z, "labels": lab, "scheduler": m.scheduler(jobs[0].scheduler),
                "steps": jobs[0].steps, "guidance": guidance, "generator": gen, "text": text,
                "negative": negative}  # fmt: skip

    def _loop(self, jobs: list[_Prepared], name: str, steps: int, callback: Any) -> torch.Tensor:
        with torch.inference_mode():
            images = self.model.generate(**self._inputs(jobs), callback=callback)
        return images.cpu()

    # editing ----------------------------------------------------------------------------
    def img2img(
        self,
        image: Any,
        strength: float = DEFAULT_STRENGTH,
        prompt: str | list[str] | None = None,
        n: int = 1,
        labels: Any = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        seed: int | None = None,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        watermark: str | None = None,
    ) -> ImageOutput:
        """n variations of ``image`` (a path, bytes, PIL image or uint8 array; see
        aigc.pipelines.editing) by SDEdit (Meng et al. 2022): the image noised to the
        level where the last ``strength`` (0, 1] of the steps begin, then denoised
        towards the prompt or labels. Small strengths keep layout and colours; 1 keeps
        almost nothing. Other arguments as for ``__call__``."""
        req = DiffusionRequest(n, prompt, negative_prompt, labels, num_inference_steps,
                               guidance_scale, scheduler, seed, watermark)  # fmt: skip
        return self.run_edit(self.prepare_edit(req, image, strength=strength), callback)

    def inpaint(
        self,
        image: Any,
        mask: Any = None,
        prompt: str | list[str] | None = None,
        n: int = 1,
        labels: Any = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        seed: int | None = None,
        jump_length: int = INPAINT_JUMP_LENGTH,
        resample: int | None = None,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        reconstruction: float | None = None,
        watermark: str | None = None,
    ) -> ImageOutput:
        """n fillings of the masked region of ``image`` by RePaint (Lugmayr et al. 2022),
        the rest returned exactly as given. ``mask``: transparent pixels (OpenAI) or
        white ones (black-and-white mask) mark the region; None: the image's own
        transparent pixels (see aigc.pipelines.editing). Defaults: ddpm over
        INPAINT_STEPS steps, walking each ``jump_length`` steps ``resample`` times
        (INPAINT_RESAMPLE: once, the plain replacement method; going back needs ddpm or
        ddim). ``reconstruction``: the weight of reconstruction guidance (Ho et al.
        2022; see aigc.schedulers.loops), which lets the kept pixels steer each step's
        whole estimate, at about three network calls' cost per step; 0 turns it off
        [INPAINT_RECONSTRUCTION with ddpm and ddim, else 0]. Other arguments as for
        ``__call__``."""
        req = DiffusionRequest(n, prompt, negative_prompt, labels, num_inference_steps,
                               guidance_scale, scheduler, seed, watermark)  # fmt: skip
        job = self.prepare_edit(req, image, mask, inpaint=True, jump_length=jump_length,
                                resample=resample, reconstruction=reconstruction)  # fmt: skip
        return self.run_edit(job, callback)

    def edit_kind(self, image: Any, mask: Any = None, strength: float | None = None) -> str:
        """ "inpaint" when a mask is given, or none and no strength but the image has
        transparent pixels (OpenAI's edits); else "img2img". RequestError for a strength
        with a mask."""
        inpainting = mask is not None or (strength is None and has_transparency(image))
        if inpainting and strength is not None:
            raise RequestError("strength is for image-to-image; with a mask the region is "
                               "filled from noise (leave out strength)")  # fmt: skip
        return "inpaint" if inpainting else "img2img"

    def edit(
        self,
        image: Any,
        mask: Any = None,
        strength: float | None = None,
        jump_length: int = INPAINT_JUMP_LENGTH,
        resample: int | None = None,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        reconstruction: float | None = None,
        **kw: Any,
    ) -> ImageOutput:
        """``inpaint`` or ``img2img`` as ``edit_kind`` says, with ``__call__``'s keywords."""
        job = self.prepare_edit(DiffusionRequest(**kw), image, mask, strength,
                                jump_length=jump_length, resample=resample,
                                reconstruction=reconstruction)  # fmt: skip
        return self.run_edit(job, callback)

    def prepare_edit(
        self,
        req: DiffusionRequest,
        image: Any,
        mask: Any = None,
        strength: float | None = None,
        inpaint: bool | None = None,
        jump_length: int = INPAINT_JUMP_LENGTH,
        resample: int | None = None,
        reconstruction: float | None = None,
    ) -> _PreparedEdit:
        """An editing request checked (RequestError naming what is wrong), its image and
        mask read; ``inpaint`` None decides as ``edit_kind``. Inpainting defaults to
        ddpm over INPAINT_STEPS steps; image-to-image to the run's sampler and steps."""
        if inpaint is None:
            inpaint = self.edit_kind(image, mask, strength) == "inpaint"
        elif inpaint and strength is not None:
            raise RequestError("strength is for image-to-image, not inpainting")
        if inpaint and self.model.cfg.inpainting:  # the model fills in one pass
            for key, v in (("resample", resample), ("reconstruction", reconstruction)):
                if v not in (None, 1 if key == "resample" else 0):
                    raise RequestError(f"{key}={v}: {self.run.path} is an inpainting model, "
                                       f"which fills in one pass ({key} is for RePaint)")  # fmt: skip
            resample, reconstruction = 1, 0.0
        elif inpaint:
            name = req.scheduler or "ddpm"
            steps = INPAINT_STEPS if req.num_inference_steps is None else req.num_inference_steps
            req = replace(req, scheduler=name, num_inference_steps=steps)
            if resample is None:
                resample = INPAINT_RESAMPLE
            for key, v in (("jump_length", jump_length), ("resample", resample)):
                check_count(v, limit=MAX_RESAMPLE, what=key)
            if resample > 1 and name not in ("ddpm", "ddim"):
                raise RequestError(f"resample={resample}: going back in time needs the ddpm or "
                                   f"ddim scheduler; {name} takes resample=1")  # fmt: skip
            if reconstruction is None:
                reconstruction = INPAINT_RECONSTRUCTION if name in ("ddpm", "ddim") else 0.0
            _check_reconstruction(reconstruction)
            if reconstruction > 0 and name not in ("ddpm", "ddim"):
                raise RequestError(f"reconstruction={reconstruction}: reconstruction guidance "
                                   f"needs the ddpm or ddim scheduler; {name} takes 0")  # fmt: skip
        else:
            if reconstruction not in (None, 0):
                raise RequestError("reconstruction is for inpainting; image-to-image redraws "
                                   "the whole image")  # fmt: skip
            strength = DEFAULT_STRENGTH if strength is None else strength
            _check_strength(strength)
        job = self.prepare(req)
        cfg = self.model.cfg
        source = read_image(image, cfg.image_size, cfg.channels)
        fill = torch.from_numpy(read_mask(mask, source, cfg.image_size)) if inpaint else None
        return _PreparedEdit(job, source.tensor(req.n), fill, None if inpaint else float(strength),
                             jump_length, resample or 1, float(reconstruction or 0.0))  # fmt: skip

    def run_edit(
        self,
        edit: _PreparedEdit,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
    ) -> ImageOutput:
        """The images of a prepared editing request."""
        n, device = edit.job.request.n, self.device
        with torch.inference_mode():
            if edit.fill is None:
                images = self.model.generate(**self._inputs([edit.job]), callback=callback,
                                             image=edit.image.to(device),
                                             strength=edit.strength)  # fmt: skip
            else:
                images = self.model.inpaint(
                    edit.image.to(device), edit.fill.expand(n, 1, -1, -1).to(device),
                    jump_length=edit.jump_length, resample=edit.resample, callback=callback,
                    reconstruction=edit.reconstruction, **self._inputs([edit.job]),
                )  # fmt: skip
        job = edit.job
        lab = None if job.labels is None else job.labels.cpu()
        out = ImageOutput(images.cpu(), lab, job.request.seed, job.prompts)
        return self.postprocess(out, job.request.watermark)


@dataclass
class _PreparedEdit:
    """A checked editing request: the request's noise and conditions, and its inputs."""

    job: _Prepared
    image: torch.Tensor  # (n, C, H, W) in [-1, 1]
    fill: torch.Tensor | None  # (H, W) bool, the region to fill; None: image-to-image
    strength: float | None  # image-to-image
    jump_length: int
    resample: int
    reconstruction: float = 0.0


def _check_reconstruction(weight: Any) -> None:
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not (
        0 <= weight <= MAX_RECONSTRUCTION
    ):  # fmt: skip
        raise RequestError(f"reconstruction={weight!r} must be a number in [0, "
                           f"{MAX_RECONSTRUCTION:g}]")  # fmt: skip


def _check_strength(strength: Any) -> None:
    if isinstance(strength, bool) or not isinstance(strength, int | float):
        raise RequestError(f"strength={strength!r} must be a number in (0, 1]")
    if not 0 < strength <= 1:
        raise RequestError(f"strength={strength!r} must be in (0, 1]")


def _cat_padded(rows: list[torch.Tensor]) -> torch.Tensor:
    """Token tensors (n_i, L_i) stacked into (sum n_i, max L_i), -1 padding."""
    width = max(r.size(1) for r in rows)
    return torch.cat([torch.nn.functional.pad(r, (0, width - r.size(1)), value=-1) for r in rows])
