"""Samples written during training: one writer per kind of output, keyed on its type.

A task's ``samples()`` returns named samples; each goes to the first kind that accepts
it, which writes it under the run's samples/ folder and to TensorBoard. The report
reads them back through the same table (``find_samples``), so a new kind (audio as
.wav, video as an animated image) is one entry here, and the trainer and the report
follow.

- text: every text of a step in ``step-N.txt``, one "=== name ===" section each;
- image: an (H, W, C) uint8 array per name in ``step-N-<name>.png``;
- audio: an :class:`AudioSample` (waveform and sample rate) per name in
  ``step-N-<name>.wav`` (16-bit PCM);
- MIDI: a :class:`MidiSample` (a standard MIDI file's bytes) per name in
  ``step-N-<name>.mid``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SampleKind:
    """How one kind of sample is recognised, written, logged and found again."""

    name: str
    accepts: Callable[[Any], bool]
    write: Callable[[Path, int, dict[str, Any]], None]  # (samples_dir, step, {name: sample})
    log: Callable[[Any, str, Any, int], None]  # (TensorBoard writer, name, sample, step)
    pattern: re.Pattern[str]  # its file names; groups: step, and name where one file each


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _write_texts(folder: Path, step: int, texts: dict[str, str]) -> None:
    body = "\n\n".join(f"=== {k} ===\n{v}" for k, v in texts.items())
    (folder / f"step-{step:08d}.txt").write_text(body + "\n", encoding="utf-8")


def _log_text(writer: Any, name: str, text: str, step: int) -> None:
    # TensorBoard renders text as markdown; a code block keeps it verbatim
    writer.add_text(f"samples/{name}", "```\n" + text + "\n```", step)


def _is_image(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.ndim == 3 and value.shape[-1] in (1, 3)


def _write_images(folder: Path, step: int, images: dict[str, np.ndarray]) -> None:
    from PIL import Image

    for k, grid in images.items():
        grid = np.asarray(grid, dtype=np.uint8)
        pixels = grid[..., 0] if grid.shape[-1] == 1 else grid
        Image.fromarray(pixels).save(folder / f"step-{step:08d}-{_safe(k)}.png")


def _log_image(writer: Any, name: str, grid: np.ndarray, step: int) -> None:
    writer.add_image(f"samples/{name}", np.asarray(grid, dtype=np.uint8), step, dataformats="HWC")


TEXT = SampleKind(
    "text", lambda v: isinstance(v, str), _write_texts, _log_text, re.compile(r"step-(\d+)\.txt")
)
IMAGE = SampleKind(
    "image", _is_image, _write_images, _log_image, re.compile(r"step-(\d+)-(.+)\.png")
)


@dataclass(frozen=True)
class AudioSample:
    """A waveform written as a sample: ``wave`` (T,) or (C, T) float in [-1, 1] at
    ``sample_rate`` Hz."""

    wave: np.ndarray
    sample_rate: int


def _write_audio(folder: Path, step: int, clips: dict[str, AudioSample]) -> None:
    from aigc.data.audio import write_audio

    for k, clip in clips.items():
        write_audio(folder / f"step-{step:08d}-{_safe(k)}.wav", clip.wave, clip.sample_rate)


def _log_audio(writer: Any, name: str, clip: AudioSample, step: int) -> None:
    import torch

    wave = np.asarray(clip.wave, dtype=np.float32)
    mono = wave.mean(axis=0) if wave.ndim == 2 else wave
    writer.add_audio(f"samples/{name}", torch.from_numpy(np.clip(mono, -1, 1))[None], step,
                     sample_rate=clip.sample_rate)  # fmt: skip


AUDIO = SampleKind(
    "audio",
    lambda v: isinstance(v, AudioSample),
    _write_audio,
    _log_audio,
    re.compile(r"step-(\d+)-(.+)\.wav"),
)


@dataclass(frozen=True)
class MidiSample:
    """A standard MIDI file's bytes written as a sample (symbolic music)."""

    data: bytes


def _write_midi(folder: Path, step: int, files: dict[str, MidiSample]) -> None:
    for k, f in files.items():
        path = folder / f"step-{step:08d}-{_safe(k)}.mid"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(f.data)
        tmp.replace(path)


def _log_midi(writer: Any, name: str, f: MidiSample, step: int) -> None:
    # TensorBoard has no MIDI view; the rendered audio beside it is what it plays
    writer.add_text(f"samples/{name}", f"MIDI file, {len(f.data)} bytes", step)


MIDI = SampleKind(
    "midi",
    lambda v: isinstance(v, MidiSample),
    _write_midi,
    _log_midi,
    re.compile(r"step-(\d+)-(.+)\.mid"),
)
SAMPLE_KINDS: tuple[SampleKind, ...] = (TEXT, IMAGE, AUDIO, MIDI)


def write_samples(folder: Path, step: int, samples: dict[str, Any], writer: Any = None) -> None:
    """Writes a step's named samples into ``folder`` (made if missing), each by the first
    kind that accepts it, and to TensorBoard when a ``writer`` is given. TypeError for a
    sample no kind accepts: a task returned something the table does not know."""
    grouped: dict[str, dict[str, Any]] = {}
    for name, value in samples.items():
        kind = next((k for k in SAMPLE_KINDS if k.accepts(value)), None)
        if kind is None:
            raise TypeError(f"sample {name!r}: no sample kind accepts a {type(value).__name__}")
        grouped.setdefault(kind.name, {})[name] = value
    if not grouped:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for kind in SAMPLE_KINDS:
        if kind.name in grouped:
            kind.write(folder, step, grouped[kind.name])
            if writer is not None:
                for name, value in grouped[kind.name].items():
                    kind.log(writer, name, value, step)


def find_samples(folder: Path) -> dict[str, dict[str, list[tuple[int, Path]]]]:
    """The sample files in ``folder``: {kind: {name: [(step, path), ...] by step}}; a kind
    with one file per step for all its samples (text) files them under the name ""."""
    found: dict[str, dict[str, list[tuple[int, Path]]]] = {}
    if not folder.is_dir():
        return found
    for p in sorted(folder.iterdir()):
        if not p.is_file():
            continue
        for kind in SAMPLE_KINDS:
            if m := kind.pattern.fullmatch(p.name):
                name = m.group(2) if m.re.groups > 1 else ""
                found.setdefault(kind.name, {}).setdefault(name, []).append((int(m.group(1)), p))
                break
    for by_name in found.values():
        for files in by_name.values():
            files.sort()
    return found
