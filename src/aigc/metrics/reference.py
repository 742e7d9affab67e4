"""Reference statistics of a real data set, computed once and cached as ``.npz``.

FID against a data set needs the mean and covariance of its features; precision,
recall, density, coverage and KID need the features themselves. Extracting them
is the slow part, so ``reference_statistics`` does it once per *key* and stores:

- ``mu`` (D,) and ``sigma`` (D, D) in float64, and the sample count ``n``;
- ``features`` (n, D) in float32, only when n <= ``max_features`` (default
  10,000: 80 MB for 2048-dim Inception features; the k-NN metrics are usually
  computed on 10,000 samples and KID on subsets of 1,000). Larger sets keep only
  their statistics, and ``None`` comes back in place of the features;
- every key entry as a 0-d array (``key_extractor``, ``key_spec``, ...) and the
  file format version, so the file is read with ``allow_pickle=False``.

The key names the extractor (``"extractor"``), describes the data exactly
(``"spec"``: source, split, image size, ...) and may fix the number of samples
(``"count"``). On load every entry is compared with the file's; a file that does
not match (another key, an older format, a damaged file) is recomputed and
replaced, never mixed with the request. Files are written to a temporary name
and moved into place, so a crash never leaves half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from aigc.metrics import classifier
from aigc.metrics.image import Statistics, features_to_statistics

FORMAT_VERSION = 1  # bump when the file layout changes: older files are recomputed
MAX_CACHED_FEATURES = 10_000

KeyValue = str | int | float | bool
_KEY_NAME = re.compile(r"[A-Za-z0-9_]+")


class ReferenceKeyError(ValueError):
    """A reference key lacks a required entry or holds a value that cannot be stored."""


def _check_key(key: Mapping[str, KeyValue]) -> None:
    for required in ("extractor", "spec"):
        if not isinstance(key.get(required), str) or not key[required]:
            raise ReferenceKeyError(
                f"reference key needs a non-empty string {required!r}; got {dict(key)}"
            )
    for name, value in key.items():
        if not _KEY_NAME.fullmatch(name):
            raise ReferenceKeyError(f"reference key name {name!r}: use letters, digits and _")
        if not isinstance(value, KeyValue):
            raise ReferenceKeyError(
                f"reference key {name!r} is a {type(value).__name__}; use str, int, float or bool"
            )
    if "count" in key and (isinstance(key["count"], bool) or not isinstance(key["count"], int)):
        raise ReferenceKeyError(f"reference key 'count' must be an int; got {key['count']!r}")


def reference_path(key: Mapping[str, KeyValue], cache_dir: Path | None = None) -> Path:
    """Where the reference file of ``key`` lives: ``<cache>/reference/<extractor>-<hash>.npz``."""
    _check_key(key)
    digest = hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()[:20]
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(key["extractor"]))[:40]
    return Path(cache_dir or classifier.cache_dir()) / "reference" / f"{readable}-{digest}.npz"


def save_reference(
    path: Path,
    key: Mapping[str, KeyValue],
    stats: Statistics,
    features: np.ndarray | None = None,
) -> None:
    """Writes statistics (and features, stored as float32) with the key, atomically."""
    _check_key(key)
    arrays: dict[str, np.ndarray] = {
        "format_version": np.array(FORMAT_VERSION),
        "n": np.array(stats.n),
        "mu": stats.mu,
        "sigma": stats.sigma,
    }
    arrays.update({f"key_{name}": np.array(value) for name, value in key.items()})
    if features is not None:
        arrays["features"] = np.asarray(features, dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def load_reference(
    path: Path, key: Mapping[str, KeyValue]
) -> tuple[Statistics, np.ndarray | None] | None:
    """The statistics and features (or None) stored at ``path`` for ``key``; None when the
    file is missing, unreadable, of another format, or was made for another key."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if int(f["format_version"]) != FORMAT_VERSION:
                return None
            stored = {name[4:]: f[name].item() for name in f.files if name.startswith("key_")}
            # compare types too: 1 and "1" are different keys
            if {k: (type(v), v) for k, v in stored.items()} != {
                k: (type(v), v) for k, v in key.items()
            }:
                return None
            stats = Statistics(mu=f["mu"], sigma=f["sigma"], n=int(f["n"]))
            features = f["features"] if "features" in f.files else None
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    if stats.mu.dtype != np.float64 or ("count" in key and key["count"] != stats.n):
        return None
    if features is not None and features.shape != (stats.n, len(stats.mu)):
        return None
    return stats, features


def reference_statistics(
    key: Mapping[str, KeyValue],
    compute: Callable[[], np.ndarray],
    cache_dir: Path | None = None,
    max_features: int = MAX_CACHED_FEATURES,
) -> tuple[Statistics, np.ndarray | None]:
    """Statistics of a reference data set, and its (n, D) float32 features when
    n <= ``max_features`` (else None), from the cache or computed and stored first.

    ``key`` must hold ``"extractor"`` (str: which network and layer) and ``"spec"``
    (str: which data, exactly); other str/int/float/bool entries join the key, and
    ``"count"`` (int), if present, must equal the number of rows ``compute`` returns.
    ``compute()`` returns the (n, D) features; it is called only on a cache miss.
    ``cache_dir`` defaults to ``$AIGC_CACHE_DIR`` (``~/.cache/aigc``). The first call
    and later cached calls return equal values.
    """
    path = reference_path(key, cache_dir)
    cached = load_reference(path, key) if path.is_file() else None
    if cached is not None:
        stats, features = cached
        if stats.n > max_features:
            return stats, None
        if features is not None:
            return stats, features
        # stored without features under a smaller cap: compute again to keep them
    raw = np.asarray(compute())
    if raw.ndim != 2:
        raise ValueError(f"compute() must return (n, D) features; got shape {raw.shape}")
    if "count" in key and len(raw) != key["count"]:
        raise ValueError(
            f"compute() returned {len(raw)} feature vectors but the reference key asks for "
            f"count={key['count']}; put the number of samples actually used in the key"
        )
    stats = features_to_statistics(raw)
    features = raw.astype(np.float32) if stats.n <= max_features else None
    with contextlib.suppress(OSError):  # a read-only cache only costs recomputing next time
        save_reference(path, key, stats, features)
    return stats, features
