"""The diffusion family: the U-Net's contract, classifier-free guidance as the paper
writes it, and the pipeline's diffusers-style call (issue 17, first part)."""

from __future__ import annotations

import math

import pytest
import torch

from aigc.errors import ConfigError
from aigc.models.diffusion import Diffusion, DiffusionConfig, timestep_embedding


def tiny(**kw) -> DiffusionConfig:
    base = dict(image_size=16, channels=3, width=8, channel_mults=[1, 2], num_res_blocks=1,
                attn_resolutions=[8], groups=4, conditional=True, num_classes=[3, 2])  # fmt: skip
    return DiffusionConfig(**{**base, **kw})


def test_timestep_embedding_is_vaswanis():
    t = torch.tensor([0, 7, 999])
    e = timestep_embedding(t, 8)
    k = torch.arange(4)
    f = torch.exp(-math.log(10_000) * k / 4)
    torch.testing.assert_close(
        e, torch.cat([torch.sin(t[:, None] * f), torch.cos(t[:, None] * f)], 1)
    )


def test_the_unet_keeps_the_shape_and_starts_at_zero():
    torch.manual_seed(0)
    m = Diffusion(tiny())
    x = torch.randn(2, 3, 16, 16)
    out = m.unet(x, torch.tensor([5, 900]), torch.tensor([[0, 1], [2, 0]]))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # the last conv is zero-initialised (Ho et al.)


def test_guidance_is_ho_and_salimans_eq_6():
    torch.manual_seed(0)
    m = Diffusion(tiny())
    for p in m.parameters():  # away from the zero init, so that labels matter
        torch.nn.init.normal_(p, 0, 0.05)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor(400)
    y = torch.tensor([[0, 1], [1, 0], [2, 1]])
    cond = m.unet(x, t.expand(3), y)
    uncond = m.unet(x, t.expand(3), torch.tensor([[3, 2]]).expand(3, -1))  # the null labels
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(m.denoise(x, t, y, 3.0), uncond + 3.0 * (cond - uncond))
    torch.testing.assert_close(m.denoise(x, t, y, 1.0), cond)


def test_bad_configs_name_the_key():
    with pytest.raises(ConfigError, match="image_size"):
        tiny(image_size=24).validate()
    with pytest.raises(ConfigError, match=r"model\.sampler"):
        tiny(sampler="euler_a").validate()
    with pytest.raises(ConfigError, match="cond_drop"):
        tiny(cond_drop=1.0).validate()


def test_the_pipeline_takes_diffusers_arguments(tmp_path):
    import aigc

    out = aigc.train("ddpm-digits-cond", ["train.max_steps=2", "train.batch_size=8", "model.width=8",
                                     "model.sample_steps=3", "data.eval_samples=10",
                                     "train.sample_every=0"], run_dir=tmp_path / "r",
                     progress=False)  # fmt: skip
    pipe = aigc.load(out.run_dir)
    a = pipe(4, labels=7, num_inference_steps=3, guidance_scale=2.0, seed=0)
    assert a.images.shape == (4, 1, 32, 32) and a.labels.tolist() == [[7]] * 4
    b = pipe(2, labels=7, num_inference_steps=3, guidance_scale=2.0, seed=0)
    torch.testing.assert_close(b.images, a.images[:2], atol=1e-5, rtol=0)  # seeded per image
    c = pipe(2, labels=7, num_inference_steps=4, scheduler="ddpm", seed=0)
    assert c.images.shape == (2, 1, 32, 32) and not torch.allclose(c.images, a.images[:2])
    with pytest.raises(aigc.errors.RequestError, match="scheduler"):
        pipe(1, scheduler="euler_a")
