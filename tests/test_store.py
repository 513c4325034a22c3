"""The Lua transitions, against a real redis-server."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis

from invoice_worker.config import Settings
from invoice_worker.constants import JobState
from invoice_worker.scripts import Claim, Enqueued, NewJob
from invoice_worker.store import JobStore
from tests.conftest import new_id


@pytest.fixture
def store(settings: Settings) -> JobStore:
    return JobStore.from_settings(settings)


def tuned(store: JobStore, lease: float = 2.0, max_crashes: int = 2) -> JobStore:
    """The same store with another lease and crash limit (now read from the settings).

    ``model_copy`` skips validation on purpose: these tests use leases far shorter than two
    provider calls, which Settings rightly refuses for a real worker.
    """
    settings = store.settings.model_copy(
        update={"lease_seconds": lease, "max_redeliveries": max_crashes}
    )
    return JobStore(store.redis, settings)  # the scripts carry these settings: load them anew


def claim(
    store: JobStore,
    fid: str,
    owner: str = "w1",
    fp: str = "fp",
    *,
    lease: float = 2.0,
    max_crashes: int = 2,
    **kw: Any,
) -> Claim:
    args: dict[str, Any] = {"fields": {"task_id": "t1"}, "kwargs": "{}"}
    args.update(kw)
    return tuned(store, lease, max_crashes).claim(fid, owner, fingerprint=fp, **args)


def one(store: JobStore, fid: str, fp: str = "fp", task_id: str = "", **fields: Any) -> Enqueued:
    [result] = store.enqueue([NewJob(fid, task_id, fp, fields, "{}")])
    return result


def test_enqueue_new_then_exists_then_conflict(store: JobStore) -> None:
    fid = new_id()
    first = one(store, fid, task_id="t1")
    assert (first.new, first.resend) == (True, False)
    assert first.record is not None
    assert (first.record.state, first.record.task_id) == (JobState.QUEUED, "t1")
    again = one(store, fid, task_id="t2")
    assert (again.new, again.resend) == (False, False)
    assert again.record is not None
    assert (again.record.state, again.record.task_id) == (JobState.QUEUED, "t1")
    conflict = one(store, fid, "other")
    assert (conflict.new, conflict.record) == (False, None)


def test_enqueue_pushes_message_atomically(store: JobStore, redis_client: redis.Redis) -> None:
    fid, queue = new_id(), f"q-{new_id()}"
    jobs = [NewJob(fid, "t1", "fp", {}, "{}", "message-1", queue)]
    jobs.append(NewJob(fid, "t2", "fp", {}, "{}", "message-2", queue))  # same id twice
    jobs.append(NewJob(fid, "t3", "fp2", {}, "{}", "message-3", queue))
    # new / exists / conflict (no record)
    assert [(r.new, r.record is not None) for r in store.enqueue(jobs)] == [
        (True, True),
        (False, True),
        (False, False),
    ]
    assert redis_client.lrange(queue, 0, -1) == ["message-1"]


def test_enqueue_reports_stale_queued_job(settings: Settings) -> None:
    # The redelivery delay is baked into the scripts: use the shortest one settings allow.
    store = JobStore.from_settings(settings.replace(visibility_timeout=1, retry_cap=0.5))
    fid = new_id()
    one(store, fid, task_id="t1")
    time.sleep(1.1)
    assert one(store, fid, task_id="t2").resend is True
    assert one(store, fid, task_id="t3").resend is False  # the resend restarted the clock


def test_record_has_ttl_and_prefix(store: JobStore, settings: Settings) -> None:
    fid = new_id()
    one(store, fid)
    key = f"{settings.key_prefix}job:{fid}"
    assert 0 < int(store.redis.ttl(key)) <= settings.record_ttl


def test_discard_only_undoes_own_queued_record(store: JobStore) -> None:
    fid = new_id()
    one(store, fid, task_id="t1")
    store.discard(fid, "t-other")
    assert store.get(fid) is not None
    store.discard(fid, "t1")
    assert store.get(fid) is None


def test_claim_creates_missing_record(store: JobStore) -> None:
    fid = new_id()
    result = claim(store, fid)
    assert result.status == "claimed"
    record = store.get(fid)
    assert record is not None
    assert (record.state, record.attempts, record.task_id) == (
        JobState.PROCESSING,
        1,
        "t1",
    )
    assert "lease_owner" not in record.to_dict()
    assert "fingerprint" not in record.to_dict()


def test_lease_excludes_second_worker_until_expiry(store: JobStore) -> None:
    fid = new_id()
    assert claim(store, fid, "w1", lease=0.3).status == "claimed"
    busy = claim(store, fid, "w2")
    assert busy.status == "busy"
    assert 0 < busy.wait <= 0.3
    time.sleep(0.35)
    # The holder vanished mid-attempt: the next claim marks the job ambiguous.
    again = claim(store, fid, "w2")
    assert again.status == "claimed"
    assert again.record is not None
    assert again.record.ambiguous is True
    assert again.record.attempts == 2
    # The claim answers only what an attempt reads; the crash count is in the record.
    record = store.get(fid)
    assert record is not None
    assert record.crashes == 1


def test_poison_after_too_many_crashes(store: JobStore) -> None:
    fid = new_id()
    statuses = []
    for i in range(4):
        statuses.append(claim(store, fid, f"w{i}", lease=0.05, max_crashes=2).status)
        time.sleep(0.07)
    assert statuses == ["claimed", "claimed", "claimed", "poison"]


def test_conflicting_fingerprint(store: JobStore) -> None:
    fid = new_id()
    claim(store, fid, fp="a")
    assert claim(store, fid, "w2", fp="b").status == "conflict"


def test_only_owner_transitions(store: JobStore) -> None:
    fid = new_id()
    claim(store, fid, "w1")
    assert not store.finish(fid, "w2", JobState.CREATED, {"url": "u"})
    assert store.get(fid).state == JobState.PROCESSING  # type: ignore[union-attr]
    assert store.transition(fid, "w1", JobState.RETRYING, {"last_error": "x"}, delay=5)
    record = store.get(fid)
    assert record is not None
    assert record.state == JobState.RETRYING
    assert record.next_attempt_at == pytest.approx(time.time() + 5, abs=1)
    # Released: the old owner can no longer write.
    assert not store.finish(fid, "w1", JobState.CREATED)


def test_early_duplicate_of_a_retry_is_deferred(store: JobStore) -> None:
    fid = new_id()
    claim(store, fid, "w1")
    store.transition(fid, "w1", JobState.RETRYING, delay=3)
    early = claim(store, fid, "w2")
    assert early.status == "early"
    assert 2 < early.wait <= 3


def test_final_transition_writes_one_event_and_is_terminal(store: JobStore) -> None:
    fid = new_id()
    claim(store, fid, "w1")
    fields = {"url": "https://i.example.com/x", "invoice_id": 7, "attempts": 1}
    moved = store.finish(fid, "w1", JobState.CREATED, fields)
    assert moved is not None
    record = moved.record
    assert record is not None
    assert (record.state, record.invoice_id, record.url) == (
        JobState.CREATED,
        7,
        fields["url"],
    )
    assert store.finish(fid, "w1", JobState.FAILED, {"error_code": "x"}) is None
    events = [f for _, f in store.events() if f["foreign_id"] == fid]
    assert events == [
        {"kind": "job", "foreign_id": fid, "state": "created", "url": "https://i.example.com/x",
         "invoice_id": "7", "attempts": "1"}
    ]  # fmt: skip
    assert claim(store, fid, "w3").status == "done"
    record = store.get(fid)
    assert record is not None
    assert record.invoice_id == 7


def test_any_field_value_reaches_record_and_event_unchanged(store: JobStore) -> None:
    """Fields travel to the scripts as one JSON argument: quotes, backslashes, control
    characters, NUL, non-ASCII and JSON-looking text must arrive byte for byte."""
    fid = new_id()
    claim(store, fid, "w1")
    hostile = 'q"uo\\te\n\r\x00 é ✓ 🧾 {"a": [1]} \u2028 ' + "x" * 10_000
    fields = {"error_code": "provider_error", "error": hostile, "attempts": 2, "orphan": None}
    moved = store.finish(fid, "w1", JobState.FAILED, fields)
    assert moved is not None
    assert moved.record is not None
    assert moved.record.error == hostile
    assert moved.record.orphan is None
    events = [f for _, f in store.events() if f["foreign_id"] == fid]
    assert events == [
        {"kind": "job", "foreign_id": fid, "state": "failed", "error_code": "provider_error",
         "error": hostile, "attempts": "2"}
    ]  # fmt: skip


def test_scripts_are_loaded_again_where_redis_lost_them(
    store: JobStore, redis_client: redis.Redis
) -> None:
    """A restarted Redis (or a newly promoted replica) answers NOSCRIPT: the store loads the
    script and sends it again, once, within the same call."""
    fid = new_id()
    redis_client.script_flush()
    assert claim(store, fid, "w1").status == "claimed"
    redis_client.script_flush()
    moved = store.finish(fid, "w1", JobState.FAILED, {"error_code": "x", "attempts": 1})
    assert moved is not None
    assert moved.record is not None
    assert moved.record.state is JobState.FAILED


def test_a_store_on_a_single_connection_client_uses_that_connection(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """scripts.Lua takes pooled connections itself; a client that holds one connection
    (``single_connection_client``) keeps redis-py's own path: that connection, and its lock."""
    name = f"single-{new_id()}"
    client = redis.Redis.from_url(
        settings.state_url, single_connection_client=True, decode_responses=True,
        client_name=name,
    )  # fmt: skip
    try:
        store = JobStore(client, settings)
        fid = new_id()
        assert claim(store, fid, "w1").status == "claimed"
        moved = store.finish(fid, "w1", JobState.FAILED, {"error_code": "x", "attempts": 1})
        assert moved is not None
        assert moved.record is not None
        assert moved.record.state is JobState.FAILED
        assert [c["name"] for c in redis_client.client_list()].count(name) == 1
    finally:
        client.close()


def test_renew_keeps_lease(store: JobStore) -> None:
    fid = new_id()
    claim(store, fid, "w1", lease=0.2)
    assert store.transition(fid, "w1", JobState.PROCESSING, {"generation": 1}, renew=True)
    time.sleep(0.25)
    assert claim(store, fid, "w2").status == "busy"


def test_events_stream_is_capped(settings: Settings, redis_client: redis.Redis) -> None:
    store = JobStore.from_settings(settings.replace(events_maxlen=100))
    for _ in range(300):
        fid = new_id()
        claim(store, fid)
        store.finish(fid, "w1", JobState.FAILED, {"error_code": "x"})
    assert redis_client.xlen(settings.events_stream) < 300


def test_wait_returns_when_final_without_polling(store: JobStore) -> None:
    fid = new_id()
    claim(store, fid, "w1")
    result: list[object] = []
    waiter = threading.Thread(target=lambda: result.append(store.wait(fid, 10)))
    waiter.start()
    time.sleep(0.2)
    started = time.monotonic()
    store.finish(fid, "w1", JobState.CREATED, {"url": "u"})
    waiter.join(5)
    assert time.monotonic() - started < 1
    assert result[0].state == JobState.CREATED  # type: ignore[attr-defined]


def test_wait_times_out_and_handles_unknown(store: JobStore) -> None:
    fid = new_id()
    claim(store, fid, "w1")
    started = time.monotonic()
    assert store.wait(fid, 0.3).state == JobState.PROCESSING  # type: ignore[union-attr]
    assert 0.25 < time.monotonic() - started < 2
    started = time.monotonic()
    assert store.wait(new_id(), 0.2) is None
    assert time.monotonic() - started >= 0.2


def test_claim_retried_by_same_owner_is_idempotent(store: JobStore) -> None:
    # A claim whose reply was lost in a Redis blip is sent again by redis-py's retry.
    fid = new_id()
    first = claim(store, fid, "w1")
    again = claim(store, fid, "w1")
    assert again.status == "claimed"
    assert again.record is not None
    assert first.record is not None
    assert again.record.attempts == first.record.attempts == 1


def test_claim_without_record_asks_for_the_message_copy(
    store: JobStore, redis_client: redis.Redis
) -> None:
    fid = new_id()
    assert store.claim(fid, "w1", fingerprint="fp", fields={}).status == "missing"
    assert store.get(fid) is None
    claimed = store.claim(fid, "w1", fingerprint="fp", fields={}, kwargs='{"a": 1}')
    assert claimed.status == "claimed"
    assert redis_client.get(store.copy(fid)) == '{"a": 1}'
