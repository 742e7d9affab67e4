"""Char and byte-level BPE tokenizers: round-trips, errors, file format."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

from aigc.data.tokenizers import (
    EOS_TOKEN,
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    load_tokenizer,
    token_dtype,
    train_bpe_tokenizer,
    train_char_tokenizer,
)
from aigc.errors import CheckpointError, ConfigError, DataError

UNICODE_TEXT = "Grüße, naïve café — 日本語のテキスト 😀 e\u0301 tab\tnew\nline <|endoftext|> end"
TRAIN_TEXT = [
    "the quick brown fox jumps over the lazy dog\n" * 20,
    "Grüße aus Köln, 日本語, emoji 😀😀 and café\n" * 10,
]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return train_bpe_tokenizer(TRAIN_TEXT, vocab_size=320)


# --------------------------------------------------------------------------- char


def test_char_vocabulary_is_sorted_set_and_ids_follow_it():
    tok = CharTokenizer("hello")
    assert tok.chars == ["e", "h", "l", "o"]
    assert tok.vocab_size == 4 and tok.kind == "char" and tok.eos_id is None
    assert tok.encode("hole") == [1, 3, 2, 0]
    assert CharTokenizer(["o", "l", "h", "e", "l"]).chars == tok.chars
    assert isinstance(tok, Tokenizer)


def test_char_encode_array_matches_encode_and_handles_astral_chars():
    text = "abc 😀 é\n日"
    tok = CharTokenizer(text)
    arr = tok.encode_array(text)
    assert arr.dtype == np.int64
    assert arr.tolist() == tok.encode(text) == [tok.chars.index(c) for c in text]
    assert tok.decode(arr) == text
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_array("").tolist() == [] and tok.decode([]) == ""


def test_char_unknown_character_names_char_and_position():
    tok = CharTokenizer("ab")
    with pytest.raises(DataError, match=r"'X' at position 2"):
        tok.encode("abXb")
    # Code points above every vocabulary entry, on the ASCII and the wide path.
    with pytest.raises(DataError, match=r"'z' at position 3"):
        tok.encode_array("abaz")
    with pytest.raises(DataError, match=r"'😀' at position 0"):
        tok.encode_array("😀a")
    with pytest.raises(DataError, match=r"'z' at position 1"):
        CharTokenizer("aé").encode_array("az")


def test_char_decode_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="token id 5"):
        CharTokenizer("ab").decode([0, 5])


def test_char_save_load_round_trip(tmp_path):
    tok = CharTokenizer(UNICODE_TEXT)
    tok.save(tmp_path / "tokenizer.json")
    doc = json.loads((tmp_path / "tokenizer.json").read_text())
    assert doc == {"aigc_tokenizer": "char", "version": 1, "chars": sorted(set(UNICODE_TEXT))}
    loaded = load_tokenizer(tmp_path)  # the folder works as well as the file
    assert isinstance(loaded, CharTokenizer)
    assert loaded.chars == tok.chars
    assert loaded.encode(UNICODE_TEXT) == tok.encode(UNICODE_TEXT)
    assert loaded.decode(tok.encode(UNICODE_TEXT)) == UNICODE_TEXT


def test_train_char_tokenizer_streams_chunks():
    tok = train_char_tokenizer(["ba", "", "c😀", "a"])
    assert tok.chars == ["a", "b", "c", "😀"]
    with pytest.raises(DataError, match="empty"):
        train_char_tokenizer(["", ""])


# --------------------------------------------------------------------------- BPE


def test_bpe_round_trip_unicode(bpe, tmp_path):
    assert bpe.kind == "bpe" and isinstance(bpe, Tokenizer)
    assert bpe.vocab_size == 320
    assert bpe.eos_id == bpe.hf.token_to_id(EOS_TOKEN) is not None
    for text in (UNICODE_TEXT, "", " leading space", "unseen ☃ snowman ⛄ 🦄", "x\n\n\ny"):
        assert bpe.decode(bpe.encode(text)) == text
        assert bpe.encode_array(text).tolist() == bpe.encode(text)
    # Merges were learned: common text takes fewer tokens than bytes.
    assert len(bpe.encode("the quick brown fox")) < len(b"the quick brown fox")

    bpe.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(loaded, BPETokenizer)
    assert (loaded.vocab_size, loaded.eos_id) == (bpe.vocab_size, bpe.eos_id)
    assert loaded.encode(UNICODE_TEXT) == bpe.encode(UNICODE_TEXT)
    assert loaded.decode(bpe.encode(UNICODE_TEXT)) == UNICODE_TEXT


def test_bpe_file_is_standard_hugging_face_json(bpe, tmp_path):
    bpe.save(tmp_path)
    doc = json.loads((tmp_path / "tokenizer.json").read_text())
    assert "aigc_tokenizer" not in doc and doc["model"]["type"] == "BPE"
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.encode(UNICODE_TEXT).ids == bpe.encode(UNICODE_TEXT)


def test_bpe_special_tokens_as_text(bpe):
    text = f"a{EOS_TOKEN}b"
    assert bpe.eos_id in bpe.encode(text)
    plain = bpe.encode_array(text, special=False)
    assert bpe.eos_id not in plain.tolist()
    assert bpe.decode(plain) == text


def test_bpe_token_bytes_are_exact(bpe):
    table = bpe.token_bytes()
    assert len(table) == bpe.vocab_size and table[bpe.eos_id] == b""
    # Single byte tokens split multi-byte characters; the table keeps them exact.
    ids = bpe.encode("☃ 🦄 Köln")
    assert b"".join(table[i] for i in ids) == "☃ 🦄 Köln".encode()


@pytest.mark.parametrize("bad", [0, 100, 256, 2**32, 300.0, True, "512"])
def test_bpe_vocab_size_validation(bad):
    with pytest.raises(ConfigError, match=r"data\.vocab_size"):
        train_bpe_tokenizer(["abc"], vocab_size=bad)


def test_bpe_smallest_vocab_is_bytes_plus_eos():
    tok = train_bpe_tokenizer(["abcabc"], vocab_size=257)
    assert tok.vocab_size == 257
    assert tok.decode(tok.encode("zzz ☃")) == "zzz ☃"


# --------------------------------------------------------------------------- files


def test_token_dtype():
    assert token_dtype(1) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    assert token_dtype(2**32) == np.uint32
    with pytest.raises(ConfigError):
        token_dtype(0)
    with pytest.raises(ConfigError):
        token_dtype(2**32 + 1)


def test_load_missing_tokenizer_names_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: tokenizer file not found"):
        load_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match=r"nope\.json"):
        load_tokenizer(tmp_path / "nope.json")


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"aigc_tokenizer": "char", "version": 1, "chars": ["a"', "not valid JSON"),
        ("[1, 2]", "not a tokenizer"),
        ('{"aigc_tokenizer": "word", "version": 1, "chars": ["a"]}', "unknown"),
        ('{"aigc_tokenizer": "char", "version": 9, "chars": ["a"]}', "version"),
        ('{"aigc_tokenizer": "char", "version": 1, "chars": ["b", "a"]}', "sorted"),
        ('{"aigc_tokenizer": "char", "version": 1, "chars": ["ab"]}', "single characters"),
        ('{"model": {"type": "WordPiece"}}', "WordPiece"),
        ('{"model": {"type": "BPE"}}', "corrupt"),
    ],
)
def test_load_corrupt_tokenizer_names_file(tmp_path, content, message):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(CheckpointError, match=message) as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)


def test_save_leaves_no_temp_file(tmp_path):
    CharTokenizer("ab").save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]
