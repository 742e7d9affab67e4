"""The HTTP service: OpenAI-compatible endpoints over trained runs (FastAPI).

``create_app(run_dirs, settings)`` loads each run folder with ``aigc.load`` and serves
it under the folder's name:

- text runs (families gpt and chat): ``POST /v1/completions`` and, for chat runs,
  ``POST /v1/chat/completions``, whole or streamed as server-sent events; concurrent
  requests for a model are decoded together (``aigc.serve.batching``);
- image runs (gan, vae, diffusion): ``POST /v1/images/generations``, PNGs as base64;
  concurrent requests for a diffusion model are denoised together, and may stream
  previews (``aigc.serve.images``); diffusion runs also edit images, in OpenAI's
  multipart forms: ``POST /v1/images/edits`` (inpainting a mask, or image-to-image)
  and ``POST /v1/images/variations``;
- audio runs: ``POST /v1/audio/speech`` (spoken-digit and text-to-speech runs) and
  ``POST /v1/audio/denoise`` (speech denoisers), WAV or FLAC (``aigc.serve.audio``);
- ``POST /v1/moderations`` in OpenAI's shape, by the server's ``--moderation`` policy
  (which also screens prompts and generated text) or the default one
  (``aigc.serve.moderation``);
- ``GET /v1/models`` (with an ``aigc`` object per model: kind, family, chat,
  conditional, classes, for diffusion runs their schedulers, defaults and limits, and
  for text-to-speech runs their voices),
  ``GET /health``, ``GET /metrics`` (Prometheus), and the web
  playground: ``GET /`` and ``/static/...``.

With API keys configured, every endpoint but /health and the page's files needs
``Authorization: Bearer KEY``. Every error is OpenAI's
``{"error": {"message", "type", "param", "code"}}``: 400 for a bad value (aigc's
RequestError, ConfigError, DataError included), 401 without a valid key, 404 for an
unknown model or path, 408 past the request timeout, 413 for a body over the limit,
422 for a body of the wrong shape or types (400 when it is not JSON at all), 429 with
Retry-After when a model's queue is full. A 5xx is a bug.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from aigc.serve.audio import denoise_audio, speak_text
from aigc.serve.errors import add_error_handlers
from aigc.serve.images import edit_images, generate_images, prompt_to_labels
from aigc.serve.metrics import ServeMetrics
from aigc.serve.middleware import Observe
from aigc.serve.moderation import answer_moderations, load_moderators
from aigc.serve.schemas import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ImageRequest,
    ModerationRequest,
    SpeechRequest,
)
from aigc.serve.service import ServedModel, Service, load_models
from aigc.serve.settings import ServeSettings
from aigc.serve.text import answer_chat_completions, answer_completions

__all__ = ["ServeSettings", "ServedModel", "create_app", "prompt_to_labels"]

STATIC_DIR = Path(__file__).parent / "static"


def create_app(run_dirs: Sequence[str | Path], settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving these runs (see the module docstring). Loads them now;
    ConfigError or CheckpointError for a run that cannot be served."""
    settings = settings or ServeSettings()
    settings.validate()
    metrics = ServeMetrics()
    moderator, policies = load_moderators(settings)  # before the models: a bad policy fails fast
    service = Service(
        load_models(run_dirs, settings, metrics), settings, metrics, moderator, policies
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for served in service.models.values():  # the requests in flight have finished
            if served.batcher is not None:
                await asyncio.to_thread(served.batcher.stop)
            if served.images is not None:
                await asyncio.to_thread(served.images.stop)
            if served.diffusion is not None:
                await asyncio.to_thread(served.diffusion.stop)

    from aigc import __version__

    app = FastAPI(
        title="aigc", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.aigc = service
    add_error_handlers(app, service)
    app.add_middleware(Observe, service=service)  # type: ignore[arg-type]
    keyed = [Depends(service.check_key)]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, and the models loaded (no key needed)."""
        return {
            "status": "ok",
            "uptime_s": round(time.time() - service.started, 3),
            "models": [
                {"id": m.name, "kind": m.kind, "family": m.family, "chat": m.chat}
                for m in service.models.values()
            ],
        }

    @app.get("/metrics", dependencies=keyed)
    async def metrics_() -> Response:
        return Response(metrics.exposition(), media_type=metrics.content_type)

    @app.get("/v1/models", dependencies=keyed)
    async def list_models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [m.card(service.settings) for m in service.models.values()],
        }

    @app.get("/v1/models/{model}", dependencies=keyed)
    async def get_model(model: str) -> dict[str, Any]:
        if model not in service.models:
            service.model(model, "text")  # the 404
        return service.models[model].card(service.settings)

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await answer_completions(service, body, request)

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await answer_chat_completions(service, body, request)

    @app.post("/v1/moderations", dependencies=keyed)
    async def moderations(body: ModerationRequest) -> dict[str, Any]:
        return await answer_moderations(service, body)

    @app.post("/v1/images/generations", dependencies=keyed)
    async def images(body: ImageRequest, request: Request) -> Response:
        return await generate_images(service, body, request)

    @app.post("/v1/images/edits", dependencies=keyed)
    async def image_edits(request: Request) -> Response:
        return await edit_images(service, request)

    @app.post("/v1/images/variations", dependencies=keyed)
    async def image_variations(request: Request) -> Response:
        return await edit_images(service, request, variation=True)

    @app.post("/v1/audio/denoise", dependencies=keyed)
    async def audio_denoise(request: Request) -> Response:
        return await denoise_audio(service, request)

    @app.post("/v1/audio/speech", dependencies=keyed)
    async def audio_speech(body: SpeechRequest) -> Response:
        return await speak_text(service, body)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            raise ApiError(404, "the web playground is not installed (aigc/serve/static/)")
        return FileResponse(page, headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    return app
