"""One self-contained HTML page describing one or more run folders.

``write_report(runs, out)`` reads each run folder (run.json, config.yaml,
metrics.jsonl, eval.json, samples/, the latest checkpoint's state.json) and
writes a single HTML file that needs nothing else: CSS inline, charts and sample
grids embedded as base64 PNG data URIs (sample sounds as WAV data URIs beside their
spectrograms), and a Content-Security-Policy that
forbids the page from loading anything or running scripts. Every string that
comes from a file is HTML-escaped.

Curves are chosen by the keys present in metrics.jsonl, not by family: each
training key that names a loss (``loss``, ``d_loss``, ``elbo``, ``kl``, ...) gets
a panel, with its held-out twin (``val_<key>``) drawn on the same axes; the other
``val_*`` keys get panels of their own.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
import re
import shlex
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aigc.errors import CheckpointError, ConfigError, RequestError
from aigc.runs import RunDir, atomic_write_text
from aigc.samples import AUDIO, IMAGE, TEXT, find_samples
from aigc.tasks import get_task

MAX_SAMPLE_STEPS = 6  # sample grids / texts shown per run, evenly spaced over training
MAX_PANELS = 12  # chart panels per figure
MAX_TEXT_CHARS = 6000  # of one sample text file
MAX_IMAGE_BYTES = 8 << 20  # a sample image larger than this is not embedded
MAX_AUDIO_BYTES = 4 << 20  # nor a sample sound (two minutes of 16 kHz 16-bit mono)

# Words that mark a training scalar as a loss worth a curve (matched against the
# parts of a key split at "_", so "d_loss" and "g_loss" match and "lr" does not).
LOSS_WORDS = frozenset({"loss", "elbo", "nelbo", "kl", "recon", "nll"})
# Prefixes of evaluation rows in metrics.jsonl: the trainer's held-out evaluations
# (val_) and those of `aigc eval` (eval_, also saved whole in eval.json).
EVAL_PREFIXES = ("val_", "eval_")

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Nothing may be fetched and no script may run; only inline CSS and data: images.
_CSP = "default-src 'none'; img-src data:; media-src data:; style-src 'unsafe-inline'"


# ---------------------------------------------------------------------------
# Numbers


def format_number(value: Any) -> str:
    """A metric value as text: 4 significant digits, thousands separators for big counts."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)  # nan, inf, -inf
        if value == 0:
            return "0"
        if abs(value) >= 1000 and value.is_integer():
            return f"{int(value):,}"
        if abs(value) >= 1e4:
            return f"{value:,.0f}"
        if abs(value) >= 1e-3:
            text = f"{value:.4g}"
            return f"{value:,.0f}" if "e" in text else text  # 9999.7 would read 1e+04
        return f"{value:.3e}"
    if value is None:
        return "null"
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def format_duration(seconds: float) -> str:
    """Seconds as "4.9 s", "3 min 07 s" or "2 h 05 min"."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = round(seconds)
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# ---------------------------------------------------------------------------
# Reading a run folder


@dataclass
class RunSummary:
    """What the report knows about one run folder; ``notes`` says what is missing."""

    path: Path
    name: str
    family: str
    info: dict[str, Any]
    config_text: str | None = None
    step: int | None = None
    train_time: float | None = None
    items_seen: int | None = None
    item_name: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl
    eval: dict[str, Any] | None = None  # eval.json
    image_samples: dict[str, list[tuple[int, Path]]] = field(default_factory=dict)
    audio_samples: dict[str, list[tuple[int, Path]]] = field(default_factory=dict)
    text_samples: list[tuple[int, Path]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    loss_keys: frozenset[str] | None = None  # the task's; None for a task this install lacks

    def last_val(self) -> tuple[int | None, dict[str, Any]]:
        """The last held-out row of metrics.jsonl as (step, {name without val_: value})."""
        for row in reversed(self.rows):
            vals = {k[4:]: v for k, v in row.items() if k.startswith("val_")}
            if vals:
                step = row.get("step")
                return (step if isinstance(step, int) else None), vals
        return None, {}

    @property
    def eval_step(self) -> int | None:
        step = (self.eval or {}).get("step")
        return step if isinstance(step, int) and not isinstance(step, bool) else None

    @property
    def eval_stale(self) -> bool:
        """eval.json was measured on an older checkpoint than the run's latest one."""
        if not self.eval or self.step is None:
            return False
        return self.eval_step is None or self.eval_step < self.step

    def final_metrics(self) -> dict[str, Any]:
        """eval.json where present and current, else the last held-out row (eval.json wins
        on a clash). A stale eval.json (older than the latest checkpoint) is left out."""
        merged = dict(self.last_val()[1])
        if self.eval and not self.eval_stale:
            merged.update({k: v for k, v in self.eval.items() if k != "step"})
        return merged


def read_run(path: str | Path) -> RunSummary:
    """Reads what a report needs from a run folder.

    Raises CheckpointError when ``path`` is not a run folder; anything missing
    inside one (metrics, eval.json, samples, checkpoints) becomes a note instead.
    """
    run = RunDir(path)
    info = run.info()  # the clear error for a folder that is not a run
    name = run.path.resolve().name
    s = RunSummary(path=run.path, name=name, family=str(info["family"]), info=info)
    with contextlib.suppress(ConfigError):
        s.loss_keys = get_task(s.family).loss_keys

    if run.config_path.is_file():
        s.config_text = run.config_path.read_text(encoding="utf-8", errors="replace")
    else:
        s.notes.append("config.yaml is missing.")

    s.rows = run.read_metrics()
    if not s.rows:
        s.notes.append("metrics.jsonl is missing or empty: nothing was logged, so no curves.")
    for row in s.rows:
        for k in row:
            if k.endswith("_per_s") and s.item_name is None:
                s.item_name = k.removesuffix("_per_s")

    eval_path = run.path / "eval.json"
    if eval_path.is_file():
        try:
            data = json.loads(eval_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            s.notes.append("eval.json is damaged (not valid JSON); run `aigc eval` again.")
        else:
            if isinstance(data, dict):
                s.eval = data
            else:
                s.notes.append("eval.json does not hold a JSON object; run `aigc eval` again.")
    else:
        s.notes.append(
            f"No eval.json: run `aigc eval {shlex.quote(str(run.path))}` for final metrics."
        )

    _read_progress(run, s)
    if s.eval_stale:
        at = f"step {s.eval_step:,}" if s.eval_step is not None else "an unknown step"
        s.notes.append(
            f"eval.json was measured at {at}, but the run is now at step {s.step:,}: its "
            f"metrics are stale and left out of comparisons; run `aigc eval {shlex.quote(str(run.path))}` again."
        )
    _find_samples(run, s)
    return s


def _read_progress(run: RunDir, s: RunSummary) -> None:
    """Step, training time and items seen, from the latest checkpoint or else the log."""
    state: dict[str, Any] = {}
    try:
        ckpt = run.latest_checkpoint()
    except CheckpointError as e:
        s.notes.append(str(e))
        ckpt = None
    if ckpt is not None:
        try:
            loaded = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
            state = loaded if isinstance(loaded, dict) else {}
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            s.notes.append(f"{ckpt / 'state.json'} cannot be read.")
    else:
        s.notes.append("No checkpoint yet.")
    logged_steps = [r["step"] for r in s.rows if isinstance(r.get("step"), int)]
    times = [r["time"] for r in s.rows if _is_number(r.get("time"))]
    step = state.get("step")
    s.step = step if isinstance(step, int) else max(logged_steps, default=None)
    t = state.get("train_time")
    s.train_time = float(t) if _is_number(t) else (float(times[-1]) if times else None)
    items = state.get("items_seen")
    s.items_seen = items if isinstance(items, int) else None


def _find_samples(run: RunDir, s: RunSummary) -> None:
    found = find_samples(run.samples_dir)
    s.image_samples = found.get(IMAGE.name, {})
    s.audio_samples = found.get(AUDIO.name, {})
    s.text_samples = found.get(TEXT.name, {}).get("", [])
    if not found:
        s.notes.append("samples/ holds no samples yet.")


def evenly_spaced(items: Sequence[Any], k: int) -> list[Any]:
    """At most ``k`` items, first and last included, evenly spaced in between."""
    n = len(items)
    if n <= k:
        return list(items)
    if k == 1:
        return [items[-1]]
    return [items[round(i * (n - 1) / (k - 1))] for i in range(k)]


# ---------------------------------------------------------------------------
# Charts


def is_loss_key(key: str, loss_keys: frozenset[str] | None = None) -> bool:
    """A training scalar that is a loss: one of the task's ``loss_keys`` when its task is
    known, else a key naming a loss word (a run of a task this install lacks). Per-group
    or per-unit keys (with "/") are not."""
    if "/" in key or key.startswith(EVAL_PREFIXES):
        return False
    if loss_keys is not None:
        return key in loss_keys
    return any(word in LOSS_WORDS for word in re.split(r"[_\-.]", key.lower()))


def _series(rows: Iterable[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for r in rows:
        v, step = r.get(key), r.get("step")
        if _is_number(v) and isinstance(step, int) and math.isfinite(v):
            steps.append(step)
            values.append(float(v))
    return steps, values


def _keys_in_order(rows: Iterable[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if _is_number(v):
                seen.setdefault(k, None)
    return list(seen)


def chart_panels(
    rows: list[dict[str, Any]], loss_keys: frozenset[str] | None = None
) -> tuple[list[list[str]], list[str]]:
    """The curves a run's metrics call for: (loss panels, held-out panels).

    A loss panel lists a training key and, when logged, its ``val_`` twin; a
    held-out panel is one remaining ``val_*`` key. ``eval_*`` rows (single points
    written by `aigc eval`) are left to the metric table, which reads eval.json.
    """
    keys = _keys_in_order(rows)
    present = set(keys)
    losses = [k for k in keys if is_loss_key(k, loss_keys)]
    loss_panels = [[k, f"val_{k}"] if f"val_{k}" in present else [k] for k in losses]
    overlaid = {f"val_{k}" for k in losses}
    held_out = [k for k in keys if k.startswith("val_") and k not in overlaid]
    return loss_panels, held_out


def _plain(label: str) -> str:
    return label.replace("$", r"\$")  # no mathtext from a metric's name


def render_panels(rows: list[dict[str, Any]], panels: list[list[str]]) -> bytes:
    """A PNG of small multiples, one axes per panel, each key a curve over steps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.0 * ncols, 2.7 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    for i, keys in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for j, key in enumerate(keys):
            steps, values = _series(rows, key)
            held_out = key.startswith("val_")
            style = "o-" if held_out or len(steps) < 2 else "-"
            label = "held-out" if held_out and len(keys) > 1 else "training"
            ax.plot(steps, values, style, color=f"C{j}", markersize=3.5, lw=1.4, label=label)
        ax.set_title(_plain(keys[0]), fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def overlay_panels(
    runs: Sequence[list[dict[str, Any]]], loss_keys: frozenset[str] | None = None
) -> list[list[str]]:
    """The charts of a comparison: one per metric any run logged, in first-seen order.

    A loss panel is ``[key, val_key]`` (training and held-out curves of every run on
    the same axes); a held-out metric without a training twin is ``[val_key]``.
    """
    keys: dict[str, None] = {}
    for rows in runs:
        for k in _keys_in_order(rows):
            if k not in keys and _series(rows, k)[0]:  # at least one finite point
                keys.setdefault(k, None)
    losses = [k for k in keys if is_loss_key(k, loss_keys)]
    panels = [[k, f"val_{k}"] for k in losses]
    twins = {f"val_{k}" for k in losses}
    panels += [[k] for k in keys if k.startswith("val_") and k not in twins]
    return panels


def run_colour(i: int) -> str:
    """The colour of the i-th run in every comparison chart and legend (matplotlib's cycle)."""
    from matplotlib.colors import to_hex

    return to_hex(f"C{i % 10}")


def render_overlay(
    runs: Sequence[tuple[str, list[dict[str, Any]]]], panels: list[list[str]]
) -> bytes:
    """A PNG of one axes per panel with every run's curves on it: the run is the colour,
    training is a solid line and held-out a dashed line with markers; one legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.0 * ncols, 2.7 * nrows + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    for i, keys in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for r, (_, rows) in enumerate(runs):
            for key in keys:
                steps, values = _series(rows, key)
                if not steps:
                    continue
                held_out = key.startswith("val_")
                style = "o--" if held_out else ("-" if len(steps) > 1 else "o")
                ax.plot(steps, values, style, color=run_colour(r), markersize=3.5, lw=1.4)
        ax.set_title(_plain(keys[0]), fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=run_colour(r), lw=2.5) for r in range(len(runs))]
    labels = [_plain(name) for name, _ in runs]
    handles += [
        Line2D([], [], color="#555", ls="-"),
        Line2D([], [], color="#555", ls="--", marker="o", ms=3.5),
    ]
    labels += ["training", "held-out"]
    fig.legend(handles, labels, loc="upper center", ncols=min(len(labels), 6), fontsize=8,
               frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ---------------------------------------------------------------------------
# HTML


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Cells arrive as escaped HTML."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(
        "<tr>" + f"<th>{r[0]}</th>" + "".join(f"<td>{c}</td>" for c in r[1:]) + "</tr>"
        for r in rows
    )
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    return (
        f'<span class="{"num" if _is_number(value) else "txt"}">{_e(format_number(value))}</span>'
    )


def _facts(s: RunSummary) -> list[tuple[str, str]]:
    items = (
        f"{s.items_seen:,}" + (f" {s.item_name}" if s.item_name else "") if s.items_seen else None
    )
    return [
        ("family", s.family),
        ("step", f"{s.step:,}" if s.step is not None else "–"),
        ("training time", format_duration(s.train_time) if s.train_time is not None else "–"),
        ("seen", items or "–"),
        ("created", str(s.info.get("created", "–"))),
        ("aigc version", str(s.info.get("aigc_version", "–"))),
    ]


def _overlay(runs: list[RunSummary], names: list[str]) -> str:
    """Every run's curves overlaid, one chart per metric, with a legend of run colours."""
    series = [(n, s.rows) for n, s in zip(names, runs, strict=True)]
    known = [s.loss_keys for s in runs]
    loss_keys = None if None in known else frozenset().union(*known)
    panels = overlay_panels([s.rows for s in runs], loss_keys)
    if not panels:
        return _note("No run has logged a loss or held-out metric yet, so no curves.")
    shown = panels[:MAX_PANELS]
    png = render_overlay(series, shown)
    legend = "".join(
        f'<li><span class="swatch" style="background:{run_colour(i)}"></span>{_e(n)}</li>'
        for i, n in enumerate(names)
    )
    curves = ", ".join(k[0] for k in shown)
    out = (
        f'<ul class="legend">{legend}<li class="styles">solid: training · dashed: held-out'
        f'</li></ul><img class="chart overlay" alt="all runs: {_e(curves)}" src="{_data_uri(png)}">'
    )
    if len(panels) > len(shown):
        out += _note(f"{len(panels) - len(shown)} more metrics not drawn.")
    return out


def _comparison(runs: list[RunSummary], names: list[str]) -> str:
    facts = [_facts(s)[:4] for s in runs]  # family, step, training time, seen
    metrics = [s.final_metrics() for s in runs]
    order: dict[str, None] = {}
    for m in metrics:
        for k in m:
            order.setdefault(k, None)
    width = len(runs) + 1
    head = "".join(f"<th>{h}</th>" for h in ["", *(_e(n) for n in names)])
    body = [
        f"<tr><th>{_e(label)}</th>" + "".join(f"<td>{_e(f[i][1])}</td>" for f in facts) + "</tr>"
        for i, (label, _) in enumerate(facts[0])
    ]
    body.append(f'<tr class="group"><th colspan="{width}">final metrics</th></tr>')
    body += [
        f"<tr><th>{_e(k)}</th>" + "".join(f"<td>{_cell(m.get(k))}</td>" for m in metrics) + "</tr>"
        for k in order
    ]
    if not order:
        body.append(f'<tr><td colspan="{width}">no run reports metrics yet</td></tr>')
    return (
        '<section id="comparison"><h2>Comparison</h2>'
        + _overlay(runs, names)
        + f'<table class="compare"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
        + _note(
            "Final metrics come from eval.json where a run has one measured at its latest "
            "checkpoint, otherwise from its last held-out evaluation in metrics.jsonl; – means "
            "the run does not report it."
        )
        + "</section>"
    )


def _metric_table(s: RunSummary) -> str:
    val_step, val = s.last_val()
    if not s.eval and not val:
        return _note("No metrics: neither eval.json nor a held-out evaluation in metrics.jsonl.")
    names: dict[str, None] = {}
    for k in [*(s.eval or {}), *val]:
        if k != "step":
            names.setdefault(k, None)
    header, columns = ["metric"], []
    if s.eval:
        at = s.eval.get("step")
        head = "eval.json" + (f" (step {_e(format_number(at))})" if at is not None else "")
        if s.eval_stale:
            head += f" — stale: the run is at step {s.step:,}"
        header.append(head)
        columns.append(s.eval)
    if val:
        header.append(
            "last held-out evaluation" + (f" (step {val_step:,})" if val_step is not None else "")
        )
        columns.append(val)
    rows = [[_e(k)] + [_cell(c.get(k)) for c in columns] for k in names]
    return _table(header, rows, "metrics")


def _charts(s: RunSummary) -> str:
    if not s.rows:
        return ""
    loss_panels, held_out = chart_panels(s.rows, s.loss_keys)
    out = ["<h3>Losses</h3>"]
    if loss_panels:
        out.append(_figure(s.rows, loss_panels, "losses"))
    else:
        out.append(_note("metrics.jsonl has no loss values to draw."))
    if held_out:
        out.append("<h3>Held-out metrics during training</h3>")
        out.append(_figure(s.rows, [[k] for k in held_out], "held-out metrics"))
    return "".join(out)


def _figure(rows: list[dict[str, Any]], panels: list[list[str]], what: str) -> str:
    """One chart of up to MAX_PANELS panels; its alt text names the curves drawn."""
    shown = panels[:MAX_PANELS]
    curves = ", ".join(k[0] + (f" (with {k[1]})" if len(k) > 1 else "") for k in shown)
    png = render_panels(rows, shown)
    img = f'<img class="chart" alt="{_e(what)}: {_e(curves)}" src="{_data_uri(png)}">'
    if len(panels) > len(shown):
        img += _note(f"{len(panels) - len(shown)} more {what} not drawn.")
    return img


def _image_samples(s: RunSummary) -> str:
    out = []
    for name, files in s.image_samples.items():
        chosen = evenly_spaced(files, MAX_SAMPLE_STEPS)
        figures = []
        for step, p in chosen:
            data = p.read_bytes() if p.stat().st_size <= MAX_IMAGE_BYTES else b""
            if not data.startswith(_PNG_MAGIC):
                figures.append(
                    f'<figure class="missing"><figcaption>step {step:,}: {_e(p.name)} is not '
                    "a PNG of a readable size</figcaption></figure>"
                )
                continue
            width = int.from_bytes(data[16:20], "big")  # from the IHDR chunk
            shown = width * max(1, 256 // max(width, 1))  # small grids: whole-pixel zoom
            figures.append(
                f'<figure><img class="sample" width="{shown}" alt="{_e(name)} at step {step}" '
                f'src="{_data_uri(data)}"><figcaption>step {step:,}</figcaption></figure>'
            )
        more = f" ({len(chosen)} of {len(files)} steps)" if len(files) > len(chosen) else ""
        out.append(f'<h4>{_e(name)}{more}</h4><div class="samples">{"".join(figures)}</div>')
    return "".join(out)


def _audio_samples(s: RunSummary) -> str:
    """Each named clip at evenly spaced steps: a player (the WAV inline) and the clip's
    log-mel spectrogram as a picture."""
    out = []
    for name, files in s.audio_samples.items():
        chosen = evenly_spaced(files, MAX_SAMPLE_STEPS)
        figures = []
        for step, p in chosen:
            data = p.read_bytes() if p.stat().st_size <= MAX_AUDIO_BYTES else b""
            picture = _spectrogram_png(p) if data[:4] == b"RIFF" else None
            if picture is None:
                figures.append(
                    f'<figure class="missing"><figcaption>step {step:,}: {_e(p.name)} is not '
                    "a WAV file of a readable size</figcaption></figure>"
                )
                continue
            wav = "data:audio/wav;base64," + base64.b64encode(data).decode("ascii")
            figures.append(
                f'<figure><img class="spectrogram" alt="log-mel spectrogram of {_e(name)} at '
                f'step {step}" src="{_data_uri(picture)}"><audio controls preload="none" '
                f'src="{wav}"></audio><figcaption>step {step:,}</figcaption></figure>'
            )
        more = f" ({len(chosen)} of {len(files)} steps)" if len(files) > len(chosen) else ""
        out.append(f'<h4>{_e(name)}{more}</h4><div class="samples">{"".join(figures)}</div>')
    return "".join(out)


def _spectrogram_png(path: Path) -> bytes | None:
    """A WAV file's log-mel spectrogram (low frequencies at the bottom) as a PNG, or None
    when the file cannot be read as audio."""
    import numpy as np
    import torch
    from PIL import Image

    from aigc.data.audio import MelSpec, read_audio
    from aigc.errors import DataError

    try:
        wave, rate = read_audio(path)
    except DataError:
        return None
    spec = MelSpec(sample_rate=rate, n_fft=512, hop=max(1, rate // 100), n_mels=64)
    mel = spec(torch.from_numpy(wave)).numpy()
    top = mel.max()
    grey = np.clip((mel - (top - 8.0)) / 8.0, 0, 1)[::-1]  # 8 nats (70 dB) of range
    buf = io.BytesIO()
    Image.fromarray((grey * 255).astype(np.uint8)).resize((grey.shape[1] * 2, 128)).save(buf, "PNG")
    return buf.getvalue()


def _text_samples(s: RunSummary) -> str:
    chosen = evenly_spaced(s.text_samples, MAX_SAMPLE_STEPS)
    out = []
    if len(s.text_samples) > len(chosen):
        out.append(_note(f"{len(chosen)} of {len(s.text_samples)} steps shown."))
    for i, (step, p) in enumerate(chosen):
        text = p.read_text(encoding="utf-8", errors="replace")
        if len(text) > MAX_TEXT_CHARS:
            text = text[:MAX_TEXT_CHARS] + f"\n[… {len(text) - MAX_TEXT_CHARS:,} more characters]"
        is_open = " open" if i == len(chosen) - 1 else ""
        out.append(
            f"<details{is_open}><summary>step {step:,}</summary>"
            f'<pre class="text">{_e(text)}</pre></details>'
        )
    return "".join(out)


def _run_section(s: RunSummary, name: str, anchor: str) -> str:
    facts = "".join(f"<div><dt>{_e(k)}</dt><dd>{_e(v)}</dd></div>" for k, v in _facts(s))
    parts = [
        f'<section class="run" id="{anchor}"><h2>{_e(name)}</h2>',
        f'<p class="path">{_e(s.path.resolve())}</p>',
        f'<dl class="facts">{facts}</dl>',
        "".join(_note(n) for n in s.notes),
        _charts(s),
        "<h3>Metrics</h3>",
        _metric_table(s),
    ]
    if s.image_samples:
        parts += ["<h3>Samples during training</h3>", _image_samples(s)]
    if s.audio_samples:
        parts += ["<h3>Sample sounds during training</h3>", _audio_samples(s)]
    if s.text_samples:
        parts += ["<h3>Sample texts during training</h3>", _text_samples(s)]
    if s.config_text is not None:
        parts.append(
            f'<details class="config"><summary>config.yaml</summary>'
            f"<pre>{_e(s.config_text)}</pre></details>"
        )
    parts.append("</section>")
    return "".join(parts)


_STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;
  background:#fff;margin:0 auto;max-width:1240px;padding:16px 24px 48px}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:21px;margin:0 0 2px}
h3{font-size:16px;margin:22px 0 8px;color:#33415c}h4{font-size:14px;margin:12px 0 6px}
.sub{color:#5a6478;margin:0 0 16px}
section{border-top:2px solid #dfe3ea;padding-top:16px;margin-top:24px}
.path{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;color:#5a6478;
  margin:0 0 8px;word-break:break-all}
dl.facts{display:flex;flex-wrap:wrap;gap:6px 28px;margin:8px 0}
dl.facts div{display:flex;flex-direction:column}dt{font-size:12px;color:#5a6478}
dd{margin:0;font-weight:600}
.note{background:#fff7e0;border-left:3px solid #e0b020;padding:4px 10px;margin:6px 0;
  font-size:13px}
table{border-collapse:collapse;margin:6px 0;font-size:14px}
th,td{border:1px solid #dfe3ea;padding:4px 10px;text-align:left}
thead th{background:#f2f4f8}tr.group th{background:#f2f4f8;font-family:inherit;font-weight:600}tbody th{font-weight:500;font-family:ui-monospace,monospace;
  font-size:13px}
td .num{font-variant-numeric:tabular-nums}td{text-align:right}
img.chart{max-width:100%;display:block}
ul.legend{list-style:none;display:flex;flex-wrap:wrap;gap:4px 18px;padding:0;margin:8px 0;
  font-size:13px}ul.legend .swatch{display:inline-block;width:14px;height:4px;margin:0 6px 3px 0}
ul.legend .styles{color:#5a6478}
.samples{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;text-align:center}figcaption{font-size:12px;color:#5a6478}
img.sample{max-width:100%;height:auto;image-rendering:pixelated;border:1px solid #dfe3ea}
pre{background:#f6f7f9;padding:8px 10px;white-space:pre-wrap;word-break:break-word;
  font-size:12.5px;max-height:480px;overflow:auto;margin:4px 0}
summary{cursor:pointer;font-weight:600;margin:4px 0}
details.config{margin-top:20px}
"""


def report_html(runs: Sequence[str | Path]) -> str:
    """The report for ``runs`` as an HTML string (see :func:`write_report`)."""
    if not runs:
        raise CheckpointError("no run folders given; name at least one")
    summaries = [read_run(p) for p in runs]
    names = [s.name for s in summaries]
    if len(set(names)) < len(names):  # same folder names: tell them apart by path
        names = [str(s.path) for s in summaries]
    body = []
    if len(summaries) > 1:
        body.append(_comparison(summaries, names))
    for i, (s, name) in enumerate(zip(summaries, names, strict=True)):
        body.append(_run_section(s, name, f"run-{i + 1}"))
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    count = f"{len(summaries)} run{'s' if len(summaries) > 1 else ''}"
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>aigc report: {_e(', '.join(names))}</title><style>{_STYLE}</style></head>"
        f'<body><h1>aigc report</h1><p class="sub">{count} · written {when}</p>'
        + "".join(body)
        + "</body></html>\n"
    )


def write_report(runs: list[Path], out: Path) -> Path:
    """Writes one self-contained HTML report on ``runs`` (run folders) to ``out``.

    Per run: family, step, training time, loss curves and held-out curves from
    metrics.jsonl, a metric table (eval.json and the last held-out evaluation),
    sample grids and texts over training, and config.yaml. With several runs a
    comparison comes first: every run's curves overlaid (one chart per metric, a
    colour per run) above a table of their final metrics. Raises CheckpointError for a path that is not a
    run folder and RequestError when ``out`` cannot be written. Returns ``out``.
    """
    page = report_html(runs)
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, page)
    except OSError as e:
        raise RequestError(f"{out}: cannot write the report there ({e.strerror or e})") from None
    return out
