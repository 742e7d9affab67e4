"""Text metrics against hand-computed values and independent brute-force computations."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

import aigc.metrics.text as tm
from aigc.data.text import TextSource, build_corpus, normalize_text
from aigc.data.tokenizers import EOS_TOKEN, CharTokenizer, train_bpe_tokenizer
from aigc.errors import CheckpointError
from aigc.metrics.text import (
    DOCUMENT_SEPARATOR,
    SAMPLE_METRICS,
    CorpusIndex,
    bits_per_byte,
    bits_per_char,
    code_points_of_tokens,
    distinct_1_2_3,
    distinct_n,
    memorisation_counts,
    memorisation_rate,
    perplexity_from_loss,
    repetition_rate,
    window_hashes,
)

W = 50


def random_text(rng: np.random.Generator, n: int, alphabet: str) -> str:
    return "".join(rng.choice(list(alphabet), size=n))


# --------------------------------------------------------------------------- likelihood units


def test_likelihood_units_exact():
    assert perplexity_from_loss(math.log(7.0)) == pytest.approx(7.0, rel=1e-15)
    assert perplexity_from_loss(0.0) == 1.0
    assert perplexity_from_loss(1000.0) == math.inf  # overflow is inf, not an exception
    assert math.isnan(perplexity_from_loss(math.nan))
    # 10 bits of information over 5 characters / 4 bytes.
    nats = 10 * math.log(2)
    assert bits_per_char(nats, 5) == pytest.approx(2.0, rel=1e-15)
    assert bits_per_byte(nats, 4) == pytest.approx(2.5, rel=1e-15)
    assert bits_per_char(nats, 2.5) == pytest.approx(4.0, rel=1e-15)  # pro-rated counts
    assert math.isnan(bits_per_char(nats, 0)) and math.isnan(bits_per_byte(0.0, 0))
    with pytest.raises(ValueError, match="n_chars"):
        bits_per_char(1.0, -1)


def test_bits_per_char_of_a_uniform_model_is_log2_of_the_alphabet():
    # A model that is uniform over 26 letters spends ln(26) nats on each of them.
    n = 1234
    assert bits_per_char(n * math.log(26), n) == pytest.approx(math.log2(26), rel=1e-12)


# --------------------------------------------------------------------------- diversity


def test_distinct_n_by_hand():
    texts = ["the cat the cat", "a dog"]
    # words: the cat the cat | a dog -> 6 unigrams, 4 distinct
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat) (cat the) (the cat) | (a dog) -> 4, 3 distinct; none across samples
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(texts, 3) == pytest.approx(2 / 2)
    assert math.isnan(distinct_n(texts, 5))  # no 5-gram anywhere
    assert math.isnan(distinct_n(["a", "b"], 2))  # no bigram crosses samples
    assert math.isnan(distinct_n([], 1))
    assert distinct_n(["abab"], 2, unit="char") == pytest.approx(2 / 3)  # ab ba ab
    # Any run of whitespace separates words.
    assert distinct_n(["x\t\n  y  x "], 1) == pytest.approx(2 / 3)
    # NFC: "e" + combining acute is the same character as precomposed "é".
    assert distinct_n(["é", "e\u0301"], 1, unit="char") == pytest.approx(1 / 2)
    assert distinct_1_2_3(texts) == {
        "distinct_1": pytest.approx(4 / 6),
        "distinct_2": pytest.approx(3 / 4),
        "distinct_3": pytest.approx(1.0),
    }


def test_repetition_rate_by_hand():
    assert repetition_rate(["a a a a a"], n=1) == pytest.approx(4 / 5)
    # x y x y: bigrams (x y) (y x) (x y) -> 1 of 3 repeats; p q -> 0; mean 1/6.
    assert repetition_rate(["x y x y", "p q"], n=2) == pytest.approx(1 / 6)
    # A sample without any bigram is left out of the mean.
    assert repetition_rate(["x y x y", "p q", "z", ""], n=2) == pytest.approx(1 / 6)
    assert math.isnan(repetition_rate(["z", ""], n=2))
    assert math.isnan(repetition_rate([], n=4))
    assert repetition_rate(["one two three four five"], n=4) == 0.0
    assert repetition_rate(["abcabc"], n=3, unit="char") == pytest.approx(1 / 4)


def _brute_ngrams(text: str, n: int, unit: str) -> list[str]:
    # Built by string slicing and joining, unlike the tuple-based implementation.
    import unicodedata

    text = unicodedata.normalize("NFC", text)
    if unit == "char":
        return [text[i : i + n] for i in range(len(text) - n + 1)]
    words = text.split()
    return ["\x00".join(words[i : i + n]) for i in range(len(words) - n + 1)]


@pytest.mark.parametrize("unit", ["word", "char"])
def test_distinct_and_repetition_match_brute_force(unit):
    rng = np.random.default_rng(0)
    texts = [random_text(rng, int(rng.integers(0, 60)), "ab c\t\n") for _ in range(40)]
    for n in (1, 2, 3, 4):
        grams = [_brute_ngrams(t, n, unit) for t in texts]
        pooled = [g for gs in grams for g in gs]
        expected = len(set(pooled)) / len(pooled)
        assert distinct_n(texts, n, unit) == pytest.approx(expected, rel=1e-12)
        # "Occurred earlier in the same sample", checked literally, position by position.
        shares = [sum(g in gs[:i] for i, g in enumerate(gs)) / len(gs) for gs in grams if gs]
        assert repetition_rate(texts, n, unit) == pytest.approx(np.mean(shares), rel=1e-12)
        # The order of the samples does not matter.
        perm = [texts[i] for i in rng.permutation(len(texts))]
        assert distinct_n(perm, n, unit) == pytest.approx(distinct_n(texts, n, unit), rel=1e-12)
        assert repetition_rate(perm, n, unit) == pytest.approx(
            repetition_rate(texts, n, unit), rel=1e-12
        )


def test_diversity_refuses_mistakes():
    with pytest.raises(TypeError, match="single str"):
        distinct_n("a b c", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unit"):
        distinct_n(["a b"], 1, unit="token")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        repetition_rate(["a b"], n=0)


def test_sample_metrics_registry():
    texts = ["the cat sat on the mat the cat sat on the mat"]
    got = {name: f(texts) for name, f in SAMPLE_METRICS.items()}
    assert got["distinct_1"] == distinct_n(texts, 1)
    assert got["rep_4"] == repetition_rate(texts, 4) == pytest.approx(3 / 9)


# --------------------------------------------------------------------------- hashing


def test_window_hash_depends_only_on_the_window(monkeypatch):
    rng = np.random.default_rng(1)
    s = rng.integers(0, 0x10FFFF, size=500).astype(np.uint32)
    w = 7
    h = window_hashes(s, w)
    assert h.dtype == np.uint64 and h.shape == (len(s) - w + 1,)
    direct = np.array([window_hashes(s[i : i + w], w)[0] for i in range(len(h))])
    np.testing.assert_array_equal(h, direct)
    # Block boundaries do not change any hash.
    monkeypatch.setattr(tm, "_HASH_BLOCK", 13)
    np.testing.assert_array_equal(window_hashes(s, w), h)
    # Same values, other dtype: same hashes.
    np.testing.assert_array_equal(window_hashes(s.astype(np.int64), w), h)
    assert len(window_hashes(s[:3], w)) == 0


def test_window_hash_is_the_polynomial_modulo_2_64():
    # Independent: Horner's rule on Python integers, then the same bijective mixer.
    rng = np.random.default_rng(2)
    s = rng.integers(0, 300, size=40)
    w, mask = 9, (1 << 64) - 1

    def mix(h: int) -> int:
        h ^= h >> 33
        h = (h * 0xFF51AFD7ED558CCD) & mask
        h ^= h >> 33
        h = (h * 0xC4CEB9FE1A85EC53) & mask
        return h ^ (h >> 33)

    expected = []
    for i in range(len(s) - w + 1):
        h = 0
        for v in s[i : i + w]:
            h = (h * tm._BASE + int(v)) & mask
        expected.append(mix(h))
    assert window_hashes(s, w).tolist() == expected
    assert window_hashes(s, w, hash_bits=5).tolist() == [h & 31 for h in expected]


def test_distinct_windows_get_distinct_hashes():
    rng = np.random.default_rng(3)
    text = random_text(rng, 20_000, "ab")  # many windows, few symbols
    index = CorpusIndex.build(text, window=20)
    n_distinct = len({text[i : i + 20] for i in range(len(text) - 19)})
    assert len(np.unique(index.hashes)) == n_distinct


# --------------------------------------------------------------------------- memorisation


def brute_counts(samples: list[str], corpus: str, w: int = W) -> tuple[int, int]:
    windows = [s[i : i + w] for s in samples for i in range(len(s) - w + 1)]
    return len(windows), sum(x in corpus for x in windows)


@pytest.fixture(scope="module")
def corpus() -> str:
    return random_text(np.random.default_rng(4), 4000, "abcdefgh ")


@pytest.fixture(scope="module")
def index(corpus) -> CorpusIndex:
    return CorpusIndex.build(corpus, window=W)


def mixed_samples(rng: np.random.Generator, corpus: str, alphabet: str, k: int = 30) -> list[str]:
    """Random samples made of copied corpus spans and fresh text, some shorter than W."""
    samples = []
    for _ in range(k):
        parts = []
        for _ in range(int(rng.integers(1, 4))):
            n = int(rng.integers(0, 160))
            if rng.random() < 0.5:
                a = int(rng.integers(0, len(corpus) - n))
                parts.append(corpus[a : a + n])
            else:
                parts.append(random_text(rng, n, alphabet))
        samples.append("".join(parts))
    return samples


def test_copied_sample_is_fully_memorised(corpus, index):
    c = memorisation_counts([corpus[100:400], corpus[-W:]], index)
    assert (c.n_windows, c.n_memorised, c.n_samples_copied) == (251 + 1, 252, 2)
    assert c.rate == 1.0
    assert index.memorised_mask(corpus[:W]).tolist() == [True]


def test_text_over_a_disjoint_alphabet_is_never_memorised(index):
    samples = [random_text(np.random.default_rng(5), 300, "XYZ!") for _ in range(3)]
    assert memorisation_rate(samples, index) == 0.0


def test_half_copied_sample_matches_brute_force(corpus, index):
    rng = np.random.default_rng(6)
    # Fresh text over another alphabet: exactly the 101 windows inside the copy hit.
    half = corpus[1000:1150] + random_text(rng, 150, "XYZ")
    c = memorisation_counts([half], index)
    assert (c.n_windows, c.n_memorised) == brute_counts([half], corpus) == (251, 101)
    assert c.rate == pytest.approx(101 / 251, rel=1e-15)
    assert index.memorised_mask(half).tolist() == [i <= 100 for i in range(251)]
    # Fresh text over the corpus alphabet may extend the copy by chance; brute force decides.
    half = corpus[1000:1150] + random_text(rng, 150, "abcdefgh ")
    c = memorisation_counts([half], index)
    assert (c.n_windows, c.n_memorised) == brute_counts([half], corpus)
    mask = index.memorised_mask(half)
    assert mask.tolist() == [half[i : i + W] in corpus for i in range(251)]


def test_random_samples_match_brute_force(corpus, index):
    rng = np.random.default_rng(7)
    samples = mixed_samples(rng, corpus, "abcdefgh ")
    n, hits = brute_counts(samples, corpus)
    c = memorisation_counts(samples, index)
    assert (c.n_windows, c.n_memorised) == (n, hits)
    assert 0 < hits < n
    assert c.n_samples == len(samples)
    copied = [any(s[i : i + W] in corpus for i in range(len(s) - W + 1)) for s in samples]
    assert c.n_samples_copied == sum(copied)
    assert memorisation_rate(samples, index) == pytest.approx(hits / n, rel=1e-15)
    # One sample at a time gives the same windows and hits (batch independence).
    per = [memorisation_counts([s], index) for s in samples]
    assert sum(p.n_memorised for p in per) == hits
    windows = [s[i : i + W] for s in samples for i in range(len(s) - W + 1)]
    assert index.contains(windows).tolist() == [x in corpus for x in windows]


def test_non_ascii_windows_are_counted_in_characters():
    rng = np.random.default_rng(8)
    alphabet = "aé中😀 \n"
    corpus = random_text(rng, 3000, alphabet)
    samples = mixed_samples(rng, corpus, alphabet, k=20)
    n, hits = brute_counts(samples, corpus)
    for source in (
        corpus,
        corpus.encode("utf-8"),  # UTF-8 bytes
        np.frombuffer(corpus.encode("utf-8"), dtype=np.uint8),  # UTF-8 in a uint8 array
        np.frombuffer(corpus.encode("utf-32-le"), dtype=np.uint32),  # code points
    ):
        index = CorpusIndex.build(source, window=W)
        assert len(index) == len(corpus) - W + 1
        c = memorisation_counts(samples, index)
        assert (c.n_windows, c.n_memorised) == (n, hits)
    # 50 characters but ~130 UTF-8 bytes: exactly one window, and it is copied.
    copy = corpus[500 : 500 + W]
    assert len(copy.encode("utf-8")) > W
    c = memorisation_counts([copy], index)
    assert (c.n_windows, c.n_memorised) == (1, 1)


def test_build_from_memory_mapped_arrays(tmp_path, corpus, index):
    samples = mixed_samples(np.random.default_rng(9), corpus, "abcdefgh ")
    expected = memorisation_counts(samples, index)
    ascii_file = tmp_path / "corpus.txt"
    ascii_file.write_bytes(corpus.encode("ascii"))
    mm = np.memmap(ascii_file, dtype=np.uint8, mode="r")
    mapped = CorpusIndex.build(mm, window=W)
    assert isinstance(mapped.text, np.memmap)  # ASCII is used in place, not copied
    assert memorisation_counts(samples, mapped) == expected
    cp_file = tmp_path / "corpus.u32"
    np.frombuffer(corpus.encode("utf-32-le"), dtype=np.uint32).tofile(cp_file)
    mapped32 = CorpusIndex.build(np.memmap(cp_file, dtype=np.uint32, mode="r"), window=W)
    assert memorisation_counts(samples, mapped32) == expected


@pytest.mark.parametrize("hash_bits", [1, 3])
def test_hash_collisions_are_never_counted(corpus, hash_bits):
    # With 2 or 8 possible hashes almost every look-up collides; the character
    # comparison alone must decide.
    index = CorpusIndex.build(corpus[:1500], window=W, hash_bits=hash_bits)
    assert len(np.unique(index.hashes)) <= 1 << hash_bits
    rng = np.random.default_rng(10)
    samples = mixed_samples(rng, corpus[:1500], "abcdefgh ", k=8)
    samples.append(random_text(rng, 120, "XYZ"))
    n, hits = brute_counts(samples, corpus[:1500])
    c = memorisation_counts(samples, index)
    assert (c.n_windows, c.n_memorised) == (n, hits)


def test_constant_hash_is_still_exact(monkeypatch, corpus):
    def constant(symbols, window, hash_bits=64):
        return np.zeros(max(len(symbols) - window + 1, 0), dtype=np.uint64)

    monkeypatch.setattr(tm, "window_hashes", constant)
    index = CorpusIndex.build(corpus[:800], window=W)
    samples = [corpus[300:420], corpus[10:70] + "XYZ" * 20, "Q" * 60]
    n, hits = brute_counts(samples, corpus[:800])
    assert memorisation_counts(samples, index).n_memorised == hits
    assert 0 < hits < n


def test_repeated_windows_in_the_corpus(corpus):
    # Equal windows share a hash; the first one checked already matches.
    text = (corpus[:200] + "\n") * 5
    index = CorpusIndex.build(text, window=W)
    samples = [corpus[20:180], "\n" + corpus[:120]]
    n, hits = brute_counts(samples, text)
    assert memorisation_counts(samples, index).n_memorised == hits == n


def test_empty_and_short_inputs(index):
    empty = memorisation_counts([], index)
    assert (empty.n_windows, empty.n_memorised, empty.n_samples) == (0, 0, 0)
    assert math.isnan(empty.rate)
    assert math.isnan(memorisation_rate(["short", "", "x" * (W - 1)], index))
    assert index.memorised_mask("short").shape == (0,)
    assert index.contains([]).shape == (0,)
    tiny = CorpusIndex.build("too short for a window", window=W)
    assert len(tiny) == 0
    assert memorisation_rate(["x" * 80], tiny) == 0.0
    assert len(CorpusIndex.build("", window=W)) == 0
    assert len(CorpusIndex.build(np.zeros(0, dtype=np.uint8), window=W)) == 0


def test_index_refuses_mistakes(index):
    with pytest.raises(ValueError, match="50 characters"):
        index.contains(["abc"])
    with pytest.raises(TypeError, match="single str"):
        memorisation_rate("a" * 100, index)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window"):
        CorpusIndex.build("abc", window=0)
    with pytest.raises(TypeError, match="text must be"):
        CorpusIndex.build(np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(UnicodeDecodeError):
        CorpusIndex.build(b"\xff\xfe bad utf-8")


def test_index_round_trips_through_npz(tmp_path, corpus, index):
    path = tmp_path / "index.npz"
    index.save(path)
    with np.load(path, allow_pickle=False) as z:  # plain arrays, no pickled objects
        assert set(z.files) == {"version", "window", "hash_bits", "text", "hashes", "positions"}
    loaded = CorpusIndex.load(path)
    assert loaded.window == index.window and loaded.hash_bits == index.hash_bits
    for name in ("text", "hashes", "positions"):
        a, b = getattr(index, name), getattr(loaded, name)
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    samples = mixed_samples(np.random.default_rng(11), corpus, "abcdefgh ")
    assert memorisation_counts(samples, loaded) == memorisation_counts(samples, index)
    # A collision-forcing index keeps its hash width.
    small = CorpusIndex.build(corpus[:300], window=W, hash_bits=2)
    small.save(tmp_path / "small.npz")
    again = CorpusIndex.load(tmp_path / "small.npz")
    assert again.hash_bits == 2
    assert memorisation_counts(samples, again) == memorisation_counts(samples, small)


def test_load_names_a_bad_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        CorpusIndex.load(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not an npz at all")
    with pytest.raises(CheckpointError, match=r"junk\.npz"):
        CorpusIndex.load(junk)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.arange(3))
    with pytest.raises(CheckpointError, match="not a corpus index"):
        CorpusIndex.load(other)


# --------------------------------------------------------------------------- training text


def test_code_points_of_a_char_corpus(tmp_path, corpus_file):
    tok, built = build_corpus(TextSource(path=str(corpus_file)), tmp_path / "data")
    assert isinstance(tok, CharTokenizer)
    text = normalize_text(corpus_file.read_text(encoding="utf-8"))
    cps = code_points_of_tokens(built.train, tok)
    assert len(cps) == built.meta.n_train
    assert (
        cps.tobytes().decode("latin-1" if cps.dtype == np.uint8 else "utf-32-le")
        == (text[: built.meta.n_train])
    )
    index = CorpusIndex.build(cps, window=W)
    assert memorisation_rate([text[5000:5400]], index) == 1.0


def test_code_points_of_a_bpe_stream_keep_documents_apart():
    docs = ["Le café est très bon. " * 20, "中文 and emoji 😀 text. " * 20]
    tok = train_bpe_tokenizer(docs, vocab_size=300)
    ids = np.concatenate(
        [np.r_[tok.encode_array(d, special=False), tok.eos_id] for d in docs]
        + [tok.encode_array(EOS_TOKEN, special=False)]  # literal text, not a document end
    )
    cps = code_points_of_tokens(ids.astype(np.uint16), tok, block=7)  # blocks cut characters
    expected = [ord(c) for c in docs[0]] + [DOCUMENT_SEPARATOR]
    expected += [ord(c) for c in docs[1]] + [DOCUMENT_SEPARATOR] + [ord(c) for c in EOS_TOKEN]
    assert cps.tolist() == expected
    index = CorpusIndex.build(cps, window=W)
    across = docs[0][-25:] + docs[1][:25]  # would exist if documents were glued
    assert memorisation_rate([docs[0][:W], across], index) == 0.5


# --------------------------------------------------------------------------- speed


def test_build_time_on_a_megabyte():
    rng = np.random.default_rng(12)
    words = ["the", "model", "learns", "to", "write", "text", "and", "code", "über", "中文"]
    text = " ".join(rng.choice(words, size=250_000))[: 1 << 20]
    t0 = time.perf_counter()
    index = CorpusIndex.build(text, window=W)
    t1 = time.perf_counter()
    samples = [text[i : i + 1000] for i in range(0, 100_000, 1000)] + [
        random_text(rng, 1000, "xyz ") for _ in range(100)
    ]
    c = memorisation_counts(samples, index)
    t2 = time.perf_counter()
    print(
        f"\nCorpusIndex.build: {len(text):,} chars in {t1 - t0:.3f} s "
        f"({index.nbytes / len(text):.1f} bytes/char incl. text); "
        f"{c.n_windows:,} sample windows looked up in {t2 - t1:.3f} s"
    )
    assert c.n_memorised == 100 * (1000 - W + 1)
