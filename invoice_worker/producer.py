"""What a web app imports: enqueue invoice jobs, read their records, wait for their results.

The module-level functions read ``INVOICE_*`` settings once, on first use, and share one
Producer (thread-safe: redis-py and Celery's producer pool both pool their connections).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from celery import Celery

from invoice_worker import constants as c
from invoice_worker.config import Settings
from invoice_worker.errors import ConflictError, InvalidRequestError
from invoice_worker.message import Message, kwargs_repr, redis_envelope
from invoice_worker.models import InvoiceRequest, parse_request
from invoice_worker.store import JobStore, NewJob

Deadline = datetime | float | None
Request = InvoiceRequest | Mapping[str, Any]
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class Producer:
    """Enqueues jobs and reads their records; build one per process from explicit settings."""

    def __init__(
        self, settings: Settings, *, app: Celery | None = None, store: JobStore | None = None
    ) -> None:
        from invoice_worker.worker import create_app  # the worker module builds an app at import

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

    def enqueue(
        self,
        request: Request,
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
    ) -> list[dict[str, Any] | ConflictError]:
        """Enqueue a batch in one pipelined round trip (plus one batched publish without the
        atomic path); each item behaves as :meth:`enqueue`.

        Returns:
            One entry per request, in order: its record, or a ConflictError (returned, not
            raised, so one reused id does not hold back the rest).

        Raises:
            InvalidRequestError: some request breaks a rule; fields are named ``[i].field``
                and nothing at all is enqueued.
        """
        epoch, messages, errors = _epoch(deadline), [], {}
        for i, request in enumerate(requests):
            try:
                messages.append(
                    Message(parse_request(request), epoch, callback_task, callback_queue)
                )
            except InvalidRequestError as exc:
                errors.update({f"[{i}].{field}": rule for field, rule in exc.errors.items()})
        if errors:
            raise InvalidRequestError(errors)
        return self._enqueue(messages)

    def _enqueue(self, messages: list[Message]) -> list[dict[str, Any] | ConflictError]:
        jobs = [self._new_job(message) for message in messages]
        results = self.store.enqueue(jobs)
        out: list[dict[str, Any] | ConflictError] = []
        sends: list[tuple[Message, str, bool]] = []  # (message, task_id, record is new)
        for message, job, result in zip(messages, jobs, results, strict=True):
            if result.status == "conflict":
                out.append(ConflictError(job.foreign_id))
            elif result.status == "exists":
                assert result.record is not None
                if result.resend:
                    # Still queued long after it was sent: its message may be lost. A second
                    # message is harmless; the worker's claim absorbs it.
                    sends.append((message, result.record["task_id"], False))
                out.append(result.record)
            else:
                if not job.message:
                    sends.append((message, job.fields["task_id"], True))
                out.append({"state": c.QUEUED, "attempts": 0, **job.fields})
        if sends:
            self._send(sends)
        return out

    def _new_job(self, message: Message) -> NewJob:
        foreign_id = message.request.foreign_id
        task_id = str(uuid.uuid4())
        fields = {
            "foreign_id": foreign_id,
            "task_id": task_id,
            "deadline": message.deadline,
            "callback_task": message.callback_task,
            "callback_queue": message.callback_queue,
            "provider_foreign_id": foreign_id,
        }
        fields = {k: v for k, v in fields.items() if v is not None}
        queue = self.settings.queue
        kwargs = message.kwargs()
        envelope = redis_envelope(self.app, kwargs, task_id, queue) if self.atomic else ""
        return NewJob(
            foreign_id, message.fingerprint(), fields, json.dumps(kwargs), envelope, queue
        )

    def _send(self, sends: list[tuple[Message, str, bool]]) -> None:
        try:
            with (
                self.app.producer_or_acquire() as producer,
                producer.batch(max_size=2 * len(sends)),
            ):
                for message, task_id, _ in sends:
                    kwargs = message.kwargs()
                    self.app.send_task(
                        c.TASK_NAME, kwargs=kwargs, task_id=task_id, queue=self.settings.queue,
                        producer=producer, argsrepr="()", kwargsrepr=kwargs_repr(kwargs),
                    )  # fmt: skip
        except Exception:
            # Undo the records whose first message did not go out, so a retry starts clean.
            for message, task_id, new in sends:
                if new:
                    self.store.discard(message.request.foreign_id, task_id)
            raise

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
    request: Request,
    *,
    deadline: Deadline = None,
    callback_task: str | None = None,
    callback_queue: str | None = None,
) -> dict[str, Any]:
    """Enqueue with the default producer; see :meth:`Producer.enqueue`."""
    return default_producer().enqueue(
        request, deadline=deadline, callback_task=callback_task, callback_queue=callback_queue
    )


def enqueue_many(
    requests: Sequence[Request],
    *,
    deadline: Deadline = None,
    callback_task: str | None = None,
    callback_queue: str | None = None,
) -> list[dict[str, Any] | ConflictError]:
    """Enqueue a batch with the default producer; see :meth:`Producer.enqueue_many`."""
    return default_producer().enqueue_many(
        requests, deadline=deadline, callback_task=callback_task, callback_queue=callback_queue
    )


def get_invoice(foreign_id: str) -> dict[str, Any] | None:
    """Return the job record, or None; see :meth:`Producer.get`."""
    return default_producer().get(foreign_id)


def wait_for_invoice(foreign_id: str, timeout: float) -> dict[str, Any] | None:
    """Wait for a final state; see :meth:`Producer.wait`."""
    return default_producer().wait(foreign_id, timeout)
