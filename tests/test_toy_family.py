"""A family added from the test suite alone (tests/toy: model, task, pipeline): it
trains, loads, samples from Python and the CLI, evaluates, appears in the report and
is served, with no edit in src/. That is what "adding a family is cheap" means."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import aigc
from aigc.runs import RunDir
from aigc.tasks import TASKS, register_task

from .conftest import ROOT, start_server

RECIPE = Path(__file__).parent / "toy" / "toy-shapes.yaml"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """An installed package's entry point, as pip would leave it: a dist-info folder
    declaring tests.toy's task in the "aigc.tasks" group. Subprocesses find it on
    PYTHONPATH; this process registers the task by name."""
    site = tmp_path_factory.mktemp("site")
    info = site / "aigc_toy-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: aigc-toy\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[aigc.tasks]\ntoy = tests.toy.task:ToyTask\n")
    return site


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, plugin_path) -> Path:
    register_task("toy", "tests.toy.task:ToyTask")
    run = tmp_path_factory.mktemp("toy") / "run"
    aigc.train(RECIPE, [], run_dir=run, progress=False)
    yield run
    TASKS.pop("toy", None)


def _cli(plugin_path: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aigc", *args], cwd=ROOT, env=_env(plugin_path),
                          capture_output=True, text=True, timeout=300, **kw)  # fmt: skip


def _env(plugin_path: Path) -> dict[str, str]:
    path = os.pathsep.join([str(plugin_path), str(ROOT)])
    return {**os.environ, "PYTHONPATH": path, "AIGC_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}


def test_the_toy_family_trains_and_samples_from_python(toy_run):
    gen = aigc.load(toy_run)
    assert type(gen).__name__ == "ToyPipeline" and gen.kind == "image"
    assert gen.task.headline_metric == "fid"
    rows = [r for r in RunDir(toy_run).read_metrics() if "nll" in r]
    assert rows[-1]["nll"] < rows[0]["nll"]  # it learned something
    images = gen.generate(8, labels={"colour": "red"}, seed=3, output="uint8")
    assert images.shape == (8, 16, 16, 3)
    again = aigc.load(toy_run).generate(8, labels={"colour": "red"}, seed=3, output="uint8")
    assert np.array_equal(images, again)  # saved, loaded, sampled: the same images
    assert gen.mean_image().shape == (1, 3, 16, 16)  # its own verb
    result = gen.evaluate(n=64, save=False)
    assert np.isfinite(result["fid"]) and "label_accuracy/colour" in result
    assert "fid" in gen.format_eval(result)


def test_the_toy_family_works_from_the_cli_report_and_server(toy_run, plugin_path, tmp_path):
    r = _cli(plugin_path, "sample", str(toy_run), "--n", "4", "--out", str(tmp_path / "g.png"))
    assert r.returncode == 0, r.stderr
    with Image.open(tmp_path / "g.png") as im:
        assert im.size[0] > 16
    r = _cli(plugin_path, "eval", str(toy_run), "--n", "64")
    assert r.returncode == 0 and "fid" in r.stdout, r.stderr
    r = _cli(plugin_path, "train", str(toy_run), "train.max_steps=35")
    assert r.returncode == 0 and "done: step 35" in r.stdout, r.stderr
    r = _cli(plugin_path, "report", str(toy_run), "--out", str(tmp_path / "report.html"))
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "report.html").read_text()
    assert "toy" in page and "nll" in page
    # served: an image model on the images endpoint
    proc, url = start_server([str(toy_run), "--port", "0"], env=_env(plugin_path))
    try:
        body = {"model": toy_run.name, "prompt": "red, circle", "n": 2, "seed": 1}
        r = httpx.post(f"{url}/v1/images/generations", json=body, timeout=60)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        with Image.open(io.BytesIO(base64.b64decode(data[0]["b64_json"]))) as im:
            assert im.size == (16, 16)
    finally:
        proc.terminate()
        proc.wait(30)
