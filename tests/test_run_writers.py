"""One writer per run folder, and what a writer leaves when it is refused, interrupted,
or cannot write: real processes, real signals, faults injected at the OS boundary."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import aigc

from .conftest import RECIPE, ROOT, TINY, run_cli

ENV = {**os.environ, "AIGC_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models run fastest on one thread (see conftest.one_torch_thread)."""


def _train_cmd(corpus: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "aigc", "train", RECIPE, *TINY, f"data.path={corpus}",
            "train.eval_every=0", "train.sample_every=0", *extra, "--run-dir", str(run)]  # fmt: skip


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)  # fmt: skip


def _wait_for(predicate, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def _tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` with the sha256 of its bytes."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_two_trainings_started_together_one_writes_the_other_is_refused(corpus_file, tmp_path):
    run = tmp_path / "run"
    # long enough that the second surely meets the first still training
    common = ["train.max_steps=100000", "train.max_time=5", "train.checkpoint_every=50"]
    procs = [_start(_train_cmd(corpus_file, run, *common, f"train.seed={seed}")) for seed in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], (codes, [o[1][-2000:] for o in outs])
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    err = outs[loser][1].strip()
    assert err.startswith(f"error: {run} is being written by another process (pid "), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"pid {procs[winner].pid} " in err  # the holder, by its process id
    # only the winner's config and metrics are in the folder
    assert f"seed: {winner + 1}\n" in (run / "config.yaml").read_text()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)), "two writers interleaved their logs"


def test_a_killed_writer_leaves_no_stale_lock_and_readers_work_while_it_trains(
    corpus_file, tmp_path
):
    run = tmp_path / "run"
    proc = _start(_train_cmd(corpus_file, run, "train.max_steps=100000", "train.max_time=0",
                             "train.checkpoint_every=5"))  # fmt: skip
    try:
        _wait_for(lambda: (run / "checkpoints" / "latest").is_file() or proc.poll() is not None)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        # a reader while it trains: load and sample
        gen = aigc.load(run)
        assert isinstance(gen.generate("The", max_new_tokens=4, seed=0), str)
        # a second writer (continuing the run) is refused and touches nothing
        r = run_cli("train", str(run), "train.max_steps=3")
        assert r.returncode == 2 and "is being written by another process" in r.stderr
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # the kernel dropped the lock with the process: continuing works at once
    step = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))
    r = run_cli("train", str(run), f"train.max_steps={step + 5}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "checkpoints" / f"step-{step + 5:08d}").is_dir()


def test_a_refused_continuation_changes_nothing_on_disk(corpus_file, tmp_path):
    run = tmp_path / "run"
    aigc.train(RECIPE, [*TINY, f"data.path={corpus_file}", "train.max_steps=4",
                        "train.eval_every=0"], run_dir=run, progress=False)  # fmt: skip
    before = _tree(run)  # the lock file included: empty when nobody holds it
    assert (run / ".lock").read_bytes() == b""
    for overrides in (["train.max_steps=2"], ["train.max_steps=4"], []):
        out = aigc.train(None, overrides, run_dir=run, progress=False)
        assert out.step == 4 and out.resumed_from == 4
        assert _tree(run) == before, overrides
    r = run_cli("train", str(run), "train.max_steps=2")
    assert r.returncode == 0 and "already trained to step 4" in r.stdout, r.stderr
    assert _tree(run) == before


def test_weight_files_get_the_modes_of_ordinary_files(corpus_file, tmp_path):
    old = os.umask(0o022)
    try:
        aigc.train(RECIPE, [*TINY, f"data.path={corpus_file}", "train.max_steps=2",
                            "train.eval_every=0"], run_dir=tmp_path / "run", progress=False)  # fmt: skip
    finally:
        os.umask(old)
    files = list((tmp_path / "run" / "checkpoints").rglob("*.safetensors"))
    assert files
    for p in [*files, tmp_path / "run" / "config.yaml"]:
        assert p.stat().st_mode & 0o777 == 0o644, (p, oct(p.stat().st_mode))


# Runs the CLI with a fault injected where the OS would report it: a full disk for the
# weights (safetensors writes from Rust, so its entry point stands in), or a read-only
# run folder for files Python opens for writing.
_FAULTY = """
import builtins, errno, sys
import aigc.runs
mode, target = sys.argv[1], sys.argv[2]
if mode == "full":
    def save_file(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", filename)
    aigc.runs.save_file = save_file
else:
    real_open = builtins.open
    def read_only(file, mode="r", *args, **kwargs):
        if str(file).startswith(target) and any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, mode, *args, **kwargs)
    builtins.open = read_only
sys.argv = ["aigc", *sys.argv[3:]]
from aigc.cli import main
main()
"""


def _faulty(mode: str, target: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _FAULTY, mode, str(target), *args], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip


def test_a_full_disk_is_one_line_exit_2_and_leaves_no_temporaries(corpus_file, tmp_path):
    run = tmp_path / "run"
    r = _faulty("full", run, "train", RECIPE, *TINY, f"data.path={corpus_file}",
                "train.max_steps=2", "train.eval_every=0", "--run-dir", str(run))  # fmt: skip
    assert r.returncode == 2, r.stderr[-3000:]
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {run / 'checkpoints'}: cannot save the checkpoint of step 2 ")
    assert "No space left on device" in err and "free some space" in err
    assert not list(run.rglob(".tmp-*")) and not list(tmp_path.glob(".*preparing*"))


def test_eval_on_a_read_only_run_prints_its_result_then_one_line(corpus_file, tmp_path):
    run = tmp_path / "run"
    aigc.train(RECIPE, [*TINY, f"data.path={corpus_file}", "train.max_steps=2",
                        "train.eval_every=0"], run_dir=run, progress=False)  # fmt: skip
    before = _tree(run)
    r = _faulty("read-only", run, "eval", str(run))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "held-out" in r.stdout and "loss" in r.stdout  # the numbers, printed first
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert str(run / "eval.json") in err and "Read-only file system" in err
    assert _tree(run) == before  # and no temporary left behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_eval_on_a_folder_without_write_permission(corpus_file, tmp_path):
    run = tmp_path / "run"
    aigc.train(RECIPE, [*TINY, f"data.path={corpus_file}", "train.max_steps=2",
                        "train.eval_every=0"], run_dir=run, progress=False)  # fmt: skip
    for p in [run, *run.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        r = run_cli("eval", str(run))
    finally:
        for p in [run, *run.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
    assert r.returncode == 2 and "held-out" in r.stdout and "Traceback" not in r.stderr


def test_ctrl_c_saves_and_says_where_and_how_to_continue(corpus_file, tmp_path):
    run = tmp_path / "my runs" / "run"  # a space: the command shown must be quoted
    proc = _start(_train_cmd(corpus_file, run, "train.max_steps=100000", "train.max_time=0",
                             "train.checkpoint_every=5"))  # fmt: skip
    try:
        _wait_for(lambda: (run / "checkpoints" / "latest").is_file() or proc.poll() is not None)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    step = int(latest.removeprefix("step-"))
    assert f"interrupted at step {step:,}; saved {run / 'checkpoints' / latest}" in err, err
    assert f"continue with: aigc train '{run}'" in err, err
    assert "Traceback" not in err


def test_a_mistaken_override_is_named_even_while_the_run_is_busy(corpus_file, tmp_path):
    """The override is checked before the writer lock: a typo gets its own message, not
    "being written by another process", whoever holds the run."""
    from aigc.runs import run_lock

    run = tmp_path / "run"
    aigc.train(RECIPE, [*TINY, f"data.path={corpus_file}", "train.max_steps=2",
                        "train.eval_every=0"], run_dir=run, progress=False)  # fmt: skip
    with run_lock(run):
        r = run_cli("train", str(run), "train.max_step=5")
        assert r.returncode == 2 and "did you mean train.max_steps?" in r.stderr, r.stderr
        r = run_cli("train", str(run), "train.max_steps=5")
        assert r.returncode == 2 and "being written by another process" in r.stderr, r.stderr


def test_ctrl_c_during_a_save_waits_for_it():
    """SIGINT inside interrupts_deferred is held until the block ends, then raised."""
    from aigc.trainer import interrupts_deferred

    done = []
    with pytest.raises(KeyboardInterrupt), interrupts_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        done.append("the save finished")
    assert done == ["the save finished"]
