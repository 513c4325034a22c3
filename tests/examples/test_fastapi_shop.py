"""The FastAPI shop (examples/fastapi_shop) in a real browser: order, pay, paid.

The shop runs as its README says (uvicorn, the app factory), against the harness's private
stack (Redis, sandbox, a real worker); its events consumer runs in its lifespan. Headless
Chromium opens the shop's public https origin, clicks "Pay with crypto", pays on the sandbox's
invoice page and follows its link back. INVOICE_SCREENSHOTS=1 writes docs/fastapi-shop-*.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import requests
from selenium import webdriver
from selenium.webdriver.common.by import By

from tests.browser import needs_chromium, screenshot, severe_console_errors, text, wait_until
from tests.examples.harness import ShopStack, pay_in_full

ROOT = Path(__file__).resolve().parent.parent.parent

pytestmark = [pytest.mark.e2e, needs_chromium]


def start_shop(stack: ShopStack, tmp_path: Path) -> None:
    """The README's uvicorn command, on the stack's port, with a database of its own."""
    argv = [
        sys.executable, "-m", "uvicorn", "--factory", "examples.fastapi_shop.app:create_app",
        "--app-dir", str(ROOT), "--host", "127.0.0.1", "--port", str(stack.port),
        "--timeout-graceful-shutdown", "2",
    ]  # fmt: skip
    env = {"SHOP_DATABASE": str(tmp_path / "shop.sqlite3"), "SHOP_PUBLIC_URL": stack.public_url}
    stack.start_shop(argv, env=env)


def place_order(browser: webdriver.Chrome, stack: ShopStack) -> str:
    """Order from the shop's front page; the order page's URL."""
    browser.get(stack.public_url + "/")
    browser.find_element(By.ID, "order").click()
    wait_until(browser, lambda b: text(b, "status") == "new")
    return str(browser.current_url)


def on_invoice_page(browser: webdriver.Chrome, stack: ShopStack) -> bool:
    return str(browser.current_url).startswith(f"http://127.0.0.1:{stack.sandbox.port}/invoice/")


def test_order_pay_and_see_it_paid(
    shop_stack: ShopStack, shop_browser: webdriver.Chrome, tmp_path: Path
) -> None:
    start_shop(shop_stack, tmp_path)
    # Given an order, new
    order_url = place_order(shop_browser, shop_stack)
    assert order_url == f"{shop_stack.public_url}/orders/1"
    assert text(shop_browser, "amount") == "0.00042 BTC"
    screenshot(shop_browser, "fastapi-shop-order")
    # When the customer clicks "Pay with crypto"
    shop_browser.find_element(By.ID, "pay").click()
    # Then the shop redirects to the sandbox's invoice page within the short wait
    wait_until(shop_browser, lambda b: on_invoice_page(b, shop_stack))
    # And paid there, the link back leads to the order, which the events consumer marks paid
    pay_in_full(shop_browser, shot="fastapi-shop")
    wait_until(shop_browser, lambda b: text(b, "status") == "paid", timeout=15)
    assert shop_browser.current_url == order_url
    assert shop_browser.find_elements(By.ID, "pay") == []
    screenshot(shop_browser, "fastapi-shop-paid")
    # And the provider made one invoice for it, and the browser saw no error
    [invoice] = shop_stack.sandbox.invoices()
    assert invoice["foreign_id"].startswith("fastapi-shop-")
    assert shop_stack.sandbox.create_calls(invoice["foreign_id"]) == 1
    assert severe_console_errors(shop_browser) == []
    # And a POST without this browser's form token is refused, and an order that could
    # never be paid is not placed
    with requests.Session() as http:
        answer = http.post(f"{shop_stack.base_url}/orders/1/pay", data={"csrf": "x"}, timeout=5)
        assert answer.status_code == 403
        http.get(shop_stack.base_url + "/", timeout=5)
        form = {"csrf": http.cookies["shop_csrf"], "email": "not an address"}
        answer = http.post(f"{shop_stack.base_url}/orders", data=form, timeout=5)
        assert (answer.status_code, answer.url) == (422, f"{shop_stack.base_url}/orders")


def test_a_slow_invoice_goes_through_the_waiting_page(
    shop_stack: ShopStack, shop_browser: webdriver.Chrome, tmp_path: Path
) -> None:
    start_shop(shop_stack, tmp_path)
    order_url = place_order(shop_browser, shop_stack)
    # Given a provider slower than the pay view's wait (3 s)
    shop_stack.slow_provider(6)
    # When the customer clicks "Pay with crypto"
    shop_browser.find_element(By.ID, "pay").click()
    # Then the waiting page shows, following the job with server-sent events
    waiting_url = f"{shop_stack.public_url}/orders/1/invoice"
    wait_until(shop_browser, lambda b: b.current_url == waiting_url)
    assert "Creating your invoice" in text(shop_browser, "waiting")
    screenshot(shop_browser, "fastapi-shop-waiting")
    # And moves on to the invoice page by itself once the invoice exists
    wait_until(shop_browser, lambda b: on_invoice_page(b, shop_stack), timeout=15)
    # And an invoice paid short fails, and the order with it
    shop_browser.find_element(By.ID, "pay-less").click()
    wait_until(shop_browser, lambda b: text(b, "status") == "failed")
    shop_browser.find_element(By.ID, "back").click()
    wait_until(shop_browser, lambda b: text(b, "status") == "failed", timeout=15)
    assert shop_browser.current_url == order_url
    assert "paid less" in text(shop_browser, "error")
    assert severe_console_errors(shop_browser) == []
