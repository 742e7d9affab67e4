"""POST /v1/images/generations: a request checked and answered as base64 PNGs.

GAN and VAE runs: the prompt turned into class labels, the images made on the model's
thread. Diffusion runs (DiffusionPipeline): the prompt is a text-to-image run's caption
(a class-conditional run's labels by name, as for a GAN), with diffusers' arguments as
extensions (num_inference_steps, guidance_scale, negative_prompt, scheduler); concurrent
requests are denoised together (batching.DiffusionBatcher); and ``stream: true``
answers in OpenAI's image-streaming events: ``partial_images`` previews of each image
(``image_generation.partial_image``, with ``index``, ``step`` and ``total_steps`` as
extensions), then each image (``image_generation.completed``).
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from aigc.errors import RequestError
from aigc.serve.batching import EditJob, Finished, ImageJob, JobTimeout, Preview, ShuttingDown
from aigc.serve.errors import timeout_error
from aigc.serve.moderation import screen_prompts
from aigc.serve.schemas import ApiError, ImageRequest, error_body
from aigc.serve.text import unless_disconnected

if TYPE_CHECKING:
    from aigc.serve.service import ServedModel, Service
    from aigc.serve.settings import ServeSettings

# fields only a diffusion run can honour (any other run refuses them unless neutral)
DIFFUSION_FIELDS = ("num_inference_steps", "guidance_scale", "negative_prompt", "scheduler",
                    "stream", "partial_images")  # fmt: skip


def image_size(gen: Any) -> int:
    """The side of the images an image pipeline makes, in pixels."""
    return gen.image_size


def prompt_to_labels(prompt: str | None, classes: dict[str, list[str]]) -> Any:
    """Labels for ImageGenerator.labels_for from an image prompt, or None for none.

    The prompt lists items separated by commas or semicolons: ``attribute=value``, or a
    bare value (a class name or index) when the run has one attribute, or a class name
    that only one attribute has ("red, circle"). Names match case-insensitively when
    they do not match exactly.
    """
    items = [p.strip() for p in (prompt or "").replace(";", ",").split(",") if p.strip()]
    if not items:
        return None
    wanted: dict[str, str] = {}
    for item in items:
        if "=" in item:
            key, value = (x.strip() for x in item.split("=", 1))
        elif len(classes) == 1:
            key, value = next(iter(classes)), item
        else:
            owners = [a for a, names in classes.items() if item in names] or [
                a for a, names in classes.items() if item.lower() in map(str.lower, names)
            ]
            if len(owners) != 1:
                shown = "; ".join(f"{a}: {', '.join(n[:8])}" for a, n in classes.items())
                why = "names no class" if not owners else f"is a class of {', '.join(owners)}"
                raise RequestError(f"prompt item {item!r} {why}; write attribute=value ({shown})")
            key, value = owners[0], item
        names = classes.get(key, [])
        if value not in names:  # a case-insensitive match, else leave it to labels_for
            value = next((n for n in names if n.lower() == value.lower()), value)
        wanted[key] = value
    return wanted


def png_b64(images: Any) -> list[str]:
    """Images (n, C, H, W) in [-1, 1] as base64 PNGs."""
    from aigc.pipelines.image import image_output

    out = []
    for image in image_output(images, "pil"):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def step_limit(pipe: Any, settings: ServeSettings) -> int:
    """The most num_inference_steps a diffusion request may ask for."""
    return min(settings.max_steps, int(pipe.model.cfg.num_train_timesteps))


def diffusion_card(pipe: Any, settings: ServeSettings) -> dict[str, Any]:
    """A diffusion model's extensions in GET /v1/models: defaults, choices and limits."""
    from aigc.pipelines.diffusion import MAX_GUIDANCE
    from aigc.schedulers import SCHEDULERS

    cfg, limit = pipe.model.cfg, step_limit(pipe, settings)
    return {
        "text": pipe.text_conditional,  # takes a caption (and a negative prompt)
        "schedulers": sorted(SCHEDULERS),
        "scheduler": cfg.sampler,
        "num_inference_steps": min(int(cfg.sample_steps), limit),
        "max_inference_steps": limit,
        "guidance_scale": float(cfg.guidance),
        "max_guidance_scale": MAX_GUIDANCE,
    }


def restore_card(pipe: Any) -> dict[str, Any]:
    """A restoration run's entry in GET /v1/models: its damage, factor and input size."""
    return {"degradation": pipe.degradation.describe(), "scale": pipe.scale,
            "input_size": pipe.input_size}  # fmt: skip


def translate_card(pipe: Any) -> dict[str, Any]:
    """A translation run's entry in GET /v1/models: its directions, domains, the size it
    was trained at and the multiple that input sides must be."""
    return {"directions": list(pipe.directions), "domains": pipe.domains,
            "image_size": int(pipe.config.model.image_size),
            "multiple": int(pipe.model.multiple)}  # fmt: skip


def _checked_common(service: Service, served: ServedModel, body: ImageRequest) -> int:
    """The checks every image request passes (format, n, seed, size, prompt lengths);
    returns n."""
    s, gen = service.settings, served.generator
    fmt = body.response_format or "b64_json"
    if fmt == "url":
        raise ApiError(
            400, "response_format 'url' is not offered: this server hosts no files; use "
            "b64_json (the default)", param="response_format", code="unsupported_response_format",
        )  # fmt: skip
    if fmt != "b64_json":
        raise ApiError(400, f"response_format {fmt!r}: only b64_json", param="response_format")
    n = 1 if body.n is None else body.n
    if not 1 <= n <= s.max_n:
        raise ApiError(400, f"n={n} must be in [1, {s.max_n}] (the server's --max-n)", param="n")  # fmt: skip
    if body.seed is not None and not 0 <= body.seed < 2**63:
        raise ApiError(400, f"seed={body.seed} must be an integer in [0, 2**63)", param="seed")
    size = image_size(gen)
    if body.size is not None and body.size != f"{size}x{size}":
        raise ApiError(400, f"size {body.size!r}: {served.name} makes {size}x{size} images", param="size")  # fmt: skip
    for key in ("prompt", "negative_prompt"):
        text = getattr(body, key)
        if text is not None and len(text) > s.max_prompt_chars:
            raise ApiError(
                400, f"the {key} has {len(text):,} characters; at most {s.max_prompt_chars:,} "
                "(the server's --max-prompt-chars)", param=key, code="prompt_too_long",
            )  # fmt: skip
    return n


async def generate_images(service: Service, body: ImageRequest, request: Request) -> Response:
    """The answer to POST /v1/images/generations; ApiError for a request it cannot serve."""
    served = service.model(body.model, "image")
    gen = served.generator
    deadline = service.deadline()
    n = _checked_common(service, served, body)
    await screen_image_prompts(service, body)
    if served.diffusion is not None:
        return await _diffusion_images(service, served, body, n, request)
    neutral = {"stream": (None, False), "partial_images": (None, 0)}
    for key in DIFFUSION_FIELDS:
        if getattr(body, key) not in neutral.get(key, (None,)):
            raise ApiError(
                400, f"{key} is for diffusion models; {served.name!r} is a {served.family} "
                "model, which makes its images in one pass: leave it out",
                param=key, code="unsupported_parameter",
            )  # fmt: skip
    labels = _labels(gen, body)
    gen.labels_for(n, labels)  # a bad label: RequestError, 400, before queueing

    def work() -> list[str]:  # marked when the server has a --watermark-key
        key = service.settings.watermark_key
        return png_b64(gen.generate(n, labels=labels, seed=body.seed, watermark=key))

    data = await service.on_model_thread(served, work, deadline)
    service.metrics.images.labels(served.name).inc(n)
    return JSONResponse({"created": int(time.time()), "data": [{"b64_json": b} for b in data]})


async def screen_image_prompts(service: Service, body: ImageRequest) -> None:
    """The prompt and negative prompt through the server's --moderation policy (a 400
    when refused; redacted in place)."""
    for key in ("prompt", "negative_prompt"):
        if getattr(body, key):
            setattr(body, key, (await screen_prompts(service, [getattr(body, key)], key))[0])


def _labels(gen: Any, body: ImageRequest) -> Any:
    """The labels a GAN, VAE or class-conditional diffusion run is asked for."""
    if not gen.conditional:  # the prompt of an unconditional run says nothing it can follow
        return body.labels
    if body.labels is not None and body.prompt:
        raise ApiError(400, "give labels or a prompt, not both", param="labels")
    return body.labels if body.labels is not None else prompt_to_labels(body.prompt, gen.classes)


def _diffusion_checks(
    service: Service, served: ServedModel, body: ImageRequest, default_steps: int | None = None
) -> tuple[int, bool, int, str | None, Any]:
    """A diffusion request's own checks (400s): (steps, stream, previews, prompt, labels)."""
    from aigc.pipelines.diffusion import MAX_GUIDANCE
    from aigc.schedulers import SCHEDULERS

    s, pipe = service.settings, served.generator
    limit, timesteps = step_limit(pipe, s), int(pipe.model.cfg.num_train_timesteps)
    steps = body.num_inference_steps
    if steps is not None and not 1 <= steps <= limit:
        why = "the server's --max-steps" if s.max_steps <= timesteps else (
            f"the model was trained on {timesteps} timesteps")  # fmt: skip
        raise ApiError(400, f"num_inference_steps={steps} must be in [1, {limit}] ({why})",
                       param="num_inference_steps")  # fmt: skip
    if steps is None:
        steps = min(int(default_steps or pipe.model.cfg.sample_steps), limit)
    w = body.guidance_scale
    if w is not None and not (math.isfinite(w) and 0 <= w <= MAX_GUIDANCE):
        raise ApiError(400, f"guidance_scale={w} must be a number in [0, {MAX_GUIDANCE:g}]",
                       param="guidance_scale")  # fmt: skip
    if body.scheduler is not None and body.scheduler not in SCHEDULERS:
        raise ApiError(
            400, f"scheduler {body.scheduler!r} is not known; choose one of "
            f"{', '.join(sorted(SCHEDULERS))}", param="scheduler", code="unknown_scheduler",
        )  # fmt: skip
    stream, previews = bool(body.stream), body.partial_images or 0
    if previews and not stream:
        raise ApiError(400, "partial_images needs stream: true", param="partial_images")
    if not 0 <= previews <= steps:
        raise ApiError(400, f"partial_images={previews} must be in [0, {steps}] (at most one "
                       "a step)", param="partial_images")  # fmt: skip
    if pipe.text_conditional:
        if body.labels is not None:
            raise ApiError(400, f"{served.name!r} is a text-to-image model: describe the "
                           "image in the prompt instead of giving labels", param="labels")  # fmt: skip
        return steps, stream, previews, body.prompt, None
    if body.negative_prompt is not None:
        raise ApiError(400, f"{served.name!r} is not a text-to-image model; it takes no "
                       "negative_prompt", param="negative_prompt")  # fmt: skip
    return steps, stream, previews, None, _labels(pipe, body)


def _bad_request(e: RequestError, fields: Any) -> ApiError:
    """A pipeline's RequestError as a 400 naming the field its message starts with."""
    head = re.match(r"[a-z_]+", str(e))
    param = head[0] if head and head[0] in fields else None
    return ApiError(400, str(e), param=param, code="invalid_request")


async def _diffusion_images(
    service: Service, served: ServedModel, body: ImageRequest, n: int, request: Request
) -> Response:
    """A diffusion run's answer: checked here and by the pipeline's prepare (400s), then
    queued for the model's batcher, and answered whole or as a stream of events."""
    from aigc.pipelines.diffusion import DiffusionRequest

    steps, stream, previews, prompt, labels = _diffusion_checks(service, served, body)
    req = DiffusionRequest(n, prompt, body.negative_prompt, labels, steps, body.guidance_scale,
                           body.scheduler, body.seed, service.settings.watermark_key)  # fmt: skip
    try:
        prepared = served.generator.prepare(req)
    except RequestError as e:  # e.g. a prompt longer than the text encoder's context
        raise _bad_request(e, ImageRequest.model_fields) from None
    job = ImageJob(prepared, previews if stream else 0)
    return await _answer(service, served, job, stream, request, "image_generation")


async def _answer(
    service: Service, served: ServedModel, job: ImageJob, stream: bool, request: Request,
    event: str,
) -> Response:  # fmt: skip
    """A diffusion job queued on the model's batcher (QueueFull: 429) and answered whole,
    or as OpenAI's streaming events named ``event``.partial_image / .completed."""
    s, deadline = service.settings, service.deadline()
    served.diffusion.submit(job)
    service.live.add(job)
    if stream:
        size = image_size(served.generator)
        return StreamingResponse(_events(service, served, job, deadline, f"{size}x{size}", event),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})  # fmt: skip
    try:
        data = await unless_disconnected(request, _images_of(job, deadline, s))
    finally:
        service.live.discard(job)
        if not job.done:
            served.diffusion.cancel(job)
    service.metrics.images.labels(served.name).inc(job.n)
    return JSONResponse({"created": int(time.time()), "data": [{"b64_json": b} for b in data]})


async def _images_of(job: ImageJob, deadline: float, settings: ServeSettings) -> list[str]:
    try:
        async for item in job.events(deadline):
            if isinstance(item, Finished):
                return item.images
    except JobTimeout:
        raise timeout_error(settings) from None
    raise AssertionError("a job's events end with its images")


async def _events(
    service: Service,
    served: ServedModel,
    job: ImageJob,
    deadline: float,
    size: str,
    event: str = "image_generation",
) -> AsyncIterator[str]:
    """OpenAI's image-streaming events: each preview of each image, then each image; an
    error event (OpenAI's error shape) ends a stream that cannot finish."""
    head = {"size": size, "quality": "auto", "background": "opaque", "output_format": "png"}
    try:
        async for item in job.events(deadline):
            now = int(time.time())
            if isinstance(item, Preview):
                yield "".join(_sse(f"{event}.partial_image", {
                    "type": f"{event}.partial_image", "b64_json": b, "created_at": now,
                    **head, "partial_image_index": item.index, "index": i, "step": item.step,
                    "total_steps": item.total,
                }) for i, b in enumerate(item.images))  # fmt: skip
            else:
                service.metrics.images.labels(served.name).inc(len(item.images))
                yield "".join(_sse(f"{event}.completed", {
                    "type": f"{event}.completed", "b64_json": b, "created_at": now,
                    **head, "index": i,
                }) for i, b in enumerate(item.images))  # fmt: skip
    except JobTimeout:
        error = timeout_error(service.settings)
        service.metrics.errors.labels("408", error.type).inc()
        yield _sse("error", error.body())
    except ShuttingDown as e:  # the grace period of a shutdown is over
        service.metrics.errors.labels("503", "server_error").inc()
        yield _sse("error", error_body(str(e), "server_error", code="shutting_down"))
    except RuntimeError as e:  # the worker failed: a bug, reported in its log
        service.metrics.errors.labels("500", "server_error").inc()
        yield _sse("error", error_body(f"generation failed: {e}", "server_error"))
    finally:
        service.live.discard(job)
        if not job.done:
            served.diffusion.cancel(job)


def _sse(event: str, obj: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(obj, separators=(',', ':'))}\n\n"


# --- POST /v1/images/edits and /v1/images/variations (multipart forms) -------------------

# form fields by type; OpenAI's and aigc's extensions (diffusers' names, and RePaint's)
_INT_FIELDS = ("n", "seed", "num_inference_steps", "partial_images", "jump_length", "resample")
_FLOAT_FIELDS = ("guidance_scale", "strength", "reconstruction")
_TEXT_FIELDS = ("model", "prompt", "negative_prompt", "size", "response_format", "user",
                "scheduler", "direction")  # fmt: skip
_BOOL_FIELDS = ("stream",)
# OpenAI fields accepted at the value that asks for nothing aigc does not do
_NEUTRAL = {"quality": ("auto", "standard"), "background": ("auto", "opaque"),
            "output_format": ("png",), "input_fidelity": ("low",), "moderation": ("auto",)}  # fmt: skip
_VARIATION_FIELDS = frozenset({"model", "n", "size", "response_format", "user", "seed",
                               "num_inference_steps", "scheduler", "strength", "guidance_scale"})  # fmt: skip
MAX_UPLOAD_FILES = 2  # an image and a mask


async def _form(request: Request, variation: bool) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The multipart form's fields, typed, and its files' bytes; 400 naming the field
    for anything else."""
    from starlette.datastructures import UploadFile

    route = "variations" if variation else "edits"
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, f"/v1/images/{route} takes multipart/form-data: the image as a file "
                       "field, the other fields as text", code="invalid_content_type")  # fmt: skip
    try:
        form = await request.form(max_files=MAX_UPLOAD_FILES + 1, max_fields=40)
    except Exception as e:  # starlette's MultiPartException or HTTPException: a bad form
        detail = getattr(e, "detail", None) or getattr(e, "message", None) or str(e)
        raise ApiError(400, f"cannot read the form: {detail}", code="invalid_form") from None
    fields: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    for key, value in form.multi_items():
        name = "image" if key == "image[]" else key
        if name in fields or name in files:
            raise ApiError(400, f"{name} is given twice; one {name} per request", param=name)
        if isinstance(value, UploadFile):
            if name not in ("image",) + (() if variation else ("mask",)):
                raise ApiError(400, f"{name}: no file field of that name", param=name)
            files[name] = await value.read()
            continue
        if variation and name not in _VARIATION_FIELDS:
            raise ApiError(400, f"{name} is not a field of image variations", param=name)
        try:
            if name in _INT_FIELDS:
                fields[name] = int(value)
            elif name in _FLOAT_FIELDS:
                fields[name] = float(value)
            elif name in _BOOL_FIELDS:
                if value.lower() not in ("true", "false"):
                    raise ValueError
                fields[name] = value.lower() == "true"
            elif name in _TEXT_FIELDS:
                fields[name] = value
            elif name in _NEUTRAL:
                if value not in _NEUTRAL[name]:
                    raise ApiError(400, f"{name}={value!r} is not offered; leave it out or give "
                                   f"{_NEUTRAL[name][0]!r}", param=name,
                                   code="unsupported_parameter")  # fmt: skip
            else:
                raise ApiError(400, f"{name} is not a field of image {route}", param=name,
                               code="unknown_parameter")  # fmt: skip
        except ValueError:
            kind = "an integer" if name in _INT_FIELDS else (
                "a number" if name in _FLOAT_FIELDS else "true or false")  # fmt: skip
            raise ApiError(400, f"{name}={value!r} must be {kind}", param=name) from None
    if "image" not in files:
        raise ApiError(400, "give the image to edit as a file field named image", param="image")
    if "model" not in fields:
        raise ApiError(400, "give the model (a served run's name)", param="model")
    return fields, files


async def edit_images(service: Service, request: Request, variation: bool = False) -> Response:
    """The answer to POST /v1/images/edits (inpainting where the mask, or the image's own
    transparency, says; image-to-image at ``strength`` otherwise) or, with
    ``variation``, /v1/images/variations (image-to-image without a prompt)."""
    import warnings

    from aigc.pipelines.diffusion import INPAINT_STEPS, DiffusionRequest

    fields, files = await _form(request, variation)
    whole = service.models.get(fields["model"])
    if whole is not None and whole.kind in _WHOLE_IMAGE_FIELDS:
        return await _whole_image(service, whole, fields, files)
    extra = {k: fields.pop(k) for k in ("strength", "jump_length", "resample", "reconstruction")
             if k in fields}  # fmt: skip
    body = ImageRequest(**fields)
    served = service.model(body.model, "image")
    if served.diffusion is None:
        raise ApiError(400, f"{served.name!r} is a {served.family} model; editing images needs a "
                       "diffusion model", param="model", code="unsupported_model")  # fmt: skip
    n = _checked_common(service, served, body)
    await screen_image_prompts(service, body)
    pipe = served.generator
    mask = files.get("mask")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an image of another size is resized
        try:
            kind = "img2img" if variation else pipe.edit_kind(files["image"], mask,
                                                              extra.get("strength"))  # fmt: skip
        except RequestError as e:
            raise _bad_request(e, ("strength",)) from None
        inpaint = kind == "inpaint"
        steps, stream, previews, prompt, labels = _diffusion_checks(
            service, served, body, INPAINT_STEPS if inpaint else None
        )
        req = DiffusionRequest(n, prompt, body.negative_prompt, labels, steps,
                               body.guidance_scale, body.scheduler, body.seed,
                               service.settings.watermark_key)  # fmt: skip
        try:
            prepared = pipe.prepare_edit(req, files["image"], mask, extra.get("strength"),
                                         inpaint=inpaint, **{k: v for k, v in extra.items()
                                                             if k != "strength"})  # fmt: skip
        except RequestError as e:
            raise _bad_request(e, (*ImageRequest.model_fields, *extra, "image", "mask")) from None
    job = EditJob(lambda callback: pipe.run_edit(prepared, callback), n, previews if stream else 0,
                  service.settings.watermark_key)  # fmt: skip
    return await _answer(service, served, job, stream, request, "image_edit")


# fields a restoration or translation model reads from an edit request (a prompt only
# when empty: the official client sends one with every edit)
_COMMON = frozenset({"model", "prompt", "n", "response_format", "user"})
_WHOLE_IMAGE_FIELDS = {
    "restore": _COMMON | {"seed", "num_inference_steps", "scheduler"},
    "translate": _COMMON | {"direction"},
}
_WHOLE_IMAGE_VERBS = {"restore": "restores", "translate": "translates"}


async def _whole_image(
    service: Service, served: ServedModel, fields: dict[str, Any], files: dict[str, bytes]
) -> Response:
    """POST /v1/images/edits to a restoration run (aigc.pipelines.restore: denoised,
    de-blocked, or super-resolved by the run's factor) or a translation run
    (aigc.pipelines.translate: into the other domain, ``direction``): the whole image,
    on the model's thread; one image per request, no mask."""
    pipe, kind = served.generator, served.kind
    allowed, does = _WHOLE_IMAGE_FIELDS[kind], _WHOLE_IMAGE_VERBS[kind]
    if "mask" in files:
        raise ApiError(400, f"{served.name!r} {does} the whole image; leave out the mask",
                       param="mask")  # fmt: skip
    for key in fields:
        if key not in allowed:
            raise ApiError(400, f"{key} is not a field of a {served.family} model's edits "
                           f"({served.name!r})", param=key, code="unsupported_parameter")  # fmt: skip
    if fields.get("prompt"):
        raise ApiError(400, f"{served.name!r} {does} images and reads no prompt; send an "
                       "empty one", param="prompt")  # fmt: skip
    if fields.get("n", 1) != 1:
        raise ApiError(400, f"n: {served.name!r} gives one image per request", param="n")
    if fields.get("response_format", "b64_json") != "b64_json":
        raise ApiError(400, "response_format: only b64_json", param="response_format")
    seed = fields.get("seed", 0)
    if not 0 <= seed < 2**63:
        raise ApiError(400, f"seed={seed} must be an integer in [0, 2**63)", param="seed")
    steps = fields.get("num_inference_steps")
    if steps is not None and not 1 <= steps <= service.settings.max_steps:
        raise ApiError(400, f"num_inference_steps={steps} must be in [1, "
                       f"{service.settings.max_steps}]", param="num_inference_steps")  # fmt: skip

    def work() -> list[str]:
        if kind == "translate":
            out = pipe.translate(files["image"], direction=fields.get("direction"))
        else:
            out = pipe.restore(files["image"], seed=seed, num_inference_steps=steps,
                               scheduler=fields.get("scheduler"))  # fmt: skip
        return png_b64(pipe.postprocess(out, service.settings.watermark_key).images)

    try:
        data = await service.on_model_thread(served, work, service.deadline())
    except RequestError as e:
        raise _bad_request(e, (*allowed, "image")) from None
    service.metrics.images.labels(served.name).inc(1)
    return JSONResponse({"created": int(time.time()), "data": [{"b64_json": b} for b in data]})
