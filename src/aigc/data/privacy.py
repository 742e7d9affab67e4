"""Personal data and secrets in text: find them, count them, replace them with placeholders.

Each kind is a pattern for candidates followed by the check that real instances pass
and look-alikes fail, so that precision does not rest on the pattern alone:

- ``email``: addresses with a dotted domain and a letter top-level domain (image names
  like ``icon@2x.png`` are not addresses);
- ``phone``: international numbers (``+`` and 8-15 digits, E.164), North American
  numbers (area code and exchange start with 2-9), and national numbers with a trunk
  ``0`` in the European groupings; a bare run of digits only after a word such as
  "phone" or "call", and no number after "order", "invoice", "ISBN" and the like;
- ``credit_card``: 13-19 digits in one grouping, a known issuer's prefix and length,
  and the Luhn checksum (ISO/IEC 7812);
- ``iban``: a country code, the length that country's IBANs have, and the mod-97
  checksum (ISO 13616, ISO 7064);
- ``ip``: IPv4 with octets 0-255 and no leading zeros (not the fourth part of a longer
  dotted run, nor after "version"), and IPv6 as Python's ``ipaddress`` parses it with at
  least three groups written out (``a[::2]`` is not an address);
- ``secret``: AWS access key ids, GitHub, Slack, OpenAI/Anthropic, Stripe, Google,
  Hugging Face tokens, JSON Web Tokens, Slack webhooks, ``-----BEGIN ... PRIVATE
  KEY-----`` blocks, and the value of ``api_key = "..."``-style assignments (and
  ``Bearer`` headers) when it looks random: long enough, two kinds of characters, high
  Shannon entropy, not a placeholder, not a variable or a call.

``find_pii`` returns non-overlapping spans (a secret wins over an e-mail over an IBAN over
a card over an IP over a phone where two overlap); ``redact`` puts ``[EMAIL]``,
``[PHONE]``, ... in their place. ``PiiScrubber`` does both over a stream of chunks.
"""

from __future__ import annotations

import bisect
import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

PII_KINDS = ("email", "phone", "credit_card", "iban", "ip", "secret")
# where two candidates overlap, the kind earlier here is kept
_PRIORITY = ("secret", "email", "iban", "credit_card", "ip", "phone")


@dataclass(frozen=True)
class PiiSpan:
    """One piece of personal data or one secret found in a text: ``text[start:end]``."""

    kind: str  # one of PII_KINDS
    start: int
    end: int
    text: str


def placeholder(kind: str) -> str:
    """The typed placeholder that replaces a span of ``kind``: ``[EMAIL]``, ``[CREDIT_CARD]``."""
    return f"[{kind.upper()}]"


# --------------------------------------------------------------------------- checksums


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum (ISO/IEC 7812-1): from the right, every second digit is doubled
    (minus 9 if above 9); the sum of all must be a multiple of 10."""
    if not digits.isdigit():
        return False
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = ord(c) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# Card issuers (ISO/IEC 7812 issuer identification numbers): prefix ranges, lengths.
_ISSUERS: tuple[tuple[str, tuple[tuple[int, int], ...], frozenset[int]], ...] = (
    ("visa", ((4, 4),), frozenset({13, 16, 19})),
    ("mastercard", ((51, 55), (2221, 2720)), frozenset({16})),
    ("amex", ((34, 34), (37, 37)), frozenset({15})),
    ("discover", ((6011, 6011), (644, 649), (65, 65), (622126, 622925)), frozenset(range(16, 20))),
    ("diners", ((300, 305), (36, 36), (38, 39)), frozenset(range(14, 20))),
    ("jcb", ((3528, 3589),), frozenset(range(16, 20))),
    ("unionpay", ((62, 62), (81, 81)), frozenset(range(16, 20))),
    ("maestro", ((5018, 5018), (5020, 5020), (5038, 5038), (5893, 5893), (6304, 6304),
                 (6759, 6759), (6761, 6763)), frozenset(range(13, 20))),
)  # fmt: skip


def card_issuer(digits: str) -> str | None:
    """The issuer whose prefix and length ``digits`` has ("visa", "amex", ...), else None.
    The checksum is not looked at (``luhn_valid``)."""
    for name, ranges, lengths in _ISSUERS:
        if len(digits) not in lengths:
            continue
        for lo, hi in ranges:
            n = len(str(lo))
            if lo <= int(digits[:n]) <= hi:
                return name
    return None


# IBAN lengths per country (the SWIFT IBAN registry).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
    "BH": 22, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28,
    "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24,
    "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SC": 31,
    "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24,
    "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip


def iban_mod97(iban: str) -> int:
    """ISO 7064 MOD 97-10 of an IBAN written without spaces: the first four characters
    moved to the end, letters as 10..35, the number taken modulo 97 (1 when valid)."""
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97


def iban_valid(iban: str) -> bool:
    """True for an IBAN (spaces allowed) of a known country, of that country's length,
    with a valid mod-97 checksum."""
    s = iban.replace(" ", "").upper()
    return (
        IBAN_LENGTHS.get(s[:2]) == len(s)
        and s[2:4].isdigit()
        and s.isascii()
        and s.isalnum()
        and iban_mod97(s) == 1
    )


def iban_check_digits(country: str, bban: str) -> str:
    """The two check digits that make ``country + ?? + bban`` a valid IBAN."""
    return f"{98 - iban_mod97(country + '00' + bban):02d}"


def shannon_entropy(s: str) -> float:
    """Bits per character of the characters' frequency distribution in ``s``."""
    if not s:
        return 0.0
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


# --------------------------------------------------------------------------- detectors

_NEGATIVE_CONTEXT = re.compile(
    r"(?i)(?:order|invoice|ticket|ref(?:erence)?|isbn|issn|serial|tracking|part|sku|"
    r"case|batch|lot|model|build|ean|gtin|upc|barcode|no\.|nr\.?|#)\W{0,3}(?:(?:number|no\.?|nr\.?|id|#)\W{0,3})?$"
)
_PHONE_CONTEXT = re.compile(
    r"(?i)\b(?:tel|telephone|phone|ph|mobile|cell|fax|call|text|sms|whatsapp|ring|dial|"
    r"contact|reach|line|hotline)\b\W{0,12}(?:\w+\W{1,3}){0,2}$"
)
_VERSION_CONTEXT = re.compile(r"(?i)\b(?:version|ver|release|v|build|firmware)\W{0,3}$")


def _before(text: str, start: int, pattern: re.Pattern[str], width: int = 32) -> bool:
    return pattern.search(text, max(0, start - width), start) is not None


_EMAIL = re.compile(
    r"(?<![\w.%+\-])[A-Za-z0-9_%+\-]+(?:\.[A-Za-z0-9_%+\-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+([A-Za-z]{2,24})(?![\w\-@])"
)
_FILE_SUFFIXES = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "bmp", "ico", "tif",
                            "tiff", "avif", "heic"})  # fmt: skip


def _emails(text: str) -> Iterator[tuple[int, int]]:
    for m in _EMAIL.finditer(text):
        if m.group(1).lower() not in _FILE_SUFFIXES:
            yield m.start(), m.end()


# a number is not part of a longer run of digits and separators on either side (a phone
# may stand beside another number, a space between)
_NO_DIGITS_BEFORE = r"(?<![\w+\-./])(?<!\d[ .\-])"
_NO_DIGITS_AFTER = r"(?![\w\-/]|[ .\-]\d|\.\w)"
_PHONE_BEFORE = r"(?<![\w+\-./])(?<!\d[.\-])"
_PHONE_AFTER = r"(?![\w\-/]|[.\-]\d|\.\w)"
_PHONE_INTL = re.compile(
    _NO_DIGITS_BEFORE
    + r"\+[1-9]\d{0,2}(?:[ .\-]?\(\d{1,4}\)|[ .\-]?\d{1,5}){1,6}"
    + _NO_DIGITS_AFTER
)
_PHONE_NANP = re.compile(
    _PHONE_BEFORE
    + r"(?:1[ .\-])?(?:\(([2-9]\d\d)\) ?|([2-9]\d\d)([ .\-]))[2-9]\d\d([ .\-])\d{4}"
    + _PHONE_AFTER
)
_PHONE_NATIONAL = re.compile(
    _PHONE_BEFORE
    + r"(?:0[1-9]([ .\-])\d\d(?:\1\d\d){3}"  # French: 01 23 45 67 89
    + r"|\(?0\d{1,4}\)?[ /\-]\d{3,8}(?:[ \-]\d{2,4}){0,2})"  # UK, German...: 020 7946 0958
    + _PHONE_AFTER
)
_PHONE_BARE = re.compile(_PHONE_BEFORE + r"\+?\d{10,13}" + _PHONE_AFTER)
# Runs a phone number found inside is a piece of: IBAN-shaped strings (valid or not) and
# digits in groups of four (card-shaped).
_NUMBER_BLOCKS = re.compile(
    r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,8}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])"
    r"|(?<![\w.\-])\d{4}(?:[ \-]\d{4}){2,}(?:[ \-]\d{1,4})?(?![\w\-])"
)


def _digits(s: str) -> str:
    return "".join(c for c in s if c.isdigit())


def _phones(text: str) -> Iterator[tuple[int, int]]:
    blocks = [(m.start(), m.end()) for m in _NUMBER_BLOCKS.finditer(text)]
    for start, end in _phone_candidates(text):
        if not any(s <= start and end <= e and (s, e) != (start, end) for s, e in blocks):
            yield start, end


def _phone_candidates(text: str) -> Iterator[tuple[int, int]]:
    for m in _PHONE_INTL.finditer(text):
        if 8 <= len(_digits(m.group())) <= 15 and not re.search(r"[ .\-]{2}", m.group()):
            yield m.start(), m.end()
    for m in _PHONE_NANP.finditer(text):
        # without parentheses, both separators are the same: 415-555-2671, 415.555.2671
        if m.group(3) is not None and m.group(3) != m.group(4):
            continue
        if not _before(text, m.start(), _NEGATIVE_CONTEXT):
            yield m.start(), m.end()
    for m in _PHONE_NATIONAL.finditer(text):
        n = len(_digits(m.group()))
        if 10 <= n <= 12 and not _before(text, m.start(), _NEGATIVE_CONTEXT):
            yield m.start(), m.end()
    for m in _PHONE_BARE.finditer(text):
        if _before(text, m.start(), _PHONE_CONTEXT, 48) and not _before(
            text, m.start(), _NEGATIVE_CONTEXT
        ):
            yield m.start(), m.end()


_CARD = re.compile(_NO_DIGITS_BEFORE + r"\d(?:[ \-]?\d){12,18}" + r"(?![\w\-/]|[ .,\-]\d|\.\w)")
_CARD_GROUPS = re.compile(
    r"(?:\d{4}(?P<s>[ \-]))(?:\d{4}(?P=s)){1,3}\d{1,4}|\d{4}([ \-])\d{6}\2\d{4,5}"
)


def _cards(text: str) -> Iterator[tuple[int, int]]:
    for m in _CARD.finditer(text):
        s = m.group()
        digits = _digits(s)
        if len(digits) != len(s) and not _CARD_GROUPS.fullmatch(s):
            continue  # separators, but not in a card's grouping
        valid = card_issuer(digits) is not None and luhn_valid(digits)
        if valid and not _before(text, m.start(), _NEGATIVE_CONTEXT):
            yield m.start(), m.end()


_IBAN_START = re.compile(r"(?<![A-Za-z0-9])([A-Z]{2})(\d{2})(?=[ ]?[A-Z0-9])")


def _ibans(text: str) -> Iterator[tuple[int, int]]:
    for m in _IBAN_START.finditer(text):
        length = IBAN_LENGTHS.get(m.group(1))
        if length is None:
            continue
        # take the country's length in letters and digits, single spaces allowed between
        i, n, compact = m.end(), 4, [m.group(1), m.group(2)]
        while n < length and i < len(text):
            c = text[i]
            if c == " " and i + 1 < len(text) and text[i + 1] != " " and text[i - 1] != " ":
                i += 1
                continue
            if not (c.isascii() and c.isalnum()) or c.islower():
                break
            compact.append(c)
            n += 1
            i += 1
        if n != length or (i < len(text) and text[i].isascii() and text[i].isalnum()):
            continue
        if iban_mod97("".join(compact)) == 1:
            yield m.start(), i


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# not after "Chrome/" and other product tokens (a URL's "//" still counts)
_IPV4 = re.compile(rf"(?<![\w.\-])(?<![A-Za-z]/)(?:{_OCTET}\.){{3}}{_OCTET}(?![\w\-]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?=[0-9A-Fa-f:]*:[0-9A-Fa-f]*:)[0-9A-Fa-f:]{2,39}"
                   r"(?:(?<=:)(?:\d{1,3}\.){3}\d{1,3})?(?:%[\w]+)?(?![\w:]|\.\w)")  # fmt: skip


def _ips(text: str) -> Iterator[tuple[int, int]]:
    for m in _IPV4.finditer(text):
        if not _before(text, m.start(), _VERSION_CONTEXT, 16):
            yield m.start(), m.end()
    for m in _IPV6.finditer(text):
        s = m.group()
        try:
            ipaddress.IPv6Address(s)
        except ValueError:
            continue
        groups = [g for g in s.split("%")[0].split(":") if g]
        if len(groups) + ("." in s) >= 3:  # an embedded IPv4 address is two groups
            yield m.start(), m.end()


_SECRET_TOKENS = re.compile(
    r"\b(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|ANPA|ANVA|APKA)[A-Z0-9]{16}\b"  # AWS key ids
    r"|\bgh[pousr]_[A-Za-z0-9]{36,255}\b"  # GitHub tokens
    r"|\bgithub_pat_[A-Za-z0-9_]{22,255}\b"
    r"|\bxox[abposre]-[A-Za-z0-9\-]{10,250}"  # Slack tokens
    r"|https://hooks\.slack\.com/services/[A-Za-z0-9_/]{20,}"
    r"|\bsk-(?:proj-|svcacct-|admin-|ant-(?:api\d\d-)?)?[A-Za-z0-9_\-]{20,}"  # OpenAI, Anthropic
    r"|\b[sr]k_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe secret and restricted keys
    r"|\bAIza[0-9A-Za-z_\-]{35}(?![\w\-])"  # Google API keys
    r"|\bhf_[A-Za-z0-9]{30,}\b"  # Hugging Face
    r"|\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"  # JWT
)
# where a token above may start (a quick scan; the full pattern is tried only there)
_TOKEN_START = re.compile(
    r"(?=[Aghxsre])(?:A(?:KIA|SIA|BIA|CCA|GPA|IDA|ROA|NPA|NVA|PKA|Iza)|gh[pousr]_|github_pat_"
    r"|xox[abposre]-|https://hooks\.slack|[sr]k[_-]|hf_|eyJ)"
)
_PEM = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
    r"(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
    r"|(?:[ \t]*\r?\n[ \t]*(?:[A-Za-z0-9+/=]+|[\w\-]+: .*))*)"  # no END: its base64 lines
)
PEM_BEGIN = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
_PEM_END = re.compile(r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
_KEY_NAME = (
    r"(?:[A-Za-z0-9]+[_\-.])*(?:api[_\-]?key|apikey|api[_\-]?secret|secret[_\-]?key|secret|"
    r"access[_\-]?key(?:[_\-]?id)?|access[_\-]?token|auth[_\-]?token|refresh[_\-]?token|"
    r"token|password|passwd|pwd|client[_\-]?secret|private[_\-]?key|credentials?)"
)
_ASSIGNMENT = re.compile(
    rf"(?i)(?<![\w\-]){_KEY_NAME}[\"']?\s*(?::=|=>|=|:)\s*"
    r"(?:(?P<q>[\"'`])(?P<quoted>[^\s\"'`]{8,256})(?P=q)"
    r"|(?P<bare>[A-Za-z0-9_\-+/=~]{12,256})(?![\w.(\[\-]))"
    r"|(?i:\bbearer)\s+(?P<bearer>[A-Za-z0-9_\-.~+/]{16,}=*)(?![\w\-.])"
)
_KEY_WORD = re.compile(r"(?i)key|secret|token|passw|pwd|credential|bearer")
_PLACEHOLDER = re.compile(
    r"(?i)x{4,}|\*{3,}|your|example|sample|dummy|changeme|placeholder|redacted|insert|"
    r"<|>|\$\{|\{\{|%\(|%s|environ|getenv|process\.env|^(?:none|null|true|false|undefined)$"
    r"|(?:abc|123|000)(?:def|456|000)"
)

# a word with a few digits or symbols around it: chosen by a person, not generated
_HUMAN_CHOSEN = re.compile(r"[^\W\d_]+[\d!@#$%&*?.\-_]{0,6}|[\d!@#$%&*?.\-_]{0,6}[^\W\d_]+")


def looks_random(value: str) -> bool:
    """True for a value that looks like a generated secret rather than a word, a name, a
    placeholder or a word with digits tacked on ("password123"): 8+ characters of at
    least two kinds (lower, upper, digits, symbols), 0.75 of the highest Shannon entropy
    its length allows (at most 3.2 bits/char needed)."""
    if len(value) < 8 or _PLACEHOLDER.search(value) or _HUMAN_CHOSEN.fullmatch(value):
        return False
    kinds = sum((any(c.islower() for c in value), any(c.isupper() for c in value),
                 any(c.isdigit() for c in value),
                 any(not c.isalnum() and c not in "_-" for c in value)))  # fmt: skip
    if kinds < 2:
        return False
    return shannon_entropy(value) >= min(3.2, 0.75 * math.log2(len(value)))


def _secrets(text: str) -> Iterator[tuple[int, int]]:
    for m in _PEM.finditer(text):
        yield m.start(), m.end()
    for start in _TOKEN_START.finditer(text):
        m = _SECRET_TOKENS.match(text, start.start())
        if m is None:
            continue
        s = m.group()
        # hyphenated words after "sk-" are not keys: a key has digits or mixed case
        mixed = any(c.isupper() for c in s[4:]) and any(c.islower() for c in s[4:])
        if any(c.isdigit() for c in s) or mixed or s[:4].isupper():
            yield m.start(), m.end()
    # assignments: tried only where a key word stands, from the start of its identifier
    # (a scan of the whole text with the full pattern costs several times more)
    tried = set()
    for w in _KEY_WORD.finditer(text):
        start = w.start()
        while start > 0 and (text[start - 1].isalnum() or text[start - 1] in "_-."):
            start -= 1
        if start in tried:
            continue
        tried.add(start)
        m = _ASSIGNMENT.match(text, start)
        if m is None:
            continue
        group = next(g for g in ("quoted", "bare", "bearer") if m.group(g) is not None)
        if looks_random(m.group(group)):
            yield m.start(group), m.end(group)


_DETECTORS: dict[str, Callable[[str], Iterator[tuple[int, int]]]] = {
    "email": _emails,
    "phone": _phones,
    "credit_card": _cards,
    "iban": _ibans,
    "ip": _ips,
    "secret": _secrets,
}


def _check_kinds(kinds: Iterable[str] | None) -> tuple[str, ...]:
    if kinds is None:
        return PII_KINDS
    if isinstance(kinds, str):
        kinds = [kinds]
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in PII_KINDS]
    if unknown:
        raise ValueError(f"unknown PII kind(s) {unknown}; the kinds are {', '.join(PII_KINDS)}")
    return kinds


def find_pii(text: str, kinds: Iterable[str] | None = None) -> list[PiiSpan]:
    """The personal data and secrets in ``text``, sorted by position and non-overlapping.

    kinds: the kinds to look for (default all of ``PII_KINDS``). Where candidates of two
    kinds overlap, the first in the order secret, email, iban, credit_card, ip, phone is
    kept, then the earlier and longer.
    """
    wanted = _check_kinds(kinds)
    taken_starts: list[int] = []  # sorted, with the matching ends: the accepted spans
    taken_ends: list[int] = []
    spans: list[PiiSpan] = []
    for kind in _PRIORITY:
        if kind not in wanted:
            continue
        found = sorted(set(_DETECTORS[kind](text)), key=lambda se: (se[0], -se[1]))
        for start, end in found:
            i = bisect.bisect_left(taken_starts, end)  # accepted spans starting before end
            if i > 0 and taken_ends[i - 1] > start:
                continue  # overlaps the accepted span that starts last before ``end``
            taken_starts.insert(i, start)
            taken_ends.insert(i, end)
            spans.append(PiiSpan(kind, start, end, text[start:end]))
    return sorted(spans, key=lambda s: s.start)


def redact(text: str, spans: Sequence[PiiSpan] | None = None) -> str:
    """``text`` with each span replaced by its typed placeholder (``[EMAIL]``, ``[PHONE]``,
    ``[CREDIT_CARD]``, ``[IBAN]``, ``[IP]``, ``[SECRET]``).

    spans: what to replace (default ``find_pii(text)``); they must lie inside the text
        and not overlap (ValueError otherwise).
    """
    if spans is None:
        spans = find_pii(text)
    out, pos = [], 0
    for s in sorted(spans, key=lambda s: s.start):
        if s.start < pos or s.end < s.start or s.end > len(text):
            raise ValueError(f"span {s} overlaps another or lies outside the text")
        out += [text[pos : s.start], placeholder(s.kind)]
        pos = s.end
    out.append(text[pos:])
    return "".join(out)


class PiiScrubber:
    """``find_pii`` and ``redact`` over a text that arrives in chunks, with the same
    result as on the whole text for every kind that does not span a line break (all but
    private-key blocks, which are held back until their END line, up to ``max_pending``
    characters).

    feed(chunk) returns the redacted text of the lines that are complete so far;
    flush() the rest. ``counts`` holds the spans found per kind.
    """

    def __init__(self, kinds: Iterable[str] | None = None, max_pending: int = 1 << 20):
        self.kinds = _check_kinds(kinds)
        self.max_pending = max_pending
        self.pending = ""
        self.counts: Counter[str] = Counter()

    def _scrub(self, text: str) -> str:
        spans = find_pii(text, self.kinds)
        self.counts.update(s.kind for s in spans)
        return redact(text, spans)

    def feed(self, chunk: str) -> str:
        buf = self.pending + chunk
        cut = buf.rfind("\n") + 1  # complete lines only
        begin = _open_pem_block(buf, cut) if "secret" in self.kinds else None
        if begin is not None and len(buf) - begin <= self.max_pending:
            cut = begin  # hold the block back until its END line
        if cut == 0 and len(buf) > self.max_pending:  # a huge line: cut after a space
            cut = max(buf.rfind(" ") + 1, len(buf) - self.max_pending)
        self.pending = buf[cut:]
        return self._scrub(buf[:cut]) if cut else ""

    def flush(self) -> str:
        out = self._scrub(self.pending) if self.pending else ""
        self.pending = ""
        return out


def _open_pem_block(buf: str, cut: int) -> int | None:
    """Where a private-key block begins in ``buf[:cut]`` whose END line has not come yet."""
    last = None
    for m in PEM_BEGIN.finditer(buf, 0, cut):
        last = m
    if last is None or _PEM_END.search(buf, last.end()):
        return None
    return last.start()
