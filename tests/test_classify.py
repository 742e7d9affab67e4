"""Sequence classification: the head, the data, fine-tuning and `aigc classify`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score, f1_score

import aigc
from aigc.data.labels import check_label_set, read_labelled, stratified_split
from aigc.errors import ConfigError, DataError
from aigc.models.gpt import GPTClassifier, GPTClassifierConfig
from aigc.runs import RunDir

from .conftest import RECIPE, run_cli

FT = ["train.max_steps=8", "train.batch_size=8", "data.n_classes=3"]


@pytest.fixture(scope="module")
def base_run(pretrained_tiny_gpt) -> Path:
    return pretrained_tiny_gpt


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_right_padding_does_not_change_a_texts_logits(pooling):
    """A text's logits depend neither on the right padding after it (its value or length)
    nor on its batch companions, and they are the head applied to the pooled final hidden
    states of its real tokens (the last one's, or their mean), computed here layer by layer
    for every row."""
    torch.manual_seed(0)
    cfg = GPTClassifierConfig(vocab_size=20, block_size=24, n_layer=2, n_head=2, n_embd=16,
                              n_classes=3, pooling=pooling)  # fmt: skip
    model = GPTClassifier(cfg).eval()
    rows = [torch.randint(0, 20, (n,)) for n in (5, 11, 16)]
    lengths = torch.tensor([len(r) for r in rows])

    def padded(order: list[int], width: int, pad: int) -> torch.Tensor:
        batch = torch.full((len(order), width), pad, dtype=torch.long)
        for i, k in enumerate(order):
            batch[i, : len(rows[k])] = rows[k]
        return batch

    together = model.classify(padded([0, 1, 2], 16, pad=7), lengths)
    # other companions in another order, padded further with another value
    shuffled = model.classify(padded([2, 0, 1], 24, pad=0), lengths[[2, 0, 1]])
    torch.testing.assert_close(shuffled, together[[2, 0, 1]], rtol=1e-5, atol=1e-5)
    for i, r in enumerate(rows):
        alone = model.classify(r[None], lengths[i : i + 1])
        torch.testing.assert_close(together[i], alone[0], rtol=1e-5, atol=1e-5)
        t = model.transformer
        h = t.ln_f(t.h[1](t.h[0](t.wte(r[None]) + t.wpe.weight[: len(r)])))[0]  # real tokens
        pooled = h.mean(0) if pooling == "mean" else h[-1]
        torch.testing.assert_close(together[i], model.score(pooled), rtol=1e-5, atol=1e-5)


def test_classifier_config_checks():
    with pytest.raises(ConfigError, match="pooling"):
        aigc.load_config(RECIPE, ["family=classifier", "model.pooling=max"])
    with pytest.raises(ConfigError, match="n_classes"):
        aigc.load_config(RECIPE, ["family=classifier", "model.n_classes=1"])


def test_labelled_jsonl_errors_name_file_and_line(tmp_path):
    good = _jsonl(tmp_path / "ok.jsonl", [{"text": "a b", "label": "x"}, {"text": "c", "label": 3}])
    assert read_labelled(good) == [("a b", "x"), ("c", "3")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n\n{"text": "", "label": "y"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: 'text' must be a non-empty string"):
        read_labelled(bad)
    bad.write_text('{"text": "a"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: no field 'label'"):
        read_labelled(bad)
    with pytest.raises(DataError, match="at least two labels, found 1"):
        check_label_set(["x", "x"], "f.jsonl")


def test_stratified_split_is_seeded_and_keeps_every_label_on_both_sides():
    examples = [(f"t{i}", "ab"[i % 2]) for i in range(20)] + [("lonely", "c")]
    train, val = stratified_split(examples, 0.1, seed=3)
    assert stratified_split(examples, 0.1, seed=3) == (train, val)
    assert {lb for _, lb in val} == {"a", "b"} and ("lonely", "c") in train
    assert sorted(train + val) == sorted(examples)


def test_a_label_set_of_one_is_refused_before_training(base_run, tmp_path):
    data = _jsonl(
        tmp_path / "one.jsonl", [{"text": f"text {i}", "label": "spam"} for i in range(9)]
    )
    target = tmp_path / "never"
    r = run_cli("finetune", str(base_run), "--task", "classify", f"data.path={data}",
                "--run-dir", str(target))  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "needs at least two labels, found 1" in r.stderr and "Traceback" not in r.stderr
    assert not target.exists()


def test_finetuned_classifier_metrics_equal_sklearn_on_its_predictions(base_run, tmp_path):
    out = aigc.finetune(base_run, FT, task="classify", run_dir=tmp_path / "clf", progress=False)
    clf = aigc.load(out.run_dir)
    assert isinstance(clf, aigc.api.TextClassifier) and len(clf.classes) == 3
    # the base's tokenizer and transformer weights came along; the head is new
    assert clf.tokenizer.chars == aigc.load(base_run).tokenizer.chars
    result = clf.evaluate()
    # independent computation: the held-out texts, predicted one at a time, scored by sklearn
    from aigc.data.stdlib import docstring_dataset

    _, val, names = docstring_dataset(3, 0, 0.1)
    assert names == clf.classes
    preds = [names.index(clf.classify(t)["label"]) for t, _ in val]
    truth = [label for _, label in val]
    assert result["count"] == len(val)
    assert result["accuracy"] == pytest.approx(accuracy_score(truth, preds), abs=1e-12)
    assert result["macro_f1"] == pytest.approx(
        f1_score(truth, preds, average="macro", labels=range(3), zero_division=0), abs=1e-12
    )
    p = clf.classify(["one", "two"])
    assert [sorted(r["probs"]) for r in p] == [sorted(names)] * 2
    assert sum(p[0]["probs"].values()) == pytest.approx(1.0, abs=1e-5)
    saved = json.loads((Path(out.run_dir) / "eval.json").read_text())
    assert saved["macro_f1"] == result["macro_f1"]


def test_lora_classifier_trains_adapters_and_the_head_only(base_run, tmp_path):
    out = aigc.finetune(base_run, [*FT, "model.pooling=mean"], task="classify", method="lora",
                        lora_rank=2, run_dir=tmp_path / "lora", progress=False)  # fmt: skip
    run = RunDir(out.run_dir)
    stored = load_file(run.latest_checkpoint() / "model.safetensors")
    assert {"score.weight", "score.bias"} <= set(stored)
    assert all(k.startswith("score.") or "lora_" in k for k in stored), sorted(stored)[:5]
    clf = aigc.load(out.run_dir)
    assert clf.config.model.pooling == "mean"
    before = clf.evaluate(save=False)
    assert before == aigc.load(out.run_dir).evaluate(save=False)  # load is deterministic
    # classify() right-pads a batch to its longest text: no text's answer depends on that
    texts = ["x", "sort the list of numbers", "open the file and read every line of it", "ab"]
    alone = [clf.classify(t) for t in texts]
    for batch_size in (2, 4):
        for got, one in zip(clf.classify(texts, batch_size=batch_size), alone, strict=True):
            assert got["label"] == one["label"]
            assert got["probs"] == pytest.approx(one["probs"], abs=1e-6)


def test_random_init_classifier_learns_an_easy_task_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(120):
        word, label = (("apple", "fruit"), ("carrot", "veg"), ("salmon", "fish"))[i % 3]
        filler = " ".join(rng.choice(["the", "a", "one", "some"], size=3))
        rows.append({"text": f"{filler} {word} {filler}", "label": label})
    data = _jsonl(tmp_path / "food.jsonl", rows)
    cfg = {"family": "classifier", "data": {"path": str(data), "val_fraction": 0.2},
           "model": {"block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32},
           "train": {"max_steps": 150, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5,
                     "eval_every": 0}}  # fmt: skip
    out = aigc.train(cfg, run_dir=tmp_path / "food", progress=False)
    # chance is 1/3; training texts are all learnt, held-out ones nearly all
    assert out.metrics["accuracy"] >= 0.9 and out.metrics["macro_f1"] >= 0.9
    r = run_cli("classify", str(out.run_dir), "--text", "one salmon the", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["label"] == "fish"
    r = run_cli("classify", str(out.run_dir))
    assert r.returncode == 2 and "--text" in r.stderr


@pytest.mark.parametrize(("task", "method"), [("classify", "lora"), ("chat", "lora")])
def test_a_resumed_finetune_equals_an_uninterrupted_one(base_run, tmp_path, task, method):
    args = dict(task=task, method=method, lora_rank=2, progress=False)
    common = ["train.batch_size=4", "train.checkpoint_every=3", "data.val_fraction=0.5"]
    whole = aigc.finetune(base_run, [*common, "train.max_steps=6"], run_dir=tmp_path / "a",
                          **args)  # fmt: skip
    # stopped by its time budget after the first step, then continued without one
    cut = aigc.finetune(base_run, [*common, "train.max_steps=6", "train.max_time=1e-9"],
                        run_dir=tmp_path / "c", **args)  # fmt: skip
    assert cut.step < 6
    resumed = aigc.train(None, ["train.max_time=0"], run_dir=tmp_path / "c", progress=False)
    assert resumed.step == 6 and resumed.resumed_from == cut.step
    a = load_file(RunDir(whole.run_dir).latest_checkpoint() / "model.safetensors")
    c = load_file(RunDir(resumed.run_dir).latest_checkpoint() / "model.safetensors")
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
