"""HTML reports on run folders: content, escaping, robustness, and a real browser's view."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import aigc
from aigc.errors import AigcError, CheckpointError
from aigc.report import evenly_spaced, format_number, write_report

from .conftest import RECIPE, ROOT
from .conftest import TINY as TINY_GPT

GAN = str(ROOT / "configs" / "gan-mlp-digits.yaml")
XSS = "<script>alert(1)</script>"

# Unlabelled images keep the run free of the domain classifier, whose first training
# would dominate this file's time. 14 steps with samples every 2 give 7 sample steps,
# one more than a report shows.
TINY_GAN = [
    "model.z_dim=16",
    "model.hidden=[32,64]",
    "train.batch_size=16",
    "train.max_steps=14",
    "train.checkpoint_every=14",
    "train.sample_every=2",
    "train.eval_every=0",
    "train.log_every=1",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models run fastest on one thread (see conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory) -> Path:
    """A tiny GAN on a folder of unlabelled rectangles (so no eval.json: nothing judges it)."""
    base = tmp_path_factory.mktemp("gan")
    folder = base / "rects"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(64):
        img = np.zeros((32, 32), np.uint8)
        y, x = rng.integers(0, 20, size=2)
        h, w = rng.integers(6, 12, size=2)
        img[y : y + h, x : x + w] = rng.integers(128, 256)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    run = base / "gan-run"
    aigc.train(GAN, [*TINY_GAN, f"data.source={folder}"], run_dir=run, progress=False)
    return run


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory) -> Path:
    """A tiny character GPT whose data.path holds a <script> tag, evaluated (eval.json)."""
    import pydoc_data.topics as topics

    base = tmp_path_factory.mktemp("gpt")
    corpus = (
        base / "<script>alert(1)<" / "script>.txt"
    )  # the path reads ...<script>alert(1)</script>.txt
    corpus.parent.mkdir()
    corpus.write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics))[:20_000])
    run = base / "gpt-run"
    overrides = [*TINY_GPT, "train.max_steps=14", "train.eval_every=7", "train.sample_every=2",
                 "train.log_every=1", f"data.path={corpus}"]  # fmt: skip
    aigc.train(RECIPE, overrides, run_dir=run, progress=False)
    aigc.load(run).evaluate()
    return run


@pytest.fixture(scope="module")
def two_run_report(gan_run, gpt_run, tmp_path_factory) -> Path:
    return write_report([gan_run, gpt_run], tmp_path_factory.mktemp("report") / "r.html")


def _no_remote_resources(page: str) -> None:
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?\s*([^"'\s>]+)""", page, flags=re.I)
    assert refs, "the report embeds images"
    assert all(r.startswith("data:image/png;base64,") or r.startswith("#") for r in refs), refs
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//", page, flags=re.I)
    assert "url(" not in page  # no CSS fetches either


# ---------------------------------------------------------------------------
# content


def test_one_run_report_shows_curves_metrics_samples_and_config(gpt_run, tmp_path):
    out = write_report([gpt_run], tmp_path / "sub" / "one.html")
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    _no_remote_resources(page)
    assert 'id="comparison"' not in page  # one run: nothing to compare
    assert "Content-Security-Policy" in page
    # training loss with its held-out twin on one panel, then the other held-out metrics
    assert 'alt="losses: loss (with val_loss)"' in page
    assert 'alt="held-out metrics: val_ppl, val_bpc, val_bpb' in page
    assert page.count("data:image/png;base64,") == 2

    ev = json.loads((gpt_run / "eval.json").read_text())
    assert f"eval.json (step {ev['step']})" in page
    assert "last held-out evaluation (step 14)" in page
    assert {"loss", "ppl", "bpc", "tokens"} <= set(ev)
    for name, value in ev.items():
        if name != "step":
            kind = "txt" if isinstance(value, str) else "num"
            cell = f'<td><span class="{kind}">{format_number(value)}</span></td>'
            assert f"<tr><th>{name}</th>{cell}" in page, name
    assert f"{ev['tokens']:,}" in page  # a count with thousands separators

    # 7 sample texts, 6 shown (first and last among them), the last one open
    steps = re.findall(r"<details(?: open)?><summary>step (\d+)</summary>", page)
    assert steps == ["2", "4", "6", "10", "12", "14"], steps
    assert "<details open><summary>step 14</summary>" in page
    assert page.count('<pre class="text">=== prompt 0:') == 6
    assert "<summary>config.yaml</summary>" in page and "family: gpt" in page
    assert "training time" in page and "No eval.json" not in page


def test_two_run_report_compares_first_and_escapes_file_strings(two_run_report, gan_run, gpt_run):
    page = two_run_report.read_text(encoding="utf-8")
    _no_remote_resources(page)
    compare = page.index('id="comparison"')
    assert compare < page.index('class="run"')
    table = page[compare : page.index("</table>", compare)]
    assert "<th>gan-run</th><th>gpt-run</th>" in table
    assert "<tr><th>step</th><td>14</td><td>14</td></tr>" in table
    gpt_eval = json.loads((gpt_run / "eval.json").read_text())
    for name in ("loss", "ppl", "bpc", "tokens"):  # metrics the GAN run lacks: a dash for it
        row = re.search(rf"<tr><th>{name}</th>(.*?)</tr>", table).group(1)
        value = format_number(gpt_eval[name])
        assert row == f'<td>–</td><td><span class="num">{value}</span></td>', row

    # the GAN run: d_loss and g_loss drawn, 6 of its 7 sample grids, and no eval.json
    assert 'alt="losses: d_loss, g_loss"' in page
    assert "<h4>grid (6 of 7 steps)</h4>" in page
    shown = re.findall(r'alt="grid at step (\d+)"', page)
    assert shown == ["2", "4", "6", "10", "12", "14"], shown
    assert f"No eval.json: run `aigc eval {gan_run.resolve()}`" in page
    # the overlay of both runs; GAN: losses, grids; GPT: 2 charts
    assert page.count("data:image/png;base64,") == 1 + 1 + 6 + 2

    # the GPT's data.path holds a <script> tag: shown as text, never as markup
    assert XSS not in page and "&lt;script&gt;alert(1)&lt;/script&gt;.txt" in page
    assert "<script" not in page.lower()


def test_missing_pieces_become_notes_and_hostile_names_are_escaped(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "run.json").write_text(json.dumps({"family": "gpt"}))
    hostile = tmp_path / "hostile"
    (hostile / "samples").mkdir(parents=True)
    (hostile / "run.json").write_text(json.dumps({"family": "<b>gan</b>"}))
    (hostile / "config.yaml").write_text(f"name: '{XSS}'\n")
    rows = [
        {"step": 1, "<img src=x onerror=alert(2)>_loss": 1.5, "lr": 0.1},
        {"step": 2, "<img src=x onerror=alert(2)>_loss": 1.25, "$x^2$_loss": float("nan")},
        {"step": 2, "val_<i>acc</i>": 0.5, "val_note": "</td><script>alert(3)</script>"},
    ]
    (hostile / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn')
    (hostile / "eval.json").write_text("{not json")
    (hostile / "samples" / "step-00000002.txt").write_text(f"</pre>{XSS}\n", encoding="utf-8")
    (hostile / "samples" / "step-00000002-x.png").write_bytes(b"not a png")
    (hostile / "samples" / "step-00000002-y.wav").write_bytes(b"RIFF but no more")

    page = write_report([bare, hostile], tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<script" not in page.lower() and "<img src=x" not in page and "<b>gan" not in page
    assert 'alt="losses: &lt;img src=x onerror=alert(2)&gt;_loss, $x^2$_loss"' in page
    assert "&lt;/pre&gt;&lt;script&gt;" in page  # the sample text
    assert "&lt;b&gt;gan&lt;/b&gt;" in page
    for note in (
        "config.yaml is missing",
        "metrics.jsonl is missing or empty",
        "No eval.json: run `aigc eval",
        "samples/ holds no samples yet",
        "No checkpoint yet",
        "eval.json is damaged",
        "x.png is not a PNG",
        "y.wav is not a WAV file",
    ):
        assert note in page, note
    assert page.count('class="chart"') == 2  # the hostile run's losses and held-out curves


def test_sample_sounds_are_played_inline_beside_their_spectrograms(tmp_path):
    from aigc.samples import AudioSample, write_samples

    run = tmp_path / "speech"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"family": "diffusion"}))
    t = np.arange(16000) / 16000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for step in (100, 200):
        write_samples(run / "samples", step, {"seven": AudioSample(tone, 16000)})
    page = write_report([run], tmp_path / "r.html").read_text(encoding="utf-8")
    assert page.count('<audio controls preload="none" src="data:audio/wav;base64,') == 2
    assert page.count('alt="log-mel spectrogram of seven at step') == 2
    assert "Sample sounds during training" in page
    assert "media-src data:" in page  # the page's policy lets it play what it embeds
    src = re.search(r'alt="log-mel spectrogram of seven at step 100" src="data:image/png;base64,'
                    r'([^"]+)"', page)  # fmt: skip
    spectrogram = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.group(1)))))
    # a 440 Hz tone: one bright band low in the picture (low frequencies at the bottom)
    row = spectrogram.mean(1).argmax()
    assert spectrogram.shape[0] * 0.6 < row < spectrogram.shape[0] and spectrogram.max() == 255


def test_a_folder_that_is_not_a_run_raises_the_run_folder_error(tmp_path, gan_run):
    (tmp_path / "empty").mkdir()
    for bad, says in ((tmp_path / "empty", "not an aigc run folder"),
                      (tmp_path / "absent", "does not exist")):  # fmt: skip
        with pytest.raises(CheckpointError, match=says):
            write_report([gan_run, bad], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()
    with pytest.raises(AigcError, match="cannot write the report"):
        write_report([gan_run], tmp_path / "empty")  # a folder, not a file


def test_numbers_read_well():
    assert format_number(46451) == "46,451"
    assert format_number(122880.0) == "122,880"
    assert format_number(2.445972744593366) == "2.446"
    assert format_number(0.9958847761154175) == "0.9959"
    assert format_number(2558.123) == "2558"
    assert format_number(9999.7) == "10,000"
    assert format_number(12345.67) == "12,346"
    assert format_number(0.000123456) == "1.235e-04"
    assert format_number(0.0) == "0" and format_number(float("nan")) == "nan"
    assert evenly_spaced(list(range(7)), 6) == [0, 1, 2, 4, 5, 6]
    assert evenly_spaced([1, 2], 6) == [1, 2]


# ---------------------------------------------------------------------------
# a real browser


WINDOW = (1280, 2000)  # CSS pixels, one device pixel each


def _overlay_png(page: str) -> np.ndarray:
    src = re.search(r'class="chart overlay" alt="[^"]*" src="data:image/png;base64,([^"]+)"', page)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.group(1)))).convert("RGB"))


def _pixels_of(img: np.ndarray, colour: str) -> int:
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(img.astype(int) - rgb).max(axis=-1) <= 8).sum())


def test_comparison_overlays_every_runs_curves_with_a_legend(two_run_report):
    from aigc.report import run_colour

    page = two_run_report.read_text(encoding="utf-8")
    compare = page.index('id="comparison"')
    overlay = page.index('class="chart overlay"')
    assert compare < overlay < page.index("<table", compare)  # at the top of the comparison
    alt = re.search(r'class="chart overlay" alt="all runs: ([^"]*)"', page).group(1)
    panels = alt.split(", ")
    assert panels[:2] == ["d_loss", "g_loss"] and "loss" in panels and "val_ppl" in panels, alt
    assert "val_loss" not in panels  # drawn dashed on the loss panel, not a panel of its own
    legend = re.search(r'<ul class="legend">(.*?)</ul>', page).group(1)
    entries = re.findall(r'style="background:(#[0-9a-f]{6})"></span>([^<]*)</li>', legend)
    assert entries == [(run_colour(0), "gan-run"), (run_colour(1), "gpt-run")]
    # both runs' curves are drawn in their colours: remove a run's rows and its colour goes
    img = _overlay_png(page)
    assert _pixels_of(img, run_colour(0)) > 200 and _pixels_of(img, run_colour(1)) > 200


def test_overlay_draws_a_metric_only_some_runs_logged():
    from aigc.report import overlay_panels, render_overlay, run_colour

    a = [{"step": s, "loss": 3.0 - s / 10} for s in range(1, 11)]
    b = [{"step": s, "loss": 2.5 - s / 20, **({"val_loss": 2.4} if s == 10 else {})}
         for s in range(1, 11)] + [{"step": 10, "val_acc": 0.9, "val_nan": float("nan")}]  # fmt: skip
    panels = overlay_panels([a, b])
    assert panels == [["loss", "val_loss"], ["val_acc"]]
    png = render_overlay([("a", a), ("b", b)], panels)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert _pixels_of(img, run_colour(0)) > 100 and _pixels_of(img, run_colour(1)) > 100
    only_b = np.asarray(Image.open(io.BytesIO(render_overlay([("a", []), ("b", b)], panels))))
    assert _pixels_of(only_b[..., :3], run_colour(0)) < _pixels_of(img, run_colour(0)) // 4


def test_an_eval_older_than_the_latest_checkpoint_is_marked_and_left_out(
    gpt_run, gan_run, tmp_path
):
    run = tmp_path / "gpt-copy"
    shutil.copytree(gpt_run, run)
    result = json.loads((run / "eval.json").read_text())
    assert result["step"] == 14  # fresh: measured at the latest checkpoint
    fresh = write_report([gan_run, run], tmp_path / "fresh.html").read_text(encoding="utf-8")
    result["step"] = 7
    result["only_in_eval"] = 123.0
    (run / "eval.json").write_text(json.dumps(result))
    page = write_report([gan_run, run], tmp_path / "stale.html").read_text(encoding="utf-8")
    assert "stale" not in fresh and "only_in_eval" not in fresh
    assert "eval.json was measured at step 7, but the run is now at step 14" in page
    assert "eval.json (step 7) — stale: the run is at step 14" in page
    compare = page.index('id="comparison"')
    table = page[compare : page.index("</table>", compare)]
    assert "only_in_eval" not in table  # the stale result is left out of the comparison
    # the held-out row still stands in: the last val_loss of metrics.jsonl
    last_val = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "val_loss" in r][-1]  # fmt: skip
    row = re.search(r"<tr><th>loss</th>(.*?)</tr>", table).group(1)
    assert format_number(last_val["val_loss"]) in row, row


def chromium(*args: str, profile: Path, timeout: float = 120) -> str:
    """Runs headless Chromium on a WINDOW-sized page with ``args``; returns its stdout.

    Every call sets the window size: pages laid out at another width would put the
    first chart elsewhere than in the screenshot.
    """
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail(
            "chromium is not installed; `make test` installs it "
            "(apt-get install -y --no-install-recommends chromium)"
        )
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--force-device-scale-factor=1", "--no-first-run", f"--user-data-dir={profile}",
           "--window-size={},{}".format(*WINDOW), *args]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


# Appended to a copy of the report (whose policy forbids scripts): reports, in the
# page's title, every image's decoded size and where the first chart sits.
_PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const chart = document.querySelector("img.chart");
  const r = chart.getBoundingClientRect();
  document.title = "PROBE" + JSON.stringify({
    sizes: imgs.map(i => [i.naturalWidth, i.naturalHeight, i.complete]),
    chart: [r.left, r.top, r.width, r.height, chart.naturalWidth],
  });
});
</script>"""


def test_a_browser_renders_the_two_run_report(two_run_report, tmp_path):
    page = two_run_report.read_text(encoding="utf-8")
    profile = tmp_path / "profile"

    # 1. the report as written: no script element survives parsing
    dom = chromium("--dump-dom", two_run_report.as_uri(), profile=profile)
    assert "<h2>Comparison</h2>" in dom and "<script" not in dom.lower()

    # 2. every embedded image decodes, and where the first chart is
    probe = tmp_path / "probe.html"
    probe.write_text(
        re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page).replace(
            "</body>", _PROBE + "</body>"
        ),
        encoding="utf-8",
    )
    dom = chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri(), profile=profile)
    found = json.loads(html.unescape(re.search(r"<title>PROBE(.*?)</title>", dom).group(1)))
    assert len(found["sizes"]) == page.count("data:image/png;base64,")
    assert all(w > 0 and h > 0 and ok for w, h, ok in found["sizes"]), found["sizes"]
    left, top, width, height, natural_width = found["chart"]
    assert width == natural_width and top + height < WINDOW[1], found["chart"]

    # 3. a screenshot of the report as written (its policy in force) shows the chart
    png = tmp_path / "shot.png"
    chromium(f"--screenshot={png}", two_run_report.as_uri(), profile=profile)
    shot = Image.open(png)
    assert shot.format == "PNG" and shot.size == WINDOW
    grey = np.asarray(shot.convert("L"), dtype=np.float64)
    assert grey.std() > 10, "the page looks blank"
    x, y = round(left), round(top)
    shown = grey[y : y + round(height), x : x + round(width)]
    dark = (shown < 200).mean()
    assert 0.01 < dark < 0.5, f"{dark:.3f} of the first chart's pixels are dark"
    # and what is there is the chart itself, drawn at its own pixels
    src = re.search(r'class="chart[^"]*" alt="[^"]*" src="data:image/png;base64,([^"]+)"', page)
    drawn = Image.open(io.BytesIO(base64.b64decode(src.group(1)))).convert("RGB").convert("L")
    assert shown.shape == np.asarray(drawn).shape
    assert np.abs(shown - np.asarray(drawn, dtype=np.float64)).mean() < 3


def test_cli_report_writes_the_page_and_refuses_a_non_run(gan_run, gpt_run, tmp_path):
    from .conftest import run_cli

    out = tmp_path / "cmp.html"
    r = run_cli("report", str(gan_run), str(gpt_run), "--out", str(out))
    assert r.returncode == 0 and "2 runs" in r.stdout, r.stderr
    assert "Comparison" in out.read_text(encoding="utf-8")
    r = run_cli("report", str(tmp_path), "--out", str(tmp_path / "x.html"))
    assert r.returncode == 2 and "not an aigc run folder" in r.stderr, r.stderr
    assert not (tmp_path / "x.html").exists()
