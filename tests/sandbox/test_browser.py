"""One real browser (Debian's chromium, headless, see tests/browser.py) opens an invoice page
and pays it. INVOICE_SCREENSHOTS=1 saves the page to docs/sandbox-invoice.png.
"""

from __future__ import annotations

import json
import re

import requests
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from invoice_worker.client import verify_signature
from invoice_worker.sandbox import Sandbox
from tests.browser import needs_chromium, screenshot, severe_console_errors, text, wait_until
from tests.sandbox.receiver import Receiver
from tests.sandbox.test_server import KEY, SECRET, create

pytestmark = needs_chromium


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
        screenshot(browser, "sandbox-invoice")
        # When the payer clicks "Pay in full"
        browser.find_element(By.ID, "pay-full").click()
        # Then the page shows the invoice confirmed, with nothing left to click
        # The form post reloads the page: an element read just before it can go stale.
        wait_until(browser, lambda b: text(b, "status") == "confirmed")
        assert browser.find_elements(By.TAG_NAME, "button") == []
        assert browser.current_url == data["url"]
        # And the receiver got the signed callbacks
        received = receiver.wait_for(2)
        assert [json.loads(r.body)["status"] for r in received] == ["processing", "confirmed"]
        for r in received:
            assert verify_signature(r.body, r.headers["X-Processing-Signature"], SECRET)
            assert r.headers["X-Processing-Key"] == KEY
        # And the browser saw no error (a CSP violation would be one)
        assert severe_console_errors(browser) == []
