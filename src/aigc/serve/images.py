"""POST /v1/images/generations: a request checked, its prompt turned into class labels,
and the images made on the model's thread, answered as base64 PNGs."""

from __future__ import annotations

import base64
import io
import time
from typing import TYPE_CHECKING, Any

from aigc.errors import RequestError
from aigc.serve.batching import JobTimeout
from aigc.serve.errors import timeout_error
from aigc.serve.schemas import ApiError, ImageRequest

if TYPE_CHECKING:
    from aigc.serve.service import Service


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


async def generate_images(service: Service, body: ImageRequest) -> dict[str, Any]:
    """The answer to POST /v1/images/generations; ApiError for a request it cannot serve."""
    served = service.model(body.model, "image")
    s, gen = service.settings, served.generator
    deadline = service.deadline()
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
    if gen.conditional:
        labels = body.labels
        if labels is not None and body.prompt:
            raise ApiError(400, "give labels or a prompt, not both", param="labels")
        if labels is None:
            labels = prompt_to_labels(body.prompt, gen.classes)
    else:  # the prompt of an unconditional run says nothing it can follow
        labels = body.labels
    gen.labels_for(n, labels)  # a bad label: RequestError, 400, before queueing

    def work() -> list[str]:
        out = []
        for image in gen.generate(n, labels=labels, seed=body.seed, output="pil"):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        return out

    service.images_in_flight += 1
    try:
        data = await service.unless_cut_off(served.images.run(work, deadline))
    except JobTimeout:
        raise timeout_error(s) from None
    finally:
        service.images_in_flight -= 1
    service.metrics.images.labels(served.name).inc(n)
    return {"created": int(time.time()), "data": [{"b64_json": b} for b in data]}
