"""The FastAPI shop's HTTP edges without a browser: the shop as its README runs it (uvicorn),
against the harness's private Redis and sandbox (no worker: nothing here creates an invoice)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from invoice_worker.callbacks import MAX_CALLBACK_BYTES
from invoice_worker.devstack.embedded import EmbeddedRedis
from invoice_worker.receiver import CALLBACK_PATH
from invoice_worker.sandbox import Sandbox
from tests.conftest import KEY, SECRET, make_settings
from tests.examples.harness import ShopStack
from tests.examples.test_fastapi_shop import start_shop


@pytest.fixture
def stack(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[ShopStack]:
    with Sandbox(KEY, SECRET) as sandbox:
        stack = ShopStack(make_settings(redis_server.url, sandbox.url), sandbox, tmp_path)
        try:
            yield stack
        finally:
            stack.stop()


def test_a_callback_body_over_the_receivers_limit_is_refused_unread(
    stack: ShopStack, tmp_path: Path
) -> None:
    # Review: the callback route read any body whole into memory before checking anything
    # (the receiver's own WSGI app answers 413 past MAX_CALLBACK_BYTES).
    start_shop(stack, tmp_path)
    url = stack.base_url + CALLBACK_PATH
    headers = {"X-Processing-Key": KEY, "X-Processing-Signature": "0" * 128}
    big = requests.post(url, data=b"{" * (MAX_CALLBACK_BYTES + 1), headers=headers, timeout=10)
    assert big.status_code == 413
    # A body within the limit still reaches the receiver (which refuses this signature)
    small = requests.post(url, data=b"{}", headers=headers, timeout=10)
    assert small.status_code == 403
