"""The keyed image watermark (aigc.safety.image_watermark): it survives the transformations
it claims, unmarked images and wrong keys stay below the threshold at the nominal rate,
its numbers agree with independent computations, and it works through the pipelines,
`aigc sample --watermark-key` and the image server."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from scipy.stats import norm

import aigc
from aigc.data.images import load_image_set, to_uint8
from aigc.errors import RequestError
from aigc.safety import image_watermark as wm

from .conftest import ROOT, run_cli

CGAN = str(ROOT / "configs" / "cgan-digits.yaml")
TINY_GAN = ["model.z_dim=16", "model.g_width=8", "model.d_width=8", "train.batch_size=16",
            "train.max_steps=4", "train.checkpoint_every=0", "train.sample_every=0",
            "train.eval_every=0", "data.eval_metrics=[]"]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    pass


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    """Real images at the sizes the pipelines make: 32 px grey digits and RGB shapes, and
    the same resized to 28 and 64 px."""
    digits = load_image_set("digits", image_size=32, channels=1).images[:8, ..., 0]
    shapes = load_image_set("shapes", image_size=32, channels=3, n=8, seed=3).images
    small = [np.asarray(Image.fromarray(d).resize((28, 28), Image.BICUBIC)) for d in digits[:4]]  # fmt: skip
    large = [np.asarray(Image.fromarray(s).resize((64, 64), Image.BICUBIC)) for s in shapes[:4]]
    return [*digits, *shapes, *small, *large]


def _png(x: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG")
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())))


def _jpeg(quality: int):
    def f(x: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(x).save(buf, format="JPEG", quality=quality)
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())))

    return f


def _crop(x: np.ndarray, seed: int) -> np.ndarray:
    """A window of 90% of each side at a random place (10% cut from each dimension)."""
    h, w = x.shape[:2]
    nh, nw = round(0.9 * h), round(0.9 * w)
    rng = np.random.default_rng(seed)
    y0, x0 = rng.integers(0, h - nh + 1), rng.integers(0, w - nw + 1)
    return x[y0 : y0 + nh, x0 : x0 + nw]


def _resize(x: np.ndarray, factor: float) -> np.ndarray:
    h, w = x.shape[:2]
    size = (round(w * factor), round(h * factor))
    return np.asarray(Image.fromarray(x).resize(size, Image.BICUBIC))


TRANSFORMS = {
    "png": _png,
    "jpeg90": _jpeg(90),
    "jpeg75": _jpeg(75),
    "crop10": None,  # seeded per image below
    "resize-up-2x": lambda x: _resize(x, 2),
    "resize-up-and-down": lambda x: _resize(_resize(x, 2), 0.5),
    "resize-down-and-up": lambda x: _resize(_resize(x, 0.5), 2),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_marked_images_are_detected_after_each_claimed_transformation(images, name):
    for i, x in enumerate(images):
        key = f"key {i}"
        marked = wm.mark_image(x, key)
        seen = _crop(marked, i) if name == "crop10" else TRANSFORMS[name](marked)
        verdict = wm.detect_image(seen, key)
        assert verdict.marked and verdict.p_value <= 1e-3, (name, i, x.shape, verdict)
        assert verdict.z >= verdict.threshold


def test_a_crop_is_found_at_its_offset_and_an_enlargement_at_scale_2(images):
    x = wm.mark_image(images[8], "k")  # a 32 px RGB shape
    v = wm.detect_image(x[3:, 2:], "k")
    assert v.marked and v.shift == (3, 2) and v.scale == 1.0
    v = wm.detect_image(_resize(x, 2), "k")
    assert v.marked and v.scale == 2.0 and v.shift == (0, 0)


def test_wrong_keys_are_not_detected(images):
    """Each marked image against 10 other keys (near misses among them): the p-values
    behave as for unmarked images, far from the right key's."""
    p, z = [], []
    for i, x in enumerate(images):
        marked = wm.mark_image(x, f"key {i}")
        right = wm.detect_image(marked, f"key {i}").z
        for other in (
            f"key {i + 1}",
            f"Key {i}",
            f"key {i} ",
            *(f"other {i} {j}" for j in range(7)),
        ):
            verdict = wm.detect_image(marked, other)
            p.append(verdict.p_value)
            z.append(verdict.z)
            assert verdict.z < right - 2, (i, other, verdict)
    p = np.array(p)
    assert (p <= 1e-3).sum() <= 2  # binomial(240, 1e-3): 3 or more has probability 0.002
    assert (p <= 0.05).mean() <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / len(p))
    assert np.median(z) < 2.5


def test_unmarked_images_are_flagged_at_no_more_than_the_nominal_rate():
    """1,200 unmarked real images, each tested with its own key: the share whose p-value
    falls below each level stays within the binomial sampling error of that level."""
    digits = load_image_set("digits", image_size=32, channels=1).images[:600]
    shapes = load_image_set("shapes", image_size=32, channels=3, n=600, seed=11).images
    p = np.array([wm.detect_image(x, f"null {i}").p_value
                  for i, x in enumerate([*digits, *shapes])])  # fmt: skip
    n = len(p)
    for level in (1e-3, 1e-2, 5e-2, 0.2):
        allowed = level + 3 * math.sqrt(level * (1 - level) / n)
        assert (p <= level).mean() <= allowed, (level, (p <= level).mean())


def test_p_value_and_threshold_agree_with_the_gaussian_tail_bound():
    c = 1 / (4 * norm.sf(math.sqrt(2)))  # Bentkus & Dzindzalieta's constant, 3.178
    assert math.isclose(wm.RADEMACHER_GAUSS, c, rel_tol=1e-12)
    for z, tests in ((4.5, 34), (6.0, 106), (2.0, 16)):
        assert wm.p_bound(z, tests) == pytest.approx(min(1.0, tests * c * norm.sf(z)), rel=1e-9)
    t = wm.z_threshold(1e-3, 34)
    assert wm.p_bound(t, 34) == pytest.approx(1e-3, rel=1e-6)
    assert len(wm.alignments(32, 32)) == 25 + 9  # shifts 0..4 at scale 1, 0..2 at scale 2
    assert len(wm.alignments(28, 28)) == 16  # 14 px at scale 2 is too small to search


def test_the_bound_holds_for_a_sum_of_random_signs_with_uneven_weights():
    """The null model itself: a few large weights and many small ones, 200,000 random
    sign vectors; the tail never exceeds 3.178 times the Gaussian's."""
    rng = np.random.default_rng(0)
    w = np.concatenate([np.full(4, 3.0), rng.random(60)])
    w /= np.linalg.norm(w)
    z = np.concatenate([(rng.integers(0, 2, size=(50_000, w.size), dtype=np.int8) * 2 - 1) @ w
                        for _ in range(4)])  # fmt: skip
    for t in (1.0, 2.0, 2.5, 3.0):
        assert (z >= t).mean() <= wm.RADEMACHER_GAUSS * norm.sf(t) + 3e-4


def test_cell_weights_match_a_loop_over_cells():
    """_cell_sums against a plain loop: sum per cell at the shift, minus the mean of the
    3 x 3 cells around it (edges mirrored), placed at the cell's sign."""
    rng = np.random.default_rng(1)
    r = rng.normal(size=(29, 31))
    dy, dx = 3, 1
    rows, cols = (29 + dy + 1) // 2, (31 + dx + 1) // 2
    sums = np.zeros((rows, cols))
    for y in range(29):
        for x in range(31):
            sums[(y + dy) // 2, (x + dx) // 2] += r[y, x]
    padded = np.pad(sums, 1, mode="symmetric")
    expected = np.zeros((wm.GRID, wm.GRID))
    for i in range(rows):
        for j in range(cols):
            expected[i, j] = sums[i, j] - padded[i : i + 3, j : j + 3].mean()
    np.testing.assert_allclose(wm._cell_sums(r, dy, dx), expected, atol=1e-12)


def test_the_score_is_the_normalised_correlation_of_signs_and_weights():
    """On a grey image whose only detail is the mark, the aligned score equals the
    correlation computed here from the definition."""
    x = np.full((32, 32), 128, np.uint8)
    marked = wm.mark_image(x, "k")
    y = marked.astype(np.float64)
    r = y - ndimage.gaussian_filter(y, 1.0, mode="reflect")
    r = r / (ndimage.uniform_filter(r * r, 5, mode="reflect") + 1.0)
    g = wm._cell_sums(r, 0, 0)
    signs = wm.key_signs("k")
    z = float((signs * g).sum() / np.sqrt((g * g).sum()))
    v = wm.detect_image(marked, "k")
    assert v.z == pytest.approx(z, rel=1e-9) and v.shift == (0, 0) and z > 10


def test_the_pattern_is_the_keys_signs_over_2x2_cells():
    signs = wm.key_signs("k")
    assert signs.shape == (64, 64) and set(np.unique(signs)) == {-1.0, 1.0}
    assert abs(signs.mean()) < 0.05
    np.testing.assert_array_equal(signs, wm.key_signs("k"))
    assert (signs != wm.key_signs("k2")).mean() > 0.4
    p = wm.key_pattern("k", 6, 300)
    assert p[0, 0] == p[1, 1] == signs[0, 0] and p[2, 4] == signs[1, 2]
    assert p[0, 128] == signs[0, 0]  # tiles beyond 64 cells


def test_psnr_matches_scikit_image_and_the_cost_is_small(images):
    skimage = pytest.importorskip("skimage.metrics")
    values = []
    for i, x in enumerate(images):
        marked = wm.mark_image(x, f"key {i}")
        ours = wm.psnr(x, marked)
        assert ours == pytest.approx(skimage.peak_signal_noise_ratio(x, marked, data_range=255))
        values.append(ours)
    assert min(values) > 30 and np.mean(values) > 34, values
    assert wm.psnr(images[0], images[0]) == math.inf


def test_types_shapes_and_alpha_come_back_as_given():
    rng = np.random.default_rng(2)
    grey = rng.integers(60, 200, (32, 32), dtype=np.uint8)
    out = wm.mark_image(grey, "k")
    assert out.shape == (32, 32) and out.dtype == np.uint8 and not np.array_equal(out, grey)
    one = wm.mark_image(grey[..., None], "k")
    np.testing.assert_array_equal(one[..., 0], out)  # (H, W, 1) marks as (H, W)
    rgba = np.dstack([rng.integers(60, 200, (32, 32, 3), dtype=np.uint8),
                      rng.integers(0, 256, (32, 32), dtype=np.uint8)])  # fmt: skip
    marked = wm.mark_image(rgba, "k")
    assert marked.shape == (32, 32, 4)
    np.testing.assert_array_equal(marked[..., 3], rgba[..., 3])
    for mode in ("L", "RGB", "RGBA", "LA"):
        image = Image.fromarray(rgba).convert(mode)
        result = wm.mark_image(image, "k")
        assert isinstance(result, Image.Image) and result.mode == mode and result.size == (32, 32)
        assert wm.detect_image(result, "k").marked


def test_rgb_marks_change_the_luma_even_where_a_channel_clips():
    x = np.zeros((32, 32, 3), np.uint8)
    x[..., 0] = 255  # pure red: R cannot go up, G and B cannot go down
    marked = wm.mark_image(x, "k", strength=2.0)
    delta = marked.astype(float) @ [0.299, 0.587, 0.114] - x.astype(float) @ [0.299, 0.587, 0.114]
    pattern = wm.key_pattern("k", 32, 32)
    assert np.corrcoef(delta.ravel(), pattern.ravel())[0, 1] > 0.9
    assert wm.detect_image(marked, "k").marked


def test_mark_tensor_gives_floats_that_quantise_to_the_marked_pixels():
    smooth = torch.nn.functional.interpolate(torch.rand(3, 3, 8, 8), size=32, mode="bilinear")
    x = smooth * 1.6 - 0.8  # pictures, not white noise (which hides any faint mark)
    out = wm.mark_tensor(x, "k")
    assert out.shape == x.shape and out.dtype == torch.float32
    pixels = to_uint8(out)
    np.testing.assert_array_equal(pixels, np.stack([wm.mark_image(p, "k") for p in to_uint8(x)]))
    assert all(wm.detect_image(p, "k").marked for p in pixels)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: wm.mark_image(np.zeros((32, 32), np.uint8), ""), "non-empty"),
        (lambda: wm.mark_image(np.zeros((32, 32), np.uint8), 7), "non-empty"),
        (lambda: wm.mark_image(np.zeros((32, 32), np.float32), "k"), "uint8"),
        (lambda: wm.mark_image(np.zeros((32, 32, 2), np.uint8), "k"), "shape"),
        (lambda: wm.mark_image([[0]], "k"), "uint8 array or a PIL image"),
        (lambda: wm.mark_image(np.zeros((32, 32), np.uint8), "k", strength=0), "strength"),
        (lambda: wm.detect_image(np.zeros((12, 12), np.uint8), "k"), "at least 16x16"),
        (lambda: wm.detect_image(np.zeros((32, 32), np.uint8), "k", fpr=1.5), "fpr"),
    ],
)
def test_bad_input_is_a_request_error(call, message):
    with pytest.raises(RequestError, match=message):
        call()


def test_a_flat_image_scores_nothing():
    v = wm.detect_image(np.full((32, 32, 3), 90, np.uint8), "k")
    assert v.z == 0 and v.p_value == 1 and not v.marked


# --- pipelines, CLI and server ----------------------------------------------------------


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("wm-gan") / "run"
    aigc.train(CGAN, TINY_GAN, run_dir=run, progress=False)
    return run


def test_pipeline_generate_marks_with_the_key(gan_run):
    pipe = aigc.load(gan_run, device="cpu")
    plain = pipe.generate(4, seed=1, output="uint8")
    marked = pipe.generate(4, seed=1, output="uint8", watermark="secret")
    assert not np.array_equal(plain, marked)
    for a, b in zip(plain, marked, strict=True):
        assert wm.detect_image(b, "secret").marked and not wm.detect_image(a, "secret").marked
        assert wm.psnr(a, b) > 30
    strip = pipe.interpolate(4, seed=2, output="uint8", watermark="secret")
    assert all(wm.detect_image(x, "secret").marked for x in strip)
    with pytest.raises(RequestError, match="non-empty"):
        pipe.generate(2, watermark="")


def test_diffusion_pipeline_marks_with_the_key(diffusion_runs):
    """The tiny run's images are noise, which hides a faint mark (detection is tested on
    pictures above): what matters here is that the images come out marked."""
    pipe = aigc.load(diffusion_runs["ddpm"], device="cpu")
    plain = pipe(2, labels=3, num_inference_steps=2, seed=0).images
    marked = pipe(2, labels=3, num_inference_steps=2, seed=0, watermark="secret").images
    np.testing.assert_array_equal(to_uint8(marked), to_uint8(wm.mark_tensor(plain, "secret")))
    assert not np.array_equal(to_uint8(marked), to_uint8(plain))
    with pytest.raises(RequestError, match="non-empty"):
        pipe(1, labels=3, watermark="")


def test_cli_sample_watermark_key_marks_every_png(gan_run, tmp_path):
    r = run_cli("sample", str(gan_run), "--n", "3", "--seed", "4", "--out", str(tmp_path / "m"),
                "--watermark-key", "cli key")  # fmt: skip
    assert r.returncode == 0, r.stderr
    files = sorted((tmp_path / "m").glob("*.png"))
    assert len(files) == 3
    for f in files:
        image = Image.open(f)
        assert wm.detect_image(image, "cli key").marked
        assert not wm.detect_image(image, "another key").marked
    r = run_cli("sample", str(gan_run), "--n", "2", "--out", str(tmp_path / "x"),
                "--watermark-key", " ")  # fmt: skip
    assert r.returncode == 2 and "non-empty" in r.stderr


def _served_pngs(run: Path, settings: dict, body: dict) -> list[np.ndarray]:
    from aigc.serve.app import create_app
    from aigc.serve.settings import ServeSettings

    from .test_serve import SETTINGS, Server

    srv = Server(create_app([run], ServeSettings(**{**SETTINGS, **settings})))
    try:
        r = httpx.post(f"{srv.url}/v1/images/generations", json=body, timeout=60)
    finally:
        srv.close()
    assert r.status_code == 200, r.text
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))))
            for d in r.json()["data"]]  # fmt: skip


def test_the_image_server_marks_when_it_has_a_key(gan_run, diffusion_runs):
    body = {"model": "run", "prompt": "3", "n": 2, "seed": 5}
    for image in _served_pngs(gan_run, {"watermark_key": "server key"}, body):
        assert wm.detect_image(image, "server key").marked
    for image in _served_pngs(gan_run, {}, body):
        assert not wm.detect_image(image, "server key").marked
    body = {"model": "ddpm", "prompt": "3", "n": 2, "seed": 5, "num_inference_steps": 2}
    marked = _served_pngs(diffusion_runs["ddpm"], {"watermark_key": "server key"}, body)
    plain = _served_pngs(diffusion_runs["ddpm"], {}, body)
    for a, b in zip(plain, marked, strict=True):
        np.testing.assert_array_equal(b, wm.mark_image(a, "server key"))
