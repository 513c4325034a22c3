"""Re-issue: a fresh invoice for an order whose invoice failed, exactly once, with the history of
the earlier ones; real Redis, the sandbox with its callbacks, the receiver, and a real worker for
the race."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from invoice_worker import cli
from invoice_worker.devstack.embedded import EmbeddedRedis
from invoice_worker.errors import ConflictError, ReissueRefusedError
from invoice_worker.producer import Producer
from invoice_worker.record import JobRecord
from tests.conftest import SECRET, request_data
from tests.paystack import PayStack


@pytest.fixture
def stack(redis_server: EmbeddedRedis) -> Iterator[PayStack]:
    with PayStack(redis_server.url) as paystack:
        yield paystack


@pytest.fixture
def producer(stack: PayStack) -> Iterator[Producer]:
    p = Producer(stack.settings)
    yield p
    p.close()


def run_queued(stack: PayStack, foreign_id: str) -> JobRecord:
    """Run the queued job's message (its kept copy) through the job machinery in-process."""
    kwargs = json.loads(str(stack.store.redis.get(stack.store.copy(foreign_id))))
    record = stack.job.run(kwargs, task_id="reissued", owner="w-reissue").record
    assert record is not None
    return record


def failed(stack: PayStack, mode: str = "expire", **overrides: Any) -> JobRecord:
    record = stack.create(**overrides)
    stack.pay(record, mode)
    record = stack.settle(record.foreign_id)
    assert record.invoice_status == "failed"
    return record


def test_refused_unless_the_invoice_failed(stack: PayStack, producer: Producer) -> None:
    def reason(foreign_id: str) -> str:
        with pytest.raises(ReissueRefusedError) as refused:
            producer.reissue(foreign_id)
        return refused.value.reason

    assert reason("nobody") == "not_found"
    queued = request_data()
    producer.enqueue(queued)
    assert reason(queued["foreign_id"]) == "not_created"  # its invoice is still to come
    record = stack.create()
    assert reason(record.foreign_id) == "payable"
    stack.pay(record, "full")
    stack.settle(record.foreign_id)
    assert reason(record.foreign_id) == "paid"
    assert "re-issue of" in str(ReissueRefusedError(record.foreign_id, "paid"))
    assert stack.store.get(record.foreign_id) == stack.settle(record.foreign_id)  # untouched


def test_a_failed_invoice_is_replaced_and_kept_in_history(
    stack: PayStack, producer: Producer
) -> None:
    # Given an invoice the payer underpaid
    first = failed(stack, "less")
    fid = first.foreign_id
    # When the customer tries again
    queued = producer.reissue(fid)
    # Then the job is queued under the next derived id, the failed invoice in its history
    assert (queued.state, queued.generation, queued.provider_foreign_id) == (
        "queued",
        1,
        f"{fid}~r1",
    )
    assert (queued.invoice_id, queued.url, queued.invoice_status, queued.transactions) == (
        None, None, None, []
    )  # fmt: skip
    (old,) = queued.history
    assert (old["generation"], old["invoice_id"], old["url"], old["status"]) == (
        0, str(first.invoice_id), first.url, "failed"
    )  # fmt: skip
    assert old["error"] == "Timer expired. User paid less than requested."
    assert [tx["amount"] for tx in old["transactions"].values()] == ["0.00615000"]
    assert old["provider_foreign_id"] == fid
    # And the job machinery creates the new invoice under that id
    created = run_queued(stack, fid)
    assert created.state == "created"
    assert created.provider_foreign_id == f"{fid}~r1"
    assert created.invoice_id != first.invoice_id
    assert created.invoice_status == "pending"
    assert stack.sandbox.create_calls(f"{fid}~r1") == 1
    # When a late callback of the old invoice arrives (a part payment, after the failure)
    late = {"id": first.invoice_id, "foreign_id": fid, "type": "invoice", "status": "pending",
            "transactions": [{"id": 999, "amount": "0.001", "confirmations": 0}]}  # fmt: skip
    raw = json.dumps(late, separators=(",", ":")).encode()
    answer = stack.post(raw, hmac.new(SECRET.encode(), raw, hashlib.sha512).hexdigest())
    assert answer.json()["outcome"] == "history"
    # Then it updates the history entry, never the new invoice
    record = stack.store.get(fid)
    assert record is not None
    assert record.invoice_status == "pending"
    assert record.transactions == []
    assert sorted(record.history[0]["transactions"]) == [str(first.transactions[0]["id"]), "999"]
    assert record.history[0]["status"] == "failed"
    # And the new invoice's own callbacks move the job
    stack.pay(record, "full")
    paid = stack.settle(fid)
    assert paid.invoice_status == "confirmed"
    assert [e["generation"] for e in stack.events(fid)] == ["0", "1", "1"]  # failed; then r1's
    assert [e["state"] for e in stack.events(fid, "job")] == ["created", "created"]


def test_each_reissue_takes_the_next_generation(stack: PayStack, producer: Producer) -> None:
    fid = failed(stack).foreign_id
    producer.reissue(fid)
    second = run_queued(stack, fid)
    stack.pay(second, "expire")
    stack.settle(fid)
    # Naming a generation already replaced answers the record, and replaces nothing
    assert producer.reissue(fid, generation=0).generation == 1
    with pytest.raises(ReissueRefusedError) as refused:
        producer.reissue(fid, generation=5)
    assert refused.value.reason == "no_such_generation"
    third = producer.reissue(fid, generation=1)
    assert (third.generation, third.provider_foreign_id) == (2, f"{fid}~r2")
    assert [(h["generation"], h["provider_foreign_id"]) for h in third.history] == [
        (0, fid), (1, f"{fid}~r1")
    ]  # fmt: skip
    assert run_queued(stack, fid).provider_foreign_id == f"{fid}~r2"


def test_the_request_given_must_be_the_jobs(stack: PayStack, producer: Producer) -> None:
    data = request_data()
    fid = failed(stack, foreign_id=data["foreign_id"]).foreign_id
    with pytest.raises(ConflictError):
        producer.reissue(fid, request={**data, "amount": "0.5"})
    # Without the kept copy (e.g. expired), the same request re-issues it.
    stack.store.redis.delete(stack.store.copy(fid))
    with pytest.raises(ReissueRefusedError):
        producer.reissue(fid)
    record = producer.reissue(fid, request=data, deadline=4_000_000_000.0)
    assert (record.generation, record.deadline) == (1, 4_000_000_000.0)


@pytest.mark.slow
def test_reissue_raced_from_threads_makes_one_invoice(
    stack: PayStack, producer: Producer, start_worker: Any
) -> None:
    # Given a worker, and an invoice it created that then expired
    start_worker(stack.settings)
    data = request_data()
    producer.enqueue(data)
    fid = data["foreign_id"]
    record = producer.wait(fid, 10)
    assert record is not None
    assert record.state == "created"
    stack.pay(record, "expire")
    stack.settle(fid)
    # When eight threads re-issue it at once (half naming the generation they saw fail)
    barrier = threading.Barrier(8)
    answers: list[JobRecord | str] = []

    def reissue(n: int) -> None:
        barrier.wait()
        try:
            answers.append(producer.reissue(fid, generation=0 if n % 2 else None))
        except ReissueRefusedError as exc:
            # It read the record after another's re-issue: the new invoice is on its way
            # (not_created) or already made (payable).
            answers.append(exc.reason)

    threads = [threading.Thread(target=reissue, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then one re-issue happened, and the worker made one new invoice
    records = [a for a in answers if isinstance(a, JobRecord)]
    assert len(records) >= 4
    assert {r.generation for r in records} == {1}
    assert {a for a in answers if isinstance(a, str)} <= {"not_created", "payable"}
    created = producer.wait(fid, 10)
    assert created is not None
    assert (created.state, created.provider_foreign_id) == ("created", f"{fid}~r1")
    assert stack.sandbox.create_calls(f"{fid}~r1") == 1
    assert stack.sandbox.create_calls(f"{fid}~r2") == 0
    assert stack.stats()["reissued"] == "1"
    assert len(created.history) == 1


def test_the_reissue_command(
    stack: PayStack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in stack.settings.to_env().items():
        monkeypatch.setenv(name, value)
    record = stack.create()
    assert cli.main(["reissue", record.foreign_id]) == cli.EXIT_CONFLICT
    assert "the current invoice can still be paid" in capsys.readouterr().err
    assert cli.main(["reissue", "nobody"]) == cli.EXIT_NOT_FOUND
    stack.pay(record, "expire")
    stack.settle(record.foreign_id)
    assert cli.main(["reissue", record.foreign_id, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["state"], printed["generation"]) == ("queued", 1)
