"""The bounded transport: one wall-clock bound per exchange, the send-by fence, DNS and TLS.

Every server here is real (loopback sockets); slow DNS is the only thing simulated, through the
adapter's ``resolve`` parameter, because no test can make the system resolver slow.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from invoice_worker import errors as e
from invoice_worker.client import ProviderClient
from invoice_worker.config import Settings
from invoice_worker.exchange import Exchange, ProviderAdapter, Watchdog, bound
from invoice_worker.models import parse_request
from invoice_worker.sandbox import Sandbox
from tests.conftest import KEY, SECRET, request_data
from tests.rawhttp import (
    Handler,
    Out,
    RawServer,
    TLSFiles,
    answer,
    full_backlog,
    invoice_data,
    make_tls_files,
    reply,
    silent,
    trickle,
)

# A 1 s bound must end well under 3 s even on a loaded 2-core machine.
BOUND = 1.0
MARGIN = 3.0


def bounded_client(api_url: str, **kwargs: Any) -> ProviderClient:
    """A client with a 1 s exchange bound and per-step timeouts that would never end it."""
    options: dict[str, Any] = {"connect_timeout": 30, "read_timeout": 30, "exchange_timeout": BOUND}
    return ProviderClient(api_url, KEY, SECRET, **{**options, **kwargs})


def timed(call: Callable[[], object]) -> tuple[BaseException | None, float]:
    started = time.monotonic()
    try:
        call()
    except Exception as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


def create(client: ProviderClient, **kwargs: Any) -> Callable[[], object]:
    request = parse_request(request_data())
    return lambda: client.create_invoice(request, **kwargs)


def ok_invoice(out: Out, request: bytes) -> bool:
    body = request.partition(b"\r\n\r\n")[2]
    return out.send(reply(200, json.dumps({"data": invoice_data(body)}).encode()))


def session_with(adapter: ProviderAdapter, **attrs: Any) -> requests.Session:
    session = requests.Session()
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    for name, value in attrs.items():
        setattr(session, name, value)
    return session


class SlowResolver:
    """Resolves every name to 127.0.0.1 after ``delay`` seconds (or when released)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.released = threading.Event()
        self.calls = 0

    def __call__(self, host: str, port: int, family: int, type: int) -> Any:
        self.calls += 1
        self.released.wait(self.delay)
        return socket.getaddrinfo("127.0.0.1", port, socket.AF_INET, type)


@pytest.fixture
def slow_dns() -> Iterator[Callable[[float], SlowResolver]]:
    made: list[SlowResolver] = []

    def make(delay: float) -> SlowResolver:
        made.append(SlowResolver(delay))
        return made[-1]

    yield make
    for resolver in made:
        resolver.released.set()  # no resolver thread outlives its test


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    files = make_tls_files(tmp_path_factory.mktemp("tls"))
    if files is None:
        pytest.skip("needs the openssl command to make a certificate")
    return files


def trusting(files: TLSFiles, **kwargs: Any) -> requests.Session:
    # trust_env off: requests lets REQUESTS_CA_BUNDLE override a session's own ``verify``.
    return session_with(ProviderAdapter(**kwargs), verify=str(files.cert), trust_env=False)


# --- The wall-clock bound on the whole exchange (issue 10 items 8 and 9). ---


@pytest.mark.parametrize(
    "handler",
    [
        trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n", b"{" * 10000, 0.1),
        trickle(b"", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", 0.1),
        trickle(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"1\r\n{\r\n" * 999, 0.1),
        silent,
    ],
    ids=["trickled-body", "trickled-status-line", "trickled-chunks", "silent"],
)
@pytest.mark.parametrize("where", ["main-thread", "worker-thread"])
def test_an_answer_that_never_completes_is_cut_at_the_bound(handler: Handler, where: str) -> None:
    with RawServer(handler) as server:
        client = bounded_client(server.url())
        if where == "main-thread":
            error, elapsed = timed(create(client))
        else:  # like a -P threads worker: no signals, no Celery time limit
            with ThreadPoolExecutor(1) as pool:
                error, elapsed = pool.submit(timed, create(client)).result()
        client.close()
    assert type(error) is e.AmbiguousResponseError
    assert "exchange_timeout" in str(error)
    assert BOUND * 0.9 <= elapsed < MARGIN
    assert len(server.requests) == 1  # it was sent: the invoice may exist


def test_a_stalled_tls_handshake_is_not_sent_and_not_a_tls_error() -> None:
    # The server accepts TCP and never answers the ClientHello.
    with RawServer(silent, read_request=False) as server:
        client = bounded_client(server.url("https"))
        error, elapsed = timed(create(client))
        client.close()
    assert type(error) is e.ProviderConnectionError
    assert "not sent" in str(error)
    assert elapsed < MARGIN


def test_a_stalled_connect_is_bounded() -> None:
    with full_backlog() as port:
        client = bounded_client(f"http://127.0.0.1:{port}/api/v2")
        error, elapsed = timed(create(client))
    assert type(error) is e.ProviderConnectionError
    assert BOUND * 0.9 <= elapsed < MARGIN


def test_slow_dns_is_bounded(sandbox: Sandbox, slow_dns: Callable[[float], SlowResolver]) -> None:
    resolver = slow_dns(30)
    session = session_with(ProviderAdapter(resolve=resolver))
    client = bounded_client(f"http://provider.invalid:{sandbox.port}/api/v2", session=session)
    request = parse_request(request_data())
    error, elapsed = timed(lambda: client.create_invoice(request))
    assert type(error) is e.ProviderConnectionError
    assert "not sent" in str(error)
    assert elapsed < MARGIN
    assert resolver.calls == 1
    assert sandbox.create_calls(request.foreign_id) == 0


def test_dns_within_the_bound_goes_through(
    sandbox: Sandbox, slow_dns: Callable[[float], SlowResolver]
) -> None:
    resolver = slow_dns(0.2)
    session = session_with(ProviderAdapter(resolve=resolver))
    # A loopback name: the sandbox's invoice URL is plain http, accepted from a loopback API only.
    client = bounded_client(f"http://localhost:{sandbox.port}/api/v2", session=session)
    request = parse_request(request_data())
    assert client.create_invoice(request).foreign_id == request.foreign_id
    assert resolver.calls == 1


def test_the_client_recovers_after_a_cut_exchange() -> None:
    calls: list[int] = []

    def first_trickles(out: Out, request: bytes) -> bool:
        calls.append(1)
        if len(calls) == 1:
            return trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"x" * 100, 0.1)(
                out, request
            )
        return ok_invoice(out, request)

    with RawServer(first_trickles) as server:
        client = bounded_client(server.url())
        with pytest.raises(e.AmbiguousResponseError):
            create(client)()
        error, elapsed = timed(create(client))
        client.close()
    assert error is None
    assert elapsed < 0.5


def test_keep_alive_connections_outlive_earlier_deadlines() -> None:
    # Each exchange's deadline passes while the pooled connection serves later exchanges:
    # a deadline must never cut a connection its exchange has given back.
    with RawServer(ok_invoice) as server:
        client = bounded_client(server.url(), exchange_timeout=0.3)
        for _ in range(6):
            create(client)()
            time.sleep(0.15)
        client.close()
    assert len(server.requests) == 6
    assert server.accepted == 1


def test_exchange_timeout_parameters() -> None:
    client = ProviderClient("https://api.example.com/api/v2", KEY, SECRET)
    assert client.exchange_timeout == pytest.approx(3.05 + 20.0)
    with pytest.raises(ValueError, match="exchange_timeout"):
        ProviderClient("https://api.example.com/api/v2", KEY, SECRET, exchange_timeout=0)


def test_from_settings_bounds_the_exchange_by_connect_plus_read(settings: Settings) -> None:
    client = ProviderClient.from_settings(settings)
    assert client.exchange_timeout == pytest.approx(
        settings.connect_timeout + settings.read_timeout
    )


# --- The send-by fence (issue 10 item 8). ---


def test_send_by_in_the_past_sends_nothing() -> None:
    with RawServer(ok_invoice) as server:
        client = bounded_client(server.url())
        past = time.monotonic() - 0.001
        with pytest.raises(e.ProviderConnectionError, match="not sent") as info:
            client.create_invoice(parse_request(request_data()), send_by=past)
        assert not info.value.ambiguous
        with pytest.raises(e.ProviderConnectionError, match="not sent"):
            client.cancel_invoice("order-1", send_by=past)
        client.close()
    assert server.accepted == 0
    assert server.requests == []


def test_send_by_crossed_during_slow_dns_sends_nothing(
    sandbox: Sandbox, slow_dns: Callable[[float], SlowResolver]
) -> None:
    session = session_with(ProviderAdapter(resolve=slow_dns(1.0)))
    client = bounded_client(
        f"http://provider.invalid:{sandbox.port}/api/v2", session=session, exchange_timeout=10
    )
    request = parse_request(request_data())
    send_by = time.monotonic() + 0.3
    error, elapsed = timed(lambda: client.create_invoice(request, send_by=send_by))
    assert type(error) is e.ProviderConnectionError
    assert "not sent" in str(error)
    assert 0.25 <= elapsed < MARGIN
    time.sleep(1.0)  # the resolver answers by now: still nothing may go out
    assert sandbox.create_calls(request.foreign_id) == 0


def test_send_by_crossed_during_a_slow_connect_sends_nothing() -> None:
    with full_backlog() as port:
        client = bounded_client(f"http://127.0.0.1:{port}/api/v2", exchange_timeout=10)
        send_by = time.monotonic() + 0.3
        error, elapsed = timed(create(client, send_by=send_by))
    assert type(error) is e.ProviderConnectionError
    assert "not sent" in str(error)
    assert elapsed < MARGIN


def test_send_by_is_checked_after_the_tls_handshake(tls_files: TLSFiles) -> None:
    # DNS and TCP connect are instant; the TLS handshake completes 0.6 s later, past send_by
    # but well inside the exchange bound: the last check before writing must catch it.
    with RawServer(ok_invoice, tls=tls_files.server_context(), tls_delay=0.6) as server:
        client = bounded_client(
            server.url("https"), session=trusting(tls_files), exchange_timeout=10
        )
        send_by = time.monotonic() + 0.3
        error, elapsed = timed(create(client, send_by=send_by))
        client.close()
        time.sleep(0.2)
    assert type(error) is e.ProviderConnectionError
    assert "send_by" in str(error)
    assert 0.5 <= elapsed < MARGIN
    assert server.received == 0  # the handshake completed; not one request byte followed


def test_send_by_in_the_future_goes_through(client: ProviderClient, sandbox: Sandbox) -> None:
    request = parse_request(request_data())
    invoice = client.create_invoice(request, send_by=time.monotonic() + 5)
    assert invoice.foreign_id == request.foreign_id
    assert client.cancel_invoice(request.foreign_id, send_by=time.monotonic() + 5).status == (
        "failed"
    )


# --- TLS: permanent only when the handshake fails on its own. ---


def test_tls_create_goes_through(tls_files: TLSFiles) -> None:
    with RawServer(ok_invoice, tls=tls_files.server_context()) as server:
        client = bounded_client(server.url("https"), session=trusting(tls_files))
        request = parse_request(request_data())
        assert client.create_invoice(request).foreign_id == request.foreign_id
        client.close()


def test_an_untrusted_certificate_is_permanent_and_sends_nothing(tls_files: TLSFiles) -> None:
    with RawServer(ok_invoice, tls=tls_files.server_context()) as server:
        client = bounded_client(server.url("https"))  # the system CAs do not trust it
        error, _ = timed(create(client))
        client.close()
    assert type(error) is e.ProviderTLSError
    assert not error.retryable
    assert server.requests == []


def test_a_tls_failure_after_sending_is_ambiguous(tls_files: TLSFiles) -> None:
    def garbage(out: Out, request: bytes) -> bool:
        # Bytes that are no TLS record, written under the TLS layer once the request is in.
        raw = socket.fromfd(out.conn.fileno(), socket.AF_INET, socket.SOCK_STREAM)
        with raw:
            raw.sendall(b"HTTP/1.1 200 OK\r\n\r\n" * 8)
        out.sleep(5)
        return False

    with RawServer(garbage, tls=tls_files.server_context()) as server:
        client = bounded_client(server.url("https"), session=trusting(tls_files))
        error, _ = timed(create(client))
        client.close()
    assert type(error) is e.AmbiguousResponseError
    assert len(server.requests) == 1


# --- The watchdog and the pool, from inside. ---


def test_the_watchdog_thread_stops_when_idle_and_comes_back() -> None:
    watchdog = Watchdog(idle=0.1)
    with bound(watchdog, 5.0, None):
        assert watchdog.running
    deadline = time.monotonic() + 10  # idle 0.1 s: generous for a loaded machine
    while watchdog.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not watchdog.running
    left, right = socket.socketpair()
    with left, right, bound(watchdog, 0.2, None) as exchange:
        exchange.attach(object(), left)
        left.settimeout(3)
        started = time.monotonic()
        assert left.recv(1) == b""  # shut down at the deadline, not after 3 s
        assert time.monotonic() - started < 2
        assert exchange.expired


def test_a_released_connection_is_never_cut() -> None:
    watchdog = Watchdog()
    left, right = socket.socketpair()
    owner = object()
    with left, right:
        with bound(watchdog, 0.2, None) as exchange:
            exchange.attach(owner, left)
            exchange.detach(owner)  # what the pool does when the connection comes back
            time.sleep(0.5)
            assert exchange.expired
        right.sendall(b"still open")
        assert left.recv(16) == b"still open"


def test_a_connection_back_in_its_pool_is_out_of_reach_of_the_deadline() -> None:
    with RawServer(answer(200, b"{}")) as server:
        session = session_with(ProviderAdapter())
        with bound(Watchdog(), 0.3, None) as exchange:
            response = session.get(server.url(), stream=True)
            assert response.content == b"{}"  # read whole: the connection is back in the pool
            time.sleep(0.6)  # the deadline passes while the exchange is still open
            assert exchange.expired
        assert session.get(server.url()).status_code == 200
        session.close()
    assert server.accepted == 1  # the pooled connection was reused, not cut


def test_an_exchange_is_bound_to_its_own_thread() -> None:
    watchdog = Watchdog()
    seen: list[Exchange | None] = []
    with bound(watchdog, 5.0, None) as mine:
        thread = threading.Thread(target=lambda: seen.append(Exchange.current()))
        thread.start()
        thread.join()
        assert Exchange.current() is mine
    assert seen == [None]
    assert Exchange.current() is None


def test_no_file_descriptor_outlives_an_exchange(sandbox: Sandbox) -> None:
    client = bounded_client(sandbox.url)
    create(client)()  # the pool's connection now exists
    before = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").exists() else 0
    for _ in range(20):
        create(client)()
    after = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").exists() else 0
    client.close()
    assert after == before
