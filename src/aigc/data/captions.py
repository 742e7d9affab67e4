"""Captions of an image folder, from a Hugging Face ``imagefolder`` metadata file.

The convention is that of Hugging Face datasets' ImageFolder (and of the diffusers
text-to-image scripts, whose caption column defaults to ``text``): beside the images,
one metadata file with a row per image,

- ``metadata.jsonl``: one JSON object a line, e.g. ``{"file_name": "cats/1.png", "text": "a cat"}``
- ``metadata.csv``: a header row naming the columns, then a row an image (quote a
  caption that holds commas, as the csv module writes it)

where ``file_name`` is the image's path relative to the metadata file's folder, with
``/`` between folders, and ``text`` its caption. Other columns are allowed and ignored.
With train / test (or val) sub-folders the metadata file may sit in each split folder
(Hugging Face's layout) or at the top, naming ``train/...`` and ``test/...`` files.

Unlike Hugging Face datasets, which drops or fills in what does not match, a mismatch is
a DataError naming the metadata file and line: every image needs exactly one caption, and
every row must name an image of the folder. A caption is stripped of surrounding spaces.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path, PurePosixPath

from aigc.errors import DataError

METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
FILE_COLUMN = "file_name"
TEXT_COLUMN = "text"
_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:")


def find_metadata(folder: Path) -> Path | None:
    """``folder/metadata.jsonl`` or ``folder/metadata.csv``, None when neither exists;
    a DataError when both do (which one is meant is not for aigc to guess)."""
    found = [folder / name for name in METADATA_NAMES if (folder / name).is_file()]
    if len(found) > 1:
        raise DataError(
            f"{folder} holds both {found[0].name} and {found[1].name}; keep one metadata file "
            "(aigc would not know which captions to use)"
        )
    return found[0] if found else None


def read_metadata(
    path: Path, item: str = "image", text_name: str = "caption"
) -> dict[str, tuple[str, int]]:
    """The captions of ``path`` (metadata.jsonl or metadata.csv) as
    {file name relative to its folder: (caption, line number)}, every row checked.
    ``item`` and ``text_name`` are what errors call a file and its text (an audio
    folder's: "clip", "transcript")."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is allowed
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    rows = _csv_rows(path, text) if path.suffix == ".csv" else _jsonl_rows(path, text)
    captions: dict[str, tuple[str, int]] = {}
    for line, row in rows:
        name = _file_name(path, line, row.get(FILE_COLUMN), item)
        caption = row.get(TEXT_COLUMN)
        if not isinstance(caption, str):
            what = "has no text" if caption is None else f"has text {caption!r}, not a string"
            raise DataError(f"{path}, line {line}: {name} {what}; give every {item} a {text_name}")
        if not caption.strip():
            raise DataError(
                f"{path}, line {line}: the {text_name} of {name} is empty; write one or remove "
                f"the {item}"
            )
        if name in captions:
            raise DataError(
                f"{path}, line {line}: {name} is named again (first on line {captions[name][1]}); "
                f"give each {item} one {text_name}"
            )
        captions[name] = (caption.strip(), line)
    return captions


def captions_for(
    images: list[Path],
    folder: Path,
    metadata: Path,
    item: str = "image",
    text_name: str = "caption",
) -> list[str]:
    """The caption of each of ``images`` (files under ``folder``) from ``metadata``,
    whose file names are relative to its own folder (``folder`` or one above it).

    Every image needs a caption, and every row naming a file under ``folder`` must name
    one of ``images``; rows naming files elsewhere (another split's) are only checked to exist.
    """
    base = metadata.parent
    captions = read_metadata(metadata, item, text_name)
    for name, (_, line) in captions.items():
        path = base / name
        if not path.is_file():
            raise DataError(
                f"{metadata}, line {line}: {name} does not exist in {base}; fix the file name "
                "or remove the line"
            )
    out = []
    wanted = set()
    for image in images:
        name = image.relative_to(base).as_posix()
        if name not in captions:
            raise DataError(
                f"{image} has no {text_name} in {metadata}; add a line for {name} or remove "
                f"the {item}"
            )
        wanted.add(name)
        out.append(captions[name][0])
    inside = folder.relative_to(base).parts
    for name, (_, line) in captions.items():
        if name not in wanted and PurePosixPath(name).parts[: len(inside)] == inside:
            raise DataError(
                f"{metadata}, line {line}: {name} is not one of the {item}s read from {folder} "
                f"(hidden files, metadata files and names differing in case are not {item}s)"
            )
    return out


def _file_name(path: Path, line: int, value: object, item: str = "image") -> str:
    """``value`` as a normalised relative path (``./a//b.png`` -> ``a/b.png``), refusing
    names that are absolute or climb out of the folder."""
    if value is None:
        raise DataError(f"{path}, line {line}: no {FILE_COLUMN!r}; name the {item} it describes")
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path}, line {line}: {FILE_COLUMN}={value!r} is not a file name")
    name = PurePosixPath(value.strip())
    if name.is_absolute() or _WINDOWS_DRIVE.match(value.strip()) or ".." in name.parts:
        raise DataError(
            f"{path}, line {line}: {FILE_COLUMN}={value!r} is outside the folder; give the "
            f"path relative to {path.parent} (e.g. cats/1.png)"
        )
    return name.as_posix()


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue  # blank lines (a trailing one, say) carry nothing
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}, line {line}: not JSON ({e.msg} at column {e.colno})"
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"{path}, line {line}: a {type(row).__name__}, not a JSON object; write "
                f'{{"{FILE_COLUMN}": ..., "{TEXT_COLUMN}": ...}} on each line'
            )
        rows.append((line, row))
    return rows


def _csv_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    reader = csv.reader(text.splitlines(keepends=True))
    rows, header, end = [], None, 0  # end: the line the previous record ended on
    try:
        for fields in reader:
            line, end = end + 1, reader.line_num  # a quoted field may span lines
            if not any(f.strip() for f in fields):
                continue
            if header is None:
                header = [f.strip() for f in fields]
                for column in (FILE_COLUMN, TEXT_COLUMN):
                    if column not in header:
                        raise DataError(
                            f"{path}, line {line}: the header has no {column!r} column "
                            f"(it has {', '.join(map(repr, header))})"
                        )
                continue
            if len(fields) > len(header):
                raise DataError(
                    f"{path}, line {line}: {len(fields)} fields for {len(header)} columns; quote "
                    'a caption that holds commas ("a cat, asleep")'
                )
            rows.append((line, dict(zip(header, fields, strict=False))))
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({e})") from None
    if header is None:
        raise DataError(
            f"{path} is empty; it needs a header row with {FILE_COLUMN} and {TEXT_COLUMN}"
        )
    return rows
