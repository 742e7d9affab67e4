"""An n-gram floor for sequence models: interpolated Kneser-Ney over integer tokens.

A neural model of music or text is worth its weight only where it beats counting. This
is the counting: Kneser and Ney (1995) in the interpolated form of Chen and Goodman
(1999, eq. 26), one absolute discount ``D`` per order. For a context u of the highest
order,

    P(w | u) = max(c(u w) - D, 0) / c(u) + D N1+(u .) / c(u) * P(w | u'),

where u' drops u's oldest token, N1+(u .) counts the distinct tokens seen after u, and
the lower orders use continuation counts (how many distinct tokens precede u' w) in
place of c. The unigram level is interpolated with the uniform distribution over the
vocabulary, so an unseen token keeps a probability. A context never seen backs off
wholly to the next order. Sequences are padded on the left with their first token (a
start token such as <bos>) so every position has a full context.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence


class KneserNey:
    """An interpolated Kneser-Ney n-gram model of order ``order`` over ``vocab_size``
    tokens; ``discount`` D in (0, 1)."""

    def __init__(self, order: int = 3, vocab_size: int = 256, discount: float = 0.75) -> None:
        if order < 1 or vocab_size < 1 or not 0.0 < discount < 1.0:
            raise ValueError(f"order {order}, vocab_size {vocab_size}, discount {discount}")
        self.order, self.vocab_size, self.discount = order, vocab_size, discount
        # per order k (1..order): counts of (context of k-1 tokens, token)
        self.counts: list[Counter[tuple[int, ...]]] = [Counter() for _ in range(order + 1)]
        self.context_total: list[Counter[tuple[int, ...]]] = []
        self.context_types: list[Counter[tuple[int, ...]]] = []

    def _padded(self, seq: Sequence[int]) -> list[int]:
        return [int(seq[0])] * (self.order - 1) + [int(t) for t in seq]

    def fit(self, sequences: Iterable[Sequence[int]]) -> KneserNey:
        """Counts every n-gram of every sequence (the first token is only context)."""
        top = self.counts[self.order]
        for seq in sequences:
            if len(seq) < 2:
                continue
            padded = self._padded(seq)
            for i in range(self.order - 1, len(padded) - 1):
                top[tuple(padded[i - self.order + 2 : i + 2])] += 1
        # lower orders: continuation counts, the distinct tokens before each shorter n-gram
        for k in range(self.order - 1, 0, -1):
            seen: Counter[tuple[int, ...]] = Counter()
            for gram in self.counts[k + 1]:
                seen[gram[1:]] += 1
            self.counts[k] = seen
        self.context_total = [Counter() for _ in range(self.order + 1)]
        self.context_types = [Counter() for _ in range(self.order + 1)]
        for k in range(1, self.order + 1):
            for gram, c in self.counts[k].items():
                self.context_total[k][gram[:-1]] += c
                self.context_types[k][gram[:-1]] += 1
        return self

    def prob(self, context: Sequence[int], token: int) -> float:
        """P(token | the last order-1 tokens of ``context``)."""
        context = tuple(int(t) for t in context)[-(self.order - 1) :] if self.order > 1 else ()
        return self._prob(context, int(token), len(context) + 1)

    def _prob(self, context: tuple[int, ...], token: int, k: int) -> float:
        lower = 1.0 / self.vocab_size if k == 1 else None
        if k > 1:
            lower = self._prob(context[1:], token, k - 1)
        total = self.context_total[k].get(context, 0)
        if total == 0:
            return lower
        c = self.counts[k].get((*context, token), 0)
        backoff = self.discount * self.context_types[k][context] / total
        return max(c - self.discount, 0.0) / total + backoff * lower

    def nll(self, sequences: Iterable[Sequence[int]]) -> tuple[float, int]:
        """(total negative log-likelihood in nats, tokens scored) of every token of every
        sequence after its first."""
        total, n = 0.0, 0
        for seq in sequences:
            padded = self._padded(seq)
            for i in range(self.order - 1, len(padded) - 1):
                context = tuple(padded[i - self.order + 2 : i + 1])
                total -= math.log(self.prob(context, padded[i + 1]))
                n += 1
        return total, n

    def distribution(self, context: Sequence[int]) -> list[float]:
        """P(w | context) for every token w of the vocabulary."""
        return [self.prob(context, w) for w in range(self.vocab_size)]
