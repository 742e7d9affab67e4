"""Run folders: safetensors checkpoints without pickle, atomic replacement, metrics."""

from __future__ import annotations

import json

import pytest
import torch

from aigc.errors import CheckpointError
from aigc.runs import RunDir, flatten_state, unflatten_state


def _optimizer_state():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    return model, opt


def test_optimizer_state_round_trips_without_pickle():
    model, opt = _optimizer_state()
    tensors, skeleton = flatten_state(opt.state_dict())
    json.dumps(skeleton)  # the non-tensor part is plain JSON
    restored = unflatten_state(json.loads(json.dumps(skeleton)), tensors)
    opt2 = torch.optim.AdamW(model.parameters(), lr=1.0)
    opt2.load_state_dict(restored)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"]
    for k in a["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a["state"][k][name], b["state"][k][name])


def test_flatten_refuses_objects_that_need_pickle():
    with pytest.raises(TypeError, match="without pickle"):
        flatten_state({"x": object()})


def _make_run(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create("gpt", "family: gpt\n")
    return run


def test_checkpoint_save_load_and_latest_pointer(tmp_path):
    run = _make_run(tmp_path)
    w = {"a": torch.arange(6.0).reshape(2, 3)}
    run.save_checkpoint(5, {"model": w}, {"family": "gpt"})
    run.save_checkpoint(10, {"model": {"a": w["a"] + 1}}, {"family": "gpt"})
    latest = run.latest_checkpoint()
    assert latest.name == "step-00000010"
    files, state = run.load_checkpoint(latest)
    assert torch.equal(files["model"]["a"], w["a"] + 1)
    assert state["step"] == 10
    assert not list(run.checkpoints_dir.glob(".tmp-*"))


def test_old_checkpoints_pruned(tmp_path):
    run = _make_run(tmp_path)
    for s in (1, 2, 3, 4):
        run.save_checkpoint(s, {"model": {"a": torch.zeros(1)}}, {}, keep=2)
    assert run.checkpoint_names() == ["step-00000003", "step-00000004"]


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    run = _make_run(tmp_path)
    path = run.save_checkpoint(1, {"model": {"a": torch.zeros(100)}}, {})
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        run.load_checkpoint(path)


def test_half_written_checkpoint_never_becomes_latest(tmp_path):
    run = _make_run(tmp_path)
    run.save_checkpoint(1, {"model": {"a": torch.zeros(1)}}, {})
    # A crash while writing step 2 leaves only a temporary folder behind.
    (run.checkpoints_dir / ".tmp-step-00000002-999").mkdir()
    assert run.latest_checkpoint().name == "step-00000001"


def test_family_check_and_not_a_run(tmp_path):
    run = _make_run(tmp_path)
    with pytest.raises(CheckpointError, match="is a 'gpt' run, not a 'gan' run"):
        run.check_family("gan")
    with pytest.raises(CheckpointError, match="not an aigc run folder"):
        RunDir(tmp_path).info()
    with pytest.raises(CheckpointError, match="already holds a run"):
        run.create("gpt", "")


def test_metrics_truncation_drops_later_and_torn_lines(tmp_path):
    run = _make_run(tmp_path)
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 8)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "lo'
    run.metrics_path.write_text(text)
    run.truncate_metrics(5)
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3, 4, 5]
