"""Downstream fine-tuning from the quickstart's pretrained GPT: classification and chat.

Classification: the standard library's docstrings labelled by package (ten
classes), from the pretrained run (full fine-tune and LoRA) and from random
initialisation with the same architecture, steps, batches and data order; the
random start gets two learning rates (the fine-tune's and the quickstart's
pretraining one) and the better is reported. Prints held-out accuracy and
macro-F1, and the majority-class baseline.

Chat: the Python documentation demonstrations; held-out loss on the assistant's
tokens with the base's weights (new template tokens at their mean embedding),
after a full fine-tune and after LoRA, and one greedy answer.

    python benchmarks/downstream.py --base runs/quickstart --steps 500
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import aigc

ROOT = Path(__file__).resolve().parents[1]


def _finetune(base: Path, runs: Path, name: str, task: str, method: str, steps: int,
              extra: list[str], rank: int) -> tuple[dict, float, object]:  # fmt: skip
    t0 = time.perf_counter()
    out = aigc.finetune(base, [f"train.max_steps={steps}", *extra], method=method, task=task,
                        run_dir=runs / name, lora_rank=rank, progress=False)  # fmt: skip
    gen = aigc.load(out.run_dir)
    return gen.evaluate(save=False), time.perf_counter() - t0, gen


def classification(base: Path, runs: Path, steps: int, rank: int) -> None:
    print(f"== classification: stdlib docstrings, 10 packages, {steps} steps of 32 texts ==")
    rows = {}
    for method in ("full", "lora"):
        res, secs, gen = _finetune(base, runs, f"clf-{method}", "classify", method, steps, [], rank)
        rows[f"pretrained, {method}"] = (res, secs)
    meta = gen.task.meta
    base_cfg = aigc.load_config(base / "config.yaml")
    for lr in (1e-3, 5e-3):
        cfg = {
            "family": "classifier",
            "model": {k: getattr(base_cfg.model, k) for k in
                      ("block_size", "n_layer", "n_head", "n_embd", "bias")},
            "train": {"max_steps": steps, "batch_size": base_cfg.train.batch_size, "lr": lr,
                      "min_lr": lr / 10, "warmup_steps": 20, "eval_every": 0},
        }  # fmt: skip
        t0 = time.perf_counter()
        out = aigc.train(cfg, run_dir=runs / f"clf-random-{lr:g}", progress=False)
        res = aigc.load(out.run_dir).evaluate(save=False)
        rows[f"random init, lr {lr:g}"] = (res, time.perf_counter() - t0)
    majority = max(meta["train_counts"]) / sum(meta["train_counts"])
    print(f"{meta['n_train']} training / {meta['n_val']} held-out texts, "
          f"{meta['truncated_to_block']} cut to {base_cfg.model.block_size} tokens; "
          f"majority class share {majority:.3f}")  # fmt: skip
    print(f"{'start':24s} {'accuracy':>9s} {'macro-F1':>9s} {'time':>7s}")
    for name, (res, secs) in rows.items():
        print(f"{name:24s} {res['accuracy']:9.4f} {res['macro_f1']:9.4f} {secs:6.1f}s")
    best = max(
        (r for n, r in rows.items() if n.startswith("random")), key=lambda r: r[0]["accuracy"]
    )
    gain = rows["pretrained, full"][0]["accuracy"] - best[0]["accuracy"]
    print(f"pretraining adds {100 * gain:+.1f} accuracy points over the best random start")


def _held_out_questions(gen) -> list[tuple[list[dict], str]]:
    """(messages up to the last answer, that answer) of each held-out conversation."""
    from aigc.tasks.chat import split_chat_data

    out = []
    for conv in split_chat_data(gen.config.data)[1]:
        last = max(j for j, m in enumerate(conv) if m.role == "assistant")
        out.append(([m.to_dict() for m in conv[:last]], conv[last].content))
    return out


def _stop_rate(gen, limit: int = 400) -> float:
    """Share of held-out questions whose greedy answer ends with <|end|> within ``limit``
    tokens (the format the template teaches), judged from the raw completion."""
    stopped = 0
    questions = _held_out_questions(gen)
    for messages, _ in questions:
        raw = gen.generate(gen.chat_prompt(messages), max_new_tokens=limit, temperature=0,
                           stop=["<|end|>"])  # fmt: skip
        n = len(gen.tokenizer.encode(raw)) if raw else 0
        stopped += n < limit - 1
    return stopped / len(questions)


def chat(base: Path, runs: Path, steps: int, rank: int) -> None:
    print("\n== chat: Python documentation demonstrations ==")
    still = ["train.lr=0", "train.min_lr=0", "train.warmup_steps=1"]
    res, _, gen = _finetune(base, runs, "chat-before", "chat", "full", 1, still, rank)
    print(f"{'weights':28s} {'assistant loss':>14s} {'stops':>6s} {'time':>6s}")
    print(f"{'base (markers at mean)':28s} {res['loss']:14.4f} {_stop_rate(gen):6.0%} {'-':>6s}")
    for method, n in (("full", steps // 5), ("full", steps), ("lora", steps)):
        res, secs, gen = _finetune(base, runs, f"chat-{method}-{n}", "chat", method, n, [], rank)
        name = f"{method}, {n} steps"
        print(f"{name:28s} {res['loss']:14.4f} {_stop_rate(gen):6.0%} {secs:5.0f}s")
    messages, reference = _held_out_questions(gen)[0]
    answer = gen.chat(messages, max_new_tokens=200, temperature=0)
    print(f"user> {messages[-1]['content']}\nassistant (last run, greedy)> {answer}\n"
          f"reference> {reference[:300]}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--base", type=Path, default=ROOT / "runs" / "quickstart")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--rank", type=int, default=3)
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "downstream-bench")
    ap.add_argument("--only", choices=["classify", "chat"], default=None)
    args = ap.parse_args()
    shutil.rmtree(args.runs, ignore_errors=True)
    if args.only in (None, "classify"):
        classification(args.base, args.runs, args.steps, args.rank)
    if args.only in (None, "chat"):
        chat(args.base, args.runs, args.steps, args.rank)


if __name__ == "__main__":
    main()
