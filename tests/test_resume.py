"""A run killed with SIGKILL at an arbitrary moment, then resumed, ends bitwise equal
to an uninterrupted run, with no duplicated or missing steps in metrics.jsonl."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from aigc.runs import RunDir
from tests.conftest import RECIPE, ROOT, TINY, run_cli

pytestmark = pytest.mark.slow

STEPS = 150
# Dropout and EMA make the RNG and the EMA state part of what must be restored.
OVERRIDES = [
    *TINY,
    "model.n_embd=64",
    "model.dropout=0.1",
    "train.ema=0.9",
    f"train.max_steps={STEPS}",
    "train.checkpoint_every=9",
    "train.eval_every=40",
    "train.log_every=1",
]


def _start(run_dir, corpus_file):
    env = {**os.environ, "AIGC_NO_PROGRESS": "1"}
    args = [
        sys.executable,
        "-m",
        "aigc",
        "train",
        RECIPE,
        *OVERRIDES,
        f"data.path={corpus_file}",
        "--run-dir",
        str(run_dir),
    ]
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _kill_after_a_checkpoint(proc, run: RunDir, rng: random.Random) -> int:
    """SIGKILLs the trainer at a random moment after it has saved at least one checkpoint."""
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            break
        ckpt = run.checkpoints_dir / "latest" if run.checkpoints_dir.exists() else None
        if ckpt is not None and ckpt.exists():
            time.sleep(rng.uniform(0.0, 0.4))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.005)
    latest = run.latest_checkpoint()
    return int(latest.name.split("-")[1]) if latest else 0


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, corpus_file):
    ref = run_cli(
        "train", RECIPE, *OVERRIDES, f"data.path={corpus_file}", "--run-dir", str(tmp_path / "a")
    )
    assert ref.returncode == 0, ref.stderr

    run = RunDir(tmp_path / "b")
    rng = random.Random(0)
    kills = 0
    for _attempt in range(2):
        proc = _start(run.path, corpus_file) if not run.exists() else None
        if proc is None:  # continue the existing run, and kill it again
            env = {**os.environ, "AIGC_NO_PROGRESS": "1"}
            proc = subprocess.Popen(
                [sys.executable, "-m", "aigc", "train", str(run.path)], cwd=ROOT, env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
        step = _kill_after_a_checkpoint(proc, run, rng)
        if proc.returncode == -signal.SIGKILL and step < STEPS:
            kills += 1
    assert kills >= 1, "the trainer finished before it could be killed; the test proved nothing"

    done = run_cli("train", str(run.path))
    assert done.returncode == 0, done.stderr

    a, b = RunDir(tmp_path / "a"), run
    ca, cb = a.latest_checkpoint(), b.latest_checkpoint()
    assert ca.name == cb.name == f"step-{STEPS:08d}"
    for fname in ("model", "optim", "ema"):
        ta = load_file(str(ca / f"{fname}.safetensors"))
        tb = load_file(str(cb / f"{fname}.safetensors"))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and bool((ta[k] == tb[k]).all()), (
                f"{fname}:{k} differs"
            )

    rows_a = [r for r in a.read_metrics() if "loss" in r]
    rows_b = [r for r in b.read_metrics() if "loss" in r]
    assert [r["step"] for r in rows_b] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows_b] == [r["loss"] for r in rows_a]
    evals = [r["step"] for r in b.read_metrics() if "val_loss" in r]
    assert evals == sorted(set(evals)) == [40, 80, 120, 150]


def test_sigterm_saves_the_last_step_and_exits_130(tmp_path, corpus_file):
    """A background job has SIGINT ignored; SIGTERM (a scheduler's preemption, `kill`)
    stops it as Ctrl-C does: the last completed step is saved, exit code 130, and the run
    continues from there."""
    run = RunDir(tmp_path / "r")
    overrides = [*TINY, "train.max_steps=100000", "train.checkpoint_every=0",
                 "train.eval_every=0", "train.log_every=1", f"data.path={corpus_file}"]  # fmt: skip
    env = {**os.environ, "AIGC_NO_PROGRESS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "aigc", "train", RECIPE, *overrides, "--run-dir", str(run.path)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while (
        time.time() < deadline and len(run.read_metrics() if run.metrics_path.exists() else []) < 5
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "Traceback" not in err
    step = max(r["step"] for r in run.read_metrics() if "loss" in r)
    latest = run.latest_checkpoint()
    assert latest is not None and latest.name == f"step-{step:08d}"
    done = run_cli("train", str(run.path), "train.max_steps=" + str(step + 3))
    assert done.returncode == 0, done.stderr
    assert run.latest_checkpoint().name == f"step-{step + 3:08d}"


def test_a_signal_during_a_step_saves_that_step_with_its_weights_and_its_row(
    tmp_path, corpus_file, monkeypatch
):
    """SIGTERM that arrives while a step is being taken (here: sent by the step itself,
    after its update) waits for the step to finish and be logged: the checkpoint is named
    after the step whose weights it holds, and metrics.jsonl has that step's row. Caught
    at once, it left the weights of step k under the name of step k - 1."""
    import aigc
    from aigc.errors import TrainingInterrupted
    from aigc.trainer import Trainer

    real_step = Trainer.train_step
    taken: list[dict[str, torch.Tensor]] = []

    def step_then_sigterm(self):
        out = real_step(self)
        taken.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        if len(taken) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "train_step", step_then_sigterm)
    run = RunDir(tmp_path / "r")
    with pytest.raises(TrainingInterrupted) as stopped:
        aigc.train(RECIPE, [*TINY, "train.max_steps=10", "train.log_every=1",
                            "train.checkpoint_every=0", "train.eval_every=0",
                            f"data.path={corpus_file}"], run_dir=run.path, progress=False)  # fmt: skip
    assert stopped.value.step == 3
    assert max(r["step"] for r in run.read_metrics() if "loss" in r) == 3
    latest = run.latest_checkpoint()
    assert latest is not None and latest.name == "step-00000003"
    saved = load_file(str(latest / "model.safetensors"))  # tied weights are stored once
    assert len(saved) > 4 and all(torch.equal(v, taken[-1][k]) for k, v in saved.items())
    assert not all(torch.equal(v, taken[-2][k]) for k, v in saved.items())
