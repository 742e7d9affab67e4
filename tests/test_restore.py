"""Restoration and super-resolution: the metrics against scikit-image, the degradations
against Pillow and NumPy, the model's starting point and step, a run that really learns
to denoise, and the Python and CLI faces with their errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import aigc
from aigc.data.degrade import Degradation, bicubic_upsample, classical, median_filter
from aigc.data.shapes import generate_shapes
from aigc.errors import ConfigError, RequestError
from aigc.metrics.restoration import PSNR_CAP, psnr, ssim
from aigc.models.restore import Restorer, RestorerConfig

from .conftest import ROOT, run_cli

CONFIGS = ROOT / "configs"


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    yield


def _pair(seed: int = 0, shape=(3, 24, 20, 3)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    b = np.clip(a + rng.normal(0, 25, a.shape), 0, 255).astype(np.uint8)
    return a, b


# metrics -------------------------------------------------------------------


def test_psnr_and_ssim_equal_scikit_image():
    skm = pytest.importorskip("skimage.metrics")
    for shape in [(3, 24, 20, 3), (2, 16, 16, 1), (1, 40, 33, 3)]:
        a, b = _pair(1, shape)
        ours_s, ours_p = ssim(a, b), psnr(a, b)
        for i in range(len(a)):
            ref = skm.structural_similarity(a[i], b[i], gaussian_weights=True, sigma=1.5,
                                            use_sample_covariance=False, data_range=255,
                                            channel_axis=-1)  # fmt: skip
            assert ours_s[i] == pytest.approx(ref, abs=1e-10)
            assert ours_p[i] == pytest.approx(
                skm.peak_signal_noise_ratio(a[i], b[i], data_range=255)
            )


def test_psnr_by_hand_and_the_cap_for_an_exact_copy():
    a = np.zeros((2, 16, 16, 1), np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 255  # MSE = 255^2 / 256: PSNR = 10 log10(256)
    got = psnr(b, a)
    assert got[0] == pytest.approx(10 * np.log10(256.0))
    assert got[1] == PSNR_CAP
    assert ssim(a, a) == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="at least 11"):
        ssim(a[:, :8, :8], a[:, :8, :8])
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, a[:, :8])


# degradations ---------------------------------------------------------------


def test_noise_is_seeded_per_image_clipped_and_of_the_asked_sigma():
    grey = np.full((4, 64, 64, 3), 128, np.uint8)
    d = Degradation("noise", sigma=0.2)
    out = d.apply(grey, [[0, i] for i in range(4)])
    assert out.dtype == np.uint8 and out.shape == grey.shape
    # mid-grey rarely clips at sigma 51: the standard deviation is the asked one
    assert np.std(out.astype(float) - 128) == pytest.approx(0.2 * 255, rel=0.03)
    # each image's noise is its own seed's, whatever the batch
    alone = d.apply(grey[2:3], [[0, 2]])
    assert np.array_equal(alone[0], out[2])
    assert not np.array_equal(out[0], out[1])
    expected = np.clip(np.rint(128 + np.random.default_rng([0, 2]).standard_normal((64, 64, 3))
                               * 51.0), 0, 255)  # fmt: skip
    assert np.array_equal(out[2], expected.astype(np.uint8))


def test_jpeg_blocks_and_downsampling_are_what_pillow_and_numpy_give():
    images = generate_shapes(3, 32, seed=0).images
    jpg = Degradation("jpeg", quality=10).apply(images, [0, 1, 2])
    buf = io.BytesIO()
    Image.fromarray(images[1]).save(buf, format="JPEG", quality=10)
    assert np.array_equal(jpg[1], np.asarray(Image.open(io.BytesIO(buf.getvalue()))))
    white = np.full((2, 32, 32, 1), 255, np.uint8)
    holes = Degradation("blocks", blocks=1, block_size=5).apply(white, [3, 4])
    assert [(h == 0).sum() for h in holes] == [25, 25]  # one 5x5 black square each
    small = Degradation("downsample", scale=4).apply(images, [0, 1, 2])
    assert small.shape == (3, 8, 8, 3)
    ref = np.asarray(Image.fromarray(images[0]).resize((8, 8), Image.Resampling.BICUBIC))
    assert np.array_equal(small[0], ref)
    assert bicubic_upsample(small, 4).shape == images.shape
    assert np.array_equal(classical(Degradation("downsample", scale=4), small),
                          bicubic_upsample(small, 4))  # fmt: skip
    from scipy.ndimage import median_filter as scipy_median

    noisy = Degradation("noise").apply(images, [0, 1, 2])
    assert np.array_equal(median_filter(noisy)[0, :, :, 1],
                          scipy_median(noisy[0, :, :, 1], size=3, mode="reflect"))  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "size", "match"),
    [
        ({"kind": "blur"}, 32, "degradation='blur'"),
        ({"kind": "noise", "sigma": 0.0}, 32, "noise_sigma"),
        ({"kind": "jpeg", "quality": 100}, 32, "jpeg_quality"),
        ({"kind": "downsample", "scale": 5}, 32, "factors are 2, 3 and 4"),
        ({"kind": "downsample", "scale": 3}, 32, "not a multiple"),
        ({"kind": "noise", "scale": 2}, 32, "is for degradation=downsample"),
        ({"kind": "blocks", "block_size": 40}, 32, "larger than the images"),
    ],
)
def test_bad_degradations_are_named(kwargs, size, match):
    with pytest.raises(ConfigError, match=match):
        Degradation(**kwargs).validate(size)


# the model ------------------------------------------------------------------


def test_an_untrained_restorer_returns_its_input_or_bicubic_upsampling():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    same = Restorer(RestorerConfig(image_size=8, channels=3, width=8, blocks=2))
    assert torch.equal(same(x), x)
    up = Restorer(RestorerConfig(image_size=32, channels=3, scale=4, width=8, blocks=2))
    assert torch.allclose(up(x), F.interpolate(x, scale_factor=4, mode="bicubic"), atol=1e-6)
    three = Restorer(RestorerConfig(image_size=24, channels=1, scale=3, width=8, blocks=1))
    assert three(torch.zeros(1, 1, 8, 8)).shape == (1, 1, 24, 24)


@pytest.mark.parametrize("scale", [1, 4])
def test_a_large_image_restored_tile_by_tile_equals_it_restored_whole(scale):
    torch.manual_seed(0)
    model = Restorer(RestorerConfig(image_size=16 * scale, channels=3, scale=scale, width=8,
                                    blocks=2)).eval()  # fmt: skip
    for p in model.parameters():  # every layer non-trivial, the tail included
        p.data.normal_(0, 0.2)
    x = torch.rand(1, 3, 45, 38) * 2 - 1
    with torch.no_grad():
        whole, tiled = model(x), model.tiled(x, tile=12)
    assert tiled.shape == whole.shape == (1, 3, 45 * scale, 38 * scale)
    assert torch.allclose(tiled, whole, atol=1e-4)

    class NoMargin(Restorer):  # tiles without their neighbours' pixels show seams
        receptive_radius = 0

    seams = NoMargin(model.cfg)
    seams.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(seams.eval().tiled(x, tile=12), whole, atol=1e-3)


def test_the_adversarial_step_updates_the_critic_then_the_restorer_only():
    cfg = RestorerConfig(image_size=32, channels=3, scale=2, width=8, blocks=1, adversarial=0.1,
                         d_width=8, d_layers=2)  # fmt: skip
    model = Restorer(cfg)
    model.tail.weight.data.normal_(0, 0.1)  # so the restorer's loss reaches the critic's input
    batch = {
        "degraded": torch.rand(2, 3, 16, 16) * 2 - 1,
        "clean": torch.rand(2, 3, 32, 32) * 2 - 1,
    }
    seen: list[tuple[str, set[str]]] = []

    class Step:
        index = 0

        def update(self, group, loss):
            model.zero_grad()
            loss.backward(retain_graph=True)
            got = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None
                   and p.grad.abs().sum() > 0}  # fmt: skip
            seen.append((group, got))

    out = model.training_step(batch, Step())
    assert [g for g, _ in seen] == ["critic", "model"]
    assert seen[0][1] == {"critic"}  # the critic's loss sees the restored images detached
    assert set(model.param_groups()) == {"critic", "model"}
    assert {"loss", "pixel", "critic", "adversarial", "psnr"} <= set(out)
    with pytest.raises(ConfigError, match="d_layers"):
        RestorerConfig(image_size=16, channels=3, adversarial=0.1, d_layers=3).validate()


# a run ----------------------------------------------------------------------

TINY = ["data.n=400", "data.image_size=16", "model.width=16", "model.blocks=2",
        "train.batch_size=16", "train.eval_every=0", "train.sample_every=0",
        "train.checkpoint_every=100", "data.eval_samples=40"]  # fmt: skip


@pytest.fixture(scope="module")
def denoiser(tmp_path_factory):
    """A denoiser of 16x16 shapes, trained 150 steps (a few seconds)."""
    run = tmp_path_factory.mktemp("restore") / "run"
    aigc.train(CONFIGS / "restore-shapes-noise.yaml", [*TINY, "train.max_steps=150"],
               run_dir=run, progress=False)  # fmt: skip
    return run


def test_a_short_run_learns_to_denoise_and_its_numbers_are_recomputable(denoiser):
    gen = aigc.load(denoiser)
    result = gen.evaluate(save=False)
    assert result["count"] == 40
    assert result["psnr"] > result["psnr_degraded"] + 3.0, result
    assert result["psnr"] > result["psnr_baseline"], result
    assert result["ssim"] > result["ssim_degraded"]
    assert result["degradation"] == "Gaussian noise, sigma 0.2"
    # the same numbers from the public pieces: the held-out images, damaged from their
    # seeds, restored through the pipeline, measured by the metric functions
    from aigc.tasks.images import open_data

    val = np.array(open_data(denoiser / "data").val_images[:40])
    noisy = gen.degradation.apply(val, gen.task.val_seeds(np.arange(40)))
    restored = np.stack(gen.restore(list(noisy), output="uint8"))
    assert np.mean(psnr(restored, val)) == pytest.approx(result["psnr"], abs=1e-6)
    assert np.mean(ssim(median_filter(noisy), val)) == pytest.approx(result["ssim_baseline"])
    text = gen.format_eval(result)
    assert f"{result['psnr']:8.2f}" in text and "median 3x3" in text


def test_restoring_takes_files_arrays_and_any_size_and_refuses_other_factors(denoiser, tmp_path):
    gen = aigc.load(denoiser)
    big = generate_shapes(1, 40, seed=5).images[0]  # another size than the run's 16
    path = tmp_path / "big.png"
    Image.fromarray(big).save(path)
    from_file = gen.restore(str(path)).images
    from_array = gen.restore(big).images
    assert from_file.shape == (1, 3, 40, 40) and torch.equal(from_file, from_array)
    with pytest.warns(UserWarning, match="grayscale image converted to colour"):
        gen.restore(big[..., 0])
    with pytest.raises(RequestError, match="not trained for 2x"):
        gen.restore(big, scale=2)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(RequestError, match="not an image"):
        gen.restore(str(tmp_path / "bad.png"))
    grid = gen.compare(n=3)
    assert grid.shape[:2] == (3 * 18 + 2, 3 * 18 + 2)


def test_super_resolution_run_and_cli(tmp_path):
    run = tmp_path / "sr"
    aigc.train(CONFIGS / "sr-shapes-x4.yaml", [*TINY, "train.max_steps=2"], run_dir=run,
               progress=False)  # fmt: skip
    gen = aigc.load(run)
    assert gen.scale == 4 and "psnr_degraded" not in gen.evaluate(save=False)
    low = generate_shapes(1, 8, seed=1).images[0]
    Image.fromarray(low).save(tmp_path / "low.png")
    r = run_cli("restore", str(run), "--image", str(tmp_path / "low.png"), "--out",
                str(tmp_path / "high.png"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "high.png").size == (32, 32)
    r = run_cli("restore", str(run), "--image", str(tmp_path / "low.png"), "--scale", "2")
    assert r.returncode == 2 and "super-resolves 4x; it was not trained for 2x" in r.stderr
    r = run_cli("restore", str(run), "--held-out", "4", "--out", str(tmp_path / "grid.png"))
    assert r.returncode == 0 and Image.open(tmp_path / "grid.png").size == (3 * 18 + 2, 4 * 18 + 2)
    r = run_cli("sample", str(run))
    assert r.returncode == 2 and "aigc restore" in r.stderr
    (tmp_path / "bad.png").write_bytes(b"GIF89a nothing")
    r = run_cli("restore", str(run), "--image", str(tmp_path / "bad.png"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) <= 2


# the diffusion restorer (SR3) -------------------------------------------------------

SR3 = ["data.n=64", "data.image_size=16", "model.width=8", "model.channel_mults=[1,2]",
       "model.groups=4", "model.sample_steps=3", "data.eval_samples=16", "train.batch_size=8",
       "train.max_steps=2", "train.checkpoint_every=2", "train.sample_every=0"]  # fmt: skip


def test_the_unet_reads_its_image_condition_and_refuses_to_sample_without_it():
    from aigc.models.diffusion import Diffusion, DiffusionConfig

    cfg = DiffusionConfig(image_size=16, channels=3, width=8, channel_mults=[1, 2], groups=4,
                          cond_channels=3)  # fmt: skip
    m = Diffusion(cfg).eval()
    m.unet.out[-1].weight.data.normal_(0, 0.1)  # a non-zero output layer
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    a = m.unet(x, t, cond=torch.zeros(2, 3, 16, 16))
    b = m.unet(x, t, cond=torch.ones(2, 3, 16, 16))
    assert a.shape == (2, 3, 16, 16) and not torch.allclose(a, b)
    z = torch.randn(2, 3 * 16 * 16)
    with pytest.raises(ValueError, match="conditioned on an image"):
        m.generate(z, steps=2)
    out = m.generate(z, steps=2, cond=torch.zeros(2, 3, 16, 16))
    assert out.shape == (2, 3, 16, 16) and out.abs().max() <= 1


def test_a_diffusion_restorer_samples_per_image_and_is_measured_like_the_regression_one(tmp_path):
    run = tmp_path / "sr3"
    aigc.train(CONFIGS / "sr3-shapes-x4.yaml", SR3, run_dir=run, progress=False)
    gen = aigc.load(run)
    assert gen.scale == 4 and gen.config.model.cond_channels == 3
    low = generate_shapes(3, 4, seed=2).images  # 4x4 inputs -> 16x16
    three = gen.restore(low, seed=5).images
    one = gen.restore(low[1:2], seed=5).images
    assert three.shape == (3, 3, 16, 16)
    assert not torch.allclose(three[0], three[1])
    # image i's noise comes from (seed, i): alone, image 1 is image 0 of its batch
    again = gen.restore(low[:1], seed=5).images
    assert torch.allclose(again[0], three[0], atol=1e-5) and one.shape == (1, 3, 16, 16)
    assert (
        gen.restore(low, seed=5, num_inference_steps=2, scheduler="ddim").images.shape
        == three.shape
    )
    with pytest.raises(RequestError, match="this run restores 4x4 images"):
        gen.restore(generate_shapes(1, 8).images)
    with pytest.raises(RequestError, match="not a known scheduler; known: ddim"):
        gen.restore(low, scheduler="nope")
    result = gen.evaluate(save=True, scheduler="ddim", steps=2)
    assert result["variant"] == "ddim-2" and {"psnr", "ssim", "psnr_baseline"} <= set(result)
    assert (run / "eval-ddim-2.json").is_file()
    r = run_cli(
        "restore", str(run), "--held-out", "2", "--steps", "2", "--out", str(tmp_path / "g.png")
    )
    assert r.returncode == 0, r.stderr


def test_a_regression_restorer_refuses_sampling_options(denoiser):
    gen = aigc.load(denoiser)
    with pytest.raises(RequestError, match="takes no scheduler or steps"):
        gen.restore(generate_shapes(1, 16).images, num_inference_steps=5)
    with pytest.raises(RequestError, match="takes no scheduler or steps"):
        gen.evaluate(save=False, scheduler="ddim")


# serving -----------------------------------------------------------------------


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_a_restorer_answers_image_edits_as_the_python_api_does(denoiser):
    import base64

    from aigc.serve.app import create_app
    from aigc.serve.settings import ServeSettings

    from .test_serve import SETTINGS, Server, assert_edits_refused

    pytest.importorskip("openai")
    srv = Server(create_app([denoiser], ServeSettings(**SETTINGS)))
    try:
        name = denoiser.name
        card = next(m for m in srv.client().models.list().data if m.id == name)
        assert card.aigc["kind"] == "restore"
        assert card.aigc["restore"] == {"degradation": "Gaussian noise, sigma 0.2", "scale": 1,
                                        "input_size": None}  # fmt: skip
        noisy = aigc.load(denoiser).degrade(generate_shapes(1, 24, seed=4).images[0], seed=2)[0]
        r = srv.client().images.edit(model=name, image=("noisy.png", _png(noisy), "image/png"),
                                     prompt="")  # fmt: skip
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))))
        want = aigc.load(denoiser).restore(noisy, output="uint8")[0]
        assert np.array_equal(got, want) and got.shape == (24, 24, 3)
        bad = [
            ({"prompt": "make it nice"}, {"image": _png(noisy)}, "prompt"),
            ({"n": "2"}, {"image": _png(noisy)}, "n"),
            ({"strength": "0.5"}, {"image": _png(noisy)}, "strength"),
            ({}, {"image": _png(noisy), "mask": _png(noisy)}, "mask"),
            ({}, {"image": b"not an image at all"}, "image"),
        ]
        assert_edits_refused(srv.url, name, bad)
    finally:
        srv.close()
