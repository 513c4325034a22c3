"""Thin Celery task wrappers: decode, run the plain job function, map its outcome to Celery."""

from __future__ import annotations

import logging
import os
from typing import Any

import redis
from celery import Celery, Task

from invoice_worker.attempt import backoff, full_jitter
from invoice_worker.client import ProviderClient
from invoice_worker.config import Settings
from invoice_worker.constants import TASK_NAME
from invoice_worker.job import InvoiceJob, safe_task_id
from invoice_worker.privacy import kwargs_repr
from invoice_worker.queues import broker_countdown
from invoice_worker.record import JobRecord
from invoice_worker.store import JobStore

log = logging.getLogger(__name__)

#: Deliveries of one message that may end in an unexpected exception before it is dropped.
UNEXPECTED_ERROR_RETRIES = 10


class Runtime:
    """Per-process collaborators, built lazily so prefork children never share sockets."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pid: int | None = None
        self._job: InvoiceJob | None = None

    @property
    def job(self) -> InvoiceJob:
        if self._job is None or self._pid != os.getpid():
            store = JobStore.from_settings(self.settings)
            self._job = InvoiceJob(
                store, ProviderClient.from_settings(self.settings), self.settings
            )
            self._pid = os.getpid()
        return self._job


def register(app: Celery, settings: Settings) -> Task:
    """Register ``invoices.create`` on ``app``; returns the task."""
    runtime = Runtime(settings)

    class InvoiceTask(Task):  # type: ignore[misc]
        def retry(self, *args: Any, countdown: float | None = None, **options: Any) -> Any:
            # On a quorum queue a countdown under a second would fail to publish, and Celery
            # then rejects the message (to the dead-letter queue) instead of retrying it.
            countdown = broker_countdown(settings, countdown)
            return super().retry(*args, countdown=countdown, **options)

        def record_invalid(self, kwargs: Any, task_id: str) -> None:
            """Record a message of ours that Celery cannot even call the task with (its kwargs
            not an object): ``failed`` / ``invalid_message``, like any invalid message."""
            owner = f"consumer:{os.getpid()}:{runtime.job.store.token()}"
            runtime.job.run(kwargs, task_id=task_id or "unknown", owner=owner)

        def on_failure(
            self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
        ) -> None:
            # Celery calls ``run(*args, **kwargs)`` itself, so a body whose kwargs is not an
            # object fails before our code runs (where the consumer did not catch it first).
            if not isinstance(kwargs, dict) or not isinstance(args, list | tuple):
                self.record_invalid(kwargs, task_id)

    @app.task(  # type: ignore[untyped-decorator]
        base=InvoiceTask,
        shared=False,  # this app only: a shared task is registered on every app built later
        name=TASK_NAME,
        bind=True,
        # Late ack is safe only because the job is idempotent (claim + lease + foreign_id).
        acks_late=True,
        max_retries=None,  # attempts are counted and capped in the job record instead
        typing=False,  # a malformed message must reach our decoder, not fail in Celery
    )
    def create_invoice(self: Task, *args: Any, **kwargs: Any) -> str | None:
        """Create one invoice exactly once; see invoice_worker.job for the state machine."""
        if args:
            kwargs = {**kwargs, "args": list(args)}
        task_id = self.request.id or "unknown"
        owner = f"{self.request.hostname}:{os.getpid()}:{runtime.job.store.token()}"
        try:
            outcome = runtime.job.run(kwargs, task_id=task_id, owner=owner)
        except redis.RedisError as exc:
            # The job state is unreachable: hand the message back rather than lose it.
            delay = full_jitter(backoff(self.request.retries + 1, 1.0, settings.retry_cap))
            log.warning(
                "task=%s outcome=store_unavailable error=%s in=%.1fs",
                safe_task_id(task_id),
                type(exc).__name__,
                delay,
            )
            raise self.retry(countdown=delay, kwargsrepr=kwargs_repr(kwargs)) from None
        except Exception:
            # A bug outside the provider call. Retrying after the lease lets the next delivery
            # resume the job; the record's crash counter fails it if this keeps happening.
            log.exception("task=%s outcome=unexpected_error", safe_task_id(task_id))
            if self.request.retries >= UNEXPECTED_ERROR_RETRIES:
                raise
            raise self.retry(countdown=settings.lease, kwargsrepr=kwargs_repr(kwargs)) from None
        if outcome.retry_in is not None:
            raise self.retry(countdown=outcome.retry_in, kwargsrepr=kwargs_repr(kwargs))
        record = outcome.record
        if record is not None and record.callback_task and not record.callback_sent:
            _send_callback(app, runtime.job.store, record)
        return _summary(record)

    return create_invoice


def _send_callback(app: Celery, store: JobStore, record: JobRecord) -> None:
    """Send the final record to the producer's task: at least once (marked after sending)."""
    if not record.final:
        return
    app.send_task(
        record.callback_task, args=[record.to_dict()], queue=record.callback_queue,
        argsrepr="(<job record>)",
    )  # fmt: skip
    store.mark(record.foreign_id, callback_sent=1)


def _summary(record: JobRecord | None) -> str | None:
    """What Celery (and Flower) show as the task result: short (Celery renders it into a log
    line and an event per job), no personal data, no secrets."""
    if record is None:
        return None
    return f"{record.state} {record.url or record.error_code or ''}".rstrip()
