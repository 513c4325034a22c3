"""Logging: one line per job transition, as ``key=value`` text or as JSON (``INVOICE_LOG_FORMAT``).

Only the fields named here reach a log line: never the request, the secret, the signature or
``email_user``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from celery.signals import after_setup_logger, after_setup_task_logger

from invoice_worker.privacy import escape_controls

log = logging.getLogger("invoice_worker.job")


def log_job(level: int, foreign_id: str, task_id: str, outcome: str, **detail: Any) -> None:
    """Log one job transition (``detail``: attempt, latency_ms, error_code, in, reason, ...)."""
    fields = {"foreign_id": foreign_id, "task_id": task_id, "outcome": outcome}
    fields.update({k: v for k, v in detail.items() if v is not None})
    text = " ".join(f"{k}={_text(v)}" for k, v in fields.items() if k != "foreign_id")
    log.log(level, "job %s %s", escape_controls(foreign_id), text, extra={"job": fields})


def log_circuit(change: str | None, foreign_id: str, task_id: str) -> None:
    """Log a change of the fleet's circuit breaker: once, by the worker whose call caused it."""
    if not change:
        return
    level = logging.WARNING if change == "open" else logging.INFO
    log.log(
        level, "provider circuit %s (after job %s)", change.replace("_", "-"),
        escape_controls(foreign_id),
        extra={"job": {"circuit": change, "foreign_id": foreign_id, "task_id": task_id}},
    )  # fmt: skip


def _text(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, float) else escape_controls(str(value))


class JsonFormatter(logging.Formatter):
    """One JSON object per line; job fields are top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update(getattr(record, "job", {}))
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def use_json_logs() -> None:
    """Make Celery's worker loggers emit JSON (connected when ``log_format`` is json)."""

    def swap(logger: logging.Logger, **_: Any) -> None:
        for handler in logger.handlers:
            handler.setFormatter(JsonFormatter())

    # A dispatch_uid connects each receiver once, however many apps a process builds.
    after_setup_logger.connect(swap, weak=False, dispatch_uid="invoice_worker.json_logs")
    after_setup_task_logger.connect(swap, weak=False, dispatch_uid="invoice_worker.json_task")
