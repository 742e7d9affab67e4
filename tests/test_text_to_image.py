"""Text-to-image and EDM in the diffusion family: the text encoder and cross-attention,
guidance with a negative prompt, EDM's preconditioning (Karras et al. 2022, Table 1),
a frozen GPT as text encoder, and the pipeline's and CLI's checks (issue 17)."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import aigc
from aigc.errors import RequestError
from aigc.models.diffusion import Diffusion, DiffusionConfig

from .conftest import ROOT, TINY, run_cli

T2I = ["data.n=96", "data.image_size=16", "train.batch_size=8", "model.width=8",
       "model.channel_mults=[1,2]", "model.groups=4", "model.text_width=16",
       "model.text_heads=2", "model.sample_steps=2", "data.eval_samples=16",
       "train.sample_every=0", "train.eval_every=0", "train.checkpoint_every=0",
       "data.eval_metrics=[]"]  # fmt: skip


def tiny(**kw) -> DiffusionConfig:
    base = dict(image_size=16, channels=3, width=8, channel_mults=[1, 2], num_res_blocks=1,
                attn_resolutions=[8], cross_attn_resolutions=[16, 8], groups=4, text=True,
                text_width=16, text_heads=2, text_layers=1, text_vocab_size=40,
                text_context=12, text_start_id=0)  # fmt: skip
    return DiffusionConfig(**{**base, **kw})


def _awake(m: torch.nn.Module) -> torch.nn.Module:
    """Weights away from the zero init, so that every input matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def test_padding_is_invisible_and_the_caption_matters():
    m = _awake(Diffusion(tiny())).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 700])
    ids = torch.tensor([[0, 5, 9, 3], [0, 7, -1, -1]])
    padded = torch.cat([ids, torch.full((2, 5), -1)], 1)
    a = m.unet(x, t, None, m.encode_text(ids))
    b = m.unet(x, t, None, m.encode_text(padded))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    other = torch.tensor([[0, 6, 9, 3], [0, 7, 8, -1]])
    c = m.unet(x, t, None, m.encode_text(other))
    assert (a - c).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # each row reads its caption


def test_guidance_with_a_negative_prompt_is_eq_6_with_its_output():
    m = _awake(Diffusion(tiny())).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor(300)
    ids, neg = torch.tensor([[0, 5, 9], [0, 7, 2]]), torch.tensor([[0, 11, -1], [0, 12, 13]])
    cond = m.unet(x, t.expand(2), None, m.encode_text(ids))
    unc = m.unet(x, t.expand(2), None, m.encode_text(neg))
    got = m.denoise(x, t, None, 4.0, m.encode_text(ids), m.encode_text(neg))
    torch.testing.assert_close(got, unc + 4.0 * (cond - unc), atol=1e-5, rtol=1e-4)
    w = torch.tensor([1.0, 3.0])  # one scale per row (requests batched together)
    got = m.denoise(x, t, None, w, m.encode_text(ids), m.encode_text(neg))
    torch.testing.assert_close(got, unc + w.view(2, 1, 1, 1) * (cond - unc), atol=1e-5, rtol=1e-4)


def test_captions_are_dropped_to_the_empty_caption():
    torch.manual_seed(0)
    m = Diffusion(tiny(cond_drop=0.5))
    seen = []
    encode = m.encode_text
    m.encode_text = lambda ids: seen.append(ids.clone()) or encode(ids)

    class Step:
        def update(self, name, loss):
            loss.backward()

    ids = torch.tensor([[0, 5, 9, 3]] * 64)
    m.training_step({"images": torch.randn(64, 3, 16, 16), "text": ids}, Step())
    got = seen[0]
    dropped = (got[:, 1:] == -1).all(1) & (got[:, 0] == 0)
    kept = (got == ids).all(1)
    assert bool((dropped | kept).all()) and 16 < int(dropped.sum()) < 48


def test_edm_preconditioning_is_karras_table_1():
    cfg = tiny(text=False, preconditioning="edm", sigma_data=0.5)
    m = _awake(Diffusion(cfg)).eval()
    sigma = torch.tensor([0.002, 0.5, 80.0])
    c_skip, c_out, c_in, c_noise = m._precondition(sigma)
    for i, s in enumerate(sigma.tolist()):
        assert math.isclose(c_skip[i], 0.25 / (s * s + 0.25), rel_tol=1e-5)
        assert math.isclose(c_out[i], s * 0.5 / math.sqrt(s * s + 0.25), rel_tol=1e-5)
        assert math.isclose(c_in[i], 1 / math.sqrt(s * s + 0.25), rel_tol=1e-5)
        assert math.isclose(c_noise[i], math.log(s) / 4, rel_tol=1e-5, abs_tol=1e-7)
    # the model answers a scheduler at timestep t with D(x sqrt(1 + sigma_t^2); sigma_t)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    t = torch.tensor([0, 499, 999])
    s = ((1 - abar[t]) / abar[t]).sqrt().float()
    torch.testing.assert_close(m.sigma_at(t), s, rtol=1e-5, atol=0)
    x = torch.randn(3, 3, 16, 16)
    ve = x * (1 + s**2).sqrt().view(3, 1, 1, 1)
    sd2 = 0.25
    v = (s**2 + sd2).view(3, 1, 1, 1)
    f = m.unet(ve / v.sqrt(), 1000 * (s.log() / 4), None, None)
    want = sd2 / v * ve + (s.view(3, 1, 1, 1) * 0.5 / v.sqrt()) * f
    torch.testing.assert_close(m.net(x, t, None, None), want, atol=1e-4, rtol=1e-4)
    assert m.scheduler("ddim").prediction_type == "sample"


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler", "heun", "dpm++2m"])
def test_an_edm_text_model_samples_with_every_scheduler(name):
    torch.manual_seed(0)
    m = _awake(Diffusion(tiny(preconditioning="edm")))
    ids = torch.tensor([[0, 5, 9], [0, 7, -1]])
    out = m.generate(torch.randn(2, 3 * 16 * 16), scheduler=name, steps=3, guidance=2.0,
                     text=ids, generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()


def test_edm_training_weights_the_denoiser_loss_by_lambda():
    """F's plain MSE to (x0 - c_skip x) / c_out equals lambda(sigma) ||D - x0||^2 with
    lambda = (sigma^2 + sd^2) / (sigma sd)^2 (Karras et al. eq. 8 and Table 1)."""
    m = _awake(Diffusion(tiny(text=False, preconditioning="edm")))
    torch.manual_seed(3)
    x0 = torch.randn(4, 3, 16, 16).clamp(-1, 1)
    got = {}

    class Step:
        def update(self, name, loss):
            got["loss"] = loss

    torch.manual_seed(5)
    m.training_step({"images": x0}, Step())
    torch.manual_seed(5)  # the same draws, by hand
    torch.rand(4)  # the dropout draw (labels only; drawn regardless)
    noise = torch.randn_like(x0)
    sigma = (torch.randn(4) * 1.2 - 1.2).exp()
    xn = x0 + sigma.view(4, 1, 1, 1) * noise
    sd = 0.5
    d = m.net(xn / (1 + sigma**2).sqrt().view(4, 1, 1, 1), _t_of(m, sigma), None, None)
    lam = (sigma**2 + sd**2) / (sigma * sd) ** 2
    want = (lam.view(4, 1, 1, 1) * (d - x0) ** 2).mean()
    torch.testing.assert_close(got["loss"], want, rtol=2e-3, atol=1e-6)


def _t_of(m: Diffusion, sigma: torch.Tensor) -> torch.Tensor:
    """Fractional timesteps whose schedule sigma is ``sigma`` (inverting sigma_at)."""
    logs = m.log_sigmas.double()
    out = np.interp(sigma.double().log().numpy(), logs.numpy(), np.arange(len(logs)))
    return torch.from_numpy(out).float()


# -- runs -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def t2i_run(diffusion_runs):
    return diffusion_runs["t2i"]


def test_the_pipeline_takes_prompts(t2i_run):
    pipe = aigc.load(t2i_run, ema=False)  # two steps from the zero init: not the EMA
    assert pipe.text_conditional and (t2i_run / "tokenizer.json").is_file()
    a = pipe(3, prompt="a large blue square in the centre", num_inference_steps=2,
             guidance_scale=3.0, scheduler="ddim", seed=0)  # fmt: skip
    assert (
        a.images.shape == (3, 3, 32, 32) and a.prompts == ["a large blue square in the centre"] * 3
    )
    b = pipe(3, prompt="a large blue square in the centre", num_inference_steps=2,
             guidance_scale=3.0, scheduler="ddim", seed=0)  # fmt: skip
    torch.testing.assert_close(a.images, b.images)
    c = pipe(3, prompt="a small red circle at the top left", num_inference_steps=2,
             guidance_scale=3.0, scheduler="ddim", seed=0, negative_prompt="a cross")  # fmt: skip
    assert not torch.equal(a.images, c.images)  # two steps in: the prompt barely matters yet


def test_batched_requests_equal_solo_ones(t2i_run):
    from aigc.pipelines.diffusion import DiffusionRequest

    pipe = aigc.load(t2i_run)
    reqs = [DiffusionRequest(2, "a small red circle at the top left", None, None, 3, 2.0, "ddim", 1),
            DiffusionRequest(1, "a large white cross", "a circle", None, 3, 5.0, "ddim", 7),
            DiffusionRequest(1, None, None, None, 4, 1.0, "euler", 2)]  # fmt: skip
    together = pipe.run_batch([pipe.prepare(r) for r in reqs])
    for req, got in zip(reqs, together, strict=True):
        alone = pipe.run_batch([pipe.prepare(req)])[0]
        torch.testing.assert_close(got.images, alone.images, atol=2e-5, rtol=0)


def test_bad_requests_say_what_is_wrong(t2i_run, tmp_path):
    pipe = aigc.load(t2i_run)
    for kw, match in [
        (dict(labels="shape=circle"), "prompt instead of giving labels"),
        (dict(prompt="a red circle " * 40), "this model reads at most"),
        (dict(prompt="x", guidance_scale=-1.0), "guidance_scale"),
        (dict(prompt="x", num_inference_steps=0), "num_inference_steps"),
        (dict(prompt="x", scheduler="dpm"), "known scheduler"),
        (dict(prompt=["a", "b"]), "2 prompts for n=3"),
    ]:
        with pytest.raises(RequestError, match=match):
            pipe(3, **kw)
    cond = aigc.train(ROOT / "configs" / "ddpm-digits-cond.yaml",
                      ["train.max_steps=1", "train.batch_size=8", "model.width=8",
                       "model.sample_steps=2", "data.eval_samples=10", "train.sample_every=0",
                       "train.eval_every=0", "data.eval_metrics=[]"],
                      run_dir=tmp_path / "cond", progress=False)  # fmt: skip
    with pytest.raises(RequestError, match="not a text-to-image model"):
        aigc.load(cond.run_dir)(1, prompt="a seven")


def test_cli_samples_from_a_prompt(t2i_run, tmp_path):
    out = tmp_path / "grid.png"
    r = run_cli("sample", str(t2i_run), "--prompt", "a small red circle", "--prompt",
                 "a large blue cross", "--n", "2", "--steps", "2", "--scheduler", "dpm++2m",
                 "--guidance", "2", "--negative-prompt", "a square", "--seed", "0",
                "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    from PIL import Image

    assert Image.open(out).size[0] > 16 and "wrote 4 images" in r.stdout
    for args, match in [(["--steps", "0"], "num_inference_steps"),
                        (["--scheduler", "eulr"], "did you mean 'euler'"),
                        (["--class", "3"], "prompt instead of giving labels")]:  # fmt: skip
        r = run_cli("sample", str(t2i_run), "--prompt", "x", *args)
        assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr


def test_a_frozen_gpt_encodes_the_captions(tmp_path, corpus_file):
    gpt = aigc.train(ROOT / "configs" / "gpt-pydoc-char.yaml",
                     [*TINY, f"data.path={corpus_file}", "train.max_steps=2",
                      "train.eval_every=0", "train.sample_every=0"],
                     run_dir=tmp_path / "gpt", progress=False)  # fmt: skip
    run = tmp_path / "t2i"
    aigc.train(ROOT / "configs" / "t2i-shapes.yaml",
               [*T2I, "train.max_steps=2", "train.ema=0", f"model.text_encoder={gpt.run_dir}"],
               run_dir=run, progress=False)  # fmt: skip
    assert (run / "tokenizer.json").read_bytes() == (gpt.run_dir / "tokenizer.json").read_bytes()
    base = aigc.load(gpt.run_dir, ema=False).model.state_dict()
    ckpt = max((run / "checkpoints").iterdir())
    saved = load_file(ckpt / "model.safetensors")
    for k, v in base.items():  # copied in and never trained (lm_head is tied to wte)
        if k == "lm_head.weight":
            continue
        torch.testing.assert_close(saved[f"text_encoder.gpt.{k}"], v)
    shutil.rmtree(gpt.run_dir)  # the run holds its text encoder: it needs no GPT run
    out = aigc.load(run)(2, prompt="a small red circle", num_inference_steps=2, seed=0)
    assert torch.isfinite(out.images).all()


def test_64_pixel_images_keep_their_shape():
    m = Diffusion(tiny(image_size=64, channel_mults=[1, 1, 2, 2], cross_attn_resolutions=[16, 8]))
    x = torch.randn(2, 3, 64, 64)
    ctx = m.encode_text(torch.tensor([[0, 3], [0, 4]]))
    assert m.unet(x, torch.tensor([1, 2]), None, ctx).shape == x.shape
    crosses = [b for b in m.unet.modules() if type(b).__name__ == "CrossAttention"]
    assert len(crosses) == 7  # one down block at 16 and 8, the middle, two up blocks at 8 and 16


def test_the_judge_learns_the_held_out_compositions_too(t2i_run, monkeypatch):
    """The domain classifier judging a run with data.holdout learns from all its images:
    trained on the training split alone it never sees a red circle, and on real held-out
    images it named the shape right only half the time."""
    import aigc.metrics.classifier as classifier

    pipe = aigc.load(t2i_run)
    meta = pipe.task.meta
    assert meta["holdout"] and meta["n_holdout"] > 0  # the recipe holds compositions out
    seen = {}

    def fake(key, images, labels, classes):
        seen.update(key=key, n=len(images), shapes=labels["shape"], colours=labels["colour"])
        return "judge"

    monkeypatch.setattr(classifier, "cached_classifier", fake)
    assert pipe.task.classifier() == "judge"
    assert seen["n"] == meta["n_train"] + meta["n_val"] and seen["key"].endswith("|all")
    red, circle = meta["classes"]["colour"].index("red"), meta["classes"]["shape"].index("circle")
    assert ((seen["colours"] == red) & (seen["shapes"] == circle)).any()


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler", "heun", "dpm++2m"])
def test_every_scheduler_of_an_image_model_clamps_x0(name):
    """An epsilon model's x_0 estimate x - sigma eps is unbounded at the top of the
    schedule (sigma ~ 157); each step must see it clamped to the images' [-1, 1]."""
    m = Diffusion(tiny(text=False))
    s = m.scheduler(name)
    assert s.clip_sample
    s.set_timesteps(4)
    x = torch.randn(2, 3, 16, 16) * s.init_noise_sigma
    t = s.timesteps[0]
    out = s.step(torch.randn(2, 3, 16, 16) * 3, t, x, generator=torch.Generator().manual_seed(0))
    assert out.pred_original_sample.abs().max() <= 1.0
