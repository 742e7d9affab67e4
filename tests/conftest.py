from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "configs" / "gpt-pydoc-char.yaml")

# Small enough to train for real in a second or two on two CPU cores.
TINY = [
    "model.block_size=32",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "train.batch_size=8",
    "train.warmup_steps=5",
    "train.max_time=0",
    "data.eval_samples=4",  # generated texts judged per evaluation
    "data.eval_sample_tokens=48",
]


@pytest.fixture(scope="session", autouse=True)
def _aigc_cache(tmp_path_factory):
    """Domain classifiers are cached in a folder of the test session, never in ~/.cache."""
    os.environ["AIGC_CACHE_DIR"] = str(tmp_path_factory.mktemp("aigc-cache"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: tiny models run fastest so, and a busy machine
    cannot stall them. Request it from a module-scoped autouse fixture."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """~40,000 characters of real English text (from the embedded Python docs)."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))[:40_000]
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text(text, encoding="utf-8")
    return path


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 300, input_text: str | None = None
) -> subprocess.CompletedProcess:
    """Runs `python -m aigc ARGS` in a subprocess, as a user would (``input_text`` is
    its standard input; none by default)."""
    env = {**os.environ, "AIGC_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "aigc", *args],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input_text,
        stdin=None if input_text is not None else subprocess.DEVNULL,
    )


@pytest.fixture(scope="session")
def pretrained_tiny_gpt(tmp_path_factory, corpus_file) -> Path:
    """A tiny GPT trained 20 steps on real text: a base to fine-tune from (read only)."""
    import aigc

    run = tmp_path_factory.mktemp("tiny-base") / "run"
    aigc.train(RECIPE, [*TINY, f"data.path={corpus_file}", "train.max_steps=20",
                        "train.eval_every=0"], run_dir=run, progress=False)  # fmt: skip
    return run


@pytest.fixture(scope="session")
def serve_runs(tmp_path_factory, corpus_file) -> dict[str, Path]:
    """Tiny runs for the service's tests, trained once a session: gpt, chat (fine-tuned from
    it on a few conversations), cgan (conditional, digits) and vae (unconditional)."""
    import json
    import warnings

    import aigc

    root = tmp_path_factory.mktemp("serve-runs")
    aigc.train(RECIPE, [*TINY, f"data.path={corpus_file}", "train.max_steps=3",
                        "train.eval_every=0"], run_dir=root / "gpt", progress=False)  # fmt: skip
    chats = root / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"question {i} about lists?"},
                          {"role": "assistant", "content": "yes."}]} for i in range(8)]  # fmt: skip
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    aigc.finetune(root / "gpt", [f"data.path={chats}", "train.max_steps=2", "train.batch_size=4"],
                  task="chat", run_dir=root / "chat", progress=False)  # fmt: skip
    image = ["train.batch_size=16", "train.max_steps=2", "train.checkpoint_every=2",
             "train.sample_every=0", "train.eval_every=0", "data.eval_samples=10"]  # fmt: skip
    tiny = {
        "cgan": ("cgan-digits", ["model.z_dim=16", "model.g_width=8", "model.d_width=8"]),
        "vae": ("vae-mlp-digits", ["data.image_size=16", "model.hidden=[16]", "model.z_dim=4"]),
    }
    with warnings.catch_warnings():  # FID of 10 samples: a singular covariance
        warnings.simplefilter("ignore")
        for name, (recipe, model) in tiny.items():
            aigc.train(ROOT / "configs" / f"{recipe}.yaml", [*model, *image],
                       run_dir=root / name, progress=False)  # fmt: skip
    return {name: root / name for name in ("gpt", "chat", "cgan", "vae")}


def start_server(args: list[str], env: dict[str, str] | None = None) -> tuple[Any, str]:
    """`python -m aigc serve ARGS` in a subprocess, as a user starts it; returns the process
    and its base URL once /health answers (30 s at most). The caller stops the process."""
    import time

    import httpx

    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "aigc", "serve", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    url = next((line.split()[2] for line in proc.stdout if line.startswith("listening on ")), None)
    if url is None:
        proc.wait(30)
        raise AssertionError(f"the server did not start: {proc.stderr.read()}")
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the server did not answer /health in 30 s"
            time.sleep(0.05)


# A text-to-image diffusion run small enough to train in a few seconds (the domain
# classifier of its evaluation is skipped).
T2I_TINY = ["train.max_steps=2", "train.batch_size=8", "model.width=8", "model.text_width=16",
            "model.sample_steps=2", "data.n=200", "data.eval_samples=10",
            "train.sample_every=0", "train.checkpoint_every=0", "data.eval_metrics=[]",
            "train.eval_every=0"]  # fmt: skip


@pytest.fixture(scope="session")
def diffusion_runs(tmp_path_factory) -> dict[str, Path]:
    """Tiny diffusion runs for the service's tests, trained once a session: t2i
    (text-to-image, shapes) and ddpm (class-conditional, digits)."""
    import aigc

    root = tmp_path_factory.mktemp("diffusion-runs")
    aigc.train("t2i-shapes", T2I_TINY, run_dir=root / "t2i", progress=False)
    aigc.train("ddpm-digits-cond", ["train.max_steps=2", "train.batch_size=8", "model.width=8",
                               "model.sample_steps=3", "data.eval_samples=10",
                               "train.sample_every=0", "train.checkpoint_every=0",
                               "data.eval_metrics=[]", "train.eval_every=0"],
               run_dir=root / "ddpm", progress=False)  # fmt: skip
    return {"t2i": root / "t2i", "ddpm": root / "ddpm"}
