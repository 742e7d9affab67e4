"""POST /v1/completions and /v1/chat/completions: a request checked, turned into rows for
the model's batcher, and answered whole or streamed as server-sent events in OpenAI's
chunks."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from aigc.errors import RequestError
from aigc.safety.moderation import ContentRefused
from aigc.sampling import DecodeEvent, SamplingParams, encode_prompt
from aigc.serve.batching import JobTimeout, ShuttingDown, TextJob
from aigc.serve.errors import ClientGone, timeout_error
from aigc.serve.moderation import OutputFilters, refusal, screen_outputs, screen_prompts
from aigc.serve.schemas import ApiError, ChatCompletionRequest, CompletionRequest, error_body

if TYPE_CHECKING:
    from aigc.serve.service import ServedModel, Service

MAX_STOP_STRINGS = 16
DEFAULT_MAX_TOKENS = 16  # completions, as OpenAI's
DEFAULT_CHAT_MAX_TOKENS = 512  # chat: the answer normally ends at its end marker first


async def answer_completions(
    service: Service, body: CompletionRequest, request: Request
) -> Response:
    """The answer to POST /v1/completions; ApiError for a request it cannot serve."""
    served = service.model(body.model, "text")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise ApiError(400, "prompt is an empty list; give at least one prompt", "invalid_request_error", "prompt")  # fmt: skip
    prompts = await screen_prompts(service, prompts, "prompt")  # --moderation: 400 or redacted
    text = _TextRequest(service, served, body, prompts, DEFAULT_MAX_TOKENS, ())
    return await text.respond(request, chat=False, echo=bool(body.echo))


async def answer_chat_completions(
    service: Service, body: ChatCompletionRequest, request: Request
) -> Response:
    """The answer to POST /v1/chat/completions (chat runs only)."""
    served = service.model(body.model, "text")
    if not served.chat:
        raise ApiError(
            400, f"{served.name!r} is not a chat model (family {served.family}); use "
            "/v1/completions, or fine-tune it for chat (aigc finetune RUN --task chat)",
            param="model", code="model_not_chat",
        )  # fmt: skip
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise ApiError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")  # fmt: skip
    if body.max_completion_tokens is not None:
        body.max_tokens = body.max_completion_tokens
    messages = _chat_messages(body)
    contents = await screen_prompts(service, [m["content"] for m in messages], "messages")
    messages = [{**m, "content": c} for m, c in zip(messages, contents, strict=True)]
    prompt = served.generator.chat_prompt(messages)
    from aigc.tasks.chat import stop_strings

    text = _TextRequest(service, served, body, [prompt], DEFAULT_CHAT_MAX_TOKENS, stop_strings())  # fmt: skip
    return await text.respond(request, chat=True, echo=False)


class _TextRequest:
    """One completions or chat request: checked, turned into rows, run, answered."""

    def __init__(
        self,
        service: Service,
        served: ServedModel,
        body: CompletionRequest | ChatCompletionRequest,
        prompts: list[str],
        default_max_tokens: int,
        extra_stop: Sequence[str],
    ) -> None:
        s = service.settings
        self.service, self.served, self.body, self.prompts = service, served, body, prompts
        self.deadline = service.deadline()
        if bad := body.unsupported():
            raise ApiError(
                400, f"{bad[0]} is not supported by this server; leave it out or at its "
                "neutral value", param=bad[0], code="unsupported_parameter",
            )  # fmt: skip
        self.n = n = 1 if body.n is None else body.n
        if not 1 <= n <= s.max_n:
            raise ApiError(400, f"n={n} must be in [1, {s.max_n}] (the server's --max-n)", param="n")  # fmt: skip
        if len(prompts) * n > s.max_n:
            raise ApiError(
                400, f"{len(prompts)} prompts x n={n} asks for {len(prompts) * n} completions; "
                f"at most {s.max_n} per request (the server's --max-n)", param="n",
            )  # fmt: skip
        max_tokens = default_max_tokens if body.max_tokens is None else body.max_tokens
        if body.max_tokens is None:
            max_tokens = min(max_tokens, s.max_tokens_limit)
        if not 0 <= max_tokens <= s.max_tokens_limit:
            raise ApiError(
                400, f"max_tokens={max_tokens} must be in [0, {s.max_tokens_limit}] "
                "(the server's --max-tokens)", param="max_tokens",
            )  # fmt: skip
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise ApiError(400, f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS}", param="stop")  # fmt: skip
        params = [
            SamplingParams(
                max_new_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_k=body.top_k,
                top_p=body.top_p,
                repetition_penalty=(
                    1.0 if body.repetition_penalty is None else body.repetition_penalty
                ),
                stop=(*stop, *extra_stop),
                seed=None if body.seed is None else (body.seed + j) % 2**63,
                watermark=s.watermark_key,  # the server's key marks every completion
            )
            for j in range(n)
        ]
        if body.seed is not None and not 0 <= body.seed < 2**63:
            raise ApiError(400, f"seed={body.seed} must be an integer in [0, 2**63)", param="seed")  # fmt: skip
        try:
            params[0].validate()
        except RequestError as e:
            raise ApiError(400, str(e), param=str(e).split("=", 1)[0]) from None
        gen = served.generator
        self.ids = [self._encode(gen, p) for p in prompts]
        self.rows = [(ids, params[j]) for ids in self.ids for j in range(n)]
        self.stream = bool(body.stream)
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.id = uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _encode(self, gen: Any, prompt: str) -> list[int]:
        s = self.service.settings
        if not prompt:
            raise ApiError(400, "the prompt is empty; give at least one character", param="prompt")  # fmt: skip
        if len(prompt) > s.max_prompt_chars:
            raise ApiError(
                400, f"the prompt has {len(prompt):,} characters; at most {s.max_prompt_chars:,} "
                "(the server's --max-prompt-chars)", param="prompt", code="prompt_too_long",
            )  # fmt: skip
        ids = encode_prompt(gen.tokenizer, prompt, gen.model.cfg.vocab_size)  # RequestError: 400
        if len(ids) > s.max_prompt_tokens:
            raise ApiError(
                400, f"the prompt has {len(ids):,} tokens; at most {s.max_prompt_tokens:,} "
                "(the server's --max-prompt-tokens)", param="prompt", code="prompt_too_long",
            )  # fmt: skip
        return ids

    def usage(self, tokens: Sequence[int]) -> dict[str, int]:
        prompt = sum(len(ids) for ids in self.ids)
        return {"prompt_tokens": prompt, "completion_tokens": sum(tokens),
                "total_tokens": prompt + sum(tokens)}  # fmt: skip

    async def respond(self, request: Request, chat: bool, echo: bool) -> Response:
        batcher = self.served.batcher
        job = TextJob(self.rows, stream=self.stream)
        batcher.submit(job)  # QueueFull: 429
        self.service.live.add(job)
        self.service.metrics.prompt_tokens.labels(self.served.name).inc(
            self.n * sum(len(ids) for ids in self.ids)
        )
        if self.stream:
            chunks = self._chunks(job, chat, echo)
            return StreamingResponse(chunks, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        try:
            texts, reasons, tokens = await unless_disconnected(request, self._collect(job))
        finally:
            self.service.live.discard(job)
            if not job.done:
                batcher.cancel(job)
        texts = await screen_outputs(self.service, texts)  # --moderation: 400 or redacted
        if echo:
            texts = [self.prompts[i // self.n] + t for i, t in enumerate(texts)]
        if chat:
            choices = [
                {"index": i, "message": {"role": "assistant", "content": t},
                 "logprobs": None, "finish_reason": r}
                for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
            ]  # fmt: skip
        else:
            choices = [
                {"index": i, "text": t, "logprobs": None, "finish_reason": r}
                for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
            ]
        return JSONResponse({
            "id": ("chatcmpl-" if chat else "cmpl-") + self.id,
            "object": "chat.completion" if chat else "text_completion",
            "created": self.created,
            "model": self.served.name,
            "choices": choices,
            "usage": self.usage(tokens),
        })  # fmt: skip

    async def _collect(self, job: TextJob) -> tuple[list[str], list[str], list[int]]:
        k = len(self.rows)
        texts, reasons, tokens = [""] * k, ["length"] * k, [0] * k
        try:
            async for events in job.events(self.deadline):
                for e in events:
                    texts[e.key] += e.text
                    if e.finish_reason is not None:
                        reasons[e.key], tokens[e.key] = e.finish_reason, e.tokens
        except JobTimeout:
            raise timeout_error(self.service.settings) from None
        return texts, reasons, tokens

    async def _chunks(self, job: TextJob, chat: bool, echo: bool) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
        head = {
            "id": ("chatcmpl-" if chat else "cmpl-") + self.id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": self.created,
            "model": self.served.name,
        }

        def chunk(i: int, text: str | None, reason: str | None = None) -> str:
            if chat:
                delta = {} if text is None else {"content": text}
                if text == "" and reason is None:
                    delta["role"] = "assistant"
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": i, "text": text or "", "logprobs": None,
                          "finish_reason": reason}  # fmt: skip
            return _sse({**head, "choices": [choice]})

        tokens = [0] * len(self.rows)
        screen = OutputFilters.of(self.service)  # --moderation: text is sent once clean
        try:
            for i in range(len(self.rows)):
                if chat:
                    yield chunk(i, "")  # the role comes first, as OpenAI's
                elif echo:
                    yield chunk(i, self.prompts[i // self.n])
            async for events in job.events(self.deadline):
                if screen is not None:
                    events = await screen.apply(events)
                if out := self._step_chunks(events, chunk, tokens):
                    yield "".join(out)  # one write
            if self.include_usage:
                yield _sse({**head, "choices": [], "usage": self.usage(tokens)})
        except JobTimeout:
            error = timeout_error(self.service.settings)
            self.service.metrics.errors.labels("408", error.type).inc()
            yield _sse(error.body())
        except ContentRefused as e:  # the policy refused the text generated so far
            error = refusal(e, None)
            self.service.metrics.errors.labels("400", error.type).inc()
            yield _sse(error.body())
        except ShuttingDown as e:  # the grace period of a shutdown is over
            self.service.metrics.errors.labels("503", "server_error").inc()
            yield _sse(error_body(str(e), "server_error", code="shutting_down"))
        except RuntimeError as e:  # the worker failed: a bug, reported in its log
            self.service.metrics.errors.labels("500", "server_error").inc()
            yield _sse(error_body(f"generation failed: {e}", "server_error"))
        finally:
            self.service.live.discard(job)
            if not job.done:
                self.served.batcher.cancel(job)
        yield "data: [DONE]\n\n"

    @staticmethod
    def _step_chunks(
        events: list[DecodeEvent], chunk: Callable[..., str], tokens: list[int]
    ) -> list[str]:
        """The chunks of events that are ready, sent in one write. A choice's text from
        several steps (a reader that fell behind) goes out as one chunk, as OpenAI's
        chunks may hold several tokens; its finish comes after its text."""
        out: list[str] = []
        texts: dict[int, str] = {}  # text not yet sent, per choice
        for e in events:
            if e.text:
                texts[e.key] = texts.get(e.key, "") + e.text
            if e.finish_reason is not None:
                tokens[e.key] = e.tokens
                if e.key in texts:
                    out.append(chunk(e.key, texts.pop(e.key)))
                out.append(chunk(e.key, None, e.finish_reason))
        out += [chunk(key, text) for key, text in texts.items()]
        return out


def _chat_messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    """OpenAI messages as aigc's: text parts joined; "developer" is the system role."""
    out = []
    for m in body.messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`, abandoning it (raising ClientGone) if the client disconnects."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        raise ClientGone
    return task.result()
