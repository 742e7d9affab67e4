"""Image-to-image (SDEdit) and inpainting (RePaint) loops against independent
computations: on Gaussian data, whose exact denoiser is known in closed form, an
image noised to a level and run down the probability-flow ODE lands where the exact
flow from that level lands, and RePaint fills a pixel with the exact conditional law
given the pixel it keeps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aigc.schedulers import get_scheduler
from aigc.schedulers.loops import (
    denoise_loop,
    img2img_begin,
    img2img_start,
    reconstruction_guided,
    repaint,
    repaint_calls,
)

from .conftest import run_cli

BETAS = np.linspace(1e-4, 0.02, 1000)  # the default linear schedule, written here
ABAR = np.cumprod(1 - BETAS)
LOG_SIGMAS = 0.5 * np.log((1 - ABAR) / ABAR)


def _abar_at(t: float) -> float:
    """abar at a (possibly fractional) time, log sigma interpolated as sigmas.py does."""
    sigma = math.exp(np.interp(t, np.arange(len(LOG_SIGMAS)), LOG_SIGMAS))
    return 1 / (1 + sigma**2)


def _gaussian_eps(mean: np.ndarray, cov: np.ndarray):
    """The exact E[eps | x_t] of a VP network for data N(mean, cov) over the last axis:
    x_t = sqrt(a) x_0 + sqrt(1 - a) eps, so E[eps | x_t] = sqrt(1 - a) (a cov + (1 - a)
    I)^-1 (x_t - sqrt(a) mean)."""
    mean_t = torch.tensor(mean, dtype=torch.float64)
    cov_t = torch.tensor(cov, dtype=torch.float64)
    eye = torch.eye(len(mean), dtype=torch.float64)

    def net(x, t):
        a = _abar_at(float(t))
        prec = torch.linalg.inv(a * cov_t + (1 - a) * eye)
        return math.sqrt(1 - a) * (x - math.sqrt(a) * mean_t) @ prec.T

    return net


class _Counted:
    def __init__(self, net):
        self.net, self.calls = net, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.net(x, t)


@pytest.mark.parametrize(("name", "tol"), [("ddim", 0.08), ("euler", 0.1), ("heun", 0.01),
                                           ("dpm++2m", 0.01)])  # fmt: skip
@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_img2img_lands_where_the_exact_flow_from_the_noised_image_lands(name, tol, strength):
    """1-D Gaussian data N(mu, sd^2): from x_t = sqrt(a) x + sqrt(1 - a) z at the start
    level a, the flow keeps u = (x_t - sqrt(a) mu) / sqrt(a sd^2 + 1 - a) fixed and ends
    at mu + sd u. The loop runs only the last round(strength n) steps."""
    mu, sd, n = 0.3, 0.6, 50
    s = get_scheduler(name)(**({"eta": 0.0, "clip_sample": False} if name == "ddim" else {}))
    s.set_timesteps(n)
    image = torch.linspace(-1, 1, 9, dtype=torch.float64).view(9, 1)
    noise = torch.linspace(2, -2, 9, dtype=torch.float64).view(9, 1)
    x = img2img_start(s, image, noise, strength)
    begin = s.begin_index
    k = round(strength * n)
    assert begin == s.order * (n - k)
    net = _Counted(_gaussian_eps(np.array([mu]), np.array([[sd**2]])))
    out = denoise_loop(net, s, x, generator=None)
    assert net.calls == (2 * k - 1 if name == "heun" else k)
    a = _abar_at(float(s.timesteps[begin]))
    x_vp = math.sqrt(a) * image + math.sqrt(1 - a) * noise
    u = (x_vp - math.sqrt(a) * mu) / math.sqrt(a * sd**2 + 1 - a)
    assert float((out - (mu + sd * u)).abs().max()) < tol


def test_img2img_strength_bounds_and_heun_begins_at_a_predictor():
    s = get_scheduler("dpm++2m")()
    s.set_timesteps(10)
    assert img2img_begin(s, 1.0) == 0 and img2img_begin(s, 0.01) == 9  # one step at least
    for bad in (0, -0.5, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="strength"):
            img2img_begin(s, bad)
    h = get_scheduler("heun")()
    h.set_timesteps(10)
    with pytest.raises(ValueError, match="corrector"):
        h.set_begin_index(3)
    with pytest.raises(ValueError, match="begin_index"):
        s.set_begin_index(10)
    h.set_timesteps(10)
    assert h.begin_index == 0


def _repaint_two_pixels(resample: int, jump_length: int, steps: int = 50,
                        reconstruction: float = 0.0):  # fmt: skip
    """Two pixels, jointly Gaussian N(0, sd^2 [[1, rho], [rho, 1]]): the first kept at c,
    the second filled by RePaint with DDPM. Returns the filled pixels, the kept ones,
    the network calls, and the exact conditional law N(rho c, sd^2 (1 - rho^2))."""
    sd, rho, c = 0.5, 0.9, 0.8
    net = _Counted(_gaussian_eps(np.zeros(2), sd**2 * np.array([[1, rho], [rho, 1]])))
    B = 4000
    gen = torch.Generator().manual_seed(0)
    image = torch.tensor([c, -0.7], dtype=torch.float64).expand(B, 2).clone()
    mask = torch.tensor([0.0, 1.0], dtype=torch.float64).expand(B, 2)
    noise = torch.randn(B, 2, generator=gen, dtype=torch.float64)
    s = get_scheduler("ddpm")(clip_sample=False)
    s.set_timesteps(steps)
    out = repaint(net, s, image, mask, noise, gen, jump_length=jump_length, resample=resample,
                  reconstruction=reconstruction)  # fmt: skip
    assert torch.equal(out[:, 0], image[:, 0])  # kept exactly
    return out[:, 1], net.calls, (rho * c, sd * math.sqrt(1 - rho**2))


def test_repaint_resampling_draws_the_filled_pixel_from_its_conditional_law():
    """The plain replacement method (resample 1) ignores most of what the kept pixel says
    (its mean lands 0.25 short of the conditional mean); RePaint's resampling, going
    back one step five times per step, lands within 0.1 of it (Lugmayr et al. §4.2:
    resampling harmonises the filled region with the known one)."""
    plain, calls, (mean, sd) = _repaint_two_pixels(resample=1, jump_length=1)
    assert calls == 50
    assert abs(float(plain.mean()) - mean) > 0.2
    harmonised, calls, _ = _repaint_two_pixels(resample=5, jump_length=1)
    assert calls == repaint_calls(50, 1, 5) == 50 + 4 * 49
    assert abs(float(harmonised.mean()) - mean) < 0.1
    assert abs(float(harmonised.std()) - sd) < 0.06


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_move_x0_moves_the_estimate_that_step_reads_by_delta(kind):
    """For each parameterisation, the moved output's x_0 (unclipped, and the one a DDIM
    step with eta 0 uses, written out as sqrt(abar_prev) x_0 + sqrt(1 - abar_prev) eps)
    is the old one plus delta."""
    s = get_scheduler("ddim")(prediction_type=kind, clip_sample=False, eta=0.0)
    s.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    x, out, delta = (torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = int(s.timesteps[3])
    moved = s.move_x0(out, t, delta)
    assert torch.allclose(s.x0_estimate(moved, t, x), s.x0_estimate(out, t, x) + delta)
    a, ap = float(ABAR[t]), float(ABAR[int(s.timesteps[4])])
    x0 = s.x0_estimate(out, t, x) + delta
    eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
    want = math.sqrt(ap) * x0 + math.sqrt(1 - ap) * eps
    assert torch.allclose(s.step(moved, t, x).prev_sample, want)


def test_reconstruction_guidance_moves_the_estimate_by_its_gradient_formula():
    """A network answering eps = 0 has x_0 = x / sqrt(abar): the squared error's gradient
    is -2 keep (known - x_0) / sqrt(abar), so weight w moves x_0 by w keep (known - x_0):
    weight 1 puts the kept pixels' estimate exactly on the known ones and leaves the
    filled ones alone."""
    s = get_scheduler("ddpm")(clip_sample=False)
    s.set_timesteps(20)
    g = torch.Generator().manual_seed(2)
    x, known = torch.randn(2, 1, 4, 4, generator=g), torch.rand(2, 1, 4, 4, generator=g)
    keep = (torch.arange(4) < 2).float().view(1, 1, 1, 4).expand(2, 1, 4, 4)
    t = s.timesteps[5]
    x0 = x / math.sqrt(float(ABAR[int(t)]))
    for w in (1.0, 0.5):
        out = reconstruction_guided(lambda x, t: torch.zeros_like(x), s, x, t, known, keep, w)
        got = s.x0_estimate(out, t, x)
        assert torch.allclose(got, x0 + w * keep * (known - x0), atol=1e-5)
    with torch.no_grad():  # the caller's no-grad mode does not stop it
        out = reconstruction_guided(lambda x, t: torch.zeros_like(x), s, x, t, known, keep, 1.0)
    assert torch.allclose(s.x0_estimate(out, t, x) * keep, known * keep, atol=1e-5)


def test_reconstruction_guidance_brings_the_plain_method_to_the_conditional_mean():
    """On the two Gaussian pixels, the plain replacement method lands 0.25 short of the
    conditional mean; with reconstruction guidance of weight 2 and no walks back it
    lands within 0.05 of it at 50 calls (RePaint needed 246). The guidance is an
    approximation, not an exact sampler: it narrows the spread (0.165 against 0.218)."""
    filled, calls, (mean, sd) = _repaint_two_pixels(resample=1, jump_length=1, reconstruction=2.0)
    assert calls == 50
    assert abs(float(filled.mean()) - mean) < 0.06
    assert 0.13 < float(filled.std()) < sd
    net, image, noise = (
        _Counted(lambda x, t: torch.zeros_like(x)),
        torch.zeros(3, 2),
        torch.ones(3, 2),
    )
    mask = torch.tensor([0.0, 1.0]).expand(3, 2)
    s = get_scheduler("ddpm")()
    s.set_timesteps(5)
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(ValueError, match="reconstruction"):
            repaint(net, s, image, mask, noise, resample=1, reconstruction=bad)
    euler = get_scheduler("euler")()
    euler.set_timesteps(5)
    with pytest.raises(ValueError, match="ddpm or ddim"):
        repaint(net, euler, image, mask, noise, resample=1, reconstruction=1.0)


def test_repaint_jumps_and_refuses_what_it_cannot_do():
    """Jumps of several steps: each stretch but the last is walked `resample` times."""
    _, calls, _ = _repaint_two_pixels(resample=3, jump_length=5, steps=20)
    assert calls == repaint_calls(20, 5, 3) == 20 + 2 * 5 * 3
    image, noise = torch.zeros(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    s = get_scheduler("dpm++2m")()
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="ddpm or ddim"):
        repaint(lambda x, t: x, s, image, torch.ones(2, 1, 4, 4), noise, resample=2)
    with pytest.raises(ValueError, match="mask must be"):
        repaint(lambda x, t: x, s, image, torch.ones(2, 1, 3, 4), noise, resample=1)
    with pytest.raises(ValueError, match="jump_length"):
        repaint(lambda x, t: x, s, image, torch.ones(2, 1, 4, 4), noise, jump_length=0)
    # a counting solver with resample 1: the plain replacement method
    out = repaint(lambda x, t: torch.zeros_like(x), s, image + 0.5, torch.ones(2, 1, 4, 4)
                  * (torch.arange(4) >= 2), noise, resample=1)  # fmt: skip
    assert torch.equal(out[..., :2], torch.full((2, 1, 4, 2), 0.5))


# --- the pipeline and the CLI on tiny runs ------------------------------------------------


def _png(path, array, mode=None):
    from PIL import Image

    Image.fromarray(array, mode).save(path)
    return path


def _shapes_image(size: int = 32) -> np.ndarray:
    """Every uint8 value, so that the round trip through [-1, 1] is checked for all."""
    return (np.arange(size * size * 3) % 256).astype(np.uint8).reshape(size, size, 3)


def test_inpainting_keeps_every_known_pixel_and_fills_the_mask(diffusion_runs, tmp_path):
    import aigc
    from aigc.data.images import to_uint8

    pipe = aigc.load(diffusion_runs["t2i"], ema=False)
    image = _shapes_image()
    mask = np.zeros((32, 32), np.uint8)
    mask[16:, :] = 255  # the lower half: white = fill
    img_path, mask_path = _png(tmp_path / "in.png", image), _png(tmp_path / "m.png", mask)
    calls = []
    out = pipe.inpaint(img_path, mask_path, prompt="a red circle", n=2, num_inference_steps=10,
                       seed=3, callback=lambda i, c, x: calls.append((i, c)))  # fmt: skip
    got = to_uint8(out.images)
    assert got.shape == (2, 32, 32, 3) and out.prompts == ["a red circle"] * 2
    assert np.array_equal(got[:, :16], np.broadcast_to(image[:16], (2, 16, 32, 3)))
    assert not np.array_equal(got[:, 16:], np.broadcast_to(image[16:], (2, 16, 32, 3)))
    assert calls[-1] == (10, 10) and len(calls) == 10  # defaults: no walks back, guided
    again = pipe.inpaint(img_path, mask_path, prompt="a red circle", n=2,
                         num_inference_steps=10, seed=3)  # fmt: skip
    assert torch.equal(again.images, out.images)  # the seed fixes the filling
    # OpenAI's convention: the transparent pixels of the image itself
    rgba = np.dstack([image, np.where(mask > 0, 0, 255).astype(np.uint8)])
    assert pipe.edit_kind(_png(tmp_path / "t.png", rgba, "RGBA")) == "inpaint"
    alpha_out = pipe.edit(tmp_path / "t.png", prompt="a red circle", n=2, num_inference_steps=10,
                          seed=3)  # fmt: skip
    assert torch.equal(alpha_out.images, out.images)
    # reconstruction guidance: under the pipeline's inference mode, kept pixels exact
    kw = {"prompt": "a red circle", "n": 2, "num_inference_steps": 10, "seed": 3, "resample": 1}
    plain = pipe.inpaint(img_path, mask_path, reconstruction=0, **kw).images
    guided = pipe.inpaint(img_path, mask_path, reconstruction=20, **kw).images
    assert np.array_equal(to_uint8(guided)[:, :16], got[:, :16])
    assert not torch.equal(guided[:, :, 16:], plain[:, :, 16:])  # the weight reached the loop


def test_img2img_strength_decides_how_much_of_the_image_survives(diffusion_runs, tmp_path):
    import aigc

    pipe = aigc.load(diffusion_runs["ddpm"], ema=False)
    digit = np.zeros((32, 32), np.uint8)
    digit[8:24, 14:18] = 255  # a one
    path = _png(tmp_path / "one.png", digit)
    x = torch.from_numpy(digit).float() / 127.5 - 1
    assert pipe.edit_kind(path) == "img2img"
    steps = {"num_inference_steps": 10, "scheduler": "ddim", "seed": 0, "n": 3, "labels": 1}
    # one step from the 10-step grid's lowest level, sqrt(1 - abar) = 0.01: kept
    low = pipe.img2img(path, strength=0.05, **steps).images
    high = pipe.img2img(path, strength=1.0, **steps).images
    assert (low[:, 0] - x).abs().max() < 0.1
    assert (high[:, 0] - x).abs().mean() > 5 * (low[:, 0] - x).abs().mean()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p, d: p.inpaint(d / "in.png", d / "small.png"), "mask is 16x16 but the image"),
        (lambda p, d: p.inpaint(d / "in.png", d / "black.png"), "marks no pixel"),
        (lambda p, d: p.inpaint(d / "in.png", d / "white.png"), "marks every pixel"),
        (lambda p, d: p.inpaint(d / "in.png"), "no mask"),
        (lambda p, d: p.inpaint(d / "in.png", d / "m.png", scheduler="dpm++2m", resample=3),
         "ddpm or ddim"),
        (lambda p, d: p.img2img(d / "in.png", strength=0), "strength"),
        (lambda p, d: p.img2img(d / "in.png", strength=1.5), "strength"),
        (lambda p, d: p.img2img(d / "notes.png"), "is not an image"),
        (lambda p, d: p.img2img(d / "wide.png"), "give a square image"),
        (lambda p, d: p.edit(d / "in.png", d / "m.png", strength=0.5), "strength is for"),
        (lambda p, d: p.inpaint(d / "in.png", d / "m.png", reconstruction=-1), "reconstruction"),
        (lambda p, d: p.inpaint(d / "in.png", d / "m.png", scheduler="euler", resample=1,
                                reconstruction=2), "needs the ddpm or ddim"),
        (lambda p, d: p.edit(d / "in.png", strength=0.5, reconstruction=2), "is for inpainting"),
    ],
)  # fmt: skip
def test_bad_editing_input_is_named(diffusion_runs, tmp_path, call, message):
    import aigc
    from aigc.errors import RequestError

    pipe = aigc.load(diffusion_runs["t2i"], ema=False)
    _png(tmp_path / "in.png", _shapes_image())
    m = np.zeros((32, 32), np.uint8)
    m[:8] = 255
    _png(tmp_path / "m.png", m)
    _png(tmp_path / "small.png", np.zeros((16, 16), np.uint8))
    _png(tmp_path / "black.png", np.zeros((32, 32), np.uint8))
    _png(tmp_path / "white.png", np.full((32, 32), 255, np.uint8))
    _png(tmp_path / "wide.png", np.zeros((32, 48, 3), np.uint8))
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(RequestError, match=message):
        call(pipe, tmp_path)


def test_a_larger_or_grayscale_image_is_resized_and_converted_with_a_warning(
    diffusion_runs, tmp_path
):
    import aigc
    from aigc.pipelines.editing import EditWarning

    pipe = aigc.load(diffusion_runs["t2i"], ema=False)
    _png(tmp_path / "big.png", np.full((64, 64), 200, np.uint8))
    with pytest.warns(EditWarning) as seen:
        out = pipe.img2img(tmp_path / "big.png", strength=0.3, num_inference_steps=4, seed=0)
    said = " ".join(str(w.message) for w in seen)
    assert "resized from 64x64 to 32x32" in said and "grayscale image converted" in said
    assert out.images.shape == (1, 3, 32, 32)


def test_aigc_edit_from_the_command_line(diffusion_runs, tmp_path):

    run = diffusion_runs["t2i"]
    image = _shapes_image()
    _png(tmp_path / "in.png", image)
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 20:] = 255
    _png(tmp_path / "m.png", mask)
    r = run_cli("edit", str(run), "--image", str(tmp_path / "in.png"), "--mask",
                str(tmp_path / "m.png"), "--prompt", "a blue cross", "--n", "2", "--steps", "6",
                "--seed", "1", "--out", str(tmp_path / "out"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "wrote 2 inpainted images" in r.stdout
    from PIL import Image

    for f in ("00000.png", "00001.png"):
        got = np.asarray(Image.open(tmp_path / "out" / f))
        assert np.array_equal(got[:, :20], image[:, :20])
    r = run_cli("edit", str(run), "--image", str(tmp_path / "in.png"), "--strength", "0.5",
                "--steps", "4", "--out", str(tmp_path / "v.png"))  # fmt: skip
    assert r.returncode == 0 and "image-to-image" in r.stdout, r.stderr
    _png(tmp_path / "small.png", np.zeros((16, 16), np.uint8))
    r = run_cli("edit", str(run), "--image", str(tmp_path / "in.png"), "--mask",
                str(tmp_path / "small.png"))  # fmt: skip
    assert "is 16x16 but the image is 32x32" in r.stderr
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) <= 2
    r = run_cli("edit", str(run), "--image", str(tmp_path / "nothing.png"))
    assert r.returncode == 2 and "no such file" in r.stderr
    r = run_cli("edit", str(run), "--image", str(tmp_path / "in.png"), "--mask",
                str(tmp_path / "m.png"), "--reconstruction", "-3")  # fmt: skip
    assert r.returncode == 2 and "reconstruction=-3.0 must be a number in [0, 1000]" in r.stderr
