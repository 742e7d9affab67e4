"""The machine a benchmark ran on, named in its output: the CPU or GPU model and the
fp32 matmul throughput measured in the same run (a proxy for the machine's peak that
figures such as model-FLOPs utilisation are divided by).

Imported by the scripts beside it (``python benchmarks/x.py`` puts this folder first on
sys.path). torch is imported on use: cpu_model serves scripts that measure a process
without it.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def cpu_model() -> str:
    """lscpu's "Model name" (/proc/cpuinfo's "model name" where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def matmul_peak(n: int = 1024, repeats: int = 10, device: str | torch.device = "cpu") -> float:
    """Best fp32 GFLOP/s of an n×n matmul on ``device``, a proxy for its peak."""
    import torch

    dev = torch.device(device)
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(3):
        a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def describe(device: str | torch.device = "cpu") -> str:
    """Two lines naming the machine and its measured fp32 matmul peak on ``device``."""
    import torch

    dev = torch.device(device)
    head = (f"{cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")  # fmt: skip
    if dev.type == "cuda":
        head += f"; {torch.cuda.get_device_name(dev)}"
        n = 4096
    else:
        n = 1024
    return (
        f"{head}\nfp32 matmul peak ({n}x{n}, {dev.type}): {matmul_peak(n, device=dev):,.0f} GFLOP/s"
    )
