"""The example shops' test harness: a private stack and a shop server process, any framework.

`shop_stack` (conftest.py) gives each test a `ShopStack`: the session's private Redis under a
prefix, queue and events stream of the test's own; a sandbox provider of its own (key and secret
`KEY`/`SECRET`, callback retries scaled by `CALLBACK_TIME_SCALE`); a real Celery worker; and
the shop's public origin, ``stack.public_url`` (``https://shop.example.test:<port>``, a TLS
front on loopback, see tls.py: the provider takes only https domain URLs to send the payer
back to). The test then starts its shop with `start_shop(argv)`: any command that serves plain
HTTP on loopback ``stack.port``, run with the `INVOICE_*` environment that points at the stack
(`stack.env()`); tell the shop its public URL (e.g. ``SHOP_PUBLIC_URL``) in `env`. The sandbox
sends its callbacks to the shop's receiver, straight to ``stack.base_url`` (loopback http).
`shop_browser` is a Chromium that reaches the public URL. Other shop processes (an events
consumer) start with `start`, one-off commands (migrations) run with `run`; all stop at the
end of the test, their logs in the test's tmp_path (shown when a start fails).

In the browser (tests/browser.py), `pay_in_full` pays the sandbox's invoice page the shop
redirected to and follows its link back to the shop.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import requests
from selenium import webdriver
from selenium.webdriver.common.by import By

from invoice_worker.config import Settings
from invoice_worker.devstack.embedded import free_port
from invoice_worker.devstack.processes import ChildProcess, child_env, worker_process
from invoice_worker.receiver import CALLBACK_PATH
from invoice_worker.sandbox import Faults, Sandbox
from tests.browser import screenshot, text, wait_until
from tests.conftest import KEY, SECRET
from tests.examples.tls import TLSFront, self_signed

__all__ = ["CALLBACK_TIME_SCALE", "KEY", "SECRET", "ShopStack", "pay_in_full"]

#: The provider's ~24 h of callback retries in ~88 s: a refused callback comes back in 0.06 s.
CALLBACK_TIME_SCALE = 0.001


class ShopStack:
    """Redis, the sandbox, a worker, and the shop processes a test starts; `stop` ends them."""

    def __init__(self, settings: Settings, sandbox: Sandbox, log_dir: Path) -> None:
        self.settings = settings
        self.sandbox = sandbox
        self.log_dir = log_dir
        #: The port the shop must listen on (loopback), and its origin.
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.front = TLSFront(self.port, *self_signed(log_dir)).start()
        #: What the payer's browser opens: ``https://shop.example.test:<port>``.
        self.public_url = self.front.url
        self.processes: list[ChildProcess] = []

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """This environment without ``INVOICE_*``, plus the stack's, plus `extra`."""
        env = child_env(self.settings)
        env.update(extra or {})
        return env

    def start_worker(self, concurrency: int = 4) -> ChildProcess:
        """A real Celery worker on the stack's queue, up when it returns."""
        worker = worker_process(self.settings, self.log_dir, concurrency=concurrency)
        self.processes.append(worker)
        return worker.start(ready="ready.")

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        ready: str | None = None,
        timeout: float = 30,
    ) -> ChildProcess:
        """Start `argv` (cwd: the log dir; give absolute paths) with `env()` plus `env`; with
        `ready`, wait until its output shows that text."""
        process = ChildProcess(name, list(argv), self.env(env), self.log_dir)
        self.processes.append(process)
        return process.start(ready=ready, timeout=timeout)

    def start_shop(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        ready_path: str = "/",
        callback_path: str = CALLBACK_PATH,
        timeout: float = 30,
    ) -> ChildProcess:
        """Start the shop server (`argv` must serve on ``self.port``), wait until
        `ready_path` answers (any status), and send the sandbox's callbacks to
        `callback_path` on it."""
        shop = self.start("shop", argv, env=env)
        deadline = time.monotonic() + timeout
        while True:
            try:
                requests.get(self.base_url + ready_path, timeout=2)
                break
            except requests.ConnectionError:
                if not shop.alive:
                    raise RuntimeError(f"the shop exited:\n{shop.log()[-3000:]}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the shop is not up:\n{shop.log()[-3000:]}") from None
                time.sleep(0.1)
        url = self.base_url + callback_path
        self.sandbox.set_callbacks(url=url, time_scale=CALLBACK_TIME_SCALE)
        return shop

    def run(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 60
    ) -> str:
        """Run a one-off command (e.g. migrations) to completion; its output.

        Raises:
            RuntimeError: with the output, if it fails.
        """
        done = subprocess.run(
            list(argv), env=self.env(env), cwd=self.log_dir, capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"{argv} exited {done.returncode}:\n{done.stdout}{done.stderr}")
        return done.stdout

    def slow_provider(self, seconds: float) -> None:
        """Make every create call take `seconds` (below the stack's read timeout, 8 s)."""
        self.sandbox.set_faults(Faults(latency_ms=seconds * 1000))

    def stop(self) -> None:
        """Stop every process this stack started, last first."""
        for process in reversed(self.processes):
            process.stop()
        self.front.stop()


def pay_in_full(browser: webdriver.Chrome, shot: str | None = None) -> None:
    """On the sandbox's invoice page: click "Pay in full", wait for it to show the invoice
    confirmed, follow its "Back to the shop" link (the request's ``url_success``).

    With `shot`, screenshots ``<shot>-invoice`` (before paying) and ``<shot>-confirmed``.
    """
    wait_until(browser, lambda b: text(b, "status") == "pending")
    if shot:
        screenshot(browser, f"{shot}-invoice")
    browser.find_element(By.ID, "pay-full").click()
    wait_until(browser, lambda b: text(b, "status") == "confirmed")
    if shot:
        screenshot(browser, f"{shot}-confirmed")
    browser.find_element(By.ID, "back").click()
