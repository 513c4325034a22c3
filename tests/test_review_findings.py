"""Findings of an adversarial review of the ``restructure`` branch (issue 10's guarantees).

Each test is one finding: it shows a guarantee of the README broken on today's code, with real
Redis and real HTTP to the sandbox. They fail until the finding is fixed.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
import redis

from invoice_worker.app import create_app
from invoice_worker.client import ProviderClient
from invoice_worker.config import Settings
from invoice_worker.constants import Cleanup, ErrorCode, JobState
from invoice_worker.errors import InvalidRequestError
from invoice_worker.job import InvoiceJob
from invoice_worker.models import parse_request
from invoice_worker.producer import Producer
from invoice_worker.sandbox import Sandbox
from invoice_worker.scripts import Claim
from invoice_worker.store import JobStore
from invoice_worker.sweeper import Sweeper
from tests.conftest import job_kwargs, live, make_job, make_settings, request_data
from tests.test_hardening import (
    ReplyDroppingProxy,
    expire_with_a_failed_cancel,
    race_a_stalled_worker,
)


def _run_until_final(job: InvoiceJob, kwargs: dict[str, Any], rounds: int = 12) -> Any:
    outcome = None
    for n in range(rounds):
        outcome = job.run(kwargs, task_id="t1", owner=f"w{n}")
        if outcome.retry_in is None:
            return outcome
        time.sleep(min(outcome.retry_in, 2.0))
    return outcome


def _proxied(
    redis_server: Any, sandbox: Sandbox, **overrides: Any
) -> tuple[ReplyDroppingProxy, Settings]:
    proxy = ReplyDroppingProxy(int(redis_server.url.rsplit(":", 1)[1].split("/")[0]))
    url = f"redis://127.0.0.1:{proxy.port}/0"
    return proxy, make_settings(url, sandbox.url, **overrides)


# -- 1. a permanent error after an ambiguous attempt leaves the invoice live ----------------------


def test_permanent_error_after_an_ambiguous_attempt_leaves_no_live_invoice(
    settings: Settings, sandbox: Sandbox
) -> None:
    # Given an ambiguous first attempt: the invoice was created, the answer lost (502)
    kwargs = job_kwargs()
    fid = kwargs["request"]["foreign_id"]
    sandbox.script(["commit_then_502"], foreign_id=fid)
    first = make_job(settings).run(kwargs, task_id="t1", owner="w1")
    assert first.retry_in is not None
    assert len(live(sandbox, fid)) == 1
    # When the next attempt gets a permanent refusal (here a 403: a worker with a rotated or
    # mistyped key; a 400 field error or a proxy's 404 take the same path)
    bad_key = make_job(settings, api_key="rotated-key")
    outcome = bad_key.run(kwargs, task_id="t1", owner="w2")
    assert outcome.record is not None
    assert outcome.record.state is JobState.FAILED
    # Then the invoice the ambiguous attempt created is cancelled, or left as a pending cleanup
    # that the sweeper settles ("No invoice is left live behind a final job")
    assert outcome.record.orphan in (Cleanup.PENDING, Cleanup.CANCELLED, Cleanup.FINAL)
    good = make_job(settings)
    sweeper = Sweeper(create_app(settings), settings, good.store)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and live(sandbox, fid) and sweeper.clean_up() == 0:
        time.sleep(0.2)
    assert live(sandbox, fid) == []


# -- 2. a resent message carries a deadline other than the job's ----------------------------------


def test_a_stale_resend_cannot_lift_the_recorded_deadline(
    redis_server: Any, sandbox: Sandbox, redis_client: redis.Redis
) -> None:
    settings = make_settings(redis_server.url, sandbox.url, visibility_timeout=4)
    producer = Producer(settings)
    data = request_data()
    fid = data["foreign_id"]
    # Given a job enqueued with a deadline 1 s away, whose message is then lost (a worker
    # killed between the broker's pop and its own bookkeeping)
    producer.enqueue(data, deadline=time.time() + 1)
    assert redis_client.delete(settings.queue) == 1
    # When the shop enqueues the same request again after the redelivery delay (same request:
    # not a conflict; the producer resends because the job is still queued)
    time.sleep(settings.broker_visibility_timeout + 0.3)
    again = producer.enqueue(data)
    assert again.deadline is not None  # the job's deadline is the recorded one
    raw = redis_client.rpop(settings.queue)
    assert raw is not None, "the producer resent the job"
    envelope = json.loads(raw)  # type: ignore[arg-type]
    _, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
    outcome = make_job(settings).run(kwargs, task_id=envelope["headers"]["id"], owner="w1")
    producer.close()
    # Then the job's deadline still holds: nothing is created after it
    assert outcome.record is not None
    assert outcome.record.state is JobState.EXPIRED, (outcome.record.state, again.deadline)
    assert sandbox.create_calls(fid) == 0


# -- 3. the claim's fence is dated after the claim returned ---------------------------------------


class StallAfterClaimStore(JobStore):
    """The real store; the first claim's reply reaches the worker late (a frozen VM, a GC
    pause, or redis-py re-running the script after a lost reply and a slow reconnect)."""

    stall = 0.0

    def claim(self, *args: Any, **kwargs: Any) -> Claim:
        result = super().claim(*args, **kwargs)
        if result.status == "claimed":
            stall, self.stall = self.stall, 0.0
            time.sleep(stall)
        return result


def test_a_worker_stalled_right_after_its_claim_sends_nothing(
    settings: Settings, sandbox: Sandbox
) -> None:
    store = StallAfterClaimStore(JobStore.from_settings(settings).redis, settings)
    store.stall = settings.lease + 1
    stalled = InvoiceJob(store, ProviderClient.from_settings(settings), settings, rand=lambda: 0.0)
    kwargs = job_kwargs()
    fid = kwargs["request"]["foreign_id"]
    # When another worker takes the job over after the lease, and creates the invoice
    mine, other = race_a_stalled_worker(settings, stalled, kwargs)
    assert other.record is not None
    assert other.record.state is JobState.CREATED
    # Then the stalled worker, whose lease ended before it could send, sent nothing
    assert mine.record is None
    assert sandbox.create_calls(fid) == 1


# -- 4, 5. scripts that are not idempotent for their caller ---------------------------------------


def pending_cleanup(store: JobStore) -> str:
    """A failed job with a pending cleanup, taken by a sweeper; returns its foreign_id."""
    kwargs = job_kwargs()
    fid: str = kwargs["request"]["foreign_id"]
    fp = parse_request(kwargs["request"]).fingerprint()
    store.claim(fid, "w1", fingerprint=fp, fields={"task_id": "t1"}, kwargs="{}")
    store.finish(fid, "w1", JobState.FAILED, {"orphan": "pending"}, cleanup_in=0)
    assert [f for f, _, _ in store.take_cleanups(30)] == [fid]
    return fid


def test_a_lost_reply_to_settle_cleanup_counts_once(redis_server: Any, sandbox: Sandbox) -> None:
    proxy, settings = _proxied(redis_server, sandbox)
    store = JobStore.from_settings(settings)
    fid = pending_cleanup(store)
    # When the reply to the settle is lost (redis-py re-sends the script)
    store.redis.script_load(store._cleanup.script)
    proxy.armed.set()
    result = store.settle_cleanup(fid, Cleanup.CANCELLED, retry_after=1, max_tries=12)
    proxy.close()
    assert proxy.dropped == 1
    assert result is Cleanup.CANCELLED
    # Then the re-run answers what the first run did, and counts nothing twice
    assert int(store.redis.hget(store.stats, "cleanups:cancelled") or 0) == 1
    assert int(store.redis.hget(store.key(fid), "cleanup_tries") or 0) == 1


def test_a_lost_reply_to_sweep_still_returns_the_lost_jobs(
    redis_server: Any, sandbox: Sandbox
) -> None:
    from invoice_worker.scripts import NewJob

    proxy, settings = _proxied(redis_server, sandbox)
    store = JobStore.from_settings(settings)
    kwargs = job_kwargs()
    fid = kwargs["request"]["foreign_id"]
    fp = parse_request(kwargs["request"]).fingerprint()
    # Given a queued job whose message was lost, now past its due time
    store.enqueue([NewJob(fid, "t1", fp, {"foreign_id": fid}, json.dumps(kwargs))])
    store.redis.zadd(store.due, {store.member(fid): 0})
    # When the reply to the sweep is lost (redis-py re-sends the script)
    store.redis.script_load(store._sweep.script)
    proxy.armed.set()
    found = store.sweep(0)
    proxy.close()
    assert proxy.dropped == 1
    # Then the re-run answers what the first run did: the job to send again
    assert [f for f, _, _ in found] == [fid]


# -- 6. a pending cleanup dies with its record ----------------------------------------------------


def test_a_pending_cleanup_outlives_its_record_ttl(redis_server: Any, sandbox: Sandbox) -> None:
    # Settings the worker accepts: a record TTL of 60 s (it must only exceed twice a job's
    # longest pause), while a pending cleanup is retried for about 2 hours.
    settings = make_settings(redis_server.url, sandbox.url, record_ttl=60)
    job = make_job(settings)
    fid, outcome = expire_with_a_failed_cancel(job, sandbox)
    assert outcome.record is not None
    assert outcome.record.orphan is Cleanup.PENDING
    assert len(live(sandbox, fid)) == 1
    # Then the record now outlives the cleanup's whole schedule (fixed: it was 60 s)
    ttl = job.store.redis.ttl(job.store.key(fid))
    assert ttl >= settings.cleanup_horizon - 5
    # And should it still vanish (deleted by hand, say), the cleanup is reported, not dropped
    job.store.redis.pexpire(job.store.key(fid), 1)
    time.sleep(0.05)
    sweeper = Sweeper(create_app(settings), settings, job.store)
    for _ in range(3):
        sweeper.clean_up()
    # Then the invoice is cancelled, or at least reported as may_remain for a human
    reported = int(job.store.redis.hget(job.store.stats, "cleanups:may_remain") or 0)
    assert live(sandbox, fid) == [] or reported == 1


# -- 7. a lease that the fence margin does not fit -------------------------------------------------


def test_an_accepted_lease_lets_the_provider_be_called(redis_server: Any, sandbox: Sandbox) -> None:
    # Settings the worker accepts: the lease exceeds two provider calls (2 x 0.3 s)
    settings = make_settings(
        redis_server.url, sandbox.url, connect_timeout=0.1, read_timeout=0.2, lease_seconds=0.7
    )
    job = make_job(settings)
    kwargs = job_kwargs()
    fid = kwargs["request"]["foreign_id"]
    outcome = _run_until_final(job, kwargs)
    # Then the job can run: the provider is called and the invoice created
    assert outcome is not None
    assert outcome.record is not None
    assert sandbox.create_calls(fid) >= 1, outcome.record.error
    assert outcome.record.state is JobState.CREATED


# -- 8. the invalid-message namespace is open to real orders --------------------------------------


def test_an_invalid_message_is_recorded_even_if_an_order_took_its_id(
    settings: Settings, sandbox: Sandbox
) -> None:
    producer = Producer(settings)
    # Given that no order may take an id in the namespace of invalid messages (fixed: it could)
    for fid in ("invalid-message:t-42", "INVALID-MESSAGE:t-42"):
        with pytest.raises(InvalidRequestError, match="foreign_id"):
            producer.enqueue(request_data(foreign_id=fid))
    producer.close()
    # When an invalid message (an e-mail address as its foreign_id) arrives with task id t-42
    bad = job_kwargs(foreign_id="order-1")
    bad["request"]["foreign_id"] = "buyer@example.com"
    outcome = make_job(settings).run(bad, task_id="t-42", owner="w1")
    # Then it is recorded failed / invalid_message, and the order is left alone
    assert outcome.record is not None, "the invalid message was not recorded anywhere"
    assert outcome.record.error_code == ErrorCode.INVALID_MESSAGE
    assert outcome.record.foreign_id == "invalid-message:t-42"


# -- 9. a settle into an expired record leaves a hash that crashes readers ------------------------


def test_a_cleanup_settled_after_its_record_expired_leaves_it_readable(
    settings: Settings, sandbox: Sandbox
) -> None:
    store = JobStore.from_settings(settings)
    # Given a sweeper that took the cleanup, and the record expiring during its cancel call
    fid = pending_cleanup(store)
    store.redis.delete(store.key(fid))
    store.settle_cleanup(fid, Cleanup.CANCELLED, retry_after=1, max_tries=12)
    # Then the job reads as unknown (or as a record), never as a crash, and nothing is kept
    # forever
    record = store.get(fid)
    assert record is None or record.state.final
    assert store.redis.ttl(store.key(fid)) != -1


# -- 10. the deadline is checked before the final transition, not in it ---------------------------


class StallBeforeFinishStore(JobStore):
    """The real store; the worker stalls (a GC pause, a frozen VM, a slow Redis) between its
    deadline check and the final transition that records ``created``."""

    stall = 0.0

    def finish(self, foreign_id: str, owner: str, state: JobState, *args: Any, **kw: Any) -> Any:
        if state is JobState.CREATED:
            time.sleep(self.stall)
        return super().finish(foreign_id, owner, state, *args, **kw)


def test_a_job_never_reports_created_after_its_deadline(
    settings: Settings, sandbox: Sandbox
) -> None:
    store = StallBeforeFinishStore(JobStore.from_settings(settings).redis, settings)
    store.stall = 1.5
    job = InvoiceJob(store, ProviderClient.from_settings(settings), settings, rand=lambda: 0.0)
    deadline = time.time() + 1.0
    kwargs = job_kwargs(deadline=deadline)
    fid = kwargs["request"]["foreign_id"]
    outcome = job.run(kwargs, task_id="t1", owner="w1")
    assert outcome.record is not None
    # Then the job does not report created after its deadline (the invoice, answered in time
    # but recorded late, is cancelled and the job ends expired)
    assert outcome.record.updated_at is not None
    assert outcome.record.state is not JobState.CREATED or outcome.record.updated_at <= deadline
    assert outcome.record.state is not JobState.CREATED or len(live(sandbox, fid)) == 0
