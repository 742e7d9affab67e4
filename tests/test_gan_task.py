"""GANs end to end: image data in run folders, the trainer, resume, sampling, eval, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import aigc
from aigc.api import ImageGenerator
from aigc.errors import AigcError, RequestError
from aigc.runs import RunDir

from .conftest import ROOT, run_cli

DCGAN = str(ROOT / "configs" / "dcgan-digits.yaml")
CGAN = str(ROOT / "configs" / "cgan-digits.yaml")

# A few seconds on two cores: narrow networks, small batches, few samples to judge.
TINY = [
    "model.z_dim=16",
    "model.g_width=8",
    "model.d_width=8",
    "train.batch_size=16",
    "train.max_steps=6",
    "train.checkpoint_every=3",
    "train.sample_every=3",
    "train.log_every=1",
    "data.eval_samples=100",
]


@pytest.fixture(scope="module")
def cgan_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cgan") / "run"
    aigc.train(CGAN, TINY, run_dir=run, progress=False)
    return run


def test_a_trained_run_has_images_metrics_samples_and_classifier_checks(cgan_run):
    run = RunDir(cgan_run)
    images = np.load(run.data_dir / "images.npy", allow_pickle=False)
    meta = json.loads((run.data_dir / "meta.json").read_text())
    assert images.shape == (1797, 32, 32, 1) and images.dtype == np.uint8
    assert meta["n_train"] + meta["n_val"] == 1797 and meta["attributes"] == ["class"]
    rows = run.read_metrics()
    train_rows = [r for r in rows if "d_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    for key in ("g_loss", "d_real", "d_fake", "d_acc_real", "d_acc_fake", "grad_norm/generator"):
        assert all(np.isfinite(r[key]) for r in train_rows), key
    final = rows[-1]
    assert 0.0 <= final["val_label_accuracy"] <= 1.0
    assert final["val_classifier_accuracy"] > 0.9  # the judge itself reads real digits
    grids = sorted(run.samples_dir.glob("step-*-grid.png"))
    assert [g.name for g in grids] == ["step-00000003-grid.png", "step-00000006-grid.png"]
    with Image.open(grids[-1]) as im:
        assert im.size[0] >= 8 * 32 and im.size[1] >= 10 * 32  # one row per digit class
    assert (run.tb_dir).is_dir() and any(run.tb_dir.iterdir())


def test_resumed_gan_training_equals_uninterrupted(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    aigc.train(CGAN, TINY, run_dir=whole, progress=False)
    aigc.train(CGAN, [*TINY, "train.max_steps=3"], run_dir=split, progress=False)
    aigc.train(None, ["train.max_steps=6"], run_dir=split, progress=False)
    for name in ("model", "optim", "ema"):
        a = load_file(str(RunDir(whole).latest_checkpoint() / f"{name}.safetensors"))
        b = load_file(str(RunDir(split).latest_checkpoint() / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    steps = [r["step"] for r in RunDir(split).read_metrics() if "d_loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_generate_labels_seed_and_outputs(cgan_run):
    gen = aigc.load(cgan_run)
    assert isinstance(gen, ImageGenerator) and gen.classes == {"class": [str(i) for i in range(10)]}
    a = gen.generate(12, labels=3, seed=5)
    assert a.shape == (12, 1, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, gen.generate(12, labels="3", seed=5))  # index or name
    assert torch.equal(a, gen.generate(12, labels={"class": 3}, seed=5))
    assert not torch.equal(a, gen.generate(12, labels=4, seed=5))
    assert not torch.equal(a, gen.generate(12, labels=3, seed=6))
    # same seed, same images whatever else is asked for
    # (convolutions may round differently at another batch size)
    assert torch.allclose(gen.generate(4, labels=3, seed=5), a[:4], atol=1e-5)
    assert torch.allclose(gen.generate(3, seed=9), gen.generate(40, seed=9)[:3], atol=1e-5)
    pil = gen.generate(2, seed=0, output="pil")
    assert pil[0].size == (32, 32) and pil[0].mode == "L"
    strip = gen.interpolate(steps=5, rows=2, seed=1)
    assert strip.shape == (10, 1, 32, 32)
    for bad in (10, "eleven", {"colour": "red"}):
        with pytest.raises(RequestError):
            gen.generate(2, labels=bad)
    with pytest.raises(RequestError):
        gen.generate(0)


def test_eval_reports_classifier_checks(cgan_run):
    result = aigc.load(cgan_run).evaluate(n=100)
    assert {"label_accuracy", "min_class_share", "classes_seen", "diversity"} <= result.keys()
    saved = json.loads((cgan_run / "eval.json").read_text())
    assert saved == result


def test_cli_sample_grid_folder_and_class(cgan_run, tmp_path):
    grid = tmp_path / "grid.png"
    r = run_cli("sample", str(cgan_run), "--n", "16", "--out", str(grid), "--class", "7")
    assert r.returncode == 0, r.stderr
    with Image.open(grid) as im:
        assert im.size == (4 * 34 + 2, 4 * 34 + 2)  # 4 x 4 images of 32 px, 2 px borders
    folder = tmp_path / "each"
    r = run_cli("sample", str(cgan_run), "--n", "5", "--out", str(folder), "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:05d}.png" for i in range(5)]
    r = run_cli("sample", str(cgan_run), "--interpolate", "4", "--n", "8", "--out", str(grid))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--class", "12"], "out of range"),
        (["--label", "colour=red"], "unknown label attribute"),
        (["--prompt", "hello"], "image model"),
        (["--n", "0"], "n=0"),
    ],
)
def test_cli_sample_bad_requests_exit_2(cgan_run, tmp_path, args, message):
    r = run_cli("sample", str(cgan_run), "--out", str(tmp_path / "x.png"), *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.png").exists()


def _folder_of_images(root: Path, classes: bool) -> Path:
    rng = np.random.default_rng(0)
    for i in range(8):
        sub = root / (f"c{i % 2}" if classes else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    return root


def test_trains_on_an_image_folder(tmp_path):
    data = _folder_of_images(tmp_path / "pics", classes=True)
    out = aigc.train(
        CGAN,
        [*TINY, f"data.source={data}", "train.batch_size=4", "data.image_size=16"],
        run_dir=tmp_path / "run",
        progress=False,
    )
    gen = aigc.load(out.run_dir)
    assert gen.classes == {"class": ["c0", "c1"]}
    assert gen.generate(3, labels="c1", seed=0).shape == (3, 3, 16, 16)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.conditional=true"], "has no labels"),
        (["data.image_size=48"], "image_size"),
        (["data.source=/no/such/place"], "no such file"),
        (["train.batch_size=64"], "fewer than train.batch_size"),
    ],
)
def test_bad_image_configs_fail_before_training(tmp_path, overrides, message):
    data = _folder_of_images(tmp_path / "pics", classes=False)
    run = tmp_path / "run"
    r = run_cli("train", DCGAN, f"data.source={data}", *TINY, *overrides, "--run-dir", str(run))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2
    assert not run.exists() and not list(tmp_path.glob(".run.preparing-*"))


def test_an_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AigcError, match="empty"):
        aigc.train(DCGAN, [*TINY, f"data.source={tmp_path / 'empty'}"], run_dir=tmp_path / "r")


def test_a_gan_run_continues_from_its_recipe(tmp_path):
    # the saved config holds values filled in from the data (num_classes, channels)
    run = tmp_path / "run"
    aigc.train(CGAN, [*TINY, "train.max_steps=3"], run_dir=run, progress=False)
    out = aigc.train(CGAN, [*TINY, "train.max_steps=5"], run_dir=run, progress=False)
    assert out.resumed_from == 3 and out.step == 5


def test_numeric_class_names_are_names_first(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("10", "2", "3"):  # sorted as strings: ["10", "2", "3"]
        (tmp_path / "pics" / name).mkdir(parents=True)
        for i in range(3):
            img = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(img).save(tmp_path / "pics" / name / f"{i}.png")
    out = aigc.train(
        CGAN,
        [*TINY, f"data.source={tmp_path / 'pics'}", "train.batch_size=4", "data.image_size=16",
         "train.max_steps=1"],
        run_dir=tmp_path / "run",
        progress=False,
    )  # fmt: skip
    gen = aigc.load(out.run_dir)
    assert gen.classes["class"] == ["10", "2", "3"]
    assert gen.labels_for(2, "2").tolist() == [[1], [1]]  # the class named "2"
    assert gen.labels_for(1, np.int64(0)).tolist() == [[0]]  # NumPy integers are indices


def test_eval_sums_send_the_same_keys_whatever_is_drawn(cgan_run):
    # the trainer all-reduces eval sums by position across processes
    gen = aigc.load(cgan_run)
    keys = [set(gen.task.eval_sums(gen.model, rank, 4, torch.device("cpu"))) for rank in range(2)]
    assert keys[0] == keys[1]
    assert {f"pairs/{c}" for c in range(10)} <= keys[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--interpolate", "0"], "--interpolate 0"),
        (["--out", "grid.jpg"], "PNG"),
    ],
)
def test_cli_sample_bad_outputs_exit_2(cgan_run, tmp_path, args, message):
    r = run_cli("sample", str(cgan_run), *args, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_damaged_meta_and_unlabelled_eval_are_clean_errors(tmp_path):
    data = _folder_of_images(tmp_path / "pics", classes=False)
    run = tmp_path / "run"
    aigc.train(
        DCGAN, [*TINY, f"data.source={data}", "train.batch_size=4", "train.max_steps=1"],
        run_dir=run, progress=False,
    )  # fmt: skip
    r = run_cli("eval", str(run))
    assert r.returncode == 2 and "unlabelled" in r.stderr and "Traceback" not in r.stderr
    (run / "data" / "meta.json").write_text("{not json")
    r = run_cli("sample", str(run), "--out", str(tmp_path / "g.png"))
    assert r.returncode == 2 and "meta.json" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.source=shapes", "data.n=200", "data.flip=true"], "data.flip"),
        (["train.seed=-1"], "train.seed"),
    ],
)
def test_more_bad_configs(tmp_path, overrides, message):
    with pytest.raises(AigcError, match=message):
        aigc.train(CGAN, [*TINY, *overrides], run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_one_class_folder_cannot_train_a_conditional_model(tmp_path):
    data = tmp_path / "pics"
    (data / "cats").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(data / "cats" / f"{i}.png")
    with pytest.raises(AigcError, match="single class"):
        aigc.train(
            CGAN, [*TINY, f"data.source={data}", "train.batch_size=4"], run_dir=tmp_path / "r"
        )


@pytest.mark.slow
def test_gan_under_torchrun_evaluates_and_writes_once(tmp_path):
    # two ranks: eval sums all-reduced by position (same keys on both), BN buffers
    # broadcast from rank 0, only rank 0 writes
    import os
    import subprocess
    import sys

    env = {**os.environ, "AIGC_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "aigc", "train", CGAN, *TINY, "train.batch_size=8", "train.max_steps=4",
         "--run-dir", str(tmp_path / "run")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = RunDir(tmp_path / "run").read_metrics()
    assert [x["step"] for x in rows if "d_loss" in x] == [1, 2, 3, 4]
    final = rows[-1]
    assert 0 <= final["val_label_accuracy"] <= 1 and final["val_diversity"] > 0
    assert RunDir(tmp_path / "run").checkpoint_names() == ["step-00000003", "step-00000004"]
