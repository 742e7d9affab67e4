"""Tokenizers behind one small interface: characters, or byte-level BPE.

Both kinds save to a single ``tokenizer.json`` that sits in a run folder.
The BPE file is the standard Hugging Face ``tokenizers`` JSON, so
``PreTrainedTokenizerFast(tokenizer_file=...)`` reads it; the char file is a
tiny JSON of our own, told apart by its ``"aigc_tokenizer"`` key.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from aigc.errors import CheckpointError, ConfigError, DataError

TOKENIZER_FILE = "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"
# 256 byte tokens that byte-level BPE always has, plus the one special token.
MIN_BPE_VOCAB = 256 + 1
MAX_VOCAB = 2**32 - 1  # the widest token file dtype is uint32

_CHAR_FORMAT_VERSION = 1


@runtime_checkable
class Tokenizer(Protocol):
    """What the sampler and the trainer need from a tokenizer."""

    kind: str  # "char" or "bpe"
    vocab_size: int
    eos_id: int | None  # document separator / end-of-text id; None if there is none

    def encode(self, text: str) -> list[int]: ...

    def encode_array(self, text: str) -> np.ndarray: ...  # int64 ids, the fast path

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, path: str | Path) -> None: ...


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id below ``vocab_size``."""
    if not 0 < vocab_size <= 2**32:
        raise ConfigError(f"data.vocab_size must be between 1 and 2**32, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class UnknownCharacterError(DataError):
    """A character outside a char tokenizer's vocabulary; knows where it was."""

    def __init__(self, char: str, position: int, vocab_size: int):
        self.char = char
        self.position = position  # index into the encoded text, in characters
        super().__init__(
            f"character {char!r} at position {position} is not in the tokenizer's "
            f"vocabulary of {vocab_size} characters"
        )


def code_points(text: str) -> np.ndarray:
    """Code points of ``text``: uint8 for ASCII (4x less memory traffic), else uint32."""
    if text.isascii():  # O(1): CPython knows it from the string's storage kind
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _tokenizer_file(path: str | Path) -> Path:
    """``path`` itself, or ``path/tokenizer.json`` when ``path`` is a folder."""
    path = Path(path)
    return path / TOKENIZER_FILE if path.is_dir() else path


def _write_atomic(path: Path, text: str) -> None:
    # Write then rename, so a crash never leaves half a tokenizer.json behind.
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CharTokenizer:
    """One token per Unicode character; ids follow sorted code points.

    ``CharTokenizer("hello")`` builds the vocabulary ``['e', 'h', 'l', 'o']``.
    ``specials`` are strings of two or more characters (a chat template's
    ``<|user|>``) that each get one id after the characters' ids; where one
    occurs in a text it is that id, never its characters.
    """

    kind = "char"
    eos_id: int | None = None  # documents are joined with "\n\n" text instead

    def __init__(self, chars: str | Iterable[str], specials: Sequence[str] = ()):
        chars = sorted(set(chars))
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"CharTokenizer needs single characters, got {c!r}")
            if 0xD800 <= ord(c) <= 0xDFFF:
                raise ValueError(f"CharTokenizer cannot hold a lone surrogate {c!r}")
        if not chars:
            raise ValueError("CharTokenizer needs at least one character")
        specials = list(specials)
        for t in specials:
            if not isinstance(t, str) or len(t) < 2 or specials.count(t) > 1:
                raise ValueError(f"special tokens must be distinct strings of 2+ characters: {t!r}")
        self.chars: list[str] = chars
        self.specials: list[str] = specials
        self.n_chars = len(chars)
        self.vocab_size = len(chars) + len(specials)
        # longest first, so a special that contains another wins
        ordered = sorted(specials, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, ordered))) if specials else None
        self._cps = np.array([ord(c) for c in chars], dtype=np.uint32)
        # Direct lookup table code point -> id (-1 = unknown). Its last slot is a
        # sentinel that every larger code point is clipped to, so one gather
        # both maps and flags unknown characters. At most 4.4 MB for U+10FFFF.
        self._lut = np.full(int(self._cps[-1]) + 2, -1, dtype=np.int32)
        self._lut[self._cps] = np.arange(len(chars), dtype=np.int32)

    def __repr__(self) -> str:
        extra = f", specials={self.specials}" if self.specials else ""
        return f"CharTokenizer(vocab_size={self.vocab_size}{extra})"

    def token_to_id(self, token: str) -> int | None:
        """The id of a character or special token, or None."""
        if token in self.specials:
            return self.n_chars + self.specials.index(token)
        if len(token) == 1 and ord(token) < len(self._lut) - 1 and self._lut[ord(token)] >= 0:
            return int(self._lut[ord(token)])
        return None

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; raises UnknownCharacterError (a DataError) naming the character."""
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Ids of ``text`` as int64, vectorised (tens of MB/s and more)."""
        if self._special_re is None or self._special_re.search(text) is None:
            return self._encode_chars(text, 0)
        parts, pos = [], 0
        for m in self._special_re.finditer(text):
            parts.append(self._encode_chars(text[pos : m.start()], pos))
            parts.append(np.array([self.n_chars + self.specials.index(m.group())], np.int64))
            pos = m.end()
        parts.append(self._encode_chars(text[pos:], pos))
        return np.concatenate(parts)

    def _encode_chars(self, text: str, offset: int) -> np.ndarray:
        cps = code_points(text)
        top = len(self._lut) - 1
        ids = self._lut[cps if top > 127 and cps.dtype == np.uint8 else np.minimum(cps, top)]
        if len(ids) and ids.min() < 0:
            pos = int(np.argmax(ids < 0))
            raise UnknownCharacterError(text[pos], offset + pos, self.vocab_size)
        return ids.astype(np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``; every id must be below ``vocab_size``. Special tokens are
        written out, so decode(encode(x)) == x."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids[(ids < 0) | (ids >= self.vocab_size)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary of {self.vocab_size}")
        special = ids >= self.n_chars
        if not special.any():
            return self._cps[ids].astype("<u4").tobytes().decode("utf-32-le")
        out, pos = [], 0
        for i in np.flatnonzero(special).tolist():
            out.append(self._cps[ids[pos:i]].astype("<u4").tobytes().decode("utf-32-le"))
            out.append(self.specials[int(ids[i]) - self.n_chars])
            pos = i + 1
        out.append(self._cps[ids[pos:]].astype("<u4").tobytes().decode("utf-32-le"))
        return "".join(out)

    def utf8_lengths(self) -> np.ndarray:
        """Bytes of UTF-8 per id, shape (vocab_size,); used to count text bytes. Special
        tokens count 0: they are markup, not text (as in BPETokenizer.token_bytes)."""
        lengths = [len(c.encode("utf-8")) for c in self.chars] + [0] * len(self.specials)
        return np.array(lengths, dtype=np.int64)

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON to ``path`` (a file, or a folder to hold tokenizer.json)."""
        doc = {"aigc_tokenizer": "char", "version": _CHAR_FORMAT_VERSION, "chars": self.chars}
        if self.specials:
            doc["specials"] = self.specials
        _write_atomic(_tokenizer_file(path), json.dumps(doc, ensure_ascii=True) + "\n")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character byte-level BPE uses for it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) backed by Hugging Face ``tokenizers``."""

    kind = "bpe"

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)
        self.eos_id: int | None = hf.token_to_id(EOS_TOKEN)
        self._plain: HFTokenizer | None = None  # clone that treats special tokens as text

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    def token_to_id(self, token: str) -> int | None:
        """The id of a token (a special token's string, or a byte-level token), or None."""
        return self.hf.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; a literal ``<|endoftext|>`` in it becomes the eos id."""
        return self.hf.encode(text).ids

    def encode_array(self, text: str, *, special: bool = True) -> np.ndarray:
        """Ids of ``text`` as int64.

        special: when False, special-token strings in ``text`` are encoded as
            ordinary text; corpus building uses this so that only real document
            boundaries carry the eos id.
        """
        if special:
            return np.asarray(self.hf.encode(text).ids, dtype=np.int64)
        if self._plain is None:
            self._plain = HFTokenizer.from_str(self.hf.to_str())
            self._plain.encode_special_tokens = True
        return np.asarray(self._plain.encode(text).ids, dtype=np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``; special tokens are kept, so decode(encode(x)) == x."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids[(ids < 0) | (ids >= self.vocab_size)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary of {self.vocab_size}")
        return self.hf.decode(ids.tolist(), skip_special_tokens=False)

    def token_bytes(self) -> list[bytes]:
        """The exact bytes of each id; special tokens are b"" (they are not text).

        Byte-level tokens may hold part of a UTF-8 character, so decoding ids one
        by one to str would lose bytes; this table does not.
        """
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        special = {t.content for t in self.hf.get_added_tokens_decoder().values() if t.special}
        table = [b""] * self.vocab_size
        for token, i in self.hf.get_vocab(with_added_tokens=True).items():
            if token in special:
                continue
            try:
                table[i] = bytes(byte_of[c] for c in token)
            except KeyError:
                raise DataError(
                    f"token {token!r} (id {i}) is not byte-level BPE; cannot count text bytes"
                ) from None
        return table

    def save(self, path: str | Path) -> None:
        """Write the standard Hugging Face tokenizer.json to ``path`` (a file or a folder)."""
        _write_atomic(_tokenizer_file(path), self.hf.to_str(pretty=True))


def train_char_tokenizer(chunks: Iterable[str]) -> CharTokenizer:
    """A CharTokenizer over every character that appears in ``chunks``."""
    seen = np.zeros(0x110000, dtype=bool)
    for chunk in chunks:
        # Marking a boolean table per code point is O(n) and far faster than set(chunk).
        seen[code_points(chunk)] = True
    if not seen.any():
        raise DataError("cannot train a char tokenizer on empty text")
    return CharTokenizer([chr(c) for c in np.flatnonzero(seen)])


def check_bpe_vocab_size(vocab_size: int) -> None:
    """ConfigError naming data.vocab_size unless 257 <= vocab_size <= 2**32 - 1."""
    if (
        isinstance(vocab_size, bool)
        or not isinstance(vocab_size, int | np.integer)
        or not MIN_BPE_VOCAB <= vocab_size <= MAX_VOCAB
    ):
        raise ConfigError(
            f"data.vocab_size must be an integer from {MIN_BPE_VOCAB} (256 bytes + {EOS_TOKEN}) "
            f"to {MAX_VOCAB} for a BPE tokenizer, got {vocab_size!r}"
        )


def train_bpe_tokenizer(
    chunks: Iterable[str], vocab_size: int, *, progress: bool = False
) -> BPETokenizer:
    """Train byte-level BPE on ``chunks`` (streamed); the vocabulary may come out smaller
    than ``vocab_size`` when the text has too few distinct merges."""
    check_bpe_vocab_size(vocab_size)
    hf = HFTokenizer(models.BPE())
    # No prefix space: text is fed in chunks, and a space added at each chunk
    # start would change the text.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    hf.train_from_iterator(chunks, trainer=trainer)
    return BPETokenizer(hf)


def encode_replacing(tokenizer: CharTokenizer | BPETokenizer, text: str) -> tuple[np.ndarray, int]:
    """Ids of ``text`` (int64) and how many characters were replaced: characters a char
    vocabulary lacks become "?" (else a space, else its first character), as fine-tuning
    data does with data.unknown_chars=replace. Byte-level BPE encodes everything."""
    try:
        return tokenizer.encode_array(text), 0
    except UnknownCharacterError:
        pass
    repl = next((c for c in ("?", " ") if c in tokenizer.chars), tokenizer.chars[0])
    # special tokens are whole ids: only the text between them is translated
    specials = tokenizer._special_re.findall(text) if tokenizer._special_re else []
    pieces = tokenizer._special_re.split(text) if tokenizer._special_re else [text]
    unknown = {c for c in set("".join(pieces)) if tokenizer.token_to_id(c) is None}
    table = str.maketrans(dict.fromkeys(unknown, repl))
    n = sum(p.count(c) for p in pieces for c in unknown)
    out = [x for pair in zip(pieces, [*specials, ""], strict=True) for x in pair]
    out[::2] = [p.translate(table) for p in pieces]
    return tokenizer.encode_array("".join(out)), n


def add_special_tokens(
    tokenizer: CharTokenizer | BPETokenizer, tokens: Sequence[str]
) -> CharTokenizer | BPETokenizer:
    """A copy of ``tokenizer`` with ``tokens`` as special tokens; existing ids keep their
    meaning and new ones follow them (so a model's embedding only grows at the end).
    Tokens it already has as special tokens are kept as they are."""
    if isinstance(tokenizer, CharTokenizer):
        new = [t for t in tokens if t not in tokenizer.specials]
        return CharTokenizer(tokenizer.chars, [*tokenizer.specials, *new])
    if not isinstance(tokenizer, BPETokenizer):
        raise TypeError(f"need a CharTokenizer or BPETokenizer, got {type(tokenizer).__name__}")
    hf = HFTokenizer.from_str(tokenizer.hf.to_str())
    have = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
    hf.add_special_tokens([t for t in tokens if t not in have])
    out = BPETokenizer(hf)
    for t in tokens:  # the new ids must follow the old ones
        if t not in have and out.token_to_id(t) < tokenizer.vocab_size:
            raise DataError(f"{t!r} is already an ordinary token of this tokenizer")
    return out


def load_tokenizer(path: str | Path) -> CharTokenizer | BPETokenizer:
    """Read a tokenizer.json of either kind (``path`` is the file or its folder)."""
    file = _tokenizer_file(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{file}: tokenizer file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: cannot read tokenizer ({e})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{file}: not a tokenizer.json (top level is not an object)")

    if "aigc_tokenizer" in doc:
        kind, version, chars = doc.get("aigc_tokenizer"), doc.get("version"), doc.get("chars")
        if kind != "char":
            raise CheckpointError(f"{file}: unknown aigc_tokenizer kind {kind!r}")
        if version != _CHAR_FORMAT_VERSION:
            raise CheckpointError(f"{file}: char tokenizer version {version!r} is not supported")
        if (
            not isinstance(chars, list)
            or not chars
            or len(set(chars)) != len(chars)
            or chars != sorted(chars)
        ):
            raise CheckpointError(f"{file}: 'chars' must be a sorted list of distinct characters")
        specials = doc.get("specials", [])
        if not isinstance(specials, list):
            raise CheckpointError(f"{file}: 'specials' must be a list of strings")
        try:
            return CharTokenizer(chars, specials)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{file}: {e}") from None

    model_type = doc.get("model", {}).get("type") if isinstance(doc.get("model"), dict) else None
    if model_type != "BPE":
        raise CheckpointError(
            f"{file}: neither an aigc char tokenizer nor a Hugging Face BPE tokenizer "
            f"(model type {model_type!r})"
        )
    try:
        return BPETokenizer(HFTokenizer.from_str(text))
    except Exception as e:  # the Rust side raises plain Exception on bad content
        raise CheckpointError(f"{file}: corrupt Hugging Face tokenizer ({e})") from None
