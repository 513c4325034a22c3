"""A local stand-in for the CoinsPaid / CryptoProcessing merchant API v2 (tests, dev, benchmarks).

It speaks the real wire format (HMAC-SHA512 signed bodies, the provider's 400/403 bodies,
Laravel-style field messages) and gives every create or cancel call one outcome:

    ok                 process normally
    500, 502, 503      fail before processing, with a plain-text or HTML body like a proxy's
    429, 429_bare      rate limited: JSON and Retry-After, or a CDN's `error code: 1015` without
    timeout            stall `stall_seconds`, then process normally: the invoice may exist although
                       the client gave up (a stopping sandbox drops the request instead)
    commit_then_drop   create the invoice, then close the connection without a response
    commit_then_502    create the invoice, then answer 502

The outcome comes from a script queue (the call's foreign_id first, then the global queue), else
from one random draw against the `Faults` rates. Unauthenticated admin API, for loopback use:
GET /_sandbox/invoices, GET|PUT /_sandbox/faults, POST /_sandbox/script, GET /_sandbox/stats,
POST /_sandbox/reset.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import os
import random
import re
import secrets
import signal
import socket
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

ENV_PREFIX = "INVOICE_SANDBOX_"
# The outcome of each Faults rate field, in the order a random draw walks them.
_RATED = {
    "error_500": "500",
    "error_502": "502",
    "error_503": "503",
    "rate_limit": "429",
    "rate_limit_bare": "429_bare",
    "timeout": "timeout",
    "commit_then_drop": "commit_then_drop",
    "commit_then_502": "commit_then_502",
}
OUTCOMES = frozenset({"ok", *_RATED.values()})
_TIMER_SECONDS = 900  # the provider fixes the rate for 15 minutes
_OPEN = ("created", "pending", "processing")  # the states a cancel may leave
_Q8, _ONE = Decimal("0.00000001"), Decimal(1)
_MAX_AMOUNT = Decimal(10) ** 12  # keeps 8-decimal arithmetic within Decimal's 28 digits
# Fake EUR prices for sender_amount and min_amount (which is in EUR); unknown tickers are 1 EUR.
_EUR = {"EUR": "1", "USD": "0.92", "USDT": "0.92", "BTC": "60000", "ETH": "3000", "LTC": "80"}
_EUR_RATES = {ticker: Decimal(price) for ticker, price in _EUR.items()}
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_TICKER = re.compile(r"[A-Z0-9]{2,10}")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s.]+")
_EMAIL_INSIDE = re.compile(r"[^@\s]+@[^@\s]+\.[A-Za-z]{2,}")
# https://host[:port][/...]: no userinfo, no IPv6 literal; the host is then checked by _DOMAIN,
# whose alphabetic TLD also rules out IPv4 literals.
_HTTPS_URL = re.compile(r"https://([^/?#@:\s]+)(?::\d{1,5})?(?:[/?#]\S*)?", re.IGNORECASE)
_DOMAIN = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+(?:[a-z]{2,63}|xn--[a-z0-9-]+)")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_CANCEL = re.compile(r"/api/v2/invoices/([^/]+)/cancel/?")
_REQUIRED: tuple[str, ...] = ("timer", "title", "foreign_id", "currency", "amount")
_REQUIRED += ("url_success", "url_failed", "email_user")
_FIELDS = ("type", "description", "sender_currency", *_REQUIRED)  # currency before amount
_MAX_LENGTH = {"title": 50, "description": 1000, "foreign_id": 255}


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _error(message: str, code: str) -> bytes:
    return _json({"error": message, "code": code})


_NO_KEY = _error("No key header", "required_header_key")
_NO_SIGNATURE = _error("No signature header", "required_header_signature")
_BAD_KEY = _error("Bad key header", "bad_header_key")
_BAD_SIGNATURE = _error("Bad signature header", "bad_header_signature")
_BAD_FORMAT = _error("Bad content format", "bad_content_format")
_NOT_FOUND = _error("Invoice not found", "invoice_not_found")  # undocumented, so a guess
_STATE = _error("Invoice cannot be failed in its current state.", "invalid_invoice_state")
_BAD_STATE = b'{"errors":' + _STATE + b"}"
_FAULT_REPLIES = {
    "500": (500, "text/plain", b"Internal Server Error"),
    "502": (502, "text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
    "503": (503, "text/html", b"<html><body><h1>503 Service Unavailable</h1></body></html>"),
    "429": (429, "application/json", _error("Too Many Attempts.", "too_many_requests")),
    "429_bare": (429, "text/plain", b"error code: 1015"),
}


@dataclass
class Faults:
    """Fault rates (each 0..1) and timings for create and cancel calls.

    A call draws one number in [0, 1) and takes the first outcome, in field order, whose
    cumulative rate exceeds it: rates are shares of the traffic while they sum to at most 1.
    """

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_500: float = 0.0
    error_502: float = 0.0
    error_503: float = 0.0
    rate_limit: float = 0.0
    rate_limit_bare: float = 0.0
    timeout: float = 0.0
    commit_then_drop: float = 0.0
    commit_then_502: float = 0.0
    retry_after: int = 1
    stall_seconds: float = 30.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in (*_RATED, "latency_ms", "jitter_ms", "retry_after", "stall_seconds"):
            if not 0 <= getattr(self, name) <= (1 if name in _RATED else 1e6):
                raise ValueError(f"{name} out of range: {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: Faults | None = None) -> Faults:
        """Return `base` (default: no faults) with the fields in `data` replaced.

        Raises:
            ValueError: for an unknown field, or a value of the wrong type or out of range.
        """
        values: dict[str, Any] = {}
        for name, value in data.items():
            if name not in {f.name for f in fields(cls)}:
                raise ValueError(f"unknown fault field {name!r}")
            kind = int if name in ("retry_after", "seed") else float
            try:
                values[name] = None if name == "seed" and value is None else kind(value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{name}={value!r}: {e}") from e
        return replace(base or cls(), **values)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Faults:
        """Read INVOICE_SANDBOX_<FIELD> variables, e.g. INVOICE_SANDBOX_ERROR_502=0.1.

        Raises:
            ValueError: as `from_dict`.
        """
        names = (f.name for f in fields(cls))
        return cls.from_dict({n: v for n in names if (v := environ.get(ENV_PREFIX + n.upper()))})

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict."""
        return asdict(self)


def _foreign_id(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    # Older clients send an integer foreign_id.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _decimal(value: Any) -> Decimal | None:
    if isinstance(value, Decimal | int) and not isinstance(value, bool):
        return Decimal(value)
    return Decimal(value) if isinstance(value, str) and _NUMBER.fullmatch(value) else None


def _is_public_https(url: Any) -> bool:
    match = _HTTPS_URL.fullmatch(url) if isinstance(url, str) else None
    host = match[1].lower() if match else ""
    return len(host) <= 253 and not host.endswith(".localhost") and bool(_DOMAIN.fullmatch(host))


def _check(name: str, value: Any, currency: Any, min_amount: Decimal) -> tuple[str, Any]:
    """Return ("", clean value) or (message template, None) for a present value of a field."""
    if name == "timer":
        # Laravel's boolean rule (the provider's) also takes 0, 1, "0" and "1".
        if type(value) in (bool, int, str) and value in (True, False, "0", "1"):
            return "", value in (True, "1")
        return "The :attribute field must be true or false.", None
    if name in _MAX_LENGTH:
        if not isinstance(value, str):
            return "The :attribute must be a string.", None
        if len(value) > (limit := _MAX_LENGTH[name]):
            return f"The :attribute may not be greater than {limit} characters.", None
        if name == "foreign_id" and _EMAIL_INSIDE.search(value):  # no personal data allowed
            return "The :attribute format is invalid.", None
    if name == "amount":
        if (amount := _decimal(value)) is None:
            return "The :attribute must be a number.", None
        if amount > _MAX_AMOUNT:
            return f"The :attribute may not be greater than {_MAX_AMOUNT}.", None
        if (amount := amount.quantize(_Q8)) <= 0:
            return "The :attribute must be greater than 0.", None
        if amount * _EUR_RATES.get(currency, _ONE) < min_amount:
            return f"The amount is too small. The minimum amount is {min_amount:.2f} EUR.", None
        return "", amount
    if name == "type" and value not in ("fill_or_kill", "good_until_expired"):
        return "The selected :attribute is invalid.", None
    if "currency" in name and not (isinstance(value, str) and _TICKER.fullmatch(value)):
        return "The selected :attribute is invalid.", None
    if name.startswith("url_") and not _is_public_https(value):
        return "The :attribute format is invalid.", None
    if name == "email_user" and not (isinstance(value, str) and _EMAIL.fullmatch(value)):
        return "The :attribute must be a valid email address.", None
    return "", value


def _validate(
    body: Mapping[str, Any], min_amount: Decimal
) -> tuple[dict[str, str], dict[str, Any]]:
    """Check a create body like the provider: (message of every failing field, clean values)."""
    errors: dict[str, str] = {}
    clean: dict[str, Any] = {}
    for name in _FIELDS:
        value = body.get(name)
        value = (_foreign_id(value) or value) if name == "foreign_id" else value
        if value is None or (isinstance(value, str) and not value.strip()):  # Laravel: blank=null
            message = "The :attribute field is required." if name in _REQUIRED else ""
        else:
            message, clean[name] = _check(name, value, clean.get("currency"), min_amount)
        if message:
            errors[name] = message.replace(":attribute", name.replace("_", " "))
    return errors, clean


def _reject(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _parse_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body, parse_float=Decimal, parse_constant=_reject)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _view(invoice: dict[str, Any]) -> dict[str, Any]:
    release_at = invoice["release_at"]
    live = release_at is not None and invoice["status"] in _OPEN
    return {**invoice, "seconds_left": max(0, int(release_at - time.time())) if live else None}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # else Nagle + delayed ACK stall every response ~40 ms
    server: Sandbox

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: a log line per request would cost more than the request."""

    def do_GET(self) -> None:
        length = self.headers.get("Content-Length", "0")
        if not length.isdecimal() or int(length) > 1 << 20 or "Transfer-Encoding" in self.headers:
            self.close_connection = True  # the stream can no longer be framed
            self._send(400, _BAD_FORMAT)
            return
        body, path = self.rfile.read(int(length)), self.path.partition("?")[0]
        cancel = _CANCEL.fullmatch(path)
        if self.command == "GET" and path == "/api/v2/ping":
            self._send(200, b"OK", "text/plain")
        elif self.command == "POST" and (path == "/api/v2/invoices/create" or cancel):
            self._api(body, unquote(cancel[1]) if cancel else None)
        elif self.server.admin and path.startswith("/_sandbox/"):
            self._admin(path.removeprefix("/_sandbox"), body)
        else:
            self._send(403, _NO_KEY)  # the real API answers unknown URLs so

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _send(
        self, status: int | None, body: bytes = b"", ctype: str = "", extra: str = ""
    ) -> None:
        """Answer in one write (one packet), or drop the connection if status is None."""
        if not (self.server.admin and self.path.startswith("/_sandbox/")):
            with self.server._lock:
                self.server._state.responses["dropped" if status is None else str(status)] += 1
        if status is None:
            self.close_connection = True
            return
        head = f"HTTP/1.1 {status} {self.responses[status][0]}\r\n{extra}"
        head += f"Content-Type: {ctype or 'application/json'}\r\nContent-Length: {len(body)}\r\n"
        close = "Connection: close\r\n" if self.close_connection else ""
        self.wfile.write(f"{head}{close}\r\n".encode("latin-1") + body)

    def _fault(self, outcome: str, faults: Faults) -> None:
        status, ctype, body = _FAULT_REPLIES[outcome]
        retry_after = f"Retry-After: {faults.retry_after}\r\n" if outcome == "429" else ""
        self._send(status, body, ctype, retry_after)

    def _api(self, body: bytes, cancel_id: str | None) -> None:
        server, headers = self.server, self.headers
        key, signature = headers.get("X-Processing-Key"), headers.get("X-Processing-Signature")
        if not key or not signature:
            self._send(403, _NO_SIGNATURE if key else _NO_KEY)
            return
        if not hmac.compare_digest(key.encode(), server.key.encode()):
            self._send(403, _BAD_KEY)
            return
        expected = hmac.new(server._secret, body, hashlib.sha512).hexdigest()
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            self._send(403, _BAD_SIGNATURE)
            return
        json_type = headers.get_content_type() == "application/json"
        payload = _parse_object(body) if json_type else None
        outcome, delay, faults = server._plan(payload, create=cancel_id is None)
        delay += faults.stall_seconds if outcome == "timeout" else 0.0
        if delay and server._stopping.wait(delay):
            self._send(None)  # stopping: end stalls at once
        elif outcome in _FAULT_REPLIES:
            self._fault(outcome, faults)
        else:
            if payload is None:
                status, reply = 400, _BAD_FORMAT
            elif cancel_id is None:
                status, reply = server._create(payload)
            else:
                status, reply = server._cancel(cancel_id)
            if outcome == "commit_then_drop":
                self._send(None)
            elif outcome == "commit_then_502":
                self._fault("502", faults)
            else:
                self._send(status, reply)

    def _admin(self, path: str, body: bytes) -> None:
        server, route = self.server, f"{self.command} {path}"
        try:
            data = json.loads(body or b"{}")
            if route == "PUT /faults":
                server.set_faults(Faults.from_dict(data, base=server.faults))
            elif route == "POST /script":
                server.script(list(data["outcomes"]), data.get("foreign_id"))
            elif route == "POST /reset":
                server.reset()
            elif route not in ("GET /invoices", "GET /faults", "GET /stats"):
                self._send(404, _error(f"No sandbox endpoint {route}", "not_found"))
                return
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            self._send(400, _error(f"{type(e).__name__}: {e}", "bad_request"))
            return
        views: dict[str, Any] = {
            "/invoices": lambda: {"invoices": server.invoices(), "create_calls": server._counts()},
            "/faults": lambda: server.faults.to_dict(),
            "/stats": server.stats,
        }
        self._send(200, _json(views.get(path, lambda: {"ok": True})()))


@dataclass
class _State:
    """Everything reset() forgets; guarded by Sandbox._lock."""

    faults: Faults = field(default_factory=Faults)
    rng: random.Random = field(default_factory=random.Random)
    invoices: dict[str, dict[str, Any]] = field(default_factory=dict)
    cancelled: set[str] = field(default_factory=set)
    calls: Counter[str] = field(default_factory=Counter)  # create calls by foreign_id
    per_second: Counter[int] = field(default_factory=Counter)  # create calls by unix second
    responses: Counter[str] = field(default_factory=Counter)  # by status code, or "dropped"
    scripts: dict[str | None, deque[str]] = field(default_factory=dict)  # None: any foreign_id


class Sandbox(ThreadingHTTPServer):
    """The fake provider API, listening from construction on host:port (0 picks a free port).

    `with Sandbox(key, secret) as sandbox:` serves from a daemon thread and stops on exit.
    """

    daemon_threads = True
    request_queue_size = 128  # benchmarks open many connections at once

    def __init__(
        self,
        key: str,
        secret: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Faults | None = None,
        admin: bool = True,
        min_amount: Decimal = Decimal(0),
        invoice_host: str = "invoices.sandbox.cryptoprocessing.com",
    ) -> None:
        super().__init__((host, port), _Handler)
        self.key, self.admin, self.min_amount = key, admin, min_amount
        self.invoice_host, self.port, self._host = invoice_host, self.server_port, host
        self._secret = secret.encode()
        self._lock = threading.Lock()  # the one lock, around _state, _next_id and _conns
        self._state = _State()
        self._ids = random.Random()  # apart from the fault draws, so a seed replays exactly
        self._next_id = 100_000  # survives reset(), so ids stay unique
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._serving = self._closed = False
        self.set_faults(faults or Faults())

    @property
    def url(self) -> str:
        """The API base, e.g. http://127.0.0.1:8080/api/v2."""
        return f"http://{self._host}:{self.port}/api/v2"

    @property
    def admin_url(self) -> str:
        """The admin API base, e.g. http://127.0.0.1:8080/_sandbox."""
        return f"http://{self._host}:{self.port}/_sandbox"

    @property
    def faults(self) -> Faults:
        """A copy of the fault settings in force."""
        return replace(self._state.faults)

    def start(self) -> Sandbox:
        """Serve from a daemon thread; return self."""
        if self._thread is None:
            self._serving = True  # before the thread runs, so an early stop() still waits for it
            self._thread = threading.Thread(target=self.serve_forever, daemon=True)
            self._thread.start()
        return self

    def serve_forever(self, poll_interval: float = 0.01) -> None:
        """Serve in this thread until stop() (from another thread) or KeyboardInterrupt.

        stop() waits up to `poll_interval` for the accept loop: short, so test teardown is quick.
        """
        self._serving = True
        super().serve_forever(poll_interval)

    def stop(self) -> None:
        """Stop serving, end stalls and close open connections at once; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if self._serving:
            self.shutdown()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # idle keep-alive connections would outlive the server
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def set_faults(self, faults: Faults) -> None:
        """Replace the fault settings; random draws restart from `faults.seed`."""
        with self._lock:
            self._state.faults, self._state.rng = replace(faults), random.Random(faults.seed)

    def script(self, outcomes: list[str], foreign_id: str | None = None) -> None:
        """Queue outcomes for the next create calls of `foreign_id`, or of any call if None.

        Raises:
            ValueError: if an outcome is not one of OUTCOMES.
        """
        if unknown := set(outcomes) - OUTCOMES:
            raise ValueError(f"unknown outcomes {sorted(unknown)}, expected {sorted(OUTCOMES)}")
        key = None if foreign_id is None else str(foreign_id)
        with self._lock:
            self._state.scripts.setdefault(key, deque()).extend(outcomes)

    def invoices(self) -> list[dict[str, Any]]:
        """Every invoice, oldest first, as the API shows it plus a `cancelled` flag."""
        with self._lock:
            state = self._state
            return [
                {**_view(v), "cancelled": k in state.cancelled} for k, v in state.invoices.items()
            ]

    def create_calls(self, foreign_id: str) -> int:
        """How many authenticated create calls named `foreign_id`, whatever their outcome."""
        with self._lock:
            return self._state.calls[foreign_id]

    def stats(self) -> dict[str, Any]:
        """Create calls (total, per unix second) and API responses by status code or "dropped"."""
        with self._lock:
            per_second = {str(second): n for second, n in self._state.per_second.items()}
            responses = dict(self._state.responses)
        return {
            "create_calls": sum(per_second.values()),
            "responses": responses,
            "per_second": per_second,
        }

    def reset(self) -> None:
        """Forget invoices, counters, scripts and faults."""
        with self._lock:
            self._state = _State()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # clients giving up are the point here
            super().handle_error(request, client_address)

    def _counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._state.calls)

    def _plan(self, payload: dict[str, Any] | None, *, create: bool) -> tuple[str, float, Faults]:
        """Count a call; return its outcome, its latency in seconds and the faults in force."""
        foreign_id = _foreign_id(payload.get("foreign_id")) if payload else None
        with self._lock:
            state, scripted = self._state, None
            faults, draw = state.faults, state.rng.random()
            jitter = state.rng.uniform(0, faults.jitter_ms) if faults.jitter_ms else 0.0
            if create:
                state.per_second[int(time.time())] += 1
                if foreign_id is not None:
                    state.calls[foreign_id] += 1
                queue = state.scripts.get(foreign_id) or state.scripts.get(None)
                scripted = queue.popleft() if queue else None
        delay, edge = (faults.latency_ms + jitter) / 1000, 0.0
        if scripted is not None:
            return scripted, delay, faults
        for rate, outcome in _RATED.items():
            edge += getattr(faults, rate)
            if draw < edge:
                return outcome, delay, faults
        return "ok", delay, faults

    def _create(self, payload: dict[str, Any]) -> tuple[int, bytes]:
        errors, clean = _validate(payload, self.min_amount)
        now = int(time.time())
        with self._lock:
            if clean.get("foreign_id") in self._state.invoices:
                errors["foreign_id"] = "The foreign id has already been taken."
            if errors:
                return 400, _json({"errors": errors})
            foreign_id, code = clean["foreign_id"], "".join(self._ids.choices(_BASE62, k=6))
            timer, amount, currency = clean["timer"], clean["amount"], clean["currency"]
            sender = clean.get("sender_currency") or currency
            rate = _EUR_RATES.get(currency, _ONE) / _EUR_RATES.get(sender, _ONE)
            self._state.invoices[foreign_id] = invoice = {
                "id": self._next_id,
                "url": f"https://{self.invoice_host}/invoice/{code}",
                "foreign_id": foreign_id,
                "address": "3" + "".join(self._ids.choices(_BASE58, k=33)),
                "title": clean["title"],
                "status": "pending" if timer else "created",
                "currency": currency,
                "amount": f"{amount:f}",
                "sender_currency": sender,
                "sender_amount": f"{(amount * rate).quantize(_Q8):f}",
                "fixed_at": now,
                "release_at": now + _TIMER_SECONDS if timer else None,
                "seconds_left": None,
            }
            self._next_id += 1
            view = _view(invoice)
        return 200, _json({"data": view})

    def _cancel(self, foreign_id: str) -> tuple[int, bytes]:
        with self._lock:
            if (invoice := self._state.invoices.get(foreign_id)) is None:
                return 404, _NOT_FOUND
            if invoice["status"] not in _OPEN:
                return 400, _BAD_STATE  # the provider does not document this status code
            invoice["status"] = "failed"
            self._state.cancelled.add(foreign_id)
            view = _view(invoice)
        return 200, _json({"data": view})


def _amount_arg(text: str) -> Decimal:
    if (amount := _decimal(text)) is None or amount < 0:
        raise argparse.ArgumentTypeError(f"not an amount: {text!r}")
    return amount


def add_sandbox_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the sandbox's options; fault flags left unset fall back to INVOICE_SANDBOX_* values."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (%(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port (%(default)s)")
    parser.add_argument("--key", help="API key (default: $INVOICE_API_KEY, else generated)")
    parser.add_argument("--secret", help="API secret (default: $INVOICE_API_SECRET, else made up)")
    parser.add_argument(
        "--min-amount", type=_amount_arg, default=Decimal(0), metavar="EUR", help="smallest invoice"
    )
    parser.add_argument("--no-admin", dest="admin", action="store_false", help="hide /_sandbox")
    for f in fields(Faults):
        kind = int if f.name in ("retry_after", "seed") else float
        text = f"default: ${ENV_PREFIX}{f.name.upper()}, else {f.default}"
        flag = f"--{f.name.replace('_', '-')}"
        parser.add_argument(flag, dest=f"fault_{f.name}", type=kind, metavar="N", help=text)


def run_sandbox(args: argparse.Namespace) -> int:
    """Serve a sandbox set up by `add_sandbox_arguments` options until SIGINT or SIGTERM.

    Returns:
        0 after a clean shutdown; 2 for bad fault settings or an address that cannot be bound.
    """
    flags = {f.name: getattr(args, f"fault_{f.name}") for f in fields(Faults)}
    key = args.key or os.environ.get("INVOICE_API_KEY") or f"sandbox-{secrets.token_hex(8)}"
    given_secret = args.secret or os.environ.get("INVOICE_API_SECRET")
    secret = given_secret or secrets.token_urlsafe(32)
    options = {"host": args.host, "port": args.port, "admin": args.admin}
    try:
        faults = Faults.from_env(os.environ)
        faults = Faults.from_dict({k: v for k, v in flags.items() if v is not None}, base=faults)
        sandbox = Sandbox(key, secret, faults=faults, min_amount=args.min_amount, **options)
    except (ValueError, OSError) as e:
        print(f"sandbox: {e}", file=sys.stderr)
        return 2
    print(f"sandbox provider API at {sandbox.url}\nkey: {key}", flush=True)
    if not given_secret:  # made up here, so showing it once is the only way to configure a worker
        print(f"secret: {secret}", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM as KeyboardInterrupt
    with contextlib.suppress(KeyboardInterrupt):
        sandbox.serve_forever()
    sandbox.stop()
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(
        "python -m invoice_worker.sandbox",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_sandbox_arguments(_parser)
    raise SystemExit(run_sandbox(_parser.parse_args()))
