"""`aigc serve`: the HTTP service on uvicorn, set by flags or AIGC_* environment variables.

Only Typer and the settings are imported here, so `aigc --help` stays fast; FastAPI,
uvicorn and torch load when the command runs.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import os
import signal
import socket
import typing
from pathlib import Path
from typing import Annotated, Any

import typer

from aigc.errors import ConfigError
from aigc.serve.settings import (
    API_KEYS_FILE_ENV,
    FLAGS,
    ServeSettings,
    read_keys_file,
    read_watermark_key,
)

_TYPES = typing.get_type_hints(ServeSettings)
_LISTS = [name for name in FLAGS if typing.get_origin(_TYPES[name]) is list]


def serve_command(
    runs: Annotated[
        list[Path], typer.Argument(help="Run folders to serve; each is the model of its name.")
    ],
    api_keys_file: Annotated[
        Path | None,
        typer.Option(envvar=API_KEYS_FILE_ENV, help="A file of keys, one per line (# comments)."),
    ] = None,
    watermark_key_file: Annotated[
        Path | None,
        typer.Option(envvar="AIGC_WATERMARK_KEY_FILE", help="A file holding the watermark key."),
    ] = None,
    log_level: Annotated[
        str, typer.Option(help="debug, info (one line per request), warning or error.")
    ] = "info",
    **flags: Any,  # one per ServeSettings field, by its name: see _with_setting_options
) -> None:
    """Serve runs over HTTP: OpenAI-compatible /v1/completions, /v1/chat/completions (chat
    runs) and /v1/images/generations, /v1/models, /health, /metrics and a web playground
    at /. Every flag can also be set by the environment variable shown beside it."""
    for name in _LISTS:  # a list's variable adds to the flags given
        flags[name] = list(flags[name] or [])
        flags[name] += [x.strip() for x in os.environ.get(FLAGS[name].env, "").split(",") if x.strip()]  # fmt: skip
    if api_keys_file is not None:
        flags["api_keys"] += read_keys_file(api_keys_file)
    if watermark_key_file is not None:
        if flags.get("watermark_key") is not None:
            raise ConfigError("give --watermark-key or --watermark-key-file, not both")
        flags["watermark_key"] = read_watermark_key(watermark_key_file)
    settings = ServeSettings(**flags)
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
    keys = settings.api_keys
    access = f"{len(keys)} API key{'s' if len(keys) != 1 else ''} required" if keys else "open"
    typer.echo(f"listening on http://{_url_host(shown_host)}:{shown_port} ({access})")
    if not keys and settings.host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: {settings.host} without --api-key: anyone who reaches it can use it", err=True)  # fmt: skip
    run_server(app, sock, settings, log_level)


def _with_setting_options(command: Any) -> inspect.Signature:
    """The command's signature with an option for every ServeSettings field, as if each
    were written out: its flag, variable, help and default, after the run folders.

    A list setting is a repeatable flag whose variable holds comma-separated values; the
    command adds them to the flags' (Typer would split a list's variable on spaces)."""
    own = list(inspect.signature(command, eval_str=True).parameters.values())
    runs, rest = own[0], [p for p in own[1:] if p.kind is not p.VAR_KEYWORD]
    options, defaults = [], ServeSettings()
    for name, spec in FLAGS.items():
        kind, default = _TYPES[name], getattr(defaults, name)
        if name in _LISTS:
            kind, default = kind | None, None
            option = typer.Option(spec.flag, help=f"{spec.help} Also {spec.env} (comma-separated).")  # fmt: skip
        else:
            option = typer.Option(spec.flag, envvar=spec.env, help=spec.help)
        options.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                         default=default, annotation=Annotated[kind, option]))  # fmt: skip
    rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in rest]
    return inspect.Signature([runs, *options, *rest], return_annotation=None)


serve_command.__signature__ = _with_setting_options(serve_command)  # type: ignore[attr-defined]


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
