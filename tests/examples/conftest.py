"""Fixtures of the example shops' browser tests (see harness.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver

from invoice_worker.devstack.embedded import EmbeddedRedis
from invoice_worker.sandbox import Sandbox
from tests.browser import chromium
from tests.conftest import KEY, SECRET, make_settings
from tests.examples.harness import CALLBACK_TIME_SCALE, ShopStack
from tests.examples.tls import BROWSER_FLAGS


@pytest.fixture
def shop_stack(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[ShopStack]:
    """A private stack with its worker running; start the shop with `start_shop`."""
    with Sandbox(KEY, SECRET, callback_time_scale=CALLBACK_TIME_SCALE) as sandbox:
        # A read timeout above `slow_provider`'s latencies; the lease must outlast two calls.
        settings = make_settings(
            redis_server.url, sandbox.url, read_timeout=8.0, lease_seconds=20.0
        )
        stack = ShopStack(settings, sandbox, tmp_path)
        try:
            stack.start_worker()
            yield stack
        finally:
            stack.stop()


@pytest.fixture
def shop_browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """Headless Chromium (tests/browser.py) that reaches ``shop_stack.public_url``."""
    with chromium(tmp_path, BROWSER_FLAGS) as driver:
        yield driver
