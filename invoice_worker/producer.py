"""What a web app imports: enqueue an invoice job, read its record, wait for its result.

The module-level functions read ``INVOICE_*`` settings once, on first use, and share one
Producer (thread-safe: redis-py and Celery's producer pool both pool their connections).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from celery import Celery

from invoice_worker import constants as c
from invoice_worker.config import Settings
from invoice_worker.errors import ConflictError
from invoice_worker.message import Message, kwargs_repr
from invoice_worker.models import InvoiceRequest, parse_request
from invoice_worker.store import JobStore

Deadline = datetime | float | None


class Producer:
    """Enqueues jobs and reads their records; build one per process from explicit settings."""

    def __init__(
        self, settings: Settings, *, app: Celery | None = None, store: JobStore | None = None
    ) -> None:
        from invoice_worker.worker import create_app  # the worker module builds an app at import

        self.settings = settings
        self.app = app or create_app(settings)
        self.store = store or JobStore.from_settings(settings)

    def enqueue(
        self,
        request: InvoiceRequest | Mapping[str, Any],
        *,
        deadline: Deadline = None,
        callback_task: str | None = None,
        callback_queue: str | None = None,
    ) -> dict[str, Any]:
        """Validate, record as ``queued`` and send the job; idempotent per ``foreign_id``.

        Returns:
            The job record: a new one, or the existing one when the same request was
            enqueued before (then no second message is sent).

        Raises:
            InvalidRequestError: the request breaks a rule (nothing is enqueued).
            ConflictError: the foreign_id was enqueued before with a different request.
        """
        message = Message(parse_request(request), _epoch(deadline), callback_task, callback_queue)
        foreign_id = message.request.foreign_id
        task_id = str(uuid.uuid4())
        fields = {
            "task_id": task_id,
            "deadline": message.deadline,
            "callback_task": callback_task,
            "callback_queue": callback_queue,
            "provider_foreign_id": foreign_id,
        }
        status, record, stale = self.store.enqueue(foreign_id, message.fingerprint(), fields)
        if status == "conflict":
            raise ConflictError(foreign_id)
        if status == "exists":
            assert record is not None
            if stale:
                # Still queued long after it was sent: the first send may have died with its
                # producer. A second message is harmless; the worker's claim absorbs it.
                self._send(message, record["task_id"])
            return record
        try:
            self._send(message, task_id)
        except Exception:
            self.store.discard(foreign_id, task_id)
            raise
        return {"foreign_id": foreign_id, "state": c.QUEUED, "attempts": 0, **fields}

    def get(self, foreign_id: str) -> dict[str, Any] | None:
        """Return the job record of ``foreign_id``, or None if it was never enqueued."""
        return self.store.get(foreign_id)

    def wait(self, foreign_id: str, timeout: float) -> dict[str, Any] | None:
        """Block (on a Redis channel, not by polling) until the job is final or time is up."""
        return self.store.wait(foreign_id, timeout)

    def close(self) -> None:
        """Release broker and Redis connections."""
        self.store.redis.close()
        self.app.close()

    def _send(self, message: Message, task_id: str) -> None:
        kwargs = message.kwargs()
        self.app.send_task(
            c.TASK_NAME,
            kwargs=kwargs,
            task_id=task_id,
            queue=self.settings.queue,
            argsrepr="()",
            kwargsrepr=kwargs_repr(kwargs),
        )


def _epoch(deadline: Deadline) -> float | None:
    if isinstance(deadline, datetime):
        if deadline.tzinfo is None:
            raise ValueError("deadline: a datetime must be timezone-aware")
        return deadline.timestamp()
    return deadline


_default: Producer | None = None
_default_lock = threading.Lock()


def default_producer() -> Producer:
    """The process-wide Producer, built from the environment on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Producer(Settings())
        return _default


def enqueue_invoice(
    request: InvoiceRequest | Mapping[str, Any],
    *,
    deadline: Deadline = None,
    callback_task: str | None = None,
    callback_queue: str | None = None,
) -> dict[str, Any]:
    """Enqueue with the default producer; see :meth:`Producer.enqueue`."""
    return default_producer().enqueue(
        request, deadline=deadline, callback_task=callback_task, callback_queue=callback_queue
    )


def get_invoice(foreign_id: str) -> dict[str, Any] | None:
    """Return the job record, or None; see :meth:`Producer.get`."""
    return default_producer().get(foreign_id)


def wait_for_invoice(foreign_id: str, timeout: float) -> dict[str, Any] | None:
    """Wait for a final state; see :meth:`Producer.wait`."""
    return default_producer().wait(foreign_id, timeout)
