"""Does near-duplicate removal reduce memorisation? The effect Lee et al. (ACL 2022,
"Deduplicating Training Data Makes Language Models Better") report, on our quickstart.

The quickstart corpus (the embedded Python docs, one document per pydoc topic) gets
``--passages`` passages of 150 words cut from its own topics, each injected ``--copies``
times as near duplicates (one word substituted per copy, so exact de-duplication keeps
them all while two copies share ~87% of their word 5-grams; the copies go among the first 80% of the documents, so the
validation split stays clean). The quickstart recipe (gpt-pydoc-char) is trained on it
twice for the same ``--steps``, with data.dedup=exact and data.dedup=near, and compared on:

  * ``memorisation``: the text evaluation's own metric (aigc.metrics.text): the share of
    50-character windows of unprompted samples found verbatim in the training text;
  * the share of those windows found verbatim in the injected passages;
  * extraction (Carlini et al. 2021, as Lee et al. measure it): each passage's first 50
    characters as a prompt, 100 greedy characters, the share of passages continued
    verbatim for at least 50 characters, and the mean verbatim length;
  * held-out loss, for the cost.

    python benchmarks/dedup_memorisation.py --steps 3000 --out runs/dedup-mem
    python benchmarks/dedup_memorisation.py --steps 5 --passages 30 --copies 4  # smoke test
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import aigc
from aigc.config import RECIPES_DIR
from aigc.data.text import TextSource, iter_documents
from aigc.metrics.text import CorpusIndex, memorisation_counts

PROMPT_CHARS, CONTINUE_CHARS, VERBATIM = 50, 100, 50


def quickstart_documents() -> list[str]:
    """The quickstart corpus, one text per pydoc topic, in its order."""
    return [d.text() for d in iter_documents(TextSource())]


def cut_passage(text: str, words: int, r: random.Random) -> str | None:
    """``words`` consecutive words of ``text``, single-spaced: prose (no tables, at least
    70 distinct words), else None."""
    tokens = text.split()
    if len(tokens) < words + 20:
        return None
    start = r.randrange(0, len(tokens) - words)
    passage = " ".join(tokens[start : start + words])
    prose = passage.count("|") + passage.count("--") < 3
    return passage if prose and len(set(re.findall(r"\w+", passage.lower()))) >= 70 else None


def near_copy(passage: str, vocab: list[str], r: random.Random) -> str:
    """The passage with one of its plain words (after the prompt) replaced."""
    words = passage.split(" ")
    first = len(passage[:PROMPT_CHARS].split(" "))  # leave the prompt as it is
    plain = [i for i in range(first, len(words)) if words[i].isalpha()] or [len(words) - 1]
    words[r.choice(plain)] = r.choice(vocab)
    return " ".join(words)


def build_corpus_file(path: Path, passages: int, copies: int, seed: int) -> list[str]:
    """Writes the injected corpus as JSON Lines; returns the passages."""
    r = random.Random(seed)
    docs = quickstart_documents()
    vocab = sorted({w for d in docs for w in re.findall(r"[a-z]{4,}", d)})
    chosen: list[str] = []
    for d in r.sample(docs, len(docs)):
        p = cut_passage(d, 150, r)
        if p is not None and len(chosen) < passages:
            chosen.append(p)
    if len(chosen) < passages:
        raise SystemExit(f"only {len(chosen)} topics hold a prose passage; ask for fewer")
    injected = [near_copy(p, vocab, r) for p in chosen for _ in range(copies)]
    head = int(0.8 * len(docs))
    train_docs = docs[:head] + injected
    r.shuffle(train_docs)
    with open(path, "w", encoding="utf-8") as f:
        for text in train_docs + docs[head:]:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return chosen


def extraction(pipe, passages: list[str]) -> tuple[float, float]:
    """(share continued verbatim for >= VERBATIM characters, mean verbatim characters)."""
    prompts = [p[:PROMPT_CHARS] for p in passages]
    outs = pipe.generate(prompts, max_new_tokens=CONTINUE_CHARS, temperature=0.0)
    lengths = []
    for p, out in zip(passages, outs, strict=True):
        truth = p[PROMPT_CHARS : PROMPT_CHARS + CONTINUE_CHARS]
        n = 0
        while n < min(len(truth), len(out)) and truth[n] == out[n]:
            n += 1
        lengths.append(n)
    return sum(n >= VERBATIM for n in lengths) / len(lengths), sum(lengths) / len(lengths)


def measure(run: Path, passages: list[str], n_samples: int) -> dict[str, float]:
    pipe = aigc.load(run)
    result = pipe.evaluate(save=False)
    samples = [pipe.generate("", max_new_tokens=256, temperature=1.0, seed=1000 + i)
               for i in range(n_samples)]  # fmt: skip
    injected = memorisation_counts(samples, CorpusIndex.build("\n".join(passages)))
    share, mean_len = extraction(pipe, passages)
    meta = json.loads((run / "data" / "corpus.json").read_text())
    return {
        "documents": meta["n_documents"],
        "near_dropped": meta.get("n_near_duplicates", 0),
        "loss": result["loss"],
        "memorisation": result.get("memorisation", float("nan")),
        "windows_in_passages": injected.rate,
        "extracted_share": share,
        "extracted_chars": mean_len,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3000, help="training steps of each run")
    ap.add_argument("--passages", type=int, default=20)
    ap.add_argument("--copies", type=int, default=10, help="near-duplicate copies of each")
    ap.add_argument("--samples", type=int, default=32, help="unprompted samples per run")
    ap.add_argument("--threshold", type=float, default=0.8, help="data.dedup_threshold")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/dedup-memorisation"))
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    corpus = args.out / "pydoc-injected.jsonl"
    passages = build_corpus_file(corpus, args.passages, args.copies, args.seed)
    print(f"{corpus}: the quickstart corpus with {len(passages)} passages x {args.copies} "
          "near-duplicate copies")  # fmt: skip
    rows = {}
    for mode in ("exact", "near"):
        run = args.out / f"dedup-{mode}"
        t0 = time.perf_counter()
        aigc.train(RECIPES_DIR / "gpt-pydoc-char.yaml",
                   [f"data.path={corpus}", f"data.dedup={mode}",
                    f"data.dedup_threshold={args.threshold}", f"train.max_steps={args.steps}",
                    "train.max_time=0", f"train.seed={args.seed}",
                    f"train.eval_every={args.steps}", f"train.checkpoint_every={args.steps}"],
                   run_dir=run, progress=False)  # fmt: skip
        rows[mode] = measure(run, passages, args.samples)
        print(f"trained and measured data.dedup={mode} in {time.perf_counter() - t0:.0f} s")

    print(f"\n{'data.dedup':12} {'docs':>6} {'near dropped':>12} {'loss':>6} {'memorisation':>12} "
          f"{'in passages':>11} {'extracted':>9} {'verbatim chars':>14}")  # fmt: skip
    for mode, m in rows.items():
        print(f"{mode:12} {m['documents']:6d} {m['near_dropped']:12d} {m['loss']:6.3f} "
              f"{m['memorisation']:12.2%} {m['windows_in_passages']:11.2%} "
              f"{m['extracted_share']:9.0%} {m['extracted_chars']:14.1f}")  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
