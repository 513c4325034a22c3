"""The exception tree of invoice-worker.

Retryable vs permanent is decided by class, so Celery's ``autoretry_for`` and our own task code
can match on it::

    InvoiceWorkerError
    ├── ConfigError                     settings missing or inconsistent
    ├── InvalidRequestError             a request breaks a rule of the provider's page (ValueError)
    ├── ConflictError                   a foreign_id is reused with a different request
    ├── NotDurableError                 Redis did not confirm an enqueue on enough replicas
    ├── ReissueRefusedError             the job's invoice can still be paid (or there is none)
    ├── CallbackError                   a provider callback the receiver will not apply
    │   ├── CallbackAuthError               wrong key or signature (answered 403, nothing kept)
    │   └── InvalidCallbackError            signed, but unreadable (kept in the dead-letter list)
    └── ProviderError                   anything the provider (or the way to it) answered
        ├── TransientProviderError      worth retrying; ``ambiguous`` says the invoice may exist
        │   ├── ProviderConnectionError     not sent: connect refused / connect timeout
        │   ├── AmbiguousResponseError      sent, no usable answer: read timeout, reset, broken body
        │   ├── RateLimitedError            429; ``retry_after`` seconds when the provider said so
        │   └── ProviderServerError         5xx (the provider may have committed before failing)
        └── PermanentProviderError      retrying cannot help
            ├── ProviderValidationError     400 with field errors (``errors``: field -> message)
            │   └── DuplicateForeignIdError     400 "The foreign id has already been taken."
            ├── ProviderAuthError           403: bad or missing key / signature
            ├── InvoiceStateError           cancel refused: the invoice is already final
            ├── InvoiceNotFoundError        cancel of an unknown foreign_id
            └── ProviderTLSError            the certificate did not verify
"""

from __future__ import annotations

from typing import Any

from invoice_worker.privacy import redact

#: Most field errors kept from one answer or message (each bounded by privacy.redact).
MAX_FIELD_ERRORS = 20


class InvoiceWorkerError(Exception):
    """Raised for every failure this package knows about (the root of the tree)."""

    code = "error"


class ConfigError(InvoiceWorkerError):
    """Raised when settings are missing or inconsistent (at start-up, not at the first job)."""

    code = "config"


class InvalidRequestError(InvoiceWorkerError, ValueError):
    """Raised when a request breaks a rule; ``errors`` maps each field to the rule it broke."""

    code = "invalid_request"

    def __init__(self, errors: dict[str, str]) -> None:
        # Field names can come from a hostile message (unknown keys): bound and mask them.
        items = list(errors.items())[:MAX_FIELD_ERRORS]
        self.errors = {redact(field, 100): redact(rule) for field, rule in items}
        detail = "; ".join(f"{field}: {rule}" for field, rule in self.errors.items())
        super().__init__(f"invalid invoice request: {detail}")


class ConflictError(InvoiceWorkerError):
    """Raised when a foreign_id is enqueued again with a request that differs from the first."""

    code = "conflict"

    def __init__(self, foreign_id: str) -> None:
        self.foreign_id = foreign_id
        super().__init__(f"foreign_id {foreign_id!r} was already enqueued with a different request")


class NotDurableError(InvoiceWorkerError):
    """Raised when Redis did not confirm an enqueue on ``INVOICE_REDIS_MIN_REPLICAS`` replicas
    in time: the job is probably recorded and sent, but a failover now could lose it (or, with
    ``min-replicas-to-write``, the primary refused it for want of replicas). Enqueue the same
    request again (it is idempotent) until this is not raised."""

    code = "not_durable"

    def __init__(self, foreign_ids: list[str]) -> None:
        self.foreign_ids = foreign_ids
        shown = ", ".join(repr(f) for f in foreign_ids[:5])
        more = f" and {len(foreign_ids) - 5} more" if len(foreign_ids) > 5 else ""
        super().__init__(
            f"Redis did not confirm the enqueue of {shown}{more} on enough replicas in time; "
            "enqueue again (idempotent)"
        )


class ReissueRefusedError(InvoiceWorkerError):
    """Raised when a re-issue is refused: the job has no failed invoice to replace (``reason``:
    ``not_found``, ``not_created``, ``payable``, ``paid`` or ``no_such_generation``)."""

    code = "reissue_refused"

    def __init__(self, foreign_id: str, reason: str, record: Any = None) -> None:
        self.foreign_id = foreign_id
        self.reason = reason
        #: The job record as the refusal found it (a JobRecord), None for an unknown job.
        self.record = record
        super().__init__(
            f"re-issue of {foreign_id!r} refused: {REISSUE_REASONS.get(reason, reason)}"
        )


#: What each refusal reason means.
REISSUE_REASONS = {
    "not_found": "no job has this foreign_id",
    "not_created": "the job has no invoice (it is being created, or it failed without one)",
    "payable": "the current invoice can still be paid",
    "paid": "the current invoice is paid",
    "no_such_generation": "the job has no invoice of that generation yet",
}


class CallbackError(InvoiceWorkerError):
    """Raised when a provider callback cannot be applied (the base of the receiver's errors)."""

    code = "callback_error"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class CallbackAuthError(CallbackError):
    """Raised when a callback's ``X-Processing-Key`` is not ours or its signature does not
    verify over the raw body (``reason`` says which; the body is never part of the message)."""

    code = "callback_auth"


class InvalidCallbackError(CallbackError):
    """Raised when a signed callback is not one we can read (not JSON, not an invoice, a status
    we do not know); the receiver keeps it in the dead-letter list."""

    code = "invalid_callback"


class ProviderError(InvoiceWorkerError):
    """Raised when the provider call fails; carries the HTTP context like stripe's StripeError.

    Attributes:
        status: HTTP status, or None when no response arrived.
        provider_code: the provider's ``code`` field, when it sent one.
        errors: field -> message from a 400 ``{"errors": {...}}`` body.
        body: the raw body, truncated (never the request: it holds ``email_user``).
        ambiguous: True when the request was sent and the invoice may exist.
    """

    code = "provider_error"
    retryable = False
    ambiguous = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        provider_code: str | None = None,
        errors: dict[str, str] | None = None,
        body: str | None = None,
    ) -> None:
        # Provider text is bounded and masked before anything else sees it: it could echo
        # ``email_user`` back, or be megabytes from a proxy.
        message = redact(message)
        super().__init__(message)
        self.message = message
        self.status = status
        self.provider_code = redact(provider_code, 100) if provider_code else None
        items = list((errors or {}).items())[:MAX_FIELD_ERRORS]
        self.errors = {redact(k, 100): redact(v) for k, v in items}
        self.body = redact(body) if body else body

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, message={self.message!r})"

    def to_dict(self) -> dict[str, Any]:
        """Return the primitives a job record stores for this failure."""
        return {
            "error_code": self.provider_code or self.code,
            "error": self.message,
            "http_status": self.status,
            "errors": self.errors,
        }


class TransientProviderError(ProviderError):
    """Raised for failures worth retrying (``ambiguous`` tells if the invoice may exist)."""

    code = "provider_unavailable"
    retryable = True


class ProviderConnectionError(TransientProviderError):
    """Raised when no request reached the provider (refused, DNS, connect timeout): safe."""

    code = "connection_error"


class AmbiguousResponseError(TransientProviderError):
    """Raised when the request was sent but no usable answer came (timeout, reset, bad body)."""

    code = "ambiguous_response"
    ambiguous = True


class RateLimitedError(TransientProviderError):
    """Raised on 429; ``retry_after`` holds the provider's wait in seconds when it gave one."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ProviderServerError(TransientProviderError):
    """Raised on 5xx; ambiguous because a gateway error can follow a committed create."""

    code = "server_error"
    ambiguous = True


class PermanentProviderError(ProviderError):
    """Raised for failures that no retry can fix; the job fails at once."""

    code = "provider_rejected"


class ProviderValidationError(PermanentProviderError):
    """Raised on a 400 with field errors (``errors`` keeps the provider's field -> message)."""

    code = "validation_error"


class DuplicateForeignIdError(ProviderValidationError):
    """Raised when the provider says the foreign_id has already been taken."""

    code = "duplicate_foreign_id"


class ProviderAuthError(PermanentProviderError):
    """Raised on 403: key or signature missing or wrong (``provider_code`` says which)."""

    code = "auth_error"


class InvoiceStateError(PermanentProviderError):
    """Raised when a cancel is refused because the invoice is already in a final state."""

    code = "invalid_invoice_state"


class InvoiceNotFoundError(PermanentProviderError):
    """Raised when a cancel names a foreign_id the provider does not know."""

    code = "invoice_not_found"


class ProviderTLSError(PermanentProviderError):
    """Raised when the provider's TLS certificate does not verify (retrying will not fix it)."""

    code = "tls_error"
