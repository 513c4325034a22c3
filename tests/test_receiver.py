"""The receiver end to end: the sandbox sends real, signed HTTP callbacks (with its faults) to the
receiver served by a real server (a thread, or the ``invoice-worker callbacks`` command as a
child process); jobs are created by the real job machinery; Redis is the session's own."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import redis
import requests

from invoice_worker import receiver as receiver_module
from invoice_worker.client import ProviderClient
from invoice_worker.constants import InvoiceStatus
from invoice_worker.devstack.embedded import EmbeddedRedis, free_port
from invoice_worker.devstack.processes import ChildProcess, child_env
from invoice_worker.models import parse_request
from invoice_worker.producer import Producer
from invoice_worker.receiver import CALLBACK_PATH, Receiver, handle_callback
from invoice_worker.sandbox import Faults
from tests.conftest import KEY, SECRET, job_kwargs, make_settings, request_data
from tests.paystack import PayStack


@pytest.fixture
def stack(redis_server: EmbeddedRedis) -> Iterator[PayStack]:
    with PayStack(redis_server.url) as paystack:
        yield paystack


def signed(data: Mapping[str, object]) -> tuple[bytes, str]:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return raw, hmac.new(SECRET.encode(), raw, hashlib.sha512).hexdigest()


def test_a_paid_invoice_reaches_the_record_the_stream_and_the_waiter(stack: PayStack) -> None:
    # Given an invoice created without timer (status created)
    record = stack.create(timer=False)
    fid = record.foreign_id
    assert record.invoice_status == InvoiceStatus.CREATED
    # When the payer pays it in full
    assert stack.pay(record, "full") == 3
    paid = stack.settle(fid)
    # Then the record follows the provider, the stream has one event per change
    assert paid.invoice_status == "confirmed"
    assert (paid.paid, paid.sent_currency, len(paid.transactions)) == ("0.01230000", "BTC", 1)
    assert paid.transactions[0]["confirmations"] == 1
    events = stack.events(fid)
    assert [(e["previous"], e["status"]) for e in events] == [
        ("created", "pending"), ("pending", "processing"), ("processing", "confirmed")
    ]  # fmt: skip
    assert {e["invoice_id"] for e in events} == {str(record.invoice_id)}
    assert [e["state"] for e in stack.events(fid, "job")] == ["created"]
    # And wait_for_status answers at once for a status already reached
    producer = Producer(stack.settings)
    try:
        assert producer.wait_for_status(fid, ["confirmed"], 0.01) == paid
    finally:
        producer.close()


def test_failures_keep_the_providers_error(stack: PayStack) -> None:
    less, expired = stack.create(), stack.create()
    stack.pay(less, "less")
    stack.pay(expired, "expire")
    record = stack.settle(less.foreign_id)
    assert (record.invoice_status, record.invoice_error) == (
        "failed", "Timer expired. User paid less than requested."
    )  # fmt: skip
    assert record.paid == "0.00615000"
    assert record.sent_amount == "0.01230000"
    assert stack.events(less.foreign_id)[-1]["error"] == record.invoice_error
    record = stack.settle(expired.foreign_id)
    assert (record.invoice_error, record.transactions) == ("Timer expired. User not paid.", [])


def test_bad_signatures_and_reencoded_json_are_refused(
    stack: PayStack, caplog: pytest.LogCaptureFixture
) -> None:
    record = stack.create()
    data: dict[str, object] = {
        "id": record.invoice_id, "foreign_id": record.foreign_id, "type": "invoice",
        "status": "confirmed", "error": "", "transactions": [],
    }  # fmt: skip
    raw, signature = signed(data)
    reencoded = json.dumps(data).encode()  # the same JSON, with spaces: other bytes
    with caplog.at_level(logging.INFO, logger="invoice_worker"):
        answers = [
            stack.post(reencoded, signature).status_code,
            stack.post(raw, "0" * 128).status_code,
            stack.post(raw, signature.upper()[:-1] + "x").status_code,
            stack.post(raw, signature, key="not-ours").status_code,
            requests.post(stack.url, data=raw, timeout=5).status_code,
            stack.post(raw, "é" * 128).status_code,
        ]
    assert answers == [403] * 6
    # Nothing changed, the refusals were counted and logged without the body
    assert stack.store.get(record.foreign_id) == record
    assert stack.events(record.foreign_id) == []
    stats = stack.stats()
    assert int(stats["callbacks:refused:bad_signature"]) == 4
    assert (stats["callbacks:refused:bad_key"], stats["callbacks:refused:no_key"]) == ("1", "1")
    assert "callback refused: reason=bad_signature" in caplog.text
    assert record.foreign_id not in caplog.text
    assert signature not in caplog.text
    # The same bytes, signed right, go through; the signature's case does not matter
    assert stack.post(raw, signature.upper()).status_code == 200
    assert [e["status"] for e in stack.events(record.foreign_id)] == ["confirmed"]


def test_a_badly_signed_first_attempt_is_refused_then_applied_on_retry(
    redis_server: EmbeddedRedis,
) -> None:
    with PayStack(redis_server.url, faults=Faults(callback_bad_signature=1)) as stack:
        record = stack.create()
        stack.pay(record, "full")
        stack.settle(record.foreign_id)
        listing = stack.delivered()
        assert [[a["status"] for a in c["attempts"]] for c in listing] == [[403, 200]] * 2
        assert [e["status"] for e in stack.events(record.foreign_id)] == ["processing", "confirmed"]


def test_a_replay_is_harmless(stack: PayStack) -> None:
    record = stack.create()
    stack.pay(record, "instalments")
    before = stack.settle(record.foreign_id)
    events = stack.events(record.foreign_id)
    # When every callback is sent again, as recorded (the back office's "resend" button)
    for callback in stack.delivered():
        answer = stack.post(callback["body"].encode(), callback["signature"])
        assert (answer.status_code, answer.json()["outcome"]) == (200, "duplicate")
    # Then nothing moves
    assert stack.store.get(record.foreign_id) == before
    assert stack.events(record.foreign_id) == events
    assert stack.stats()["callbacks:duplicate"] == "3"


def test_confirmed_before_processing_ends_confirmed(redis_server: EmbeddedRedis) -> None:
    with PayStack(redis_server.url, faults=Faults(callback_out_of_order=1)) as stack:
        record = stack.create()
        stack.pay(record, "full")
        listing = stack.delivered()
        assert [c["status"] for c in listing] == ["confirmed", "processing"]
        final = stack.store.get(record.foreign_id)
        assert final is not None
        assert final.invoice_status == "confirmed"
        assert [e["status"] for e in stack.events(record.foreign_id)] == ["confirmed"]
        assert final.transactions[0]["confirmations"] == 1  # the older copy did not win


@pytest.mark.parametrize("fault", ["callback_concurrent", "callback_duplicate"])
def test_the_same_callback_twice_yields_one_event(redis_server: EmbeddedRedis, fault: str) -> None:
    with PayStack(redis_server.url, faults=Faults.from_dict({fault: 1})) as stack:
        records = [stack.create(timer=False) for _ in range(3)]
        for record, mode in zip(records, ["full", "instalments", "less"], strict=True):
            stack.pay(record, mode)
        listing = stack.delivered()
        assert {len(c["attempts"]) for c in listing} == {2}
        assert {a["status"] for c in listing for a in c["attempts"]} == {200}
        expected = [
            ["pending", "processing", "confirmed"], ["pending", "processing", "confirmed"],
            ["pending", "failed"],
        ]  # fmt: skip
        assert [[e["status"] for e in stack.events(r.foreign_id)] for r in records] == expected
        stats = stack.stats()
        assert int(stats["callbacks:duplicate"]) == len(listing)


def test_a_receiver_down_for_a_while_applies_every_callback_once(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    with PayStack(redis_server.url) as stack:
        # Given the standalone receiver's address, where nothing listens yet
        port = free_port()
        stack.sandbox.set_callbacks(url=f"http://127.0.0.1:{port}{CALLBACK_PATH}")
        modes = ["full", "less", "instalments", "expire", "full"]
        records = [stack.create(timer=n % 2 == 0) for n in range(len(modes))]
        for record, mode in zip(records, modes, strict=True):
            stack.pay(record, mode)
        time.sleep(0.3)  # the first attempts and a retry or two are refused
        assert all(c["state"] == "pending" for c in stack.sandbox.callbacks())
        # When `invoice-worker callbacks` comes up
        argv = [sys.executable, "-m", "invoice_worker.cli", "callbacks", "--port", str(port)]
        receiver = ChildProcess("receiver", argv, child_env(stack.settings), tmp_path)
        receiver.start(ready="callback receiver at")
        try:
            listing = stack.delivered(timeout=30)
        finally:
            receiver.stop()
        # Then every callback was applied once, in the end
        assert {c["state"] for c in listing} == {"delivered"}
        for record, mode in zip(records, modes, strict=True):
            final = stack.store.get(record.foreign_id)
            assert final is not None
            assert final.invoice_status == (
                "confirmed" if mode in ("full", "instalments") else "failed"
            )
            statuses = [e["status"] for e in stack.events(record.foreign_id)]
            assert len(statuses) == len(set(statuses))
            assert statuses[-1] == final.invoice_status
        assert "callbacks:duplicate" not in stack.stats()
        log = receiver.log()
        assert "outcome=applied" in log
        assert KEY not in log
        assert SECRET not in log


def test_instalments_are_summed(stack: PayStack) -> None:
    record = stack.create(amount="0.0123")
    stack.pay(record, "instalments")
    paid = stack.settle(record.foreign_id)
    assert [tx["amount"] for tx in paid.transactions] == ["0.00615000", "0.00615000"]
    assert paid.paid == "0.01230000" == paid.sent_amount
    assert {tx["confirmations"] for tx in paid.transactions} == {1}
    assert stack.stats()["callbacks:recorded"] == "1"  # part 1: no status change


def test_an_orphans_callback_is_recorded_and_the_recreated_invoice_is_the_jobs(
    stack: PayStack,
) -> None:
    # Given a first create whose answer is lost after the provider committed it
    kwargs = job_kwargs(timer=False)
    fid = kwargs["request"]["foreign_id"]
    stack.sandbox.script(["commit_then_drop"], foreign_id=fid)
    first = stack.job.run(kwargs, task_id="t1", owner="w1")
    assert first.retry_in is not None
    # When the retry finds the id taken, cancels that invoice and re-creates under ~r1
    time.sleep(first.retry_in)
    record = stack.job.run(kwargs, task_id="t1", owner="w2").record
    assert record is not None
    assert record.provider_foreign_id == f"{fid}~r1"
    stack.delivered()
    # Then the orphan's cancel callback is recorded in history, and the job's invoice is live
    record = stack.store.get(fid)
    assert record is not None
    assert record.invoice_status == "created"
    (orphan,) = record.history
    assert (orphan["generation"], orphan["status"], orphan["orphan"]) == (0, "failed", True)
    assert stack.stats()["callbacks:orphan"] == "1"
    # And the re-created invoice's callbacks, under its derived id, are the job's
    stack.pay(record, "full")
    assert stack.settle(fid).invoice_status == "confirmed"
    assert [e["status"] for e in stack.events(fid)] == ["pending", "processing", "confirmed"]


def test_an_invoice_we_never_enqueued_is_stored_and_counted(stack: PayStack) -> None:
    client = ProviderClient.from_settings(stack.settings)
    try:
        foreign = request_data(foreign_id="made-elsewhere-1")
        invoice = client.create_invoice(parse_request(foreign))
    finally:
        client.close()
    stack.sandbox.pay("made-elsewhere-1", "full")
    listing = stack.delivered()
    assert {c["state"] for c in listing} == {"delivered"}
    assert stack.stats()["callbacks:unknown"] == "2"
    kept = stack.store.redis.hgetall(stack.receiver.callbacks.key(invoice.id))
    assert sorted(v for k, v in kept.items() if str(k).startswith("raw:")) == sorted(
        c["body"] for c in listing
    )
    assert stack.store.get("made-elsewhere-1") is None


def test_a_signed_callback_we_cannot_read_is_dead_lettered(stack: PayStack) -> None:
    for raw in (b"not json", json.dumps({"id": 5, "status": "refunded"}).encode()):
        signature = hmac.new(SECRET.encode(), raw, hashlib.sha512).hexdigest()
        answer = stack.post(raw, signature)
        assert (answer.status_code, answer.json()["outcome"]) == (200, "dead_letter")
    entries = [
        json.loads(e)
        for e in stack.store.redis.lrange(stack.receiver.callbacks.dead_letters, 0, -1)
    ]
    assert [e["payload"] for e in entries] == ['{"id": 5, "status": "refunded"}', "not json"]
    assert entries[1]["reason"] == "not JSON"
    assert stack.stats()["callbacks:dead_letter"] == "2"


def test_not_durable_or_unreachable_answers_503(redis_server: EmbeddedRedis) -> None:
    with PayStack(redis_server.url) as stack:
        record = stack.create()
        raw, signature = signed({"id": record.invoice_id, "foreign_id": record.foreign_id,
                                 "status": "processing"})  # fmt: skip
        headers = {"X-Processing-Key": KEY, "X-Processing-Signature": signature}
        # No replica can confirm: 503, so the provider sends it again.
        wanting = Receiver(stack.settings.replace(redis_min_replicas=1, redis_wait_timeout=0.05))
        status, answer = wanting.handle(raw, headers)
        assert (status, json.loads(answer)) == (503, {"error": "not_durable"})
        # Redis unreachable: 503, nothing to undo.
        down = stack.settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0")
        assert Receiver(down).handle(raw, headers)[0] == 503
        # The provider's retry, with Redis able to confirm, is answered 200.
        assert stack.receiver.handle(raw, list(headers.items()))[0] == 200


def test_the_status_task_receives_each_change(stack: PayStack, redis_client: redis.Redis) -> None:
    # Given a job enqueued with a status task on the shop's queue
    queue = f"shop-{stack.settings.queue}"
    producer = Producer(stack.settings)
    try:
        data = request_data()
        producer.enqueue(data, status_task="shop.invoice_status", status_queue=queue)
        kwargs = json.loads(str(redis_client.get(stack.store.copy(data["foreign_id"]))))
        assert kwargs["status_task"] == "shop.invoice_status"
        record = stack.job.run(kwargs, task_id="t1", owner="w1").record
        assert record is not None
        assert record.status_task == "shop.invoice_status"
        # When the invoice is paid
        stack.pay(record, "full")
        stack.settle(record.foreign_id)
        stack.delivered()
    finally:
        producer.close()
    # Then the shop's queue got the record at each change, in order
    sent = []
    for entry in reversed(redis_client.lrange(queue, 0, -1)):
        message = json.loads(entry)
        assert message["headers"]["task"] == "shop.invoice_status"
        args, _, _ = json.loads(base64.b64decode(message["body"]))
        sent.append(args[0]["invoice_status"])
    assert sent == ["processing", "confirmed"]
    final = stack.store.get(record.foreign_id)
    assert final is not None
    assert "buyer@example.com" not in json.dumps(final.to_dict())


def test_the_wsgi_application_answers_only_its_post(stack: PayStack) -> None:
    base = stack.url.removesuffix(CALLBACK_PATH)
    assert requests.post(f"{base}/elsewhere", data=b"{}", timeout=5).status_code == 404
    got = requests.get(stack.url, timeout=5)
    assert (got.status_code, got.headers["Allow"]) == (405, "POST")
    assert requests.post(stack.url, data=b"x" * (256 * 1024 + 1), timeout=5).status_code == 413


def test_logs_hold_no_body_and_no_signature(
    stack: PayStack, caplog: pytest.LogCaptureFixture
) -> None:
    record = stack.create()
    with caplog.at_level(logging.DEBUG, logger="invoice_worker"):
        stack.pay(record, "less")
        stack.settle(record.foreign_id)
        listing = stack.delivered()
    assert "outcome=applied" in caplog.text
    for callback in listing:
        assert callback["signature"] not in caplog.text
        txids = re.findall(r'"txid":"(\w+)"', callback["body"])
        assert not [txid for txid in txids if txid in caplog.text]
    assert Counter(r.levelname for r in caplog.records)["ERROR"] == 0


def test_wait_for_status_wakes_on_the_change(stack: PayStack) -> None:
    record = stack.create()
    producer = Producer(make_settings(stack.settings.state_url, stack.sandbox.url,
                                      key_prefix=stack.settings.key_prefix))  # fmt: skip
    try:
        assert producer.wait_for_status(record.foreign_id, ["confirmed"], 0.2) == record
        started = time.monotonic()
        stack.pay(record, "full")
        waited = producer.wait_for_status(record.foreign_id, {"confirmed", "failed"}, 10)
        assert waited is not None
        assert waited.invoice_status == "confirmed"
        assert time.monotonic() - started < 5
        assert producer.wait_for_status("nobody", ["confirmed"], 0.1) is None
    finally:
        producer.close()


def test_handle_callback_reads_the_environment_once(
    stack: PayStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in stack.settings.to_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(receiver_module, "_default", None)
    record = stack.create()
    raw, signature = signed(
        {"id": record.invoice_id, "foreign_id": record.foreign_id, "status": "processing"}
    )
    asgi_headers = [
        (b"x-processing-key", KEY.encode()),
        (b"x-processing-signature", signature.encode()),
    ]
    assert handle_callback(raw, asgi_headers)[0] == 200
    assert receiver_module.default_receiver() is receiver_module.default_receiver()
    assert [e["status"] for e in stack.events(record.foreign_id)] == ["processing"]
