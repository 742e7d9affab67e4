"""Personal data and secrets (aigc.data.privacy): checksums against hand computations,
every kind found, look-alikes left alone, typed placeholders, streaming = whole text."""

from __future__ import annotations

import itertools
import random

import pytest

from aigc.data.privacy import (
    PII_KINDS,
    PiiScrubber,
    PiiSpan,
    card_issuer,
    find_pii,
    iban_check_digits,
    iban_mod97,
    iban_valid,
    looks_random,
    luhn_valid,
    redact,
    shannon_entropy,
)

# --------------------------------------------------------------------------- checksums


def test_luhn_against_a_hand_computation():
    # 7992739871 with check digit 3 (the textbook example). From the right, every second
    # digit doubled, minus 9 when above 9:
    #   3, 1->2, 7, 8->16->7, 9, 3->6, 7, 2->4, 9, 9->18->9, 7
    #   3 + 2 + 7 + 7 + 9 + 6 + 7 + 4 + 9 + 9 + 7 = 70, a multiple of 10
    digits = "79927398713"
    assert luhn_valid(digits)
    for wrong in "012456789":  # any other check digit
        assert not luhn_valid(digits[:-1] + wrong)
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert not luhn_valid("4111 1111") and not luhn_valid("")


def test_card_issuers_by_prefix_and_length():
    assert card_issuer("4111111111111111") == "visa"
    assert card_issuer("5555555555554444") == "mastercard"
    assert card_issuer("2221000000000009") == "mastercard"
    assert card_issuer("378282246310005") == "amex"
    assert card_issuer("6011111111111117") == "discover"
    assert card_issuer("3530111333300000") == "jcb"
    assert card_issuer("37828224631000") is None  # amex prefix, 14 digits
    assert card_issuer("9111111111111111") is None


def test_iban_checksum_against_a_hand_computation():
    # GB82 WEST 1234 5698 7654 32: move "GB82" to the end, W=32 E=14 S=28 T=29 G=16 B=11
    rearranged = "32142829" + "12345698765432" + "1611" + "82"
    assert int(rearranged) % 97 == 1
    assert iban_mod97("GB82WEST12345698765432") == 1
    assert iban_valid("GB82 WEST 1234 5698 7654 32")
    assert iban_valid("DE89 3704 0044 0532 0130 00")
    assert iban_check_digits("GB", "WEST12345698765432") == "82"
    assert iban_check_digits("DE", "370400440532013000") == "89"
    assert not iban_valid("GB83 WEST 1234 5698 7654 32")  # check digits off by one
    assert not iban_valid("DE89 3704 0044 0532 0130 0")  # a German IBAN has 22 characters
    assert not iban_valid("XX82WEST12345698765432")  # no such country


def test_entropy_and_randomness():
    assert shannon_entropy("aaaa") == 0.0
    assert shannon_entropy("abcd") == pytest.approx(2.0)
    assert looks_random("9f8e7d6c5b4a39281706f5e4d3c2b1a0")
    assert looks_random("Tr0ub4dor&3xQ")
    for human in ("password123", "changeme", "YOUR_API_KEY", "xxxxxxxxxxxxxxxx", "get_token_value",
                  "aaaaaaaaaaaa1", "${API_KEY}"):  # fmt: skip
        assert not looks_random(human), human


# --------------------------------------------------------------------------- detection

FOUND = [
    ("email", "Write to jane.doe+news@example.co.uk today.", "jane.doe+news@example.co.uk"),
    ("email", "From: Ann <Ann_Lee77@mail.uni-bonn.de>", "Ann_Lee77@mail.uni-bonn.de"),
    ("phone", "Call +1 (415) 555-2671 now", "+1 (415) 555-2671"),
    ("phone", "Office: 415-555-2671.", "415-555-2671"),
    ("phone", "Tel. +44 20 7946 0958", "+44 20 7946 0958"),
    ("phone", "London 020 7946 0958", "020 7946 0958"),
    ("phone", "Portable: 06 12 34 56 78", "06 12 34 56 78"),
    ("phone", "Berlin +49 (0)30 1234567", "+49 (0)30 1234567"),
    ("phone", "call me on 4155552671 tonight", "4155552671"),
    ("credit_card", "Card 4111 1111 1111 1111 expires soon", "4111 1111 1111 1111"),
    ("credit_card", "amex 3782-822463-10005.", "3782-822463-10005"),
    ("credit_card", "pan=5555555555554444&x=1", "5555555555554444"),
    ("iban", "IBAN DE89 3704 0044 0532 0130 00 (EUR)", "DE89 3704 0044 0532 0130 00"),
    ("iban", "to GB82WEST12345698765432.", "GB82WEST12345698765432"),
    ("ip", "from 192.168.1.10 port 22", "192.168.1.10"),
    ("ip", "GET http://10.0.0.255/admin", "10.0.0.255"),
    ("ip", "host 2001:db8::8a2e:370:7334 is up", "2001:db8::8a2e:370:7334"),
    ("ip", "mapped ::ffff:192.0.2.1 here", "::ffff:192.0.2.1"),
    ("secret", "aws_access_key_id = AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
    ("secret", "export GITHUB_TOKEN=ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",
     "ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"),
    ("secret", "token: xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
     "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"),
    ("secret", 'OpenAI(api_key="sk-proj-abcDEF123456ghiJKL789012mnoPQR")',
     "sk-proj-abcDEF123456ghiJKL789012mnoPQR"),
    ("secret", 'api_key = "9f8e7d6c5b4a39281706f5e4d3c2b1a0"', "9f8e7d6c5b4a39281706f5e4d3c2b1a0"),
    ("secret", '{"client_secret": "q8X2vLm9Rt4Zp1Wc7Yh3Nk6B"}', "q8X2vLm9Rt4Zp1Wc7Yh3Nk6B"),
    ("secret", "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
     "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"),
]  # fmt: skip

PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM9Oi\n"
    "q8X2vLm9Rt4Zp1Wc7Yh3Nk6B+/==\n-----END RSA PRIVATE KEY-----"
)


@pytest.mark.parametrize(("kind", "text", "expected"), FOUND)
def test_each_kind_is_found_with_its_boundaries(kind, text, expected):
    spans = find_pii(text)
    assert [(s.kind, s.text) for s in spans] == [(kind, expected)]
    s = spans[0]
    assert text[s.start : s.end] == expected


def test_a_private_key_block_is_one_secret():
    text = f"config:\n{PEM}\nafter the key"
    (span,) = find_pii(text)
    assert span.kind == "secret" and span.text == PEM
    assert redact(text) == "config:\n[SECRET]\nafter the key"


IGNORED = [
    "Upgrade to Python 3.11.2 or v2.4.1 today.",
    "Build version 1.2.3.4 and OID 1.3.6.1.4.1.311 are not addresses.",
    "User-Agent: Chrome/120.0.6099.109 and Chrome/120.0.244.109",
    "Released on 2024-03-15, 15.03.2024 and 03/15/2024 at 12:30:45.",
    "See ISBN 978-3-16-148410-0 and ISBN 0-306-40615-2.",
    "Order no. 583-229-1047 ships tomorrow; invoice #4829 1834 2201 9917.",
    "The card 4111 1111 1111 1112 was declined.",  # fails Luhn
    "IBAN DE88 3704 0044 0532 0130 00 was rejected.",  # wrong check digits
    "IBAN NL37 IQNT 0793 6166 01 was rejected.",  # a phone-shaped tail inside a bad IBAN
    "pi is 3.14159, e is 2.718281828 and 0.000123 is small; 1e-5 too.",
    "commit 3fe889f2a1b4c5d6e7f8091a2b3c4d5e6f708192\nAuthor: A <no-reply>",
    "request id 123e4567-e89b-12d3-a456-426614174000 took 12 ms",
    "Total: $1,234,567.89 for 8,336,817 people.",
    "MAC 00:1A:2B:3C:4D:5E, time 10:20:30, slice x[::2], C++ std::vector",
    "Use icon@2x.png; decorate with @dataclass; mail user@localhost",
    'api_key = "YOUR_API_KEY"; password = "password123"; token = get_token()',
    "self.secret_key = settings.SECRET_KEY; max_tokens = 2048",
    "EAN 4006381333931 and the number 1234567890 without context",
    "Call 911 or 1-800-FLOWERS; the score was 21-17; ports 8080-8090.",
    "printing fields in the form +000000120 (sign-aware padding)",
]


@pytest.mark.parametrize("text", IGNORED)
def test_look_alikes_are_left_alone(text):
    assert find_pii(text) == []


def test_spans_are_sorted_and_do_not_overlap_and_kinds_filter():
    text = " and ".join(t for _, t, _ in FOUND) + "\n" + PEM
    spans = find_pii(text)
    assert len(spans) == len(FOUND) + 1
    assert all(a.end <= b.start for a, b in itertools.pairwise(spans))
    assert {s.kind for s in spans} == set(PII_KINDS)
    only = find_pii(text, kinds=["email", "ip"])
    assert {s.kind for s in only} == {"email", "ip"}
    assert only == [s for s in spans if s.kind in ("email", "ip")]
    with pytest.raises(ValueError, match="unknown PII kind"):
        find_pii(text, kinds=["ssn"])


def test_redact_puts_typed_placeholders():
    text = "Mail a.b@example.com, call +44 20 7946 0958, card 4111-1111-1111-1111, " \
           "IBAN GB82WEST12345698765432, host 10.1.2.3, key AKIAIOSFODNN7EXAMPLE."  # fmt: skip
    assert redact(text) == ("Mail [EMAIL], call [PHONE], card [CREDIT_CARD], IBAN [IBAN], "
                            "host [IP], key [SECRET].")  # fmt: skip
    spans = find_pii(text)
    assert redact(text, spans[:1]) == text.replace("a.b@example.com", "[EMAIL]")
    assert redact(text, []) == text
    with pytest.raises(ValueError, match="overlaps"):
        redact("abcdef", [PiiSpan("email", 0, 4, "abcd"), PiiSpan("ip", 2, 5, "cde")])


def test_the_scrubber_over_chunks_equals_the_whole_text():
    rng = random.Random(0)
    lines = [t for _, t, _ in FOUND] + IGNORED + [PEM, "plain words " * 20]
    text = "\n".join(rng.choice(lines) for _ in range(200))
    whole = find_pii(text)
    for trial in range(5):
        scrubber = PiiScrubber()
        out, pos = [], 0
        while pos < len(text):
            n = rng.choice([1, 7, 50, 400, 3000]) if trial else len(text)
            out.append(scrubber.feed(text[pos : pos + n]))
            pos += n
        out.append(scrubber.flush())
        assert "".join(out) == redact(text, whole)
        assert sum(scrubber.counts.values()) == len(whole)
