"""The HTTP service (`aigc serve`): OpenAI-compatible text and image endpoints over run
folders, with dynamic batching, API keys, limits, metrics and a web playground.

    from aigc.serve import ServeSettings, create_app

    app = create_app(["runs/gpt-pydoc-char"], ServeSettings(api_keys=["secret"]))

app.py builds the FastAPI app, batching.py runs the models' worker threads, schemas.py
holds the request bodies and the OpenAI error shape, metrics.py the Prometheus
metrics, settings.py the settings and cli.py the command.
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
