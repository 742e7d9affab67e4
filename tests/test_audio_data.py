"""Audio as arrays: file round trips through soundfile, resampling through soxr, the mel
filterbank against a direct computation, Griffin-Lim's way back, SI-SDR by hand, and the
spoken digits flite makes on the machine."""

from __future__ import annotations

import math
import shutil
import struct

import numpy as np
import pytest
import torch

from aigc.data.audio import (
    MelSpec,
    griffin_lim,
    hz_to_mel,
    mel_filterbank,
    mel_to_hz,
    read_audio,
    resample,
    write_audio,
)
from aigc.errors import DataError
from aigc.metrics.audio import si_sdr


def _tone(freq: float, rate: int = 16000, seconds: float = 0.5, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()])


# files -----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_lossless_files_round_trip_to_16_bit_precision(tmp_path, suffix):
    rng = np.random.default_rng(0)
    wave = np.clip(rng.normal(0, 0.3, 8000), -1, 1).astype(np.float32)
    path = write_audio(tmp_path / f"x{suffix}", wave, 16000)
    back, rate = read_audio(path)
    assert rate == 16000 and back.shape == wave.shape and back.dtype == np.float32
    np.testing.assert_allclose(back, wave, atol=1 / 32768 + 1e-7)
    assert not list(tmp_path.glob(".*.tmp"))


def test_lossy_ogg_keeps_a_tone_and_stereo_is_averaged_or_kept(tmp_path):
    tone = _tone(440)
    back, _ = read_audio(write_audio(tmp_path / "x.ogg", tone, 16000))
    n = min(len(back), len(tone))
    assert si_sdr(back[:n], tone[:n]) > 15
    stereo = np.stack([tone, -0.5 * tone])
    path = write_audio(tmp_path / "s.wav", stereo, 16000)
    both, _ = read_audio(path, mono=False)
    assert both.shape == (2, len(tone))
    mono, _ = read_audio(path)
    np.testing.assert_allclose(mono, 0.25 * tone, atol=2 / 32768)


def test_reading_resamples_when_asked(tmp_path):
    path = write_audio(tmp_path / "x.wav", _tone(440, 16000, 1.0), 16000)
    wave, rate = read_audio(path, sample_rate=22050)
    assert rate == 22050 and len(wave) == 22050
    assert _peak_hz(wave, rate) == pytest.approx(440, abs=2)


def test_bad_files_are_named(tmp_path):
    text = tmp_path / "notes.wav"
    text.write_text("these are not samples")
    with pytest.raises(DataError, match=r"notes\.wav: not an audio file"):
        read_audio(text)
    with pytest.raises(DataError, match=r"missing\.wav: no such audio file"):
        read_audio(tmp_path / "missing.wav")
    empty = write_audio(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(DataError, match=r"empty\.wav: the file holds no samples"):
        read_audio(empty)
    long = write_audio(tmp_path / "long.wav", np.zeros(32000, np.float32), 16000)
    with pytest.raises(DataError, match=r"long.wav: 2.0 s is longer than the limit of 1 s"):
        read_audio(long, max_seconds=1)
    # a WAV header declaring a sample rate of 0 Hz
    zero = tmp_path / "zero.wav"
    data = np.zeros(100, "<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, 0, 0, 2, 16)
    zero.write_bytes(b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " +
                     struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data)) + data)  # fmt: skip
    with pytest.raises(DataError, match=r"zero\.wav"):
        read_audio(zero)
    with pytest.raises(DataError, match=r"x.aiff: cannot write audio as .aiff"):
        write_audio(tmp_path / "x.aiff", np.zeros(10, np.float32), 16000)
    assert not (tmp_path / "x.aiff").exists()


def test_resampling_keeps_frequencies_and_removes_what_the_new_rate_cannot_hold():
    up = resample(_tone(1000, 16000, 1.0), 16000, 44100)
    assert len(up) == 44100 and _peak_hz(up, 44100) == pytest.approx(1000, abs=2)
    high = _tone(12000, 48000, 1.0)  # above the 8 kHz Nyquist of 16 kHz
    low = resample(high, 48000, 16000)
    assert len(low) == 16000
    assert np.sqrt(np.mean(low[200:-200] ** 2)) < 1e-3 * np.sqrt(np.mean(high**2))


# spectrograms ------------------------------------------------------------------


def test_the_slaney_mel_scale_and_its_inverse():
    assert float(hz_to_mel(1000.0)) == pytest.approx(15.0)
    assert float(hz_to_mel(6400.0)) == pytest.approx(42.0)  # 27 mels per factor 6.4
    assert float(hz_to_mel(200.0)) == pytest.approx(3.0)
    f = np.array([0.0, 50, 999, 1000, 1001, 4000, 8000, 22050])
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(f)), f, atol=1e-6)


def test_the_filterbank_equals_triangles_built_bin_by_bin():
    n_fft, n_mels, rate, f_min, f_max = 512, 20, 16000, 60.0, 7600.0
    fb = mel_filterbank(n_fft, n_mels, rate, f_min, f_max).double().numpy()
    # the same triangles built one bin at a time from the mel edges
    lo_mel, hi_mel = float(hz_to_mel(f_min)), float(hz_to_mel(f_max))
    edges = [float(mel_to_hz(lo_mel + i * (hi_mel - lo_mel) / (n_mels + 1)))
             for i in range(n_mels + 2)]  # fmt: skip
    for m in range(n_mels):
        a, b, c = edges[m], edges[m + 1], edges[m + 2]
        for k in range(n_fft // 2 + 1):
            f = k * rate / n_fft
            w = (f - a) / (b - a) if a <= f <= b else (c - f) / (c - b) if b < f <= c else 0.0
            assert fb[m, k] == pytest.approx(max(w, 0.0) * 2 / (c - a), abs=1e-9)
    # unit area in Hz, for filters wide enough to be sampled well by the bins
    area = fb.sum(1) * rate / n_fft
    np.testing.assert_allclose(area[5:], 1.0, rtol=0.05)


def test_a_tone_lands_in_its_band_and_frames_are_counted():
    spec = MelSpec(n_fft=512, hop=128, n_mels=40)
    wave = torch.from_numpy(_tone(2000, seconds=0.5))
    mel = spec(wave)
    assert mel.shape == (40, spec.frames(len(wave))) == (40, 8000 // 128 + 1)
    band = mel[:, 5:-5].mean(1).argmax().item()
    edges = mel_to_hz(np.linspace(hz_to_mel(0), hz_to_mel(8000), 42))
    assert edges[band] < 2000 < edges[band + 2]
    # batched input gives each row's own spectrogram
    both = spec(torch.stack([wave, torch.zeros_like(wave)]))
    torch.testing.assert_close(both[0], mel)
    assert torch.all(both[1] == math.log(spec.floor))


def _harmonic(seconds: float = 0.5) -> torch.Tensor:
    """A voiced-speech-like test signal: 12 harmonics of a gliding 120-180 Hz F0."""
    t = torch.arange(round(16000 * seconds)) / 16000
    f0 = 120 + 60 * t / seconds
    phase = 2 * math.pi * torch.cumsum(f0, 0) / 16000
    return sum(torch.sin(k * phase) / k for k in range(1, 13)) * 0.3


def _spectral_convergence(spec: MelSpec, wave: torch.Tensor, target: torch.Tensor) -> float:
    mag = spec.magnitude(wave)
    return float(torch.linalg.norm(mag - target) / torch.linalg.norm(target))


def test_griffin_lim_recovers_a_waveform_with_the_asked_magnitude():
    spec = MelSpec(n_fft=512, hop=128)
    wave = _harmonic()
    target = spec.magnitude(wave)
    random_phase = griffin_lim(target, 512, 128, len(wave), iters=0)
    plain = griffin_lim(target, 512, 128, len(wave), iters=32, momentum=0.0)
    fast = griffin_lim(target, 512, 128, len(wave), iters=32)
    sc = [_spectral_convergence(spec, w, target) for w in (random_phase, plain, fast)]
    assert sc[0] > 0.3 and sc[1] < 0.6 * sc[0] and sc[2] < 0.8 * sc[1]
    assert sc[2] < 0.2
    # seeded: the same seed, the same waveform
    torch.testing.assert_close(fast, griffin_lim(target, 512, 128, len(wave), iters=32))


def test_log_mel_back_to_a_waveform_keeps_its_mel_spectrogram():
    spec = MelSpec(n_fft=512, hop=128, n_mels=64)
    wave = _harmonic()
    mel = spec(wave)
    back = spec.to_wave(mel, len(wave), iters=64)
    assert back.shape == wave.shape
    # the round trip is judged where the sound is: within 1 nat on loud bands
    loud = mel > mel.max() - 6
    assert (spec(back) - mel)[loud].abs().mean() < 0.5


# SI-SDR --------------------------------------------------------------------------


def test_si_sdr_by_hand_and_its_invariances():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=4000)
    ref -= ref.mean()
    noise = rng.normal(size=4000)
    noise -= noise.mean()
    noise -= (noise @ ref) / (ref @ ref) * ref  # orthogonal to the reference
    est = 0.7 * ref + 0.1 * noise
    by_hand = 10 * math.log10((0.7**2 * (ref @ ref)) / (0.1**2 * (noise @ noise)))
    assert float(si_sdr(est, ref)) == pytest.approx(by_hand, abs=1e-6)
    assert float(si_sdr(5.0 * est + 3.0, ref)) == pytest.approx(by_hand, abs=1e-6)
    batch = si_sdr(np.stack([est, ref, -ref]), np.stack([ref, ref, ref]))
    assert batch.shape == (3,) and batch[0] == pytest.approx(by_hand, abs=1e-6)
    assert batch[1] > 60 and batch[2] > 60  # a flipped sign is a scale of -1
    with pytest.raises(ValueError, match="differ"):
        si_sdr(np.zeros(10), np.zeros(11))


# spoken digits ----------------------------------------------------------------------

needs_flite = pytest.mark.skipif(
    shutil.which("flite") is None,
    reason="flite is not installed; `make test` installs Debian's (apt-get install flite)",
)


@needs_flite
def test_flite_speaks_each_voice_at_its_rate_and_pitch():
    from aigc.data.speech import SAMPLE_RATE, synthesise, trim_silence

    slow = trim_silence(synthesise("seven", "slt", rate=1.25))
    fast = trim_silence(synthesise("seven", "slt", rate=0.8))
    assert len(slow) > 1.3 * len(fast)
    for voice in ("kal16", "rms"):
        low = synthesise("nine", voice, pitch=0.84)
        high = synthesise("nine", voice, pitch=1.19)
        # the F0 (strongest autocorrelation lag in 60-400 Hz) rises with the factor
        f0 = [_f0(w, SAMPLE_RATE) for w in (low, high)]
        assert f0[1] > 1.2 * f0[0], (voice, f0)
    with pytest.raises(DataError, match="voice 'kal'"):
        synthesise("one", "kal")


def _f0(wave: np.ndarray, rate: int) -> float:
    lags = []
    for i in range(0, len(wave) - 640, 320):
        frame = wave[i : i + 640] - wave[i : i + 640].mean()
        if np.abs(frame).max() < 0.2 * np.abs(wave).max():
            continue
        ac = np.correlate(frame, frame, "full")[639:]
        lo, hi = rate // 400, rate // 60
        lags.append(lo + int(np.argmax(ac[lo:hi])))
    return rate / float(np.median(lags))


@needs_flite
def test_spoken_digits_are_one_second_labelled_and_split_by_voice():
    from aigc.data.speech import DIGITS, SAMPLE_RATE, VOICES, spoken_digits

    sd = spoken_digits(voices=("kal16", "slt"), rates=(0.9, 1.1), pitches=(1.0,))
    assert sd.waves.shape == (len(DIGITS) * 2 * 2, SAMPLE_RATE)
    assert np.abs(sd.waves).max() == pytest.approx(0.9, abs=1e-6)
    assert sorted(set(sd.digit.tolist())) == list(range(10))
    # every clip is distinct and deterministic
    again = spoken_digits(voices=("kal16", "slt"), rates=(0.9, 1.1), pitches=(1.0,))
    np.testing.assert_array_equal(sd.waves, again.waves)
    assert len({w.tobytes() for w in sd.waves}) == len(sd)
    train, held = sd.split(("slt",))
    assert set(train.voice.tolist()) == {VOICES.index("kal16")}
    assert set(held.voice.tolist()) == {VOICES.index("slt")} and len(held) == 20
    with pytest.raises(DataError, match="held-out voice 'bob'"):
        sd.split(("bob",))


# the audio judge ---------------------------------------------------------------------


def _tone_set(n_per_class: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Two classes a judge can tell apart: low (300-400 Hz) and high (2-3 kHz) tones."""
    rng = np.random.default_rng(0)
    waves, labels = [], []
    for label, (lo, hi) in enumerate([(300, 400), (2000, 3000)]):
        for _ in range(n_per_class):
            tone = _tone(rng.uniform(lo, hi), seconds=0.25, amp=rng.uniform(0.1, 0.9))
            waves.append(tone)
            labels.append(label)
    return np.stack(waves), np.asarray(labels)


def test_the_judge_input_ignores_loudness_and_keeps_sixty_decibels():
    from aigc.metrics.audio_classifier import judge_input

    wave = _harmonic()
    x = judge_input(wave[None])
    assert x.shape[:2] == (1, 1) and x.max() == pytest.approx(1.0)
    assert x.min() >= -1.0 - 1e-6
    torch.testing.assert_close(judge_input(0.01 * wave[None]), x, atol=1e-4, rtol=0)


def test_a_judge_learns_held_out_classes_and_is_cached(tmp_path, monkeypatch):
    from aigc.metrics.audio_classifier import cached_audio_judge, train_audio_judge

    monkeypatch.setenv("AIGC_CACHE_DIR", str(tmp_path))
    waves, labels = _tone_set()
    held = np.arange(len(waves)) % 4 == 0
    args = (waves, {"band": labels}, {"band": ["low", "high"]}, held)
    judge = train_audio_judge(*args, steps=40, batch_size=8)
    assert judge.accuracy["band"] == 1.0 and judge.heldout == int(held.sum())
    assert torch.equal(judge.predict(waves)["band"], torch.from_numpy(labels))
    assert judge.features(waves).shape == (len(waves), judge.model.feature_dim)
    probs = judge.probabilities(waves, "band")
    torch.testing.assert_close(probs.sum(1), torch.ones(len(waves)))
    # seeded: the same clips, the same weights
    again = train_audio_judge(*args, steps=40, batch_size=8)
    for a, b in zip(judge.model.parameters(), again.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    first = cached_audio_judge("tones", *args, steps=40, batch_size=8)
    assert len(list((tmp_path / "classifiers").glob("audio-*.safetensors"))) == 1
    import aigc.metrics.audio_classifier as module

    def no_training(*a, **k):
        raise AssertionError("the cached judge was trained again")

    monkeypatch.setattr(module, "train_audio_judge", no_training)
    second = cached_audio_judge("tones", *args, steps=40, batch_size=8)
    torch.testing.assert_close(first.features(waves), second.features(waves))
    assert second.accuracy == first.accuracy and second.heldout == first.heldout


# noisy speech --------------------------------------------------------------------------


def test_noises_have_their_spectra_and_mixing_hits_the_asked_snr():
    from aigc.data.noisy_speech import make_noise, mix_at_snr

    n = 32000
    f = np.fft.rfftfreq(n, 1 / 16000)
    slopes = {}
    for kind in ("white", "pink", "brown"):
        x = make_noise(kind, n, seed=3)
        assert np.sqrt(np.mean(x.astype(np.float64) ** 2)) == pytest.approx(1.0, rel=1e-4)
        power = np.abs(np.fft.rfft(x)) ** 2
        band = (f > 50) & (f < 5000)
        slopes[kind] = np.polyfit(np.log(f[band]), np.log(power[band] + 1e-20), 1)[0]
        np.testing.assert_array_equal(x, make_noise(kind, n, seed=3))
    assert slopes["white"] == pytest.approx(0, abs=0.1)
    assert slopes["pink"] == pytest.approx(-1, abs=0.1)
    assert slopes["brown"] == pytest.approx(-2, abs=0.1)
    hum = make_noise("hum", n, seed=1)
    assert min(abs(_peak_hz(hum, 16000) - 50), abs(_peak_hz(hum, 16000) - 60)) < 1
    clean = _tone(440, seconds=2.0)
    noise = make_noise("music", n, seed=2)
    for snr in (0.0, 7.5, 20.0):
        mixed = mix_at_snr(clean, noise, snr)
        residual = (mixed - clean).astype(np.float64)
        measured = 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(residual**2))
        assert measured == pytest.approx(snr, abs=1e-3)
    with pytest.raises(DataError, match="silent"):
        mix_at_snr(np.zeros(n, np.float32), noise, 5.0)
    with pytest.raises(DataError, match="noise 'rain'"):
        make_noise("rain", n, 0)


@needs_flite
def test_noisy_speech_is_seeded_balanced_and_keeps_its_clean_reference():
    from aigc.data.noisy_speech import NOISES, TEST_SNRS, noisy_speech, sentences

    assert len(sentences()) > 100
    a = noisy_speech(6, seed=5, voices=("kal16",), snrs=TEST_SNRS, seconds=0.5)
    b = noisy_speech(6, seed=5, voices=("kal16",), snrs=TEST_SNRS, seconds=0.5)
    np.testing.assert_array_equal(a.noisy, b.noisy)
    assert a.noisy.shape == a.clean.shape == (6, 8000)
    assert sorted(a.noise.tolist()) == list(range(len(NOISES)))
    assert set(a.snr.tolist()) <= set(TEST_SNRS) and np.abs(a.noisy).max() <= 0.9 + 1e-6
    for row in range(6):  # the clean part is the reference the mixture's SNR is about
        residual = (a.noisy[row] - a.clean[row]).astype(np.float64)
        snr = 10 * np.log10(np.mean(a.clean[row].astype(np.float64) ** 2) / np.mean(residual**2))
        assert snr == pytest.approx(a.snr[row], abs=0.01)


# alignment -------------------------------------------------------------------


def _dtw_cost_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """The least summed distance of a warping path, cell by cell (no vectorisation)."""
    cost = np.linalg.norm(x[:, None] - y[None], axis=-1)
    total = np.full(cost.shape, np.inf)
    for i in range(len(x)):
        for j in range(len(y)):
            before = [total[a, b] for a, b in ((i - 1, j - 1), (i - 1, j), (i, j - 1))
                      if a >= 0 and b >= 0]  # fmt: skip
            total[i, j] = cost[i, j] + (min(before) if before else 0.0)
    return float(total[-1, -1])


def test_dtw_finds_the_cheapest_warping_path():
    from aigc.data.audio import dtw_path

    rng = np.random.default_rng(0)
    for _ in range(25):
        x = rng.normal(size=(int(rng.integers(1, 12)), 3))
        y = rng.normal(size=(int(rng.integers(1, 12)), 3))
        path = dtw_path(x, y)
        assert tuple(path[0]) == (0, 0) and tuple(path[-1]) == (len(x) - 1, len(y) - 1)
        steps = np.diff(path, axis=0)
        assert {tuple(s) for s in steps} <= {(1, 0), (0, 1), (1, 1)}
        cost = np.linalg.norm(x[path[:, 0]] - y[path[:, 1]], axis=-1).sum()
        assert cost == pytest.approx(_dtw_cost_by_hand(x, y), rel=1e-9)
    # a sequence against itself slowed down: each frame meets its own copies
    x = rng.normal(size=(20, 4))
    path = dtw_path(x, np.repeat(x, 3, axis=0))
    assert np.array_equal(path[:, 0], np.arange(60) // 3) and np.array_equal(
        path[:, 1], np.arange(60)
    )


def test_mel_cepstra_drop_loudness_and_a_fixed_colouring():
    from scipy.fft import dct

    from aigc.data.audio import mfcc

    log_mel = torch.randn(2, 64, 30, dtype=torch.float64)
    c = mfcc(log_mel)
    assert c.shape == (2, 30, 12)
    direct = dct(log_mel.numpy(), type=2, axis=1, norm="ortho")[:, 1:13].transpose(0, 2, 1)
    np.testing.assert_allclose(c, direct - direct.mean(1, keepdims=True), atol=1e-12)
    # louder (a constant on every log-mel cell) or coloured (a constant per band): the same
    colour = torch.linspace(-2, 2, 64, dtype=torch.float64)[:, None]
    np.testing.assert_allclose(mfcc(log_mel + 3.0 + colour), c, atol=1e-9)
