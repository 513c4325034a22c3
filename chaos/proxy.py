"""A TCP proxy in front of the sandbox that can cut the network: refused connects, reset
in-flight calls, then restore, while the sandbox keeps its state."""

from __future__ import annotations

import contextlib
import select
import socket
import socketserver
import threading
from typing import Any


class _Pump(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.server.target_port), timeout=5)
        client: socket.socket = self.request
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.lock:
            self.server.live.update({client, upstream})
        try:
            while True:
                readable, _, _ = select.select([client, upstream], [], [], 1.0)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is client else client).sendall(data)
        except OSError:
            return
        finally:
            with self.server.lock:
                self.server.live.difference_update({client, upstream})
            upstream.close()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, target_port: int) -> None:
        self.target_port = target_port
        self.lock = threading.Lock()
        self.live: set[socket.socket] = set()
        super().__init__(("127.0.0.1", port), _Pump)


class Proxy:
    """Forward ``127.0.0.1:port`` to ``127.0.0.1:target_port`` until :meth:`cut`."""

    def __init__(self, target_port: int, port: int = 0) -> None:
        self.target_port = target_port
        self._server: _Server | None = _Server(port, target_port)
        self.port: int = self._server.server_address[1]
        self._serve()

    def _serve(self) -> None:
        assert self._server is not None
        threading.Thread(target=self._server.serve_forever, daemon=True, name="proxy").start()

    def cut(self) -> None:
        """Stop listening (connects are refused) and reset every open connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with server.lock:
            for sock in list(server.live):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        """Listen again on the same port."""
        if self._server is None:
            self._server = _Server(self.port, self.target_port)
            self._serve()

    def close(self) -> None:
        self.cut()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
