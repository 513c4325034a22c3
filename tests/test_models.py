from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from invoice_worker.errors import InvalidRequestError
from invoice_worker.models import (
    JSON_AMOUNT_LIMIT,
    Invoice,
    InvoiceRequest,
    json_amount,
    parse_request,
)
from tests.conftest import request_data


def errors_of(**overrides: Any) -> dict[str, str]:
    with pytest.raises(InvalidRequestError) as info:
        parse_request(request_data(**overrides))
    return info.value.errors


def test_valid_request_round_trips() -> None:
    request = parse_request(request_data(type="good_until_expired", sender_currency="USDT"))
    assert request.type == "good_until_expired"
    assert request.amount == Decimal("0.0123")


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("type", "partial", "Input should be 'fill_or_kill' or 'good_until_expired'"),
        ("timer", "yes", "Input should be a valid boolean"),
        ("timer", None, "Input should be a valid boolean"),
        ("title", "", "at least 1 character"),
        ("title", "x" * 51, "at most 50 characters"),
        ("description", "x" * 1001, "at most 1000 characters"),
        ("foreign_id", "", "at least 1 character"),
        ("foreign_id", "x" * 256, "at most 255 characters"),
        ("foreign_id", "order-jane.doe@example.com", "personal data"),
        ("foreign_id", " order-1", "surrounding spaces"),
        # A pattern's "$" also matches before a final newline: the rules use fullmatch.
        ("foreign_id", "order-1\n", "without control characters"),
        ("currency", "btc", "upper-case ticker"),
        ("currency", "BITCOINCASH1", "upper-case ticker"),
        ("currency", "BTC\n", "upper-case ticker"),
        ("sender_currency", "usd", "upper-case ticker"),
        ("sender_currency", "EUR\n", "upper-case ticker"),
        ("amount", 0.1, "not a float"),
        ("amount", True, "not a boolean"),
        ("amount", "0", "greater than 0"),
        ("amount", "-1", "greater than 0"),
        ("amount", "abc", "decimal number"),
        ("amount", "NaN", "finite number"),
        ("amount", "0.000000001", "at most 8 decimal places"),
        # Changed in the restructure: amounts are bounded below 10^22 before any arithmetic, so
        # 31 integer digits now break that rule (the 30-digit rule can no longer be reached).
        ("amount", "1" * 31, "must be below 10^22"),
        ("url_success", "http://shop.example.com/ok", "https scheme"),
        ("url_success", "https://203.0.113.7/ok", "not an IP address"),
        ("url_success", "https://[2001:db8::1]/ok", "not an IP address"),
        ("url_failed", "https://localhost/failed", "not localhost"),
        ("url_failed", "https://intranet/failed", "not localhost"),
        ("url_failed", "https://user:pw@shop.example.com/failed", "credentials"),
        ("url_failed", "https://shop..example.com/", "valid domain name"),
        ("url_failed", "https://shop.example.com:99999/", "valid port"),
        ("url_failed", "https://shop.example.com/fai\nled", "control characters"),
        ("url_success", "https://shop.example.com/a b", "spaces"),
        ("email_user", "not-an-address", "valid e-mail address"),
        ("email_user", "a@b", "valid e-mail address"),
        ("email_user", "jane@example.com\n", "valid e-mail address"),
        ("unexpected", 1, "is not a field"),
    ],
)
def test_each_rule_names_field_and_rule(field: str, value: Any, rule: str) -> None:
    errors = errors_of(**{field: value})
    assert rule in errors[field], errors


@pytest.mark.parametrize("field", ["timer", "title", "foreign_id", "currency", "amount",
                                   "url_success", "url_failed", "email_user"])  # fmt: skip
def test_required_fields(field: str) -> None:
    data = request_data()
    del data[field]
    with pytest.raises(InvalidRequestError) as info:
        parse_request(data)
    assert info.value.errors == {field: "Field required"}


def test_all_bad_fields_reported_at_once_without_values() -> None:
    errors = errors_of(title="", currency="btc", email_user="secret-person")
    assert set(errors) == {"title", "currency", "email_user"}
    assert "secret-person" not in json.dumps(errors)


def test_not_a_mapping() -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_request(["not", "a", "dict"])  # type: ignore[arg-type]
    assert info.value.errors == {"request": "must be a JSON object"}


def test_body_is_compact_and_amount_exact() -> None:
    request = parse_request(request_data(amount="0.1", foreign_id="o-1"))
    body = request.to_body()
    assert b'"amount":0.1,' in body
    assert b" " not in body.replace(b"Order #1", b"").replace(b"Two coffees", b"")
    assert json.loads(body, parse_float=Decimal)["amount"] == Decimal("0.1")


def test_amount_from_int_and_big_decimal_never_uses_exponent() -> None:
    assert b'"amount":100,' in parse_request(request_data(amount=100)).to_body()
    big = parse_request(request_data(amount=Decimal("1E+3"))).to_body()
    assert b'"amount":1000,' in big


def test_float_sum_cannot_reach_the_wire() -> None:
    with pytest.raises(InvalidRequestError):
        parse_request(request_data(amount=0.1 + 0.2))
    body = parse_request(request_data(amount=str(Decimal("0.1") + Decimal("0.2")))).to_body()
    assert b"0.30000000000000004" not in body
    assert b'"amount":0.3,' in body


def test_email_not_in_repr() -> None:
    request = parse_request(request_data(email_user="jane@example.com"))
    assert "jane@example.com" not in repr(request)
    assert "jane@example.com" not in str(request)


def test_fingerprint_stable_and_sensitive() -> None:
    data = request_data()
    assert parse_request(data).fingerprint() == parse_request(dict(data)).fingerprint()
    assert parse_request(data).fingerprint() != parse_request({**data, "amount": "1"}).fingerprint()
    same = parse_request({**data, "amount": "0.10"}).fingerprint()
    assert same == parse_request({**data, "amount": "0.1"}).fingerprint()


def test_with_foreign_id_keeps_the_rest() -> None:
    request = parse_request(request_data())
    other = request.with_foreign_id("x~r1")
    assert other.foreign_id == "x~r1"
    assert other.model_dump(exclude={"foreign_id"}) == request.model_dump(exclude={"foreign_id"})


def test_invoice_parses_current_shape() -> None:
    invoice = Invoice.model_validate(
        {
            "id": 123732,
            "url": "https://invoices.example.com/invoice/6rKzdo",
            "foreign_id": "test_foreign_id",
            "address": "2N2xtaZCNygY3iq6XKPJsdoPMDX85LUc8SM",
            "title": "test title",
            "status": "pending",
            "currency": "BTC",
            "amount": "0.01230000",
            "sender_currency": "BTC",
            "sender_amount": "0.01230000",
            "fixed_at": 1667895345,
            "release_at": 1667896245,
            "seconds_left": 899,
        }
    )
    assert invoice.amount == Decimal("0.0123")
    assert invoice.release_at == 1667896245


def test_invoice_tolerates_older_shape() -> None:
    invoice = Invoice.model_validate(
        {"id": 1, "url": "https://i.example.com/x", "foreign_id": 42, "name": "old title",
         "status": "created", "currency": "BTC", "amount": "1.00000000", "extra": "ignored"}
    )  # fmt: skip
    assert invoice.foreign_id == "42"
    assert invoice.title == "old title"


def test_invoice_requires_url() -> None:
    with pytest.raises(ValueError, match="url"):
        Invoice.model_validate(
            {"id": 1, "foreign_id": "a", "status": "created", "currency": "BTC", "amount": "1"}
        )


def test_request_is_frozen() -> None:
    request = parse_request(request_data())
    with pytest.raises(ValueError, match="frozen"):
        request.title = "changed"  # type: ignore[misc]
    assert request.title == "Order #1"


# Property-based: any input either validates or raises the documented error, never another.
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text()
    | st.decimals(allow_nan=True),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=5,
)
FIELDS = list(InvoiceRequest.model_fields)


@given(st.dictionaries(st.sampled_from([*FIELDS, "junk"]), JSON_VALUES))
@settings(max_examples=300, deadline=None)
def test_arbitrary_input_validates_or_raises_invalid_request(data: dict[str, Any]) -> None:
    try:
        request = parse_request(data)
    except InvalidRequestError as exc:
        assert exc.errors
        assert all(isinstance(k, str) and isinstance(v, str) and v for k, v in exc.errors.items())
    else:
        json.loads(request.to_body())


@given(st.sampled_from(FIELDS), JSON_VALUES | st.text(min_size=200, max_size=5000))
@settings(max_examples=300, deadline=None)
def test_one_mutated_field_is_named_or_accepted(field: str, value: Any) -> None:
    data = {**request_data(), field: value}
    try:
        request = parse_request(data)
    except InvalidRequestError as exc:
        assert set(exc.errors) == {field}
    else:
        body = json.loads(request.to_body(), parse_float=Decimal)
        assert Decimal(str(body["amount"])) == request.amount


# JSON numbers: only the worker's decoding of a broker message reads them (models.json_amount).
EIGHT_PLACES = st.builds(
    lambda units, places: Decimal(units).scaleb(-places),
    st.integers(1, 10**15 - 1),
    st.integers(0, 8),
).filter(lambda d: d < JSON_AMOUNT_LIMIT)


@given(EIGHT_PLACES)
@settings(max_examples=2000, deadline=None)
def test_every_decimal_of_at_most_8_places_survives_a_json_number(value: Decimal) -> None:
    # As a JavaScript or PHP producer sends it: a double, printed shortest by the encoder.
    sent = json.loads(json.dumps({"amount": float(value)}))["amount"]
    assert Decimal(json_amount(sent)) == value


@given(st.floats(allow_nan=True, allow_infinity=True))
@settings(max_examples=2000, deadline=None)
def test_a_json_number_is_read_as_its_shortest_form_or_refused(value: float) -> None:
    try:
        text = json_amount(value)
    except ValueError as exc:
        assert str(exc)
    else:
        exponent = Decimal(text).as_tuple().exponent
        assert isinstance(exponent, int)
        assert exponent >= -8
        assert float(text) == value
        assert abs(value) < JSON_AMOUNT_LIMIT


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        (0.1 + 0.2, "at most 8 places in its shortest form"),
        (1e-9, "at most 8 places in its shortest form"),
        (0.123456789, "at most 8 places in its shortest form"),
        (float("nan"), "must be a finite number"),
        (float("inf"), "must be a finite number"),
        (1e21, "must be below 10,000,000"),
        (12_345_678.5, "must be below 10,000,000"),
    ],
)
def test_json_number_refusals_name_the_rule(value: float, rule: str) -> None:
    with pytest.raises(ValueError, match=rule):
        json_amount(value)


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.1, "0.1"), (1e-8, "1e-08"), (100.0, "100.0"), (9_999_999.99999999, "9999999.99999999")],
)
def test_json_number_accepted_as_its_shortest_form(value: float, text: str) -> None:
    assert json_amount(value) == text
