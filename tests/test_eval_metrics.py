"""`aigc eval` and the trainer's evaluations with feature metrics (FID, KID, precision/
recall, ...) and text-sample metrics, end to end on tiny real runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import aigc
from aigc.errors import RequestError
from aigc.metrics.image import (
    fid_from_features,
    kid_from_features,
    precision_recall,
)
from aigc.runs import RunDir
from aigc.sampling.latent import sample_images
from aigc.tasks.images import open_data, to_model_batch

from .conftest import RECIPE, ROOT, TINY, run_cli

GAN_TINY = [
    "model.z_dim=16",
    "model.g_width=8",
    "model.d_width=8",
    "train.batch_size=16",
    "train.max_steps=4",
    "train.checkpoint_every=4",
    "train.sample_every=0",
    "data.eval_samples=80",
]


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("gan") / "run"
    aigc.train(ROOT / "configs" / "dcgan-digits.yaml", GAN_TINY, run_dir=run, progress=False)
    return run


def test_training_evaluations_log_feature_metrics_and_their_extractor(gan_run):
    final = [r for r in RunDir(gan_run).read_metrics() if "val_fid" in r][-1]
    for key in ("val_fid", "val_kid", "val_kid_std", "val_precision", "val_recall"):
        assert isinstance(final[key], float) and np.isfinite(final[key]), key
    assert final["val_extractor"].startswith("domain-classifier:")
    assert 0 <= final["val_precision"] <= 1 and 0 <= final["val_recall"] <= 1


def test_eval_metrics_equal_an_independent_computation(gan_run):
    """FID, KID and precision/recall from `evaluate` equal the same functions applied to
    features extracted here by hand from the run's training images and the samples."""
    gen = aigc.load(gan_run)
    result = gen.evaluate(n=80, metrics=["fid", "kid", "pr"], save=False)
    task = gen.task
    extractor = task.feature_extractor(gen.device)
    assert result["extractor"] == extractor.name
    real = extractor.features(to_model_batch(open_data(RunDir(gan_run).data_dir).train_images))
    # the images the judge sees (one process: the feature metrics take the same)
    images, _ = sample_images(gen.model, 80, None, gen.config.train.seed + 1_000_003, gen.device)
    fake = extractor.features(images)
    assert result["fid"] == pytest.approx(fid_from_features(real, fake), rel=1e-5)
    kid = kid_from_features(real, fake, subset_size=80)
    assert result["kid"] == pytest.approx(kid.mean, rel=1e-4, abs=1e-7)
    pr = precision_recall(real, fake, k=3)
    assert (result["precision"], result["recall"]) == pytest.approx((pr.precision, pr.recall))


def test_cli_eval_chooses_metrics_and_records_them(gan_run, tmp_path):
    r = run_cli("eval", str(gan_run), "--metrics", "fid,is,dc", "--n", "80", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert {"fid", "is", "is_std", "density", "coverage"} <= result.keys()
    assert "kid" not in result and result["samples"] == 80
    assert json.loads((gan_run / "eval.json").read_text()) == result
    last = RunDir(gan_run).read_metrics()[-1]
    assert last["eval_fid"] == result["fid"] and last["eval_extractor"] == result["extractor"]
    # another reference: the embedded digits, prepared like the run's images
    r = run_cli("eval", str(gan_run), "--metrics", "fid", "--n", "80", "--against", "digits")
    assert r.returncode == 0 and "fid" in r.stdout, r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metrics", "fid,bogus"], "choose from fid, kid, is, pr, dc"),
        (["--against", "/no/such/folder"], "no such file"),
        (["--inception-weights", "/no/such/file.pth"], "file.pth"),
        (["--fid-protocol", "tensorflow"], "choose from pytorch-fid, tf"),
        (["--scheduler", "ddim", "--steps", "10"], "they are for diffusion runs"),
        (["--guidance", "3"], "they are for diffusion runs"),
    ],
)
def test_cli_eval_bad_requests_exit_2(gan_run, args, message):
    r = run_cli("eval", str(gan_run), "--n", "20", *args)
    assert r.returncode == 2 and message in r.stderr.lower(), r.stderr
    assert "Traceback" not in r.stderr


def test_inception_weights_give_inception_features(gan_run, tmp_path, monkeypatch):
    """With a weights file (random, in the published key layout; its hash stands in for
    the published one) FID and IS use the 2048-d Inception features and 1008 logits."""
    from PIL import Image

    from aigc.metrics import features
    from aigc.metrics.features import FIDInceptionV3

    torch.manual_seed(0)
    weights = tmp_path / "inception.pth"
    torch.save(FIDInceptionV3().state_dict(), weights)
    monkeypatch.setattr(features, "INCEPTION_SHA256", features.file_sha256(weights))
    folder = tmp_path / "real"
    folder.mkdir()
    train = RunDir(gan_run)
    images = np.load(train.data_dir / "images.npy", allow_pickle=False)[:12, :, :, 0]
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i}.png")
    gen = aigc.load(gan_run)
    with pytest.warns(UserWarning, match="singular"):  # 10 samples for 2048 dimensions
        result = gen.evaluate(
            n=10, metrics=["fid", "is"], against=str(folder), inception_weights=str(weights),
            save=False,
        )  # fmt: skip
    assert result["extractor"].startswith("inception-v3-fid:")
    assert np.isfinite(result["fid"]) and result["is"] >= 1.0
    assert result["fid_protocol"] == "pytorch-fid"
    # the tf protocol: recorded in the result, its reference statistics cached apart
    from aigc.metrics.reference import reference_path

    with pytest.warns(UserWarning, match="singular"):
        tf = gen.evaluate(n=10, metrics=["fid"], against=str(folder), fid_protocol="tf")
    assert tf["fid_protocol"] == "tf" and tf["extractor"] == result["extractor"] + "+tf"
    assert abs(tf["fid"] - result["fid"]) > 1e-3 * result["fid"]  # other features, other FID
    cache = reference_path({"extractor": "any", "spec": "any", "count": 1}).parent
    cached = sorted(p.name for p in cache.glob("inception*.npz"))
    assert any("_tf-" in n for n in cached) and any("_tf-" not in n for n in cached), cached
    saved = json.loads((Path(gan_run) / "eval.json").read_text())
    assert saved["fid_protocol"] == "tf"
    assert RunDir(gan_run).read_metrics()[-1]["eval_fid_protocol"] == "tf"
    with pytest.raises(RequestError, match="pytorch-fid, tf"):
        gen.evaluate(n=10, fid_protocol="TF")


def test_text_eval_reports_sample_diversity_and_memorisation(tmp_path, corpus_file, monkeypatch):
    """Memorisation equals a brute-force check of every 50-character window of the same
    generated texts against the training text."""
    from aigc.metrics.text import code_points_of_tokens, distinct_n
    from aigc.sampling import SamplingParams, generate
    from aigc.trainer import mix_seed

    out = aigc.train(RECIPE, [*TINY, f"data.path={corpus_file}", "train.max_steps=30",
                              "data.eval_samples=3", "data.eval_sample_tokens=120"],
                     run_dir=tmp_path / "run", progress=False)  # fmt: skip
    rows = [r for r in RunDir(out.run_dir).read_metrics() if "val_memorisation" in r]
    assert rows and 0 <= rows[-1]["val_memorisation"] <= 1
    gen = aigc.load(out.run_dir)
    from aigc.metrics.text import SAMPLE_METRICS

    # a metric a user registers is computed and reported like the built-in ones
    monkeypatch.setitem(
        SAMPLE_METRICS, "mean_chars", lambda ts: float(np.mean([len(t) for t in ts]))
    )
    result = gen.evaluate()
    task = gen.task
    prompt = task.sample_prompts()[-1]
    texts = [
        generate(gen.model, task.tokenizer, prompt, SamplingParams(
            max_new_tokens=120, temperature=1.0, seed=mix_seed(gen.config.train.seed, i)))[0]
        for i in range(3)
    ]  # fmt: skip
    train_text = "".join(map(chr, code_points_of_tokens(task.corpus.train, task.tokenizer)))
    windows = [t[i : i + 50] for t in texts for i in range(len(t) - 49)]
    expected = sum(w in train_text for w in windows) / len(windows)
    assert result["memorisation"] == pytest.approx(expected)
    assert result["distinct_2"] == pytest.approx(distinct_n(texts, 2))
    assert result["mean_chars"] == pytest.approx(np.mean([len(t) for t in texts]))
    assert {"distinct_1", "distinct_3", "rep_4", "ppl", "bpc"} <= result.keys()
