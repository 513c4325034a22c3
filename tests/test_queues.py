"""RabbitMQ quorum queues: what is declared, and the job on them with real worker processes.

The broker tests run in a virtual host of their own, created with ``rabbitmqctl`` and deleted
afterwards (with everything in it): native delayed delivery declares vhost-wide exchanges and
queues (``celery_delayed_*``) that must not be left behind in a shared one.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import pytest
from kombu.transport.native_delayed_delivery import calculate_routing_key

from invoice_worker import cli
from invoice_worker.config import Settings
from invoice_worker.constants import QUORUM_DELIVERY_LIMIT, TASK_NAME, JobState, QueueType
from invoice_worker.devstack.embedded import EmbeddedRedis
from invoice_worker.devstack.processes import ChildProcess, worker_process
from invoice_worker.enqueue import Routes, new_job, task_message
from invoice_worker.errors import ConfigError
from invoice_worker.producer import Producer
from invoice_worker.queues import (
    broker_countdown,
    dead_letter_arguments,
    dead_letter_queue,
    quorum_arguments,
    quorum_support,
)
from invoice_worker.record import JobRecord
from invoice_worker.sandbox import Faults, Sandbox
from invoice_worker.sweeper import broker_queue_depth
from tests.conftest import KEY, MIN_AMOUNT, SECRET, live, make_settings, request_data

#: Retry-After of the module's sandbox: a countdown longer than the sweeper's margin (5 s).
PARK = 6
SWEEP_MARGIN = 5


# Without a broker


@pytest.mark.parametrize(
    ("queue_type", "seconds", "expected"),
    [("classic", 0.3, 0.3), ("quorum", 0.3, 1.0), ("quorum", 0.01, 1.0), ("quorum", 1.0, 1.0),
     ("quorum", 1.2, 2.0), ("quorum", 59.99, 60.0), ("quorum", None, None), ("quorum", 0, 0)],
)  # fmt: skip
def test_countdowns_are_whole_seconds_on_quorum(
    queue_type: str, seconds: float | None, expected: float | None
) -> None:
    settings = Settings(
        _env_file=None, broker_url="amqp://guest@localhost//", redis_url="redis://localhost/0",
        queue_type=queue_type,
    )  # fmt: skip
    assert broker_countdown(settings, seconds) == expected


def test_native_delayed_delivery_refuses_a_countdown_under_a_second() -> None:
    # Why countdowns are rounded up: Celery passes int(countdown), and kombu refuses 0 (the retry
    # then fails to publish, and Celery rejects the message instead of retrying it).
    with pytest.raises(ValueError, match="positive"):
        calculate_routing_key(int(0.5), "invoices")
    assert calculate_routing_key(5, "invoices").endswith("1.0.1.invoices")


def test_quorum_arguments_name_their_dead_letter_target() -> None:
    assert quorum_arguments("invoices") == {
        "x-queue-type": "quorum",
        "x-delivery-limit": QUORUM_DELIVERY_LIMIT,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "invoices.dead-letter",
    }
    assert dead_letter_arguments()["x-queue-type"] == "quorum"
    assert dead_letter_arguments()["x-overflow"] == "drop-head"


@pytest.mark.parametrize(
    ("product", "version", "supported"),
    [("RabbitMQ", "3.10.8", True), ("RabbitMQ", "4.1.0", True), ("RabbitMQ", "3.9.29", False),
     ("RabbitMQ", "3.8.0", False), ("LavinMQ", "2.1.0", False)],
)  # fmt: skip
def test_quorum_needs_rabbitmq_3_10(product: str, version: str, supported: bool) -> None:
    # An older broker cannot be run here: only its handshake is faked.
    properties = {"product": product, "version": version}
    connection = SimpleNamespace(connection=SimpleNamespace(server_properties=properties))
    if supported:
        assert quorum_support(connection) == f"{product} {version}"
    else:
        with pytest.raises(ConfigError, match=r"needs RabbitMQ 3\.10 or later .*found"):
            quorum_support(connection)


# A private virtual host


def rabbitmq_reachable() -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", 5672)) == 0


def rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=False
    )


def listing(vhost: str, what: str, *columns: str) -> list[dict[str, Any]]:
    """``rabbitmqctl list_<what>`` of the vhost as dicts (the management API may be off)."""
    done = rabbitmqctl(f"list_{what}", "-p", vhost, *columns, "--formatter", "json")
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


def arguments(row: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, _, value in row["arguments"]}


@pytest.fixture(scope="module")
def vhost() -> Iterator[str]:
    if not rabbitmq_reachable():
        pytest.skip("no RabbitMQ on 127.0.0.1:5672")
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl not found: a private vhost is needed (see the module docstring)")
    name = f"invoice-test-{uuid.uuid4().hex[:8]}"
    made = rabbitmqctl("add_vhost", name)
    if made.returncode != 0:
        pytest.skip(f"cannot create a private vhost with rabbitmqctl: {made.stderr.strip()[:200]}")
    try:
        allowed = rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        assert allowed.returncode == 0, allowed.stderr
        yield name
    finally:
        rabbitmqctl("delete_vhost", name)


def amqp_url(vhost: str) -> str:
    return f"amqp://guest:guest@127.0.0.1:5672/{quote(vhost, safe='')}"


# The job on quorum queues, with one threads worker shared by the module's tests


Stack = tuple[Settings, Producer, ChildProcess]


@pytest.fixture(scope="module")
def park_sandbox() -> Iterator[Sandbox]:
    with Sandbox(KEY, SECRET, min_amount=MIN_AMOUNT, faults=Faults(retry_after=PARK)) as server:
        yield server


@pytest.fixture(scope="module")
def stack(
    vhost: str,
    redis_server: EmbeddedRedis,
    park_sandbox: Sandbox,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    settings = make_settings(
        redis_server.url, park_sandbox.url, broker_url=amqp_url(vhost), queue_type="quorum",
        visibility_timeout=SWEEP_MARGIN, retry_cap=PARK,
    )  # fmt: skip
    worker = worker_process(settings, tmp_path_factory.mktemp("worker"), concurrency=4)
    worker.start(ready="ready.")
    producer = Producer(settings)
    yield settings, producer, worker
    producer.close()
    worker.stop()


def final(producer: Producer, foreign_id: str, timeout: float = 30) -> JobRecord:
    record = producer.wait(foreign_id, timeout)
    assert record is not None, foreign_id
    assert record.state == JobState.CREATED, record
    return record


def depth(producer: Producer, queue: str) -> int:
    return broker_queue_depth(producer.app, queue)


def parked(producer: Producer) -> int:
    """Messages waiting in the delay levels a countdown of at most 15 s goes through."""
    return sum(depth(producer, f"celery_delayed_{level}") for level in range(4))


def stat(producer: Producer, field: str) -> int:
    return int(producer.store.redis.hget(producer.store.stats, field) or 0)


@pytest.mark.slow
def test_the_queues_are_quorum_and_route_delayed_messages_back(stack: Stack, vhost: str) -> None:
    settings, _, _ = stack
    queues = {row["name"]: row for row in listing(vhost, "queues", "name", "type", "arguments")}
    # The invoice queue, with its delivery limit and dead-letter target
    assert queues[settings.queue]["type"] == "quorum"
    assert arguments(queues[settings.queue]) == quorum_arguments(settings.queue)
    # Its dead-letter queue, declared by the worker
    dead = queues[dead_letter_queue(settings.queue)]
    assert (dead["type"], arguments(dead)) == ("quorum", dead_letter_arguments())
    # The 28 delay levels of native delayed delivery, quorum too
    levels = [queues[f"celery_delayed_{n}"] for n in range(28)]
    assert {row["type"] for row in levels} == {"quorum"}
    assert arguments(levels[0])["x-message-ttl"] == 1000
    # And a topic exchange that the delay levels' exit routes back to the queue
    exchanges = {row["name"]: row["type"] for row in listing(vhost, "exchanges", "name", "type")}
    assert exchanges[settings.queue] == "topic"
    bindings = listing(vhost, "bindings", "source_name", "destination_name", "routing_key")
    assert {
        "source_name": "celery_delayed_delivery",
        "destination_name": settings.queue,
        "routing_key": f"#.{settings.queue}",
    } in bindings


@pytest.mark.slow
def test_a_job_is_created_end_to_end_and_its_callback_queue_is_quorum(
    stack: Stack, park_sandbox: Sandbox, vhost: str
) -> None:
    settings, producer, _ = stack
    data = request_data()
    callbacks = f"{settings.queue}-callbacks"
    producer.enqueue(data, callback_task="shop.invoice_ready", callback_queue=callbacks)
    record = final(producer, data["foreign_id"])
    [invoice] = live(park_sandbox, data["foreign_id"])
    assert record.url == invoice["url"]
    assert park_sandbox.create_calls(data["foreign_id"]) == 1
    # The callback went to a queue the worker declared quorum
    deadline = time.monotonic() + 10
    while depth(producer, callbacks) == 0:  # sent just after the final transition
        assert time.monotonic() < deadline, "no callback message"
        time.sleep(0.05)
    with producer.app.connection_for_write() as conn, conn.channel() as channel:
        message = channel.basic_get(callbacks, no_ack=True)
    args, _, _ = json.loads(message.body)
    assert args[0]["url"] == record.url
    types = {row["name"]: row["type"] for row in listing(vhost, "queues", "name", "type")}
    assert types[callbacks] == "quorum"


@pytest.mark.slow
def test_transient_failures_are_retried_in_whole_seconds_through_the_broker(
    stack: Stack, park_sandbox: Sandbox
) -> None:
    settings, producer, _ = stack
    data = request_data()
    # Given a provider failing twice (backoffs of 0.05-0.1 s: each rounded up to 1 s)
    park_sandbox.script(["502", "503"], foreign_id=data["foreign_id"])
    started = time.monotonic()
    producer.enqueue(data)
    record = final(producer, data["foreign_id"])
    # Then both retries waited a whole second in the broker, and none was rejected
    assert time.monotonic() - started >= 2.0
    assert record.attempts == 3
    assert len(live(park_sandbox, data["foreign_id"])) == 1
    assert depth(producer, dead_letter_queue(settings.queue)) == 0


@pytest.mark.slow
def test_a_message_the_consumer_cannot_unpack_is_dead_lettered(stack: Stack) -> None:
    settings, producer, worker = stack
    # Given a task message whose id is not a string (Celery's own consumer would exit on it)
    with producer.app.producer_or_acquire() as publisher:
        publisher.publish(
            [[], {}, {}], exchange=settings.queue, routing_key=settings.queue,
            headers={"task": TASK_NAME, "id": 42}, serializer="json",
        )  # fmt: skip
    # Then the worker rejects it to the dead-letter queue, and goes on
    dead = dead_letter_queue(settings.queue)
    deadline = time.monotonic() + 10
    while depth(producer, dead) == 0:
        assert time.monotonic() < deadline, worker.log()[-2000:]
        time.sleep(0.05)
    with producer.app.connection_for_write() as conn, conn.channel() as channel:
        message = channel.basic_get(dead, no_ack=True)
    assert message.headers["x-death"][0]["reason"] == "rejected"
    assert worker.alive


@pytest.mark.slow
def test_a_lost_message_is_sent_again_by_the_sweeper(stack: Stack, park_sandbox: Sandbox) -> None:
    _, producer, _ = stack
    resent = stat(producer, "resent")
    # Given a job recorded whose message never reached the queue (a producer that died between
    # its record and its publish)
    data = request_data()
    message = task_message(data, None, Routes(), producer.settings)
    job = new_job(message, producer.settings, producer.app, atomic=producer.atomic)
    [result] = producer.store.enqueue([job])
    assert result.new
    # When its due time passes, the worker's sweeper sends it again
    record = final(producer, data["foreign_id"], timeout=SWEEP_MARGIN + 20)
    assert park_sandbox.create_calls(data["foreign_id"]) == 1
    assert record.attempts == 1
    assert stat(producer, "resent") == resent + 1


@pytest.mark.slow
def test_a_parked_countdown_is_not_taken_for_a_lost_message(
    stack: Stack, park_sandbox: Sandbox
) -> None:
    settings, producer, _ = stack
    resent = stat(producer, "resent")
    paused = stat(producer, "deferrals:provider_paused")
    first, second = request_data(), request_data()
    # Given a 429 whose Retry-After (6 s) outlasts the sweeper's margin (5 s)
    park_sandbox.script(["429"], foreign_id=first["foreign_id"])
    started = time.monotonic()
    producer.enqueue(first)
    deadline = time.monotonic() + 10
    while getattr(producer.get(first["foreign_id"]), "state", None) != JobState.RETRYING:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # And another job that the fleet gate defers while the provider is paused
    producer.enqueue(second)
    # Then both messages wait in the broker's delay levels, not in the queue or a worker
    seen = 0
    while time.monotonic() - started < PARK - 1:
        seen = max(seen, parked(producer))
        assert depth(producer, settings.queue) == 0
        time.sleep(0.2)
    assert seen == 2
    # And both end created, each with one invoice, the first after its Retry-After
    assert final(producer, first["foreign_id"]).attempts == 2
    assert time.monotonic() - started >= PARK
    assert final(producer, second["foreign_id"]).attempts == 1
    assert park_sandbox.create_calls(second["foreign_id"]) == 1
    assert stat(producer, "deferrals:provider_paused") > paused
    # And the sweeper, which ran every second meanwhile, sent neither again
    assert stat(producer, "resent") == resent


@pytest.mark.slow
def test_the_sweeper_reads_the_ready_depth_of_a_quorum_queue(stack: Stack) -> None:
    settings, _, _ = stack
    # Given a quorum queue no worker consumes, holding three messages
    idle = settings.replace(queue=f"{settings.queue}-idle")
    producer = Producer(idle)
    try:
        for _ in range(3):
            producer.enqueue(request_data())
        assert depth(producer, idle.queue) == 3
        # When one is taken and not yet acknowledged, it no longer counts as waiting
        with producer.app.connection_for_write() as conn, conn.channel() as channel:
            taken = channel.basic_get(idle.queue, no_ack=False)
            assert taken is not None
            assert depth(producer, idle.queue) == 2
        # And a queue that does not exist holds nothing
        assert depth(producer, f"{idle.queue}-never-declared") == 0
    finally:
        producer.close()


def test_queue_type_is_passed_to_worker_processes(tmp_path: Path) -> None:
    settings = make_settings(
        "redis://127.0.0.1:1/0", "http://127.0.0.1:1", broker_url="amqp://guest@127.0.0.1:1//",
        queue_type="quorum",
    )  # fmt: skip
    assert settings.queue_type is QueueType.QUORUM
    env = worker_process(settings, tmp_path).env
    assert env["INVOICE_QUEUE_TYPE"] == "quorum"


@pytest.mark.slow
def test_check_names_the_rabbitmq_that_runs_the_quorum_queue(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:  # fmt: skip
    settings, _, _ = stack
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in [k for k in os.environ if k.startswith("INVOICE_")]:
        monkeypatch.delenv(name)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    assert cli.main(["check", "--no-provider"]) == 0
    [line] = [line for line in capsys.readouterr().out.splitlines() if " broker " in line]
    assert line.startswith("ok")
    assert f"quorum queue {settings.queue} on RabbitMQ " in line
    assert "guest:guest" not in line
