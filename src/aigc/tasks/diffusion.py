"""Diffusion on images: prepared image data + the diffusion family (aigc.models.diffusion).

Everything but the model comes from ImageTask (data, batches, the domain classifier's
verdict on generated images, FID/KID/PR in its features); the model samples through a
scheduler from starting noise, which plays the latent's part.

A text-to-image run (model.text=true) also has a tokenizer (the run's tokenizer.json:
byte-level BPE trained on its training captions, or the frozen GPT's own), its
captions encoded once, and an evaluation of prompt faithfulness: images generated
from held-out captions are judged attribute by attribute by the domain classifier,
separately for compositions seen in training and compositions held out of it; when
the captioned images have no labels, a CLIP-style judge trained on the run's captions
(aigc.metrics.clip) scores them instead. Every evaluation also reports the share of
generated images that are copies of training images (aigc.metrics.memorisation).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aigc.config import Config
from aigc.errors import ConfigError
from aigc.metrics.classifier import JudgeWarning
from aigc.models.diffusion import Diffusion, DiffusionConfig
from aigc.runs import RunDir
from aigc.tasks.base import TOKENIZER_FILE, DataFiles
from aigc.tasks.images import (
    ImageData,
    ImageDataConfig,
    ImageTask,
    epoch_batch_indices,
    open_data,
    read_meta,
    to_model_batch,
)

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


@dataclass
class DiffusionDataConfig(ImageDataConfig):
    """An image run's data, and for a fine-tune the base's own data kept in view."""

    # a fine-tune (train.init_from): this share of every batch is drawn from the base run's
    # training images and captions, so it keeps what it knew (DreamBooth's prior
    # preservation, with the base's own data instead of its samples); 0 = none
    prior_share: float = 0.0

    def validate(self) -> None:
        super().validate()
        share = self.prior_share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share < 1:
            raise ConfigError(f"data.prior_share={share!r} must be a number in [0, 1)")


class DiffusionTask(ImageTask):
    """Trains a denoiser on a run's images; evaluates its samples like the GAN's, and a
    text-to-image run by the faithfulness of images to held-out captions."""

    name = "diffusion"
    data_config = DiffusionDataConfig
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
        self._clip = None  # the CLIP-style judge, once trained or loaded
        self._memo_reference: tuple[np.ndarray, float | None] | None = None  # features, threshold
        self._prior: tuple[ImageData, torch.Tensor | None] | None = None  # the base's data
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
        base = Path(config.train.init_from) / TOKENIZER_FILE if config.train.init_from else None
        if base is not None and base.is_file():  # a fine-tune reads captions as its base
            shutil.copyfile(base, data_dir / TOKENIZER_FILE)
        elif m.text_encoder:  # a frozen GPT brings its own tokenizer
            gpt_run = _gpt_run(m.text_encoder)
            shutil.copyfile(gpt_run / TOKENIZER_FILE, data_dir / TOKENIZER_FILE)
        else:
            from aigc.data.tokenizers import train_bpe_tokenizer

            train = captions[: meta["n_train"]]
            train_bpe_tokenizer(iter(train), CAPTION_VOCAB).save(data_dir / TOKENIZER_FILE)

    @classmethod
    def _fit_model_to_data(cls, config: Config, meta: dict[str, Any]) -> None:
        m = config.model
        if m.inpainting:  # the masked image and the mask beside x_t
            m.cond_channels = int(meta["spec"]["channels"]) + 1
        super()._fit_model_to_data(config, meta)

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

    def prior(self) -> tuple[ImageData, torch.Tensor | None]:
        """The base run's prepared data (a fine-tune's train.init_from) and, for a text
        model, its captions as tokens of this run's tokenizer (the base's own)."""
        if self._prior is None:
            if not self.config.train.init_from:
                raise ConfigError("data.prior_share > 0 needs a base run: use aigc finetune")
            data = open_data(Path(self.config.train.init_from) / "data")
            if data.images.shape[1:] != self.data.images.shape[1:]:
                raise ConfigError(
                    f"data.prior_share: the base's images are {data.images.shape[1:]}, this "
                    f"run's {self.data.images.shape[1:]}; keep the base's image_size and channels"
                )
            ids = None
            if self.coder is not None:
                if not data.meta.get("captions"):
                    raise ConfigError("data.prior_share: the base run's images have no captions")
                ids = self.coder.encode(list(data.meta["captions"]), truncate=True)
            self._prior = (data, ids)
        return self._prior

    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        """ImageTask's batch, and for a text model ``text`` (B, L): the images' captions;
        for an inpainting model ``cond``: each image with a random region blanked, and the
        region's mask (training_masks). With data.prior_share, the last rows are the base
        run's training images (and captions), in an order of their own."""
        batch = self._own_batch(step, micro, rank, world)
        share = self.config.data.prior_share
        if not share:
            return batch
        B = self.config.train.batch_size
        k = min(B - 1, max(1, round(B * share)))  # rows from the base's data
        data, ids = self.prior()
        idx = epoch_batch_indices(data.n_train, step, B * self.config.train.grad_accum * world,
                                  self.config.train.seed + 1)  # fmt: skip
        part = micro * world + rank
        idx = idx[part * B : (part + 1) * B][:k]
        prior = {"images": to_model_batch(data.train_images[idx])}
        if ids is not None:
            prior["text"] = ids[idx]
        out = {}
        for key, value in batch.items():
            if key not in prior:
                raise ConfigError(f"data.prior_share: a {key!r} batch has no prior counterpart")
            mine = value[: B - k]
            extra = prior[key]
            if key == "text":  # pad the shorter captions (-1) to one width
                width = max(mine.size(1), extra.size(1))
                mine = torch.nn.functional.pad(mine, (0, width - mine.size(1)), value=-1)
                extra = torch.nn.functional.pad(extra, (0, width - extra.size(1)), value=-1)
            out[key] = torch.cat([mine, extra])
        return out

    def lora_extras(self, base: RunDir) -> int:
        """A LoRA fine-tune of a text-to-image run also learns the token embeddings of the
        words its captions bring that the base's training captions never used (a new
        concept's word, as textual inversion learns one); the other rows get no gradient
        and keep the base's values. Returns how many weights that adds."""
        if self.coder is None or self.config.model.text_gpt or self.data is None:
            return 0
        base_meta = read_meta(base.data_dir)
        seen = {t for c in base_meta.get("captions", [])[: base_meta["n_train"]]
                for t in self.coder.ids(c)}  # fmt: skip
        mine = {t for c in self.data.meta.get("captions", []) for t in self.coder.ids(c)}
        new = sorted(mine - seen)
        if not new:
            return 0
        weight = self.model.text_encoder.tok.weight
        keep = torch.ones(weight.size(0), 1, dtype=weight.dtype)
        keep[new] = 0
        weight.requires_grad_(True)
        weight.register_hook(lambda g: g * (1 - keep.to(g.device, g.dtype)))
        self.new_tokens = new
        return len(new) * weight.size(1)

    def _own_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        batch = super().train_batch(step, micro, rank, world)
        if self.config.model.inpainting:
            from aigc.models.diffusion import inpainting_condition

            images = batch["images"]
            rng = np.random.default_rng([self.config.train.seed, step, micro * world + rank, 5])
            fill = training_masks(len(images), images.size(-1), rng)
            batch["cond"] = inpainting_condition(images, fill)
        if self.coder is not None:
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
        data = self.data or open_data(self.run.data_dir)  # a loaded pipeline has no data open
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
        mine = slice(rank, None, world)
        for group, (captions, labels) in self.eval_prompts().items():
            ids = self.coder.encode(captions, truncate=True)
            images = self.generate_from(model, ids, self.config.train.seed + 1_000_003, device)
            if group == "seen":
                feats = self.feature_sums(model, device, images)
                sums.update({k: v if rank == 0 else 0.0 for k, v in feats.items()})
                sums.update(self.sample_sums(images[mine]))
                if self.clip_judge() is not None:
                    sums.update(self.clip_sums(images, captions, rank, world))
            if clf is None or labels is None:
                continue
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
            return {**super().eval_metrics(sums), **memorisation_metrics(sums)}
        out = {k[len("feature/") :]: v for k, v in sums.items() if k.startswith("feature/")}
        out.update(clip_metrics(sums))
        out.update(memorisation_metrics(sums))
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

    # evaluation with another sampler -----------------------------------------------
    def sampling_with(
        self,
        model: nn.Module,
        scheduler: str | None,
        steps: int | None,
        guidance: float | None = None,
    ) -> contextlib.AbstractContextManager[tuple[str, int, float]]:
        """See ``sampling_with`` (module level)."""
        return sampling_with(model, scheduler, steps, guidance)

    # the CLIP-style judge (captions without labels) and memorisation -------------------
    def clip_judge(self):
        """The cached CLIP-style judge (aigc.metrics.clip.TrainedClip) of a text run whose
        captioned images have no labels; None for every other run."""
        if self.coder is None or self.meta["attributes"] or not self.meta.get("captions"):
            return None
        if self._clip is None:
            from aigc.metrics.clip import cached_clip

            data = self.data or open_data(self.run.data_dir)
            # trained outside the caller's inference mode and autocast: always fp32
            with (
                torch.inference_mode(False),
                torch.enable_grad(),
                torch.autocast("cpu", enabled=False),
            ):
                self._clip = cached_clip(
                    f"{self.meta['sha256']}|{self.meta['n_train']}",
                    data.train_images,
                    list(data.meta["captions"][: data.n_train]),
                )
        return self._clip

    def clip_sums(
        self, images: torch.Tensor, captions: list[str], rank: int, world: int
    ) -> dict[str, float]:
        """CLIP score and caption retrieval among 32 of this rank's share of images (N, C,
        H, W) generated from validation ``captions``, as sums; rank 0 adds the same on up
        to data.eval_samples real validation images (the ceiling)."""
        from aigc.metrics.clip import (
            clip_score,
            retrieval_accuracy,
            retrieval_candidates,
            retrieval_chance,
        )

        data = self.data or open_data(self.run.data_dir)
        pool = list(data.meta["captions"][data.n_train :])
        if len(set(pool)) < 2:  # one caption: nothing to tell images apart by
            import warnings

            warnings.warn("the CLIP-style judge is not used: every validation caption is the "
                          "same", JudgeWarning, stacklevel=2)  # fmt: skip
            return {}
        judge = self.clip_judge().model
        first: dict[str, int] = {}
        for i, c in enumerate(pool):
            first.setdefault(c, i)
        pool_emb = judge.text_features(pool)  # (m, D)
        seed = self.config.train.seed

        def sums(images: torch.Tensor, own: np.ndarray, cands: np.ndarray) -> list[float]:
            emb = judge.image_features(images.cpu())  # (n, D)
            n = len(own)
            return [clip_score(emb, pool_emb[torch.from_numpy(own)]) * n,
                    retrieval_accuracy(emb, pool_emb, cands) * n,
                    retrieval_chance(cands, pool) * n, float(n)]  # fmt: skip

        own = np.array([first[c] for c in captions], dtype=np.int64)
        cands = retrieval_candidates(own, pool, seed=seed + 13)
        mine = slice(rank, None, world)
        names = ("score", "retrieved", "chance", "n")
        generated = sums(images[mine], own[mine], cands[mine])
        out = {f"clip/generated/{k}": v for k, v in zip(names, generated, strict=True)}
        n_real = min(len(pool), self.config.data.eval_samples) if rank == 0 else 0
        real_own = np.array([first[c] for c in pool[:n_real]], dtype=np.int64)
        real = sums(to_model_batch(data.val_images[:n_real]), real_own,
                    retrieval_candidates(real_own, pool, seed=seed + 17))  # fmt: skip
        out.update({f"clip/real/{k}": v for k, v in zip(names, real, strict=True)})
        return out

    def judge_features(self, images: torch.Tensor) -> np.ndarray | None:
        """Features (N, D) of images (N, C, H, W) in [-1, 1] in which memorisation is
        measured: the domain classifier's (labelled data), else the CLIP judge's image
        embeddings (captions without labels); None when there is neither."""
        clf = self.classifier()
        if clf is not None:
            net = clf.model.eval()
            device = next(net.parameters()).device
            with torch.no_grad():
                out = [net.features(images[i : i + 500].to(device)).float().cpu()
                       for i in range(0, len(images), 500)]  # fmt: skip
            return torch.cat(out).numpy() if out else np.zeros((0, net.feature_dim), np.float32)
        judge = self.clip_judge()
        return None if judge is None else judge.model.image_features(images).numpy()

    def sample_sums(self, images: torch.Tensor) -> dict[str, float]:
        """How many of these generated images (N, C, H, W) are nearer a training image
        than any two training images are to each other (judge_features), out of N."""
        from aigc.metrics.memorisation import nearest_distances, nearest_pair_distance

        feats = self.judge_features(images.cpu())
        if feats is None:
            return {}
        if self._memo_reference is None:
            data = self.data or open_data(self.run.data_dir)
            chunks = (to_model_batch(data.train_images[i : i + 2000])
                      for i in range(0, data.n_train, 2000))  # fmt: skip
            train = np.concatenate([self.judge_features(x) for x in chunks])
            try:
                self._memo_reference = train, nearest_pair_distance(train)
            except ValueError:  # one distinct training image: no scale to call a copy by
                import warnings

                warnings.warn("memorisation is not measured: the training images look alike "
                              "to the judge (fewer than two distinct)", JudgeWarning, stacklevel=2)  # fmt: skip
                self._memo_reference = train, None
        train, threshold = self._memo_reference
        if threshold is None:
            return {}
        near = nearest_distances(feats, train)
        return {"memo/copies": float((near < threshold).sum()), "memo/n": float(len(feats))}


MASK_KINDS = {"rectangle": 0.55, "half": 0.35, "everything": 0.10}


def training_masks(n: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    """n masks (n, 1, size, size) float, 1 = the region an inpainting model learns to fill:
    a rectangle of a quarter to three quarters of each side anywhere, one half of the
    image (top, bottom, left or right), or everything (so the model still generates from
    nothing), in the shares of MASK_KINDS."""
    kinds = rng.choice(len(MASK_KINDS), size=n, p=list(MASK_KINDS.values()))
    out = np.zeros((n, 1, size, size), np.float32)
    lo, hi = max(1, size // 4), max(1, 3 * size // 4)
    for i, k in enumerate(kinds):
        if k == 0:
            h, w = rng.integers(lo, hi + 1, size=2)
            y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
            out[i, 0, y : y + h, x : x + w] = 1
        elif k == 1:
            half = size // 2
            side = rng.integers(4)
            region = [np.s_[:half, :], np.s_[half:, :], np.s_[:, :half], np.s_[:, half:]][side]
            out[i, 0][region] = 1
        else:
            out[i] = 1
    return torch.from_numpy(out)


@contextlib.contextmanager
def sampling_with(
    model: nn.Module,
    scheduler: str | None,
    steps: int | None,
    guidance: float | None = None,
) -> Iterator[tuple[str, int, float]]:
    """The diffusion ``model`` samples with ``scheduler`` (a name in
    aigc.schedulers.SCHEDULERS) over ``steps`` steps at classifier-free ``guidance``
    (None: the run's own) while inside; yields (name, steps, guidance). ConfigError naming
    an unknown scheduler, a step count or a guidance scale out of range."""
    from aigc.pipelines.diffusion import check_guidance

    cfg = model.cfg
    name = cfg.sampler if scheduler is None else scheduler
    steps = cfg.sample_steps if steps is None else steps
    w = cfg.guidance if guidance is None else guidance
    model.scheduler(name)  # ConfigError for an unknown name
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise ConfigError(f"steps={steps!r} must be an integer")
    if not 1 <= steps <= cfg.num_train_timesteps:
        raise ConfigError(f"steps={steps} must be in [1, {cfg.num_train_timesteps}]")
    w = check_guidance(w, "guidance", ConfigError)
    if w != cfg.guidance and not (cfg.conditional or cfg.text):
        raise ConfigError("guidance is for conditional runs; this run is unconditional")
    before = cfg.sampler, cfg.sample_steps, cfg.guidance
    cfg.sampler, cfg.sample_steps, cfg.guidance = name, steps, w
    try:
        yield name, steps, w
    finally:
        cfg.sampler, cfg.sample_steps, cfg.guidance = before


def memorisation_metrics(sums: dict[str, float]) -> dict[str, float]:
    """``memorised``: the share of generated images counted as training copies."""
    n = sums.get("memo/n", 0.0)
    return {"memorised": sums["memo/copies"] / n} if n else {}


def clip_metrics(sums: dict[str, float]) -> dict[str, float]:
    """The CLIP judge's verdicts from clip_sums: clip_score, clip_retrieval (top-1 among
    32 captions) and clip_retrieval_chance of the generated images; real/clip_score and
    real/clip_retrieval of the real validation images."""
    out = {}
    for group, prefix in (("generated", ""), ("real", "real/")):
        n = sums.get(f"clip/{group}/n", 0.0)
        if n:
            out[f"{prefix}clip_score"] = sums[f"clip/{group}/score"] / n
            out[f"{prefix}clip_retrieval"] = sums[f"clip/{group}/retrieved"] / n
            if group == "generated":
                out["clip_retrieval_chance"] = sums[f"clip/{group}/chance"] / n
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
