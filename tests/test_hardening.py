"""Regression tests for the edges an independent review broke (issue 10), at the job level:
real Redis, real HTTP to the sandbox, the job function called as a worker calls it."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from invoice_worker.app import create_app
from invoice_worker.client import ProviderClient
from invoice_worker.config import Settings
from invoice_worker.constants import Cleanup, ErrorCode, JobState
from invoice_worker.errors import ConflictError, InvalidRequestError
from invoice_worker.job import InvoiceJob
from invoice_worker.models import InvoiceRequest, parse_request
from invoice_worker.preflight import require_noeviction, server_settings
from invoice_worker.producer import Producer
from invoice_worker.sandbox import Faults, Sandbox
from invoice_worker.store import JobStore
from invoice_worker.sweeper import Sweeper
from tests.conftest import KEY, SECRET, job_kwargs, live, make_job, request_data


class StalledClient(ProviderClient):
    """The real client, after a stall before each create (a frozen VM, slow DNS...)."""

    stall = 0.0

    def create_invoice(self, request: InvoiceRequest, *, send_by: float | None = None) -> Any:
        time.sleep(self.stall)
        return super().create_invoice(request, send_by=send_by)


def stalled_job(settings: Settings, stall: float) -> InvoiceJob:
    client = StalledClient.from_settings(settings)
    assert isinstance(client, StalledClient)
    client.stall = stall
    return InvoiceJob(JobStore.from_settings(settings), client, settings, rand=lambda: 0.0)


@pytest.fixture
def producer(settings: Settings) -> Iterator[Producer]:
    p = Producer(settings)
    yield p
    p.close()


# -- 1. options validated by one model, on both sides ------------------------------------------


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"callback_task": "", "callback_queue": "cb"}, "callback_task"),
        ({"deadline": True}, "deadline"),
        ({"deadline": "2030-01-01"}, "deadline"),
        ({"deadline": float("inf")}, "deadline"),
        ({"callback_task": "shop.paid", "callback_queue": "q" * 300}, "callback_queue"),
        ({"callback_task": "shop.paid"}, "callback_queue"),
        ({"callback_queue": "callbacks"}, "callback_queue"),
        ({"callback_task": "shop paid", "callback_queue": "callbacks"}, "callback_task"),
    ],
)
def test_producer_refuses_bad_options_and_writes_nothing(
    producer: Producer, redis_client: redis.Redis, options: dict[str, Any], field: str
) -> None:
    data = request_data()
    with pytest.raises(InvalidRequestError) as info:
        producer.enqueue(data, **options)
    assert field in info.value.errors, info.value.errors
    assert producer.get(data["foreign_id"]) is None
    assert redis_client.llen(producer.settings.queue) == 0


def test_callback_into_the_invoice_queue_is_refused(producer: Producer) -> None:
    queue = producer.settings.queue
    with pytest.raises(InvalidRequestError) as info:
        producer.enqueue(request_data(), callback_task="shop.paid", callback_queue=queue)
    assert "invoice queue" in info.value.errors["callback_queue"]


@pytest.mark.parametrize(
    "options",
    [
        {"deadline": "2030-01-01"},
        {"callback_task": "shop.paid"},
        {"callback_task": "shop.paid", "callback_queue": "q" * 300},
        {"unknown_option": 1},
    ],
)
def test_worker_records_a_message_with_bad_options(
    settings: Settings, sandbox: Sandbox, options: dict[str, Any]
) -> None:
    job = make_job(settings)
    kwargs = {**job_kwargs(), **options}
    fid = kwargs["request"]["foreign_id"]
    outcome = job.run(kwargs, task_id="t-opts", owner="w1")
    assert outcome.record is not None
    assert outcome.finished
    assert outcome.record.state is JobState.FAILED
    assert outcome.record.error_code == ErrorCode.INVALID_MESSAGE
    assert sandbox.create_calls(fid) == 0
    # A redelivery finds it final: no second record, no second event.
    assert job.run(kwargs, task_id="t-opts", owner="w2").finished is False


# -- 2. amounts of bounded magnitude --------------------------------------------------------------


@pytest.mark.parametrize("amount", ["1E+999999", "1E+100000000", "1E+999999999999999999", "9" * 65])
def test_huge_amounts_are_refused_naming_the_field(amount: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_request(request_data(amount=amount))
    assert list(info.value.errors) == ["amount"]


def test_worker_records_an_overflowing_amount_as_invalid(settings: Settings) -> None:
    job = make_job(settings)
    kwargs = job_kwargs()
    kwargs["request"]["amount"] = "1E+100000000"
    outcome = job.run(kwargs, task_id="t-amount", owner="w1")
    assert outcome.record is not None
    assert outcome.record.error_code == ErrorCode.INVALID_MESSAGE
    assert "request.amount" in outcome.record.errors


# -- 4. invalid messages keep personal data and forged lines out ----------------------------------


def test_email_foreign_id_is_recorded_under_the_task_id(
    settings: Settings, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    job = make_job(settings)
    kwargs = job_kwargs()
    kwargs["request"].update(foreign_id="jane.doe@example.com", amount="x")
    with caplog.at_level(logging.INFO):
        outcome = job.run(kwargs, task_id="t-pii", owner="w1")
    assert outcome.record is not None
    assert outcome.record.foreign_id == "invalid-message:t-pii"
    keys = [k for k in redis_client.scan_iter(f"{settings.key_prefix}*")]
    assert not [k for k in keys if "jane" in k]
    events = job.store.events()
    assert events
    assert "jane" not in repr(events)
    assert "jane" not in caplog.text
    assert "jane" not in repr(outcome.record)


def test_control_characters_cannot_forge_log_lines(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    job = make_job(settings)
    kwargs = job_kwargs()
    kwargs["request"].update(foreign_id="a\nINFO forged line", amount="x")
    with caplog.at_level(logging.INFO):
        job.run(kwargs, task_id="t\nforged", owner="w1")
    for record in caplog.records:
        assert "\n" not in record.getMessage(), record.getMessage()


# -- 5. derived ids live in their own namespace; ids are compared case-insensitively --------------


@pytest.mark.parametrize("fid", ["A~r1", "order~x", "caf\u00e9", " lead", "trail ", "a\tb"])
def test_reserved_or_unsafe_foreign_ids_are_refused(fid: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_request(request_data(foreign_id=fid))
    assert "foreign_id" in info.value.errors


def test_a_derived_id_sent_as_a_message_never_reaches_the_provider(
    settings: Settings, sandbox: Sandbox
) -> None:
    job = make_job(settings)
    kwargs = job_kwargs()
    kwargs["request"]["foreign_id"] = "order-1~r1"
    outcome = job.run(kwargs, task_id="t-derived", owner="w1")
    assert outcome.record is not None
    assert outcome.record.foreign_id == "invalid-message:t-derived"
    assert sandbox.create_calls("order-1~r1") == 0


def test_ids_differing_only_in_case_are_one_job(producer: Producer) -> None:
    data = request_data(foreign_id="Order-CASE-" + request_data()["foreign_id"])
    producer.enqueue(data)
    with pytest.raises(ConflictError):
        producer.enqueue({**data, "foreign_id": data["foreign_id"].lower()})


# -- 8. fencing: a stalled worker never acts after its lease -------------------------------------


def race_a_stalled_worker(
    settings: Settings, stalled: InvoiceJob, kwargs: dict[str, Any]
) -> tuple[Any, Any]:
    """Run ``stalled`` (which stalls past its lease somewhere) while another worker takes the
    job over once the lease has expired; returns (the stalled outcome, the other's)."""
    results: list[Any] = []
    thread = threading.Thread(
        target=lambda: results.append(stalled.run(kwargs, task_id="t1", owner="stalled"))
    )
    thread.start()
    time.sleep(settings.lease + 0.2)
    other = make_job(settings).run(kwargs, task_id="t1", owner="other")
    thread.join(timeout=30)
    assert results
    return results[0], other


def test_stalled_worker_sends_nothing_and_cannot_touch_the_recorded_invoice(
    settings: Settings, sandbox: Sandbox
) -> None:
    # Given a worker that stalls longer than its lease before its request leaves
    kwargs = job_kwargs()
    fid = kwargs["request"]["foreign_id"]
    # When another worker takes the job over once the lease has expired, and creates it
    mine, other = race_a_stalled_worker(
        settings, stalled_job(settings, stall=settings.lease + 1), kwargs
    )
    assert other.record is not None
    assert other.record.state is JobState.CREATED
    # Then the stalled worker sent nothing, wrote nothing, and one live invoice remains
    assert mine.record is None
    assert sandbox.create_calls(fid) == 1
    invoices = live(sandbox, fid)
    assert len(invoices) == 1
    assert invoices[0]["url"] == other.record.url


# -- 10. deadlines hold ---------------------------------------------------------------------------


def test_no_create_starts_after_the_deadline(settings: Settings, sandbox: Sandbox) -> None:
    job = stalled_job(settings, stall=1.0)
    kwargs = job_kwargs(deadline=time.time() + 0.5)
    fid = kwargs["request"]["foreign_id"]
    outcome = job.run(kwargs, task_id="t1", owner="w1")
    for n in range(2, 6):
        if outcome.retry_in is None:
            break
        outcome = job.run(kwargs, task_id="t1", owner=f"w{n}")
    assert outcome.record is not None
    assert outcome.record.state is JobState.EXPIRED
    assert sandbox.create_calls(fid) == 0


def test_an_invoice_answered_after_the_deadline_is_cancelled(
    redis_server: Any, tmp_path: Any
) -> None:
    from tests.conftest import make_settings

    with Sandbox(KEY, SECRET, faults=Faults(latency_ms=800)) as slow:
        settings = make_settings(redis_server.url, slow.url, read_timeout=3.0, lease_seconds=8.0)
        job = make_job(settings)
        kwargs = job_kwargs(deadline=time.time() + 0.4)
        fid = kwargs["request"]["foreign_id"]
        outcome = job.run(kwargs, task_id="t1", owner="w1")
        assert outcome.record is not None
        assert outcome.record.state is JobState.EXPIRED
        assert outcome.record.url is None
        assert outcome.record.orphan is Cleanup.CANCELLED
        assert slow.create_calls(fid) == 1
        assert live(slow, fid) == []


# -- 11. no invoice left live behind a final job --------------------------------------------------


def expire_with_a_failed_cancel(job: InvoiceJob, sandbox: Sandbox) -> tuple[str, Any]:
    """Run a job whose first attempt commits but loses its answer, whose deadline then passes,
    and whose give-up cancel fails (the provider down for every call); returns (foreign_id,
    the final outcome)."""
    kwargs = job_kwargs(deadline=time.time() + 1.5)
    fid: str = kwargs["request"]["foreign_id"]
    sandbox.script(["commit_then_502"], foreign_id=fid)
    assert job.run(kwargs, task_id="t1", owner="w1").retry_in is not None
    time.sleep(1.6)
    sandbox.set_faults(Faults(error_503=1.0))
    try:
        return fid, job.run(kwargs, task_id="t1", owner="w2")
    finally:
        sandbox.set_faults(Faults())


def test_failed_cancel_leaves_a_pending_cleanup_that_the_sweeper_settles(
    settings: Settings, sandbox: Sandbox
) -> None:
    # Given an ambiguous attempt, a deadline that then passes, and a give-up cancel that fails
    job = make_job(settings)
    fid, outcome = expire_with_a_failed_cancel(job, sandbox)
    # Then the job is final with a pending cleanup, and the invoice is still live
    assert outcome.record is not None
    assert outcome.record.state is JobState.EXPIRED
    assert outcome.record.orphan is Cleanup.PENDING
    assert len(live(sandbox, fid)) == 1
    # And the sweeper's next pass cancels it and records that
    sweeper = Sweeper(create_app(settings), settings, job.store)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not sweeper.clean_up():
        time.sleep(0.2)
    record = job.store.get(fid)
    assert record is not None
    assert record.orphan is Cleanup.CANCELLED
    assert live(sandbox, fid) == []


def test_worker_lost_after_ambiguity_schedules_the_cancel(
    settings: Settings, sandbox: Sandbox
) -> None:
    job = make_job(settings, max_redeliveries=0)
    kwargs = job_kwargs()
    fid = kwargs["request"]["foreign_id"]
    # Given a claim whose worker died mid-call (it never reported back), after an invoice exists
    sandbox.script(["commit_then_drop"], foreign_id=fid)
    claim = job.store.claim(fid, "dead", fingerprint=parse_request(kwargs["request"]).fingerprint(),
                            fields={"task_id": "t1"}, kwargs="{}")  # fmt: skip
    assert claim.status == "claimed"
    client = ProviderClient.from_settings(settings)
    with pytest.raises(Exception):  # noqa: B017, PT011 - the answer is lost: any transport error
        client.create_invoice(parse_request(kwargs["request"]))
    job.store.redis.hset(job.store.key(fid), "lease_until", 0)
    # When the next delivery finds its worker lost too often
    outcome = job.run(kwargs, task_id="t1", owner="w2")
    # Then it ends worker_lost with the cancel scheduled, and the sweeper does it
    assert outcome.record is not None
    assert outcome.record.error_code == ErrorCode.WORKER_LOST
    assert outcome.record.orphan is Cleanup.PENDING
    sweeper = Sweeper(create_app(settings), settings, job.store)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not sweeper.clean_up():
        time.sleep(0.1)
    assert live(sandbox, fid) == []


# -- 12, 13. settings that would break a guarantee are refused, secrets never printed -------------


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"record_ttl": 60}, "INVOICE_RECORD_TTL"),
        ({"broker_url": "amqp://guest:guest@127.0.0.1//"}, "INVOICE_REDIS_URL"),
        ({"api_url": "http://api.example.com/api/v2"}, "INVOICE_API_URL"),
        ({"visibility_timeout": 20, "retry_cap": 60}, "INVOICE_RETRY_CAP"),
        ({"lease_seconds": 1}, "INVOICE_LEASE_SECONDS"),
        ({"api_key": "key with space"}, "INVOICE_API_KEY"),
    ],
)
def test_settings_that_break_a_guarantee_are_refused(values: dict[str, Any], named: str) -> None:
    from invoice_worker.errors import ConfigError

    secret = "s3cr3t-" + "x" * 40
    with pytest.raises(ConfigError) as info:
        Settings.load(_env_file=None, api_secret=secret, **values)
    text = str(info.value)
    assert named in text, text
    assert secret not in text
    assert secret[-20:] not in text


def test_keys_are_stripped() -> None:
    settings = Settings(_env_file=None, api_key="key\n", api_secret="  secret\n")
    assert settings.api_key.get_secret_value() == "key"
    assert settings.api_secret.get_secret_value() == "secret"


def test_an_evicting_job_store_is_refused(settings: Settings, redis_client: redis.Redis) -> None:
    from invoice_worker.errors import ConfigError

    assert server_settings(redis_client)["maxmemory_policy"] == "noeviction"
    redis_client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        with pytest.raises(ConfigError, match="noeviction"):
            require_noeviction(redis_client)
    finally:
        redis_client.config_set("maxmemory-policy", "noeviction")


# -- 15. every script is idempotent for its caller -----------------------------------------------


class ReplyDroppingProxy:
    """A TCP proxy to Redis that, when armed, lets one request through and drops its reply
    (closing the connection), as a network cut between Redis' write and our read does."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.armed = threading.Event()
        self.dropped = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            doomed = threading.Event()  # this connection's next reply is to be dropped
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pump, args=(src, dst, src is client, doomed), daemon=True
                ).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, to_redis: bool, doomed: threading.Event
    ) -> None:
        try:
            while data := src.recv(65536):
                if to_redis and b"EVALSHA" in data and self.armed.is_set():
                    self.armed.clear()
                    doomed.set()
                elif not to_redis and doomed.is_set():
                    self.dropped += 1
                    for sock in (src, dst):
                        sock.shutdown(socket.SHUT_RDWR)  # wakes the other pump and the client
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # Either side ending ends the pair; each pump closes the socket it reads.
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_RDWR)
            src.close()

    def close(self) -> None:
        self.listener.close()


def test_a_lost_reply_to_the_final_transition_is_answered_by_the_rerun(
    redis_server: Any, sandbox: Sandbox
) -> None:
    from tests.conftest import make_settings

    # Given the job store reached through a proxy that will drop one reply
    proxy = ReplyDroppingProxy(int(redis_server.url.rsplit(":", 1)[1].split("/")[0]))
    url = f"redis://127.0.0.1:{proxy.port}/0"
    settings = make_settings(url, sandbox.url)
    store = JobStore.from_settings(settings)
    kwargs = job_kwargs()
    fid = kwargs["request"]["foreign_id"]
    fp = parse_request(kwargs["request"]).fingerprint()
    claim = store.claim(fid, "w1", fingerprint=fp, fields={"task_id": "t1"}, kwargs="{}")
    assert claim.status == "claimed"
    # When the reply to the final transition is lost (redis-py re-sends the script; loaded
    # first, so the reply dropped is the script's, not a NOSCRIPT)
    store.redis.script_load(store._transition.script)
    proxy.armed.set()
    moved = store.finish(fid, "w1", JobState.CREATED, {"url": "https://pay.example.com/x"})
    proxy.close()
    # Then the re-run answers what the first run did: the final record, and one event
    assert proxy.dropped == 1
    assert moved is not None
    assert moved.record is not None
    assert moved.record.state is JobState.CREATED
    assert [f["foreign_id"] for _, f in store.events()].count(fid) == 1


def test_a_lost_reply_to_a_retry_transition_keeps_the_job_moving(
    redis_server: Any, sandbox: Sandbox
) -> None:
    from tests.conftest import make_settings

    proxy = ReplyDroppingProxy(int(redis_server.url.rsplit(":", 1)[1].split("/")[0]))
    settings = make_settings(f"redis://127.0.0.1:{proxy.port}/0", sandbox.url)
    store = JobStore.from_settings(settings)
    kwargs = job_kwargs()
    fid = kwargs["request"]["foreign_id"]
    fp = parse_request(kwargs["request"]).fingerprint()
    store.claim(fid, "w1", fingerprint=fp, fields={"task_id": "t1"}, kwargs="{}")
    store.redis.script_load(store._transition.script)
    proxy.armed.set()
    moved = store.transition(fid, "w1", JobState.RETRYING, {"last_error": "x"}, delay=0.1)
    proxy.close()
    assert proxy.dropped == 1
    assert moved is not None  # not "lease lost": the job is retried, not left to the sweeper
    record = store.get(fid)
    assert record is not None
    assert record.state is JobState.RETRYING
    assert int(store.redis.hget(store.stats, "retries") or 0) == 1  # counted once


@pytest.mark.parametrize("atomic", [True, False], ids=["one-redis", "broker-apart"])
def test_a_lost_reply_to_enqueue_sends_one_message_and_reports_the_job(
    redis_server: Any, sandbox: Sandbox, atomic: bool
) -> None:
    from tests.conftest import make_settings

    proxy = ReplyDroppingProxy(int(redis_server.url.rsplit(":", 1)[1].split("/")[0]))
    state_url = f"redis://127.0.0.1:{proxy.port}/0"
    # Apart: the message goes through Celery after the record, to the broker directly.
    broker = state_url if atomic else redis_server.url
    settings = make_settings(state_url, sandbox.url, broker_url=broker)
    producer = Producer(settings)
    assert producer.atomic is atomic
    data = request_data()
    producer.enqueue(request_data())  # loads the script: the reply dropped is the enqueue's
    direct = redis.Redis.from_url(redis_server.url)
    before = direct.llen(settings.queue)
    proxy.armed.set()
    record = producer.enqueue(data)
    proxy.close()
    assert proxy.dropped == 1
    assert record.state is JobState.QUEUED
    assert record.foreign_id == data["foreign_id"]
    assert direct.llen(settings.queue) == before + 1
    producer.close()
    direct.close()


@pytest.mark.slow
def test_a_message_whose_kwargs_is_a_list_ends_recorded(
    settings: Settings, sandbox: Sandbox, start_worker: Any, redis_client: redis.Redis
) -> None:
    import base64
    import json

    from invoice_worker.message import redis_envelope

    # Given a message for our task whose kwargs is a list (Celery cannot even call the task)
    worker = start_worker(settings)
    envelope = json.loads(
        redis_envelope(create_app(settings), job_kwargs(), "t-list-kwargs", settings.queue)
    )
    envelope["body"] = base64.b64encode(json.dumps([[], [1, 2], {}]).encode()).decode()
    redis_client.lpush(settings.queue, json.dumps(envelope))
    # When the worker takes it
    store = JobStore.from_settings(settings)
    record = store.wait("invalid-message:t-list-kwargs", 20)
    # Then it ends failed / invalid_message, and the worker goes on
    assert record is not None
    assert record.state is JobState.FAILED
    assert record.error_code == ErrorCode.INVALID_MESSAGE
    assert "kwargs" in record.errors
    assert worker.alive


@pytest.mark.parametrize("task_id", ["abc\n", "a b", "t" * 65, "x@example.com", ""])
def test_task_ids_that_are_not_plain_are_hashed(task_id: str) -> None:
    from invoice_worker.job import safe_task_id

    safe = safe_task_id(task_id)
    assert safe.startswith("sha256-")
    assert safe == safe_task_id(task_id)  # stable: a redelivery finds the same record


def test_a_lost_reply_to_a_stale_enqueue_still_resends(redis_server: Any, sandbox: Sandbox) -> None:
    from tests.conftest import make_settings

    proxy = ReplyDroppingProxy(int(redis_server.url.rsplit(":", 1)[1].split("/")[0]))
    url = f"redis://127.0.0.1:{proxy.port}/0"
    settings = make_settings(url, sandbox.url, visibility_timeout=1, retry_cap=0.5)
    producer = Producer(settings)
    direct = redis.Redis.from_url(redis_server.url)
    # Given a job whose message was lost, still queued past its redelivery delay
    data = request_data()
    producer.enqueue(data)
    direct.delete(settings.queue)
    time.sleep(1.1)
    # When it is enqueued again and the reply to that enqueue is lost
    proxy.armed.set()
    producer.enqueue(data)
    proxy.close()
    # Then the re-run still says "stale", and the message is sent again, once
    assert proxy.dropped == 1
    assert direct.llen(settings.queue) == 1
    producer.close()
    direct.close()
