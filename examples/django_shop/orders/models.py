"""The shop's order: what it sells, and how far its payment got."""

from __future__ import annotations

import secrets
from typing import Any

from django.db import models
from django.urls import reverse


class Status(models.TextChoices):
    NEW = "new", "new"
    #: The pay button was clicked; the invoice is being created.
    WAITING = "waiting", "waiting for the invoice"
    AWAITING_PAYMENT = "awaiting_payment", "awaiting payment"
    PAID = "paid", "paid"
    FAILED = "failed", "failed"


#: The statuses an order may move to each status from: only forward, so a late or repeated
#: event cannot take an order back. Paid wins over failed: a late payment is still money.
_FROM = {
    Status.WAITING: [Status.NEW],
    Status.AWAITING_PAYMENT: [Status.NEW, Status.WAITING],
    Status.FAILED: [Status.NEW, Status.WAITING, Status.AWAITING_PAYMENT],
    Status.PAID: [Status.NEW, Status.WAITING, Status.AWAITING_PAYMENT, Status.FAILED],
}


#: Every invoice of this shop has a foreign_id starting so; other events on the stream are not
#: ours (another application's, or another shop's).
FOREIGN_ID_PREFIX = "django-shop-"


def new_ref() -> str:
    """A new order's random reference (lower-case hex, as the job store folds foreign_ids)."""
    return secrets.token_hex(8)


class OrderQuerySet(models.QuerySet["Order"]):
    def advance(self, status: str, **fields: Any) -> int:
        """Move these orders to `status` (and set `fields`) where that is forward; how many
        moved. One UPDATE: the web server and the events consumer may race."""
        return self.filter(status__in=_FROM[status]).update(status=status, **fields)


class Order(models.Model):
    Status = Status

    #: Random, so that the invoice's foreign_id is never an earlier database's (after a reset,
    #: order 1 again: the provider refuses a reused id, or answers with the old invoice) nor
    #: another application's.
    ref = models.CharField(max_length=16, unique=True, default=new_ref, editable=False)
    description = models.CharField(max_length=200)
    amount = models.DecimalField("amount (BTC)", max_digits=18, decimal_places=8)
    email = models.EmailField()
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.NEW)
    invoice_url = models.URLField(max_length=2048, blank=True)

    objects = OrderQuerySet.as_manager()

    def __str__(self) -> str:
        return f"Order #{self.pk}"

    @property
    def foreign_id(self) -> str:
        """The invoice job's idempotency key: one per order, so a second click finds the
        first click's job."""
        return f"{FOREIGN_ID_PREFIX}{self.ref}"

    @property
    def payable(self) -> bool:
        return self.status in {Status.NEW, Status.WAITING}

    def get_absolute_url(self) -> str:
        return reverse("order", args=[self.pk])

    def invoice_request(self, public_url: str) -> dict[str, Any]:
        """The create request; the provider's page sends the payer back to this order."""
        back = public_url + self.get_absolute_url()
        return {
            "foreign_id": self.foreign_id,
            "title": str(self),
            "description": self.description,
            "currency": "BTC",
            "amount": str(self.amount),
            "timer": True,
            "url_success": back,
            "url_failed": back,
            "email_user": self.email,
        }
