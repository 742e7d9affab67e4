"""Privacy and de-duplication in the text pipeline, measured.

(a) PII detection (aigc.data.privacy.find_pii) on a seeded, generated labelled set:
    sentences of the kinds a scraped or logged corpus holds (mail, support tickets, server
    logs, config files, payment notes) with planted personal data and secrets, and as
    many with look-alikes that must not fire: version strings, dates and times, ISBNs,
    order and invoice numbers, card numbers failing Luhn, IBANs with a wrong checksum,
    floats, amounts, git hashes, UUIDs, MAC addresses, OIDs, image names with "@",
    placeholder and low-entropy "secrets", variables and calls after "token =".
    Precision and recall per kind and overall, a found span counting only with the
    planted span's exact boundaries and kind. Then the spans each fires on the Python docs
    (real text with no personal data in it). Beside it, Microsoft Presidio's pattern
    recognizers (presidio-analyzer; e-mail, phone via libphonenumber, card, IBAN, IP; it
    has none for secrets) on the same texts, with spans counted when they overlap the
    planted one (lenient to both; ours is given under the same rule).

(b) Near-duplicate removal: paragraphs of the Python docs (pydoc_data) as documents, each
    of 600 given one copy with words substituted, inserted or deleted at a rate of 1-30%,
    plus 500 unrelated paragraphs, in a shuffled stream. The truth is the same streaming
    rule with exact Jaccard similarity of word-5-gram sets (a document is dropped when
    similar >= threshold to a kept one); F1 of the dropped set for our MinHash-LSH and
    for datasketch's MinHashLSH at the same threshold and num_perm (its bands and rows
    come from the same optimisation), used as its README shows (a candidate is a
    duplicate) and with candidates checked by its own Jaccard estimate; documents/s.

    python benchmarks/privacy_dedup.py [--n-pii 3000] [--threshold 0.8] [--num-perm 128]
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import random
import re
import string
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from aigc.data.dedup import VERIFIED_WEIGHTS, deduplicate, lsh_params
from aigc.data.privacy import PII_KINDS, find_pii, iban_check_digits, luhn_valid
from machine import cpu_model

# --------------------------------------------------------------------------- (a) PII set


@dataclass
class Piece:
    """A generated text and the planted spans in it: (start, end, kind)."""

    text: str
    spans: list[tuple[int, int, str]] = field(default_factory=list)


def fill(template: str, values: dict[str, Piece | str]) -> Piece:
    """``template`` with each {slot} replaced, planted spans moved to their offsets."""
    out, spans, pos = [], [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(template[pos : m.start()])
        value = values[m.group(1)]
        piece = value if isinstance(value, Piece) else Piece(value)
        offset = sum(map(len, out))
        spans += [(offset + s, offset + e, k) for s, e, k in piece.spans]
        out.append(piece.text)
        pos = m.end()
    out.append(template[pos:])
    return Piece("".join(out), spans)


FIRST = ["anna", "ben", "chloe", "david", "emma", "farid", "grace", "hiro", "ines", "jonas",
         "kemal", "lea", "marta", "nils", "olga", "pavel", "qing", "rosa", "sven", "tariq"]  # fmt: skip
LAST = ["meyer", "smith", "garcia", "rossi", "novak", "dubois", "tanaka", "kowalski", "silva",
        "jensen", "okafor", "schmidt", "nguyen", "murphy", "larsen"]  # fmt: skip
DOMAINS = ["example.com", "mail.example.org", "company.co.uk", "uni-bonn.de", "acme.io",
           "posteo.net", "example.fr", "startup.ai", "city.gov", "lab.example.edu"]  # fmt: skip
WORDS = ["report", "meeting", "invoice", "update", "server", "account", "delivery", "contract",
         "schedule", "review", "backup", "release", "budget", "ticket", "payment"]  # fmt: skip


class Generator:
    """Seeded makers of personal data, secrets and their look-alikes."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def digits(self, n: int) -> str:
        return "".join(self.r.choice(string.digits) for _ in range(n))

    def alnum(self, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
        return "".join(self.r.choice(alphabet) for _ in range(n))

    # personal data ----------------------------------------------------------------
    def email(self) -> str:
        f, last, d = self.r.choice(FIRST), self.r.choice(LAST), self.r.choice(DOMAINS)
        local = self.r.choice([f"{f}.{last}", f"{f[0]}.{last}", f"{f}_{last}", f"{f}+news",
                               f"{f}{last}{self.r.randint(1, 99)}", f"{last}.{f}"])  # fmt: skip
        if self.r.random() < 0.3:
            local = local.capitalize()
        return f"{local}@{d}"

    def phone(self) -> str:
        r, d = self.r, self.digits
        area = f"{r.randint(2, 9)}{d(2)}"
        exch = f"{r.randint(2, 9)}{d(2)}"
        line = d(4)
        return r.choice([
            f"({area}) {exch}-{line}", f"{area}-{exch}-{line}", f"{area}.{exch}.{line}",
            f"+1 {area} {exch} {line}", f"+1-{area}-{exch}-{line}", f"1-800-{exch}-{line}",
            f"+44 20 {d(4)} {d(4)}", f"020 {d(4)} {d(4)}", f"07700 {d(6)}",
            f"+44 7700 {d(6)}", f"+49 30 {d(8)}", f"030 {d(8)}", f"+49 (0)30 {d(7)}",
            f"+33 1 {d(2)} {d(2)} {d(2)} {d(2)}", f"06 {d(2)} {d(2)} {d(2)} {d(2)}",
            f"+91 {r.randint(6, 9)}{d(4)} {d(5)}", f"+81 3-{d(4)}-{d(4)}",
            f"+61 2 {d(4)} {d(4)}", f"+34 {r.randint(6, 7)}{d(2)} {d(3)} {d(3)}",
            f"{area}{exch}{line}",  # bare: found only after "call", "tel", "line"...
        ])  # fmt: skip

    def card(self, valid: bool = True) -> str:
        r = self.r
        prefix, length = r.choice([("4", 16), ("4", 16), ("51", 16), ("55", 16), ("2221", 16),
                                   ("34", 15), ("37", 15), ("6011", 16), ("65", 16),
                                   ("3528", 16), ("36", 14)])  # fmt: skip
        body = prefix + self.digits(length - len(prefix) - 1)
        check = next(c for c in string.digits if luhn_valid(body + c))
        if not valid:
            check = str((int(check) + r.randint(1, 9)) % 10)
        n = body + check
        if length in (14, 15):  # Amex and Diners: 4-6-5, 4-6-4
            groups = [n[:4], n[4:10], n[10:]]
        else:
            groups = [n[i : i + 4] for i in range(0, length, 4)]
        return r.choice([" ", "-", ""]).join(groups)

    def iban(self, valid: bool = True) -> str:
        r = self.r
        country, bban = r.choice([
            ("DE", self.digits(18)), ("GB", self.alnum(4, string.ascii_uppercase) + self.digits(14)),
            ("FR", self.digits(23)), ("NL", self.alnum(4, string.ascii_uppercase) + self.digits(10)),
            ("ES", self.digits(20)), ("IT", r.choice(string.ascii_uppercase) + self.digits(22)),
            ("BE", self.digits(12)), ("CH", self.digits(17)), ("AT", self.digits(16)),
            ("PL", self.digits(24)),
        ])  # fmt: skip
        check = iban_check_digits(country, bban)
        if not valid:
            check = f"{(int(check) + r.randint(1, 96)) % 97:02d}"
            if check in ("00", "01"):
                check = "50"
        s = country + check + bban
        if r.random() < 0.6:
            s = " ".join(s[i : i + 4] for i in range(0, len(s), 4))
        return s

    def ipv4(self) -> str:
        r = self.r
        return r.choice([
            f"192.168.{r.randint(0, 255)}.{r.randint(1, 254)}", f"10.{r.randint(0, 255)}."
            f"{r.randint(0, 255)}.{r.randint(1, 254)}",
            ".".join(str(r.randint(1, 223)) for _ in range(4)),
        ])  # fmt: skip

    def ipv6(self) -> str:
        r = self.r
        groups = [f"{r.randint(0, 0xFFFF):x}" for _ in range(8)]
        if r.random() < 0.5:
            groups[2:5] = ["0", "0", "0"]
        addr = ipaddress.IPv6Address(":".join(["2001", "db8", *groups[2:]]))
        return addr.compressed if r.random() < 0.7 else addr.exploded

    def secret(self) -> Piece:
        """A snippet holding one secret; only the secret is planted."""
        r, a = self.r, self.alnum
        value, before, after = r.choice([
            ("AKIA" + a(16, string.ascii_uppercase + string.digits), "aws_access_key_id = ", ""),
            ("ghp_" + a(36), "export GITHUB_TOKEN=", ""),
            (f"xoxb-{self.digits(12)}-{self.digits(13)}-{a(24)}", "SLACK_BOT_TOKEN: ", ""),
            ("sk-proj-" + a(48), 'client = OpenAI(api_key="', '")'),
            ("sk_live_" + a(24), "STRIPE_SECRET_KEY=", ""),
            ("AIza" + a(35, string.ascii_letters + string.digits + "_-"), "key=", "&q=berlin"),
            ("hf_" + a(34), "HF_TOKEN=", ""),
            (a(40, string.ascii_letters + string.digits + "+/"), 'aws_secret_access_key = "', '"'),
            (a(32, "0123456789abcdef"), 'api_key: "', '"'),
            (a(24) + "!" + a(6), "db_password='", "'"),
            ("eyJ" + a(30) + ".eyJ" + a(40) + "." + a(43), "Authorization: Bearer ", ""),
            (a(32), '"client_secret": "', '",'),
        ])  # fmt: skip
        if r.random() < 0.12:  # a private key block instead
            body = "\n".join(a(64, string.ascii_letters + string.digits + "+/") for _ in range(4))
            kind = r.choice(["RSA ", "EC ", "OPENSSH ", ""])
            value = (f"-----BEGIN {kind}PRIVATE KEY-----\n{body}\n{a(20)}==\n"
                     f"-----END {kind}PRIVATE KEY-----")  # fmt: skip
            before, after = "", ""
        return Piece(before + value + after, [(len(before), len(before) + len(value), "secret")])

    # look-alikes ------------------------------------------------------------------
    def version(self) -> str:
        r = self.r
        return r.choice([f"{r.randint(2, 3)}.{r.randint(0, 13)}.{r.randint(0, 20)}",
                         f"v{r.randint(0, 9)}.{r.randint(0, 30)}.{r.randint(0, 9)}",
                         f"{r.randint(1, 12)}.{r.randint(0, 9)}"])  # fmt: skip

    def date(self) -> str:
        r = self.r
        y, m, d = r.randint(1990, 2030), r.randint(1, 12), r.randint(1, 28)
        return r.choice([f"{y}-{m:02d}-{d:02d}", f"{d:02d}.{m:02d}.{y}", f"{m:02d}/{d:02d}/{y}",
                         f"{y}/{m:02d}/{d:02d}", f"{d} March {y}"])  # fmt: skip

    def time_(self) -> str:
        return (
            f"{self.r.randint(0, 23):02d}:{self.r.randint(0, 59):02d}:{self.r.randint(0, 59):02d}"
        )

    def isbn(self) -> str:
        return self.r.choice([f"978-{self.digits(1)}-{self.digits(2)}-{self.digits(6)}-{self.digits(1)}",
                              f"0-{self.digits(3)}-{self.digits(5)}-{self.digits(1)}"])  # fmt: skip

    def number(self) -> str:
        r = self.r
        return r.choice([
            f"{r.randint(1, 999)},{self.digits(3)},{self.digits(3)}", f"{self.digits(8)}",
            f"{r.random() * 1000:.4f}", f"0.000{self.digits(3)}", f"-{r.random() * 90:.6f}",
            f"${r.randint(1, 999)},{self.digits(3)}.{self.digits(2)}", f"{r.randint(1, 99)}%",
            f"{self.digits(5)}", f"{r.randint(1, 9)}e-{r.randint(2, 9)}",
        ])  # fmt: skip

    def hex_hash(self) -> str:
        return self.alnum(self.r.choice([7, 40, 64]), "0123456789abcdef")

    def uuid(self) -> str:
        h = self.alnum(32, "0123456789abcdef")
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def mac(self) -> str:
        return ":".join(self.alnum(2, "0123456789ABCDEF") for _ in range(6))

    def order(self) -> str:
        return self.r.choice([f"{self.digits(3)}-{self.digits(3)}-{self.digits(4)}",
                              f"{self.digits(4)} {self.digits(4)} {self.digits(4)} {self.digits(4)}",
                              f"W-{self.digits(4)}-{self.digits(6)}", self.digits(10)])  # fmt: skip

    def ean(self) -> str:
        """A product barcode (EAN-13, German prefix 40-44) with its own check digit."""
        body = str(self.r.randint(40, 44)) + self.digits(10)
        check = (10 - sum(int(c) * (3 if i % 2 else 1) for i, c in enumerate(body)) % 10) % 10
        return body + str(check)

    def placeholder(self) -> str:
        return self.r.choice(["YOUR_API_KEY", "your-secret-key-here", "xxxxxxxxxxxxxxxx",
                              "changeme", "<token>", "${API_TOKEN}", "sk-...", "password123",
                              "abcdef123456", "********"])  # fmt: skip


PII_TEMPLATES = {
    "email": ["Please write to {v} if the {w} is late.", "From: {name} <{v}>",
              "You can reach {name} at {v} or in the office.", "Reply-To: {v}",
              "contact={v};role=admin", "Sent by {v} on {date}."],
    "phone": ["Call me on {v} after 6pm.", "Tel: {v}", "Our support line is {v} ({date}).",
              "Mobile {v}, office hours 9-17.", "If the {w} fails, phone {v} immediately.",
              "Fax: {v}"],
    "credit_card": ["Charge the card {v} for the renewal.", "Card number: {v}, expires 09/27.",
                    "Paid with {v} on {date}.", "cc={v}&cvv=123"],
    "iban": ["Please transfer the {w} fee to IBAN {v}.", "Beneficiary account: {v} (BIC DEUTDEFF)",
             "IBAN: {v}", "Refunds go to {v} within 14 days."],
    "ip": ["Connection from {v} refused at {time}.", "[{date} {time}] GET /index.html 200 {v}",
           "ssh admin@{v} -p 2222", "Failed login for {name} from {v}", "server_ip = {v}"],
    "secret": ["{v}", "# {w} settings\n{v}\nDEBUG=false", "Use this in the {w} script: {v}"],
}  # fmt: skip
DISTRACTOR_TEMPLATES = [
    "Upgrade to Python {version} before {date}.", "Released {version} on {date} at {time}.",
    "See ISBN {isbn}, page 42.", "Order no. {order} ships on {date}.",
    "Invoice #{order} is due {date}.", "The card {badcard} was declined (invalid number).",
    "IBAN {badiban} was rejected: wrong check digits.", "The {w} took {number} seconds.",
    "commit {hash}\nAuthor: {name}\nDate: {date}", "request id {uuid} completed in {number} ms",
    "Total: {number} for {number} items.", "Population {number} ({date}).",
    "Interface eth0 has MAC {mac}.", "OID 1.3.6.1.4.1.{digits} is registered.",
    "Build version 10.0.{digits}.{digits} is installed.", "Use icon@2x.png for retina screens.",
    "Decorate it with @dataclass and @property.", 'api_key = "{placeholder}"',
    'password = "{placeholder}"', "token = get_token({w})", "self.secret_key = settings.SECRET_KEY",
    "Kick-off at {time}, room 1204, ratio 16:9.", "Ports 8080-8090 and x[::2] slices.",
    "Tracking ID {digits}{digits} (ref {number}).", "The score was 21-17 in {date}.",
    "coordinates {number}, {number}", "max_tokens = 2048 and top_p = 0.95",
    "EAN {ean}, {number} in stock.", "Call 911 or 1-800-FLOWERS.", "| {date} | {digits}{digits} | {number} |",
    "User-Agent: Chrome/120.0.{digits}.109", "{number} users in {digits} cities",
]  # fmt: skip


def pii_set(n: int, seed: int) -> list[Piece]:
    """n texts: about half with one planted item (kinds in turn) among look-alikes, the
    rest look-alikes only."""
    g = Generator(seed)
    r = g.r
    texts = []
    for i in range(n):
        common = {"w": r.choice(WORDS), "name": f"{r.choice(FIRST).title()} {r.choice(LAST).title()}",
                  "date": g.date(), "time": g.time_(), "version": g.version(), "isbn": g.isbn(),
                  "order": g.order(), "badcard": g.card(valid=False), "badiban": g.iban(valid=False),
                  "number": g.number(), "hash": g.hex_hash(), "uuid": g.uuid(), "mac": g.mac(),
                  "digits": g.digits(r.randint(3, 5)), "placeholder": g.placeholder(),
                  "ean": g.ean()}  # fmt: skip
        parts = []
        if i % 2 == 0:
            kind = PII_KINDS[(i // 2) % len(PII_KINDS)]
            value = {"email": g.email, "phone": g.phone, "credit_card": g.card, "iban": g.iban,
                     "ip": lambda: g.ipv4() if r.random() < 0.7 else g.ipv6(),
                     "secret": g.secret}[kind]()  # fmt: skip
            if isinstance(value, str):
                value = Piece(value, [(0, len(value), kind)])
            parts.append(fill(r.choice(PII_TEMPLATES[kind]), {**common, "v": value}))
        for _ in range(r.randint(1, 2)):
            parts.append(fill(r.choice(DISTRACTOR_TEMPLATES), common))
        r.shuffle(parts)
        texts.append(fill(" ".join(f"{{p{k}}}" for k in range(len(parts))),
                          {f"p{k}": p for k, p in enumerate(parts)}))  # fmt: skip
    return texts


def score(texts: list[Piece], predict, kinds, overlap: bool = False) -> dict[str, Counter]:
    """tp/fp/fn per kind: a predicted span counts when it has a planted span's kind and
    exact boundaries (``overlap``: any overlap)."""
    out = {k: Counter() for k in kinds}
    for piece in texts:
        gold = [(s, e, k) for s, e, k in piece.spans if k in kinds]
        pred = [p for p in predict(piece.text) if p[2] in kinds]
        used = set()
        for s, e, k in pred:
            hit = next((j for j, (gs, ge, gk) in enumerate(gold) if j not in used and gk == k
                        and ((gs, ge) == (s, e) or (overlap and s < ge and gs < e))), None)  # fmt: skip
            if hit is None:
                out[k]["fp"] += 1
            else:
                used.add(hit)
                out[k]["tp"] += 1
        for j, (_, _, k) in enumerate(gold):
            if j not in used:
                out[k]["fn"] += 1
    return out


def pr(c: Counter) -> tuple[float, float]:
    p = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else float("nan")
    r = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else float("nan")
    return p, r


def ours(text: str) -> list[tuple[int, int, str]]:
    return [(s.start, s.end, s.kind) for s in find_pii(text)]


PRESIDIO_KINDS = {"EMAIL_ADDRESS": "email", "PHONE_NUMBER": "phone", "CREDIT_CARD": "credit_card",
                  "IBAN_CODE": "iban", "IP_ADDRESS": "ip"}  # fmt: skip


def presidio():
    """Presidio's pattern recognizers as a predict function, or None if not installed."""
    try:
        from presidio_analyzer.predefined_recognizers import (
            CreditCardRecognizer,
            EmailRecognizer,
            IbanRecognizer,
            IpRecognizer,
            PhoneRecognizer,
        )
    except ImportError:
        return None
    logging.getLogger("tldextract").setLevel(logging.CRITICAL)  # offline: its bundled list
    recognizers = [EmailRecognizer(), CreditCardRecognizer(), IbanRecognizer(), IpRecognizer(),
                   PhoneRecognizer(supported_regions=("US", "GB", "DE", "FR", "IN", "JP", "AU",
                                                      "ES"))]  # fmt: skip

    def predict(text: str) -> list[tuple[int, int, str]]:
        out = []
        for rec in recognizers:
            for res in rec.analyze(text, rec.supported_entities, None):
                if res.entity_type in PRESIDIO_KINDS:
                    out.append((res.start, res.end, PRESIDIO_KINDS[res.entity_type]))
        return out

    return predict


def run_pii(n: int, seed: int) -> None:
    texts = pii_set(n, seed)
    n_planted = sum(len(t.spans) for t in texts)
    print(f"\n(a) PII: {n} texts, {n_planted} planted items, the rest look-alikes (seed {seed})")
    t0 = time.perf_counter()
    exact = score(texts, ours, PII_KINDS)
    dt = time.perf_counter() - t0
    lenient = score(texts, ours, PII_KINDS, overlap=True)
    other = presidio()
    theirs = score(texts, other, tuple(PRESIDIO_KINDS.values()), overlap=True) if other else {}
    head = f"{'kind':12} {'planted':>7} {'P exact':>8} {'R exact':>8} {'P overlap':>9} {'R overlap':>9}"
    print(head + (f" {'Presidio P':>10} {'Presidio R':>10}" if other else ""))
    totals = [Counter(), Counter(), Counter()]
    for k in PII_KINDS:
        (p, r), (lp, lr) = pr(exact[k]), pr(lenient[k])
        row = f"{k:12} {exact[k]['tp'] + exact[k]['fn']:7d} {p:8.3f} {r:8.3f} {lp:9.3f} {lr:9.3f}"
        totals[0] += exact[k]
        totals[1] += lenient[k]
        if other:
            if k in theirs:
                tp, tr = pr(theirs[k])
                totals[2] += theirs[k]
                row += f" {tp:10.3f} {tr:10.3f}"
            else:
                row += f" {'(none)':>10} {'':>10}"
        print(row)
    (p, r), (lp, lr) = pr(totals[0]), pr(totals[1])
    row = f"{'all':12} {totals[0]['tp'] + totals[0]['fn']:7d} {p:8.3f} {r:8.3f} {lp:9.3f} {lr:9.3f}"
    if other:
        tp, tr = pr(totals[2])
        row += f" {tp:10.3f} {tr:10.3f}"
    print(row + ("  (Presidio: its 5 kinds)" if other else ""))
    chars = sum(len(t.text) for t in texts)
    print(f"find_pii speed: {chars / dt / 1e6:.2f} MB/s of text ({n / dt:,.0f} texts/s)")

    # real text holding no personal data: whatever fires there is a false positive
    from pydoc_data.topics import topics

    docs = "\n\n".join(topics[k] for k in sorted(topics))
    fired = Counter(k for _, _, k in ours(docs))
    line = f"the Python docs ({len(docs):,} characters, no personal data): ours fires {sum(fired.values())}"
    if other:
        theirs_fired = Counter(k for _, _, k in other(docs))
        line += f", Presidio {sum(theirs_fired.values())} ({dict(theirs_fired)})"
    print(line)


# --------------------------------------------------------------------------- (b) near dedup

WORD = re.compile(r"\w+")


def passages(r: random.Random, min_words: int = 50, max_words: int = 110) -> list[str]:
    """The Python docs (pydoc_data) cut into consecutive passages of 50-110 words."""
    from pydoc_data.topics import topics

    words = " ".join(topics[k] for k in sorted(topics)).split()
    out, i = [], 0
    while i + min_words <= len(words):
        n = r.randint(min_words, max_words)
        out.append(" ".join(words[i : i + n]))
        i += n
    return out


def edit(text: str, rate: float, vocab: list[str], r: random.Random) -> str:
    """Each word substituted, deleted or followed by an inserted word with probability
    ``rate`` (the three equally likely)."""
    out = []
    for w in text.split(" "):
        if r.random() >= rate:
            out.append(w)
            continue
        op = r.randrange(3)
        if op == 0:  # substitute
            out.append(r.choice(vocab))
        elif op == 1:  # insert after
            out += [w, r.choice(vocab)]
        # op == 2: delete
    return " ".join(out)


def shingles(text: str, n: int = 5) -> list[str]:
    words = WORD.findall(text.lower())
    if len(words) < n:
        return [" ".join(words)] if words else []
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]


def exact_jaccard(texts: list[str]) -> np.ndarray:
    """(N, N) Jaccard similarity of the word-5-gram sets, through a sparse incidence matrix."""
    from scipy import sparse

    ids: dict[str, int] = {}
    rows, cols = [], []
    for i, t in enumerate(texts):
        for s in set(shingles(t)):
            rows.append(i)
            cols.append(ids.setdefault(s, len(ids)))
    x = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(texts), len(ids)))
    inter = (x @ x.T).toarray()
    size = np.asarray(x.sum(axis=1)).ravel()
    union = size[:, None] + size[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def greedy_truth(jac: np.ndarray, threshold: float) -> set[int]:
    """The documents the streaming rule drops under exact similarity."""
    kept, dropped = [], set()
    for i in range(len(jac)):
        if kept and jac[i, kept].max() >= threshold:
            dropped.add(i)
        else:
            kept.append(i)
    return dropped


def f1(pred: set[int], truth: set[int]) -> tuple[float, float, float]:
    tp = len(pred & truth)
    p = tp / len(pred) if pred else 1.0
    r = tp / len(truth) if truth else 1.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def datasketch_dedup(texts: list[str], threshold: float, num_perm: int, verify: bool) -> set[int]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    kept: dict[str, MinHash] = {}
    dropped = set()
    for i, t in enumerate(texts):
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch([s.encode("utf-8") for s in shingles(t)])
        cands = lsh.query(m)
        if verify:
            cands = [c for c in cands if m.jaccard(kept[c]) >= threshold]
        if cands:
            dropped.add(i)
        else:
            lsh.insert(str(i), m)
            kept[str(i)] = m
    return dropped


RATES = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.3)
N_ORIGINALS = 560


def run_dedup(threshold: float, num_perm: int, seed: int) -> None:
    r = random.Random(seed)
    paras = passages(r)
    r.shuffle(paras)
    originals, unrelated = paras[:N_ORIGINALS], paras[N_ORIGINALS:]
    vocab = sorted({w for p in paras for w in p.split()})
    # (text, original's number, edit rate): originals (k, None), copies (k, rate), others
    docs = [(p, k, None) for k, p in enumerate(originals)]
    docs += [(p, None, None) for p in unrelated]
    docs += [(edit(p, RATES[k % len(RATES)], vocab, r), k, RATES[k % len(RATES)])
             for k, p in enumerate(originals)]  # fmt: skip
    r.shuffle(docs)
    texts = [d[0] for d in docs]
    words = sum(len(t.split()) for t in texts)
    bands, rows = lsh_params(threshold, num_perm)
    print(f"\n(b) near duplicates: {len(texts)} documents ({words / len(texts):.0f} words on "
          f"average): {N_ORIGINALS} passages of the Python docs, one edited copy of each (rates "
          f"{', '.join(f'{x:.1%}' for x in RATES)}), {len(unrelated)} unrelated; word 5-grams, threshold "
          f"{threshold}, num_perm {num_perm} ({bands} bands x {rows} rows)")  # fmt: skip
    jac = exact_jaccard(texts)
    truth = greedy_truth(jac, threshold)
    print(f"truth (streaming rule, exact Jaccard): {len(truth)} documents to drop")

    results = {}
    ours_b, ours_r = lsh_params(threshold, num_perm, *VERIFIED_WEIGHTS)
    for name, br in [(f"aigc MinHash-LSH ({ours_b}x{ours_r}, verified)", (None, None)),
                     (f"aigc, datasketch's banding ({bands}x{rows}, verified)", (bands, rows))]:  # fmt: skip
        t0 = time.perf_counter()
        res = deduplicate(texts, mode="near", threshold=threshold, num_perm=num_perm,
                          bands=br[0], rows=br[1])  # fmt: skip
        results[name] = ({p.dropped for p in res.pairs}, time.perf_counter() - t0)
    try:
        import datasketch

        for verify in (False, True):
            t0 = time.perf_counter()
            dropped = datasketch_dedup(texts, threshold, num_perm, verify)
            name = f"datasketch {datasketch.__version__} ({bands}x{rows})" + (
                ", verified by its estimate" if verify else ", candidates"
            )
            results[name] = (dropped, time.perf_counter() - t0)
    except ImportError:
        print("datasketch is not installed (pip install -e '.[bench]'): no comparison")

    print(f"{'method':48} {'P':>6} {'R':>6} {'F1':>6} {'docs/s':>8}")
    for name, (dropped, dt) in results.items():
        p, rc, f = f1(dropped, truth)
        print(f"{name:48} {p:6.3f} {rc:6.3f} {f:6.3f} {len(texts) / dt:8,.0f}")

    # per edit rate: the copy's true similarity to its original and how often it was dropped
    where = {k: i for i, (_, k, rate) in enumerate(docs) if k is not None and rate is None}
    print("share of the copies that come after their original dropped, per edit rate:")
    cols = " ".join(f"{k + 1:>6}" for k in range(len(results)))
    print(f"{'edit rate':>9} {'mean J':>7}  {cols}   (methods in the order above)")
    for rate in RATES:
        pairs = [(i, where[k]) for i, (_, k, rt) in enumerate(docs) if rt == rate]
        mean_j = float(np.mean([jac[i, o] for i, o in pairs]))
        later = [i for i, o in pairs if i > o]
        shares = [sum(i in dropped for i in later) / max(len(later), 1)
                  for dropped, _ in results.values()]  # fmt: skip
        print(f"{rate:9.1%} {mean_j:7.3f}  " + " ".join(f"{x:6.2f}" for x in shares))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-pii", type=int, default=3000)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"machine: {cpu_model()}")
    run_pii(args.n_pii, args.seed)
    run_dedup(args.threshold, args.num_perm, args.seed)


if __name__ == "__main__":
    main()
