"""The invoice page a payer opens (the create answer's `url`): plain server-rendered HTML.

GET /invoice/<code> shows the title, description, amount and currency, the deposit address, the
status and the time left (counted down by a few lines of inline script; without script the page
still shows the time as rendered). While the invoice can be paid, one form offers the payer
actions of `payments.MODES`; its buttons POST `mode=<action>` back to the same URL, which plays
the action (as the admin API's pay endpoint does) and answers 303 to the page, so a reload
never pays twice. No external assets: one inline style and one inline script, both allowed by
a per-response CSP nonce, and every value from the invoice is HTML-escaped.
"""

from __future__ import annotations

import secrets
import time
from html import escape
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qs, quote

from invoice_worker.sandbox.payments import MODES, PAYABLE, PaymentError

if TYPE_CHECKING:
    from invoice_worker.sandbox.server import Sandbox

#: The label of each payer action's button.
BUTTONS = {
    "full": "Pay in full",
    "less": "Pay less",
    "instalments": "Pay in two instalments",
    "expire": "Let the timer expire",
}
assert tuple(BUTTONS) == MODES
_TICKING = (*PAYABLE, "processing")  # the statuses whose timer runs

_STYLE = """
body { font: 16px/1.5 system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
main { max-width: 34rem; margin: 2rem auto; background: #fff; padding: 1.5rem 2rem;
       border-radius: 8px; box-shadow: 0 1px 4px rgba(0, 0, 0, .12); }
.banner { background: #fff3cd; color: #664d03; padding: .3rem .6rem; border-radius: 4px;
          font-size: .85rem; }
h1 { font-size: 1.4rem; margin: .8rem 0 .2rem; overflow-wrap: anywhere; }
.description { color: #4a5263; white-space: pre-wrap; overflow-wrap: anywhere; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .3rem 1rem; }
dt { color: #6b7385; } dd { margin: 0; overflow-wrap: anywhere; }
.status { font-weight: 600; } .confirmed { color: #157347; } .failed { color: #b02a37; }
.notice { background: #f8d7da; color: #58151c; padding: .4rem .6rem; border-radius: 4px; }
form { display: flex; flex-wrap: wrap; gap: .5rem; margin-top: 1rem; }
button { font: inherit; padding: .45rem .9rem; border-radius: 4px; border: 1px solid #8a93a6;
         background: #fff; cursor: pointer; }
button[value=full] { background: #1f6feb; border-color: #1f6feb; color: #fff; }
table { border-collapse: collapse; font-size: .85rem; margin-top: .5rem; }
td, th { border-top: 1px solid #e1e4ea; padding: .2rem .5rem; text-align: left; }
"""
_SCRIPT = """
(function () {
  var timer = document.getElementById("timer");
  if (!timer || timer.dataset.secondsLeft === undefined) { return; }
  var end = Date.now() + 1000 * Number(timer.dataset.secondsLeft);
  function two(n) { return (n < 10 ? "0" : "") + n; }
  function show() {
    var left = Math.max(0, Math.round((end - Date.now()) / 1000));
    var h = Math.floor(left / 3600), m = Math.floor(left % 3600 / 60), s = left % 60;
    timer.textContent = (h ? h + ":" + two(m) : two(m)) + ":" + two(s);
    if (left === 0) { setTimeout(function () { location.reload(); }, 1500); }
    else { setTimeout(show, 1000); }
  }
  show();
})();
"""


class Reply(NamedTuple):
    """An HTTP answer: status, content type, body, extra header lines."""

    status: int
    ctype: str
    body: bytes
    headers: str = ""


def serve(sandbox: Sandbox, method: str, code: str, body: bytes) -> Reply:
    """Answer a request for the page of `code`: GET shows it, POST plays the form's action."""
    if method not in ("GET", "POST"):
        return _not_allowed()
    view = sandbox.page(code)
    if method == "GET" or view is None:
        return page(view)
    mode = mode_of(body)
    if mode not in MODES:
        return page(view, "Unknown action.", 400)
    try:
        sandbox.pay(view["foreign_id"], mode)
    except PaymentError as e:
        return page(sandbox.page(code), str(e), 409)
    return redirect("/invoice/" + quote(code, safe=""))


def _not_allowed() -> Reply:
    return Reply(405, "text/plain; charset=utf-8", b"Method Not Allowed\n", "Allow: GET, POST\r\n")


def mode_of(body: bytes) -> str | None:
    """The `mode` field of a form POST (urlencoded), or None."""
    try:
        values = parse_qs(body.decode("ascii", "replace"), max_num_fields=10).get("mode", [])
    except ValueError:  # more fields than that
        return None
    return values[0] if len(values) == 1 else None


def page(view: dict[str, Any] | None, notice: str = "", status: int = 200) -> Reply:
    """The invoice page for `view` (`Sandbox.page`), or a 404 page if it is None."""
    nonce = secrets.token_urlsafe(16)
    if view is None:
        return _html(404, "Invoice not found", "<h1>Invoice not found</h1>", nonce)
    title = escape(view["title"])
    content = '<p class="banner">Sandbox invoice: nothing is really paid here.</p>\n'
    content += f'<h1 id="title">{title}</h1>\n'
    if view["description"]:
        content += f'<p class="description" id="description">{escape(view["description"])}</p>\n'
    if notice:
        content += f'<p class="notice" id="notice">{escape(notice)}</p>\n'
    content += _details(view) + _transactions(view["transactions"]) + _actions(view)
    return _html(status, f"{title} - invoice", content, nonce)


def _details(view: dict[str, Any]) -> str:
    amount = f"{view['amount']} {view['currency']}"
    rows = [("Amount", "amount", escape(amount))]
    if view["sender_currency"] != view["currency"]:
        pay = f"{view['sender_amount']} {view['sender_currency']}"
        rows.append(("To pay", "sender-amount", escape(pay)))
    rows.append(("Deposit address", "address", f"<code>{escape(view['address'])}</code>"))
    status = escape(view["status"])
    rows.append(("Status", "status", f'<span class="status {status}">{status}</span>'))
    if view["error"]:
        rows.append(("Error", "error", escape(view["error"])))
    rows.append(("Time left", "timer-row", _timer(view)))
    cells = "".join(f'<dt>{name}</dt><dd id="{ident}">{value}</dd>' for name, ident, value in rows)
    return f"<dl>{cells}</dl>\n"


def _timer(view: dict[str, Any]) -> str:
    expires_at = view["expires_at"]
    if view["status"] not in _TICKING:
        return "-"
    if expires_at is None:
        return "no timer: the rate is fixed once the currency is chosen"
    left = max(0, int(expires_at - time.time()))
    hours, rest = divmod(left, 3600)
    shown = (f"{hours}:" if hours else "") + f"{rest // 60:02d}:{rest % 60:02d}"
    return f'<span id="timer" data-seconds-left="{left}">{shown}</span>'


def _transactions(transactions: list[dict[str, Any]]) -> str:
    if not transactions:
        return ""
    rows = "".join(
        f"<tr><td>{escape(tx['amount'])} {escape(tx['currency'])}</td>"
        f"<td><code>{escape(tx['txid'][:16])}...</code></td>"
        f"<td>{escape(str(tx['confirmations']))}</td></tr>"
        for tx in transactions
    )
    head = "<tr><th>Received</th><th>Transaction</th><th>Confirmations</th></tr>"
    return f'<table id="transactions">{head}{rows}</table>\n'


def _actions(view: dict[str, Any]) -> str:
    status = view["status"]
    if status in PAYABLE:
        action = "/invoice/" + quote(view["code"], safe="")
        buttons = "".join(
            f'<button type="submit" name="mode" value="{mode}" id="pay-{mode}">{label}</button>'
            for mode, label in BUTTONS.items()
        )
        return f'<form method="post" action="{escape(action)}" id="actions">{buttons}</form>\n'
    back = {"confirmed": "url_success", "failed": "url_failed"}.get(status)
    if back is None:
        return ""
    return f'<p><a id="back" href="{escape(view[back])}">Back to the shop</a></p>\n'


def _html(status: int, title: str, content: str, nonce: str) -> Reply:
    """A whole page; `title` and `content` are already escaped."""
    text = (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<title>{title}</title>\n<style nonce="{nonce}">{_STYLE}</style>\n</head>\n'
        f'<body>\n<main>\n{content}</main>\n<script nonce="{nonce}">{_SCRIPT}</script>\n'
        "</body>\n</html>\n"
    )
    csp = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    )
    headers = (
        f"Content-Security-Policy: {csp}\r\nX-Content-Type-Options: nosniff\r\n"
        "Cache-Control: no-store\r\n"
    )
    return Reply(status, "text/html; charset=utf-8", text.encode(), headers)


def redirect(location: str) -> Reply:
    """303 See Other to `location` (a path of this server)."""
    return Reply(303, "text/plain; charset=utf-8", b"See Other\n", f"Location: {location}\r\n")
