"""A local stand-in for the CoinsPaid / CryptoProcessing merchant API v2 (tests, dev, benchmarks).

It speaks the real wire format (HMAC-SHA512 signed bodies, the provider's 400/403 bodies and
Laravel-style field messages from `rules`) and gives every create or cancel call one of
the outcomes in `faults`: from a script queue (the call's foreign_id first, then the global
queue), else from one random draw against the `Faults` rates. Unauthenticated admin API, for
loopback use: GET /_sandbox/invoices, GET|PUT /_sandbox/faults, POST /_sandbox/script,
GET /_sandbox/stats, POST /_sandbox/reset.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import random
import re
import socket
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from invoice_worker.sandbox.faults import OUTCOMES, REPLIES, Faults
from invoice_worker.sandbox.rules import foreign_id_of, parse_body, sender_amount, validate

_TIMER_SECONDS = 900  # the provider fixes the rate for 15 minutes
_OPEN = ("created", "pending", "processing")  # the states a cancel may leave
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_CANCEL = re.compile(r"/api/v2/invoices/([^/]+)/cancel/?")


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
        status, ctype, body = REPLIES[outcome]
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
        payload = parse_body(body) if json_type else None
        outcome, delay, faults = server._plan(payload, create=cancel_id is None)
        delay += faults.stall_seconds if outcome == "timeout" else 0.0
        if delay and server._stopping.wait(delay):
            self._send(None)  # stopping: end stalls at once
        elif outcome in REPLIES:
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
        foreign_id = foreign_id_of(payload.get("foreign_id")) if payload else None
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
        outcome = faults.outcome(draw) if scripted is None else scripted
        return outcome, (faults.latency_ms + jitter) / 1000, faults

    def _create(self, payload: dict[str, Any]) -> tuple[int, bytes]:
        errors, clean = validate(payload, self.min_amount)
        now = int(time.time())
        with self._lock:
            if clean.get("foreign_id") in self._state.invoices:
                errors["foreign_id"] = "The foreign id has already been taken."
            if errors:
                return 400, _json({"errors": errors})
            foreign_id, code = clean["foreign_id"], "".join(self._ids.choices(_BASE62, k=6))
            timer, amount, currency = clean["timer"], clean["amount"], clean["currency"]
            sender = clean.get("sender_currency") or currency
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
                "sender_amount": f"{sender_amount(amount, currency, sender):f}",
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
