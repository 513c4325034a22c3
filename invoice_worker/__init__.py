"""invoice-worker: create CoinsPaid / CryptoProcessing invoices exactly once, from Celery.

Asyncio apps import ``invoice_worker.aio`` (the same names, as coroutines); it is not imported
here, so a sync app never loads it.
"""

from __future__ import annotations

from invoice_worker.config import Settings
from invoice_worker.constants import Cleanup, EventKind, InvoiceStatus, JobState
from invoice_worker.errors import (
    CallbackAuthError,
    CallbackError,
    ConfigError,
    ConflictError,
    InvalidCallbackError,
    InvalidRequestError,
    InvoiceWorkerError,
    NotDurableError,
    PermanentProviderError,
    ProviderError,
    ReissueRefusedError,
    TransientProviderError,
)
from invoice_worker.models import Invoice, InvoiceRequest
from invoice_worker.producer import (
    Producer,
    enqueue_invoice,
    enqueue_many,
    get_invoice,
    reissue_invoice,
    wait_for_invoice,
    wait_for_status,
)
from invoice_worker.receiver import Receiver, handle_callback, wsgi_app
from invoice_worker.record import JobRecord

__version__ = "0.1.0"

__all__ = [  # noqa: RUF022 - grouped by concern, as the style guide asks
    # producer
    "Producer",
    "enqueue_invoice",
    "enqueue_many",
    "get_invoice",
    "wait_for_invoice",
    "wait_for_status",
    "reissue_invoice",
    # the callback receiver
    "Receiver",
    "handle_callback",
    "wsgi_app",
    # records, models and settings
    "Cleanup",
    "EventKind",
    "Invoice",
    "InvoiceStatus",
    "InvoiceRequest",
    "JobRecord",
    "JobState",
    "Settings",
    # errors
    "CallbackAuthError",
    "CallbackError",
    "ConfigError",
    "ConflictError",
    "InvalidCallbackError",
    "NotDurableError",
    "InvalidRequestError",
    "InvoiceWorkerError",
    "PermanentProviderError",
    "ProviderError",
    "ReissueRefusedError",
    "TransientProviderError",
]
