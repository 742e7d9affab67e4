"""Runs made by earlier versions of aigc keep working: tests/fixtures/runs-0.1/ holds
tiny runs of every kind made by aigc 0.1.0 (see make_compat_runs.py there). Each
loads, makes what it made then (seeded), evaluates, and continues training."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

import aigc
from aigc.runs import RunDir
from aigc.tasks.images import ImageDataConfig, prepare

FIXTURES = Path(__file__).parent / "fixtures" / "runs-0.1"
RUNS = sorted(p.name for p in FIXTURES.iterdir() if (p / "run.json").is_file())


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models run fastest on one thread (see conftest.one_torch_thread)."""


def test_every_kind_of_run_has_a_fixture():
    families = {json.loads((FIXTURES / r / "run.json").read_text())["family"] for r in RUNS}
    assert {"gpt", "chat", "classifier", "gan", "vae"} <= families
    assert {"gpt-char", "gpt-bpe", "gpt-char-lora", "gan", "cgan", "vae", "cvae"} <= set(RUNS)


def _step(run: Path) -> int:
    return int(RunDir(run).latest_checkpoint().name.removeprefix("step-"))


@pytest.fixture
def old_run(request, tmp_path) -> Path:
    """A copy of the fixture, runs it depends on included (a LoRA run's base is "../gpt-char"),
    so that continuing it never writes into the repository."""
    for name in RUNS:
        shutil.copytree(FIXTURES / name, tmp_path / name)
    return tmp_path / request.param


@pytest.mark.parametrize("old_run", RUNS, indirect=True)
def test_an_old_run_makes_what_it_made_then(old_run):
    gen = aigc.load(old_run)
    expected_json = old_run / "expected.json"
    if expected_json.is_file():
        expected = json.loads(expected_json.read_text())
        if "classify" in expected:
            got = gen.classify(["sort the list 3", "open the file 4"])
            for g, e in zip(got, expected["classify"], strict=True):
                assert g["label"] == e["label"]
                for k, p in e["probs"].items():
                    assert g["probs"][k] == pytest.approx(p, abs=1e-4)
        elif "chat" in expected:
            messages = [{"role": "user", "content": "what is list 3?"}]
            assert (
                gen.chat(messages, max_new_tokens=12, temperature=1.0, seed=0) == expected["chat"]
            )
        else:
            got = gen.generate("The", max_new_tokens=12, temperature=1.0, seed=0)
            assert got == expected["generate"]
    else:
        expected = np.load(old_run / "expected.npy", allow_pickle=False)
        got = gen.generate(4, seed=0, output="uint8")
        assert got.shape == expected.shape and got.dtype == np.uint8
        # the same seeded images, to rounding of the last level on another CPU
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 2


@pytest.mark.parametrize("old_run", RUNS, indirect=True)
def test_an_old_run_evaluates_and_continues(old_run):
    before = _step(old_run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny sets: the small-sample warnings are expected
        result = aigc.load(old_run).evaluate(save=False)
    main = [k for k in ("loss", "accuracy", "nelbo", "fid", "label_accuracy") if k in result]
    assert main and all(np.isfinite(result[k]) for k in main), result
    out = aigc.train(None, [f"train.max_steps={before + 2}"], run_dir=old_run, progress=False)
    assert out.resumed_from == before and out.step == before + 2
    assert _step(old_run) == before + 2


IMAGE_RUNS = [r for r in RUNS if (FIXTURES / r / "data" / "images.npy").is_file()]


@pytest.mark.parametrize("name", IMAGE_RUNS)
def test_an_old_runs_images_are_prepared_again_bit_for_bit(name, tmp_path):
    """0.1.0 read a set whole, now it is streamed to disk: the same files come out."""
    config = yaml.safe_load((FIXTURES / name / "config.yaml").read_text())
    prepare(ImageDataConfig(**config["data"]), tmp_path, seed=config["train"]["seed"])
    old = FIXTURES / name / "data"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in old.iterdir())
    for f in ("images.npy", "labels.npy"):
        assert (tmp_path / f).read_bytes() == (old / f).read_bytes(), f
    assert json.loads((tmp_path / "meta.json").read_text()) == json.loads(
        (old / "meta.json").read_text()
    )


AUDIO_FIXTURES = Path(__file__).parent / "fixtures" / "runs-0.3-audio"
AUDIO_RUNS = sorted(p.name for p in AUDIO_FIXTURES.iterdir() if (p / "run.json").is_file())


@pytest.mark.parametrize("name", AUDIO_RUNS)
def test_an_old_audio_run_makes_what_it_made_evaluates_and_continues(name, tmp_path, monkeypatch):
    """Audio runs made before the chorales' "pitch" encoding and the user audio folders
    (make_compat_audio_runs.py) load, make the same seeded output, evaluate and train on."""
    monkeypatch.syspath_prepend(str(AUDIO_FIXTURES.parent))
    from make_compat_audio_runs import made

    run = tmp_path / name
    shutil.copytree(AUDIO_FIXTURES / name, run)
    gen = aigc.load(run)
    family = json.loads((run / "run.json").read_text())["family"]
    expected = np.load(run / "expected.npy", allow_pickle=False)
    np.testing.assert_allclose(made(gen, family), expected, atol=1e-4)
    before = _step(run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny sets: the small-sample warnings are expected
        result = gen.evaluate(save=False)
    assert any(np.isfinite(v) for v in result.values() if isinstance(v, float)), result
    out = aigc.train(None, [f"train.max_steps={before + 2}"], run_dir=run, progress=False)
    assert out.resumed_from == before and out.step == before + 2
