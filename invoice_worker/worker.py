"""The ``celery -A invoice_worker.worker`` entry: the one module that reads the environment.

Everything else takes its settings explicitly (``invoice_worker.app.create_app(settings)``).
"""

from __future__ import annotations

from invoice_worker.app import create_app
from invoice_worker.config import Settings

app = create_app(Settings.load())
