"""Folk tunes in ABC notation: the Essen folk-song collection and O'Neill's "Music of
Ireland" (1850) inside the ``music21`` package, about 10,500 tunes, for a character
language model (the ``music-folk-abc`` recipe; ``data.path: folk-abc``).

Each tune is one document: its header (title, metre, unit length, key, ...) and body,
with the reference line renumbered ``X:1`` (the numbers only count tunes within a file),
and the Essen catalogue lines (``N:``) and transcribers' notes (``Z:``, which carry
their e-mail addresses) left out. Tunes come in an order shuffled by a
fixed seed, so the last share of the token stream, which a text run holds out, is a
random tenth of the tunes rather than the last collection read."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aigc.errors import DataError

COLLECTIONS = ("essenFolksong", "oneills1850")
SHUFFLE_SEED = 0


def corpus_folder() -> Path:
    """The folder of music21's corpus; DataError when music21 is not installed."""
    try:
        import music21
    except ImportError:
        raise DataError("the folk tunes come with music21: pip install music21") from None
    return Path(music21.__file__).parent / "corpus"


def split_tunes(text: str) -> list[str]:
    """The tunes of an ABC file: each block that starts at an ``X:`` line, with that line
    made ``X:1`` and ``N:`` and ``Z:`` lines dropped, stripped; text before the first
    tune (a file header) is left out."""
    tunes: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("X:"):
            tunes.append(["X:1"])
        elif tunes and not line.startswith(("N:", "Z:")):
            tunes[-1].append(line.rstrip())
    return [t for t in ("\n".join(lines).strip() for lines in tunes) if t.count("\n") >= 2]


def folk_tunes() -> list[tuple[str, str]]:
    """(origin "file.abc:k", tune text) for every tune of COLLECTIONS, shuffled."""
    root = corpus_folder()
    out = []
    for name in COLLECTIONS:
        for path in sorted((root / name).glob("*.abc")):
            text = path.read_text(encoding="utf-8")
            out += [(f"{name}/{path.name}:{k}", t) for k, t in enumerate(split_tunes(text))]
    if not out:
        raise DataError(f"{root}: no ABC tunes in {', '.join(COLLECTIONS)}")
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(out))
    return [out[i] for i in order]
