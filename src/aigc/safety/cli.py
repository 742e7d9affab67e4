"""`aigc detect`: is this text (or image, or sound) watermarked with a key, or generated at all?
`aigc train-detector`: trains the real-vs-generated image detector `detect --detector` uses.

Only Typer is imported here; torch loads when the command runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from aigc.errors import RequestError


def _zero_shot(body: str, run: Path, as_json: bool) -> None:
    """Fast-DetectGPT's criterion of the text under the run, placed among 200 windows of
    the run's held-out human text of the same token count."""
    import aigc
    from aigc.safety.zero_shot import curvature, human_reference

    pipe = aigc.load(run)
    if pipe.kind != "text":
        raise RequestError(f"--run {run} is a {pipe.kind} run; zero-shot scoring needs a text run")
    score = curvature(pipe, body)
    human = human_reference(pipe, score.tokens)
    above = float((human >= score.score).mean())  # share of human windows scoring as high
    if as_json:
        typer.echo(json.dumps({"curvature": score.score, "tokens": score.tokens,
                               "human_share_at_or_above": above,
                               "human_windows": len(human)}))  # fmt: skip
        return
    typer.echo(f"curvature {score.score:.2f} over {score.tokens} tokens (Fast-DetectGPT under "
               f"{run}); {above:.1%} of {len(human)} held-out human windows of that length "
               "score as high")  # fmt: skip
    typer.echo("  high curvature suggests text this run (or one like it) generated; it is a "
               "score, not a proof")  # fmt: skip


def read_key(key: str | None, key_file: Path | None) -> str:
    """The watermark key from --key or --key-file (one of them, not empty)."""
    if (key is None) == (key_file is None):
        raise RequestError(
            "give the watermark key with --key or --key-file (one of them), or only --run "
            "to score the text zero-shot"
        )
    if key_file is not None:
        try:
            key = key_file.read_text(encoding="utf-8").strip("\r\n")
        except FileNotFoundError:
            raise RequestError(f"--key-file {key_file}: missing (no such file)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise RequestError(f"--key-file {key_file}: cannot read it ({e})") from None
    if not key or not key.strip():
        raise RequestError("the watermark key is empty")
    return key


def _read_text(text: str | None, file: Path | None) -> str:
    if (text is None) == (file is None):
        raise RequestError("give the text to check with --text or --file (one of them)")
    if file is None:
        return text  # type: ignore[return-value]
    try:
        return file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RequestError(f"--file {file}: missing (no such file)") from None
    except UnicodeDecodeError:
        raise RequestError(f"--file {file}: not UTF-8 text") from None
    except OSError as e:
        raise RequestError(f"--file {file}: cannot read it ({e.strerror})") from None


def _image_watermark(image: Path, key: str, as_json: bool) -> None:
    """--image with a key: the image watermark's detector (aigc.safety.image_watermark)."""
    try:
        from aigc.safety.image_watermark import detect_image
    except ImportError:
        raise RequestError("image watermarks are not available in this aigc; without --key, "
                           "--detector DIR judges whether an image is generated") from None  # fmt: skip
    from PIL import Image

    if not image.is_file():
        raise RequestError(f"--image {image}: no such file")
    try:
        img = Image.open(image, formats=("PNG", "JPEG", "WEBP", "BMP", "GIF"))
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(f"--image {image} is not an image aigc reads: {e}") from None
    verdict = detect_image(img, key)
    if as_json:
        typer.echo(json.dumps(verdict.to_dict()))
        return
    said = "watermarked" if verdict.marked else "not watermarked with this key"
    typer.echo(f"{said}: z {verdict.z:.2f} (threshold {verdict.threshold:.2f}), p-value "
               f"{verdict.p_value:.2g}")  # fmt: skip


def _audio_watermark(audio: Path, key: str, as_json: bool) -> None:
    """--audio with a key: the audio watermark's detector (aigc.safety.audio_watermark)."""
    from aigc.data.audio import read_audio
    from aigc.errors import DataError
    from aigc.safety.audio_watermark import detect_audio

    try:
        wave, rate = read_audio(audio, max_seconds=3600)
    except DataError as e:
        raise RequestError(f"--audio: {e}") from None
    verdict = detect_audio(wave, rate, key)
    if as_json:
        typer.echo(json.dumps(verdict.to_dict()))
        return
    said = "watermarked" if verdict.marked else "not watermarked with this key"
    typer.echo(f"{said}: z {verdict.z:.2f} (threshold {verdict.threshold:.2f}), p-value "
               f"{verdict.p_value:.2g}, {verdict.seconds:.1f} s of sound")  # fmt: skip


def _image_detector(image: Path, detector: Path, as_json: bool) -> None:
    """--image with --detector: the probability that a real-vs-generated classifier
    gives the image."""
    from aigc.safety.image_detector import THRESHOLD, load_detector, read_image

    det = load_detector(detector)
    p = float(det.score(read_image(image, det))[0])
    gen, val = det.info["generator"], det.info["validation"]
    if as_json:
        typer.echo(json.dumps({"probability_generated": p, "generated": p >= THRESHOLD,
                               "threshold": THRESHOLD, "detector": str(detector),
                               "generator": gen, "validation": val}))  # fmt: skip
        return
    verdict = "generated" if p >= THRESHOLD else "real"
    typer.echo(f"{verdict}: probability generated {p:.3f} (threshold {THRESHOLD:g})")
    typer.echo(f"  detector {detector}, trained against {gen.get('name')} at step "
               f"{gen.get('step')}; held-out accuracy {val['accuracy']:.1%}, average precision "
               f"{val['average_precision']:.3f}. A score, not a proof: images of other "
               "generators may score lower")  # fmt: skip


def detect_command(
    key: Annotated[str | None, typer.Option(help="The watermark's secret key.")] = None,
    key_file: Annotated[Path | None, typer.Option(help="A file holding the key.")] = None,
    text: Annotated[str | None, typer.Option(help="The text to check.")] = None,
    file: Annotated[Path | None, typer.Option(help="A UTF-8 text file to check.")] = None,
    run: Annotated[
        Path | None,
        typer.Option(
            help="The run that wrote it: its tokens are scored (needed for BPE "
            "runs; character runs are scored by characters without it)."
        ),
    ] = None,
    threshold: Annotated[
        float, typer.Option(help="z at or above it says 'watermarked' (4: FPR 3e-5).")
    ] = 4.0,
    show: Annotated[
        bool, typer.Option(help="Print the text with green tokens in [brackets].")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the verdict as JSON.")] = False,
    image: Annotated[
        Path | None,
        typer.Option(
            help="An image to check: with --detector, is it generated; with "
            "--key/--key-file, is it watermarked."
        ),
    ] = None,
    detector: Annotated[
        Path | None,
        typer.Option(help="A detector folder (aigc train-detector) to judge --image with."),
    ] = None,
    audio: Annotated[
        Path | None,
        typer.Option(help="A sound file (.wav, .flac, ...) to check for the key's watermark."),
    ] = None,
) -> None:
    """Is a text watermarked with this key? Prints z, the p-value and the green fraction
    (Kirchenbauer et al.'s z-test over the distinct (context + token) n-grams). Without a
    key, --run scores the text zero-shot (Fast-DetectGPT's curvature under that run).
    --image FILE --detector DIR prints the probability that the image is generated;
    --audio FILE with a key, whether the sound is watermarked."""
    from aigc.safety.text_watermark import detect_text

    if audio is not None:
        if (text is not None or file is not None or run is not None or show
                or image is not None or detector is not None):  # fmt: skip
            raise RequestError("--audio takes only --key/--key-file and --json")
        if key is None and key_file is None:
            raise RequestError("--audio needs --key/--key-file: is the sound watermarked "
                               "with that key?")  # fmt: skip
        _audio_watermark(audio, read_key(key, key_file), as_json)
        return

    if image is not None or detector is not None:
        if image is None:
            raise RequestError("--detector judges an image: give it with --image FILE")
        if text is not None or file is not None or run is not None or show:
            raise RequestError("--image takes no --text, --file, --run or --show")
        if key is not None or key_file is not None:
            if detector is not None:
                raise RequestError("give --key/--key-file (a watermark) or --detector (a "
                                   "classifier) with --image, not both")  # fmt: skip
            _image_watermark(image, read_key(key, key_file), as_json)
        elif detector is None:
            raise RequestError("--image needs --detector DIR (is it generated?) or --key/"
                               "--key-file (is it watermarked?)")  # fmt: skip
        else:
            _image_detector(image, detector, as_json)
        return

    if run is not None and not run.is_dir():
        raise RequestError(f"--run {run}: no such run folder")
    if key is None and key_file is None and run is not None:
        _zero_shot(_read_text(text, file), run, as_json)
        return
    secret = read_key(key, key_file)
    body = _read_text(text, file)
    score = detect_text(body, secret, run=run, threshold=threshold)
    if as_json:
        out = score.to_dict()
        out["tokens_scored"] = [[t, m] for t, m in score.token_marks]
        typer.echo(json.dumps(out))
        return
    verdict = "watermarked" if score.watermarked else "not watermarked with this key"
    sign = ">=" if score.watermarked else "<"
    typer.echo(f"{verdict}: z {score.z:.2f} {sign} {threshold:g}, p-value {score.p_value:.2g}")
    typer.echo(
        f"  {score.green} of {score.scored} scored tokens green ({score.green_fraction:.1%}; "
        f"{score.gamma:.0%} expected without the key), {score.tokens} tokens in the text"
    )
    if show:
        typer.echo("".join(f"[{t}]" if m else t for t, m in score.token_marks))


def train_detector_command(
    run: Annotated[Path, typer.Argument(help="The image run whose samples to detect.")],
    out: Annotated[Path, typer.Option(help="A new folder for the detector.")],
    n: Annotated[
        int, typer.Option(help="Generated images to sample (and real ones to draw).")
    ] = 1000,
    steps: Annotated[int, typer.Option(help="Training steps of 64 images.")] = 400,
    seed: Annotated[int, typer.Option(help="Fixes the samples, the split and the training.")] = 0,
) -> None:
    """Trains a real-vs-generated image detector (CNNDetection-style) against RUN: n of its
    samples against n of its real training images, with blur and JPEG augmentation; a
    fifth of each held out. Use it with `aigc detect --image FILE --detector OUT`."""
    from aigc.safety.image_detector import train_detector

    if not run.is_dir():
        raise RequestError(f"{run}: no such run folder")
    typer.echo(f"sampling {n} images from {run} and training {steps} steps ...")
    report = train_detector(run, out, n=n, steps=steps, seed=seed)
    typer.echo(f"detector written to {out} ({report.seconds:.0f} s)")
    typer.echo(f"  held out {report.n_val['real']} real + {report.n_val['generated']} generated: "
               f"accuracy {report.val_accuracy:.1%}, average precision "
               f"{report.val_average_precision:.3f}")  # fmt: skip
    typer.echo(f"  next: aigc detect --image FILE --detector {out}")
