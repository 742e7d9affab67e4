"""The HTTP service (`aigc serve`): OpenAI-compatible text and image endpoints over run
folders, with dynamic batching, API keys, limits, metrics and a web playground.

    from aigc.serve import ServeSettings, create_app

    app = create_app(["runs/gpt-pydoc-char"], ServeSettings(api_keys=["secret"]))

app.py builds the FastAPI app and its routes; service.py loads the models and holds what
the routes share (settings, keys, deadlines, shutdown); text.py answers completions and
chat, images.py image generations; errors.py turns every error into OpenAI's shape,
middleware.py limits bodies, counts and logs requests; batching.py runs the models'
worker threads, schemas.py holds the request bodies and the error shape, metrics.py the
Prometheus metrics, settings.py the settings (each with its flag) and cli.py the command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ServeSettings", "create_app"]

if TYPE_CHECKING:
    from aigc.serve.app import create_app
    from aigc.serve.settings import ServeSettings


def __getattr__(name: str) -> Any:
    # imported on first use: `aigc --help` must not load FastAPI or torch
    if name == "create_app":
        from aigc.serve.app import create_app

        return create_app
    if name == "ServeSettings":
        from aigc.serve.settings import ServeSettings

        return ServeSettings
    raise AttributeError(f"module 'aigc.serve' has no attribute {name!r}")
