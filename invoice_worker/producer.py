"""What a web app imports: enqueue invoice jobs, read their records, wait for their results.

The module-level functions read ``INVOICE_*`` settings once, on first use, and share one
Producer (thread-safe: redis-py and Celery's producer pool both pool their connections).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import redis
from celery import Celery

from invoice_worker.app import create_app
from invoice_worker.config import REDIS_SCHEMES, Settings
from invoice_worker.constants import TASK_NAME, InvoiceStatus
from invoice_worker.errors import ConflictError, InvalidRequestError, NotDurableError
from invoice_worker.message import TaskMessage, redis_envelope, unix_deadline
from invoice_worker.models import InvoiceRequest, parse_request
from invoice_worker.privacy import kwargs_repr
from invoice_worker.record import JobRecord
from invoice_worker.reissue import Reissuer
from invoice_worker.scripts import NewJob
from invoice_worker.store import JobStore

Deadline = datetime | float | None
Request = InvoiceRequest | Mapping[str, Any]


class Producer:
    """Enqueues jobs and reads their records; build one per process from explicit settings."""

    def __init__(
        self, settings: Settings, *, app: Celery | None = None, store: JobStore | None = None
    ) -> None:
        self.settings = settings
        self.app = app or create_app(settings)
        self.store = store or JobStore.from_settings(settings)
        # Broker and job state in one Redis: the record and its message are written by one
        # script, so no crash can leave a queued record without a message (and it is one
        # round trip instead of two). Otherwise messages go through Celery after the record.
        self.atomic = (
            settings.broker_url.startswith(REDIS_SCHEMES)
            and settings.broker_url == settings.state_url
        )
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
        routes = (callback_task, callback_queue, status_task, status_queue)
        message = self._message(parse_request(request), deadline, *routes)
        [result] = self._enqueue([message])
        if isinstance(result, ConflictError):
            raise result
        return result

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
        messages, errors = [], {}
        routes = (callback_task, callback_queue, status_task, status_queue)
        for i, request in enumerate(requests):
            try:
                messages.append(self._message(parse_request(request), deadline, *routes))
            except InvalidRequestError as exc:
                errors.update({f"[{i}].{field}": rule for field, rule in exc.errors.items()})
        if errors:
            raise InvalidRequestError(errors)
        return self._enqueue(messages)

    def _message(
        self,
        request: InvoiceRequest,
        deadline: Deadline,
        callback_task: str | None,
        callback_queue: str | None,
        status_task: str | None,
        status_queue: str | None,
    ) -> TaskMessage:
        """The task message, validated by the same model the worker decodes it with."""
        options = {"deadline": unix_deadline(deadline), "callback_task": callback_task}
        options.update(callback_queue=callback_queue, status_task=status_task)
        options["status_queue"] = status_queue
        return TaskMessage.parse({"request": request, **options}, queue=self.settings.queue)

    def _enqueue(self, messages: list[TaskMessage]) -> list[JobRecord | ConflictError]:
        jobs = [self._new_job(message) for message in messages]
        try:
            results = self.store.enqueue(jobs)
        except redis.ResponseError as exc:
            # min-replicas-to-write: the primary refused the write for want of replicas.
            if "NOREPLICAS" not in str(exc):
                raise
            raise NotDurableError([job.foreign_id for job in jobs]) from None
        out: list[JobRecord | ConflictError] = []
        sends: list[tuple[TaskMessage, str, bool]] = []  # (message, task_id, record is new)
        for message, job, result in zip(messages, jobs, results, strict=True):
            if result.record is None:
                out.append(ConflictError(job.foreign_id))
                continue
            if result.new and not job.message:
                sends.append((message, job.task_id, True))
            elif result.resend:
                # Still queued long after it was sent: its message may be lost. A second
                # message is harmless; the worker's claim absorbs it.
                sends.append((message, result.record.task_id, False))
            out.append(result.record)
        if sends:
            self._send(sends)
        # Sent even so: a write that is merely late must not leave its job waiting for the
        # sweeper; the caller learns that a failover now could lose it, and enqueues again.
        if not all(result.durable for result in results):
            raise NotDurableError([job.foreign_id for job in jobs])
        return out

    def _new_job(self, message: TaskMessage) -> NewJob:
        foreign_id = message.request.foreign_id
        task_id = str(uuid.uuid4())
        fields = {
            "foreign_id": foreign_id,
            "deadline": message.deadline,
            "callback_task": message.callback_task,
            "callback_queue": message.callback_queue,
            "status_task": message.status_task,
            "status_queue": message.status_queue,
            "provider_foreign_id": foreign_id,
        }
        queue = self.settings.queue
        kwargs = message.kwargs()
        envelope = redis_envelope(self.app, kwargs, task_id, queue) if self.atomic else ""
        return NewJob(
            foreign_id, task_id, message.fingerprint(), fields, json.dumps(kwargs), envelope,
            queue,
        )  # fmt: skip

    def _send(self, sends: list[tuple[TaskMessage, str, bool]]) -> None:
        try:
            with (
                self.app.producer_or_acquire() as producer,
                producer.batch(max_size=2 * len(sends)),
            ):
                for message, task_id, _ in sends:
                    kwargs = message.kwargs()
                    self.app.send_task(
                        TASK_NAME, kwargs=kwargs, task_id=task_id, queue=self.settings.queue,
                        producer=producer, argsrepr="()", kwargsrepr=kwargs_repr(kwargs),
                    )  # fmt: skip
        except Exception:
            # Undo the records whose first message did not go out, so a retry starts clean.
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
        wanted = {InvoiceStatus(status) for status in statuses}
        return self.store.wait(
            foreign_id, timeout, until=lambda record: record.invoice_status in wanted
        )

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
