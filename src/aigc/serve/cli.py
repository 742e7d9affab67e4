"""`aigc serve`: the HTTP service on uvicorn, set by flags or AIGC_* environment variables.

Only Typer and the settings are imported here, so `aigc --help` stays fast; FastAPI,
uvicorn and torch load when the command runs.
"""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import socket
from pathlib import Path
from typing import Annotated, Any

import typer

from aigc.errors import ConfigError
from aigc.serve.settings import API_KEYS_FILE_ENV, OPTIONS, ServeSettings, read_keys_file

_D = ServeSettings()  # the defaults, shown in --help


def _env(name: str) -> str:
    return OPTIONS[name][1]


def serve_command(
    runs: Annotated[
        list[Path], typer.Argument(help="Run folders to serve; each is the model of its name.")
    ],
    host: Annotated[
        str, typer.Option(envvar=_env("host"), help="Address to listen on (0.0.0.0: all).")
    ] = _D.host,
    port: Annotated[
        int, typer.Option(envvar=_env("port"), help="Port to listen on (0: any free one).")
    ] = _D.port,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            "--api-key",
            help="A key clients must send as 'Authorization: Bearer KEY'; repeatable. "
            "Also AIGC_API_KEYS (comma-separated). No key: the service is open.",
        ),
    ] = None,
    api_keys_file: Annotated[
        Path | None,
        typer.Option(envvar=API_KEYS_FILE_ENV, help="A file of keys, one per line (# comments)."),
    ] = None,
    max_batch_size: Annotated[
        int,
        typer.Option(envvar=_env("max_batch_size"), help="Rows a text model decodes together."),
    ] = _D.max_batch_size,
    max_wait_ms: Annotated[
        float,
        typer.Option(
            envvar=_env("max_wait_ms"), help="An idle model waits this long to fill a batch."
        ),
    ] = _D.max_wait_ms,
    max_tokens: Annotated[
        int, typer.Option(envvar=_env("max_tokens_limit"), help="Largest max_tokens allowed.")
    ] = _D.max_tokens_limit,
    max_n: Annotated[
        int,
        typer.Option(envvar=_env("max_n"), help="Most completions or images in one request."),
    ] = _D.max_n,
    max_prompt_tokens: Annotated[
        int, typer.Option(envvar=_env("max_prompt_tokens"), help="Longest prompt, in tokens.")
    ] = _D.max_prompt_tokens,
    max_prompt_chars: Annotated[
        int,
        typer.Option(envvar=_env("max_prompt_chars"), help="Longest prompt, in characters."),
    ] = _D.max_prompt_chars,
    max_body_bytes: Annotated[
        int,
        typer.Option(envvar=_env("max_body_bytes"), help="Larger request bodies get 413."),
    ] = _D.max_body_bytes,
    queue_size: Annotated[
        int,
        typer.Option(
            envvar=_env("queue_size"), help="Requests that may wait per model; more get 429."
        ),
    ] = _D.queue_size,
    request_timeout: Annotated[
        float,
        typer.Option(
            envvar=_env("request_timeout_s"), help="Seconds a request may take in all (408)."
        ),
    ] = _D.request_timeout_s,
    grace_seconds: Annotated[
        float,
        typer.Option(
            envvar=_env("grace_seconds"),
            help="On SIGTERM or Ctrl-C: seconds for requests in flight to finish.",
        ),
    ] = _D.grace_seconds,
    device: Annotated[
        str, typer.Option(envvar=_env("device"), help="auto, cpu, cuda or mps.")
    ] = _D.device,
    torch_threads: Annotated[
        int,
        typer.Option(
            envvar=_env("torch_threads"),
            help="CPU: torch threads for the models (0: one per core but one, left to HTTP).",
        ),
    ] = _D.torch_threads,
    log_level: Annotated[
        str, typer.Option(help="debug, info (one line per request), warning or error.")
    ] = "info",
) -> None:
    """Serve runs over HTTP: OpenAI-compatible /v1/completions, /v1/chat/completions (chat
    runs) and /v1/images/generations, /v1/models, /health, /metrics and a web playground
    at /. Every flag can also be set by the environment variable shown beside it."""
    keys = list(api_key or [])
    keys += [k.strip() for k in os.environ.get(_env("api_keys"), "").split(",") if k.strip()]
    if api_keys_file is not None:
        keys += read_keys_file(api_keys_file)
    settings = ServeSettings(
        host=host, port=port, api_keys=keys, max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms, max_tokens_limit=max_tokens, max_n=max_n,
        max_prompt_tokens=max_prompt_tokens, max_prompt_chars=max_prompt_chars,
        max_body_bytes=max_body_bytes, queue_size=queue_size,
        request_timeout_s=request_timeout, grace_seconds=grace_seconds, device=device,
        torch_threads=torch_threads,
    )  # fmt: skip
    settings.validate()
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"--log-level {log_level!r}: choose debug, info, warning or error")
    sock = bind(settings.host, settings.port)  # before loading: a taken port fails fast
    from aigc.serve.app import create_app

    if settings.device in ("auto", "cpu"):  # on a GPU the host threads matter little
        import torch

        torch.set_num_threads(settings.threads())
    app = create_app(runs, settings)
    service = app.state.aigc
    shown_host, shown_port = sock.getsockname()[:2]
    for m in service.models.values():
        typer.echo(f"serving {m.name} (a {m.family} {m.kind} model)")
    access = f"{len(keys)} API key{'s' if len(keys) != 1 else ''} required" if keys else "open"
    typer.echo(f"listening on http://{_url_host(shown_host)}:{shown_port} ({access})")
    if not keys and settings.host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: {settings.host} without --api-key: anyone who reaches it can use it", err=True)  # fmt: skip
    run_server(app, sock, settings, log_level)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port; ConfigError naming the flag when that fails."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host!r}: cannot resolve it ({e.strerror})") from None
    family, kind, proto, _, address = info[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} ({e.strerror}); choose another --port (AIGC_PORT)"
        ) from None
    return sock


def run_server(app: Any, sock: socket.socket, settings: ServeSettings, log_level: str) -> None:
    """uvicorn on `sock` until SIGTERM or Ctrl-C: then it stops accepting connections,
    gives the requests in flight settings.grace_seconds to finish, and returns."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["loggers"]["aigc.serve"] = {
        "handlers": ["default"], "level": log_level.upper(), "propagate": False,
    }  # fmt: skip
    config = uvicorn.Config(
        app, log_level=log_level, log_config=log_config, access_log=False, lifespan="on",
        timeout_graceful_shutdown=settings.grace_seconds,  # type: ignore[arg-type]
    )  # fmt: skip
    service = app.state.aigc
    grace = settings.grace_seconds

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            # uvicorn cancels what is still running when the grace period is over, which
            # cuts streams mid-event and logs a traceback per request: end them first,
            # each with an answer, a moment before it would
            loop = asyncio.get_running_loop()
            timer = loop.call_later(max(0.0, grace - min(0.5, grace / 4)),
                                    service.end_in_flight, grace)  # fmt: skip
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    server = Server(config)
    # uvicorn raises the signal that stopped it again once it has shut down, to end the
    # process the default way (killed by SIGTERM, KeyboardInterrupt for Ctrl-C); with
    # these handlers in place then, a graceful stop ends the command normally (exit 0).
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in handled}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
