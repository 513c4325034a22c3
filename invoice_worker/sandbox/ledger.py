"""The sandbox's state: invoices and what happened to them, counters, scripts, faults.

`Ledger` is everything `Sandbox.reset()` forgets. It is not thread-safe: the server calls it
under its one lock, and queues the callback items it returns.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from invoice_worker.sandbox import payments
from invoice_worker.sandbox.bodies import json_bytes
from invoice_worker.sandbox.faults import Faults
from invoice_worker.sandbox.payments import Payment

OPEN = ("created", "pending", "processing")  # the states a cancel may leave
#: A queued callback: its body as a dict, the same as the bytes sent, its faults.
Item = tuple[dict[str, Any], bytes, frozenset[str]]


def view(invoice: dict[str, Any]) -> dict[str, Any]:
    """An invoice as the API shows it: `seconds_left` counts down while it is open."""
    release_at = invoice["release_at"]
    live = release_at is not None and invoice["status"] in OPEN
    return {**invoice, "seconds_left": max(0, int(release_at - time.time())) if live else None}


@dataclass
class Ledger:
    """Everything reset() forgets; guarded by Sandbox's lock."""

    faults: Faults = field(default_factory=Faults)
    rng: random.Random = field(default_factory=random.Random)
    invoices: dict[str, dict[str, Any]] = field(default_factory=dict)
    cancelled: set[str] = field(default_factory=set)
    calls: Counter[str] = field(default_factory=Counter)  # create calls by foreign_id
    per_second: Counter[int] = field(default_factory=Counter)  # create calls by unix second
    responses: Counter[str] = field(default_factory=Counter)  # by status code, or "dropped"
    outcomes: Counter[str] = field(default_factory=Counter)  # fault outcomes played, by name
    scripts: dict[str | None, deque[str]] = field(default_factory=dict)  # None: any foreign_id
    payments: dict[str, Payment] = field(default_factory=dict)  # by foreign_id
    codes: dict[str, str] = field(default_factory=dict)  # foreign_id by page code
    timers: list[tuple[int, str]] = field(default_factory=list)  # heap of (expires_at, fid)
    callback_rng: random.Random = field(default_factory=random.Random)  # callback fault draws

    def set_faults(self, faults: Faults) -> None:
        """Use `faults`; both random draws (calls, callbacks) restart from `faults.seed`."""
        self.faults, self.rng = faults, random.Random(faults.seed)
        self.callback_rng = random.Random(faults.seed)

    def add(self, invoice: dict[str, Any], payment: Payment) -> None:
        """Keep a new invoice and its payment; its timer starts if it has one."""
        foreign_id = invoice["foreign_id"]
        self.invoices[foreign_id], self.payments[foreign_id] = invoice, payment
        self.codes[payment.code] = foreign_id
        if payment.expires_at is not None:
            heapq.heappush(self.timers, (payment.expires_at, foreign_id))

    def find(self, key: str) -> str:
        """The foreign_id of the invoice `key` names: a foreign_id, else an invoice id.

        Raises:
            KeyError: if no invoice has that key.
        """
        if key in self.invoices:
            return key
        number = int(key) if key.isdecimal() and len(key) < 20 else None
        by_id = (fid for fid, invoice in self.invoices.items() if invoice["id"] == number)
        if (foreign_id := next(by_id, None)) is not None:
            return foreign_id
        raise KeyError(key)

    def pay(
        self, key: str, mode: str, next_id: Callable[[], int]
    ) -> tuple[dict[str, Any], list[Item]]:
        """Play a payer action; return the invoice's view and its callbacks to queue.

        Raises:
            KeyError: as `find`.
            PaymentError: as `payments.pay`.
        """
        foreign_id = self.find(key)
        invoice, payment = self.invoices[foreign_id], self.payments[foreign_id]
        bodies = payments.pay(invoice, payment, mode, int(time.time()), next_id)
        return view(invoice), self.items(bodies)

    def cancel(self, foreign_id: str) -> list[Item]:
        """Fail an open invoice on the merchant's request; return its callback to queue."""
        invoice, payment = self.invoices[foreign_id], self.payments[foreign_id]
        self.cancelled.add(foreign_id)
        return self.items([payments.cancel(invoice, payment, int(time.time()))])

    def expire_due(self, now: int) -> list[Item]:
        """Fail every open invoice whose timer ran out by `now`; return their callbacks."""
        bodies = []
        while self.timers and self.timers[0][0] <= now:
            _, foreign_id = heapq.heappop(self.timers)
            invoice, payment = self.invoices[foreign_id], self.payments[foreign_id]
            if (body := payments.expire(invoice, payment, now)) is not None:
                bodies.append(body)
        return self.items(bodies)

    def page(self, code: str) -> dict[str, Any] | None:
        """What the invoice page with this code shows, or None: the API's view of the invoice
        plus its description, the urls back to the shop, error, transactions, `expires_at`."""
        if (foreign_id := self.codes.get(code)) is None:
            return None
        invoice, payment = self.invoices[foreign_id], self.payments[foreign_id]
        return {
            **view(invoice),
            "code": code,
            "description": payment.description,
            "url_success": payment.url_success,
            "url_failed": payment.url_failed,
            "error": payment.error,
            "transactions": [dict(tx) for tx in payment.transactions],
            "expires_at": payment.expires_at,
        }

    def items(self, bodies: list[dict[str, Any]]) -> list[Item]:
        """One action's callbacks as queue items, with their faults drawn."""
        faults, rng = self.faults, self.callback_rng
        items = [(body, json_bytes(body), faults.callback_faults(rng)) for body in bodies]
        if len(items) > 1 and faults.out_of_order(rng):
            items = [(body, raw, drawn | {"out_of_order"}) for body, raw, drawn in items[::-1]]
        return items
