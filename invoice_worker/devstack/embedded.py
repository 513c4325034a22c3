"""An embedded Redis for dev mode and tests: a private ``redis-server`` on a free loopback
port when the binary is on PATH, else the fakeredis TCP server in this process (fakeredis comes
with the ``devstack`` extra, not with a production install)."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from invoice_worker.errors import ConfigError

INSTALL_HINT = "pip install 'invoice-worker[devstack]'"


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kill_process(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL and reap a child (no shutdown save, sockets reset); gone already is fine."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGKILL)
    process.wait()


class EmbeddedRedis:
    """A Redis that this process owns: start, hard-kill and restart it at will.

    Args:
        appendonly: persist to an AOF (fsync every write) so a restart after SIGKILL keeps data.
        password: require AUTH with this password.
        use_binary: False forces the fakeredis fallback (a real binary is used when found).
    """

    def __init__(
        self,
        *,
        appendonly: bool = False,
        password: str | None = None,
        use_binary: bool = True,
        port: int | None = None,
    ) -> None:
        self.use_binary = use_binary
        self.binary = shutil.which("redis-server") if use_binary else None
        self.kind = "redis-server" if self.binary else "fakeredis"
        self.appendonly = appendonly
        self.password = password
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="invoice-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        self._fake: Any = None

    @property
    def url(self) -> str:
        """``redis://`` URL of DB 0 (with the password when one is set)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING.

        Raises:
            ConfigError: no redis-server is used and fakeredis is not installed.
        """
        try:
            if self.binary:
                self.process = subprocess.Popen(  # noqa: S603 - our own argv, no shell
                    self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            else:
                self._start_fake()
            self._wait_ready()
        except BaseException:
            self.kill()  # `with` never reaches __exit__ when __enter__ raises; the log stays
            raise
        return self

    def _command(self) -> list[str]:
        assert self.binary
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        cmd += ["--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")]
        cmd += ["--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always"]
        if self.password:
            cmd += ["--requirepass", self.password]
        return cmd

    def _start_fake(self) -> None:
        try:
            from fakeredis import TcpFakeServer
        except ImportError:
            missing = "no redis-server on PATH and " if self.use_binary else ""
            raise ConfigError(f"{missing}fakeredis is not installed: {INSTALL_HINT}") from None

        class NoDelayServer(TcpFakeServer):
            # Nagle's algorithm stalls every small reply by ~40 ms: ~11 jobs/s instead of ~600.
            def get_request(self) -> tuple[socket.socket, Any]:
                sock, addr = super().get_request()
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock, addr

        server = NoDelayServer(("127.0.0.1", self.port))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True, name="fakeredis").start()
        self._fake = server

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    if self.process is not None and self.process.poll() is not None:
                        raise RuntimeError(
                            f"redis-server exited: see {self.dir / 'redis.log'}"
                        ) from None
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """Stop the server at once (SIGKILL for redis-server: no shutdown save)."""
        if self.process is not None:
            kill_process(self.process)
            self.process = None
        if self._fake is not None:
            self._fake.shutdown()
            self._fake.server_close()
            self._fake = None

    def restart(self) -> None:
        """Start again on the same port (with the AOF, data written before a kill survives)."""
        self.kill()
        self.start()

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
