"""A local stand-in for the CoinsPaid / CryptoProcessing merchant API v2 (tests, dev, benchmarks).

It speaks the real wire format (HMAC-SHA512 signed bodies, the provider's 400/403 bodies and
Laravel-style field messages from `rules`) and gives every create or cancel call one of
the outcomes in `faults`: from a script queue (the call's foreign_id first, then the global
queue), else from one random draw against the `Faults` rates. Each invoice has a page on the
sandbox itself (its `url`, see `pages`) whose buttons pay it (`payments`); status changes send
signed callbacks (`callbacks`). Unauthenticated admin API for loopback use, see `admin`. The wire
side (routing, auth, how each outcome is written) is `handler`'s.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import random
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import replace
from decimal import Decimal
from http.server import ThreadingHTTPServer
from typing import Any

from invoice_worker.sandbox import payments
from invoice_worker.sandbox.bodies import BAD_STATE, NOT_FOUND, json_bytes
from invoice_worker.sandbox.callbacks import Dispatcher, sign
from invoice_worker.sandbox.faults import OUTCOMES, Faults
from invoice_worker.sandbox.handler import Handler
from invoice_worker.sandbox.ledger import OPEN, Ledger, view
from invoice_worker.sandbox.payments import Payment
from invoice_worker.sandbox.rules import foreign_id_of, sender_amount, validate

_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _origin(host: str, port: int) -> str:
    """http://host:port of a bound address; a wildcard address is reached on loopback."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host}:{port}"
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    return f"http://[{address}]:{port}" if address.version == 6 else f"http://{address}:{port}"


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
        callback_url: str | None = None,
        callback_time_scale: float = 1.0,
        timer_seconds: int = payments.TIMER_SECONDS,
    ) -> None:
        """Bind host:port; `callback_url` and `callback_time_scale` as `set_callbacks`.

        Raises:
            ValueError: for a bad callback URL or time scale, or `timer_seconds` below 1.
            OSError: if the address cannot be bound.
        """
        if timer_seconds < 1:
            raise ValueError(f"timer_seconds must be at least 1: {timer_seconds!r}")
        super().__init__((host, port), Handler)
        self.key, self.admin, self.min_amount = key, admin, min_amount
        self.port, self._host, self.timer_seconds = self.server_port, host, timer_seconds
        self.origin = _origin(host, self.server_port)  # where the invoice pages are
        self._secret = secret.encode()
        self._lock = threading.Lock()  # the one lock, around _state, the ids and _conns
        self._state = Ledger()
        self._ids = random.Random()  # apart from the fault draws, so a seed replays exactly
        self._next_id = 100_000  # survives reset(), so ids stay unique
        self._next_tx = 700_000  # transaction ids, likewise
        self._conns: set[socket.socket] = set()
        self.dispatcher = Dispatcher(key, self._secret, tick=self.expire_due)
        try:
            self.dispatcher.configure(callback_url or "", callback_time_scale)
        except ValueError:
            self.server_close()
            raise
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
        self.dispatcher.start()
        super().serve_forever(poll_interval)

    def stop(self) -> None:
        """Stop serving, end stalls and close open connections at once; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        self.dispatcher.stop()
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
            self._state.set_faults(replace(faults))

    def set_callbacks(
        self, url: str | None = None, time_scale: float | None = None, timeout: float | None = None
    ) -> None:
        """Set where callbacks go ("" for nowhere), their retry time scale and attempt timeout.

        A time scale of 0.001 turns the provider's ~24 h of retries into ~88 s.

        Raises:
            ValueError: as `callbacks.Dispatcher.configure`.
        """
        self.dispatcher.configure(url, time_scale, timeout)

    def callback_settings(self) -> dict[str, Any]:
        """Where callbacks go (`url`, None for nowhere), `time_scale` and `timeout`."""
        return self.dispatcher.settings()

    def callbacks(self) -> list[dict[str, Any]]:
        """Every callback queued since the last reset, oldest first, with its attempts."""
        return self.dispatcher.callbacks()

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
                {**view(v), "cancelled": k in state.cancelled} for k, v in state.invoices.items()
            ]

    def create_calls(self, foreign_id: str) -> int:
        """How many authenticated create calls named `foreign_id`, whatever their outcome."""
        with self._lock:
            return self._state.calls[foreign_id]

    def stats(self) -> dict[str, Any]:
        """Create calls (total, per unix second), API responses by status code or "dropped",
        and the fault outcomes played, by name (an answer_* outcome plays only on a 200)."""
        with self._lock:
            per_second = {str(second): n for second, n in self._state.per_second.items()}
            responses, outcomes = dict(self._state.responses), dict(self._state.outcomes)
        return {
            "create_calls": sum(per_second.values()),
            "responses": responses,
            "outcomes": outcomes,
            "per_second": per_second,
        }

    def reset(self) -> None:
        """Forget invoices, counters, scripts, faults and callbacks (not where they go)."""
        with self._lock:
            self._state = Ledger()
            self.dispatcher.reset()

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

    def create_call_counts(self) -> dict[str, int]:
        """Authenticated create calls by foreign_id."""
        with self._lock:
            return dict(self._state.calls)

    # The handler's side: each API call is checked, planned, processed and counted through these.

    def key_ok(self, key: str) -> bool:
        return hmac.compare_digest(key.encode(), self.key.encode())

    def signature_ok(self, body: bytes, signature: str) -> bool:
        return hmac.compare_digest(signature.encode(), sign(body, self._secret).encode())

    def pause(self, seconds: float) -> bool:
        """Sleep `seconds`; True at once if the server is stopping (the call should be dropped)."""
        return self._stopping.wait(seconds)

    def count(self, *, response: str | None = None, outcome: str | None = None) -> None:
        """Count an API response (status code or "dropped") and/or a fault outcome played."""
        with self._lock:
            if response is not None:
                self._state.responses[response] += 1
            if outcome is not None:
                self._state.outcomes[outcome] += 1

    def other_invoice(self, foreign_id: str) -> dict[str, Any] | None:
        """The newest invoice but `foreign_id`'s, as the API shows it; None if there is none."""
        with self._lock:
            invoices = self._state.invoices
            newest = next((k for k in reversed(invoices) if k != foreign_id), None)
            return None if newest is None else view(invoices[newest])

    def plan(self, payload: dict[str, Any] | None, *, create: bool) -> tuple[str, float, Faults]:
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

    def create_invoice(self, payload: dict[str, Any]) -> tuple[int, bytes]:
        """Process a create body as the provider would, without faults: (status, body)."""
        errors, clean = validate(payload, self.min_amount)
        now = int(time.time())
        with self._lock:
            if clean.get("foreign_id") in self._state.invoices:
                errors["foreign_id"] = "The foreign id has already been taken."
            if errors:
                return 400, json_bytes({"errors": errors})
            foreign_id, code = clean["foreign_id"], self._new_code()
            timer, amount, currency = clean["timer"], clean["amount"], clean["currency"]
            sender = clean.get("sender_currency") or currency
            release_at = now + self.timer_seconds if timer else None
            invoice = {
                "id": self._next_id,
                "url": f"{self.origin}/invoice/{code}",
                "foreign_id": foreign_id,
                "address": payments.deposit_address(self._next_id, foreign_id),
                "title": clean["title"],
                "status": "pending" if timer else "created",
                "currency": currency,
                "amount": f"{amount:f}",
                "sender_currency": sender,
                "sender_amount": f"{sender_amount(amount, currency, sender):f}",
                "fixed_at": now,
                "release_at": release_at,
                "seconds_left": None,
            }
            payment = Payment(
                code, clean.get("description") or "", clean["url_success"], clean["url_failed"],
                address_id=self._next_id + 200_000, expires_at=release_at,
            )  # fmt: skip
            self._state.add(invoice, payment)
            self._next_id += 1
            answer = view(invoice)
        return 200, json_bytes({"data": answer})

    def _new_code(self) -> str:
        """A page code no invoice has (called under the lock)."""
        while (code := "".join(self._ids.choices(_BASE62, k=6))) in self._state.codes:
            pass
        return code

    def cancel_invoice(self, foreign_id: str) -> tuple[int, bytes]:
        """Process a cancel as the provider would, without faults: (status, body)."""
        with self._lock:
            if (invoice := self._state.invoices.get(foreign_id)) is None:
                return 404, NOT_FOUND
            if invoice["status"] not in OPEN:
                return 400, BAD_STATE  # the provider does not document this status code
            self.dispatcher.enqueue(self._state.cancel(foreign_id))
            answer = view(invoice)
        return 200, json_bytes({"data": answer})

    # The payer's side: pages, payments, timers running out.

    def pay(self, key: str, mode: str) -> tuple[dict[str, Any], int]:
        """Play a payer action (`payments.MODES`) on the invoice `key` names.

        `key` is a foreign_id, else an invoice id. Returns the invoice as the
        API shows it and how many callbacks were queued (none without a callback URL).

        Raises:
            KeyError: if no invoice has that key.
            PaymentError: if the action does not apply (see `payments.pay`).
        """
        with self._lock:
            answer, items = self._state.pay(key, mode, self._tx_id)
            return answer, self.dispatcher.enqueue(items)

    def page(self, code: str) -> dict[str, Any] | None:
        """What the invoice page with this code shows (see `ledger.Ledger.page`), or None."""
        with self._lock:
            return self._state.page(code)

    def expire_due(self) -> None:
        """Fail every open invoice whose timer ran out (the callback thread calls this)."""
        with self._lock:
            self.dispatcher.enqueue(self._state.expire_due(int(time.time())))

    def _tx_id(self) -> int:
        self._next_tx += 1
        return self._next_tx
