"""The HTTP service: OpenAI-compatible endpoints over trained runs (FastAPI).

``create_app(run_dirs, settings)`` loads each run folder with ``aigc.load`` and serves
it under the folder's name:

- text runs (families gpt and chat): ``POST /v1/completions`` and, for chat runs,
  ``POST /v1/chat/completions``, whole or streamed as server-sent events; concurrent
  requests for a model are decoded together (``aigc.serve.batching``);
- image runs (gan, vae): ``POST /v1/images/generations``, PNGs as base64;
- ``GET /v1/models`` (with an ``aigc`` object per model: kind, family, chat,
  conditional, classes), ``GET /health``, ``GET /metrics`` (Prometheus), and the web
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
import base64
import calendar
import hmac
import io
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from aigc.errors import AigcError, ConfigError, RequestError
from aigc.sampling import BatchDecoder, DecodeEvent, SamplingParams, encode_prompt
from aigc.serve.batching import (
    ImageRunner,
    JobTimeout,
    QueueFull,
    ShuttingDown,
    TextBatcher,
    TextJob,
)
from aigc.serve.metrics import ServeMetrics
from aigc.serve.schemas import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ImageRequest,
    error_body,
)
from aigc.serve.settings import ServeSettings

__all__ = ["ServeSettings", "ServedModel", "create_app"]

log = logging.getLogger("aigc.serve")
STATIC_DIR = Path(__file__).parent / "static"
MAX_STOP_STRINGS = 16
DEFAULT_MAX_TOKENS = 16  # completions, as OpenAI's
DEFAULT_CHAT_MAX_TOKENS = 512  # chat: the answer normally ends at its end marker first
ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/completions",
             "/v1/chat/completions", "/v1/images/generations")  # fmt: skip


@dataclass
class ServedModel:
    """A loaded run and the thread that runs it."""

    name: str  # the run folder's name: the "model" of requests
    generator: Any  # aigc.api.TextGenerator or ImageGenerator
    kind: str  # "text" or "image"
    family: str
    created: int  # when the run was created, seconds since the epoch
    batcher: TextBatcher | None = None  # text models
    images: ImageRunner | None = None  # image models

    @property
    def chat(self) -> bool:
        return self.kind == "text" and self.generator.is_chat

    def card(self) -> dict[str, Any]:
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
                "image_size": _image_size(gen) if image else None,
                "block_size": None if image else int(gen.model.cfg.block_size),
            },
        }


def load_models(
    run_dirs: Sequence[str | Path], settings: ServeSettings, metrics: ServeMetrics
) -> dict[str, ServedModel]:
    """Every run, loaded and named by its folder; ConfigError for two runs of one name."""
    from aigc.api import load

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
        elif gen.kind == "image":
            served.images = ImageRunner(name, metrics, settings.queue_size)
        else:
            raise ConfigError(
                f"{path} is a {family!r} run; aigc serve serves text and image generators"
            )
        models[name] = served
    return models


class Service:
    """What the routes share: settings, models, metrics, keys."""

    def __init__(
        self, models: dict[str, ServedModel], settings: ServeSettings, metrics: ServeMetrics
    ) -> None:
        self.models = models
        self.settings = settings
        self.metrics = metrics
        self.started = time.time()
        self._keys = [k.encode() for k in settings.api_keys]
        self.live: set[TextJob] = set()  # text requests in flight
        self.images_in_flight = 0
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
            where = "/v1/completions" if served.kind == "text" else "/v1/images/generations"
            raise ApiError(
                400, f"{name!r} is a {served.kind} model ({served.family}); use {where}",
                param="model", code="wrong_model_kind",
            )  # fmt: skip
        return served

    def deadline(self) -> float:
        return time.monotonic() + self.settings.request_timeout_s


def create_app(run_dirs: Sequence[str | Path], settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving these runs (see the module docstring). Loads them now;
    ConfigError or CheckpointError for a run that cannot be served."""
    settings = settings or ServeSettings()
    settings.validate()
    metrics = ServeMetrics()
    service = Service(load_models(run_dirs, settings, metrics), settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for served in service.models.values():  # the requests in flight have finished
            if served.batcher is not None:
                await asyncio.to_thread(served.batcher.stop)
            if served.images is not None:
                await asyncio.to_thread(served.images.stop)

    from aigc import __version__

    app = FastAPI(
        title="aigc", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.aigc = service
    _add_error_handlers(app, service)
    app.add_middleware(_Observe, service=service)  # type: ignore[arg-type]
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
        return {"object": "list", "data": [m.card() for m in service.models.values()]}

    @app.get("/v1/models/{model}", dependencies=keyed)
    async def get_model(model: str) -> dict[str, Any]:
        if model not in service.models:
            service.model(model, "text")  # the 404
        return service.models[model].card()

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        served = service.model(body.model, "text")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt is an empty list; give at least one prompt", "invalid_request_error", "prompt")  # fmt: skip
        text = _TextRequest(service, served, body, prompts, DEFAULT_MAX_TOKENS, ())
        return await text.respond(request, chat=False, echo=bool(body.echo))

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        served = service.model(body.model, "text")
        if not served.chat:
            raise ApiError(
                400, f"{served.name!r} is not a chat model (family {served.family}); use "
                "/v1/completions, or fine-tune it for chat (aigc finetune RUN --task chat)",
                param="model", code="model_not_chat",
            )  # fmt: skip
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise ApiError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")  # fmt: skip
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        prompt = served.generator.chat_prompt(_chat_messages(body))
        from aigc.tasks.chat import stop_strings

        text = _TextRequest(service, served, body, [prompt], DEFAULT_CHAT_MAX_TOKENS, stop_strings())  # fmt: skip
        return await text.respond(request, chat=True, echo=False)

    @app.post("/v1/images/generations", dependencies=keyed)
    async def images(body: ImageRequest) -> dict[str, Any]:
        served = service.model(body.model, "image")
        return await _generate_images(service, served, body)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            raise ApiError(404, "the web playground is not installed (aigc/serve/static/)")
        return FileResponse(page, headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    return app


# ---------------------------------------------------------------------------
# text


class _TextRequest:
    """One completions or chat request: checked, turned into rows, run, answered."""

    def __init__(
        self,
        service: Service,
        served: ServedModel,
        body: CompletionRequest | ChatCompletionRequest,
        prompts: list[str],
        default_max_tokens: int,
        extra_stop: Sequence[str],
    ) -> None:
        s = service.settings
        self.service, self.served, self.body, self.prompts = service, served, body, prompts
        self.deadline = service.deadline()
        if bad := body.unsupported():
            raise ApiError(
                400, f"{bad[0]} is not supported by this server; leave it out or at its "
                "neutral value", param=bad[0], code="unsupported_parameter",
            )  # fmt: skip
        self.n = n = 1 if body.n is None else body.n
        if not 1 <= n <= s.max_n:
            raise ApiError(400, f"n={n} must be in [1, {s.max_n}] (the server's --max-n)", param="n")  # fmt: skip
        if len(prompts) * n > s.max_n:
            raise ApiError(
                400, f"{len(prompts)} prompts x n={n} asks for {len(prompts) * n} completions; "
                f"at most {s.max_n} per request (the server's --max-n)", param="n",
            )  # fmt: skip
        max_tokens = default_max_tokens if body.max_tokens is None else body.max_tokens
        if body.max_tokens is None:
            max_tokens = min(max_tokens, s.max_tokens_limit)
        if not 0 <= max_tokens <= s.max_tokens_limit:
            raise ApiError(
                400, f"max_tokens={max_tokens} must be in [0, {s.max_tokens_limit}] "
                "(the server's --max-tokens)", param="max_tokens",
            )  # fmt: skip
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise ApiError(400, f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS}", param="stop")  # fmt: skip
        params = [
            SamplingParams(
                max_new_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_k=body.top_k,
                top_p=body.top_p,
                repetition_penalty=(
                    1.0 if body.repetition_penalty is None else body.repetition_penalty
                ),
                stop=(*stop, *extra_stop),
                seed=None if body.seed is None else (body.seed + j) % 2**63,
            )
            for j in range(n)
        ]
        if body.seed is not None and not 0 <= body.seed < 2**63:
            raise ApiError(400, f"seed={body.seed} must be an integer in [0, 2**63)", param="seed")  # fmt: skip
        try:
            params[0].validate()
        except RequestError as e:
            raise ApiError(400, str(e), param=str(e).split("=", 1)[0]) from None
        gen = served.generator
        self.ids = [self._encode(gen, p) for p in prompts]
        self.rows = [(ids, params[j]) for ids in self.ids for j in range(n)]
        self.stream = bool(body.stream)
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.id = uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _encode(self, gen: Any, prompt: str) -> list[int]:
        s = self.service.settings
        if not prompt:
            raise ApiError(400, "the prompt is empty; give at least one character", param="prompt")  # fmt: skip
        if len(prompt) > s.max_prompt_chars:
            raise ApiError(
                400, f"the prompt has {len(prompt):,} characters; at most {s.max_prompt_chars:,} "
                "(the server's --max-prompt-chars)", param="prompt", code="prompt_too_long",
            )  # fmt: skip
        ids = encode_prompt(gen.tokenizer, prompt, gen.model.cfg.vocab_size)  # RequestError: 400
        if len(ids) > s.max_prompt_tokens:
            raise ApiError(
                400, f"the prompt has {len(ids):,} tokens; at most {s.max_prompt_tokens:,} "
                "(the server's --max-prompt-tokens)", param="prompt", code="prompt_too_long",
            )  # fmt: skip
        return ids

    def usage(self, tokens: Sequence[int]) -> dict[str, int]:
        prompt = sum(len(ids) for ids in self.ids)
        return {"prompt_tokens": prompt, "completion_tokens": sum(tokens),
                "total_tokens": prompt + sum(tokens)}  # fmt: skip

    async def respond(self, request: Request, chat: bool, echo: bool) -> Response:
        batcher = self.served.batcher
        job = TextJob(self.rows, stream=self.stream)
        batcher.submit(job)  # QueueFull: 429
        self.service.live.add(job)
        self.service.metrics.prompt_tokens.labels(self.served.name).inc(
            self.n * sum(len(ids) for ids in self.ids)
        )
        if self.stream:
            chunks = self._chunks(job, chat, echo)
            return StreamingResponse(chunks, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        try:
            texts, reasons, tokens = await _unless_disconnected(request, self._collect(job))
        finally:
            self.service.live.discard(job)
            if not job.done:
                batcher.cancel(job)
        if echo:
            texts = [self.prompts[i // self.n] + t for i, t in enumerate(texts)]
        if chat:
            choices = [
                {"index": i, "message": {"role": "assistant", "content": t},
                 "logprobs": None, "finish_reason": r}
                for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
            ]  # fmt: skip
        else:
            choices = [
                {"index": i, "text": t, "logprobs": None, "finish_reason": r}
                for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
            ]
        return JSONResponse({
            "id": ("chatcmpl-" if chat else "cmpl-") + self.id,
            "object": "chat.completion" if chat else "text_completion",
            "created": self.created,
            "model": self.served.name,
            "choices": choices,
            "usage": self.usage(tokens),
        })  # fmt: skip

    async def _collect(self, job: TextJob) -> tuple[list[str], list[str], list[int]]:
        k = len(self.rows)
        texts, reasons, tokens = [""] * k, ["length"] * k, [0] * k
        try:
            async for events in job.events(self.deadline):
                for e in events:
                    texts[e.key] += e.text
                    if e.finish_reason is not None:
                        reasons[e.key], tokens[e.key] = e.finish_reason, e.tokens
        except JobTimeout:
            raise _timeout(self.service.settings) from None
        return texts, reasons, tokens

    async def _chunks(self, job: TextJob, chat: bool, echo: bool) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
        head = {
            "id": ("chatcmpl-" if chat else "cmpl-") + self.id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": self.created,
            "model": self.served.name,
        }

        def chunk(i: int, text: str | None, reason: str | None = None) -> str:
            if chat:
                delta = {} if text is None else {"content": text}
                if text == "" and reason is None:
                    delta["role"] = "assistant"
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": i, "text": text or "", "logprobs": None,
                          "finish_reason": reason}  # fmt: skip
            return _sse({**head, "choices": [choice]})

        tokens = [0] * len(self.rows)
        try:
            for i in range(len(self.rows)):
                if chat:
                    yield chunk(i, "")  # the role comes first, as OpenAI's
                elif echo:
                    yield chunk(i, self.prompts[i // self.n])
            async for events in job.events(self.deadline):
                if out := self._step_chunks(events, chunk, tokens):
                    yield "".join(out)  # one write
            if self.include_usage:
                yield _sse({**head, "choices": [], "usage": self.usage(tokens)})
        except JobTimeout:
            error = _timeout(self.service.settings)
            self.service.metrics.errors.labels("408", error.type).inc()
            yield _sse(error.body())
        except ShuttingDown as e:  # the grace period of a shutdown is over
            self.service.metrics.errors.labels("503", "server_error").inc()
            yield _sse(error_body(str(e), "server_error", code="shutting_down"))
        except RuntimeError as e:  # the worker failed: a bug, reported in its log
            self.service.metrics.errors.labels("500", "server_error").inc()
            yield _sse(error_body(f"generation failed: {e}", "server_error"))
        finally:
            self.service.live.discard(job)
            if not job.done:
                self.served.batcher.cancel(job)
        yield "data: [DONE]\n\n"

    @staticmethod
    def _step_chunks(
        events: list[DecodeEvent], chunk: Callable[..., str], tokens: list[int]
    ) -> list[str]:
        """The chunks of events that are ready, sent in one write. A choice's text from
        several steps (a reader that fell behind) goes out as one chunk, as OpenAI's
        chunks may hold several tokens; its finish comes after its text."""
        out: list[str] = []
        texts: dict[int, str] = {}  # text not yet sent, per choice
        for e in events:
            if e.text:
                texts[e.key] = texts.get(e.key, "") + e.text
            if e.finish_reason is not None:
                tokens[e.key] = e.tokens
                if e.key in texts:
                    out.append(chunk(e.key, texts.pop(e.key)))
                out.append(chunk(e.key, None, e.finish_reason))
        out += [chunk(key, text) for key, text in texts.items()]
        return out


def _chat_messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    """OpenAI messages as aigc's: text parts joined; "developer" is the system role."""
    out = []
    for m in body.messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _timeout(settings: ServeSettings) -> ApiError:
    return ApiError(
        408, f"the request did not finish within {settings.request_timeout_s:g} s (the server's "
        "--request-timeout); ask for fewer tokens or try again", "timeout_error",
        code="request_timeout",
    )  # fmt: skip


class _ClientGone(Exception):
    pass


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`, abandoning it (raising _ClientGone) if the client disconnects."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        raise _ClientGone
    return task.result()


async def _unless_cut_off(service: Service, work: Awaitable[Any]) -> Any:
    """Await `work`, abandoning it (raising ShuttingDown) when shutdown's grace is over."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(service.cut_off.wait())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        raise ShuttingDown(
            f"the server is shutting down and its grace period "
            f"({service.settings.grace_seconds:g} s, --grace-seconds) ended before this "
            "request finished; send it again"
        )
    return task.result()


# ---------------------------------------------------------------------------
# images


def _image_size(gen: Any) -> int | None:
    size = getattr(gen.model.cfg, "image_size", None)
    return int(size) if size else None


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


async def _generate_images(
    service: Service, served: ServedModel, body: ImageRequest
) -> dict[str, Any]:
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
    size = _image_size(gen)
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
        data = await _unless_cut_off(service, served.images.run(work, deadline))
    except JobTimeout:
        raise _timeout(s) from None
    finally:
        service.images_in_flight -= 1
    service.metrics.images.labels(served.name).inc(n)
    return {"created": int(time.time()), "data": [{"b64_json": b} for b in data]}


# ---------------------------------------------------------------------------
# errors, metrics, body limit


def _add_error_handlers(app: FastAPI, service: Service) -> None:
    def answer(error: ApiError) -> JSONResponse:
        service.metrics.errors.labels(str(error.status), error.type).inc()
        return JSONResponse(error.body(), error.status, headers=error.headers)

    async def api_error(request: Request, exc: Exception) -> Response:
        return answer(exc)  # type: ignore[arg-type]

    async def aigc_error(request: Request, exc: Exception) -> Response:
        code = {RequestError: "invalid_request", ConfigError: "invalid_config"}.get(type(exc))
        return answer(ApiError(400, str(exc), code=code or "invalid_value"))

    async def queue_full(request: Request, exc: Exception) -> Response:
        retry = str(exc.retry_after)  # type: ignore[attr-defined]
        return answer(ApiError(429, str(exc), "rate_limit_error", code="queue_full",
                               headers={"Retry-After": retry}))  # fmt: skip

    async def shutting_down(request: Request, exc: Exception) -> Response:
        return answer(ApiError(503, str(exc), "server_error", code="shutting_down"))

    async def gone(request: Request, exc: Exception) -> Response:
        return answer(ApiError(499, "the client closed the connection", code="client_closed"))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no such path {request.url.path!r}; the API is under /v1 (GET /v1/models)"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return answer(ApiError(exc.status_code, message, headers=dict(exc.headers or {})))

    async def validation_error(request: Request, exc: Exception) -> Response:
        return answer(_validation_error(exc))  # type: ignore[arg-type]

    async def bug(request: Request, exc: Exception) -> Response:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return answer(ApiError(500, "internal error (a bug in aigc: the server's log has the "
                                    "traceback)", "server_error"))  # fmt: skip

    for cls, handler in (
        (ApiError, api_error), (AigcError, aigc_error), (QueueFull, queue_full),
        (ShuttingDown, shutting_down), (_ClientGone, gone),
        (StarletteHTTPException, http_error), (RequestValidationError, validation_error),
        (Exception, bug),
    ):  # fmt: skip
        app.add_exception_handler(cls, handler)


def _validation_error(exc: RequestValidationError) -> ApiError:
    """FastAPI's validation error as one OpenAI error naming the first bad field."""
    e = exc.errors()[0]
    if e["type"] == "json_invalid":
        why = e.get("ctx", {}).get("error", e["msg"])
        return ApiError(400, f"the request body is not valid JSON ({why})", code="invalid_json")
    loc = [x for x in e.get("loc", ()) if x != "body"]
    if not loc:
        if e.get("input") is None or isinstance(e.get("input"), bytes | str):
            return ApiError(400, "the request needs a JSON object as its body, sent with Content-Type: application/json", code="invalid_json")  # fmt: skip
        return ApiError(422, f"the request body must be a JSON object ({e['msg']})", code="invalid_body")  # fmt: skip
    param = str(loc[0])
    where = param + "".join(f"[{x}]" for x in loc[1:] if isinstance(x, int))
    if e["type"] == "missing":
        message = f"{where!r} is required"
    elif e["type"] == "extra_forbidden":
        message = f"unknown field {where!r}: neither an OpenAI parameter this server reads nor an aigc extension"  # fmt: skip
    else:
        message = f"{where}: {e['msg']}"
    return ApiError(422, message, param=param, code=e["type"])


def _endpoint(path: str) -> str:
    """The metrics label of a path (a fixed set, whatever clients send)."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "/static" if path.startswith("/static/") else "other"


class _Observe:
    """ASGI middleware: refuses bodies over max_body_bytes (413), counts requests by
    endpoint and status, times them to their last byte, and logs one line each
    (method, path, status, seconds: never headers, so never keys)."""

    def __init__(self, app: Callable, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.monotonic(), 500
        endpoint = _endpoint(scope["path"])

        async def observed_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            body_receive = await _limit_body(scope, receive, self.service.settings.max_body_bytes)
            if body_receive is None:
                limit = self.service.settings.max_body_bytes
                error = ApiError(413, f"the request body is over {limit:,} bytes (the server's "
                                 "--max-body-bytes)", code="body_too_large")  # fmt: skip
                self.service.metrics.errors.labels("413", error.type).inc()
                response = JSONResponse(error.body(), 413, headers={"Connection": "close"})
                await response(scope, receive, observed_send)
                return
            await self.app(scope, body_receive, observed_send)
        finally:
            elapsed = time.monotonic() - start
            m = self.service.metrics
            m.requests.labels(endpoint, str(status)).inc()
            m.latency.labels(endpoint).observe(elapsed)
            log.info("%s %s %d %.3fs", scope["method"], scope["path"], status, elapsed)


async def _limit_body(scope: dict, receive: Callable, limit: int) -> Callable | None:
    """A receive that replays the whole body, read up to `limit` bytes; None past it."""
    headers = dict(scope.get("headers") or [])
    length = headers.get(b"content-length", b"").decode("latin-1")
    if length.isdigit() and int(length) > limit:
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # a disconnect: let the app see it
            first = message
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return None
        if not message.get("more_body", False):
            first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            break
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return first
        return await receive()

    return replay


def _created(run: Any) -> int:
    try:
        stamp = run.info()["created"]
        return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
    except (AigcError, KeyError, ValueError, TypeError):
        return int(run.path.stat().st_mtime)
