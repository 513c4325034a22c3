"""The provider's create-request rules, called directly (tests/test_sandbox.py covers the wire)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from invoice_worker.sandbox.rules import (
    foreign_id_of,
    parse_body,
    parse_number,
    sender_amount,
    validate,
)

VALID = {
    "timer": "1",
    "title": "Order 42",
    "foreign_id": 42,
    "currency": "BTC",
    "amount": Decimal("0.1"),
    "url_success": "https://shop.example.com/paid",
    "url_failed": "https://shop.example.com/failed",
    "email_user": "buyer@example.com",
}


def test_validate_returns_clean_values() -> None:
    errors, clean = validate(VALID, Decimal(0))
    assert errors == {}
    assert (clean["timer"], clean["foreign_id"], clean["amount"]) == (True, "42", Decimal("0.1"))
    assert str(clean["amount"]) == "0.10000000"


def test_validate_reports_failing_fields_with_the_providers_wording() -> None:
    errors, clean = validate({**VALID, "timer": "yes", "amount": None}, Decimal(0))
    assert errors == {
        "timer": "The timer field must be true or false.",
        "amount": "The amount field is required.",
    }
    assert clean["timer"] is None
    assert "amount" not in clean


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"amount": 0.1}', {"amount": Decimal("0.1")}),
        (b"{}", {}),
        (b"[]", None),
        (b"{", None),
        (b'{"amount": NaN}', None),
        (b"\xff", None),
    ],
)
def test_parse_body(body: bytes, expected: dict[str, Decimal] | None) -> None:
    assert parse_body(body) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("12345678.12345678", Decimal("12345678.12345678")),
        ("1e-8", Decimal("1e-8")),
        (7, Decimal(7)),
        (Decimal("0.5"), Decimal("0.5")),
        ("ten", None),
        ("", None),
        (True, None),
        (0.5, None),
    ],
)
def test_parse_number(value: object, expected: Decimal | None) -> None:
    assert parse_number(value) == expected


def test_foreign_id_of_accepts_strings_and_integers_only() -> None:
    assert [foreign_id_of(v) for v in ("a", 123, True, 1.5, None)] == ["a", "123", None, None, None]


def test_sender_amount_converts_at_eur_prices_to_8_places() -> None:
    assert sender_amount(Decimal("0.01"), "BTC", "USDT") > Decimal("0.01")
    assert sender_amount(Decimal("1"), "BTC", "BTC") == Decimal("1.00000000")
    assert sender_amount(Decimal("3"), "XYZ", "EUR") == Decimal("3.00000000")  # unknown: 1 EUR
