"""The sandbox's admin API under /_sandbox (unauthenticated: loopback use only; `--no-admin`).

GET  /invoices                every invoice (+ `cancelled`) and create calls by foreign_id
GET  /faults, PUT /faults     the fault settings; PUT merges the fields given
POST /script                  {"outcomes": [...], "foreign_id": ...} for the next calls
GET  /stats                   calls per second, responses, outcomes played
POST /reset                   forget invoices, counters, scripts, faults and callbacks
POST /invoices/<key>/pay      {"mode": "full"|"less"|"instalments"|"expire"}: what the
                              invoice page's buttons do; <key> a foreign_id or an id
GET  /callbacks, PUT /callbacks
                              where callbacks go, their time scale and timeout (PUT merges
                              {"url", "time_scale", "timeout"}; url "" for nowhere), and
                              every callback queued with its delivery attempts
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from invoice_worker.sandbox.bodies import error_body, json_bytes
from invoice_worker.sandbox.faults import Faults
from invoice_worker.sandbox.payments import MODES, PaymentError

if TYPE_CHECKING:
    from invoice_worker.sandbox.server import Sandbox

_PAY = re.compile(r"/invoices/([^/]+)/pay/?")
_CALLBACK_FIELDS = ("url", "time_scale", "timeout")


def answer(sandbox: Sandbox, method: str, path: str, body: bytes) -> tuple[int, bytes]:
    """Answer one admin request (`path` without the /_sandbox prefix): (status, JSON body)."""
    route = f"{method} {path}"
    try:
        data = json.loads(body or b"{}")
        if pay := _PAY.fullmatch(path):
            return _pay(sandbox, method, unquote(pay[1]), data)
        if (act := _ACTIONS.get(route)) is None:
            return 404, error_body(f"No sandbox endpoint {route}", "not_found")
        return 200, json_bytes(act(sandbox, data))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        return 400, error_body(f"{type(e).__name__}: {e}", "bad_request")


def _pay(sandbox: Sandbox, method: str, key: str, data: Any) -> tuple[int, bytes]:
    if method != "POST":
        return 404, error_body(f"No sandbox endpoint {method} /invoices/{key}/pay", "not_found")
    if (mode := data.get("mode")) not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    try:
        invoice, queued = sandbox.pay(key, mode)
    except KeyError:
        return 404, error_body("Invoice not found", "invoice_not_found")
    except PaymentError as e:
        return 409, error_body(str(e), "invalid_invoice_state")
    return 200, json_bytes({"data": invoice, "callbacks_queued": queued})


def _put_faults(sandbox: Sandbox, data: Any) -> dict[str, Any]:
    sandbox.set_faults(Faults.from_dict(data, base=sandbox.faults))
    return {"ok": True}


def _script(sandbox: Sandbox, data: Any) -> dict[str, Any]:
    sandbox.script(list(data["outcomes"]), data.get("foreign_id"))
    return {"ok": True}


def _reset(sandbox: Sandbox, _data: Any) -> dict[str, Any]:
    sandbox.reset()
    return {"ok": True}


def _invoices(sandbox: Sandbox, _data: Any) -> dict[str, Any]:
    return {"invoices": sandbox.invoices(), "create_calls": sandbox.create_call_counts()}


def _callbacks(sandbox: Sandbox, _data: Any) -> dict[str, Any]:
    return {**sandbox.callback_settings(), "callbacks": sandbox.callbacks()}


def _put_callbacks(sandbox: Sandbox, data: Any) -> dict[str, Any]:
    if unknown := set(data) - set(_CALLBACK_FIELDS):
        raise ValueError(f"unknown callback settings {sorted(unknown)}")
    url = data.get("url")
    if url is not None and not isinstance(url, str):
        raise TypeError(f"url must be a string, not {url!r}")
    numbers = {name: data.get(name) for name in ("time_scale", "timeout")}
    for name, value in numbers.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise TypeError(f"{name} must be a number, not {value!r}")
    sandbox.set_callbacks(url, numbers["time_scale"], numbers["timeout"])
    return sandbox.callback_settings()


_ACTIONS: dict[str, Callable[[Sandbox, Any], Any]] = {
    "GET /invoices": _invoices,
    "GET /faults": lambda sandbox, _: sandbox.faults.to_dict(),
    "PUT /faults": _put_faults,
    "POST /script": _script,
    "GET /stats": lambda sandbox, _: sandbox.stats(),
    "POST /reset": _reset,
    "GET /callbacks": _callbacks,
    "PUT /callbacks": _put_callbacks,
}
