"""The chorale task and pipeline: rendering and key finding against independent
computations, the sampler against the plain forward pass, a tiny run trained,
evaluated against an n-gram fitted here, and composed from the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from aigc.data.music import (
    BOS,
    EOS,
    KK_MAJOR,
    REST,
    VOCAB_SIZE,
    Chorale,
    estimate_key,
    midi_bytes,
    read_midi,
    render,
)

from .conftest import ROOT, run_cli

RECIPE = ROOT / "configs" / "music-chorales.yaml"
TINY = ["data.limit=12", "model.block_size=64", "model.n_layer=1", "model.n_head=2",
        "model.n_embd=32", "data.eval_samples=2", "data.eval_sample_bars=1",
        "train.eval_every=0", "train.sample_every=3", "train.checkpoint_every=3",
        "train.batch_size=4"]  # fmt: skip


def _chorale(columns: list[list[int]], steps_each: int = 4) -> Chorale:
    pitches = np.repeat(np.asarray(columns, np.int16), steps_each, axis=0)
    onsets = np.zeros_like(pitches, dtype=bool)
    onsets[::steps_each] = True
    onsets &= pitches != REST
    return Chorale("test", pitches, onsets, 0, "major", 4.0)


def test_rendering_plays_each_note_at_its_pitch_and_time():
    """One A4 (MIDI 69) in the soprano for a quarter note at 60 bpm (1 s), the rest
    silent: the spectrum of the sounding second peaks at 440 Hz with harmonics at 880
    and 1320; after the release it is silent; the peak is 0.9."""
    sr = 8000
    c = _chorale([[69, REST, REST, REST], [REST, REST, REST, REST]])
    wave = render(c, sample_rate=sr, tempo=60.0)
    assert wave.dtype == np.float32 and len(wave) == round((2.0 + 0.04) * sr)
    assert abs(float(np.abs(wave).max()) - 0.9) < 1e-6
    spectrum = np.abs(np.fft.rfft(wave[:sr] * np.hanning(sr)))
    freqs = np.fft.rfftfreq(sr, 1 / sr)
    assert abs(freqs[spectrum.argmax()] - 440.0) <= 1.0
    for k in (2, 3):
        near = spectrum[np.abs(freqs - 440 * k) <= 2].max()
        assert near > 0.1 * spectrum.max()
    assert np.all(wave[int(1.05 * sr) :] == 0)
    assert np.all(render(_chorale([[REST] * 4]), sr) == 0)


def test_key_finding_picks_the_profile_the_notes_follow():
    """Durations shaped like the major profile moved up to G (7) are read as G major;
    the natural minor scale on A with its tonic triad stressed as A minor."""
    weights = np.roll(np.asarray(KK_MAJOR), 7)
    notes = [[60 + pc, REST, REST, REST] for pc in range(12) for _ in range(round(4 * weights[pc]))]
    assert estimate_key(_chorale(notes, 1)) == (7, "major")
    a_minor = [57, 59, 60, 62, 64, 65, 67, 57, 60, 64, 57, 64, 57]
    assert estimate_key(_chorale([[p, REST, REST, REST] for p in a_minor])) == (9, "minor")


def test_midi_bytes_read_back_as_the_same_chorale(tmp_path):
    c = _chorale([[72, 67, 64, 48], [74, 67, 65, 47], [72, 64, 60, 48]])
    path = tmp_path / "c.mid"
    path.write_bytes(midi_bytes(c))
    back = read_midi(path)
    assert np.array_equal(back.pitches[: len(c)], c.pitches)
    assert np.array_equal(back.onsets[: len(c)], c.onsets)


def _tiny_gpt(block: int = 8):
    from aigc.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB_SIZE, block_size=block, n_layer=1, n_head=2,
                         n_embd=16)).eval()  # fmt: skip


def test_the_sampler_follows_the_plain_forward_pass_past_the_context():
    """Greedy decoding of 20 tokens with an 8-token context (the KV cache, then a
    sliding window starting at a soprano position: 4 tokens after <bos>, then 8, ...)
    equals the argmax of the plain forward pass over the same contexts, <bos> and
    <eos> excluded."""
    from aigc.tasks.music import sample_tokens

    model = _tiny_gpt(8)
    got = sample_tokens(model, 2, 20, seed=0, temperature=0)
    rows = [[BOS], [BOS]]
    with torch.no_grad():
        for _ in range(20):
            for r in rows:
                ctx = r if len(r) <= 8 else r[4 * ((len(r) - 8) // 4 + 1) :]
                assert len(ctx) <= 7 or len(r) <= 8
                logits = model(torch.tensor([ctx]))[0][0, -1]
                logits[[BOS, EOS]] = -float("inf")
                r.append(int(logits.argmax()))
    assert got == [r[1:] for r in rows]


def test_seeded_rows_do_not_depend_on_how_many_are_drawn():
    from aigc.tasks.music import sample_tokens

    model = _tiny_gpt(16)
    one = sample_tokens(model, 1, 24, seed=5, temperature=1.0)
    three = sample_tokens(model, 3, 24, seed=5, temperature=1.0, top_k=10)
    again = sample_tokens(model, 3, 24, seed=5, temperature=1.0, top_k=10)
    assert sample_tokens(model, 3, 24, seed=5, temperature=1.0)[0] == one[0]
    assert three == again and three[0] != three[1]
    assert all(BOS not in r and EOS not in r for r in three)


def test_in_the_pitch_encoding_a_held_note_keeps_its_pitch():
    """Sampling a random model of the "pitch" encoding: every held-note token drawn holds
    the pitch its voice sounded a sixteenth before; new notes and rests stay free."""
    from aigc.data.music import HELD_BASE, PITCH_BASE, vocab_size
    from aigc.models.gpt import GPT, GPTConfig
    from aigc.tasks.music import sample_tokens

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size("pitch"), block_size=16, n_layer=1, n_head=2,
                          n_embd=16)).eval()  # fmt: skip
    rows = sample_tokens(model, 8, 64, seed=1, temperature=1.5, encoding="pitch")
    held = 0
    for r in rows:
        for k, tok in enumerate(r):
            if tok >= HELD_BASE:
                held += 1
                assert k >= 4 and r[k - 4] >= PITCH_BASE
                before = r[k - 4] - (HELD_BASE if r[k - 4] >= HELD_BASE else PITCH_BASE)
                assert tok - HELD_BASE == before
    assert held > 5  # an untrained model draws them often enough to be checked
    assert any(PITCH_BASE <= t < HELD_BASE for r in rows for t in r)


def test_a_pitch_encoded_run_trains_against_the_hold_encodings_floor(tmp_path):
    """NLL per note is one quantity in both encodings; the floor stays the 3-gram of the
    hold encoding, the stronger of the two."""
    import aigc
    from aigc.data.music import bach_chorales, encode, split_chorales, vocab_size
    from aigc.metrics.ngram import KneserNey

    run = tmp_path / "run"
    aigc.train(RECIPE, [*TINY, "train.max_steps=2", "data.encoding=pitch",
                        "data.unlikely_parallels=2.0"], run_dir=run, progress=False)  # fmt: skip
    meta = json.loads((run / "data" / "music.json").read_text())
    train, held = split_chorales(bach_chorales(12), 0.1, 0)
    notes = sum(int((c.onsets & (c.pitches != REST)).sum()) for c in held)
    nll, _ = KneserNey(3, VOCAB_SIZE).fit([encode(c) for c in train]).nll([encode(c) for c in held])
    weaker, _ = (
        KneserNey(3, vocab_size("pitch"))
        .fit([encode(c, 0, "pitch") for c in train])
        .nll([encode(c, 0, "pitch") for c in held])
    )
    assert meta["floor"]["nll_per_note"] == pytest.approx(nll / notes) and weaker > nll
    pipe = aigc.load(run)
    assert pipe.model.cfg.vocab_size == vocab_size("pitch")
    out = pipe.generate(n=2, bars=1, seed=0)
    assert all(len(c) == 16 for c in out.chorales)
    result = pipe.evaluate()
    assert result["nll_per_note"] > 0 and "sample_parallels" in result
    # the moves the parallels rate divides by, per bar, of the samples and of Bach
    from aigc.data.music import parallels

    bars = sum(len(c) for c in held) / 16
    assert result["real_moves_per_bar"] == pytest.approx(
        sum(parallels(c).moves for c in held) / bars)  # fmt: skip
    seed = pipe.config.train.seed
    judged = pipe.task.generate(pipe.model, 2, 1, seed=seed)  # as evaluation draws them
    assert result["sample_moves_per_bar"] == pytest.approx(
        sum(parallels(c).moves for c in judged) / 2)  # fmt: skip


def test_a_run_in_outer_voices_first_order_writes_reads_and_samples_by_it(tmp_path):
    """data.voice_order=sbat: the prepared tokens are each chorale's sixteenths in soprano,
    bass, alto, tenor order, and the pipeline reads samples back by the same order."""
    import aigc
    from aigc.data.music import bach_chorales, decode, encode, split_chorales
    from aigc.tasks.music import sample_tokens

    run = tmp_path / "run"
    aigc.train(RECIPE, [*TINY, "train.max_steps=1", "data.voice_order=sbat", "data.transpose=false",
                        "train.sample_every=0"], run_dir=run, progress=False)  # fmt: skip
    train, _ = split_chorales(bach_chorales(12), 0.1, 0)
    first = encode(train[0], 0, "pitch", (0, 3, 1, 2))
    stored = np.load(run / "data" / "train_tokens.npy")
    assert np.array_equal(stored[: len(first)], first)
    assert not np.array_equal(first, encode(train[0], 0, "pitch"))
    pipe = aigc.load(run)
    out = pipe.generate(n=2, bars=1, seed=4)
    rows = sample_tokens(pipe.model, 2, 64, 4, encoding="pitch")
    for row, chorale in zip(rows, out.chorales, strict=True):
        assert np.array_equal(chorale.pitches, decode(row, order=(0, 3, 1, 2)).pitches)
    r = run_cli("train", str(RECIPE), *TINY, "data.voice_order=satbb", "--run-dir",
                str(tmp_path / "bad"))  # fmt: skip
    assert r.returncode == 2 and "data.voice_order" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) <= 2 and not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def music_run(tmp_path_factory):
    import aigc

    run = tmp_path_factory.mktemp("music") / "run"
    aigc.train(RECIPE, [*TINY, "train.max_steps=3"], run_dir=run, progress=False)
    return run


def test_a_tiny_run_is_evaluated_against_the_ngram_floor_of_its_own_split(music_run):
    """The floor in music.json is the Kneser-Ney 3-gram fitted here on the same training
    chorales and scored on the held-out ones; nll_per_note is the held-out NLL over
    their notes, and below_floor compares the two."""
    import aigc
    from aigc.data.music import bach_chorales, encode, split_chorales
    from aigc.metrics.ngram import KneserNey

    meta = json.loads((music_run / "data" / "music.json").read_text())
    train, held = split_chorales(bach_chorales(12), 0.1, 0)
    assert meta["train_chorales"] == len(train) and meta["val_chorales"] == len(held)
    notes = sum(int((c.onsets & (c.pitches != REST)).sum()) for c in held)
    nll, _ = KneserNey(3, VOCAB_SIZE).fit([encode(c) for c in train]).nll([encode(c) for c in held])
    assert meta["val_notes"] == notes
    assert meta["floor"]["nll_per_note"] == pytest.approx(nll / notes)
    val = np.load(music_run / "data" / "val_tokens.npy")
    # each chorale padded with <eos> to a multiple of 4 tokens: <bos> stays at a soprano slot
    assert len(val) == sum(-(-len(encode(c)) // 4) * 4 for c in held)
    assert not (np.nonzero(val == BOS)[0] % 4).any()
    pipe = aigc.load(music_run)
    result = pipe.evaluate(save=False)
    with torch.no_grad():  # the held-out NLL from one plain pass per 64-token window
        want = 0.0
        for s in range(0, len(val) - 1, 64):
            w = torch.from_numpy(val[s : s + 65].astype(np.int64))[None]
            logits = pipe.model(w[:, :-1])[0]
            want += float(torch.nn.functional.cross_entropy(logits[0], w[0, 1:], reduction="sum"))
    assert result["nll_per_note"] == pytest.approx(want / notes, rel=1e-4)
    assert result["below_floor"] == pytest.approx(1 - result["nll_per_note"] / (nll / notes))
    assert 0 <= result["sample_in_key"] <= 1 and 0 <= result["real_in_range"] <= 1
    assert "held-out NLL" in pipe.format_eval(result)


def test_training_windows_keep_each_voice_at_one_position_mod_4(music_run):
    from aigc.runs import RunDir
    from aigc.tasks import get_task
    from aigc.training import run_config

    cfg = run_config(RunDir(music_run))
    task = get_task("music").open(cfg, RunDir(music_run))
    ids = torch.cat([task.train_batch(s, 0, 0, 1)["input_ids"] for s in range(20)])
    _, cols = np.nonzero((ids == BOS).numpy())
    assert len(cols) > 0 and not (cols % 4).any()


def test_the_unlikelihood_term_by_hand():
    """-sum log(1 - p) over the flagged candidates, the target never among them, averaged
    over the positions with a target."""
    from aigc.models.gpt import unlikelihood_loss

    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 0.0, -1.0], [0.5, 0.5, 0.5]]])
    unlikely = torch.tensor([[[True, False, True], [True, True, False], [True, True, True]]])
    targets = torch.tensor([[2, 1, -1]])  # flags on a target are void; -1 is not scored
    p = torch.softmax(logits, -1)[0]
    want = (-math.log(1 - p[0, 0]) - math.log(1 - p[1, 0])) / 2
    got = unlikelihood_loss(logits, unlikely, targets)
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_unlikely_parallels_flag_the_targets_of_each_window_and_train(tmp_path):
    """With data.unlikely_parallels the batch carries the voice-leading mask of each
    target position of its windows, and training logs the term beside the loss."""
    import aigc
    from aigc.data.music import unlikely_tokens
    from aigc.runs import RunDir
    from aigc.tasks import get_task
    from aigc.training import run_config

    run = tmp_path / "run"
    aigc.train(RECIPE, [*TINY, "train.max_steps=2", "data.unlikely_parallels=1.0",
                        "train.sample_every=0"], run_dir=run, progress=False)  # fmt: skip
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("unlikelihood" in row for row in logged)
    task = get_task("music").open(run_config(RunDir(run)), RunDir(run))
    batch = task.train_batch(5, 0, 0, 1)
    mask = unlikely_tokens(task.train_tokens, task.config.model.vocab_size,
                           order=task.config.data.order)  # fmt: skip
    stream = torch.from_numpy(task.train_tokens.astype(np.int64))
    flagged = 0
    for row_ids, row_mask in zip(batch["input_ids"], batch["unlikely"], strict=True):
        windows = stream.unfold(0, len(row_ids), 1)
        start = int(np.nonzero((windows == row_ids).all(1).numpy())[0][0])
        assert np.array_equal(row_mask.numpy(), mask[start + 1 : start + 1 + len(row_ids)])
        flagged += int(row_mask.sum())
    assert flagged > 0 and float(batch["unlikely_weight"]) == 1.0


def test_training_writes_midi_and_audio_samples_and_the_report_plays_them(music_run):
    from aigc.data.audio import read_audio

    files = sorted(p.name for p in (music_run / "samples").iterdir())
    assert "step-00000003-chorale-0.mid" in files and "step-00000003-chorale-0-audio.wav" in files
    read_midi(music_run / "samples" / "step-00000003-chorale-0.mid")
    wave, sr = read_audio(music_run / "samples" / "step-00000003-chorale-0-audio.wav")
    assert sr == 22050 and np.abs(wave).max() > 0.5


def test_composing_from_the_command_line(music_run, tmp_path):
    from aigc.data.audio import read_audio

    out = tmp_path / "pieces"
    r = run_cli("sample", str(music_run), "--n", "2", "--bars", "2", "--seed", "3",
                "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "wrote 2 pieces of 2 bars" in r.stdout
    for i in range(2):
        c = read_midi(out / f"{i:05d}.mid")
        assert len(c) <= 32
        wave, sr = read_audio(out / f"{i:05d}.wav")
        assert sr == 22050 and len(wave) > sr
    r = run_cli("sample", str(music_run), "--n", "1", "--bars", "2", "--seed", "3",
                "--out", str(tmp_path / "again"))  # fmt: skip
    assert (tmp_path / "again" / "00000.mid").read_bytes() == (out / "00000.mid").read_bytes()
    for args, message in ((["--bars", "0"], "bars=0"), (["--out", str(tmp_path / "x.wav")],
                          "give a folder"), (["--prompt", "x"], "takes no --prompt"),
                          (["--temperature", "-1"], "temperature")):  # fmt: skip
        r = run_cli("sample", str(music_run), *args)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert len(r.stderr.splitlines()) <= 2


def test_a_folder_of_midi_files_trains_and_a_bad_file_is_named(tmp_path):
    import aigc
    from aigc.errors import DataError

    folder = tmp_path / "midi"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        cols = [[int(rng.integers(60, 72)), int(rng.integers(55, 65)), int(rng.integers(48, 60)),
                 int(rng.integers(36, 50))] for _ in range(24)]  # fmt: skip
        (folder / f"{i}.mid").write_bytes(midi_bytes(_chorale(cols)))
    run = aigc.train(RECIPE, [*TINY, f"data.path={folder}", "data.limit=0", "train.max_steps=1",
                              "data.val_fraction=0.25", "model.block_size=32"],
                     run_dir=tmp_path / "run", progress=False)  # fmt: skip
    meta = json.loads((tmp_path / "run" / "data" / "music.json").read_text())
    assert run.step == 1 and meta["train_chorales"] == 3 and meta["val_chorales"] == 1
    (folder / "bad.mid").write_bytes(b"not a midi file")
    with pytest.raises(DataError, match=r"bad\.mid"):
        aigc.train(RECIPE, [*TINY, f"data.path={folder}", "data.limit=0"],
                   run_dir=tmp_path / "run2", progress=False)  # fmt: skip
    r = run_cli("train", str(RECIPE), f"data.path={folder}", "--run-dir", str(tmp_path / "r3"))
    assert r.returncode == 2 and "bad.mid" in r.stderr and len(r.stderr.splitlines()) <= 2
