"""What `aigc serve` can be told: one dataclass, filled from flags or environment variables."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from aigc.errors import ConfigError

# setting -> (flag of `aigc serve`, the environment variable read when the flag is not given)
OPTIONS = {
    "host": ("--host", "AIGC_HOST"),
    "port": ("--port", "AIGC_PORT"),
    "api_keys": ("--api-key", "AIGC_API_KEYS"),  # the variable: comma-separated keys
    "max_batch_size": ("--max-batch-size", "AIGC_MAX_BATCH_SIZE"),
    "max_wait_ms": ("--max-wait-ms", "AIGC_MAX_WAIT_MS"),
    "max_tokens_limit": ("--max-tokens", "AIGC_MAX_TOKENS"),
    "max_n": ("--max-n", "AIGC_MAX_N"),
    "max_prompt_tokens": ("--max-prompt-tokens", "AIGC_MAX_PROMPT_TOKENS"),
    "max_prompt_chars": ("--max-prompt-chars", "AIGC_MAX_PROMPT_CHARS"),
    "max_body_bytes": ("--max-body-bytes", "AIGC_MAX_BODY_BYTES"),
    "queue_size": ("--queue-size", "AIGC_QUEUE_SIZE"),
    "request_timeout_s": ("--request-timeout", "AIGC_REQUEST_TIMEOUT"),
    "grace_seconds": ("--grace-seconds", "AIGC_GRACE_SECONDS"),
    "device": ("--device", "AIGC_DEVICE"),
    "torch_threads": ("--torch-threads", "AIGC_TORCH_THREADS"),
}
API_KEYS_FILE_ENV = "AIGC_API_KEYS_FILE"


@dataclass
class ServeSettings:
    """Limits and knobs of the HTTP service. Counts are per model unless said otherwise."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)  # empty: no key needed
    max_batch_size: int = 16  # rows (prompt x n) decoded together by one text model
    max_wait_ms: float = 5.0  # an idle model waits this long for more requests to batch
    max_tokens_limit: int = 2048  # the largest max_tokens a request may ask for
    max_n: int = 16  # the most choices (prompts x n) or images in one request
    max_prompt_tokens: int = 8192  # per prompt, after tokenizing
    max_prompt_chars: int = 65_536  # per prompt (chat: the rendered conversation)
    max_body_bytes: int = 1_048_576  # larger request bodies get 413
    queue_size: int = 64  # requests waiting for a model; more get 429 with Retry-After
    request_timeout_s: float = 300.0  # from arrival to the last byte of the answer
    grace_seconds: float = 30.0  # on SIGTERM, time for requests in flight to finish
    device: str = "auto"  # where models run: auto, cpu, cuda, mps
    # torch's intra-op threads; 0 = on CPU one per core but one, which is left to the event
    # loop and the HTTP work (on 2 cores, 1 thread doubled the tokens/s of the default 2)
    torch_threads: int = 0

    def threads(self) -> int | None:
        """The torch thread count to set on a CPU device, or None to leave torch's own."""
        if self.torch_threads:
            return self.torch_threads
        import os

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, (cores or 1) - 1)

    def validate(self) -> None:
        """ConfigError naming the first bad setting, its flag and its variable."""

        def bad(name: str, allowed: str) -> ConfigError:
            flag, var = OPTIONS[name]
            return ConfigError(f"{flag} ({var}) = {getattr(self, name)!r} must be {allowed}")

        for name in ("max_batch_size", "max_tokens_limit", "max_n", "max_prompt_tokens",
                     "max_prompt_chars", "max_body_bytes", "queue_size"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(name, "an integer of at least 1")
        if (
            isinstance(self.torch_threads, bool)
            or not isinstance(self.torch_threads, int)
            or (self.torch_threads < 0)
        ):
            raise bad("torch_threads", "an integer of at least 0 (0: one per core but one)")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise bad("port", "an integer in [0, 65535]")
        if not 0 <= self.port <= 65535:
            raise bad("port", "an integer in [0, 65535]")
        for name in ("max_wait_ms", "grace_seconds"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise bad(name, "a number of at least 0")
        if not _is_number(self.request_timeout_s) or self.request_timeout_s <= 0:
            raise bad("request_timeout_s", "a number above 0")
        if not isinstance(self.api_keys, list) or not all(
            isinstance(k, str) and k and k.strip() == k and " " not in k for k in self.api_keys
        ):
            raise ConfigError(
                "API keys must be non-empty strings without spaces (--api-key, "
                "--api-keys-file, AIGC_API_KEYS)"
            )


def read_keys_file(path: str | Path) -> list[str]:
    """API keys from a file: one per line; blank lines and lines starting with # are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--api-keys-file {path}: cannot read it ({e})") from None
    keys = [line.strip() for line in text.splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ConfigError(f"--api-keys-file {path} holds no keys (one key per line)")
    return keys


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
