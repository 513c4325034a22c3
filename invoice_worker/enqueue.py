"""What enqueueing means, without the I/O: shared by ``producer.Producer`` (sync) and
``aio.AsyncProducer`` (asyncio), which differ only in how they talk to Redis.

The rules: a request becomes the task message the worker will decode (validated by the same
model), a message becomes a NewJob (and, on the atomic path, the broker envelope the enqueue
script pushes), and the script's replies become records, ConflictErrors, messages still to send
and a NotDurableError. Messages that go through Celery (broker not the state Redis) are sent by
:func:`publish`, a blocking call the asyncio side runs in a thread.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

import redis
from celery import Celery

from invoice_worker.config import REDIS_SCHEMES, Settings
from invoice_worker.constants import TASK_NAME, InvoiceStatus
from invoice_worker.errors import ConflictError, InvalidRequestError, NotDurableError
from invoice_worker.message import TaskMessage, redis_envelope, unix_deadline
from invoice_worker.models import InvoiceRequest, parse_request
from invoice_worker.privacy import kwargs_repr
from invoice_worker.record import JobRecord
from invoice_worker.scripts import Enqueued, NewJob

Deadline = datetime | float | None
Request = InvoiceRequest | Mapping[str, Any]
Result = JobRecord | ConflictError


@dataclass(frozen=True)
class Routes:
    """Where the worker and the receiver send a job's records (see ``Producer.enqueue``)."""

    callback_task: str | None = None
    callback_queue: str | None = None
    status_task: str | None = None
    status_queue: str | None = None


def is_atomic(settings: Settings) -> bool:
    """Whether broker and job state are one Redis: then the record and its message are written
    by one script, so no crash can leave a queued record without a message (and it is one
    round trip instead of two). Otherwise messages go through Celery after the record."""
    url = settings.broker_url
    return url.startswith(REDIS_SCHEMES) and url == settings.state_url


def task_message(
    request: Request, deadline: Deadline, routes: Routes, settings: Settings
) -> TaskMessage:
    """The task message, validated by the same model the worker decodes it with.

    Raises:
        InvalidRequestError: the request or an option breaks a rule, fields named.
    """
    options = {"deadline": unix_deadline(deadline), "callback_task": routes.callback_task}
    options.update(callback_queue=routes.callback_queue, status_task=routes.status_task)
    options["status_queue"] = routes.status_queue
    return TaskMessage.parse({"request": parse_request(request), **options}, queue=settings.queue)


def task_messages(
    requests: Sequence[Request], deadline: Deadline, routes: Routes, settings: Settings
) -> list[TaskMessage]:
    """:func:`task_message` for a batch, all or nothing.

    Raises:
        InvalidRequestError: some request breaks a rule; fields are named ``[i].field``.
    """
    messages, errors = [], {}
    for i, request in enumerate(requests):
        try:
            messages.append(task_message(request, deadline, routes, settings))
        except InvalidRequestError as exc:
            errors.update({f"[{i}].{name}": rule for name, rule in exc.errors.items()})
    if errors:
        raise InvalidRequestError(errors)
    return messages


def new_job(message: TaskMessage, settings: Settings, app: Celery, *, atomic: bool) -> NewJob:
    """The job to record for ``message`` under a fresh task id; with ``atomic``, carrying the
    broker envelope the enqueue script pushes with the record."""
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
    queue = settings.queue
    kwargs = message.kwargs()
    envelope = redis_envelope(app, kwargs, task_id, queue) if atomic else ""
    return NewJob(
        foreign_id, task_id, message.fingerprint(), fields, json.dumps(kwargs), envelope, queue
    )


@contextmanager
def refused_for_want_of_replicas(jobs: Sequence[NewJob]) -> Iterator[None]:
    """Turn the primary's NOREPLICAS refusal (``min-replicas-to-write``) into NotDurableError."""
    try:
        yield
    except redis.ResponseError as exc:
        if "NOREPLICAS" not in str(exc):
            raise
        raise NotDurableError([job.foreign_id for job in jobs]) from None


class Send(NamedTuple):
    """A message still to publish through Celery; ``new``: its record was just created (undo
    it with ``discard`` if the publish fails, so a retry starts clean)."""

    message: TaskMessage
    task_id: str
    new: bool


@dataclass
class Outcome:
    """What the enqueue script's replies mean for the caller."""

    results: list[Result] = field(default_factory=list)
    sends: list[Send] = field(default_factory=list)
    #: Set when some write was not confirmed in time (raised after the sends).
    not_durable: NotDurableError | None = None

    @classmethod
    def of(
        cls, messages: Sequence[TaskMessage], jobs: Sequence[NewJob], replies: Sequence[Enqueued]
    ) -> Outcome:
        out = cls()
        for message, job, reply in zip(messages, jobs, replies, strict=True):
            if reply.record is None:
                out.results.append(ConflictError(job.foreign_id))
                continue
            if reply.new and not job.message:
                out.sends.append(Send(message, job.task_id, True))
            elif reply.resend:
                # Still queued long after it was sent: its message may be lost. A second
                # message is harmless; the worker's claim absorbs it.
                out.sends.append(Send(message, reply.record.task_id, False))
            out.results.append(reply.record)
        if not all(reply.durable for reply in replies):
            out.not_durable = NotDurableError([job.foreign_id for job in jobs])
        return out

    def checked(self) -> list[Result]:
        """The results, once the sends went out.

        Raises:
            NotDurableError: some write was not confirmed in time. The messages were sent even
                so: a write that is merely late must not leave its job waiting for the sweeper;
                the caller learns that a failover now could lose it, and enqueues again.
        """
        if self.not_durable is not None:
            raise self.not_durable
        return self.results


def one(results: list[Result]) -> JobRecord:
    """The record of a single enqueue, or its ConflictError raised."""
    [result] = results
    if isinstance(result, ConflictError):
        raise result
    return result


def publish(app: Celery, queue: str, sends: Sequence[Send]) -> None:
    """Send ``sends`` through Celery in one batch (blocking; the caller undoes on failure)."""
    with app.producer_or_acquire() as producer, producer.batch(max_size=2 * len(sends)):
        for message, task_id, _ in sends:
            kwargs = message.kwargs()
            app.send_task(
                TASK_NAME, kwargs=kwargs, task_id=task_id, queue=queue, producer=producer,
                argsrepr="()", kwargsrepr=kwargs_repr(kwargs),
            )  # fmt: skip


def status_in(statuses: Iterable[str]) -> Callable[[JobRecord], bool]:
    """The ``until`` of a wait for one of ``statuses`` (``InvoiceStatus`` values).

    Raises:
        ValueError: a status that is not an InvoiceStatus.
    """
    wanted = {InvoiceStatus(status) for status in statuses}
    return lambda record: record.invoice_status in wanted
