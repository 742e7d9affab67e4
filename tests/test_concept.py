"""Teaching a text-to-image run a new concept (aigc finetune T2I_RUN --method lora
data.path=FOLDER): the embedded stars (a shape the shapes set lacks), the batches that
replay the base's own data, the adapters and the new word's embeddings that train while
everything else stays the base's, and the run that loads, samples and continues."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import aigc
from aigc.config import load_config
from aigc.data.images import load_image_set
from aigc.data.shapes import STAR_EXTENT, STAR_INNER, generate_shapes
from aigc.errors import ConfigError
from aigc.runs import RunDir
from aigc.tasks import get_task
from aigc.training import run_config

from .conftest import run_cli


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    yield


def test_stars_are_drawn_where_the_same_seed_puts_the_shapes_and_cover_a_stars_area():
    stars = load_image_set("shapes-stars", image_size=32, n=50, seed=4)
    shapes = generate_shapes(50, 32, seed=4)
    assert list(stars.labels) == ["colour", "size", "position"]
    for a in stars.labels:
        assert np.array_equal(stars.labels[a], shapes.labels[a])
    assert all(" star " in c for c in stars.captions)
    assert stars.captions[0] == shapes.captions[0].replace(
        f" {shapes.classes['shape'][shapes.labels['shape'][0]]} ", " star "
    )
    # the area drawn against a five-pointed star's: ten triangles of sides R and rho*R
    # meeting at the centre at an angle of pi/5
    big = load_image_set("shapes-stars", image_size=512, n=6, seed=1)
    white = big.images.max(axis=-1).astype(np.float64).max(axis=(1, 2))  # the colour's peak
    covered = big.images.max(axis=-1).sum(axis=(1, 2)) / white
    from aigc.data.shapes import RADIUS, SIZE_JITTER

    u = np.random.default_rng(1).random((6, 10))
    r = np.asarray(RADIUS)[(u[:, 2] * 2).astype(int)] * (1 + SIZE_JITTER * (2 * u[:, 4] - 1))
    outer = STAR_EXTENT * r * 512
    area = 10 * 0.5 * outer * (STAR_INNER * outer) * math.sin(math.pi / 5)
    assert np.allclose(covered, area, rtol=0.03), (covered, area)


def _concept(base, tmp_path, *extra: str, method: str = "lora"):
    return aigc.finetune(base, ["data.path=shapes-stars", "data.n=20", "train.max_steps=3",
                                "train.checkpoint_every=3", *extra], method=method,
                         run_dir=tmp_path / "concept", progress=False)  # fmt: skip


def test_a_concept_lora_trains_the_adapters_and_the_new_words_only(diffusion_runs, tmp_path):
    base = diffusion_runs["t2i"]
    before = load_file(str(RunDir(base).latest_checkpoint() / "model.safetensors"))
    out = _concept(base, tmp_path, "train.lr=0.05")
    cfg = run_config(RunDir(out.run_dir))
    assert cfg.train.lora_targets == ["kv"] and cfg.data.prior_share == 0.5
    assert (out.run_dir / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    task = get_task("diffusion").open(cfg, RunDir(out.run_dir))
    coder = task.coder
    base_meta = json.loads((base / "data" / "meta.json").read_text())
    seen = {t for c in base_meta["captions"][: base_meta["n_train"]] for t in coder.ids(c)}
    new = sorted({t for c in task.data.meta["captions"] for t in coder.ids(c)} - seen)
    assert new, "the word star is new to the base's captions"
    after = load_file(str(RunDir(out.run_dir).latest_checkpoint() / "model.safetensors"))
    tok = "text_encoder.tok.weight"
    old = [i for i in range(before[tok].shape[0]) if i not in new]
    assert torch.equal(after[tok][old], before[tok][old])  # the base's words are untouched
    assert not torch.equal(after[tok][new], before[tok][new])  # the new word's learnt
    lora = [k for k in after if "lora_" in k]
    assert lora and all(".kv." in k for k in lora)
    # the saved run stores the adapters and the embedding, not the frozen U-Net
    assert not any(k.startswith("unet.") and "lora_" not in k for k in after)
    metrics = [json.loads(line) for line in (out.run_dir / "metrics.jsonl").open()]
    kv = sum(after[k].numel() for k in lora)
    assert metrics[0]["trainable_params"] == kv + len(new) * before[tok].shape[1]
    gen = aigc.load(out.run_dir)
    images = gen(2, prompt="a large red star in the centre", seed=0).images
    assert images.shape == (2, 3, 32, 32)


def test_every_batch_replays_the_bases_own_images_and_captions(diffusion_runs, tmp_path):
    base = diffusion_runs["t2i"]
    out = _concept(base, tmp_path, "train.batch_size=8", "data.prior_share=0.25")
    cfg = run_config(RunDir(out.run_dir))
    task = get_task("diffusion").open(cfg, RunDir(out.run_dir))
    batch = task.train_batch(5, 0, 0, 1)
    assert batch["images"].shape[0] == batch["text"].shape[0] == 8
    base_images = torch.from_numpy(np.load(base / "data" / "images.npy"))
    base_images = base_images.permute(0, 3, 1, 2).float() / 127.5 - 1
    mine = torch.from_numpy(np.array(task.data.train_images)).permute(0, 3, 1, 2).float()
    mine = mine / 127.5 - 1

    def found_in(x, pool):
        return bool(((pool - x).abs().flatten(1).max(1).values < 1e-6).any())

    assert all(found_in(x, mine) for x in batch["images"][:6])  # 6 new, then 2 of the base's
    assert all(found_in(x, base_images) for x in batch["images"][6:])
    captions = task.coder.encode(json.loads((base / "data" / "meta.json").read_text())["captions"],
                                 truncate=True)  # fmt: skip
    for row in batch["text"][6:]:
        ids = row[row >= 0]
        assert any(torch.equal(ids, c[c >= 0]) for c in captions)
    assert torch.equal(task.train_batch(5, 0, 0, 1)["images"], batch["images"])


def test_bad_concept_fine_tunes_are_named(diffusion_runs, tmp_path):
    with pytest.raises(ConfigError, match="needs the new images"):
        aigc.finetune(diffusion_runs["t2i"], ["train.max_steps=1"], method="lora",
                      run_dir=tmp_path / "x", progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match="prior_share"):
        _concept(diffusion_runs["t2i"], tmp_path, "data.prior_share=1.0")
    folder = tmp_path / "mine"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i}.png", "text": "a star"}) + "\n" for i in range(3))
    )
    r = run_cli("finetune", str(diffusion_runs["t2i"]), f"data.path={folder}",
                "train.batch_size=2", "train.max_steps=1", "--run-dir", str(tmp_path / "y"))  # fmt: skip
    assert r.returncode == 0, r.stderr  # resized to the base's 32x32 on the way in
    assert load_config(tmp_path / "y" / "config.yaml").model.image_size == 32
