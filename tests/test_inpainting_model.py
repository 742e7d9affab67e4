"""An inpainting model fine-tuned from a diffusion run (aigc finetune RUN --task inpaint):
the training masks, the zero-started input channels that make it start as its base, one
pass that keeps every known pixel, the CLI, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import aigc
from aigc.errors import ConfigError, RequestError
from aigc.tasks.diffusion import MASK_KINDS, training_masks

from .conftest import run_cli


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    yield


def test_training_masks_are_seeded_and_of_each_kind_in_its_share():
    a = training_masks(2000, 16, np.random.default_rng(0))
    assert torch.equal(a, training_masks(2000, 16, np.random.default_rng(0)))
    assert a.shape == (2000, 1, 16, 16) and set(a.unique().tolist()) == {0.0, 1.0}
    area = a.mean(dim=(1, 2, 3))
    everything = (area == 1).float().mean().item()
    half = (area == 0.5).float().mean().item()  # rectangles can be exactly half, rarely
    assert everything == pytest.approx(MASK_KINDS["everything"], abs=0.03)
    assert half == pytest.approx(MASK_KINDS["half"], abs=0.05)
    assert (area > 0).all() and (area[area < 0.5] >= 1 / 16).all()  # a quarter side at least


@pytest.fixture(scope="module")
def inpainter(diffusion_runs, tmp_path_factory):
    """The class-conditional tiny run, fine-tuned one step at learning rate 0 (its weights
    stay the base's), and a few steps for real."""
    root = tmp_path_factory.mktemp("inpaint")
    still = aigc.finetune(diffusion_runs["ddpm"], ["train.max_steps=1", "train.lr=0", "train.min_lr=0"],
                          task="inpaint", run_dir=root / "still", progress=False)  # fmt: skip
    moved = aigc.finetune(diffusion_runs["ddpm"], ["train.max_steps=3"], task="inpaint",
                          run_dir=root / "moved", progress=False)  # fmt: skip
    return {"still": still.run_dir, "moved": moved.run_dir}


def test_the_new_input_channels_start_at_zero_so_it_starts_as_its_base(diffusion_runs, inpainter):
    base = aigc.load(diffusion_runs["ddpm"])
    still = aigc.load(inpainter["still"])
    assert still.config.model.inpainting and still.config.model.cond_channels == 2
    w = still.model.unet.inp.weight
    assert w.shape[1] == 3 and torch.equal(w[:, 1:], torch.zeros_like(w[:, 1:]))
    assert torch.equal(w[:, :1], base.model.unet.inp.weight)
    # generation (nothing kept) and any condition give the base's images
    a = base(4, labels=3, seed=0).images
    b = still(4, labels=3, seed=0).images
    assert torch.allclose(a, b, atol=1e-5)


def test_an_inpainting_model_keeps_every_known_pixel_in_one_pass(inpainter, tmp_path):
    gen = aigc.load(inpainter["moved"])
    size = gen.image_size
    image = np.zeros((size, size), np.uint8)
    image[:, : size // 2] = 200
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : size // 2, size // 4 : 3 * size // 4] = 255  # white = fill
    calls = []
    out = gen.inpaint(image, mask, n=3, labels=2, seed=1, callback=lambda i, n, x: calls.append(n))
    pixels = ((out.images + 1) * 127.5).round()
    keep = torch.from_numpy(mask < 128)
    expected = torch.from_numpy(image).float()
    assert torch.equal(pixels[:, 0][:, keep], expected[keep].expand(3, -1))
    assert calls and calls[-1] == gen.config.model.sample_steps  # the run's sampler, one pass
    with pytest.raises(RequestError, match="fills in one pass"):
        gen.inpaint(image, mask, resample=5)
    Image.fromarray(image).save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    r = run_cli("edit", str(inpainter["moved"]), "--image", str(tmp_path / "in.png"), "--mask",
                str(tmp_path / "mask.png"), "--class", "4", "--out", str(tmp_path / "o.png"))  # fmt: skip
    assert r.returncode == 0 and "inpainted" in r.stdout, r.stderr


def test_a_text_run_fine_tunes_with_its_own_tokenizer(diffusion_runs, tmp_path):
    out = aigc.finetune(diffusion_runs["t2i"], ["train.max_steps=1"], task="inpaint",
                        run_dir=tmp_path / "t2i-inpaint", progress=False)  # fmt: skip
    base_tok = (diffusion_runs["t2i"] / "tokenizer.json").read_bytes()
    assert (out.run_dir / "tokenizer.json").read_bytes() == base_tok
    gen = aigc.load(out.run_dir)
    assert gen(1, prompt="a small red circle at the top left", seed=0).images.shape[0] == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "chat"}, "fine-tunes with --task concept or inpaint"),
        ({"task": "inpaint", "method": "lora"}, "--task inpaint trains every weight"),
        ({"task": "concept"}, "not a text-to-image run"),
        ({"task": "inpaint", "overrides": ["model.width=16"]}, "model.width cannot change"),
    ],
)
def test_bad_fine_tunes_of_a_diffusion_run_are_named(diffusion_runs, tmp_path, kwargs, message):
    overrides = kwargs.pop("overrides", [])
    with pytest.raises(ConfigError, match=message):
        aigc.finetune(diffusion_runs["ddpm"], overrides, run_dir=tmp_path / "x", progress=False,
                      **kwargs)  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_an_inpainting_run_is_not_fine_tuned_to_inpaint_again(inpainter, tmp_path):
    r = run_cli("finetune", str(inpainter["moved"]), "--task", "inpaint")
    assert r.returncode == 2 and "already an inpainting model" in r.stderr
