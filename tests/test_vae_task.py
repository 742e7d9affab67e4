"""VAE runs end to end on the shared image task: honest held-out likelihoods, samples."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

import aigc
from aigc.api import ImageGenerator
from aigc.runs import RunDir

from .conftest import ROOT

TINY = [
    "model.z_dim=4",
    "model.width=8",
    "train.batch_size=16",
    "train.max_steps=4",
    "train.checkpoint_every=2",
    "train.sample_every=2",
    "train.log_every=1",
    "data.eval_samples=50",
]


def test_vae_run_reports_likelihoods_and_writes_samples(tmp_path):
    out = aigc.train(ROOT / "configs" / "vae-conv-digits.yaml", TINY, run_dir=tmp_path / "run",
                     progress=False)  # fmt: skip
    run = RunDir(out.run_dir)
    rows = run.read_metrics()
    assert [r["step"] for r in rows if "elbo" in r] == [1, 2, 3, 4]
    final = rows[-1]
    n_val = json.loads((run.data_dir / "meta.json").read_text())["n_val"]
    assert n_val == 180
    # bits per dimension follow from nats per image over 32*32 pixels
    assert abs(final["val_bpd"] * 1024 * np.log(2) - final["val_nelbo"]) < 1e-9 * final["val_nelbo"]
    assert final["val_iwae_nll"] <= final["val_nelbo"] + 1.0  # the bound is at least as tight
    assert 0 <= final["val_active_units"] <= 4
    assert sorted(p.name for p in run.samples_dir.glob("step-00000004-*.png")) == [
        "step-00000004-grid.png",
        "step-00000004-reconstructions.png",
    ]
    gen = aigc.load(out.run_dir)
    assert isinstance(gen, ImageGenerator)
    x = gen.generate(6, seed=0)
    assert x.shape == (6, 1, 32, 32) and torch.equal(x, gen.generate(6, seed=0))
    again = aigc.load(out.run_dir).evaluate(n=50)
    assert again["nelbo"] == final["val_nelbo"]  # the held-out numbers are seeded


def test_reconstruct_and_traverse_from_python_and_cli(tmp_path):
    from .conftest import run_cli

    out = aigc.train(ROOT / "configs" / "vae-conv-digits.yaml", TINY, run_dir=tmp_path / "run",
                     progress=False)  # fmt: skip
    gen = aigc.load(out.run_dir)
    pairs = gen.reconstruct(n=12)
    assert pairs.shape == (24, 1, 32, 32)  # rows of 8: originals, then reconstructions
    digits = gen.reconstruct("digits", n=8)
    assert digits.shape == (16, 1, 32, 32)
    grid = gen.traverse(steps=5, seed=0)
    assert grid.shape == (4 * 5, 1, 32, 32)  # z_dim rows of 5
    assert torch.equal(grid, gen.traverse(steps=5, seed=0))
    png = tmp_path / "rec.png"
    r = run_cli("sample", str(out.run_dir), "--reconstruct", "held-out", "--n", "16",
                "--out", str(png))  # fmt: skip
    assert r.returncode == 0, r.stderr
    with Image.open(png) as im:
        assert im.size == (8 * 34 + 2, 4 * 34 + 2)
    r = run_cli("sample", str(out.run_dir), "--traverse", "--out", str(tmp_path / "t.png"))
    assert r.returncode == 0 and (tmp_path / "t.png").is_file(), r.stderr


def test_reconstruct_is_for_vae_runs_only(tmp_path):
    from .conftest import run_cli

    gan = aigc.train(ROOT / "configs" / "dcgan-digits.yaml",
                     ["model.g_width=8", "model.d_width=8", "train.batch_size=8",
                      "train.max_steps=1", "data.eval_samples=20"],
                     run_dir=tmp_path / "gan", progress=False)  # fmt: skip
    r = run_cli("sample", str(gan.run_dir), "--reconstruct", "held-out")
    assert r.returncode == 2 and "only VAEs" in r.stderr and "Traceback" not in r.stderr
