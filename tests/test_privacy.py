"""Every masking and redaction rule (invoice_worker.privacy), including hostile inputs."""

from __future__ import annotations

import pytest

from invoice_worker import privacy
from invoice_worker.privacy import (
    MASK,
    REPR_LIMIT,
    TEXT_LIMIT,
    contains_email,
    escape_controls,
    kwargs_repr,
    mask_emails,
    masked,
    redact,
    redact_url,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a@b.co", "***"),
        ("mail jane.doe@example.com now", "mail *** now"),
        ("<jane@example.com>", "<***>"),
        ("(jane@example.com)", "(***)"),
        ("to jane@example.com.", "to ***."),  # the sentence's full stop is not the domain's
        ("jane@example.com...", "***..."),
        ("jane@example.com-", "***-"),
        ("a+tag@sub.example.co.uk", "***"),
        ("JANE.DOE@EXAMPLE.COM", "***"),
        ("jöhn@exämple.de", "***"),  # internationalised addresses
        ("o'brien@example.ie", "***"),
        ("a@b.com,c@d.org", "***,***"),
        ("a@b.com c@d.org a@b.com", "*** *** ***"),
        ("mailto:jane@example.com?subject=x", "mailto:***?subject=x"),
        ('{"email_user":"jane@example.com"}', '{"email_user":"***"}'),
        ("jane@example.com\njohn@example.com", "***\n***"),
        ("x@y.z@", "***@"),
    ],
)
def test_mask_emails(text: str, expected: str) -> None:
    assert mask_emails(text) == expected
    assert contains_email(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no address here",
        "@example.com",  # no local part
        "jane@",  # no domain
        "jane@.com",  # the domain starts with a dot
        "jane@-example.com",
        "jane@example.",  # no dot inside the domain
        "price @ 5.00",
        "@@@",
        "foreign_id order-42",
    ],
)
def test_text_without_an_address_is_unchanged(text: str) -> None:
    assert mask_emails(text) == text
    assert not contains_email(text)


@pytest.mark.timeout(15)
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a" * 10**6, "a" * 10**6),
        ("@" * 10**6, "@" * 10**6),
        ("a@" * 10**5, "a@" * 10**5),  # no dot: nothing to mask
        ("a.b@c" * 10**5, "***@" * 50_000 + "c"),  # "a.b@ca.b" is masked, then "@c" left
        (("a" * 1000 + "@") * 1000, ("a" * 1000 + "@") * 1000),
        ("a@" + "b." * 500_000, "***."),
        ("." * 10**6 + "@", "." * 10**6 + "@"),
    ],
    ids=["a", "at", "a-at", "a.b@c", "long-locals", "long-domain", "dots"],
)
def test_pathological_inputs_take_linear_time(text: str, expected: str) -> None:
    # A backtracking pattern would take hours on these; the per-test timeout is the check.
    assert mask_emails(text) == expected
    assert contains_email(text) is (text != expected)


def test_escape_controls_c0_del_c1_and_unicode_line_breaks() -> None:
    controls = [*map(chr, range(0x20)), "\x7f", *map(chr, range(0x80, 0xA0)), "\u2028", "\u2029"]
    for ch in controls:
        escaped = escape_controls(f"a{ch}b")
        assert ch not in escaped
        assert (
            escaped == "a" + (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}") + "b"
        )
    assert escape_controls("line\r\nFORGED") == "line\\x0d\\x0aFORGED"
    assert escape_controls("\x1b[31mred") == "\\x1b[31mred"


def test_escape_controls_agrees_with_the_table_on_every_code_point() -> None:
    # The fast path (printable text returned as is) must never skip a character the table
    # escapes: checked on all of Unicode, alone and inside text.
    for cp in range(0x110000):
        ch = chr(cp)
        assert escape_controls(ch) == ch.translate(privacy._CONTROLS), hex(cp)
        assert escape_controls(f"ok {ch}") == f"ok {ch}".translate(privacy._CONTROLS), hex(cp)


def test_escape_controls_keeps_printable_text() -> None:
    text = "Ordre n° 42 — café, 東京, \xa0non-breaking space, tab-free"
    assert escape_controls(text) == text
    assert "".join(escape_controls(chr(cp)) for cp in range(0x20, 0x7F)) == "".join(
        map(chr, range(0x20, 0x7F))
    )


def test_redact_bounds_then_masks_and_escapes() -> None:
    assert redact("short jane@example.com\n") == "short ***\\x0a"
    long = "x" * 1000
    assert redact(long) == "x" * (TEXT_LIMIT - 3) + "..."
    assert redact(long, 10) == "xxxxxxx..."
    assert redact("x" * TEXT_LIMIT) == "x" * TEXT_LIMIT  # at the limit: kept whole
    # Escapes come after the bound: each control character shows as 4 characters.
    assert redact("\n" * 1000) == "\\x0a" * (TEXT_LIMIT - 3) + "..."


@pytest.mark.parametrize("offset", range(TEXT_LIMIT - 30, TEXT_LIMIT + 5))
def test_redact_never_shows_part_of_an_address_it_cuts(offset: int) -> None:
    text = "x" * offset + " jane.doe@example.com and more text after it"
    result = redact(text)
    assert len(result) <= TEXT_LIMIT
    for part in ("jane", "doe@", "@example", "example.com"):
        assert part not in result


def test_redact_masks_addresses_of_a_1_mb_text() -> None:
    result = redact("jane.doe@example.com, " * 50_000)
    assert result.startswith("***, ***, ")
    assert "@" not in result
    assert result.endswith("...")


def test_masked_at_any_depth() -> None:
    value = {
        "email_user": "jane@example.com",
        "request": {"email_user": "jane@example.com", "title": "t"},
        "batch": [{"email_user": "a@b.co"}, ({"inner": {"email_user": "c@d.co"}},)],
        "count": 3,
    }
    assert masked(value) == {
        "email_user": MASK,
        "request": {"email_user": MASK, "title": "t"},
        "batch": [{"email_user": MASK}, [{"inner": {"email_user": MASK}}]],
        "count": 3,
    }
    assert value["request"] == {"email_user": "jane@example.com", "title": "t"}  # not mutated
    assert masked("jane@example.com") == "jane@example.com"  # a field rule, not a text rule
    assert masked(None) is None


def test_kwargs_repr_masked_bounded_one_line() -> None:
    kwargs = {
        "request": {
            "email_user": "jane@example.com",
            "description": "call john@example.com\nFORGED LINE\u2028again",
            "title": "x" * 5000,
        },
        "deadline": None,
    }
    text = kwargs_repr(kwargs)
    assert "jane@" not in text
    assert "john@" not in text
    assert "\n" not in text
    assert "\u2028" not in text
    assert len(text) == REPR_LIMIT
    assert text.startswith("{'request': {'email_user': '***', ")
    assert text.endswith("...")
    assert kwargs_repr({"deadline": 1.5}) == "{'deadline': 1.5}"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:secret@redis.example.com:6379/0", "redis://:***@redis.example.com:6379/0"),
        (
            "rediss://user:secret@host/1?ssl_cert_reqs=none",
            "rediss://user:***@host/1?ssl_cert_reqs=none",
        ),
        ("redis://user:p@ss@host:6379", "redis://user:***@host:6379"),  # "@" in the password
        ("amqp://guest:guest@rabbit:5672//", "amqp://guest:***@rabbit:5672//"),
        ("redis://user:@host", "redis://user:***@host"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://user@host", "redis://user@host"),
        ("https://api.example.com/api/v2", "https://api.example.com/api/v2"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected
