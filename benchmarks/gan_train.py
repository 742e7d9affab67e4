"""GAN training speed and peak memory: aigc's trainer against a plain eager loop.

Both train the same DCGAN (32×32 digits, batch 64, non-saturating loss, one
discriminator and one generator update per step) for the same wall time, each in
its own process so that peak memory (VmHWM) is its own. The reference is the
loop of PyTorch's DCGAN example: two Adam optimizers, D on real and detached
fake images, then G, nothing else. aigc's loop adds what a run needs: EMA of the
generator, gradient-norm logging, metrics.jsonl, TensorBoard.

    python benchmarks/gan_train.py --seconds 30 --widths 32 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "dcgan-digits.yaml"


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reference(width: int, batch: int, seconds: float) -> dict:
    import torch

    from aigc.config import load_config
    from aigc.data.images import load_image_set, to_tensor
    from aigc.models.gan import GAN

    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    cfg = load_config(RECIPE, [f"model.g_width={width}", f"model.d_width={width}"])
    cfg.model.channels = 1
    model = GAN(cfg.model)
    data = to_tensor(load_image_set("digits", image_size=32, channels=1).images)
    opt_d = torch.optim.Adam(model.D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(model.G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = torch.nn.BCEWithLogitsLoss()
    ones, zeros = torch.ones(batch), torch.zeros(batch)
    steps, t0, warm = 0, None, 3
    while True:
        if steps == warm:
            t0 = time.perf_counter()
        real = data[torch.randint(len(data), (batch,))]
        fake = model.G(torch.randn(batch, cfg.model.z_dim))
        d_loss = bce(model.D(real), ones) + bce(model.D(fake.detach()), zeros)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        g_loss = bce(model.D(fake), ones)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        steps += 1
        if t0 is not None and time.perf_counter() - t0 >= seconds:
            break
    return {"steps_per_s": (steps - warm) / (time.perf_counter() - t0), "peak_mb": peak_rss_mb()}


def ours(width: int, batch: int, seconds: float) -> dict:
    import aigc
    from aigc.runs import RunDir

    with tempfile.TemporaryDirectory() as tmp:
        out = aigc.train(
            RECIPE,
            [
                f"model.g_width={width}",
                f"model.d_width={width}",
                f"train.batch_size={batch}",
                f"train.max_time={seconds}",
                "train.max_steps=1000000",
                "train.log_every=1000000",
                "train.checkpoint_every=0",
                "train.sample_every=0",
                "data.eval_samples=100",
            ],
            run_dir=Path(tmp) / "run",
            progress=False,
        )
        rows = [r for r in RunDir(out.run_dir).read_metrics() if "images_per_s" in r]
        return {"steps_per_s": rows[-1]["images_per_s"] / batch, "peak_mb": peak_rss_mb()}


def measure(which: str, width: int, batch: int, seconds: float) -> dict:
    """Runs one measurement in a fresh process (its own peak memory)."""
    out = subprocess.run(
        [sys.executable, __file__, "--worker", which, "--widths", str(width),
         "--batch", str(batch), "--seconds", str(seconds)],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--worker", choices=["reference", "aigc"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        fn = reference if args.worker == "reference" else ours
        print(json.dumps(fn(args.widths[0], args.batch, args.seconds)))
        return

    import torch

    print(f"DCGAN 32x32 digits, batch {args.batch}, {args.seconds:g} s each; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'width':>5} {'loop':<22} {'G+D steps/s':>11} {'images/s':>9} {'peak RSS':>9}")
    for width in args.widths:
        ref = measure("reference", width, args.batch, args.seconds)
        our = measure("aigc", width, args.batch, args.seconds)
        for name, r in (("plain eager loop", ref), ("aigc trainer", our)):
            print(f"{width:>5} {name:<22} {r['steps_per_s']:>11.2f} "
                  f"{r['steps_per_s'] * args.batch:>9.0f} {r['peak_mb']:>6.0f} MB")  # fmt: skip
        print(f"{'':>5} ratio aigc / plain: {our['steps_per_s'] / ref['steps_per_s']:.2f}x")


if __name__ == "__main__":
    main()
