"""One exception type per kind of user mistake.

Each error says what was wrong, where (file, key, line, byte offset) and what to
do. The CLI prints the message in one or two lines and exits with code 2; the
server maps the same errors to 4xx responses. Anything else is a bug.
"""

from __future__ import annotations


class AigcError(Exception):
    """Base class for mistakes a user can fix; never raised for bugs."""


class ConfigError(AigcError):
    """A config key, value or type is wrong."""


class DataError(AigcError):
    """Input data is missing, empty, undecodable or too short."""


class CheckpointError(AigcError):
    """A run folder or checkpoint is missing, truncated or of another family."""


class RequestError(AigcError):
    """A generation request has invalid parameters."""


class TrainingError(AigcError):
    """Training cannot go on (e.g. the loss stayed non-finite)."""


class StorageError(AigcError):
    """A file cannot be written: the disk is full, the folder is read-only, or access
    is denied. What was saved before stays whole."""


class RunBusyError(CheckpointError):
    """Another process is writing the run folder (one writer per run)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training was stopped by Ctrl-C after saving a checkpoint; ``run_dir``, ``step``
    and ``checkpoint`` say where. A KeyboardInterrupt, so ``except KeyboardInterrupt``
    still catches it."""

    def __init__(self, run_dir: str, step: int, checkpoint: str | None):
        super().__init__(run_dir, step, checkpoint)
        self.run_dir, self.step, self.checkpoint = run_dir, step, checkpoint
