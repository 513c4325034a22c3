"""Redis clients from URLs: plain ones, and Sentinel ones that follow a failover.

Parsing first, then every component (store, producer, metrics, CLI, a worker process) on a real
primary, replica and three sentinels, each still working after ``failover()`` without being
rebuilt.
"""

from __future__ import annotations

import enum
import os
import uuid
from decimal import Decimal
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.sentinel import SentinelConnectionPool

import invoice_worker
from invoice_worker import cli
from invoice_worker import producer as producer_module
from invoice_worker.app import create_app
from invoice_worker.config import Settings
from invoice_worker.connection import (
    PACKER,
    SentinelURL,
    client_from_url,
    parse_sentinel_url,
    redis_client,
)
from invoice_worker.constants import ClaimStatus, JobState
from invoice_worker.devstack.embedded import EmbeddedRedis, free_port
from invoice_worker.devstack.sentinel import SentinelCluster
from invoice_worker.metrics import serve
from invoice_worker.producer import Producer
from invoice_worker.sandbox import Sandbox
from invoice_worker.store import JobStore
from tests.conftest import SECRET, make_settings, request_data
from tests.test_metrics import scrape


def sentinel_settings(cluster: SentinelCluster, api_url: str, **overrides: Any) -> Settings:
    overrides.setdefault("redis_sentinel_master", cluster.master_name)
    return make_settings(cluster.url, api_url, **overrides)


# -- URLs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sentinel://h1", SentinelURL((("h1", 26379),))),
        (
            "sentinel://:pw@h1:26380/2;sentinel://h2:26381/2",
            SentinelURL((("h1", 26380), ("h2", 26381)), 2, None, "pw"),
        ),
        # login and database may be given once, on any entry; they hold for all
        (
            "sentinel://h1:1;sentinel://u:p%40ss@h2:2/3",
            SentinelURL((("h1", 1), ("h2", 2)), 3, "u", "p@ss"),
        ),
    ],
)
def test_sentinel_urls_parse(url: str, expected: SentinelURL) -> None:
    assert parse_sentinel_url(url) == expected
    assert "pw" not in repr(expected)


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("sentinel://:hunter2@h1;redis://h2", "entry 2 of the URL is not sentinel://"),
        ("sentinel://:hunter2@h1:port", "entry 1 of the URL has an invalid port"),
        ("sentinel://:hunter2@/0", "entry 1 of the URL needs a host"),
        ("sentinel://:hunter2@h1?ssl=1", r"takes no \?options"),
        ("sentinel://:hunter2@h1/x", "database that is not a number"),
        ("sentinel://:hunter2@h1;sentinel://:hunter3@h2", "different values for the password"),
        ("sentinel://:hunter2@h1/1;sentinel://h2/2", "different values for the db"),
    ],
)
def test_malformed_sentinel_urls_are_named_never_shown(url: str, rule: str) -> None:
    with pytest.raises(ValueError, match=rule) as raised:
        parse_sentinel_url(url)
    assert "hunter" not in str(raised.value)


def test_entry_carries_login_and_database() -> None:
    url = parse_sentinel_url("sentinel://h1:1;sentinel://u:pw@h2:2/3")
    assert url.entry(0) == "sentinel://u:pw@h1:1/3"
    assert parse_sentinel_url("sentinel://h1").entry(0) == "sentinel://h1:26379/0"


def test_plain_urls_get_the_store_policy(redis_server: EmbeddedRedis) -> None:
    with client_from_url(redis_server.url, socket_timeout=3) as client:
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["decode_responses"] is True
        assert kwargs["socket_timeout"] == 3
        assert kwargs["health_check_interval"] == 30
        assert kwargs["retry"].get_retries() == 5
        assert client.ping()


class Flag(enum.IntFlag):
    ON = 4


class Money(float):
    pass


PACKED = [
    ("EVALSHA", "a" * 40, 2, "k:1", "k:2", "", "é ü ✓", b"\x00raw", 0, -7, 2**70),
    ("SET", "k", 0.1, 1e-05, 1e20, float("inf"), -0.0, 1 / 3, 12345678.9),
    ("SCRIPT LOAD", "return 1"),
    (b"CLIENT SETNAME", b"name"),
    ("SET", "k", bytearray(b"ab"), memoryview(b"cd")),
    ("HSET", "k", "f", "line\nbreak\r\n", "\x00"),
    ("HSET", "k", JobState.CREATED, ClaimStatus.CLAIMED),  # StrEnum members: their values
    ("SET", "k", memoryview(b"abcd")[::-1]),  # strided views: hiredis alone reads them wrong
    ("SET", "k", memoryview(b"abcdef")[::2], bytearray(b"xy")),
    ("SET", "k", HTTPStatus.OK, Flag.ON, Money(2.5)),  # int and float subclasses: by repr
]


@pytest.mark.parametrize("args", PACKED)
def test_the_packer_writes_what_redis_py_writes(args: tuple[Any, ...]) -> None:
    # The store's clients skip redis-py's per-argument pass in Python (connection.py): the
    # bytes on the wire must not change.
    assert b"".join(PACKER.pack(*args)) == _redis_py_pack(*args)


@pytest.mark.parametrize("bad", [True, None, 1j, [1], {"a": 1}, Decimal("1.5")])
def test_the_packer_refuses_what_redis_py_refuses(bad: Any) -> None:
    with pytest.raises(redis.DataError, match="Invalid input of type"):
        PACKER.pack("SET", "k", bad)
    with pytest.raises(redis.DataError, match="Invalid input of type"):
        _redis_py_pack("SET", "k", bad)


def _redis_py_pack(*args: Any) -> bytes:
    """What redis-py's own packer (hiredis, after its pass in Python) writes."""
    connection: Any = redis.Connection()  # type: ignore[no-untyped-call, unused-ignore]
    return b"".join(bytes(chunk) for chunk in connection.pack_command(*args))


def test_store_and_broker_connections_use_the_packer(redis_server: EmbeddedRedis) -> None:
    with client_from_url(redis_server.url) as client:
        assert client.connection_pool.connection_kwargs["command_packer"] is PACKER
        key = f"packer-{uuid.uuid4().hex}"
        assert client.set(key, "é ✓", ex=60)
        assert client.get(key) == "é ✓"
    app = create_app(make_settings(redis_server.url, "http://127.0.0.1:9/api/v2"))
    with app.connection_for_write() as conn:
        pool = conn.default_channel.client.connection_pool
        assert pool.connection_kwargs["command_packer"] is PACKER
        assert conn.default_channel.client.ping()


def test_another_encoding_keeps_redis_pys_packer(redis_server: EmbeddedRedis) -> None:
    with client_from_url(redis_server.url, encoding="latin-1") as client:
        assert "command_packer" not in client.connection_pool.connection_kwargs
        key = f"packer-{uuid.uuid4().hex}"
        assert client.set(key, "é", ex=60)
        assert client.strlen(key) == 1  # latin-1 on the wire, as asked


def test_a_sentinel_url_needs_a_master_name() -> None:
    with pytest.raises(ValueError, match="master's name"):
        client_from_url("sentinel://127.0.0.1:1")


# -- components through Sentinel ---------------------------------------------------------------


def test_store_and_producer_follow_a_failover(
    sentinel_cluster: SentinelCluster, sandbox: Sandbox
) -> None:
    settings = sentinel_settings(sentinel_cluster, sandbox.url)
    producer = Producer(settings)
    store = JobStore.from_settings(settings)
    assert isinstance(store.redis.connection_pool, SentinelConnectionPool)
    assert producer.atomic  # a Sentinel broker that is the job store: one script
    before = request_data()
    producer.enqueue(before)
    sentinel_cluster.primary.client().wait(1, 2000)  # on the replica before the switch
    # When the sentinels move the master, with both clients' connections open
    old = sentinel_cluster.primary
    new = sentinel_cluster.failover()
    # Then the same objects read what was written and write to the new master
    record = store.get(before["foreign_id"])
    assert record is not None
    assert record.state == JobState.QUEUED
    after = request_data()
    assert producer.enqueue(after).state == JobState.QUEUED
    assert new.client().exists(store.key(after["foreign_id"])) == 1
    assert new.client().llen(settings.queue) == 2
    assert producer.get(after["foreign_id"]) is not None
    pool: Any = store.redis.connection_pool
    assert pool.get_master_address() == new.address != old.address
    producer.close()
    store.redis.close()


def test_module_functions_follow_a_failover(
    sentinel_cluster: SentinelCluster, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = sentinel_settings(sentinel_cluster, sandbox.url)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(producer_module, "_default", None)
    data = request_data()
    invoice_worker.enqueue_invoice(data)
    sentinel_cluster.primary.client().wait(1, 2000)
    sentinel_cluster.failover()
    record = invoice_worker.get_invoice(data["foreign_id"])
    assert record is not None
    assert record.state == JobState.QUEUED
    second = request_data()
    assert invoice_worker.enqueue_invoice(second).state == JobState.QUEUED
    waited = invoice_worker.wait_for_invoice(second["foreign_id"], 0.05)  # pub/sub, new master
    assert waited is not None
    assert waited.state == JobState.QUEUED
    producer_module.default_producer().close()


def test_closing_a_client_closes_its_sentinel_connections(
    sentinel_cluster: SentinelCluster,
) -> None:
    client = client_from_url(sentinel_cluster.url, master_name=sentinel_cluster.master_name)
    assert client.ping()
    pool: Any = client.connection_pool
    manager = pool.sentinel_manager
    opened = [
        s.connection_pool for s in manager.sentinels if s.connection_pool._created_connections
    ]
    assert opened  # discovery asked at least one sentinel
    client.close()
    assert not [c for pool in opened for c in pool._available_connections if c.is_connected]


def test_metrics_exporter_follows_a_failover(
    sentinel_cluster: SentinelCluster, sandbox: Sandbox
) -> None:
    settings = sentinel_settings(sentinel_cluster, sandbox.url)
    port = free_port()
    serve(settings, port, "127.0.0.1")
    producer = Producer(settings)
    producer.enqueue_many([request_data() for _ in range(2)])
    assert scrape(port)[("invoice_queue_depth", (("queue", settings.queue),))] == 2
    sentinel_cluster.primary.client().wait(1, 2000)
    sentinel_cluster.failover()
    producer.enqueue(request_data())
    metrics = scrape(port)
    assert metrics[("invoice_queue_depth", (("queue", settings.queue),))] == 3
    assert metrics[("invoice_jobs", (("state", "queued"),))] == 3
    producer.close()


def test_cli_status_and_check_through_sentinel_never_print_passwords(
    sandbox: Sandbox,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if not SentinelCluster.available():
        pytest.skip("needs redis-server")
    monkeypatch.chdir(tmp_path)
    for name in [k for k in os.environ if k.startswith("INVOICE_")]:
        monkeypatch.delenv(name)
    with SentinelCluster(password="data-pw", sentinel_password="sentinel-pw") as cluster:
        settings = sentinel_settings(cluster, sandbox.url, redis_sentinel_password="sentinel-pw")
        for name, value in settings.to_env().items():
            monkeypatch.setenv(name, value)
        data = request_data()
        Producer(settings).enqueue(data)
        assert cli.main(["status", data["foreign_id"], "--json"]) == 0
        cluster.primary.client().wait(1, 2000)
        cluster.failover()
        assert cli.main(["status", data["foreign_id"], "--json"]) == 0
        assert cli.main(["check", "--no-provider"]) == 0
        out, err = capsys.readouterr()
        assert out.count(f'"foreign_id": "{data["foreign_id"]}"') == 2
        assert "ok    redis        sentinel://:***@127.0.0.1:" in out
        assert "ok    broker       sentinel://:***@127.0.0.1:" in out
        # A wrong sentinel password: discovery fails, named without any password
        monkeypatch.setenv("INVOICE_REDIS_SENTINEL_PASSWORD", "wrong")
        assert cli.main(["status", data["foreign_id"]]) == cli.EXIT_UNREACHABLE
        out, err = capsys.readouterr()
    for text in (out, err):
        for secret in ("data-pw", "sentinel-pw", "wrong", SECRET):
            assert secret not in text


def test_worker_preflight_and_store_client_use_sentinel(
    sentinel_cluster: SentinelCluster, sandbox: Sandbox
) -> None:
    settings = sentinel_settings(sentinel_cluster, sandbox.url)
    with redis_client(settings, socket_timeout=5) as client:
        pool: Any = client.connection_pool
        assert pool.get_master_address() == sentinel_cluster.master_address()
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}


def test_unknown_master_name_is_unreachable_not_a_hang(
    sentinel_cluster: SentinelCluster, sandbox: Sandbox
) -> None:
    settings = sentinel_settings(sentinel_cluster, sandbox.url, redis_sentinel_master="nope")
    with (
        redis_client(settings, retry=None) as client,
        pytest.raises(redis.ConnectionError, match="No master found for 'nope'"),
    ):
        client.ping()


@pytest.mark.slow
def test_worker_runs_jobs_before_and_after_a_failover(
    sentinel_cluster: SentinelCluster, sandbox: Sandbox, start_worker: Any
) -> None:
    # Given a worker whose broker and job store are both reached through Sentinel
    settings = sentinel_settings(sentinel_cluster, sandbox.url)
    worker = start_worker(settings)
    producer = Producer(settings)
    first = request_data()
    producer.enqueue(first)
    record = producer.wait(first["foreign_id"], 30)
    assert record is not None
    assert record.state == JobState.CREATED
    # When the master moves under it
    sentinel_cluster.primary.client().wait(1, 2000)
    sentinel_cluster.failover()
    # Then the same worker and producer create the next invoice on the new master
    second = request_data()
    producer.enqueue(second)
    record = producer.wait(second["foreign_id"], 30)
    assert record is not None, worker.log()[-3000:]
    assert record.state == JobState.CREATED, worker.log()[-3000:]
    assert [
        i["foreign_id"]
        for i in sandbox.invoices()
        if i["foreign_id"] in (first["foreign_id"], second["foreign_id"])
    ] == [first["foreign_id"], second["foreign_id"]]
    producer.close()
    worker.stop()
    assert worker.alive is False
    assert "Connected to sentinel://" in worker.log()
