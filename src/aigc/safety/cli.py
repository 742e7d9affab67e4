"""`aigc detect`: is this text (or image) watermarked with a key, or generated at all?

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
) -> None:
    """Is a text watermarked with this key? Prints z, the p-value and the green fraction
    (Kirchenbauer et al.'s z-test over the distinct (context + token) n-grams). Without a
    key, --run scores the text zero-shot (Fast-DetectGPT's curvature under that run)."""
    from aigc.safety.text_watermark import detect_text

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
