"""The rules the provider applies to a create request, with its Laravel-style field messages.

The sandbox applies them so that a bad request gets the 400 body the real API would send.
The EUR prices are made up; they only serve the minimum amount and sender_amount.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

_Q8, _ONE = Decimal("0.00000001"), Decimal(1)
_MAX_AMOUNT = Decimal(10) ** 12  # keeps 8-decimal arithmetic within Decimal's 28 digits
# Fake EUR prices for sender_amount and min_amount (which is in EUR); unknown tickers are 1 EUR.
_EUR = {"EUR": "1", "USD": "0.92", "USDT": "0.92", "BTC": "60000", "ETH": "3000", "LTC": "80"}
_EUR_RATES = {ticker: Decimal(price) for ticker, price in _EUR.items()}
_TICKER = re.compile(r"[A-Z0-9]{2,10}")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s.]+")
_EMAIL_INSIDE = re.compile(r"[^@\s]+@[^@\s]+\.[A-Za-z]{2,}")
# https://host[:port][/...]: no userinfo, no IPv6 literal; the host is then checked by _DOMAIN,
# whose alphabetic TLD also rules out IPv4 literals.
_HTTPS_URL = re.compile(r"https://([^/?#@:\s]+)(?::\d{1,5})?(?:[/?#]\S*)?", re.IGNORECASE)
_DOMAIN = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+(?:[a-z]{2,63}|xn--[a-z0-9-]+)")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_REQUIRED: tuple[str, ...] = ("timer", "title", "foreign_id", "currency", "amount")
_REQUIRED += ("url_success", "url_failed", "email_user")
_FIELDS = ("type", "description", "sender_currency", *_REQUIRED)  # currency before amount
_MAX_LENGTH = {"title": 50, "description": 1000, "foreign_id": 255}


def _reject(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def parse_body(body: bytes) -> dict[str, Any] | None:
    """Return a request body's JSON object, numbers exact, or None for a bad content format."""
    try:
        data = json.loads(body, parse_float=Decimal, parse_constant=_reject)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def foreign_id_of(value: Any) -> str | None:
    """Return a foreign_id value as the provider stores it, or None if it is not one."""
    if isinstance(value, str):
        return value
    # Older clients send an integer foreign_id.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else None


def parse_number(value: Any) -> Decimal | None:
    """Return an int, Decimal or numeric string as an exact Decimal, else None."""
    if isinstance(value, Decimal | int) and not isinstance(value, bool):
        return Decimal(value)
    return Decimal(value) if isinstance(value, str) and _NUMBER.fullmatch(value) else None


def sender_amount(amount: Decimal, currency: str, sender_currency: str) -> Decimal:
    """Convert `amount` of `currency` to `sender_currency` at the fake EUR prices, to 8 places."""
    rate = _EUR_RATES.get(currency, _ONE) / _EUR_RATES.get(sender_currency, _ONE)
    return (amount * rate).quantize(_Q8)


def _is_public_https(url: Any) -> bool:
    match = _HTTPS_URL.fullmatch(url) if isinstance(url, str) else None
    host = match[1].lower() if match else ""
    return len(host) <= 253 and not host.endswith(".localhost") and bool(_DOMAIN.fullmatch(host))


def _check(name: str, value: Any, currency: Any, min_amount: Decimal) -> tuple[str, Any]:
    """Return ("", clean value) or (message template, None) for a present value of a field."""
    if name == "timer":
        return _check_timer(value)
    if name in _MAX_LENGTH:
        return _check_text(name, value)
    if name == "amount":
        return _check_amount(value, currency, min_amount)
    return _check_format(name, value)


def _check_timer(value: Any) -> tuple[str, Any]:
    # Laravel's boolean rule (the provider's) also takes 0, 1, "0" and "1".
    if type(value) in (bool, int, str) and value in (True, False, "0", "1"):
        return "", value in (True, "1")
    return "The :attribute field must be true or false.", None


def _check_text(name: str, value: Any) -> tuple[str, Any]:
    if not isinstance(value, str):
        return "The :attribute must be a string.", None
    if len(value) > (limit := _MAX_LENGTH[name]):
        return f"The :attribute may not be greater than {limit} characters.", None
    if name == "foreign_id" and _EMAIL_INSIDE.search(value):  # no personal data allowed
        return "The :attribute format is invalid.", None
    return "", value


def _check_amount(value: Any, currency: Any, min_amount: Decimal) -> tuple[str, Any]:
    if (amount := parse_number(value)) is None:
        return "The :attribute must be a number.", None
    if amount > _MAX_AMOUNT:
        return f"The :attribute may not be greater than {_MAX_AMOUNT}.", None
    if (amount := amount.quantize(_Q8)) <= 0:
        return "The :attribute must be greater than 0.", None
    if amount * _EUR_RATES.get(currency, _ONE) < min_amount:
        return f"The amount is too small. The minimum amount is {min_amount:.2f} EUR.", None
    return "", amount


def _check_format(name: str, value: Any) -> tuple[str, Any]:
    """type, currency, sender_currency, url_success, url_failed, email_user."""
    if name == "type" and value not in ("fill_or_kill", "good_until_expired"):
        return "The selected :attribute is invalid.", None
    if "currency" in name and not (isinstance(value, str) and _TICKER.fullmatch(value)):
        return "The selected :attribute is invalid.", None
    if name.startswith("url_") and not _is_public_https(value):
        return "The :attribute format is invalid.", None
    if name == "email_user" and not (isinstance(value, str) and _EMAIL.fullmatch(value)):
        return "The :attribute must be a valid email address.", None
    return "", value


def validate(body: Mapping[str, Any], min_amount: Decimal) -> tuple[dict[str, str], dict[str, Any]]:
    """Check a create body like the provider: (message of every failing field, clean values).

    `min_amount` is in EUR. Clean values cover every field present (None where it failed):
    `timer` as a bool, `amount` as a Decimal rounded to 8 places, `foreign_id` as a string.
    """
    errors: dict[str, str] = {}
    clean: dict[str, Any] = {}
    for name in _FIELDS:
        value = body.get(name)
        value = (foreign_id_of(value) or value) if name == "foreign_id" else value
        if value is None or (isinstance(value, str) and not value.strip()):  # Laravel: blank=null
            message = "The :attribute field is required." if name in _REQUIRED else ""
        else:
            message, clean[name] = _check(name, value, clean.get("currency"), min_amount)
        if message:
            errors[name] = message.replace(":attribute", name.replace("_", " "))
    return errors, clean
