"""The records we exchange with the provider: the create request and the invoice it answers.

Our own job record is ``record.JobRecord``; a provider callback is ``callbacks.Callback``.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import math
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from invoice_worker.constants import DERIVED_SEPARATOR, INVALID_MESSAGE_ID
from invoice_worker.errors import InvalidRequestError
from invoice_worker.privacy import contains_email

# Deliberately simple: the provider re-validates, we only catch what is plainly not an address.
EMAIL_RE = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")
TICKER_RE = re.compile(r"^[A-Z0-9]{2,10}$")
_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
# Printable ASCII: the provider may compare ids under a case- and accent-insensitive collation,
# and within ASCII that reduces to case, which the store folds (see JobStore.key).
_FOREIGN_ID_RE = re.compile(r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$")
AMOUNT_MAX_DECIMALS = 8
AMOUNT_MAX_DIGITS = 30
#: Largest amount: 10^22 - 1 (30 digits, 8 of them decimals), far above any real invoice.
AMOUNT_MAX_INTEGER_DIGITS = AMOUNT_MAX_DIGITS - AMOUNT_MAX_DECIMALS
_AMOUNT_MAX_CHARS = 64
#: Validation context key set by the worker's decoding (``TaskMessage.parse(wire=True)``): a
#: JSON number is how a non-Python producer naturally writes an amount, see ``json_amount``.
JSON_NUMBERS = "json_numbers"
#: JSON number amounts (not integers) must be below this: a double holds 8 places exactly.
JSON_AMOUNT_LIMIT = 10_000_000


def _decimal(value: Any, info: ValidationInfo) -> Any:
    if isinstance(value, float):
        if not (info.context or {}).get(JSON_NUMBERS):
            # A Python caller has Decimal and str at hand: a float there is almost always a
            # sum that has already lost the amount (0.1 + 0.2 is 0.30000000000000004).
            raise ValueError("must be a decimal string or an integer, not a float")
        value = json_amount(value)
    if isinstance(value, bool):
        raise ValueError("must be a decimal number, not a boolean")
    # Bound the text and the exponent before any arithmetic: "1E+100000000" is 10 characters
    # that become a 100 MB string when formatted, and Decimal raises Overflow on larger ones.
    if isinstance(value, int):
        value = str(value)
    if isinstance(value, str):
        if len(value) > _AMOUNT_MAX_CHARS:
            raise ValueError(f"must be at most {_AMOUNT_MAX_CHARS} characters")
        try:
            number = Decimal(value.strip())
        except ArithmeticError:
            raise ValueError("must be a decimal number") from None
        if number.is_finite() and number and number.adjusted() >= AMOUNT_MAX_INTEGER_DIGITS:
            raise ValueError(f"must be below 10^{AMOUNT_MAX_INTEGER_DIGITS}")
        return number
    return value


def json_amount(value: float) -> str:
    """The decimal a JSON number amount stands for: the float's shortest form (``repr``).

    That is the text JavaScript, PHP and every JSON encoder print for it, so ``0.1`` means 0.1.
    Below 10^7 a double holds every decimal of at most 8 places exactly (15 significant
    digits), so such a number is read as written; one whose shortest form needs more places
    (``0.30000000000000004``, ``1e-9``), or beyond that range, is refused, never rounded.

    Raises:
        ValueError: naming the rule broken.
    """
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    text = repr(value)
    exponent = Decimal(text).as_tuple().exponent
    if isinstance(exponent, int) and -exponent > AMOUNT_MAX_DECIMALS:
        raise ValueError(
            f"as a JSON number must be exactly a decimal of at most {AMOUNT_MAX_DECIMALS} places "
            "in its shortest form (0.1 + 0.2 is 0.30000000000000004): send a decimal string"
        )
    if abs(value) >= JSON_AMOUNT_LIMIT:
        raise ValueError(
            f"as a JSON number with a fraction or exponent must be below {JSON_AMOUNT_LIMIT:,} "
            "(where a double holds 8 decimal places exactly): send a decimal string or an integer"
        )
    return text


# Shops send the same few URLs with every order: validating each once saves ~20 us a request.
@functools.lru_cache(maxsize=4096)
def _https_domain_url(value: str) -> str:
    if len(value) > 2048:
        raise ValueError("must be at most 2048 characters")
    if not value.isprintable() or " " in value:
        # urlsplit drops tabs and newlines before parsing, but the stored URL would keep them.
        raise ValueError("must not contain spaces or control characters")
    parts = urlsplit(value)
    if parts.scheme != "https":
        raise ValueError("must use the https scheme")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValueError("must not contain credentials")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise ValueError("must have a host")
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    else:
        raise ValueError("must use a domain name, not an IP address")
    labels = host.split(".")
    if host == "localhost" or host.endswith(".localhost") or len(labels) < 2:
        raise ValueError("must use a public domain name (not localhost)")
    if not all(_LABEL_RE.fullmatch(label) for label in labels) or labels[-1].isdigit():
        raise ValueError("must use a valid domain name")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ValueError("must have a valid port") from None
    return value


Amount = Annotated[Decimal, BeforeValidator(_decimal)]


class InvoiceRequest(BaseModel):
    """A create-invoice request, checked against every rule of the provider's page."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)

    type: Literal["fill_or_kill", "good_until_expired"] | None = None
    timer: StrictBool
    title: str = Field(min_length=1, max_length=50)
    description: str | None = Field(None, max_length=1000)
    foreign_id: str = Field(min_length=1, max_length=255)
    currency: str
    sender_currency: str | None = None
    amount: Amount = Field(gt=0, allow_inf_nan=False)
    url_success: str
    url_failed: str
    email_user: str = Field(max_length=254, repr=False)

    @field_validator("foreign_id")
    @classmethod
    def _foreign_id(cls, value: str) -> str:
        return check_foreign_id(value)

    @field_validator("currency", "sender_currency")
    @classmethod
    def _ticker(cls, value: str | None) -> str | None:
        if value is not None and not TICKER_RE.fullmatch(value):
            raise ValueError("must be an upper-case ticker of 2-10 letters or digits, e.g. BTC")
        return value

    @field_validator("amount")
    @classmethod
    def _amount_shape(cls, value: Decimal) -> Decimal:
        exponent = value.as_tuple().exponent
        if isinstance(exponent, int) and -exponent > AMOUNT_MAX_DECIMALS:
            raise ValueError(f"must have at most {AMOUNT_MAX_DECIMALS} decimal places")
        if len(value.as_tuple().digits) > AMOUNT_MAX_DIGITS:
            raise ValueError(f"must have at most {AMOUNT_MAX_DIGITS} digits")
        return value

    @field_validator("url_success", "url_failed")
    @classmethod
    def _url(cls, value: str) -> str:
        return _https_domain_url(value)

    @field_validator("email_user")
    @classmethod
    def _email(cls, value: str) -> str:
        if not EMAIL_RE.fullmatch(value):
            raise ValueError("must be a valid e-mail address")
        return value

    def to_body(self) -> bytes:
        """Return the compact JSON bytes sent (and signed); the amount as an exact JSON number."""
        fields = []
        for key, value in self.model_dump(mode="json", exclude_none=True).items():
            raw = format(self.amount, "f") if key == "amount" else json.dumps(value)
            fields.append(f"{json.dumps(key)}:{raw}")
        return ("{" + ",".join(fields) + "}").encode()

    def to_message(self) -> dict[str, Any]:
        """Return the JSON-safe kwargs a task message carries (amount as a string)."""
        data = self.model_dump(mode="json", exclude_none=True)
        data["amount"] = format(self.amount, "f")
        return data

    def fingerprint(self) -> str:
        """Return a stable hash of the request, to tell a retry from a conflicting reuse.

        Equal amounts written differently ("0.10", "0.1") are the same request.
        """
        data = {**self.to_message(), "amount": format(self.amount.normalize(), "f")}
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def with_foreign_id(self, foreign_id: str) -> InvoiceRequest:
        """Return a copy sent under another provider foreign_id (the orphan recreate path);
        the request itself under its own (every first attempt: no copy)."""
        if foreign_id == self.foreign_id:
            return self
        return self.model_copy(update={"foreign_id": foreign_id})


def check_foreign_id(value: str) -> str:
    """Apply the foreign_id rules (the producer's and the worker's: one function).

    Raises:
        ValueError: naming the rule broken.
    """
    if not _FOREIGN_ID_RE.fullmatch(value):
        raise ValueError("must be printable ASCII without control characters or surrounding spaces")
    if value.lower().startswith(INVALID_MESSAGE_ID):
        raise ValueError(f"must not start with {INVALID_MESSAGE_ID!r}: it names invalid messages")
    if DERIVED_SEPARATOR in value:
        raise ValueError(
            f"must not contain {DERIVED_SEPARATOR!r}: it is reserved for the ids of re-created "
            "invoices"
        )
    if contains_email(value):
        raise ValueError("must not contain personal data (an e-mail address)")
    return value


def parse_request(data: Mapping[str, Any] | InvoiceRequest) -> InvoiceRequest:
    """Validate ``data`` into an InvoiceRequest.

    Raises:
        InvalidRequestError: naming every bad field and the rule it broke.
    """
    if isinstance(data, InvoiceRequest):
        return data
    if not isinstance(data, Mapping):
        raise InvalidRequestError({"request": "must be a JSON object"})
    try:
        return InvoiceRequest.model_validate(dict(data))
    except ValidationError as exc:
        raise InvalidRequestError(validation_messages(exc)) from None


def validation_messages(exc: ValidationError) -> dict[str, str]:
    """Flatten a pydantic error into field -> rule, without echoing the rejected values."""
    out: dict[str, str] = {}
    for err in exc.errors(include_input=False, include_url=False):
        field = ".".join(str(p) for p in err["loc"]) or "request"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "is not a field of the create-invoice request"
        out.setdefault(field, message)
    return out


def _str_id(value: Any) -> Any:
    # Older API versions answered with an integer foreign_id.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class Invoice(BaseModel):
    """The ``data`` of a 200 create (or cancel) answer; lenient about older shapes."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    id: int
    url: str = Field(min_length=1)
    foreign_id: Annotated[str, BeforeValidator(_str_id)]
    address: str | None = None
    title: str | None = Field(None, validation_alias=AliasChoices("title", "name"))
    status: str
    currency: str
    amount: Decimal
    sender_currency: str | None = None
    sender_amount: Decimal | None = None
    fixed_at: int | None = None
    release_at: int | None = None
    seconds_left: int | None = None
