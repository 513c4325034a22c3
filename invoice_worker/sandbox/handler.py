"""The sandbox's wire: routing, the provider's auth checks, and each outcome played on the socket.

The `Sandbox` server holds the state (invoices, scripts, fault draws, counters); this handler
parses a request, asks the server for the call's outcome, and writes what that outcome calls for:
the real answer, a fault reply, a dropped connection, a hostile or huge 200, or a trickle.
Invoice pages are answered by `pages`, the admin API by `admin`.
"""

from __future__ import annotations

import json
import re
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from invoice_worker.sandbox import admin, pages
from invoice_worker.sandbox.bodies import (
    BAD_FORMAT,
    BAD_KEY,
    BAD_SIGNATURE,
    NO_KEY,
    NO_SIGNATURE,
    json_bytes,
)
from invoice_worker.sandbox.faults import HOSTILE, REPLIES, Faults, hostile
from invoice_worker.sandbox.rules import parse_body

if TYPE_CHECKING:
    from invoice_worker.sandbox.server import Sandbox

_CANCEL = re.compile(r"/api/v2/invoices/([^/]+)/cancel/?")
_PAGE = re.compile(r"/invoice/([^/]+)/?")
_PAD = b"x" * (1 << 20)  # the padding of a huge answer, written this much at a time


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # else Nagle + delayed ACK stall every response ~40 ms
    server: Sandbox

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: a log line per request would cost more than the request."""

    def do_GET(self) -> None:
        length = self.headers.get("Content-Length", "0")
        if not length.isdecimal() or int(length) > 1 << 20 or "Transfer-Encoding" in self.headers:
            self.close_connection = True  # the stream can no longer be framed
            self._send(400, BAD_FORMAT)
            return
        body, path = self.rfile.read(int(length)), self.path.partition("?")[0]
        cancel, page = _CANCEL.fullmatch(path), _PAGE.fullmatch(path)
        if self.command == "GET" and path == "/api/v2/ping":
            self._send(200, b"OK", "text/plain")
        elif self.command == "POST" and (path == "/api/v2/invoices/create" or cancel):
            self._api(body, unquote(cancel[1]) if cancel else None)
        elif page:
            reply = pages.serve(self.server, self.command, unquote(page[1]), body)
            self._send(reply.status, reply.body, reply.ctype, reply.headers)
        elif self.server.admin and path.startswith("/_sandbox/"):
            self._send(*admin.answer(self.server, self.command, path[len("/_sandbox") :], body))
        else:
            self._send(403, NO_KEY)  # the real API answers unknown URLs so

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _send(
        self, status: int | None, body: bytes = b"", ctype: str = "", extra: str = ""
    ) -> None:
        """Answer in one write (one packet), or drop the connection if status is None."""
        if status is None:
            self._count("dropped")
            self.close_connection = True
            return
        self.wfile.write(self._head(status, len(body), ctype, extra) + body)

    def _head(self, status: int, length: int, ctype: str = "", extra: str = "") -> bytes:
        """Count an answer and return its status line and headers."""
        self._count(str(status))
        head = f"HTTP/1.1 {status} {self.responses[status][0]}\r\n{extra}"
        head += f"Content-Type: {ctype or 'application/json'}\r\nContent-Length: {length}\r\n"
        close = "Connection: close\r\n" if self.close_connection else ""
        return f"{head}{close}\r\n".encode("latin-1")

    def _count(self, response: str) -> None:
        """Count the API's answers only (not the admin API's, not the pages')."""
        admin_call = self.server.admin and self.path.startswith("/_sandbox/")
        if not (admin_call or _PAGE.fullmatch(self.path.partition("?")[0])):
            self.server.count(response=response)

    def _fault(self, outcome: str, faults: Faults) -> None:
        status, ctype, body = REPLIES[outcome]
        retry_after = f"Retry-After: {faults.retry_after}\r\n" if outcome == "429" else ""
        self._send(status, body, ctype, retry_after)

    def _api(self, body: bytes, cancel_id: str | None) -> None:
        server, headers = self.server, self.headers
        key, signature = headers.get("X-Processing-Key"), headers.get("X-Processing-Signature")
        if not key or not signature:
            self._send(403, NO_SIGNATURE if key else NO_KEY)
            return
        if not server.key_ok(key):
            self._send(403, BAD_KEY)
            return
        if not server.signature_ok(body, signature):
            self._send(403, BAD_SIGNATURE)
            return
        json_type = headers.get_content_type() == "application/json"
        payload = parse_body(body) if json_type else None
        outcome, delay, faults = server.plan(payload, create=cancel_id is None)
        delay += faults.stall_seconds if outcome == "timeout" else 0.0
        if delay and server.pause(delay):
            self._send(None)  # stopping: end stalls at once
        elif outcome in REPLIES:
            server.count(outcome=outcome)
            self._fault(outcome, faults)
        elif payload is None:
            self._send(400, BAD_FORMAT)
        elif cancel_id is None:
            self._answer(outcome, faults, *server.create_invoice(payload))
        else:
            self._answer(outcome, faults, *server.cancel_invoice(cancel_id))

    def _answer(self, outcome: str, faults: Faults, status: int, reply: bytes) -> None:
        """Answer a processed call as `outcome` says."""
        if outcome.startswith("answer_") and status != 200:
            outcome = "ok"  # a refused call (e.g. a duplicate foreign_id) gets its real answer
        if outcome != "ok":
            self.server.count(outcome=outcome)
        match outcome:
            case "ok" | "timeout":  # a timeout's stall is over by now
                self._send(status, reply)
            case "commit_then_drop":
                self._send(None)
            case "commit_then_502":
                self._fault("502", faults)
            case "answer_huge":
                self._huge(reply, faults.huge_bytes)
            case "trickle":
                self._trickle(self._head(status, len(reply)) + reply, faults.trickle_seconds)
            case _ if outcome in HOSTILE:
                data = json.loads(reply)["data"]
                other = self.server.other_invoice(data["foreign_id"])
                self._send(200, json_bytes({"data": hostile(outcome, data, other)}))
            case _:
                raise ValueError(f"outcome {outcome!r} has no answer")

    def _huge(self, reply: bytes, size: int) -> None:
        """The real 200 answer, padded with a JSON string to `size` bytes, streamed."""
        head, tail = reply[:-1] + b',"padding":"', b'"}'
        pad = max(0, size - len(head) - len(tail))
        self.wfile.write(self._head(200, len(head) + pad + len(tail)) + head)
        while pad:
            chunk = _PAD[: min(pad, len(_PAD))]
            self.wfile.write(chunk)
            pad -= len(chunk)
        self.wfile.write(tail)

    def _trickle(self, answer: bytes, interval: float) -> None:
        """Write `answer` one byte at a time, `interval` apart; drop it if the server stops."""
        for index in range(len(answer)):
            if self.server.pause(interval):
                self.close_connection = True
                return
            self.wfile.write(answer[index : index + 1])
