"""Every error of the service as OpenAI's ``{"error": {...}}`` body, counted in the
metrics: aigc's errors and bad values are 400, a malformed body 422 (400 when it is not
JSON), a full queue 429 with Retry-After, a shutdown 503; anything else is a bug (500,
its traceback logged)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from aigc.errors import AigcError, ConfigError, RequestError
from aigc.serve.batching import QueueFull, ShuttingDown
from aigc.serve.schemas import ApiError

if TYPE_CHECKING:
    from aigc.serve.service import Service
    from aigc.serve.settings import ServeSettings

log = logging.getLogger("aigc.serve")


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def timeout_error(settings: ServeSettings) -> ApiError:
    """The 408 of a request that ran past --request-timeout."""
    return ApiError(
        408, f"the request did not finish within {settings.request_timeout_s:g} s (the server's "
        "--request-timeout); ask for fewer tokens or try again", "timeout_error",
        code="request_timeout",
    )  # fmt: skip


def add_error_handlers(app: FastAPI, service: Service) -> None:
    """Answer every exception a route raises in OpenAI's error shape."""

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
        (ShuttingDown, shutting_down), (ClientGone, gone),
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
