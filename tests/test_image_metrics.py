"""Image metrics against independent computations; the cached domain classifier."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from aigc.data.images import load_image_set
from aigc.metrics import classifier as clf_mod
from aigc.metrics.image import class_shares, label_accuracy, mean_pairwise_distance, min_class_share


def test_mean_pairwise_distance_matches_a_loop():
    x = torch.randn(7, 2, 3, 3)
    flat = x.reshape(7, -1).double().numpy()
    pairs = [np.linalg.norm(a - b) for a, b in itertools.permutations(flat, 2)]
    assert mean_pairwise_distance(x) == pytest.approx(np.mean(pairs), rel=1e-9)
    assert mean_pairwise_distance(x[:1].repeat(5, 1, 1, 1)) == 0.0  # one image repeated


def test_class_shares_and_accuracy():
    pred = np.array([0, 0, 1, 3, 3, 3])
    assert class_shares(pred, 4).tolist() == pytest.approx([2 / 6, 1 / 6, 0, 3 / 6])
    assert min_class_share(pred, 4) == 0.0
    assert label_accuracy(pred, np.array([0, 1, 1, 3, 0, 3])) == pytest.approx(4 / 6)


def test_domain_classifier_reads_digits_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("AIGC_CACHE_DIR", str(tmp_path))
    digits = load_image_set("digits", image_size=32, channels=1)
    labels = {"class": digits.labels["class"]}
    first = clf_mod.cached_classifier("digits-test", digits.images, labels, digits.classes)
    assert first.accuracy["class"] > 0.93  # held-out real digits
    assert list((tmp_path / "classifiers").glob("*.safetensors"))

    def no_training(*a, **k):
        raise AssertionError("the cached classifier should have been loaded")

    monkeypatch.setattr(clf_mod, "train_classifier", no_training)
    again = clf_mod.cached_classifier("digits-test", digits.images, labels, digits.classes)
    x = torch.from_numpy(digits.images[:50].copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(first.model.predict(x)["class"], again.model.predict(x)["class"])
    assert again.accuracy == first.accuracy
    # predictions agree with the true labels on most training images too
    pred = again.model.predict(x)["class"].numpy()
    assert (pred == digits.labels["class"][:50]).mean() > 0.9
