"""Shared fixtures: a private redis-server, the sandbox provider, settings and worker processes.

Nothing here touches the machine's own Redis on 6379: every test talks to a server this
session started on a free port, under a key prefix and queue of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

from invoice_worker.client import ProviderClient
from invoice_worker.config import Settings
from invoice_worker.embedded import EmbeddedRedis
from invoice_worker.sandbox import Sandbox

KEY = "test-key"
SECRET = "test-secret"
MIN_AMOUNT = Decimal("10")  # EUR, like the real minimum


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(KEY, SECRET, min_amount=MIN_AMOUNT) as server:
        yield server


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


def settings_with(settings: Settings, **overrides: Any) -> Settings:
    """A validated copy of ``settings`` (model_copy would skip validation)."""
    values = {name: getattr(settings, name) for name in type(settings).model_fields}
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


class WorkerProcess:
    """A real ``celery -A invoice_worker.worker worker`` child process."""

    def __init__(
        self, settings: Settings, log_dir: Path, *, pool: str = "threads", concurrency: int = 4
    ) -> None:
        self.settings = settings
        self.name = f"w{uuid.uuid4().hex[:6]}"
        self.log_path = log_dir / f"{self.name}.log"
        self.argv = [
            sys.executable, "-m", "celery", "-A", "invoice_worker.worker", "worker",
            "-P", pool, "-c", str(concurrency), "-Q", settings.queue, "-n", f"{self.name}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO",
        ]  # fmt: skip
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("INVOICE_")}
        self.env.update(settings.to_env())
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> WorkerProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            cwd=self.log_path.parent, start_new_session=True,
        )  # fmt: skip
        log.close()
        if wait:
            self.wait_for("ready.")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited ({self.process.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker did not log {text!r}:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (prefork children too)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Any]:
    """Factory: ``start_worker(settings, pool=..., concurrency=...)``; all stopped at the end."""
    workers: list[WorkerProcess] = []

    def start(settings: Settings, **kwargs: Any) -> WorkerProcess:
        worker = WorkerProcess(settings, tmp_path, **kwargs)
        workers.append(worker)
        return worker.start()

    yield start
    for worker in workers:
        worker.stop()
