"""The OpenAI request bodies the service reads, and its errors in OpenAI's shape.

Bodies are checked strictly: a wrong type (``"max_tokens": "5"``, ``"n": true``) or a
field that is neither OpenAI's nor one of our extensions (``top_k``,
``repetition_penalty``, ``labels``) is a 422; OpenAI fields we do not implement are
accepted only at their neutral values (``frequency_penalty: 0``, ``logprobs: null``),
else a 400 that names them. Ranges are checked where the values are used, by the same
checks as the Python API (``SamplingParams.validate``), which gives 400s.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class ApiError(Exception):
    """An error answer: HTTP status and OpenAI's {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool | None = None  # a last chunk with the usage and no choices


class _Sampling(_Body):
    """Fields shared by completions and chat completions."""

    model: str
    temperature: float | None = None  # default 1; 0 is greedy
    top_p: float | None = None
    n: int | None = None  # default 1
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None  # choice j of a prompt uses seed + j
    user: str | None = None  # accepted and ignored
    # aigc's extensions
    top_k: int | None = None
    repetition_penalty: float | None = None
    # OpenAI fields accepted at their neutral values only
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> list[str]:
        """Names of OpenAI fields set to a value this server does not implement."""
        out = [k for k in ("frequency_penalty", "presence_penalty") if getattr(self, k)]
        return out + (["logit_bias"] if self.logit_bias else [])


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str]
    max_tokens: int | None = None  # default 16, as OpenAI's
    echo: bool | None = None  # the prompt before the completion
    logprobs: int | None = None  # neutral values only: null or 0 (not returned)
    best_of: int | None = None  # neutral values only: null or n
    suffix: str | None = None  # neutral values only: null or ""

    def unsupported(self) -> list[str]:
        out = super().unsupported()
        out += ["logprobs"] if self.logprobs else []
        out += ["best_of"] if self.best_of not in (None, self.n or 1) else []
        return out + (["suffix"] if self.suffix else [])


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str  # system (or developer), user, assistant
    content: str | list[TextPart]


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None  # neutral values only
    top_logprobs: int | None = None  # neutral values only
    response_format: dict[str, Any] | None = None  # {"type": "text"} only

    def unsupported(self) -> list[str]:
        out = super().unsupported()
        out += ["logprobs"] if self.logprobs else []
        out += ["top_logprobs"] if self.top_logprobs else []
        fmt = self.response_format
        return out + (["response_format"] if fmt not in (None, {"type": "text"}) else [])


class SpeechRequest(_Body):
    """POST /v1/audio/speech (OpenAI's shape)."""

    model: str
    input: str
    voice: str | None = None  # a voice the run knows; "any" or null: the run's choice
    response_format: str | None = None  # wav (the default) or flac
    speed: float | None = None  # 0.25 to 4; runs that cannot change speed take 1 only
    instructions: str | None = None  # OpenAI's; refused when given (nothing reads it)
    seed: int | None = None  # aigc's: the same seed gives the same sound


class ModerationRequest(_Body):
    """POST /v1/moderations (OpenAI's shape, text inputs)."""

    input: str | list[str]
    model: str | None = None  # a policy's name; null: the server's policy, else the default


class ImageRequest(_Body):
    """POST /v1/images/generations."""

    model: str
    # text-to-image runs: the caption; class-conditional runs: labels by name ("7",
    # "colour=red, circle"); unconditional runs: ignored
    prompt: str | None = None
    labels: str | int | list[str | int] | dict[str, str | int] | None = None  # as labels_for
    n: int | None = None  # default 1
    seed: int | None = None  # image i is the same for a seed whatever n is
    response_format: str | None = None  # b64_json (the default) only
    size: str | None = None  # null or the run's own, e.g. "32x32"
    user: str | None = None  # accepted and ignored
    stream: bool | None = None  # diffusion runs: server-sent events, previews then images
    partial_images: int | None = None  # previews per image in a stream (OpenAI's; 0 to steps)
    # aigc's extensions, diffusion runs only (diffusers' names); null: the run's default
    num_inference_steps: int | None = None
    guidance_scale: float | None = None  # classifier-free guidance, [0, MAX_GUIDANCE]
    negative_prompt: str | None = None  # text-to-image runs: what the images should not show
    scheduler: str | None = None  # a name in aigc.schedulers.SCHEDULERS
