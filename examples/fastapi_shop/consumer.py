"""The events stream, read by the shop's consumer group: it marks orders awaiting payment,
paid or failed.

Each event is handled once across the shop's processes (the group), acknowledged after its
order is written, and redelivered if the handler raised. Handling is idempotent: an order only
moves forward (``Orders.advance``), so a redelivered or late event changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from examples.fastapi_shop.orders import FOREIGN_ID_PREFIX, Orders, OrderStatus
from invoice_worker.constants import EventKind, InvoiceStatus, JobState
from invoice_worker.events import AsyncEventConsumer, Event

log = logging.getLogger(__name__)

#: After an error the consumer could not ride out, it starts again after this long.
RESTART_SECONDS = 1.0


async def apply(orders: Orders, event: Event) -> None:
    """Mark the order the event names; events of other shops' invoices are not ours."""
    if not event.foreign_id.lower().startswith(FOREIGN_ID_PREFIX):
        return
    order = await orders.by_foreign_id(event.foreign_id)
    if order is None:
        return
    match event.kind:
        case EventKind.JOB if event.state is JobState.CREATED:
            await orders.advance(
                order.id, OrderStatus.AWAITING_PAYMENT, invoice_url=event.url or ""
            )
        case EventKind.JOB:
            error = f"The invoice could not be created ({event.error_code or event.state})."
            await orders.advance(order.id, OrderStatus.FAILED, error=error)
        case EventKind.STATUS if event.status is InvoiceStatus.CONFIRMED:
            await orders.advance(order.id, OrderStatus.PAID)
        case EventKind.STATUS if event.status is InvoiceStatus.FAILED:
            error = event.fields.get("error") or "The invoice failed."
            await orders.advance(order.id, OrderStatus.FAILED, error=error)
        case EventKind.STATUS:
            pass  # pending, processing: the order stays awaiting payment
    log.info("order %s: %s event applied", order.id, event.kind)


async def consume(orders: Orders, consumer: AsyncEventConsumer, stop: asyncio.Event) -> None:
    """Run the consumer until ``stop`` is set. ``run`` itself rides out Redis being
    unreachable; anything else it raises (a bug, a key of the wrong type) is logged and the
    consumer started again, so the lifespan's background task never ends unnoticed."""

    async def handle(event: Event) -> None:
        await apply(orders, event)

    while not stop.is_set():
        try:
            await consumer.run(handle, stop=stop)
        except Exception:
            log.exception("events consumer stopped; restarting in %.0f s", RESTART_SECONDS)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RESTART_SECONDS)
