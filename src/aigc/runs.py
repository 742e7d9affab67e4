"""Run folders: layout, safetensors checkpoints, atomic writes and resume.

A run folder is a model::

    run/
      run.json              family, aigc version, creation time
      config.yaml           the resolved config
      tokenizer.json        where text is involved
      metrics.jsonl         one JSON object per logged step
      tb/                   TensorBoard events
      samples/              generated texts and image grids
      data/                 prepared data (e.g. memory-mapped token files)
      checkpoints/
        step-00000500/      model.safetensors, optim.safetensors, state.json, ...
        latest              the name of the newest complete checkpoint
      .lock                 held (flock) by the one process writing the run

No pickle is written or read. A checkpoint is written into a temporary folder,
flushed, then renamed, and ``latest`` is replaced atomically, so a crash at any
instant leaves the previous checkpoint whole.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from aigc.errors import CheckpointError, RunBusyError, StorageError

FORMAT_VERSION = 1
LOCK_NAME = ".lock"

# errno values that mean "this place cannot be written", not a bug
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT})


def storage_error(e: OSError, path: str | Path, what: str = "cannot write") -> StorageError:
    """The one-line StorageError for an OSError met while writing ``path``."""
    reason = e.strerror or str(e)
    hint = {
        errno.ENOSPC: "free some space and run the command again",
        errno.EDQUOT: "free some space and run the command again",
        errno.EROFS: "the file system is read-only; choose a writable folder",
    }.get(e.errno, "make the folder writable or choose another one")
    return StorageError(f"{path}: {what} ({reason}); {hint}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def chmod_as_created(path: Path) -> None:
    """Gives ``path`` the mode an ordinary new file gets (0666 less the umask): safetensors
    and mkstemp create files readable by their owner only, which a server running as
    another user could not open."""
    os.chmod(path, 0o666 & ~_umask())


def fsync_dir(path: Path) -> None:
    """Makes a rename inside ``path`` durable (no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (weights files are identified by it)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` so readers see the old or the new file, never half.

    StorageError (one line, the old file kept, no temporary left) when it cannot be written.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if e.errno in STORAGE_ERRNOS:
            raise storage_error(e, path) from None
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def run_lock(path: str | Path) -> Iterator[None]:
    """Holds the one-writer lock of the run folder ``path`` (made if missing) while the
    block runs.

    An exclusive ``flock`` on ``path/.lock``: the kernel releases it when the process
    ends however it ends, so a killed run never leaves a stale lock. A second writer
    gets RunBusyError naming the folder and the holder, and has touched nothing but
    the (empty) folder. Readers never take it.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a run folder; choose another folder")
    made = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno in STORAGE_ERRNOS:
            raise storage_error(e, path, "cannot create the run folder") from None
        raise
    lock = path / LOCK_NAME
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            if e.errno in STORAGE_ERRNOS:
                raise storage_error(e, lock, "cannot take the run's lock") from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunBusyError(
                f"{path} is being written by another process ({_holder(lock)}); wait for "
                "it to finish, or write to another folder (--run-dir)"
            ) from None
        # the file may have been removed by a writer that gave the folder up: lock anew
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "command": shlex.join(sys.argv), "since": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(holder) + "\n").encode())
        _clean_leftovers(path)
        yield
    finally:
        # a folder that did not become a run is left as it was found: no lock file,
        # and gone again if this call made it
        if not (path / "run.json").exists():
            with contextlib.suppress(OSError):
                lock.unlink()
                if made:
                    path.rmdir()
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # nobody holds it: a refused command leaves it as it found it
        os.close(fd)


def _holder(lock: Path) -> str:
    """Who holds ``lock``, from what it wrote there (it writes just after locking, so a
    reader that came in between waits a moment for it)."""
    for _ in range(20):
        try:
            h = json.loads(lock.read_text(encoding="utf-8"))
            return f"pid {h['pid']} on {h['host']} since {h['since']}: {h['command']}"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "another aigc process"


def _clean_leftovers(path: Path) -> None:
    """Temporary files and folders of writers that died mid-write (the lock says none is
    alive now)."""
    for pattern in ("checkpoints/.tmp-*", ".*.tmp-*"):
        for p in path.glob(pattern):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()


# ---------------------------------------------------------------------------
# Nested state (optimizer state dicts, RNG states) as safetensors + JSON


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Splits a nested structure into tensors (for safetensors) and a JSON skeleton.

    Tensors are replaced by ``{"__tensor__": key}``; dicts whose keys are not all
    strings (optimizer state is keyed by int) become ``{"__items__": [[k, v], ...]}``.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(node, dict):
            if all(isinstance(k, str) for k in node):
                return {k: walk(v, f"{path}.{k}" if path else k) for k, v in node.items()}
            return {"__items__": [[k, walk(v, f"{path}.{k}")] for k, v in node.items()]}
        if isinstance(node, list | tuple):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
        if node is None or isinstance(node, bool | int | float | str):
            return node
        raise TypeError(f"cannot store {type(node).__name__} at {path!r} without pickle")

    return tensors, walk(obj, prefix)


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            return tensors[skeleton["__tensor__"]]
        if set(skeleton) == {"__items__"}:
            return {k: unflatten_state(v, tensors) for k, v in skeleton["__items__"]}
        return {k: unflatten_state(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


def rng_to_json(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def rng_from_json(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


# ---------------------------------------------------------------------------


class RunDir:
    """A run folder on disk, with the paths and operations the trainer and loaders need."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # paths -----------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def info_path(self) -> Path:
        return self.path / "run.json"

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tb_dir(self) -> Path:
        return self.path / "tb"

    @property
    def samples_dir(self) -> Path:
        return self.path / "samples"

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    # identity ---------------------------------------------------------------
    def exists(self) -> bool:
        return self.info_path.is_file()

    def info(self) -> dict[str, Any]:
        """Reads run.json; CheckpointError if this is not a run folder."""
        if not self.path.is_dir():
            raise CheckpointError(f"run folder {str(self.path)!r} does not exist")
        if not self.info_path.is_file():
            raise CheckpointError(f"{self.path} is not an aigc run folder (no run.json)")
        try:
            info = json.loads(self.info_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{self.info_path} is damaged (not valid JSON)") from None
        if not isinstance(info, dict) or "family" not in info:
            raise CheckpointError(f"{self.info_path} does not name the run's family")
        return info

    def create(self, family: str, config_yaml: str) -> None:
        """Makes the folder and writes run.json and config.yaml (never over an existing run)."""
        from aigc import __version__

        if self.exists():
            raise CheckpointError(f"{self.path} already holds a run")
        self.path.mkdir(parents=True, exist_ok=True)
        for sub in (self.samples_dir, self.checkpoints_dir):
            sub.mkdir(exist_ok=True)
        atomic_write_text(self.config_path, config_yaml)
        info = {
            "family": family,
            "format_version": FORMAT_VERSION,
            "aigc_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write_text(self.info_path, json.dumps(info, indent=2) + "\n")

    def check_family(self, family: str) -> None:
        got = self.info()["family"]
        if got != family:
            raise CheckpointError(
                f"{self.path} is a {got!r} run, not a {family!r} run; "
                "choose another run folder (--run-dir)"
            )

    # checkpoints --------------------------------------------------------------
    def checkpoint_names(self) -> list[str]:
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(
            p.name
            for p in self.checkpoints_dir.iterdir()
            if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file()
        )

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, as named by ``latest``, or None."""
        pointer = self.checkpoints_dir / "latest"
        if not pointer.is_file():
            return None
        name = pointer.read_text(encoding="utf-8").strip()
        path = self.checkpoints_dir / name
        if not name.startswith("step-") or "/" in name or not path.is_dir():
            raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint folder")
        return path

    def save_checkpoint(
        self,
        step: int,
        tensors: dict[str, dict[str, torch.Tensor]],
        state: dict[str, Any],
        keep: int = 2,
    ) -> Path:
        """Writes ``{file: tensors}`` as safetensors plus ``state.json``, atomically.

        The folder is written under a temporary name, every file is flushed to
        disk, the folder is renamed, and then ``latest`` is replaced.
        """
        name = f"step-{step:08d}"
        final = self.checkpoints_dir / name
        tmp = self.checkpoints_dir / f".tmp-{name}-{os.getpid()}"
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            sizes = {}
            for fname, group in tensors.items():
                path = tmp / f"{fname}.safetensors"
                save_file({k: v.detach().cpu().contiguous() for k, v in group.items()}, str(path))
                chmod_as_created(path)
                _fsync_file(path)
                sizes[path.name] = path.stat().st_size
            state = {**state, "step": step, "files": sizes}
            (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
            _fsync_file(tmp / "state.json")
            if final.exists():  # same step saved again (e.g. after resume): replace it whole
                shutil.rmtree(final)
            os.rename(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno in STORAGE_ERRNOS:
                raise storage_error(
                    e, tmp.parent, f"cannot save the checkpoint of step {step}"
                ) from None
            raise
        fsync_dir(self.checkpoints_dir)
        atomic_write_text(self.checkpoints_dir / "latest", name + "\n")
        self._prune(keep, name)
        return final

    def _prune(self, keep: int, newest: str) -> None:
        names = [n for n in self.checkpoint_names() if n != newest]
        for old in names[: max(0, len(names) - (keep - 1))]:
            shutil.rmtree(self.checkpoints_dir / old, ignore_errors=True)
        for stale in self.checkpoints_dir.glob(".tmp-*"):  # left by a crash mid-save
            shutil.rmtree(stale, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        """Reads a checkpoint folder; truncated or missing files raise CheckpointError."""
        state_path = path / "state.json"
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{state_path} is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{state_path} is damaged (not valid JSON)") from None
        tensors = {}
        for fname, size in state.get("files", {}).items():
            fpath = path / fname
            if not fpath.is_file():
                raise CheckpointError(f"{fpath} is missing from the checkpoint")
            if fpath.stat().st_size != size:
                raise CheckpointError(
                    f"{fpath} is truncated or altered ({fpath.stat().st_size} bytes, expected {size})"
                )
            try:
                tensors[fname.removesuffix(".safetensors")] = load_file(str(fpath))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{fpath} cannot be read: {e}") from None
        return tensors, state

    # metrics ------------------------------------------------------------------
    def read_metrics(self) -> list[dict[str, Any]]:
        """All complete lines of metrics.jsonl (a torn last line is ignored)."""
        if not self.metrics_path.is_file():
            return []
        rows = []
        for line in self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def truncate_metrics(self, step: int) -> None:
        """Drops lines logged after ``step`` (they belong to work a crash threw away)."""
        if not self.metrics_path.is_file():
            return
        kept = [r for r in self.read_metrics() if int(r.get("step", 0)) <= step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl, flushed as it goes."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        except OSError as e:
            if e.errno in STORAGE_ERRNOS:
                raise storage_error(e, path) from None
            raise

    def write(self, row: dict[str, Any]) -> None:
        try:
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()
        except OSError as e:
            if e.errno in STORAGE_ERRNOS:
                raise storage_error(e, self.path) from None
            raise

    def sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def iter_runs(root: Path) -> Iterator[Path]:
    """Run folders directly under ``root``."""
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if (p / "run.json").is_file():
                yield p
