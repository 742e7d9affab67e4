"""The diffusion evaluation's further judges: the CLIP-style judge of captioned images
without labels (aigc.metrics.clip), memorisation (aigc.metrics.memorisation), and
evaluating a trained run with another sampler (`aigc eval --scheduler --steps`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import aigc
import aigc.metrics.clip as clip
from aigc.data.shapes import generate_shapes
from aigc.metrics.memorisation import memorisation_share, nearest_pair_distance
from aigc.tasks.images import ImageDataConfig, prepare, to_model_batch

from .conftest import run_cli


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    pass


def captioned_folder(root: Path, n: int, size: int = 16) -> Path:
    """Shapes images as PNGs in one flat folder (no class folders, so no labels) with a
    metadata.jsonl captioning each ("a small red circle at the top left")."""
    ds = generate_shapes(n, image_size=size, seed=5)
    root.mkdir(parents=True)
    rows = []
    for i, (pixels, text) in enumerate(zip(ds.images, ds.captions, strict=True)):
        Image.fromarray(pixels).save(root / f"{i:04d}.png")
        rows.append(json.dumps({"file_name": f"{i:04d}.png", "text": text}) + "\n")
    (root / "metadata.jsonl").write_text("".join(rows), encoding="utf-8")
    return root


# --------------------------------------------------------------------------- memorisation


def brute_force(gen: np.ndarray, train: np.ndarray) -> tuple[float, float]:
    """memorisation_share written out with numpy, every pair at once."""
    d_train = np.sqrt(((train[:, None, :] - train[None, :, :]) ** 2).sum(-1))
    distinct = d_train[np.triu_indices(len(train), 1)]
    threshold = distinct[distinct > 0].min()
    nearest = np.sqrt(((gen[:, None, :] - train[None, :, :]) ** 2).sum(-1)).min(1)
    return float((nearest < threshold).mean()), float(threshold)


def test_memorisation_matches_a_brute_force_computation(monkeypatch):
    import aigc.metrics.memorisation as memo

    rng = np.random.default_rng(0)
    train = rng.normal(size=(300, 6))
    train[17] = train[203]  # an exact duplicate is one image, not a pair at distance 0
    gen = np.concatenate([rng.normal(size=(50, 6)), train[:5] + 1e-9])
    monkeypatch.setattr(memo, "CHUNK", 37)  # chunks that cut rows unevenly
    share, threshold = memorisation_share(gen, train)
    want_share, want_threshold = brute_force(gen, train)
    assert threshold == pytest.approx(want_threshold, rel=1e-12)
    assert share == pytest.approx(want_share) and share >= 5 / 55


def test_planted_training_copies_count_as_memorised():
    train = np.random.default_rng(1).normal(size=(200, 8)).astype(np.float32)
    fresh = np.random.default_rng(2).normal(size=(16, 8)).astype(np.float32)
    share, threshold = memorisation_share(np.concatenate([fresh, train[:4]]), train)
    assert threshold == pytest.approx(nearest_pair_distance(train))
    assert share == pytest.approx(4 / 20)  # the four copies, and no fresh draw
    assert memorisation_share(fresh, train)[0] == 0.0
    with pytest.raises(ValueError, match="distinct"):
        nearest_pair_distance(np.ones((5, 3)))


# --------------------------------------------------------------------------- CLIP metrics


def test_clip_score_is_100_times_the_clipped_cosine():
    gen = torch.Generator().manual_seed(0)
    img, txt = torch.randn(40, 16, generator=gen), torch.randn(40, 16, generator=gen)
    a, b = img.numpy().astype(np.float64), txt.numpy().astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert (cos < 0).any()  # the clipping matters here
    assert clip.clip_score(img, txt) == pytest.approx(100 * np.maximum(cos, 0).mean(), rel=1e-12)
    assert clip.clip_score(3 * img, txt) == pytest.approx(clip.clip_score(img, txt), rel=1e-6)


def test_retrieval_candidates_and_accuracy_against_a_direct_count():
    pool = [f"caption {i % 50}" for i in range(80)]  # repeated texts in the pool
    own = np.array([0, 3, 55, 79, 12])
    cands = clip.retrieval_candidates(own, pool, k=32, seed=0)
    assert cands.shape == (5, 32) and (cands[:, 0] == own).all()
    for row in cands:  # no other candidate has the right caption's words
        assert all(pool[j] != pool[row[0]] for j in row[1:])
    gen = torch.Generator().manual_seed(1)
    pool_emb, img = torch.randn(80, 8, generator=gen), torch.randn(5, 8, generator=gen)
    img[:2] = pool_emb[own[:2]]  # two images that match their caption exactly
    sims = [[float(torch.cosine_similarity(img[i], pool_emb[j], dim=0)) for j in row]
            for i, row in enumerate(cands)]  # fmt: skip
    want = np.mean([s[0] > max(s[1:]) for s in sims])
    assert clip.retrieval_accuracy(img, pool_emb, cands) == pytest.approx(want) and want >= 0.4
    assert clip.retrieval_chance(cands, pool) == pytest.approx(1 / 32)
    ten = [f"a handwritten {d}" for d in range(10)] * 5  # digits: only ten captions
    c10 = clip.retrieval_candidates(np.arange(3), ten, seed=0)
    assert clip.retrieval_chance(c10, ten) == pytest.approx(1 / 10)


# --------------------------------------------------------------------------- the CLIP judge


def test_the_clip_judge_retrieves_held_out_captions_and_is_cached(tmp_path, monkeypatch):
    folder = captioned_folder(tmp_path / "shapes", 400)
    data = prepare(ImageDataConfig(source=str(folder), image_size=16, val_fraction=0.2),
                   tmp_path / "run" / "data", seed=0)  # fmt: skip
    assert data.labels is None and len(data.meta["captions"]) == 400
    train_caps = data.meta["captions"][: data.n_train]
    key = data.meta["sha256"]
    judge = clip.cached_clip(key, data.train_images, train_caps, steps=100)
    pool = list(data.meta["captions"][data.n_train :])
    cands = clip.retrieval_candidates(np.arange(len(pool)), pool, seed=0)
    img = judge.model.image_features(to_model_batch(data.val_images))
    accuracy = clip.retrieval_accuracy(img, judge.model.text_features(pool), cands)
    assert accuracy > 0.3  # chance is 1/32 (0.031)

    path = clip._cache_path(judge.key)
    mtime = path.stat().st_mtime_ns

    def no_training(*args, **kw):
        raise AssertionError("the cached judge was retrained")

    monkeypatch.setattr(clip, "train_clip", no_training)
    again = clip.cached_clip(key, data.train_images, train_caps, steps=100)
    assert path.stat().st_mtime_ns == mtime
    torch.testing.assert_close(again.model.image_features(to_model_batch(data.val_images[:8])),
                               img[:8], rtol=0, atol=1e-6)  # fmt: skip


def test_clip_training_is_deterministic_in_its_seed():
    ds = generate_shapes(64, image_size=16, seed=0)
    a = clip.train_clip(ds.images, ds.captions, steps=3, batch_size=16, seed=4)
    b = clip.train_clip(ds.images, ds.captions, steps=3, batch_size=16, seed=4)
    for (name, x), y in zip(
        a.model.state_dict().items(), b.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


# --------------------------------------------------------------------------- in evaluation

TINY_DIFFUSION = ["train.max_steps=2", "train.batch_size=8", "model.width=8",
                  "model.sample_steps=3", "data.eval_samples=10", "train.sample_every=0",
                  "train.eval_every=0", "train.checkpoint_every=0"]  # fmt: skip


def test_a_captioned_run_without_labels_gets_the_clip_judge_and_memorisation(tmp_path, monkeypatch):
    monkeypatch.setattr(clip, "CLIP_STEPS", 20)
    folder = captioned_folder(tmp_path / "shapes", 120)
    out = aigc.train("t2i-shapes", [*TINY_DIFFUSION, f"data.source={folder}", "data.holdout=[]",
                                    "data.image_size=16", "model.channel_mults=[1,2]",
                                    "model.attn_resolutions=[]", "model.cross_attn_resolutions=[8]",
                                    "model.text_width=16", "model.text_layers=1",
                                    "model.text_heads=2", "model.groups=4"],
                     run_dir=tmp_path / "r", progress=False)  # fmt: skip
    pipe = aigc.load(out.run_dir)
    result = pipe.evaluate()
    for key in ("clip_score", "clip_retrieval", "clip_retrieval_chance", "real/clip_score",
                "real/clip_retrieval", "memorised"):  # fmt: skip
        assert key in result, key
    assert 0 <= result["clip_score"] <= 100 and 0 <= result["memorised"] <= 1
    meta = json.loads((out.run_dir / "data" / "meta.json").read_text())
    distinct = len(set(meta["captions"][meta["n_train"] :]))  # 12 images: < 32 texts
    assert result["clip_retrieval_chance"] == pytest.approx(1 / min(32, distinct))
    text = pipe.format_eval(result)
    assert "clip_retrieval" in text and "real images" in text and "memorised" in text


def test_eval_with_another_sampler_is_saved_apart(tmp_path):
    from aigc.errors import RequestError

    out = aigc.train("ddpm-digits-cond", TINY_DIFFUSION, run_dir=tmp_path / "r", progress=False)
    pipe = aigc.load(out.run_dir)
    own = pipe.evaluate()
    assert 0 <= own["memorised"] <= 1 and "label_accuracy" in own and "sampler" not in own
    eval_json = (out.run_dir / "eval.json").read_text()
    other = pipe.evaluate(scheduler="euler", steps=2)
    assert other["sampler"] == "euler" and other["sample_steps"] == 2
    assert json.loads((out.run_dir / "eval-euler-2.json").read_text())["variant"] == "euler-2"
    assert (out.run_dir / "eval.json").read_text() == eval_json  # the run's own is kept
    assert pipe.model.cfg.sampler == "dpm++2m" and pipe.model.cfg.sample_steps == 3  # restored
    assert "sampled by euler in 2 steps" in pipe.format_eval(other)
    with pytest.raises(RequestError, match="scheduler"):
        pipe.evaluate(scheduler="euler_a", save=False)
    with pytest.raises(RequestError, match="steps"):
        pipe.evaluate(steps=0, save=False)
    # another guidance scale: its own file, and the images really change with it
    own_w = pipe.model.cfg.guidance
    g5 = pipe.evaluate(guidance=5.0)
    assert g5["variant"] == "dpm++2m-3-g5" and g5["guidance"] == 5.0
    assert json.loads((out.run_dir / "eval-dpm++2m-3-g5.json").read_text())["guidance"] == 5.0
    assert pipe.model.cfg.guidance == own_w
    again = pipe.evaluate(guidance=own_w, save=False)
    assert again["fid"] == own["fid"] and g5["fid"] != own["fid"]
    for bad in (-1.0, 51.0):
        with pytest.raises(RequestError, match="guidance"):
            pipe.evaluate(guidance=bad, save=False)

    r = run_cli("eval", str(out.run_dir), "--n", "10", "--scheduler", "heun", "--steps", "2")
    assert r.returncode == 0, r.stderr
    assert "sampled by heun in 2 steps" in r.stdout and "memorised" in r.stdout
    assert json.loads((out.run_dir / "eval-heun-2.json").read_text())["sampler"] == "heun"
    assert (out.run_dir / "eval.json").read_text() == eval_json
