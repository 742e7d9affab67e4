"""What the CLI tells a user: hints that can be typed as printed, escapes in --stop,
suggestions across kinds of run, and no file read differently from what it holds
without a word."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aigc.cli import unescape

from .conftest import RECIPE, ROOT, TINY, run_cli


@pytest.fixture(scope="module")
def spaced_run(tmp_path_factory, corpus_file) -> tuple[Path, str]:
    """A tiny GPT trained by the CLI into a folder whose name holds a space."""
    run = tmp_path_factory.mktemp("hints") / "my runs" / "tiny"
    r = run_cli("train", RECIPE, *TINY, f"data.path={corpus_file}", "train.max_steps=20",
                "train.eval_every=0", "--run-dir", str(run))  # fmt: skip
    assert r.returncode == 0, r.stderr
    return run, r.stdout


def test_next_hints_quote_paths_so_they_run_as_printed(spaced_run):
    run, stdout = spaced_run
    hint = next(line for line in stdout.splitlines() if "aigc sample" in line)
    command = hint[hint.index("aigc sample") :]
    words = shlex.split(command)  # as a shell would split the line pasted into it
    assert words[:3] == ["aigc", "sample", str(run)], command
    r = run_cli(*words[1:], "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr


def test_stop_accepts_escapes_typed_in_a_shell(spaced_run):
    assert unescape(r"\n\n") == "\n\n" and unescape(r"a\tb\u00e9\\n") == "a\tbé\\n"
    assert unescape(r"C:\path") == r"C:\path"  # other backslashes stay as typed
    run, _ = spaced_run
    # what bash passes for --stop "\n": a backslash and an n, not a newline
    args = ("sample", str(run), "--prompt", "The", "--max-new-tokens", "200", "--seed", "0")
    full = run_cli(*args)
    stopped = run_cli(*args, "--stop", "\\n")
    assert full.returncode == 0 and stopped.returncode == 0, stopped.stderr
    generated = full.stdout.rstrip("\n")
    assert "\n" in generated[3:], "the tiny model should write a newline in 200 characters"
    assert stopped.stdout.rstrip("\n") == generated[: generated.index("\n", 3)]


def test_image_recipe_suggests_data_source_for_data_path(tmp_path):
    r = run_cli("train", str(ROOT / "configs" / "dcgan-digits.yaml"), "data.path=imgs/",
                "--run-dir", str(tmp_path / "run"))  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "did you mean data.source?" in r.stderr, r.stderr
    r = run_cli("train", RECIPE, "data.source=docs/", "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and "did you mean data.path?" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_a_bad_image_hint_names_the_override_that_works(tmp_path):
    folder = tmp_path / "imgs"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(12):
            arr = np.full((16, 16), 20 * i if c == "a" else 255 - 10 * i, np.uint8)
            Image.fromarray(arr).save(folder / c / f"{i}.png")
    (folder / "a" / "broken.png").write_bytes(b"not a png")
    base = ["train", str(ROOT / "configs" / "dcgan-digits.yaml"), f"data.source={folder}",
            "model.z_dim=8", "model.g_width=8", "model.d_width=8", "train.batch_size=8",
            "train.max_steps=1", "train.sample_every=0", "train.eval_every=0"]  # fmt: skip
    r = run_cli(*base, "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and "broken.png" in r.stderr, r.stderr
    assert "data.skip_bad=true" in r.stderr and "skip_bad=True" not in r.stderr
    override = r.stderr[r.stderr.index("data.skip_bad=true") :].split()[0].rstrip(").,;")
    r = run_cli(*base, override, "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr


def test_json_lines_saved_as_dot_json_are_read_as_such_with_a_notice(tmp_path):
    rows = [{"text": f"line {i} of a JSON Lines corpus saved as .json. " * 4} for i in range(60)]
    jsonl = tmp_path / "corpus.json"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    r = run_cli("train", RECIPE, *TINY, f"data.path={jsonl}", "train.max_steps=2",
                "train.eval_every=0", "--run-dir", str(tmp_path / "run"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "reading it as JSON Lines" in r.stderr and "data.format=text" in r.stderr
    # the texts, not the JSON syntax around them, were trained on
    vocab = json.loads((tmp_path / "run" / "tokenizer.json").read_text())
    assert "{" not in json.dumps(vocab.get("chars", vocab))[1:-1]

    document = tmp_path / "one.json"
    texts = [f"text number {i} inside one JSON document" for i in range(100)]
    document.write_text(json.dumps({"texts": texts}, indent=2), encoding="utf-8")
    r = run_cli("train", RECIPE, *TINY, f"data.path={document}", "--run-dir",
                str(tmp_path / "run2"))  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "one JSON document" in r.stderr and "data.format=text" in r.stderr
    r = run_cli("train", RECIPE, *TINY, f"data.path={document}", "data.format=text",
                "train.max_steps=1", "train.eval_every=0", "--run-dir", str(tmp_path / "run3"))  # fmt: skip
    assert r.returncode == 0, r.stderr  # asked for: its raw characters, braces and all
    assert "{" in json.loads((tmp_path / "run3" / "tokenizer.json").read_text())["chars"]
