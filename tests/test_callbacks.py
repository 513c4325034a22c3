"""Reading callbacks, and the callback script's contract against a real redis-server: forward-only
statuses, accumulated transactions, duplicates and re-runs, orphans, unknown and early ids."""

from __future__ import annotations

import hashlib
import json
import threading
from decimal import Decimal
from typing import Any

import pytest

from invoice_worker.attempt import derived_foreign_id
from invoice_worker.callbacks import Callback, CallbackStore, job_of
from invoice_worker.config import Settings
from invoice_worker.constants import CallbackOutcome, InvoiceStatus, JobState
from invoice_worker.errors import InvalidCallbackError
from invoice_worker.store import JobStore
from tests.conftest import new_id


@pytest.fixture
def store(settings: Settings) -> JobStore:
    return JobStore.from_settings(settings)


@pytest.fixture
def callbacks(store: JobStore) -> CallbackStore:
    return CallbackStore(store)


def body(
    invoice_id: int,
    foreign_id: str,
    status: str,
    txs: tuple[tuple[int, str, Any], ...] = (),
    error: str = "",
    **extra: Any,
) -> bytes:
    """A callback body in the provider's shape; txs are (id, amount, confirmations)."""
    data = {
        "id": invoice_id, "foreign_id": foreign_id, "type": "invoice",
        "crypto_address": {"id": 1, "currency": "BTC", "address": "3abc", "tag": None},
        "currency_sent": {"currency": "BTC", "amount": "0.02000000",
                          "remaining_amount": "0.00000000"},
        "currency_received": {"currency": "BTC", "amount": "0.02000000"},
        "transactions": [
            {"id": tx_id, "currency": "BTC", "transaction_type": "blockchain", "type": "deposit",
             "address": "3abc", "tag": None, "amount": amount, "txid": f"tx{tx_id}",
             "confirmations": confirmations}
            for tx_id, amount, confirmations in txs
        ],
        "fees": [], "error": error, "status": status, "fixed_at": 1, "expires_at": 2, **extra,
    }  # fmt: skip
    return json.dumps(data, separators=(",", ":")).encode()


def created(
    store: JobStore, invoice_id: int, *, generation: int = 0, status: str = "pending"
) -> str:
    """A job made final ``created`` with invoice ``invoice_id`` (its provider id derived)."""
    fid = new_id()
    provider_id = fid if not generation else f"{fid}~r{generation}"
    store.claim(fid, "w1", fingerprint="fp", fields={"task_id": "t1"}, kwargs="{}")
    values = {"invoice_id": invoice_id, "url": "https://pay.example.com/x", "status": status,
              "provider_foreign_id": provider_id, "generation": generation}  # fmt: skip
    assert store.finish(fid, "w1", JobState.CREATED, values) is not None
    return fid


def apply(callbacks: CallbackStore, raw: bytes) -> CallbackOutcome:
    applied = callbacks.apply(Callback.parse(raw), raw)
    assert applied.durable
    return applied.outcome


def status_events(store: JobStore, fid: str) -> list[str]:
    return [
        e["status"] for _, e in store.events() if e["foreign_id"] == fid and e["kind"] == "status"
    ]


# Reading


def test_parse_is_tolerant_of_what_it_does_not_use() -> None:
    raw = body(588, "o-1", "confirmed", ((750294, "0.01000000", "1"), (750295, "0.01", 2)),
               end_user_reference="x", new_field={"nested": [1]})  # fmt: skip
    callback = Callback.parse(raw)
    assert (callback.id, callback.foreign_id, callback.status) == (588, "o-1", "confirmed")
    assert [tx.confirmations for tx in callback.transactions] == [1, 2]  # string or integer
    assert callback.transactions[1].amount == Decimal("0.01")
    # Old API versions: an integer foreign_id; a JSON number amount is read exactly.
    old = json.loads(body(1, "x", "pending"))
    old.update(foreign_id=123456, currency_received={"currency": "BTC", "amount": 0.1})
    parsed = Callback.parse(json.dumps(old).encode())
    assert parsed.foreign_id == "123456"
    assert parsed.currency_received is not None
    assert parsed.currency_received.amount == Decimal("0.1")
    assert Callback.parse(body(1, "x", "failed", error=None)).error_text == ""  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (body(1, "x", "expired"), "status"),
        (body(1, "x", "paid"), "status"),
        (body(1, "x", "pending", type="withdrawal"), "type 'withdrawal'"),
        (body(1, "", "pending"), "foreign_id"),
        (body(1, "x", "pending", ((5, "-1", 0),)), "transactions.0.amount"),
        (body(1, "x", "pending", ((5, "1e999999", 0),)), "transactions.0.amount"),
        (b'{"id": "one"}', "id"),
        (b"[" * 100_000, "not JSON"),
    ],
)
def test_parse_refuses_what_it_cannot_apply(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidCallbackError) as caught:
        Callback.parse(raw)
    assert reason in caught.value.reason


def test_parse_never_echoes_the_body() -> None:
    with pytest.raises(InvalidCallbackError) as caught:
        Callback.parse(body(1, "jane.doe@example.com", "refunded"))
    assert "jane" not in str(caught.value)


def test_identity_is_invoice_status_and_transactions() -> None:
    one = Callback.parse(body(7, "o", "pending", ((1, "0.1", 0), (2, "0.1", 0))))
    same = Callback.parse(body(7, "o", "pending", ((2, "0.1", 1), (1, "0.1", 0))))
    assert one.identity == same.identity  # order and confirmations do not make a new one
    assert one.identity != Callback.parse(body(7, "o", "processing", ((1, "0.1", 0),))).identity
    assert one.identity != Callback.parse(body(7, "o", "pending", ((1, "0.1", 0),))).identity
    assert one.identity != Callback.parse(body(8, "o", "pending", ((1, "0.1", 0),))).identity


@pytest.mark.parametrize(
    ("provider_id", "expected"),
    [
        ("order-1", ("order-1", 0)),
        ("order-1~r1", ("order-1", 1)),
        ("order-1~r12", ("order-1", 12)),
        (f"{'a' * 200}~{'0' * 16}~r3", (None, 3)),
        ("order-1~r0", (None, -1)),
        ("order-1~x", (None, -1)),
        ("order~1~r2", (None, -1)),
    ],
)
def test_job_of(provider_id: str, expected: tuple[str | None, int]) -> None:
    assert job_of(provider_id) == expected


# The script


def test_statuses_move_only_forward(store: JobStore, callbacks: CallbackStore) -> None:
    fid = created(store, 100, status="created")
    # Given confirmed arriving before the callbacks that preceded it
    tx = ((1, "0.02000000", 1),)
    assert apply(callbacks, body(100, fid, "confirmed", tx)) == "applied"
    assert apply(callbacks, body(100, fid, "processing", ((1, "0.02000000", 0),))) == "recorded"
    assert apply(callbacks, body(100, fid, "pending")) == "recorded"
    assert apply(callbacks, body(100, fid, "failed", error="Timer expired.")) == "recorded"
    # Then the invoice stays confirmed, with one status event
    record = store.get(fid)
    assert record is not None
    assert (record.invoice_status, record.invoice_error) == (InvoiceStatus.CONFIRMED, None)
    assert record.status == "created"  # the create answer's, kept apart
    assert status_events(store, fid) == ["confirmed"]
    assert record.transactions == [
        {"id": "1", "amount": "0.02000000", "currency": "BTC", "txid": "tx1", "confirmations": 1}
    ]


def test_instalments_accumulate(store: JobStore, callbacks: CallbackStore) -> None:
    fid = created(store, 101)
    assert apply(callbacks, body(101, fid, "pending", ((1, "0.01", 0),))) == "recorded"
    assert apply(callbacks, body(101, fid, "processing", ((1, "0.01", 1), (2, "0.01", 0)))) == (
        "applied"
    )
    # An older copy of a transaction never takes back its confirmations.
    assert apply(callbacks, body(101, fid, "pending", ((2, "0.01", 0),))) == "recorded"
    record = store.get(fid)
    assert record is not None
    assert [(tx["id"], tx["confirmations"]) for tx in record.transactions] == [("1", 1), ("2", 0)]
    assert record.paid == "0.02"
    assert (record.sent_amount, record.received_currency) == ("0.02000000", "BTC")


def test_a_duplicate_changes_nothing_and_a_rerun_answers_the_same(
    store: JobStore, callbacks: CallbackStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    fid = created(store, 102)
    raw = body(102, fid, "processing", ((1, "0.02", 0),))
    # A re-run after a lost reply (redis-py sends the script again: the same op)
    monkeypatch.setattr(store, "token", lambda: "op-1")
    assert apply(callbacks, raw) == "applied"
    assert apply(callbacks, raw) == "applied"
    # A second delivery (another op)
    monkeypatch.setattr(store, "token", lambda: "op-2")
    assert apply(callbacks, raw) == "duplicate"
    assert status_events(store, fid) == ["processing"]
    stats = store.redis.hgetall(store.stats)
    assert (stats["callbacks:applied"], stats["callbacks:duplicate"]) == ("1", "1")
    # The raw body is kept, once however often it came.
    kept = store.redis.hgetall(callbacks.key(102))
    assert [v for k, v in kept.items() if str(k).startswith("raw:")] == [raw.decode()]
    assert 0 < store.redis.ttl(callbacks.key(102)) <= store.settings.callback_ttl


def test_the_same_callback_at_once_from_many_threads_is_applied_once(
    store: JobStore, callbacks: CallbackStore
) -> None:
    fid = created(store, 103)
    raw = body(103, fid, "confirmed", ((1, "0.02", 1),))
    outcomes: list[CallbackOutcome] = []
    barrier = threading.Barrier(8)

    def deliver() -> None:
        barrier.wait()
        outcomes.append(apply(callbacks, raw))

    threads = [threading.Thread(target=deliver) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["applied"] + ["duplicate"] * 7
    assert status_events(store, fid) == ["confirmed"]


def test_unknown_ids_are_kept_and_counted(store: JobStore, callbacks: CallbackStore) -> None:
    for invoice_id, provider_id in enumerate(("never-enqueued", "never~r2", "junk~id")):
        raw = body(1040 + invoice_id, provider_id, "pending")
        applied = callbacks.apply(Callback.parse(raw), raw)
        assert (applied.outcome, applied.foreign_id) == ("unknown", None)
    # A generation the job never reached names none of its invoices.
    fid = created(store, 105)
    assert apply(callbacks, body(106, f"{fid}~r1", "pending")) == "unknown"
    entries = [json.loads(e) for e in store.redis.lrange(callbacks.unknown, 0, -1)]
    assert [e["foreign_id"] for e in entries] == [
        f"{fid}~r1",
        "junk~id",
        "never~r2",
        "never-enqueued",
    ]
    assert store.redis.hget(store.stats, "callbacks:unknown") == "4"
    record = store.get(fid)
    assert record is not None
    assert record.history == []
    assert record.invoice_status == "pending"


def test_an_orphans_callbacks_go_to_history(store: JobStore, callbacks: CallbackStore) -> None:
    # Given a job re-created under ~r1 after the invoice of its first attempt was cancelled
    fid = created(store, 108, generation=1)
    # When the cancelled orphan's callback arrives
    assert apply(callbacks, body(107, fid, "failed", error="Invoice cancelled.")) == "orphan"
    # Then it is recorded, and the job's own invoice is untouched
    record = store.get(fid)
    assert record is not None
    assert record.invoice_status == "pending"
    assert record.history == [
        {"generation": 0, "provider_foreign_id": fid, "orphan": True, "invoice_id": "107",
         "status": "failed", "error": "Invoice cancelled.", "transactions": {}}
    ]  # fmt: skip
    assert status_events(store, fid) == []
    # And the current one, by its derived id, moves the job
    assert apply(callbacks, body(108, f"{fid}~r1", "confirmed")) == "applied"
    assert status_events(store, fid) == ["confirmed"]


def test_a_callback_before_the_job_knows_its_invoice_is_early(
    store: JobStore, callbacks: CallbackStore
) -> None:
    # Given a job whose create call is in flight (its answer not recorded yet)
    fid = new_id()
    store.claim(fid, "w1", fingerprint="fp", fields={"task_id": "t1", "provider_foreign_id": fid},
                kwargs="{}")  # fmt: skip
    raw = body(109, fid, "pending")
    # Then its callback is kept but not applied (answered 503: the provider sends it again)
    assert apply(callbacks, raw) == "early"
    assert store.redis.hexists(callbacks.key(109), f"raw:{hashlib.sha256(raw).hexdigest()}")
    # When the job records its invoice, the same callback applies
    store.finish(fid, "w1", JobState.CREATED, {"invoice_id": 109, "status": "created"})
    assert apply(callbacks, raw) == "applied"
    # A job that ended without that invoice (failed after an ambiguous attempt) has an orphan.
    other = new_id()
    store.claim(other, "w1", fingerprint="fp", fields={"task_id": "t1"}, kwargs="{}")
    store.finish(other, "w1", JobState.EXPIRED, {"error_code": "deadline_passed"})
    assert apply(callbacks, body(110, other, "failed")) == "orphan"


def test_a_confirmed_invoice_drops_the_message_copy(
    store: JobStore, callbacks: CallbackStore
) -> None:
    fid = created(store, 111)
    assert store.redis.get(store.copy(fid)) == "{}"  # kept for a re-issue while unpaid
    apply(callbacks, body(111, fid, "failed"))
    assert store.redis.get(store.copy(fid)) == "{}"
    fid = created(store, 112)
    apply(callbacks, body(112, fid, "confirmed"))
    assert store.redis.get(store.copy(fid)) is None


def test_a_hashed_derived_id_reaches_its_job_through_its_alias(
    store: JobStore, callbacks: CallbackStore
) -> None:
    # Given a foreign_id too long to carry a derivation whole, re-created under generation 1
    fid = "o" * 254
    provider_id = derived_foreign_id(fid, 1)
    assert not provider_id.startswith(fid)
    store.claim(fid, "w1", fingerprint="fp", fields={"task_id": "t1"}, kwargs="{}")
    values = {"invoice_id": 113, "status": "pending", "provider_foreign_id": provider_id,
              "generation": 1}  # fmt: skip
    store.finish(fid, "w1", JobState.CREATED, values)
    # Then without its alias it names no job; with it (the attempt writes one), its job
    assert apply(callbacks, body(113, provider_id, "processing")) == "unknown"
    store.set_alias(provider_id, fid)
    assert apply(callbacks, body(113, provider_id, "confirmed")) == "applied"
    assert status_events(store, fid) == ["confirmed"]
