"""The shop's HTML: a few f-strings, every value through ``html.escape``.

One inline style and, on the waiting page, one inline script, both allowed by a per-answer CSP
nonce; nothing is loaded from elsewhere.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from html import escape

from fastapi.responses import HTMLResponse

from examples.fastapi_shop.orders import CURRENCY, PRICE, PRODUCT, Order, OrderStatus

_STYLE = """
body { font: 16px/1.5 system-ui, sans-serif; margin: 0; background: #f6f3ee; color: #2b2520; }
main { max-width: 34rem; margin: 2rem auto; background: #fff; padding: 1.5rem 2rem;
       border-radius: 8px; box-shadow: 0 1px 4px rgba(0, 0, 0, .12); }
header { font-weight: 700; color: #6f4e37; }
h1 { font-size: 1.4rem; margin: .8rem 0; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .3rem 1rem; }
dt { color: #7a6f66; } dd { margin: 0; overflow-wrap: anywhere; }
.status { font-weight: 600; } .paid { color: #157347; } .failed { color: #b02a37; }
.notice { background: #f8d7da; color: #58151c; padding: .4rem .6rem; border-radius: 4px; }
form { margin-top: 1rem; display: flex; gap: .5rem; flex-wrap: wrap; }
input { font: inherit; padding: .4rem; }
button { font: inherit; padding: .5rem 1rem; border-radius: 4px; border: 0; cursor: pointer;
         background: #6f4e37; color: #fff; }
li { margin: .2rem 0; }
"""
# EventSource follows the job; on its end the page reloads, and the server redirects.
_WAIT_SCRIPT = """
(function () {
  var waiting = document.getElementById("waiting");
  var source = new EventSource(waiting.dataset.events);
  source.addEventListener("final", function () { source.close(); location.reload(); });
})();
"""
_LABELS = {
    OrderStatus.NEW: "new",
    OrderStatus.AWAITING_PAYMENT: "awaiting payment",
    OrderStatus.PAID: "paid",
    OrderStatus.FAILED: "failed",
}


def page(
    title: str,
    body: str,
    *,
    status_code: int = 200,
    script: str = "",
    refresh: int | None = None,
    nonce: str | None = None,
) -> HTMLResponse:
    """A whole page, with its CSP: nothing but this answer's inline style and script."""
    nonce = nonce or secrets.token_urlsafe(16)
    head = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    tail = f'<script nonce="{nonce}">{script}</script>' if script else ""
    html = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">{head}'
        f'<title>{escape(title)}</title><style nonce="{nonce}">{_STYLE}</style></head>'
        f'<body><main><header><a href="/">Coffee shop</a></header>{body}</main>{tail}'
        "</body></html>"
    )
    csp = (
        f"default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}';"
        " connect-src 'self'; base-uri 'none'; frame-ancestors 'none'"
    )
    headers = {"Content-Security-Policy": csp, "Referrer-Policy": "same-origin"}
    return HTMLResponse(html, status_code=status_code, headers=headers)


def _token(csrf: str) -> str:
    return f'<input type="hidden" name="csrf" value="{escape(csrf)}">'


def index(orders: list[Order], csrf: str) -> HTMLResponse:
    """The order form and the latest orders."""
    items = "".join(
        f'<li><a href="/orders/{o.id}">Order #{o.id}</a>: {escape(o.title)}, '
        f'<span class="status {o.status}">{_LABELS[o.status]}</span></li>'
        for o in orders
    )
    body = (
        f"<h1>{escape(PRODUCT)}</h1><p>{PRICE} {escape(CURRENCY)}, delivered to your door.</p>"
        f'<form method="post" action="/orders">{_token(csrf)}'
        '<input id="email" name="email" type="email" required value="buyer@example.com"'
        ' aria-label="e-mail">'
        '<button id="order" type="submit">Order</button></form>'
        + (f"<h2>Orders</h2><ul>{items}</ul>" if items else "")
    )
    return page("Coffee shop", body)


def order_page(order: Order, csrf: str) -> HTMLResponse:
    """The order and its status; the pay button while it can be paid."""
    action = {
        OrderStatus.NEW: "Pay with crypto",
        OrderStatus.AWAITING_PAYMENT: "Continue to the invoice",
    }.get(order.status)
    form = (
        f'<form method="post" action="/orders/{order.id}/pay">{_token(csrf)}'
        f'<button id="pay" type="submit">{action}</button></form>'
        if action
        else ""
    )
    error = f'<p class="notice" id="error">{escape(order.error)}</p>' if order.error else ""
    body = (
        f"<h1>Order #{order.id}</h1><dl>"
        f'<dt>Item</dt><dd id="title">{escape(order.title)}</dd>'
        f'<dt>Amount</dt><dd id="amount">{order.amount} {escape(order.currency)}</dd>'
        f'<dt>Status</dt><dd id="status" class="status {order.status}">'
        f"{_LABELS[order.status]}</dd></dl>{error}{form}"
    )
    # Until the provider's callbacks settle it, the page looks again every few seconds.
    refresh = 3 if order.status is OrderStatus.AWAITING_PAYMENT else None
    return page(f"Order #{order.id}", body, refresh=refresh)


def waiting_page(order: Order) -> HTMLResponse:
    """Shown while the invoice is being created: follows the job, then reloads."""
    body = (
        f"<h1>Order #{order.id}</h1>"
        f'<p id="waiting" data-events="/orders/{order.id}/invoice/events">'
        "Creating your invoice&hellip; this page moves on by itself.</p>"
        f'<noscript><p><a href="/orders/{order.id}/invoice">Check again</a></p></noscript>'
    )
    return page("Creating your invoice", body, script=_WAIT_SCRIPT)


def failed_page(order: Order, error_code: str) -> HTMLResponse:
    """The invoice could not be created."""
    body = (
        f"<h1>Order #{order.id}</h1>"
        f'<p class="notice" id="error">The invoice could not be created ({escape(error_code)}).'
        f' </p><p><a href="/orders/{order.id}">Back to the order</a></p>'
    )
    return page("No invoice", body)


def problem(
    title: str, detail: str, status_code: int, errors: Mapping[str, str] | None = None
) -> HTMLResponse:
    """An error page: what went wrong, and each field's rule when there are some."""
    items = "".join(f"<li>{escape(k)}: {escape(v)}</li>" for k, v in (errors or {}).items())
    body = f"<h1>{escape(title)}</h1><p>{escape(detail)}</p>" + (
        f"<ul>{items}</ul>" if items else ""
    )
    return page(title, body, status_code=status_code)
