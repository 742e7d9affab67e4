"""What every pipeline shares: the run, its task and model, evaluation, saving, and the
``postprocess`` hook that every generated output passes through.

A pipeline is what ``aigc.load(run)`` returns: the trained model (eval mode, on its
device) with everything needed to use it, and the verbs of its kind. Which pipeline a
run gets is its task's ``pipeline_class``. The CLI and the server call pipelines only,
and ask them (``kind``, ``format_eval``) instead of recognising families.
"""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from aigc.config import Config
from aigc.errors import RequestError
from aigc.runs import MetricsLog, RunDir, atomic_write_text

# ---------------------------------------------------------------------------
# Outputs


@dataclass
class TextOutput:
    """Completions of a batch of prompts: texts[i] continues prompts[i]."""

    texts: list[str]
    prompts: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class ImageOutput:
    """Generated images: (N, C, H, W) float in [-1, 1], with the labels (N, A) they were
    drawn for (None for an unconditional model) and the seed that fixes them."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    seed: int | None = None
    prompts: list[str] | None = None  # a text-to-image model's prompt per image


@dataclass
class AudioOutput:
    """Generated sound: ``waveforms``, one (T,) float32 array in [-1, 1] per output (their
    lengths may differ), at ``sample_rate`` Hz; with the seed that fixes them and, for
    symbolic music, the MIDI file of each (bytes)."""

    waveforms: list[Any]
    sample_rate: int
    seed: int | None = None
    midi: list[bytes] | None = None

    def save(self, folder: str | Path, fmt: str = "wav") -> list[Path]:
        """Writes NNNNN.wav (or .flac) for each waveform, and NNNNN.mid beside it where
        there is MIDI, into ``folder`` (made if missing); returns the audio paths."""
        from aigc.data.audio import write_audio

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, wave in enumerate(self.waveforms):
            paths.append(write_audio(folder / f"{i:05d}.{fmt}", wave, self.sample_rate))
            if self.midi is not None:
                mid = folder / f"{i:05d}.mid"
                tmp = mid.with_name(f".{mid.name}.tmp")
                tmp.write_bytes(self.midi[i])
                tmp.replace(mid)
        return paths


class EvalResult(dict):
    """An evaluation: a dict of named numbers (and the names of what they depend on,
    such as the feature extractor), with ``step`` and ``metrics`` as attributes."""

    @property
    def step(self) -> int:
        return int(self["step"])

    @property
    def metrics(self) -> dict[str, float]:
        return {k: v for k, v in self.items() if k != "step" and _is_number(v)}


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# ---------------------------------------------------------------------------
# The base


class Pipeline:
    """A loaded run. Subclasses add the verbs of their kind and set ``kind``: "text",
    "classify" or "image" today (the CLI's and the server's dispatch key)."""

    kind: ClassVar[str] = ""
    # what it does beyond generating, e.g. "interpolate", "reconstruct", "diffuse" (the
    # CLI asks for a verb, never for a family)
    verbs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, run: RunDir, task: Any, device: torch.device, step: int):
        self.run = run
        self.task = task
        self.model = task.model
        self.config: Config = task.config
        self.device = device
        self.step = step

    def postprocess(self, outputs: Any, watermark: str | None = None) -> Any:
        """Every generated output passes through here before it is returned: the place
        for watermarks and safety filters. ``watermark`` (a key) marks images
        (ImageOutput) with aigc.safety.image_watermark and sound (AudioOutput) with
        aigc.safety.audio_watermark; text is marked while it is sampled (the text verbs'
        own ``watermark``), so other outputs pass unchanged."""
        if watermark is not None and isinstance(outputs, ImageOutput):
            from aigc.safety.image_watermark import mark_tensor

            outputs = replace(outputs, images=mark_tensor(outputs.images, watermark))
        if watermark is not None and isinstance(outputs, AudioOutput):
            from aigc.safety.audio_watermark import mark_output

            outputs = mark_output(outputs, watermark)
        return outputs

    def evaluate(self, save: bool = True) -> EvalResult:
        """The task's held-out metrics at the loaded step; saved to eval.json and a row
        of metrics.jsonl unless ``save`` is false."""
        with torch.inference_mode():
            sums = self.task.eval_sums(self.model, 0, 1, self.device)
        result = EvalResult(step=self.step, **self.task.eval_info(), **self.task.eval_metrics(sums))
        if save:
            save_eval(self.run, result)
        return result

    def format_eval(self, result: dict[str, Any]) -> str:
        """The result as the CLI prints it; one line per metric by default."""
        lines = [f"{self.run.path} at step {result['step']}"]
        lines += [f"  {k:<30} {v:.4f}" for k, v in result.items() if k != "step" and _is_number(v)]
        return "\n".join(lines)


def evaluate_split(pipeline: Pipeline, save: bool) -> EvalResult:
    """A run's held-out metrics over prepared train/val splits (chat, classifier): the
    task's eval_sums over the whole val split, with its count."""
    if not pipeline.task.splits:
        pipeline.task.load_data()
    with torch.inference_mode():
        sums = pipeline.task.eval_sums(pipeline.model, 0, 1, pipeline.device)
    result = EvalResult(step=pipeline.step, split="validation", count=int(sums["count"]),
                        **pipeline.task.eval_metrics(sums))  # fmt: skip
    if save:
        save_eval(pipeline.run, result)
    return result


def save_eval(run: RunDir | str | Path, result: dict[str, Any]) -> None:
    """eval.json (the latest evaluation) and a row in metrics.jsonl (the history):
    {"step": ..., "eval_<metric>": ...}. StorageError when the run cannot be written.

    A result with a ``variant`` (an evaluation with other settings than the run's, such
    as another sampler: "ddim-20") goes to eval-<variant>.json alone, leaving eval.json
    and the history to the run's own settings."""
    if not isinstance(run, RunDir):
        run = RunDir(run)
    variant = result.get("variant")
    name = f"eval-{variant}.json" if variant else "eval.json"
    atomic_write_text(run.path / name, json.dumps(result, indent=2) + "\n")
    if variant:
        return
    log = MetricsLog(run.metrics_path)
    try:
        row = {
            f"eval_{k}": v
            for k, v in result.items()
            if k != "step" and (isinstance(v, int | float) or k in ("extractor", "fid_protocol"))
        }
        log.write({"step": result["step"], **row})
    finally:
        log.close()


def check_count(n: Any, limit: int = 10_000, what: str = "n") -> None:
    """RequestError unless ``n`` is an integer in [1, limit]."""
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= limit:
        raise RequestError(f"{what}={n!r} must be an integer in [1, {limit}]")


def is_index(value: Any) -> bool:
    """An integer (Python, NumPy or a 0-d tensor) or a string of one."""
    if isinstance(value, str):
        return value.lstrip("-").isdigit()
    try:
        operator.index(value)
    except TypeError:
        return False
    return not isinstance(value, bool)
