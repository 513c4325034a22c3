"""What the invoice events do to orders (the ``consume_invoice_events`` command runs this).

Each event may come more than once (the consumer group delivers at least once) and a job
event may be read after the status events that followed it (one was redelivered), so every
update only moves an order forward (``OrderQuerySet.advance``); paid is final. Events of
invoices that are not this shop's (another ``foreign_id`` prefix, or a ref this database never
had) are skipped, and acknowledged all the same.
"""

from __future__ import annotations

import logging

from invoice_worker.constants import EventKind, InvoiceStatus, JobState
from invoice_worker.events import Event
from orders.models import FOREIGN_ID_PREFIX, Order, Status

log = logging.getLogger(__name__)


def apply(event: Event) -> None:
    """Mark the event's order: awaiting payment (with the invoice URL), paid or failed."""
    foreign_id = event.foreign_id.lower()  # as the job store folds it
    if not foreign_id.startswith(FOREIGN_ID_PREFIX):
        return  # another application's job on the same stream
    orders = Order.objects.filter(ref=foreign_id.removeprefix(FOREIGN_ID_PREFIX))
    status: str | None = None  # a Status (Django's enums are untyped to mypy)
    fields = {}
    if event.kind is EventKind.JOB:
        if event.state is JobState.CREATED:
            status, fields = Status.AWAITING_PAYMENT, {"invoice_url": event.url or ""}
        elif event.state in {JobState.FAILED, JobState.EXPIRED}:
            status = Status.FAILED
    elif event.status is InvoiceStatus.CONFIRMED:
        status = Status.PAID
    elif event.status is InvoiceStatus.FAILED:
        status = Status.FAILED
    if status is not None and orders.advance(status, **fields):
        log.info("%s is %s (event %s)", event.foreign_id, status, event.id)
