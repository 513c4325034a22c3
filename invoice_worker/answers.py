"""What the provider answered, judged: errors by status, transport failures, 200 checks.

``error_for_response`` is the only place that knows status numbers. Every text taken from an
answer is cut to a bounded size before it is parsed further, masked or stored.
"""

from __future__ import annotations

import itertools
import json
import time
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import requests
from urllib3.exceptions import NameResolutionError, NewConnectionError

from invoice_worker.errors import (
    AmbiguousResponseError,
    DuplicateForeignIdError,
    InvoiceNotFoundError,
    InvoiceStateError,
    PermanentProviderError,
    ProviderAuthError,
    ProviderConnectionError,
    ProviderError,
    ProviderServerError,
    ProviderTLSError,
    ProviderValidationError,
    RateLimitedError,
    TransientProviderError,
)
from invoice_worker.models import Invoice, InvoiceRequest
from invoice_worker.privacy import TEXT_LIMIT

DUPLICATE_FOREIGN_ID = "The foreign id has already been taken."
#: The longest invoice URL accepted, like the request's own URLs.
MAX_URL_LENGTH = 2048
BODY_LIMIT = _MESSAGE_LIMIT = TEXT_LIMIT
_CODE_LIMIT = 100
_FIELDS_LIMIT = 20


def answer_problems(request: InvoiceRequest, invoice: Invoice, *, allow_http: bool) -> list[str]:
    """What makes ``invoice`` not the answer to ``request`` (empty when it is).

    The ids compare as strings (older API versions answer an integer), the amounts as numbers
    (the provider writes 8 decimals), the currencies exactly.
    """
    problems = []
    if invoice.foreign_id != request.foreign_id:
        problems.append("foreign_id differs from the one sent")
    if (problem := url_problem(invoice.url, allow_http=allow_http)) is not None:
        problems.append(problem)
    if not (invoice.amount.is_finite() and invoice.amount == request.amount):
        problems.append("amount differs from the one sent")
    if invoice.currency != request.currency:
        problems.append("currency differs from the one sent")
    return problems


def url_problem(url: str, *, allow_http: bool = False) -> str | None:
    """Why ``url`` may not be handed to a payer, or None.

    It must be https with a host and no credentials, at most 2048 characters, none of them
    whitespace or control characters. Plain http passes only when ``allow_http`` (the API
    itself is plain http on a loopback host: a local sandbox).
    """
    if len(url) > MAX_URL_LENGTH:
        return f"url is longer than {MAX_URL_LENGTH} characters"
    # isprintable() is False for every Unicode control, format or separator character (the
    # bidi overrides and zero-width spaces included): all whitespace but the ASCII space.
    if not url.isprintable() or " " in url:
        return "url contains whitespace or control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        return "url is malformed"
    if parts.scheme != "https" and not (allow_http and parts.scheme == "http"):
        return "url is not https"
    if not parts.hostname:
        return "url has no host"
    if "@" in parts.netloc:
        return "url contains credentials"
    return None


def transport_error(exc: BaseException, *, sent: bool | None = None) -> ProviderError:
    """Classify a transport failure by whether the request may have reached the provider.

    ``sent`` is what the bounded transport saw; None (another transport) falls back to reading
    the exception chain.
    """
    tls = isinstance(exc, requests.exceptions.SSLError)
    if sent is None:
        # Read the exception chain; a TLS error counts as the handshake's (nothing sent).
        sent = not (tls or isinstance(exc, requests.exceptions.ConnectTimeout) or _before_send(exc))
    if not sent:
        if tls:
            return ProviderTLSError(f"TLS verification failed: {_short(exc)}")
        if isinstance(exc, requests.exceptions.ConnectTimeout):
            return ProviderConnectionError("connect timed out; the request was not sent")
        return ProviderConnectionError("could not connect; the request was not sent")
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return AmbiguousResponseError("read timed out after the request was sent")
    return AmbiguousResponseError(f"connection failed after the request was sent: {_short(exc)}")


def _short(exc: BaseException) -> str:
    return str(exc)[:_MESSAGE_LIMIT]


def _before_send(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        reason = getattr(seen, "reason", None)
        if isinstance(seen, NewConnectionError | NameResolutionError) or isinstance(
            reason, NewConnectionError | NameResolutionError
        ):
            return True
        nested = seen.args[0] if seen.args and isinstance(seen.args[0], BaseException) else None
        seen = nested or seen.__cause__ or seen.__context__
    return False


def error_for_response(status: int, text: str, headers: Any) -> ProviderError:
    """Map a non-200 answer to its error class: the only place that knows status numbers.

    Every text kept from the body is cut to a bounded size first.
    """
    body = _json_or_none(text)
    message, code, errors = _error_fields(body, text)
    ctx: dict[str, Any] = {
        "status": status, "provider_code": code, "errors": errors, "body": text[:BODY_LIMIT]
    }  # fmt: skip
    if status == 429:
        # May come from a CDN in front of the API: plain text, Retry-After optional.
        retry_after = parse_retry_after(headers.get("Retry-After"))
        return RateLimitedError(message or "rate limited", retry_after=retry_after, **ctx)
    if status >= 500 or status == 408:
        return ProviderServerError(message or f"provider error {status}", **ctx)
    if status == 403:
        # The provider uses 403 (never 401) for every key or signature failure.
        return ProviderAuthError(message or "forbidden", **ctx)
    if status == 404:
        return InvoiceNotFoundError(message or "not found", **ctx)
    if code == "invalid_invoice_state":
        return InvoiceStateError(message or "invalid invoice state", **ctx)
    if errors.get("foreign_id") == DUPLICATE_FOREIGN_ID:
        return DuplicateForeignIdError(DUPLICATE_FOREIGN_ID, **ctx)
    if status == 400 and errors:
        detail = "; ".join(f"{k}: {v}" for k, v in errors.items())
        message = f"provider rejected the request: {detail}"[:_MESSAGE_LIMIT]
        return ProviderValidationError(message, **ctx)
    if 400 <= status < 500:
        return PermanentProviderError(message or f"provider refused ({status})", **ctx)
    # 1xx/3xx should never reach us (redirects are not followed): treat as a broken answer.
    return TransientProviderError(f"unexpected status {status}", **ctx)


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _error_fields(body: Any, text: str) -> tuple[str | None, str | None, dict[str, str]]:
    """Read the three documented error shapes; anything else keeps only the text."""
    if not isinstance(body, dict):
        snippet = " ".join(text[: _MESSAGE_LIMIT * 4].split())[:200]
        return (snippet or None), None, {}
    code = _scalar(body.get("code"), _CODE_LIMIT)
    message = _scalar(body.get("error"), _MESSAGE_LIMIT)
    raw = body.get("errors")
    errors: dict[str, str] = {}
    if isinstance(raw, dict):
        # The cancel refusal nests {"error", "code"} inside "errors".
        nested = "code" in raw
        if nested:
            code = code or _scalar(raw.get("code"), _CODE_LIMIT)
            message = message or _scalar(raw.get("error"), _MESSAGE_LIMIT)
        skip = ("code", "error") if nested else ("code",)
        fields = ((str(k)[:_CODE_LIMIT], _text(v)) for k, v in raw.items() if k not in skip)
        errors = dict(itertools.islice(fields, _FIELDS_LIMIT))
    return message, code, errors


def _scalar(value: Any, limit: int) -> str | None:
    if isinstance(value, str | int | float) and not isinstance(value, bool) and value != "":
        return str(value)[:limit]
    return None


def _text(value: Any) -> str:
    if isinstance(value, list):
        parts = (_scalar(v, _MESSAGE_LIMIT) for v in itertools.islice(value, _FIELDS_LIMIT))
        return " ".join(p for p in parts if p)[:_MESSAGE_LIMIT]
    return _scalar(value, _MESSAGE_LIMIT) or ""


def parse_retry_after(value: str | None) -> float | None:
    """Parse Retry-After as delta-seconds or an HTTP-date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
