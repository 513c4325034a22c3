"""The bounded transport under ProviderClient: a wall-clock bound and a send-by fence.

An *exchange* is one request and its answer. While the client runs one, it sits in a ContextVar
(so it belongs to the calling thread), and urllib3 connections made by ``ProviderAdapter``
consult it::

    ProviderClient._exchange
      └── bound(watchdog, exchange_timeout, send_by)   deadline on the watchdog's heap
          └── requests ─ ProviderAdapter ─ PoolManager.pool_classes_by_scheme = our pools
                ├── pool._put_conn  the connection is back: detach it (no deadline can cut it)
                └── connection
                      ├── _new_conn  DNS (helper thread) and TCP connect, both bounded by
                      │              min(deadline, send_by); then the socket's descriptor is
                      │              duplicated into the exchange, which TLS wrapping cannot detach
                      └── request    connect if needed, attach, then the fence: NotSent if
                                     send_by or the deadline has passed, else mark "sent"

At a running exchange's deadline the watchdog thread calls ``shutdown()`` on that socket, which
ends a blocked handshake, send or read at once (a trickled answer included), whatever the
Celery pool. Outside an exchange the classes behave as urllib3's own.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar, Token
from typing import Any

from requests import PreparedRequest, Response
from requests.adapters import HTTPAdapter
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool, PoolManager, ProxyManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.connection import allowed_gai_family
from urllib3.util.ssl_ import is_ipaddress

AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]
#: ``resolve(host, port, family, type)``, like ``socket.getaddrinfo``.
Resolver = Callable[[str, int, int, int], Sequence[AddrInfo]]

_CURRENT: ContextVar[Exchange | None] = ContextVar("invoice_worker_exchange", default=None)


class NotSent(Exception):
    """Raised right before the first request byte when the request must not go out.

    Not an OSError nor a urllib3 error, so neither urllib3 nor requests retries or wraps it.
    """


class Exchange:
    """One request and its answer, bounded by ``deadline`` and fenced by ``send_by``.

    ``sent`` (the first request byte was about to be written) is exact once ``tracked`` is
    True, i.e. once a ProviderAdapter connection served the exchange.
    """

    __slots__ = (
        "_handle", "_owner", "_token", "_watchdog", "connect_by", "deadline", "done", "expired",
        "resolve", "send_by", "sent", "timeout", "tracked",
    )  # fmt: skip

    def __init__(self, watchdog: Watchdog, timeout: float, send_by: float | None) -> None:
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.send_by = send_by
        self.connect_by = self.deadline if send_by is None else min(self.deadline, send_by)
        self.resolve: Resolver = socket.getaddrinfo
        self.tracked = self.sent = self.expired = self.done = False
        self._watchdog = watchdog
        self._owner: object | None = None
        self._handle: int | None = None  # a duplicate of the socket's descriptor
        self._token: Token[Exchange | None] | None = None

    @staticmethod
    def current() -> Exchange | None:
        """The exchange running in this thread (context), if any."""
        return _CURRENT.get()

    def __enter__(self) -> Exchange:
        self._token = _CURRENT.set(self)
        self._watchdog.watch(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _CURRENT.reset(self._token)
        with self._watchdog.lock:
            self.done = True
            handle, self._handle, self._owner = self._handle, None, None
            self._watchdog.prune_locked()
        if handle is not None:
            os.close(handle)

    def attach(self, owner: object, sock: socket.socket) -> None:
        """Let the deadline cut ``sock`` from now on.

        Through a duplicate of its descriptor: TLS wrapping detaches the socket object, and a
        connection closed mid-answer (``Connection: close``) still reads through the duplicate.
        """
        handle = os.dup(sock.fileno())
        with self._watchdog.lock:
            self.tracked = True
            old, self._handle, self._owner = self._handle, handle, owner
            if self.expired:
                _shutdown(handle)
        if old is not None:
            os.close(old)

    def detach(self, owner: object) -> None:
        """``owner`` went back to its pool: the deadline may no longer touch it."""
        with self._watchdog.lock:
            if self._owner is not owner:
                return
            handle, self._handle, self._owner = self._handle, None, None
        if handle is not None:
            os.close(handle)

    def before_send(self) -> None:
        """The fence, right before the first request byte.

        Raises:
            NotSent: the deadline or ``send_by`` has passed.
        """
        with self._watchdog.lock:
            self.tracked = True
            if self.expired:
                raise NotSent(f"exchange_timeout ({self.timeout:g} s) passed before sending")
            if self.send_by is not None and time.monotonic() >= self.send_by:
                raise NotSent("send_by passed before sending (after DNS, connect and TLS)")
            self.sent = True

    def expire_locked(self) -> None:
        """Called by the watchdog, holding its lock, at the deadline."""
        if not self.done:
            self.expired = True
            if self._handle is not None:
                _shutdown(self._handle)


def _shutdown(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    try:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    finally:
        sock.detach()  # the descriptor stays the exchange's to close


def bound(watchdog: Watchdog, timeout: float, send_by: float | None) -> Exchange:
    """An exchange to run as ``with bound(...) as exchange:``; ends by ``timeout`` seconds."""
    watchdog.check_fork()
    return Exchange(watchdog, timeout, send_by)


class Watchdog:
    """One thread that cuts the socket of every exchange still running at its deadline.

    The thread starts with the first exchange and stops after ``idle`` seconds without one, so
    an unused client holds no thread; a forked child (prefork pool) starts afresh.
    """

    def __init__(self, idle: float = 5.0) -> None:
        self.idle = idle
        self._reset()

    def _reset(self) -> None:
        self.lock = threading.Lock()
        self._wake = threading.Condition(self.lock)
        self._heap: list[tuple[float, int, Exchange]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._wake_at = 0.0  # when the sleeping thread wakes anyway (read under the lock)
        self._pid = os.getpid()

    @property
    def running(self) -> bool:
        """Whether the thread is alive."""
        with self.lock:
            return self._thread is not None

    def check_fork(self) -> None:
        # A child has one thread, so it resets alone; the parent's lock may be held forever.
        if self._pid != os.getpid():
            self._reset()

    def watch(self, exchange: Exchange) -> None:
        """Cut ``exchange``'s socket at its deadline unless it is done by then."""
        with self.lock:
            heapq.heappush(self._heap, (exchange.deadline, next(self._seq), exchange))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="invoice-worker-watchdog", daemon=True
                )
                self._thread.start()
            elif exchange.deadline < self._wake_at:
                self._wake.notify()  # rare: deadlines mostly arrive in order

    def prune_locked(self) -> None:
        """Drop finished exchanges from the top of the heap (so the thread sleeps longer)."""
        heap = self._heap
        while heap and heap[0][2].done:
            heapq.heappop(heap)

    def _run(self) -> None:
        with self.lock:
            while True:
                self.prune_locked()
                now = time.monotonic()
                if not self._heap:
                    self._wake_at = now + self.idle
                    self._wake.wait(self.idle)
                    self.prune_locked()
                    if not self._heap:
                        self._thread = None
                        return
                    continue
                deadline, _, exchange = self._heap[0]
                if deadline > now:
                    self._wake_at = deadline
                    self._wake.wait(deadline - now)
                    continue
                heapq.heappop(self._heap)
                exchange.expire_locked()


def resolve_within(
    resolve: Resolver, host: str, port: int, family: int, until: float
) -> Sequence[AddrInfo]:
    """``resolve`` with a bound: in a helper thread unless ``host`` is an IP address.

    Raises:
        TimeoutError: no answer before ``until`` (the helper thread is left to finish alone).
    """
    if is_ipaddress(host):
        return resolve(host, port, family, socket.SOCK_STREAM)
    left = until - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"no time left to resolve {host}")
    box: list[Sequence[AddrInfo] | BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            box.append(resolve(host, port, family, socket.SOCK_STREAM))
        except BaseException as exc:
            box.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name="invoice-worker-dns", daemon=True).start()
    if not done.wait(left):
        raise TimeoutError(f"resolving {host} took over {left:.2f} s")
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def open_socket(conn: HTTPConnection, exchange: Exchange) -> socket.socket:
    """urllib3's ``create_connection`` with DNS and each connect bounded by ``connect_by``."""
    until, timeout = exchange.connect_by, conn.timeout
    host = conn._dns_host.strip("[]")
    infos = resolve_within(exchange.resolve, host, conn.port or 0, allowed_gai_family(), until)
    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, address in infos:
        left = until - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no time left to connect to {host}")
        sock = socket.socket(family, kind, proto)
        try:
            for option in conn.socket_options or ():
                sock.setsockopt(*option)
            sock.settimeout(left if timeout is None else min(timeout, left))
            if conn.source_address:
                sock.bind(conn.source_address)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        sock.settimeout(timeout)
        return sock
    raise error


class BoundedHTTPConnection(HTTPConnection):
    """urllib3's HTTPConnection, bounded by the exchange of the calling thread (if any)."""

    exchange: Exchange | None = None

    def _new_conn(self) -> socket.socket:
        exchange = _CURRENT.get()
        if exchange is None:
            return super()._new_conn()
        exchange.tracked = True
        try:
            sock = open_socket(self, exchange)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        except TimeoutError as exc:
            raise ConnectTimeoutError(self, f"Connection to {self.host} timed out: {exc}") from exc
        except OSError as exc:
            raise NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc
        try:
            exchange.attach(self, sock)
        except OSError as exc:
            sock.close()
            raise NewConnectionError(self, f"Failed to watch the connection: {exc}") from exc
        if exchange.expired:
            sock.close()
            raise ConnectTimeoutError(self, f"Connection to {self.host}: exchange_timeout passed")
        self.exchange = exchange
        sys.audit("http.client.connect", self, self.host, self.port)
        return sock

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> None:
        exchange = _CURRENT.get()
        if exchange is not None:
            if self.sock is None:
                self.connect()
            if self.exchange is not exchange and self.sock is not None:
                exchange.attach(self, self.sock)
                self.exchange = exchange
            exchange.before_send()
        super().request(method, url, *args, **kwargs)


class BoundedHTTPSConnection(BoundedHTTPConnection, HTTPSConnection):
    """urllib3's HTTPSConnection, bounded the same way (the TLS handshake included)."""


class BoundedHTTPConnectionPool(HTTPConnectionPool):
    """A pool of bounded connections that detaches each from its exchange when it comes back."""

    ConnectionCls = BoundedHTTPConnection

    def _put_conn(self, conn: Any) -> None:
        exchange = getattr(conn, "exchange", None)
        if exchange is not None:
            exchange.detach(conn)
            conn.exchange = None
        super()._put_conn(conn)


class BoundedHTTPSConnectionPool(BoundedHTTPConnectionPool, HTTPSConnectionPool):
    """The HTTPS twin of BoundedHTTPConnectionPool."""

    ConnectionCls = BoundedHTTPSConnection


_POOLS: dict[str, type[HTTPConnectionPool]] = {
    "http": BoundedHTTPConnectionPool,
    "https": BoundedHTTPSConnectionPool,
}


class ProviderAdapter(HTTPAdapter):
    """A requests adapter whose connections honour ProviderClient's bound and fence.

    Never retries (``max_retries=0``): a silent retry of a sent POST could create a second
    invoice. Mount it on your own session to keep the guarantees with ``session=``. HTTP(S)
    proxies keep them; SOCKS proxies do not (their connections are urllib3's own).

    Args:
        pool_maxsize: connections kept per host.
        resolve: ``getaddrinfo``-like resolver (the seam for custom DNS, and for tests).
    """

    def __init__(self, *, pool_maxsize: int = 10, resolve: Resolver = socket.getaddrinfo) -> None:
        self.resolve = resolve
        super().__init__(pool_connections=1, pool_maxsize=pool_maxsize, max_retries=0)

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> PoolManager:
        manager: PoolManager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if type(manager) is ProxyManager:
            manager.pool_classes_by_scheme = _POOLS
        return manager

    def send(self, request: PreparedRequest, *args: Any, **kwargs: Any) -> Response:
        exchange = _CURRENT.get()
        if exchange is not None:
            exchange.resolve = self.resolve
        return super().send(request, *args, **kwargs)
