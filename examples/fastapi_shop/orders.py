"""The shop's orders, in one SQLite file (stdlib ``sqlite3``, each call in a worker thread)."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any


class OrderStatus(StrEnum):
    """Where an order stands; it only moves forward (``rank``), so a late event changes nothing."""

    #: Placed, no invoice yet (or one being created).
    NEW = "new"
    #: The invoice exists: the customer can pay it at ``invoice_url``.
    AWAITING_PAYMENT = "awaiting_payment"
    #: The provider confirmed the payment.
    PAID = "paid"
    #: The invoice could not be created, or it failed (expired, paid less).
    FAILED = "failed"

    @property
    def rank(self) -> int:
        return {"new": 0, "awaiting_payment": 1, "paid": 2, "failed": 2}[self.value]


#: The one thing this shop sells.
PRODUCT = "Two bags of coffee beans"
PRICE = Decimal("0.00042")
CURRENCY = "BTC"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ref TEXT NOT NULL UNIQUE,
    title TEXT NOT NULL,
    amount TEXT NOT NULL,
    currency TEXT NOT NULL,
    email TEXT NOT NULL,
    status TEXT NOT NULL,
    invoice_url TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL
)
"""


@dataclass(frozen=True)
class Order:
    """One order row."""

    id: int
    #: Random, so that the invoice's ``foreign_id`` is never another shop's or an earlier
    #: database's ``order-1`` (the provider refuses a reused one for good).
    ref: str
    title: str
    amount: Decimal
    currency: str
    email: str
    status: OrderStatus
    invoice_url: str
    error: str

    @property
    def foreign_id(self) -> str:
        return f"{FOREIGN_ID_PREFIX}{self.ref}"


#: Every invoice of this shop has a foreign_id starting so; other events are not ours.
FOREIGN_ID_PREFIX = "fastapi-shop-"


def _order(row: sqlite3.Row) -> Order:
    return Order(
        id=row["id"], ref=row["ref"], title=row["title"], amount=Decimal(row["amount"]),
        currency=row["currency"], email=row["email"], status=OrderStatus(row["status"]),
        invoice_url=row["invoice_url"], error=row["error"],
    )  # fmt: skip


class Orders:
    """The orders table; every method is a coroutine that runs its query in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10)
        db.row_factory = sqlite3.Row
        return db

    async def _run(self, sql: str, *params: Any) -> list[sqlite3.Row]:
        def run() -> list[sqlite3.Row]:
            with closing(self._connect()) as db, db:
                return db.execute(sql, params).fetchall()

        return await asyncio.to_thread(run)

    async def create_table(self) -> None:
        # WAL: the consumer's writes do not block the pages' reads.
        await self._run("PRAGMA journal_mode=WAL")
        await self._run(_SCHEMA)

    async def place(self, email: str) -> Order:
        """A new order of the one product, for ``email``."""
        rows = await self._run(
            "INSERT INTO orders (ref, title, amount, currency, email, status, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING *",
            secrets.token_hex(8), PRODUCT, str(PRICE), CURRENCY, email, OrderStatus.NEW,
            time.time(),
        )  # fmt: skip
        return _order(rows[0])

    async def get(self, order_id: int) -> Order | None:
        rows = await self._run("SELECT * FROM orders WHERE id = ?", order_id)
        return _order(rows[0]) if rows else None

    async def by_foreign_id(self, foreign_id: str) -> Order | None:
        """The order an invoice's ``foreign_id`` names (case-folded, as the job store does)."""
        ref = foreign_id[len(FOREIGN_ID_PREFIX) :].lower()
        rows = await self._run("SELECT * FROM orders WHERE ref = ?", ref)
        return _order(rows[0]) if rows else None

    async def latest(self, limit: int = 20) -> list[Order]:
        rows = await self._run("SELECT * FROM orders ORDER BY id DESC LIMIT ?", limit)
        return [_order(row) for row in rows]

    async def advance(
        self, order_id: int, status: OrderStatus, *, invoice_url: str = "", error: str = ""
    ) -> bool:
        """Move the order to ``status`` if that is forward (never out of paid or failed).

        Returns:
            Whether the order changed. Redelivered and late events change nothing.
        """
        rows = await self._run(
            "UPDATE orders SET status = ?, updated_at = ?,"
            " invoice_url = CASE WHEN ? = '' THEN invoice_url ELSE ? END,"
            " error = CASE WHEN ? = '' THEN error ELSE ? END"
            # OrderStatus.rank in SQL: the check and the update are one statement.
            " WHERE id = ? AND ? > CASE status"
            " WHEN 'new' THEN 0 WHEN 'awaiting_payment' THEN 1 ELSE 2 END RETURNING id",
            status, time.time(), invoice_url, invoice_url, error, error, order_id, status.rank,
        )  # fmt: skip
        return bool(rows)
