"""Chorales on a sixteenth-note grid: scores and MIDI files in and out through music21,
the embedded Bach corpus, and the music-theory checks counted by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aigc.data.music import (
    EOS,
    HIGHEST,
    LOWEST,
    PITCH_BASE,
    REST,
    VOCAB_SIZE,
    Chorale,
    bach_chorales,
    chorale_from_score,
    encode,
    forbidden,
    in_key_rate,
    in_range_rate,
    parallels,
    read_midi,
    split_chorales,
    unlikely_tokens,
    voice_leading,
    write_midi,
)
from aigc.errors import DataError


def _chorale(columns: list[list[int]], tonic: int = 0, mode: str = "major") -> Chorale:
    """One chord per quarter note: columns[i] = (S, A, T, B) MIDI pitches, every one a
    new note; 4 sixteenths each."""
    pitches = np.repeat(np.asarray(columns, np.int16), 4, axis=0)
    onsets = np.zeros_like(pitches, dtype=bool)
    onsets[::4] = True
    onsets &= pitches != REST
    return Chorale("test", pitches, onsets, tonic, mode, 4.0)


def test_a_score_becomes_the_grid_with_ties_rests_and_chords():
    from music21 import chord, note, stream, tie

    score = stream.Score()
    lines = [
        [("n", 72, 1.0), ("n", 74, 0.5), ("tie", 74, 0.5), ("rest", 0, 1.0)],
        [("n", 67, 2.0), ("n", 67, 1.0)],  # a repeated pitch: two onsets
        [("chord", (60, 64), 3.0)],  # a chord in one voice: its top note
        [("n", 48, 0.75), ("n", 43, 2.25)],
    ]
    for line in lines:
        part = stream.Part()
        t = 0.0
        for kind, pitch, length in line:
            if kind == "rest":
                el = note.Rest()
            elif kind == "chord":
                el = chord.Chord(list(pitch))
            else:
                el = note.Note(pitch)
            if kind == "tie":
                el.tie = tie.Tie("stop")
            el.quarterLength = length
            part.insert(t, el)
            t += length
        score.insert(0, part)
    c = chorale_from_score(score, "made")
    assert c.pitches.shape == (12, 4)
    assert c.pitches[:, 0].tolist() == [72] * 4 + [74] * 4 + [0] * 4
    assert c.onsets[:, 0].tolist() == [True] + [False] * 3 + [True] + [False] * 7
    assert c.pitches[:, 1].tolist() == [67] * 12
    assert np.nonzero(c.onsets[:, 1])[0].tolist() == [0, 8]
    assert c.pitches[:, 2].tolist() == [64] * 12
    assert np.nonzero(c.onsets[:, 3])[0].tolist() == [0, 3]
    score.remove(score.parts[3])
    with pytest.raises(DataError, match="a chorale has four parts, this has 3"):
        chorale_from_score(score, "three")


def test_midi_round_trips_the_grid(tmp_path):
    c = _chorale([[72, 67, 64, 48], [72, 67, 62, 43], [74, 65, 62, 47], [0, 64, 60, 48]])
    path = write_midi(c, tmp_path / "c.mid")
    assert path.read_bytes()[:4] == b"MThd" and not list(tmp_path.glob(".*.tmp"))
    back = read_midi(path)
    np.testing.assert_array_equal(back.pitches, c.pitches)
    np.testing.assert_array_equal(back.onsets, c.onsets)  # repeated 72 and 67: new onsets
    (tmp_path / "bad.mid").write_bytes(b"MThd but nothing after")
    with pytest.raises(DataError, match=r"bad\.mid: not a MIDI file"):
        read_midi(tmp_path / "bad.mid")
    with pytest.raises(DataError, match=r"gone\.mid: no such MIDI file"):
        read_midi(tmp_path / "gone.mid")


def test_parallels_counted_by_hand():
    c = _chorale([
        [72, 67, 64, 48],
        [74, 67, 65, 50],  # S, T, B move up; S-B 24 -> 24: parallel octaves
        [76, 69, 64, 45],  # S-A 7 -> 7, both up: parallel fifths; T and B go down
        [77, 69, 65, 50],  # S-T 12 -> 12, both up: octaves; S-B 31 -> 27, T-B 19 -> 15
    ])  # fmt: skip
    p = parallels(c)
    # pairs where both voices move: 3 (S, T, B) + 6 (all four) + 3 (S, T, B)
    assert (p.fifths, p.octaves, p.moves) == (1, 2, 12)
    assert p.rate == pytest.approx(3 / 12)
    # T-B 7 -> 7 and S-B 24 -> 24, every voice rising
    both = parallels(_chorale([[72, 64, 55, 48], [74, 65, 57, 50]]))
    assert (both.fifths, both.octaves, both.moves) == (1, 1, 6)
    # the same intervals in contrary or oblique motion are not parallels
    oblique = parallels(_chorale([[72, 64, 55, 48], [72, 65, 57, 50]]))
    assert (oblique.fifths, oblique.octaves, oblique.moves) == (1, 0, 3)


def test_key_and_range_checks():
    c = _chorale([[72, 67, 64, 48], [73, 67, 64, 48], [74, 66, 62, 50]])  # C major: C#, F#
    assert in_key_rate(c) == pytest.approx(10 / 12)
    minor = _chorale([[69, 64, 60, 45], [68, 64, 59, 40]], tonic=9, mode="minor")  # G# is in
    assert in_key_rate(minor) == 1.0
    wide = _chorale([[90, 67, 64, 48], [72, 40, 64, 30]])  # soprano, alto, bass out of range
    assert in_range_rate(wide) == pytest.approx(5 / 8)


def test_the_embedded_bach_chorales():
    chorales = bach_chorales(limit=3)
    assert len(chorales) == 3
    first = chorales[0]
    assert first.name.endswith("bwv269") and (first.tonic, first.mode, first.beats) == (
        7,
        "major",
        3.0,
    )
    assert first.pitches.shape[1] == 4 and first.onsets[0].all()
    for c in chorales:
        assert in_range_rate(c) > 0.95 and in_key_rate(c) > 0.9
        assert parallels(c).rate < 0.02
    train, held = split_chorales(chorales + chorales[:1] * 7, 0.2, seed=1)
    assert len(held) == 2 and len(train) == 8
    assert [c.name for c in split_chorales(chorales, 0.5, seed=1)[1]] == [
        c.name for c in split_chorales(chorales, 0.5, seed=1)[1]
    ]


# tokens and the n-gram floor -------------------------------------------------------------


def test_tokens_round_trip_and_transpose():
    from aigc.data.music import BOS, EOS, HOLD, REST_TOKEN, decode, encode, transpositions

    c = _chorale([[72, 67, 64, 48], [72, 67, 62, 0], [74, 65, 62, 47]])
    c.onsets[4, 1] = False  # the alto's G tied over into the second chord
    tokens = encode(c)
    assert tokens[0] == BOS and tokens[-1] == EOS and len(tokens) == 2 + 4 * len(c)
    assert tokens[1 + 4 * 1 + 0] == HOLD and tokens[1 + 4 * 4 + 1] == HOLD
    assert tokens[1 + 4 * 4 + 3] == REST_TOKEN
    back = decode(tokens)
    np.testing.assert_array_equal(back.pitches, c.pitches)
    np.testing.assert_array_equal(back.onsets, c.onsets)
    up = decode(encode(c, transpose=5))
    np.testing.assert_array_equal(up.pitches, np.where(c.pitches > 0, c.pitches + 5, 0))
    shifts = transpositions(c)
    assert shifts == list(range(-6, 7))
    with pytest.raises(DataError, match="leave"):
        encode(_chorale([[90, 67, 64, 48]]), transpose=5)
    assert 5 not in transpositions(_chorale([[90, 67, 64, 48]]))
    # a sample cut short: whole sixteenths kept, a hold after silence is silence
    cut = decode([BOS, HOLD, 50, 60, 68, 40])
    assert cut.pitches.tolist() == [[0, 50 - 4 + 28, 60 - 4 + 28, 68 - 4 + 28]]


def test_the_pitch_encoding_spells_every_chord_and_round_trips():
    from aigc.data.music import HELD_BASE, decode, encode, held_tokens, token_name, vocab_size

    c = _chorale([[72, 67, 64, 48], [72, 67, 62, 0], [74, 65, 62, 47]])
    c.onsets[4, 1] = False  # the alto's G tied over; the soprano's C struck again
    tokens = encode(c, encoding="pitch")
    assert len(tokens) == len(encode(c)) and tokens.max() < vocab_size("pitch")
    # a held note is its pitch as a held-note token: step 1's alto, step 2's soprano
    assert token_name(int(tokens[1 + 4 * 4 + 1])) == "67~"
    assert token_name(int(tokens[1 + 4 * 1 + 0])) == "72~"
    assert token_name(int(tokens[1 + 4 * 4 + 0])) == "72"  # struck again: a new note
    back = decode(tokens)
    np.testing.assert_array_equal(back.pitches, c.pitches)
    np.testing.assert_array_equal(back.onsets, c.onsets)
    up = decode(encode(c, transpose=-3, encoding="pitch"))
    np.testing.assert_array_equal(up.pitches, np.where(c.pitches > 0, c.pitches - 3, 0))
    # the grammar: the only held token a voice may write next holds what it sounds
    prev = tokens[1 + 4 * 4 : 1 + 4 * 5]  # step 4: S 72, A 67~, T 62, B rest
    held = [HELD_BASE + p - LOWEST for p in (72, 67, 62)]
    assert held_tokens(prev).tolist() == [*held, -1]
    # a held token the voice was not sounding is read as a new note
    odd = decode(
        [tokens[1], tokens[2], tokens[3], tokens[4], HELD_BASE + 70 - LOWEST, *tokens[6:9]]
    )
    assert odd.pitches[1, 0] == 70 and odd.onsets[1, 0]
    with pytest.raises(DataError, match="choose one of"):
        encode(c, encoding="piano-roll")


def test_unlikely_notes_are_the_same_in_both_encodings():
    from aigc.data.music import PITCH_BASE as BASE
    from aigc.data.music import encode, unlikely_tokens, vocab_size

    c = _random_chorale(np.random.default_rng(3), 40)
    hold = unlikely_tokens(encode(c))
    pitch = unlikely_tokens(encode(c, encoding="pitch"), vocab_size("pitch"))
    assert hold.any() and np.array_equal(pitch[:, : hold.shape[1]], hold)
    assert not pitch[:, hold.shape[1] :].any() and not pitch[:, :BASE].any()


def test_kneser_ney_by_hand_and_its_distributions_sum_to_one():
    from aigc.metrics.ngram import KneserNey

    lm = KneserNey(order=2, vocab_size=4, discount=0.5).fit([[0, 1, 2, 1, 2], [0, 1, 3]])
    # continuation counts: 1 follows {0, 2}, 2 and 3 follow {1}; 4 bigram types
    uni = {0: 0.09375, 1: 0.46875, 2: 0.21875, 3: 0.21875}  # max(N - D, 0) / 4 + 0.375 / 4
    for w, p in uni.items():
        assert lm.prob([3], w) == pytest.approx(p)  # an unseen context backs off wholly
    # after 1 (seen 3 times, 2 kinds): max(c - D, 0) / 3 + (D * 2 / 3) * P1
    assert lm.prob([1], 2) == pytest.approx(1.5 / 3 + uni[2] / 3)
    assert lm.prob([1], 3) == pytest.approx(0.5 / 3 + uni[3] / 3)
    assert lm.prob([1], 0) == pytest.approx(uni[0] / 3)
    tri = KneserNey(order=3, vocab_size=6).fit([[0, 1, 2, 3, 1, 2, 4], [0, 2, 3, 1, 5]])
    for context in ([0, 0], [1, 2], [2, 3], [5, 5], [4]):
        assert sum(tri.distribution(context)) == pytest.approx(1.0)
    total, n = tri.nll([[0, 1, 2, 3]])
    by_hand = -sum(math.log(tri.prob(ctx, w)) for ctx, w in [([0, 0], 1), ([0, 1], 2), ([1, 2], 3)])
    assert n == 3 and total == pytest.approx(by_hand)


def _random_chorale(rng: np.random.Generator, steps: int = 24) -> Chorale:
    """Four voices moving in random steps of -7..7 semitones on a random rhythm, with
    rests now and then: parallels of every kind, oblique and contrary motion."""
    pitches = np.zeros((steps, 4), np.int16)
    onsets = np.zeros((steps, 4), bool)
    pitch = np.array([72, 64, 57, 48])
    for t in range(steps):
        for v in range(4):
            if t == 0 or rng.random() < 0.5:
                pitch[v] = np.clip(pitch[v] + (rng.integers(-7, 8) if t else 0), 40, 88)
                rest = rng.random() < 0.05
                pitches[t, v] = REST if rest else pitch[v]
                onsets[t, v] = not rest
            else:
                pitches[t, v] = pitches[t - 1, v]
    return Chorale("random", pitches, onsets, 0, "major", 4.0)


def _parallels_if_written(c: Chorale, t: int, v: int, pitch: int,
                          order: tuple[int, ...] = (0, 1, 2, 3)) -> int:  # fmt: skip
    """Parallels in c's first t + 1 steps with voice v writing ``pitch`` at step t (a
    rest when REST) and the voices written after it in ``order`` holding, as not
    written yet."""
    p, o = c.pitches[: t + 1].copy(), c.onsets[: t + 1].copy()
    p[t, v], o[t, v] = pitch, pitch != REST
    for w in order[order.index(v) + 1 :]:
        p[t, w], o[t, w] = p[t - 1, w], False
    q = parallels(Chorale("x", p, o, 0, "major", 4.0))
    return q.fifths + q.octaves


@pytest.mark.parametrize("letters", ["satb", "sbat"])
def test_the_voice_leading_mask_names_exactly_the_notes_the_metric_would_count(letters):
    """For each (step, voice), a new note there is in the mask if and only if writing it
    raises `parallels`' count over writing a rest, beside the voices written before it
    (the higher ones in SATB order; soprano and bass before the inner voices in SBAT)."""
    from aigc.data.music import voice_order

    order = voice_order(letters)
    rng = np.random.default_rng(0)
    candidates = np.arange(40, 90)
    checked = flagged = 0
    for _ in range(6 if letters == "satb" else 3):
        c = _random_chorale(rng)
        lead = voice_leading(c, order=order)
        mask = forbidden(lead.prev, lead.pc, lead.sign, candidates)  # (T, 4, P)
        for t in range(1, len(c)):
            for v in range(4):
                base = _parallels_if_written(c, t, v, REST, order)
                for j, pitch in enumerate(candidates):
                    made = _parallels_if_written(c, t, v, int(pitch), order) > base
                    assert mask[t, v, j] == made, (t, v, int(pitch))
                    checked += 1
                    flagged += made
    assert flagged > 25 and checked > 10_000


def test_a_voice_order_writes_each_sixteenth_in_that_order_and_reads_back():
    from aigc.data.music import decode, unlikely_tokens, vocab_size, voice_order

    assert voice_order("SBAT") == (0, 3, 1, 2) and voice_order("satb") == (0, 1, 2, 3)
    for bad in ("sbaa", "satbs", "sxtb", ""):
        with pytest.raises(DataError, match="name each of s, a, t, b once"):
            voice_order(bad)
    c = _random_chorale(np.random.default_rng(7), 20)
    order = voice_order("sbat")
    for encoding in ("hold", "pitch"):
        plain, outer = encode(c, 2, encoding), encode(c, 2, encoding, order)
        grid = plain[1:-1].reshape(-1, 4)
        assert np.array_equal(outer[1:-1].reshape(-1, 4), grid[:, [0, 3, 1, 2]])
        back = decode(outer, order=order)
        assert np.array_equal(back.pitches, decode(plain).pitches)
        assert np.array_equal(back.onsets, decode(plain).onsets)
    # the stream mask follows the order: the bass, second, is flagged only against the
    # soprano, and its flags sit in the second slot of each sixteenth
    mask = unlikely_tokens(encode(c, 0, "pitch", order), vocab_size("pitch"), order=order)
    lead = voice_leading(c, order=order)
    want = forbidden(lead.prev, lead.pc, lead.sign, np.arange(LOWEST, HIGHEST + 1))
    assert np.array_equal(mask[2 :: 4][: len(c), PITCH_BASE : PITCH_BASE + want.shape[-1]],
                          want[:, 3])  # fmt: skip
    assert (lead.pc[:, 3, 1:] == -1).all()  # alto and tenor come after the bass


def test_unlikely_tokens_follow_the_stream_of_encoded_chorales():
    rng = np.random.default_rng(1)
    chorales = [_random_chorale(rng, 48), _random_chorale(rng, 40)]
    stream = np.concatenate([np.append(encode(c), EOS) for c in chorales])
    mask = unlikely_tokens(stream)
    assert mask.shape == (len(stream), VOCAB_SIZE)
    assert not mask[:, :PITCH_BASE].any()  # only pitches are ever unlikely
    at = 1 + len(encode(chorales[0]))  # the second chorale's <bos>
    for c, start in zip(chorales, (0, at), strict=True):
        lead = voice_leading(c)
        pitches = np.arange(LOWEST, HIGHEST + 1)
        want = forbidden(lead.prev, lead.pc, lead.sign, pitches).reshape(4 * len(c), -1)
        got = mask[start + 1 : start + 1 + 4 * len(c), PITCH_BASE:]
        assert np.array_equal(got, want)
    # the notes written are flagged where they make parallels: at most once per
    # parallel (a note can make two, with two higher voices), and some are
    total = sum(parallels(c).fifths + parallels(c).octaves for c in chorales)
    assert 0 < mask[np.arange(len(stream)), stream].sum() <= total
