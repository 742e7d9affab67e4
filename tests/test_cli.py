"""The `aigc` command line as a user meets it: real subprocesses, real files.

A tiny model is trained once per module and copied for the tests that damage it.
Every user mistake must end with exit code 2, one or two lines on stderr that
start with ``error:`` and name what and where, no traceback, and nothing that
was already saved changed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from PIL import Image

from aigc.runs import RunDir
from tests.conftest import RECIPE, ROOT, TINY, run_cli

STEPS = 30
# checkpoint_every=10 with the default keep_checkpoints=2 leaves two checkpoints
# (steps 20 and 30), so tests can see that an older one is left alone.
TRAIN = [*TINY, f"train.max_steps={STEPS}", "train.checkpoint_every=10"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, one or two stderr lines starting with 'error:', naming every needle."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = proc.stderr.strip("\n").split("\n")
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), proc.stderr
    assert "\r" not in proc.stderr, f"progress bar noise around the error: {proc.stderr!r}"
    assert proc.stdout == "", f"output before the error: {proc.stdout!r}"
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


def run_cli_all(*calls: list[str]) -> list[subprocess.CompletedProcess]:
    """Runs independent CLI calls side by side (each is mostly Python start-up)."""
    with ThreadPoolExecutor(max_workers=min(len(calls), os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda args: run_cli(*args), calls))


def train_new(run_dir: Path, data_path: Path | str, *extra: str) -> subprocess.CompletedProcess:
    return run_cli(
        "train", RECIPE, *TRAIN, f"data.path={data_path}", *extra, "--run-dir", str(run_dir)
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_file) -> tuple[Path, subprocess.CompletedProcess]:
    """A tiny run trained for STEPS steps through the CLI, and the finished process."""
    run_dir = tmp_path_factory.mktemp("cli") / "tiny"
    proc = train_new(run_dir, corpus_file)
    assert proc.returncode == 0, proc.stderr
    return run_dir, proc


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    """A private copy of the trained run, free to damage."""
    return Path(shutil.copytree(trained[0], tmp_path / "run"))


def sample_texts(run: Path, *calls: list[str]) -> list[str]:
    """stdout of `aigc sample RUN ARGS` for each list of ARGS."""
    texts = []
    for proc in run_cli_all(*(["sample", str(run), *args] for args in calls)):
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.endswith("\n")
        texts.append(proc.stdout[:-1])  # the CLI ends the streamed text with one newline
    return texts


# ---------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_train_writes_a_complete_run_folder(trained, corpus_file):
    run_dir, proc = trained
    assert f"done: step {STEPS}" in proc.stdout and "validation loss" in proc.stdout
    assert "Traceback" not in proc.stderr

    assert json.loads((run_dir / "run.json").read_text())["family"] == "gpt"
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    tokenizer = json.loads((run_dir / "tokenizer.json").read_text())
    assert cfg["model"]["vocab_size"] == len(tokenizer["chars"]) > 0  # resolved from the data
    assert cfg["data"]["path"] == str(corpus_file.resolve())
    assert Path(cfg["data"]["path"]).is_absolute()
    assert cfg["train"]["max_steps"] == STEPS

    rows = RunDir(run_dir).read_metrics()
    assert [r["step"] for r in rows if "loss" in r] == [10, 20, 30]
    assert [r["step"] for r in rows if "val_loss" in r] == [STEPS]
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tb").iterdir())
    texts = list((run_dir / "samples").glob("*.txt"))
    assert texts and texts[0].read_text().startswith("=== prompt")

    ckpts = run_dir / "checkpoints"
    latest = ckpts / (ckpts / "latest").read_text().strip()
    assert latest.name == f"step-{STEPS:08d}"
    for name in ("model.safetensors", "optim.safetensors", "state.json"):
        assert (latest / name).stat().st_size > 0
    assert RunDir(run_dir).checkpoint_names() == ["step-00000020", "step-00000030"]


@pytest.mark.slow
def test_sample_is_seeded_and_honours_its_options(trained):
    import aigc

    run_dir = trained[0]
    args = ["--prompt", "The ", "--max-new-tokens", "40"]
    a, again, other, greedy = sample_texts(
        run_dir,
        [*args, "--seed", "3"],
        [*args, "--seed", "3"],
        [*args, "--seed", "4"],
        [*args, "--temperature", "0"],
    )
    assert a == again
    assert a.startswith("The ")
    completion = a[len("The ") :]
    assert len(completion) == 40  # one character per token
    assert other != a

    # The CLI is a face over the API: the same request gives the same text.
    gen = aigc.load(run_dir, device="cpu")
    assert completion == gen.generate("The ", max_new_tokens=40, temperature=0.8, seed=3)
    assert greedy == "The " + gen.generate("The ", max_new_tokens=40, temperature=0)

    # --stop cuts before the first occurrence of the stop text (same seed, same draws).
    at = next(i for i in range(5, 40) if completion.find(completion[i]) == i)
    (stopped,) = sample_texts(run_dir, [*args, "--seed", "3", f"--stop={completion[at]}"])
    assert stopped == "The " + completion[:at]


@pytest.mark.slow
def test_eval_matches_the_last_validation_during_training(trained):
    run_dir = trained[0]
    proc = run_cli("eval", str(run_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert json.loads((run_dir / "eval.json").read_text()) == result
    assert result["step"] == STEPS
    val_loss = [r["val_loss"] for r in RunDir(run_dir).read_metrics() if "val_loss" in r][-1]
    assert abs(result["loss"] - val_loss) < 1e-5  # same weights, same split
    assert math.isclose(result["ppl"], math.exp(result["loss"]), rel_tol=1e-9)
    assert 0 < result["bpc"] < 8


@pytest.mark.slow
def test_training_again_is_a_no_op_and_raising_max_steps_continues(run_copy, corpus_file):
    ckpts = run_copy / "checkpoints"
    before = snapshot(ckpts)
    metrics = (run_copy / "metrics.jsonl").read_bytes()

    again = train_new(run_copy, corpus_file)
    assert again.returncode == 0, again.stderr
    assert f"already trained to step {STEPS}" in again.stdout
    assert snapshot(ckpts) == before
    assert (run_copy / "metrics.jsonl").read_bytes() == metrics

    more = run_cli("train", str(run_copy), "train.max_steps=40")
    assert more.returncode == 0, more.stderr
    assert "done: step 40" in more.stdout
    run = RunDir(run_copy)
    assert run.latest_checkpoint().name == "step-00000040"
    assert run.checkpoint_names() == ["step-00000030", "step-00000040"]
    rows = run.read_metrics()
    assert [r["step"] for r in rows if "loss" in r] == [10, 20, 30, 40]
    assert [r["step"] for r in rows if "val_loss" in r] == [STEPS, 40]
    old = "step-00000030/model.safetensors"
    assert (ckpts / old).read_bytes() == before[old]


def test_help_for_the_app_and_every_verb():
    expected = {  # an option only that verb's help shows
        "quickstart": "--minutes",
        "train": "--run-dir",
        "sample": "--max-new-tokens",
        "eval": "--json",
    }
    app, *verbs = run_cli_all(["--help"], *([verb, "--help"] for verb in expected))
    assert app.returncode == 0, app.stderr
    assert all(verb in app.stdout for verb in expected)
    for proc, option in zip(verbs, expected.values(), strict=True):
        assert proc.returncode == 0, proc.stderr
        assert "Usage" in proc.stdout and option in proc.stdout


def test_console_script_help():
    script = Path(sys.executable).parent / "aigc"
    if not script.is_file():
        pytest.skip("the aigc console script is not installed next to this Python")
    proc = subprocess.run(
        [str(script), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout and all(v in proc.stdout for v in ("train", "sample", "eval"))


@pytest.mark.slow
def test_quickstart(tmp_path):
    run_dir = tmp_path / "qs"
    proc = run_cli(
        "quickstart", "--minutes", "0.1", "--image-minutes", "0.1", "--run-dir", str(run_dir),
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # part 2: a DCGAN on digits, its grid saved and its path printed
    grid = Path(f"{run_dir}-dcgan") / "samples" / "quickstart.png"
    assert f"64 generated digits: {grid}" in out
    with Image.open(grid) as im:
        assert im.size == (8 * 34 + 2, 8 * 34 + 2)
    assert "validation loss" in out and "nats/char" in out
    assert "--- sample (prompt 'The for statement') ---\nThe for statement" in out
    assert f"The run folder is {run_dir}/" in out
    assert "Try next:" in out and f"aigc sample {run_dir}" in out
    assert "aigc train music-chorales" in out and "aigc train denoise-speech" in out  # audio
    assert "aigc train spoken-digits" in out and "aigc train tts-digits" in out
    assert RunDir(run_dir).latest_checkpoint() is not None
    assert not (tmp_path / "runs").exists()  # --run-dir was honoured


# ---------------------------------------------------------------------------
# Mistakes in configs and data: nothing is created


def test_config_key_typo_names_the_key_and_the_fix(tmp_path, corpus_file):
    proc = train_new(tmp_path / "run", corpus_file, "train.max_step=5")
    assert_user_error(proc, "'train.max_step'", "did you mean train.max_steps?")
    assert list(tmp_path.iterdir()) == []


def test_config_wrong_type_names_key_value_and_type(tmp_path, corpus_file):
    proc = train_new(tmp_path / "run", corpus_file, "train.max_steps=abc")
    assert_user_error(proc, "train.max_steps", "'abc'", "int")
    assert list(tmp_path.iterdir()) == []


def test_missing_data_file_leaves_no_run_folder(tmp_path):
    proc = train_new(tmp_path / "run", "/nonexistent/x.txt")
    assert_user_error(proc, "/nonexistent/x.txt", "data.path")
    assert list(tmp_path.iterdir()) == []  # neither the run nor a half-prepared folder


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_empty_corpus(tmp_path, kind):
    data = tmp_path / "data"
    if kind == "file":
        data.write_text("", encoding="utf-8")
    else:
        data.mkdir()
    proc = train_new(tmp_path / "run", data)
    assert_user_error(proc, str(data))
    assert "empty" in proc.stderr or "no files" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_corpus_shorter_than_a_block(tmp_path):
    data = tmp_path / "short.txt"
    data.write_text("twenty characters ok", encoding="utf-8")
    proc = train_new(tmp_path / "run", data)  # TINY has model.block_size=32
    assert_user_error(proc, "too short", "model.block_size=32", str(data))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]


def test_invalid_utf8_names_file_and_offset(tmp_path):
    data = tmp_path / "bad.txt"
    head = b"Some perfectly fine text. " * 8
    data.write_bytes(head + b"\xff\xfe" + b" and more good text after it." * 8)
    proc = train_new(tmp_path / "run", data)
    assert_user_error(proc, str(data), f"byte {len(head)}", "data.encoding_errors=replace")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt"]


@pytest.mark.slow
def test_invalid_utf8_is_replaced_on_request(tmp_path):
    # One line without a line break: the char vocabulary has no "\n", so the samples
    # written at the end of training must not use an empty prompt (that needs one).
    data = tmp_path / "bad.txt"
    data.write_bytes(b"Some perfectly fine text. " * 8 + b"\xff" + b" and more after it." * 8)
    proc = train_new(tmp_path / "run", data, "data.encoding_errors=replace", "train.max_steps=1")
    assert proc.returncode == 0, proc.stderr
    run = RunDir(tmp_path / "run")
    assert json.loads((run.data_dir / "corpus.json").read_text())["n_replaced"] == 1
    assert "\ufffd" in json.loads(run.tokenizer_path.read_text())["chars"]
    assert run.latest_checkpoint().name == "step-00000001"
    assert list(run.samples_dir.glob("*.txt"))


# ---------------------------------------------------------------------------
# Mistakes about run folders: what is saved stays as it was


def test_missing_run_folder(tmp_path):
    for proc in run_cli_all(["sample", str(tmp_path / "nope")], ["eval", str(tmp_path / "nope")]):
        assert_user_error(proc, str(tmp_path / "nope"))
    assert list(tmp_path.iterdir()) == []


def test_train_refuses_a_folder_that_is_not_a_run(tmp_path, corpus_file):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious", encoding="utf-8")
    proc = train_new(folder, corpus_file)
    assert_user_error(proc, str(folder), "--run-dir")
    assert snapshot(folder) == {"notes.txt": b"precious"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@pytest.mark.slow
def test_bad_override_on_an_existing_run_changes_nothing(run_copy):
    before = snapshot(run_copy)
    typo, wrong_type = run_cli_all(
        ["train", str(run_copy), "train.max_step=50"],
        ["train", str(run_copy), "train.max_steps=abc"],
    )
    assert_user_error(typo, "'train.max_step'", "did you mean train.max_steps?")
    assert_user_error(wrong_type, "train.max_steps", "'abc'")
    assert snapshot(run_copy) == before


@pytest.mark.slow
def test_run_of_another_family(run_copy, corpus_file):
    info = json.loads((run_copy / "run.json").read_text())
    (run_copy / "run.json").write_text(json.dumps({**info, "family": "vae"}))
    before = snapshot(run_copy)
    recipe_into_it = ["train", RECIPE, *TRAIN, f"data.path={corpus_file}", "--run-dir"]
    for proc in run_cli_all(
        ["train", str(run_copy)],
        [*recipe_into_it, str(run_copy)],
        ["sample", str(run_copy), "--max-new-tokens", "5"],
        ["eval", str(run_copy)],
    ):
        assert_user_error(proc, str(run_copy), "'vae'")
    assert snapshot(run_copy) == before


@pytest.mark.slow
def test_truncated_checkpoint(run_copy):
    weights = RunDir(run_copy).latest_checkpoint() / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = snapshot(run_copy)
    for proc in run_cli_all(*([verb, str(run_copy)] for verb in ("sample", "eval", "train"))):
        assert_user_error(proc, str(weights), "truncated")
    assert snapshot(run_copy) == before  # the damaged file and the older checkpoint too
    assert "checkpoints/step-00000020/model.safetensors" in before


@pytest.mark.slow
def test_bad_sampling_requests_name_the_parameter(trained):
    bad = {  # option -> what the message must name
        "--temperature=-1": "temperature=-1.0",
        "--top-p=1.5": "top_p=1.5",
        "--max-new-tokens=-3": "max_new_tokens=-3",
    }
    procs = run_cli_all(
        *(["sample", str(trained[0]), "--prompt", "The", option] for option in bad),
        ["sample", str(trained[0]), "--prompt", "price in €"],  # not in the char vocabulary
    )
    for proc, named in zip(procs, [*bad.values(), "'€' at position 9"], strict=True):
        assert_user_error(proc, named)


def test_usage_errors_exit_2_without_traceback():
    # Regression: a usage error (unknown verb, missing argument) printed a traceback,
    # because Typer's bundled click is not the `click` package.
    for args in (["nosuchverb"], ["train"], ["sample"]):
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert "Usage" in proc.stderr
