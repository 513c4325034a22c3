"""Test doubles for the provider client's transport: real servers on loopback, and a canned one.

``RawServer`` is a tiny HTTP (or TLS) server on 127.0.0.1 driven by a handler function, for the
answers the sandbox cannot produce: trickled, endless, huge, silent. It counts what it accepted,
received and sent, so a test can prove what reached it. ``CannedAdapter`` is a requests
transport adapter (the analogue of httpx's ``MockTransport``) that a test mounts on a session
and hands to ``ProviderClient(session=...)``: no global patching.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from requests.adapters import BaseAdapter
from urllib3.response import HTTPResponse

LOOPBACK = "127.0.0.1"


class Out:
    """The server side of one connection, as a handler sees it."""

    def __init__(self, server: RawServer, conn: socket.socket) -> None:
        self._server, self.conn = server, conn

    def send(self, data: bytes) -> bool:
        """Send ``data``; False once the client has gone or the server is stopping."""
        if self._server.stopping.is_set():
            return False
        try:
            self.conn.sendall(data)
        except OSError:
            return False
        with self._server.lock:
            self._server.bytes_sent += len(data)
        return True

    def sleep(self, seconds: float) -> bool:
        """Wait; False if the server is stopping meanwhile."""
        return not self._server.stopping.wait(seconds)


#: A handler answers one request; it returns True to keep the connection open for another.
Handler = Callable[[Out, bytes], bool]


class RawServer:
    """A threaded HTTP/1.1 server on 127.0.0.1 whose every answer is ``handler``'s.

    Attributes:
        accepted: connections accepted.
        requests: each complete request received (head and body, raw bytes).
        received: every byte received, requests or not (a TLS server: after the handshake).
        bytes_sent: bytes the kernel took from the handler's ``send`` calls.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        tls: ssl.SSLContext | None = None,
        tls_delay: float = 0.0,
        read_request: bool = True,
    ) -> None:
        self.handler, self.tls, self.tls_delay, self.read_request = (
            handler, tls, tls_delay, read_request
        )  # fmt: skip
        self.listener = socket.create_server((LOOPBACK, 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.accepted = 0
        self.requests: list[bytes] = []
        self.received = 0
        self.bytes_sent = 0
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://{LOOPBACK}:{self.port}/api/v2"

    def __enter__(self) -> RawServer:
        thread = threading.Thread(target=self._accept_loop, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        with self.lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in list(self._threads):
            thread.join(5)
        self.listener.close()

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            if self.tls is not None:
                if self.tls_delay and self.stopping.wait(self.tls_delay):
                    return
                try:
                    conn = self.tls.wrap_socket(conn, server_side=True)  # detaches the raw one
                except OSError:
                    return
                with self.lock:
                    self._conns.append(conn)
            self._exchange(conn)
        finally:
            conn.close()

    def _exchange(self, conn: socket.socket) -> None:
        out = Out(self, conn)
        buffered = b""
        while not self.stopping.is_set():
            if not self.read_request:
                self.handler(out, b"")
                return
            request, buffered = self._read_request(conn, buffered)
            if request is None:
                return
            with self.lock:
                self.requests.append(request)
            if not self.handler(out, request):
                return

    def _read_request(self, conn: socket.socket, data: bytes) -> tuple[bytes | None, bytes]:
        while b"\r\n\r\n" not in data:
            chunk = self._recv(conn)
            if not chunk:
                return None, b""
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            chunk = self._recv(conn)
            if not chunk:
                return None, b""
            rest += chunk
        return head + b"\r\n\r\n" + rest[:length], rest[length:]

    def _recv(self, conn: socket.socket) -> bytes:
        try:
            chunk = conn.recv(65536)
        except OSError:
            return b""
        with self.lock:
            self.received += len(chunk)
        return chunk


def reply(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 answer with Content-Length."""
    reason = {200: "OK", 400: "Bad Request", 500: "Internal Server Error"}.get(status, "X")
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def answer(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> Handler:
    """A handler that answers every request with the same complete reply, keeping alive."""

    def handle(out: Out, request: bytes) -> bool:
        return out.send(reply(status, body, headers))

    return handle


def trickle(head: bytes, body: bytes, interval: float) -> Handler:
    """Send ``head`` at once, then ``body`` one byte per ``interval`` seconds."""

    def handle(out: Out, request: bytes) -> bool:
        if not out.send(head):
            return False
        for i in range(len(body)):
            if not (out.sleep(interval) and out.send(body[i : i + 1])):
                return False
        return False

    return handle


def huge(status: int, size: int, *, chunked: bool = False) -> Handler:
    """Answer with a ``size``-byte body of spaces (endless when chunked and size is 0)."""
    block = b" " * 65536

    def handle(out: Out, request: bytes) -> bool:
        framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
        if not out.send(f"HTTP/1.1 {status} X\r\n{framing}\r\n\r\n".encode()):
            return False
        sent = 0
        while not size or sent < size:
            piece = block if chunked else block[: size - sent]
            data = b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece
            if not out.send(data):
                return False
            sent += len(piece)
        return False

    return handle


def gzip_bomb(size: int) -> Handler:
    """Answer 200 with ``size`` bytes of spaces, gzip-compressed (a few dozen KiB on the wire)."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as zipped:
        block = b" " * (1 << 20)
        for _ in range(size // len(block)):
            zipped.write(block)
    return answer(200, buffer.getvalue(), {"Content-Encoding": "gzip"})


def silent(out: Out, request: bytes) -> bool:
    """Never answer (until the server stops)."""
    out.sleep(60)
    return False


def invoice_data(request_body: bytes, **changes: Any) -> dict[str, Any]:
    """The ``data`` of a correct create answer to ``request_body``, with ``changes`` applied."""
    sent = json.loads(request_body)
    data = {
        "id": 123732,
        "url": "https://invoices.sandbox.cryptoprocessing.com/invoice/6rKzdo",
        "foreign_id": sent.get("foreign_id", "x"),
        "address": "2N2xtaZCNygY3iq6XKPJsdoPMDX85LUc8SM",
        "title": sent.get("title", "t"),
        "status": "pending",
        "currency": sent.get("currency", "BTC"),
        "amount": f"{float(sent.get('amount', 1)):.8f}",
        "sender_currency": "BTC",
        "sender_amount": "0.01230000",
        "fixed_at": 1667895345,
        "release_at": 1667896245,
        "seconds_left": 899,
    }
    data.update(changes)
    return data


@dataclass
class Canned:
    """One scripted answer: status, body bytes, headers."""

    status: int
    body: bytes
    headers: Mapping[str, str] | None = None


class CannedAdapter(BaseAdapter):
    """A requests transport that answers from a function of the prepared request.

    ``handler`` returns a ``Canned`` answer or raises (e.g. ``requests.exceptions.SSLError``).
    Every request it saw is kept in ``sent``.
    """

    def __init__(self, handler: Callable[[requests.PreparedRequest], Canned]) -> None:
        super().__init__()
        self.handler = handler
        self.sent: list[requests.PreparedRequest] = []

    def send(  # type: ignore[override]
        self, request: requests.PreparedRequest, stream: bool = False, **kwargs: Any
    ) -> requests.Response:
        self.sent.append(request)
        canned = self.handler(request)
        raw = HTTPResponse(
            body=io.BytesIO(canned.body),
            headers=dict(canned.headers or {}),
            status=canned.status,
            preload_content=False,
        )
        response = requests.Response()
        response.status_code = canned.status
        response.headers = requests.structures.CaseInsensitiveDict(canned.headers or {})
        response.raw = raw
        response.url = request.url or ""
        response.request = request
        return response

    def close(self) -> None:
        """Nothing to close."""


def canned_session(handler: Callable[[requests.PreparedRequest], Canned]) -> requests.Session:
    """A session whose every request goes to a ``CannedAdapter(handler)`` (``.adapter``)."""
    session = requests.Session()
    adapter = CannedAdapter(handler)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.adapter = adapter  # type: ignore[attr-defined]
    return session


@dataclass
class TLSFiles:
    """A self-signed certificate for 127.0.0.1 and its key."""

    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


def make_tls_files(directory: Path) -> TLSFiles | None:
    """Make a throw-away certificate with the openssl command; None when it is missing."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return TLSFiles(cert, key)


@contextlib.contextmanager
def full_backlog() -> Iterator[int]:
    """A listening port whose accept queue is full, so a new connect() hangs (SYNs dropped)."""
    listener = socket.create_server((LOOPBACK, 0), backlog=0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect((LOOPBACK, port))
            fillers.append(filler)
        time.sleep(0.1)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
