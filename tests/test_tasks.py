"""The task wrapper (invoice_worker.tasks) without eager mode: its registered options, the
result summary, and the callback sent through a real Redis broker.

The task body itself runs in real worker processes in tests/test_worker.py.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
import redis
from celery import Celery, Task
from kombu.connection import Connection

from invoice_worker.app import create_app
from invoice_worker.config import Settings
from invoice_worker.constants import TASK_NAME, JobState
from invoice_worker.job import InvoiceJob
from invoice_worker.record import JobRecord
from invoice_worker.tasks import _send_callback, _summary
from tests.conftest import job_kwargs, make_job, make_settings


@pytest.fixture
def app(settings: Settings) -> Iterator[Celery]:
    app = create_app(settings)
    yield app
    app.close()


@pytest.fixture
def job(settings: Settings) -> InvoiceJob:
    return make_job(settings)


@pytest.fixture
def callback_queue(settings: Settings, redis_client: redis.Redis) -> Iterator[str]:
    queue = f"{settings.queue}-callbacks"
    yield queue
    redis_client.delete(queue, f"_kombu.binding.{queue}")


def test_registered_options() -> None:
    app = create_app(make_settings("redis://127.0.0.1:1/0", "http://127.0.0.1:1"))
    task = app.tasks[TASK_NAME]
    assert task.name == TASK_NAME == "invoices.create"
    # Late ack is safe only because the job is idempotent.
    assert task.acks_late is True
    # A malformed message must reach our decoder, not fail in Celery's signature check.
    assert task.typing is False
    # Attempts are capped in the job record, never by Celery.
    assert task.max_retries is None
    # bind=True: the body reads its own request (id, hostname, retries).
    assert task.run.__self__ is task
    # on_failure records a message whose kwargs Celery could not even pass to the body.
    assert type(task).on_failure is not Task.on_failure


@pytest.mark.parametrize(
    ("record", "summary"),
    [
        (None, None),
        (
            JobRecord("o-1", JobState.CREATED, url="https://pay.example.com/i/1"),
            "created https://pay.example.com/i/1",
        ),
        (
            JobRecord("o-1", JobState.FAILED, error_code="validation_error"),
            "failed validation_error",
        ),
        (JobRecord("o-1", JobState.EXPIRED, error_code="expired"), "expired expired"),
        (JobRecord("o-1", JobState.RETRYING), "retrying"),
        (JobRecord("o-1", JobState.QUEUED), "queued"),
    ],
)
def test_summary(record: JobRecord | None, summary: str | None) -> None:
    assert _summary(record) == summary


def test_summary_never_shows_the_error_text() -> None:
    # error holds provider text (masked, but long); the summary is one short token per job.
    record = JobRecord(
        "o-1", JobState.FAILED, error_code="validation_error", error="The title is too long " * 20
    )
    assert _summary(record) == "failed validation_error"


def test_callback_is_sent_to_its_queue_and_marked(
    app: Celery,
    job: InvoiceJob,
    settings: Settings,
    redis_client: redis.Redis,
    callback_queue: str,
) -> None:
    # Given a job run to its end with a callback task
    kwargs = job_kwargs()
    kwargs |= {"callback_task": "shop.invoice_done", "callback_queue": callback_queue}
    outcome = job.run(kwargs, task_id="task-cb", owner="owner-1")
    record = outcome.record
    assert record is not None
    assert record.state == JobState.CREATED
    assert not record.callback_sent
    # When the wrapper sends the callback
    _send_callback(app, job.store, record)
    # Then one message for shop.invoice_done waits on the callback queue, carrying the record
    entries = redis_client.lrange(callback_queue, 0, -1)
    assert len(entries) == 1
    assert redis_client.llen(settings.queue) == 0
    envelope = json.loads(entries[0])
    assert envelope["headers"]["task"] == "shop.invoice_done"
    assert envelope["headers"]["argsrepr"] == "(<job record>)"
    args, task_kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
    assert args == [record.to_dict()]
    assert task_kwargs == {}
    assert "buyer@example.com" not in entries[0]
    # And a plain kombu consumer (the shop's Celery) reads it
    with Connection(settings.broker_url) as conn:  # type: ignore[no-untyped-call]
        message = conn.SimpleQueue(callback_queue, no_ack=True).get(timeout=5)
        assert message.headers["task"] == "shop.invoice_done"
        assert message.decode()[0] == [record.to_dict()]
    # And the record says so, so a redelivery does not send it again
    stored = job.store.get(record.foreign_id)
    assert stored is not None
    assert stored.callback_sent


def test_no_callback_before_the_job_is_final(
    app: Celery, job: InvoiceJob, redis_client: redis.Redis, callback_queue: str
) -> None:
    record = JobRecord(
        "o-unfinished", JobState.RETRYING, callback_task="shop.done", callback_queue=callback_queue
    )
    _send_callback(app, job.store, record)
    assert redis_client.llen(callback_queue) == 0
    assert job.store.get("o-unfinished") is None
