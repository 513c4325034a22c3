"""Shared fixtures: a private redis-server, the sandbox provider, settings and worker processes.

Nothing here touches the machine's own Redis on 6379: every test talks to a server this
session started on a free port, under a key prefix and queue of its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
from selenium import webdriver

from invoice_worker.client import ProviderClient
from invoice_worker.config import Settings
from invoice_worker.devstack.embedded import EmbeddedRedis
from invoice_worker.devstack.processes import ChildProcess, worker_process
from invoice_worker.devstack.sentinel import SentinelCluster
from invoice_worker.job import InvoiceJob
from invoice_worker.message import TaskMessage
from invoice_worker.models import parse_request
from invoice_worker.sandbox import Sandbox
from invoice_worker.store import JobStore
from tests.browser import chromium

KEY = "test-key"
SECRET = "test-secret"
MIN_AMOUNT = Decimal("10")  # EUR, like the real minimum


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def sentinel_cluster() -> Iterator[SentinelCluster]:
    """A private primary, replica and three sentinels (a few processes, up in ~0.1 s)."""
    if not SentinelCluster.available():
        pytest.skip("needs redis-server (Sentinel runs in it); fakeredis has no Sentinel")
    with SentinelCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(KEY, SECRET, min_amount=MIN_AMOUNT) as server:
        yield server


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """Headless Chromium (tests/browser.py); mark the test `needs_chromium`."""
    with chromium(tmp_path) as driver:
        yield driver


def make_settings(redis_url: str, api_url: str, **overrides: Any) -> Settings:
    """Settings for one test: private prefix/queue/stream, short timeouts, fast retries."""
    tag = uuid.uuid4().hex[:8]
    values: dict[str, Any] = {
        "api_url": api_url,
        "api_key": KEY,
        "api_secret": SECRET,
        "broker_url": redis_url,
        "redis_url": redis_url,
        "key_prefix": f"t{tag}:",
        "events_stream": f"t{tag}:events",
        "queue": f"invoices-{tag}",
        "connect_timeout": 0.5,
        "read_timeout": 1.0,
        "retry_base": 0.05,
        "retry_cap": 2.0,
        "max_attempts": 6,
        "lease_seconds": 4.0,
        "visibility_timeout": 6,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def settings(redis_server: EmbeddedRedis, sandbox: Sandbox) -> Settings:
    return make_settings(redis_server.url, sandbox.url)


@pytest.fixture
def client(settings: Settings) -> Iterator[ProviderClient]:
    c = ProviderClient.from_settings(settings)
    yield c
    c.close()


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield c
    c.close()


def new_id() -> str:
    return f"order-{uuid.uuid4().hex[:12]}"


def request_data(**overrides: Any) -> dict[str, Any]:
    """A valid create request (a fresh foreign_id each call)."""
    data: dict[str, Any] = {
        "timer": True,
        "title": "Order #1",
        "description": "Two coffees",
        "foreign_id": new_id(),
        "currency": "BTC",
        "amount": "0.0123",
        "url_success": "https://shop.example.com/paid",
        "url_failed": "https://shop.example.com/failed",
        "email_user": "buyer@example.com",
    }
    data.update(overrides)
    return data


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Any]:
    """Factory: ``start_worker(settings, pool=..., concurrency=...)``; all stopped at the end."""
    workers: list[ChildProcess] = []

    def start(settings: Settings, pool: str = "threads", concurrency: int = 4) -> ChildProcess:
        worker = worker_process(settings, tmp_path, pool=pool, concurrency=concurrency)
        workers.append(worker)
        return worker.start(ready="ready.")

    yield start
    for worker in workers:
        worker.stop()


def make_job(settings: Settings, **overrides: Any) -> InvoiceJob:
    """The job function with real Redis and HTTP, and jitter pinned to zero."""
    settings = settings.replace(**overrides)
    store = JobStore.from_settings(settings)
    return InvoiceJob(store, ProviderClient.from_settings(settings), settings, rand=lambda: 0.0)


def job_kwargs(**overrides: Any) -> dict[str, Any]:
    """Task kwargs for a valid request (``deadline`` goes to the message, the rest to it)."""
    deadline = overrides.pop("deadline", None)
    return TaskMessage(request=parse_request(request_data(**overrides)), deadline=deadline).kwargs()


def live(sandbox: Sandbox, fid: str) -> list[dict[str, Any]]:
    """The sandbox's live (not cancelled) invoices for ``fid`` and its derived ids."""
    return [
        i for i in sandbox.invoices()
        if (i["foreign_id"] == fid or i["foreign_id"].startswith(fid + "~r")) and not i["cancelled"]
    ]  # fmt: skip
