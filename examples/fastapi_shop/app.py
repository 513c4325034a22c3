"""The FastAPI shop: ``uvicorn --factory examples.fastapi_shop.app:create_app``.

Routes: ``GET /`` (order form, latest orders), ``POST /orders``, ``GET /orders/{id}``,
``POST /orders/{id}/pay`` (enqueue, wait up to ``WAIT_SECONDS``, redirect to the invoice or
to the waiting page), ``GET /orders/{id}/invoice`` (the waiting page, or a redirect once the
invoice exists), ``GET /orders/{id}/invoice/events`` (server-sent events: one ``final`` event
when the job is final, comments as heartbeats) and ``POST /callbacks/coinspaid`` (the
provider's callbacks). The events consumer runs in the lifespan, as a background task.
"""

from __future__ import annotations

import asyncio
import hmac
import http
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from examples.fastapi_shop import pages
from examples.fastapi_shop.consumer import consume
from examples.fastapi_shop.orders import Order, Orders
from invoice_worker.aio import AsyncProducer
from invoice_worker.callbacks import MAX_CALLBACK_BYTES
from invoice_worker.config import Settings
from invoice_worker.constants import JobState
from invoice_worker.errors import ConflictError, InvalidRequestError
from invoice_worker.events import AsyncEventConsumer
from invoice_worker.models import EMAIL_RE
from invoice_worker.receiver import CALLBACK_PATH, Receiver

log = logging.getLogger(__name__)

#: How long the pay view waits for the invoice before showing the waiting page.
WAIT_SECONDS = 3.0
#: No invoice is created later than this after the click (the customer has gone).
DEADLINE_SECONDS = 120.0
#: A comment line this often keeps proxies from closing the events stream.
HEARTBEAT_SECONDS = 10.0
#: An events stream ends after this many heartbeats and the browser's EventSource reconnects:
#: no answer stays open for long (uvicorn waits for open answers before it shuts down).
STREAM_BEATS = 6
#: On shutdown, the consumer finishes its event for this long, then is cancelled.
STOP_SECONDS = 5.0
CSRF_COOKIE = "shop_csrf"
_MAX_FORM_BYTES = 4096


@dataclass(frozen=True)
class ShopConfig:
    """The shop's own settings (``SHOP_*``); the invoice ones are ``INVOICE_*`` (Settings)."""

    #: The SQLite file (created on first start; by default next to this module).
    database: Path
    #: Where customers come back after paying: ``url_success``/``url_failed`` of each invoice.
    #: The provider requires https and a public domain name, so a local shop keeps the default.
    public_url: str
    #: The events stream's consumer group: one per shop, so that each shop gets every event.
    group: str
    #: This host's name in that group.
    consumer: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ShopConfig:
        return cls(
            database=Path(environ.get("SHOP_DATABASE") or Path(__file__).parent / "shop.sqlite3"),
            public_url=environ.get("SHOP_PUBLIC_URL", "https://shop.example.com").rstrip("/"),
            group=environ.get("SHOP_EVENTS_GROUP", "fastapi-shop"),
            consumer=environ.get("SHOP_EVENTS_CONSUMER") or socket.gethostname(),
        )


def invoice_request(order: Order, public_url: str) -> dict[str, Any]:
    """The create-invoice request of ``order``."""
    back = f"{public_url}/orders/{order.id}"
    return {
        "foreign_id": order.foreign_id,
        "title": f"Order #{order.id}",
        "description": order.title,
        "currency": order.currency,
        "amount": str(order.amount),
        "timer": True,
        "url_success": back,
        "url_failed": back,
        "email_user": order.email,
    }


def csrf_token(request: Request) -> str:
    """This browser's form token: the cookie's, or a new one (set by ``with_token``)."""
    return request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(32)


def with_token(response: Response, request: Request, token: str) -> Response:
    if request.cookies.get(CSRF_COOKIE) != token:
        secure = request.url.scheme == "https"
        response.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="lax", secure=secure)
    return response


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body as it arrived, read no further than ``limit`` bytes (413 beyond,
    whatever its Content-Length says)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, "request body too large")
        chunks.append(chunk)
    return b"".join(chunks)


async def checked_form(request: Request) -> dict[str, str]:
    """The posted form, once its token matches the cookie's (403 otherwise).

    Double submit: a page of another site can neither read the cookie nor, SameSite=Lax, make
    the browser send it with a cross-site POST.
    """
    body = (await read_body(request, _MAX_FORM_BYTES)).decode("utf-8", "replace")
    form = {name: values[0] for name, values in parse_qs(body).items()}
    cookie = request.cookies.get(CSRF_COOKIE, "")
    if not cookie or not hmac.compare_digest(cookie.encode(), form.get("csrf", "").encode()):
        raise HTTPException(403, "form token missing or not this browser's; reload the page")
    return form


class Shop:
    """The shop's collaborators and its routes (bound methods, registered by ``create_app``)."""

    def __init__(self, config: ShopConfig, settings: Settings) -> None:
        self.config = config
        self.orders = Orders(config.database)
        self.producer = AsyncProducer(settings)
        self.receiver = Receiver(settings)
        self.consumer = AsyncEventConsumer.from_settings(
            settings, group=config.group, consumer=config.consumer
        )

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """Create the table, run the events consumer; stop it, then close the connections."""
        await self.orders.create_table()
        stop = asyncio.Event()
        task = asyncio.create_task(consume(self.orders, self.consumer, stop), name="consumer")
        log.info("events consumer %r of %r started", self.config.consumer, self.config.group)
        try:
            yield
        finally:
            stop.set()
            try:
                await asyncio.wait_for(task, STOP_SECONDS)  # cancels it on a timeout
            except TimeoutError:
                log.warning("events consumer cancelled after %.0f s", STOP_SECONDS)
            await self.consumer.aclose()
            await self.producer.aclose()

    async def _order(self, order_id: int) -> Order:
        order = await self.orders.get(order_id)
        if order is None:
            raise HTTPException(404, "no such order")
        return order

    async def index(self, request: Request) -> Response:
        token = csrf_token(request)
        return with_token(pages.index(await self.orders.latest(), token), request, token)

    async def place(self, request: Request) -> Response:
        form = await checked_form(request)
        email = form.get("email", "").strip()
        # The invoice request's own rule, checked now: an order it refuses could never be paid.
        if len(email) > 254 or not EMAIL_RE.fullmatch(email):
            return pages.problem("Cannot place this order", "Give a valid e-mail address.", 422)
        order = await self.orders.place(email)
        return RedirectResponse(f"/orders/{order.id}", status_code=303)

    async def show(self, request: Request, order_id: int) -> Response:
        token = csrf_token(request)
        return with_token(pages.order_page(await self._order(order_id), token), request, token)

    async def pay(self, request: Request, order_id: int) -> Response:
        """Enqueue the invoice (again: idempotent), then to it, or to the waiting page."""
        await checked_form(request)
        order = await self._order(order_id)
        try:
            await self.producer.enqueue(
                invoice_request(order, self.config.public_url),
                deadline=time.time() + DEADLINE_SECONDS,
            )
        except InvalidRequestError as exc:
            return pages.problem(
                "Cannot pay this order", "Its invoice breaks a rule:", 422, errors=exc.errors
            )
        except ConflictError:
            return pages.problem("Cannot pay this order", "it changed since its invoice", 409)
        record = await self.producer.wait(order.foreign_id, WAIT_SECONDS)
        if record is not None and record.state is JobState.CREATED and record.url:
            return RedirectResponse(record.url, status_code=303)
        return RedirectResponse(f"/orders/{order.id}/invoice", status_code=303)

    async def invoice(self, order_id: int) -> Response:
        """The invoice page once it exists, else the waiting page (or why there is none)."""
        order = await self._order(order_id)
        record = await self.producer.get(order.foreign_id)
        if record is None:
            return RedirectResponse(f"/orders/{order.id}", status_code=303)
        if record.state is JobState.CREATED and record.url:
            return RedirectResponse(record.url, status_code=303)
        if record.final:
            return pages.failed_page(order, record.error_code or record.state)
        return pages.waiting_page(order)

    async def invoice_events(self, order_id: int) -> Response:
        """Server-sent events: ``final`` once the job is final, a comment every heartbeat."""
        order = await self._order(order_id)

        async def stream() -> AsyncIterator[str]:
            yield "retry: 2000\n\n"
            for _ in range(STREAM_BEATS):
                record = await self.producer.wait(order.foreign_id, HEARTBEAT_SECONDS)
                if record is None or record.final:
                    yield f"event: final\ndata: {record.state if record else 'unknown'}\n\n"
                    return
                yield ": waiting\n\n"

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def callback(self, request: Request) -> Response:
        """The provider's callbacks: no form token, the provider signs them (checked over
        these exact bytes); the receiver blocks on Redis, so it runs in a thread."""
        body = await read_body(request, MAX_CALLBACK_BYTES)
        status, answer = await run_in_threadpool(self.receiver.handle, body, request.headers.raw)
        return Response(answer, status_code=status, media_type="application/json")


async def error_page(request: Request, exc: Exception) -> Response:
    """HTTP errors (404, 403, 413) as pages, not FastAPI's JSON."""
    assert isinstance(exc, StarletteHTTPException)
    title = http.HTTPStatus(exc.status_code).phrase
    return pages.problem(title, str(exc.detail), exc.status_code)


def create_app(config: ShopConfig | None = None, settings: Settings | None = None) -> FastAPI:
    """The shop, configured from ``SHOP_*`` and ``INVOICE_*`` unless given (uvicorn's
    ``--factory`` calls it with neither).

    Raises:
        ConfigError: the ``INVOICE_*`` settings are invalid, or the API key or secret is
            missing (the callback receiver needs them).
    """
    shop = Shop(config or ShopConfig.from_env(), settings or Settings.load())
    app = FastAPI(title="Coffee shop", lifespan=shop.lifespan, docs_url=None, redoc_url=None)
    app.add_exception_handler(StarletteHTTPException, error_page)
    app.add_api_route("/", shop.index, methods=["GET"])
    app.add_api_route("/orders", shop.place, methods=["POST"])
    app.add_api_route("/orders/{order_id}", shop.show, methods=["GET"])
    app.add_api_route("/orders/{order_id}/pay", shop.pay, methods=["POST"])
    app.add_api_route("/orders/{order_id}/invoice", shop.invoice, methods=["GET"])
    app.add_api_route("/orders/{order_id}/invoice/events", shop.invoice_events, methods=["GET"])
    app.add_api_route(CALLBACK_PATH, shop.callback, methods=["POST"])
    return app
