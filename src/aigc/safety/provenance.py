"""Signed provenance records for generated files.

A record is a JSON manifest: which run made the file (its folder name, step and the
SHA-256 of its weights file), how (seed, labels or prompt, sampler settings), when (UTC),
by which aigc, whether it was watermarked, and the SHA-256 of the decoded content (the
pixels, or the audio samples). The manifest is signed with an Ed25519 key (RFC 8032,
through the ``cryptography`` package) and travels in an envelope with the signature and
the signer's public key: inside a PNG as an iTXt chunk named ``aigc-provenance``, or for
other files in a sidecar ``FILE.provenance.json``.

Verification checks the signature over the manifest (an edited manifest fails), that the
signer is the expected key (when one is given), and that the file's decoded content
still has the recorded digest: changing one pixel fails, while re-encoding losslessly
(another PNG compression, BMP, TIFF, lossless WebP; greyscale written as RGB) passes,
because the digest is of pixels, not of file bytes.

Signed bytes: the manifest as JSON with sorted keys, no spaces, UTF-8 (``canonical``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import UnsupportedAlgorithm

from aigc.errors import RequestError

FORMAT = "aigc-provenance/1"
PNG_KEY = "aigc-provenance"  # the iTXt keyword of an embedded envelope
SIDECAR_SUFFIX = ".provenance.json"
_PIXELS_TAG = b"aigc-pixels/1"
_AUDIO_TAG = b"aigc-audio/1"
_AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".aiff", ".aif")


# ---------------------------------------------------------------------------------------
# Keys


def public_key_path(private_path: str | os.PathLike) -> Path:
    """Where ``aigc keys new`` puts the public key of ``private_path``: key.pem ->
    key.pub.pem (key -> key.pub)."""
    p = Path(private_path)
    stem = p.name[: -len(".pem")] if p.name.endswith(".pem") else p.name
    return p.with_name(stem + ".pub" + (".pem" if p.name.endswith(".pem") else ""))


def new_keys(out: str | os.PathLike, force: bool = False) -> tuple[Path, Path]:
    """A new Ed25519 key pair: the private key at ``out`` (PEM, PKCS#8, unencrypted,
    mode 0600) and the public key beside it (``public_key_path``). RequestError when
    either exists (unless ``force``) or cannot be written. Returns both paths."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path, public_path = Path(out), public_key_path(out)
    if not force:
        for p in (private_path, public_path):
            if p.exists():
                raise RequestError(f"{p} exists; remove it or pass --force to replace it")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())  # fmt: skip
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)  # fmt: skip
    try:
        private_path.parent.mkdir(parents=True, exist_ok=True)
        _write_new(private_path, private_pem, 0o600)
        _write_new(public_path, public_pem, 0o644)
    except OSError as e:
        raise RequestError(f"{out}: cannot write the key there ({e.strerror or e})") from None
    return private_path, public_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Writes through a temporary file created with ``mode`` (a private key is never
    readable by others, not even for an instant), then renames it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)  # the umask may have taken bits away; set exactly these
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_pem(path: str | os.PathLike, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise RequestError(f"{what} {path}: missing (no such file)") from None
    except OSError as e:
        raise RequestError(f"{what} {path}: cannot read it ({e.strerror or e})") from None


def load_private_key(path: str | os.PathLike) -> Any:
    """The Ed25519 private key in a PEM file; RequestError naming the file when it is
    missing, not PEM, encrypted, or another kind of key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = _read_pem(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise RequestError(f"signing key {path} is encrypted; aigc reads unencrypted keys "
                           "(make one with: aigc keys new --out KEY.pem)") from None  # fmt: skip
    except (ValueError, UnsupportedAlgorithm):
        raise RequestError(f"signing key {path} is not a PEM private key; make one with: "
                           "aigc keys new --out KEY.pem") from None  # fmt: skip
    if not isinstance(key, Ed25519PrivateKey):
        raise RequestError(f"signing key {path} is a {type(key).__name__.removeprefix('_')}; "
                           "provenance is signed with Ed25519 (aigc keys new)")  # fmt: skip
    return key


def load_public_key(path: str | os.PathLike) -> Any:
    """The Ed25519 public key in a PEM file (a private key file gives its public half);
    RequestError naming the file when it is missing, not PEM, or another kind of key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    data = _read_pem(path, "public key")
    try:
        if b"PRIVATE KEY" in data:
            key = serialization.load_pem_private_key(data, password=None)
            key = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise RequestError(f"public key {path} is not a PEM Ed25519 key (aigc keys new writes "
                           "one as NAME.pub.pem)") from None  # fmt: skip
    if not isinstance(key, Ed25519PublicKey):
        raise RequestError(f"public key {path} is not an Ed25519 key; provenance is signed "
                           "with Ed25519 (aigc keys new)")  # fmt: skip
    return key


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:120]


def _raw_public(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Any) -> str:
    """A short name of a public key: the first 16 hex digits of SHA-256 of its 32 bytes."""
    return hashlib.sha256(_raw_public(public_key)).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Content digests


def canonical_pixels(image: Any) -> np.ndarray:
    """The pixels a digest is taken of: (H, W, C) uint8 from a PIL image or a uint8 array,
    C = 1 when the image has no colour (R = G = B everywhere), 3 for colour, 4 only when
    some pixel is not opaque; a palette is expanded. 16-bit and float images keep their
    own values and dtype."""
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            array = np.asarray(image)
            return array[..., None]
        array = np.asarray(image.convert("RGBA"))
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise RequestError(f"pixels must be uint8, not {array.dtype}")
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise RequestError(f"an image has shape (H, W[, 1|3|4]), not {array.shape}")
        if array.shape[2] == 1:
            return np.ascontiguousarray(array)
        if array.shape[2] == 3:
            array = np.concatenate([array, np.full((*array.shape[:2], 1), 255, np.uint8)], 2)
    if (array[..., 3] == 255).all():
        array = array[..., :3]
        if (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all():
            array = array[..., :1]
    return np.ascontiguousarray(array)


def pixels_sha256(image: Any) -> str:
    """Hex SHA-256 of an image's canonical pixels (``canonical_pixels``) with their shape
    and type: the same for every lossless encoding of the same picture."""
    array = canonical_pixels(image)
    h, w, c = array.shape
    head = _PIXELS_TAG + f" {h}x{w}x{c} {array.dtype.str}\n".encode()
    return hashlib.sha256(head + array.tobytes()).hexdigest()


def audio_sha256(samples: np.ndarray, sample_rate: int) -> str:
    """Hex SHA-256 of audio samples ((T,) or (T, C), decoded to float64 as soundfile
    gives them) with their rate and shape."""
    x = np.asarray(samples, dtype="<f8")
    x = x[:, None] if x.ndim == 1 else x
    head = _AUDIO_TAG + f" {int(sample_rate)} {x.shape[0]}x{x.shape[1]}\n".encode()
    return hashlib.sha256(head + np.ascontiguousarray(x).tobytes()).hexdigest()


def content_of(path: str | os.PathLike) -> dict[str, Any]:
    """The ``content`` entry of a manifest for a file: kind, size and digest of what it
    decodes to. RequestError when it is neither an image Pillow reads nor audio."""
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"{path}: no such file")
    if path.suffix.lower() in _AUDIO_SUFFIXES:
        import soundfile as sf

        try:
            samples, rate = sf.read(str(path), dtype="float64", always_2d=True)
        except RuntimeError as e:  # soundfile's LibsndfileError
            raise RequestError(
                f"{path} is not audio soundfile can read ({_first_line(e)})"
            ) from None
        return {"kind": "audio", "sample_rate": int(rate), "channels": int(samples.shape[1]),
                "frames": int(samples.shape[0]),
                "samples_sha256": audio_sha256(samples, rate)}  # fmt: skip
    image = _open_image(path)
    array = canonical_pixels(image)
    return {"kind": "image", "width": int(array.shape[1]), "height": int(array.shape[0]),
            "channels": int(array.shape[2]), "pixels_sha256": pixels_sha256(image)}  # fmt: skip


def _open_image(path: Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except UnidentifiedImageError:
        raise RequestError(f"{path} is not an image (nor audio) aigc can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise RequestError(f"{path}: cannot decode it ({_first_line(e)})") from None
    return image


# ---------------------------------------------------------------------------------------
# Manifests and envelopes


def canonical(manifest: dict[str, Any]) -> bytes:
    """The bytes a manifest's signature covers: JSON, sorted keys, no spaces, UTF-8."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False).encode("utf-8")  # fmt: skip


def utc_now() -> str:
    """The time now in UTC, ISO 8601 to the second ("2025-01-31T12:00:00Z")."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_WEIGHTS_DIGESTS: dict[tuple[str, int, float], str] = {}


def run_record(pipeline: Any) -> dict[str, Any]:
    """The ``run`` entry of a manifest for a loaded pipeline: the run folder's name, its
    family, the step loaded, and the SHA-256 of the weights file it came from (the EMA's
    when the run keeps one, as ``aigc.load`` does)."""
    from aigc.runs import file_sha256

    run, step = pipeline.run, int(pipeline.step)
    ckpt = run.checkpoints_dir / f"step-{step:08d}"
    if not ckpt.is_dir():
        ckpt = run.latest_checkpoint() or ckpt
    ema = float(getattr(pipeline.config.train, "ema", 0) or 0) > 0
    weights = ckpt / ("ema.safetensors" if ema and (ckpt / "ema.safetensors").is_file()
                      else "model.safetensors")  # fmt: skip
    record: dict[str, Any] = {"name": run.path.name, "family": pipeline.config.family,
                              "step": step, "checkpoint": ckpt.name,
                              "weights_file": weights.name}  # fmt: skip
    if weights.is_file():
        stat = weights.stat()
        cache_key = (str(weights.resolve()), stat.st_size, stat.st_mtime)
        if cache_key not in _WEIGHTS_DIGESTS:
            _WEIGHTS_DIGESTS[cache_key] = file_sha256(weights)
        record["weights_sha256"] = _WEIGHTS_DIGESTS[cache_key]
    else:
        record["weights_sha256"] = None
    return record


def make_manifest(
    content: dict[str, Any],
    run: dict[str, Any] | None = None,
    request: dict[str, Any] | None = None,
    watermarked: bool = False,
    file_name: str | None = None,
    created: str | None = None,
) -> dict[str, Any]:
    """A manifest: ``content`` (``content_of``), the ``run`` record (``run_record``), the
    ``request`` (seed, labels or prompt, sampler settings: any JSON), whether the content
    carries aigc's watermark, the file's name when signed, and the UTC time."""
    from aigc import __version__

    return {"format": FORMAT, "created": created or utc_now(),
            "generator": {"software": "aigc", "version": __version__},
            "file": file_name, "run": run, "request": request or {},
            "watermarked": bool(watermarked), "content": content}  # fmt: skip


def sign_manifest(manifest: dict[str, Any], private_key: Any) -> dict[str, Any]:
    """The envelope: the manifest with an Ed25519 signature over ``canonical(manifest)``
    and the signer's public key (32 bytes, base64)."""
    signature = private_key.sign(canonical(manifest))
    public = private_key.public_key()
    return {"manifest": manifest,
            "signature": {"algorithm": "Ed25519",
                          "public_key": base64.b64encode(_raw_public(public)).decode("ascii"),
                          "key_id": key_id(public),
                          "value": base64.b64encode(signature).decode("ascii")}}  # fmt: skip


def sign_file(
    path: str | os.PathLike,
    private_key: Any,
    run: dict[str, Any] | None = None,
    request: dict[str, Any] | None = None,
    watermarked: bool = False,
    sidecar: bool | None = None,
) -> Path:
    """Signs a generated file's provenance: the manifest of its decoded content, run,
    request and watermark, embedded in the PNG (an iTXt chunk; the pixels are written
    back unchanged) or, for other files or with ``sidecar=True``, written beside it as
    FILE.provenance.json. Returns the file that holds the envelope."""
    path = Path(path)
    manifest = make_manifest(content_of(path), run, request, watermarked, path.name)
    envelope = sign_manifest(manifest, private_key)
    text = json.dumps(envelope, ensure_ascii=False, indent=1)
    is_png = path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if sidecar or (sidecar is None and not is_png):
        target = sidecar_path(path)
        from aigc.runs import atomic_write_text

        atomic_write_text(target, text + "\n")
        return target
    if not is_png:
        raise RequestError(f"{path} is not a PNG; its provenance can only go in a sidecar")
    _embed_png(path, text)
    return path


def sidecar_path(path: str | os.PathLike) -> Path:
    """FILE.provenance.json beside FILE."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _embed_png(path: Path, text: str) -> None:
    """Rewrites the PNG at ``path`` with ``text`` in an iTXt chunk named PNG_KEY (other
    text chunks kept, an old envelope replaced), through a temporary file."""
    from PIL import Image, PngImagePlugin

    with Image.open(path) as image:
        image.load()
        info = PngImagePlugin.PngInfo()
        for k, v in getattr(image, "text", {}).items():
            if k != PNG_KEY:
                info.add_itxt(k, v)
        info.add_itxt(PNG_KEY, text)
        tmp = path.with_name(f".{path.name}.tmp")
        image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def read_envelope(path: str | os.PathLike, manifest: str | os.PathLike | None = None
                  ) -> tuple[str, str]:  # fmt: skip
    """The envelope's JSON text for a file and where it was found: ``manifest`` when
    given (a manifest file, or a signed PNG whose embedded one to use: the original of a
    re-encoded copy), else the PNG's iTXt chunk, else FILE.provenance.json. RequestError
    when there is none."""
    path = Path(path)
    if manifest is not None:
        try:
            data = Path(manifest).read_bytes()
            if data[:8] == b"\x89PNG\r\n\x1a\n":
                text = getattr(_open_image(Path(manifest)), "text", {}).get(PNG_KEY)
                if text is None:
                    raise RequestError(f"--manifest {manifest}: that PNG holds no manifest")
                return str(text), f"{manifest} (embedded)"
            return data.decode("utf-8"), str(manifest)
        except FileNotFoundError:
            raise RequestError(f"--manifest {manifest}: missing (no such file)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise RequestError(
                f"--manifest {manifest}: cannot read it ({_first_line(e)})"
            ) from None
    if path.suffix.lower() not in _AUDIO_SUFFIXES:
        image = _open_image(path)
        text = getattr(image, "text", {}).get(PNG_KEY)
        if text is not None:
            return str(text), f"{path} (embedded)"
    side = sidecar_path(path)
    if side.is_file():
        try:
            return side.read_text(encoding="utf-8"), str(side)
        except (OSError, UnicodeDecodeError) as e:
            raise RequestError(f"{side}: cannot read it ({_first_line(e)})") from None
    raise RequestError(f"{path} has no provenance manifest: none embedded and no "
                       f"{side.name} beside it (give one with --manifest)")  # fmt: skip


@dataclass
class Verification:
    """The outcome of ``verify_file``: ``valid`` when the signature holds (by the given
    key, if one was given) and the content matches; otherwise ``reasons`` say why.
    ``manifest`` is what the file claims (None when unreadable); ``key_id`` names the
    key that signed it; ``source`` where the manifest was found; ``notes`` are caveats."""

    valid: bool
    reasons: list[str] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    key_id: str | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)


def verify_file(
    path: str | os.PathLike,
    public_key: Any = None,
    manifest: str | os.PathLike | None = None,
) -> Verification:
    """Checks a file's signed provenance: the envelope (``read_envelope``), its Ed25519
    signature, the signer (``public_key``: a key object or a PEM path; None trusts the
    key in the envelope and says so in ``notes``) and the digest of the decoded content.
    RequestError for bad input (no such file, not an image or audio, no manifest, a bad
    key file); a tampered file or manifest gives ``valid=False`` with the reasons."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = Path(path)
    if isinstance(public_key, str | os.PathLike):
        public_key = load_public_key(public_key)
    content = content_of(path)  # bad input before anything else
    text, source = read_envelope(path, manifest)
    out = Verification(valid=False, source=source)
    try:
        envelope = json.loads(text)
        body, sig = envelope["manifest"], envelope["signature"]
        raw_public = base64.b64decode(sig["public_key"], validate=True)
        signature = base64.b64decode(sig["value"], validate=True)
        signer = Ed25519PublicKey.from_public_bytes(raw_public)
        if not isinstance(body, dict):
            raise TypeError("the manifest is not an object")
    except (ValueError, KeyError, TypeError) as e:
        out.reasons.append(f"the provenance envelope is damaged ({_first_line(e)}): it was "
                           "edited or corrupted")  # fmt: skip
        return out
    out.manifest, out.key_id = body, key_id(signer)
    if public_key is not None and _raw_public(public_key) != raw_public:
        out.reasons.append(f"signed by key {out.key_id}, not by the given public key "
                           f"({key_id(public_key)})")  # fmt: skip
    try:
        signer.verify(signature, canonical(body))
    except InvalidSignature:
        out.reasons.append("the signature does not match the manifest: the manifest was "
                           "edited after signing")  # fmt: skip
    except (ValueError, TypeError) as e:  # a manifest that cannot be put in canonical form
        out.reasons.append(f"the manifest cannot be checked ({_first_line(e)})")
    claimed = body.get("content") if isinstance(body.get("content"), dict) else {}
    digest_key = "pixels_sha256" if content["kind"] == "image" else "samples_sha256"
    if claimed.get("kind") != content["kind"]:
        out.reasons.append(f"the manifest describes {claimed.get('kind')!r} content; "
                           f"{path.name} is {content['kind']}")  # fmt: skip
    elif claimed.get(digest_key) != content[digest_key]:
        what = "pixels" if content["kind"] == "image" else "audio samples"
        out.reasons.append(f"the {what} differ from those signed ({digest_key} "
                           f"{content[digest_key][:16]}... vs {str(claimed.get(digest_key))[:16]}"
                           "... signed): the file was changed after signing")  # fmt: skip
    if public_key is None:
        out.notes.append(f"signed by key {out.key_id} (the key in the manifest); give "
                         "--public-key to check that it is the key you trust")  # fmt: skip
    out.valid = not out.reasons
    return out


def sign_outputs(
    pipeline: Any,
    paths: list[Path],
    private_key: Any,
    request: dict[str, Any],
    watermarked: bool,
) -> list[Path]:
    """Signs the files a pipeline's outputs were saved to (``sign_file``), with the
    pipeline's run record and ``request``; each of several files gets its ``index``
    (its place in the batch) in the request."""
    run = run_record(pipeline)
    out = []
    for i, path in enumerate(paths):
        req = dict(request, index=i) if len(paths) > 1 else dict(request)
        out.append(sign_file(path, private_key, run, req, watermarked))
    return out
