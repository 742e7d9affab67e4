"""The classification pipeline: a GPT with a classification head, and its tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from aigc.errors import RequestError
from aigc.pipelines.base import EvalResult, Pipeline, evaluate_split
from aigc.runs import RunDir


class ClassifyPipeline(Pipeline):
    """A trained sequence classifier with its tokenizer: classify texts, evaluate."""

    kind = "classify"

    def __init__(self, run: RunDir, task: Any, device: torch.device, step: int):
        super().__init__(run, task, device, step)
        self.tokenizer = task.tokenizer
        self.classes: list[str] = list(task.classes)

    def classify(
        self, texts: str | Sequence[str], batch_size: int = 64
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """The label and the probability of every class for one text (a dict) or a list of
        texts (a list): ``{"label": NAME, "probs": {NAME: p, ...}}``. A text is cut to its
        first model.block_size tokens, as in training; characters the vocabulary lacks
        are read as "?"."""
        from aigc.data.tokenizers import encode_replacing

        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        if not items:
            raise RequestError("give at least one text to classify")
        block = self.config.model.block_size
        rows = []
        for i, t in enumerate(items):
            if not isinstance(t, str) or not t:
                raise RequestError(f"text {i} must be a non-empty string, got {t!r}")
            rows.append(encode_replacing(self.tokenizer, t)[0][:block])
        out = []
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            lengths = torch.tensor([len(r) for r in chunk])
            idx = torch.zeros(len(chunk), int(lengths.max()), dtype=torch.long)
            for j, r in enumerate(chunk):
                idx[j, : len(r)] = torch.from_numpy(r)
            with torch.inference_mode():
                logits = self.model.classify(idx.to(self.device), lengths.to(self.device))
            for p in logits.float().softmax(-1).cpu().tolist():
                k = max(range(len(p)), key=p.__getitem__)
                out.append(
                    {"label": self.classes[k], "probs": dict(zip(self.classes, p, strict=True))}
                )
        return out[0] if single else out

    def evaluate(self, save: bool = True) -> EvalResult:
        """Loss, accuracy and macro-F1 over the held-out split; saved to eval.json and
        metrics.jsonl."""
        return evaluate_split(self, save)

    def format_eval(self, result: dict[str, Any]) -> str:
        return (
            f"{self.run.path} at step {result['step']}: {result['count']:,} held-out texts\n"
            f"  accuracy {result['accuracy']:.4f}   macro-F1 {result['macro_f1']:.4f}   "
            f"loss {result['loss']:.4f} nats/text"
        )
