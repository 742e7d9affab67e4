"""Duplicate documents: exact (a hash of the text) and near (MinHash with locality-sensitive
hashing), streamed over a corpus in its order, the first of each group kept.

Near duplicates follow Broder (1997) and chapter 3 of Leskovec, Rajaraman and Ullman,
*Mining of Massive Datasets*: a document is the set of its shingles (n consecutive words
or characters, lower-cased); the Jaccard similarity of two sets equals the probability
that one random permutation gives both the same minimum, so a signature of ``num_perm``
minima estimates it by the share of equal entries. Signatures are cut into ``bands`` of
``rows``; two documents become candidates when a whole band is equal, which happens with
probability 1 - (1 - s^rows)^bands for similarity s (the S-curve), and a candidate is a
duplicate when its signature estimate reaches the threshold. (bands, rows) are chosen
for the threshold by weighing the false-positive and false-negative areas under that
curve, as Lee et al. (ACL 2022) and ``datasketch`` do.

Memory grows with the documents kept, never with their text: per kept document its
signature (``num_perm`` x 4 bytes) and one 12-byte entry per band.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from aigc.errors import ConfigError

DEDUP_MODES = ("exact", "near", "off")
SHINGLES = ("word", "char")
_BLOCK = 4096  # shingles hashed at once: a (_BLOCK, num_perm) uint64 array
_EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)
_WORD = re.compile(r"\w+")
_TRAILING_WORD = re.compile(r"\w+\Z")
_SPACES = re.compile(r"\s+")
# Candidates are checked against the threshold by their signature estimate, so a false
# positive of the banding costs one comparison and a false negative a missed duplicate:
# the index weighs misses 9 to 1 (F1 0.916 -> 0.960 in benchmarks/privacy_dedup.py).
VERIFIED_WEIGHTS = (0.1, 0.9)


def dedup_mode(value: bool | str, key: str = "data.dedup") -> str:
    """``exact``, ``near`` or ``off``; the booleans of older configs mean exact (true) and
    off (false). ConfigError naming ``key`` for anything else."""
    if value is True:
        return "exact"
    if value is False:
        return "off"
    if value in DEDUP_MODES:
        return value  # type: ignore[return-value]
    raise ConfigError(f"{key}={value!r} is not allowed; expected one of exact, near, off")


def check_near_settings(
    threshold: float, shingle: str, ngram: int, num_perm: int, prefix: str = "data.dedup_"
) -> None:
    """ConfigError naming the key for a threshold outside (0, 1], an unknown shingle, an
    n-gram size below 1 or a permutation count outside [2, 4096]."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise ConfigError(f"{prefix}threshold={threshold!r} must be a number in (0, 1]")
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"{prefix}threshold={threshold} must be in (0, 1] (a Jaccard similarity)")
    if shingle not in SHINGLES:
        raise ConfigError(f"{prefix}shingle={shingle!r} must be word or char")
    if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 1:
        raise ConfigError(f"{prefix}ngram={ngram!r} must be a whole number of at least 1")
    if isinstance(num_perm, bool) or not isinstance(num_perm, int) or not 2 <= num_perm <= 4096:
        raise ConfigError(f"{prefix}num_perm={num_perm!r} must be a whole number in [2, 4096]")


def exact_key(text: str) -> bytes:
    """SHA-256 of the UTF-8 text (the readers have already put it in NFC with ``\\n``)."""
    return hashlib.sha256(text.encode("utf-8")).digest()


# --------------------------------------------------------------------------- LSH parameters


def candidate_probability(s: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """P(two documents of Jaccard similarity s share a band): 1 - (1 - s^rows)^bands."""
    return 1.0 - (1.0 - np.asarray(s, dtype=np.float64) ** rows) ** bands


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(((y[1:] + y[:-1]) * np.diff(x)).sum() / 2)


def lsh_params(
    threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5
) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm that minimise
    fp_weight * FP + fn_weight * FN, where FP is the area under the S-curve below the
    threshold (pairs that become candidates but should not) and FN the area above the
    curve beyond it (pairs that should but do not)."""
    s_lo = np.linspace(0.0, threshold, 1001)
    s_hi = np.linspace(threshold, 1.0, 1001)
    best, best_err = (1, 1), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = _trapezoid(candidate_probability(s_lo, b, r), s_lo)
            fn = _trapezoid(1.0 - candidate_probability(s_hi, b, r), s_hi)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


# --------------------------------------------------------------------------- MinHash


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (a bijection that spreads every input bit), in place."""
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


class MinHasher:
    """Signatures of ``num_perm`` minima over a text's shingles.

    shingle: "word" (runs of letters and digits, lower-cased) or "char" (characters,
        lower-cased, each run of whitespace one space).
    ngram: words or characters per shingle; a text with fewer has one shingle, itself.
    seed: the permutations; signatures are comparable only under the same seed.

    Permutation i maps a 64-bit shingle hash x to a_i * x + b_i mod 2^64 (a_i odd: a
    bijection); the signature keeps the top 32 bits of each minimum.
    """

    def __init__(self, num_perm: int = 128, shingle: str = "word", ngram: int = 5, seed: int = 1):
        check_near_settings(1.0, shingle, ngram, num_perm, prefix="")
        self.num_perm, self.shingle, self.ngram, self.seed = num_perm, shingle, ngram, seed
        rng = np.random.default_rng([seed, 0x4D696E48])
        self._a = rng.integers(0, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
        # shingle hash = fmix64(sum_k token[i + k] * mult[k]), mult odd
        self._mult = rng.integers(0, 2**63, ngram, dtype=np.uint64) * np.uint64(2) + np.uint64(1)

    def __repr__(self) -> str:
        return (f"MinHasher(num_perm={self.num_perm}, shingle={self.shingle!r}, "
                f"ngram={self.ngram}, seed={self.seed})")  # fmt: skip

    def sketch(self) -> MinHashSketch:
        """An empty sketch to feed a text in chunks."""
        return MinHashSketch(self)

    def signature(self, text: str) -> np.ndarray:
        """(num_perm,) uint32 signature of a whole text."""
        s = self.sketch()
        s.update(text)
        return s.digest()

    def signatures(self, texts: Iterable[str]) -> np.ndarray:
        """(N, num_perm) uint32 signatures of the texts."""
        sigs = [self.signature(t) for t in texts]
        return np.stack(sigs) if sigs else np.zeros((0, self.num_perm), np.uint32)

    def _tokens(self, text: str) -> np.ndarray:
        """uint64 per token: a word's BLAKE2b-64, or a character's code point."""
        if self.shingle == "char":
            return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        words = _WORD.findall(text)
        table = {w: _word_hash(w) for w in set(words)}
        return np.fromiter((table[w] for w in words), dtype=np.uint64, count=len(words))

    def _shingles(self, tokens: np.ndarray) -> np.ndarray:
        """Hashes of every ``ngram`` consecutive tokens, (len - ngram + 1,) uint64."""
        n = len(tokens) - self.ngram + 1
        h = np.zeros(max(n, 0), dtype=np.uint64)
        for k in range(self.ngram):
            h += tokens[k : k + n] * self._mult[k]
        return fmix64(h)

    def _minima(self, shingles: np.ndarray, out: np.ndarray) -> None:
        """out (num_perm,) uint64 = min(out, min over shingles of a * x + b)."""
        for i in range(0, len(shingles), _BLOCK):
            x = shingles[i : i + _BLOCK, None]  # (B, 1)
            v = x * self._a[None, :] + self._b[None, :]  # (B, num_perm), mod 2^64
            np.minimum(out, v.min(axis=0), out=out)


class MinHashSketch:
    """The running minima of one text fed in chunks; ``digest()`` gives its signature,
    the same as ``MinHasher.signature`` of the whole text."""

    def __init__(self, hasher: MinHasher):
        self.hasher = hasher
        self.minima = np.full(hasher.num_perm, _EMPTY, dtype=np.uint64)
        self._text = ""  # a word or a whitespace run that may go on in the next chunk
        self._tail = np.zeros(0, dtype=np.uint64)  # the last ngram - 1 tokens
        self._n_tokens = 0
        self._last_space = False  # char shingles: the text so far ends with a space

    def update(self, text: str) -> None:
        """Add the next piece of the text."""
        h = self.hasher
        text = self._text + text.lower()
        if h.shingle == "word":
            m = _TRAILING_WORD.search(text)
            cut = m.start() if m else len(text)
            self._text, text = text[cut:], text[:cut]
        else:
            text = _SPACES.sub(" ", text)
            if self._last_space and text.startswith(" "):
                text = text[1:]
            if text:
                self._last_space = text.endswith(" ")
        tokens = h._tokens(text)
        if len(tokens) == 0:
            return
        self._n_tokens += len(tokens)
        tokens = np.concatenate([self._tail, tokens])
        h._minima(h._shingles(tokens), self.minima)
        self._tail = tokens[len(tokens) - (h.ngram - 1) :] if h.ngram > 1 else tokens[:0]

    def digest(self) -> np.ndarray:
        """(num_perm,) uint32: the top 32 bits of each permutation's minimum. A text with
        no shingle (empty) has all entries 2^32 - 1."""
        h = self.hasher
        if self._text:
            self.update("\x00" if h.shingle == "word" else "")  # the last word is whole
            self._text = ""
        minima = self.minima.copy()
        if 0 < self._n_tokens < h.ngram:  # too short for one n-gram: the text is one shingle
            tail = np.concatenate([np.zeros(h.ngram - len(self._tail), np.uint64), self._tail])
            h._minima(h._shingles(tail), minima)
        return (minima >> np.uint64(32)).astype(np.uint32)


def jaccard_estimate(a: np.ndarray, b: np.ndarray) -> float:
    """The share of equal entries of two signatures: an unbiased estimate of the
    Jaccard similarity of the shingle sets (standard error sqrt(J(1-J)/num_perm))."""
    if a.shape != b.shape:
        raise ValueError(f"signatures of different lengths: {a.shape} and {b.shape}")
    return float(np.mean(a == b))


# --------------------------------------------------------------------------- the index


class _BandTable:
    """band key -> rows of the kept signatures that have it: sorted arrays (12 bytes an
    entry) and a small dict of recent entries, merged in when it grows."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, dtype=np.uint64)
        self.rows = np.zeros(0, dtype=np.int32)
        self.recent: dict[int, list[int]] = {}
        self.n_recent = 0

    def __len__(self) -> int:
        return len(self.keys) + self.n_recent

    def add(self, keys: np.ndarray, row: int) -> None:
        for k in keys.tolist():
            self.recent.setdefault(k, []).append(row)
        self.n_recent += len(keys)
        if self.n_recent > max(1 << 14, len(self.keys) // 2):
            self._merge()

    def _merge(self) -> None:
        new_keys = np.fromiter(
            (k for k, rows in self.recent.items() for _ in rows), np.uint64, self.n_recent
        )
        new_rows = np.fromiter(
            (r for rows in self.recent.values() for r in rows), np.int32, self.n_recent
        )
        keys = np.concatenate([self.keys, new_keys])
        rows = np.concatenate([self.rows, new_rows])
        order = np.argsort(keys, kind="stable")
        self.keys, self.rows = keys[order], rows[order]
        self.recent, self.n_recent = {}, 0

    def lookup(self, keys: np.ndarray) -> list[int]:
        lo = np.searchsorted(self.keys, keys, side="left")
        hi = np.searchsorted(self.keys, keys, side="right")
        out = [
            int(r) for a, b in zip(lo.tolist(), hi.tolist(), strict=True) for r in self.rows[a:b]
        ]
        for k in keys.tolist():
            out += self.recent.get(k, ())
        return out

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.rows.nbytes + 12 * self.n_recent


class NearDuplicateIndex:
    """The signatures of the documents kept so far, banded for LSH.

    threshold: Jaccard similarity at and above which a document is a near duplicate.
    num_perm: signature length (the MinHasher's).
    bands, rows: the LSH banding; default ``lsh_params(threshold, num_perm, 0.1, 0.9)``
        (misses weighed 9 to 1, as candidates are verified).
    """

    def __init__(
        self,
        threshold: float = 0.8,
        num_perm: int = 128,
        bands: int | None = None,
        rows: int | None = None,
        seed: int = 1,
    ):
        check_near_settings(threshold, "word", 1, num_perm, prefix="")
        if (bands is None) != (rows is None):
            raise ValueError("give both bands and rows, or neither")
        if bands is None or rows is None:
            bands, rows = lsh_params(threshold, num_perm, *VERIFIED_WEIGHTS)
        if bands < 1 or rows < 1 or bands * rows > num_perm:
            raise ValueError(f"bands={bands} x rows={rows} must be at most num_perm={num_perm}")
        self.threshold, self.num_perm, self.bands, self.rows = threshold, num_perm, bands, rows
        rng = np.random.default_rng([seed, 0x4C5348])
        self._mult = rng.integers(0, 2**63, rows + 1, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._table = _BandTable()
        self._sigs = np.zeros((16, num_perm), dtype=np.uint32)  # kept signatures, grown x2
        self._ids: list[int] = []  # the caller's id of each kept signature

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def nbytes(self) -> int:
        """Bytes held for the kept documents: signatures and band entries."""
        return len(self._ids) * self.num_perm * 4 + self._table.nbytes

    def band_keys(self, signature: np.ndarray) -> np.ndarray:
        """(bands,) uint64: a hash of each band of ``signature`` and the band's number."""
        sig = np.asarray(signature, dtype=np.uint32)
        if sig.shape != (self.num_perm,):
            raise ValueError(f"signature of shape {sig.shape}, expected ({self.num_perm},)")
        b = sig[: self.bands * self.rows].reshape(self.bands, self.rows).astype(np.uint64)
        h = (b * self._mult[: self.rows]).sum(axis=1)  # mod 2^64
        h += np.arange(self.bands, dtype=np.uint64) * self._mult[self.rows]
        return fmix64(h)

    def candidates(self, signature: np.ndarray) -> list[int]:
        """Ids of the kept signatures that share at least one band with ``signature``."""
        rows = sorted(set(self._table.lookup(self.band_keys(signature))))
        return [self._ids[r] for r in rows]

    def query(self, signature: np.ndarray) -> tuple[int, float] | None:
        """(id, estimated Jaccard) of the most similar candidate whose estimate reaches the
        threshold (the earliest kept among equals), else None."""
        rows = sorted(set(self._table.lookup(self.band_keys(signature))))
        if not rows:
            return None
        est = (self._sigs[rows] == signature[None, :]).mean(axis=1)
        best = int(np.argmax(est))
        if est[best] < self.threshold:
            return None
        return self._ids[rows[best]], float(est[best])

    def insert(self, signature: np.ndarray, id: int) -> None:
        """Keep ``signature`` under the caller's ``id`` (e.g. the document's position)."""
        row = len(self._ids)
        if row == len(self._sigs):
            self._sigs = np.concatenate([self._sigs, np.zeros_like(self._sigs)])
        self._sigs[row] = signature
        self._ids.append(id)
        self._table.add(self.band_keys(signature), row)

    def add(self, signature: np.ndarray, id: int) -> tuple[int, float] | None:
        """``query``; when nothing matches, ``insert``. Returns the match, if any."""
        match = self.query(signature)
        if match is None:
            self.insert(signature, id)
        return match


# --------------------------------------------------------------------------- corpora


@dataclass(frozen=True)
class DuplicatePair:
    """A dropped document and the kept one it repeats (positions in the stream)."""

    dropped: int
    kept: int
    jaccard: float  # 1.0 for exact duplicates; else the signature estimate
    kind: str = "near"  # "exact" or "near"


@dataclass
class DedupResult:
    """Which documents survive de-duplication, and why the others do not."""

    keep: list[bool] = field(default_factory=list)  # one flag per document, in order
    pairs: list[DuplicatePair] = field(default_factory=list)  # one per dropped document
    n_exact: int = 0
    n_near: int = 0

    @property
    def kept(self) -> list[int]:
        """Positions of the kept documents."""
        return [i for i, k in enumerate(self.keep) if k]


class Deduplicator:
    """Streaming de-duplication: ``check(i, text or chunks)`` says whether document ``i``
    repeats an earlier kept one (exactly, then nearly) and, if not, remembers it.

    mode: "exact", "near" (exact first, then MinHash-LSH) or "off".
    The rest: see ``MinHasher`` and ``NearDuplicateIndex``.
    """

    def __init__(
        self,
        mode: str = "near",
        threshold: float = 0.8,
        num_perm: int = 128,
        shingle: str = "word",
        ngram: int = 5,
        seed: int = 1,
        bands: int | None = None,
        rows: int | None = None,
    ):
        self.mode = dedup_mode(mode, key="dedup")
        check_near_settings(threshold, shingle, ngram, num_perm, prefix="dedup_")
        self.hasher = MinHasher(num_perm, shingle, ngram, seed) if self.mode == "near" else None
        self.index = (
            NearDuplicateIndex(threshold, num_perm, bands, rows, seed=seed) if self.hasher else None
        )
        self._seen: dict[bytes, int] = {}  # exact key -> id of the kept document

    def start(self) -> _DocumentCheck:
        """Begin a document to be fed in chunks."""
        return _DocumentCheck(self)

    def check(self, id: int, text: str | Iterable[str]) -> DuplicatePair | None:
        """The pair (id, earlier kept id, Jaccard) if document ``id`` is a duplicate,
        else None (and the document is kept)."""
        doc = self.start()
        for chunk in [text] if isinstance(text, str) else text:
            doc.update(chunk)
        return doc.finish(id)


class _DocumentCheck:
    def __init__(self, dedup: Deduplicator):
        self.dedup = dedup
        self.sha = hashlib.sha256() if dedup.mode != "off" else None
        self.sketch = dedup.hasher.sketch() if dedup.hasher is not None else None

    def update(self, chunk: str) -> None:
        if self.sha is not None:
            self.sha.update(chunk.encode("utf-8"))
        if self.sketch is not None:
            self.sketch.update(chunk)

    def finish(self, id: int) -> DuplicatePair | None:
        d = self.dedup
        if self.sha is None:
            return None
        key = self.sha.digest()
        if key in d._seen:
            return DuplicatePair(id, d._seen[key], 1.0, "exact")
        if self.sketch is not None and d.index is not None:
            match = d.index.add(self.sketch.digest(), id)
            if match is not None:
                return DuplicatePair(id, match[0], match[1], "near")
        d._seen[key] = id
        return None


def deduplicate(
    texts: Iterable[str],
    mode: str = "near",
    threshold: float = 0.8,
    num_perm: int = 128,
    shingle: str = "word",
    ngram: int = 5,
    seed: int = 1,
    bands: int | None = None,
    rows: int | None = None,
) -> DedupResult:
    """De-duplicate ``texts`` in order, keeping the first of each group.

    mode: "exact" (identical text), "near" (exact, then estimated Jaccard similarity of
        shingle sets >= threshold against a kept document), or "off".
    threshold, num_perm, shingle, ngram, seed, bands, rows: see ``MinHasher`` and
        ``NearDuplicateIndex``.
    """
    d = Deduplicator(mode, threshold, num_perm, shingle, ngram, seed, bands, rows)
    result = DedupResult()
    for i, text in enumerate(texts):
        pair = d.check(i, text)
        result.keep.append(pair is None)
        if pair is not None:
            result.pairs.append(pair)
            if pair.kind == "exact":
                result.n_exact += 1
            else:
                result.n_near += 1
    return result
