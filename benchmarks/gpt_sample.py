"""Text generation speed: KV cache against full recompute, batch 16 against batch 1.

Random weights (the speed does not depend on them), a char tokenizer of 96
printable characters without end-of-text, so every row makes all its tokens.

    python benchmarks/gpt_sample.py --repeats 3

"with cache" and "batch" run `aigc.sampling.generate` end to end (prefill, KV
cache, sampling, detokenizing); "no cache" is nanoGPT's loop: the full forward over
the last block_size tokens at every step. "torch's matmul" is the batch again with the
cached path's oneDNN products turned off (AIGC_ONEDNN=0: every product on torch's
default, MKL on x86), beside the default. Each figure is the median of --repeats.

    python benchmarks/gpt_sample.py --n-layer 8 --n-head 8 --n-embd 512 --block-sizes 128
"""

from __future__ import annotations

import argparse
import statistics
import string
import time

import torch

from aigc.data.tokenizers import CharTokenizer
from aigc.models import gpt_cache
from aigc.models.gpt import GPT, GPTConfig
from aigc.sampling import SamplingParams, generate


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, thread pool, first-call dispatch
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def sample_without_cache(model: GPT, idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """nanoGPT's generate(): recompute the cropped context for every new token."""
    block = model.cfg.block_size
    for _ in range(new_tokens):
        logits, _ = model(idx[:, -block:])
        probs = logits[:, -1].softmax(dim=-1)  # temperature 1
        idx = torch.cat([idx, torch.multinomial(probs, 1)], dim=1)
    return idx


def measure(block: int, tok: CharTokenizer, prompt: str, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=tok.vocab_size,
        block_size=block,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
    )
    model = GPT(cfg).eval()
    n = args.new_tokens
    params = SamplingParams(max_new_tokens=n, temperature=1.0)
    idx = torch.tensor([tok.encode(prompt)])
    prompts = [prompt] * args.batch

    cached = median_seconds(lambda: generate(model, tok, prompt, params), args.repeats)
    plain = median_seconds(lambda: sample_without_cache(model, idx, n), args.repeats)
    batched = median_seconds(lambda: generate(model, tok, prompts, params), args.repeats)

    b1, b1_plain, bn = n / cached, n / plain, args.batch * n / batched
    print(f"\nblock_size={block}")
    report("batch 1, KV cache", b1)
    report("batch 1, no cache", b1_plain, f"cache speed-up {b1 / b1_plain:.1f}x")
    report(f"batch {args.batch}, KV cache", bn, f"{bn / b1:.1f}x batch 1 (total tokens/s)")
    if gpt_cache._onednn["on"]:
        gpt_cache._onednn["on"] = False
        try:
            stock = median_seconds(lambda: generate(model, tok, prompts, params), args.repeats)
        finally:
            gpt_cache._onednn["on"] = True
        bs = args.batch * n / stock
        report(f"batch {args.batch}, torch's matmul", bs, f"oneDNN's products {bn / bs:.2f}x this")


def report(name: str, tokens_per_s: float, note: str = "") -> None:
    print(f"  {name:<26} {tokens_per_s:8.0f} tokens/s   {note}".rstrip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--new-tokens", type=int, default=500)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()

    torch.set_flush_denormal(True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tok = CharTokenizer(string.printable[:95] + "\n")  # 96 characters
    prompt = "".join(tok.chars[(7 * i) % tok.vocab_size] for i in range(args.prompt_len))
    print(
        f"GPT n_layer={args.n_layer} n_head={args.n_head} n_embd={args.n_embd} "
        f"vocab={tok.vocab_size}; {args.new_tokens} new tokens after a {args.prompt_len}-token "
        f"prompt, temperature 1; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"median of {args.repeats}"
    )
    for block in args.block_sizes:
        measure(block, tok, prompt, args)


if __name__ == "__main__":
    main()
