"""POST /v1/moderations, and the filter `aigc serve --moderation POLICY.yaml` applies.

The endpoint answers in OpenAI's shape by the server's policy, or by the default one
(personal data and profanity) when the server has none. With a policy, prompts
(completions, chat messages, image prompts, speech input) and generated text
(completions, chat answers) pass through ``Moderator.screen``: a refusing category gives
a 400 with code ``content_policy_violation`` naming it; redacting ones replace their spans.
A streamed answer passes through a ``StreamFilter`` per choice, which keeps the last
characters back until they are known to be clean; when a refusing category flags the
text, the stream ends with that error as its last event, then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aigc.safety.moderation import ContentRefused, Moderator, StreamFilter, moderation_id
from aigc.serve.schemas import ApiError, ModerationRequest

if TYPE_CHECKING:
    from aigc.sampling import DecodeEvent
    from aigc.serve.service import Service
    from aigc.serve.settings import ServeSettings

MAX_INPUTS = 64  # texts in one POST /v1/moderations


def load_moderators(settings: ServeSettings) -> tuple[Moderator | None, dict[str, Moderator]]:
    """The server's filter (None without --moderation) and the policies
    /v1/moderations answers by, keyed by name (the first is the default)."""
    default = Moderator.default()
    if settings.moderation is None:
        return None, {default.name: default}
    policy = Moderator.from_policy(settings.moderation)  # ConfigError naming the file
    return policy, {policy.name: policy, **({} if policy.name == default.name else {default.name: default})}  # fmt: skip


def refusal(e: ContentRefused, param: str | None) -> ApiError:
    """The 400 of a refused prompt or output, in OpenAI's error shape."""
    return ApiError(400, str(e), param=param, code="content_policy_violation")


def _slow(moderator: Moderator) -> bool:
    return moderator.whole_text("prompts") or moderator.whole_text("outputs")


async def _call(moderator: Moderator, fn: Any, *args: Any) -> Any:
    """fn(*args), on a worker thread when a classifier run is among the categories (a
    model's forward pass would stall the event loop); word lists run in place."""
    if _slow(moderator):
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


async def answer_moderations(service: Service, body: ModerationRequest) -> dict[str, Any]:
    """The answer to POST /v1/moderations; ApiError for bad input."""
    policies: dict[str, Moderator] = service.moderation_policies
    name = body.model if body.model is not None else next(iter(policies))
    moderator = policies.get(name)
    if moderator is None:
        raise ApiError(
            404, f"the moderation model {name!r} does not exist; this server has: "
            f"{', '.join(policies)} (or leave model out)", param="model", code="model_not_found",
        )  # fmt: skip
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise ApiError(400, "input is an empty list; give at least one text", param="input")
    if len(texts) > MAX_INPUTS:
        raise ApiError(400, f"input has {len(texts)} texts; at most {MAX_INPUTS} per request", param="input")  # fmt: skip
    limit = service.settings.max_prompt_chars
    for i, t in enumerate(texts):
        where = "input" if isinstance(body.input, str) else f"input[{i}]"
        if not t.strip():
            raise ApiError(400, f"{where} is empty; give a text to check", param="input")
        if len(t) > limit:
            raise ApiError(
                400, f"{where} has {len(t):,} characters; at most {limit:,} (the server's "
                "--max-prompt-chars)", param="input", code="input_too_long",
            )  # fmt: skip
    results = await _call(moderator, moderator.check_batch, texts)
    return {
        "id": moderation_id(),
        "model": moderator.name,
        "results": [
            {
                "flagged": r.flagged,
                "categories": r.categories,
                "category_scores": r.category_scores,
                "category_applied_input_types": {c: ["text"] for c in r.categories},
            }
            for r in results
        ],
    }


async def screen_prompts(service: Service, texts: Sequence[str], param: str) -> list[str]:
    """The prompts as the server's policy lets them through (redacted), or the 400 of
    the first refused one; unchanged without a policy."""
    moderator: Moderator | None = service.moderator
    if moderator is None or not moderator.applies("prompts"):
        return list(texts)
    try:
        return await _call(moderator, moderator.screen_batch, list(texts), "prompts")
    except ContentRefused as e:
        raise refusal(e, param) from None


async def screen_outputs(service: Service, texts: Sequence[str]) -> list[str]:
    """Generated texts as the policy lets them out, or the 400 of a refused one."""
    moderator: Moderator | None = service.moderator
    if moderator is None or not moderator.applies("outputs"):
        return list(texts)
    try:
        return await _call(moderator, moderator.screen_batch, list(texts), "outputs")
    except ContentRefused as e:
        raise refusal(e, None) from None


class OutputFilters:
    """A StreamFilter per choice of a streamed answer: events in, the same events with
    only the text that is safe to send (ContentRefused when a refusing category flags)."""

    def __init__(self, moderator: Moderator) -> None:
        self.moderator = moderator
        self.filters: dict[Any, StreamFilter] = {}

    @classmethod
    def of(cls, service: Service) -> OutputFilters | None:
        """Filters for a stream, or None when the server does not screen outputs."""
        moderator: Moderator | None = service.moderator
        if moderator is None or not moderator.applies("outputs"):
            return None
        return cls(moderator)

    async def apply(self, events: list[DecodeEvent]) -> list[DecodeEvent]:
        return await _call(self.moderator, self._apply, events)

    def _apply(self, events: list[DecodeEvent]) -> list[DecodeEvent]:
        out = []
        for e in events:
            f = self.filters.get(e.key)
            if f is None:
                f = self.filters[e.key] = self.moderator.stream("outputs")
            text = f.feed(e.text) if e.text else ""
            if e.finish_reason is not None:
                text += f.finish()
            out.append(dataclasses.replace(e, text=text))
        return out
