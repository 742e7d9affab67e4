"""The conformance suite: what every task guarantees, checked once for all of them.

Each task is listed once in TASKS below (how to make a tiny run of it) and gets every
check: its config round-trips, its batches and step follow the step contract, a saved
run loads and samples the same, seeded samples do not depend on the batch size, and a
run stopped and continued ends bitwise equal to one trained without a stop. A new task
(the diffusion one, the audio ones) is one more entry.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import aigc
from aigc.config import load_config
from aigc.runs import RunDir
from aigc.tasks import TASKS as REGISTRY
from aigc.tasks import get_task, register_task
from aigc.tasks.base import DataFiles, Task
from aigc.training import run_config

from .conftest import RECIPE, ROOT, TINY

CONFIGS = ROOT / "configs"
IMAGES = ["data.source=shapes", "data.n=64", "data.image_size=16", "train.batch_size=8",
          "train.eval_every=0", "train.sample_every=0", "data.eval_samples=16"]  # fmt: skip


@dataclass
class Entry:
    """How to make a tiny run of a task, to ``steps`` steps, into ``run``."""

    make: Callable[..., object]  # (run, steps, ctx, *extra overrides)
    sample: Callable[[object, int], object]  # (pipeline, how many) -> seeded outputs


def _text_files(tmp: Path) -> dict[str, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    chats = tmp / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"what is list {i}?"},
                          {"role": "assistant", "content": "a sequence."}]} for i in range(16)]  # fmt: skip
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    labelled = tmp / "labelled.jsonl"
    rows = [{"text": f"{'sort the list' if i % 2 else 'open the file'} {i}", "label": str(i % 2)}
            for i in range(40)]  # fmt: skip
    labelled.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"chats": chats, "labelled": labelled}


def _train(recipe: Path | str, overrides: list[str] | Callable[[dict], list[str]]):
    def make(run: Path, steps: int, ctx: dict, *extra: str):
        over = [*(overrides(ctx) if callable(overrides) else overrides), *extra]
        return aigc.train(recipe, [*over, f"train.max_steps={steps}"], run_dir=run, progress=False)

    return make


def _finetune(task: str, data: str):
    def make(run: Path, steps: int, ctx: dict, *extra: str):
        over = [f"data.path={ctx['files'][data]}", f"train.max_steps={steps}",
                "train.batch_size=4", "train.warmup_steps=1", "train.checkpoint_every=1", *extra]  # fmt: skip
        return aigc.finetune(ctx["base"], over, task=task, run_dir=run, progress=False)

    return make


def _inpainting(run: Path, steps: int, ctx: dict, *extra: str):
    """aigc finetune DIFFUSION_RUN --task inpaint, from one tiny base made on first use."""
    if "diffusion_base" not in ctx:
        ctx["diffusion_base"] = run.parent / "base"
        _train(CONFIGS / "ddpm-digits-cond.yaml", DIFFUSION)(ctx["diffusion_base"], 2, ctx)
    over = [f"train.max_steps={steps}", "train.checkpoint_every=1", *extra]
    return aigc.finetune(ctx["diffusion_base"], over, task="inpaint", run_dir=run, progress=False)


def _texts(gen, n: int):
    return gen.generate(["The", "A", "In", "x"][:n] if n > 1 else "The", max_new_tokens=8,
                        temperature=1.0, seed=0)  # fmt: skip


def _chats(gen, n: int):
    return [gen.chat([{"role": "user", "content": f"what is list {i}?"}], max_new_tokens=8,
                     temperature=1.0, seed=0) for i in range(n)]  # fmt: skip


def _classes(gen, n: int):
    texts = ["sort the list 3", "open the file 4", "sort", "open"][:n]
    return [r["probs"] for r in gen.classify(texts, batch_size=n)]


def _images(gen, n: int):
    return gen.generate(n, seed=0)


def _restored(gen, n: int):
    from aigc.data.shapes import generate_shapes

    return gen.restore(generate_shapes(4, gen.input_size or 16, seed=3).images[:n]).images


def _translated(gen, n: int):
    from aigc.data.shapes import generate_shapes

    return gen.translate(generate_shapes(4, 16, seed=3).images[:n]).images


def _composed(gen, n: int):
    return [c.pitches.tolist() for c in gen.generate(n, bars=1, seed=0).chorales]


def _denoised(gen, n: int):
    wave = np.sin(np.arange(4000) / 7.0).astype(np.float32) * 0.3
    return [gen.denoise(wave * (k + 1) / 4, sample_rate=16000).waveforms[0].tolist()
            for k in range(n)]  # fmt: skip


def _spoken(gen, n: int):
    return gen.generate(n, labels="seven", seed=0, output="tensor")


def _said(gen, n: int):
    texts = gen.task.meta["train_strings"]  # a tiny run has heard only their phones
    return [gen.speak(texts[k], seed=0).waveforms[0].tolist() for k in range(n)]


def _prompted(gen, n: int):
    return gen.generate(n, seed=0, prompt="a small red circle at the top left")


GPT = ["train.eval_every=0", "train.checkpoint_every=1", *TINY]
GAN = [*IMAGES, "model.z_dim=8", "model.g_width=8", "model.d_width=8", "train.checkpoint_every=1"]
VAE = [*IMAGES, "model.z_dim=4", "model.width=4", "train.checkpoint_every=1"]
TOY = ["train.eval_every=0", "train.sample_every=0", "train.checkpoint_every=1"]
DIFFUSION = [*IMAGES, "model.width=8", "model.channel_mults=[1,2]", "model.groups=4",
             "model.sample_steps=3", "train.checkpoint_every=1"]  # fmt: skip
# text-to-image with EDM's preconditioning: both paths of the family in one more entry
T2I = [*DIFFUSION, "model.text_width=16", "model.text_heads=2", "model.text_layers=1",
       "model.preconditioning=edm", "model.prediction_type=epsilon", "model.min_snr_gamma=0",
       "data.holdout=[]"]  # fmt: skip

# super-resolution with the adversarial term: both optimizers in the step contract
RESTORE = [*IMAGES, "data.image_size=32", "model.width=8", "model.blocks=1", "model.d_width=8",
           "model.adversarial=0.01", "model.d_layers=2", "train.checkpoint_every=1"]  # fmt: skip

TRANSLATE = [*IMAGES[1:], "model.width=8", "model.d_width=8", "model.d_layers=2",
             "train.checkpoint_every=1"]  # fmt: skip
CYCLEGAN = [*TRANSLATE, "model.blocks=1", "model.pool_size=4"]

MUSIC = ["data.limit=12", "model.block_size=32", "model.n_layer=1", "model.n_head=2",
         "model.n_embd=16", "data.eval_samples=2", "data.eval_sample_bars=1",
         "train.batch_size=4", "train.sample_every=0", "train.checkpoint_every=1"]  # fmt: skip

DENOISE = ["model.width=8", "model.blocks=1", "data.val_mixtures=6", "data.limit_sentences=2",
           "train.batch_size=2", "train.sample_every=0", "train.checkpoint_every=1",
           "data.eval_pesq=false"]  # fmt: skip

SPOKEN = ["data.image_size=16", "model.width=8", "model.channel_mults=[1,2]", "model.groups=4",
          "model.attn_resolutions=[]", "model.sample_steps=2", "train.batch_size=8",
          "train.eval_every=0", "train.sample_every=0", "train.checkpoint_every=1",
          "data.eval_samples=10", "data.judge_steps=2", "data.vocoder_iters=2"]  # fmt: skip

TTS = ["data.strings=6", "data.val_strings=2", "data.voices=[slt]", "model.width=16",
       "model.encoder_layers=1", "model.decoder_layers=1", "train.batch_size=4",
       "train.eval_every=0", "train.sample_every=0", "train.checkpoint_every=1",
       "data.judge_steps=2", "data.vocoder_iters=2"]  # fmt: skip

SR3 = [*DIFFUSION, "data.image_size=32", "model.channel_mults=[1,2]", "model.attn_resolutions=[8]"]

TASK_ENTRIES: dict[str, Entry] = {
    "gpt": Entry(_train(RECIPE, lambda ctx: [*GPT, f"data.path={ctx['corpus']}"]), _texts),
    "chat": Entry(_finetune("chat", "chats"), _chats),
    "classifier": Entry(_finetune("classify", "labelled"), _classes),
    "gan": Entry(_train(CONFIGS / "cgan-shapes.yaml", GAN), _images),
    "vae": Entry(_train(CONFIGS / "betavae-shapes.yaml", VAE), _images),
    "toy": Entry(_train(ROOT / "tests" / "toy" / "toy-shapes.yaml", TOY), _images),
    "diffusion": Entry(_train(CONFIGS / "ddpm-digits-cond.yaml", DIFFUSION), _images),
    "t2i": Entry(_train(CONFIGS / "t2i-shapes.yaml", T2I), _prompted),
    "restore": Entry(_train(CONFIGS / "sr-shapes-x4.yaml", RESTORE), _restored),
    "restore_diffusion": Entry(_train(CONFIGS / "sr3-shapes-x4.yaml", SR3), _restored),
    "cyclegan": Entry(_train(CONFIGS / "cyclegan-shapes.yaml", CYCLEGAN), _translated),
    "pix2pix": Entry(_train(CONFIGS / "pix2pix-shapes.yaml", TRANSLATE), _translated),
    "inpainting": Entry(_inpainting, _images),  # a diffusion run made to inpaint
    "music": Entry(_train(CONFIGS / "music-chorales.yaml", MUSIC), _composed),
    "denoise": Entry(_train(CONFIGS / "denoise-speech.yaml", DENOISE), _denoised),
    "spoken": Entry(_train(CONFIGS / "spoken-digits.yaml", SPOKEN), _spoken),
    "tts": Entry(_train(CONFIGS / "tts-digits.yaml", TTS), _said),
}


def test_every_registered_task_is_listed():
    assert set(REGISTRY) - {"toy"} <= set(TASK_ENTRIES), "list each new task here once"


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, pretrained_tiny_gpt, corpus_file):
    register_task("toy", "tests.toy.task:ToyTask")
    out = {"base": pretrained_tiny_gpt, "corpus": corpus_file,
           "files": _text_files(tmp_path_factory.mktemp("texts"))}  # fmt: skip
    yield out
    REGISTRY.pop("toy", None)


@pytest.fixture(scope="module")
def runs(ctx, tmp_path_factory) -> dict[str, Path]:
    """A 4-step run of every task (made once)."""
    out = {}
    for name, entry in TASK_ENTRIES.items():
        out[name] = tmp_path_factory.mktemp(name) / "run"
        entry.make(out[name], 4, ctx)
    return out


NAMES = list(TASK_ENTRIES)


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trips(runs, name, tmp_path):
    cfg = run_config(RunDir(runs[name]))
    assert load_config(cfg.to_dict()).to_dict() == cfg.to_dict()
    (tmp_path / "c.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    assert load_config(tmp_path / "c.yaml").to_dict() == cfg.to_dict()
    task_cls = get_task(cfg.family)
    assert issubclass(task_cls, Task) and task_cls.name == cfg.family
    # finish_config on the run's files changes nothing in a finished config
    before = cfg.to_dict()
    task_cls.finish_config(cfg, DataFiles.of_run(RunDir(runs[name])))
    assert cfg.to_dict() == before


@pytest.mark.parametrize("name", NAMES)
def test_step_contract(runs, name):
    """A batch is a dict of tensors, a pure function of the step; the model's step
    updates only the groups it declares and returns detached scalars."""
    cfg = run_config(RunDir(runs[name]))
    task = get_task(cfg.family).open(cfg, RunDir(runs[name]))
    batch = task.train_batch(3, 0, 0, 1)
    assert isinstance(batch, dict) and batch
    assert all(isinstance(v, torch.Tensor) for v in batch.values())
    again = task.train_batch(3, 0, 0, 1)
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    groups = set(task.model.param_groups())
    updated: list[str] = []

    class Step:
        index = 0

        def update(self, group, loss):
            assert loss.ndim == 0 and loss.requires_grad
            updated.append(group)

    out = task.model.training_step(batch, Step())
    assert updated and set(updated) <= groups
    assert out and all(v.ndim == 0 and not v.requires_grad for v in out.values())
    assert set(task.loss_keys) & set(out), "the logged losses are named in loss_keys"
    assert task.pipeline_class and task.headline_metric


@pytest.mark.parametrize("name", NAMES)
def test_saved_run_loads_and_samples_the_same(runs, name):
    first = TASK_ENTRIES[name].sample(aigc.load(runs[name]), 2)
    second = TASK_ENTRIES[name].sample(aigc.load(runs[name]), 2)
    if isinstance(first, torch.Tensor):
        assert torch.equal(first, second)
    else:
        assert first == second


@pytest.mark.parametrize("name", NAMES)
def test_seeded_samples_do_not_depend_on_batch_size(runs, name):
    gen = aigc.load(runs[name])
    one = TASK_ENTRIES[name].sample(gen, 1)
    four = TASK_ENTRIES[name].sample(gen, 4)
    if isinstance(one, torch.Tensor):
        assert torch.allclose(one[0], four[0], atol=1e-5)
    elif isinstance(one, str):
        assert four[0] == one
    elif isinstance(one[0], dict):
        assert all(abs(one[0][k] - four[0][k]) < 1e-5 for k in one[0])
    else:
        assert four[0] == one[0]


@pytest.mark.parametrize("name", NAMES)
def test_a_continued_run_equals_an_uninterrupted_one(ctx, runs, name, tmp_path):
    split = tmp_path / "split"
    # stopped by its time budget after the first step, then continued without one: the
    # schedules (which follow max_steps) are those of the uninterrupted run
    cut = TASK_ENTRIES[name].make(split, 4, ctx, "train.max_time=1e-9")
    assert cut.step < 4
    out = aigc.train(None, ["train.max_time=0"], run_dir=split, progress=False)
    assert out.resumed_from == cut.step and out.step == 4
    a_dir, b_dir = RunDir(runs[name]).latest_checkpoint(), RunDir(split).latest_checkpoint()
    assert a_dir.name == b_dir.name == "step-00000004"
    for file in sorted(p.name for p in a_dir.glob("*.safetensors")):
        a, b = load_file(str(a_dir / file)), load_file(str(b_dir / file))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (file, k)
