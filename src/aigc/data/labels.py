"""Labelled texts for sequence classification: JSON Lines files and a stratified split.

A file has one JSON object per line (blank lines are skipped), holding the text
and its label under configurable field names::

    {"text": "Return the absolute value of the argument.", "label": "math"}

Labels are strings (numbers are read as their decimal text), so a class is
named by what the user wrote. The embedded default, docstrings of the standard
library labelled by package, is ``aigc.data.stdlib.docstring_dataset``.
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from collections.abc import Sequence

from aigc.data.text import json_record, normalize_text
from aigc.errors import DataError

Example = tuple[str, str]  # (text, label)


def read_labelled(
    path: str | os.PathLike, text_field: str = "text", label_field: str = "label"
) -> list[Example]:
    """(text, label) pairs of a JSON Lines file; DataError naming file and line for a
    line that is not an object, lacks a field, or holds an empty text or label."""
    name = str(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed by the with below; open errors reworded)
    except OSError as e:
        raise DataError(f"{name}: cannot read ({e.strerror})") from None
    out: list[Example] = []
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"{name}:{lineno}"
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: invalid UTF-8 at byte {e.start} of the line") from None
            if not line.strip():
                continue
            record = json_record(line, where, text_field)
            if label_field not in record:
                raise DataError(f"{where}: no field {label_field!r} (the label)")
            text, label = record[text_field], record[label_field]
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: {text_field!r} must be a non-empty string")
            if isinstance(label, bool) or not isinstance(label, str | int):
                raise DataError(f"{where}: {label_field!r} must be a string or an integer")
            label = str(label).strip()
            if not label:
                raise DataError(f"{where}: {label_field!r} is empty")
            out.append((normalize_text(text), label))
    if not out:
        raise DataError(f"{name}: no examples (the file is empty or blank)")
    return out


def check_label_set(labels: Sequence[str], where: str) -> list[str]:
    """The sorted distinct labels; DataError when there are fewer than two, since a
    classifier of one class has nothing to learn."""
    names = sorted(set(labels))
    if len(names) < 2:
        only = f" (every example is {names[0]!r})" if names else ""
        raise DataError(
            f"{where}: a classifier needs at least two labels, found {len(names)}{only}"
        )
    return names


def stratified_split(
    examples: Sequence[Example], val_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Holds out ``val_fraction`` of each label's examples (at least one where a label
    has two or more), after a seeded shuffle; the same inputs give the same split."""
    by_label: dict[str, list[str]] = defaultdict(list)
    for text, label in examples:
        by_label[label].append(text)
    rng = random.Random(seed)
    train: list[Example] = []
    val: list[Example] = []
    for label in sorted(by_label):
        texts = by_label[label]
        rng.shuffle(texts)
        n_val = round(len(texts) * val_fraction)
        # every label on both sides where it has two examples
        n_val = min(max(n_val, 1), len(texts) - 1) if len(texts) >= 2 else 0
        val += [(t, label) for t in texts[:n_val]]
        train += [(t, label) for t in texts[n_val:]]
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val
