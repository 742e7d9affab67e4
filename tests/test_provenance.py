"""Signed provenance of generated files (aigc.safety.provenance): keys, manifests embedded
in PNGs or beside other files, verification that fails on a changed pixel or an edited
manifest and passes after lossless re-encoding, and the CLI's exit codes."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from cryptography.hazmat.primitives import serialization
from PIL import Image, PngImagePlugin

import aigc
from aigc.errors import RequestError
from aigc.runs import file_sha256
from aigc.safety import provenance as pv
from aigc.safety.image_watermark import detect_image

from .conftest import ROOT, run_cli

CGAN = str(ROOT / "configs" / "cgan-digits.yaml")
TINY_GAN = ["model.z_dim=16", "model.g_width=8", "model.d_width=8", "train.batch_size=16",
            "train.max_steps=4", "train.checkpoint_every=0", "train.sample_every=0",
            "train.eval_every=0", "data.eval_metrics=[]"]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    pass


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    return pv.new_keys(tmp_path_factory.mktemp("keys") / "signer.pem")


@pytest.fixture()
def signed_png(tmp_path, keys) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "image.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    pv.sign_file(path, pv.load_private_key(keys[0]), run={"name": "r"},
                 request={"seed": 7, "labels": ["digit=3"]}, watermarked=True)  # fmt: skip
    return path


def _envelope(path: Path) -> dict:
    return json.loads(Image.open(path).text[pv.PNG_KEY])


def test_new_keys_are_a_private_pem_0600_and_its_public_key(tmp_path):
    private, public = pv.new_keys(tmp_path / "k.pem")
    assert public == tmp_path / "k.pub.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in private.read_bytes()
    assert b"BEGIN PUBLIC KEY" in public.read_bytes()
    key = pv.load_private_key(private)
    assert pv.key_id(key.public_key()) == pv.key_id(pv.load_public_key(public))
    with pytest.raises(RequestError, match="exists"):
        pv.new_keys(tmp_path / "k.pem")
    pv.new_keys(tmp_path / "k.pem", force=True)
    assert pv.key_id(pv.load_public_key(public)) != pv.key_id(key.public_key())


def test_a_signed_png_verifies_and_its_signature_checks_independently(signed_png, keys):
    result = pv.verify_file(signed_png, keys[1])
    assert result.valid and not result.reasons and not result.notes
    m = result.manifest
    assert m["format"] == pv.FORMAT and m["request"]["seed"] == 7 and m["watermarked"] is True
    assert m["generator"] == {"software": "aigc", "version": aigc.__version__}
    assert m["created"].endswith("Z") and m["file"] == "image.png"
    # the signature with nothing of ours: the public key and the JSON as documented
    env = _envelope(signed_png)
    public = serialization.load_pem_public_key(keys[1].read_bytes())
    assert base64.b64decode(env["signature"]["public_key"]) == public.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    body = json.dumps(env["manifest"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    public.verify(base64.b64decode(env["signature"]["value"]), body.encode())
    # the pixel digest, by hand: tag, shape, dtype, then the RGB bytes row by row
    pixels = np.asarray(Image.open(signed_png).convert("RGB"))
    digest = hashlib.sha256(b"aigc-pixels/1 32x32x3 |u1\n" + pixels.tobytes()).hexdigest()
    assert m["content"] == {"kind": "image", "width": 32, "height": 32, "channels": 3,
                            "pixels_sha256": digest}  # fmt: skip


def test_changing_one_pixel_fails(signed_png, tmp_path):
    image = Image.open(signed_png)
    pixels = np.array(image.convert("RGB"))
    pixels[5, 9, 1] ^= 1
    info = PngImagePlugin.PngInfo()
    info.add_itxt(pv.PNG_KEY, image.text[pv.PNG_KEY])  # the manifest travels along
    changed = tmp_path / "changed.png"
    Image.fromarray(pixels).save(changed, pnginfo=info)
    result = pv.verify_file(changed)
    assert not result.valid and "pixels differ" in result.reasons[0]


def test_an_edited_manifest_fails(signed_png, tmp_path, keys):
    env = _envelope(signed_png)
    env["manifest"]["request"]["seed"] = 8
    edited = tmp_path / "edited.png"
    info = PngImagePlugin.PngInfo()
    info.add_itxt(pv.PNG_KEY, json.dumps(env))
    Image.open(signed_png).save(edited, pnginfo=info)
    result = pv.verify_file(edited)
    assert not result.valid and "manifest was edited" in " ".join(result.reasons)
    # and a manifest re-signed by someone else is not the trusted key's
    other = pv.new_keys(tmp_path / "other.pem")
    forged = pv.sign_manifest(env["manifest"], pv.load_private_key(other[0]))
    sidecar = tmp_path / "forged.json"
    sidecar.write_text(json.dumps(forged))
    assert pv.verify_file(edited, manifest=sidecar).valid  # self-consistent, but whose?
    result = pv.verify_file(signed_png, keys[1], manifest=sidecar)
    assert not result.valid and "not by the given public key" in result.reasons[0]


@pytest.mark.parametrize("fmt, options", [("png", {"compress_level": 9}), ("bmp", {}),
                                          ("tiff", {"compression": "tiff_lzw"}),
                                          ("webp", {"lossless": True})])  # fmt: skip
def test_lossless_re_encoding_passes(signed_png, tmp_path, keys, fmt, options):
    copy = tmp_path / f"copy.{fmt}"
    Image.open(signed_png).save(copy, **options)  # Pillow drops the text chunk
    with pytest.raises(RequestError, match="no provenance manifest"):
        pv.verify_file(copy)
    assert pv.verify_file(copy, keys[1], manifest=signed_png).valid  # the original's manifest
    sidecar = pv.sidecar_path(copy)
    sidecar.write_text(Image.open(signed_png).text[pv.PNG_KEY])
    assert pv.verify_file(copy, keys[1]).valid
    if fmt != "png":  # lossy re-encoding of the same picture does not pass
        jpeg = tmp_path / "copy.jpg"
        Image.open(signed_png).save(jpeg, quality=95)
        assert not pv.verify_file(jpeg, keys[1], manifest=signed_png).valid


def test_grey_pixels_written_as_rgb_are_the_same_pixels(tmp_path, keys):
    grey = np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)
    path = tmp_path / "grey.png"
    Image.fromarray(grey).save(path)
    pv.sign_file(path, pv.load_private_key(keys[0]))
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.dstack([grey] * 3)).save(rgb)
    assert pv.verify_file(rgb, keys[1], manifest=path).valid
    assert pv.pixels_sha256(grey) == pv.pixels_sha256(np.dstack([grey] * 3))
    assert pv.pixels_sha256(grey) != pv.pixels_sha256(grey.T)


def test_audio_gets_a_sidecar_and_survives_flac(tmp_path, keys):
    wave = (np.sin(np.arange(8000) / 5) * 0.5).astype(np.float32)
    wav = tmp_path / "clip.wav"
    sf.write(wav, wave, 8000, subtype="PCM_16")
    where = pv.sign_file(wav, pv.load_private_key(keys[0]), request={"seed": 1})
    assert where == tmp_path / "clip.wav.provenance.json"
    result = pv.verify_file(wav, keys[1])
    assert result.valid and result.manifest["content"]["kind"] == "audio"
    samples, rate = sf.read(wav, dtype="float64", always_2d=True)
    head = f"aigc-audio/1 {rate} {samples.shape[0]}x{samples.shape[1]}\n".encode()
    digest = hashlib.sha256(head + samples.astype("<f8").tobytes()).hexdigest()
    assert result.manifest["content"]["samples_sha256"] == digest
    flac = tmp_path / "clip.flac"
    sf.write(flac, samples, rate, subtype="PCM_16")
    assert pv.verify_file(flac, keys[1], manifest=where).valid
    samples[100, 0] += 1 / 32768
    sf.write(wav, samples, rate, subtype="PCM_16")
    result = pv.verify_file(wav, keys[1])
    assert not result.valid and "audio samples differ" in result.reasons[0]


@pytest.mark.parametrize(
    "writer, message",
    [
        (lambda p: p.write_text("not a key"), "not a PEM private key"),
        (lambda p: None, "missing"),
    ],
)
def test_bad_signing_keys_are_named(tmp_path, writer, message):
    path = tmp_path / "bad.pem"
    writer(path)
    with pytest.raises(RequestError, match=message):
        pv.load_private_key(path)


# --- the CLI ----------------------------------------------------------------------------


def test_keys_and_verify_cli_exit_codes(signed_png, tmp_path):
    r = run_cli("keys", "new", "--out", str(tmp_path / "cli.pem"))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE((tmp_path / "cli.pem").stat().st_mode) == 0o600
    assert (tmp_path / "cli.pub.pem").is_file() and "key id" in r.stdout
    r = run_cli("keys", "new", "--out", str(tmp_path / "cli.pem"))
    assert r.returncode == 2 and "exists" in r.stderr

    r = run_cli("verify", str(signed_png))
    assert r.returncode == 0, r.stdout + r.stderr
    assert '"seed": 7' in r.stdout and "valid" in r.stdout and "--public-key" in r.stdout
    r = run_cli("verify", str(signed_png), "--public-key", str(tmp_path / "cli.pub.pem"))
    assert r.returncode == 1 and "not by the given public key" in r.stdout

    pixels = np.array(Image.open(signed_png))
    pixels[0, 0, 0] ^= 4
    info = PngImagePlugin.PngInfo()
    info.add_itxt(pv.PNG_KEY, Image.open(signed_png).text[pv.PNG_KEY])
    Image.fromarray(pixels).save(tmp_path / "tampered.png", pnginfo=info)
    r = run_cli("verify", str(tmp_path / "tampered.png"), "--json")
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert out["valid"] is False and "pixels differ" in out["reasons"][0]

    (tmp_path / "text.png").write_text("hello")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    (tmp_path / "junk.pem").write_text("junk")
    for args, message in [
        ((str(tmp_path / "text.png"),), "not an image"),
        ((str(tmp_path / "plain.png"),), "no provenance manifest"),
        ((str(tmp_path / "missing.png"),), "no such file"),
        ((str(signed_png), "--public-key", str(tmp_path / "junk.pem")), "not a PEM"),
        ((str(signed_png), "--public-key", str(tmp_path / "none.pem")), "missing"),
    ]:
        r = run_cli("verify", *args)
        assert r.returncode == 2 and message in r.stderr, (args, r.stdout, r.stderr)
        assert len(r.stderr.strip().splitlines()) <= 2


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("prov-gan") / "run"
    aigc.train(CGAN, TINY_GAN, run_dir=run, progress=False)
    return run


def test_cli_sample_signs_and_marks_each_png(gan_run, keys, tmp_path):
    out = tmp_path / "samples"
    r = run_cli("sample", str(gan_run), "--n", "3", "--seed", "11", "--class", "4", "--out",
                str(out), "--watermark-key", "k", "--sign-key", str(keys[0]))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "signed the provenance of 3 files" in r.stdout
    ckpt = sorted((gan_run / "checkpoints").glob("step-*"))[-1]
    weights = ckpt / ("ema.safetensors" if (ckpt / "ema.safetensors").is_file()
                      else "model.safetensors")  # fmt: skip
    for i, f in enumerate(sorted(out.glob("*.png"))):
        v = pv.verify_file(f, keys[1])
        assert v.valid, v.reasons
        m = v.manifest
        assert m["run"]["name"] == "run" and m["run"]["family"] == "gan"
        assert m["run"]["weights_sha256"] == file_sha256(weights)
        assert m["run"]["checkpoint"] == ckpt.name
        assert m["request"]["seed"] == 11 and m["request"]["labels"] == ["4"]
        assert m["request"]["index"] == i and m["watermarked"] is True
        r = run_cli("verify", str(f), "--public-key", str(keys[1]))
        assert r.returncode == 0, r.stdout
    grid = tmp_path / "grid.png"
    r = run_cli("sample", str(gan_run), "--n", "4", "--out", str(grid), "--sign-key", str(keys[0]))
    assert r.returncode == 0, r.stderr
    v = pv.verify_file(grid, keys[1])
    assert v.valid and v.manifest["watermarked"] is False and "index" not in v.manifest["request"]
    assert not detect_image(Image.open(grid), "k").marked
    (tmp_path / "junk.pem").write_text("junk")
    r = run_cli("sample", str(gan_run), "--n", "2", "--out", str(tmp_path / "x.png"),
                "--sign-key", str(tmp_path / "junk.pem"))  # fmt: skip
    assert r.returncode == 2 and "not a PEM private key" in r.stderr
    assert not (tmp_path / "x.png").exists()  # the key is checked before sampling
