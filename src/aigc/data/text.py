"""Text corpora: read real formats, clean them, and write memory-mapped token files.

Reading streams every file in chunks (1 MiB by default), so a 200 MB single
file is never held whole. Each chunk is decoded as UTF-8 with an incremental
decoder (bad bytes are reported by absolute byte offset, or replaced), then
normalised: ``\\r\\n`` and lone ``\\r`` become ``\\n`` and the text is put in
Unicode NFC. Chunks are cut only where both steps give the same result as on
the whole text (after a newline), so chunking never changes the corpus.

``build_corpus`` turns a source into ``out_dir/tokens.bin`` (a flat array of
token ids, nanoGPT style), ``out_dir/tokenizer.json`` and ``out_dir/corpus.json``
(a ``CorpusMeta``); ``TokenCorpus.open`` memory-maps the result.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import sys
import unicodedata
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from aigc.data.dedup import Deduplicator, check_near_settings, dedup_mode
from aigc.data.privacy import PiiScrubber
from aigc.data.tokenizers import (
    EOS_TOKEN,
    TOKENIZER_FILE,
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    UnknownCharacterError,
    check_bpe_vocab_size,
    code_points,
    load_tokenizer,
    token_dtype,
    train_bpe_tokenizer,
)
from aigc.errors import CheckpointError, ConfigError, DataError

CHUNK_SIZE = 1 << 20  # bytes per read; memory use is a small multiple of this
EMBEDDED = "pydoc"
STDLIB = "stdlib"  # the standard library's Python sources (aigc.data.stdlib), for fine-tuning
FOLK_ABC = "folk-abc"  # music21's folk tunes in ABC notation (aigc.data.abc)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
FORMATS = ("auto", "text", "jsonl")
ENCODING_ERRORS = ("strict", "replace")
PII_MODES = ("off", "report", "redact")
N_DUPLICATE_EXAMPLES = 5  # duplicate pairs named in corpus.json
TOKENIZER_KINDS = ("char", "bpe")
CHAR_SEPARATOR = "\n\n"  # between documents for char tokenizers (BPE uses <|endoftext|>)

TOKENS_FILE = "tokens.bin"
META_FILE = "corpus.json"
META_VERSION = 1


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class TextSource:
    """Where text comes from and how to read it (the ``data.*`` config keys)."""

    path: str | None = None  # None or "pydoc": the embedded corpus; else a file or folder
    format: str = "auto"  # auto | text | jsonl; auto reads .jsonl/.ndjson as JSON Lines
    jsonl_field: str = "text"  # the string field of each JSON Lines record
    encoding_errors: str = "strict"  # strict | replace (bad bytes -> U+FFFD, counted)
    # duplicate documents dropped: exact | near (MinHash-LSH, aigc.data.dedup) | off;
    # True/False (older configs) mean exact/off
    dedup: bool | str = "exact"
    dedup_threshold: float = 0.8  # near: Jaccard similarity of shingle sets
    dedup_shingle: str = "word"  # near: word or char shingles
    dedup_ngram: int = 5  # near: words (characters) per shingle
    dedup_num_perm: int = 128  # near: MinHash signature length
    pii: str = "off"  # off | report (count) | redact (placeholders), aigc.data.privacy

    def __post_init__(self) -> None:
        if self.path is not None and not isinstance(self.path, str):
            object.__setattr__(self, "path", os.fspath(self.path))
        object.__setattr__(self, "dedup", dedup_mode(self.dedup))
        object.__setattr__(self, "pii", pii_mode(self.pii))
        check_near_settings(
            self.dedup_threshold, self.dedup_shingle, self.dedup_ngram, self.dedup_num_perm
        )
        if self.format not in FORMATS:
            raise ConfigError(f"data.format must be one of {FORMATS}, got {self.format!r}")
        if self.encoding_errors not in ENCODING_ERRORS:
            raise ConfigError(
                f"data.encoding_errors must be one of {ENCODING_ERRORS}, "
                f"got {self.encoding_errors!r}"
            )
        if not isinstance(self.jsonl_field, str) or not self.jsonl_field:
            raise ConfigError(
                f"data.jsonl_field must be a non-empty string, got {self.jsonl_field!r}"
            )

    @property
    def is_embedded(self) -> bool:
        """True for the Python documentation corpus that ships with every Python."""
        return self.path is None or self.path == EMBEDDED

    @property
    def is_stdlib(self) -> bool:
        """True for the standard library's sources of the running interpreter."""
        return self.path == STDLIB

    @property
    def is_folk_abc(self) -> bool:
        """True for the folk tunes in ABC notation inside music21."""
        return self.path == FOLK_ABC

    def describe(self) -> str:
        """A one-line description for logs and corpus.json."""
        if self.is_folk_abc:
            return "folk-abc (music21's Essen and O'Neill folk tunes in ABC notation)"
        if self.is_stdlib:
            v = sys.version_info
            return f"stdlib (Python {v.major}.{v.minor} standard library sources)"
        if self.is_embedded:
            v = sys.version_info
            return f"pydoc (Python {v.major}.{v.minor} documentation topics)"
        return f"{self.path} (format={self.format})"


def pii_mode(value: bool | str, key: str = "data.pii") -> str:
    """``off``, ``report`` or ``redact``; false (what YAML makes of a bare ``off``) is off.
    ConfigError naming ``key`` for anything else."""
    if value is False:
        return "off"
    if value in PII_MODES:
        return value  # type: ignore[return-value]
    raise ConfigError(f"{key}={value!r} is not allowed; expected one of off, report, redact")


@dataclass
class ReadStats:
    """Counters that readers update as documents are streamed."""

    n_bytes: int = 0  # raw bytes read
    n_replaced: int = 0  # invalid UTF-8 sequences replaced with U+FFFD
    first_replaced: str | None = None  # where the first replacement happened
    on_bytes: Callable[[int], object] | None = field(default=None, repr=False, compare=False)

    def add_bytes(self, n: int) -> None:
        self.n_bytes += n
        if self.on_bytes is not None:
            self.on_bytes(n)


@dataclass(eq=False)
class Document:
    """One document; its text is produced lazily, in normalised chunks."""

    origin: str  # e.g. "corpus.txt", "data.jsonl:17", "pydoc:assert"
    read: Callable[[], Iterator[str]] = field(repr=False)

    def chunks(self) -> Iterator[str]:
        """The normalised text, in pieces of about the read chunk size."""
        return self.read()

    def text(self) -> str:
        """The whole normalised text (only for documents known to be small)."""
        return "".join(self.read())


# --------------------------------------------------------------------------- decoding


def normalize_text(text: str) -> str:
    """Newlines to ``\\n`` (from ``\\r\\n`` and lone ``\\r``), then Unicode NFC."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii():  # O(1), and ASCII is always NFC
        return text
    return unicodedata.normalize("NFC", text)


class _Utf8Decoder:
    """Incremental UTF-8 decoding that knows the absolute byte offset of an error."""

    def __init__(self, origin: str, errors: str, stats: ReadStats, base: int = 0):
        self.origin = origin
        self.errors = errors
        self.stats = stats
        self.pos = base  # absolute offset of the next byte to be fed
        self.dec = codecs.getincrementaldecoder("utf-8")("strict")

    def decode(self, data: bytes, final: bool = False) -> str:
        # The decoder keeps the bytes of a character split across reads; a
        # UnicodeDecodeError indexes into (kept bytes + data), so the absolute
        # offset of that buffer's start is pos - len(kept bytes).
        start = self.pos - len(self.dec.getstate()[0])
        self.pos += len(data)
        out = []
        while True:
            try:
                out.append(self.dec.decode(data, final))
                return "".join(out)
            except UnicodeDecodeError as e:
                if self.errors == "strict":
                    raise DataError(
                        f"{self.origin}: invalid UTF-8 at byte {start + e.start}; "
                        "set data.encoding_errors=replace to replace bad bytes"
                    ) from None
                # Same result as bytes.decode(errors="replace"): one U+FFFD per
                # maximal invalid subsequence; we only count them on the way.
                if self.stats.first_replaced is None:
                    self.stats.first_replaced = f"{self.origin} at byte {start + e.start}"
                self.stats.n_replaced += 1
                out.append(e.object[: e.start].decode("utf-8"))
                out.append("\ufffd")
                data = e.object[e.end :]
                start += e.end
                self.dec.reset()


def _is_safe_start(c: str) -> bool:
    """True if NFC never joins ``c`` with the text before it, so a chunk may start at ``c``.

    Characters that compose with or reorder around a preceding one are combining
    marks (category M*) and the Hangul vowel/trailing jamo; CR/LF are excluded
    so that ``\\r\\n`` is never split.
    """
    o = ord(c)
    return (
        c not in "\r\n"
        and unicodedata.combining(c) == 0
        and not unicodedata.category(c).startswith("M")
        and not 0x1160 <= o <= 0x11FF
        and not 0xD7B0 <= o <= 0xD7FF
    )


def _cut_point(buf: str, max_pending: int) -> int:
    """Where to cut ``buf`` so that normalising the two parts apart equals normalising it whole."""
    # Any cut right after "\n" is safe for NFC and never splits "\r\n". Better
    # still is a cut just before a "\n" (or "\r\n") that ends a run of
    # whitespace: the GPT-2 pre-tokenizer splits there too (a trailing run of
    # whitespace is one pre-token only at the very end of a text), so encoding
    # chunk by chunk gives the same BPE ids as encoding the whole text.
    i = buf.rfind("\n")
    last_newline = i
    for _ in range(64):
        if i <= 0:
            break
        if i + 1 < len(buf) and not buf[i + 1].isspace():
            cut = i - 1 if buf[i - 1] == "\r" else i  # keep "\r\n" whole
            if cut > 0:
                return cut
        i = buf.rfind("\n", 0, i)
    if len(buf) <= max_pending:
        return 0  # wait for more text and a better cut
    if last_newline >= 0:
        return last_newline + 1
    # A very long line: cut before a character that cannot join what precedes it.
    for j in range(len(buf) - 1, 0, -1):
        if _is_safe_start(buf[j]):
            return j
    return 0


class _Normalizer:
    """``normalize_text`` applied to a stream of pieces, exactly as on the whole text."""

    def __init__(self, max_pending: int):
        self.max_pending = max_pending
        self.pending = ""

    def feed(self, text: str) -> str:
        buf = self.pending + text
        cut = _cut_point(buf, self.max_pending)
        self.pending = buf[cut:]
        return normalize_text(buf[:cut])

    def flush(self) -> str:
        out, self.pending = normalize_text(self.pending), ""
        return out


# --------------------------------------------------------------------------- readers


def _file_chunks(
    path: Path, origin: str, errors: str, chunk_size: int, stats: ReadStats
) -> Iterator[str]:
    """Stream one UTF-8 text file as normalised chunks."""
    decoder = _Utf8Decoder(origin, errors, stats)
    # Holding up to a few reads back lets most cuts fall where BPE parity holds.
    norm = _Normalizer(max_pending=4 * chunk_size)
    at_start = True
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed by the with below; open errors reworded)
    except OSError as e:
        raise DataError(f"{origin}: cannot read ({e.strerror})") from None
    with f:
        while True:
            raw = f.read(chunk_size)
            stats.add_bytes(len(raw))
            text = decoder.decode(raw, final=not raw)
            if at_start and text:
                text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not text
                at_start = False
            out = norm.feed(text) if raw else norm.feed(text) + norm.flush()
            if out:
                yield out
            if not raw:
                return


def _single(text: str) -> Iterator[str]:
    if text:
        yield text


_SURROGATE = re.compile("[\ud800-\udfff]")


def _jsonl_documents(path: Path, src: TextSource, stats: ReadStats) -> Iterator[Document]:
    """One Document per non-blank line of a JSON Lines file."""
    name = str(path)
    field_name = src.jsonl_field
    offset = 0
    try:
        f = open(path, "rb")  # noqa: SIM115
    except OSError as e:
        raise DataError(f"{name}: cannot read ({e.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"{name}:{lineno}"
            stats.add_bytes(len(raw))
            line = _Utf8Decoder(where, src.encoding_errors, stats, base=offset).decode(raw, True)
            offset += len(raw)
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            record = json_record(line, where, field_name, hint="; set data.jsonl_field")
            value = record[field_name]
            if not isinstance(value, str):
                raise DataError(
                    f"{where}: field {field_name!r} is {type(value).__name__}, not a string"
                )
            # JSON escapes can spell lone surrogates ("\ud800") that are not
            # valid text; treat them like invalid UTF-8.
            if not value.isascii() and _SURROGATE.search(value):
                if src.encoding_errors == "strict":
                    raise DataError(
                        f"{where}: field {field_name!r} holds an unpaired surrogate escape; "
                        "set data.encoding_errors=replace to replace it"
                    )
                value, n = _SURROGATE.subn("\ufffd", value)
                if stats.first_replaced is None:
                    stats.first_replaced = where
                stats.n_replaced += n
            yield Document(where, partial(_single, normalize_text(value)))


def json_record(line: str, where: str, field_name: str, hint: str = "") -> dict[str, Any]:
    """One JSON Lines record: a JSON object holding ``field_name``; DataError naming
    ``where`` (file:line) otherwise."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if field_name not in record:
        keys = ", ".join(map(repr, list(record)[:10])) or "none"
        raise DataError(f"{where}: no field {field_name!r} (fields: {keys}){hint}")
    return record


def _pydoc_documents(stats: ReadStats) -> Iterator[Document]:
    """The Python documentation topics (``pydoc_data``), one document per topic."""
    from pydoc_data.topics import topics

    def read(text: str) -> Iterator[str]:
        stats.add_bytes(len(text.encode("utf-8")))
        yield from _single(normalize_text(text))

    for key in sorted(topics):
        yield Document(f"pydoc:{key}", partial(read, topics[key]))


def _stdlib_documents(stats: ReadStats) -> Iterator[Document]:
    """The standard library's sources (aigc.data.stdlib), one document per file in
    sorted path order, so the token stream's last share (validation) is whole files."""
    from aigc.data.stdlib import read_stdlib

    def read(text: str) -> Iterator[str]:
        stats.add_bytes(len(text.encode("utf-8")))
        yield from _single(text)  # read_stdlib already normalised it

    for rel, text in read_stdlib().files:
        yield Document(f"stdlib:{rel}", partial(read, text))


def _folk_abc_documents(stats: ReadStats) -> Iterator[Document]:
    """The folk tunes (aigc.data.abc), one document per tune, in their shuffled order."""
    from aigc.data.abc import folk_tunes

    def read(text: str) -> Iterator[str]:
        stats.add_bytes(len(text.encode("utf-8")))
        yield from _single(normalize_text(text))

    for origin, text in folk_tunes():
        yield Document(f"folk-abc:{origin}", partial(read, text))


def _is_jsonl(path: Path, fmt: str) -> bool:
    if fmt == "jsonl" or (fmt == "auto" and path.suffix.lower() in JSONL_SUFFIXES):
        return True
    return fmt == "auto" and path.suffix.lower() == ".json" and _json_lines_in_dot_json(path)


def _json_lines_in_dot_json(path: Path) -> bool:
    """A ``.json`` file under data.format=auto: JSON Lines (an object on its first line) is
    read as such, with a notice; one JSON document is refused rather than trained on as
    raw characters without a word; anything else is plain text."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False  # the read itself reports it
    first = next((line.strip() for line in head.splitlines() if line.strip()), b"")
    if not first.startswith((b"{", b"[")):
        return False
    try:
        record = json.loads(first)
    except ValueError:
        record = None
    if isinstance(record, dict):
        warnings.warn(
            f"{path}: reading it as JSON Lines (one object per line); set data.format=text to "
            "train on its raw characters instead",
            stacklevel=2,
        )
        return True
    raise DataError(
        f"{path}: holds one JSON document, not JSON Lines (one object per line); convert it "
        "(e.g. jq -c '.[]' in.json > out.jsonl), or set data.format=text to train on its raw "
        "characters"
    )


def _list_files(src: TextSource) -> list[Path]:
    """The files of a path source: the file itself, or a folder's visible files, sorted."""
    root = Path(src.path)  # type: ignore[arg-type]
    if not root.exists():
        raise DataError(f"{src.path}: no such file or folder (data.path)")
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"{src.path}: not a regular file or folder (data.path)")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # skip .git and friends
        files += [
            Path(dirpath, n)
            for n in filenames
            if not n.startswith(".") and Path(dirpath, n).is_file()
        ]
    if not files:
        raise DataError(f"{src.path}: the folder has no files to read (hidden files are skipped)")
    return sorted(files, key=lambda p: p.relative_to(root).parts)


def iter_documents(
    src: TextSource, *, chunk_size: int = CHUNK_SIZE, stats: ReadStats | None = None
) -> Iterator[Document]:
    """Yield the documents of ``src`` in a deterministic order.

    A text file is one document; a JSON Lines file gives one per non-blank line;
    the embedded corpus one per pydoc topic. ``chunk_size`` is the read size in
    bytes; ``stats`` (optional) collects bytes read and replacements.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    stats = stats if stats is not None else ReadStats()
    if src.is_embedded:
        yield from _pydoc_documents(stats)
        return
    if src.is_stdlib:
        yield from _stdlib_documents(stats)
        return
    if src.is_folk_abc:
        yield from _folk_abc_documents(stats)
        return
    for path in _list_files(src):
        if _is_jsonl(path, src.format):
            yield from _jsonl_documents(path, src, stats)
        else:
            read = partial(_file_chunks, path, str(path), src.encoding_errors, chunk_size, stats)
            yield Document(str(path), read)


def _source_bytes(src: TextSource) -> int:
    """Total bytes a read of ``src`` will see (for the progress bar only)."""
    if src.is_embedded:
        from pydoc_data.topics import topics

        return sum(len(t.encode("utf-8")) for t in topics.values())
    if src.is_stdlib:
        from aigc.data.stdlib import read_stdlib

        return sum(len(t.encode("utf-8")) for _, t in read_stdlib().files)
    if src.is_folk_abc:
        from aigc.data.abc import folk_tunes

        return sum(len(t.encode("utf-8")) for _, t in folk_tunes())
    try:
        return sum(p.stat().st_size for p in _list_files(src))
    except (DataError, OSError):
        return 0  # the read itself will report the problem


# --------------------------------------------------------------------------- corpus files


@dataclass
class CorpusMeta:
    """What ``build_corpus`` made; saved as ``corpus.json`` beside ``tokens.bin``."""

    n_tokens: int  # length of tokens.bin in tokens
    n_train: int  # tokens[:n_train] is the training split
    n_val: int  # tokens[n_train:] is the validation split
    dtype: str  # numpy dtype name of tokens.bin: "uint16" or "uint32"
    vocab_size: int
    tokenizer: str  # "char" or "bpe"
    separator: str  # between documents: "\n\n" (char) or "<|endoftext|>" after each (bpe)
    n_documents: int  # documents kept
    n_duplicates: int  # exact duplicates dropped
    n_empty: int  # empty documents skipped
    n_replaced: int  # invalid UTF-8 sequences replaced with U+FFFD
    n_chars: int  # characters of the kept documents, separators excluded
    n_bytes_read: int  # raw bytes read from the source in one pass
    source: str  # TextSource.describe()
    # The exact text behind the validation tokens, for bits per character/byte.
    # Separator tokens count as the text they stand for: "\n\n" for char, and
    # nothing (0 chars, 0 bytes) for the BPE <|endoftext|> token.
    val_chars: int
    val_bytes: int
    warnings: list[str] = field(default_factory=list)  # one line each, ready to print
    # cleaning (absent from corpora built before it existed: the defaults)
    dedup: str = ""  # exact | near | off ("" before it was recorded)
    n_near_duplicates: int = 0  # near duplicates dropped (data.dedup=near)
    # a few dropped documents with the kept one each repeats: {"dropped", "kept", "jaccard", "kind"}
    duplicate_examples: list[dict[str, Any]] = field(default_factory=list)
    pii: str = "off"  # off | report | redact
    pii_counts: dict[str, int] = field(default_factory=dict)  # spans per kind in kept documents
    version: int = META_VERSION

    def save(self, path: Path) -> None:
        """Write JSON atomically (temp file, flush, rename)."""
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(asdict(self), f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> CorpusMeta:
        """Read corpus.json; CheckpointError naming the file if it is missing or corrupt."""
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(
                f"{path}: not found; the corpus was never built or its build was "
                "interrupted; build it again"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt corpus metadata ({e}); rebuild") from None
        names = {f.name for f in fields(cls)}
        if not isinstance(doc, dict) or not names >= set(doc) or doc.get("version") != META_VERSION:
            raise CheckpointError(f"{path}: not a corpus.json of version {META_VERSION}; rebuild")
        try:
            return cls(**doc)
        except TypeError as e:
            raise CheckpointError(f"{path}: incomplete corpus metadata ({e}); rebuild") from None


class TokenCorpus:
    """A built corpus: memory-mapped token ids split into train and validation views."""

    def __init__(self, out_dir: Path, meta: CorpusMeta, tokens: np.memmap):
        self.out_dir = out_dir
        self.meta = meta
        self.tokens = tokens  # (n_tokens,) read-only memmap
        self.train: np.ndarray = tokens[: meta.n_train]
        self.val: np.ndarray = tokens[meta.n_train :]

    def __repr__(self) -> str:
        m = self.meta
        return f"TokenCorpus({str(self.out_dir)!r}, n_train={m.n_train}, n_val={m.n_val})"

    def __len__(self) -> int:
        return self.meta.n_tokens

    @classmethod
    def open(cls, out_dir: str | Path) -> TokenCorpus:
        """Memory-map ``out_dir/tokens.bin``; CheckpointError if missing or truncated."""
        out_dir = Path(out_dir)
        meta = CorpusMeta.load(out_dir / META_FILE)
        path = out_dir / TOKENS_FILE
        try:
            dtype = np.dtype(meta.dtype)
        except TypeError:
            raise CheckpointError(f"{out_dir / META_FILE}: unknown dtype {meta.dtype!r}") from None
        expected = meta.n_tokens * dtype.itemsize
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{path}: not found; build the corpus again") from None
        if (
            size != expected
            or meta.n_tokens < 1
            or meta.n_train < 0
            or meta.n_train + meta.n_val != meta.n_tokens
        ):
            raise CheckpointError(
                f"{path}: has {size} bytes but corpus.json describes {meta.n_tokens} "
                f"{meta.dtype} tokens ({expected} bytes); the file is truncated or stale, "
                "build the corpus again"
            )
        tokens = np.memmap(path, dtype=dtype, mode="r", shape=(meta.n_tokens,))
        return cls(out_dir, meta, tokens)

    def load_tokenizer(self) -> CharTokenizer | BPETokenizer:
        """The tokenizer saved beside the tokens."""
        return load_tokenizer(self.out_dir)


def _val_text_size(val: np.ndarray, tok: Tokenizer, block: int = 1 << 20) -> tuple[int, int]:
    """(characters, UTF-8 bytes) of the text that the token ids ``val`` stand for."""
    if isinstance(tok, CharTokenizer):
        lengths = tok.utf8_lengths()
        n_bytes = sum(int(lengths[val[i : i + block]].sum()) for i in range(0, len(val), block))
        return len(val), n_bytes
    assert isinstance(tok, BPETokenizer)
    table = tok.token_bytes()
    lengths = np.array([len(b) for b in table], dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    blob = np.frombuffer(b"".join(table), dtype=np.uint8)
    # Byte-level tokens can end inside a character, so bytes are decoded by an
    # incremental decoder across blocks rather than token by token.
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    n_chars = n_bytes = 0
    for i in range(0, len(val), block):
        ids = val[i : i + block].astype(np.int64)
        lens = lengths[ids]
        total = int(lens.sum())
        # Gather every token's bytes at once: output byte k of token j comes
        # from blob[offsets[j] + k - out_start[j]].
        out_start = np.cumsum(lens) - lens
        index = np.repeat(offsets[ids] - out_start, lens) + np.arange(total)
        n_chars += len(decoder.decode(blob[index].tobytes()))
        n_bytes += total
    n_chars += len(decoder.decode(b"", final=True))
    return n_chars, n_bytes


def _progress(enabled: bool, total: int, desc: str) -> tqdm:
    return tqdm(
        total=total or None,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not enabled,
        leave=False,
    )


@dataclass
class _Scan:
    """What pass 1 learned about the documents of a source."""

    keep: bytearray = field(default_factory=bytearray)  # one flag per document, in order
    n_kept: int = 0
    n_duplicates: int = 0  # exact
    n_near_duplicates: int = 0
    n_empty: int = 0
    n_chars: int = 0  # characters of the kept documents (after redaction)
    pii_counts: Counter[str] = field(default_factory=Counter)  # in the kept documents
    examples: list[dict[str, Any]] = field(default_factory=list)  # duplicate pairs, by index
    stats: ReadStats = field(default_factory=ReadStats)


def pii_chunks(chunks: Iterator[str], mode: str, counts: Counter[str]) -> Iterator[str]:
    """The chunks of a document with personal data and secrets handled per ``mode``:
    "report" passes them unchanged, "redact" replaces each span with its placeholder
    (``aigc.data.privacy``); both add the spans found per kind to ``counts`` at the end."""
    scrubber = PiiScrubber()
    for chunk in chunks:
        out = scrubber.feed(chunk)
        if mode == "report":
            yield chunk
        elif out:
            yield out
    out = scrubber.flush()
    if mode == "redact" and out:
        yield out
    counts.update(scrubber.counts)


def _cleaned(doc: Document, pii: str) -> Document:
    """``doc`` with personal data replaced by placeholders when ``pii`` is "redact"."""
    if pii != "redact":
        return doc
    return Document(doc.origin, lambda: pii_chunks(doc.chunks(), pii, Counter()))


def _scan(src: TextSource, chunk_size: int, alphabet: np.ndarray | None, bar: tqdm) -> _Scan:
    """Pass 1: find (and count) personal data, drop exact or near duplicates, mark the
    characters in ``alphabet``. Memory grows only with what de-duplication keeps per
    kept document (a hash; for near, a signature and its band keys)."""
    scan = _Scan(stats=ReadStats(on_bytes=bar.update))
    dedup = Deduplicator(src.dedup, src.dedup_threshold, src.dedup_num_perm, src.dedup_shingle,
                         src.dedup_ngram)  # fmt: skip
    for i, doc in enumerate(iter_documents(src, chunk_size=chunk_size, stats=scan.stats)):
        check = dedup.start()
        found: Counter[str] = Counter()
        chunks = doc.chunks() if src.pii == "off" else pii_chunks(doc.chunks(), src.pii, found)
        n = 0
        for chunk in chunks:
            n += len(chunk)
            check.update(chunk)
            if alphabet is not None:
                # A table per code point is O(n), much faster than set(chunk).
                alphabet[code_points(chunk)] = True
        if n == 0:
            scan.n_empty += 1
            scan.keep.append(0)
        elif (pair := check.finish(i)) is not None:
            if pair.kind == "exact":
                scan.n_duplicates += 1
            else:
                scan.n_near_duplicates += 1
            if len(scan.examples) < N_DUPLICATE_EXAMPLES:
                scan.examples.append({"dropped": doc.origin, "kept": pair.kept,
                                      "jaccard": round(pair.jaccard, 4), "kind": pair.kind})  # fmt: skip
            scan.keep.append(0)
        else:
            scan.keep.append(1)
            scan.n_kept += 1
            scan.n_chars += n
            scan.pii_counts.update(found)
    scan.stats.on_bytes = None
    return scan


def _kept_documents(src: TextSource, scan: _Scan, chunk_size: int, bar: tqdm) -> Iterator[Document]:
    """Read ``src`` again and yield the documents pass 1 kept (redacted if asked); names
    the kept documents of ``scan.examples`` by their origin on the way."""
    n = 0
    stats = ReadStats(on_bytes=bar.update)
    for i, doc in enumerate(iter_documents(src, chunk_size=chunk_size, stats=stats)):
        n = i + 1
        for e in scan.examples:
            if e["kept"] == i:  # an index until named (then a str, never equal)
                e["kept"] = doc.origin
        if i < len(scan.keep) and scan.keep[i]:
            yield _cleaned(doc, src.pii)
    if n != len(scan.keep):
        raise DataError(f"{src.describe()}: the source changed while the corpus was being built")


def _unknown_characters(tok: CharTokenizer, alphabet: np.ndarray) -> dict[int, str]:
    """Code point -> replacement ("?", else a space, else the first character) for the
    corpus characters (``alphabet``) that ``tok`` lacks; {} if none."""
    known = np.zeros(0x110000, dtype=bool)
    known[code_points("".join(tok.chars))] = True
    missing = np.flatnonzero(alphabet & ~known)
    if len(missing) == 0:
        return {}
    repl = next((c for c in ("?", " ") if c in tok.chars), tok.chars[0])
    return {int(c): repl for c in missing}


def _translated(doc: Document, table: dict[int, str]) -> Document:
    """``doc`` with characters replaced one for one (lengths and positions unchanged)."""
    return Document(doc.origin, lambda: (chunk.translate(table) for chunk in doc.chunks()))


def _write_tokens(
    docs: Iterator[Document], tok: CharTokenizer | BPETokenizer, n_docs: int, path: Path
) -> tuple[int, int]:
    """Pass 2: append the token ids of ``docs`` to ``path``; returns (tokens, characters)."""
    dtype = token_dtype(tok.vocab_size)
    empty = np.zeros(0, np.int64)
    if isinstance(tok, BPETokenizer):
        if tok.eos_id is None:
            raise ConfigError(f"the BPE tokenizer has no {EOS_TOKEN} token to separate documents")
        # A literal "<|endoftext|>" inside a document is text; only real
        # document ends get the eos id, after every document (GPT-2 style).
        encode = partial(tok.encode_array, special=False)
        before, after = empty, np.array([tok.eos_id])
    else:
        encode, before, after = tok.encode_array, empty, empty
        if n_docs > 1:
            try:
                before = tok.encode_array(CHAR_SEPARATOR)  # "\n\n" between documents
            except UnknownCharacterError:
                raise DataError(
                    "the char tokenizer has no '\\n', needed to separate documents"
                ) from None
    n_tokens = n_chars = 0
    with open(path, "wb") as f:

        def write(ids: np.ndarray) -> None:
            nonlocal n_tokens
            f.write(ids.astype(dtype).tobytes())
            n_tokens += len(ids)

        for k, doc in enumerate(docs):
            if k > 0:
                write(before)
            pos = 0  # characters into this document, for error messages
            for chunk in doc.chunks():
                try:
                    write(encode(chunk))
                except UnknownCharacterError as e:
                    raise DataError(
                        f"{doc.origin}: character {e.char!r} at position {pos + e.position} "
                        f"is not in the tokenizer's vocabulary of {tok.vocab_size} characters"
                        " (fine-tuning: data.unknown_chars=replace writes such characters as '?')"
                    ) from None
                pos += len(chunk)
            write(after)
            n_chars += pos
        f.flush()
        os.fsync(f.fileno())
    return n_tokens, n_chars


def build_corpus(
    src: TextSource,
    out_dir: str | Path,
    *,
    tokenizer: Tokenizer | None = None,
    tokenizer_kind: str = "char",
    vocab_size: int = 4096,
    val_fraction: float = 0.1,
    progress: bool = False,
    chunk_size: int = CHUNK_SIZE,
    unknown_chars: str = "error",
) -> tuple[Tokenizer, TokenCorpus]:
    """Read ``src``, train a tokenizer (unless given) and write a memory-mapped token file.

    Writes ``out_dir/tokens.bin``, ``out_dir/tokenizer.json`` and, last,
    ``out_dir/corpus.json``, so an interrupted build is detected by
    ``TokenCorpus.open``. Memory does not grow with the corpus's text: only
    de-duplication's state per kept document (a hash; for ``src.dedup == "near"`` a
    MinHash signature and its band keys) and the tokenizer state are kept.
    ``src.pii`` counts ("report") or replaces ("redact") personal data and secrets
    before de-duplication and tokenization; corpus.json records what was found.

    tokenizer: use this one (e.g. from a run being fine-tuned) instead of training;
        ``tokenizer_kind`` and ``vocab_size`` are then ignored.
    tokenizer_kind: "char" or "bpe", for a new tokenizer.
    vocab_size: BPE vocabulary size (257 to 2**32 - 1); unused for char.
    val_fraction: the last this fraction of the token stream is validation.
    progress: show tqdm bars over bytes read.
    chunk_size: bytes per read.
    unknown_chars: with a given char tokenizer, characters of the corpus outside its
        vocabulary are an error ("error", naming them) or written as "?" (or a space,
        or the vocabulary's first character) and counted ("replace").
    """
    if unknown_chars not in ("error", "replace"):
        raise ConfigError(f"data.unknown_chars must be error or replace, got {unknown_chars!r}")
    if not isinstance(val_fraction, int | float) or not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction!r}")
    if tokenizer is None:
        if tokenizer_kind not in TOKENIZER_KINDS:
            raise ConfigError(
                f"data.tokenizer must be one of {TOKENIZER_KINDS}, got {tokenizer_kind!r}"
            )
        if tokenizer_kind == "bpe":
            check_bpe_vocab_size(vocab_size)  # before reading a large corpus, not after
    elif not isinstance(tokenizer, CharTokenizer | BPETokenizer):
        raise ConfigError(f"build_corpus needs a CharTokenizer or BPETokenizer, got {tokenizer!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # An old corpus.json next to new, half-written tokens would look complete.
    (out_dir / META_FILE).unlink(missing_ok=True)
    total_bytes = _source_bytes(src) if progress else 0
    bar = partial(_progress, progress, total_bytes)

    # Pass 1: dedup hashes and, for a new char tokenizer, the alphabet.
    train_char = tokenizer is None and tokenizer_kind == "char"
    # a given char tokenizer that is to replace what it lacks needs the corpus's alphabet
    given_char = isinstance(tokenizer, CharTokenizer) and unknown_chars == "replace"
    alphabet = np.zeros(0x110000, dtype=bool) if train_char or given_char else None
    with bar("read") as b:
        scan = _scan(src, chunk_size, alphabet, b)
    if scan.n_kept == 0:
        raise DataError(
            f"{src.describe()}: the corpus is empty: no document has any text "
            f"({len(scan.keep)} documents read, {scan.n_empty} empty)"
        )

    tok: CharTokenizer | BPETokenizer
    replace: dict[int, str] = {}
    if tokenizer is not None:
        tok = tokenizer  # type: ignore[assignment]
        if given_char:
            replace = _unknown_characters(tok, alphabet)
    elif alphabet is not None:
        if scan.n_kept > 1:
            alphabet[ord("\n")] = True  # the separator must be encodable
        tok = CharTokenizer([chr(c) for c in np.flatnonzero(alphabet)])
    else:
        # Pass 1b: train BPE on the kept documents only, so duplicates do not
        # skew the merges.
        with bar("train bpe") as b:
            docs = _kept_documents(src, scan, chunk_size, b)
            tok = train_bpe_tokenizer((c for d in docs for c in d.chunks()), vocab_size)

    # Pass 2: encode into a temporary file, renamed only when complete.
    tokens_path, tmp = out_dir / TOKENS_FILE, out_dir / (TOKENS_FILE + ".tmp")
    try:
        with bar("tokenize") as b:
            docs = _kept_documents(src, scan, chunk_size, b)
            if replace:
                docs = (_translated(d, replace) for d in docs)
            n_tokens, n_chars = _write_tokens(docs, tok, scan.n_kept, tmp)
        if n_chars != scan.n_chars:
            raise DataError(
                f"{src.describe()}: the source changed while the corpus was being built"
            )
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, tokens_path)

    # Split: contiguous, the last val_fraction of the stream is validation.
    dtype = token_dtype(tok.vocab_size)
    n_val = round(n_tokens * val_fraction)
    n_train = n_tokens - n_val
    tokens = np.memmap(tokens_path, dtype=dtype, mode="r", shape=(n_tokens,))
    val_chars, val_bytes = _val_text_size(tokens[n_train:], tok)
    del tokens

    stats = scan.stats
    warnings = []
    if stats.n_replaced:
        warnings.append(
            f"{stats.n_replaced} invalid UTF-8 sequence(s) replaced with U+FFFD "
            f"(first: {stats.first_replaced})"
        )
    if replace:
        shown = "".join(sorted(chr(c) for c in replace)[:12])
        warnings.append(
            f"{len(replace)} character(s) outside the tokenizer's vocabulary written as "
            f"{next(iter(replace.values()))!r}: {shown!r}"
        )
    meta = CorpusMeta(
        n_tokens=n_tokens,
        n_train=n_train,
        n_val=n_val,
        dtype=dtype.name,
        vocab_size=tok.vocab_size,
        tokenizer=tok.kind,
        separator=EOS_TOKEN if isinstance(tok, BPETokenizer) else CHAR_SEPARATOR,
        n_documents=scan.n_kept,
        n_duplicates=scan.n_duplicates,
        n_empty=scan.n_empty,
        n_replaced=stats.n_replaced,
        n_chars=scan.n_chars,
        n_bytes_read=stats.n_bytes,
        source=src.describe(),
        val_chars=val_chars,
        val_bytes=val_bytes,
        warnings=warnings,
        dedup=src.dedup,
        n_near_duplicates=scan.n_near_duplicates,
        duplicate_examples=scan.examples,
        pii=src.pii,
        pii_counts=dict(sorted(scan.pii_counts.items())),
    )
    tok.save(out_dir / TOKENIZER_FILE)
    meta.save(out_dir / META_FILE)  # last: its presence means the build is complete
    return tok, TokenCorpus.open(out_dir)
