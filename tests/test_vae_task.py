"""VAE runs end to end on the shared image task: honest held-out likelihoods, samples."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import aigc
from aigc.api import ImageGenerator
from aigc.runs import RunDir
from aigc.tasks.images import open_data, to_model_batch

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
    # the IWAE bound is at least as tight as the ELBO (seeded: no slack beyond rounding)
    assert final["val_iwae_nll"] <= final["val_nelbo"] + 1e-9 * final["val_nelbo"]
    assert sorted(p.name for p in run.samples_dir.glob("step-00000004-*.png")) == [
        "step-00000004-grid.png",
        "step-00000004-reconstructions.png",
    ]
    gen = aigc.load(out.run_dir)
    assert isinstance(gen, ImageGenerator)
    x = gen.generate(6, seed=0)
    assert x.shape == (6, 1, 32, 32) and torch.equal(x, gen.generate(6, seed=0))
    again = aigc.load(out.run_dir).evaluate(n=50, iwae_k=64)  # training's evaluations use 64
    assert again["nelbo"] == final["val_nelbo"]  # the held-out numbers are seeded
    assert again["iwae_nll"] == final["val_iwae_nll"]


def held_out_mean_variances(gen: ImageGenerator) -> torch.Tensor:
    """Var over the held-out images of each unit's posterior mean E_q[z_u | x] (z_dim,)."""
    images = open_data(gen.run.data_dir).val_images
    with torch.no_grad():
        mu, _ = gen.model.encode(to_model_batch(images))
    return mu.double().var(0, unbiased=False)


def test_active_units_are_the_units_whose_posterior_means_vary(tmp_path):
    """Active units (Burda et al. 2016, 5.2) counted here from the held-out posterior
    means; then on an encoder made to have exactly two: units 0 and 2 given a constant
    mean far from the prior's (inactive, though their KL is large), 1 and 3 spread out."""
    out = aigc.train(ROOT / "configs" / "vae-conv-digits.yaml", TINY, run_dir=tmp_path / "run",
                     progress=False)  # fmt: skip
    final = RunDir(out.run_dir).read_metrics()[-1]
    gen = aigc.load(out.run_dir)
    var = held_out_mean_variances(gen)
    assert (abs(var - 0.01) > 1e-4).all()  # none so near the threshold that rounding decides
    assert final["val_active_units"] == int((var > 0.01).sum())

    mu_layer = gen.model.encoder.net[-1]  # Linear -> (mu, logvar), z_dim each
    with torch.no_grad():
        for u in (0, 2):
            mu_layer.weight[u] = 0.0
            mu_layer.bias[u] = 1.0
        for u in (1, 3):
            mu_layer.weight[u] *= 1000.0
    var = held_out_mean_variances(gen)
    assert var[0] == var[2] == 0 and var[1] > 0.1 and var[3] > 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the judge's small-sample warnings
        result = gen.evaluate(n=20, iwae_k=1, metrics=[], save=False)
    assert result["kl_dim/0"] > 0.4 and result["kl_dim/2"] > 0.4
    assert result["active_units"] == 2


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
    r = run_cli("eval", str(out.run_dir), "--iwae-k", "7", "--n", "20")
    assert r.returncode == 0, r.stderr
    assert "IWAE bound, k=7" in r.stdout and "active latent units" in r.stdout, r.stdout
    saved = json.loads((Path(out.run_dir) / "eval.json").read_text())
    assert saved["iwae_k"] == 7 and saved["samples"] == 20 and "kl_dim/3" in saved


def test_reconstruct_is_for_vae_runs_only(tmp_path):
    from .conftest import run_cli

    gan = aigc.train(ROOT / "configs" / "dcgan-digits.yaml",
                     ["model.g_width=8", "model.d_width=8", "train.batch_size=8",
                      "train.max_steps=1", "data.eval_samples=20"],
                     run_dir=tmp_path / "gan", progress=False)  # fmt: skip
    r = run_cli("sample", str(gan.run_dir), "--reconstruct", "held-out")
    assert r.returncode == 2 and "only VAE runs" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("eval", str(gan.run_dir), "--iwae-k", "10")
    assert r.returncode == 2 and "for VAE runs" in r.stderr and "Traceback" not in r.stderr


def test_iwae_bound_never_worse_than_the_elbo_on_a_trained_run(tmp_path):
    """A tiny Bernoulli MLP VAE trained for real on binarised digits: held-out IWAE bounds
    for growing k never exceed the negative ELBO, and more samples never loosen it beyond
    noise; the eval reports KL per latent unit and the data really is binary."""
    out = aigc.train(ROOT / "configs" / "vae-mlp-digits.yaml",
                     ["data.image_size=16", "model.hidden=[64]", "model.z_dim=4",
                      "train.max_steps=150", "train.warmup_steps=10", "train.batch_size=32",
                      "train.checkpoint_every=0", "train.sample_every=0", "train.log_every=50",
                      "data.eval_samples=20"],
                     run_dir=tmp_path / "run", progress=False)  # fmt: skip
    run = RunDir(out.run_dir)
    images = np.load(run.data_dir / "images.npy", allow_pickle=False)
    assert set(np.unique(images)) == {0, 255}
    rows = run.read_metrics()
    assert {f"kl_dim/{u}" for u in range(4)} <= rows[0].keys()
    first = next(r for r in rows if "elbo" in r)["elbo"]
    gen = aigc.load(out.run_dir)
    bounds = {k: gen.evaluate(n=20, iwae_k=k, save=False) for k in (1, 10, 100)}
    nelbo = bounds[1]["nelbo"]
    assert nelbo < 0.8 * first  # it trained
    assert all(b["nelbo"] == nelbo for b in bounds.values())  # ELBO noise is k-independent
    assert abs(bounds[1]["iwae_nll"] - nelbo) < 0.03 * nelbo  # k=1 is the ELBO (noisily)
    assert bounds[10]["iwae_nll"] < nelbo
    assert bounds[100]["iwae_nll"] <= bounds[10]["iwae_nll"] + 0.1
    kl_dims = [bounds[100][f"kl_dim/{u}"] for u in range(4)]
    assert abs(sum(kl_dims) - bounds[100]["kl"]) < 1e-6 * bounds[100]["kl"]
    assert bounds[100]["iwae_k"] == 100
    originals = gen.reconstruct("digits", n=8)[:8]  # other data is binarised like the run's
    assert set(originals.unique().tolist()) == {-1.0, 1.0}


def test_iwae_bound_converges_to_the_likelihood_found_by_quadrature(tmp_path):
    """With one latent dimension -log p(x) = -log ∫ p(x|z) N(z; 0, 1) dz is a 1-D
    integral, summed here on a fine grid with Bernoulli probabilities written out: the
    held-out IWAE bound never falls below it (beyond noise), tightens with k and at
    k = 1000 is within 0.01 nats of it; the negative ELBO lies above it."""
    out = aigc.train(ROOT / "configs" / "vae-mlp-digits.yaml",
                     ["data.image_size=8", "model.hidden=[32]", "model.z_dim=1",
                      "train.max_steps=150", "train.warmup_steps=10", "train.batch_size=32",
                      "train.checkpoint_every=0", "train.sample_every=0", "train.log_every=50",
                      "data.eval_samples=20"],
                     run_dir=tmp_path / "run", progress=False)  # fmt: skip
    gen = aigc.load(out.run_dir)
    pixels = (to_model_batch(open_data(gen.run.data_dir).val_images).flatten(1) > 0).double()
    grid = torch.linspace(-12.0, 12.0, 24001, dtype=torch.float64)  # z, spacing 0.001
    with torch.no_grad():
        logits = gen.model.decode(grid[:, None].float())[0].flatten(1).double()  # (G, D)
    log_lik = pixels @ F.logsigmoid(logits).T + (1 - pixels) @ F.logsigmoid(-logits).T  # (N, G)
    log_prior = -0.5 * (grid**2 + math.log(2 * math.pi))
    dz = float(grid[1] - grid[0])
    nll = -(torch.logsumexp(log_lik + log_prior, dim=1) + math.log(dz)).mean().item()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the judge's small-sample warnings
        bounds = {k: gen.evaluate(n=20, iwae_k=k, metrics=[], save=False) for k in (1, 10, 1000)}
    assert bounds[1]["nelbo"] > nll
    for k, b in bounds.items():
        assert b["iwae_nll"] > nll - 0.01, (k, b["iwae_nll"], nll)
    assert bounds[1000]["iwae_nll"] < bounds[1]["iwae_nll"] - 0.01  # more samples, tighter
    assert abs(bounds[1000]["iwae_nll"] - nll) < 0.01, (bounds[1000]["iwae_nll"], nll)


def test_vae_bad_input_is_refused_before_training(tmp_path):
    from .conftest import run_cli

    cases = [
        # a Bernoulli likelihood on grey digits is not a likelihood
        (["vae-mlp-digits", "data.binarize=false"], "data.binarize=true"),
        (["vae-conv-digits", "model.z_dim=0"], "model.z_dim"),
        (["vae-conv-digits", "data.image_size=24"], "power of two"),
    ]
    for args, needle in cases:
        run_dir = tmp_path / args[-1].replace("=", "_")
        r = run_cli("train", *args, "--run-dir", str(run_dir))
        assert r.returncode == 2 and needle in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2
        assert not (run_dir / "checkpoints").exists()


def test_conditional_vae_samples_the_requested_class(tmp_path):
    """--class on a conditional VAE decodes with that label (same noise, other class
    gives other images); --interpolate walks the latent; --class on a plain VAE is
    refused with exit 2."""
    from .conftest import run_cli

    out = aigc.train(ROOT / "configs" / "cvae-digits.yaml", TINY, run_dir=tmp_path / "cvae",
                     progress=False)  # fmt: skip
    gen = aigc.load(out.run_dir)
    assert gen.classes == {"class": [str(d) for d in range(10)]}
    threes, sevens = gen.generate(8, labels=3, seed=1), gen.generate(8, labels=7, seed=1)
    assert threes.shape == (8, 1, 32, 32) and not torch.equal(threes, sevens)
    png = tmp_path / "walk.png"
    r = run_cli("sample", str(out.run_dir), "--class", "7", "--interpolate", "4", "--n", "8",
                "--out", str(png))  # fmt: skip
    assert r.returncode == 0, r.stderr
    with Image.open(png) as im:
        assert im.size == (4 * 34 + 2, 2 * 34 + 2)
    plain = aigc.train(ROOT / "configs" / "vae-conv-digits.yaml", [*TINY, "train.max_steps=1"],
                       run_dir=tmp_path / "plain", progress=False)  # fmt: skip
    r = run_cli("sample", str(plain.run_dir), "--class", "3", "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "not a conditional model" in r.stderr, r.stderr
    assert not (tmp_path / "x.png").exists()


def test_resumed_vae_training_equals_uninterrupted(tmp_path):
    """The reparameterisation noise and the KL warm-up follow the step, so a conditional
    VAE stopped at step 3 and continued ends bitwise equal to an uninterrupted run."""
    recipe = ROOT / "configs" / "cvae-digits.yaml"
    tiny = [*TINY, "model.beta=2", "model.kl_warmup_steps=4", "train.max_steps=6"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    aigc.train(recipe, tiny, run_dir=whole, progress=False)
    aigc.train(recipe, [*tiny, "train.max_steps=3"], run_dir=split, progress=False)
    aigc.train(None, ["train.max_steps=6"], run_dir=split, progress=False)
    for name in ("model", "optim"):
        a = load_file(str(RunDir(whole).latest_checkpoint() / f"{name}.safetensors"))
        b = load_file(str(RunDir(split).latest_checkpoint() / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    rows = [r for r in RunDir(split).read_metrics() if "elbo" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["beta"] for r in rows] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]


def test_vae_on_an_unlabelled_folder_trains_and_evaluates(tmp_path):
    """Regression: the final evaluation of a VAE on unlabelled images (no classifier, no
    feature extractor) raised IndexError; it reports the likelihoods alone."""
    folder = tmp_path / "rects"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        img = np.zeros((16, 16), np.uint8)
        y, x = rng.integers(0, 10, size=2)
        img[y : y + 5, x : x + 5] = 255
        Image.fromarray(img).save(folder / f"{i:02d}.png")
    out = aigc.train(ROOT / "configs" / "vae-conv-digits.yaml",
                     [*TINY, f"data.source={folder}", "data.image_size=16"],
                     run_dir=tmp_path / "run", progress=False)  # fmt: skip
    result = aigc.load(out.run_dir).evaluate(iwae_k=4, save=False)
    assert np.isfinite(result["iwae_nll"]) and "fid" not in result and "extractor" not in result
    assert not any(k.startswith(("label_accuracy", "min_class_share")) for k in result)
