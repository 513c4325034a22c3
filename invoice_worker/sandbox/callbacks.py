"""Callback delivery: signed POSTs to the merchant's callback URL, retried like the provider's.

One background thread (`Dispatcher`) owns a queue of callbacks ordered by when each is due. The
first attempt is due when the callback is queued; any answer but 200 (or none) schedules the next
one after `RETRY_MINUTES` (the provider's schedule, relative to the previous attempt), each delay
multiplied by `time_scale`; after the 12th retry the callback is given up. Request handling only
queues (never waits for a receiver); `stop()` ends an attempt in flight at once.

Each callback is signed once, when queued: the body bytes are fixed, and every attempt sends the
same bytes with `X-Processing-Key` and `X-Processing-Signature` (HMAC-SHA512 hex of the body with
the API secret) to the URL set when it was queued. Faults (`faults.Faults.callback_faults`) act
on the first attempt only. Attempts go out one at a time, oldest due first, so the callbacks of
one action arrive in order unless a retry or the out-of-order fault reorders them.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import hmac
import http.client
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from invoice_worker.privacy import redact_url

#: Minutes from one attempt to the next: the provider's 12 retries, about 24 h 21 min in all.
RETRY_MINUTES = (1, 5, 15, 30, 60, 90, 120, 180, 240, 240, 240, 240)
#: The longest wait between two looks at the clock (the timers of invoices expire on it).
TICK_SECONDS = 0.5
_CONNECT_SECONDS = 3.0  # at most, so stop() never waits long for a host that drops packets
_BAD_SECRET = b"not-the-api-secret"  # what a bad_signature copy is signed with
_ERROR_LIMIT = 200


def sign(body: bytes, secret: bytes) -> str:
    """The provider's signature: lowercase hex HMAC-SHA512 of the exact body bytes."""
    return hmac.new(secret, body, hashlib.sha512).hexdigest()


def check_url(url: str) -> str:
    """Return `url` if a callback can be POSTed to it (http or https, a host), else raise.

    The provider insists on https and a domain name; the sandbox also takes plain http and
    loopback addresses, so a test's receiver can listen on 127.0.0.1.

    Raises:
        ValueError: for any other URL.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or not url.isprintable():
        raise ValueError(f"not an http(s) callback URL: {redact_url(url)!r}")
    parts.port  # noqa: B018 - raises ValueError on a malformed port
    return url


@dataclass
class Attempt:
    """One POST of a callback: when, which copy, and what came back."""

    number: int  # 0 the first attempt, 1..12 the retries
    copy: int  # 2 for the second copy of a duplicated first attempt
    at: float  # Unix seconds, when it was sent
    seconds: float  # how long until the answer (or the failure)
    status: int | None  # the receiver's HTTP status, None if there was no answer
    error: str | None  # why there was no answer
    signature_valid: bool


@dataclass
class Callback:
    """One callback and its deliveries; `state` is pending, delivered or failed (gave up)."""

    seq: int
    invoice_id: int
    foreign_id: str
    status: str
    body: bytes
    signature: str
    url: str
    faults: frozenset[str]
    queued_at: float
    state: str = "pending"
    next_at: float | None = None  # Unix seconds of the next attempt, while pending
    attempts: list[Attempt] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form the admin API lists (body as text)."""
        return {
            "seq": self.seq,
            "id": self.invoice_id,
            "foreign_id": self.foreign_id,
            "status": self.status,
            "state": self.state,
            "url": self.url,
            "body": self.body.decode(),
            "signature": self.signature,
            "faults": sorted(self.faults),
            "queued_at": self.queued_at,
            "next_at": self.next_at,
            "attempts": [asdict(attempt) for attempt in self.attempts],
        }


class Dispatcher:
    """Delivers callbacks from one thread; `tick` runs on it at least every TICK_SECONDS."""

    def __init__(self, key: str, secret: bytes, tick: Callable[[], None] = lambda: None) -> None:
        self.key, self._secret, self._tick = key, secret, tick
        self.url: str | None = None
        self.time_scale = 1.0
        self.timeout = 10.0  # seconds for one attempt (connect and answer)
        self._cond = threading.Condition()  # guards everything below
        self._queue: list[tuple[float, int]] = []  # (monotonic due time, seq)
        self._callbacks: dict[int, Callback] = {}
        self._seq = itertools.count(1)
        self._conns: set[http.client.HTTPConnection] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def configure(
        self, url: str | None = None, time_scale: float | None = None, timeout: float | None = None
    ) -> None:
        """Set the callback URL (an empty string turns callbacks off), time scale and timeout.

        Raises:
            ValueError: for a bad URL, a time scale outside 0..1000, a timeout outside 0..600.
        """
        if time_scale is not None and not 0 <= time_scale <= 1000:
            raise ValueError(f"time_scale out of range: {time_scale!r}")
        if timeout is not None and not 0 < timeout <= 600:
            raise ValueError(f"timeout out of range: {timeout!r}")
        checked = check_url(url) if url else None
        with self._cond:
            self.url = checked if url is not None else self.url
            self.time_scale = self.time_scale if time_scale is None else float(time_scale)
            self.timeout = self.timeout if timeout is None else float(timeout)

    def settings(self) -> dict[str, Any]:
        with self._cond:
            return {"url": self.url, "time_scale": self.time_scale, "timeout": self.timeout}

    def start(self) -> None:
        with self._cond:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._run, name="callbacks", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        """Stop delivering: end an attempt in flight at once; pending callbacks stay pending."""
        with self._cond:
            self._stopping = True
            conns, thread = list(self._conns), self._thread
            self._cond.notify_all()
        for conn in conns:
            _abort(conn)
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def enqueue(self, items: Iterable[tuple[dict[str, Any], bytes, frozenset[str]]]) -> int:
        """Queue callbacks, due now, in the order given: (body as a dict, body bytes, faults).

        Does nothing without a callback URL (the provider sends nothing then). Returns how
        many were queued.
        """
        now, wall = time.monotonic(), time.time()
        with self._cond:
            if self.url is None:
                return 0
            count = 0
            for data, body, faults in items:
                seq = next(self._seq)
                self._callbacks[seq] = Callback(
                    seq, data["id"], data["foreign_id"], data["status"], body,
                    sign(body, self._secret), self.url, faults, wall, next_at=wall,
                )  # fmt: skip
                heapq.heappush(self._queue, (now, seq))
                count += 1
            self._cond.notify_all()
            return count

    def callbacks(self) -> list[dict[str, Any]]:
        """Every callback queued since the last reset, oldest first, with its attempts."""
        with self._cond:
            return [c.to_dict() for c in self._callbacks.values()]

    def reset(self) -> None:
        """Forget every callback, delivered or not (an attempt in flight is not recorded)."""
        with self._cond:
            self._callbacks.clear()
            self._queue.clear()

    def _run(self) -> None:
        while True:
            self._tick()
            with self._cond:
                if self._stopping:
                    return
                callback = self._due()
                if callback is None:
                    wait = self._queue[0][0] - time.monotonic() if self._queue else TICK_SECONDS
                    self._cond.wait(min(max(wait, 0.0), TICK_SECONDS))
                    continue
                number = len({a.number for a in callback.attempts})
                url, timeout = callback.url, self.timeout
            accepted = self._attempt(callback, number, url, timeout)
            self._settle(callback, number, accepted)

    def _due(self) -> Callback | None:
        """Pop the callback due first if its time has come (called under the lock)."""
        while self._queue and self._queue[0][0] <= time.monotonic():
            _, seq = heapq.heappop(self._queue)
            if (callback := self._callbacks.get(seq)) is not None:  # None: reset since
                return callback
        return None

    def _attempt(self, callback: Callback, number: int, url: str, timeout: float) -> bool:
        """Send one attempt (two copies when duplicated); True if any copy got a 200."""
        first = number == 0
        faults = callback.faults if first else frozenset()
        bad = "bad_signature" in faults
        signature = sign(callback.body, _BAD_SECRET) if bad else callback.signature
        if "concurrent" in faults:
            barrier = threading.Barrier(2)
            results: list[Attempt] = []

            def second() -> None:
                results.append(self._post(callback, number, 2, url, timeout, signature, barrier))

            helper = threading.Thread(target=second, name="callbacks-copy", daemon=True)
            helper.start()
            own = self._post(callback, number, 1, url, timeout, signature, barrier)
            helper.join()
            attempts = [own, *results]
        else:
            attempts = [self._post(callback, number, 1, url, timeout, signature)]
            if "duplicate" in faults:
                attempts.append(self._post(callback, number, 2, url, timeout, signature))
        with self._cond:
            callback.attempts.extend(attempts)
        return any(a.status == 200 for a in attempts)

    def _settle(self, callback: Callback, number: int, accepted: bool) -> None:
        with self._cond:
            if self._callbacks.get(callback.seq) is not callback:
                return  # reset while in flight
            if accepted or number >= len(RETRY_MINUTES):
                callback.state, callback.next_at = ("delivered" if accepted else "failed"), None
                return
            delay = RETRY_MINUTES[number] * 60 * self.time_scale
            callback.next_at = time.time() + delay
            heapq.heappush(self._queue, (time.monotonic() + delay, callback.seq))

    def _post(
        self,
        callback: Callback,
        number: int,
        copy: int,
        url: str,
        timeout: float,
        signature: str,
        barrier: threading.Barrier | None = None,
    ) -> Attempt:
        parts = urlsplit(url)
        https = parts.scheme == "https"
        kind = http.client.HTTPSConnection if https else http.client.HTTPConnection
        # The port always given: http.client would read the last group of an IPv6 host as one.
        port = parts.port or (443 if https else 80)
        conn = kind(parts.hostname or "", port, timeout=min(timeout, _CONNECT_SECONDS))
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {
            "Content-Type": "application/json",
            "X-Processing-Key": self.key,
            "X-Processing-Signature": signature,
        }
        status, error = None, None
        at, started = time.time(), time.monotonic()
        try:
            conn.connect()
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            with self._cond:  # registered once connected, so stop() can shut its socket
                if self._stopping:
                    raise ConnectionAbortedError("the sandbox is stopping")
                self._conns.add(conn)
            if barrier is not None:  # both copies connected: send them at once
                with contextlib.suppress(threading.BrokenBarrierError):
                    barrier.wait(_CONNECT_SECONDS)
            at, started = time.time(), time.monotonic()
            conn.request("POST", path, body=callback.body, headers=headers)
            response = conn.getresponse()
            response.read(1 << 16)  # the answer's body does not matter, only its status
            status = response.status
        except (OSError, ValueError, http.client.HTTPException) as e:  # ValueError: a bad header
            error = f"{type(e).__name__}: {e}"[:_ERROR_LIMIT]
        finally:
            conn.close()
            with self._cond:
                self._conns.discard(conn)
        if barrier is not None:
            barrier.abort()  # a copy that failed to connect must not hold the other one
        valid = hmac.compare_digest(signature, callback.signature)
        return Attempt(number, copy, at, time.monotonic() - started, status, error, valid)


def _abort(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
