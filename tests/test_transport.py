"""The guarded Redis transport: a malformed broker entry is set aside, never fatal.

The broker settings first, then real worker processes on a private Redis (and a TLS-only
Redis) for each path where kombu decodes an entry.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu.connection import Connection
from kombu.transport import redis as kombu_redis

from invoice_worker import constants as c
from invoice_worker import transport
from invoice_worker.app import create_app
from invoice_worker.config import Settings
from invoice_worker.constants import JobState
from invoice_worker.devstack.embedded import EmbeddedRedis, free_port
from invoice_worker.devstack.sentinel import SentinelCluster
from invoice_worker.message import redis_envelope
from invoice_worker.producer import Producer
from invoice_worker.record import JobRecord
from invoice_worker.sandbox import Sandbox
from tests.conftest import job_kwargs, make_settings, request_data

BUYER = "buyer@example.com"


# -- selecting the transport -------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["redis://localhost:6379/0", "rediss://h:6380/0?ssl_cert_reqs=none"]
)
def test_redis_urls_get_the_guarded_transport(url: str) -> None:
    settings = make_settings(url, "http://127.0.0.1:1", key_prefix="shop:", record_ttl=3600)
    conf = transport.broker_conf(settings, {"visibility_timeout": 60})
    assert conf["broker_transport"] == "invoice_worker.transport:Transport"
    assert conf["broker_transport_options"] == {
        "visibility_timeout": 60,  # kept
        "dead_letter_key": "shop:dead-letter",
        "dead_letter_stats_key": "shop:stats",
        "dead_letter_ttl": 3600,
    }
    # A query string of ssl_* options wins over broker_use_ssl in kombu: nothing to add.
    assert "broker_use_ssl" not in conf


def test_rediss_without_ssl_options_verifies_certificates() -> None:
    settings = make_settings("rediss://h:6380/0", "http://127.0.0.1:1")
    conf = transport.broker_conf(settings, {})
    assert conf["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}


@pytest.mark.parametrize("url", ["amqp://guest:guest@127.0.0.1:5672//", "redis+socket:///tmp/r"])
def test_other_brokers_keep_kombus_transport(url: str) -> None:
    settings = make_settings("redis://127.0.0.1:1/0", "http://127.0.0.1:1", broker_url=url)
    assert transport.broker_conf(settings, {}) == {}


SENTINELS = "sentinel://:pw@10.0.0.1:26379/2;sentinel://10.0.0.2/2;sentinel://10.0.0.3:26380"


def sentinel_settings(url: str = SENTINELS, **overrides: Any) -> Settings:
    return make_settings(
        url, "http://127.0.0.1:1", redis_sentinel_master="mymaster", key_prefix="shop:",
        record_ttl=3600, **overrides,
    )  # fmt: skip


def test_sentinel_urls_get_the_guarded_sentinel_transport() -> None:
    settings = sentinel_settings(redis_sentinel_password="s3nt")
    conf = transport.broker_conf(settings, {"visibility_timeout": 60})
    assert conf == {
        # kombu gets one entry (with the whole URL's login and database): see the next test
        "broker_url": "sentinel://:pw@10.0.0.1:26379/2",
        "broker_transport": "invoice_worker.transport:SentinelTransport",
        "broker_transport_options": {
            "visibility_timeout": 60,
            "dead_letter_key": "shop:dead-letter",
            "dead_letter_stats_key": "shop:stats",
            "dead_letter_ttl": 3600,
            "master_name": "mymaster",
            "sentinels": [["10.0.0.1", 26379], ["10.0.0.2", 26379], ["10.0.0.3", 26380]],
            "sentinel_kwargs": {
                "socket_timeout": 2.0, "socket_connect_timeout": 2.0, "retry": None,
                "password": "s3nt",
            },
        },
    }  # fmt: skip


def test_kombu_failover_urls_would_drop_the_transport() -> None:
    # Why kombu is not given every entry: on a connection error it switches to the next one,
    # re-parsed as its own Sentinel transport, with that entry's password (none) and database.
    stock = Connection(SENTINELS, transport=transport.SENTINEL_TRANSPORT)  # type: ignore[no-untyped-call]
    stock.maybe_switch_next()  # type: ignore[no-untyped-call]
    assert (stock.transport_cls, stock.password, stock.virtual_host) == ("sentinel", None, "2")
    ours = create_app(sentinel_settings()).connection_for_write()
    ours.maybe_switch_next()
    assert (ours.transport_cls, ours.password, ours.virtual_host) == (
        transport.SENTINEL_TRANSPORT, "pw", "2",
    )  # fmt: skip


@pytest.mark.parametrize(
    "url", [SENTINELS, "sentinel://u:pw@h1:26379/0", "sentinel://h1/0;sentinel://h2/0"]
)
def test_sentinel_urls_shown_as_kombu_shows_them(url: str) -> None:
    conn = create_app(sentinel_settings(url)).connection_for_write()
    assert conn.transport_cls == transport.SENTINEL_TRANSPORT
    stock = Connection(url)  # type: ignore[no-untyped-call]
    assert conn.as_uri() == stock.as_uri()
    assert conn.as_uri(include_password=True) == stock.as_uri(include_password=True)


def test_kombu_resolves_the_transport_and_keeps_the_url(redis_server: EmbeddedRedis) -> None:
    settings = make_settings(redis_server.url.replace("/0", "/3"), "http://127.0.0.1:1")
    app = create_app(settings)
    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, transport.Transport)
        channel = conn.default_channel
        assert isinstance(channel, transport.Channel)
        assert channel.dead_letter_key == f"{settings.key_prefix}dead-letter"
        assert channel.visibility_timeout == settings.broker_visibility_timeout
        assert channel.client.connection_pool.connection_kwargs["port"] == redis_server.port
        assert channel.client.connection_pool.connection_kwargs["db"] == 3
        # Shown (banner, "Connected to", Flower) as the Redis URL it is, password masked
        assert conn.as_uri() == f"redis://:**@127.0.0.1:{redis_server.port}/3"


@pytest.mark.parametrize(
    "url",
    [
        "redis://:pw@10.0.0.1:6390/3",
        "rediss://u:pw@10.0.0.1:6390/0",
        "rediss://10.0.0.1/0?ssl_cert_reqs=none",
        "redis://localhost",
    ],
)
def test_urls_shown_as_kombu_shows_them(url: str) -> None:
    # The banner, "Connected to ..." and Flower's broker view use as_uri().
    conn = create_app(make_settings(url, "http://127.0.0.1:1")).connection_for_write()
    assert conn.transport_cls == transport.TRANSPORT
    stock = Connection(url)  # type: ignore[no-untyped-call]
    assert conn.as_uri() == stock.as_uri()
    assert conn.as_uri(include_password=True) == stock.as_uri(include_password=True)


#: sha256 (first 12 hex digits) of the kombu 5.7.0 source of the methods transport.py replaces
#: with a copy. A kombu whose methods differ fails here: read them again, port their changes to
#: the copies, then update these.
KOMBU_SOURCES = {
    "Channel._brpop_read": "c42518699709",
    "Channel._get": "be26a9f1eb4c",
    "QoS.restore_by_tag": "58e161d81b6f",
    "SentinelChannel._sentinel_managed_pool": "bde54a2d6e93",
}


def test_copied_kombu_methods_are_unchanged() -> None:
    found = {}
    for name in KOMBU_SOURCES:
        cls, method = name.split(".")
        source = inspect.getsource(getattr(getattr(kombu_redis, cls), method))
        found[name] = hashlib.sha256(source.encode()).hexdigest()[:12]
    assert found == KOMBU_SOURCES, "kombu changed: re-read these methods, then update the copies"


# -- real workers ------------------------------------------------------------------------------


@pytest.fixture
def private_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


def final(producer: Producer, fid: str, timeout: float = 30) -> JobRecord:
    record = producer.wait(fid, timeout)
    assert record is not None
    assert record.state in c.FINAL_STATES, record
    return record


def sent_envelope(
    producer: Producer, name: str, kwargs: dict[str, Any], task_id: str | None = None
) -> dict[str, Any]:
    """What Celery's own ``send_task`` puts on the queue's list (``kwargsrepr`` unmasked)."""
    scratch = f"{producer.settings.queue}-scratch"
    producer.app.send_task(name, kwargs=kwargs, queue=scratch, task_id=task_id)
    raw: str | None = producer.store.redis.rpop(scratch)  # type: ignore[assignment]
    assert raw is not None
    data: dict[str, Any] = json.loads(raw)
    data["properties"]["delivery_info"]["routing_key"] = producer.settings.queue  # as if sent there
    return data


def dead_letters(settings: Settings, client: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(e) for e in client.lrange(f"{settings.key_prefix}dead-letter", 0, -1)]


def counted(settings: Settings, client: redis.Redis) -> int:
    return int(client.hget(f"{settings.key_prefix}stats", "dead_letters") or 0)


def assert_no_leak(log: str, payloads: list[str]) -> None:
    assert BUYER not in log
    assert "@example.com" not in log
    for payload in payloads:
        assert payload[:60] not in log, payload[:60]


@pytest.mark.slow
def test_malformed_queue_entries_set_aside_worker_survives(
    private_redis: EmbeddedRedis, sandbox: Sandbox, start_worker: Any
) -> None:
    settings = make_settings(private_redis.url, sandbox.url)
    worker = start_worker(settings, pool="prefork", concurrency=2)  # the checks run before forks
    producer = Producer(settings)
    client = redis.Redis.from_url(private_redis.url, decode_responses=True)
    # Given every kind of broken entry pushed onto the worker's queue by hand
    valid = sent_envelope(producer, c.TASK_NAME, job_kwargs())  # kwargsrepr shows the e-mail
    no_id = {k: v for k, v in valid["headers"].items() if k != "id"}
    bad = {
        "not_json": "not json",
        "list": "[1,2]",
        "body_only": '{"body": "!!notbase64"}',
        "bad_base64": json.dumps({**valid, "body": "!!notbase64"}),
        "empty": "{}",
        "string": '"a string"',
        "huge": "junk " + "x" * 1_000_000,
        "personal": f"order for {BUYER}",
        # kombu can deliver these; Celery's worker cannot unpack them
        "no_task_id": json.dumps({**valid, "headers": no_id}),
        "short_body": json.dumps({**valid, "body": base64.b64encode(b"[1]").decode()}),
        "proto1_list": json.dumps(
            {**valid, "headers": {}, "body": base64.b64encode(b'{"task": [1], "id": "1"}').decode()}
        ),
    }
    for raw in bad.values():
        client.lpush(settings.queue, raw)
    # When a valid job follows them
    data = request_data()
    producer.enqueue(data)
    # Then the worker is still alive and the job is created
    assert final(producer, data["foreign_id"]).state == JobState.CREATED
    assert worker.alive
    # And each entry is kept raw (the huge one cut short), counted, and logged without content
    kept = dead_letters(settings, client)
    assert len(kept) == len(bad) == counted(settings, client)
    by_payload = {e["payload"]: e for e in kept}
    for name, raw in bad.items():
        if name == "huge":
            [entry] = [e for e in kept if e["truncated"]]
            assert raw.startswith(entry["payload"])
            assert entry["length"] == len(raw)
        elif name in ("no_task_id", "short_body", "proto1_list"):
            # set aside by the consumer: the envelope as kombu decoded it
            sent = json.loads(raw)
            [entry] = [
                e for e in kept if e["reason"].startswith("bad_task_")
                and json.loads(e["payload"])["headers"] == sent["headers"]
                and json.loads(e["payload"])["body"] == sent["body"]
            ]  # fmt: skip
        else:
            entry = by_payload[raw]
            assert (entry["length"], entry["truncated"]) == (len(raw), False)
        assert entry["queue"] == settings.queue
    assert sorted(e["reason"] for e in kept) == sorted([
        "not_json", "not_json", "not_json", "not_an_object", "not_an_object", "no_properties",
        "no_properties", "bad_body", "bad_task_headers", "bad_task_body", "bad_task_body",
    ])  # fmt: skip
    assert client.ttl(f"{settings.key_prefix}dead-letter") > 0
    producer.close()
    worker.stop()
    log = worker.log()
    assert log.count("set aside a malformed broker entry") == len(bad)
    assert "length=1000005" in log
    assert_no_leak(log, list(bad.values()))


@pytest.mark.slow
def test_dead_letter_list_is_capped(
    private_redis: EmbeddedRedis, sandbox: Sandbox, start_worker: Any
) -> None:
    settings = make_settings(private_redis.url, sandbox.url)
    start_worker(settings)
    producer = Producer(settings)
    client = redis.Redis.from_url(private_redis.url, decode_responses=True)
    # Given more junk than the list keeps, the last entry made of what JSON escapes longest
    n = transport.DEAD_LETTER_MAX_ENTRIES + 5
    client.lpush(settings.queue, *[f"junk {i}" for i in range(n)])
    client.lpush(settings.queue, "\x01" * 10_000)
    data = request_data()
    producer.enqueue(data)
    assert final(producer, data["foreign_id"]).state == JobState.CREATED
    producer.close()
    # Then every entry is counted, the newest are kept, and each is bounded as stored
    assert counted(settings, client) == n + 1
    kept = dead_letters(settings, client)
    assert len(kept) == transport.DEAD_LETTER_MAX_ENTRIES
    assert kept[1]["payload"] == f"junk {n - 1}"  # newest first; the oldest were trimmed
    assert (kept[0]["length"], kept[0]["truncated"]) == (10_000, True)
    assert set(kept[0]["payload"]) == {"\x01"}
    stored = redis.Redis.from_url(private_redis.url).lindex(f"{settings.key_prefix}dead-letter", 0)
    assert isinstance(stored, bytes)
    assert len(stored) < transport.DEAD_LETTER_MAX_BYTES + 200


@pytest.mark.slow
def test_malformed_fanout_message_set_aside(
    private_redis: EmbeddedRedis, sandbox: Sandbox, start_worker: Any
) -> None:
    settings = make_settings(private_redis.url, sandbox.url)
    worker = start_worker(settings)
    client = redis.Redis.from_url(private_redis.url, decode_responses=True)
    # Given junk published on the remote-control (pidbox) fanout channel the worker listens to
    for raw in ("[1,2]", f"not json {BUYER}", "{}"):
        assert client.publish("/0.celery.pidbox", raw) == 1
    # Then the worker survives and still serves jobs and remote control
    producer = Producer(settings)
    data = request_data()
    producer.enqueue(data)
    assert final(producer, data["foreign_id"]).state == JobState.CREATED
    assert producer.app.control.ping(timeout=5)
    producer.close()
    assert worker.alive
    assert counted(settings, client) == 3
    kept = dead_letters(settings, client)
    assert {e["queue"] for e in kept} == {"celery.pidbox"}
    worker.stop()
    assert_no_leak(worker.log(), ["[1,2]", "not json"])


@pytest.mark.slow
def test_malformed_unacked_entry_set_aside_others_restored(
    private_redis: EmbeddedRedis, sandbox: Sandbox, start_worker: Any
) -> None:
    settings = make_settings(private_redis.url, sandbox.url)
    client = redis.Redis.from_url(private_redis.url, decode_responses=True)
    app = create_app(settings)
    # Given a message a dead worker left unacked, behind two broken entries kombu restores first
    data = request_data()
    good = redis_envelope(app, {"request": data}, "task-good", settings.queue)
    now = time.time()
    entries = {
        "good": (json.dumps([json.loads(good), "", settings.queue]), now - 100),
        "not_json": (f"not json {BUYER}", now - 50),
        "list": (json.dumps([[1, 2], "", settings.queue]), now - 60),
    }
    for tag, (raw, score) in entries.items():
        client.hset("unacked", tag, raw)
        client.zadd("unacked_index", {tag: score})
    # When a worker starts, its restore sweep runs (every second with these settings)
    worker = start_worker(settings)
    producer = Producer(settings)
    # Then the good message is restored and run, and the broken ones are set aside
    assert final(producer, data["foreign_id"]).state == JobState.CREATED
    producer.close()
    # The record is final a moment before the task returns and its message is acked.
    deadline = time.monotonic() + 10
    while client.hlen("unacked") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.hlen("unacked") == 0
    assert client.zcard("unacked_index") == 0
    kept = dead_letters(settings, client)
    assert sorted(e["reason"] for e in kept) == ["bad_unacked_entry", "bad_unacked_entry"]
    assert counted(settings, client) == 2
    assert worker.alive
    worker.stop()
    assert_no_leak(worker.log(), ["not json"])


@pytest.mark.slow
def test_sentinel_broker_sets_malformed_entries_aside(
    sentinel_cluster: SentinelCluster, sandbox: Sandbox, start_worker: Any
) -> None:
    # Given a Sentinel broker whose first listed sentinel is down (the others are still asked)
    settings = make_settings(
        sentinel_cluster.url, sandbox.url, redis_sentinel_master=sentinel_cluster.master_name
    )
    sentinel_cluster.kill(sentinel_cluster.sentinels[0])
    worker = start_worker(settings)
    with app_connection(settings) as conn:
        assert isinstance(conn.default_channel, transport.SentinelChannel)
    client = sentinel_cluster.primary.client(decode_responses=True)
    # When broken entries reach the queue ahead of a valid job
    bad = ["not json", "[1,2]", "{}", f"order for {BUYER}"]
    client.lpush(settings.queue, *bad)
    producer = Producer(settings)
    data = request_data()
    producer.enqueue(data)
    # Then the job is created and each entry is kept, counted, and logged without its content
    assert final(producer, data["foreign_id"]).state == JobState.CREATED
    producer.close()
    assert worker.alive
    kept = dead_letters(settings, client)
    assert sorted(e["payload"] for e in kept) == sorted(bad)
    assert counted(settings, client) == len(bad)
    worker.stop()
    assert worker.log().count("set aside a malformed broker entry") == len(bad)
    assert_no_leak(worker.log(), bad[1:])


def app_connection(settings: Settings) -> Any:
    return create_app(settings).connection_for_write()


# -- TLS ---------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A redis-server that speaks TLS only, with a certificate from a private CA."""
    if not shutil.which("openssl") or not shutil.which("redis-server"):
        pytest.skip("needs openssl and redis-server")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
             "/CN=test-ca", "-keyout", "ca.key", "-out", "ca.pem", cwd=tmp_path)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", "server.key", "-out", "server.csr", cwd=tmp_path)  # fmt: skip
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "1", "-extfile", "san.ext", "-out", "server.pem",
             cwd=tmp_path)  # fmt: skip
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", "server.pem", "--tls-key-file", "server.key",
         "--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no", "--save", ""],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        probe = redis.Redis.from_url(
            f"rediss://127.0.0.1:{port}/0", ssl_ca_certs=str(tmp_path / "ca.pem")
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                probe.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "TLS redis-server did not start"
                time.sleep(0.05)
        probe.close()
        yield port, tmp_path / "ca.pem"
    finally:
        server.kill()
        server.wait()


@pytest.mark.slow
def test_rediss_broker_speaks_verified_tls(
    tls_redis: tuple[int, Path], sandbox: Sandbox, start_worker: Any, monkeypatch: Any
) -> None:
    port, ca = tls_redis
    # The private CA is trusted through OpenSSL's default paths, as a system CA would be.
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    settings = make_settings(f"rediss://127.0.0.1:{port}/0", sandbox.url)
    worker = start_worker(settings)
    producer = Producer(settings)
    data = request_data()
    producer.enqueue(data)
    assert final(producer, data["foreign_id"]).state == JobState.CREATED
    producer.close()
    worker.stop()
    assert "Connected to rediss://" in worker.log()
