"""The real-vs-generated image detector (aigc.safety.image_detector) and its CLI."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score

from aigc.errors import CheckpointError, RequestError
from aigc.safety.image_detector import (
    DETECTOR_JSON,
    DETECTOR_WEIGHTS,
    augment,
    average_precision,
    load_detector,
    read_image,
    train_detector,
)
from tests.conftest import ROOT, run_cli


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def tiny_gan(tmp_path_factory):
    """A conditional GAN on the digits trained 2 steps: its samples are far from digits."""
    import aigc

    run = tmp_path_factory.mktemp("detector") / "cgan"
    with warnings.catch_warnings():  # FID of 10 samples: a singular covariance
        warnings.simplefilter("ignore")
        aigc.train(ROOT / "configs" / "cgan-digits.yaml",
                   ["model.z_dim=16", "model.g_width=8", "model.d_width=8",
                    "train.batch_size=16", "train.max_steps=2", "train.checkpoint_every=2",
                    "train.sample_every=0", "train.eval_every=0", "data.eval_samples=10"],
                   run_dir=run, progress=False)  # fmt: skip
    return run


@pytest.fixture(scope="module")
def detector_dir(tiny_gan, tmp_path_factory):
    out = tmp_path_factory.mktemp("detector") / "det"
    report = train_detector(tiny_gan, out, n=80, steps=40, seed=0)
    return out, report


# --------------------------------------------------------------------------- the metric


def test_average_precision_equals_scikit_learn():
    rng = np.random.default_rng(0)
    for trial in range(50):
        n = int(rng.integers(2, 60))
        labels = rng.integers(0, 2, n)
        labels[0] = 1  # at least one positive
        scores = rng.random(n)
        if trial % 2:  # coarse scores: many ties, which enter a threshold together
            scores = np.round(scores, 1)
        assert average_precision(scores, labels) == pytest.approx(
            average_precision_score(labels, scores), abs=1e-12
        )


def test_average_precision_by_hand():
    # scores 0.9 (pos), 0.8 (neg), 0.7 (pos): P@1 = 1 at R 0.5, P@3 = 2/3 at R 1
    assert average_precision([0.9, 0.8, 0.7], [1, 0, 1]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert average_precision([0.3, 0.3], [1, 0]) == pytest.approx(0.5)  # a tie: P = 1/2
    with pytest.raises(ValueError, match="positive"):
        average_precision([0.1, 0.2], [0, 0])


def test_augment_keeps_shape_and_changes_pixels():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    out = augment(images, np.random.default_rng(1))
    assert out.shape == images.shape and out.dtype == np.uint8
    changed = [(out[i] != images[i]).any() for i in range(16)]
    assert 4 <= sum(changed) <= 16  # each image is kept with probability 1/8
    grey = augment(images[..., :1], np.random.default_rng(1))
    assert grey.shape == (16, 32, 32, 1)


# --------------------------------------------------------------------------- training


def test_detector_separates_a_tiny_runs_samples_from_real_digits(detector_dir, tiny_gan):
    from aigc.runs import RunDir, file_sha256

    out, report = detector_dir
    assert report.n_val == {"real": 16, "generated": 16}
    assert report.val_average_precision >= 0.9 and report.val_accuracy >= 0.8, report
    info = json.loads((out / DETECTOR_JSON).read_text())
    ckpt = RunDir(tiny_gan).latest_checkpoint()
    assert info["generator"]["weights_sha256"] == file_sha256(ckpt / "model.safetensors")
    assert info["generator"]["name"] == "cgan" and info["generator"]["step"] == 2
    assert (info["image_size"], info["channels"]) == (32, 1)
    assert info["validation"]["average_precision"] == report.val_average_precision
    assert info["augmentations"]["jpeg_quality"] == [30, 100]

    # fresh images, never seen in training: real digits of the held-out split vs new samples
    import aigc
    from aigc.safety.image_detector import sample_generator
    from aigc.tasks.images import open_data

    det = load_detector(out)
    real = np.asarray(open_data(tiny_gan / "data").val_images[:40])
    fake = sample_generator(aigc.load(tiny_gan), 40, seed=99)
    scores = np.r_[det.score(real), det.score(fake)]
    labels = np.r_[np.zeros(40), np.ones(40)]
    assert average_precision(scores, labels) >= 0.9
    assert ((scores >= 0.5) == labels).mean() >= 0.8


def test_save_load_round_trip_and_batch_independence(detector_dir, tiny_gan, tmp_path):
    import aigc

    out, _ = detector_dir
    det = load_detector(out)
    pipe = aigc.load(tiny_gan)
    x = pipe.generate(12, seed=3, output="uint8")
    scores = det.score(x)
    assert scores.shape == (12,) and ((scores >= 0) & (scores <= 1)).all()
    again = load_detector(det.save(tmp_path / "copy")).score(x)
    np.testing.assert_array_equal(scores, again)
    np.testing.assert_allclose(det.score(x, batch_size=5), scores, rtol=1e-5, atol=1e-7)
    import torch

    tensor = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1  # what pipelines give
    np.testing.assert_allclose(det.score(tensor), scores, rtol=1e-6, atol=1e-7)
    assert det.score(x[0]).shape == (1,)


def test_bad_inputs_are_named(detector_dir, tiny_gan, tmp_path):
    out, _ = detector_dir
    det = load_detector(out)
    with pytest.raises(RequestError, match="32x32 images with 1 channel"):
        det.score(np.zeros((2, 16, 16, 1), np.uint8))
    with pytest.raises(RequestError, match="uint8"):
        det.score(np.zeros((2, 32, 32, 1), np.float32))
    # files: not an image, another size (refused, not resized), colour for a grey detector
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(RequestError, match="not an image"):
        read_image(tmp_path / "notes.png", det)
    Image.new("L", (16, 16)).save(tmp_path / "small.png")
    with pytest.raises(RequestError, match="16x16; this detector judges 32x32"):
        read_image(tmp_path / "small.png", det)
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "red.png")
    with pytest.raises(RequestError, match="colour image"):
        read_image(tmp_path / "red.png", det)
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "grey-rgb.png")
    assert read_image(tmp_path / "grey-rgb.png", det).shape == (32, 32, 1)  # lossless
    # folders that are not detectors
    with pytest.raises(CheckpointError, match="not a detector folder"):
        load_detector(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / DETECTOR_JSON).write_text((out / DETECTOR_JSON).read_text())
    with pytest.raises(CheckpointError, match="missing"):
        load_detector(broken)
    (broken / DETECTOR_WEIGHTS).write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="damaged"):
        load_detector(broken)
    (broken / DETECTOR_JSON).write_text("{")
    with pytest.raises(CheckpointError, match="damaged"):
        load_detector(broken)
    # training into a folder that holds something
    with pytest.raises(RequestError, match="not empty"):
        train_detector(tiny_gan, out, n=10, steps=1)


# --------------------------------------------------------------------------- the CLI


def test_cli_trains_a_detector_and_judges_images(tiny_gan, tmp_path):
    import aigc

    det = tmp_path / "det"
    done = run_cli("train-detector", str(tiny_gan), "--out", str(det), "--n", "40",
                   "--steps", "30")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "average precision" in done.stdout and (det / DETECTOR_WEIGHTS).is_file()

    fake = aigc.load(tiny_gan).generate(1, seed=5, output="pil")[0]
    fake.save(tmp_path / "fake.png")
    done = run_cli("detect", "--image", str(tmp_path / "fake.png"), "--detector", str(det),
                   "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    verdict = json.loads(done.stdout)
    expected = load_detector(det).score(read_image(tmp_path / "fake.png", load_detector(det)))
    assert verdict["probability_generated"] == pytest.approx(float(expected[0]), abs=1e-6)
    assert verdict["generator"]["name"] == "cgan"
    done = run_cli("detect", "--image", str(tmp_path / "fake.png"), "--detector", str(det))
    assert done.returncode == 0 and "probability generated" in done.stdout, done.stderr

    (tmp_path / "notes.png").write_text("not an image")
    Image.new("L", (48, 48)).save(tmp_path / "big.png")
    (tmp_path / "empty").mkdir()
    for args, message in [
        (("--image", str(tmp_path / "notes.png"), "--detector", str(det)), "not an image"),
        (("--image", str(tmp_path / "big.png"), "--detector", str(det)), "48x48"),
        (("--image", str(tmp_path / "fake.png"), "--detector", str(tmp_path / "empty")),
         "not a detector folder"),
        (("--image", str(tmp_path / "fake.png")), "--detector DIR"),
        (("--detector", str(det)), "--image FILE"),
    ]:  # fmt: skip
        done = run_cli("detect", *args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) <= 2
    done = run_cli("train-detector", str(tmp_path / "nothing"), "--out", str(tmp_path / "d2"))
    assert done.returncode == 2 and "no such run folder" in done.stderr


def test_cli_routes_image_and_key_to_the_image_watermark(tmp_path):
    marker = pytest.importorskip("aigc.safety.image_watermark")
    rng = np.random.default_rng(0)
    pixels = rng.integers(40, 200, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(marker.mark_image(pixels, "image-key")).save(tmp_path / "marked.png")
    done = run_cli("detect", "--image", str(tmp_path / "marked.png"), "--key", "image-key")
    assert done.returncode == 0 and done.stdout.startswith("watermarked"), done.stderr
    done = run_cli("detect", "--image", str(tmp_path / "marked.png"), "--key", "other")
    assert done.returncode == 0 and "not watermarked" in done.stdout, done.stderr
