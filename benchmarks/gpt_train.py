"""Training throughput of aigc's trainer against a nanoGPT-style loop, side by side.

Both train the same GPT (n_layer 4, n_head 4, n_embd 128, block 128, batch 32,
character vocabulary of the embedded Python docs) in fp32 for the same wall time.
The reference is the plain eager loop of nanoGPT's train.py: random windows,
forward, backward, clip, AdamW (default implementation), no denormal flushing.
Model-FLOPs utilisation uses 6N + 12·L·C·T FLOPs per token against the fp32
matmul throughput measured here first.

    python benchmarks/gpt_train.py --seconds 30
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import aigc
from aigc.models.gpt import GPT, GPTConfig
from aigc.runs import RunDir
from machine import matmul_peak


def corpus_tokens() -> np.ndarray:
    from aigc.data.text import TextSource, build_corpus

    tmp = Path(tempfile.mkdtemp())
    _, corpus = build_corpus(TextSource(), tmp, tokenizer_kind="char")
    return np.asarray(corpus.train), corpus.meta.vocab_size


def reference_loop(train: np.ndarray, vocab: int, args, seconds: float) -> tuple[float, int]:
    """nanoGPT's eager training loop; returns (tokens/s, steps)."""
    torch.manual_seed(1337)
    cfg = GPTConfig(vocab_size=vocab, block_size=args.block, n_layer=4, n_head=4, n_embd=128)
    model = GPT(cfg)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.99),
    )
    data = torch.from_numpy(train.astype(np.int64))
    B, T = args.batch, args.block

    def get_batch():
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([data[i : i + T] for i in ix])
        y = torch.stack([data[i + 1 : i + 1 + T] for i in ix])
        return x, y

    steps, t0, warm = 0, None, 3
    while True:
        if steps == warm:
            t0 = time.perf_counter()
        x, y = get_batch()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
        if t0 is not None and time.perf_counter() - t0 >= seconds:
            break
    elapsed = time.perf_counter() - t0
    return (steps - warm) * B * T / elapsed, steps


def aigc_loop(args, seconds: float, compile_: bool) -> tuple[float, int]:
    """aigc.train on the same model and data for the same time; returns (tokens/s, steps)."""
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"train.max_time={seconds}",
            "train.max_steps=1000000",
            f"train.batch_size={args.batch}",
            f"model.block_size={args.block}",
            "model.n_layer=4",
            "model.n_head=4",
            "model.n_embd=128",
            "train.eval_every=0",
            "train.checkpoint_every=0",
            "train.log_every=1000000",
            f"train.compile={str(compile_).lower()}",
        ]
        out = aigc.train(
            "configs/gpt-pydoc-char.yaml", overrides, run_dir=Path(tmp) / "run", progress=False
        )
        rows = [r for r in RunDir(out.run_dir).read_metrics() if "tokens_per_s" in r]
        return rows[-1]["tokens_per_s"], out.step


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=30.0, help="training time per measurement")
    ap.add_argument("--repeats", type=int, default=1, help="alternating measurements of each")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--compile", action="store_true", help="also measure train.compile=true")
    args = ap.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    peak = matmul_peak()
    print(f"fp32 matmul peak (1024x1024): {peak:.0f} GFLOP/s")
    train, vocab = corpus_tokens()
    cfg = GPTConfig(vocab_size=vocab, block_size=args.block, n_layer=4, n_head=4, n_embd=128)
    flops_per_token = GPT(cfg).flops_per_token(args.block)
    print(f"model: {GPT(cfg).num_params() / 1e6:.2f} M non-embedding params, vocab {vocab}, "
          f"{flops_per_token / 1e6:.2f} MFLOP/token")  # fmt: skip

    ref, ours, comp = [], [], []
    for _ in range(args.repeats):
        with _denormals(False):
            ref.append(reference_loop(train, vocab, args, args.seconds)[0])
        ours.append(aigc_loop(args, args.seconds, False)[0])
        if args.compile:
            comp.append(aigc_loop(args, args.seconds, True)[0])

    def show(name: str, xs: list[float]) -> float:
        m = statistics.median(xs)
        mfu = m * flops_per_token / (peak * 1e9)
        print(
            f"{name:<28} {m:>9,.0f} tokens/s   MFU {100 * mfu:4.1f}%   runs {[round(x) for x in xs]}"
        )
        return m

    print()
    r = show("nanoGPT-style eager loop", ref)
    o = show("aigc trainer", ours)
    print(f"ratio aigc / reference: {o / r:.2f}x")
    if comp:
        c = show("aigc trainer, compile", comp)
        print(f"ratio aigc compile / reference: {c / r:.2f}x")


@contextlib.contextmanager
def _denormals(flush: bool):
    before = torch.set_flush_denormal(flush)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


if __name__ == "__main__":
    main()
