"""Text to speech on speech every install can make: digit strings spoken by flite.

prepare draws digit strings (seeded), has flite say each in each voice, and keeps the
phones flite said with their durations (flite's -psdur: durations come from the
synthesiser, not from an aligner) and the log-mel frames. Held out: other digit strings
(never a training string), each in one voice. Evaluation says every held-out string with
the model (its own durations), cuts the sound into words at the durations it chose, and
has an audio judge name each word: ``string_accuracy`` is the share of strings with
every digit right, ``digit_accuracy`` the share of digits. The judge
(aigc.metrics.audio_classifier.digit_word_judge) learns from the words of training
strings said by flite, cut the same way, and from the isolated spoken digits; the same
cut of flite's own speech of the held-out strings at flite's durations gives the
ceiling (``*_flite``). Also the held-out log-mel L1 at the true durations, the
durations' mean absolute error, and the real-time factor of synthesis (Griffin-Lim
included).

``data.source`` may instead be a folder of the user's own speech with its transcripts
(Hugging Face's audiofolder convention: ``metadata.csv`` with ``file_name`` and ``text``
columns, or ``metadata.jsonl``; ``aigc.data.speech.read_transcribed_folder``), one
speaker. Its phones are flite's reading of each transcript; the durations, which no
synthesiser gives for a recording, come from aligning it with flite's speech of the same
text (``aigc.data.speech.align_to_flite``: dynamic time warping of mel cepstra carries
flite's phone boundaries over). A seeded ``data.val_fraction`` of the recordings is held
out; with no digit judge for free text, such a run reports the held-out log-mel L1 at
the aligned durations, the durations' error and the real-time factor."""

from __future__ import annotations

import json
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aigc.config import Config
from aigc.errors import CheckpointError, ConfigError, DataError
from aigc.metrics.classifier import JudgeWarning
from aigc.models.tts import LOG_MEL_FLOOR, PhoneTTS, TTSConfig
from aigc.runs import RunDir
from aigc.tasks.base import DataFiles, Task

META_FILE = "tts.json"
SAMPLE_RATE = 16000
HOP = 256  # 16 ms frames
N_FFT = 1024
JUDGE_STRINGS = 300  # training strings whose words (in every voice) teach the judge
SOURCE = "digit-strings"  # the embedded data: digit strings said by flite
SPEAKER = "speaker"  # the one voice of a folder of the user's speech


def tts_mel_spec():
    """The log-mel analysis the model speaks in: 64 bands, 64 ms windows, 16 ms hop."""
    from aigc.data.audio import MelSpec

    return MelSpec(sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop=HOP, n_mels=64)


def mel_to_wave(mel: torch.Tensor, iters: int = 64, seed: int = 0) -> np.ndarray:
    """(frames, 64) log-mel -> (frames * HOP,) waveform by Griffin-Lim (the last frame
    repeated: centred frames of that many samples are one more than the frames)."""
    m = mel.T.float().cpu()
    m = torch.cat([m, m[:, -1:]], dim=1)
    return tts_mel_spec().to_wave(m, mel.shape[0] * HOP, iters=iters, seed=seed).numpy()


@dataclass
class TTSDataConfig:
    """Which digit strings are spoken, by whom, and how the run is judged; or which
    folder of transcribed speech is learnt."""

    # digit-strings (said by flite), or a folder of audio files with metadata.csv or
    # metadata.jsonl (file_name, text)
    source: str = SOURCE
    strings: int = 600  # training digit strings, each said in every voice
    min_digits: int = 1
    max_digits: int = 8
    voices: list[str] = field(default_factory=lambda: ["awb", "kal16", "rms", "slt"])
    val_strings: int = 120  # held-out strings (2 to 5 digits), voices in turn
    split_seed: int = 0
    val_fraction: float = 0.1  # a folder: the recordings held out (seeded by split_seed)
    align_voice: str = "slt"  # a folder: the flite voice whose speech each recording is aligned to
    judge_steps: int = 600  # training steps of the cached audio judge
    vocoder_iters: int = 64  # Griffin-Lim iterations

    def validate(self) -> None:
        from aigc.data.speech import VOICES

        if not 1 <= self.min_digits <= self.max_digits <= 20:
            raise ConfigError(f"data.min_digits={self.min_digits} and data.max_digits="
                              f"{self.max_digits}: need 1 <= min <= max <= 20")  # fmt: skip
        if self.strings < 1 or self.val_strings < 1:
            raise ConfigError("data.strings and data.val_strings must be at least 1")
        bad = [v for v in self.voices if v not in VOICES]
        if bad or not self.voices:
            raise ConfigError(f"data.voices={self.voices!r}: choose from {', '.join(VOICES)}")
        if self.judge_steps < 1 or self.vocoder_iters < 1:
            raise ConfigError("data.judge_steps and data.vocoder_iters must be at least 1")
        if not self.source.strip():
            raise ConfigError(f"data.source is empty: give {SOURCE} or a folder of speech")
        if not 0.0 < self.val_fraction <= 0.5:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 0.5]")
        if self.align_voice not in VOICES:
            raise ConfigError(f"data.align_voice={self.align_voice!r}: choose from "
                              f"{', '.join(VOICES)}")  # fmt: skip


def digit_strings(n: int, lo: int, hi: int, rng: np.random.Generator) -> list[str]:
    """n digit strings of lo to hi digits, digits separated by spaces ("4 2 7")."""
    return [
        " ".join(str(d) for d in rng.integers(0, 10, rng.integers(lo, hi + 1))) for _ in range(n)
    ]


def split_strings(d: TTSDataConfig) -> tuple[list[str], list[str]]:
    """(training strings, held-out strings), disjoint, from data.split_seed."""
    rng = np.random.default_rng(d.split_seed)
    train = digit_strings(d.strings, d.min_digits, d.max_digits, rng)
    seen = set(train)
    val: list[str] = []
    while len(val) < d.val_strings:
        s = digit_strings(1, 2, 5, rng)[0]
        if s not in seen:
            val.append(s)
            seen.add(s)
    return train, val


def frames_of(ends: np.ndarray) -> np.ndarray:
    """Phone end times (seconds) -> frames per phone (16 ms frames, ends rounded)."""
    from aigc.data.speech import phone_frames

    return phone_frames(ends, HOP)


def encode_phones(phones: tuple[str, ...] | list[str]) -> list[int]:
    from aigc.data.speech import PHONES

    return [PHONES.index(p) + 1 for p in phones]  # 0 is padding


@dataclass
class Said:
    """One utterance to learn from: ``wave`` (T,) at 16 kHz, its ``phones``, frames per
    phone (``durations``, summing to the frames kept) and the ``voice``'s index."""

    wave: np.ndarray
    phones: tuple[str, ...]
    durations: np.ndarray
    voice: int


def _flite_utterances(d: TTSDataConfig) -> tuple[list[Said], list[Said], dict[str, Any]]:
    """Digit strings said by flite in every voice (held out: other strings, voices in
    turn), with flite's own phone durations."""
    from aigc.data.speech import speak_with_timing

    train, val = split_strings(d)
    jobs = [(s, v) for s in train for v in d.voices]
    val_jobs = [(s, d.voices[i % len(d.voices)]) for i, s in enumerate(val)]
    with ThreadPoolExecutor(max_workers=4) as ex:  # flite runs as a process per clip
        said = list(ex.map(lambda job: speak_with_timing(*job), jobs + val_jobs))
    out = [Said(u.wave, u.phones, frames_of(u.ends), d.voices.index(v))
           for u, (_, v) in zip(said, jobs + val_jobs, strict=True)]  # fmt: skip
    meta = {"source": "digit strings said by flite (phones and durations from -psdur)",
            "voices": list(d.voices), "train_strings": train, "val_strings": val,
            "val_voices": [v for _, v in val_jobs]}  # fmt: skip
    return out[: len(jobs)], out[len(jobs) :], meta


def _folder_utterances(d: TTSDataConfig) -> tuple[list[Said], list[Said], dict[str, Any]]:
    """A folder of transcribed speech: each recording with flite's phones of its text and
    the durations found by aligning it with flite's speech (``align_to_flite``); a seeded
    share held out."""
    from aigc.data.images import split_indices
    from aigc.data.speech import MAX_UTTERANCE_SECONDS, align_to_flite, read_speech
    from aigc.data.speech import read_transcribed_folder as read_folder

    rows = read_folder(d.source)
    if len(rows) < 2:
        raise DataError(f"{d.source}: {len(rows)} recording; at least 2 are needed (one held out)")
    spec = tts_mel_spec()

    def said(row) -> Said:
        wave = read_speech(row.file, MAX_UTTERANCE_SECONDS)
        try:
            phones, durations = align_to_flite(wave, row.text, spec, d.align_voice)
        except DataError as e:
            raise DataError(f"{row.where}: {row.file.name}: {e}") from None
        return Said(wave, phones, durations, 0)

    with ThreadPoolExecutor(max_workers=4) as ex:  # flite is a process; numpy frees the GIL
        out = list(ex.map(said, rows))
    train_idx, val_idx = split_indices(len(rows), d.val_fraction, d.split_seed)
    root = str(Path(d.source).expanduser().resolve())
    meta = {"source": f"{root} ({len(rows)} transcribed recordings; durations aligned to "
                      f"flite's {d.align_voice} by DTW)",
            "folder": root, "voices": [SPEAKER],
            "train_texts": [rows[i].text for i in train_idx],
            "val_texts": [rows[i].text for i in val_idx],
            "val_files": [rows[i].file.resolve().relative_to(root).as_posix()
                          for i in val_idx]}  # fmt: skip
    return [out[i] for i in train_idx], [out[i] for i in val_idx], meta


class TTSTask(Task):
    """Trains PhoneTTS on flite's digit strings, judging held-out strings by ear; or on
    a folder of the user's transcribed speech."""

    name = "tts"
    data_config = TTSDataConfig
    model_config = TTSConfig
    item_name = "utterances"
    pipeline_class = "aigc.pipelines.tts:TTSPipeline"
    headline_metric = "string_accuracy"
    sample_verb = "speak"
    sample_hint = '--text "four two seven" --out speech.wav'
    loss_keys = frozenset({"loss", "mel_loss"})
    resumable_keys = frozenset({"data.judge_steps", "data.vocoder_iters"})

    def __init__(self, config: Config, run: RunDir, with_data: bool = True):
        self.config = config
        self.run = run
        self.model: nn.Module = PhoneTTS(config.model)
        self.items_per_batch = config.train.batch_size
        self.data: dict[str, np.ndarray] = {}
        self.meta: dict[str, Any] = {}
        self._judge = None
        if with_data:
            self.load_data()
        else:  # a loaded pipeline needs the voices and the phones heard, not the speech
            self.meta = self.read_meta()

    def read_meta(self) -> dict[str, Any]:
        path = self.run.data_dir / META_FILE
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: the prepared speech's record is missing or damaged "
                                  f"({e})") from None  # fmt: skip

    def load_data(self) -> None:
        d = self.run.data_dir
        names = ("phones", "durations", "voice", "mel", "mel_offsets", "val_phones",
                 "val_durations", "val_voice", "val_wave", "val_wave_offsets")  # fmt: skip
        try:
            self.data = {n: np.load(d / f"{n}.npy", allow_pickle=False) for n in names}
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{d}: the prepared speech is missing or damaged ({e})") from None
        self.meta = self.read_meta()

    # construction -----------------------------------------------------------
    @classmethod
    def prepare_data(cls, config: Config, data_dir: Path, progress: bool = True) -> None:
        d: TTSDataConfig = config.data
        if d.source == SOURCE:
            train, val, meta = _flite_utterances(d)
        else:
            train, val, meta = _folder_utterances(d)
        spec = tts_mel_spec()
        rows = []
        for u in train + val:
            mel = spec(torch.from_numpy(u.wave)).T.numpy()  # (frames, 64)
            total = int(u.durations.sum())
            mel = np.pad(mel[:total], ((0, max(0, total - len(mel))), (0, 0)),
                         constant_values=LOG_MEL_FLOOR)  # fmt: skip
            rows.append((encode_phones(u.phones), u.durations, np.maximum(mel, LOG_MEL_FLOOR)))
        n = len(train)
        width = max(len(p) for p, _, _ in rows)

        def padded(part: list, k: int) -> np.ndarray:
            out = np.zeros((len(part), width), dtype=np.int16)
            for i, r in enumerate(part):
                out[i, : len(r[k])] = r[k]
            return out

        voices = np.asarray([u.voice for u in train + val], dtype=np.int64)
        mels = [m for _, _, m in rows[:n]]
        waves = [u.wave for u in val]
        arrays = {
            "phones": padded(rows[:n], 0), "durations": padded(rows[:n], 1),
            "voice": voices[:n], "mel": np.concatenate(mels).astype(np.float16),
            "mel_offsets": np.cumsum([0] + [len(m) for m in mels]),
            "val_phones": padded(rows[n:], 0), "val_durations": padded(rows[n:], 1),
            "val_voice": voices[n:],
            "val_wave": np.round(np.clip(np.concatenate(waves), -1, 1) * 32767).astype(np.int16),
            "val_wave_offsets": np.cumsum([0] + [len(w) for w in waves]),
        }  # fmt: skip
        data_dir.mkdir(parents=True, exist_ok=True)
        for name, a in arrays.items():
            np.save(data_dir / f"{name}.npy", a, allow_pickle=False)
        meta.update(phones_seen=sorted({p for u in train for p in u.phones}),
                    train_seconds=float(sum(len(u.wave) for u in train) / SAMPLE_RATE),
                    hop=HOP, n_fft=N_FFT, sample_rate=SAMPLE_RATE)  # fmt: skip
        (data_dir / META_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def finish_config(cls, config: Config, files: DataFiles) -> None:
        from aigc.data.speech import PHONES

        meta = json.loads((files.data_dir / META_FILE).read_text(encoding="utf-8"))
        config.model.n_phones = len(PHONES) + 1
        config.model.n_voices = len(meta["voices"])
        config.model.n_mels = tts_mel_spec().n_mels

    @classmethod
    def open(cls, config: Config, run: RunDir, with_data: bool = True) -> TTSTask:
        return cls(config, run, with_data)

    # training -----------------------------------------------------------------
    def train_batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        """This share of the step's utterances, drawn from (seed, step): ``phones``,
        ``durations`` (B, L), ``voice`` (B,), ``mel`` (B, T, 64) padded with the floor."""
        t = self.config.train
        B, total = t.batch_size, t.batch_size * t.grad_accum * world
        rng = np.random.default_rng([t.seed, step, 23])
        rows = rng.integers(0, len(self.data["voice"]), total)
        part = rows[(micro * world + rank) * B : (micro * world + rank + 1) * B]
        return self.batch_of(part)

    def batch_of(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        d = self.data
        off = d["mel_offsets"]
        T = int(max(off[r + 1] - off[r] for r in rows))
        mel = np.full((len(rows), T, d["mel"].shape[1]), LOG_MEL_FLOOR, dtype=np.float32)
        for i, r in enumerate(rows):
            mel[i, : off[r + 1] - off[r]] = d["mel"][off[r] : off[r + 1]]
        return {"phones": torch.from_numpy(d["phones"][rows].astype(np.int64)),
                "durations": torch.from_numpy(d["durations"][rows].astype(np.int64)),
                "voice": torch.from_numpy(d["voice"][rows]), "mel": torch.from_numpy(mel)}  # fmt: skip

    @property
    def from_folder(self) -> bool:
        """Whether the run learnt a folder of the user's speech (not flite's digit strings)."""
        return "folder" in self.meta

    @property
    def headline(self) -> str:
        return "mel_l1" if self.from_folder else self.headline_metric  # no judge for a folder

    # evaluation -----------------------------------------------------------------
    def judge(self):
        if self._judge is None:
            from aigc.metrics.audio_classifier import digit_word_judge

            if not self.meta:
                self.load_data()
            strings = self.meta["train_strings"][:JUDGE_STRINGS]
            self._judge = digit_word_judge(strings, self.meta["voices"], HOP,
                                           steps=self.config.data.judge_steps)  # fmt: skip
        return self._judge

    def recognise(self, wave: np.ndarray, phones: np.ndarray, durations: np.ndarray) -> list[int]:
        """The judge's digit for each digit word of one utterance, cut at ``durations``."""
        from aigc.data.speech import PHONES
        from aigc.metrics.audio_classifier import cut_words

        names = [PHONES[int(p) - 1] for p in phones if p > 0]
        cuts, _ = cut_words(wave, names, durations, HOP)
        return self.judge().predict(cuts)["digit"].tolist() if len(cuts) else []

    def eval_sums(
        self, model: nn.Module, rank: int, world: int, device: torch.device
    ) -> dict[str, float]:
        """This rank's held-out strings said by the model, cut into words and judged;
        flite's own speech of the same strings beside them; mel L1 at true durations.
        A folder run: the mel L1, the durations' error and the real-time factor only."""
        from aigc.data.speech import PHONES, digit_words

        if not self.data:
            self.load_data()
        d = self.data
        rows = list(range(rank, len(d["val_voice"]), world))
        sums = {k: 0.0 for k in ("strings", "strings_right", "digits", "digits_right",
                                 "strings_right_flite", "digits_right_flite", "mel_l1",
                                 "mel_frames", "dur_abs", "phones", "synth_seconds",
                                 "audio_seconds")}  # fmt: skip
        for r in rows:
            phones = torch.from_numpy(d["val_phones"][r : r + 1].astype(np.int64)).to(device)
            voice = torch.from_numpy(d["val_voice"][r : r + 1]).to(device)
            true_dur = torch.from_numpy(d["val_durations"][r : r + 1].astype(np.int64)).to(device)
            start = time.perf_counter()
            mel, dur = model.synthesise(phones, voice)
            wave = mel_to_wave(mel[0], self.config.data.vocoder_iters)
            sums["synth_seconds"] += time.perf_counter() - start
            sums["audio_seconds"] += len(wave) / SAMPLE_RATE
            sums["strings"] += 1
            if not self.from_folder:  # digit strings: cut into words and named by the judge
                names = d["val_phones"][r]
                truth = [w for w, _, _ in digit_words([PHONES[int(p) - 1] for p in names if p > 0])]
                heard = self.recognise(wave, names, dur[0].cpu().numpy())
                a, b = d["val_wave_offsets"][r], d["val_wave_offsets"][r + 1]
                real = d["val_wave"][a:b].astype(np.float32) / 32767
                heard_flite = self.recognise(real, names, d["val_durations"][r])
                right = sum(x == y for x, y in zip(heard, truth, strict=True))
                right_flite = sum(x == y for x, y in zip(heard_flite, truth, strict=True))
                sums["digits"] += len(truth)
                sums["digits_right"] += right
                sums["strings_right"] += float(right == len(truth))
                sums["digits_right_flite"] += right_flite
                sums["strings_right_flite"] += float(right_flite == len(truth))
            # teacher-forced: the frames at flite's durations against flite's frames
            with torch.no_grad():
                pred = model(phones, voice, true_dur)[0].float().cpu().numpy()
            target = self.val_mel(r)
            n = min(len(pred), len(target))
            sums["mel_l1"] += float(np.abs(pred[:n] - target[:n]).sum() / pred.shape[1])
            sums["mel_frames"] += n
            k = int((d["val_phones"][r] > 0).sum())
            sums["dur_abs"] += float(
                np.abs(dur[0, :k].cpu().numpy() - d["val_durations"][r, :k]).sum()
            )
            sums["phones"] += k
        return sums

    def val_mel(self, r: int) -> np.ndarray:
        """Held-out row r's log-mel frames (frames, 64) at flite's durations, floored."""
        d = self.data
        a, b = d["val_wave_offsets"][r], d["val_wave_offsets"][r + 1]
        wave = torch.from_numpy(d["val_wave"][a:b].astype(np.float32) / 32767)
        mel = tts_mel_spec()(wave).T.numpy()
        total = int(d["val_durations"][r].sum())
        mel = np.pad(mel[:total], ((0, max(0, total - len(mel))), (0, 0)),
                     constant_values=LOG_MEL_FLOOR)  # fmt: skip
        return np.maximum(mel, LOG_MEL_FLOOR)

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        if not sums.get("strings"):
            return {}
        s, n = sums["strings"], max(sums["digits"], 1.0)
        out = {
            "mel_l1": sums["mel_l1"] / max(sums["mel_frames"], 1.0),
            "duration_error_frames": sums["dur_abs"] / max(sums["phones"], 1.0),
            "real_time_factor": sums["synth_seconds"] / max(sums["audio_seconds"], 1e-9),
        }
        if self.from_folder:
            return out
        for why in self.judge().weaknesses():
            warnings.warn(why, JudgeWarning, stacklevel=2)
        return {
            "string_accuracy": sums["strings_right"] / s,
            "digit_accuracy": sums["digits_right"] / n,
            "string_accuracy_flite": sums["strings_right_flite"] / s,
            "digit_accuracy_flite": sums["digits_right_flite"] / n,
            **out,
            "judge_accuracy": float(self.judge().accuracy["digit"]),
        }

    def eval_info(self) -> dict[str, str]:
        if self.from_folder:
            return {"durations": "the recordings aligned to flite's speech by DTW"}
        return {"recogniser": "aigc's spoken-digit judge on the words cut at the durations "
                              "the model chose (flite's for *_flite)"}  # fmt: skip

    def samples(self, model: nn.Module, step: int, device: torch.device) -> dict[str, Any]:
        """Two held-out utterances said by the model, and the first as recorded (flite's
        speech, or the user's recording)."""
        from aigc.samples import AudioSample

        if not self.data:
            self.load_data()
        d = self.data
        out: dict[str, Any] = {}
        for r in range(min(2, len(d["val_voice"]))):
            phones = torch.from_numpy(d["val_phones"][r : r + 1].astype(np.int64)).to(device)
            voice = torch.from_numpy(d["val_voice"][r : r + 1]).to(device)
            mel, _dur = model.synthesise(phones, voice)
            wave = mel_to_wave(mel[0], self.config.data.vocoder_iters)
            peak = max(float(np.abs(wave).max()), 1e-9)
            out[f"said-{r}"] = AudioSample((wave * (0.9 / peak)).astype(np.float32), SAMPLE_RATE)
        a, b = d["val_wave_offsets"][0], d["val_wave_offsets"][1]
        out["recorded-0" if self.from_folder else "flite-0"] = AudioSample(
            d["val_wave"][a:b].astype(np.float32) / 32767, SAMPLE_RATE
        )
        return out
