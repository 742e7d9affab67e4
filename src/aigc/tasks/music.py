"""Symbolic music: a GPT over four-part chorale tokens (aigc.data.music), trained on
the Bach chorales inside ``music21`` or a folder of the user's four-part MIDI files.

Evaluation is what a reader of the music-modelling literature asks for: held-out
negative log-likelihood per note (the sum over every token of the held-out chorales,
divided by their notes) beside an interpolated Kneser-Ney 3-gram floor fitted on the
same training split, and music-theory checks of generated chorales (notes in the key,
voices in their ranges, parallel fifths and octaves) beside the held-out real
chorales' rates, with the key of both estimated the same way."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aigc.config import Config
from aigc.errors import CheckpointError, ConfigError, DataError
from aigc.models.gpt import GPT, GPTConfig
from aigc.runs import RunDir
from aigc.tasks import batch_rows, load_splits
from aigc.tasks.base import DataFiles, Task
from aigc.tasks.lm import stream_nll
from aigc.trainer import mix_seed

META_FILE = "music.json"
FLOOR_ORDER = 3  # the n-gram floor the issue sets
VOICE_PHASE = 4  # tokens per sixteenth (soprano, alto, tenor, bass)
STEPS_PER_BAR = 16  # sixteenths in a 4/4 bar


def aligned(tokens: np.ndarray) -> np.ndarray:
    """A chorale's tokens (<bos>, 4 per sixteenth, <eos>) padded with <eos> to a multiple
    of VOICE_PHASE, so that in the concatenated stream every <bos> and every soprano
    token sits at a position fixed mod 4. Training windows start at such positions, so
    the position embedding tells the model which voice comes next: without it, windows
    at random offsets left the voice to be guessed from the pitches, and free-running
    samples slipped voices (a quarter of their notes out of range, parallels 38 times
    the real rate; issue 19's note)."""
    from aigc.data.music import EOS

    pad = (-len(tokens)) % VOICE_PHASE
    return np.concatenate([tokens, np.full(pad, EOS, dtype=tokens.dtype)])


@dataclass
class MusicDataConfig:
    """Where the chorales come from, how they are split, and how samples are judged."""

    path: str | None = None  # a folder of four-part MIDI files; None = music21's Bach chorales
    limit: int = 0  # use only the first N chorales (0 = all): small runs and tests
    val_fraction: float = 0.1  # whole chorales held out, chosen by split_seed
    split_seed: int = 0
    transpose: bool = True  # train on every transposition within a tritone that fits
    # how a held note is written (aigc.data.music.ENCODINGS): "hold" (runs before the
    # "pitch" encoding) or "pitch", where every sixteenth spells its whole chord
    encoding: str = "hold"
    # the order in which a sixteenth's voices are written, by initials: "satb", or
    # "sbat" (the outer voices first, as harmony is taught), where a voice can only
    # avoid a parallel with the voices written before it, and the inner voices have the
    # most notes to choose from while the bass, written last in "satb", has the fewest
    voice_order: str = "satb"
    eval_batch_size: int = 16  # windows per forward pass during validation
    eval_samples: int = 16  # chorales generated per evaluation for the music checks
    eval_sample_bars: int = 4  # their length
    # weight of an unlikelihood term (Welleck et al. 2019) on the notes that would make
    # parallel fifths or octaves with a voice already written (0 = off): Bach avoids
    # them, and plain next-note training left samples with 40 times his rate
    unlikely_parallels: float = 0.0
    sample_rate: int = 22050  # of rendered audio
    tempo: float = 80.0  # quarter notes per minute, for MIDI and audio

    @property
    def order(self) -> tuple[int, ...]:
        """voice_order as voice indices (aigc.data.music.voice_order)."""
        from aigc.data.music import voice_order

        return voice_order(self.voice_order)

    def validate(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        for key in ("eval_batch_size", "eval_samples", "eval_sample_bars"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key}={getattr(self, key)} must be at least 1")
        if not 0.0 <= self.unlikely_parallels <= 1000.0:
            raise ConfigError(f"data.unlikely_parallels={self.unlikely_parallels} must be in "
                              "[0, 1000] (0 = off)")  # fmt: skip
        from aigc.data.music import ENCODINGS, voice_order

        try:
            voice_order(self.voice_order)
        except DataError as e:
            raise ConfigError(f"data.voice_order: {e}") from None
        if self.encoding not in ENCODINGS:
            raise ConfigError(f"data.encoding={self.encoding!r}: choose one of "
                              f"{', '.join(ENCODINGS)}")  # fmt: skip
        if self.limit < 0:
            raise ConfigError(f"data.limit={self.limit} must be 0 (all) or more")
        if not 8000 <= self.sample_rate <= 96000:
            raise ConfigError(f"data.sample_rate={self.sample_rate} must be in [8000, 96000]")
        if not 20 <= self.tempo <= 300:
            raise ConfigError(f"data.tempo={self.tempo} must be in [20, 300]")


def read_chorales(d: MusicDataConfig) -> list:
    """The chorales of ``d``: the embedded Bach chorales, or every .mid/.midi file under
    ``d.path`` (each must be four-part; DataError naming the file that is not)."""
    from aigc.data.music import bach_chorales, read_midi

    if d.path is None:
        return bach_chorales(d.limit or None)
    folder = Path(d.path)
    if not folder.is_dir():
        raise DataError(f"data.path={d.path}: no such folder of MIDI files")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".mid", ".midi"))
    if d.limit:
        files = files[: d.limit]
    if not files:
        raise DataError(f"data.path={d.path}: no .mid or .midi files in it")
    return [read_midi(p) for p in files]


def real_rates(chorales: list) -> dict[str, float]:
    """The music checks of real chorales, with keys estimated as for samples."""
    from aigc.data.music import in_range_rate, parallels

    par = [parallels(c) for c in chorales]
    moves = sum(p.moves for p in par)
    return {
        "in_key": float(np.nanmean([_in_key(c) for c in chorales])),
        "in_range": float(np.nanmean([in_range_rate(c) for c in chorales])),
        "parallels": sum(p.fifths + p.octaves for p in par) / moves if moves else float("nan"),
        # what the parallels rate divides by: voices that stop moving also stop parallels
        "moves_per_bar": moves / max(sum(len(c) for c in chorales) / STEPS_PER_BAR, 1e-9),
    }


def _in_key(chorale) -> float:
    from dataclasses import replace

    from aigc.data.music import estimate_key, in_key_rate

    tonic, mode = estimate_key(chorale)
    return in_key_rate(replace(chorale, tonic=tonic, mode=mode))


class MusicTask(Task):
    """Trains a GPT on chorale tokens; evaluates nats per note against the n-gram floor
    and the music checks of samples."""

    name = "music"
    data_config = MusicDataConfig
    model_config = GPTConfig
    item_name = "tokens"
    pipeline_class = "aigc.pipelines.music:MusicPipeline"
    headline_metric = "nll_per_note"
    sample_hint = "--n 4 --bars 8"
    resumable_keys = frozenset({"data.eval_samples", "data.eval_sample_bars",
                                "data.eval_batch_size"})  # fmt: skip

    def __init__(self, config: Config, run: RunDir, with_data: bool = True):
        self.config = config
        self.run = run
        self.model: nn.Module = GPT(config.model)
        self.items_per_batch = config.train.batch_size * config.model.block_size
        self.train_tokens: np.ndarray | None = None
        self.val_tokens: np.ndarray | None = None
        self.meta: dict[str, Any] = {}
        self.unlikely: np.ndarray | None = None  # (N, V) bits over train_tokens, when used
        if with_data:
            self.load_data()

    def load_data(self) -> None:
        """Reads the prepared tokens and music.json (a loaded run's evaluation calls it)."""
        splits = load_splits(self.run.data_dir, ("tokens",))
        self.train_tokens, self.val_tokens = splits["train"][0], splits["val"][0]
        self.meta = read_meta(self.run.data_dir)

    # construction -----------------------------------------------------------
    @classmethod
    def prepare_data(cls, config: Config, data_dir: Path, progress: bool = True) -> None:
        """Parses the chorales, splits them by chorale, writes the training tokens (every
        transposition when data.transpose) and the held-out ones, and fits the floor."""
        from aigc.data.music import encode, split_chorales, transpositions
        from aigc.metrics.ngram import KneserNey

        d: MusicDataConfig = config.data
        chorales = read_chorales(d)
        if len(chorales) < 2:
            raise DataError(f"{len(chorales)} chorale(s): a split needs at least 2")
        train, held = split_chorales(chorales, d.val_fraction, d.split_seed)
        plain = [encode(c, 0, d.encoding, d.order) for c in train]
        seqs = ([encode(c, k, d.encoding, d.order) for c in train for k in transpositions(c)]
                if d.transpose else plain)  # fmt: skip
        held_seqs = [encode(c, 0, d.encoding, d.order) for c in held]
        train_tokens = np.concatenate([aligned(s) for s in seqs]).astype(np.int16)
        val_tokens = np.concatenate([aligned(s) for s in held_seqs]).astype(np.int16)
        block = config.model.block_size
        if len(train_tokens) < block + 2:
            raise DataError(f"{len(train_tokens)} training tokens, but model.block_size={block} "
                            f"needs at least {block + 2}; use more chorales")  # fmt: skip
        notes = int(sum(int((c.onsets & (c.pitches != 0)).sum()) for c in held))
        from aigc.data.music import VOCAB_SIZE

        # the floor is fitted on the "hold" encoding in SATB order whatever the run's: NLL
        # per note is the same quantity in all, and a 3-gram of the "pitch" encoding,
        # which must see four tokens back to hold a note, is far weaker (8.2 against 3.9)
        floor_train, floor_held = ([encode(c) for c in train], [encode(c) for c in held])
        nll, _ = KneserNey(FLOOR_ORDER, VOCAB_SIZE).fit(floor_train).nll(floor_held)
        data_dir.mkdir(parents=True, exist_ok=True)
        np.save(data_dir / "train_tokens.npy", train_tokens, allow_pickle=False)
        np.save(data_dir / "val_tokens.npy", val_tokens, allow_pickle=False)
        meta = {
            "source": d.path or "music21 Bach chorales",
            "train_chorales": len(train), "val_chorales": len(held),
            "train_sequences": len(seqs), "train_tokens": len(train_tokens),
            "val_tokens": len(val_tokens), "val_notes": notes,
            "floor": {"order": FLOOR_ORDER, "nll_per_note": nll / max(notes, 1)},
            "real": real_rates(held),
        }  # fmt: skip
        (data_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def finish_config(cls, config: Config, files: DataFiles) -> None:
        """The vocabulary is the music tokens' (fixed by data.encoding)."""
        from aigc.data.music import vocab_size

        vocab = vocab_size(config.data.encoding)

        if config.model.block_size % VOICE_PHASE:
            raise ConfigError(f"model.block_size={config.model.block_size} must be a multiple "
                              f"of {VOICE_PHASE} (one token per voice)")  # fmt: skip
        if config.model.vocab_size == 0:
            config.model.vocab_size = vocab
        elif config.model.vocab_size != vocab:
            raise ConfigError(f"model.vocab_size={config.model.vocab_size}: music tokens are "
                              f"{vocab}; leave it at 0")  # fmt: skip

    @classmethod
    def open(cls, config: Config, run: RunDir, with_data: bool = True) -> MusicTask:
        cls.finish_config(config, DataFiles.of_run(run))
        return cls(config, run, with_data)

    # training -----------------------------------------------------------------
    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        """Random windows of the training tokens, a pure function of (seed, step), each
        starting at a multiple of VOICE_PHASE, so that a position in the window always
        holds the same voice (see `aligned`)."""
        T = self.config.model.block_size
        train = self.train_tokens
        starts = VOICE_PHASE * batch_rows(self.config.train, (len(train) - T) // VOICE_PHASE,
                                          step, micro, rank, world)  # fmt: skip
        rows = starts[:, None] + np.arange(T + 1)
        buf = torch.from_numpy(train[rows].astype(np.int64))
        batch = {"input_ids": buf[:, :-1], "targets": buf[:, 1:]}
        weight = self.config.data.unlikely_parallels
        if weight > 0:
            if self.unlikely is None:
                from aigc.data.music import unlikely_tokens

                # kept as bits: (N, V) booleans over every transposition are ~0.4 GB
                flags = unlikely_tokens(train, self.config.model.vocab_size,
                                        order=self.config.data.order)  # fmt: skip
                self.unlikely = np.packbits(flags, axis=-1)
            mask = np.unpackbits(self.unlikely[rows[:, 1:]], axis=-1,
                                 count=self.config.model.vocab_size)  # fmt: skip
            batch["unlikely"] = torch.from_numpy(mask.astype(bool))
            batch["unlikely_weight"] = torch.tensor(weight)  # the step contract: tensors
        return batch

    def eval_sums(
        self, model: nn.Module, rank: int, world: int, device: torch.device
    ) -> dict[str, float]:
        """Summed NLL over the held-out tokens, and (rank 0) the music checks' sums over
        data.eval_samples generated chorales."""
        d: MusicDataConfig = self.config.data
        if self.val_tokens is None:
            self.load_data()
        nll, count = stream_nll(model, self.val_tokens, self.config.model.block_size,
                                d.eval_batch_size, rank, world, device)  # fmt: skip
        keys = ("samples", "in_key", "in_range", "fifths", "octaves", "moves")
        judged = dict.fromkeys(keys, 0.0)
        if rank == 0:
            from aigc.data.music import in_range_rate, parallels

            chorales = self.generate(model, d.eval_samples, d.eval_sample_bars,
                                     seed=self.config.train.seed, device=device)  # fmt: skip
            for c in chorales:
                p = parallels(c)
                judged["samples"] += 1
                judged["in_key"] += _nan0(_in_key(c))
                judged["in_range"] += _nan0(in_range_rate(c))
                judged["fifths"] += p.fifths
                judged["octaves"] += p.octaves
                judged["moves"] += p.moves
        return {"nll": nll, "count": float(count), **judged}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """nats per token and per note, the floor and how far below it, and the checks
        of samples beside the real held-out chorales'."""
        if sums["count"] == 0:
            return {}
        m = self.meta
        share = sums["count"] / max(m["val_tokens"] - 1, 1)  # all but the first token
        per_note = sums["nll"] / max(m["val_notes"] * share, 1e-9)
        floor = m["floor"]["nll_per_note"]
        out = {
            "loss": sums["nll"] / sums["count"],
            "nll_per_note": per_note,
            "ngram_floor": floor,
            "below_floor": 1.0 - per_note / floor,
        }
        n = sums.get("samples", 0.0)
        if n:
            moves, bars = sums["moves"], self.config.data.eval_sample_bars
            rate = (sums["fifths"] + sums["octaves"]) / moves if moves else float("nan")
            out.update({
                "sample_in_key": sums["in_key"] / n,
                "sample_in_range": sums["in_range"] / n,
                "sample_parallels": rate,
                "real_in_key": m["real"]["in_key"],
                "real_in_range": m["real"]["in_range"],
                "real_parallels": m["real"]["parallels"],
                "parallels_ratio": rate / m["real"]["parallels"] if m["real"]["parallels"]
                else float("nan"),
                "sample_moves_per_bar": moves / (n * bars),
            })  # fmt: skip
            if "moves_per_bar" in m["real"]:  # runs prepared before it lack it
                out["real_moves_per_bar"] = m["real"]["moves_per_bar"]
        return out

    def eval_info(self) -> dict[str, str]:
        return {
            "floor": f"interpolated Kneser-Ney {FLOOR_ORDER}-gram on the training split "
            "(hold encoding)"
        }

    def samples(self, model: nn.Module, step: int, device: torch.device) -> dict[str, Any]:
        """Two fixed-seed chorales of four bars: MIDI files and their rendered audio."""
        from aigc.data.music import midi_bytes, render
        from aigc.samples import AudioSample, MidiSample

        d: MusicDataConfig = self.config.data
        out: dict[str, Any] = {}
        for i, c in enumerate(self.generate(model, 2, 4, seed=self.config.train.seed,
                                            device=device)):  # fmt: skip
            out[f"chorale-{i}"] = MidiSample(midi_bytes(c, d.tempo))
            out[f"chorale-{i}-audio"] = AudioSample(render(c, d.sample_rate, d.tempo),
                                                    d.sample_rate)  # fmt: skip
        return out

    # generation -------------------------------------------------------------------
    def generate(
        self,
        model: nn.Module,
        n: int,
        bars: int,
        seed: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        device: torch.device | None = None,
        beats: float = 4.0,
    ) -> list:
        """n chorales of ``bars`` bars from <bos>; row i draws from its own generator
        seeded by (seed, i), so a row does not depend on how many are drawn."""
        from aigc.data.music import decode

        steps = round(bars * beats * 4)
        tokens = sample_tokens(model, n, 4 * steps, seed, temperature, top_k, device,
                               self.config.data.encoding)  # fmt: skip
        order = self.config.data.order
        return [decode(row, name=f"sample-{i}", beats=beats, order=order)
                for i, row in enumerate(tokens)]  # fmt: skip


def _nan0(x: float) -> float:
    return 0.0 if math.isnan(x) else x


def read_meta(data_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((data_dir / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{data_dir / META_FILE} is missing or damaged ({e})") from None


@torch.no_grad()
def sample_tokens(
    model: nn.Module,
    n: int,
    length: int,
    seed: int | None,
    temperature: float = 1.0,
    top_k: int | None = None,
    device: torch.device | None = None,
    encoding: str = "hold",
) -> list[list[int]]:
    """n rows of ``length`` music tokens after <bos> (which is never drawn again, nor
    <eos>: the length is asked for), temperature 0 = greedy. In the "pitch" encoding a
    held-note token must hold the pitch its voice sounds (`held_tokens`): the others
    are never drawn, as a held note that changes pitch has no meaning. The KV cache serves the
    first block_size tokens; beyond it the model reads a sliding window of the latest
    tokens that starts at a sixteenth's first token (a multiple of VOICE_PHASE after <bos>, as
    its training windows did) and leaves room for the next token."""
    from aigc.data.music import BOS, EOS, HELD_BASE, held_tokens

    model.eval()
    device = device or next(model.parameters()).device
    block = model.cfg.block_size
    gens = [torch.Generator().manual_seed(mix_seed(seed if seed is not None else 0, i))
            for i in range(n)]  # fmt: skip
    if seed is None:
        for g in gens:
            g.seed()
    rows = torch.full((n, 1), BOS, dtype=torch.long, device=device)
    cache = model.make_kv_cache(n, block)
    logits = model.forward_cached(rows, cache, last_only=True)[:, -1]
    for _ in range(length):
        logits = logits.float().cpu()
        logits[:, [BOS, EOS]] = -math.inf
        if encoding == "pitch":
            drawn = rows.size(1) - 1
            allowed = (held_tokens(rows[:, drawn - 3].cpu().numpy()) if drawn >= VOICE_PHASE
                       else np.full(n, -1))  # fmt: skip
            keep = logits[torch.arange(n), torch.from_numpy(allowed).clamp(min=0)]
            logits[:, HELD_BASE:] = -math.inf
            has = torch.from_numpy(allowed >= 0)
            logits[has, torch.from_numpy(allowed)[has]] = keep[has]
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.size(-1):
                kth = logits.topk(top_k, -1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -math.inf)
            probs = torch.softmax(logits, -1)
            nxt = torch.cat([torch.multinomial(probs[i], 1, generator=gens[i]) for i in range(n)])
        rows = torch.cat([rows, nxt.view(n, 1).to(device)], 1)
        if rows.size(1) <= block:
            logits = model.forward_cached(rows[:, -1:], cache, last_only=True)[:, -1]
        else:
            start = -(-(rows.size(1) - block + 1) // VOICE_PHASE) * VOICE_PHASE
            logits = model(rows[:, start:])[0][:, -1]
    return rows[:, 1:].tolist()
