"""Image-to-image translation (CycleGAN, pix2pix): the networks' shapes as the papers
give them, the losses and the image pool, the two-domain data (the shapes styles'
exact pairs, CycleGAN's folder layout and its errors), a pix2pix run that learns and
whose judged numbers are recomputed from the public pieces, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import aigc
from aigc.config import load_config
from aigc.data.shapes import generate_shapes
from aigc.errors import ConfigError, DataError, RequestError
from aigc.metrics.restoration import psnr
from aigc.models.cyclegan import CycleGAN, CycleGANConfig, ImagePool
from aigc.models.layers import least_squares_critic_loss, least_squares_generator_loss
from aigc.models.pix2pix import Pix2Pix, Pix2PixConfig

from .conftest import ROOT, run_cli

CONFIGS = ROOT / "configs"


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    yield


# models ------------------------------------------------------------------------


def test_the_resnet_generators_keep_the_size_and_treat_each_image_alone():
    torch.manual_seed(0)
    model = CycleGAN(CycleGANConfig(image_size=16, channels=3, width=8, blocks=2, d_layers=2))
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    for d in ("a2b", "b2a"):
        y = model.translate(x, d)
        assert y.shape == x.shape and y.abs().max() <= 1
        assert torch.allclose(model.translate(x[:1], d), y[:1], atol=1e-6)
    assert not torch.equal(model.translate(x, "a2b"), model.translate(x, "b2a"))
    assert model.translate(torch.zeros(1, 3, 20, 28), "a2b").shape == (1, 3, 20, 28)
    with pytest.raises(ValueError, match="a2b or b2a"):
        model.translate(x, "b2c")
    with pytest.raises(ConfigError, match="multiple of 4"):
        CycleGANConfig(image_size=18, channels=3).validate()


def test_the_unet_has_the_papers_depth_and_dropout():
    # 256 pixels: eight stride-2 convolutions down to 1x1, dropout in three decoder layers
    # (C64-C128-C256-C512-C512-C512-C512-C512; CD512-CD512-CD512-C512-..., App. 6.1.1)
    big = Pix2Pix(Pix2PixConfig(image_size=256, channels=3, width=64))
    downs = [m for m in big.g.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in downs] == [64, 128, 256, 512, 512, 512, 512, 512]
    assert sum(isinstance(m, nn.Dropout) for m in big.g.modules()) == 3
    small = Pix2Pix(Pix2PixConfig(image_size=32, channels=1, width=8, d_layers=2))
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    y = small.translate(x)
    assert y.shape == x.shape
    assert small.translate(torch.zeros(1, 1, 64, 96)).shape == (1, 1, 64, 96)
    with pytest.raises(ValueError, match="a2b only"):
        small.translate(x, "b2a")
    with pytest.raises(ConfigError, match="power of two"):
        Pix2PixConfig(image_size=24, channels=3).validate()


def test_least_squares_losses_by_hand():
    real, fake = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([0.0, -1.0, 0.5])
    expect = 0.5 * (np.mean([0.0, 0.25, 1.0]) + np.mean([0.0, 1.0, 0.25]))
    assert least_squares_critic_loss(real, fake).item() == pytest.approx(expect)
    assert least_squares_generator_loss(fake).item() == pytest.approx(np.mean([1.0, 4.0, 0.25]))


def test_the_image_pool_stores_until_full_then_swaps_about_half():
    torch.manual_seed(0)
    pool = ImagePool(4, 1, 2)
    first = torch.arange(4.0).reshape(4, 1, 1, 1).expand(4, 1, 2, 2)
    assert torch.equal(pool.query(first), first) and int(pool.count) == 4
    assert torch.equal(pool.images, first)
    old, swapped = set(range(4)), 0
    for k in range(50):
        new = torch.full((2, 1, 2, 2), 100.0 + k)
        before = {float(v) for v in pool.images[:, 0, 0, 0]}
        got = pool.query(new)
        for v in got[:, 0, 0, 0].tolist():
            assert v == 100.0 + k or v in before  # the new image, or one it held
            swapped += v != 100.0 + k
        assert int(pool.count) == 4
    assert 30 <= swapped <= 70, swapped  # each of 100 swapped with probability 1/2
    assert not old & {float(v) for v in pool.images[:, 0, 0, 0]}  # the first were swapped out


def test_cyclegan_updates_its_generators_then_its_critics():
    torch.manual_seed(0)
    model = CycleGAN(CycleGANConfig(image_size=16, channels=3, width=8, blocks=1, d_layers=2,
                                    pool_size=2))  # fmt: skip
    groups = {k: {id(p) for p in v["params"]} for k, v in model.param_groups().items()}
    seen = []

    class Step:
        index = 0

        def update(self, group, loss):
            grads = torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True)
            touched = {id(p) for p, g in zip(model.parameters(), grads, strict=True)
                       if g is not None and g.abs().sum() > 0}  # fmt: skip
            seen.append((group, touched))

    batch = {"a": torch.rand(2, 3, 16, 16) * 2 - 1, "b": torch.rand(2, 3, 16, 16) * 2 - 1}
    out = model.training_step(batch, Step())
    assert [g for g, _ in seen] == ["model", "critic"]
    assert seen[1][1] <= groups["critic"]  # the critics' loss sees the fakes detached
    assert seen[0][1] & groups["model"]
    assert {"loss", "adversarial", "cycle", "identity", "critic"} <= set(out)
    assert int(model.pool_a.count) == 2  # the fakes went into the pools


# data --------------------------------------------------------------------------


def _config(recipe: str, *overrides: str):
    return load_config(CONFIGS / recipe, list(overrides))


def test_the_shapes_styles_are_exact_pairs(tmp_path):
    from aigc.tasks.translate import Pix2PixTask, read_info

    cfg = _config("pix2pix-shapes.yaml", "data.n=60", "data.image_size=16", "train.batch_size=4")
    Pix2PixTask.prepare_data(cfg, tmp_path)
    a = np.load(tmp_path / "a" / "images.npy")
    b = np.load(tmp_path / "b" / "images.npy")
    assert read_info(tmp_path)["paired"] is True
    assert np.array_equal(
        np.load(tmp_path / "a" / "labels.npy"), np.load(tmp_path / "b" / "labels.npy")
    )
    filled = generate_shapes(60, 16, seed=cfg.train.seed)
    outlined = generate_shapes(60, 16, seed=cfg.train.seed, style="outlined")
    rows = [int(np.flatnonzero((filled.images == x).all(axis=(1, 2, 3)))[0]) for x in a]
    assert np.array_equal(b, outlined.images[rows])  # image i of B is image i of A, outlined
    assert cfg.model.direction == "a2b" and cfg.model.image_size == 16


def _folder(root, name, n, size=16, colour=(200, 30, 30)):
    folder = root / name
    folder.mkdir(parents=True)
    for i in range(n):
        pixels = np.zeros((size, size, 3), np.uint8)
        pixels[i % size] = colour
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def test_cyclegans_folder_layout_uses_its_test_folders_and_names_what_is_missing(tmp_path):
    from aigc.tasks.translate import CycleGANTask, Pix2PixTask, read_info

    root = tmp_path / "horse2zebra"
    for name, n in (("trainA", 6), ("trainB", 5), ("testA", 2), ("testB", 3)):
        _folder(root, name, n, colour=(200, 30, 30) if name.endswith("A") else (30, 30, 200))
    over = [f"data.source={root}", "data.image_size=16", "train.batch_size=4"]
    cfg = _config("cyclegan-shapes.yaml", *over)
    CycleGANTask.prepare_data(cfg, tmp_path / "data")
    metas = {k: json.loads((tmp_path / "data" / k / "meta.json").read_text()) for k in "ab"}
    assert [(m["n_train"], m["n_val"]) for m in metas.values()] == [(6, 2), (5, 3)]
    a = np.load(tmp_path / "data" / "a" / "images.npy")
    assert np.array_equal(a[6:, :, :, 0].max(axis=(1, 2)), [200, 200])  # testA held out
    assert read_info(tmp_path / "data")["paired"] is False
    with pytest.raises(ConfigError, match="not known to pair up"):
        Pix2PixTask.prepare_data(_config("pix2pix-shapes.yaml", *over), tmp_path / "p")
    with pytest.raises(DataError, match="do not pair up"):
        Pix2PixTask.prepare_data(
            _config("pix2pix-shapes.yaml", *over, "data.paired=true"), tmp_path / "q"
        )
    (root / "testB").rename(root / "elsewhere")
    with pytest.raises(DataError, match="give both"):
        CycleGANTask.prepare_data(cfg, tmp_path / "r")
    (root / "trainB").rename(root / "gone")
    with pytest.raises(DataError, match="no trainB/ folder"):
        CycleGANTask.prepare_data(cfg, tmp_path / "s")
    r = run_cli("train", str(CONFIGS / "cyclegan-shapes.yaml"), f"data.source={root}",
                "--run-dir", str(tmp_path / "run"))  # fmt: skip
    assert r.returncode == 2 and "no trainB/ folder" in r.stderr, r.stderr


# a run ---------------------------------------------------------------------------

TINY = ["data.n=600", "data.image_size=16", "model.width=16", "model.d_width=16",
        "model.d_layers=2", "train.batch_size=16", "train.eval_every=0", "train.sample_every=0",
        "train.checkpoint_every=1000", "data.eval_samples=60", "train.warmup_steps=5"]  # fmt: skip


@pytest.fixture(scope="module")
def translator(tmp_path_factory):
    """pix2pix from filled to outlined 16x16 shapes, trained 300 steps (seconds)."""
    run = tmp_path_factory.mktemp("pix2pix") / "run"
    aigc.train(CONFIGS / "pix2pix-shapes.yaml", [*TINY, "train.max_steps=300", "train.lr=1e-3"],
               run_dir=run, progress=False)  # fmt: skip
    return run


def test_a_short_pix2pix_run_learns_and_its_numbers_are_recomputable(translator):
    from aigc.data.images import to_tensor, to_uint8

    gen = aigc.load(translator)
    result = gen.evaluate(save=False)
    a_val = np.array(gen.task.domain("a").val_images[:60])
    b_val = np.array(gen.task.domain("b").val_images[:60])
    assert result["count"] == 60
    # far better than an untrained network of the same config, and mostly outlined
    untrained = Pix2Pix(gen.config.model).eval()
    with torch.no_grad():
        guess = to_uint8(untrained.translate(to_tensor(a_val)))
    assert result["psnr_a2b"] > float(np.mean(psnr(guess, b_val))) + 5.0, result
    assert result["judged_target_a2b"] > 0.6, result
    out = np.stack(gen.translate(list(a_val), output="uint8"))
    assert np.mean(psnr(out, b_val)) == pytest.approx(result["psnr_a2b"], abs=1e-6)
    # the judge's verdicts, recomputed from its predictions on the translated images
    clf = gen.task.classifier()
    predicted = clf.model.predict(to_tensor(out))
    assert float((predicted["domain"] == 1).float().mean()) == pytest.approx(
        result["judged_target_a2b"]
    )
    labels = gen.task.domain("a").split_labels("val")[:60]
    attrs = gen.task.domain("a").attributes
    kept = np.ones(60, bool)
    for x in ("shape", "colour", "size", "position"):
        ok = predicted[x].numpy() == labels[:, attrs.index(x)]
        assert ok.mean() == pytest.approx(result[f"content_kept_a2b/{x}"])
        kept &= ok
    assert kept.mean() == pytest.approx(result["content_kept_a2b"])
    real = clf.model.predict(to_tensor(b_val))  # the ceiling: the true outlined images
    assert float((real["domain"] == 1).float().mean()) == pytest.approx(
        result["judged_target_real_a2b"]
    )
    b_labels = gen.task.domain("b").split_labels("val")[:60]
    right = np.all([real[x].numpy() == b_labels[:, attrs.index(x)]
                    for x in ("shape", "colour", "size", "position")], axis=0)  # fmt: skip
    assert right.mean() == pytest.approx(result["content_kept_real_a2b"])
    text = gen.format_eval(result)
    assert "a2b: judged as the target domain" in text and f"{result['psnr_a2b']:.2f} dB" in text


def test_translating_takes_files_and_arrays_and_names_bad_input(translator, tmp_path):
    gen = aigc.load(translator)
    scene = generate_shapes(1, 32, seed=4).images[0]  # twice the training size
    Image.fromarray(scene).save(tmp_path / "in.png")
    from_file = gen.translate(str(tmp_path / "in.png")).images
    assert from_file.shape == (1, 3, 32, 32)
    assert torch.equal(from_file, gen.translate(scene).images)
    with pytest.raises(RequestError, match="multiples of 16"):
        gen.translate(np.zeros((20, 16, 3), np.uint8))
    with pytest.raises(RequestError, match="translates a2b"):
        gen.translate(scene, direction="b2a")
    grid = gen.compare(n=3)  # input | translation | true pair
    assert grid.shape[:2] == (3 * 18 + 2, 3 * 18 + 2)


def test_the_translate_command(translator, tmp_path):
    Image.fromarray(generate_shapes(1, 16, seed=2).images[0]).save(tmp_path / "in.png")
    r = run_cli("translate", str(translator), "--image", str(tmp_path / "in.png"), "--out",
                str(tmp_path / "out.png"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "out.png").size == (16, 16)
    r = run_cli("translate", str(translator), "--held-out", "4", "--out", str(tmp_path / "g.png"))
    assert r.returncode == 0 and Image.open(tmp_path / "g.png").size == (3 * 18 + 2, 4 * 18 + 2)
    r = run_cli("translate", str(translator), "--image", str(tmp_path / "in.png"),
                "--direction", "b2a")  # fmt: skip
    assert r.returncode == 2 and "translates a2b" in r.stderr
    r = run_cli("sample", str(translator))
    assert r.returncode == 2 and "aigc translate" in r.stderr
    (tmp_path / "bad.png").write_bytes(b"GIF89a nothing")
    r = run_cli("translate", str(translator), "--image", str(tmp_path / "bad.png"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) <= 2


def _png(pixels: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_a_translator_answers_image_edits_as_the_python_api_does(translator):
    import base64
    import io

    from aigc.serve.app import create_app
    from aigc.serve.settings import ServeSettings

    from .test_serve import SETTINGS, Server, assert_edits_refused

    pytest.importorskip("openai")
    srv = Server(create_app([translator], ServeSettings(**SETTINGS)))
    try:
        name = translator.name
        card = next(m for m in srv.client().models.list().data if m.id == name)
        assert card.aigc["kind"] == "translate"
        assert card.aigc["translate"]["directions"] == ["a2b"]
        assert card.aigc["translate"]["multiple"] == 16
        scene = generate_shapes(1, 32, seed=4).images[0]
        r = srv.client().images.edit(model=name, image=("in.png", _png(scene), "image/png"),
                                     prompt="", extra_body={"direction": "a2b"})  # fmt: skip
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))))
        want = aigc.load(translator).translate(scene, output="uint8")[0]
        assert np.array_equal(got, want) and got.shape == (32, 32, 3)
        bad = [
            ({"direction": "b2a"}, {"image": _png(scene)}, "direction"),
            ({"prompt": "outline it"}, {"image": _png(scene)}, "prompt"),
            ({"seed": "3"}, {"image": _png(scene)}, "seed"),
            ({}, {"image": _png(scene[:20])}, "image"),
            ({}, {"image": _png(scene), "mask": _png(scene)}, "mask"),
        ]
        assert_edits_refused(srv.url, name, bad)
    finally:
        srv.close()
