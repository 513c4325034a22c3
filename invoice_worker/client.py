"""The provider HTTP client: serialize once, sign those bytes, send them, map every failure.

Every call is one *exchange* (``invoice_worker.exchange``): bounded in wall-clock time from
DNS to the last byte of the answer (``exchange_timeout``), fenced (nothing is sent after
``send_by``), read with a size cap (``max_response_bytes``), and a 200 create answer is accepted
only if it is the invoice asked for. Anything else is an error (``answers``) whose class says
whether the invoice may exist.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import time
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit

import requests
from urllib3.exceptions import HTTPError
from urllib3.util.retry import Retry

from invoice_worker.answers import BODY_LIMIT, answer_problems, error_for_response, transport_error
from invoice_worker.config import Settings
from invoice_worker.errors import AmbiguousResponseError, ProviderConnectionError, ProviderError
from invoice_worker.exchange import Exchange, NotSent, ProviderAdapter, Watchdog, bound
from invoice_worker.models import Invoice, InvoiceRequest

USER_AGENT = "invoice-worker"
#: Default cap on an answer body; the provider's answers are well under 2 KiB.
MAX_RESPONSE_BYTES = 1 << 20
_CHUNK = 64 * 1024


def sign(body: bytes, secret: str) -> str:
    """Return the provider signature: lowercase hex HMAC-SHA512 of the exact body bytes."""
    return hmac.new(secret.encode(), body, hashlib.sha512).hexdigest()


def verify_signature(body: bytes, signature: str, secret: str) -> bool:
    """Check a provider callback's ``X-Processing-Signature`` over its raw body bytes.

    Constant-time, and on the bytes as received: re-encoding parsed JSON changes them.
    """
    return hmac.compare_digest(sign(body, secret), signature.strip().lower())


class Answer(NamedTuple):
    """A provider answer as read: ``body`` holds at most the cap; ``complete`` says if all."""

    status: int
    body: bytes
    complete: bool
    headers: Any

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class ProviderClient:
    """A pooled, signed, bounded client of the merchant API; one per worker process.

    Thread-safe; every call is bounded, fenced and checked (see the module docstring).

    Args:
        api_url, api_key, api_secret: the API base and the key pair.
        connect_timeout: seconds for each TCP connect attempt.
        read_timeout: seconds for each read (a trickled answer can outlast it: the bound below
            is what ends it).
        pool_size: keep-alive connections kept (own session only).
        exchange_timeout: wall-clock bound on a whole call, DNS to the last byte of the answer;
            default connect_timeout + read_timeout.
        max_response_bytes: cap on the answer body read; a larger 200 is ambiguous.
        session: a ``requests.Session`` to send through, used as is (nothing mounted over its
            adapters; its headers, proxies and TLS settings kept; ``close()`` leaves it open).
            The bound and the in-transport fence need a ``ProviderAdapter`` serving
            ``api_url``.

    Raises:
        ValueError: a bound that is not positive, or a session whose adapter for ``api_url``
            has urllib3 retries (a silent retry of a sent POST could create a second invoice).
    """

    def __init__(
        self,
        api_url: str,
        api_key: str,
        api_secret: str,
        *,
        connect_timeout: float = 3.05,
        read_timeout: float = 20.0,
        pool_size: int = 64,
        exchange_timeout: float | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        session: requests.Session | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._key = api_key
        self._secret = api_secret
        self.timeout = (connect_timeout, read_timeout)
        if exchange_timeout is None:
            exchange_timeout = connect_timeout + read_timeout
        if not exchange_timeout > 0:
            raise ValueError("exchange_timeout must be positive")
        if max_response_bytes < 1:
            raise ValueError("max_response_bytes must be at least 1")
        self.exchange_timeout = exchange_timeout
        self.max_response_bytes = max_response_bytes
        self._local_http = _is_local_http(self.api_url)
        self._watchdog = Watchdog()
        self._owns_session = session is None
        if session is None:
            session = _own_session(self.api_url, pool_size)
        else:
            _refuse_retries(session, self.api_url)
        self.session = session

    @classmethod
    def from_settings(cls, settings: Settings) -> ProviderClient:
        """Build a client from settings (key and secret taken once, here)."""
        return cls(
            settings.api_url,
            settings.api_key.get_secret_value(),
            settings.api_secret.get_secret_value(),
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            exchange_timeout=settings.exchange_timeout,
            pool_size=settings.http_pool_size,
        )

    def __repr__(self) -> str:
        return f"ProviderClient(api_url={self.api_url!r})"

    def close(self) -> None:
        """Close pooled connections (a session passed in stays the caller's to close)."""
        if self._owns_session:
            self.session.close()

    def create_invoice(self, request: InvoiceRequest, *, send_by: float | None = None) -> Invoice:
        """Create the invoice; ``request.foreign_id`` is the provider's idempotency key.

        Args:
            request: the validated request (its exact bytes are signed and sent).
            send_by: a ``time.monotonic()`` instant after which nothing may be sent.

        Raises:
            TransientProviderError: retry later (check ``ambiguous``); an answer that is not
                the invoice asked for is an AmbiguousResponseError.
            PermanentProviderError: the request can never succeed as sent.
        """
        invoice = self._post("/invoices/create", request.to_body(), send_by)
        problems = answer_problems(request, invoice, allow_http=self._local_http)
        if problems:
            raise AmbiguousResponseError(
                "provider answered 200 with an invoice that is not the one asked for: "
                + "; ".join(problems),
                status=200,
            )
        return invoice

    def cancel_invoice(self, foreign_id: str, *, send_by: float | None = None) -> Invoice:
        """Cancel a live invoice (allowed while created, pending or processing).

        Args:
            foreign_id: the provider-side id.
            send_by: a ``time.monotonic()`` instant after which nothing may be sent.

        Raises:
            InvoiceStateError: it is already final.
            InvoiceNotFoundError: the provider does not know it.
            AmbiguousResponseError: the answer names another invoice.
        """
        path = f"/invoices/{quote(foreign_id, safe='')}/cancel/"
        invoice = self._post(path, b"{}", send_by)
        if invoice.foreign_id != foreign_id:
            raise AmbiguousResponseError(
                "provider answered the cancel with another invoice: foreign_id differs", status=200
            )
        return invoice

    def ping(self) -> bool:
        """Return True when the provider answers its unauthenticated ping."""
        try:
            return self._exchange("GET", "/ping", None, None).status == 200
        except ProviderError:
            return False

    def _post(self, path: str, body: bytes, send_by: float | None) -> Invoice:
        answer = self._exchange("POST", path, body, send_by)
        if answer.status != 200:
            raise error_for_response(answer.status, answer.text, answer.headers)
        if not answer.complete:
            raise AmbiguousResponseError(
                f"provider answered 200 with a body over {self.max_response_bytes} bytes",
                status=200,
                body=answer.text[:BODY_LIMIT],
            )
        # A 200 we cannot read may still be a created invoice: ambiguous, never success.
        try:
            return Invoice.model_validate(json.loads(answer.body)["data"])
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise AmbiguousResponseError(
                f"provider answered 200 with an unusable body ({type(exc).__name__})",
                status=200,
                body=answer.text[:BODY_LIMIT],
            ) from exc

    def _exchange(
        self, method: str, path: str, body: bytes | None, send_by: float | None
    ) -> Answer:
        """Send and read one request within ``exchange_timeout``; classify what went wrong."""
        if send_by is not None and time.monotonic() >= send_by:
            raise ProviderConnectionError("not sent: send_by had passed before the call")
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
            headers["X-Processing-Key"] = self._key
            headers["X-Processing-Signature"] = sign(body, self._secret)
        failure: Exception | None = None
        with bound(self._watchdog, self.exchange_timeout, send_by) as exchange:
            try:
                answer = self._send(method, self.api_url + path, body, headers)
            except NotSent as exc:
                raise ProviderConnectionError(f"not sent: {exc}") from exc
            except (requests.RequestException, HTTPError, OSError) as exc:
                failure = exc
        if exchange.expired:
            raise _timeout_error(exchange) from failure
        if failure is not None:
            raise _failure_error(failure, exchange) from failure
        return answer

    def _send(self, method: str, url: str, body: bytes | None, headers: dict[str, str]) -> Answer:
        # No redirects: one would re-send the signed body (with email_user) wherever Location
        # points, and requests reads a redirect's body whole.
        response = self.session.request(
            method, url, data=body, headers=headers, timeout=self.timeout, stream=True,
            allow_redirects=False,
        )  # fmt: skip
        try:
            content, complete = read_capped(response, self.max_response_bytes)
        finally:
            response.close()
        return Answer(response.status_code, content, complete, response.headers)


def read_capped(response: requests.Response, cap: int) -> tuple[bytes, bool]:
    """Read at most ``cap`` body bytes (decoded) in chunks; return them and whether that was all."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(chunk_size=_CHUNK):
        if size + len(chunk) > cap:
            chunks.append(chunk[: cap - size])
            return b"".join(chunks), False
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks), True


def _is_local_http(api_url: str) -> bool:
    parts = urlsplit(api_url)
    if parts.scheme != "http":
        return False
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _own_session(api_url: str, pool_size: int) -> requests.Session:
    session = requests.Session()
    adapter = ProviderAdapter(pool_maxsize=pool_size)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    # requests re-reads proxy, netrc and CA-bundle variables on every call (~0.1 ms, 8% of
    # a worker's CPU): read them once here instead.
    env = session.merge_environment_settings(api_url, {}, None, None, None)
    session.proxies.update(env["proxies"])
    session.verify = env["verify"]
    session.trust_env = False
    return session


def _refuse_retries(session: requests.Session, api_url: str) -> None:
    try:
        adapter = session.get_adapter(api_url)
    except requests.exceptions.InvalidSchema as exc:
        raise ValueError(f"the session has no transport for {api_url}") from exc
    retry = getattr(adapter, "max_retries", None)
    if isinstance(retry, Retry) and _may_retry(retry):
        raise ValueError(
            "the session's transport has urllib3 retries (max_retries): a silent retry of a "
            "sent POST could create a second invoice; mount one with max_retries=0"
        )


def _may_retry(retry: Retry) -> bool:
    if retry.total is False or retry.total == 0:
        return False
    counts = (retry.connect, retry.read, retry.status, retry.other)
    return any(count is None or (count is not False and count > 0) for count in counts)


def _timeout_error(exchange: Exchange) -> ProviderError:
    bound_text = f"exchange_timeout ({exchange.timeout:g} s)"
    if exchange.sent:
        return AmbiguousResponseError(f"no answer within {bound_text}; the request was sent")
    return ProviderConnectionError(f"not sent: no connection within {bound_text}")


def _failure_error(exc: Exception, exchange: Exchange) -> ProviderError:
    if not exchange.tracked:
        return transport_error(exc)
    if not exchange.sent and exchange.send_by is not None and time.monotonic() >= exchange.send_by:
        return ProviderConnectionError("not sent: send_by passed during DNS or connect")
    return transport_error(exc, sent=exchange.sent)
