"""`aigc data clean`: a corpus with personal data redacted and duplicates dropped, written in
the format it came in, with a report of what was found.

The input is read as training reads ``data.path`` (``aigc.data.text``): a UTF-8 text file
(one document), a folder of files (one document per file, JSON Lines files one per line;
read recursively in sorted order, hidden files skipped) or a JSON Lines file
(``.jsonl``/``.ndjson``, one document per line, text in a field, default ``text``).
Output mirrors it: a file for a file, a folder with the same relative paths for a folder
(dropped files are not written), JSON Lines with every other field of a kept record
kept. Text is written as training reads it: Unicode NFC with ``\\n`` newlines.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from aigc.errors import DataError

if TYPE_CHECKING:
    from aigc.data.text import Document, TextSource

# aigc.data.text (numpy, tokenizers) loads when the command runs, not with the CLI.


@dataclass
class CleanReport:
    """What ``clean_corpus`` read, dropped, found and wrote (saved as the report JSON)."""

    input: str
    output: str
    report: str  # where this report is saved
    format: str  # text | folder | jsonl
    pii: str  # off | report | redact
    dedup: str  # off | exact | near
    threshold: float
    shingle: str
    ngram: int
    num_perm: int
    n_documents: int = 0
    n_kept: int = 0
    n_exact_duplicates: int = 0
    n_near_duplicates: int = 0
    pii_counts: dict[str, int] = field(default_factory=dict)  # in the kept documents
    pii_redacted: bool = False
    # one per dropped document: {"dropped", "kept" (origins: file or file:line), "jaccard", "kind"}
    duplicate_pairs: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for the terminal."""
        lines = [
            f"read {self.n_documents:,} document{'s' if self.n_documents != 1 else ''} "
            f"({self.format}) from {self.input}; kept {self.n_kept:,}"
        ]
        if self.dedup != "off":
            lines[0] += (f", dropped {self.n_exact_duplicates:,} exact"
                         + (f" and {self.n_near_duplicates:,} near" if self.dedup == "near" else "")
                         + " duplicates")  # fmt: skip
        if self.format == "text" and self.dedup != "off":
            lines.append("  a text file is one document: de-duplication needs a folder of files "
                         "or JSON Lines")  # fmt: skip
        if self.pii != "off":
            found = ", ".join(f"{n:,} {k}" for k, n in self.pii_counts.items() if n) or "none"
            lines.append(f"personal data and secrets: {found}"
                         + (" (redacted)" if self.pii_redacted else " (reported, left in)"))  # fmt: skip
        lines.append(f"wrote {self.output} and {self.report}")
        return "\n".join(lines)


def report_path(out: Path) -> Path:
    """The report beside ``out``: ``clean.jsonl`` -> ``clean.report.json``; a folder
    ``clean/`` -> ``clean.report.json``."""
    stem = out.stem if out.suffix and not out.is_dir() else out.name
    return out.with_name(stem + ".report.json")


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and a.samefile(b))
    except OSError:
        return False


def _check_paths(src: Path, out: Path) -> str:
    """The input's format ("text", "folder", "jsonl"); DataError for a missing input, an
    output that is the input, lies inside an input folder, or is a folder already holding
    files."""
    if not src.exists():
        raise DataError(f"{src}: no such file or folder")
    if not (src.is_file() or src.is_dir()):
        raise DataError(f"{src}: not a regular file or folder")
    report = report_path(out)
    if _same(src, out) or _same(src, report):
        raise DataError(f"--out {out}: is the input (or its report would be); choose another path")
    if src.is_dir():
        if out.resolve().is_relative_to(src.resolve()):
            raise DataError(
                f"--out {out}: lies inside the input folder {src}; choose a path outside"
            )
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise DataError(f"--out {out}: exists and is not an empty folder; choose a new path")
        return "folder"
    if out.is_dir():
        raise DataError(f"--out {out}: is a folder; the input {src} is a file, give a file name")
    from aigc.data.text import _is_jsonl

    return "jsonl" if _is_jsonl(src, "auto") else "text"


def _files(source: TextSource) -> list[tuple[Path, TextSource]]:
    """Each file of the input with the source that reads it alone (same order as reading
    the whole input)."""
    from aigc.data.text import TextSource, _list_files

    return [(p, TextSource(str(p), jsonl_field=source.jsonl_field,
                           encoding_errors=source.encoding_errors, dedup="off"))
            for p in _list_files(source)]  # fmt: skip


def _documents(files: list[tuple[Path, TextSource]]) -> Iterator[tuple[int, Path, Document]]:
    from aigc.data.text import iter_documents

    i = 0
    for path, src in files:
        for doc in iter_documents(src):
            yield i, path, doc
            i += 1


def clean_corpus(
    input: str | Path,
    out: str | Path,
    *,
    pii: str = "off",
    dedup: str = "exact",
    threshold: float = 0.8,
    shingle: str = "word",
    ngram: int = 5,
    num_perm: int = 128,
    jsonl_field: str = "text",
    encoding_errors: str = "strict",
) -> CleanReport:
    """Write ``input`` cleaned to ``out`` and a report JSON beside it (``report_path``).

    pii: "off", "report" (count e-mails, phones, cards, IBANs, IPs and secrets; text
        unchanged) or "redact" (replace them with [EMAIL], [PHONE], ...).
    dedup: "off", "exact" (identical documents) or "near" (exact, then MinHash-LSH at
        Jaccard ``threshold`` over ``ngram``-shingles of words or characters).
    The first document of each group of duplicates is kept; order is kept. The input is
    never written to; the output appears whole or not at all.
    """
    from aigc.data.dedup import Deduplicator, check_near_settings, dedup_mode
    from aigc.data.privacy import PII_KINDS
    from aigc.data.text import TextSource, pii_chunks, pii_mode

    src_path, out_path = Path(input), Path(out)
    pii, dedup = pii_mode(pii, "--pii"), dedup_mode(dedup, "--dedup")
    check_near_settings(threshold, shingle, ngram, num_perm, prefix="--")
    fmt = _check_paths(src_path, out_path)
    source = TextSource(str(src_path), jsonl_field=jsonl_field, encoding_errors=encoding_errors)
    files = _files(source)
    report = CleanReport(input=str(src_path), output=str(out_path),
                         report=str(report_path(out_path)), format=fmt, pii=pii, dedup=dedup,
                         threshold=threshold, shingle=shingle, ngram=ngram, num_perm=num_perm,
                         pii_redacted=pii == "redact")  # fmt: skip

    # Pass 1: personal data counted, duplicates found (memory: per kept document only).
    checker = Deduplicator(dedup, threshold, num_perm, shingle, ngram)
    keep = bytearray()
    counts: Counter[str] = Counter()
    pairs = []
    for i, _, doc in _documents(files):
        found: Counter[str] = Counter()
        chunks = doc.chunks() if pii == "off" else pii_chunks(doc.chunks(), pii, found)
        check = checker.start()
        for chunk in chunks:
            check.update(chunk)
        pair = check.finish(i)
        keep.append(pair is None)
        if pair is None:
            counts.update(found)
        else:
            pairs.append(pair)
    report.n_documents, report.n_kept = len(keep), sum(keep)
    report.n_exact_duplicates = sum(p.kind == "exact" for p in pairs)
    report.n_near_duplicates = sum(p.kind == "near" for p in pairs)
    report.pii_counts = {k: counts[k] for k in PII_KINDS} if pii != "off" else {}

    # Pass 2: write the kept documents into a temporary path, renamed when complete.
    wanted = {p.dropped for p in pairs} | {p.kept for p in pairs}
    origins = _write(files, keep, pii, fmt, src_path, out_path, wanted)
    report.duplicate_pairs = [{"dropped": origins[p.dropped], "kept": origins[p.kept],
                               "jaccard": round(p.jaccard, 4), "kind": p.kind}
                              for p in pairs]  # fmt: skip
    _atomic_text(Path(report.report), json.dumps(asdict(report), indent=2, ensure_ascii=False))
    return report


def _cleaned_text(doc: Document, pii: str) -> Iterator[str]:
    from aigc.data.text import pii_chunks

    return pii_chunks(doc.chunks(), "redact", Counter()) if pii == "redact" else doc.chunks()


def _write(files, keep: bytearray, pii: str, fmt: str, src: Path, out: Path,
           wanted: set[int]) -> dict[int, str]:  # fmt: skip
    """Writes the kept documents; returns the origins of the documents in ``wanted``."""
    from aigc.data.text import _is_jsonl

    origins: dict[int, str] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        docs = _documents(files)
        for path, file_src in files:
            target = tmp / (path.relative_to(src) if fmt == "folder" else "out")
            if _is_jsonl(path, "auto"):
                target.parent.mkdir(parents=True, exist_ok=True)
                _write_jsonl(path, file_src, docs, keep, pii, target, wanted, origins)
                continue
            i, _, doc = next(docs)
            if i in wanted:
                origins[i] = doc.origin
            if keep[i]:
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "w", encoding="utf-8", newline="") as f:
                    for chunk in _cleaned_text(doc, pii):
                        f.write(chunk)
        if fmt == "folder":
            if out.exists():
                out.rmdir()  # empty (checked before reading)
            os.replace(tmp, out)
        else:
            os.replace(tmp / "out", out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return origins


def _write_jsonl(path: Path, src: TextSource, docs: Iterator[tuple[int, Path, Document]],
                 keep: bytearray, pii: str, target: Path, wanted: set[int],
                 origins: dict[int, str]) -> None:  # fmt: skip
    """The kept records of one JSON Lines file, the text field cleaned, other fields kept."""
    errors = src.encoding_errors
    with open(path, "rb") as f, open(target, "w", encoding="utf-8", newline="\n") as w:
        for raw in f:
            line = raw.decode("utf-8", errors=errors).removeprefix("\ufeff")
            if not line.strip():
                continue  # the reader skips blank lines too
            i, _, doc = next(docs)
            if i in wanted:
                origins[i] = doc.origin
            if not keep[i]:
                continue
            record = json.loads(line)
            record[src.jsonl_field] = "".join(_cleaned_text(doc, pii))
            w.write(json.dumps(record, ensure_ascii=False) + "\n")


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


def clean_command(
    input: Annotated[Path, typer.Argument(
        help="A UTF-8 text file (one document), a folder of files (one document each; "
             ".jsonl files one per line) or a JSON Lines file (.jsonl/.ndjson).",
        show_default=False, metavar="INPUT")],
    out: Annotated[Path, typer.Option("--out", "-o", show_default=False,
        help="Where to write the cleaned corpus, in the input's format (a new folder for a "
             "folder). The report goes beside it as NAME.report.json.")],
    pii: Annotated[str, typer.Option(
        help="off | report (count e-mails, phones, cards, IBANs, IPs, secrets) | redact "
             "(replace them with [EMAIL], [PHONE], ...).")] = "off",
    dedup: Annotated[str, typer.Option(
        help="off | exact (identical documents) | near (also MinHash-LSH near duplicates).")]
        = "exact",
    threshold: Annotated[float, typer.Option(
        help="--dedup near: Jaccard similarity of shingle sets, in (0, 1].")] = 0.8,
    shingle: Annotated[str, typer.Option(help="--dedup near: word or char shingles.")] = "word",
    ngram: Annotated[int, typer.Option(help="--dedup near: words (characters) per shingle.")] = 5,
    jsonl_field: Annotated[str, typer.Option(help="The text field of JSON Lines records.")]
        = "text",
) -> None:  # fmt: skip
    """Redact personal data and drop duplicate documents from a corpus; writes the cleaned
    corpus and a report (PII per kind, duplicate pairs)."""
    report = clean_corpus(input, out, pii=pii, dedup=dedup, threshold=threshold,
                          shingle=shingle, ngram=ngram, jsonl_field=jsonl_field)  # fmt: skip
    typer.echo(report.summary())
