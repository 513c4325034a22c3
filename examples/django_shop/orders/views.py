"""The order pages, the pay button's view, and the provider's callback receiver."""

from __future__ import annotations

import time

from django import forms
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from invoice_worker import (
    ConflictError,
    InvalidRequestError,
    JobRecord,
    JobState,
    NotDurableError,
    enqueue_invoice,
    get_invoice,
    handle_callback,
    wait_for_invoice,
)
from orders.models import Order, Status


class OrderForm(forms.ModelForm):
    class Meta:
        model = Order
        fields = ("description", "amount", "email")


def index(request: HttpRequest) -> HttpResponse:
    """The orders, and a form for a new one."""
    form = OrderForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        return redirect(form.save())
    orders = Order.objects.order_by("-pk")[:20]
    return render(request, "orders/index.html", {"form": form, "orders": orders})


def order(request: HttpRequest, pk: int) -> HttpResponse:
    return render(request, "orders/order.html", {"order": get_object_or_404(Order, pk=pk)})


@require_POST
def pay(request: HttpRequest, pk: int) -> HttpResponse:
    """Enqueue the order's invoice job, wait a little for it, then send the payer to the
    invoice page, or to the waiting page that follows the job.

    A second click (or a reload) enqueues the same foreign_id with the same request: it gets
    the first click's job, not a second invoice.
    """
    order = get_object_or_404(Order, pk=pk)
    if not order.payable:
        return redirect(order)
    try:
        enqueue_invoice(
            order.invoice_request(settings.SHOP_PUBLIC_URL),
            deadline=time.time() + settings.SHOP_INVOICE_DEADLINE,
        )
    except InvalidRequestError as exc:
        return _order_error(request, order, exc.errors, 422)
    except ConflictError:
        problem = {"order": "an invoice was requested for this order with other details"}
        return _order_error(request, order, problem, 409)
    except NotDurableError:
        return _order_error(request, order, {"order": "not saved yet, please try again"}, 503)
    Order.objects.filter(pk=pk).advance(Status.WAITING)
    record = wait_for_invoice(order.foreign_id, timeout=settings.SHOP_INVOICE_WAIT)
    return _follow(order, record) or redirect("waiting", pk=pk)


def waiting(request: HttpRequest, pk: int) -> HttpResponse:
    """The page shown while the invoice is being created; its script polls `invoice_state`
    and reloads it once the job is final, which then redirects."""
    order = get_object_or_404(Order, pk=pk)
    record = get_invoice(order.foreign_id)
    if record is None:  # not paid for yet
        return redirect(order)
    followed = _follow(order, record)
    return followed or render(request, "orders/waiting.html", {"order": order})


def invoice_state(request: HttpRequest, pk: int) -> JsonResponse:
    """``{"state": ..., "final": ...}`` of the order's invoice job (``state`` null before
    the pay button was clicked)."""
    order = get_object_or_404(Order, pk=pk)
    record = get_invoice(order.foreign_id)
    return JsonResponse(
        {"state": record.state if record else None, "final": bool(record and record.final)}
    )


def _follow(order: Order, record: JobRecord | None) -> HttpResponse | None:
    """Where a final job sends the payer (and the order's status it shows); None if the
    job is not final yet."""
    orders = Order.objects.filter(pk=order.pk)
    if record is None or not record.final:
        return None
    if record.state is JobState.CREATED and record.url:
        orders.advance(Status.AWAITING_PAYMENT, invoice_url=record.url)
        return redirect(record.url)
    orders.advance(Status.FAILED)
    return redirect(order)


def _order_error(
    request: HttpRequest, order: Order, errors: dict[str, str], status: int
) -> HttpResponse:
    context = {"order": order, "errors": errors}
    return render(request, "orders/order.html", context, status=status)


@csrf_exempt  # the provider signs its callbacks; it has no CSRF token
@require_POST
def coinspaid_callback(request: HttpRequest) -> HttpResponse:
    status, body = handle_callback(request.body, request.headers)
    return HttpResponse(body, status=status, content_type="application/json")
