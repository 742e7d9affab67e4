"""Text metrics: likelihood units, sample diversity, repetition and memorisation.

Likelihood: ``perplexity_from_loss``, ``bits_per_char`` and ``bits_per_byte`` turn
summed cross-entropy (nats) into the units papers report.

Diversity and repetition of generated samples: ``distinct_n`` (Li et al. 2016)
and ``repetition_rate`` (seq-rep-n, Welleck et al. 2020), over words or
characters. Words are the pieces of ``str.split()`` (runs of Unicode
whitespace separate them) after Unicode NFC; punctuation stays attached to its
word and case is kept. Characters are code points after NFC.

Memorisation: the share of a sample's 50-character windows that occur verbatim
in the training text. ``CorpusIndex`` hashes every window of the training text
once (a rolling polynomial hash, vectorised with NumPy), keeps the hashes sorted
with the window positions alongside, and answers a query with a binary search;
every hash hit is then compared character by character against the training
text, so a hash collision is never counted as a copy.
"""

from __future__ import annotations

import codecs
import math
import os
import unicodedata
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np

from aigc.data.dedup import fmix64
from aigc.data.tokenizers import code_points
from aigc.errors import CheckpointError

Unit = Literal["word", "char"]

# --------------------------------------------------------------------------- likelihood units

LN2 = math.log(2.0)


def perplexity_from_loss(nats_per_token: float) -> float:
    """Perplexity ``exp(loss)`` of a mean cross-entropy in nats per token.

    Returns ``inf`` where ``exp`` overflows a float (loss above ~709.78) and
    ``nan`` for a ``nan`` loss, rather than raising.
    """
    try:
        return math.exp(nats_per_token)
    except OverflowError:
        return math.inf


def _bits_per_unit(total_nats: float, n_units: float, what: str) -> float:
    if n_units < 0:
        raise ValueError(f"{what} must be non-negative, got {n_units}")
    if n_units == 0:
        return math.nan  # no text: the rate is undefined
    return total_nats / (n_units * LN2)


def bits_per_char(total_nats: float, n_chars: float) -> float:
    """Bits per character: the summed cross-entropy (nats) of a text over its characters.

    ``total_nats`` is the negative log-likelihood of the whole text in nats (not a
    mean per token); ``n_chars`` its length in Unicode code points (a float is
    allowed for a pro-rated share). ``nan`` when ``n_chars`` is 0.
    """
    return _bits_per_unit(total_nats, n_chars, "n_chars")


def bits_per_byte(total_nats: float, n_bytes: float) -> float:
    """Bits per UTF-8 byte: the summed cross-entropy (nats) of a text over its bytes.

    As ``bits_per_char`` but divided by the text's length in UTF-8 bytes, which
    compares models with different tokenizers and alphabets. ``nan`` for 0 bytes.
    """
    return _bits_per_unit(total_nats, n_bytes, "n_bytes")


# --------------------------------------------------------------------------- diversity


def _check_texts(texts: Sequence[str]) -> None:
    # A bare string is a sequence of strings too; iterating it would score characters.
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings (one per sample), got a single str")


def _units(text: str, unit: Unit) -> list[str] | str:
    """The words (whitespace split) or characters of ``text`` after Unicode NFC."""
    text = unicodedata.normalize("NFC", text)
    if unit == "word":
        return text.split()
    if unit == "char":
        return text
    raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")


def _ngrams(text: str, n: int, unit: Unit) -> list[tuple[str, ...]] | list[str]:
    """The n-grams of one sample in order; none cross from one sample to the next."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    units = _units(text, unit)
    if unit == "char":
        return [units[i : i + n] for i in range(len(units) - n + 1)]
    return list(zip(*(units[i:] for i in range(n)), strict=False))


def distinct_n(texts: Sequence[str], n: int, unit: Unit = "word") -> float:
    """Distinct n-grams over all n-grams of the samples, in [0, 1] (Li et al. 2016).

    n-grams are taken within each sample (never across two), then pooled: the
    result is ``|set of all n-grams| / (number of n-grams)``. Li et al. divide by
    the number of generated tokens instead; the two agree for n = 1, and dividing
    by the n-gram count keeps every n on the same [0, 1] scale. ``nan`` when the
    samples hold no n-gram at all. Independent of the order of the samples.
    """
    _check_texts(texts)
    seen: set = set()
    total = 0
    for text in texts:
        grams = _ngrams(text, n, unit)
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else math.nan


def distinct_1_2_3(texts: Sequence[str], unit: Unit = "word") -> dict[str, float]:
    """``{"distinct_1": ..., "distinct_2": ..., "distinct_3": ...}`` of the samples."""
    return {f"distinct_{n}": distinct_n(texts, n, unit) for n in (1, 2, 3)}


def repetition_rate(texts: Sequence[str], n: int = 4, unit: Unit = "word") -> float:
    """Mean share of each sample's n-grams that repeat an n-gram seen earlier in it.

    For one sample with n-grams g_1..g_m, the share is
    ``#{i : g_i in {g_1..g_(i-1)}} / m = 1 - |unique n-grams| / m``, which is
    seq-rep-n of Welleck et al. 2020 ("Neural text generation with unlikelihood
    training", eq. 11). Shares are averaged over samples with equal weight;
    samples with no n-gram (fewer than n units) are left out of the mean, and
    ``nan`` is returned when no sample has one. 0 = no repetition.
    """
    _check_texts(texts)
    shares = []
    for text in texts:
        grams = _ngrams(text, n, unit)
        if grams:
            shares.append(1.0 - len(set(grams)) / len(grams))
    return sum(shares) / len(shares) if shares else math.nan


# Metrics of a list of samples alone, by the name they are logged under. Add your
# own here: any function from a list of strings to a float.
SAMPLE_METRICS: dict[str, Callable[[Sequence[str]], float]] = {
    "distinct_1": partial(distinct_n, n=1),
    "distinct_2": partial(distinct_n, n=2),
    "distinct_3": partial(distinct_n, n=3),
    "rep_4": partial(repetition_rate, n=4),
}


# --------------------------------------------------------------------------- window hashes

_BASE = 0x9E3779B97F4A7C15  # odd, so it has an inverse modulo 2**64
_BASE_INV = pow(_BASE, -1, 1 << 64)
_HASH_BLOCK = 1 << 20  # windows hashed per block; bounds the temporaries (~40 MB)
_INDEX_VERSION = 1
DOCUMENT_SEPARATOR = 0x110000  # one past the last code point: equals no character


def _powers(base: int, n: int) -> np.ndarray:
    """``base**0 .. base**(n-1)`` modulo 2**64, as uint64."""
    out = np.full(n, base, dtype=np.uint64)
    out[0] = 1
    return np.cumprod(out, dtype=np.uint64)  # integer overflow wraps modulo 2**64


def window_hashes(symbols: np.ndarray, window: int, hash_bits: int = 64) -> np.ndarray:
    """Hash of every window of ``window`` consecutive symbols, (len - window + 1,) uint64.

    The hash of ``s[i : i + w]`` is the polynomial ``sum_j s[i+j] * B**(w-1-j)``
    modulo 2**64, passed through a bijective mixer and kept to its low
    ``hash_bits`` bits. It depends only on the window's symbols, never on where
    the window lies. All windows are computed at once from prefix sums (rolling,
    O(1) per window whatever the width): with ``Q[k] = sum_(j<k) s[j] * B**-j``,
    the window at i is ``(Q[i+w] - Q[i]) * B**(i+w-1)``; B is odd, so ``B**-1``
    exists modulo 2**64. Work proceeds in blocks to bound memory.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    if not 1 <= hash_bits <= 64:
        raise ValueError(f"hash_bits must be between 1 and 64, got {hash_bits}")
    n_windows = max(len(symbols) - window + 1, 0)
    out = np.empty(n_windows, dtype=np.uint64)
    block = min(_HASH_BLOCK, n_windows)
    if block == 0:
        return out
    inv_pow = _powers(_BASE_INV, block + window - 1)  # B**-j for j in the block
    pow_ = _powers(_BASE, block + window - 1)[window - 1 :]  # B**(i+w-1)
    q = np.zeros(block + window, dtype=np.uint64)
    for a in range(0, n_windows, block):
        m = min(block, n_windows - a)  # windows in this block
        s = np.asarray(symbols[a : a + m + window - 1], dtype=np.uint64)
        np.cumsum(s * inv_pow[: len(s)], out=q[1 : len(s) + 1])
        h = q[window : window + m] - q[:m]
        h *= pow_[:m]
        out[a : a + m] = fmix64(h)
    if hash_bits < 64:
        out &= np.uint64((1 << hash_bits) - 1)
    return out


# --------------------------------------------------------------------------- index


def _text_code_points(text: str | bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """The code points of a text: uint8 when all are ASCII, else uint32 (no copy of arrays).

    str: its characters. bytes-like: UTF-8, decoded strictly. uint8 array: UTF-8
    bytes too, used as they are when all are ASCII (a memory-mapped ASCII file
    is not copied), else decoded. Any other integer array: code points already
    (e.g. a uint32 memmap), used as it is.
    """
    if isinstance(text, str):
        return code_points(text)
    if isinstance(text, bytes | bytearray | memoryview):
        return code_points(bytes(text).decode("utf-8"))
    if not isinstance(text, np.ndarray) or text.ndim != 1 or text.dtype.kind not in "ui":
        raise TypeError(
            "text must be a str, UTF-8 bytes, or a 1-D integer array, got "
            f"{type(text).__name__}{getattr(text, 'shape', '')}"
        )
    if text.dtype == np.uint8 and len(text) and int(text.max()) >= 0x80:
        return code_points(text.tobytes().decode("utf-8"))
    return text


@dataclass(frozen=True)
class MemorisationCounts:
    """How many generated windows occur verbatim in the training text."""

    window: int  # characters per window
    n_samples: int  # samples given
    n_windows: int  # windows of all samples (every offset; a short sample has none)
    n_memorised: int  # of those, windows found verbatim in the training text
    n_samples_copied: int  # samples with at least one memorised window

    @property
    def rate(self) -> float:
        """``n_memorised / n_windows``; ``nan`` when there are no windows."""
        return self.n_memorised / self.n_windows if self.n_windows else math.nan


class CorpusIndex:
    """Every window of ``window`` characters of a training text, for exact look-ups.

    Arrays (n = number of windows = max(len(text) - window + 1, 0)):
      ``text``: the corpus as code points, (len,) uint8 if ASCII else uint32; may be
        a memory-mapped array, which is only read where a hash hits.
      ``hashes``: (n,) uint64, ``window_hashes`` of every window, sorted.
      ``positions``: (n,) uint32 (int64 beyond 2**32 windows), the start of the
        window behind each hash (ties in increasing position).

    Memory: 12 bytes per corpus character for the index (8 for the hash, 4 for
    the position) plus the text (1 byte per character for ASCII, 4 otherwise;
    none resident for a memmap). Building briefly needs about 24 bytes per
    character (the unsorted hashes, the sort order and the sorted hashes).
    Build with ``CorpusIndex.build``; cache with ``save`` / ``load`` (.npz).
    """

    def __init__(
        self,
        text: np.ndarray,
        hashes: np.ndarray,
        positions: np.ndarray,
        window: int,
        hash_bits: int = 64,
    ):
        self.text = text
        self.hashes = hashes
        self.positions = positions
        self.window = window
        self.hash_bits = hash_bits

    def __repr__(self) -> str:
        return (
            f"CorpusIndex(window={self.window}, n_chars={len(self.text)}, "
            f"n_windows={len(self)}, hash_bits={self.hash_bits})"
        )

    def __len__(self) -> int:
        return len(self.hashes)

    @property
    def nbytes(self) -> int:
        """Bytes held by the index arrays and the text (a memmap's counted in full)."""
        return self.hashes.nbytes + self.positions.nbytes + self.text.nbytes

    # building -----------------------------------------------------------------
    @classmethod
    def build(
        cls,
        text: str | bytes | np.ndarray,
        window: int = 50,
        *,
        hash_bits: int = 64,
    ) -> CorpusIndex:
        """Index every window of ``window`` characters of the training text.

        text: a str; UTF-8 bytes; a uint8 array of UTF-8 (memory-mapped ASCII is
            used without a copy); or an integer array of code points, e.g. a uint32
            memmap or ``code_points_of_tokens(corpus.train, tokenizer)``.
        window: characters (code points) per window.
        hash_bits: keep this many low bits of each hash. Only for tests: below 64,
            hashes collide often; answers stay exact (every hit is verified) but
            look-ups slow down.
        """
        symbols = _text_code_points(text)
        hashes = window_hashes(symbols, window, hash_bits)  # (n,)
        order = np.argsort(hashes, kind="stable")
        hashes = hashes[order]
        pos_dtype = np.uint32 if len(order) <= 1 << 32 else np.int64
        positions = order.astype(pos_dtype)
        return cls(symbols, hashes, positions, window, hash_bits)

    # queries -----------------------------------------------------------------
    def _verify(
        self, symbols: np.ndarray, starts: np.ndarray, corpus_pos: np.ndarray
    ) -> np.ndarray:
        """True where ``symbols[start : start + w] == text[pos : pos + w]``, (m,) bool."""
        w = self.window
        offsets = np.arange(w, dtype=np.int64)
        out = np.empty(len(starts), dtype=bool)
        step = max(1, (1 << 22) // w)  # rows compared at once (~32 MB of indices)
        for a in range(0, len(starts), step):
            q = symbols[starts[a : a + step, None] + offsets]  # (rows, w)
            c = self.text[corpus_pos[a : a + step, None].astype(np.int64) + offsets]
            out[a : a + step] = (q == c).all(axis=1)
        return out

    def _lookup(self, symbols: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """True for each window ``symbols[s : s + w]`` (s in ``starts``) found in the text."""
        found = np.zeros(len(starts), dtype=bool)
        n = len(self.hashes)
        if n == 0 or len(starts) == 0:
            return found
        q = window_hashes(symbols, self.window, self.hash_bits)[starts]  # (m,)
        # Searching in increasing order lets each search start from the last
        # result: ~20x faster than random order on a large index.
        order = np.argsort(q)
        lo = np.empty(len(q), dtype=np.int64)
        lo[order] = np.searchsorted(self.hashes, q[order], side="left")
        hit = np.flatnonzero(self.hashes[np.minimum(lo, n - 1)] == q)
        # 1. Compare each hit with the first corpus window of that hash.
        ok = self._verify(symbols, starts[hit], self.positions[lo[hit]])
        found[hit[ok]] = True
        # 2. A mismatch there is a collision, or another window of the same hash
        # follows: compare with the rest of that hash's run (rare).
        rest = hit[~ok]
        hi = np.searchsorted(self.hashes, q[rest], side="right")
        for i, a, b in zip(rest.tolist(), (lo[rest] + 1).tolist(), hi.tolist(), strict=True):
            for c in range(a, b, 4096):
                pos = self.positions[c : min(b, c + 4096)]
                if self._verify(symbols, np.full(len(pos), starts[i]), pos).any():
                    found[i] = True
                    break
        return found

    def contains(self, windows: Sequence[str] | np.ndarray) -> np.ndarray:
        """For each window, whether it occurs verbatim in the text, (m,) bool.

        windows: strings of exactly ``window`` characters, or an (m, window)
            integer array of code points.
        """
        w = self.window
        if isinstance(windows, np.ndarray):
            if windows.ndim != 2 or windows.shape[1] != w or windows.dtype.kind not in "ui":
                raise ValueError(
                    f"windows must be an (m, {w}) integer array of code points, "
                    f"got {windows.dtype} {windows.shape}"
                )
            symbols = windows.reshape(-1)
            m = windows.shape[0]
        else:
            if isinstance(windows, str):
                raise TypeError("windows must be a list of strings, got a single str")
            bad = [x for x in windows if len(x) != w]
            if bad:
                raise ValueError(
                    f"every window must have {w} characters; got one of {len(bad[0])}: {bad[0]!r}"
                )
            symbols = code_points("".join(windows))
            m = len(windows)
        return self._lookup(symbols, np.arange(m, dtype=np.int64) * w)

    def memorised_mask(self, sample: str) -> np.ndarray:
        """For each offset i of ``sample``, whether ``sample[i : i + window]`` is in the text.

        Shape (max(len(sample) - window + 1, 0),) bool; marks the copied spans.
        """
        n = max(len(sample) - self.window + 1, 0)
        return self._lookup(code_points(sample), np.arange(n, dtype=np.int64))

    # files -----------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the index and its text to ``path`` as an uncompressed .npz (no pickles)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(
                f,
                version=np.int64(_INDEX_VERSION),
                window=np.int64(self.window),
                hash_bits=np.int64(self.hash_bits),
                text=np.asarray(self.text),
                hashes=self.hashes,
                positions=self.positions,
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> CorpusIndex:
        """Read an index written by ``save``; CheckpointError if missing, stale or corrupt."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise CheckpointError(f"{path}: corpus index not found; build it again") from None
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"{path}: not a readable .npz corpus index ({e})") from None
        need = {"version", "window", "hash_bits", "text", "hashes", "positions"}
        if set(arrays) != need:
            raise CheckpointError(f"{path}: not a corpus index (arrays {sorted(arrays)})")
        if int(arrays["version"]) != _INDEX_VERSION:
            raise CheckpointError(
                f"{path}: corpus index version {int(arrays['version'])}, this aigc reads "
                f"{_INDEX_VERSION}; build it again"
            )
        window, text = int(arrays["window"]), arrays["text"]
        hashes, positions = arrays["hashes"], arrays["positions"]
        n = max(len(text) - window + 1, 0)
        if (
            window < 1
            or hashes.dtype != np.uint64
            or hashes.shape != (n,)
            or positions.shape != (n,)
            or (text.dtype == np.uint8 and n and int(text.max()) >= 0x80)
        ):
            raise CheckpointError(f"{path}: corrupt corpus index (array shapes or types)")
        return cls(text, hashes, positions, window, int(arrays["hash_bits"]))


def memorisation_counts(samples: Sequence[str], index: CorpusIndex) -> MemorisationCounts:
    """Count the windows of ``samples`` that occur verbatim in the index's text.

    Every window of ``index.window`` characters at every offset of each sample
    is looked up; a sample shorter than the window contributes none. Characters
    are code points, compared exactly (no normalisation: pass samples normalised
    as the corpus was, e.g. with ``aigc.data.text.normalize_text``).
    """
    _check_texts(samples)
    w = index.window
    lengths = np.array([len(s) for s in samples], dtype=np.int64)
    counts = np.maximum(lengths - w + 1, 0)  # windows per sample
    n_windows = int(counts.sum())
    if n_windows == 0:
        return MemorisationCounts(w, len(samples), 0, 0, 0)
    # All samples in one array; window starts never cross into the next sample.
    offsets = np.cumsum(lengths) - lengths
    owner = np.repeat(np.arange(len(samples)), counts)  # sample of each window
    first = np.cumsum(counts) - counts
    starts = offsets[owner] + np.arange(n_windows) - first[owner]
    found = index._lookup(code_points("".join(samples)), starts)
    copied = np.bincount(owner[found], minlength=len(samples)) > 0
    return MemorisationCounts(w, len(samples), n_windows, int(found.sum()), int(copied.sum()))


def memorisation_rate(samples: Sequence[str], index: CorpusIndex) -> float:
    """Share of the samples' windows found verbatim in the training text, in [0, 1].

    ``nan`` when the samples have no window (all shorter than ``index.window``).
    """
    return memorisation_counts(samples, index).rate


# --------------------------------------------------------------------------- training text


def code_points_of_tokens(ids: np.ndarray, tokenizer: object, block: int = 1 << 20) -> np.ndarray:
    """The text behind token ids (e.g. ``TokenCorpus.train``) as code points, for indexing.

    Returns uint8 when the text is ASCII, else uint32 (1 or 4 bytes per character).
    Char tokenizers: one character per id; the "\\n\\n" between documents is kept,
    as it is in the token stream. Byte-level BPE: token bytes decoded as UTF-8;
    each end-of-text id becomes ``DOCUMENT_SEPARATOR`` (a value no character
    has), so no window spans two documents; a character cut by the end of
    ``ids`` is left out.
    """
    from aigc.data.tokenizers import BPETokenizer, CharTokenizer

    if isinstance(tokenizer, CharTokenizer):
        cps = [ord(c) for c in tokenizer.chars]
        table = np.array(cps, dtype=np.uint8 if max(cps) < 0x80 else np.uint32)
        return table[np.asarray(ids)]
    if not isinstance(tokenizer, BPETokenizer):
        raise TypeError(f"need a CharTokenizer or BPETokenizer, got {type(tokenizer).__name__}")
    table = tokenizer.token_bytes()
    # A lone surrogate cannot occur in corpus text (it is not valid UTF-8), so it
    # marks document ends through decoding and is then swapped for the separator.
    marker = 0xDFFF
    if tokenizer.eos_id is not None:
        table[tokenizer.eos_id] = chr(marker).encode("utf-8", "surrogatepass")
    lengths = np.array([len(b) for b in table], dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    blob = np.frombuffer(b"".join(table), dtype=np.uint8)
    decoder = codecs.getincrementaldecoder("utf-8")("surrogatepass")
    parts = []
    for i in range(0, len(ids), block):
        tok = np.asarray(ids[i : i + block], dtype=np.int64)
        lens = lengths[tok]
        out_start = np.cumsum(lens) - lens
        # Output byte k of token j is blob[starts[j] + k - out_start[j]].
        gather = np.repeat(starts[tok] - out_start, lens) + np.arange(int(lens.sum()))
        cps = code_points(decoder.decode(blob[gather].tobytes()))
        if cps.dtype == np.uint32:
            cps = np.where(cps == marker, np.uint32(DOCUMENT_SEPARATOR), cps)
        parts.append(cps)
    if not parts:
        return np.zeros(0, dtype=np.uint8)
    return np.concatenate(parts)
