"""Speech denoising: the loss against an independent SI-SDR, mixtures made on the fly
as the task says, the metrics against their packages, files of any length and rate
through the pipeline and the CLI, and bad input named."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from .conftest import ROOT, run_cli

RECIPE = ROOT / "configs" / "denoise-speech.yaml"
TINY = ["model.width=16", "model.blocks=1", "data.val_mixtures=12", "data.limit_sentences=6",
        "train.batch_size=4", "train.eval_every=0", "train.sample_every=2",
        "train.checkpoint_every=2", "data.eval_pesq=false"]  # fmt: skip

needs_flite = pytest.mark.skipif(shutil.which("flite") is None,
                                 reason="flite is missing: `make system` installs it")  # fmt: skip


def test_the_loss_is_minus_the_si_sdr_of_the_metric():
    from aigc.metrics.audio import si_sdr
    from aigc.models.denoiser import si_sdr_loss

    g = torch.Generator().manual_seed(0)
    clean = torch.randn(3, 4000, generator=g, dtype=torch.float64)
    est = 0.5 * clean + 0.1 * torch.randn(3, 4000, generator=g, dtype=torch.float64)
    want = float(np.mean(si_sdr(est.numpy(), clean.numpy())))
    assert float(si_sdr_loss(est, clean)) == pytest.approx(-want, abs=1e-6)


def _model(recurrent: bool):
    from aigc.models.denoiser import DenoiserConfig, MaskDenoiser

    torch.manual_seed(0)
    return MaskDenoiser(DenoiserConfig(width=16, blocks=2, recurrent=recurrent)).eval()


def test_a_mask_of_one_returns_the_input_and_the_mask_stays_in_range():
    """The STFT and its inverse with the noisy phase: a gain of 1 everywhere gives the
    input back; the network's gain lies in [min_gain, 1]."""
    model = _model(False)
    x = torch.randn(2, 8000)
    spec = model.stft(x)
    back = torch.istft(spec, 512, 128, window=model.window, length=8000)
    assert torch.allclose(back, x, atol=1e-5)
    with torch.no_grad():
        m = model.mask(spec)
    assert m.shape == spec.shape and float(m.min()) >= 0 and float(m.max()) <= 1


class _Stub:
    """A pipeline around a model without a run: enough for ``enhance``."""

    def __init__(self, model):
        from aigc.pipelines.denoise import DenoisePipeline

        self.pipe = DenoisePipeline.__new__(DenoisePipeline)
        self.pipe.model, self.pipe.device = model, torch.device("cpu")
        self.pipe.config = type("C", (), {"model": model.cfg})()


def test_long_files_go_through_in_chunks_that_match_one_pass():
    """Without the GRU the model only sees about a third of a second around each
    frame, so chunks of 10 s overlapping by 1 s, cross-faded, give what one pass over
    the whole 25 s gives."""
    model = _model(False)
    wave = (np.random.default_rng(0).standard_normal(25 * 16000) * 0.1).astype(np.float32)
    chunked = _Stub(model).pipe.enhance(wave)
    with torch.no_grad():
        whole = model.enhance(torch.from_numpy(wave)[None])[0].numpy()
    assert chunked.shape == wave.shape
    assert np.abs(chunked - whole)[2000:-2000].max() < 1e-4


@pytest.fixture(scope="module")
def denoise_run(tmp_path_factory):
    if shutil.which("flite") is None:
        pytest.skip("flite is missing: `make system` installs it")
    import aigc

    run = tmp_path_factory.mktemp("denoise") / "run"
    aigc.train(RECIPE, [*TINY, "train.max_steps=2"], run_dir=run, progress=False)
    return run


@needs_flite
def test_mixtures_are_made_from_the_step_and_keep_the_training_snrs(denoise_run):
    """A batch is a pure function of the step; each noisy row is its clean row plus
    noise at one of 0/5/10/15 dB; held-out sentences are never in training."""
    import json

    from aigc.config import load_config
    from aigc.runs import RunDir
    from aigc.tasks import get_task
    from aigc.training import run_config

    cfg = run_config(RunDir(denoise_run))
    task = get_task("denoise").open(cfg, RunDir(denoise_run))
    a, b = task.train_batch(5, 0, 0, 1), task.train_batch(5, 0, 0, 1)
    assert torch.equal(a["noisy"], b["noisy"]) and not torch.equal(
        a["noisy"], task.train_batch(6, 0, 0, 1)["noisy"]
    )
    clean, noise = a["clean"].double(), (a["noisy"] - a["clean"]).double()
    snr = 10 * torch.log10(clean.square().mean(1) / noise.square().mean(1))
    assert all(min(abs(s - t) for t in (0, 5, 10, 15)) < 0.05 for s in snr.tolist())
    meta = json.loads((denoise_run / "data" / "noisy_speech.json").read_text())
    assert meta["train_sentences"] == 6 and meta["val_sentences"] == 28
    assert load_config(cfg.to_dict()).family == "denoise"


@needs_flite
def test_evaluation_matches_the_metric_packages(denoise_run):
    """The reported means are those of pystoi and our SI-SDR over the held-out clips,
    per noise kind, for the denoised speech and the noisy input."""
    from pystoi import stoi

    import aigc
    from aigc.data.noisy_speech import NOISES
    from aigc.metrics.audio import si_sdr

    pipe = aigc.load(denoise_run)
    result = pipe.evaluate(save=False)
    d = denoise_run / "data"
    clean = np.load(d / "val_clean.npy").astype(np.float32) / 32767
    noisy = np.load(d / "val_noisy.npy").astype(np.float32) / 32767
    kinds = np.load(d / "val_kind.npy")
    with torch.no_grad():
        out = pipe.model.enhance(torch.from_numpy(noisy)).numpy()
    k = NOISES.index("babble")
    rows = np.nonzero(kinds == k)[0]
    assert result["si_sdr/babble"] == pytest.approx(np.mean(si_sdr(out[rows], clean[rows])),
                                                    abs=1e-3)  # fmt: skip
    want = np.mean([stoi(clean[r], noisy[r], 16000) for r in rows])
    assert result["stoi_noisy/babble"] == pytest.approx(want, abs=1e-6)
    assert "pesq" not in result  # data.eval_pesq=false
    assert "babble" in pipe.format_eval(result)


@needs_flite
def test_denoising_a_file_of_another_rate_from_the_command_line(denoise_run, tmp_path):
    from aigc.data.audio import read_audio, write_audio

    t = np.arange(int(2.5 * 44100)) / 44100
    wave = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    write_audio(tmp_path / "in.flac", np.stack([wave, wave]), 44100)  # stereo, 44.1 kHz
    r = run_cli("denoise", str(denoise_run), "--audio", str(tmp_path / "in.flac"), "--out",
                str(tmp_path / "out.wav"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "x real time" in r.stdout
    back, rate = read_audio(tmp_path / "out.wav")
    assert rate == 44100 and len(back) == len(wave)
    write_audio(tmp_path / "silent.wav", np.zeros(16000, np.float32), 16000)
    (tmp_path / "notes.wav").write_text("not audio")
    for args, message in (
        (["--audio", str(tmp_path / "silent.wav")], "silent"),
        (["--audio", str(tmp_path / "notes.wav")], "not an audio file"),
        (["--audio", str(tmp_path / "in.flac"), "--out", str(tmp_path / "o.txt")], "write .wav"),
    ):
        r = run_cli("denoise", str(denoise_run), *args)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert len(r.stderr.splitlines()) <= 2


@needs_flite
def test_the_pipeline_takes_bytes_and_arrays_and_refuses_bad_ones(denoise_run, tmp_path):
    import io

    import soundfile as sf

    import aigc
    from aigc.errors import RequestError

    pipe = aigc.load(denoise_run)
    wave = (np.random.default_rng(1).standard_normal(8000) * 0.1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, wave, 8000, format="WAV")
    from_bytes = pipe.denoise(buf.getvalue())
    from_array = pipe.denoise(wave, sample_rate=8000)
    assert from_bytes.sample_rate == from_array.sample_rate == 8000
    assert np.allclose(from_bytes.waveforms[0], from_array.waveforms[0], atol=1e-3)
    for audio, kw, message in ((wave, {}, "needs its sample_rate"),
                               (wave, {"sample_rate": 0}, "sample rate is 0"),
                               (b"nonsense", {}, "not audio"),
                               (wave, {"sample_rate": 8000, "max_seconds": 0.5}, "longer than"),
                               (np.full(10, np.nan), {"sample_rate": 8000}, "NaN")):  # fmt: skip
        with pytest.raises(RequestError, match=message):
            pipe.denoise(audio, **kw)


@needs_flite
def test_the_server_denoises_an_uploaded_file(denoise_run):
    import io

    import httpx
    import soundfile as sf

    import aigc
    from aigc.serve.app import create_app
    from aigc.serve.settings import ServeSettings

    from .test_serve import SETTINGS, Server

    srv = Server(
        create_app([denoise_run], ServeSettings(**{**SETTINGS, "max_body_bytes": 1 << 20}))
    )
    try:
        wave = (np.random.default_rng(2).standard_normal(12000) * 0.1).astype(np.float32)
        buf = io.BytesIO()
        sf.write(buf, wave, 22050, format="FLAC")
        url = f"{srv.url}/v1/audio/denoise"
        r = httpx.post(url, data={"model": "run"}, files={"file": ("n.flac", buf.getvalue())},
                       timeout=30)  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
        got, rate = sf.read(io.BytesIO(r.content), dtype="float32")
        want = aigc.load(denoise_run).denoise(buf.getvalue()).waveforms[0]
        assert rate == 22050 and np.abs(got - want).max() < 2 / 32767
        for data, files, message in (
            ({"model": "run"}, {"file": ("n.txt", b"not audio")}, "not audio"),
            ({"model": "run", "response_format": "mp3"}, {"file": ("n.flac", buf.getvalue())},
             "wav or flac"),
            ({"model": "nope"}, {"file": ("n.flac", buf.getvalue())}, "does not exist"),
            ({"model": "run", "voice": "x"}, {"file": ("n.flac", buf.getvalue())}, "not a field"),
            ({"model": "run"}, {}, "file field named file"),
        ):  # fmt: skip
            r = httpx.post(url, data=data, files=files or None, timeout=30)
            assert 400 <= r.status_code < 500 and message in r.json()["error"]["message"], r.text
    finally:
        srv.close()
