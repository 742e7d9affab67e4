"""What `aigc serve` can be told: one dataclass whose fields each declare, once, their
default, flag, environment variable, help and the rule their value must follow.

cli.py builds the command's options from these fields, validate() checks them, and a
test holds the README's table of flags to them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from aigc.errors import ConfigError

API_KEYS_FILE_ENV = "AIGC_API_KEYS_FILE"
T = TypeVar("T")


@dataclass(frozen=True)
class Rule:
    """What a setting's value must be: a test, and the words its error says it with."""

    test: Callable[[Any], bool]
    allowed: str  # "... must be {allowed}"


@dataclass(frozen=True)
class Flag:
    """How a setting is given to `aigc serve`."""

    flag: str  # the command's option, e.g. --max-batch-size
    env: str  # the environment variable read when the flag is not given
    help: str  # the option's line in --help
    rule: Rule | None = None  # checked by ServeSettings.validate


def setting(default: T, flag: str, env: str, help: str, rule: Rule | None = None) -> T:
    """A ServeSettings field and its flag (a list default is copied for each instance)."""
    meta = {"flag": Flag(flag, env, help, rule)}
    if isinstance(default, list):
        return field(default_factory=default.copy, metadata=meta)  # type: ignore[return-value]
    return field(default=default, metadata=meta)  # type: ignore[return-value]


def _integer(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


AT_LEAST_1 = Rule(lambda v: _integer(v) and v >= 1, "an integer of at least 1")
PORT = Rule(lambda v: _integer(v) and 0 <= v <= 65535, "an integer in [0, 65535]")
NOT_NEGATIVE = Rule(lambda v: _number(v) and v >= 0, "a number of at least 0")
POSITIVE = Rule(lambda v: _number(v) and v > 0, "a number above 0")
THREADS = Rule(
    lambda v: _integer(v) and v >= 0, "an integer of at least 0 (0: one per core but one)"
)


@dataclass
class ServeSettings:
    """Limits and knobs of the HTTP service. Counts are per model unless said otherwise."""

    host: str = setting("127.0.0.1", "--host", "AIGC_HOST", "Address to listen on (0.0.0.0: all).")
    port: int = setting(8000, "--port", "AIGC_PORT", "Port to listen on (0: any free one).", PORT)
    # a list: the flag is repeated, the variable holds comma-separated keys, and both count
    api_keys: list[str] = setting(  # noqa: RUF009 (setting() returns a dataclasses.field)
        [], "--api-key", "AIGC_API_KEYS", "A key clients must send as 'Authorization: "
        "Bearer KEY'; repeatable. No key: the service is open.",
    )  # fmt: skip
    max_batch_size: int = setting(
        16, "--max-batch-size", "AIGC_MAX_BATCH_SIZE",
        "Rows (prompt x n) a text model decodes together.", AT_LEAST_1,
    )  # fmt: skip
    max_wait_ms: float = setting(
        5.0, "--max-wait-ms", "AIGC_MAX_WAIT_MS",
        "An idle model waits this long to fill a batch.", NOT_NEGATIVE,
    )  # fmt: skip
    max_tokens_limit: int = setting(
        2048, "--max-tokens", "AIGC_MAX_TOKENS",
        "Largest max_tokens a request may ask for.", AT_LEAST_1,
    )  # fmt: skip
    max_n: int = setting(
        16, "--max-n", "AIGC_MAX_N",
        "Most completions (prompts x n) or images in one request.", AT_LEAST_1,
    )  # fmt: skip
    max_steps: int = setting(
        250, "--max-steps", "AIGC_MAX_STEPS",
        "Most denoising steps (num_inference_steps) a diffusion request may ask for.",
        AT_LEAST_1,
    )  # fmt: skip
    max_image_batch: int = setting(
        64, "--max-image-batch", "AIGC_MAX_IMAGE_BATCH",
        "Images (requests x n) a diffusion model denoises together.", AT_LEAST_1,
    )  # fmt: skip
    image_wait_ms: float = setting(
        10.0, "--image-wait-ms", "AIGC_IMAGE_WAIT_MS",
        "An idle diffusion model waits this long to gather requests into one batch.",
        NOT_NEGATIVE,
    )  # fmt: skip
    max_prompt_tokens: int = setting(
        8192, "--max-prompt-tokens", "AIGC_MAX_PROMPT_TOKENS",
        "Longest prompt, in tokens.", AT_LEAST_1,
    )  # fmt: skip
    max_prompt_chars: int = setting(
        65_536, "--max-prompt-chars", "AIGC_MAX_PROMPT_CHARS",
        "Longest prompt, in characters (chat: the rendered conversation).", AT_LEAST_1,
    )  # fmt: skip
    max_body_bytes: int = setting(
        1_048_576, "--max-body-bytes", "AIGC_MAX_BODY_BYTES",
        "Larger request bodies get 413.", AT_LEAST_1,
    )  # fmt: skip
    queue_size: int = setting(
        64, "--queue-size", "AIGC_QUEUE_SIZE",
        "Requests that may wait per model; more get 429 with Retry-After.", AT_LEAST_1,
    )  # fmt: skip
    request_timeout_s: float = setting(
        300.0, "--request-timeout", "AIGC_REQUEST_TIMEOUT",
        "Seconds a request may take, from arrival to its last byte (408).", POSITIVE,
    )  # fmt: skip
    grace_seconds: float = setting(
        30.0, "--grace-seconds", "AIGC_GRACE_SECONDS",
        "On SIGTERM or Ctrl-C: seconds for requests in flight to finish.", NOT_NEGATIVE,
    )  # fmt: skip
    device: str = setting(
        "auto", "--device", "AIGC_DEVICE", "Where models run: auto, cpu, cuda or mps."
    )
    # 0 leaves a core to the event loop and the HTTP work (on 2 cores, 1 torch thread
    # doubled the tokens/s of the default 2)
    torch_threads: int = setting(
        0, "--torch-threads", "AIGC_TORCH_THREADS",
        "CPU: torch threads for the models (0: one per core but one, left to HTTP).", THREADS,
    )  # fmt: skip

    watermark_key: str | None = setting(
        None, "--watermark-key", "AIGC_WATERMARK_KEY",
        "Watermark generated text (green list) and images with this secret key; "
        "--watermark-key-file reads it from a file.",
    )  # fmt: skip

    moderation: str | None = setting(
        None, "--moderation", "AIGC_MODERATION",
        "A moderation policy (YAML) that screens prompts and generated text: refuse (400) "
        "or redact, per category.",
    )  # fmt: skip

    def threads(self) -> int | None:
        """The torch thread count to set on a CPU device, or None to leave torch's own."""
        if self.torch_threads:
            return self.torch_threads
        import os

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, (cores or 1) - 1)

    def validate(self) -> None:
        """ConfigError naming the first bad setting, its flag and its variable."""
        for name, spec in FLAGS.items():
            value = getattr(self, name)
            if spec.rule is not None and not spec.rule.test(value):
                raise ConfigError(
                    f"{spec.flag} ({spec.env}) = {value!r} must be {spec.rule.allowed}"
                )
        if self.watermark_key is not None and not (
            isinstance(self.watermark_key, str) and self.watermark_key.strip()
        ):
            raise ConfigError("--watermark-key (AIGC_WATERMARK_KEY) must be a non-empty string")
        if self.moderation is not None and not (
            isinstance(self.moderation, str | Path) and str(self.moderation).strip()
        ):
            raise ConfigError("--moderation (AIGC_MODERATION) must be a policy file's path")
        if not isinstance(self.api_keys, list) or not all(
            isinstance(k, str) and k and k.strip() == k and " " not in k for k in self.api_keys
        ):
            raise ConfigError(
                "API keys must be non-empty strings without spaces (--api-key, "
                "--api-keys-file, AIGC_API_KEYS)"
            )


# setting -> its flag, in the order of the fields (and of `aigc serve --help`)
FLAGS: dict[str, Flag] = {f.name: f.metadata["flag"] for f in fields(ServeSettings)}


def read_watermark_key(path: str | Path) -> str:
    """The watermark key in a file: its text without the line end (not empty)."""
    try:
        key = Path(path).read_text(encoding="utf-8").strip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--watermark-key-file {path}: cannot read it ({e})") from None
    if not key.strip():
        raise ConfigError(f"--watermark-key-file {path} is empty; put the key in it")
    return key


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
