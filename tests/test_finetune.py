"""`aigc finetune`: full and LoRA fine-tuning of a pretrained GPT run, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import aigc
from aigc.api import run_config
from aigc.errors import CheckpointError, ConfigError, DataError
from aigc.runs import RunDir

from .conftest import RECIPE, TINY, run_cli


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus_file) -> Path:
    run = tmp_path_factory.mktemp("base") / "run"
    aigc.train(RECIPE, [*TINY, f"data.path={corpus_file}", "train.max_steps=40"], run_dir=run,
               progress=False)  # fmt: skip
    return run


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory) -> Path:
    """A little Python code whose characters the base's vocabulary mostly has."""
    folder = tmp_path_factory.mktemp("code")
    for i in range(6):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(60))
        (folder / f"m{i}.py").write_text(body + "# cost: 5 $ and `x`\n", encoding="utf-8")
    return folder


FT = ["train.max_steps=12", "train.batch_size=8", "data.eval_samples=2",
      "data.eval_sample_tokens=16"]  # fmt: skip


def test_full_finetune_starts_from_the_base_and_records_it(base_run, code_dir, tmp_path):
    still = ["train.lr=0", "train.min_lr=0", "train.max_steps=2"]  # weights stay the base's
    out = aigc.finetune(base_run, [f"data.path={code_dir}", *FT, *still],
                        run_dir=tmp_path / "zero", progress=False)  # fmt: skip
    zero, base = aigc.load(out.run_dir), aigc.load(base_run)
    for (k, a), b in zip(zero.model.state_dict().items(), base.model.state_dict().values(),
                         strict=True):  # fmt: skip
        assert torch.equal(a, b), k  # exactly the base's weights
    cfg = run_config(RunDir(out.run_dir))
    assert Path(cfg.train.init_from) == base_run.resolve() and len(cfg.train.init_sha256) == 64
    assert zero.tokenizer.chars == base.tokenizer.chars  # the base's tokenizer, kept
    out = aigc.finetune(base_run, [f"data.path={code_dir}", *FT], run_dir=tmp_path / "full",
                        progress=False)  # fmt: skip
    rows = RunDir(out.run_dir).read_metrics()
    assert rows[0]["trainable_params"] == rows[0]["total_params"]
    corpus = (Path(out.run_dir) / "data" / "corpus.json").read_text()
    # '$' and '`' are not in this base's vocabulary: replaced (by '?' or, lacking it, ' ')
    assert "2 character(s) outside the tokenizer's vocabulary" in corpus and "$`" in corpus


def test_lora_stores_only_adapters_and_loads_merged(base_run, code_dir, tmp_path):
    out = aigc.finetune(base_run, [f"data.path={code_dir}", *FT], method="lora",
                        run_dir=tmp_path / "lora", lora_rank=2, progress=False)  # fmt: skip
    run = RunDir(out.run_dir)
    saved = load_file(str(run.latest_checkpoint() / "model.safetensors"))
    assert saved and all(".lora_" in k for k in saved)  # the base is not copied
    first = run.read_metrics()[0]
    assert 0 < first["trainable_params"] < 0.2 * first["total_params"]
    gen = aigc.load(out.run_dir)  # base + adapters, merged into plain weights
    assert not any("lora" in k for k in gen.model.state_dict())
    base = aigc.load(base_run)
    changed = [k for k, v in gen.model.state_dict().items()
               if not torch.equal(v, base.model.state_dict()[k])]  # fmt: skip
    assert changed and all(k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
                           for k in changed)  # fmt: skip
    # merged weights give the same logits as base + unmerged adapters
    from aigc.finetuning import init_from_base
    from aigc.models.lora import load_lora_state_dict

    unmerged_task = aigc.load(base_run).task
    init_from_base(unmerged_task, gen.config.train, run.path)
    unmerged = unmerged_task.model
    load_lora_state_dict(unmerged, saved)
    ids = torch.randint(0, gen.model.cfg.vocab_size, (2, 20))
    with torch.no_grad():
        assert torch.allclose(gen.model(ids)[0], unmerged.eval()(ids)[0], atol=1e-5)
    assert gen.generate("def ", max_new_tokens=10, seed=0)  # the KV-cached sampler works


def test_resumed_lora_finetune_equals_uninterrupted(base_run, code_dir, tmp_path):
    args = dict(method="lora", lora_rank=2, progress=False)
    whole = aigc.finetune(base_run, [f"data.path={code_dir}", *FT], run_dir=tmp_path / "w",
                          **args)  # fmt: skip
    aigc.finetune(base_run, [f"data.path={code_dir}", *FT, "train.max_steps=5"],
                  run_dir=tmp_path / "s", **args)  # fmt: skip
    split = aigc.train(None, ["train.max_steps=12"], run_dir=tmp_path / "s", progress=False)
    assert split.resumed_from == 5
    for name in ("model", "optim"):
        a = load_file(str(RunDir(whole.run_dir).latest_checkpoint() / f"{name}.safetensors"))
        b = load_file(str(RunDir(split.run_dir).latest_checkpoint() / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_finetune_bad_input_is_refused_before_training(base_run, code_dir, tmp_path):
    with pytest.raises(DataError, match="not in the tokenizer's vocabulary"):
        aigc.finetune(base_run, [f"data.path={code_dir}", "data.unknown_chars=error", *FT],
                      run_dir=tmp_path / "a", progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match="matches no linear layer"):
        aigc.finetune(base_run, [f"data.path={code_dir}", *FT], method="lora",
                      lora_targets=["q_proj"], run_dir=tmp_path / "b", progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match=r"model\.n_layer cannot change"):
        aigc.finetune(base_run, [f"data.path={code_dir}", "model.n_layer=3"],
                      run_dir=tmp_path / "c", progress=False)  # fmt: skip
    for name in "abc":
        assert not RunDir(tmp_path / name).exists()
    gan = tmp_path / "gan"
    aigc.train("dcgan-digits", ["model.g_width=8", "model.d_width=8", "train.batch_size=8",
                                "train.max_steps=1", "data.eval_samples=10",
                                "data.eval_metrics=[]"], run_dir=gan, progress=False)  # fmt: skip
    r = run_cli("finetune", str(gan), "--run-dir", str(tmp_path / "d"))
    assert r.returncode == 2 and "needs a GPT language model run" in r.stderr
    assert "Traceback" not in r.stderr


def test_export_merge_writes_a_plain_run_with_equal_outputs(base_run, code_dir, tmp_path):
    out = aigc.finetune(base_run, [f"data.path={code_dir}", *FT], method="lora",
                        run_dir=tmp_path / "lora", lora_rank=2, progress=False)  # fmt: skip
    merged_dir = tmp_path / "merged"
    r = run_cli("export", str(out.run_dir), "--merge", "--out", str(merged_dir))
    assert r.returncode == 0, r.stderr
    cfg = aigc.load_config(merged_dir / "config.yaml")
    assert cfg.train.lora_rank == 0 and cfg.train.init_from == ""
    plain, lora = aigc.load(merged_dir), aigc.load(out.run_dir)
    ids = torch.randint(0, plain.model.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.allclose(plain.model(ids)[0], lora.model(ids)[0], atol=1e-5)
    assert plain.generate("def ", max_new_tokens=12, seed=3) == lora.generate(
        "def ", max_new_tokens=12, seed=3
    )
    # a plain run has nothing to merge; an existing folder is never overwritten
    r = run_cli("export", str(base_run), "--merge", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "no LoRA adapters" in r.stderr, r.stderr
    r = run_cli("export", str(out.run_dir), "--merge", "--out", str(merged_dir))
    assert r.returncode == 2 and "not empty" in r.stderr, r.stderr


def test_a_full_finetune_no_longer_needs_its_base(base_run, code_dir, tmp_path):
    """A full fine-tune holds all its weights: it loads and continues after its base has
    moved on (a LoRA run would refuse: its frozen weights come from the base)."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(base_run, base)
    out = aigc.finetune(base, [f"data.path={code_dir}", *FT], run_dir=tmp_path / "full",
                        progress=False)  # fmt: skip
    lora = aigc.finetune(base, [f"data.path={code_dir}", *FT], method="lora", lora_rank=2,
                         run_dir=tmp_path / "lora", progress=False)  # fmt: skip
    aigc.train(None, ["train.max_steps=45"], run_dir=base, progress=False)  # the base moves on
    assert aigc.load(out.run_dir).generate("def ", max_new_tokens=5, seed=0)
    assert aigc.train(None, ["train.max_steps=14"], run_dir=out.run_dir, progress=False).step == 14
    from aigc.errors import CheckpointError

    with pytest.raises(CheckpointError, match="changed since"):
        aigc.load(lora.run_dir)


def test_a_lora_run_moved_with_its_base_still_loads_and_a_missing_base_is_named(
    base_run, code_dir, tmp_path
):
    import shutil

    import yaml

    runs = tmp_path / "runs"
    shutil.copytree(base_run, runs / "base")
    out = aigc.finetune(runs / "base", [f"data.path={code_dir}", *FT, "train.max_steps=2"],
                        method="lora", lora_rank=2, progress=False)  # fmt: skip
    lora = Path(out.run_dir)
    assert lora == runs / "base-lora"
    recorded = yaml.safe_load((lora / "config.yaml").read_text())["train"]["init_from"]
    assert recorded == "../base"  # relative to the run: the pair can move together
    text = aigc.load(lora).generate("def ", max_new_tokens=12, seed=0)

    # the whole runs folder moved (or mounted elsewhere, as in the Docker instructions)
    moved = tmp_path / "elsewhere" / "runs"
    moved.parent.mkdir()
    runs.rename(moved)
    assert aigc.load(moved / "base-lora").generate("def ", max_new_tokens=12, seed=0) == text

    # a run written before relative paths: the absolute base is gone, the sibling is found
    cfg_path = moved / "base-lora" / "config.yaml"
    data = yaml.safe_load(cfg_path.read_text())
    data["train"]["init_from"] = str(tmp_path / "old" / "place" / "base")
    cfg_path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert aigc.load(moved / "base-lora").generate("def ", max_new_tokens=12, seed=0) == text

    # no base anywhere: the error names it and the fix, in Python and from the CLI
    shutil.rmtree(moved / "base")
    with pytest.raises(CheckpointError, match=r"the base run of .* is missing") as e:
        aigc.load(moved / "base-lora")
    assert "put the base run back there, or set train.init_from in" in str(e.value)
    r = run_cli("sample", str(moved / "base-lora"), "--prompt", "x", "--max-new-tokens", "2")
    assert r.returncode == 2 and r.stderr.startswith("error: the base run of "), r.stderr
    assert "has no checkpoint" not in r.stderr
