"""The FastAPI shop's events consumer: what each event does to an order (no browser, no
Redis: events as the stream carries them, the orders table in a temporary SQLite file)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from examples.fastapi_shop.consumer import apply
from examples.fastapi_shop.orders import Orders, OrderStatus
from invoice_worker.events import Event

PAID_LESS = "Timer expired. User paid less than requested."


def event(kind: str, foreign_id: str, **fields: str) -> Event:
    parsed = Event.parse("1-0", {"kind": kind, "foreign_id": foreign_id, **fields})
    assert parsed is not None
    return parsed


def test_an_order_moves_forward_only(tmp_path: Path) -> None:
    async def run() -> list[tuple[OrderStatus, str, str]]:
        orders = Orders(tmp_path / "shop.sqlite3")
        await orders.create_table()
        order = await orders.place("buyer@example.com")
        fid = order.foreign_id.upper()  # the store folds case: so does the lookup
        seen = []
        for e in [
            event("job", fid, state="created", url="https://pay.example/i/1"),
            event("status", fid, status="processing"),
            event("status", fid, status="confirmed"),
            # Redelivered and late events change nothing
            event("job", fid, state="created", url="https://pay.example/i/other"),
            event("status", fid, status="failed", error="Timer expired."),
        ]:
            await apply(orders, e)
            got = await orders.get(order.id)
            assert got is not None
            seen.append((got.status, got.invoice_url, got.error))
        return seen

    url = "https://pay.example/i/1"
    assert asyncio.run(run()) == [
        (OrderStatus.AWAITING_PAYMENT, url, ""),
        (OrderStatus.AWAITING_PAYMENT, url, ""),
        (OrderStatus.PAID, url, ""),
        (OrderStatus.PAID, url, ""),
        (OrderStatus.PAID, url, ""),
    ]


def test_failures_and_other_shops_events(tmp_path: Path) -> None:
    async def run() -> list[tuple[OrderStatus, str]]:
        orders = Orders(tmp_path / "shop.sqlite3")
        await orders.create_table()
        expired, short, untouched = [await orders.place("b@example.com") for _ in range(3)]
        await apply(orders, event("job", expired.foreign_id, state="expired", error_code="x"))
        await apply(
            orders, event("job", short.foreign_id, state="created", url="https://p.example/2")
        )
        await apply(orders, event("status", short.foreign_id, status="failed", error=PAID_LESS))
        # Another shop's invoice, and one of ours that this database never had
        await apply(
            orders, event("job", f"order-{untouched.id}", state="created", url="https://x.example")
        )
        await apply(
            orders, event("job", "fastapi-shop-0000", state="created", url="https://x.example")
        )
        result = []
        for order in (expired, short, untouched):
            got = await orders.get(order.id)
            assert got is not None
            result.append((got.status, got.error))
        return result

    assert asyncio.run(run()) == [
        (OrderStatus.FAILED, "The invoice could not be created (x)."),
        (OrderStatus.FAILED, PAID_LESS),
        (OrderStatus.NEW, ""),
    ]
