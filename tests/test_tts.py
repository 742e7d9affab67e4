"""Text to speech: the text read as flite reads it, phones and durations from the
synthesiser, the length regulator against a plain construction, the model learning a
small set, and a tiny run through training, evaluation, the pipeline, the CLI and the
server (OpenAI's /v1/audio/speech with the official client)."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch

from .conftest import ROOT, run_cli

RECIPE = ROOT / "configs" / "tts-digits.yaml"
TINY = ["data.strings=8", "data.val_strings=3", "data.voices=[slt,awb]", "model.width=16",
        "model.encoder_layers=1", "model.decoder_layers=1", "train.batch_size=4",
        "train.max_steps=3", "train.eval_every=0", "train.sample_every=3",
        "train.checkpoint_every=3", "data.judge_steps=2", "data.vocoder_iters=4"]  # fmt: skip

needs_flite = pytest.mark.skipif(shutil.which("flite") is None,
                                 reason="flite is missing: `make system` installs it")  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    yield


def test_text_is_read_digit_by_digit_and_bad_characters_are_named():
    from aigc.data.speech import normalise_text
    from aigc.errors import DataError

    assert normalise_text("call  427, now") == "call four two seven , now"
    assert normalise_text("4 2") == "four two"
    for text, message in (("a+b", r"'\+' \(at character 2\)"), ("  ,. ", "empty"),
                          ("9" * 1001, "characters")):  # fmt: skip
        with pytest.raises(DataError, match=message):
            normalise_text(text)


@needs_flite
def test_flite_gives_the_phones_it_said_and_when_each_ended():
    from aigc.data.speech import PHONES, digit_words, phones_of, speak_with_timing
    from aigc.tasks.tts import HOP, SAMPLE_RATE, frames_of

    u = speak_with_timing("4 2 7", "slt")
    assert u.phones == phones_of("four two seven")
    assert u.phones[0] == "pau" and all(p in PHONES for p in u.phones)
    assert np.all(np.diff(u.ends) > 0)
    assert u.ends[-1] == pytest.approx(len(u.wave) / SAMPLE_RATE, abs=0.02)
    frames = frames_of(u.ends)
    assert frames.sum() == round(u.ends[-1] * SAMPLE_RATE / HOP) and np.all(frames >= 0)
    words = digit_words(u.phones)
    assert [w for w, _, _ in words] == [4, 2, 7]
    assert [u.phones[a:b] for _, a, b in words] == [("f", "ao", "r"), ("t", "uw"),
                                                    ("s", "eh", "v", "ax", "n")]  # fmt: skip
    from aigc.errors import DataError

    with pytest.raises(DataError, match="not a digit word"):
        digit_words(phones_of("hello"))


def test_the_length_regulator_repeats_each_phone_its_duration():
    from aigc.models.tts import regulate

    h = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    durations = torch.tensor([[2, 0, 3], [1, 1, 0]])
    frames, mask, place = regulate(h, durations)
    assert frames.shape == (2, 5, 2)
    want0 = torch.stack([h[0, 0], h[0, 0], h[0, 2], h[0, 2], h[0, 2]])
    assert torch.equal(frames[0], want0)
    assert torch.equal(frames[1, :2], torch.stack([h[1, 0], h[1, 1]]))
    assert mask.tolist() == [[True] * 5, [True, True, False, False, False]]
    assert torch.allclose(place[0], torch.tensor([0.25, 0.75, 1 / 6, 0.5, 5 / 6]))


def test_speed_divides_the_predicted_durations():
    from aigc.models.tts import PhoneTTS, TTSConfig

    torch.manual_seed(0)
    model = PhoneTTS(TTSConfig(width=16, encoder_layers=1, decoder_layers=1)).eval()
    with torch.no_grad():
        model.duration_out.bias.fill_(float(np.log1p(8.0)))  # about 8 frames a phone
        model.duration_out.weight.zero_()
    phones = torch.tensor([[3, 4, 5, 0]])
    voice = torch.tensor([0])
    d1 = model.predict_durations(phones, voice)
    d2 = model.predict_durations(phones, voice, speed=2.0)
    assert d1.tolist() == [[8, 8, 8, 0]] and d2.tolist() == [[4, 4, 4, 0]]
    mel, used = model.synthesise(phones, voice, 2.0)
    assert mel.shape == (1, 12, 64) and torch.equal(used, d2)


def test_the_model_learns_frames_of_a_few_utterances():
    """Training on fixed phones, durations and frames brings the mel loss well down."""
    from aigc.models.tts import PhoneTTS, TTSConfig

    torch.manual_seed(0)
    model = PhoneTTS(TTSConfig(width=32, encoder_layers=2, decoder_layers=2, dropout=0.0))
    g = torch.Generator().manual_seed(1)
    phones = torch.randint(1, 47, (4, 6), generator=g)
    durations = torch.randint(1, 5, (4, 6), generator=g)
    T = int(durations.sum(1).max())
    mel = torch.randn(4, T, 64, generator=g) - 3
    batch = {"phones": phones, "voice": torch.tensor([0, 1, 2, 3]), "durations": durations,
             "mel": mel}  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    first = None
    for _ in range(150):
        losses = model.losses(batch)
        loss = losses["mel_loss"] + losses["duration_loss"]
        first = first or {k: float(v.detach()) for k, v in losses.items()}
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(losses["mel_loss"]) < 0.6 * first["mel_loss"]
    assert float(losses["duration_loss"]) < 0.2 * first["duration_loss"]


@pytest.fixture(scope="module")
def tts_run(tmp_path_factory):
    if shutil.which("flite") is None:
        pytest.skip("flite is missing: `make system` installs it")
    import aigc

    run = tmp_path_factory.mktemp("tts") / "run"
    aigc.train(RECIPE, TINY, run_dir=run, progress=False)
    return run


def test_a_tiny_run_trains_and_is_judged_against_flite(tts_run):
    meta = json.loads((tts_run / "data" / "tts.json").read_text())
    assert not set(meta["val_strings"]) & set(meta["train_strings"])
    assert meta["voices"] == ["slt", "awb"] and "pau" in meta["phones_seen"]
    rows = [json.loads(line) for line in (tts_run / "metrics.jsonl").read_text().splitlines()]
    ev = next(r for r in reversed(rows) if "val_string_accuracy" in r)
    for k in ("val_digit_accuracy", "val_string_accuracy_flite", "val_digit_accuracy_flite",
              "val_mel_l1", "val_duration_error_frames", "val_real_time_factor"):  # fmt: skip
        assert np.isfinite(ev[k]) and ev[k] >= 0, k
    assert {p.name.split("-", 2)[2] for p in (tts_run / "samples").glob("*.wav")} >= {
        "said-0.wav",
        "said-1.wav",
        "flite-0.wav",
    }


def test_the_pipeline_speaks_in_its_voices_and_refuses_what_it_cannot_say(tts_run):
    import aigc
    from aigc.errors import RequestError

    pipe = aigc.load(tts_run)
    assert pipe.kind == "speech" and pipe.voices == ["slt", "awb"]
    a = pipe.speak("4 2 7", seed=0)
    b = pipe.speak("four two seven", voice="slt", seed=0)
    assert a.sample_rate == 16000 and np.array_equal(a.waveforms[0], b.waveforms[0])
    same = pipe.speak("4 2 7", speed=1.0, seed=0)  # speed itself: test_speed_divides_...
    assert np.array_equal(same.waveforms[0], a.waveforms[0])
    for text, kw, message in (("hello", {}, "never heard"), ("4+2", {}, "cannot be said"),
                              ("", {}, "empty"), ("1", {"voice": "kal16"}, "slt, awb"),
                              ("1", {"speed": 0.1}, "speed")):  # fmt: skip
        with pytest.raises(RequestError, match=message):
            pipe.speak(text, **kw)


def test_the_cli_speaks_to_a_file_and_names_bad_input(tts_run, tmp_path):
    import soundfile as sf

    out = tmp_path / "speech.flac"
    done = run_cli("speak", str(tts_run), "--text", "9 1 1", "--voice", "awb", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "real-time factor" in done.stdout and sf.info(out).samplerate == 16000
    for args, message in ((["--text", "hello"], "never heard"),
                          (["--text", "1", "--out", str(tmp_path / "x.txt")], ".wav"),
                          (["--text", "1", "--speed", "9"], "speed")):  # fmt: skip
        bad = run_cli("speak", str(tts_run), *args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr


def test_the_official_openai_client_gets_speech(tts_run):
    openai = pytest.importorskip("openai")
    import soundfile as sf

    from aigc.serve.app import create_app
    from aigc.serve.settings import ServeSettings

    from .test_serve import SETTINGS, Server

    srv = Server(create_app([tts_run], ServeSettings(**SETTINGS)))
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none")
        speech = client.audio.speech.create(model="run", voice="awb", input="4 2",
                                            response_format="wav", speed=1.5)  # fmt: skip
        wave, rate = sf.read(io.BytesIO(speech.content))
        assert rate == 16000 and len(wave) > 1600
        with pytest.raises(openai.BadRequestError, match="never heard"):
            client.audio.speech.create(model="run", voice="awb", input="hello",
                                       response_format="wav")  # fmt: skip
        with pytest.raises(openai.BadRequestError, match="wav or flac"):
            client.audio.speech.create(model="run", voice="awb", input="1", response_format="mp3")
    finally:
        srv.close()


# the user's own speech: a folder of recordings with metadata.csv / metadata.jsonl ------


def _tone_file(path, seconds: float = 0.5, rate: int = 16000) -> None:
    import soundfile as sf

    t = np.arange(round(rate * seconds)) / rate
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)


def _csv(root, rows: list[tuple[str, str]]) -> None:
    import csv

    with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "text", "speaker"])  # other columns are ignored
        w.writerows([(name, text, "me") for name, text in rows])


def test_a_transcribed_folder_is_read_in_file_order_with_flites_reading_of_the_text(tmp_path):
    from aigc.data.speech import read_transcribed_folder

    for name in ("wavs/b.wav", "wavs/a.flac", "c.wav"):
        _tone_file(tmp_path / "csv" / name)
    _csv(tmp_path / "csv", [("wavs/b.wav", "Call 427, now"), ("c.wav", "  yes  "),
                            ("./wavs/a.flac", "She said 'no, never'")])  # fmt: skip
    (tmp_path / "csv" / "README.txt").write_text("notes beside the clips are passed over")
    rows = read_transcribed_folder(tmp_path / "csv")
    assert [r.file.relative_to(tmp_path / "csv").as_posix() for r in rows] == [
        "c.wav", "wavs/a.flac", "wavs/b.wav"]  # fmt: skip
    assert [r.text for r in rows] == ["yes", "She said 'no, never'", "Call four two seven , now"]
    assert rows[2].where.endswith("metadata.csv, line 2")
    # the same folder described by JSON Lines
    _tone_file(tmp_path / "jsonl" / "x.wav")
    (tmp_path / "jsonl" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "x.wav", "text": "9 1 1"}) + "\n\n"
    )
    (row,) = read_transcribed_folder(tmp_path / "jsonl")
    assert row.text == "nine one one" and row.where.endswith("metadata.jsonl, line 1")


def _spoil(kind: str, root) -> str:
    """A folder of two transcribed tones, spoiled one way; returns what the error names."""
    _tone_file(root / "a.wav")
    _tone_file(root / "b.wav")
    rows = [("a.wav", "one"), ("b.wav", "two")]
    if kind == "a character flite cannot say":
        rows[1] = ("b.wav", "na\u00efve")
        _csv(root, rows)
        return (r"metadata\.csv, line 3: the transcript of b\.wav: '\u00ef' \(at character 3\) "
                "cannot be said")  # fmt: skip
    if kind == "no metadata":
        return r"has no metadata\.csv or metadata\.jsonl"
    if kind == "a row for a missing file":
        _csv(root, [*rows, ("c.wav", "three")])
        return r"metadata\.csv, line 4: c\.wav does not exist"
    if kind == "a file without a row":
        _csv(root, rows[:1])
        return r"b\.wav has no transcript in .*metadata\.csv"
    if kind == "an empty transcript":
        _csv(root, [rows[0], ("b.wav", "   ")])
        return r"metadata\.csv, line 3: the transcript of b\.wav is empty"
    if kind == "a file that is not audio":
        (root / "cover.png").write_bytes(b"\x89PNG")
        _csv(root, rows)
        return r"cover\.png: unsupported file type"
    if kind == "two metadata files":
        _csv(root, rows)
        (root / "metadata.jsonl").write_text("")
        return "holds both metadata.jsonl and metadata.csv"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["a character flite cannot say", "no metadata",
                                  "a row for a missing file", "a file without a row",
                                  "an empty transcript", "a file that is not audio",
                                  "two metadata files"])  # fmt: skip
def test_a_mistake_in_a_transcribed_folder_is_named_in_one_line(tmp_path, kind):
    from aigc.data.speech import read_transcribed_folder
    from aigc.errors import DataError

    needle = _spoil(kind, tmp_path)
    with pytest.raises(DataError, match=needle) as caught:
        read_transcribed_folder(tmp_path)
    assert "\n" not in str(caught.value)


@needs_flite
def test_a_recording_is_aligned_to_flites_phones_near_their_true_boundaries():
    """Another voice, faster, with silence and hiss around it: DTW against slt finds its
    phone boundaries (flite knows them for that voice too) within a few 16 ms frames,
    where cutting the recording into equal phones misses by several times more."""
    from aigc.data.speech import align_to_flite, phone_frames, speak_with_timing
    from aigc.tasks.tts import HOP, tts_mel_spec

    spec = tts_mel_spec()
    errors, uniform = [], []
    for text, voice, rate in (("call me at nine one one, please", "kal16", 1.25),
                              ("the quick brown fox jumps over the lazy dog", "awb", 1.0)):  # fmt: skip
        u = speak_with_timing(text, voice, rate)
        pad = np.zeros(4800, np.float32)  # 0.3 s = 18.75 frames
        hiss = np.random.default_rng(0).normal(0, 0.002, len(u.wave) + 9600)
        wave = (np.concatenate([pad, u.wave, pad]) + hiss).astype(np.float32)
        phones, frames = align_to_flite(wave, text, spec, "slt")
        assert phones == u.phones and frames.sum() == spec.frames(len(wave))
        assert np.all(frames >= 0)
        truth = np.cumsum(phone_frames(u.ends, HOP))[:-1] + 4800 / HOP
        found = np.cumsum(frames)[:-1]
        equal = np.linspace(0, frames.sum(), len(frames) + 1)[1:-1]
        errors.append(np.abs(found - truth).mean())
        uniform.append(np.abs(equal - truth).mean())
    assert max(errors) < 4.5 and max(errors) < min(uniform) / 3, (errors, uniform)


@pytest.fixture(scope="module")
def speech_folder(tmp_path_factory):
    """Six sentences said by flite's awb voice, at 22.05 kHz, with metadata.jsonl."""
    if shutil.which("flite") is None:
        pytest.skip("flite is missing: `make system` installs it")
    import soundfile as sf

    from aigc.data.audio import resample
    from aigc.data.speech import synthesise

    root = tmp_path_factory.mktemp("speech") / "mine"
    texts = ["call me at four", "one two three", "the cat sat", "seven eight nine",
             "a big red fox", "two cats"]  # fmt: skip
    lines = []
    for i, text in enumerate(texts):
        (root / "wavs").mkdir(parents=True, exist_ok=True)
        sf.write(root / "wavs" / f"{i}.wav", resample(synthesise(text, "awb"), 16000, 22050), 22050)
        lines.append(json.dumps({"file_name": f"wavs/{i}.wav", "text": text}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_a_tts_run_learns_a_folder_of_transcribed_speech(speech_folder, tmp_path):
    import aigc
    from aigc.errors import RequestError
    from aigc.tasks.tts import tts_mel_spec

    run = tmp_path / "run"
    tiny = [
        o for o in TINY if not o.startswith(("data.strings", "data.val_strings", "data.voices"))
    ]
    out = aigc.train(RECIPE, [*tiny, f"data.source={speech_folder}", "data.val_fraction=0.34"],
                     run_dir=run, progress=False)  # fmt: skip
    assert out.headline == "mel_l1" and "mel_l1" in out.metrics  # no judge of a folder's words
    meta = json.loads((run / "data" / "tts.json").read_text())
    assert meta["voices"] == ["speaker"] and meta["folder"] == str(speech_folder)
    assert len(meta["train_texts"]) == 4 and len(meta["val_texts"]) == 2
    assert not set(meta["train_texts"]) & set(meta["val_texts"])
    # each training row: the aligned durations cover exactly its recording's frames
    durations = np.load(run / "data" / "durations.npy").astype(int)
    offsets = np.load(run / "data" / "mel_offsets.npy")
    np.testing.assert_array_equal(durations.sum(1), np.diff(offsets))
    val_offsets = np.load(run / "data" / "val_wave_offsets.npy")
    val_durations = np.load(run / "data" / "val_durations.npy").astype(int)
    frames = [tts_mel_spec().frames(int(n)) for n in np.diff(val_offsets)]
    assert val_durations.sum(1).tolist() == frames
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ev = next(r for r in reversed(rows) if "val_mel_l1" in r)
    assert "val_string_accuracy" not in ev
    for k in ("val_mel_l1", "val_duration_error_frames", "val_real_time_factor"):
        assert np.isfinite(ev[k]) and ev[k] >= 0, k
    assert {p.name.split("-", 2)[2] for p in (run / "samples").glob("*.wav")} == {
        "said-0.wav", "said-1.wav", "recorded-0.wav"}  # fmt: skip
    pipe = aigc.load(run)
    assert pipe.voices == ["speaker"]
    heard = set(meta["phones_seen"])
    text = next(t for t in ("two cats", "the cat sat", "one two three")
                if set(pipe.phones(t)) <= heard)  # fmt: skip
    assert len(pipe.speak(text, seed=0).waveforms[0]) > 0
    with pytest.raises(RequestError, match="its transcribed speech"):
        pipe.speak("zebra jumps quickly")
    shown = pipe.format_eval(pipe.evaluate(save=False))
    assert "held-out recordings" in shown and "mel_l1" in shown


def test_the_cli_refuses_a_bad_transcript_in_one_line(tmp_path):
    from .test_cli import assert_user_error

    needle = _spoil("a character flite cannot say", tmp_path / "mine")
    assert "line 3" in needle
    bad = run_cli("train", "tts-digits", f"data.source={tmp_path / 'mine'}", "--run-dir",
                  str(tmp_path / "run"))  # fmt: skip
    assert_user_error(bad, "metadata.csv, line 3", "b.wav", "cannot be said")
    assert not (tmp_path / "run").exists()
