"""Load on `aigc serve`: N concurrent streaming clients on loopback, for a bounded time.

Starts a real server (``python -m aigc serve RUN``) in a subprocess, waits for /health,
then runs one phase per client count: each client loops "POST /v1/completions with
``stream: true``, read the server-sent events to ``[DONE]``" until the phase's time is
up (a request under way then finishes and is counted). Per phase it prints requests/s,
generated tokens/s (the ``usage`` of the last chunk, asked for with
``stream_options.include_usage``), p50/p95/p99 of latency and of time to first token,
errors by status, the mean batch size the server decoded (its /metrics), and the
server's resident memory (RSS sampled every 0.25 s: at start, at end, peak, and the
slope in MB/min). Last comes the ratio of tokens/s at the most clients to tokens/s at
the fewest. ``--minutes M`` adds a soak: the most clients for M minutes, comparing the
median RSS of the first and the last quarter, to show that memory stays flat. Last, with
the server stopped, the same client counts run through the decoder alone in this process
(``--decoder-seconds``, no HTTP): the ceiling that batching on this machine allows, beside
what the server delivered of it.

    python benchmarks/serve_load.py                          # 1 and 16 clients, 30 s each
    python benchmarks/serve_load.py --seconds 20 --clients 1,16
    python benchmarks/serve_load.py --seconds 20 --minutes 2  # and a 2-minute soak
    python benchmarks/serve_load.py --torch-threads 2        # the server's torch threads

The run (``--run``, default runs/quickstart) is trained first when missing (a 60 s
gpt-pydoc-char). The clients share the machine with the server, so on a small machine
the figures include their cost too. The server leaves one core to its event loop (its
``--torch-threads`` default); ``--torch-threads N`` sets the server's torch threads.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPTS = ["The for statement", "Lists are", "def ", "A class", "import", "while True:"]


# ---------------------------------------------------------------------------
# the server and its memory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int, args: argparse.Namespace, log) -> subprocess.Popen:
    """`aigc serve RUN` in a subprocess; returns once GET /health answers 200."""
    cmd = [sys.executable, "-m", "aigc", "serve", str(run), "--port", str(port),
           "--device", args.device, "--log-level", "warning",
           "--max-tokens", str(max(args.max_tokens, 2048)),
           "--torch-threads", str(args.torch_threads)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; its log: {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the server did not answer /health within 120 s; its log: {log.name}")


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (psutil when installed, else /proc/PID/status)."""
    try:
        import psutil
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # the line is in kB
        raise RuntimeError("no VmRSS in /proc: install psutil") from None
    return psutil.Process(pid).memory_info().rss


async def sample_rss(pid: int, samples: list[tuple[float, int]], every: float = 0.25) -> None:
    """Append (seconds, RSS bytes) every `every` seconds until cancelled."""
    while True:
        samples.append((time.monotonic(), rss_bytes(pid)))
        await asyncio.sleep(every)


def slope_mb_per_min(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over time, MB per minute."""
    if len(samples) < 2:
        return 0.0
    t0 = samples[0][0]
    xs = [(t - t0) / 60 for t, _ in samples]
    ys = [r / 2**20 for _, r in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def server_metrics(url: str) -> dict[str, float]:
    """The samples of GET /metrics we report, summed over models: batch-size histogram,
    generated tokens."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in ("aigc_batch_size_sum", "aigc_batch_size_count",
                          "aigc_generated_tokens_total"):  # fmt: skip
                out[s.name] += s.value
            elif s.name == "aigc_batch_size_bucket":
                out[f"le={s.labels['le']}"] += s.value
    return dict(out)


# ---------------------------------------------------------------------------
# the clients


@dataclass
class Phase:
    """What the clients of one phase saw."""

    clients: int
    seconds: float = 0.0  # from the first request to the last answer
    latencies: list[float] = field(default_factory=list)  # per successful request, s
    ttfts: list[float] = field(default_factory=list)  # to the first text chunk, s
    tokens: int = 0  # completion tokens of successful requests (their usage)
    errors: Counter[str] = field(default_factory=Counter)  # status or exception -> count
    rss: list[tuple[float, int]] = field(default_factory=list)  # (time, bytes)
    batch: dict[str, float] = field(default_factory=dict)  # /metrics difference


async def one_request(client: httpx.AsyncClient, body: dict, phase: Phase) -> None:
    """POST a streamed completion and read it to [DONE]; record it in `phase`."""
    start = time.perf_counter()
    first = None
    usage = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                phase.errors[str(r.status_code)] += 1
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                if data.startswith('{"error"'):  # an error inside the stream
                    phase.errors["stream:" + json.loads(data)["error"]["type"]] += 1
                    return
                if first is None:
                    first = time.perf_counter()
                if '"usage"' in data:  # only the last chunk is parsed
                    usage = json.loads(data)["usage"]
    except httpx.HTTPError as e:
        phase.errors[type(e).__name__] += 1
        return
    end = time.perf_counter()
    if usage is None:
        phase.errors["no usage"] += 1
        return
    phase.latencies.append(end - start)
    phase.ttfts.append((first or end) - start)
    phase.tokens += usage["completion_tokens"]


async def run_phase(url: str, pid: int, clients: int, seconds: float, args) -> Phase:
    """`clients` clients, each sending requests one after another for `seconds`."""
    phase = Phase(clients)
    prompts = itertools.cycle(PROMPTS)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        before = await asyncio.to_thread(server_metrics, url)
        sampler = asyncio.create_task(sample_rss(pid, phase.rss))
        start = time.perf_counter()
        deadline = start + seconds

        async def loop() -> None:
            while time.perf_counter() < deadline:
                body = {"model": args.model, "prompt": next(prompts),
                        "max_tokens": args.max_tokens, "stream": True,
                        "stream_options": {"include_usage": True}}  # fmt: skip
                await one_request(client, body, phase)

        await asyncio.gather(*(loop() for _ in range(clients)))
        phase.seconds = time.perf_counter() - start
        sampler.cancel()
        phase.rss.append((time.monotonic(), rss_bytes(pid)))
        after = await asyncio.to_thread(server_metrics, url)
    phase.batch = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    return phase


# ---------------------------------------------------------------------------
# the report


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (0-100) of xs, by linear interpolation; nan when empty."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def tokens_per_s(p: Phase) -> float:
    return p.tokens / p.seconds if p.seconds else 0.0


def report(p: Phase) -> None:
    mb = [r / 2**20 for _, r in p.rss]
    n = len(p.latencies)
    rows = p.batch.get("aigc_batch_size_count", 0.0)
    mean_batch = p.batch.get("aigc_batch_size_sum", 0.0) / rows if rows else float("nan")
    buckets = sorted(
        ((float(k[3:]), v) for k, v in p.batch.items() if k.startswith("le=")),
        key=lambda kv: kv[0],
    )
    shares, below = [], 0.0
    for le, cum in buckets:  # cumulative counts -> share of steps per bucket
        if cum - below > 0 and rows:
            shares.append(f"<={le:g}: {100 * (cum - below) / rows:.0f}%")
        below = cum
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(p.errors.items())) or "none"
    ms = 1000
    print(f"\n{p.clients} client{'s' if p.clients != 1 else ''}, {p.seconds:.1f} s")
    print(f"  requests        {n} ok, {n / p.seconds:.2f} requests/s")
    print(f"  tokens          {p.tokens}, {tokens_per_s(p):.0f} generated tokens/s")
    print(f"  latency (ms)    p50 {pct(p.latencies, 50) * ms:.0f}  "
          f"p95 {pct(p.latencies, 95) * ms:.0f}  p99 {pct(p.latencies, 99) * ms:.0f}")  # fmt: skip
    print(f"  first token (ms) p50 {pct(p.ttfts, 50) * ms:.0f}  "
          f"p95 {pct(p.ttfts, 95) * ms:.0f}  p99 {pct(p.ttfts, 99) * ms:.0f}")  # fmt: skip
    print(f"  errors          {errors}")
    print(f"  batch size      mean {mean_batch:.2f} rows over {rows:.0f} decode steps "
          f"({', '.join(shares)})")  # fmt: skip
    if mb:
        print(f"  server RSS (MB) start {mb[0]:.1f}  end {mb[-1]:.1f}  peak {max(mb):.1f}  "
              f"slope {slope_mb_per_min(p.rss):+.2f} MB/min ({len(mb)} samples)")  # fmt: skip


def report_soak(p: Phase) -> None:
    report(p)
    mb = [r / 2**20 for _, r in p.rss]
    q = max(1, len(mb) // 4)
    first, last = statistics.median(mb[:q]), statistics.median(mb[-q:])
    print(f"  soak: median RSS first quarter {first:.1f} MB, last quarter {last:.1f} MB "
          f"({last - first:+.1f} MB)")  # fmt: skip


def decoder_alone(args: argparse.Namespace) -> list[tuple[int, float]]:
    """The model's own ceiling: tokens/s of `BatchDecoder` in this process, no HTTP, with
    `clients` rows kept in flight (a row that ends is replaced at once), the server's
    torch threads, prompts, max_tokens and temperature (the server's default, 1).
    Run after the server has stopped, so that nothing else shares the cores."""
    import torch

    import aigc
    from aigc.sampling import BatchDecoder, SamplingParams
    from aigc.serve.settings import ServeSettings

    torch.set_num_threads(ServeSettings(torch_threads=args.torch_threads).threads())
    gen = aigc.load(args.run, device=args.device)
    ids = [gen.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=1.0)
    out = []
    for clients in args.clients:
        decoder, made, tokens = BatchDecoder(gen.model, gen.tokenizer), 0, 0
        for made in range(clients):
            decoder.add(made, ids[made % len(ids)], params)
        start = time.perf_counter()
        while time.perf_counter() - start < args.decoder_seconds:
            ended = sum(e.finish_reason is not None for e in decoder.step())
            tokens += decoder.last_step_rows
            for _ in range(ended):
                made += 1
                decoder.add(made, ids[made % len(ids)], params)
        out.append((clients, tokens / (time.perf_counter() - start)))
    return out


def report_decoder(results: list[tuple[int, float]], http: list[float]) -> None:
    print("\nthe decoder alone (no HTTP, no clients; the same model, threads and requests):")
    for (rows, tps), served in zip(results, http, strict=True):
        share = f", the server gave {100 * served / tps:.0f}% of it" if served else ""
        rows_s = f"{rows} row{'s' if rows != 1 else ''}"
        print(f"  {rows_s:>8} in flight  {tps:.0f} tokens/s{share}")
    if len(results) >= 2:
        (lo, a), (hi, b) = results[0], results[-1]
        print(f"  {hi} rows / {lo}: {b:.0f} / {a:.0f} = {b / a:.2f}x (what batching can give "
              "on this machine, whatever the server does)")  # fmt: skip


def ensure_run(run: Path) -> None:
    if (run / "run.json").is_file():
        return
    import aigc

    print(f"{run} holds no run: training gpt-pydoc-char for 60 s", flush=True)
    aigc.train("gpt-pydoc-char", ["train.max_time=60"], run_dir=run)


async def main_async(args: argparse.Namespace, url: str, pid: int) -> list[Phase]:
    # warm-up: the first requests pay for the worker thread and torch's first calls
    warm = Phase(1)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for _ in range(3):
            body = {"model": args.model, "prompt": "a", "max_tokens": 8, "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            await one_request(client, body, warm)
    if warm.errors:
        raise SystemExit(f"warm-up requests failed: {dict(warm.errors)}")
    phases = []
    for clients in args.clients:
        phases.append(await run_phase(url, pid, clients, args.seconds, args))
        report(phases[-1])
    if len(phases) >= 2 and tokens_per_s(phases[0]):
        lo, hi = phases[0], phases[-1]
        ratio = tokens_per_s(hi) / tokens_per_s(lo)
        print(f"\ntokens/s with {hi.clients} clients / tokens/s with {lo.clients} client"
              f"{'s' if lo.clients != 1 else ''}: {tokens_per_s(hi):.0f} / "
              f"{tokens_per_s(lo):.0f} = {ratio:.2f}x")  # fmt: skip
    if args.minutes > 0:
        clients = max(args.clients)
        print(f"\nsoak: {clients} clients for {args.minutes:g} min", flush=True)
        report_soak(await run_phase(url, pid, clients, args.minutes * 60, args))
    return phases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/quickstart"), help="a text run")
    ap.add_argument("--clients", default="1,16", help="client counts, one phase each")
    ap.add_argument("--seconds", type=float, default=30, help="length of each phase")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    ap.add_argument("--minutes", type=float, default=0, help="then a soak this long (0: none)")
    ap.add_argument("--device", default="auto", help="the server's --device")
    ap.add_argument(
        "--decoder-seconds",
        type=float,
        default=10,
        help="then the decoder alone, in this process, this long per client count (0: skip)",
    )
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="the server's --torch-threads (0: its default, one per core but one)",
    )
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    args.model = Path(os.path.abspath(args.run)).name  # served under its folder's name
    ensure_run(args.run)
    port = free_port()
    with tempfile.NamedTemporaryFile("w+", prefix="aigc-serve-", suffix=".log") as log:
        proc = start_server(args.run, port, args, log)
        try:
            threads = args.torch_threads or "default"
            print(f"server pid {proc.pid} on port {port}: {args.run} ({args.model}), "
                  f"max_tokens {args.max_tokens}, {os.cpu_count()} CPUs, torch threads "
                  f"{threads}", flush=True)  # fmt: skip
            phases = asyncio.run(main_async(args, f"http://127.0.0.1:{port}", proc.pid))
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.seek(0)
        if "Traceback" in (text := log.read()):
            print(f"\nthe server's log has a traceback:\n{text[-3000:]}")
    if args.decoder_seconds > 0:
        served = {p.clients: tokens_per_s(p) for p in phases}
        results = decoder_alone(args)
        report_decoder(results, [served.get(c, 0.0) for c, _ in results])


if __name__ == "__main__":
    main()
