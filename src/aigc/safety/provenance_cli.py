"""`aigc keys new` and `aigc verify`: signing keys and the check of a file's signed
provenance (aigc.safety.provenance).

Only Typer is imported here; cryptography and Pillow load when a command runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

keys_app = typer.Typer(
    help="Ed25519 keys that sign the provenance of generated files.", no_args_is_help=True
)


@keys_app.command("new")
def keys_new(
    out: Annotated[Path, typer.Option(help="Where to write the private key (PEM, mode 0600).")],
    force: Annotated[bool, typer.Option(help="Replace keys already there.")] = False,
) -> None:
    """Makes an Ed25519 key pair: the private key at --out (keep it secret; aigc sample
    --sign-key uses it) and the public key beside it as NAME.pub.pem (give it to whoever
    checks your files with aigc verify --public-key)."""
    from aigc.safety.provenance import key_id, load_public_key, new_keys

    private, public = new_keys(out, force=force)
    typer.echo(f"wrote the private key to {private} (mode 0600; keep it secret)")
    typer.echo(f"wrote the public key to {public} (key id {key_id(load_public_key(public))})")


def verify_command(
    file: Annotated[Path, typer.Argument(help="A generated image (or audio file).")],
    public_key: Annotated[
        Path | None,
        typer.Option(
            help="The signer's public key (PEM); without it the key in the "
            "manifest is trusted and named."
        ),
    ] = None,
    manifest: Annotated[
        Path | None,
        typer.Option(
            help="A provenance manifest to check the file against (default: the "
            "one embedded in the PNG, else FILE.provenance.json)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON.")] = False,
) -> None:
    """Checks a file's signed provenance: the Ed25519 signature over its manifest, the
    signer, and that the pixels (or audio samples) are those signed. Prints the manifest;
    exit 0 when valid, 1 when invalid or tampered (saying why), 2 on bad input."""
    from aigc.safety.provenance import verify_file

    result = verify_file(file, public_key, manifest)
    if as_json:
        typer.echo(json.dumps({"valid": result.valid, "reasons": result.reasons,
                               "notes": result.notes, "key_id": result.key_id,
                               "source": result.source, "manifest": result.manifest}))  # fmt: skip
    else:
        if result.manifest is not None:
            typer.echo(f"manifest ({result.source}):")
            typer.echo(json.dumps(result.manifest, indent=2, ensure_ascii=False))
        if result.valid:
            typer.echo(f"valid: signature by key {result.key_id} holds and the "
                       f"{_what(result)} match the signed digest")  # fmt: skip
        else:
            typer.echo(f"INVALID: {'; '.join(result.reasons)}")
        for note in result.notes:
            typer.echo(f"  note: {note}")
    if not result.valid:
        raise typer.Exit(1)


def _what(result) -> str:
    kind = (result.manifest or {}).get("content", {}).get("kind")
    return "audio samples" if kind == "audio" else "pixels"
