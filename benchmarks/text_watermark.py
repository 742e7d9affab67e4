"""Generated text, told apart: the green-list watermark and the zero-shot detector on
our own trained runs.

For each run (a character model and a BPE model trained on the embedded Python docs):
  * n texts sampled with the watermark key and n without (temperature 1, prompts cut
    from the run's held-out text), their first 50/100/200 tokens scored by the
    detector: true-positive rate at a false-positive rate of 1e-3 (z >= 3.09, the
    normal tail) and, beside it, the share of n held-out human windows of the same
    length over that threshold (the empirical false-positive rate);
  * robustness: 10% and 25% of the tokens of the 200-token texts replaced by random
    tokens of the vocabulary, scored again;
  * the watermark's cost: perplexity per character of the marked and plain texts
    under a larger reference model (--reference, a character run);
  * zero-shot: Fast-DetectGPT's curvature with the run itself as the scoring model,
    AUROC of its plain samples (temperature 1, and 0.8, `aigc sample`'s default)
    against held-out human windows, per length.

    python benchmarks/text_watermark.py --runs runs/wm-char runs/wm-bpe --reference runs/wm-ref
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

import aigc
from aigc.safety.text_watermark import (
    Watermark,
    hash_texts,
    score_hashes,
    token_texts,
    z_for_fpr,
)
from aigc.safety.zero_shot import auroc, curvature_of_ids, human_windows
from machine import describe

LENGTHS = (50, 100, 200)
KEY = "benchmark-key"


def prompts_from_heldout(pipe, n: int, chars: int, seed: int) -> list[str]:
    """n prompts of about ``chars`` characters cut from the held-out text at word starts."""
    windows = human_windows(pipe, 4 * chars, n, seed=seed + 1)
    out = []
    for w in windows:
        text = pipe.tokenizer.decode(w)
        start = text.find(" ") + 1
        out.append(text[start : start + chars])
    return out


def sample(pipe, prompts: list[str], tokens: int, watermark: str | None, seed: int,
           temperature: float = 1.0) -> list[str]:  # fmt: skip
    torch.manual_seed(seed)
    return pipe.generate(prompts, max_new_tokens=tokens, temperature=temperature,
                         watermark=watermark)  # fmt: skip


def z_of_ids(ids: list[int], table: torch.Tensor, wm: Watermark) -> float:
    score, _ = score_hashes(table[torch.tensor(ids)], wm, min_scored=1)
    return score.z


def bits_per_char(ref, text_ids_of, texts: list[str], prompts: list[str]) -> float:
    """Perplexity per character of the texts (after their prompts) under the reference."""
    from aigc.safety.zero_shot import _start

    nats = chars = 0.0
    for p, t in zip(prompts, texts, strict=True):
        ctx = _start(ref.tokenizer) + text_ids_of(ref, p)
        ids = text_ids_of(ref, t)
        if not ids:
            continue
        nats -= curvature_of_ids(ref.model, ctx, ids).log_likelihood
        chars += len(t)
    return math.exp(nats / chars)


def ids_of(pipe, text: str) -> list[int]:
    from aigc.data.tokenizers import encode_replacing

    return encode_replacing(pipe.tokenizer, text)[0].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--reference", help="a larger character run for the perplexity cost")
    ap.add_argument("--n", type=int, default=200, help="texts per kind")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(describe())
    wm = Watermark(KEY)
    threshold = z_for_fpr(1e-3)
    ref = aigc.load(args.reference) if args.reference else None
    print(f"watermark: gamma {wm.gamma}, delta {wm.delta}, context {wm.context}; "
          f"threshold z {threshold:.2f} (one-sided FPR 1e-3); {args.n} texts per kind\n")  # fmt: skip
    for run in args.runs:
        pipe = aigc.load(run)
        kind = pipe.tokenizer.kind
        table = hash_texts(token_texts(pipe.tokenizer), wm)
        t0 = time.perf_counter()
        prompts = prompts_from_heldout(pipe, args.n, 24, args.seed)
        marked = sample(pipe, prompts, max(LENGTHS), KEY, args.seed)
        plain = sample(pipe, prompts, max(LENGTHS), None, args.seed)
        cooler = sample(pipe, prompts, max(LENGTHS), None, args.seed, temperature=0.8)
        took = time.perf_counter() - t0
        marked_ids = [ids_of(pipe, t) for t in marked]
        plain_ids = [ids_of(pipe, t) for t in plain]
        cooler_ids = [ids_of(pipe, t) for t in cooler]
        print(f"== {run} ({kind}, vocab {pipe.tokenizer.vocab_size}); sampling "
              f"{2 * args.n} x {max(LENGTHS)} tokens took {took:.0f} s")  # fmt: skip
        print("tokens | TPR @ FPR 1e-3 | mean z marked | human FPR (empirical) | mean z human "
              "| zero-shot AUROC, T 1 | T 0.8")  # fmt: skip
        rng = np.random.default_rng(args.seed)
        for length in LENGTHS:
            zs = [z_of_ids(ids[:length], table, wm) for ids in marked_ids if len(ids) >= length]
            human = human_windows(pipe, length, args.n, seed=args.seed + 7)
            hz = [z_of_ids(w, table, wm) for w in human]
            start = [pipe.tokenizer.eos_id] if pipe.tokenizer.eos_id is not None else \
                pipe.tokenizer.encode("\n")  # fmt: skip
            gen_d = [curvature_of_ids(pipe.model, start, ids[:length]).score
                     for ids in plain_ids if len(ids) >= length]  # fmt: skip
            hum_d = [curvature_of_ids(pipe.model, start, w).score for w in human]
            cool_d = [curvature_of_ids(pipe.model, start, ids[:length]).score
                      for ids in cooler_ids if len(ids) >= length]  # fmt: skip
            print(f"{length:6d} | {np.mean(np.array(zs) >= threshold):14.3f} | "
                  f"{np.mean(zs):13.2f} | {np.mean(np.array(hz) >= threshold):21.4f} | "
                  f"{np.mean(hz):12.2f} | {auroc(gen_d, hum_d):20.3f} | {auroc(cool_d, hum_d):5.3f}   "
                  f"({len(zs)} marked, {len(gen_d)} plain texts this long)")  # fmt: skip
        full = [ids[:200] for ids in marked_ids if len(ids) >= 200]
        for share in (0.10, 0.25):
            attacked = []
            for ids in full:
                ids = list(ids)
                where = rng.choice(len(ids), size=round(share * len(ids)), replace=False)
                for i in where:
                    ids[i] = int(rng.integers(0, pipe.tokenizer.vocab_size))
                attacked.append(z_of_ids(ids, table, wm))
            print(f"  {share:.0%} of 200 tokens replaced at random: TPR "
                  f"{np.mean(np.array(attacked) >= threshold):.3f} (mean z {np.mean(attacked):.2f})")  # fmt: skip
        if ref is not None:
            ppl_m = bits_per_char(ref, ids_of, marked, prompts)
            ppl_p = bits_per_char(ref, ids_of, plain, prompts)
            print(f"  perplexity per character under {args.reference}: plain {ppl_p:.3f}, "
                  f"watermarked {ppl_m:.3f} ({ppl_m / ppl_p - 1:+.1%})")  # fmt: skip
        print()


if __name__ == "__main__":
    main()
