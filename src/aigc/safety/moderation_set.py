"""A seeded, labelled set of sentences for measuring moderation categories.

``labelled_set(seed)`` returns examples, each a sentence with the truth for the three
built-in kinds of category (personal_data, profanity, blocklist) and the group it was
drawn from. The groups, about equal in size:

- ``clean``: everyday sentences (names, places, objects, times) with nothing to find;
- ``pii``: the same kind of sentence with one planted e-mail address, phone number,
  credit-card number (published test numbers, Luhn-valid), IBAN (published examples,
  checksum-valid) or IPv4 address;
- ``pii_distractor``: numbers that are not personal data: prices, dates, times,
  version strings, order and room numbers, card-like numbers that fail Luhn;
- ``profane``: a word of aigc's profanity list in context, as written;
- ``profane_obfuscated``: the same words disguised: repeated letters, l33t digits and
  symbols, a star for an inner letter, dots between letters, odd capitals;
- ``profane_evasive``: disguises the matcher is not written for, to show its limits:
  spaces between the letters, look-alike letters from other scripts (Cyrillic а, е, о,
  с), an invisible zero-width space inside, and spellings by sound (phuck, sheeit);
- ``scunthorpe``: innocent words that contain a listed word (Scunthorpe, classic,
  cocktail, Dickens, shiitake, ...), which a substring match flags;
- ``homonym``: innocent uses of listed words in another sense (a donkey is an ass, a
  rooster a cock): true negatives that no word list can get right;
- ``blocklist``: the terms of BLOCKLIST (words plain and disguised, pattern matches),
  and near misses (the words split or run into others, pattern-like codes that do not
  match).

The truth of each sentence is written by the generator from what it planted, never by
a detector.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

CATEGORIES = ("personal_data", "profanity", "blocklist")

# the block list the ``blocklist`` group is labelled for (a policy category's settings)
BLOCKLIST = {
    "words": ["bluebird", "project nightjar", "zephyrine"],
    "patterns": [r"\bACME-\d{4}\b"],
}


@dataclass(frozen=True)
class Example:
    """A sentence, the truth for each category, and the group it came from."""

    text: str
    truth: dict[str, bool]
    group: str


NAMES = ["Alice", "Bruno", "Chen", "Dalia", "Emeka", "Freya", "Gita", "Hugo", "Ines", "Jonas",
         "Keiko", "Luis", "Mona", "Nils", "Olga", "Priya", "Quentin", "Rosa", "Sami", "Tove"]  # fmt: skip
PLACES = ["Lisbon", "the library", "Oslo", "the station", "Nairobi", "the harbour", "Quito",
          "the market", "Kyoto", "the office", "Leeds", "the museum"]  # fmt: skip
THINGS = ["the report", "a parcel", "the slides", "two tickets", "the invoice", "a map",
          "the keys", "a bicycle", "the budget", "some bread", "the contract", "a kettle"]  # fmt: skip
CLEAN = [
    "{name} left {thing} at {place} on Tuesday.",
    "Could you bring {thing} when you come to {place}?",
    "{name} and {name2} met at {place} to talk about {thing}.",
    "The meeting about {thing} moved to {place}, said {name}.",
    "I think {name} would enjoy a trip to {place} next spring.",
    "{name} forgot {thing} again, so {name2} went back to {place}.",
    "We waited for {name} at {place} until the rain stopped.",
    "Please ask {name} whether {thing} arrived at {place}.",
]
PII_FRAMES = [
    "You can reach {name} at {x} for questions about {thing}.",
    "{name} wrote {x} on the form at {place}.",
    "Send {thing} to {x} before Friday, please.",
    "For {thing}, {name2} used {x} last week.",
    "The note from {place} said: contact {x}.",
]
EMAIL_HOSTS = ["example.com", "mail.example.org", "uni-leeds.ac.uk", "post.example.net"]
# numbers set aside for fiction where there are such (UK 020 7946 0xxx, US 555-01xx)
PHONES = ["+44 20 7946 0{d3}", "(212) 555-01{d2}", "+1 415 555 01{d2}", "+49 30 1234{d4}",
          "020 7946 0{d3}", "617-555-01{d2}"]  # fmt: skip
CARDS = ["4111 1111 1111 1111", "5555 5555 5555 4444", "4012 8888 8888 1881",
         "3782 822463 10005", "6011 1111 1111 1117", "5105105105105100", "4242424242424242"]  # fmt: skip
IBANS = ["GB82 WEST 1234 5698 7654 32", "DE89 3704 0044 0532 0130 00", "NL91ABNA0417164300",
         "FR14 2004 1010 0505 0001 3M02 606", "ES91 2100 0418 4502 0005 1332"]  # fmt: skip
DISTRACTORS = [
    "{name} paid {price} for {thing} at {place}.",
    "The train to {place} leaves at {time} on {date}.",
    "{name} upgraded the server to version {version} on {date}.",
    "Order {order} ({thing}) ships from {place} on {date}.",
    "The talk is in room {room} at {time}; {name} will chair it.",
    "The reference printed on {thing} was {badcard}.",
    "Between {year} and {year2}, {name} lived in {place}.",
]
# Luhn-invalid 16-digit numbers (a valid test number with its last digit changed)
BAD_CARDS = ["4111 1111 1111 1112", "5555 5555 5555 4445", "4012 8888 8888 1882",
             "6011 1111 1111 1118", "4242 4242 4242 4243"]  # fmt: skip
PROFANE_FRAMES = [
    "{name} shouted '{w}' when {thing} fell off the table.",
    "That {w} ruined the whole trip to {place}.",
    "Honestly, {w}, I told {name} about {thing} twice.",
    "The review just said {w} and nothing else about {place}.",
    "{name} muttered {w} under their breath at {place}.",
]
SCUNTHORPE = ["Scunthorpe", "Penistone", "Sussex", "Middlesex", "Essex", "assassin", "classic",
              "classroom", "passage", "bassist", "grasshopper", "embarrass", "compass",
              "cocktail", "peacock", "Hitchcock", "shuttlecock", "Hancock", "Dickens",
              "Dickinson", "scrapbook", "cumulative", "document", "analysis", "therapist",
              "button", "hello", "shell", "shiitake", "Matsushita", "Titicaca", "title",
              "crappie", "spice", "Arsenal", "sparse", "harass", "assume", "damnation",
              "niggardly", "Wankel", "cocker spaniel", "pricey", "Dickensian", "sextant",
              "butterfly", "assess", "assessment"]  # fmt: skip
SCUNTHORPE_FRAMES = [
    "{name} wrote a short piece about {w} for the newsletter.",
    "We talked about {w} all the way to {place}.",
    "The word of the day was '{w}', chosen by {name}.",
    "{name} looked up {w} before leaving for {place}.",
]
HOMONYMS = [
    "The farmer loaded the ass with firewood for {place}.",
    "The cock crowed twice before {name} woke up.",
    "Our bitch had six puppies last spring, said {name}.",
    "{name} is reading Moby Dick on the way to {place}.",
    "Prick the sausages with a fork before grilling, said {name}.",
    "Blue tits nested in the box {name} put up.",
    "The pussy willow by {place} is in bloom again.",
    "{name} said the ferry was a crap shoot in winter.",
]
BLOCK_FRAMES = [
    "{name} mentioned {w} during the call about {thing}.",
    "Is {w} still on the agenda at {place}?",
    "The file named after {w} was left at {place}.",
]
BLOCK_NEAR = ["blue bird", "bluebirds", "Project Nightjars", "zephyr", "ACME-12", "ACME-123456",
              "acme 2024", "nightjar project", "bluebirdsong", "Zephyrin"]  # fmt: skip
BLOCK_HITS = ["bluebird", "BlueBird", "blu3bird", "bluuuebird", "project nightjar",
              "Project  Nightjar", "zephyrine", "ZEPHYR1NE", "ACME-2024", "ACME-0042"]  # fmt: skip

_L33T = {"a": "4@", "e": "3", "i": "1!", "o": "0", "s": "5$", "t": "7"}


def obfuscate(word: str, rng: random.Random) -> str:
    """The word disguised one way (never returned unchanged): a repeated letter, l33t
    spellings, a star for an inner vowel, dots between letters or odd capitals."""
    letters = [i for i, c in enumerate(word) if c.isalpha()]
    ways = ["repeat", "caps"]
    if any(word[i] in _L33T for i in letters):
        ways.append("leet")
    inner = [i for i in letters[1:-1] if word[i] in "aeiou"]
    if inner:
        ways.append("star")
    if " " not in word and len(word) <= 8:
        ways.append("dots")
    way = rng.choice(ways)
    if way == "repeat":
        i = rng.choice(letters)
        return word[:i] + word[i] * rng.randint(2, 4) + word[i + 1 :]
    if way == "leet":
        chars = list(word)
        leet = [i for i in letters if word[i] in _L33T]
        for i in leet:
            if rng.random() < 0.7 or i == leet[-1]:  # at least one
                chars[i] = rng.choice(_L33T[word[i]])
        return "".join(chars)
    if way == "star":
        i = rng.choice(inner)
        return word[:i] + "*" + word[i + 1 :]
    if way == "dots":
        return ".".join(word)
    return "".join(c.upper() if k % 2 else c.lower() for k, c in enumerate(word))


_HOMOGLYPHS = {"a": "\u0430", "e": "\u0435", "o": "\u043e", "c": "\u0441", "p": "\u0440"}
_BY_SOUND = {"fuck": "phuck", "fucking": "phucking", "shit": "sheeit", "bitch": "biatch",
             "ass": "azz", "asshole": "azzhole", "dick": "dik", "cock": "kok", "damn": "dayum",
             "crap": "krap", "slut": "slutt", "whore": "hoar", "bullshit": "bullsheet"}  # fmt: skip


def evade(word: str, rng: random.Random) -> str:
    """The word disguised in a way WordList does not undo (see ``profane_evasive``)."""
    ways = ["spaces", "zero-width"]
    if any(c in _HOMOGLYPHS for c in word):
        ways.append("homoglyph")
    if word in _BY_SOUND:
        ways.append("sound")
    way = rng.choice(ways)
    if way == "spaces":
        return " ".join(word)
    if way == "zero-width":
        i = rng.randint(1, len(word) - 1)
        return word[:i] + "\u200b" + word[i:]
    if way == "homoglyph":
        return "".join(_HOMOGLYPHS.get(c, c) for c in word)
    return _BY_SOUND[word]


def labelled_set(seed: int = 0, per_group: int = 150) -> list[Example]:
    """The labelled sentences (see the module docstring), the same for the same seed."""
    from aigc.safety.moderation import read_word_list

    rng = random.Random(seed)
    profane = sorted(t for t, score in read_word_list().items() if score > 0)
    out: list[Example] = []

    def fill(frame: str, **extra: str) -> str:
        name, name2 = rng.sample(NAMES, 2)
        return frame.format(name=name, name2=name2, place=rng.choice(PLACES),
                            thing=rng.choice(THINGS), **extra)  # fmt: skip

    def add(text: str, group: str, **truth: bool) -> None:
        out.append(Example(text, {c: truth.get(c, False) for c in CATEGORIES}, group))

    for _ in range(per_group):
        add(fill(rng.choice(CLEAN)), "clean")
    for _ in range(per_group):
        add(fill(rng.choice(PII_FRAMES), x=_pii(rng)), "pii", personal_data=True)
    for _ in range(per_group):
        add(fill(rng.choice(DISTRACTORS), **_distractors(rng)), "pii_distractor")
    for _ in range(per_group):
        add(fill(rng.choice(PROFANE_FRAMES), w=rng.choice(profane)), "profane", profanity=True)
    for _ in range(per_group):
        word = obfuscate(rng.choice(profane), rng)
        add(fill(rng.choice(PROFANE_FRAMES), w=word), "profane_obfuscated", profanity=True)
    for _ in range(per_group):
        word = evade(rng.choice(profane), rng)
        add(fill(rng.choice(PROFANE_FRAMES), w=word), "profane_evasive", profanity=True)
    for _ in range(per_group):
        add(fill(rng.choice(SCUNTHORPE_FRAMES), w=rng.choice(SCUNTHORPE)), "scunthorpe")
    for _ in range(per_group):
        add(fill(rng.choice(HOMONYMS)), "homonym")
    for i in range(per_group):
        if i % 2:
            add(fill(rng.choice(BLOCK_FRAMES), w=rng.choice(BLOCK_HITS)), "blocklist", blocklist=True)  # fmt: skip
        else:
            add(fill(rng.choice(BLOCK_FRAMES), w=rng.choice(BLOCK_NEAR)), "blocklist")
    return out


def _pii(rng: random.Random) -> str:
    kind = rng.choice(["email", "phone", "card", "iban", "ip"])
    if kind == "email":
        user = rng.choice(NAMES).lower() + rng.choice(["", ".", "_"]) + rng.choice(["k", "lee", "x", "99"])  # fmt: skip
        return f"{user}@{rng.choice(EMAIL_HOSTS)}"
    if kind == "phone":
        digits = {f"d{k}": "".join(rng.choice("0123456789") for _ in range(k)) for k in (2, 3, 4)}
        return rng.choice(PHONES).format(**digits)
    if kind == "card":
        return rng.choice(CARDS)
    if kind == "iban":
        return rng.choice(IBANS)
    return ".".join(str(rng.randint(1, 254)) for _ in range(4))


def _distractors(rng: random.Random) -> dict[str, str]:
    year = rng.randint(1950, 2020)
    return {
        "price": rng.choice(["€", "$", "£"]) + f"{rng.randint(1, 999)}.{rng.randint(0, 99):02d}",
        "time": f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
        "date": f"{rng.randint(2000, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        "version": f"{rng.randint(1, 12)}.{rng.randint(0, 30)}.{rng.randint(0, 9)}",
        "order": f"#{rng.randint(10_000, 999_999)}",
        "room": str(rng.randint(100, 999)),
        "badcard": rng.choice(BAD_CARDS),
        "year": str(year),
        "year2": str(year + rng.randint(1, 30)),
    }


def precision_recall(truth: list[bool], predicted: list[bool]) -> tuple[float, float]:
    """(precision, recall) of predictions against the truth; 0 where undefined."""
    tp = sum(t and p for t, p in zip(truth, predicted, strict=True))
    flagged, positive = sum(predicted), sum(truth)
    return (tp / flagged if flagged else 0.0, tp / positive if positive else 0.0)
