"""A TLS front for a shop under test: its public ``https://<domain>`` origin on loopback.

The provider takes only https URLs on a domain name for ``url_success`` / ``url_failed`` (and
so does the request validation), so a shop's "back to the shop" link cannot be
``http://127.0.0.1``. The test's Chromium resolves `SHOP_DOMAIN` to 127.0.0.1
(``--host-resolver-rules``) and accepts this front's self-signed certificate; the front
decrypts and passes the bytes on to the shop's plain-HTTP port, as a TLS-terminating proxy does.
"""

from __future__ import annotations

import contextlib
import select
import socket
import socketserver
import ssl
import subprocess
import threading
from pathlib import Path

#: The shop's public domain in the tests (``.test`` is reserved: it never resolves for real).
SHOP_DOMAIN = "shop.example.test"
#: Chromium's flags that send `SHOP_DOMAIN` to the front and trust its certificate.
BROWSER_FLAGS = (
    f"--host-resolver-rules=MAP {SHOP_DOMAIN} 127.0.0.1",
    "--ignore-certificate-errors",
)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for `SHOP_DOMAIN` and its key, made by the openssl command."""
    cert, key = directory / "shop.crt", directory / "shop.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", f"/CN={SHOP_DOMAIN}",
         "-addext", f"subjectAltName=DNS:{SHOP_DOMAIN}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def _relay(tls: ssl.SSLSocket, plain: socket.socket) -> None:
    """Copy both ways until either side closes; one thread, so the TLS socket is never read
    and written at once."""
    peers = {tls: plain, plain: tls}
    while True:
        readable, _, _ = select.select(list(peers), [], [], 30)
        if not readable:
            return
        for source in readable:
            data = source.recv(65536)
            while isinstance(source, ssl.SSLSocket) and source.pending():
                data += source.recv(65536)  # decrypted already: select would not see it
            if not data:
                return
            peers[source].sendall(data)


class TLSFront(socketserver.ThreadingTCPServer):
    """Listens on a free loopback port; each TLS connection is relayed to `backend_port`."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, backend_port: int, cert: Path, key: Path) -> None:
        super().__init__(("127.0.0.1", 0), socketserver.BaseRequestHandler)
        self.port = int(self.server_address[1])
        self.url = f"https://{SHOP_DOMAIN}:{self.port}"
        self.backend_port = backend_port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)

    def finish_request(
        self, request: socket.socket | tuple[bytes, socket.socket], _: object
    ) -> None:
        assert isinstance(request, socket.socket)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        with (
            tls,
            socket.create_connection(("127.0.0.1", self.backend_port)) as backend,
            contextlib.suppress(OSError),
        ):
            _relay(tls, backend)

    def start(self) -> TLSFront:
        """Serve from a daemon thread; return self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting; connections still open end with the test process."""
        self.shutdown()
        self.server_close()
