"""The events stream read as a consumer group, sync and async, on a real Redis."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import pytest
import redis
import redis.asyncio

from invoice_worker.config import Settings
from invoice_worker.constants import EventKind, InvoiceStatus, JobState
from invoice_worker.devstack.embedded import EmbeddedRedis
from invoice_worker.errors import ConfigError
from invoice_worker.events import AsyncEventConsumer, Event, EventConsumer
from tests.conftest import job_kwargs, make_job


@pytest.fixture
def stream() -> str:
    return f"t{uuid.uuid4().hex[:8]}:events"


def consumer(r: redis.Redis, stream: str, name: str, **options: Any) -> EventConsumer:
    return EventConsumer(r, stream=stream, group="shop", consumer=name, **options)


def add_jobs(r: redis.Redis, stream: str, n: int, first: int = 0) -> list[str]:
    return [
        str(r.xadd(stream, {"kind": "job", "foreign_id": f"order-{i}", "state": "created"}))
        for i in range(first, first + n)
    ]


def test_a_real_job_and_status_reach_the_group_as_typed_events(settings: Settings) -> None:
    # Given a job created at the sandbox by the real job function (its event on the stream)
    kwargs = job_kwargs()
    fid = kwargs["request"]["foreign_id"]
    job = make_job(settings)
    job.run(kwargs, task_id=str(uuid.uuid4()), owner="w1")
    r = job.store.redis
    r.xadd(
        settings.events_stream,
        {"kind": "status", "foreign_id": fid, "status": "confirmed", "previous": "pending"},
    )
    # When a consumer built from the settings reads them
    events = EventConsumer.from_settings(settings, group="shop", consumer="web-1")
    try:
        created, paid = events.read(block_ms=100)
    finally:
        events.close()
    # Then each is a typed event with what the shop needs
    assert (created.kind, created.foreign_id, created.state) == (EventKind.JOB, fid, "created")
    assert created.state is JobState.CREATED
    assert created.status is None
    assert created.url == job.store.get(fid).url  # type: ignore[union-attr]
    assert (paid.kind, paid.status, paid.state) == (EventKind.STATUS, InvoiceStatus.CONFIRMED, None)


def test_consumers_of_one_group_share_the_events_and_each_is_handled_once(
    redis_client: redis.Redis, stream: str
) -> None:
    ids = add_jobs(redis_client, stream, 40)
    a, b = consumer(redis_client, stream, "web-1"), consumer(redis_client, stream, "web-2")
    seen: list[str] = []
    for _ in range(4):
        for c in (a, b):
            events = c.read(count=7, block_ms=10)
            seen += [e.id for e in events]
            c.ack(*events)
    assert sorted(seen) == sorted(ids)
    assert redis_client.xpending(stream, "shop")["pending"] == 0
    # Nothing comes again once acknowledged, and a new event goes to one of them only
    [new] = add_jobs(redis_client, stream, 1, first=40)
    assert [e.id for e in a.read(block_ms=10) + b.read(block_ms=10)] == [new]


def test_a_group_starts_at_the_beginning_so_earlier_events_are_not_skipped(
    redis_client: redis.Redis, stream: str
) -> None:
    ids = add_jobs(redis_client, stream, 3)
    assert [e.id for e in consumer(redis_client, stream, "late").read(block_ms=10)] == ids
    # A group may ask for only what comes next
    tail = EventConsumer(redis_client, stream=stream, group="tail", consumer="t", start="$")
    assert tail.read(block_ms=10) == []


def test_an_event_a_dead_consumer_left_unacknowledged_is_claimed_by_another(
    redis_client: redis.Redis, stream: str
) -> None:
    [eid] = add_jobs(redis_client, stream, 1)
    # Given web-1 read the event and died before acknowledging it
    assert [e.id for e in consumer(redis_client, stream, "web-1").read(block_ms=10)] == [eid]
    survivor = consumer(redis_client, stream, "web-2", claim_idle=0.2)
    assert survivor.read(block_ms=10) == []  # still within claim_idle
    # When it has waited longer than claim_idle, the next read claims it
    time.sleep(0.25)
    [event] = survivor.read(block_ms=10)
    assert (event.id, event.foreign_id) == (eid, "order-0")
    survivor.ack(event)
    assert redis_client.xpending(stream, "shop")["pending"] == 0


def test_run_acknowledges_after_the_handler_and_retries_one_that_raised(
    redis_client: redis.Redis, stream: str
) -> None:
    add_jobs(redis_client, stream, 3)
    handled: list[str] = []
    failures = {"order-1": 1}  # fails once, then succeeds
    stop = threading.Event()

    def handle(event: Event) -> None:
        if failures.get(event.foreign_id):
            failures[event.foreign_id] -= 1
            raise RuntimeError("database down")
        handled.append(event.foreign_id)
        if len(handled) == 3:
            stop.set()

    c = consumer(redis_client, stream, "web-1", claim_idle=0.2)
    thread = threading.Thread(target=c.run, args=(handle,), kwargs={"stop": stop, "block_ms": 50})
    thread.start()
    thread.join(5)
    assert not thread.is_alive()
    assert handled == ["order-0", "order-2", "order-1"]
    assert redis_client.xpending(stream, "shop")["pending"] == 0


def test_unreadable_entries_are_acknowledged_and_skipped(
    redis_client: redis.Redis, stream: str, caplog: pytest.LogCaptureFixture
) -> None:
    redis_client.xadd(stream, {"kind": "job"})  # no foreign_id
    redis_client.xadd(stream, {"kind": "refund", "foreign_id": "order-1"})  # a later release's
    old = redis_client.xadd(stream, {"foreign_id": "order-2", "state": "failed"})  # no kind
    c = consumer(redis_client, stream, "web-1")
    [event] = c.read(block_ms=10)
    assert (event.id, event.kind, event.state) == (old, EventKind.JOB, JobState.FAILED)
    assert redis_client.xpending(stream, "shop")["pending"] == 1  # only the readable one
    assert caplog.text.count("skipped unreadable events entry") == 2


def test_a_lost_group_is_created_again_and_reads_from_the_start(
    redis_client: redis.Redis, stream: str
) -> None:
    ids = add_jobs(redis_client, stream, 2)
    c = consumer(redis_client, stream, "web-1")
    c.ack(*c.read(block_ms=10))
    # A failover that did not keep the group, or an operator deleting it
    redis_client.xgroup_destroy(stream, "shop")
    assert [e.id for e in c.read(block_ms=10)] == ids  # again: handlers must be idempotent


def test_the_async_consumer_reads_claims_and_runs_as_the_sync_one(
    settings: Settings, redis_client: redis.Redis
) -> None:
    stream = settings.events_stream
    ids = add_jobs(redis_client, stream, 5)

    async def main() -> list[str]:
        client = redis.asyncio.Redis.from_url(settings.state_url, decode_responses=True)
        a = AsyncEventConsumer(client, stream=stream, group="shop", consumer="a")
        b = AsyncEventConsumer.from_settings(settings, group="shop", consumer="b", claim_idle=0.1)
        first = await a.read(count=2, block_ms=10)  # a dies holding these two
        await asyncio.sleep(0.15)
        handled: list[str] = []
        stop = asyncio.Event()

        async def handle(event: Event) -> None:
            handled.append(event.id)
            if len(handled) == 5:
                stop.set()

        await asyncio.wait_for(b.run(handle, stop=stop, block_ms=20), 5)
        await b.aclose()
        await a.aclose()
        assert [e.id for e in first] == ids[:2]
        return handled

    assert sorted(asyncio.run(main())) == ids
    assert redis_client.xpending(stream, "shop")["pending"] == 0


def test_run_rides_out_redis_restarting_and_handles_what_came_before_and_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with EmbeddedRedis() as server:
        r = redis.Redis.from_url(server.url, decode_responses=True)
        stream = "shop:events"
        add_jobs(r, stream, 1)
        handled: list[str] = []
        stop = threading.Event()
        c = EventConsumer(
            redis.Redis.from_url(server.url, decode_responses=True, socket_timeout=2),
            stream=stream, group="shop", consumer="web-1",
        )  # fmt: skip
        thread = threading.Thread(
            target=c.run, args=(lambda e: handled.append(e.foreign_id),),
            kwargs={"stop": stop, "block_ms": 50},
        )  # fmt: skip
        thread.start()
        try:
            deadline = time.monotonic() + 5
            while handled != ["order-0"] and time.monotonic() < deadline:
                time.sleep(0.02)
            # When Redis goes away (a restart without persistence: the group goes too)
            server.kill()
            time.sleep(0.8)
            assert thread.is_alive()
            server.restart()
            add_jobs(r, stream, 1, first=1)
            deadline = time.monotonic() + 10
            while "order-1" not in handled and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            thread.join(10)
            c.close()
            r.close()
    assert not thread.is_alive()
    assert handled == ["order-0", "order-1"]
    assert "events stream unreachable (ConnectionError); reading again in" in caplog.text


def test_a_client_that_returns_bytes_is_refused_not_left_to_ack_every_event(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, stream: str
) -> None:
    # Review: on a client made without decode_responses=True every entry looked unreadable
    # (bytes fields, no "foreign_id"), so each was acknowledged and logged, never handled.
    ids = add_jobs(redis_client, stream, 2)
    raw = redis.Redis.from_url(redis_server.url)
    with pytest.raises(ConfigError, match="decode_responses=True"):
        EventConsumer(raw, stream=stream, group="shop", consumer="web-1")
    raw.close()
    with pytest.raises(ConfigError, match="decode_responses=True"):
        AsyncEventConsumer(
            redis.asyncio.Redis.from_url(redis_server.url), stream=stream, group="s", consumer="a"
        )
    # Nothing was read or acknowledged: a consumer on a decoding client gets both events
    assert [e.id for e in consumer(redis_client, stream, "web-1").read(block_ms=10)] == ids


def test_idle_events_behind_many_fresh_ones_in_the_pending_list_are_claimed(
    redis_client: redis.Redis, stream: str
) -> None:
    # Given 30 pending events a live consumer holds (fresh), then 3 a dead one left idle
    ids = add_jobs(redis_client, stream, 33)
    consumer(redis_client, stream, "dead").read(count=33, block_ms=10)
    time.sleep(0.25)
    fresh: list[Any] = ids[:30]  # redis-py types the ids loosely
    redis_client.xclaim(stream, "shop", "live", 0, fresh, idle=0)
    # When a survivor claims with a small count (each call scans 10 x count entries)
    survivor = consumer(redis_client, stream, "web-2", claim_idle=0.2)
    claimed = [e.id for _ in range(3) for e in survivor.read(count=2, block_ms=10)]
    # Then its scan goes on past the fresh ones, well within claim_idle
    assert claimed[:3] == ids[30:]
