"""invoice-worker: create CoinsPaid / CryptoProcessing invoices exactly once, from Celery."""

from __future__ import annotations

__version__ = "0.1.0"
