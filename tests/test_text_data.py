"""Text readers, normalisation, de-duplication and memory-mapped token corpora."""

from __future__ import annotations

import json
import re
import unicodedata

import numpy as np
import pytest

from aigc.data.text import (
    CorpusMeta,
    TextSource,
    TokenCorpus,
    build_corpus,
    iter_documents,
)
from aigc.data.tokenizers import BPETokenizer, CharTokenizer, load_tokenizer
from aigc.errors import CheckpointError, ConfigError, DataError


def read_docs(src: TextSource, **kw) -> list[tuple[str, str]]:
    return [(d.origin, d.text()) for d in iter_documents(src, **kw)]


def bad_byte_offset(err: pytest.ExceptionInfo) -> int:
    return int(re.search(r"invalid UTF-8 at byte (\d+)", str(err.value)).group(1))


# --------------------------------------------------------------------------- readers


def test_text_file_is_one_document(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("line one\nline two\n", encoding="utf-8")
    assert read_docs(TextSource(str(path))) == [(str(path), "line one\nline two\n")]


def test_folder_recursive_sorted_skips_hidden_and_reads_jsonl(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "z.txt").write_text("in b")
    (tmp_path / "a.txt").write_text("top a")
    (tmp_path / "c.jsonl").write_text('{"text": "j1"}\n{"text": "j2"}\n')
    (tmp_path / ".hidden.txt").write_text("secret")
    (tmp_path / ".git" / "HEAD").write_text("ref")
    docs = read_docs(TextSource(str(tmp_path)))
    assert docs == [
        (str(tmp_path / "a.txt"), "top a"),
        (str(tmp_path / "b" / "z.txt"), "in b"),
        (f"{tmp_path / 'c.jsonl'}:1", "j1"),
        (f"{tmp_path / 'c.jsonl'}:2", "j2"),
    ]
    # format=text reads the .jsonl file as plain text instead.
    as_text = dict(read_docs(TextSource(str(tmp_path), format="text")))
    assert as_text[str(tmp_path / "c.jsonl")] == '{"text": "j1"}\n{"text": "j2"}\n'


def test_jsonl_field_blank_lines_and_line_numbers(tmp_path):
    path = tmp_path / "data.ndjson"
    rows = ['{"body": "first", "n": 1}', "", "   ", '{"body": "se\\r\\ncond"}']
    path.write_text("\n".join(rows) + "\n")
    docs = read_docs(TextSource(str(path), jsonl_field="body"))
    assert docs == [(f"{path}:1", "first"), (f"{path}:4", "se\ncond")]
    # format=jsonl forces JSON Lines on any file name.
    other = tmp_path / "data.txt"
    other.write_text('{"text": "x"}\r\n')
    assert read_docs(TextSource(str(other), format="jsonl")) == [(f"{other}:1", "x")]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "unterminated', "not valid JSON"),
        ('{"other": "x"}', "no field 'text'"),
        ('{"text": 42}', "field 'text' is int, not a string"),
        ('["text"]', "expected a JSON object"),
        ('{"text": "lone \\ud800 surrogate"}', "unpaired surrogate"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n\n' + line + "\n")
    with pytest.raises(DataError, match=re.escape(message)) as err:
        read_docs(TextSource(str(path)))
    assert str(err.value).startswith(f"{path}:3: ")


def test_jsonl_invalid_utf8_offset_is_absolute(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "b\xffd"}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: invalid UTF-8") as err:
        read_docs(TextSource(str(path)))
    assert bad_byte_offset(err) == 26


def test_embedded_pydoc_documents():
    docs = list(iter_documents(TextSource()))
    assert len(docs) == 79
    origins = [d.origin for d in docs]
    assert origins == sorted(origins) and "pydoc:assert" in origins
    assert [d.origin for d in iter_documents(TextSource("pydoc"))] == origins


# --------------------------------------------------------------------------- decoding


# Each case: bytes, and chunk sizes that put a chunk boundary at every position.
BAD_UTF8 = [
    b"hello\xffworld",  # lone invalid byte
    b"abcd\xff",  # bad byte right after a 4-byte chunk boundary
    b"abc\xc3\xa9\xffxyz",  # split 2-byte char, then a bad byte
    "ab€\n".encode() + b"\xe2\x82\n",  # truncated 3-byte char followed by newline
    "😀😀".encode() + b"\xf0\x9f\x98",  # truncated 4-byte char at end of file
    b"abc\xe2Xyz",  # lead byte at the end of a chunk, then a non-continuation
    b"\xed\xa0\x80 surrogate",  # encoded surrogate: invalid in UTF-8
]


@pytest.mark.parametrize("data", BAD_UTF8)
def test_invalid_utf8_strict_reports_exact_byte_offset(tmp_path, data):
    path = tmp_path / "corpus.txt"
    path.write_bytes(data)
    with pytest.raises(UnicodeDecodeError) as ref:
        data.decode("utf-8")
    for chunk_size in range(1, len(data) + 2):
        with pytest.raises(DataError, match=r"set data\.encoding_errors=replace") as err:
            read_docs(TextSource(str(path)), chunk_size=chunk_size)
        assert str(err.value).startswith(f"{path}: invalid UTF-8 at byte ")
        assert bad_byte_offset(err) == ref.value.start, chunk_size


@pytest.mark.parametrize("data", BAD_UTF8)
def test_invalid_utf8_replace_matches_python_and_counts(tmp_path, data):
    path = tmp_path / "corpus.txt"
    path.write_bytes(data)
    expected = unicodedata.normalize("NFC", data.decode("utf-8", "replace"))
    for chunk_size in (1, 2, 3, 5, 1 << 20):
        out = tmp_path / f"out{chunk_size}"
        _, corpus = build_corpus(
            TextSource(str(path), encoding_errors="replace"), out, chunk_size=chunk_size
        )
        tok = corpus.load_tokenizer()
        assert tok.decode(corpus.tokens) == expected
        assert corpus.meta.n_replaced == expected.count("\ufffd") > 0
        assert corpus.meta.warnings and "U+FFFD" in corpus.meta.warnings[0]


def test_bom_is_dropped(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfhi")
    for chunk_size in (1, 2, 8):
        assert read_docs(TextSource(str(path)), chunk_size=chunk_size)[0][1] == "hi"


NORMALISE_CASES = [
    ("cafe\u0301\r\nx\ry\n", "caf\u00e9\nx\ny\n"),
    ("A\u030a\u0327 \r\r\n\n", unicodedata.normalize("NFC", "A\u030a\u0327") + " \n\n\n"),
    # No newline at all: cuts must fall back to safe character boundaries.
    ("e\u0301" * 40, "\u00e9" * 40),
    ("\u1100\u1161\u11a8" * 30, "\uac01" * 30),  # Hangul jamo compose to 각
    ("word \u0915\u093c " * 20, unicodedata.normalize("NFC", "word \u0915\u093c " * 20)),
]


@pytest.mark.parametrize("text, expected", NORMALISE_CASES)
def test_nfc_and_newlines_are_chunk_independent(tmp_path, text, expected):
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode())
    assert unicodedata.normalize("NFC", expected) == expected
    for chunk_size in range(1, 12):
        (doc,) = iter_documents(TextSource(str(path)), chunk_size=chunk_size)
        chunks = list(doc.chunks())
        assert "".join(chunks) == expected, chunk_size


def test_chunks_stay_bounded(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("a few words on a line\n" * 500 + "x" * 5000)
    (doc,) = iter_documents(TextSource(str(path)), chunk_size=256)
    sizes = [len(c) for c in doc.chunks()]
    assert len(sizes) > 40
    assert max(sizes) <= 6 * 256  # pending text (about 4 reads) plus a read or two


# --------------------------------------------------------------------------- errors


def test_missing_path_names_it(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope'}: no such file")):
        build_corpus(TextSource(str(tmp_path / "nope")), tmp_path / "out")


def test_empty_folder_and_empty_files(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    with pytest.raises(DataError, match=re.escape(f"{folder}: the folder has no files")):
        build_corpus(TextSource(str(folder)), tmp_path / "out")
    (folder / ".hidden").write_text("skipped")
    with pytest.raises(DataError, match="no files"):
        build_corpus(TextSource(str(folder)), tmp_path / "out")
    (folder / "a.txt").write_text("")
    (folder / "b.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="the corpus is empty") as err:
        build_corpus(TextSource(str(folder)), tmp_path / "out")
    assert str(folder) in str(err.value)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"\xef\xbb\xbf")  # a BOM alone is no text
    with pytest.raises(DataError, match=re.escape(f"{empty} (format=auto): the corpus is empty")):
        build_corpus(TextSource(str(empty)), tmp_path / "out")


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda: TextSource(format="csv"), "data.format"),
        (lambda: TextSource(encoding_errors="ignore"), "data.encoding_errors"),
        (lambda: TextSource(jsonl_field=""), "data.jsonl_field"),
    ],
)
def test_source_config_errors(make, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        make()


def test_build_config_errors_come_before_reading(tmp_path):
    missing = TextSource(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"data\.val_fraction"):
        build_corpus(missing, tmp_path / "o", val_fraction=1.0)
    with pytest.raises(ConfigError, match=r"data\.tokenizer"):
        build_corpus(missing, tmp_path / "o", tokenizer_kind="word")
    with pytest.raises(ConfigError, match=r"data\.vocab_size"):
        build_corpus(missing, tmp_path / "o", tokenizer_kind="bpe", vocab_size=100)


# --------------------------------------------------------------------------- corpora


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "1.txt").write_text("Hello world.\nSecond line.\n")
    (d / "2.txt").write_text("Hello world.\r\nSecond line.\r\n")  # duplicate after normalising
    (d / "3.txt").write_text("Another document, naïve café 😀")
    (d / "4.txt").write_text("")
    return d


def test_dedup_counts_and_char_stream(folder, tmp_path):
    tok, corpus = build_corpus(TextSource(str(folder)), tmp_path / "out", val_fraction=0.2)
    m = corpus.meta
    assert (m.n_documents, m.n_duplicates, m.n_empty) == (2, 1, 1)
    text = "Hello world.\nSecond line.\n" + "\n\n" + "Another document, naïve café 😀"
    assert isinstance(tok, CharTokenizer) and tok.chars == sorted(set(text))
    assert tok.decode(corpus.tokens) == text
    assert m.n_chars == len(text) - 2  # separators are not document text
    assert (m.tokenizer, m.vocab_size, m.dtype, m.separator) == (
        "char",
        len(tok.chars),
        "uint16",
        "\n\n",
    )
    assert corpus.tokens.dtype == np.uint16

    _, kept_all = build_corpus(TextSource(str(folder), dedup=False), tmp_path / "all")
    assert (kept_all.meta.n_documents, kept_all.meta.n_duplicates) == (3, 0)


def test_split_is_contiguous_and_exact(folder, tmp_path):
    tok, corpus = build_corpus(TextSource(str(folder)), tmp_path / "out", val_fraction=0.2)
    m = corpus.meta
    assert m.n_tokens == len(corpus.tokens) == 58
    assert m.n_val == round(58 * 0.2) and m.n_train + m.n_val == m.n_tokens
    np.testing.assert_array_equal(corpus.train, corpus.tokens[: m.n_train])
    np.testing.assert_array_equal(corpus.val, corpus.tokens[m.n_train :])
    val_text = tok.decode(corpus.val)
    assert (m.val_chars, m.val_bytes) == (len(val_text), len(val_text.encode()))
    assert m.val_bytes > m.val_chars  # 😀 and é are several bytes

    _, no_val = build_corpus(TextSource(str(folder)), tmp_path / "noval", val_fraction=0.0)
    assert (no_val.meta.n_val, len(no_val.val), no_val.meta.val_chars) == (0, 0, 0)


def test_build_is_deterministic(folder, tmp_path):
    for kind in ("char", "bpe"):
        a = build_corpus(
            TextSource(str(folder)), tmp_path / f"a{kind}", tokenizer_kind=kind, vocab_size=300
        )
        b = build_corpus(
            TextSource(str(folder)), tmp_path / f"b{kind}", tokenizer_kind=kind, vocab_size=300
        )
        assert (tmp_path / f"a{kind}" / "tokens.bin").read_bytes() == (
            tmp_path / f"b{kind}" / "tokens.bin"
        ).read_bytes()
        assert a[1].meta == b[1].meta


def test_bpe_corpus_ends_documents_with_eos(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    docs = [
        # Indented lines: a cut before leading spaces would change GPT-2 pre-tokens.
        "".join(f"def f{i}(x):\n" + "    x = x + 1\n" * 12 + "\n" for i in range(20)),
        f"Second file mentions {'<|endoftext|>'} literally. Grüße ☃\n",
        "".join(f"def g{i}():\r\n    pass\r\n\r\n" for i in range(40)),  # CRLF
    ]
    for name, doc in zip("abc", docs, strict=True):
        (d / f"{name}.txt").write_bytes(doc.encode())
    # A small chunk size: chunked encoding must equal whole-document encoding.
    tok, corpus = build_corpus(
        TextSource(str(d)), tmp_path / "out", tokenizer_kind="bpe", vocab_size=300, chunk_size=100
    )
    assert isinstance(tok, BPETokenizer) and corpus.meta.separator == "<|endoftext|>"
    expected = []
    for doc in docs:
        doc = doc.replace("\r\n", "\n")
        expected += [*tok.encode_array(doc, special=False).tolist(), tok.eos_id]
    assert corpus.tokens.tolist() == expected
    assert corpus.tokens.tolist().count(tok.eos_id) == 3

    # Validation text size counts document bytes exactly; <|endoftext|> counts nothing.
    table = tok.token_bytes()
    val_bytes = b"".join(table[i] for i in corpus.val)
    assert corpus.meta.val_bytes == len(val_bytes)
    assert corpus.meta.val_chars == len(val_bytes.decode("utf-8", "replace"))
    assert isinstance(load_tokenizer(tmp_path / "out"), BPETokenizer)


def test_given_tokenizer_uint32_and_unknown_char(tmp_path):
    wide = CharTokenizer([chr(c) for c in range(0x10000, 0x10000 + 70_000)])
    text = "".join(chr(0x10000 + i) for i in range(0, 70_000, 7000)) + chr(0x10000 + 69_999)
    path = tmp_path / "wide.txt"
    path.write_text(text)
    tok, corpus = build_corpus(TextSource(str(path)), tmp_path / "out", tokenizer=wide)
    assert tok is wide and corpus.meta.dtype == "uint32" and corpus.tokens.dtype == np.uint32
    assert corpus.tokens[-1] == 69_999 and wide.decode(corpus.tokens) == text

    path.write_text("ab\n" * 4 + "abc")
    with pytest.raises(DataError, match=re.escape(f"{path}: character 'c' at position 14")):
        build_corpus(TextSource(str(path)), tmp_path / "o2", tokenizer=CharTokenizer("ab\n"))


def test_open_detects_truncated_missing_and_interrupted(folder, tmp_path):
    out = tmp_path / "out"
    build_corpus(TextSource(str(folder)), out)
    assert len(TokenCorpus.open(out)) == 58
    tokens = out / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-2])
    with pytest.raises(CheckpointError, match=r"tokens\.bin: has 114 bytes .* truncated"):
        TokenCorpus.open(out)
    tokens.unlink()
    with pytest.raises(CheckpointError, match=r"tokens\.bin: not found"):
        TokenCorpus.open(out)
    # A rebuild that fails midway must not leave the old corpus.json looking valid.
    build_corpus(TextSource(str(folder)), out)
    (folder / "5.txt").write_bytes(b"bad \xff byte")
    with pytest.raises(DataError, match="invalid UTF-8"):
        build_corpus(TextSource(str(folder)), out)
    with pytest.raises(CheckpointError, match=r"corpus\.json: not found"):
        TokenCorpus.open(out)
    (out / "corpus.json").write_text("{")
    with pytest.raises(CheckpointError, match="corrupt"):
        TokenCorpus.open(out)


def test_meta_round_trips_through_json(folder, tmp_path):
    _, corpus = build_corpus(TextSource(str(folder)), tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "corpus.json").read_text())
    assert CorpusMeta(**saved) == corpus.meta
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "corpus.json",
        "tokenizer.json",
        "tokens.bin",
    ]


def test_embedded_pydoc_corpus_builds(tmp_path, capsys):
    tok, corpus = build_corpus(TextSource(), tmp_path / "out", progress=True)
    m = corpus.meta
    assert isinstance(tok, CharTokenizer) and m.tokenizer == "char"
    assert 455_000 < m.n_chars < 475_000  # ~465k characters of Python documentation
    assert m.n_documents + m.n_duplicates == 79
    assert 60 < tok.vocab_size < 200
    assert m.n_tokens == m.n_chars + 2 * (m.n_documents - 1)
    assert tok.decode(corpus.tokens[:22]) == 'The "assert" statement'


def test_source_changing_between_passes_is_detected(folder, tmp_path, monkeypatch):
    import aigc.data.text as text_module

    real = text_module.iter_documents
    calls = []

    def shrinking(src, **kw):  # the second read (pass 2) loses the last document
        calls.append(1)
        docs = list(real(src, **kw))
        return iter(docs if len(calls) == 1 else docs[:-1])

    monkeypatch.setattr(text_module, "iter_documents", shrinking)
    out = tmp_path / "out"
    with pytest.raises(DataError, match="the source changed"):
        build_corpus(TextSource(str(folder)), out)
    assert sorted(p.name for p in out.iterdir()) == []  # no partial tokens, no corpus.json
