"""Speech made on the machine by Debian's ``flite`` synthesiser: the embedded spoken
digits (SC09-like: one-second clips of "zero" … "nine").

Each clip is one digit word in one of flite's 16 kHz voices (awb, kal16, rms, slt) at
one speaking rate (``duration_stretch``) and one pitch. Pitch is a factor of the
voice's own mean F0, given to flite as ``int_f0_target_mean``; the rms voice ignores
that setting, so its pitch is moved by playing the clip faster or slower (resampling,
which also changes its length, as a speed perturbation does). The speech is centred
in one second and peak-normalised; the grid (10 digits x 4 voices x 5 rates x 5
pitches = 1,000 clips) is deterministic, and the split is by voice so that held-out
speakers are unseen in training.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from aigc.data.audio import MelSpec, peak_normalise, read_audio, resample
from aigc.errors import DataError

SAMPLE_RATE = 16000
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOICES = ("awb", "kal16", "rms", "slt")
RATES = (0.8, 0.9, 1.0, 1.12, 1.25)  # duration_stretch: above 1 is slower
PITCHES = (0.84, 0.92, 1.0, 1.09, 1.19)  # factors of the voice's mean F0
# each voice's mean F0 in Hz near flite's own, so that factor 1 keeps its natural pitch
VOICE_F0 = {"awb": 140.0, "kal16": 100.0, "rms": 85.0, "slt": 170.0}
PITCH_BY_RESAMPLING = frozenset({"rms"})
FLITE_INSTALL = "sudo apt-get install flite"


def flite_binary() -> str:
    """The path of ``flite``; DataError with the install command when it is missing."""
    path = shutil.which("flite")
    if path is None:
        raise DataError(f"the flite speech synthesiser is not installed: run `{FLITE_INSTALL}`"
                        " (or `make test`, which installs it)")  # fmt: skip
    return path


def synthesise(text: str, voice: str = "slt", rate: float = 1.0, pitch: float = 1.0) -> np.ndarray:
    """``text`` spoken by flite's ``voice`` at ``rate`` (duration stretch) and ``pitch``
    (factor of the voice's mean F0): float32 samples at 16 kHz, as flite makes them."""
    if voice not in VOICES:
        raise DataError(f"voice {voice!r}: flite's 16 kHz voices are {', '.join(VOICES)}")
    if not 0.25 <= rate <= 4.0 or not 0.5 <= pitch <= 2.0:
        raise DataError(f"rate {rate} must be in [0.25, 4] and pitch {pitch} in [0.5, 2]")
    args = _flite_args(voice, rate, pitch)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speech.wav"
        done = subprocess.run([*args, "-t", text, "-o", str(out)], capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        if done.returncode != 0 or not out.exists():
            raise DataError(f"flite failed on {text!r} ({voice}): {done.stderr.strip()[:200]}")
        wave, _ = read_audio(out, SAMPLE_RATE)
    if voice in PITCH_BY_RESAMPLING and pitch != 1.0:
        # played `pitch` times faster: every frequency times pitch, the length / pitch
        wave = resample(wave, round(SAMPLE_RATE * pitch), SAMPLE_RATE)
    return wave


def _flite_args(voice: str, rate: float, pitch: float) -> list[str]:
    args = [flite_binary(), "-voice", voice, "--setf", f"duration_stretch={rate:g}"]
    if voice not in PITCH_BY_RESAMPLING:
        args += ["--setf", f"int_f0_target_mean={VOICE_F0[voice] * pitch:.1f}"]
    return args


def trim_silence(wave: np.ndarray, threshold: float = 0.01, margin: int = 160) -> np.ndarray:
    """``wave`` without the leading and trailing samples quieter than ``threshold`` of
    its peak, keeping ``margin`` samples (10 ms at 16 kHz) either side."""
    loud = np.nonzero(np.abs(wave) > threshold * max(float(np.abs(wave).max()), 1e-12))[0]
    if len(loud) == 0:
        return wave[:0]
    return wave[max(0, loud[0] - margin) : loud[-1] + 1 + margin]


def fit_length(wave: np.ndarray, samples: int) -> np.ndarray:
    """``wave`` centred in ``samples`` samples: zero-padded either side, or its middle
    kept when it is longer."""
    if len(wave) >= samples:
        start = (len(wave) - samples) // 2
        return wave[start : start + samples]
    out = np.zeros(samples, dtype=np.float32)
    start = (samples - len(wave)) // 2
    out[start : start + len(wave)] = wave
    return out


@dataclass(frozen=True)
class SpokenDigits:
    """The embedded spoken digits: ``waves`` (N, 16000) float32; ``digit``, ``voice``,
    ``rate`` and ``pitch`` (N,) int indices into DIGITS, VOICES and the rates and pitches
    the set was made with (RATES and PITCHES by default)."""

    waves: np.ndarray
    digit: np.ndarray
    voice: np.ndarray
    rate: np.ndarray
    pitch: np.ndarray

    def __len__(self) -> int:
        return len(self.waves)

    def select(self, rows: np.ndarray) -> SpokenDigits:
        return SpokenDigits(self.waves[rows], self.digit[rows], self.voice[rows],
                            self.rate[rows], self.pitch[rows])  # fmt: skip

    def split(
        self, heldout_voices: tuple[str, ...] = ("slt",)
    ) -> tuple[SpokenDigits, SpokenDigits]:
        """(train, held-out): the held-out part is every clip of ``heldout_voices``."""
        for v in heldout_voices:
            if v not in VOICES:
                raise DataError(f"held-out voice {v!r}: the voices are {', '.join(VOICES)}")
        held = np.isin(self.voice, [VOICES.index(v) for v in heldout_voices])
        return self.select(np.nonzero(~held)[0]), self.select(np.nonzero(held)[0])


@lru_cache(maxsize=2)
def spoken_digits(
    voices: tuple[str, ...] = VOICES,
    rates: tuple[float, ...] = RATES,
    pitches: tuple[float, ...] = PITCHES,
    seconds: float = 1.0,
) -> SpokenDigits:
    """Every digit in every voice, rate and pitch (digit-major order), each clip
    trimmed of silence, centred in ``seconds`` and peak-normalised to 0.9. About a
    millisecond of flite per clip: the whole grid takes a few seconds. Cached: callers
    share the arrays and must not write to them."""
    samples = round(seconds * SAMPLE_RATE)
    grid = [(d, v, r_i, p_i) for d in range(len(DIGITS)) for v in voices
            for r_i in range(len(rates)) for p_i in range(len(pitches))]  # fmt: skip

    def clip(row: tuple[int, str, int, int]) -> np.ndarray:
        d, v, r_i, p_i = row
        spoken = trim_silence(synthesise(DIGITS[d], v, rates[r_i], pitches[p_i]))
        return peak_normalise(fit_length(spoken, samples))

    # flite is a process per clip: run as many at once as there are cores
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        waves = list(pool.map(clip, grid))
    labels = np.asarray([(d, VOICES.index(v), r_i, p_i) for d, v, r_i, p_i in grid],
                        dtype=np.int64).reshape(-1, 4)  # fmt: skip
    return SpokenDigits(np.stack(waves).astype(np.float32), *labels.T)


# --------------------------------------------------------------------------- as pictures

MEL_RANGE = 80 / 20 * np.log(10)  # 80 dB of magnitude kept below each clip's loudest cell
MEL_REFERENCE = 2.0  # the natural-log level a picture's brightest pixel stands for


def mel_picture_spec(size: int) -> MelSpec:
    """The log-mel analysis behind a ``size`` x ``size`` picture of one second at 16 kHz:
    ``size`` mel bands (rows) and ``size`` frames (columns) one hop apart."""
    if size < 8:
        raise DataError(f"a spoken-digit picture needs at least 8 bands and frames, got {size}")
    hop = SAMPLE_RATE // size
    return MelSpec(sample_rate=SAMPLE_RATE, n_fft=max(1024, 2 * hop), hop=hop, n_mels=size)


def waves_to_pictures(waves: np.ndarray, size: int) -> np.ndarray:
    """(N, T) waves -> (N, size, size, 1) uint8 log-mel pictures, low bands at the bottom:
    each clip's loudest cell is 255 and MEL_RANGE below it (and quieter) is 0. A clip
    longer or shorter than a second is centred in one first."""
    import torch

    spec = mel_picture_spec(size)
    waves = np.stack([fit_length(np.asarray(w, np.float32), SAMPLE_RATE) for w in waves])
    mel = spec(torch.from_numpy(waves))[..., :size]  # (N, size, frames=size)
    mel = (mel - mel.amax(dim=(-2, -1), keepdim=True)).clamp_min(-MEL_RANGE)
    level = ((mel / MEL_RANGE + 1) * 255).round().to(torch.uint8).numpy()
    return np.ascontiguousarray(level[:, ::-1, :, None])


def pictures_to_log_mel(pictures: np.ndarray | Any) -> Any:
    """(N, size, size[, 1]) pictures (uint8, or floats in [-1, 1] as a model makes them)
    -> (N, size, size + 1) natural-log mel magnitudes, the frame the picture drops
    repeated at the end so that the frames cover the whole second."""
    import torch

    x = pictures if isinstance(pictures, torch.Tensor) else torch.from_numpy(np.array(pictures))
    if x.dim() == 4:  # (N, H, W, 1) uint8 or (N, 1, H, W) floats
        x = x[..., 0] if x.shape[-1] == 1 and x.dtype == torch.uint8 else x[:, 0]
    unit = x.float() / 255 if x.dtype == torch.uint8 else (x.float().clamp(-1, 1) + 1) / 2
    mel = unit.flip(-2) * MEL_RANGE - MEL_RANGE + MEL_REFERENCE
    return torch.cat([mel, mel[..., -1:]], dim=-1)


def pictures_to_waves(pictures: np.ndarray | Any, iters: int = 64, seed: int = 0) -> np.ndarray:
    """(N, size, size[, 1]) log-mel pictures -> (N, 16000) float32 waves by Griffin-Lim,
    each peak-normalised to 0.9."""
    mel = pictures_to_log_mel(pictures)
    spec = mel_picture_spec(mel.shape[-2])
    waves = spec.to_wave(mel, SAMPLE_RATE, iters=iters, seed=seed).numpy()
    return np.stack([peak_normalise(w) for w in waves]).astype(np.float32)


def spoken_digit_pictures(size: int) -> tuple[np.ndarray, SpokenDigits]:
    """The embedded spoken digits as (1000, size, size, 1) log-mel pictures, and the
    clips they were made from."""
    digits = spoken_digits()
    return waves_to_pictures(digits.waves, size), digits


# --------------------------------------------------------------------------- phones

# flite's US English phone set (CMU lexicon), "pau" for a pause
PHONES = ("pau", "aa", "ae", "ah", "ao", "aw", "ax", "axr", "ay", "b", "ch", "d", "dh", "eh",
          "el", "em", "en", "er", "ey", "f", "g", "hh", "ih", "iy", "jh", "k", "l", "m", "n",
          "ng", "nx", "ow", "oy", "p", "r", "s", "sh", "t", "th", "uh", "uw", "v", "w", "y",
          "z", "zh")  # fmt: skip
_UNSAYABLE = re.compile(r"[^A-Za-z0-9 ,.?!'\-]")
MAX_TEXT = 1000  # characters of one utterance


def normalise_text(text: str) -> str:
    """``text`` as flite should read it: each digit as its word ("427" -> "four two
    seven", as digit strings are read out), spaces collapsed. DataError naming a
    character outside letters, digits, spaces and , . ? ! ' -"""
    text = " ".join(str(text).split())
    bad = _UNSAYABLE.search(text)
    if bad:
        raise DataError(f"{bad.group()!r} (at character {bad.start() + 1}) cannot be said: "
                        "use letters, digits, spaces and , . ? ! ' -")  # fmt: skip
    if not text.strip(" ,.?!'-"):
        raise DataError("the text is empty: give words or digits to say")
    if len(text) > MAX_TEXT:
        raise DataError(f"the text has {len(text):,} characters; the most is {MAX_TEXT:,}")
    return " ".join(re.sub(r"\d", lambda m: f" {DIGITS[int(m.group())]} ", text).split())


@dataclass(frozen=True)
class Utterance:
    """Speech from flite with its phones: ``wave`` (T,) at 16 kHz, ``phones`` and each
    phone's end time ``ends`` (seconds, increasing)."""

    wave: np.ndarray
    phones: tuple[str, ...]
    ends: np.ndarray


def _parse_segments(printed: str, where: str) -> tuple[tuple[str, ...], np.ndarray]:
    phones, ends = [], []
    for item in printed.split():
        name, _, end = item.partition(":")
        if name not in PHONES:
            raise DataError(f"flite gave the phone {name!r} for {where}, not in aigc's phone set")
        phones.append(name)
        ends.append(float(end) if end else np.nan)
    return tuple(phones), np.asarray(ends, dtype=np.float64)


def speak_with_timing(text: str, voice: str = "slt", rate: float = 1.0) -> Utterance:
    """``text`` (normalised first) spoken by flite's ``voice``, with the phones it said
    and when each ended (flite's -psdur)."""
    if voice not in VOICES:
        raise DataError(f"voice {voice!r}: flite's 16 kHz voices are {', '.join(VOICES)}")
    text = normalise_text(text)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speech.wav"
        done = subprocess.run([*_flite_args(voice, rate, 1.0), "-psdur", "-t", text, "-o",
                               str(out)], capture_output=True, text=True, timeout=60)  # fmt: skip
        if done.returncode != 0 or not out.exists():
            raise DataError(f"flite failed on {text!r} ({voice}): {done.stderr.strip()[:200]}")
        wave, _ = read_audio(out, SAMPLE_RATE)
    phones, ends = _parse_segments(done.stdout, repr(text))
    return Utterance(wave, phones, ends)


def phone_frames(ends: np.ndarray, hop: int) -> np.ndarray:
    """Phone end times (seconds) -> frames of ``hop`` samples per phone (ends rounded to
    frames, never going back)."""
    edges = np.round(np.asarray(ends) * SAMPLE_RATE / hop).astype(np.int64)
    return np.diff(np.concatenate([[0], np.maximum.accumulate(edges)]))


@lru_cache(maxsize=4096)
def phones_of(text: str) -> tuple[str, ...]:
    """The phones flite's front end reads ``text`` (normalised first) as; the same in
    every voice (one lexicon and letter-to-sound rules)."""
    text = normalise_text(text)
    done = subprocess.run([flite_binary(), "-voice", "slt", "-ps", "-t", text, "-o", "none"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    if done.returncode != 0:
        raise DataError(f"flite failed on {text!r}: {done.stderr.strip()[:200]}")
    return _parse_segments(done.stdout, repr(text))[0]


def digit_words(phones: tuple[str, ...] | list[str]) -> list[tuple[int, int, int]]:
    """(digit, first phone, end phone) for each digit word in a phone sequence of
    digits said in a row (pauses between words skipped); DataError when the phones are
    not digit words."""
    words = {DIGITS.index(w): phones_of(w)[1:-1] for w in DIGITS}  # without the pauses
    out, i = [], 0
    while i < len(phones):
        if phones[i] == "pau":
            i += 1
            continue
        match = [d for d, p in words.items() if tuple(phones[i : i + len(p)]) == p]
        if not match:
            raise DataError(f"phones {' '.join(phones[i : i + 4])} ... are not a digit word")
        d = max(match, key=lambda d: len(words[d]))
        out.append((d, i, i + len(words[d])))
        i += len(words[d])
    return out


# --------------------------------------------------------------------------- audio folders

SILENCE_DBFS = -60.0  # a clip whose loudest sample is quieter than this holds no speech
MAX_CLIP_SECONDS = 30.0  # a longer file in a folder of words is a mistake: refused unread
_PARALLEL_FROM = 64  # audio files; fewer are decoded on the calling thread
_PICTURE_CHUNK = 256  # clips whose spectrograms are computed at once


@dataclass(frozen=True)
class AudioFolder:
    """The clips of a folder of audio files, one sub-folder per class (Hugging Face's
    audiofolder layout): ``waves`` (N, 16000) float32, each trimmed of silence, centred
    in one second and peak-normalised as the embedded digits are; ``labels`` (N,) indices
    into ``classes`` (the sub-folders' names, sorted); ``files`` the clips read, in that
    order; ``cut`` how many were longer than a second once trimmed (their middle second
    is kept); ``skipped`` how many unreadable files were passed over (``skip_bad``)."""

    root: Path
    waves: np.ndarray
    labels: np.ndarray
    classes: list[str]
    files: list[Path]
    cut: int = 0
    skipped: int = 0


def audio_folder_files(root: str | os.PathLike, split: str = "train") -> dict[str, list[Path]]:
    """{class: its files, sorted} of an audio folder ``root/<class>/**/<file>``, or of
    ``root/<split>/`` when root holds train and test (or val) folders. Hidden files and
    metadata (.csv, .jsonl, .txt, ...) are passed over. DataError naming the folder when
    it holds no class sub-folders, audio files directly in it, or a class without files."""
    from aigc.data.audio import AUDIO_SUFFIXES
    from aigc.data.images import _files_under, _ignored, _split_folder

    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder of audio files (one sub-folder per class)")
    root = _split_folder(root, split)
    children = sorted(p for p in root.iterdir() if not _ignored(p))
    loose = [p for p in children if p.is_file()]
    if loose:
        raise DataError(
            f"{root} holds files directly in it ({loose[0].name}); put each class's clips in a "
            "sub-folder named after the class (root/<class>/<file>.wav)"
        )
    by_class = {d.name: _files_under(d) for d in children if d.is_dir()}
    if not by_class:
        raise DataError(
            f"{root} holds no audio: put one sub-folder of clips per class in it "
            f"({', '.join(AUDIO_SUFFIXES)})"
        )
    for name, files in by_class.items():
        if not files:
            raise DataError(
                f"{root / name}: the class {name!r} holds no audio files; add clips or remove "
                "the folder"
            )
    return by_class


def read_speech(path: Path, max_seconds: float) -> np.ndarray:
    """A file's samples at 16 kHz, mono (``read_audio``); DataError naming the file when
    it is not audio, longer than ``max_seconds``, or silent (its loudest sample below
    SILENCE_DBFS)."""
    wave, _ = read_audio(path, SAMPLE_RATE, max_seconds=max_seconds)
    peak = float(np.abs(wave).max())
    if peak < 10 ** (SILENCE_DBFS / 20):
        level = f"{20 * np.log10(peak):.0f} dBFS" if peak > 0 else "digital silence"
        raise DataError(f"{path}: silent (its loudest sample is {level}, below "
                        f"{SILENCE_DBFS:g} dBFS); remove it or record it again")  # fmt: skip
    return wave


def read_clip(path: Path, seconds: float = 1.0) -> tuple[np.ndarray, bool]:
    """One file of an audio folder as the embedded digits are made: resampled to 16 kHz
    and made mono, trimmed of silence, centred in ``seconds`` and peak-normalised to 0.9;
    and whether it was longer than that once trimmed (its middle kept). DataError naming
    the file when it is not audio soundfile reads, or silent."""
    from aigc.data.audio import AUDIO_SUFFIXES

    if path.suffix.lower() not in AUDIO_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type; audio folders hold {', '.join(AUDIO_SUFFIXES)} "
            "files (remove it, or skip such files with data.skip_bad=true)"
        )
    wave = read_speech(path, MAX_CLIP_SECONDS)
    samples = round(seconds * SAMPLE_RATE)
    spoken = trim_silence(wave)
    return peak_normalise(fit_length(spoken, samples)), len(spoken) > samples


def read_audio_folder(
    root: str | os.PathLike, split: str = "train", skip_bad: bool = False
) -> AudioFolder:
    """Every clip of an audio folder (``audio_folder_files``) read by ``read_clip``; the
    first bad file raises its DataError, or with ``skip_bad`` every bad one is counted
    and passed over."""
    by_class = audio_folder_files(root, split)
    classes = list(by_class)
    items = [(f, i) for i, name in enumerate(classes) for f in by_class[name]]

    def read(item: tuple[Path, int]) -> tuple[np.ndarray, bool] | None:
        try:
            return read_clip(item[0])
        except DataError:
            if skip_bad:
                return None
            raise

    if len(items) >= _PARALLEL_FROM:  # libsndfile and soxr release the GIL
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            read_back = list(pool.map(read, items))
    else:
        read_back = [read(item) for item in items]
    keep = [i for i, r in enumerate(read_back) if r is not None]
    where = Path(root).expanduser()
    if not keep:
        raise DataError(f"{where}: none of its {len(items)} files could be read as audio")
    waves = np.stack([read_back[i][0] for i in keep]).astype(np.float32)
    labels = np.asarray([items[i][1] for i in keep], dtype=np.int64)
    missing = [classes[c] for c in range(len(classes)) if c not in set(labels.tolist())]
    if missing:
        raise DataError(f"{where}: no file of the class {missing[0]!r} could be read")
    return AudioFolder(where, waves, labels, classes, [items[i][0] for i in keep],
                       cut=sum(read_back[i][1] for i in keep),
                       skipped=len(items) - len(keep))  # fmt: skip


def audio_folder_pictures(
    root: str | os.PathLike, size: int, split: str = "train", skip_bad: bool = False
) -> tuple[np.ndarray, AudioFolder]:
    """An audio folder's clips as (N, size, size, 1) log-mel pictures, as
    ``spoken_digit_pictures`` makes of the embedded ones, and the clips. Cached while the
    files are unchanged (same names, sizes and modification times): callers share the
    arrays and must not write to them."""
    root = Path(root).expanduser().resolve()
    by_class = audio_folder_files(root, split)
    signature = tuple((str(f), s.st_size, s.st_mtime_ns)
                      for files in by_class.values() for f in files for s in [f.stat()])  # fmt: skip
    return _audio_folder_pictures(str(root), size, split, skip_bad, signature)


def forget_audio_folders() -> None:
    """Drops the clips and pictures ``audio_folder_pictures`` keeps (64 kB a clip)."""
    _audio_folder_pictures.cache_clear()


@lru_cache(maxsize=2)
def _audio_folder_pictures(
    root: str, size: int, split: str, skip_bad: bool, signature: tuple
) -> tuple[np.ndarray, AudioFolder]:
    folder = read_audio_folder(root, split, skip_bad)
    pictures = np.concatenate([waves_to_pictures(folder.waves[i : i + _PICTURE_CHUNK], size)
                               for i in range(0, len(folder.waves), _PICTURE_CHUNK)])  # fmt: skip
    for a in (pictures, folder.waves, folder.labels):
        a.flags.writeable = False
    return pictures, folder


# --------------------------------------------------------------------------- transcribed speech

MAX_UTTERANCE_SECONDS = 60.0  # one row of a transcribed folder; longer files are refused


@dataclass(frozen=True)
class Transcript:
    """One row of a transcribed audio folder: the audio ``file``, its ``text`` as flite
    reads it (``normalise_text``) and where the row is (``where``: "metadata.csv, line 3")."""

    file: Path
    text: str
    where: str


def read_transcribed_folder(root: str | os.PathLike) -> list[Transcript]:
    """The transcripts of a folder of speech, Hugging Face's audiofolder convention:
    ``root/metadata.csv`` (a header row with ``file_name`` and ``text``, then a row a
    file) or ``root/metadata.jsonl`` (an object a line with those keys), file names
    relative to root. Every audio file under root needs exactly one row, and every row
    must name one; rows are returned in the order of the files (sorted paths). DataError
    naming the metadata file and line for a bad row, or the file for a file without one;
    text with characters flite cannot say is named with its file and line."""
    from aigc.data.audio import AUDIO_SUFFIXES
    from aigc.data.captions import captions_for, find_metadata, read_metadata
    from aigc.data.images import _files_under

    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder of speech (audio files and metadata.csv)")
    metadata = find_metadata(root)
    if metadata is None:
        raise DataError(
            f"{root} has no metadata.csv or metadata.jsonl: write one with the columns "
            "file_name and text (a row per audio file, names relative to the folder)"
        )
    files = _files_under(root)
    for f in files:
        if f.suffix.lower() not in AUDIO_SUFFIXES:
            raise DataError(f"{f}: unsupported file type; a folder of speech holds "
                            f"{', '.join(AUDIO_SUFFIXES)} files and its metadata")  # fmt: skip
    if not files:
        raise DataError(f"{root} holds no audio files ({', '.join(AUDIO_SUFFIXES)})")
    texts = captions_for(files, root, metadata, item="audio file", text_name="transcript")
    lines = read_metadata(metadata, "audio file", "transcript")
    out = []
    for f, text in zip(files, texts, strict=True):
        name = f.relative_to(root).as_posix()
        where = f"{metadata}, line {lines[name][1]}"
        try:
            said = normalise_text(text)
        except DataError as e:
            raise DataError(f"{where}: the transcript of {name}: {e}") from None
        out.append(Transcript(f, said, where))
    return out


def align_to_flite(
    wave: np.ndarray, text: str, spec: MelSpec, voice: str = "slt"
) -> tuple[tuple[str, ...], np.ndarray]:
    """The phones of ``text`` and how many of ``spec``'s frames of ``wave`` (16 kHz) each
    lasts, found by aligning the recording with flite's speech of the same text, whose
    phone boundaries flite knows (Malfrère and Dutoit 1997, "High-quality speech
    synthesis for phonetic speech segmentation"): dynamic time warping of the two
    utterances' mean-normalised mel cepstra (``dtw_path``) carries each boundary from
    flite's frames to the recording's. The frames sum to the recording's; a phone may
    get none. Good for a clear reading of the text; a recording that says something
    else, or with long noise, aligns badly without an error."""
    import torch

    from aigc.data.audio import dtw_path, mfcc

    u = speak_with_timing(text, voice)
    ref = mfcc(spec(torch.from_numpy(u.wave)))  # (T1, 12)
    own = mfcc(spec(torch.from_numpy(np.asarray(wave, np.float32))))  # (T2, 12)
    path = dtw_path(ref, own)
    t1, t2 = len(ref), len(own)
    first = np.full(t1, t2, dtype=np.int64)  # the first recording frame paired with each
    np.minimum.at(first, path[:, 0], path[:, 1])
    ends = np.cumsum(phone_frames(u.ends, spec.hop))  # flite frame where each phone ends
    bounds = np.where(ends < t1, first[np.minimum(ends, t1 - 1)], t2)
    bounds[-1] = t2
    return u.phones, np.diff(np.concatenate([[0], bounds]))
