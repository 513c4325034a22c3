"""Payer actions on one invoice: the status sequence, and each callback body, field by field."""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest

from invoice_worker.sandbox import payments
from invoice_worker.sandbox.payments import Payment, PaymentError

NOW = 1_700_000_000
#: The keys of a callback body in the order of the provider's documented example (NOTES.md).
KEYS = [
    "id", "foreign_id", "type", "crypto_address", "currency_sent", "currency_received",
    "transactions", "fees", "error", "status", "fixed_at", "expires_at",
]  # fmt: skip
TX_KEYS = [
    "id", "currency", "transaction_type", "type", "address", "tag", "amount", "txid",
    "confirmations",
]  # fmt: skip
#: (timer, mode) -> the statuses of the callbacks, in order, and the last one's error.
SEQUENCES = {
    (True, "full"): (["processing", "confirmed"], ""),
    (True, "less"): (["pending", "failed"], payments.PAID_LESS),
    (True, "instalments"): (["pending", "processing", "confirmed"], ""),
    (True, "expire"): (["failed"], payments.NOT_PAID),
    (False, "full"): (["pending", "processing", "confirmed"], ""),
    (False, "less"): (["pending", "pending", "failed"], payments.PAID_LESS),
    (False, "instalments"): (["pending", "pending", "processing", "confirmed"], ""),
    (False, "expire"): (["failed"], payments.NOT_PAID),
}


def invoice(timer: bool = True, **changes: Any) -> tuple[dict[str, Any], Payment]:
    data = {
        "id": 100_123,
        "url": "http://127.0.0.1:1/invoice/AbCdEf",
        "foreign_id": "order-42",
        "address": payments.deposit_address(100_123, "order-42"),
        "title": "Order 42",
        "status": "pending" if timer else "created",
        "currency": "BTC",
        "amount": "0.01230000",
        "sender_currency": "BTC",
        "sender_amount": "0.01230000",
        "fixed_at": NOW - 60,
        "release_at": NOW + 840 if timer else None,
        "seconds_left": None,
        **changes,
    }
    payment = Payment("AbCdEf", "", "https://shop.example.com/paid", "https://shop.example.com/x",
                      address_id=300_123, expires_at=data["release_at"])  # fmt: skip
    return data, payment


def ids() -> Any:
    counter = itertools.count(700_001)
    return lambda: next(counter)


@pytest.mark.parametrize(("timer", "mode"), list(SEQUENCES))
def test_each_action_plays_its_documented_sequence(timer: bool, mode: str) -> None:
    data, payment = invoice(timer)
    bodies = payments.pay(data, payment, mode, NOW, ids())
    statuses, error = SEQUENCES[timer, mode]
    assert [b["status"] for b in bodies] == statuses
    assert [b["error"] for b in bodies] == [""] * (len(bodies) - 1) + [error]
    assert data["status"] == statuses[-1]
    for body in bodies:
        assert list(body) == KEYS
        assert (body["id"], body["foreign_id"], body["type"]) == (100_123, "order-42", "invoice")
        assert body["crypto_address"] == {
            "id": 300_123, "currency": "BTC", "address": data["address"], "tag": None
        }  # fmt: skip
        assert body["currency_received"] == {"currency": "BTC", "amount": "0.01230000"}
        assert body["currency_sent"]["amount"] == "0.01230000"
        assert body["fixed_at"] == NOW - 60
        for tx in body["transactions"]:
            assert list(tx) == TX_KEYS
            assert re.fullmatch(r"[0-9a-f]{64}", tx["txid"])
            assert (tx["transaction_type"], tx["type"], tx["tag"]) == (
                "blockchain",
                "deposit",
                None,
            )
        assert (body["fees"] != []) == (body["status"] == "confirmed")


def test_full_payment_is_seen_then_confirmed() -> None:
    data, payment = invoice()
    processing, confirmed = payments.pay(data, payment, "full", NOW, ids())
    # Seen in the mempool: nothing remains, 0 confirmations, the timer is extended to 24 h.
    (seen,) = processing["transactions"]
    assert (seen["id"], seen["amount"], seen["confirmations"]) == (700_001, "0.01230000", "0")
    assert processing["currency_sent"]["remaining_amount"] == "0.00000000"
    assert processing["expires_at"] == NOW + 86_400
    # Confirmed: the same transaction, confirmed, and the deposit fee.
    (done,) = confirmed["transactions"]
    assert {**done, "confirmations": "0"} == seen
    assert done["confirmations"] == "1"
    assert confirmed["fees"] == [
        {"type": "fee_crypto_deposit", "currency": "BTC", "amount": "0.00012300"}
    ]


def test_instalments_accumulate_transactions() -> None:
    data, payment = invoice()
    first, second, confirmed = payments.pay(data, payment, "instalments", NOW, ids())
    # One callback per part: the first part leaves the invoice pending with half remaining.
    assert [tx["amount"] for tx in first["transactions"]] == ["0.00615000"]
    assert first["currency_sent"]["remaining_amount"] == "0.00615000"
    assert first["expires_at"] == NOW + 840  # still the 15-minute timer
    assert [(tx["id"], tx["confirmations"]) for tx in second["transactions"]] == [
        (700_001, "1"), (700_002, "0")
    ]  # fmt: skip
    assert second["currency_sent"]["remaining_amount"] == "0.00000000"
    assert [tx["confirmations"] for tx in confirmed["transactions"]] == ["1", "1"]
    assert len({tx["txid"] for tx in confirmed["transactions"]}) == 2


def test_paying_less_fails_with_the_part_confirmed() -> None:
    data, payment = invoice(amount="0.01230001", sender_amount="0.01230001")
    part, failed = payments.pay(data, payment, "less", NOW, ids())
    assert part["status"] == "pending"
    assert part["transactions"][0]["amount"] == "0.00615000"  # half, rounded down
    assert failed["currency_sent"]["remaining_amount"] == "0.00615001"
    assert failed["transactions"][0]["confirmations"] == "1"  # the tx confirmed, the invoice not
    assert (failed["status"], failed["error"], failed["fees"]) == ("failed", payments.PAID_LESS, [])
    assert failed["expires_at"] == NOW + 840


def test_expire_fails_unpaid() -> None:
    data, payment = invoice()
    (failed,) = payments.pay(data, payment, "expire", NOW, ids())
    assert failed["transactions"] == []
    assert failed["currency_sent"]["remaining_amount"] == "0.01230000"
    assert failed["expires_at"] == NOW + 840


def test_a_timer_runs_out_only_when_due() -> None:
    data, payment = invoice()
    assert payments.expire(data, payment, NOW + 839) is None
    body = payments.expire(data, payment, NOW + 840)
    assert body is not None
    assert (body["status"], body["error"]) == ("failed", payments.NOT_PAID)
    assert payments.expire(data, payment, NOW + 900) is None  # failed already
    untimed, its_payment = invoice(timer=False)
    assert payments.expire(untimed, its_payment, NOW + 10**6) is None  # no timer, no expiry


def test_choosing_the_currency_starts_the_timer() -> None:
    data, payment = invoice(timer=False)
    pending, *_ = payments.pay(data, payment, "less", NOW, ids())
    assert (pending["transactions"], pending["expires_at"]) == ([], NOW + 900)


def test_cancel_fails_with_the_sandbox_text() -> None:
    data, payment = invoice()
    body = payments.cancel(data, payment, NOW)
    assert (body["status"], body["error"]) == ("failed", payments.CANCELLED)


def test_another_payer_currency_is_converted_to() -> None:
    data, payment = invoice(currency="EUR", amount="26.00000000", sender_amount="0.00043333")
    processing, _ = payments.pay(data, payment, "full", NOW, ids())
    assert processing["crypto_address"] == {
        "id": 300_123, "currency": "BTC", "convert_to": "EUR", "address": data["address"],
        "tag": None,
    }  # fmt: skip
    assert processing["currency_sent"]["amount"] == "0.00043333"
    assert processing["currency_received"] == {"currency": "EUR", "amount": "26.00000000"}


@pytest.mark.parametrize("status", ["processing", "confirmed", "failed"])
def test_only_open_invoices_can_be_paid(status: str) -> None:
    data, payment = invoice(status=status)
    with pytest.raises(PaymentError, match=f"current state \\({status}\\)"):
        payments.pay(data, payment, "full", NOW, ids())
    assert data["status"] == status


def test_refusals() -> None:
    with pytest.raises(PaymentError, match="unknown mode 'all'"):
        payments.pay(*invoice(), "all", NOW, ids())
    tiny, payment = invoice(amount="0.00000001", sender_amount="0.00000001")
    for mode in ("less", "instalments"):
        with pytest.raises(PaymentError, match="too small"):
            payments.pay(tiny, payment, mode, NOW, ids())
    assert payments.pay(tiny, payment, "full", NOW, ids())[-1]["status"] == "confirmed"


def test_deposit_address_is_deterministic() -> None:
    address = payments.deposit_address(100_000, "order-1")
    assert address == payments.deposit_address(100_000, "order-1")
    assert address != payments.deposit_address(100_001, "order-1")
    assert re.fullmatch(r"3[1-9A-HJ-NP-Za-km-z]{33}", address)
