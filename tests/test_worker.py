"""End to end: real Celery worker processes, real Redis, the sandbox over HTTP. No eager mode."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from invoice_worker import constants as c
from invoice_worker.config import Settings
from invoice_worker.constants import ErrorCode, JobState
from invoice_worker.devstack.embedded import EmbeddedRedis
from invoice_worker.devstack.processes import worker_process
from invoice_worker.errors import ConflictError
from invoice_worker.producer import Producer
from invoice_worker.record import JobRecord
from invoice_worker.sandbox import Faults, Sandbox
from tests.conftest import KEY, SECRET, live, make_settings, request_data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(
    redis_server: EmbeddedRedis, sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, Producer]]:
    """One threads worker shared by the module's tests (each test uses its own foreign_ids)."""
    settings = make_settings(redis_server.url, sandbox.url)
    worker = worker_process(settings, tmp_path_factory.mktemp("worker"), concurrency=8)
    worker.start(ready="ready.")
    producer = Producer(settings)
    yield settings, producer
    producer.close()
    worker.stop()
    # Exactly one final event per job, over every job this module ran.
    counts = Counter(f["foreign_id"] for _, f in producer.store.events())
    assert counts, "no events at all"
    assert max(counts.values()) == 1, [fid for fid, n in counts.items() if n > 1]


def final(producer: Producer, fid: str, timeout: float = 20) -> JobRecord:
    record = producer.wait(fid, timeout)
    assert record is not None
    assert record.state in c.FINAL_STATES, record
    return record


def test_duplicate_enqueues_create_once(stack: tuple[Settings, Producer], sandbox: Sandbox) -> None:
    _, producer = stack
    data = request_data()
    # Given ten web threads enqueueing the same order at once
    results: list[JobRecord] = []
    threads = [
        threading.Thread(target=lambda: results.append(producer.enqueue(data))) for _ in range(10)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then one job, one task, one provider create
    assert len({r.task_id for r in results}) == 1
    record = final(producer, data["foreign_id"])
    assert record.state == JobState.CREATED
    assert sandbox.create_calls(data["foreign_id"]) == 1
    # And enqueueing again afterwards returns the finished job
    assert producer.enqueue(data).url == record.url
    assert sandbox.create_calls(data["foreign_id"]) == 1


def test_conflicting_enqueue_rejected(stack: tuple[Settings, Producer], sandbox: Sandbox) -> None:
    _, producer = stack
    data = request_data()
    producer.enqueue(data)
    with pytest.raises(ConflictError):
        producer.enqueue({**data, "amount": "0.5"})
    record = final(producer, data["foreign_id"])
    assert record.amount == "0.01230000"
    assert sandbox.create_calls(data["foreign_id"]) == 1


@pytest.mark.parametrize("faults", [["500", "502", "503"], ["429_bare", "timeout"]])
def test_transient_errors_retried_to_success(
    stack: tuple[Settings, Producer], sandbox: Sandbox, faults: list[str]
) -> None:
    _, producer = stack
    data = request_data()
    sandbox.script(faults, foreign_id=data["foreign_id"])
    producer.enqueue(data)
    record = final(producer, data["foreign_id"])
    assert record.state == JobState.CREATED
    assert record.attempts == len(faults) + 1
    assert len(live(sandbox, data["foreign_id"])) == 1


def test_429_retry_after_is_waited(stack: tuple[Settings, Producer], sandbox: Sandbox) -> None:
    _, producer = stack
    data = request_data()
    sandbox.script(["429"], foreign_id=data["foreign_id"])
    started = time.monotonic()
    producer.enqueue(data)
    record = final(producer, data["foreign_id"])
    assert record.state == JobState.CREATED
    assert time.monotonic() - started >= sandbox.faults.retry_after * 0.9


def test_permanent_error_fails_at_once(stack: tuple[Settings, Producer], sandbox: Sandbox) -> None:
    _, producer = stack
    data = request_data(amount="0.00001")
    producer.enqueue(data)
    record = final(producer, data["foreign_id"])
    assert (record.state, record.attempts, record.error_code) == (
        JobState.FAILED,
        1,
        "validation_error",
    )
    assert "minimum amount is 10.00 EUR" in str(record.error)
    assert sandbox.create_calls(data["foreign_id"]) == 1


def test_deadline_expires_without_provider_call(
    stack: tuple[Settings, Producer], sandbox: Sandbox
) -> None:
    _, producer = stack
    data = request_data()
    producer.enqueue(data, deadline=time.time() - 1)
    record = final(producer, data["foreign_id"])
    assert (record.state, record.error_code) == (JobState.EXPIRED, ErrorCode.DEADLINE_PASSED)
    assert sandbox.create_calls(data["foreign_id"]) == 0


@pytest.mark.parametrize("fault", ["commit_then_502", "commit_then_drop"])
def test_commit_then_fail_recreates(
    stack: tuple[Settings, Producer], sandbox: Sandbox, fault: str
) -> None:
    _, producer = stack
    data = request_data()
    fid = data["foreign_id"]
    sandbox.script([fault], foreign_id=fid)
    producer.enqueue(data)
    record = final(producer, fid)
    assert record.state == JobState.CREATED
    [invoice] = live(sandbox, fid)
    assert (record.url, record.provider_foreign_id) == (invoice["url"], f"{fid}~r1")


def test_callback_task_receives_the_record(
    stack: tuple[Settings, Producer], redis_server: EmbeddedRedis
) -> None:
    settings, producer = stack
    queue = f"{settings.queue}-callbacks"
    data = request_data()
    producer.enqueue(data, callback_task="shop.invoice_ready", callback_queue=queue)
    record = final(producer, data["foreign_id"])
    raw = redis.Redis.from_url(redis_server.url).brpop([queue], timeout=10)
    assert raw is not None
    message = json.loads(raw[1])
    assert message["headers"]["task"] == "shop.invoice_ready"
    args, _, _ = json.loads(base64.b64decode(message["body"]))
    assert args[0]["url"] == record.url
    assert args[0]["state"] == JobState.CREATED
    assert b"buyer@example.com" not in raw[1]


def test_message_sent_without_the_producer_works(
    stack: tuple[Settings, Producer], sandbox: Sandbox
) -> None:
    settings, producer = stack
    data = request_data()
    producer.app.send_task(c.TASK_NAME, kwargs={"request": data}, queue=settings.queue)
    record = final(producer, data["foreign_id"])
    assert record.state == JobState.CREATED
    assert sandbox.create_calls(data["foreign_id"]) == 1


def test_malformed_messages_recorded_never_retried_worker_survives(
    stack: tuple[Settings, Producer], sandbox: Sandbox
) -> None:
    settings, producer = stack
    good = request_data
    # Given a buggy producer sending every kind of broken message with send_task
    cases: dict[str, tuple[tuple[Any, ...], dict[str, Any], set[str]]] = {
        "types": ((), {"request": good(amount=[1, 2], timer="yes"), "deadline": "x"},
                  {"request.amount", "request.timer", "deadline"}),
        "unknown_type": ((), {"request": good(type="instant")}, {"request.type"}),
        "huge": ((), {"request": good(title="x" * 1_000_000)}, {"request.title"}),
        "missing": ((), {"request": {k: v for k, v in good().items() if k != "currency"}},
                    {"request.currency"}),
        "callback": ((), {"request": good(), "callback_task": 5}, {"callback_task"}),
        "unknown_arg": ((), {"request": good(), "priority": "high"}, {"priority"}),
        "no_request": ((), {}, {"request"}),
        "garbage": ((), {"request": "garbage"}, {"request"}),
        "positional": (("a", 1), {}, {"args", "request"}),
    }  # fmt: skip
    sent = {}
    for name, (args, kwargs, _) in cases.items():
        sent[name] = producer.app.send_task(
            c.TASK_NAME, args=args, kwargs=kwargs, queue=settings.queue
        ).id
    for name, (_, kwargs, fields) in cases.items():
        request = kwargs.get("request")
        fid = request.get("foreign_id") if isinstance(request, dict) else None
        # Then each ends failed with a clear code, naming the bad fields
        record = final(producer, fid or f"invalid-message:{sent[name]}")
        assert (record.state, record.error_code) == (
            JobState.FAILED,
            ErrorCode.INVALID_MESSAGE,
        ), name
        assert fields <= set(record.errors), (name, record.errors)
        assert record.attempts == 1, name
        if fid:
            assert sandbox.create_calls(fid) == 0
    # And the worker is still serving
    ok = request_data()
    producer.enqueue(ok)
    assert final(producer, ok["foreign_id"]).state == JobState.CREATED


def test_fail_orphan_policy(
    redis_server: EmbeddedRedis, sandbox: Sandbox, start_worker: Any
) -> None:
    settings = make_settings(redis_server.url, sandbox.url, orphan_policy="fail")
    start_worker(settings)
    producer = Producer(settings)
    data = request_data()
    sandbox.script(["commit_then_502"], foreign_id=data["foreign_id"])
    producer.enqueue(data)
    record = final(producer, data["foreign_id"])
    producer.close()
    assert (record.state, record.error_code) == (JobState.FAILED, ErrorCode.ORPHANED)


def test_worker_sigkilled_mid_call_creates_exactly_once(
    redis_server: EmbeddedRedis, start_worker: Any
) -> None:
    # Given a provider slow enough to kill the worker while the create is in flight
    with Sandbox(KEY, SECRET, faults=Faults(latency_ms=1500)) as slow:
        # retry_cap must now fit in half the redelivery delay (max_countdown = 1.5 s here).
        settings = make_settings(
            redis_server.url, slow.url, read_timeout=3.0, lease_seconds=8.0, visibility_timeout=3,
            retry_cap=1.5,
        )  # fmt: skip
        first = start_worker(settings, pool="solo", concurrency=1)
        producer = Producer(settings)
        data = request_data()
        fid = data["foreign_id"]
        producer.enqueue(data)
        deadline = time.monotonic() + 10
        while getattr(producer.get(fid), "state", None) != JobState.PROCESSING:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.5)
        # When the worker dies before the answer arrives (the provider still commits)
        first.kill()
        time.sleep(1.5)
        assert slow.create_calls(fid) == 1
        # Then another worker takes the redelivered message and finishes the job
        start_worker(settings, pool="threads", concurrency=2)
        record = final(producer, fid, timeout=40)
        assert record.state == JobState.CREATED, record
        [invoice] = live(slow, fid)
        assert record.url == invoice["url"]
        assert record.crashes == 1
        events = [f for _, f in producer.store.events() if f["foreign_id"] == fid]
        assert len(events) == 1
        producer.close()


def test_worker_refuses_to_start_without_credentials(settings: Settings, tmp_path: Path) -> None:
    worker = worker_process(settings.replace(api_secret=""), tmp_path)
    proc = subprocess.run(
        worker.argv, env=worker.env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode != 0
    assert "INVOICE_API_SECRET must be set" in proc.stdout + proc.stderr


def _rabbitmq_reachable() -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", 5672)) == 0


@pytest.mark.skipif(not _rabbitmq_reachable(), reason="no RabbitMQ on 127.0.0.1:5672")
def test_core_scenario_on_rabbitmq(
    redis_server: EmbeddedRedis, sandbox: Sandbox, start_worker: Any
) -> None:
    # Job state stays in Redis; only the broker changes.
    settings = make_settings(
        redis_server.url, sandbox.url, broker_url="amqp://guest:guest@127.0.0.1:5672//"
    )
    worker = start_worker(settings)
    producer = Producer(settings)
    try:
        jobs = [request_data() for _ in range(6)]
        sandbox.script(["503"], foreign_id=jobs[1]["foreign_id"])
        sandbox.script(["commit_then_502"], foreign_id=jobs[2]["foreign_id"])
        for data in jobs + jobs[:3]:
            producer.enqueue(data)
        for data in jobs:
            record = final(producer, data["foreign_id"])
            assert record.state == JobState.CREATED
            [invoice] = live(sandbox, data["foreign_id"])
            assert record.url == invoice["url"]
        assert sandbox.create_calls(jobs[0]["foreign_id"]) == 1
        events = Counter(f["foreign_id"] for _, f in producer.store.events())
        assert all(events[d["foreign_id"]] == 1 for d in jobs)
    finally:
        worker.stop()  # a consuming worker would declare the deleted queue again
        with producer.app.connection_for_write() as conn:
            channel = conn.default_channel
            channel.queue_delete(settings.queue)
            channel.exchange_delete(settings.queue)
        producer.close()


def test_json_logs_one_line_per_transition_without_secrets(
    redis_server: EmbeddedRedis, sandbox: Sandbox, start_worker: Any
) -> None:
    settings = make_settings(redis_server.url, sandbox.url, log_format="json")
    worker = start_worker(settings)
    producer = Producer(settings)
    data = request_data(email_user="log.leak@example.com")
    sandbox.script(["502"], foreign_id=data["foreign_id"])
    producer.enqueue(data)
    assert final(producer, data["foreign_id"]).state == JobState.CREATED
    producer.close()
    worker.stop()
    lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    job_lines = [line for line in lines if line.get("foreign_id") == data["foreign_id"]]
    assert [line["outcome"] for line in job_lines] == ["retrying", "created"]
    assert all({"task_id", "attempt", "latency_ms"} <= set(line) for line in job_lines)
    assert "log.leak@example.com" not in worker.log()
    assert SECRET not in worker.log()


def test_password_protected_redis(sandbox: Sandbox, start_worker: Any) -> None:
    with EmbeddedRedis(password="s3cret-pass") as protected:
        settings = make_settings(protected.url, sandbox.url)
        worker = start_worker(settings)
        producer = Producer(settings)
        data = request_data()
        producer.enqueue(data)
        assert final(producer, data["foreign_id"]).state == JobState.CREATED
        producer.close()
        worker.stop()
        assert "s3cret-pass" not in worker.log()
