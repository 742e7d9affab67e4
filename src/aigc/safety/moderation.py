"""Moderation of prompts and outputs by a policy of categories that can be honest offline.

A policy (a YAML file or a dict) names categories; each has a source, an action and the
texts it applies to::

    name: house-rules                  # optional: the file's name without .yaml
    categories:
      personal_data:                   # built in: aigc.data.privacy's detectors
        action: redact                 # refuse (400 from the server) or redact
        kinds: [email, phone]          # optional: all of privacy.PII_KINDS
      profanity:                       # built in: the word list in safety/data/profanity.txt
        action: refuse
        applies_to: prompts            # prompts, outputs or both (the default)
        threshold: 0.5                 # optional: 1 flags strong words only
      codenames:                       # the user's own block list
        source: blocklist
        words: [bluebird, project x]   # whole words, any case, with simple obfuscations
        patterns: ['ACME-\\d{4}']      # Python regular expressions, used as written
        action: redact
      toxic:                           # a classifier run (aigc finetune --task classify)
        source: classifier
        run: runs/toxicity
        thresholds: {toxic: 0.8, insult: 0.9}
        action: refuse                 # (it finds no spans to redact)
        device: cpu                    # optional: where the run is loaded (cpu)

``Moderator.check(text)`` answers in OpenAI's moderation shape (``flagged``,
``categories``, ``category_scores``) plus the spans found; ``Moderator.redact(text)``
replaces the spans of the categories whose action is redact; ``Moderator.screen(text,
where)`` is what the server applies: ContentRefused for a refusing category, else the text
redacted. What the scores mean:

- personal_data, blocklist: 1 when a span was found, else 0;
- profanity: the severity of the worst listed word found (strong 1, mild 0.5), else 0;
  a word list, not a model: it knows the words it lists and nothing of their sense;
- classifier: the run's softmax probability of each thresholded label (the largest over
  windows of the run's block size, for a text longer than one); the category's own score
  is the largest of its labels'.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from aigc.errors import ConfigError, RequestError

ACTIONS = ("refuse", "redact")
WHERE = ("prompts", "outputs")
BUILT_IN = ("personal_data", "profanity")  # categories whose name is their source
SOURCES = ("personal_data", "profanity", "blocklist", "classifier")
SEVERITY = {
    "strong": 1.0,
    "mild": 0.5,
    "allow": 0.0,
}  # allow: real words a disguise rule would take for a listed one
DEFAULT_POLICY: dict[str, Any] = {
    "name": "aigc-default",
    "categories": {
        "personal_data": {"action": "redact"},
        "profanity": {"action": "refuse"},
    },
}
STREAM_HOLD = 64  # characters a stream keeps back (see StreamFilter)

# l33t spellings of a letter; an inner letter may also be a star (f*ck)
_LEET = {"a": "a4@", "b": "b8", "e": "e3", "g": "g9", "i": "i1!|", "l": "l1|", "o": "o0",
         "s": "s5$", "t": "t7+", "z": "z2"}  # fmt: skip
_SEPARATOR = r"[._\-]?"  # f.u.c.k
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


@dataclass(frozen=True)
class FlaggedSpan:
    """A stretch of a text a category found: [start, end) in characters."""

    category: str
    label: str  # personal data: its kind ("email"); profanity: strong or mild; blocklist: word or pattern
    start: int
    end: int
    text: str
    replacement: str  # what redaction puts in its place, e.g. "[EMAIL]" or "[PROFANITY]"
    score: float = 1.0


@dataclass
class ModerationResult:
    """The verdict on one text: OpenAI's fields, plus the spans found (by every category
    that finds spans, whether flagged or below its threshold)."""

    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    spans: list[FlaggedSpan] = field(default_factory=list)

    def refused_by(self, refusing: Iterable[str]) -> str | None:
        """The first of these categories that is flagged, or None."""
        return next((c for c in refusing if self.categories.get(c)), None)


class ContentRefused(RequestError):
    """A refusing category flagged a prompt or an output."""

    def __init__(self, policy: str, category: str, where: str) -> None:
        what = "prompt" if where == "prompts" else "generated text"
        super().__init__(
            f"the {what} was refused by the moderation policy {policy!r}: it falls in the "
            f"category {category!r}"
        )
        self.policy, self.category, self.where = policy, category, where


# ---------------------------------------------------------------------------
# words: whole words with simple obfuscations, one regular expression per list


def _units(term: str) -> list[str]:
    """A term as a sequence of regex pieces: a letter (repeatable, l33t, a star when
    inner, after an optional separator), a run of spaces, or another character."""
    units: list[str] = []
    for ch in term.lower():
        if ch.isspace():
            if units and units[-1] != r"\s+":
                units.append(r"\s+")
        elif ch.isalpha():
            spellings = _LEET.get(ch, ch)
            inner = bool(units) and units[-1] != r"\s+"
            cls = re.escape(spellings + ("*" if inner else ""))
            units.append((_SEPARATOR if inner else "") + f"[{cls}]+")
        else:
            units.append(re.escape(ch))
    return units


def _trie_regex(terms: Iterable[str]) -> str:
    """One alternation for many terms, sharing their prefixes (Python's re tries
    alternatives one by one; a trie keeps the tries to a few per position)."""
    root: dict[str, Any] = {}
    for term in terms:
        node = root
        for unit in _units(term):
            node = node.setdefault(unit, {})
        node[""] = {}  # the end of a term

    def emit(node: dict[str, Any]) -> str:
        alts = [unit + emit(child) for unit, child in node.items() if unit]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        if "" in node:
            return f"(?:{body})?" if len(alts) == 1 else body + "?"
        return body

    return emit(root)


class WordList:
    """Whole-word, case-insensitive search for terms, each with a score, that also finds
    them spelt with repeated letters, l33t digits and symbols, a star for an inner
    letter or separators between letters. A word inside another word is not a match
    (the Scunthorpe problem): the letters around a match must not be letters or digits."""

    def __init__(self, terms: Mapping[str, float]) -> None:
        by_score: dict[float, list[str]] = {}
        for term, score in terms.items():
            by_score.setdefault(float(score), []).append(term.strip())
        # allowed words (score 0) are tried first at each position, and skipped when found
        self.scores = sorted(by_score, key=lambda s: (s != 0, -s))
        groups = [f"(?P<g{i}>{_trie_regex(by_score[s])})" for i, s in enumerate(self.scores)]
        self.pattern = re.compile(
            r"(?<![^\W_])(?:" + "|".join(groups) + r")(?![^\W_])", re.IGNORECASE
        )

    def find(self, text: str) -> list[tuple[int, int, float]]:
        """(start, end, score) of every match, left to right."""
        found = [(m.start(), m.end(), self.scores[int(m.lastgroup[1:])])  # type: ignore[index]
                 for m in self.pattern.finditer(text)]  # fmt: skip
        return [f for f in found if f[2] > 0]


def read_word_list(path: str | Path | None = None) -> dict[str, float]:
    """term -> score from a list in profanity.txt's format (``SEVERITY: term, term``);
    None: the list shipped with aigc."""
    if path is None:
        text = files("aigc.safety").joinpath("data/profanity.txt").read_text(encoding="utf-8")
        where = "aigc/safety/data/profanity.txt"
    else:
        text, where = Path(path).read_text(encoding="utf-8"), str(path)
    terms: dict[str, float] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        severity, sep, rest = line.partition(":")
        if not sep or severity.strip() not in SEVERITY:
            raise ConfigError(
                f"{where}:{number}: write 'strong: term, term', 'mild: ...' or 'allow: ...'"
            )
        for term in rest.split(","):
            if term.strip():
                terms[term.strip().lower()] = SEVERITY[severity.strip()]
    return terms


# ---------------------------------------------------------------------------
# categories


@dataclass
class _Category:
    name: str
    action: str
    applies_to: frozenset[str]
    placeholder: str

    whole_text = False  # judged from the whole text (no spans): streams wait for their end

    def spans(self, text: str) -> list[FlaggedSpan]:
        raise NotImplementedError

    def threshold(self) -> float:
        return 1e-12  # any span

    def verdicts(self, texts: Sequence[str]) -> list[tuple[dict[str, bool], dict[str, float], list[FlaggedSpan]]]:  # fmt: skip
        """(categories, scores, spans) of each text."""
        out = []
        for text in texts:
            spans = self.spans(text)
            score = max((s.score for s in spans), default=0.0)
            out.append(({self.name: score >= self.threshold()}, {self.name: score}, spans))
        return out


@dataclass
class _PersonalData(_Category):
    kinds: tuple[str, ...] | None = None

    def spans(self, text: str) -> list[FlaggedSpan]:
        from aigc.data import privacy

        out = []
        for s in privacy.find_pii(text, kinds=self.kinds):  # typed placeholders: [EMAIL]
            out.append(FlaggedSpan(self.name, s.kind, s.start, s.end, s.text,
                                   privacy.placeholder(s.kind)))  # fmt: skip
        return out


@dataclass
class _Words(_Category):
    """Profanity (the shipped list, scored by severity) and block lists (words and
    regular expressions, each a span of score 1)."""

    words: WordList | None = None
    patterns: tuple[re.Pattern[str], ...] = ()
    cut: float = 1e-12  # the score a span needs to flag the category
    labels: Mapping[float, str] = field(default_factory=lambda: {1.0: "word"})

    def threshold(self) -> float:
        return self.cut

    def spans(self, text: str) -> list[FlaggedSpan]:
        found = [] if self.words is None else [
            FlaggedSpan(self.name, self.labels.get(score, "word"), a, b, text[a:b],
                        self.placeholder, score)
            for a, b, score in self.words.find(text)
        ]  # fmt: skip
        for p in self.patterns:
            found += [FlaggedSpan(self.name, "pattern", m.start(), m.end(), m.group(),
                                  self.placeholder) for m in p.finditer(text) if m.end() > m.start()]  # fmt: skip
        return sorted(found, key=lambda s: (s.start, -s.end))


@dataclass
class _Classifier(_Category):
    pipeline: Any = None  # an aigc ClassifyPipeline
    thresholds: dict[str, float] = field(default_factory=dict)

    whole_text = True

    def verdicts(self, texts: Sequence[str]) -> list[tuple[dict[str, bool], dict[str, float], list[FlaggedSpan]]]:  # fmt: skip
        windows, owner = [], []
        for i, text in enumerate(texts):
            for w in self._windows(text):
                windows.append(w)
                owner.append(i)
        best = [dict.fromkeys(self.thresholds, 0.0) for _ in texts]
        if windows:
            for i, r in zip(owner, self.pipeline.classify(windows), strict=True):
                for label in self.thresholds:
                    best[i][label] = max(best[i][label], float(r["probs"][label]))
        out = []
        for probs in best:
            flags = {f"{self.name}/{k}": p >= self.thresholds[k] for k, p in probs.items()}
            scores = {f"{self.name}/{k}": p for k, p in probs.items()}
            flags[self.name] = any(flags.values())
            scores[self.name] = max(probs.values())
            out.append((flags, scores, []))
        return out

    def _windows(self, text: str) -> list[str]:
        """The text, or for one longer than the run's block size overlapping windows of
        about that many tokens (classify() would read the first block only)."""
        from aigc.data.tokenizers import encode_replacing

        if not text:
            return []
        block = int(self.pipeline.config.model.block_size)
        n = len(encode_replacing(self.pipeline.tokenizer, text)[0])
        if n <= block:
            return [text]
        width = max(1, int(block * len(text) / n * 0.9))  # characters per window
        step = max(1, width // 2)
        return [text[i : i + width] for i in range(0, max(1, len(text) - width + step), step)]


# ---------------------------------------------------------------------------
# the moderator


class Moderator:
    """A policy's categories, ready to check, redact and screen texts (see the module
    docstring). Build one with ``Moderator.from_policy(PATH or dict)`` or
    ``Moderator.default()`` (personal data, redacted; profanity, refused)."""

    def __init__(self, name: str, categories: Sequence[_Category]) -> None:
        self.name = name
        self._categories = list(categories)

    @classmethod
    def from_policy(cls, policy: str | Path | Mapping[str, Any]) -> Moderator:
        """A moderator from a policy: a YAML file's path or the policy as a dict.
        ConfigError naming the file and key of the first mistake."""
        if isinstance(policy, Mapping):
            return _build(policy, "moderation policy", "custom")
        import yaml

        path = Path(policy)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"moderation policy {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"moderation policy {path}: cannot read it ({e})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" (line {mark.line + 1})" if mark is not None else ""
            raise ConfigError(f"moderation policy {path}: not valid YAML{at}") from None
        return _build(data, str(path), path.stem)

    @classmethod
    def default(cls) -> Moderator:
        """Personal data (redacted) and profanity (refused), applied to prompts and outputs."""
        return _build(DEFAULT_POLICY, "the default moderation policy", "aigc-default")

    @property
    def categories(self) -> list[str]:
        """The category names, in the policy's order (a classifier's labels follow it as
        NAME/LABEL)."""
        out = []
        for c in self._categories:
            out.append(c.name)
            if isinstance(c, _Classifier):
                out += [f"{c.name}/{k}" for k in c.thresholds]
        return out

    def applies(self, where: str) -> bool:
        """Whether any category applies to ``where`` (prompts or outputs)."""
        return bool(self._of(where))

    def whole_text(self, where: str) -> bool:
        """Whether a category that applies to ``where`` judges whole texts (a classifier):
        then a stream is held back until its text ends."""
        return any(c.whole_text for c in self._of(where))

    def check(self, text: str, where: str | None = None) -> ModerationResult:
        """The verdict on a text by every category (``where``: only those that apply to
        prompts or to outputs)."""
        return self.check_batch([text], where)[0]

    def check_batch(self, texts: Sequence[str], where: str | None = None) -> list[ModerationResult]:
        """check() of many texts (a classifier reads them in batches)."""
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise RequestError(f"text {i} must be a string, not {type(t).__name__}")
        results = [ModerationResult(False, {}, {}, []) for _ in texts]
        for category in self._of(where):
            for r, (flags, scores, spans) in zip(results, category.verdicts(texts), strict=True):
                r.categories.update(flags)
                r.category_scores.update(scores)
                r.spans += spans
        for r in results:
            r.flagged = any(r.categories.values())
            r.spans.sort(key=lambda s: (s.start, -s.end))
        return results

    def redact(self, text: str, where: str | None = None) -> str:
        """The text with the spans of the categories whose action is redact replaced by
        their placeholders (personal data: privacy's typed ones, e.g. [EMAIL])."""
        return _replace(text, self._redacted_spans(self.check(text, where)))

    def screen(self, text: str, where: str) -> str:
        """What the server does with a prompt or an output: ContentRefused when a refusing
        category that applies to ``where`` flags it, else the text redacted."""
        return self.screen_batch([text], where)[0]

    def screen_batch(self, texts: Sequence[str], where: str) -> list[str]:
        """screen() of many texts: ContentRefused at the first refused one."""
        refusing = [c.name for c in self._of(where) if c.action == "refuse"]
        out = []
        for text, result in zip(texts, self.check_batch(texts, where), strict=True):
            if (category := result.refused_by(refusing)) is not None:
                raise ContentRefused(self.name, category, where)
            out.append(_replace(text, self._redacted_spans(result)))
        return out

    def stream(self, where: str = "outputs", hold: int = STREAM_HOLD) -> StreamFilter:
        """A filter for a text that arrives in pieces (a streamed completion)."""
        return StreamFilter(self, where, hold)

    def _of(self, where: str | None) -> list[_Category]:
        if where is not None and where not in WHERE:
            raise ValueError(f"where={where!r}: prompts, outputs or None")
        return [c for c in self._categories if where is None or where in c.applies_to]

    def _redacted_spans(self, result: ModerationResult) -> list[FlaggedSpan]:
        redacting = {c.name: c for c in self._categories if c.action == "redact"}
        return [s for s in result.spans if s.category in redacting
                and s.score >= redacting[s.category].threshold()]  # fmt: skip


def _replace(text: str, spans: Sequence[FlaggedSpan], lo: int = 0, hi: int | None = None) -> str:
    """text[lo:hi] with the spans replaced; overlapping spans become one, under the
    first one's placeholder; a span reaching outside [lo, hi) is cut to it."""
    hi = len(text) if hi is None else hi
    out, at = [], lo
    for s in sorted(spans, key=lambda s: (s.start, -s.end)):
        start, end = max(s.start, lo), min(s.end, hi)
        if end <= start or end <= at:
            continue
        if start < at:  # overlaps the previous span: already replaced up to `at`
            at = end
            continue
        out += [text[at:start], s.replacement]
        at = end
    out.append(text[at:hi])
    return "".join(out)


class StreamFilter:
    """Screens a text that arrives in pieces, handing out only what is safe to send.

    It keeps the last ``hold`` characters back: a span no longer than that (a word, an
    e-mail address, a phone or card number) is seen whole, with the characters after it,
    before any of it is sent, so that it is redacted whole or the stream is refused
    (ContentRefused) before it shows. A longer span (a private-key block, a long match
    of a user's pattern) may be recognised only after its start was sent: its rest is
    then redacted. With a whole-text category (a classifier) nothing is sent before the
    text ends; then it is screened whole. Checks read a window of the text (the unsent
    part and ``hold`` characters before it), so a long stream costs linear time."""

    def __init__(self, moderator: Moderator, where: str = "outputs", hold: int = STREAM_HOLD):
        self.moderator, self.where, self.hold = moderator, where, hold
        self.whole = moderator.whole_text(where)
        self.raw = ""  # everything received
        self.sent = 0  # raw[:sent] has been handed out (redacted)

    def feed(self, piece: str) -> str:
        """Take the next piece; return the text now safe to send ("" when none)."""
        self.raw += piece
        if self.whole or len(self.raw) - self.hold <= self.sent:
            return ""
        return self._release(len(self.raw) - self.hold)

    def finish(self) -> str:
        """The text has ended: the rest, screened."""
        if self.whole:
            out = self.moderator.screen(self.raw, self.where)
            self.sent = len(self.raw)
            return out
        return self._release(len(self.raw))

    def _release(self, limit: int) -> str:
        lo = max(0, self.sent - self.hold)  # context before the unsent part
        window = self.raw[lo:]
        result = self.moderator.check(window, self.where)
        # spans wholly in what was sent were seen (and passed) before; a span at the
        # window's start may be a piece of a longer word, and is among those
        spans = [_shifted(s, lo) for s in result.spans if s.end + lo > self.sent]
        refusing = {c.name for c in self.moderator._of(self.where) if c.action == "refuse"}
        cuts = {c.name: c.threshold() for c in self.moderator._of(self.where)}
        for s in spans:
            if s.category in refusing and s.score >= cuts[s.category]:
                raise ContentRefused(self.moderator.name, s.category, self.where)
        redact = self.moderator._redacted_spans(ModerationResult(False, {}, {}, spans))
        end = limit
        for s in redact:  # never cut a span to be redacted in two
            if s.start < end < s.end:
                end = s.start if s.start >= self.sent else s.end
        if end <= self.sent:
            return ""
        out = _replace(self.raw, redact, self.sent, end)
        self.sent = end
        return out


def _shifted(span: FlaggedSpan, offset: int) -> FlaggedSpan:
    """The span moved by ``offset`` characters."""
    return FlaggedSpan(span.category, span.label, span.start + offset, span.end + offset,
                       span.text, span.replacement, span.score)  # fmt: skip


def moderation_id() -> str:
    """An id for a moderation answer, as OpenAI's "modr-..."."""
    return "modr-" + uuid.uuid4().hex[:24]


# ---------------------------------------------------------------------------
# the policy


_COMMON_KEYS = {"source", "action", "applies_to", "placeholder"}
_SOURCE_KEYS = {
    "personal_data": {"kinds"},
    "profanity": {"threshold"},
    "blocklist": {"words", "patterns"},
    "classifier": {"run", "thresholds", "device"},
}


def _build(data: Any, where: str, default_name: str) -> Moderator:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: a policy is a mapping with 'categories' (and 'name')")
    unknown = set(data) - {"name", "categories"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}; a policy has "
                          "'name' and 'categories'")  # fmt: skip
    name = data.get("name", default_name)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{where}: name={name!r} must be letters, digits, '_', '.' or '-'")
    cats = data.get("categories")
    if not isinstance(cats, Mapping) or not cats:
        raise ConfigError(f"{where}: 'categories' must map category names to their settings")
    return Moderator(name, [_category(str(k), v, where) for k, v in cats.items()])


def _category(name: str, spec: Any, where: str) -> _Category:
    at = f"{where}: categories.{name}"
    if not _NAME.fullmatch(name):
        raise ConfigError(f"{at}: a category's name is letters, digits, '_', '.' or '-'")
    if spec is None:
        spec = {}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{at} must be a mapping (source, action, applies_to, ...)")
    source = spec.get("source", name if name in BUILT_IN else None)
    if source is None:
        raise ConfigError(
            f"{at}: unknown category; the built-in ones are {', '.join(BUILT_IN)}, and "
            "others name their source (blocklist or classifier)"
        )
    if source not in SOURCES:
        raise ConfigError(f"{at}.source={source!r} is not one of {', '.join(SOURCES)}")
    unknown = set(spec) - _COMMON_KEYS - _SOURCE_KEYS[source]
    if unknown:
        allowed = ", ".join(sorted(_COMMON_KEYS | _SOURCE_KEYS[source]))
        raise ConfigError(f"{at}: unknown key {sorted(unknown)[0]!r} for a {source} category ({allowed})")  # fmt: skip
    action = spec.get("action")
    if action not in ACTIONS:
        raise ConfigError(f"{at}.action={action!r} must be refuse or redact")
    applies = spec.get("applies_to", "both")
    if applies == "both":
        applies = list(WHERE)
    applies = [applies] if isinstance(applies, str) else applies
    if not isinstance(applies, list) or not applies or any(a not in WHERE for a in applies):
        raise ConfigError(f"{at}.applies_to={spec.get('applies_to')!r} must be prompts, outputs or both")  # fmt: skip
    placeholder = spec.get("placeholder", f"[{name.upper()}]")
    if not isinstance(placeholder, str):
        raise ConfigError(f"{at}.placeholder must be a string")
    common = dict(name=name, action=action, applies_to=frozenset(applies), placeholder=placeholder)  # fmt: skip

    if source == "personal_data":
        from aigc.data.privacy import PII_KINDS

        kinds = spec.get("kinds")
        if kinds is not None:
            if not isinstance(kinds, list) or not kinds:
                raise ConfigError(f"{at}.kinds must be a list of {', '.join(PII_KINDS)}")
            bad = [k for k in kinds if k not in PII_KINDS]
            if bad:
                raise ConfigError(f"{at}.kinds: {bad[0]!r} is not one of {', '.join(PII_KINDS)}")
            kinds = tuple(kinds)
        return _PersonalData(**common, kinds=kinds)
    if source == "profanity":
        cut = spec.get("threshold", 0.5)
        if not _number(cut) or not 0 < cut <= 1:
            raise ConfigError(f"{at}.threshold={cut!r} must be a number in (0, 1]")
        labels = {v: k for k, v in SEVERITY.items()}
        return _Words(**common, words=_profanity(), cut=float(cut), labels=labels)
    if source == "blocklist":
        return _blocklist(spec, at, common)
    if action == "redact":
        raise ConfigError(f"{at}: a classifier judges whole texts and finds no spans to "
                          "redact; its action must be refuse")  # fmt: skip
    return _classifier(spec, at, common)


_PROFANITY: list[WordList] = []


def _profanity() -> WordList:
    if not _PROFANITY:  # built once a process
        _PROFANITY.append(WordList(read_word_list()))
    return _PROFANITY[0]


def _blocklist(spec: Mapping[str, Any], at: str, common: dict[str, Any]) -> _Words:
    words = spec.get("words", [])
    patterns = spec.get("patterns", [])
    for key, value in (("words", words), ("patterns", patterns)):
        if not isinstance(value, list):
            raise ConfigError(f"{at}.{key} must be a list of strings")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise ConfigError(f"{at}.{key}[{i}]={item!r} must be a non-empty string")
    if not words and not patterns:
        raise ConfigError(f"{at}: a blocklist needs words or patterns (or both)")
    compiled = []
    for i, p in enumerate(patterns):
        try:
            rx = re.compile(p)
        except re.error as e:
            raise ConfigError(f"{at}.patterns[{i}]={p!r} is not a valid regular expression ({e})") from None  # fmt: skip
        if rx.fullmatch(""):
            raise ConfigError(f"{at}.patterns[{i}]={p!r} matches the empty text; it would match everywhere")  # fmt: skip
        compiled.append(rx)
    word_list = WordList(dict.fromkeys(words, 1.0)) if words else None
    return _Words(**common, words=word_list, patterns=tuple(compiled))


def _classifier(spec: Mapping[str, Any], at: str, common: dict[str, Any]) -> _Classifier:
    run = spec.get("run")
    if not isinstance(run, str) or not run:
        raise ConfigError(f"{at}.run must name a classifier run folder (aigc finetune --task classify)")  # fmt: skip
    from aigc.api import load

    pipe = load(run, device=str(spec.get("device", "cpu")))  # CheckpointError for a bad run
    if getattr(pipe, "kind", None) != "classify":
        raise ConfigError(f"{at}.run={run!r} is a {pipe.kind} run, not a classifier "
                          "(aigc finetune BASE --task classify)")  # fmt: skip
    thresholds = spec.get("thresholds")
    if not isinstance(thresholds, Mapping) or not thresholds:
        raise ConfigError(f"{at}.thresholds must map labels of the run ({', '.join(pipe.classes)}) to thresholds")  # fmt: skip
    out = {}
    for label, t in thresholds.items():
        if str(label) not in pipe.classes:
            raise ConfigError(f"{at}.thresholds: {label!r} is not a label of {run} ({', '.join(pipe.classes)})")  # fmt: skip
        if not _number(t) or not 0 < t <= 1:
            raise ConfigError(f"{at}.thresholds.{label}={t!r} must be a number in (0, 1]")
        out[str(label)] = float(t)
    return _Classifier(**common, pipeline=pipe, thresholds=out)


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)
