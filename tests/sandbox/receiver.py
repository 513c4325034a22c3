"""A merchant's callback endpoint for tests: a real HTTP server on loopback that records raw
bodies and headers, and answers what the test tells it (500 for a while, slowly, ...)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Received:
    """One POST as it arrived: the raw body bytes, the headers, when it was read and answered
    (monotonic), and the status answered."""

    path: str
    body: bytes
    headers: dict[str, str]
    started: float
    answered: float
    status: int


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Receiver

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def do_POST(self) -> None:
        started = time.monotonic()
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        status = self.server.decide(body, dict(self.headers))
        if self.server.delay:
            self.server.closing.wait(self.server.delay)
        # Recorded before the answer leaves: the sender acts on the answer, so a request it
        # sends next is always recorded after this one.
        answered = time.monotonic()
        self.server.record(Received(self.path, body, dict(self.headers), started, answered, status))
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


class Receiver(ThreadingHTTPServer):
    """`with Receiver() as receiver:` serves on 127.0.0.1 (a free port, or `port`) until exit.

    Answers 200 unless told otherwise: `answers` are used up first, one per request, then
    `judge(body, headers)` if set (e.g. 403 for a bad signature), then `status`.
    """

    daemon_threads = True

    def __init__(self, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.status = 200
        self.delay = 0.0
        self.answers: deque[int] = deque()
        self.judge: Callable[[bytes, dict[str, str]], int | None] | None = None
        self.closing = threading.Event()  # ends a delay at once
        self.arrived = 0  # requests read, answered or not
        self._cond = threading.Condition()
        self._received: list[Received] = []
        self._thread = threading.Thread(target=self.serve_forever, args=(0.01,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/callbacks"

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.closing.set()
        self.shutdown()
        self.server_close()

    def decide(self, body: bytes, headers: dict[str, str]) -> int:
        with self._cond:
            self.arrived += 1
            self._cond.notify_all()
            if self.answers:
                return self.answers.popleft()
        verdict = self.judge(body, headers) if self.judge else None
        return self.status if verdict is None else verdict

    def record(self, received: Received) -> None:
        with self._cond:
            self._received.append(received)
            self._cond.notify_all()

    @property
    def received(self) -> list[Received]:
        with self._cond:
            return list(self._received)

    def wait_arrived(self, count: int, timeout: float = 5.0) -> None:
        """Wait until `count` requests were read (answered or not)."""
        with self._cond:
            assert self._cond.wait_for(lambda: self.arrived >= count, timeout), self.arrived

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        """The first `count` requests, once they have arrived; AssertionError after `timeout`."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._received) >= count, timeout):
                raise AssertionError(f"{len(self._received)} of {count} callbacks arrived")
            return list(self._received[:count])
