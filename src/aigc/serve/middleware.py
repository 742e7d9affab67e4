"""The ASGI middleware in front of every route: the body limit (413), the request metrics
and the one log line per request."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse

from aigc.serve.schemas import ApiError

if TYPE_CHECKING:
    from aigc.serve.service import Service

log = logging.getLogger("aigc.serve")
ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/completions",
             "/v1/chat/completions", "/v1/images/generations")  # fmt: skip


class Observe:
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


def _endpoint(path: str) -> str:
    """The metrics label of a path (a fixed set, whatever clients send)."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "/static" if path.startswith("/static/") else "other"


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
