"""Moderation: precision and recall of the built-in categories on the seeded labelled set,
and requests/s of POST /v1/moderations.

The set is aigc.safety.moderation_set.labelled_set (its docstring lists the groups:
clean sentences, planted personal data and numbers that are not, profane words plain,
disguised and disguised beyond the matcher, Scunthorpe words, homonyms, block-list
terms and near misses). Each category is scored over the whole set; then the share of
each group it flags. For profanity, better-profanity (a word-list filter with leetspeak
variants, the `bench` extra) runs on the same sentences; the set's profane words come
from aigc's own list, so its recall also measures how far the two lists overlap.

Last, a real server (``python -m aigc serve RUN``, a 2-step tiny run trained in a temp
folder) answers POST /v1/moderations from C concurrent clients for S seconds, one
sentence or 16 per request, by the default policy.

    python benchmarks/moderation.py                  # 200 sentences a group, 10 s a phase
    python benchmarks/moderation.py --per-group 100 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
BLOCK_NAME = "codes"


def quality(per_group: int, seed: int) -> None:
    from aigc.safety.moderation import Moderator
    from aigc.safety.moderation_set import BLOCKLIST, CATEGORIES, labelled_set, precision_recall

    examples = labelled_set(seed, per_group)
    m = Moderator.from_policy({"categories": {
        "personal_data": {"action": "redact"}, "profanity": {"action": "refuse"},
        BLOCK_NAME: {"source": "blocklist", "action": "refuse", **BLOCKLIST}}})  # fmt: skip
    texts = [e.text for e in examples]
    m.check_batch(texts[:50])  # compiles the detectors' expressions
    t = time.perf_counter()
    results = m.check_batch(texts)
    took = time.perf_counter() - t
    names = {"personal_data": "personal_data", "profanity": "profanity", "blocklist": BLOCK_NAME}
    preds = {c: [r.categories[names[c]] for r in results] for c in CATEGORIES}
    try:
        from better_profanity import profanity as better

        better.load_censor_words()
        preds["better-profanity"] = [better.contains_profanity(t) for t in texts]
    except ImportError:
        print("(better-profanity is not installed: pip install -e .[bench] to compare)")
    groups = list(dict.fromkeys(e.group for e in examples))
    print(f"labelled set: seed {seed}, {len(examples)} sentences, {per_group} per group "
          f"({', '.join(groups)})")  # fmt: skip
    print(f"checked in {took:.2f} s by three categories ({len(texts) / took:,.0f} sentences/s, "
          "one process)\n")  # fmt: skip
    print(f"| category | positives | precision | recall | {' | '.join(groups)} |")
    print("| --- | ---: | ---: | ---: |" + " ---: |" * len(groups))
    for name, pred in preds.items():
        truth_key = "profanity" if name == "better-profanity" else name
        truth = [e.truth[truth_key] for e in examples]
        p, r = precision_recall(truth, pred)
        shares = []
        for g in groups:
            flags = [f for e, f in zip(examples, pred, strict=True) if e.group == g]
            shares.append(f"{sum(flags) / len(flags):.0%}")
        print(f"| {name} | {sum(truth)} | {p:.3f} | {r:.3f} | {' | '.join(shares)} |")
        if truth_key == "profanity":  # what a word list can know: no homonyms, no evasions
            keep = [e.group not in ("homonym", "profane_evasive") for e in examples]
            t2 = [t for t, k in zip(truth, keep, strict=True) if k]
            p2, r2 = precision_recall(t2, [x for x, k in zip(pred, keep, strict=True) if k])
            print(f"| {name}, without homonym and profane_evasive | {sum(t2)} | {p2:.3f} | "
                  f"{r2:.3f} |" + " |" * len(groups))  # fmt: skip
    print("\n(group columns: the share of the group's sentences the category flags)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_run(folder: Path) -> Path:
    import pydoc_data.topics as topics

    import aigc

    corpus = folder / "docs.txt"
    corpus.write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics))[:20_000])
    overrides = ["model.block_size=32", "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
                 "train.batch_size=4", "train.max_steps=2", "train.eval_every=0",
                 "train.max_time=0", f"data.path={corpus}"]  # fmt: skip
    out = aigc.train(str(ROOT / "configs" / "gpt-pydoc-char.yaml"), overrides,
                     run_dir=folder / "run", progress=False)  # fmt: skip
    return Path(out.run_dir)


async def load(url: str, clients: int, seconds: float, inputs: list[str] | str) -> tuple[int, list[float], int]:  # fmt: skip
    latencies: list[float] = []
    errors = 0
    end = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.monotonic() < end:
            t = time.perf_counter()
            r = await http.post(f"{url}/v1/moderations", json={"input": inputs})
            latencies.append(time.perf_counter() - t)
            errors += r.status_code != 200

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return len(latencies), latencies, errors


def throughput(seconds: float, clients: list[int]) -> None:
    from aigc.safety.moderation_set import labelled_set

    sentences = [e.text for e in labelled_set(1, 20)]
    with tempfile.TemporaryDirectory() as tmp:
        run = tiny_run(Path(tmp))
        port = free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "aigc", "serve", str(run), "--port",
                                 str(port), "--device", "cpu", "--log-level", "warning"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    assert proc.poll() is None, proc.stderr.read()
                    assert time.monotonic() < deadline, "the server did not start"
                    time.sleep(0.1)
            print("\n| clients | texts/request | requests/s | texts/s | p50 ms | p99 ms | errors |")
            print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
            for k in (1, 16):
                for c in clients:
                    batch: str | list[str] = sentences[0] if k == 1 else sentences[:k]
                    asyncio.run(load(url, c, 1.0, batch))  # warm up
                    n, lat, errors = asyncio.run(load(url, c, seconds, batch))
                    q = statistics.quantiles(lat, n=100)
                    print(f"| {c} | {k} | {n / seconds:,.0f} | {n * k / seconds:,.0f} | "
                          f"{statistics.median(lat) * 1e3:.1f} | {q[98] * 1e3:.1f} | {errors} |")  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-group", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", default="1,8")
    args = ap.parse_args()
    from machine import cpu_model

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, no GPU\n")
    quality(args.per_group, args.seed)
    throughput(args.seconds, [int(c) for c in args.clients.split(",")])


if __name__ == "__main__":
    main()
