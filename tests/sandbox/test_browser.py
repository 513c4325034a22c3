"""One real browser (Debian's chromium, headless) opens an invoice page and pays it.

Skipped when /usr/bin/chromium or /usr/bin/chromedriver is missing (`.ci/run` installs both);
nothing is downloaded: the driver's path is given, so Selenium Manager never runs.
INVOICE_SCREENSHOTS=1 saves the page to docs/sandbox-invoice.png.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from invoice_worker.client import verify_signature
from invoice_worker.sandbox import Sandbox
from tests.sandbox.receiver import Receiver
from tests.sandbox.test_server import KEY, SECRET, create

ROOT = Path(__file__).resolve().parent.parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=720,900",
)  # fmt: skip

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "driver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def text(browser: webdriver.Chrome, ident: str) -> str:
    return str(browser.find_element(By.ID, ident).text)


def test_paying_in_full_in_a_real_browser(browser: webdriver.Chrome) -> None:
    with (
        Receiver() as receiver,
        Sandbox(KEY, SECRET, callback_url=receiver.url, callback_time_scale=0.001) as sandbox,
        requests.Session() as http,
    ):
        # Given an invoice page open in the browser
        data = create(http, sandbox, title="Order 42 <b>", description="Two books").json()["data"]
        browser.get(data["url"])
        assert (text(browser, "title"), text(browser, "status")) == ("Order 42 <b>", "pending")
        assert text(browser, "amount") == "0.01230000 BTC"
        assert text(browser, "address") == data["address"]
        # Its timer counts down: the inline script runs under the page's CSP
        shown = text(browser, "timer")
        assert re.fullmatch(r"1[45]:\d\d", shown)
        WebDriverWait(browser, 5).until(lambda b: text(b, "timer") != shown)
        if os.environ.get("INVOICE_SCREENSHOTS") == "1":
            browser.save_screenshot(str(ROOT / "docs" / "sandbox-invoice.png"))
        # When the payer clicks "Pay in full"
        browser.find_element(By.ID, "pay-full").click()
        # Then the page shows the invoice confirmed, with nothing left to click
        # The form post reloads the page: an element read just before it can go stale.
        WebDriverWait(browser, 10, ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda b: text(b, "status") == "confirmed"
        )
        assert browser.find_elements(By.TAG_NAME, "button") == []
        assert browser.current_url == data["url"]
        # And the receiver got the signed callbacks
        received = receiver.wait_for(2)
        assert [json.loads(r.body)["status"] for r in received] == ["processing", "confirmed"]
        for r in received:
            assert verify_signature(r.body, r.headers["X-Processing-Signature"], SECRET)
            assert r.headers["X-Processing-Key"] == KEY
        # And the browser saw no error (a CSP violation would be one)
        logs = browser.get_log("browser")  # type: ignore[no-untyped-call]
        severe = [e for e in logs if e["level"] == "SEVERE"]
        assert severe == []
