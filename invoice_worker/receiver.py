"""The callback receiver: the provider's POSTs in, 200 only once each is durably applied.

One code path, :meth:`Receiver.handle`, three ways to run it:

- ``handle_callback(raw_body, headers)``: framework-neutral, for a Django, Flask or ASGI view
  (give it the body bytes exactly as received, and the request's headers);
- ``wsgi_app()``: a WSGI application answering ``POST /callbacks/coinspaid`` (``path=None``:
  any path, for mounting under a prefix), for gunicorn or any WSGI server;
- ``invoice-worker callbacks [--host] [--port]``: that application on a small threaded server.

What it answers: 403 when the ``X-Processing-Key`` is not ours or the signature does not verify
over the raw bytes (counted, logged without the body, nothing else changes); 200 once the
callback is stored and applied as durably as an enqueue (``INVOICE_REDIS_MIN_REPLICAS``), or,
for a signed body it cannot read, once that body is in the dead-letter list; 503 when Redis is
unreachable, did not confirm in time, or the job does not know its invoice yet (the provider
retries for about a day); 500 for anything unexpected (the body dead-lettered when possible).
"""

from __future__ import annotations

import contextlib
import hmac
import http
import json
import logging
import re
import signal
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery

from invoice_worker.callbacks import MAX_CALLBACK_BYTES, Callback, CallbackStore
from invoice_worker.client import verify_signature
from invoice_worker.config import Settings
from invoice_worker.constants import CallbackOutcome
from invoice_worker.errors import CallbackAuthError, InvalidCallbackError
from invoice_worker.privacy import escape_controls, redact
from invoice_worker.record import JobRecord
from invoice_worker.store import JobStore

if TYPE_CHECKING:
    import argparse
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger(__name__)

#: Where the standalone receiver (and ``wsgi_app()`` by default) takes callbacks.
CALLBACK_PATH = "/callbacks/coinspaid"
_SIGNATURE = re.compile(r"^[0-9a-fA-F]{128}$")
Headers = Mapping[str, str] | Iterable[tuple[str | bytes, str | bytes]]


def _body(**fields: Any) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode()


def _headers(headers: Headers) -> dict[str, str]:
    """Headers by lower-cased name, from a mapping (any case) or ASGI's (bytes, bytes) pairs."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    out = {}
    for name, value in items:
        name = name.decode("latin-1") if isinstance(name, bytes) else name
        value = value.decode("latin-1") if isinstance(value, bytes) else value
        out[name.lower()] = value
    return out


class Receiver:
    """Authenticates, stores and applies provider callbacks; thread-safe, one per process.

    ``app`` is the Celery app that sends status tasks (built from ``settings`` on first use).

    Raises:
        ConfigError: the API key or secret is not set (nothing could be authenticated).
    """

    def __init__(
        self, settings: Settings, *, store: JobStore | None = None, app: Celery | None = None
    ) -> None:
        settings.require_credentials()
        self.settings = settings
        self.store = store or JobStore.from_settings(settings)
        self.callbacks = CallbackStore(self.store)
        self._key = settings.api_key.get_secret_value().encode()
        self._secret = settings.api_secret.get_secret_value()
        self._app = app
        self._lock = threading.Lock()

    @property
    def app(self) -> Celery:
        with self._lock:
            if self._app is None:
                from invoice_worker.app import create_app

                self._app = create_app(self.settings)
            return self._app

    def handle(self, raw_body: bytes, headers: Headers) -> tuple[int, bytes]:
        """Answer one callback: (HTTP status, body). ``raw_body`` must be the bytes as they
        arrived (the signature covers them, not a re-encoding)."""
        try:
            self.authenticate(raw_body, _headers(headers))
        except CallbackAuthError as exc:
            return self._refuse(exc, len(raw_body))
        try:
            callback = Callback.parse(raw_body)
        except InvalidCallbackError as exc:
            return self._set_aside(raw_body, exc.reason, 200)
        try:
            applied = self.callbacks.apply(callback, raw_body)
        except redis.RedisError as exc:
            log.warning(
                "callback %s not stored: redis unavailable (%s)", callback.id, type(exc).__name__
            )
            return 503, _body(error="unavailable")
        except Exception as exc:
            log.exception("callback %s could not be applied", callback.id)
            return self._set_aside(raw_body, f"could not be applied: {type(exc).__name__}", 500)
        # An id made outside this system is the merchant's text: masked like provider text.
        fields = {
            "invoice_id": callback.id, "provider_foreign_id": redact(callback.foreign_id, 300),
            "status": str(callback.status), "outcome": str(applied.outcome),
        }  # fmt: skip
        text = " ".join(f"{k}={v}" for k, v in fields.items())
        if applied.outcome is CallbackOutcome.EARLY or not applied.durable:
            reason = "early" if applied.durable else "not_durable"
            log.info("callback %s retry_by_provider=%s", text, reason)
            return 503, _body(error=reason)
        if applied.notify is not None:
            try:
                self._notify(applied.notify)
            except Exception as exc:  # the provider's retry sends it again (see callback.lua)
                log.warning(
                    "callback %s status task not sent (%s)", callback.id, type(exc).__name__
                )
                return 503, _body(error="status task not sent")
        log.info("callback %s", text, extra={"job": fields})
        return 200, _body(ok=True, outcome=str(applied.outcome))

    def authenticate(self, raw_body: bytes, headers: Mapping[str, str]) -> None:
        """Check the key, then the signature over the raw bytes, both in constant time.

        Raises:
            CallbackAuthError: ``reason`` says what was wrong.
        """
        key = headers.get("x-processing-key")
        if key is None:
            raise CallbackAuthError("no_key")
        if not hmac.compare_digest(key.strip().encode("latin-1", "replace"), self._key):
            raise CallbackAuthError("bad_key")
        signature = headers.get("x-processing-signature")
        if signature is None:
            raise CallbackAuthError("no_signature")
        if not _SIGNATURE.fullmatch(signature.strip()):
            raise CallbackAuthError("bad_signature")
        if not verify_signature(raw_body, signature, self._secret):
            raise CallbackAuthError("bad_signature")

    def _refuse(self, exc: CallbackAuthError, length: int) -> tuple[int, bytes]:
        log.warning("callback refused: reason=%s length=%d (body not logged)", exc.reason, length)
        # A refusal is answered the same whether or not it could be counted.
        with contextlib.suppress(redis.RedisError):
            self.callbacks.count(f"refused:{exc.reason}")
        return 403, _body(error="forbidden")

    def _set_aside(self, raw_body: bytes, reason: str, status: int) -> tuple[int, bytes]:
        try:
            durable = self.callbacks.dead_letter(raw_body, reason)
        except redis.RedisError:
            return 503, _body(error="unavailable")
        log.warning(
            "callback set aside in the dead-letter list: reason=%s length=%d (body not logged)",
            escape_controls(reason), len(raw_body),
        )  # fmt: skip
        if not durable:
            return 503, _body(error="not_durable")
        return status, _body(ok=status == 200, outcome="dead_letter")

    def _notify(self, record: JobRecord) -> None:
        """Send the job's status task its record, then mark it sent: at least once."""
        self.app.send_task(
            record.status_task, args=[record.to_dict()], queue=record.status_queue,
            argsrepr="(<job record>)",
        )  # fmt: skip
        self.callbacks.mark_notified(record)

    def wsgi(self, path: str | None = CALLBACK_PATH) -> WSGIApplication:
        """This receiver as a WSGI application; ``path`` None answers on any path."""

        def application(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
            status, body, extra = self._wsgi(environ, path)
            phrase = http.HTTPStatus(status).phrase
            headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
            start_response(f"{status} {phrase}", headers + extra)
            yield body

        return application

    def _wsgi(
        self, environ: WSGIEnvironment, path: str | None
    ) -> tuple[int, bytes, list[tuple[str, str]]]:
        if path is not None and environ.get("PATH_INFO", "") != path:
            return 404, _body(error="not found"), []
        if environ.get("REQUEST_METHOD") != "POST":
            return 405, _body(error="method not allowed"), [("Allow", "POST")]
        try:
            length = int(environ.get("CONTENT_LENGTH") or "")
        except ValueError:
            return 411, _body(error="length required"), []
        if not 0 <= length <= MAX_CALLBACK_BYTES:
            return 413, _body(error="too large"), []
        stream, raw = environ["wsgi.input"], b""
        while len(raw) < length and (chunk := stream.read(length - len(raw))):
            raw += chunk
        if len(raw) < length:
            return 400, _body(error="incomplete body"), []
        headers = {
            name[5:].replace("_", "-").lower(): value
            for name, value in environ.items()
            if name.startswith("HTTP_")
        }
        return (*self.handle(raw, headers), [])


_default: Receiver | None = None
_default_lock = threading.Lock()


def default_receiver() -> Receiver:
    """The process-wide Receiver, built from the environment on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Receiver(Settings.load())
        return _default


def handle_callback(raw_body: bytes, headers: Headers) -> tuple[int, bytes]:
    """Answer one provider callback with the default receiver: (HTTP status, body bytes).

    For any framework: pass the request body exactly as received (Django ``request.body``,
    Flask ``request.get_data()``, Starlette ``await request.body()``) and its headers (a
    mapping, or ASGI's list of byte pairs). It blocks on Redis: in an async view, run it in a
    thread (``await run_in_threadpool(handle_callback, body, headers)``).
    """
    return default_receiver().handle(raw_body, headers)


def wsgi_app(settings: Settings | None = None, *, path: str | None = CALLBACK_PATH) -> Any:
    """A WSGI application taking callbacks at ``path`` (None: any path, when it is mounted
    under a prefix); for gunicorn: ``gunicorn 'invoice_worker.receiver:wsgi_app()'``."""
    return Receiver(settings or Settings.load()).wsgi(path)


def make_server(receiver: Receiver, host: str, port: int) -> Any:
    """A threaded WSGI server of ``receiver`` bound to host:port (0 picks a free port); call
    ``serve_forever()`` on it (and ``shutdown()`` from another thread)."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer
    from wsgiref.simple_server import make_server as wsgiref_server

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        request_queue_size = 128

    class Handler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            if log.isEnabledFor(logging.DEBUG):  # the request line and status, no body
                log.debug("http %s", escape_controls(format % args))

    return wsgiref_server(host, port, receiver.wsgi(), server_class=Server, handler_class=Handler)


def serve(settings: Settings, host: str, port: int) -> int:
    """Serve the receiver on host:port until SIGINT or SIGTERM (the main thread only)."""
    httpd = make_server(Receiver(settings), host, port)
    print(f"callback receiver at http://{host}:{httpd.server_port}{CALLBACK_PATH}", flush=True)

    def request_stop(*_: object) -> None:
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        httpd.server_close()
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` the ``invoice-worker callbacks`` command."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (%(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (%(default)s)")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace, settings: Settings) -> int:
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        from invoice_worker.logs import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    return serve(settings, args.host, args.port)
