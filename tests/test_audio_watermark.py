"""The audio watermark (aigc.safety.audio_watermark): flite's speech marked, written and
read back as real files, transformed as the module claims, and tested unmarked for the
false-positive rate; the CLI's `aigc detect --audio` end to end."""

from __future__ import annotations

import io
import math
import shutil

import numpy as np
import pytest
import soundfile as sf

from aigc.data.audio import resample
from aigc.errors import RequestError
from aigc.safety import audio_watermark as aw

from .conftest import run_cli

pytestmark = pytest.mark.skipif(shutil.which("flite") is None,
                                reason="flite is missing: `make system` installs it")  # fmt: skip

SENTENCES = (
    ("The birch canoe slid on the smooth planks.", "slt"),
    ("Glue the sheet to the dark blue background.", "awb"),
    ("It is easy to tell the depth of a well.", "rms"),
    ("Call four two seven nine zero three one eight.", "kal16"),
)


@pytest.fixture(scope="module")
def speech() -> list[np.ndarray]:
    from aigc.data.speech import synthesise

    return [synthesise(text, voice) for text, voice in SENTENCES]


@pytest.fixture(scope="module")
def marked(speech) -> list[np.ndarray]:
    return [aw.mark_audio(w, 16000, f"key {i}") for i, w in enumerate(speech)]


def _codec(wave: np.ndarray, fmt: str, rate: int = 16000) -> np.ndarray:
    buf = io.BytesIO()
    sf.write(buf, np.clip(wave, -1, 1), rate, format=fmt, subtype="PCM_16")
    buf.seek(0)
    back, got = sf.read(buf, dtype="float32")
    assert got == rate
    return back


def _noise(wave: np.ndarray, snr_db: float, seed: int) -> np.ndarray:
    n = np.random.default_rng(seed).normal(size=len(wave))
    n *= math.sqrt(float((wave**2).mean()) / float((n**2).mean()) / 10 ** (snr_db / 10))
    return wave + n.astype(wave.dtype)


TRANSFORMS = {
    "wav": lambda w: _codec(w, "WAV"),
    "flac": lambda w: _codec(w, "FLAC"),
    "resample 16k-8k-16k": lambda w: resample(resample(w, 16000, 8000), 8000, 16000),
    "white noise 30 dB": lambda w: _noise(w, 30.0, 1),
    "10% trimmed": lambda w: w[len(w) // 10 :],
    "gain -12 dB": lambda w: w * np.float32(0.25),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_marked_speech_is_detected_after_each_claimed_transformation(marked, name):
    for i, m in enumerate(marked):
        seen = TRANSFORMS[name](m)
        v = aw.detect_audio(seen, 16000, f"key {i}")
        assert v.marked, (name, i, v.z, v.threshold)
        assert v.p_value <= 1e-3 and v.z >= v.threshold


def test_the_mark_is_found_at_other_rates_and_in_a_file_read_back(tmp_path, speech):
    """A sound at 22.05 kHz is marked at that rate (the same length back) and found in
    the FLAC file read at its own rate."""
    x = resample(speech[0], 16000, 22050)
    m = aw.mark_audio(x, 22050, "other rate")
    assert m.shape == x.shape and m.dtype == x.dtype
    sf.write(tmp_path / "m.flac", m, 22050)
    back, rate = sf.read(tmp_path / "m.flac", dtype="float32")
    assert rate == 22050 and aw.detect_audio(back, rate, "other rate").marked


def test_wrong_keys_are_not_detected(marked):
    for i, m in enumerate(marked):
        right = aw.detect_audio(m, 16000, f"key {i}").z
        for other in (f"key {i + 1}", f"Key {i}", "k"):
            v = aw.detect_audio(m, 16000, other)
            assert not v.marked and v.z < right - 3, (i, other, v.z, right)


def test_unmarked_speech_is_flagged_at_no_more_than_the_nominal_rate(speech):
    """The 4 unmarked sentences and 8 one-second digits, each tested with 50 keys (600
    tests): the share with a p-value below each level stays within 3 binomial standard
    errors of it (the p-value is a bound, so the share is usually far below)."""
    from aigc.data.speech import DIGITS, synthesise

    digits = [np.pad(w[:16000], (0, max(0, 16000 - len(w))))
              for w in (synthesise(DIGITS[d], "slt") for d in range(8))]  # fmt: skip
    p = np.array([aw.detect_audio(w, 16000, f"null {j}").p_value
                  for w in [*speech, *digits] for j in range(50)])  # fmt: skip
    n = len(p)
    for level in (1e-3, 1e-2, 5e-2, 0.2):
        allowed = level + 3 * math.sqrt(level * (1 - level) / n)
        assert (p <= level).mean() <= allowed, (level, (p <= level).mean())


def test_the_mark_costs_little_snr_computed_independently(speech, marked):
    """SNR from scratch (energy of the sound over that of the change, in dB) agrees with
    aw.snr_db. The informed embedding raises the mark on sentences it finds hard to
    read (benchmarks/audio_watermark.py: 24 dB on average over 50 sentences, 16 dB at
    worst); the floor here guards against a regression."""
    snrs = []
    for x, m in zip(speech, marked, strict=True):
        x64, d = x.astype(np.float64), m.astype(np.float64) - x.astype(np.float64)
        ref = 10 * np.log10(np.sum(x64**2) / np.sum(d**2))
        assert aw.snr_db(x, m) == pytest.approx(ref, rel=1e-9)
        assert np.abs(d).max() > 0 and m.shape == x.shape and m.dtype == np.float32
        snrs.append(ref)
    assert min(snrs) >= 15.0 and np.mean(snrs) >= 20.0, snrs


def test_marking_is_deterministic_and_silence_stays_silent(speech):
    x = np.concatenate([np.zeros(8000, np.float32), speech[0]])
    a, b = aw.mark_audio(x, 16000, "k"), aw.mark_audio(x, 16000, "k")
    assert np.array_equal(a, b)
    assert np.abs(a[:6000]).max() < 1e-6  # a multiplicative mark adds nothing to silence


def test_the_p_value_is_the_union_bound_over_the_alignments_searched(marked):
    v = aw.detect_audio(marked[0], 16000, "key 0")
    assert v.tests == aw.OFFSETS * aw.FRAMES_PER_SIGN * aw.PERIOD == 256
    from aigc.safety.image_watermark import p_bound, z_threshold

    assert v.p_value == pytest.approx(p_bound(v.z, 256), rel=1e-12)
    assert v.threshold == pytest.approx(z_threshold(1e-3, 256), rel=1e-12)
    assert set(v.to_dict()) >= {"z", "p_value", "marked", "threshold", "fpr", "tests"}


def test_bad_input_is_named():
    x = np.zeros(16000, np.float32)
    for call, message in (
        (lambda: aw.mark_audio(x, 16000, ""), "key"),
        (lambda: aw.mark_audio(x, 16000, "k", strength=0), "strength"),
        (lambda: aw.mark_audio(np.zeros((2, 16000)), 16000, "k"), "mono"),
        (lambda: aw.mark_audio(np.zeros(16000, np.int16), 16000, "k"), "float"),
        (lambda: aw.mark_audio(x, 0, "k"), "sample_rate"),
        (lambda: aw.mark_audio(x[:100], 16000, "k"), "at least"),
        (lambda: aw.detect_audio(x[:4000], 16000, "k"), "0.5 s"),
        (lambda: aw.detect_audio(x, 16000, "k", fpr=2), "fpr"),
        (lambda: aw.detect_audio(np.full(16000, np.nan), 16000, "k"), "NaN"),
    ):
        with pytest.raises(RequestError, match=message):
            call()


def test_cli_detect_audio_end_to_end(tmp_path, speech):
    """A marked file is said to be watermarked (exit 0, JSON verdict); an unmarked one not;
    a missing file and a missing key exit 2 with a one-line error."""
    import json

    sf.write(tmp_path / "marked.wav", aw.mark_audio(speech[1], 16000, "cli key"), 16000)
    sf.write(tmp_path / "plain.wav", speech[1], 16000)
    done = run_cli("detect", "--audio", str(tmp_path / "marked.wav"), "--key", "cli key", "--json")
    assert done.returncode == 0, done.stderr
    verdict = json.loads(done.stdout)
    assert verdict["marked"] and verdict["p_value"] <= 1e-3
    done = run_cli("detect", "--audio", str(tmp_path / "plain.wav"), "--key", "cli key")
    assert done.returncode == 0 and done.stdout.startswith("not watermarked"), done.stdout
    done = run_cli("detect", "--audio", str(tmp_path / "nothing.wav"), "--key", "k")
    assert done.returncode == 2 and "no such audio file" in done.stderr
    done = run_cli("detect", "--audio", str(tmp_path / "plain.wav"))
    assert done.returncode == 2 and "--key" in done.stderr


def test_pipelines_mark_audio_outputs_in_postprocess(speech):
    """The postprocess hook marks each waveform of an AudioOutput (the path the speak and
    generate verbs, the CLI and the server take)."""
    from aigc.pipelines.base import AudioOutput, Pipeline

    out = AudioOutput([speech[0], speech[2]], 16000, seed=3)
    got = Pipeline.postprocess(None, out, "pipe key")  # type: ignore[arg-type]
    assert got.seed == 3 and got.sample_rate == 16000
    assert all(aw.detect_audio(w, 16000, "pipe key").marked for w in got.waveforms)
    assert Pipeline.postprocess(None, out, None) is out  # type: ignore[arg-type]
