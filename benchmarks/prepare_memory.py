"""Peak memory of preparing an image folder stays far below the size of the decoded set.

Makes (once, cached in --folder) an image folder of 60,000 seeded random 32x32 RGB
PNGs in 10 class folders, then prepares it as `aigc train` does (decoded, split and
written to data/images.npy) in a child process, and reports the child's peak
resident set size (ru_maxrss, from os.wait4: getrusage(RUSAGE_CHILDREN) for that one
child) beside the decoded set's size, 60,000 x 32 x 32 x 3 bytes = 184 MB:

- floor: a child that only imports what preparing imports (Python, torch, numpy, Pillow);
- streamed: ``aigc.tasks.images.prepare``, the path runs take;
- whole set: the set read into memory with ``load_image_set`` and saved with np.save,
  as preparation did before it was streamed (for comparison; --no-whole skips it).

    python benchmarks/prepare_memory.py --folder /tmp/aigc-imagefolder-60k
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES, SIZE, N_CLASSES = 60_000, 32, 10
DECODED = N_IMAGES * SIZE * SIZE * 3  # bytes of the (N, 32, 32, 3) uint8 set

CHILD = {
    "floor": """
import aigc.data.images, aigc.tasks.images
print(json.dumps({"seconds": 0.0}))
""",
    "streamed": """
from aigc.tasks.images import ImageDataConfig, prepare
t0 = time.perf_counter()
data = prepare(ImageDataConfig(source=FOLDER, image_size=32, channels=3), OUT, seed=0)
print(json.dumps({"seconds": time.perf_counter() - t0, "sha256": data.meta["sha256"]}))
""",
    "whole set": """
import hashlib
import numpy as np
from aigc.data.images import load_image_set, split_indices
t0 = time.perf_counter()
found = load_image_set(FOLDER, image_size=32, channels=3)
train, val = split_indices(len(found), 0.1, 0)
pixels = np.ascontiguousarray(found.images[np.concatenate([train, val])])
OUT.mkdir(parents=True)
np.save(OUT / "images.npy", pixels, allow_pickle=False)
sha256 = hashlib.sha256(pixels.tobytes()).hexdigest()
print(json.dumps({"seconds": time.perf_counter() - t0, "sha256": sha256}))
""",
}


def make_folder(folder: Path, seed: int = 0) -> None:
    """60,000 random 32x32 RGB PNGs, 6,000 in each of 10 class folders; made once."""
    from PIL import Image

    done = folder / ".complete"
    if done.is_file():
        return
    print(f"making {N_IMAGES:,} PNGs in {folder} (once) ...", flush=True)
    rng = np.random.default_rng(seed)
    for c in range(N_CLASSES):
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(N_IMAGES // N_CLASSES):
            pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"class{c}" / f"{i:05d}.png")
    done.write_text("")


def run_child(name: str, folder: Path, out: Path) -> tuple[float, float, dict]:
    """Runs CHILD[name]; returns (peak RSS in bytes, wall seconds, what it printed)."""
    code = f"import json, time\nfrom pathlib import Path\nFOLDER = {str(folder)!r}\n"
    code += f"OUT = Path({str(out)!r})\n{CHILD[name]}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: the child failed with exit code {proc.returncode}")
    return usage.ru_maxrss * 1024, time.perf_counter() - t0, json.loads(stdout)  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default = Path(tempfile.gettempdir()) / "aigc-imagefolder-60k"
    ap.add_argument("--folder", type=Path, default=default, help="image folder, made once")
    ap.add_argument("--no-whole", action="store_true", help="skip the whole-set comparison")
    args = ap.parse_args()

    make_folder(args.folder)
    names = ["floor", "streamed"] + ([] if args.no_whole else ["whole set"])
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows[name] = run_child(name, args.folder, Path(tmp) / name.replace(" ", "-"))
    floor = rows["floor"][0]
    print(f"{cpu_model()}, {os.cpu_count()} cores; decoded set {DECODED / 1e6:.0f} MB")
    print(f"{'path':<10} {'peak RSS':>9} {'above floor':>12} {'prepare':>8} {'child':>7}")
    for name, (rss, wall, out) in rows.items():
        print(
            f"{name:<10} {rss / 1e6:>6.0f} MB {(rss - floor) / 1e6:>9.0f} MB "
            f"{out['seconds']:>7.1f}s {wall:>6.1f}s"
        )
    rss = rows["streamed"][0]
    print(
        f"streamed: peak RSS / decoded set = {rss / DECODED:.2f}; "
        f"above the floor / decoded set = {(rss - floor) / DECODED:.2f}"
    )
    if "whole set" in rows:
        same = rows["whole set"][2]["sha256"] == rows["streamed"][2]["sha256"]
        print(f"streamed and whole-set images.npy hold the same pixels: {same}")


if __name__ == "__main__":
    main()
