"""Diffusion on images: prepared image data + the diffusion family (aigc.models.diffusion).

Everything but the model comes from ImageTask (data, batches, the domain classifier's
verdict on generated images, FID/KID/PR in its features); the model samples through a
scheduler from starting noise, which plays the latent's part.

A text-to-image run (model.text=true) also has a tokenizer (the run's tokenizer.json:
byte-level BPE trained on its training captions, or the frozen GPT's own), its
captions encoded once, and an evaluation of prompt faithfulness: images generated
from held-out captions are judged attribute by attribute by the domain classifier,
separately for compositions seen in training and compositions held out of it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aigc.config import Config
from aigc.errors import ConfigError
from aigc.models.diffusion import Diffusion, DiffusionConfig
from aigc.runs import RunDir
from aigc.tasks.base import TOKENIZER_FILE, DataFiles
from aigc.tasks.images import ImageData, ImageTask, read_meta

CAPTION_VOCAB = 1024  # BPE merges learnt from the captions, at most
MIN_CONTEXT = 32  # room for prompts a little longer than the training captions


class CaptionCoder:
    """Captions -> token ids for the text encoder: (n, L) int64, the start token first,
    -1 padding after, L <= context."""

    def __init__(self, tokenizer: Any, start_id: int, context: int) -> None:
        self.tokenizer = tokenizer
        self.start_id = start_id
        self.context = context

    def ids(self, caption: str) -> list[int]:
        from aigc.data.tokenizers import encode_replacing

        return [self.start_id, *encode_replacing(self.tokenizer, caption)[0].tolist()]

    def encode(self, captions: list[str], truncate: bool = False) -> torch.Tensor:
        """ValueError naming the caption when one is longer than the context (unless
        ``truncate``)."""
        rows = [self.ids(c) for c in captions]
        for i, r in enumerate(rows):
            if len(r) > self.context and not truncate:
                raise ValueError(
                    f"prompt {i} has {len(r) - 1} tokens; this model reads at most "
                    f"{self.context - 1} ({captions[i][:40]!r}...): shorten it"
                )
        width = min(self.context, max(len(r) for r in rows)) if rows else 1
        out = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, r in enumerate(rows):
            r = r[: self.context]
            out[i, : len(r)] = torch.tensor(r)
        return out


def start_token(tokenizer: Any) -> int:
    """The token a caption starts with: the tokenizer's end-of-text (a GPT reads text
    after it as a new document), else a newline, else id 0."""
    if getattr(tokenizer, "eos_id", None) is not None:
        return int(tokenizer.eos_id)
    newline = tokenizer.token_to_id("\n")
    return int(newline) if newline is not None else 0


class DiffusionTask(ImageTask):
    """Trains a denoiser on a run's images; evaluates its samples like the GAN's, and a
    text-to-image run by the faithfulness of images to held-out captions."""

    name = "diffusion"
    model_config = DiffusionConfig
    model_class = Diffusion
    pipeline_class = "aigc.pipelines.diffusion:DiffusionPipeline"
    headline_metric = "fid"
    loss_keys = frozenset({"loss"})
    resumable_keys = ImageTask.resumable_keys | {
        "model.sampler",
        "model.sample_steps",
        "model.guidance",
    }

    def __init__(self, config: Config, run: RunDir, data: ImageData | None, meta: dict[str, Any]):
        super().__init__(config, run, data, meta)
        self.coder: CaptionCoder | None = None
        self._caption_ids: torch.Tensor | None = None
        m = config.model
        if m.text:
            from aigc.data.tokenizers import load_tokenizer

            tok = load_tokenizer(run.tokenizer_path)
            self.coder = CaptionCoder(tok, m.text_start_id, m.text_context)
            if m.text_gpt and data is not None and run.latest_checkpoint() is None:
                self._copy_gpt(m.text_encoder)

    def _copy_gpt(self, path: str) -> None:
        """A new run starts with the frozen GPT's weights (its EMA when it kept one)."""
        from aigc.loading import load

        gpt = load(path, device="cpu").model
        self.model.text_encoder.gpt.load_state_dict(gpt.state_dict())

    # construction -----------------------------------------------------------
    @classmethod
    def prepare_data(cls, config: Config, data_dir: Path, progress: bool = True) -> None:
        super().prepare_data(config, data_dir, progress)
        m = config.model
        if not m.text:
            return
        meta = read_meta(data_dir)
        captions = meta.get("captions")
        if not captions:
            raise ConfigError(
                f"model.text=true but {meta['source']} has no captions: use shapes or "
                "digits, or an image folder with metadata.jsonl or metadata.csv "
                "(file_name, text); or set model.text=false"
            )
        if m.text_encoder:  # a frozen GPT brings its own tokenizer
            gpt_run = _gpt_run(m.text_encoder)
            shutil.copyfile(gpt_run / TOKENIZER_FILE, data_dir / TOKENIZER_FILE)
        else:
            from aigc.data.tokenizers import train_bpe_tokenizer

            train = captions[: meta["n_train"]]
            train_bpe_tokenizer(iter(train), CAPTION_VOCAB).save(data_dir / TOKENIZER_FILE)

    @classmethod
    def finish_config(cls, config: Config, files: DataFiles) -> None:
        super().finish_config(config, files)
        m = config.model
        if not m.text:
            return
        from aigc.data.tokenizers import load_tokenizer

        tok = load_tokenizer(files.tokenizer_path)
        m.text_vocab_size = int(tok.vocab_size)
        m.text_start_id = start_token(tok)
        if m.text_encoder and not m.text_gpt:
            from aigc.training import run_config

            gpt_cfg = run_config(RunDir(_gpt_run(m.text_encoder))).model
            m.text_gpt = asdict(gpt_cfg)
            m.text_encoder = str(_gpt_run(m.text_encoder))
        if m.text_context == 0:
            meta = read_meta(files.data_dir)
            coder = CaptionCoder(tok, m.text_start_id, 1 << 30)
            longest = max(len(coder.ids(c)) for c in meta["captions"])
            m.text_context = max(MIN_CONTEXT, longest)
            if m.text_gpt:
                m.text_context = min(m.text_context, int(m.text_gpt["block_size"]))
        m.check_ready()

    # training -------------------------------------------------------------------
    def caption_ids(self) -> torch.Tensor:
        """Every stored image's caption as tokens (N, L), encoded once (too long ones cut)."""
        if self._caption_ids is None:
            captions = (self.data.meta if self.data is not None else self.meta)["captions"]
            self._caption_ids = self.coder.encode(list(captions), truncate=True)
        return self._caption_ids

    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        """ImageTask's batch, and for a text model ``text`` (B, L): the images' captions."""
        batch = super().train_batch(step, micro, rank, world)
        if self.coder is not None:
            from aigc.tasks.images import epoch_batch_indices

            B = self.config.train.batch_size
            idx = epoch_batch_indices(
                len(self.data.train_images), step, B * self.config.train.grad_accum * world,
                self.config.train.seed,
            )  # fmt: skip
            part = micro * world + rank
            batch["text"] = self.caption_ids()[idx[part * B : (part + 1) * B]]
        return batch

    # samples and evaluation -------------------------------------------------------
    def samples(self, model: nn.Module, step: int, device: torch.device) -> dict[str, Any]:
        """A text model's grid: eight validation captions (one per row), eight seeds each."""
        if self.coder is None:
            return super().samples(model, step, device)
        from aigc.data.images import image_grid, to_uint8

        data = self.data
        captions = data.meta["captions"][data.n_train :][:8]
        ids = self.coder.encode(captions, truncate=True).repeat_interleave(8, 0)
        images = self.generate_from(model, ids, self.config.train.seed, device)
        return {"grid": image_grid(to_uint8(images.cpu()), nrow=8)}

    def generate_from(
        self, model: nn.Module, ids: torch.Tensor, seed: int, device: torch.device
    ) -> torch.Tensor:
        """Images for caption tokens ids (n, L), noise seeded per image (as sample_images)."""
        from aigc.sampling.latent import draw_latents

        z, _ = draw_latents(model, len(ids), seed)
        out = [model.generate(z[i : i + 250].to(device), text=ids[i : i + 250].to(device))
               for i in range(0, len(ids), 250)]  # fmt: skip
        return torch.cat(out)

    def judge_sums(
        self, model: nn.Module, rank: int, world: int, device: torch.device
    ) -> dict[str, float]:
        if self.coder is None:
            return super().judge_sums(model, rank, world, device)
        return self.faithfulness_sums(model, rank, world, device)

    def eval_prompts(self) -> dict[str, tuple[list[str], np.ndarray | None]]:
        """What evaluation prompts with: {"seen": (captions, labels), "heldout": ...} of
        data.eval_samples validation captions each, drawn with replacement by the seed;
        "heldout" only when the run held compositions out (data.holdout)."""
        data = self.data
        captions = np.asarray(data.meta["captions"][data.n_train :], dtype=object)
        from aigc.tasks.images import validation_holdout_mask

        labels = data.split_labels("val")
        mask = None if labels is None else validation_holdout_mask(data.meta, data.labels)
        groups = {"seen": np.ones(len(captions), bool) if mask is None else ~mask}
        if mask is not None and mask.any():
            groups["heldout"] = mask
        rng = np.random.default_rng(self.config.train.seed + 11)
        n = self.config.data.eval_samples
        out = {}
        for name, sel in groups.items():
            idx = np.flatnonzero(sel)
            if len(idx) == 0:
                continue
            pick = idx[rng.integers(0, len(idx), n)]
            out[name] = (list(captions[pick]), None if labels is None else labels[pick])
        return out

    def faithfulness_sums(
        self, model: nn.Module, rank: int, world: int, device: torch.device
    ) -> dict[str, float]:
        """Per attribute, how many images generated from captions the classifier judges
        to show the caption's value, and how many are right in every attribute; with
        FID/KID/PR of the seen-caption images. Rank r takes every world-th prompt."""
        sums: dict[str, float] = {}
        clf = self.classifier()
        attrs = self.meta["attributes"]
        for group, (captions, labels) in self.eval_prompts().items():
            ids = self.coder.encode(captions, truncate=True)
            images = self.generate_from(model, ids, self.config.train.seed + 1_000_003, device)
            if group == "seen":
                feats = self.feature_sums(model, device, images)
                sums.update({k: v if rank == 0 else 0.0 for k, v in feats.items()})
            if clf is None or labels is None:
                continue
            mine = slice(rank, None, world)
            predicted = clf.model.predict(images[mine])
            right = np.ones(len(images[mine]), bool)
            for i, a in enumerate(attrs):
                ok = predicted[a].numpy() == labels[mine][:, i]
                sums[f"{group}/correct/{a}"] = float(ok.sum())
                right &= ok
            sums[f"{group}/correct/all"] = float(right.sum())
            sums[f"{group}/n"] = float(len(right))
        return sums

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        if self.coder is None:
            return super().eval_metrics(sums)
        out = {k[len("feature/") :]: v for k, v in sums.items() if k.startswith("feature/")}
        for group in ("seen", "heldout"):
            n = sums.get(f"{group}/n", 0.0)
            if not n:
                continue
            prefix = "" if group == "seen" else "heldout/"
            for a in [*self.meta["attributes"], "all"]:
                name = "all_correct" if a == "all" else f"label_accuracy/{a}"
                out[prefix + name] = sums[f"{group}/correct/{a}"] / n
        clf = self.classifier()
        if clf is not None:
            out["classifier_heldout"] = float(clf.heldout)
        return out


def _gpt_run(path: str) -> Path:
    """The folder of the GPT run model.text_encoder names; ConfigError unless it is one."""
    run = Path(path).expanduser().resolve()
    info = run / "run.json"
    try:
        family = json.loads(info.read_text(encoding="utf-8")).get("family")
    except (OSError, ValueError):
        raise ConfigError(
            f"model.text_encoder={path!r} is not an aigc run folder (no readable run.json); "
            "give a trained GPT run, or leave it empty to train a text encoder"
        ) from None
    if family != "gpt":
        raise ConfigError(
            f"model.text_encoder={path!r} is a {family!r} run; the text encoder must be a "
            "GPT language model run (family gpt)"
        )
    if not (run / TOKENIZER_FILE).is_file():
        raise ConfigError(f"model.text_encoder={path!r}: {run / TOKENIZER_FILE} is missing")
    return run
