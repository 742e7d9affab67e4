"""De-duplication (aigc.data.dedup) and its place in text preparation and `aigc data clean`:
MinHash estimates against exact Jaccard, LSH against the S-curve, the banding against a
numerical integration of its own, the data pipeline, old configs, the CLI."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import integrate

from aigc.config import load_config, read_yaml
from aigc.data.dedup import (
    MinHasher,
    NearDuplicateIndex,
    candidate_probability,
    dedup_mode,
    deduplicate,
    jaccard_estimate,
    lsh_params,
)
from aigc.data.text import CorpusMeta, TextSource, build_corpus
from aigc.errors import ConfigError
from tests.conftest import run_cli

FIXTURES = Path(__file__).parent / "fixtures" / "runs-0.1"


def word_sets(rng: random.Random, jaccard: float, size: int = 120) -> tuple[list[str], list[str]]:
    """Two lists of distinct words whose sets have (about) the given Jaccard similarity."""
    shared = round(2 * size * jaccard / (1 + jaccard))  # |A & B| / (2 size - |A & B|) = J
    words = [f"w{rng.randrange(10**9)}" for _ in range(2 * size - shared)]
    a = words[:size]
    b = words[:shared] + words[size:]
    rng.shuffle(a)
    rng.shuffle(b)
    return a, b


def exact_jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b)


# --------------------------------------------------------------------------- MinHash


def test_minhash_estimates_jaccard_within_sampling_error():
    rng = random.Random(0)
    hasher = MinHasher(num_perm=128, ngram=1)  # shingles = words, so J is the sets' Jaccard
    z = []
    for _ in range(150):
        a, b = word_sets(rng, rng.uniform(0.05, 0.95))
        j = exact_jaccard(a, b)
        est = jaccard_estimate(hasher.signature(" ".join(a)), hasher.signature(" ".join(b)))
        z.append((est - j) / np.sqrt(j * (1 - j) / 128))  # binomial standard error
    z = np.asarray(z)
    assert abs(z.mean()) < 3 / np.sqrt(len(z))  # unbiased
    assert 0.75 < z.std() < 1.25  # as spread as independent permutations make it
    assert (np.abs(z) > 3.5).mean() < 0.02


def test_signatures_fed_in_chunks_equal_the_whole_text():
    rng = random.Random(1)
    text = " ".join(
        rng.choice(["alpha", "Beta", "gamma,", "δέλτα", "e\n\n", "  f"]) for _ in range(3000)
    )
    for shingle, ngram in (("word", 5), ("char", 7), ("word", 1)):
        hasher = MinHasher(64, shingle, ngram)
        whole = hasher.signature(text)
        sketch = hasher.sketch()
        pos = 0
        while pos < len(text):
            n = rng.choice([1, 3, 17, 500])
            sketch.update(text[pos : pos + n])
            pos += n
        assert (sketch.digest() == whole).all(), shingle


def test_signatures_see_words_not_case_or_spacing():
    h = MinHasher(64, "word", 2)
    assert (h.signature("The Quick  brown\nfox") == h.signature("the quick brown fox")).all()
    short = h.signature("one")  # fewer words than ngram: the text is one shingle
    assert (short == h.signature("ONE")).all() and not (short == h.signature("two")).all()
    assert jaccard_estimate(h.signature(""), h.signature("")) == 1.0


# --------------------------------------------------------------------------- LSH


@pytest.mark.parametrize("s", [0.3, 0.5, 0.7, 0.85])
def test_lsh_candidate_rate_follows_the_s_curve(s):
    bands, rows, n = 8, 4, 300
    rng = random.Random(int(s * 100))
    hasher = MinHasher(num_perm=32, ngram=1, seed=3)
    hits = 0
    for _ in range(n):
        a, b = word_sets(rng, s, size=60)
        index = NearDuplicateIndex(threshold=0.99, num_perm=32, bands=bands, rows=rows)
        index.insert(hasher.signature(" ".join(a)), 0)
        hits += bool(index.candidates(hasher.signature(" ".join(b))))
    p = float(candidate_probability(s, bands, rows))  # 1 - (1 - s^r)^b
    assert abs(hits / n - p) < 4 * np.sqrt(p * (1 - p) / n) + 0.01


def test_lsh_params_minimise_the_weighted_error_areas():
    """Against an independent search with adaptive quadrature (scipy.integrate.quad)."""

    def error(t, b, r, w_fp, w_fn):
        fp = integrate.quad(lambda s: 1 - (1 - s**r) ** b, 0.0, t)[0]
        fn = integrate.quad(lambda s: (1 - s**r) ** b, t, 1.0)[0]
        return w_fp * fp + w_fn * fn

    for t, n, w in [(0.8, 32, (0.5, 0.5)), (0.5, 24, (0.5, 0.5)), (0.8, 32, (0.1, 0.9))]:
        grid = [(b, r) for b in range(1, n + 1) for r in range(1, n // b + 1)]
        best = min(grid, key=lambda br: error(t, *br, *w))
        got = lsh_params(t, n, *w)
        assert got == best or error(t, *got, *w) == pytest.approx(error(t, *best, *w), rel=1e-3)
    assert lsh_params(0.8, 128) == (9, 13)  # what datasketch's MinHashLSH picks too


def test_index_keeps_only_what_it_keeps():
    hasher = MinHasher(64)
    index = NearDuplicateIndex(0.8, 64)
    doc = "the same words in the same order over and over again for a while " * 3
    assert index.add(hasher.signature(doc), 0) is None
    size = index.nbytes
    for i in range(1, 50):
        match = index.add(hasher.signature(doc), i)
        assert match == (0, 1.0)
    assert len(index) == 1 and index.nbytes == size  # duplicates add nothing
    with pytest.raises(ValueError, match="shape"):
        index.query(np.zeros(10, np.uint32))


# --------------------------------------------------------------------------- deduplicate

BASE = ("Each document here is a paragraph of plain English about gardens, rivers and the "
        "people who walk beside them in the early morning before the town wakes up and the "
        "shops open their doors to the first customers of the day")  # fmt: skip


def test_deduplicate_exact_near_and_off():
    other = "An unrelated note on compilers, parsers and the grammar of programming languages."
    near = BASE.replace("rivers", "lakes")  # 5 of ~44 word 5-grams change: J ~ 0.8+
    texts = [BASE, other, BASE, near, other + " ", "tiny"]  # other + " ": the same words
    r = deduplicate(texts, mode="near", threshold=0.7)
    assert r.keep == [True, True, False, False, False, True]
    assert r.n_exact == 1 and r.n_near == 2
    (exact, nd, spaced) = r.pairs
    assert (spaced.dropped, spaced.kept, spaced.jaccard) == (4, 1, 1.0)
    assert (exact.dropped, exact.kept, exact.jaccard, exact.kind) == (2, 0, 1.0, "exact")
    assert (nd.dropped, nd.kept, nd.kind) == (3, 0, "near")
    j = exact_jaccard(*(MinHasher()._shingles(MinHasher()._tokens(t.lower())).tolist()
                        for t in (BASE, near)))  # fmt: skip
    assert abs(nd.jaccard - j) < 4 * np.sqrt(j * (1 - j) / 128) + 0.02
    assert deduplicate(texts, mode="exact").keep == [True, True, False, True, True, True]
    assert all(deduplicate(texts, mode="off").keep)
    assert deduplicate(texts, mode="near", threshold=0.7).keep == r.keep  # deterministic


def test_dedup_modes_and_settings():
    assert dedup_mode(True) == "exact" and dedup_mode(False) == "off"
    assert dedup_mode("near") == "near"
    with pytest.raises(ConfigError, match=r"data\.dedup"):
        dedup_mode("fuzzy")
    for bad in (0.0, 1.5, -1):
        with pytest.raises(ConfigError, match="threshold"):
            TextSource(dedup="near", dedup_threshold=bad)
    with pytest.raises(ConfigError, match="shingle"):
        TextSource(dedup_shingle="line")
    with pytest.raises(ConfigError, match="pii"):
        TextSource(pii="yes")


# --------------------------------------------------------------------------- data preparation


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


CORPUS = [
    BASE + " Write to ann.lee@example.org.",
    "A second, different document: call +44 20 7946 0958 about the card 4111 1111 1111 1111.",
    BASE + " Write to ann.lee@example.org.",  # exact duplicate of the first
    BASE.replace("rivers", "lakes") + " Write to ann.lee@example.org.",  # near duplicate
    "Server logs: connection from 192.168.1.10 with key AKIAIOSFODNN7EXAMPLE refused.",
]


def test_corpus_preparation_redacts_and_drops_near_duplicates(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", CORPUS)
    tok, corpus = build_corpus(
        TextSource(str(src), dedup="near", dedup_threshold=0.7, pii="redact"), tmp_path / "out"
    )
    m = corpus.meta
    assert (m.n_documents, m.n_duplicates, m.n_near_duplicates) == (3, 1, 1)
    assert m.dedup == "near" and m.pii == "redact"
    assert m.pii_counts == {"credit_card": 1, "email": 1, "ip": 1, "phone": 1, "secret": 1}
    assert [(e["dropped"], e["kept"], e["kind"]) for e in m.duplicate_examples] == [
        (f"{src}:3", f"{src}:1", "exact"), (f"{src}:4", f"{src}:1", "near")]  # fmt: skip
    text = tok.decode(corpus.tokens[:].tolist())
    assert "[EMAIL]" in text and "[CREDIT_CARD]" in text and "[SECRET]" in text
    assert "ann.lee" not in text and "4111" not in text and "192.168" not in text
    assert text.index("gardens") < text.index("second") < text.index("Server")  # order kept
    saved = json.loads((tmp_path / "out" / "corpus.json").read_text())
    assert saved["pii_counts"]["email"] == 1 and saved["n_near_duplicates"] == 1


def test_report_mode_counts_and_leaves_the_text(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", CORPUS)
    tok, corpus = build_corpus(TextSource(str(src), pii="report"), tmp_path / "out")
    m = corpus.meta
    assert (m.n_documents, m.n_duplicates, m.n_near_duplicates) == (4, 1, 0)  # exact only
    assert m.pii_counts["email"] == 2  # in the kept documents: the first and the near copy
    assert "ann.lee@example.org" in tok.decode(corpus.tokens[:].tolist())


def test_an_old_run_config_with_boolean_dedup_loads(tmp_path):
    old = read_yaml(FIXTURES / "gpt-char" / "config.yaml")
    assert old["data"]["dedup"] is True  # written by aigc 0.1
    assert load_config(old).data.dedup == "exact"
    old["data"]["dedup"] = False
    cfg = load_config(old)
    assert cfg.data.dedup == "off" and cfg.data.pii == "off"
    assert cfg.data.source().dedup == "off"
    # overrides as typed on a command line: YAML reads a bare off as false
    cfg = load_config(old, ["data.dedup=near", "data.pii=off", "data.dedup_threshold=0.9"])
    assert (cfg.data.dedup, cfg.data.pii, cfg.data.dedup_threshold) == ("near", "off", 0.9)
    assert load_config(cfg.to_dict()).data.dedup == "near"  # the saved form reads back
    with pytest.raises(ConfigError, match=r"data\.pii"):
        load_config(old, ["data.pii=true"])
    # its corpus.json, written before the cleaning fields existed, still opens
    meta = CorpusMeta.load(FIXTURES / "gpt-char" / "data" / "corpus.json")
    assert meta.pii == "off" and meta.n_near_duplicates == 0 and meta.pii_counts == {}


def test_an_old_style_config_prepares_data_without_dedup(tmp_path):
    from aigc.tasks.lm import LMTask

    src = write_jsonl(tmp_path / "c.jsonl", [BASE] * 3 + ["Another document entirely. " * 5])
    old = read_yaml(FIXTURES / "gpt-char" / "config.yaml")
    old["data"].update(path=str(src), dedup=False)
    old["model"].update(block_size=8, vocab_size=0)
    LMTask.prepare_data(load_config(old), tmp_path / "off", progress=False)
    assert CorpusMeta.load(tmp_path / "off" / "corpus.json").n_documents == 4
    old["data"]["dedup"] = True
    LMTask.prepare_data(load_config(old), tmp_path / "on", progress=False)
    meta = CorpusMeta.load(tmp_path / "on" / "corpus.json")
    assert (meta.n_documents, meta.n_duplicates, meta.dedup) == (2, 2, "exact")


# --------------------------------------------------------------------------- aigc data clean


def test_data_clean_end_to_end(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", CORPUS)
    before = src.read_bytes()
    out = tmp_path / "clean.jsonl"
    proc = run_cli("data", "clean", str(src), "--out", str(out), "--pii", "redact",
                   "--dedup", "near", "--threshold", "0.7")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "kept 3" in proc.stdout and "1 exact and 1 near" in proc.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [0, 1, 4]  # other fields kept, order kept
    assert "[EMAIL]" in records[0]["text"] and "[PHONE]" in records[1]["text"]
    report = json.loads((tmp_path / "clean.report.json").read_text())
    assert report["pii_counts"]["secret"] == 1 and report["n_near_duplicates"] == 1
    assert report["duplicate_pairs"][1]["dropped"] == f"{src}:4"
    assert src.read_bytes() == before

    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("mail me: bob@example.com\n")
    (folder / "sub" / "b.txt").write_text("mail me: bob@example.com\n")
    proc = run_cli("data", "clean", str(folder), "--out", str(tmp_path / "docs-clean"),
                   "--pii", "redact")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "docs-clean" / "a.txt").read_text() == "mail me: [EMAIL]\n"
    assert not (tmp_path / "docs-clean" / "sub").exists()  # its only file was a duplicate


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["missing.jsonl", "--out", "x.jsonl"], "no such file"),
        (["c.jsonl", "--out", "c.jsonl"], "is the input"),
        (["c.jsonl", "--out", "x.jsonl", "--threshold", "0"], "--threshold"),
        (["c.jsonl", "--out", "x.jsonl", "--threshold", "1.5"], "--threshold"),
        (["c.jsonl", "--out", "x.jsonl", "--pii", "maybe"], "--pii"),
        (["c.jsonl", "--out", "x.jsonl", "--dedup", "fuzzy"], "--dedup"),
    ],
)
def test_data_clean_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    src = write_jsonl(tmp_path / "c.jsonl", CORPUS)
    before = src.read_bytes()
    proc = run_cli("data", "clean", *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
    assert src.read_bytes() == before
    assert not (tmp_path / "x.jsonl").exists()
    shutil.rmtree(tmp_path)
