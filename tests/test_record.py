"""JobRecord.from_redis: every field of the hash, typed, in the one place that parses it."""

from __future__ import annotations

import dataclasses

import pytest

from invoice_worker.constants import Cleanup, InvoiceStatus, JobState
from invoice_worker.record import JobRecord

FULL = {
    "foreign_id": "order-1",
    "state": "created",
    "task_id": "t-1",
    "attempts": "2",
    "created_at": "1700000000.5",
    "updated_at": "1700000001.25",
    "deadline": "1700000900",
    "callback_task": "shop.done",
    "callback_queue": "shop",
    "status_task": "shop.status",
    "status_queue": "shop-status",
    "provider_foreign_id": "order-1~r1",
    "generation": "1",
    "invoice_id": "42",
    "url": "https://pay.example/i/42",
    "address": "bc1q",
    "status": "created",
    "amount": "0.0123",
    "currency": "BTC",
    "fixed_at": "1700000002",
    "release_at": "1700003602",
    "invoice_status": "pending",
    "invoice_error": "Timer expired",
    "status_at": "1700000003.75",
    "sent_amount": "0.0123",
    "sent_currency": "BTC",
    "received_amount": "500",
    "received_currency": "EUR",
    "transactions": '{"10":{"id":10,"amount":"0.01"},"9":{"id":9,"amount":"0.0023"}}',
    "history": '{"0":{"provider_foreign_id":"order-1","orphan":"cancelled"}}',
    "error_code": "e",
    "error": "why",
    "http_status": "500",
    "errors": '{"amount":"must be positive"}',
    "last_error": "timeout: no answer",
    "last_error_code": "timeout",
    "next_attempt_at": "1700000010",
    "deferred": "rate_limited",
    "ambiguous": "1",
    "orphan": "pending",
    "crashes": "3",
    "callback_sent": "1",
    # bookkeeping the record leaves behind
    "fingerprint": "f" * 64,
    "lease_owner": "w:1:a-1",
    "lease_until": "0",
    "claim_status": "claimed",
}


def test_every_field_of_the_hash_is_parsed_to_its_type() -> None:
    # When the full hash is parsed
    record = JobRecord.from_redis(FULL)

    # Then each field has its value and type; bookkeeping fields stay behind
    assert record == JobRecord(
        foreign_id="order-1", state=JobState.CREATED, task_id="t-1", attempts=2,
        created_at=1700000000.5, updated_at=1700000001.25, deadline=1700000900.0,
        callback_task="shop.done", callback_queue="shop", status_task="shop.status",
        status_queue="shop-status", provider_foreign_id="order-1~r1", generation=1,
        invoice_id=42, url="https://pay.example/i/42", address="bc1q", status="created",
        amount="0.0123", currency="BTC", fixed_at=1700000002, release_at=1700003602,
        invoice_status=InvoiceStatus.PENDING, invoice_error="Timer expired",
        status_at=1700000003.75, sent_amount="0.0123", sent_currency="BTC",
        received_amount="500", received_currency="EUR",
        transactions=[{"id": 9, "amount": "0.0023"}, {"id": 10, "amount": "0.01"}],
        paid="0.0123", history=[{"provider_foreign_id": "order-1", "orphan": "cancelled"}],
        error_code="e", error="why", http_status=500, errors={"amount": "must be positive"},
        last_error="timeout: no answer", last_error_code="timeout",
        next_attempt_at=1700000010.0, deferred="rate_limited", ambiguous=True,
        orphan=Cleanup.PENDING, crashes=3, callback_sent=True,
    )  # fmt: skip
    # (a StrEnum equals its text: the comparison above cannot tell them apart)
    assert type(record.state) is JobState
    assert type(record.orphan) is Cleanup
    assert type(record.invoice_status) is InvoiceStatus
    assert not {"fingerprint", "lease_owner", "claim_status"} & record.to_dict().keys()


def test_a_hash_with_only_a_state_gives_every_default() -> None:
    # When a hash holds nothing but its state (a record another version wrote, say)
    record = JobRecord.from_redis({"state": "queued"})

    # Then every other field takes its default
    defaults = JobRecord(foreign_id="", state=JobState.QUEUED)
    assert record == defaults
    assert record.to_dict() == {"foreign_id": "", "state": "queued", "task_id": "", **{
        "attempts": 0, "generation": 0, "ambiguous": False, "crashes": 0,
        "callback_sent": False,
    }}  # fmt: skip


@pytest.mark.parametrize(
    "field",
    [
        "created_at", "updated_at", "deadline", "invoice_id", "fixed_at", "release_at",
        "status_at", "http_status", "next_attempt_at", "invoice_error", "orphan",
        "invoice_status",
    ],
)  # fmt: skip
def test_an_empty_optional_field_is_none(field: str) -> None:
    # When the script wrote an empty string for an optional field
    record = JobRecord.from_redis({"state": "failed", field: ""})

    # Then the record has none
    assert getattr(record, field) is None


@pytest.mark.parametrize("field", ["attempts", "generation", "crashes"])
def test_an_empty_count_is_zero(field: str) -> None:
    assert getattr(JobRecord.from_redis({"state": "failed", field: ""}), field) == 0


def test_flags_are_set_only_by_one() -> None:
    for value in ("0", "", "true", "yes"):
        record = JobRecord.from_redis(
            {"state": "failed", "ambiguous": value, "callback_sent": value}
        )
        assert (record.ambiguous, record.callback_sent) == (False, False)


def test_the_invoice_status_falls_back_to_the_create_answer_and_ignores_unknown_text() -> None:
    # Without callbacks, the create answer's status stands for the invoice's
    assert JobRecord.from_redis({"state": "created", "status": "created"}).invoice_status == (
        InvoiceStatus.CREATED
    )
    # A status the provider invented is no status (the raw text stays in ``status``)
    record = JobRecord.from_redis({"state": "created", "status": "weird"})
    assert (record.invoice_status, record.status) == (None, "weird")


def test_unknown_fields_are_ignored() -> None:
    record = JobRecord.from_redis({"state": "queued", "from_a_newer_version": "x", "slot_ms": "1"})
    assert record == JobRecord(foreign_id="", state=JobState.QUEUED)


def test_strings_are_kept_as_written() -> None:
    # Empty strings in text fields are what the hash holds (the create answer may give one)
    record = JobRecord.from_redis({"state": "created", "url": "", "error": ""})
    assert (record.url, record.error) == ("", "")


def test_every_field_of_the_record_is_covered_here() -> None:
    # A new field must be added to FULL (and so be parsed and typed) before this passes
    names = {f.name for f in dataclasses.fields(JobRecord)} - {"paid"}
    assert names <= FULL.keys()
