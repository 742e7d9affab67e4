"""`aigc train` under torchrun: 2 CPU processes with batch 8 give the losses of 1 with batch 16."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from aigc.runs import RunDir
from tests.conftest import RECIPE, ROOT, TINY, run_cli

pytestmark = pytest.mark.slow

COMMON = [
    *TINY,
    "train.max_steps=20",
    "train.log_every=1",
    "train.eval_every=10",
    "train.checkpoint_every=10",
]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, corpus_file):
    one = run_cli("train", RECIPE, *COMMON, "train.batch_size=16", f"data.path={corpus_file}",
                  "--run-dir", str(tmp_path / "one"))  # fmt: skip
    assert one.returncode == 0, one.stderr

    env = {**os.environ, "AIGC_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "aigc", "train", RECIPE, *COMMON, "train.batch_size=8", f"data.path={corpus_file}",
         "--run-dir", str(tmp_path / "two")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]

    a = [r for r in RunDir(tmp_path / "one").read_metrics() if "loss" in r]
    b = [r for r in RunDir(tmp_path / "two").read_metrics() if "loss" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 21))
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4), ra["step"]
    va = [r["val_loss"] for r in RunDir(tmp_path / "one").read_metrics() if "val_loss" in r]
    vb = [r["val_loss"] for r in RunDir(tmp_path / "two").read_metrics() if "val_loss" in r]
    assert vb == pytest.approx(va, rel=1e-4)
    # Only rank 0 writes: one metrics line per step, one set of checkpoints.
    assert RunDir(tmp_path / "two").checkpoint_names() == ["step-00000010", "step-00000020"]
