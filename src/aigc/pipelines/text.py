"""Text pipelines: a language model (generate, stream) and a chat model (also chat)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from aigc.errors import RequestError
from aigc.pipelines.base import (
    EvalResult,
    Pipeline,
    TextOutput,
    check_count,
    evaluate_split,
    save_eval,
)
from aigc.runs import RunDir


class TextPipeline(Pipeline):
    """A trained language model with its tokenizer: generate, stream, evaluate."""

    kind = "text"
    is_chat = False  # trained on the chat template (ChatPipeline)

    def __init__(self, run: RunDir, task: Any, device: torch.device, step: int):
        super().__init__(run, task, device, step)
        self.tokenizer = task.tokenizer

    def _params(self, **kw: Any):
        from aigc.sampling import SamplingParams

        if isinstance(kw.get("stop"), str):
            kw["stop"] = (kw["stop"],)
        kw["stop"] = tuple(kw.get("stop") or ())
        params = SamplingParams(**kw)
        params.validate()
        return params

    def generate(
        self,
        prompt: str | Sequence[str] = "",
        max_new_tokens: int = 256,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        stop: str | Iterable[str] = (),
        seed: int | None = None,
        watermark: Any = None,
    ) -> str | list[str]:
        """Completes one prompt (returns a string) or a batch of prompts (a list).

        watermark: a key string (or aigc.safety.text_watermark.Watermark) marks the text
        with a green-list watermark that ``aigc.detect_text`` finds with the same key."""
        from aigc.sampling import generate

        params = self._params(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, stop=stop, seed=seed, watermark=watermark,
        )  # fmt: skip
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        texts = generate(self.model, self.tokenizer, prompts, params)
        outs = self.postprocess(TextOutput(texts, prompts, seed)).texts
        return outs[0] if single else outs

    def stream(
        self,
        prompt: str = "",
        max_new_tokens: int = 256,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        stop: str | Iterable[str] = (),
        seed: int | None = None,
        watermark: Any = None,
    ) -> Iterator[str]:
        """Yields the completion of ``prompt`` piece by piece as tokens are sampled.

        Bad parameters or a prompt the tokenizer cannot encode raise here, before any text.
        """
        from aigc.sampling import stream

        params = self._params(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, stop=stop, seed=seed, watermark=watermark,
        )  # fmt: skip
        return stream(self.model, self.tokenizer, prompt, params)

    def chat_prompt(self, messages: Sequence[Any]) -> str:
        """The conversation so far (dicts with "role" and "content", or Messages) in the
        chat template, ending where the assistant's answer starts. Chat runs only."""
        from aigc.tasks.chat import as_messages, chat_prompt

        if not self.is_chat:
            raise RequestError(
                f"{self.run.path.name} is not a chat model; "
                "fine-tune it with --task chat, or complete a prompt instead"
            )
        return chat_prompt(self.tokenizer, as_messages(messages))

    def chat(
        self, messages: Sequence[Any], max_new_tokens: int = 256, temperature: float = 0.8,
        top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
        stop: str | Iterable[str] = (), seed: int | None = None, watermark: Any = None,
    ) -> str:  # fmt: skip
        """The assistant's next answer to ``messages``; it ends at the end marker."""
        from aigc.tasks.chat import stop_strings

        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        return self.generate(
            self.chat_prompt(messages), max_new_tokens, temperature, top_k, top_p,
            repetition_penalty, (*stop, *stop_strings()), seed, watermark,
        )  # fmt: skip

    def chat_stream(
        self, messages: Sequence[Any], max_new_tokens: int = 256, temperature: float = 0.8,
        top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
        stop: str | Iterable[str] = (), seed: int | None = None, watermark: Any = None,
    ) -> Iterator[str]:  # fmt: skip
        """:meth:`chat`, piece by piece as tokens are sampled."""
        from aigc.tasks.chat import stop_strings

        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        return self.stream(
            self.chat_prompt(messages), max_new_tokens, temperature, top_k, top_p,
            repetition_penalty, (*stop, *stop_strings()), seed, watermark,
        )  # fmt: skip

    def evaluate(self, n: int | None = None, save: bool = True) -> EvalResult:
        """Validation loss, perplexity and bits per character and per byte over the whole
        held-out split; and n generated texts (default data.eval_samples) judged for
        distinct-1/2/3, repetition (rep_4) and memorisation: the share of their 50-character
        windows found verbatim in the training text. Saved to eval.json and metrics.jsonl."""
        from aigc.data.text import TokenCorpus

        if n is not None:
            check_count(n, limit=10_000)
            self.config.data.eval_samples = n
        if self.task.corpus is None:
            self.task.corpus = TokenCorpus.open(self.run.data_dir)
        with torch.inference_mode():
            sums = self.task.eval_sums(self.model, 0, 1, self.device)
        metrics = self.task.eval_metrics(sums)
        meta = self.task.corpus.meta
        result = EvalResult({
            "step": self.step,
            "split": "validation",
            "tokens": int(sums["count"]),
            "characters": meta.val_chars,
            "samples": self.config.data.eval_samples,
            **metrics,
        })  # fmt: skip
        if save:
            save_eval(self.run, result)
        return result

    def format_eval(self, result: dict[str, Any]) -> str:
        return (
            f"{self.run.path} at step {result['step']}: held-out {result['tokens']:,} tokens\n"
            f"  loss {result['loss']:.4f} nats/token   perplexity {result['ppl']:.3f}   "
            f"{result['bpc']:.4f} bits/char   {result['bpb']:.4f} bits/byte"
        )


class ChatPipeline(TextPipeline):
    """A language model fine-tuned on conversations: also chat and chat_stream; its
    evaluation is the loss on the held-out assistant tokens."""

    is_chat = True

    def evaluate(self, n: int | None = None, save: bool = True) -> EvalResult:
        """Loss and perplexity per held-out assistant token (``n`` is not used)."""
        return evaluate_split(self, save)

    def format_eval(self, result: dict[str, Any]) -> str:
        return (
            f"{self.run.path} at step {result['step']}: {result['count']:,} held-out assistant "
            f"tokens\n  loss {result['loss']:.4f} nats/token   perplexity {result['ppl']:.3f}"
        )
