"""What the routes share: the loaded models, the settings, the metrics and the API keys,
and the deadlines and the shutdown of the requests in flight."""

from __future__ import annotations

import asyncio
import calendar
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request

from aigc.errors import AigcError, ConfigError
from aigc.safety.moderation import Moderator
from aigc.sampling import BatchDecoder
from aigc.serve.batching import (
    DiffusionBatcher,
    ImageJob,
    ImageRunner,
    JobTimeout,
    ShuttingDown,
    TextBatcher,
    TextJob,
)
from aigc.serve.images import diffusion_card, image_size, png_b64, restore_card, translate_card
from aigc.serve.metrics import ServeMetrics
from aigc.serve.schemas import ApiError
from aigc.serve.settings import ServeSettings

log = logging.getLogger("aigc.serve")


@dataclass
class ServedModel:
    """A loaded run and the thread that runs it."""

    name: str  # the run folder's name: the "model" of requests
    generator: Any  # aigc.api.TextGenerator or ImageGenerator
    kind: str  # "text" or "image"
    family: str
    created: int  # when the run was created, seconds since the epoch
    batcher: TextBatcher | None = None  # text models
    images: ImageRunner | None = None  # image models but diffusion ones
    diffusion: DiffusionBatcher | None = None  # diffusion models

    @property
    def chat(self) -> bool:
        return self.kind == "text" and self.generator.is_chat

    def card(self, settings: ServeSettings) -> dict[str, Any]:
        """The model's entry in GET /v1/models."""
        gen = self.generator
        image = self.kind == "image"
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "aigc",
            "aigc": {
                "kind": self.kind,
                "family": self.family,
                "chat": self.chat,
                "conditional": bool(gen.conditional) if image else False,
                "classes": dict(gen.classes) if image else {},
                "step": int(gen.step),
                "image_size": image_size(gen) if image else None,
                "block_size": int(gen.model.cfg.block_size) if self.kind == "text" else None,
                # diffusion runs: text, schedulers, defaults and limits of the extensions
                "diffusion": None if self.diffusion is None else diffusion_card(gen, settings),
                # restoration runs: what they undo, the factor, the input size they need
                "restore": restore_card(gen) if self.kind == "restore" else None,
                # translation runs: directions, domains, sizes
                "translate": translate_card(gen) if self.kind == "translate" else None,
                # text-to-speech runs: the voices /v1/audio/speech takes
                "voices": list(gen.voices) if self.kind == "speech" else None,
            },
        }


def load_models(
    run_dirs: Sequence[str | Path], settings: ServeSettings, metrics: ServeMetrics
) -> dict[str, ServedModel]:
    """Every run, loaded and named by its folder; ConfigError for two runs of one name."""
    from aigc.api import load
    from aigc.pipelines.diffusion import DiffusionPipeline

    paths: dict[str, Path] = {}
    for run_dir in run_dirs:
        path = Path(run_dir)
        name = Path(os.path.abspath(path)).name  # a symlink keeps its own name
        if name in paths:
            raise ConfigError(
                f"two runs are named {name!r} ({paths[name]} and {path}); runs are served under "
                "their folder's name, so rename or copy one of them"
            )
        paths[name] = path
    if not paths:
        raise ConfigError("give at least one run folder to serve")
    models = {}
    for name, path in paths.items():
        gen = load(path, device=settings.device)
        family = gen.config.family
        served = ServedModel(name, gen, gen.kind, family, _created(gen.run))
        if gen.kind == "text":
            decoder = BatchDecoder(gen.model, gen.tokenizer, settings.max_batch_size)
            served.batcher = TextBatcher(
                name, decoder, metrics, settings.max_batch_size, settings.max_wait_ms,
                settings.queue_size,
            )  # fmt: skip
        elif "speak" in gen.verbs:  # /v1/audio/speech, a whole request at a time
            served.images = ImageRunner(name, metrics, settings.queue_size)
        elif isinstance(gen, DiffusionPipeline):
            served.diffusion = DiffusionBatcher(
                name, gen, metrics, settings.max_image_batch, settings.image_wait_ms,
                settings.queue_size, png_b64,
            )  # fmt: skip
        elif gen.kind in ("image", "restore", "translate", "denoise"):
            # restore and translate: /v1/images/edits; denoise: /v1/audio/denoise
            served.images = ImageRunner(name, metrics, settings.queue_size)
        else:
            raise ConfigError(
                f"{path} is a {family!r} run; aigc serve serves text and image generators, "
                "image restorers and translators, speech generators and denoisers"
            )
        models[name] = served
    return models


class Service:
    """What the routes share: settings, models, metrics, keys."""

    def __init__(
        self,
        models: dict[str, ServedModel],
        settings: ServeSettings,
        metrics: ServeMetrics,
        moderator: Moderator | None = None,
        moderation_policies: dict[str, Moderator] | None = None,
    ) -> None:
        self.models = models
        self.settings = settings
        self.metrics = metrics
        self.moderator = moderator  # --moderation: screens prompts and outputs
        self.moderation_policies = moderation_policies or {}  # for /v1/moderations, by name
        self.started = time.time()
        self._keys = [k.encode() for k in settings.api_keys]
        self.live: set[TextJob | ImageJob] = set()  # text and diffusion requests in flight
        self.images_in_flight = 0  # other image requests
        self.cut_off = asyncio.Event()  # set when shutdown ends what is still in flight

    def end_in_flight(self, grace: float) -> int:
        """Shutdown's grace period is over: every request still in flight ends now with
        an error (503, or an error event and [DONE] for a stream), so that each client
        gets an answer before the connections close. Logs one line; returns how many."""
        message = (
            f"the server is shutting down and its grace period ({grace:g} s, --grace-seconds) "
            "ended before this request finished; send it again"
        )
        n = len(self.live) + self.images_in_flight
        for job in list(self.live):
            job.stop(message)
        self.cut_off.set()
        if n:
            log.warning(
                "shutdown: the grace period of %g s is over; ending %d request(s) still in "
                "flight with an error", grace, n,
            )  # fmt: skip
        return n

    async def unless_cut_off(self, work: Awaitable[Any]) -> Any:
        """Await `work`, abandoning it (raising ShuttingDown) when shutdown's grace is over."""
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(self.cut_off.wait())
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not task.done():
            task.cancel()
            raise ShuttingDown(
                f"the server is shutting down and its grace period "
                f"({self.settings.grace_seconds:g} s, --grace-seconds) ended before this "
                "request finished; send it again"
            )
        return task.result()

    async def check_key(self, request: Request) -> None:
        """401 unless the request carries one of the keys (when keys are configured).

        A coroutine, so that FastAPI runs it on the event loop: as a plain function it
        went to a worker thread for every request (one thread per concurrent request).
        """
        if not self._keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        valid = False
        for key in self._keys:  # every key, so the time taken tells nothing
            valid |= hmac.compare_digest(given, key)
        if not valid:
            why = "the API key is not valid" if given else "an API key is needed"
            raise ApiError(
                401, f"{why}: send the header 'Authorization: Bearer KEY'",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )  # fmt: skip

    def model(self, name: str, kind: str) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            known = ", ".join(sorted(self.models))
            raise ApiError(
                404, f"the model {name!r} does not exist; this server has: {known}",
                param="model", code="model_not_found",
            )  # fmt: skip
        if served.kind != kind:
            where = {
                "text": "/v1/completions",
                "denoise": "/v1/audio/denoise",
                "spoken": "/v1/audio/speech",
                "speech": "/v1/audio/speech",
            }.get(served.kind, "/v1/images/generations")
            raise ApiError(
                400, f"{name!r} is a {served.kind} model ({served.family}); use {where}",
                param="model", code="wrong_model_kind",
            )  # fmt: skip
        return served

    def deadline(self) -> float:
        return time.monotonic() + self.settings.request_timeout_s

    async def on_model_thread(self, served: ServedModel, work: Any, deadline: float) -> Any:
        """work() on a whole-request model's thread (image generators, restorers,
        translators, denoisers), counted among the requests in flight; the timeout error
        once ``deadline`` passes."""
        from aigc.serve.errors import timeout_error

        self.images_in_flight += 1
        try:
            return await self.unless_cut_off(served.images.run(work, deadline))
        except JobTimeout:
            raise timeout_error(self.settings) from None
        finally:
            self.images_in_flight -= 1


def _created(run: Any) -> int:
    try:
        stamp = run.info()["created"]
        return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
    except (AigcError, KeyError, ValueError, TypeError):
        return int(run.path.stat().st_mtime)
