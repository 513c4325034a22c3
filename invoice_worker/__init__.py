"""invoice-worker: create CoinsPaid / CryptoProcessing invoices exactly once, from Celery."""

from __future__ import annotations

from invoice_worker.config import Settings
from invoice_worker.constants import Cleanup, JobState
from invoice_worker.errors import (
    ConfigError,
    ConflictError,
    InvalidRequestError,
    InvoiceWorkerError,
    NotDurableError,
    PermanentProviderError,
    ProviderError,
    TransientProviderError,
)
from invoice_worker.models import Invoice, InvoiceRequest, JobRecord
from invoice_worker.producer import (
    Producer,
    enqueue_invoice,
    enqueue_many,
    get_invoice,
    wait_for_invoice,
)

__version__ = "0.1.0"

__all__ = [  # noqa: RUF022 - grouped by concern, as the style guide asks
    # producer
    "Producer",
    "enqueue_invoice",
    "enqueue_many",
    "get_invoice",
    "wait_for_invoice",
    # records, models and settings
    "Cleanup",
    "Invoice",
    "InvoiceRequest",
    "JobRecord",
    "JobState",
    "Settings",
    # errors
    "ConfigError",
    "ConflictError",
    "NotDurableError",
    "InvalidRequestError",
    "InvoiceWorkerError",
    "PermanentProviderError",
    "ProviderError",
    "TransientProviderError",
]
