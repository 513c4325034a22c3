"""The asyncio producer against the real thing: the session's Redis, a real worker process, the
sandbox's real callbacks, and the sync Producer on the same inputs as the yardstick."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import redis
from redis.asyncio.sentinel import SentinelConnectionPool

from invoice_worker import aio
from invoice_worker.aio import AsyncProducer
from invoice_worker.config import Settings
from invoice_worker.constants import InvoiceStatus, JobState
from invoice_worker.devstack.embedded import EmbeddedRedis, free_port
from invoice_worker.devstack.sentinel import SentinelCluster
from invoice_worker.errors import ConflictError, InvalidRequestError, NotDurableError
from invoice_worker.keys import Keys
from invoice_worker.producer import Producer
from invoice_worker.record import JobRecord
from invoice_worker.sandbox import Sandbox
from tests.conftest import make_settings, new_id, request_data
from tests.paystack import PayStack

T = TypeVar("T")


def run(make: Callable[[AsyncProducer], Coroutine[Any, Any, T]], settings: Settings) -> T:
    """``make(producer)`` on a fresh loop with a fresh AsyncProducer, closed afterwards."""

    async def main() -> T:
        producer = AsyncProducer(settings)
        try:
            return await make(producer)
        finally:
            await producer.aclose()

    return asyncio.run(main())


def messages(redis_client: redis.Redis, settings: Settings) -> list[dict[str, Any]]:
    return [json.loads(m) for m in redis_client.lrange(settings.queue, 0, -1)]


# -- the same outcomes as the sync API -------------------------------------------------------


def script(fid: str) -> list[tuple[str, Any]]:
    """One producer's calls: new, again, conflict, case-folded id, invalid, then batches."""
    data = request_data(foreign_id=fid)
    return [
        ("one", data),
        ("one", {**data, "amount": data["amount"] + "0"}),  # the same amount, written otherwise
        ("one", {**data, "title": "Other order"}),
        ("one", {**data, "foreign_id": fid.upper()}),
        ("one", request_data(currency="btc", url_success="http://x.example.com")),
        ("many", [request_data(), data, {**data, "amount": "7"}]),
        ("many", [request_data(), request_data(currency="btc"), request_data(timer=None)]),
    ]


def describe(result: Any, first: str) -> Any:
    """An outcome without what differs between runs (ids, times)."""
    if isinstance(result, list):
        return [describe(item, first) for item in result]
    if isinstance(result, JobRecord):
        return (result.state, "first" if result.task_id == first else "other")
    if isinstance(result, InvalidRequestError):
        return ("invalid", sorted(result.errors))
    return type(result).__name__


def test_same_inputs_same_outcomes_as_the_sync_producer(
    redis_server: EmbeddedRedis, sandbox: Sandbox, redis_client: redis.Redis
) -> None:
    sync_settings = make_settings(redis_server.url, sandbox.url)
    async_settings = make_settings(redis_server.url, sandbox.url)
    fid = new_id()
    calls = script(fid)
    # Given the sync Producer's outcomes
    producer = Producer(sync_settings)
    expected: list[Any] = []
    for kind, arg in calls:
        try:
            expected.append(producer.enqueue(arg) if kind == "one" else producer.enqueue_many(arg))
        except (ConflictError, InvalidRequestError) as exc:
            expected.append(exc)
    producer.close()

    # When the same calls go through the AsyncProducer
    async def calls_async(p: AsyncProducer) -> list[Any]:
        out: list[Any] = []
        for kind, arg in calls:
            try:
                out.append(await p.enqueue(arg) if kind == "one" else await p.enqueue_many(arg))
            except (ConflictError, InvalidRequestError) as exc:
                out.append(exc)
        out.append(await p.get(fid))
        out.append(await p.get(fid.upper()))  # the case-folded id finds the same job
        out.append(await p.get("nobody"))
        return out

    got = run(calls_async, async_settings)
    # Then every outcome is the same, and so is what reached the broker
    first = expected[0].task_id
    assert describe(got[: len(calls)], got[0].task_id) == describe(expected, first)
    assert describe(expected, first) == [
        (JobState.QUEUED, "first"),
        (JobState.QUEUED, "first"),
        "ConflictError",
        "ConflictError",
        ("invalid", ["currency", "url_success"]),
        [(JobState.QUEUED, "other"), (JobState.QUEUED, "first"), "ConflictError"],
        ("invalid", ["[1].currency", "[2].timer"]),
    ]
    assert got[-3] == got[-2] == got[0]
    assert got[-1] is None
    for settings in (sync_settings, async_settings):
        sent = messages(redis_client, settings)
        assert len(sent) == 2  # fid, and the batch's one new request
        assert "buyer@example.com" not in json.dumps([m["headers"] for m in sent])


# -- a real worker, real callbacks -----------------------------------------------------------


def test_a_job_enqueued_async_is_created_by_a_real_worker(
    settings: Settings, start_worker: Any
) -> None:
    start_worker(settings)

    async def main(p: AsyncProducer) -> tuple[JobRecord | None, JobRecord | None, JobRecord]:
        queued = await p.enqueue(request_data(), callback_task="shop.done", callback_queue="shop")
        assert queued.state == JobState.QUEUED
        done = await p.wait(queued.foreign_id, 30)
        return done, await p.get(queued.foreign_id), queued

    done, stored, queued = run(main, settings)
    assert done is not None
    assert done.state == JobState.CREATED
    assert done.url is not None
    assert (done.task_id, done.callback_task) == (queued.task_id, "shop.done")
    assert stored == done


def test_wait_for_status_wakes_on_the_change(redis_server: EmbeddedRedis) -> None:
    with PayStack(redis_server.url) as stack:
        record = stack.create()

        async def main(p: AsyncProducer) -> None:
            fid = record.foreign_id
            # A timeout answers the record as it is
            assert await p.wait_for_status(fid, ["confirmed"], 0.1) == record
            waiting = asyncio.create_task(p.wait_for_status(fid, {"confirmed", "failed"}, 10))
            started = time.monotonic()
            await asyncio.to_thread(stack.pay, record, "full")
            waited = await waiting
            assert waited is not None
            assert waited.invoice_status == InvoiceStatus.CONFIRMED
            assert time.monotonic() - started < 5
            assert await p.wait_for_status("nobody", ["confirmed"], 0.05) is None
            with pytest.raises(ValueError, match="paid-ish"):
                await p.wait_for_status(fid, ["paid-ish"], 0.05)

        run(main, stack.settings)


# -- under load from one event loop ----------------------------------------------------------


def test_a_thousand_concurrent_enqueues_from_one_loop(
    settings: Settings, redis_client: redis.Redis
) -> None:
    requests = [request_data() for _ in range(1000)]

    async def main(p: AsyncProducer) -> tuple[list[JobRecord], list[JobRecord], float]:
        started = time.monotonic()
        first = await asyncio.gather(*(p.enqueue(r) for r in requests))
        took = time.monotonic() - started
        # Again, all at once, with every request twice in flight
        again = await asyncio.gather(*(p.enqueue(r) for r in requests + requests))
        return first, again, took

    first, again, took = run(main, settings)
    assert len({r.task_id for r in first}) == 1000
    assert {r.state for r in first} == {JobState.QUEUED}
    assert [r.foreign_id for r in first] == [r["foreign_id"] for r in requests]
    assert [r.task_id for r in again] == [r.task_id for r in first] * 2
    sent = messages(redis_client, settings)
    assert len(sent) == 1000
    assert {m["headers"]["id"] for m in sent} == {r.task_id for r in first}
    print(f"1,000 concurrent enqueues from one loop: {took:.2f} s ({1000 / took:,.0f}/s)")


def test_a_cancelled_enqueue_is_written_whole_or_not_at_all(
    settings: Settings, redis_client: redis.Redis
) -> None:
    requests = [request_data() for _ in range(10)]

    async def main(p: AsyncProducer) -> tuple[list[Any], JobRecord | None, JobRecord]:
        # Given ten enqueues sharing one round trip, one of them cancelled before it goes out
        tasks = [asyncio.create_task(p.enqueue(r)) for r in requests]
        await asyncio.sleep(0)  # each has joined the round trip
        tasks[3].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        # Then the round trip went out whole, and enqueueing again returns the record
        return results, await p.get(requests[3]["foreign_id"]), await p.enqueue(requests[3])

    results, stored, again = run(main, settings)
    assert isinstance(results[3], asyncio.CancelledError)
    assert all(isinstance(r, JobRecord) for i, r in enumerate(results) if i != 3)
    assert stored is not None
    assert again.task_id == stored.task_id
    assert len(messages(redis_client, settings)) == 10


def test_one_job_refused_by_redis_fails_only_its_own_caller(
    settings: Settings, redis_client: redis.Redis
) -> None:
    # Review: one script's error in the shared round trip was raised to every caller in it,
    # though their jobs had been written (and their messages pushed).
    bad, good = request_data(), request_data()
    redis_client.set(Keys(settings).key(bad["foreign_id"]), "not a hash")  # WRONGTYPE

    async def main(p: AsyncProducer) -> tuple[Any, ...]:
        return await asyncio.gather(p.enqueue(bad), p.enqueue(good), return_exceptions=True)

    refused, enqueued = run(main, settings)
    assert isinstance(refused, redis.ResponseError)
    assert "WRONGTYPE" in str(refused)
    assert isinstance(enqueued, JobRecord)
    assert [m["headers"]["id"] for m in messages(redis_client, settings)] == [enqueued.task_id]


def test_sync_and_async_producers_racing_on_the_same_ids_send_once(
    settings: Settings, redis_client: redis.Redis
) -> None:
    requests = [request_data() for _ in range(200)]
    sync_producer = Producer(settings)
    from_threads: dict[str, str] = {}
    go = threading.Event()

    def sync_side(part: list[dict[str, Any]]) -> None:
        go.wait()
        for request in part:
            from_threads[request["foreign_id"]] = sync_producer.enqueue(request).task_id

    threads = [threading.Thread(target=sync_side, args=(requests[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()

    async def async_side(p: AsyncProducer) -> list[JobRecord]:
        await p.get("warm-up")  # connect first, so both sides start together
        go.set()
        # Ten at a time, so both sides go at a similar pace and meet in the middle
        backwards, out = requests[::-1], []
        for i in range(0, len(backwards), 10):
            out += await asyncio.gather(*(p.enqueue(r) for r in backwards[i : i + 10]))
        return out

    from_loop = run(async_side, settings)
    for thread in threads:
        thread.join()
    sync_producer.close()
    assert {r.foreign_id: r.task_id for r in from_loop} == from_threads
    sent = messages(redis_client, settings)
    assert len(sent) == 200
    assert {m["headers"]["id"] for m in sent} == set(from_threads.values())


# -- durability ------------------------------------------------------------------------------


def test_not_durable_without_the_replica_asked_for(
    redis_server: EmbeddedRedis, sandbox: Sandbox, redis_client: redis.Redis
) -> None:
    settings = make_settings(
        redis_server.url, sandbox.url, redis_min_replicas=1, redis_wait_timeout=0.1
    )
    data = request_data()

    async def main(p: AsyncProducer) -> tuple[NotDurableError, NotDurableError]:
        with pytest.raises(NotDurableError) as first:
            await p.enqueue(data)
        with pytest.raises(NotDurableError) as batch:
            await p.enqueue_many([data, request_data()])
        return first.value, batch.value

    first, batch = run(main, settings)
    assert first.foreign_ids == [data["foreign_id"]]
    assert len(batch.foreign_ids) == 2
    assert "not confirm" in str(first)
    # As in the sync path, the messages went out all the same (late, not lost)
    assert len(messages(redis_client, settings)) == 2
    producer = Producer(settings)
    with pytest.raises(NotDurableError):
        producer.enqueue(data)
    producer.close()
    assert len(messages(redis_client, settings)) == 2


@pytest.mark.skipif(EmbeddedRedis().kind != "redis-server", reason="needs a real redis-server")
def test_scripts_reloaded_and_noreplicas_refusal_is_not_durable_error(sandbox: Sandbox) -> None:
    with EmbeddedRedis() as server, redis.Redis(port=server.port) as admin:
        settings = make_settings(server.url, sandbox.url, redis_min_replicas=1)
        data, later = request_data(), request_data()

        async def main(p: AsyncProducer) -> NotDurableError:
            # A server that lost its scripts (a restart, a promoted replica) gets them again
            await p.get("connect")
            admin.script_flush()
            with pytest.raises(NotDurableError):  # written, but no replica confirmed it
                await p.enqueue(data)
            assert await p.get(data["foreign_id"]) is not None
            # A primary that refuses writes for want of replicas: NotDurableError, not written
            admin.config_set("min-replicas-to-write", 1)
            with pytest.raises(NotDurableError) as raised:
                await p.enqueue(later)
            assert await p.get(later["foreign_id"]) is None
            return raised.value

        assert run(main, settings).foreign_ids == [later["foreign_id"]]


# -- through Celery when the broker is not the state Redis -----------------------------------


def test_non_atomic_path_publishes_in_a_thread_and_undoes_a_failed_send(
    settings: Settings, redis_client: redis.Redis
) -> None:
    split = settings.replace(redis_url=settings.broker_url.replace("/0", "/3"))
    batch = [request_data() for _ in range(20)]

    async def main(p: AsyncProducer) -> list[Any]:
        assert not p.atomic
        first = await p.enqueue_many(batch)
        again = await p.enqueue_many(batch)  # all exist now: nothing sent
        return [first, again, await p.enqueue(batch[0])]

    first, again, one = run(main, split)
    assert [r.task_id for r in again] == [r.task_id for r in first]
    assert one.task_id == first[0].task_id
    assert len(messages(redis_client, settings)) == 20
    # A broker that cannot be reached: the error reaches the caller, the record is undone
    broken = settings.replace(broker_url=f"redis://127.0.0.1:{free_port()}/0")
    data = request_data()

    async def fails(p: AsyncProducer) -> JobRecord | None:
        p.app.conf.broker_connection_timeout = 0.2
        p.app.conf.task_publish_retry_policy = {"max_retries": 1, "interval_start": 0}
        with pytest.raises(Exception, match=r"(?i)connect"):
            await p.enqueue(data)
        return await p.get(data["foreign_id"])

    assert run(fails, broken) is None


def test_a_cancelled_enqueue_on_the_non_atomic_path_is_still_sent(
    settings: Settings, redis_client: redis.Redis
) -> None:
    # Review: the round trip wrote the cancelled caller's record, but its message (sent by
    # the caller after the reply, through Celery) never went: queued with no message.
    split = settings.replace(redis_url=settings.broker_url.replace("/0", "/3"))
    requests = [request_data() for _ in range(5)]

    async def main(p: AsyncProducer) -> JobRecord | None:
        assert not p.atomic
        tasks = [asyncio.create_task(p.enqueue(r)) for r in requests]
        await asyncio.sleep(0)  # each has joined the round trip
        tasks[2].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(100):  # the cancelled caller's send finishes in the background
            if len(messages(redis_client, settings)) == len(requests):
                break
            await asyncio.sleep(0.02)
        return await p.get(requests[2]["foreign_id"])

    stored = run(main, split)
    assert stored is not None
    assert stored.state is JobState.QUEUED
    sent = {m["headers"]["id"] for m in messages(redis_client, settings)}
    assert stored.task_id in sent
    assert len(sent) == len(requests)


# -- the module-level coroutines ---------------------------------------------------------------


def test_default_producer_is_one_per_loop_and_closed_with_it(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, redis_client: redis.Redis
) -> None:
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    data = request_data()

    async def first_loop() -> tuple[JobRecord, AsyncProducer]:
        record = await aio.enqueue_invoice(data)
        assert await aio.get_invoice(data["foreign_id"]) == record
        producer = await aio.default_producer()
        assert await aio.default_producer() is producer
        assert len(aio._defaults) == 1
        return record, producer

    async def second_loop() -> tuple[JobRecord | None, list[Any], AsyncProducer]:
        waited = await aio.wait_for_invoice(data["foreign_id"], 0.05)
        results = await aio.enqueue_many([data, {**data, "title": "Other"}])
        assert await aio.wait_for_status(data["foreign_id"], ["confirmed"], 0.05) == waited
        producer = await aio.default_producer()
        await aio.aclose_default()  # as a FastAPI lifespan's shutdown would
        assert aio._defaults == {}
        await aio.aclose_default()  # nothing left to close: no error
        return waited, results, producer

    record, one = asyncio.run(first_loop())
    assert aio._defaults == {}  # closed when its loop shut down
    waited, results, other = asyncio.run(second_loop())
    assert other is not one
    assert waited == record
    assert results[0] == record
    assert isinstance(results[1], ConflictError)
    assert len(messages(redis_client, settings)) == 1


def test_async_client_through_sentinel(sentinel_cluster: SentinelCluster, sandbox: Sandbox) -> None:
    settings = make_settings(
        sentinel_cluster.url, sandbox.url, redis_sentinel_master=sentinel_cluster.master_name
    )

    async def main(p: AsyncProducer) -> JobRecord | None:
        assert isinstance(p.store.redis.connection_pool, SentinelConnectionPool)
        assert p.atomic
        record = await p.enqueue(request_data())
        return await p.get(record.foreign_id)

    record = run(main, settings)
    assert record is not None
    assert record.state == JobState.QUEUED
    assert sentinel_cluster.primary.client().llen(settings.queue) == 1


@pytest.fixture(autouse=True)
def _no_default_left() -> Iterator[None]:
    yield
    assert aio._defaults == {}
