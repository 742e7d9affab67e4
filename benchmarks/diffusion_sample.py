"""Diffusion sampling speed: images/s per scheduler and step count, beside diffusers'.

Every scheduler registered in aigc.schedulers.SCHEDULERS when the script runs, each at
--steps steps (DDPM, whose ancestral steps need many, at --ddpm-steps instead), through
``Diffusion.generate`` with the model's classifier-free guidance (one network call a
step on a doubled batch). The model is the ddpm-digits-cond recipe's with random weights
(the speed does not depend on them), or a trained run given by --run (aigc.load).
"net calls" counts the network's forward calls per batch (a second-order rule such as
Heun makes two a step).

For comparison, where it is cheap (the --steps counts, not DDPM's): diffusers'
UNet2DModel of the same layout and size (diffusion_train.diffusers_unet) sampled by
its DDIMScheduler and DPMSolverMultistepScheduler (DPM-Solver++(2M), Lu et al. 2022)
in the loop of its pipelines, with the same guidance; the ratio is printed against
aigc's scheduler of the same rule when one is registered (ddim, dpm++2m).

Each figure is the median of --repeats batches of --batch images, after one short
warm-up batch of each library.

With --net-batch K [K ...] it measures instead how many rows the U-Net should take at a
time on this device (aigc.models.diffusion.CPU_NET_BATCH; 0 = the whole doubled batch
at once): dpm++2m at the first --steps count, --batch images.

With --server it measures `aigc serve` instead: images/s of one diffusion model
answering --clients concurrent clients against one (server_throughput).

    python benchmarks/diffusion_sample.py --batch 64 --repeats 3
    python benchmarks/diffusion_sample.py --run runs/ddpm-digits-cond --steps 20 50
    python benchmarks/diffusion_sample.py --server --run runs/t2i-shapes --clients 8
    python benchmarks/diffusion_sample.py --net-batch 0 32 64 128 --batch 256 --steps 4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from aigc.errors import ConfigError
from aigc.models.diffusion import Diffusion
from aigc.schedulers import SCHEDULERS
from aigc.trainer import select_device
from diffusion_train import (
    diffusers_sample,
    diffusers_schedule,
    diffusers_unet,
    num_params,
    recipe_config,
    sync,
)
from machine import describe

# aigc scheduler name -> the diffusers scheduler of the same rule
DIFFUSERS_RULES = {"ddim": "DDIMScheduler", "dpm++2m": "DPMSolverMultistepScheduler"}


def measure(
    sample: Callable[[], Tensor], net: nn.Module | Diffusion, n: int, repeats: int,
    device: torch.device,
) -> tuple[float, float]:  # fmt: skip
    """(images/s, network evaluations per batch) of ``sample``, the median of ``repeats``:
    a diffusers U-Net's forward calls, or an aigc model's denoise calls (one a step,
    however many row slices the U-Net takes it in)."""
    calls = [0]

    def count(*_: object) -> None:
        calls[0] += 1

    if isinstance(net, Diffusion):
        denoise = net.denoise
        net.denoise = lambda *a, **kw: (count(), denoise(*a, **kw))[1]
    else:
        hook = net.register_forward_hook(count)
    times = []
    try:
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            sample()
            sync(device)
            times.append(time.perf_counter() - t0)
    finally:
        if isinstance(net, Diffusion):
            del net.denoise
        else:
            hook.remove()
    return n / statistics.median(times), calls[0] / repeats


def row(name: str, steps: int, rate: float, calls: float, n: int, note: str = "") -> None:
    line = f"{name:<38} {steps:>5} {calls:>9.0f} {rate:>9,.1f} {n / rate:>8.2f} s  {note}"
    print(line.rstrip())


PROMPTS = ["a small red square at the top left", "a large blue circle in the centre",
           "a green cross at the bottom right", "a small yellow triangle"]  # fmt: skip


def server_throughput(args: argparse.Namespace) -> None:
    """Images/s of `aigc serve` on one diffusion model, --clients concurrent clients
    against one. Each client loops "POST /v1/images/generations (n=--server-n,
    --server-steps steps of the run's own scheduler), wait for the answer" for
    --server-seconds; the server denoises the requests it holds at once as one batch, so
    the ratio says what batching gives. The model is --run, or else the t2i-shapes recipe
    trained for one step (nearly random weights; the speed does not depend on them), with
    --set overrides. The clients share the machine with the server."""
    import httpx

    from serve_load import free_port

    with tempfile.TemporaryDirectory(prefix="aigc-bench-") as tmp:
        run = Path(args.run) if args.run else Path(tmp) / "t2i-shapes"
        if not args.run:
            import aigc

            print(f"training t2i-shapes for one step (overrides: {args.set or 'none'})", flush=True)
            aigc.train("t2i-shapes", ["train.max_steps=1", "data.n=256", "data.eval_samples=10",
                                      "data.eval_metrics=[]", "train.eval_every=0",
                                      "train.sample_every=0", "train.checkpoint_every=0",
                                      *args.set], run_dir=run, progress=False)  # fmt: skip
        model = os.path.basename(os.path.abspath(run))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(Path(tmp) / "serve.log", "w+")  # noqa: SIM115 (closed below)
        cmd = [sys.executable, "-m", "aigc", "serve", str(run), "--port", str(port),
               "--device", args.device, "--log-level", "warning",
               "--max-image-batch", str(max(args.clients * args.server_n, 1)),
               "--max-n", str(args.server_n), "--torch-threads", str(args.torch_threads)]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise SystemExit(f"the server did not start:\n{log.read()[-3000:]}")
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            card = httpx.get(f"{url}/v1/models/{model}").json()["aigc"]
            text = bool((card.get("diffusion") or {}).get("text"))
            print(f"server pid {proc.pid}: {run} ({card['family']}, {card['image_size']}px"
                  f"{', text-to-image' if text else ''}), n={args.server_n}, "
                  f"{args.server_steps} steps, {os.cpu_count()} CPUs, torch threads "
                  f"{args.torch_threads or 'default'}")  # fmt: skip
            rates = {}
            for clients in (1, args.clients):
                rates[clients] = asyncio.run(
                    _server_phase(url, model, text, clients, args)
                )  # fmt: skip
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.seek(0)
            if "Traceback" in (text_log := log.read()):
                print(f"the server's log has a traceback:\n{text_log[-3000:]}")
            log.close()
    one, many = rates[1], rates[args.clients]
    if one:
        print(f"images/s with {args.clients} clients / with 1: {many:.2f} / {one:.2f} = "
              f"{many / one:.2f}x")  # fmt: skip


async def _server_phase(url: str, model: str, text: bool, clients: int, args) -> float:
    """One phase: images/s of `clients` clients looping for args.server_seconds (after
    one warm-up request each), with the mean batch the server denoised (its /metrics)."""
    import httpx

    def body(i: int) -> dict:
        b = {"model": model, "n": args.server_n, "num_inference_steps": args.server_steps,
             "seed": i}  # fmt: skip
        if text:
            b["prompt"] = PROMPTS[i % len(PROMPTS)]
        return b

    async def batches(client: httpx.AsyncClient) -> tuple[float, float]:
        count = total = 0.0
        for line in (await client.get(f"{url}/metrics")).text.splitlines():
            if line.startswith("aigc_image_batch_size_count"):
                count = float(line.split()[-1])
            elif line.startswith("aigc_image_batch_size_sum"):
                total = float(line.split()[-1])
        return count, total

    images = errors = 0
    async with httpx.AsyncClient(timeout=600) as client:

        async def loop(c: int, until: float | None) -> None:
            nonlocal images, errors
            i = c
            while True:
                r = await client.post(f"{url}/v1/images/generations", json=body(i))
                if until is None:
                    return
                if r.status_code == 200:
                    images += len(r.json()["data"])
                else:
                    errors += 1
                i += clients
                if time.monotonic() >= until:
                    return

        await asyncio.gather(*(loop(c, None) for c in range(clients)))  # warm-up
        before = await batches(client)
        start = time.monotonic()
        await asyncio.gather(*(loop(c, start + args.server_seconds) for c in range(clients)))
        elapsed = time.monotonic() - start
        after = await batches(client)
    rate = images / elapsed
    mean = (after[1] - before[1]) / max(after[0] - before[0], 1)
    print(f"{clients:>3} client{'s' if clients != 1 else ' '}: {rate:8.2f} images/s "
          f"({images} images in {elapsed:.1f} s, mean batch {mean:.1f} images"
          f"{f', {errors} errors' if errors else ''})", flush=True)  # fmt: skip
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--run", help="a trained diffusion run (default: the recipe, random weights)")
    ap.add_argument("--batch", type=int, default=64, help="images per batch")
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    ap.add_argument("--ddpm-steps", type=int, nargs="+", default=[250])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's")
    ap.add_argument("--no-diffusers", action="store_true", help="skip diffusers' rows")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--server", action="store_true",
                    help="measure `aigc serve` instead: images/s at 1 and --clients clients")  # fmt: skip
    ap.add_argument("--clients", type=int, default=8, help="--server: concurrent clients")
    ap.add_argument("--server-seconds", type=float, default=20, help="--server: per phase")
    ap.add_argument("--server-n", type=int, default=1, help="--server: images per request")
    ap.add_argument("--server-steps", type=int, default=20, help="--server: steps per request")
    ap.add_argument("--torch-threads", type=int, default=0, help="--server: the server's")
    ap.add_argument("--net-batch", type=int, nargs="+", default=None,
                    help="measure U-Net rows per call (CPU_NET_BATCH) instead; 0 = all")  # fmt: skip
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="--server without --run: a recipe override (model.width=8)")  # fmt: skip
    args = ap.parse_args()
    torch.set_flush_denormal(True)  # as aigc's training and serving do
    if args.server:
        server_throughput(args)
        return

    if args.run:
        import aigc

        model = aigc.load(args.run, device=args.device).model
        source = f"run {args.run}"
    else:
        torch.manual_seed(0)
        model = Diffusion(recipe_config()).to(select_device(args.device)).eval()
        source = "ddpm-digits-cond recipe, random weights"
    cfg, device = model.cfg, model.device
    guidance = cfg.guidance if args.guidance is None else args.guidance
    print(describe(device))
    shape = f"{cfg.image_size}x{cfg.image_size}x{cfg.channels}"
    print(f"{source}: {shape}, {num_params(model):,} parameters, "
          f"{'class-conditional, guidance ' + format(guidance, 'g') if cfg.conditional else 'unconditional'}; "
          f"batch {args.batch}, median of {args.repeats}")  # fmt: skip

    n = args.batch
    z = torch.randn(n, cfg.z_dim, generator=torch.Generator().manual_seed(0)).to(device)
    labels = None
    if model.num_classes:  # each attribute's classes in turn: (n, A)
        labels = torch.stack([torch.arange(n) % k for k in model.num_classes], 1).to(device)

    unet = None
    if not args.no_diffusers:
        import diffusers

        torch.manual_seed(0)
        unet = diffusers_unet(cfg).to(device).eval()
        train_schedule = diffusers_schedule(cfg)
        print(f"diffusers {diffusers.__version__}: UNet2DModel of the same layout, "
              f"{num_params(unet):,} parameters")  # fmt: skip
        first = None if labels is None else labels[:, 0]  # diffusers has one class embedding

        def diffusers_run(rule: str, steps: int) -> Tensor:
            scheduler = getattr(diffusers, rule).from_config(train_schedule.config)
            return diffusers_sample(unet, scheduler, z, first, steps, guidance)

        diffusers_run("DDIMScheduler", 2)  # warm-up

    model.generate(z, labels, "ddim", 2, guidance)  # warm-up
    if args.net_batch:
        import aigc.models.diffusion as family

        steps, default = args.steps[0], family.CPU_NET_BATCH
        print(f"\n{'U-Net rows per call':<38} {'steps':>5} {'net calls':>9} {'images/s':>9} "
              f"{'batch':>10}")  # fmt: skip
        rates = {}
        for k in args.net_batch:
            family.CPU_NET_BATCH = k
            rates[k], calls = measure(
                lambda: model.generate(z, labels, "dpm++2m", steps, guidance),
                model, n, args.repeats, device,
            )  # fmt: skip
            whole = f"{k}" if k else f"all ({2 * n if guidance != 1 else n})"
            note = f"{rates[k] / rates[args.net_batch[0]]:.2f}x the first row"
            row(f"dpm++2m, {whole}", steps, rates[k], calls, n, note)
        family.CPU_NET_BATCH = default
        return
    print(f"\n{'sampler':<38} {'steps':>5} {'net calls':>9} {'images/s':>9} {'batch':>10}")
    ours: dict[tuple[str, int], float] = {}
    for name in SCHEDULERS:
        for steps in args.ddpm_steps if name == "ddpm" else args.steps:
            try:
                rate, calls = measure(
                    lambda name=name, steps=steps: model.generate(z, labels, name, steps, guidance),
                    model, n, args.repeats, device,
                )  # fmt: skip
            except (ValueError, ConfigError) as e:
                print(f"aigc {name:<33} {steps:>5}  cannot serve it: {e}")
                continue
            ours[name, steps] = rate
            row(f"aigc {name}", steps, rate, calls, n)
    if unet is not None:
        for name, rule in DIFFUSERS_RULES.items():
            for steps in args.steps:
                rate, calls = measure(
                    lambda rule=rule, steps=steps: diffusers_run(rule, steps),
                    unet, n, args.repeats, device,
                )  # fmt: skip
                note = f"aigc {name} / this: {ours[name, steps] / rate:.2f}x" if (
                    (name, steps) in ours) else ""  # fmt: skip
                row(f"diffusers {rule}", steps, rate, calls, n, note)


if __name__ == "__main__":
    main()
