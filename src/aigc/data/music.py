"""Symbolic music: four-part chorales on a sixteenth-note grid, MIDI in and out through
``music21``, and the music-theory checks samples are measured by.

A chorale is a (T, 4) array of MIDI pitches (0 = rest) for soprano, alto, tenor and
bass at T sixteenth notes, with a (T, 4) flag of where a note starts (a held note and a
repeated one differ only there), its key (tonic pitch class and mode) and its metre.
The embedded source is the corpus inside the ``music21`` package: its 371 Bach
chorales, of which those in exactly four parts are kept. Files are always parsed from
source (``forceSource=True``): music21's own parse cache is pickled, and aigc never
unpickles.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aigc.errors import DataError

VOICES = ("soprano", "alto", "tenor", "bass")
STEPS_PER_QUARTER = 4  # the sixteenth-note grid
REST = 0
# the range each voice keeps to (MIDI pitches, inclusive): the usual SATB ranges of
# harmony textbooks widened by a step or two, since Bach's parts reach a little further
VOICE_RANGES = {"soprano": (60, 81), "alto": (53, 74), "tenor": (48, 69), "bass": (36, 64)}
SATB = (0, 1, 2, 3)  # the order in which a sixteenth's voices are written, by default
MAJOR = frozenset({0, 2, 4, 5, 7, 9, 11})
# minor: the natural scale with the raised sixth and seventh of the melodic and
# harmonic forms, which chorales in minor use all the time
MINOR = frozenset({0, 2, 3, 5, 7, 8, 9, 10, 11})


@dataclass(frozen=True)
class Chorale:
    """``pitches`` (T, 4) int16 MIDI pitches (0 = rest) and ``onsets`` (T, 4) bool per
    sixteenth for soprano, alto, tenor and bass; ``tonic`` a pitch class 0-11 and
    ``mode`` "major" or "minor"; ``beats`` quarter notes per bar."""

    name: str
    pitches: np.ndarray
    onsets: np.ndarray
    tonic: int
    mode: str
    beats: float = 4.0

    def __len__(self) -> int:
        return len(self.pitches)

    def scale(self) -> frozenset[int]:
        """The pitch classes of the key (tonic + the mode's degrees, mod 12)."""
        steps = MAJOR if self.mode == "major" else MINOR
        return frozenset((self.tonic + s) % 12 for s in steps)


def chorale_from_score(score, name: str = "") -> Chorale:
    """A music21 score of exactly four parts (highest first) as a Chorale. DataError
    when it has another number of parts, no notes, or a part sounding two notes at once
    (a chord: the top note is kept, as a chorale's voice is one line)."""
    parts = list(score.parts)
    if len(parts) != 4:
        raise DataError(f"{name or 'the score'}: a chorale has four parts, this has {len(parts)}")
    length = round(float(score.flatten().highestTime) * STEPS_PER_QUARTER)
    if length == 0:
        raise DataError(f"{name or 'the score'}: no notes")
    pitches = np.zeros((length, 4), np.int16)
    onsets = np.zeros((length, 4), bool)
    for v, part in enumerate(parts):
        for n in part.flatten().notes:
            start = round(float(n.offset) * STEPS_PER_QUARTER)
            end = round(float(n.offset + n.quarterLength) * STEPS_PER_QUARTER)
            if end <= start or start >= length:
                continue  # grace notes take no time on the grid
            midi = max(p.midi for p in n.pitches)
            pitches[start:end, v] = midi
            tied_on = n.tie is not None and n.tie.type in ("continue", "stop")
            onsets[start, v] = not (tied_on and start > 0 and pitches[start - 1, v] == midi)
    if not onsets.any():
        raise DataError(f"{name or 'the score'}: no notes")
    key = score.analyze("key")
    metre = score.recurse().getElementsByClass("TimeSignature")
    beats = float(metre[0].barDuration.quarterLength) if len(metre) else 4.0
    return Chorale(name, pitches, onsets, int(key.tonic.pitchClass), str(key.mode), beats)


def bach_chorales(limit: int | None = None) -> list[Chorale]:
    """The four-part Bach chorales of music21's corpus in its Riemenschneider order
    (``limit`` the first so many). Parsing all of them takes about a minute: prepare
    them once and keep the arrays."""
    from music21 import corpus

    names = list(corpus.chorales.Iterator(returnType="filename"))
    out = []
    for name in names[:limit]:
        score = corpus.parse(name, forceSource=True)
        if len(score.parts) == 4:
            try:
                out.append(chorale_from_score(score, str(name)))
            except DataError:
                continue
    return out


def read_midi(path: str | os.PathLike) -> Chorale:
    """A four-part MIDI file as a Chorale; DataError naming the file when it cannot be
    read, has no notes, or has another number of parts."""
    from music21 import converter

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such MIDI file")
    try:
        score = converter.parse(str(path), format="midi", forceSource=True,
                                quarterLengthDivisors=(4, 3))  # fmt: skip
    except Exception as e:  # music21 raises many kinds for a damaged file
        raise DataError(f"{path}: not a MIDI file music21 can read ({type(e).__name__})") from None
    return chorale_from_score(score, str(path))


def to_score(chorale: Chorale, tempo: float = 80.0):
    """The chorale as a music21 score of four parts (onsets start notes; a held pitch
    continues the note), at ``tempo`` quarter notes per minute."""
    from music21 import instrument, meter, note, stream
    from music21 import tempo as m21tempo

    score = stream.Score()
    step = 1.0 / STEPS_PER_QUARTER
    for v, name in enumerate(VOICES):
        part = stream.Part(id=name)
        part.partName = name.capitalize()
        part.insert(0, instrument.Choir())
        if v == 0:
            part.insert(0, m21tempo.MetronomeMark(number=tempo))
            part.insert(0, meter.TimeSignature(f"{round(chorale.beats)}/4"))
        t = 0
        length = len(chorale)
        while t < length:
            midi = int(chorale.pitches[t, v])
            end = t + 1
            while end < length and chorale.pitches[end, v] == midi and not chorale.onsets[end, v]:
                end += 1
            element = note.Rest() if midi == REST else note.Note(midi)
            element.quarterLength = (end - t) * step
            part.insert(t * step, element)
            t = end
        score.insert(0, part)
    return score


def write_midi(chorale: Chorale, path: str | os.PathLike, tempo: float = 80.0) -> Path:
    """The chorale as a standard MIDI file (one track per voice), written through a
    temporary file. Returns the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    to_score(chorale, tempo).write("midi", fp=str(tmp))
    os.replace(tmp, path)
    return path


def midi_bytes(chorale: Chorale, tempo: float = 80.0) -> bytes:
    """The chorale as the bytes of a standard MIDI file (what `write_midi` writes)."""
    from music21 import midi

    return midi.translate.streamToMidiFile(to_score(chorale, tempo)).writestr()


def render(chorale: Chorale, sample_rate: int = 22050, tempo: float = 80.0) -> np.ndarray:
    """The chorale played by a small additive synthesiser of our own: each note a sum of
    its first four harmonics (amplitudes 1/k) at equal temperament (A4 = 440 Hz), with a
    10 ms attack and a 40 ms release, the four voices mixed; (T,) float32 peaking at
    0.9 (silence stays 0). ``tempo`` in quarter notes per minute."""
    step = 60.0 / tempo / STEPS_PER_QUARTER  # seconds per sixteenth
    release = 0.04
    total = round((len(chorale) * step + release) * sample_rate)
    out = np.zeros(total, np.float64)
    attack_n, release_n = int(0.01 * sample_rate), int(release * sample_rate)
    for v in range(len(VOICES)):
        pitches, onsets = chorale.pitches[:, v], chorale.onsets[:, v]
        t = 0
        while t < len(chorale):
            midi = int(pitches[t])
            end = t + 1
            while end < len(chorale) and pitches[end] == midi and not onsets[end]:
                end += 1
            if midi != REST:
                start = round(t * step * sample_rate)
                n = round((end - t) * step * sample_rate) + release_n
                n = min(n, total - start)
                time = np.arange(n) / sample_rate
                f = 440.0 * 2.0 ** ((midi - 69) / 12)
                wave = sum(np.sin(2 * np.pi * k * f * time) / k for k in range(1, 5)
                           if k * f < sample_rate / 2)  # fmt: skip
                env = np.ones(n)
                a = min(attack_n, n)
                env[:a] = np.linspace(0.0, 1.0, a, endpoint=False)
                r = min(release_n, n)
                env[n - r :] *= np.linspace(1.0, 0.0, r)
                out[start : start + n] += wave * env
            t = end
    peak = np.abs(out).max()
    return (out * (0.9 / peak) if peak > 0 else out).astype(np.float32)


# music-theory checks ----------------------------------------------------------------

# Krumhansl & Kessler's (1982) key profiles: how well each pitch class above the tonic
# fits a major and a minor key, from their probe-tone ratings
KK_MAJOR = (6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88)
KK_MINOR = (6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17)


def estimate_key(chorale: Chorale) -> tuple[int, str]:
    """(tonic pitch class, "major" or "minor"): the key whose Krumhansl-Kessler profile
    correlates best with the chorale's pitch-class durations (the Krumhansl-Schmuckler
    algorithm). Generated music has no key label; the checks of samples use this, and
    so do the real chorales they are compared with. (0, "major") for silence."""
    sounding = chorale.pitches != REST
    hist = np.bincount(chorale.pitches[sounding].astype(int) % 12, minlength=12).astype(float)
    if hist.sum() == 0:
        return 0, "major"
    best, key = -2.0, (0, "major")
    for mode, profile in (("major", KK_MAJOR), ("minor", KK_MINOR)):
        for tonic in range(12):
            r = np.corrcoef(hist, np.roll(profile, tonic))[0, 1]
            if r > best:
                best, key = r, (tonic, mode)
    return key


def in_key_rate(chorale: Chorale) -> float:
    """The share of notes (onsets) whose pitch class is in the chorale's key."""
    notes = chorale.pitches[chorale.onsets & (chorale.pitches != REST)]
    if len(notes) == 0:
        return float("nan")
    scale = np.array(sorted(chorale.scale()))
    return float(np.isin(notes % 12, scale).mean())


def in_range_rate(chorale: Chorale) -> float:
    """The share of notes (onsets) inside their voice's range (VOICE_RANGES)."""
    inside = total = 0
    for v, name in enumerate(VOICES):
        lo, hi = VOICE_RANGES[name]
        notes = chorale.pitches[chorale.onsets[:, v] & (chorale.pitches[:, v] != REST), v]
        inside += int(((notes >= lo) & (notes <= hi)).sum())
        total += len(notes)
    return inside / total if total else float("nan")


@dataclass(frozen=True)
class Parallels:
    """Parallel perfect fifths and octaves (unisons counted as octaves) between the six
    voice pairs: ``fifths`` and ``octaves`` counted over ``moves``, the chord changes in
    which both voices of a pair move to a new pitch."""

    fifths: int
    octaves: int
    moves: int

    @property
    def rate(self) -> float:
        """Parallel fifths and octaves per pair move."""
        return (self.fifths + self.octaves) / self.moves if self.moves else float("nan")


def parallels(chorale: Chorale) -> Parallels:
    """Counts consecutive perfect fifths or octaves: two voices a fifth (or octave, or
    unison) apart, mod 12, at one chord and again at the next, both having moved in the
    same direction. Chords are the grid steps where some voice starts a note."""
    events = np.nonzero(chorale.onsets.any(axis=1))[0]
    chords = chorale.pitches[events].astype(int)  # (E, 4)
    fifths = octaves = moves = 0
    for a in range(4):
        for b in range(a + 1, 4):
            for prev, cur in itertools.pairwise(chords):
                if REST in (prev[a], prev[b], cur[a], cur[b]):
                    continue
                da, db = cur[a] - prev[a], cur[b] - prev[b]
                if da == 0 or db == 0:
                    continue
                moves += 1
                if np.sign(da) != np.sign(db):
                    continue
                before, after = (prev[a] - prev[b]) % 12, (cur[a] - cur[b]) % 12
                if before == after == 7:
                    fifths += 1
                elif before == after == 0:
                    octaves += 1
    return Parallels(fifths, octaves, moves)


@dataclass(frozen=True)
class VoiceLeading:
    """What would make a parallel fifth or octave at each (sixteenth, voice) of a chorale,
    for a voice that started a new note there, against the voices written before it.

    For voice v at step t and each other voice u (slot u of the last axis for u < v,
    u - 1 for u > v): ``pc`` is the pitch class a new note of v must not take (-1: any
    is allowed) and ``sign`` the direction (+1 up, -1 down) in which it must not move
    from ``prev``, v's pitch at the previous chord. Those notes are exactly the ones that
    `parallels` would count against the pair (u, v) at t; ``forbidden`` turns them into
    a mask over pitches."""

    prev: np.ndarray  # (T, 4) int16: each voice's pitch at the chord before t (0 = none)
    pc: np.ndarray  # (T, 4, 3) int8
    sign: np.ndarray  # (T, 4, 3) int8


def voice_leading(chorale: Chorale, order: tuple[int, ...] = SATB) -> VoiceLeading:
    """The parallel-forming notes of every (step, voice) of ``chorale`` (see VoiceLeading):
    the chord before t is the last step before t where some voice starts a note, and
    another voice u counts when it sounds at both chords and moved between them, a fifth
    (or octave or unison, mod 12) away from v's pitch at the first, if it is written
    before v at a sixteenth (``order``: the voices in the order they are written,
    soprano, alto, tenor, bass by default)."""
    pitches = chorale.pitches.astype(np.int64)
    T = len(pitches)
    events = chorale.onsets.any(axis=1)
    # last chord strictly before t: a running maximum of event indices, shifted by one
    idx = np.where(events, np.arange(T), -1)
    before_t = np.concatenate([[-1], np.maximum.accumulate(idx)[:-1]])
    has_prev = before_t >= 0
    prev = np.where(has_prev[:, None], pitches[np.maximum(before_t, 0)], REST)  # (T, 4)
    pc = np.full((T, 4, 3), -1, np.int8)
    sign = np.zeros((T, 4, 3), np.int8)
    rank = {voice: i for i, voice in enumerate(order)}
    for v in range(4):
        for u in range(4):
            if rank[u] >= rank[v]:
                continue
            moved = pitches[:, u] - prev[:, u]
            interval = (prev[:, u] - prev[:, v]) % 12
            perfect = (0, 7) if u < v else (0, 5)  # a fifth above v, or below it
            ok = (has_prev & (prev[:, u] != REST) & (prev[:, v] != REST)
                  & (pitches[:, u] != REST) & (moved != 0) & np.isin(interval, perfect))  # fmt: skip
            slot = u if u < v else u - 1
            pc[:, v, slot] = np.where(ok, (pitches[:, u] - interval) % 12, -1)
            sign[:, v, slot] = np.where(ok, np.sign(moved), 0)
    return VoiceLeading(prev.astype(np.int16), pc, sign)


def forbidden(prev: np.ndarray, pc: np.ndarray, sign: np.ndarray,
              candidates: np.ndarray) -> np.ndarray:  # fmt: skip
    """Which ``candidates`` (MIDI pitches, shape (P,)) would form parallels: ``prev``
    (...,), ``pc`` and ``sign`` (..., 3) as in VoiceLeading. Returns (..., P) bool."""
    cand = candidates.astype(np.int64)
    step = np.sign(cand - prev[..., None].astype(np.int64))  # (..., P)
    hit = (cand % 12 == pc[..., None]) & (step[..., None, :] == sign[..., None])  # (..., 3, P)
    return hit.any(axis=-2) & (cand != prev[..., None])


# tokens -------------------------------------------------------------------------------

BOS, EOS, HOLD, REST_TOKEN = 0, 1, 2, 3  # a chorale's start and end; a held note; silence
LOWEST, HIGHEST = 28, 92  # the pitches tokens cover (E1 to G#6): every voice transposed
PITCH_BASE = 4  # token of LOWEST starting
N_PITCHES = HIGHEST - LOWEST + 1
VOCAB_SIZE = PITCH_BASE + N_PITCHES  # the "hold" encoding's
HELD_BASE = PITCH_BASE + N_PITCHES  # the "pitch" encoding: token of LOWEST held on
TOKEN_NAMES = ("<bos>", "<eos>", "hold", "rest")
# How a voice that goes on sounding is written: "hold" (one token for every held note,
# the pitch only where it starts) or "pitch" (its pitch again, as a held-note token), so
# that every sixteenth spells its whole chord and the chord before is four tokens back
ENCODINGS = {"hold": VOCAB_SIZE, "pitch": HELD_BASE + N_PITCHES}


def voice_order(letters: str) -> tuple[int, ...]:
    """The order in which a sixteenth's voices are written, from their initials in any
    case ("satb", "sbat": outer voices, then inner), as voice indices; DataError unless
    it names each voice once."""
    index = {name[0]: i for i, name in enumerate(VOICES)}
    order = tuple(index.get(ch, -1) for ch in letters.lower())
    if sorted(order) != list(range(len(VOICES))):
        raise DataError(f"voice order {letters!r}: name each of s, a, t, b once")
    return order


def vocab_size(encoding: str = "hold") -> int:
    """Tokens of an encoding (ENCODINGS); DataError naming the unknown one."""
    if encoding not in ENCODINGS:
        raise DataError(f"music encoding {encoding!r}: choose one of {', '.join(ENCODINGS)}")
    return ENCODINGS[encoding]


def token_name(token: int) -> str:
    """A token as a reader would name it: <bos>, <eos>, hold, rest, a MIDI pitch that
    starts, or one held on ("60~")."""
    if token < PITCH_BASE:
        return TOKEN_NAMES[token]
    if token >= HELD_BASE:
        return f"{token - HELD_BASE + LOWEST}~"
    return str(token - PITCH_BASE + LOWEST)


def encode(chorale: Chorale, transpose: int = 0, encoding: str = "hold",
           order: tuple[int, ...] = SATB) -> np.ndarray:  # fmt: skip
    """The chorale as tokens: <bos>, then per sixteenth its four voices in ``order``
    (soprano, alto, tenor, bass by default), each a pitch (a note starts), a held note
    (``hold``, or in the "pitch" encoding its pitch as a held-note token) or ``rest``;
    then <eos>. ``transpose`` shifts every pitch by that many semitones. DataError when
    a pitch falls outside LOWEST..HIGHEST."""
    vocab_size(encoding)
    pitches = chorale.pitches.astype(np.int64)
    sounding = pitches != REST
    shifted = pitches + transpose
    if sounding.any() and (shifted[sounding].min() < LOWEST or shifted[sounding].max() > HIGHEST):
        raise DataError(
            f"{chorale.name}: transposed by {transpose}, its pitches leave {LOWEST}..{HIGHEST}"
        )
    held = shifted - LOWEST + HELD_BASE if encoding == "pitch" else HOLD
    grid = np.where(chorale.onsets & sounding, shifted - LOWEST + PITCH_BASE, held)
    grid = np.where(sounding, grid, REST_TOKEN)[:, list(order)]
    return np.concatenate([[BOS], grid.reshape(-1), [EOS]]).astype(np.int64)


def decode(tokens: np.ndarray | list[int], name: str = "sample", tonic: int = 0,
           mode: str = "major", beats: float = 4.0,
           order: tuple[int, ...] = SATB) -> Chorale:  # fmt: skip
    """Tokens of either encoding (with or without <bos>), the voices in ``order``, back
    to a Chorale, up to <eos> or the last whole sixteenth. A ``hold`` after silence, or
    a stray <bos>, is read as a rest; a held-note token whose pitch the voice was not
    sounding starts a note."""
    toks = [int(t) for t in tokens]
    if toks and toks[0] == BOS:
        toks = toks[1:]
    if EOS in toks:
        toks = toks[: toks.index(EOS)]
    steps = len(toks) // 4
    pitches = np.zeros((steps, 4), np.int16)
    onsets = np.zeros((steps, 4), bool)
    for i in range(steps):
        for j, v in enumerate(order):
            t = toks[4 * i + j]
            if t >= HELD_BASE:
                pitches[i, v] = t - HELD_BASE + LOWEST
                onsets[i, v] = i == 0 or pitches[i - 1, v] != pitches[i, v]
            elif t >= PITCH_BASE:
                pitches[i, v], onsets[i, v] = t - PITCH_BASE + LOWEST, True
            elif t == HOLD and i > 0:
                pitches[i, v] = pitches[i - 1, v]
    return Chorale(name, pitches, onsets, tonic, mode, beats)


def held_tokens(previous: np.ndarray) -> np.ndarray:
    """The "pitch" encoding's grammar: given each row's token for the same voice one
    sixteenth earlier (R,), the one held-note token each row may write next (R,), or -1
    where that voice was silent (nothing to hold on)."""
    prev = np.asarray(previous, dtype=np.int64)
    pitch = np.where(prev >= HELD_BASE, prev - HELD_BASE, prev - PITCH_BASE)
    return np.where(prev >= PITCH_BASE, pitch + HELD_BASE, -1)


def unlikely_tokens(stream: np.ndarray, vocab: int = VOCAB_SIZE,
                    order: tuple[int, ...] = SATB) -> np.ndarray:  # fmt: skip
    """For a stream of encoded chorales (each <bos> ... <eos>, as `encode` writes them
    with the voices in ``order``, padding <eos> allowed), a (N, vocab) bool mask: the
    tokens of a new note that, at position i, would make parallel fifths or octaves with
    a voice already written (`voice_leading`). Positions that are not a voice's token
    allow everything."""
    stream = np.asarray(stream, dtype=np.int64)
    mask = np.zeros((len(stream), vocab), bool)
    candidates = np.arange(LOWEST, HIGHEST + 1)
    starts = np.nonzero(stream == BOS)[0]
    for s, nxt in zip(starts, [*starts[1:].tolist(), len(stream)], strict=True):
        body = stream[s + 1 : nxt]
        ends = np.nonzero(body == EOS)[0]
        steps = (ends[0] if len(ends) else len(body)) // 4
        if steps == 0:
            continue
        lead = voice_leading(decode(body[: 4 * steps], order=order), order)
        hits = forbidden(lead.prev, lead.pc, lead.sign, candidates)[:, list(order)]  # (T, 4, P)
        mask[s + 1 : s + 1 + 4 * steps, PITCH_BASE:HELD_BASE] = hits.reshape(4 * steps, -1)
    return mask


def transpositions(chorale: Chorale, max_shift: int = 6) -> list[int]:
    """The shifts in -max_shift..max_shift that keep every pitch within LOWEST..HIGHEST."""
    sounding = chorale.pitches[chorale.pitches != REST].astype(int)
    if len(sounding) == 0:
        return [0]
    lo, hi = LOWEST - sounding.min(), HIGHEST - sounding.max()
    return [k for k in range(-max_shift, max_shift + 1) if lo <= k <= hi]


def split_chorales(
    chorales: list[Chorale], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Chorale], list[Chorale]]:
    """(train, held-out) by whole chorale: a seeded ``val_fraction`` of them held out."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in (0, 1)")
    order = np.random.default_rng(seed).permutation(len(chorales))
    n_val = max(1, round(val_fraction * len(chorales)))
    held = set(order[:n_val].tolist())
    return ([c for i, c in enumerate(chorales) if i not in held],
            [c for i, c in enumerate(chorales) if i in held])  # fmt: skip
