"""Spoken-word generation: the log-mel pictures against an independent analysis, the
way back to sound, the spoken-digits source, the judge's figures computed by hand, and
a tiny run through training, evaluation, the pipeline, the CLI and the server."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch

from .conftest import ROOT, run_cli

RECIPE = ROOT / "configs" / "spoken-digits.yaml"
TINY = ["data.image_size=16", "model.width=8", "model.channel_mults=[1,2]", "model.groups=4",
        "model.attn_resolutions=[]", "model.sample_steps=2", "train.batch_size=8",
        "train.max_steps=3", "train.eval_every=0", "train.sample_every=3",
        "train.checkpoint_every=3", "data.eval_samples=20", "data.judge_steps=3",
        "data.vocoder_iters=4"]  # fmt: skip

needs_flite = pytest.mark.skipif(shutil.which("flite") is None,
                                 reason="flite is missing: `make system` installs it")  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    yield


def _tone_and_chirp() -> np.ndarray:
    t = np.arange(16000) / 16000
    tone = 0.5 * np.sin(2 * np.pi * 440 * t) * (t > 0.25) * (t < 0.75)
    chirp = 0.3 * np.sin(2 * np.pi * (200 * t + 1500 * t**2))
    return np.stack([tone, chirp]).astype(np.float32)


def test_pictures_are_the_log_mel_relative_to_the_loudest_cell_quantised():
    """Against a log-mel made here from the STFT and the filterbank directly."""
    from aigc.data.audio import mel_filterbank
    from aigc.data.speech import MEL_RANGE, mel_picture_spec, waves_to_pictures

    waves = _tone_and_chirp()
    pictures = waves_to_pictures(waves, 32)
    assert pictures.shape == (2, 32, 32, 1) and pictures.dtype == np.uint8
    spec = mel_picture_spec(32)
    assert spec.hop == 500 and spec.n_mels == 32
    window = torch.hann_window(spec.n_fft, dtype=torch.float64)
    stft = torch.stft(torch.from_numpy(waves).double(), spec.n_fft, spec.hop, window=window,
                      center=True, pad_mode="reflect", return_complex=True).abs()  # fmt: skip
    mel = torch.einsum("mf,bft->bmt", mel_filterbank(spec.n_fft, 32, 16000).double(), stft)
    log = mel.clamp_min(spec.floor).log()[..., :32]
    rel = (log - log.amax(dim=(1, 2), keepdim=True)).clamp_min(-MEL_RANGE)
    want = ((rel / MEL_RANGE + 1) * 255).numpy()[:, ::-1]  # low bands at the bottom
    assert np.abs(pictures[..., 0].astype(float) - want).max() <= 0.51
    # the loudest cell is white; the 440 Hz tone's band is the brightest row of its picture
    assert pictures[0].max() == 255 and pictures[1].max() == 255
    band = 31 - int(np.argmax(pictures[0, :, 16, 0]))
    centres = np.argmax(mel_filterbank(spec.n_fft, 32, 16000).numpy(), axis=1) * 16000 / spec.n_fft
    assert abs(centres[band] - 440) < 150


def test_pictures_go_back_to_sound_with_the_same_pictures():
    """Griffin-Lim from a picture gives a second whose own picture is close to it."""
    from aigc.data.speech import pictures_to_log_mel, pictures_to_waves, waves_to_pictures

    pictures = waves_to_pictures(_tone_and_chirp(), 64)
    mel = pictures_to_log_mel(pictures)
    assert mel.shape == (2, 64, 65)  # the dropped frame repeated
    # uint8 pictures and the model's [-1, 1] floats read the same
    as_model = torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.allclose(pictures_to_log_mel(as_model), mel, atol=1e-5)
    waves = pictures_to_waves(pictures, iters=32)
    assert waves.shape == (2, 16000) and np.abs(waves).max() == pytest.approx(0.9, abs=1e-5)
    again = waves_to_pictures(waves, 64).astype(float)
    assert np.abs(again - pictures).mean() < 10  # of 255
    assert np.corrcoef(again.ravel(), pictures.ravel().astype(float))[0, 1] > 0.9
    noise = waves_to_pictures(np.random.default_rng(0).standard_normal((2, 16000)), 64)
    assert np.abs(noise.astype(float) - pictures).mean() > 100


@needs_flite
def test_the_spoken_digits_source_is_labelled_pictures_of_every_clip():
    from aigc.data.images import load_image_set
    from aigc.data.speech import spoken_digits, waves_to_pictures

    found = load_image_set("spoken-digits", image_size=16, channels=1)
    clips = spoken_digits()
    assert found.images.shape == (1000, 16, 16, 1)
    assert list(found.labels) == ["digit", "voice", "rate", "pitch"]
    assert found.classes["digit"][7] == "seven" and found.classes["voice"] == ["awb", "kal16",
                                                                               "rms", "slt"]  # fmt: skip
    np.testing.assert_array_equal(found.labels["digit"], clips.digit)
    np.testing.assert_array_equal(
        found.images[123:125], waves_to_pictures(clips.waves[123:125], 16)
    )
    assert found.captions[0] == "zero spoken by awb"


def _counts(probs: np.ndarray, asked: np.ndarray) -> dict[str, float]:
    """The sums SpokenTask.judge_waves makes of judge probabilities, built here by hand."""
    pred = probs.argmax(1)
    sums = {
        "n": float(len(probs)),
        "plogp": float((probs * np.log(np.clip(probs, 1e-12, 1))).sum()),
    }
    for d in range(10):
        sums[f"asked/{d}"] = float((asked == d).sum())
        sums[f"correct/{d}"] = float(((pred == d) & (asked == d)).sum())
        sums[f"prob/{d}"] = float(probs[:, d].sum())
    return sums


def test_accuracy_and_the_judge_score_against_a_hand_computation():
    from aigc.tasks.spoken import SpokenTask

    task = SpokenTask.__new__(SpokenTask)
    task.meta = {"spec": {"source": "spoken-digits"}}
    task._judge = type("J", (), {"accuracy": {"digit": 0.99}, "weaknesses": lambda self: []})()
    asked = np.arange(40) % 10
    confident = np.eye(10)[asked] * 0.91 + 0.01  # right, and sure of it
    m = task.eval_metrics(_counts(confident, asked))
    assert m["digit_accuracy"] == 1.0 and m["digit_accuracy_min"] == 1.0
    # the Inception score by its definition: exp of the mean KL to the marginal
    marginal = confident.mean(0)
    kl = (confident * (np.log(confident) - np.log(marginal))).sum(1).mean()
    assert m["judge_score"] == pytest.approx(np.exp(kl), rel=1e-9)
    assert 5 < m["judge_score"] < 10  # p = 0.91 for the right digit
    wrong = confident.copy()
    wrong[asked == 3] = np.eye(10)[5] * 0.91 + 0.01  # every "three" heard as "five"
    m = task.eval_metrics(_counts(wrong, asked))
    assert m["digit_accuracy"] == pytest.approx(0.9) and m["digit_accuracy_min"] == 0.0
    flat = np.full((40, 10), 0.1)  # no idea: score 1
    assert task.eval_metrics(_counts(flat, asked))["judge_score"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def spoken_run(tmp_path_factory):
    if shutil.which("flite") is None:
        pytest.skip("flite is missing: `make system` installs it")
    import aigc

    run = tmp_path_factory.mktemp("spoken") / "run"
    aigc.train(RECIPE, TINY, run_dir=run, progress=False)
    return run


def test_a_tiny_run_trains_evaluates_by_ear_and_writes_sound(spoken_run):
    from aigc.data.speech import spoken_digits

    rows = json.loads((spoken_run / "data" / "spoken_heldout.json").read_text())["rows"]
    images = np.load(spoken_run / "data" / "images.npy")
    meta = json.loads((spoken_run / "data" / "meta.json").read_text())
    from aigc.data.speech import waves_to_pictures

    # the held-out rows name the very clips whose pictures were held out
    val = images[meta["n_train"] :]
    np.testing.assert_array_equal(val[:5], waves_to_pictures(spoken_digits().waves[rows[:5]], 16))
    last = [json.loads(line) for line in (spoken_run / "metrics.jsonl").read_text().splitlines()]
    ev = next(r for r in reversed(last) if "val_digit_accuracy" in r)
    for k in ("val_digit_accuracy_min", "val_judge_score", "val_frechet/heldout",
              "val_frechet/vocoded", "val_frechet/vocoder_floor", "val_vocoded_accuracy"):  # fmt: skip
        assert np.isfinite(ev[k]), k
    assert ev["val_frechet/heldout"] >= 0
    wavs = sorted((spoken_run / "samples").glob("*digits.wav"))
    import soundfile as sf

    wave, rate = sf.read(wavs[-1])
    assert rate == 16000 and len(wave) == 10 * 17600  # ten seconds and ten gaps of 0.1 s


def test_the_pipeline_says_the_digit_asked_for_and_refuses_others(spoken_run):
    import aigc
    from aigc.errors import RequestError

    pipe = aigc.load(spoken_run)
    assert pipe.kind == "spoken" and "speak" in pipe.verbs
    out = pipe.generate(3, labels="seven", seed=4)
    again = pipe.generate(1, labels=7, seed=4)
    assert len(out.waveforms) == 3 and out.sample_rate == 16000
    np.testing.assert_allclose(out.waveforms[0], again.waveforms[0], atol=1e-6)
    said = pipe.speak("7", seed=4)
    np.testing.assert_allclose(said.waveforms[0], again.waveforms[0], atol=1e-6)
    for text, kw, message in (("eleven", {}, "one digit"), ("7", {"voice": "slt"}, "voice"),
                              ("7", {"speed": 2.0}, "one speed")):  # fmt: skip
        with pytest.raises(RequestError, match=message):
            pipe.speak(text, **kw)


def test_the_cli_writes_clips_of_the_class_and_names_a_bad_one(spoken_run, tmp_path):
    import soundfile as sf

    done = run_cli("sample", str(spoken_run), "--class", "seven", "--n", "2", "--out",
                   str(tmp_path / "sevens"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    files = sorted((tmp_path / "sevens").glob("*.wav"))
    assert [f.name for f in files] == ["00000.wav", "00001.wav"]
    assert sf.info(files[0]).samplerate == 16000 and sf.info(files[0]).frames == 16000
    bad = run_cli("sample", str(spoken_run), "--class", "eleven", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "eleven" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("sample", str(spoken_run), "--out", str(tmp_path / "x.png"))
    assert bad.returncode == 2 and "folder" in bad.stderr
    ev = run_cli("eval", str(spoken_run), "--scheduler", "ddim", "--steps", "2", "--n", "10")
    assert ev.returncode == 0, ev.stderr
    assert "sampled by ddim in 2 steps" in ev.stdout and "digit_accuracy" in ev.stdout


def test_the_server_says_a_digit_in_openais_speech_shape(spoken_run):
    import httpx
    import soundfile as sf

    from aigc.serve.app import create_app
    from aigc.serve.settings import ServeSettings

    from .test_serve import SETTINGS, Server

    srv = Server(create_app([spoken_run], ServeSettings(**SETTINGS)))
    try:
        url = f"{srv.url}/v1/audio/speech"
        body = {"model": "run", "input": "seven", "voice": "any", "response_format": "flac",
                "seed": 1}  # fmt: skip
        r = httpx.post(url, json=body, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"] == "audio/flac", r.text
        wave, rate = sf.read(io.BytesIO(r.content), dtype="float32")
        assert rate == 16000 and len(wave) == 16000
        for change, message in (({"input": "eleven"}, "one digit"),
                                ({"input": " "}, "empty"),
                                ({"voice": "alloy"}, "voice"),
                                ({"response_format": "mp3"}, "wav or flac"),
                                ({"model": "nope"}, "does not exist"),
                                ({"instructions": "cheerful"}, "instructions"),
                                ({"pitch": 2}, "pitch")):  # fmt: skip
            r = httpx.post(url, json={**body, **change}, timeout=60)
            assert 400 <= r.status_code < 500, r.text
            assert message in json.dumps(r.json()), r.text
    finally:
        srv.close()


# the user's own clips: a folder of audio files, a sub-folder per class ---------------

TONES = {"high": 2500.0, "low": 300.0, "mid": 1000.0}  # class -> the tone its clips hold
RATES_AND_FORMATS = ((8000, ".wav"), (22050, ".flac"), (44100, ".wav"), (16000, ".flac"))


def _write_folder(root, per_class: int = 4, seconds: float = 0.4):
    """Tones per class at several rates and formats, each with 0.2 s of silence either
    side; the first file of "low" in stereo. Returns {path: (class, tone Hz)}."""
    import soundfile as sf

    written = {}
    for name, hz in TONES.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            rate, suffix = RATES_AND_FORMATS[i % len(RATES_AND_FORMATS)]
            t = np.arange(round(rate * seconds)) / rate
            tone = 0.3 * np.sin(2 * np.pi * hz * t) * np.hanning(len(t))
            pad = np.zeros(round(0.2 * rate))
            wave = np.concatenate([pad, tone, pad]).astype(np.float32)
            if name == "low" and i == 0:
                wave = np.stack([wave, 0.5 * wave], axis=1)
            path = root / name / f"{i:02d}{suffix}"
            sf.write(path, wave, rate)
            written[path] = (name, hz)
    return written


def _peak_hz(wave: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / 16000)[spectrum.argmax()])


def test_an_audio_folder_becomes_clips_and_pictures_made_as_the_digits_are(tmp_path):
    import soundfile as sf

    from aigc.data.images import load_image_set
    from aigc.data.speech import read_audio_folder, waves_to_pictures

    written = _write_folder(tmp_path / "tones")
    long = tmp_path / "tones" / "mid" / "long.wav"  # 1.6 s of tone: its middle second kept
    t = np.arange(16000 * 8 // 5) / 16000
    sf.write(long, (0.3 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32), 16000)
    (tmp_path / "tones" / "low" / "notes.txt").write_text("ignored, as in an image folder")
    folder = read_audio_folder(tmp_path / "tones")
    assert folder.classes == ["high", "low", "mid"] and folder.waves.shape == (13, 16000)
    assert folder.cut == 1 and folder.skipped == 0
    assert [f.name for f in folder.files[:4]] == ["00.wav", "01.flac", "02.wav", "03.flac"]
    for path, wave, label in zip(folder.files, folder.waves, folder.labels, strict=True):
        name, hz = written.get(path, ("mid", 1000.0))
        assert folder.classes[label] == name
        # resampled to 16 kHz from every rate: the tone keeps its pitch
        assert abs(_peak_hz(wave) - hz) < 20, (path, _peak_hz(wave))
        assert np.abs(wave).max() == pytest.approx(0.9, abs=1e-4)
        if path != long:  # trimmed of its silence and centred: its energy in the middle
            energy = wave.astype(np.float64) ** 2
            centre = (energy * np.arange(16000)).sum() / energy.sum()
            assert abs(centre - 8000) < 300, (path, centre)
            assert np.abs(wave[:3000]).max() < 1e-3 and np.abs(wave[-3000:]).max() < 1e-3
    # the image readers see the same clips as pictures, labelled by class
    found = load_image_set(tmp_path / "tones", image_size=16, channels=1)
    np.testing.assert_array_equal(found.images, waves_to_pictures(folder.waves, 16))
    np.testing.assert_array_equal(found.labels["class"], folder.labels)
    assert found.classes == {"class": ["high", "low", "mid"]} and "audio folder" in found.source
    # train/ and test/ folders: the split asked for
    for split, n in (("train", 2), ("test", 1)):
        _write_folder(tmp_path / "split" / split, per_class=n)
    assert len(read_audio_folder(tmp_path / "split").waves) == 6
    assert len(read_audio_folder(tmp_path / "split", split="test").waves) == 3


def _zero_rate_wav(path) -> None:
    import struct

    data = np.zeros(100, "<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, 0, 0, 2, 16)
    path.write_bytes(b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " +
                     struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data)) + data)  # fmt: skip


def _break(kind: str, root) -> str:
    """Spoils a folder of tones one way; returns what the error must name."""
    import soundfile as sf

    if kind == "not audio":
        (root / "low" / "notes.wav").write_text("these are not samples")
        return r"low/notes\.wav: not an audio file"
    if kind == "zero sample rate":
        _zero_rate_wav(root / "mid" / "zero.wav")
        return r"mid/zero\.wav"
    if kind == "silence":
        sf.write(root / "high" / "quiet.wav", np.full(8000, 1e-5, np.float32), 16000, "FLOAT")
        return r"high/quiet\.wav: silent \(its loudest sample is -100 dBFS"
    if kind == "class without files":
        (root / "empty").mkdir()
        (root / "empty" / ".DS_Store").write_bytes(b"x")
        return r"tones/empty: the class 'empty' holds no audio files"
    if kind == "loose file":
        (root / "high" / "00.wav").rename(root / "stray.wav")
        return r"tones holds files directly in it \(stray\.wav\)"
    if kind == "not a sound file type":
        (root / "mid" / "cover.png").write_bytes(b"\x89PNG")
        return r"mid/cover\.png: unsupported file type"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["not audio", "zero sample rate", "silence",
                                  "class without files", "loose file", "not a sound file type"])  # fmt: skip
def test_a_bad_file_in_an_audio_folder_is_named_in_one_line(tmp_path, kind):
    from aigc.data.speech import read_audio_folder
    from aigc.errors import DataError

    root = tmp_path / "tones"
    _write_folder(root, per_class=2)
    needle = _break(kind, root)
    with pytest.raises(DataError, match=needle) as caught:
        read_audio_folder(root)
    assert "\n" not in str(caught.value)
    if kind in ("not audio", "zero sample rate", "silence", "not a sound file type"):
        skipped = read_audio_folder(root, skip_bad=True)
        assert skipped.skipped == 1 and len(skipped.waves) == 6


def test_an_empty_or_missing_audio_folder_is_named(tmp_path):
    from aigc.data.speech import read_audio_folder
    from aigc.errors import DataError

    with pytest.raises(DataError, match=r"empty holds no audio: put one sub-folder"):
        read_audio_folder((tmp_path / "empty").mkdir() or tmp_path / "empty")
    with pytest.raises(DataError, match=r"missing: no such folder"):
        read_audio_folder(tmp_path / "missing")


def test_a_spoken_run_learns_a_folder_of_clips_and_says_a_class_by_name(tmp_path):
    """A folder of tones: prepared, split by a seeded fraction, trained a few steps,
    judged by a judge of its own clips, and sampled by class name from the CLI."""
    import aigc
    from aigc.data.speech import waves_to_pictures
    from aigc.errors import RequestError

    root = tmp_path / "tones"
    _write_folder(root, per_class=4)
    run = tmp_path / "run"
    tiny = [o for o in TINY if not o.startswith("data.eval_samples")]
    trained = run_cli("train", str(RECIPE), *tiny, f"data.source={root}",
                      "data.val_fraction=0.25", "data.eval_samples=12", "--run-dir", str(run))  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert "validation class_accuracy" in trained.stdout  # the headline a folder run has
    meta = json.loads((run / "data" / "meta.json").read_text())
    assert meta["attributes"] == ["class"] and meta["classes"]["class"] == ["high", "low", "mid"]
    assert (meta["n_train"], meta["n_val"]) == (9, 3)  # a quarter of the 12 clips held out
    images = np.load(run / "data" / "images.npy")
    labels = np.load(run / "data" / "labels.npy")[:, 0]
    assert np.bincount(labels, minlength=3).tolist() == [4, 4, 4]
    # the stored clips are the pictures' own, in their order (16-bit: a level or so apart)
    clips = np.load(run / "data" / "spoken_clips.npy").astype(np.float32) / 32767
    again = waves_to_pictures(clips, 16).astype(int)
    assert np.abs(again - images).mean() < 0.5
    assert [_peak_hz(c) for c in clips] == pytest.approx(
        [TONES[meta["classes"]["class"][y]] for y in labels], abs=20
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ev = next(r for r in reversed(rows) if "val_class_accuracy" in r)
    for k in ("val_class_accuracy_min", "val_judge_score", "val_frechet/heldout",
              "val_vocoded_accuracy", "val_judge_accuracy"):  # fmt: skip
        assert np.isfinite(ev[k]), k
    assert "- class" in (run / "config.yaml").read_text()  # data.labels filled in
    said = sorted((run / "samples").glob("*classes.wav"))
    import soundfile as sf

    assert len(sf.read(said[-1])[0]) == 3 * 17600  # the three classes in turn
    pipe = aigc.load(run)
    one = pipe.generate(1, labels="mid", seed=3)
    np.testing.assert_allclose(pipe.speak("MID", seed=3).waveforms[0], one.waveforms[0],
                               atol=1e-6)  # fmt: skip
    with pytest.raises(RequestError, match="one class: high, low, mid"):
        pipe.speak("seven")
    done = run_cli("sample", str(run), "--class", "low", "--n", "2", "--out", str(tmp_path / "o"))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["00000.wav", "00001.wav"]


def test_the_cli_refuses_a_bad_audio_folder_in_one_line(tmp_path):
    from .test_cli import assert_user_error, run_cli_all

    root = tmp_path / "tones"
    _write_folder(root, per_class=2)
    _break("silence", root)
    images = tmp_path / "pictures"  # an image folder is not a folder of sound
    (images / "cat").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(images / "cat" / "a.png")
    bad, photos = run_cli_all(
        ["train", "spoken-digits", f"data.source={root}", "--run-dir", str(tmp_path / "r1")],
        ["train", "spoken-digits", f"data.source={images}", "--run-dir", str(tmp_path / "r2")],
    )
    assert_user_error(bad, "quiet.wav", "silent")
    assert_user_error(photos, "a.png", "unsupported file type")
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()
