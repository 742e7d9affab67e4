"""Diffusion schedulers: step rules with diffusers' contract (see base.py).

Schedulers register here by name, as tasks do in aigc.tasks, and users may add their
own: a subclass of `Scheduler` and an entry in `SCHEDULERS`.
"""

from __future__ import annotations

import difflib
import importlib

from aigc.errors import ConfigError
from aigc.schedulers.base import Scheduler, SchedulerOutput

__all__ = ["SCHEDULERS", "Scheduler", "SchedulerOutput", "get_scheduler"]

# scheduler name -> "module:Class", a subclass of Scheduler; imported on first use.
SCHEDULERS: dict[str, str] = {
    "ddpm": "aigc.schedulers.ddpm:DDPMScheduler",
    "ddim": "aigc.schedulers.ddim:DDIMScheduler",
    "euler": "aigc.schedulers.euler:EulerScheduler",
    "heun": "aigc.schedulers.heun:HeunScheduler",
    "dpm++2m": "aigc.schedulers.dpmsolver:DPMSolverMultistepScheduler",
}


def get_scheduler(name: str) -> type[Scheduler]:
    """The scheduler class registered as ``name``; ConfigError with the closest name if
    unknown."""
    if name not in SCHEDULERS:
        close = difflib.get_close_matches(name, list(SCHEDULERS), n=1)
        known = ", ".join(sorted(SCHEDULERS)) or "none registered yet"
        hint = f"; did you mean {close[0]!r}?" if close else f"; known: {known}"
        raise ConfigError(f"scheduler={name!r} is not a known scheduler{hint}")
    module, cls = SCHEDULERS[name].split(":")
    return getattr(importlib.import_module(module), cls)
