"""What a web app imports: enqueue invoice jobs, read their records, wait for their results.

The module-level functions read ``INVOICE_*`` settings once, on first use, and share one
Producer (thread-safe: redis-py and Celery's producer pool both pool their connections).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

from celery import Celery

from invoice_worker.app import create_app
from invoice_worker.config import Settings
from invoice_worker.enqueue import (
    Deadline,
    Outcome,
    Request,
    Result,
    Routes,
    Send,
    is_atomic,
    new_job,
    one,
    publish,
    refused_for_want_of_replicas,
    status_in,
    task_message,
    task_messages,
)
from invoice_worker.errors import ConflictError
from invoice_worker.message import TaskMessage
from invoice_worker.record import JobRecord
from invoice_worker.reissue import Reissuer
from invoice_worker.store import JobStore


class Producer:
    """Enqueues jobs and reads their records; build one per process from explicit settings."""

    def __init__(
        self, settings: Settings, *, app: Celery | None = None, store: JobStore | None = None
    ) -> None:
        self.settings = settings
        self.app = app or create_app(settings)
        self.store = store or JobStore.from_settings(settings)
        self.atomic = is_atomic(settings)  # see invoice_worker.enqueue
        self.reissuer = Reissuer(self.store, self.app, settings, atomic=self.atomic)

    def enqueue(
        self,
        request: Request,
        *,
        deadline: Deadline = None,
        callback_task: str | None = None,
        callback_queue: str | None = None,
        status_task: str | None = None,
        status_queue: str | None = None,
    ) -> JobRecord:
        """Validate, record as ``queued`` and send the job; idempotent per ``foreign_id``.

        ``callback_task`` (on ``callback_queue``) is sent the final record; ``status_task`` (on
        ``status_queue``) the record at each change of the invoice's status, by the callback
        receiver (see ``invoice_worker.receiver``).

        Returns:
            The job record: a new one, or the existing one when the same request was
            enqueued before (then no second message is sent).

        Raises:
            InvalidRequestError: the request or an option breaks a rule (nothing is written).
            ConflictError: the foreign_id was enqueued before with a different request (or
                differs only in case from one that was: the provider may see them as one).
            NotDurableError: with ``INVOICE_REDIS_MIN_REPLICAS``, Redis did not confirm the
                write in time; enqueue again (the record is returned once it is durable).
        """
        routes = Routes(callback_task, callback_queue, status_task, status_queue)
        return one(self._enqueue([task_message(request, deadline, routes, self.settings)]))

    def enqueue_many(
        self,
        requests: Sequence[Request],
        *,
        deadline: Deadline = None,
        callback_task: str | None = None,
        callback_queue: str | None = None,
        status_task: str | None = None,
        status_queue: str | None = None,
    ) -> list[JobRecord | ConflictError]:
        """Enqueue a batch in one pipelined round trip (plus one batched publish without the
        atomic path); each item behaves as :meth:`enqueue`.

        Returns:
            One entry per request, in order: its record, or a ConflictError (returned, not
            raised, so one reused id does not hold back the rest).

        Raises:
            InvalidRequestError: some request breaks a rule; fields are named ``[i].field``
                and nothing at all is enqueued.
            NotDurableError: as :meth:`enqueue`, for the whole batch.
        """
        routes = Routes(callback_task, callback_queue, status_task, status_queue)
        return self._enqueue(task_messages(requests, deadline, routes, self.settings))

    def _enqueue(self, messages: list[TaskMessage]) -> list[Result]:
        jobs = [new_job(m, self.settings, self.app, atomic=self.atomic) for m in messages]
        with refused_for_want_of_replicas(jobs):
            outcome = Outcome.of(messages, jobs, self.store.enqueue(jobs))
        if outcome.sends:
            self._send(outcome.sends)
        return outcome.checked()

    def _send(self, sends: list[Send]) -> None:
        try:
            publish(self.app, self.settings.queue, sends)
        except Exception:
            for message, task_id, new in sends:
                if new:
                    self.store.discard(message.request.foreign_id, task_id)
            raise

    def get(self, foreign_id: str) -> JobRecord | None:
        """Return the job record of ``foreign_id``, or None if it was never enqueued."""
        return self.store.get(foreign_id)

    def wait(self, foreign_id: str, timeout: float) -> JobRecord | None:
        """Block (on a Redis channel, not by polling) until the job is final or time is up."""
        return self.store.wait(foreign_id, timeout)

    def wait_for_status(
        self, foreign_id: str, statuses: Iterable[str], timeout: float
    ) -> JobRecord | None:
        """Block (on the same channel) until the invoice's status is one of ``statuses``
        (``InvoiceStatus`` values, e.g. ``{"confirmed", "failed"}``) or time is up.

        Returns:
            The record (check ``invoice_status``: on a timeout it is whatever it was), or None
            if no job with that id exists.
        """
        return self.store.wait(foreign_id, timeout, until=status_in(statuses))

    def reissue(
        self,
        foreign_id: str,
        *,
        generation: int | None = None,
        deadline: Deadline = None,
        request: Request | None = None,
    ) -> JobRecord:
        """Create a fresh invoice for an order whose invoice failed; see
        :meth:`invoice_worker.reissue.Reissuer.reissue` (exactly once per failed invoice)."""
        return self.reissuer.reissue(
            foreign_id, generation=generation, deadline=deadline, request=request
        )

    def close(self) -> None:
        """Release broker and Redis connections."""
        self.store.redis.close()
        self.app.close()


_default: Producer | None = None
_default_lock = threading.Lock()


def default_producer() -> Producer:
    """The process-wide Producer, built from the environment on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Producer(Settings.load())
        return _default


def enqueue_invoice(
    request: Request,
    *,
    deadline: Deadline = None,
    callback_task: str | None = None,
    callback_queue: str | None = None,
    status_task: str | None = None,
    status_queue: str | None = None,
) -> JobRecord:
    """Enqueue with the default producer; see :meth:`Producer.enqueue`."""
    return default_producer().enqueue(
        request, deadline=deadline, callback_task=callback_task, callback_queue=callback_queue,
        status_task=status_task, status_queue=status_queue,
    )  # fmt: skip


def enqueue_many(
    requests: Sequence[Request],
    *,
    deadline: Deadline = None,
    callback_task: str | None = None,
    callback_queue: str | None = None,
    status_task: str | None = None,
    status_queue: str | None = None,
) -> list[JobRecord | ConflictError]:
    """Enqueue a batch with the default producer; see :meth:`Producer.enqueue_many`."""
    return default_producer().enqueue_many(
        requests, deadline=deadline, callback_task=callback_task, callback_queue=callback_queue,
        status_task=status_task, status_queue=status_queue,
    )  # fmt: skip


def get_invoice(foreign_id: str) -> JobRecord | None:
    """Return the job record, or None; see :meth:`Producer.get`."""
    return default_producer().get(foreign_id)


def wait_for_invoice(foreign_id: str, timeout: float) -> JobRecord | None:
    """Wait for a final state; see :meth:`Producer.wait`."""
    return default_producer().wait(foreign_id, timeout)


def wait_for_status(foreign_id: str, statuses: Iterable[str], timeout: float) -> JobRecord | None:
    """Wait for an invoice status; see :meth:`Producer.wait_for_status`."""
    return default_producer().wait_for_status(foreign_id, statuses, timeout)


def reissue_invoice(
    foreign_id: str,
    *,
    generation: int | None = None,
    deadline: Deadline = None,
    request: Request | None = None,
) -> JobRecord:
    """Re-issue a failed invoice with the default producer; see :meth:`Producer.reissue`."""
    return default_producer().reissue(
        foreign_id, generation=generation, deadline=deadline, request=request
    )
