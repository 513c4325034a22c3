"""The provider HTTP client: serialize once, sign those bytes, send them, map every failure."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import requests
from pydantic import ValidationError
from requests.adapters import HTTPAdapter
from urllib3.exceptions import NameResolutionError, NewConnectionError

from invoice_worker.config import Settings
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

DUPLICATE_FOREIGN_ID = "The foreign id has already been taken."
USER_AGENT = "invoice-worker"


def sign(body: bytes, secret: str) -> str:
    """Return the provider signature: lowercase hex HMAC-SHA512 of the exact body bytes."""
    return hmac.new(secret.encode(), body, hashlib.sha512).hexdigest()


def verify_signature(body: bytes, signature: str, secret: str) -> bool:
    """Check a provider callback's ``X-Processing-Signature`` over its raw body bytes.

    Constant-time, and on the bytes as received: re-encoding parsed JSON changes them.
    """
    return hmac.compare_digest(sign(body, secret), signature.strip().lower())


class ProviderClient:
    """A pooled, signed client of the merchant API; one per worker process (thread-safe)."""

    def __init__(
        self,
        api_url: str,
        api_key: str,
        api_secret: str,
        *,
        connect_timeout: float = 3.05,
        read_timeout: float = 20.0,
        pool_size: int = 64,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._key = api_key
        self._secret = api_secret
        self.timeout = (connect_timeout, read_timeout)
        self.session = requests.Session()
        # max_retries=0: a silent urllib3 retry of a sent POST could create a second invoice.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        self.session.headers.update({"User-Agent": USER_AGENT, "Accept": "application/json"})
        # requests re-reads proxy, netrc and CA-bundle variables on every call (~0.1 ms, 8% of
        # a worker's CPU): read them once here instead.
        env = self.session.merge_environment_settings(self.api_url, {}, None, None, None)
        self.session.proxies.update(env["proxies"])
        self.session.verify = env["verify"]
        self.session.trust_env = False

    @classmethod
    def from_settings(cls, settings: Settings) -> ProviderClient:
        """Build a client from settings (key and secret taken once, here)."""
        return cls(
            settings.api_url,
            settings.api_key.get_secret_value(),
            settings.api_secret.get_secret_value(),
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            pool_size=settings.http_pool_size,
        )

    def __repr__(self) -> str:
        return f"ProviderClient(api_url={self.api_url!r})"

    def close(self) -> None:
        """Close pooled connections."""
        self.session.close()

    def create_invoice(self, request: InvoiceRequest, *, send_by: float | None = None) -> Invoice:
        """Create the invoice; ``request.foreign_id`` is the provider's idempotency key.

        Raises:
            TransientProviderError: retry later (check ``ambiguous``).
            PermanentProviderError: the request can never succeed as sent.
        """
        return self._invoice(self._post("/invoices/create", request.to_body(), send_by))

    def cancel_invoice(self, foreign_id: str, *, send_by: float | None = None) -> Invoice:
        """Cancel a live invoice (allowed while created, pending or processing).

        Raises:
            InvoiceStateError: it is already final.
            InvoiceNotFoundError: the provider does not know it.
        """
        path = f"/invoices/{quote(foreign_id, safe='')}/cancel/"
        return self._invoice(self._post(path, b"{}", send_by))

    def ping(self) -> bool:
        """Return True when the provider answers its unauthenticated ping."""
        try:
            response = self.session.get(f"{self.api_url}/ping", timeout=self.timeout)
        except requests.RequestException:
            return False
        return response.status_code == 200

    def _post(self, path: str, body: bytes, send_by: float | None) -> requests.Response:
        if send_by is not None and time.monotonic() > send_by:
            raise ProviderConnectionError("not sent: its send-by instant (lease, deadline) passed")
        headers = {
            "Content-Type": "application/json",
            "X-Processing-Key": self._key,
            "X-Processing-Signature": sign(body, self._secret),
        }
        try:
            response = self.session.post(
                self.api_url + path, data=body, headers=headers, timeout=self.timeout
            )
        except requests.RequestException as exc:
            raise transport_error(exc) from exc
        if response.status_code != 200:
            raise error_for_response(response.status_code, response.text, response.headers)
        return response

    @staticmethod
    def _invoice(response: requests.Response) -> Invoice:
        # A 200 we cannot read may still be a created invoice: ambiguous, never success.
        try:
            return Invoice.model_validate(response.json()["data"])
        except (ValueError, KeyError, TypeError, ValidationError) as exc:
            raise AmbiguousResponseError(
                f"provider answered 200 with an unusable body ({type(exc).__name__})",
                status=200,
                body=response.text,
            ) from exc


def transport_error(exc: requests.RequestException) -> ProviderError:
    """Classify a transport failure by whether the request may have reached the provider."""
    if isinstance(exc, requests.exceptions.SSLError):
        return ProviderTLSError(f"TLS verification failed: {exc}")
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return ProviderConnectionError("connect timed out; the request was not sent")
    if isinstance(exc, requests.exceptions.ConnectionError) and _before_send(exc):
        return ProviderConnectionError("could not connect; the request was not sent")
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return AmbiguousResponseError("read timed out after the request was sent")
    return AmbiguousResponseError(f"connection failed after the request was sent: {exc}")


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
    """Map a non-200 answer to its error class: the only place that knows status numbers."""
    body = _json_or_none(text)
    message, code, errors = _error_fields(body, text)
    ctx: dict[str, Any] = {"status": status, "provider_code": code, "errors": errors, "body": text}
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
        return ProviderValidationError(f"provider rejected the request: {detail}", **ctx)
    if 400 <= status < 500:
        return PermanentProviderError(message or f"provider refused ({status})", **ctx)
    # 1xx/3xx should never reach us (redirects are followed): treat as a broken answer.
    return TransientProviderError(f"unexpected status {status}", **ctx)


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _error_fields(body: Any, text: str) -> tuple[str | None, str | None, dict[str, str]]:
    """Read the three documented error shapes; anything else keeps only the text."""
    if not isinstance(body, dict):
        snippet = " ".join(text.split())[:200]
        return (snippet or None), None, {}
    code = body.get("code")
    message = body.get("error")
    raw = body.get("errors")
    errors: dict[str, str] = {}
    if isinstance(raw, dict):
        # The cancel refusal nests {"error", "code"} inside "errors".
        code = code or raw.get("code")
        message = message or (raw.get("error") if "code" in raw else None)
        errors = {str(k): _text(v) for k, v in raw.items() if k not in ("code",)}
        if "code" in raw:
            errors.pop("error", None)
    return (str(message) if message else None), (str(code) if code else None), errors


def _text(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


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
