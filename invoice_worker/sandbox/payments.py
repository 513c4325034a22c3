"""What a payer does to a sandbox invoice, and the callbacks each status change sends.

Pure functions over one invoice (the API's view, a dict) and its `Payment` (what the API does not
show): the server holds both under its lock and queues the callback bodies returned here.

Every action plays its whole sequence at once (the sandbox does not wait for confirmations),
one callback per status change and per instalment, as the provider documents them:

    mode         from created            then
    full         pending (no tx yet)     processing (tx seen, 0 confirmations) -> confirmed
    less         pending (no tx yet)     pending (the part, 0 confirmations) -> failed "Timer
                                         expired. User paid less than requested." (tx confirmed)
    instalments  pending (no tx yet)     pending (part 1) -> processing (parts 1 and 2, nothing
                                         remaining) -> confirmed (both confirmed)
    expire       -                       failed "Timer expired. User not paid." (no tx)

An invoice created with `timer` is already `pending`, so its sequence starts after the first
column: a status it already has is no change. A cancel through the API ends `failed` too and
sends one callback (its error text is not documented: the sandbox's own, `CANCELLED`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from typing import Any

#: The payer actions: each a button on the invoice page and a mode of the admin pay endpoint.
MODES = ("full", "less", "instalments", "expire")
#: The statuses a payer can still act on (processing never lasts: actions play out at once).
PAYABLE = ("created", "pending")
#: The provider's documented failure texts, and the sandbox's guess for a cancel.
NOT_PAID = "Timer expired. User not paid."
PAID_LESS = "Timer expired. User paid less than requested."
CANCELLED = "Invoice cancelled."
TIMER_SECONDS = 900  # the provider fixes the rate for 15 minutes
PROCESSING_SECONDS = 86_400  # a transaction seen in the mempool extends the timer to 24 hours
_Q8 = Decimal("0.00000001")
_FEE_RATE = Decimal("0.01")  # a made-up deposit fee, shown on a confirmed callback
_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


@dataclass
class Payment:
    """The sandbox's side of one invoice: what its page shows and its callbacks carry."""

    code: str  # the page's path segment, /invoice/<code>
    description: str
    url_success: str
    url_failed: str
    address_id: int
    expires_at: int | None  # None: no timer yet (timer=false and no currency chosen)
    error: str = ""
    transactions: list[dict[str, Any]] = field(default_factory=list)


class PaymentError(ValueError):
    """Raised when an action does not apply to the invoice (its status, its amount)."""


def deposit_address(invoice_id: int, foreign_id: str) -> str:
    """A fake P2SH-looking address, the same for the same invoice on every run."""
    digest = hashlib.sha256(f"address:{invoice_id}:{foreign_id}".encode()).digest()
    number = int.from_bytes(digest, "big")
    chars = []
    for _ in range(33):
        number, index = divmod(number, len(_BASE58))
        chars.append(_BASE58[index])
    return "3" + "".join(chars)


def _txid(invoice_id: int, tx_id: int) -> str:
    return hashlib.sha256(f"tx:{invoice_id}:{tx_id}".encode()).hexdigest()


def _amount(value: Decimal) -> str:
    return f"{value.quantize(_Q8):f}"


def pay(
    invoice: dict[str, Any], payment: Payment, mode: str, now: int, next_id: Callable[[], int]
) -> list[dict[str, Any]]:
    """Play `mode` on an open invoice: update both, return the callback bodies in order.

    `next_id` gives transaction ids (unique across the sandbox).

    Raises:
        PaymentError: for an unknown mode, an invoice no longer payable, or an amount too
            small to split (`less`, `instalments` on 0.00000001).
    """
    if mode not in MODES:
        raise PaymentError(f"unknown mode {mode!r}, expected one of {', '.join(MODES)}")
    if invoice["status"] not in PAYABLE:
        raise PaymentError(f"Invoice cannot be paid in its current state ({invoice['status']}).")
    total = Decimal(invoice["sender_amount"])
    half = (total / 2).quantize(_Q8, ROUND_DOWN)
    if mode in ("less", "instalments") and half <= 0:
        raise PaymentError(f"amount {_amount(total)} is too small to pay in parts")
    if mode == "expire":
        return [_change(invoice, payment, "failed", NOT_PAID, now)]
    bodies = []
    if invoice["status"] == "created":  # the payer confirms the currency: the rate is fixed
        payment.expires_at = payment.expires_at or now + TIMER_SECONDS
        bodies.append(_change(invoice, payment, "pending", "", now))
    first = _deposit(invoice, payment, total if mode == "full" else half, next_id())
    if mode == "less":
        bodies.append(_body(invoice, payment, now))  # a callback per part, the status unchanged
        first["confirmations"] = "1"
        return [*bodies, _change(invoice, payment, "failed", PAID_LESS, now)]
    if mode == "instalments":
        bodies.append(_body(invoice, payment, now))
        first["confirmations"] = "1"
        _deposit(invoice, payment, total - half, next_id())
    payment.expires_at = now + PROCESSING_SECONDS
    bodies.append(_change(invoice, payment, "processing", "", now))
    for tx in payment.transactions:
        tx["confirmations"] = "1"
    bodies.append(_change(invoice, payment, "confirmed", "", now))
    return bodies


def expire(invoice: dict[str, Any], payment: Payment, now: int) -> dict[str, Any] | None:
    """Fail an open invoice whose timer ran out; return its callback body, or None."""
    if invoice["status"] not in PAYABLE or payment.expires_at is None or payment.expires_at > now:
        return None
    return _change(invoice, payment, "failed", NOT_PAID, now)


def cancel(invoice: dict[str, Any], payment: Payment, now: int) -> dict[str, Any]:
    """Fail an invoice cancelled through the API; return its callback body."""
    return _change(invoice, payment, "failed", CANCELLED, now)


def _deposit(
    invoice: dict[str, Any], payment: Payment, amount: Decimal, tx_id: int
) -> dict[str, Any]:
    tx = {
        "id": tx_id,
        "currency": invoice["sender_currency"],
        "transaction_type": "blockchain",
        "type": "deposit",
        "address": invoice["address"],
        "tag": None,
        "amount": _amount(amount),
        "txid": _txid(invoice["id"], tx_id),
        "confirmations": "0",
    }
    payment.transactions.append(tx)
    return tx


def _change(
    invoice: dict[str, Any], payment: Payment, status: str, error: str, now: int
) -> dict[str, Any]:
    invoice["status"], payment.error = status, error
    if status == "failed" and payment.expires_at is None:
        payment.expires_at = now
    return _body(invoice, payment, now)


def _body(invoice: dict[str, Any], payment: Payment, now: int) -> dict[str, Any]:
    """The callback body of the invoice as it is now, keys in the provider's order."""
    sent, received = invoice["sender_currency"], invoice["currency"]
    paid = sum((Decimal(tx["amount"]) for tx in payment.transactions), Decimal(0))
    total = Decimal(invoice["sender_amount"])
    address: dict[str, Any] = {"id": payment.address_id, "currency": sent}
    if sent != received:
        address["convert_to"] = received
    address |= {"address": invoice["address"], "tag": None}
    fees = []
    if invoice["status"] == "confirmed":
        fees.append({"type": "fee_crypto_deposit", "currency": sent, "amount": _fee(paid)})
    return {
        "id": invoice["id"],
        "foreign_id": invoice["foreign_id"],
        "type": "invoice",
        "crypto_address": address,
        "currency_sent": {
            "currency": sent,
            "amount": _amount(total),
            "remaining_amount": _amount(max(Decimal(0), total - paid)),
        },
        "currency_received": {"currency": received, "amount": invoice["amount"]},
        "transactions": [dict(tx) for tx in payment.transactions],
        "fees": fees,
        "error": payment.error,
        "status": invoice["status"],
        "fixed_at": invoice["fixed_at"],
        "expires_at": payment.expires_at if payment.expires_at is not None else now,
    }


def _fee(paid: Decimal) -> str:
    return _amount(paid * _FEE_RATE)
