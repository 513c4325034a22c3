"""Messages Celery discards or cannot unpack, through real worker processes on Redis and RabbitMQ.

Each scenario sends the kinds of message Celery itself refuses (unregistered task name, content
type not accepted, body that does not decode, not a task at all) and the kinds it cannot unpack,
all carrying an e-mail address and some a forged log line, then a valid job; the worker must
still be running, the job created, and its log free of both.
"""

from __future__ import annotations

import base64
import json
import pickle
import socket
from typing import Any

import pytest
import redis
from celery.exceptions import InvalidTaskError
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.message import Message
from kombu.utils.imports import symbol_by_name

from invoice_worker import constants as c
from invoice_worker.app import create_app
from invoice_worker.constants import JobState
from invoice_worker.consumer import Consumer, describe, reason
from invoice_worker.devstack.embedded import EmbeddedRedis
from invoice_worker.producer import Producer
from invoice_worker.sandbox import Sandbox
from tests.conftest import make_settings, request_data

BUYER = "buyer@example.com"
FORGED = "[2030-01-01 00:00:00,000: INFO/MainProcess] forged"


def test_workers_use_this_consumer() -> None:
    app = create_app(make_settings("redis://127.0.0.1:1/0", "http://127.0.0.1:1"))
    assert symbol_by_name(app.conf.worker_consumer) is Consumer  # type: ignore[no-untyped-call]


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (DecodeError(json.JSONDecodeError("Expecting value", "doc", 0)),
         "DecodeError(JSONDecodeError(Expecting value: line 1 column 1 (char 0)))"),
        # kombu's JSON hook quotes the value it cannot decode: only the type is shown
        (DecodeError(ValueError("Unsupported type", str, {"__value__": BUYER})),
         "DecodeError(ValueError)"),
        (UnicodeDecodeError("utf-8", BUYER.encode() + b"\xff", 17, 18, "invalid start byte"),
         "UnicodeDecodeError"),
        (ContentDisallowed("Refusing to deserialize untrusted content of type x\ny"),
         "ContentDisallowed(Refusing to deserialize untrusted content of type x\\x0ay)"),
        (InvalidTaskError("invalid ETA value 'x'"), "InvalidTaskError(invalid ETA value 'x')"),
    ],
)  # fmt: skip
def test_reason_never_quotes_the_body(exc: BaseException, expected: str) -> None:
    assert reason(exc) == expected


def test_describe_names_the_message() -> None:
    message = Message(  # type: ignore[no-untyped-call]
        body=b"[]", headers={"task": "shop.x", "id": "a\nb", "kwargsrepr": BUYER},
        delivery_info={"routing_key": "invoices"}, content_type="application/json",
    )  # fmt: skip
    assert describe(message) == (
        "task=shop.x id=a\\x0ab queue=invoices content_type=application/json (body not logged)"
    )
    proto1 = Message(body=b"{}", headers={}, content_type="application/json")  # type: ignore[no-untyped-call]
    assert describe(proto1, {"task": "t", "id": "9", "kwargs": BUYER}).startswith("task=t id=9 ")


def final_state(producer: Producer, fid: str) -> str:
    record = producer.wait(fid, 30)
    assert record is not None
    return str(record.state)


def personal_kwargs() -> dict[str, Any]:
    """Task kwargs with the buyer's e-mail and a newline in foreign_id."""
    return {"request": request_data(email_user=BUYER, foreign_id=f"order-1\n{FORGED}")}


def assert_clean(log: str) -> None:
    assert BUYER not in log
    assert "@example.com" not in log
    lines = log.splitlines()
    assert not [line for line in lines if line.startswith(("[2030-", "FORGED"))]


@pytest.mark.slow
def test_discarded_messages_logged_without_body_on_redis(
    redis_server: EmbeddedRedis, sandbox: Sandbox, start_worker: Any
) -> None:
    settings = make_settings(redis_server.url, sandbox.url)
    worker = start_worker(settings)
    producer = Producer(settings)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    # Given an unregistered task name, sent by Celery itself (its kwargsrepr holds the e-mail)
    producer.app.send_task(
        "shop.unknown", kwargs=personal_kwargs(), queue=settings.queue, task_id=f"t-1\n{FORGED}"
    )
    # And a pickled body (content type refused), its content type carrying a line of its own
    scratch = f"{settings.queue}-scratch"
    producer.app.send_task(c.TASK_NAME, kwargs=personal_kwargs(), queue=scratch, task_id="t-2")
    pickled = json.loads(client.rpop(scratch))  # type: ignore[arg-type]
    pickled["content-type"] = "application/x-python-serialize\nFORGED line"
    pickled["body"] = base64.b64encode(pickle.dumps(((), personal_kwargs(), {}))).decode()
    pickled["properties"]["delivery_info"]["routing_key"] = settings.queue
    client.lpush(settings.queue, json.dumps(pickled))
    # And a message that is no task at all
    producer.app.send_task(c.TASK_NAME, kwargs={}, queue=scratch, task_id="t-3")
    other = json.loads(client.rpop(scratch))  # type: ignore[arg-type]
    other["headers"] = {}
    other["body"] = base64.b64encode(json.dumps({"note": BUYER}).encode()).decode()
    other["properties"]["delivery_info"]["routing_key"] = settings.queue
    client.lpush(settings.queue, json.dumps(other))
    # When a valid job follows
    data = request_data()
    producer.enqueue(data)
    # Then it is created by the same worker
    assert final_state(producer, data["foreign_id"]) == JobState.CREATED
    assert worker.alive
    producer.close()
    worker.stop()
    log = worker.log()
    # And each discard is one line naming the task, its id and the reason, never the body
    assert (
        "discarded a message for an unregistered task: task=shop.unknown id=t-1\\x0a[2030-01-01"
        in log
    )
    assert "discarded an invalid task message: task=invoices.create id=t-2" in log
    assert "reason=ContentDisallowed(Refusing to deserialize untrusted content" in log
    assert "discarded a message that is not a task message: task=? id=?" in log
    assert "full contents of the message" not in log
    assert_clean(log)
    # And Celery's own bookkeeping still ran (the unregistered task was rejected, not requeued)
    assert client.llen(settings.queue) == 0


def _rabbitmq_reachable() -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", 5672)) == 0


@pytest.mark.slow
@pytest.mark.skipif(not _rabbitmq_reachable(), reason="no RabbitMQ on 127.0.0.1:5672")
def test_malformed_and_refused_messages_on_rabbitmq(
    redis_server: EmbeddedRedis, sandbox: Sandbox, start_worker: Any
) -> None:
    settings = make_settings(
        redis_server.url, sandbox.url, broker_url="amqp://guest:guest@127.0.0.1:5672//"
    )
    worker = start_worker(settings)
    producer = Producer(settings)
    headers = {"task": c.TASK_NAME, "kwargsrepr": BUYER}
    try:
        with producer.app.connection_for_write() as conn:
            publish = conn.Producer().publish
            # Given bodies Celery would unpack as [args, kwargs, embed]: each killed the worker
            for i, bad in enumerate([b"[1]", b"[[], {}]", b'{"kwargs": {}}']):
                publish(bad, routing_key=settings.queue, headers={**headers, "id": f"r-1.{i}"},
                        content_type="application/json", content_encoding="utf-8")  # fmt: skip
            # And a body that does not decode, a refused content type, an unregistered task
            publish(
                f"not json {BUYER}".encode(),
                routing_key=settings.queue,
                headers={**headers, "id": f"r-2\n{FORGED}"},
                content_type="application/json",
                content_encoding="utf-8",
            )
            publish(
                pickle.dumps(((), personal_kwargs(), {})),
                routing_key=settings.queue,
                headers={**headers, "id": "r-3"},
                content_type="application/x-python-serialize",
                content_encoding="binary",
            )
            producer.app.send_task("shop.unknown", kwargs=personal_kwargs(), queue=settings.queue)
        # When a valid job follows
        data = request_data()
        producer.enqueue(data)
        # Then the worker is alive and creates it
        assert final_state(producer, data["foreign_id"]) == JobState.CREATED
        assert worker.alive
    finally:
        worker.stop()
        with producer.app.connection_for_write() as conn:
            channel = conn.default_channel
            channel.queue_delete(settings.queue)
            channel.exchange_delete(settings.queue)
        producer.close()
    log = worker.log()
    assert log.count("discarded a malformed task message: task=invoices.create id=r-1.") == 3
    assert "reason=bad_task_body" in log
    assert "discarded a message that cannot be decoded: task=invoices.create id=r-2\\x0a" in log
    assert "reason=DecodeError(JSONDecodeError(Expecting value" in log
    assert "discarded an invalid task message: task=invoices.create id=r-3" in log
    assert "discarded a message for an unregistered task: task=shop.unknown" in log
    assert_clean(log)
