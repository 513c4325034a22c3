"""The Django example shop (examples/django_shop) in a real browser, on a real stack.

Redis, the sandbox, a worker, the shop's runserver and its `consume_invoice_events` command
run as they do from its README; headless Chromium places an order, pays it on the sandbox's
invoice page and comes back to see it paid. INVOICE_SCREENSHOTS=1 writes docs/django-shop-*.png.
"""

from __future__ import annotations

import importlib.util
import sqlite3
import sys
from contextlib import closing
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By

from tests.browser import ROOT, needs_chromium, screenshot, text, wait_until
from tests.examples.harness import ShopStack, pay_in_full

pytestmark = [
    needs_chromium,
    pytest.mark.skipif(
        importlib.util.find_spec("django") is None,
        reason="needs the examples extra (pip install -e '.[examples]')",
    ),
]

MANAGE = str(ROOT / "examples" / "django_shop" / "manage.py")


def start_shop(stack: ShopStack, tmp_path: Path) -> None:
    """Migrate a fresh database, start the events consumer and the web server."""
    env = {
        "SHOP_PUBLIC_URL": stack.public_url,
        "SHOP_DATABASE": str(tmp_path / "shop.sqlite3"),
        "SHOP_INVOICE_WAIT": "1",
        "DJANGO_SECRET_KEY": "test-key-of-the-example-shop-browser-test",
    }
    stack.run([sys.executable, MANAGE, "migrate", "--noinput"], env=env)
    consumer = [sys.executable, MANAGE, "consume_invoice_events", "--consumer", "test-1"]
    stack.start("consumer", consumer, env=env, ready="consuming")
    web = [sys.executable, MANAGE, "runserver", "--noreload", f"127.0.0.1:{stack.port}"]
    stack.start_shop(web, env=env)


def place_order(browser: webdriver.Chrome, stack: ShopStack, description: str) -> str:
    """Fill in the new-order form; the order page's URL."""
    browser.get(stack.public_url + "/")
    browser.find_element(By.NAME, "description").send_keys(description)
    browser.find_element(By.NAME, "amount").send_keys("0.0005")
    browser.find_element(By.NAME, "email").send_keys("buyer@example.com")
    browser.find_element(By.ID, "create").click()
    wait_until(browser, lambda b: text(b, "status") == "new")
    return str(browser.current_url)


def foreign_id(tmp_path: Path, order_id: int) -> str:
    """The invoice foreign_id of an order, from the shop's database (its ref is random)."""
    with closing(sqlite3.connect(tmp_path / "shop.sqlite3")) as db:
        [(ref,)] = db.execute("SELECT ref FROM orders_order WHERE id = ?", (order_id,))
    return f"django-shop-{ref}"


def on_invoice_page(browser: webdriver.Chrome, stack: ShopStack) -> bool:
    return str(browser.current_url).startswith(stack.sandbox.origin + "/invoice/")


def reloaded_status(browser: webdriver.Chrome) -> str:
    browser.refresh()
    return text(browser, "status")


def test_an_order_paid_in_the_browser(
    shop_stack: ShopStack, shop_browser: webdriver.Chrome, tmp_path: Path
) -> None:
    browser = shop_browser
    start_shop(shop_stack, tmp_path)
    # Given a new order
    order_url = place_order(browser, shop_stack, "Two coffees")
    assert order_url == shop_stack.public_url + "/orders/1/"
    screenshot(browser, "django-shop-order")
    # When the payer clicks "Pay with crypto"
    browser.find_element(By.ID, "pay").click()
    # Then they land on the provider's invoice page (the invoice was made within the wait)
    wait_until(browser, lambda b: on_invoice_page(b, shop_stack))
    assert text(browser, "title") == "Order #1"
    # When they pay it in full there and follow its link back to the shop
    pay_in_full(browser, shot="django-shop")
    wait_until(browser, lambda b: b.current_url == order_url)
    # Then the order shows paid, once the consumer has read the confirmed status event
    browser.get(order_url)
    wait_until(browser, lambda b: reloaded_status(b) == "paid", timeout=20)
    screenshot(browser, "django-shop-paid")
    # And the sandbox made one invoice for it, which the provider's callback reported paid
    [invoice] = shop_stack.sandbox.invoices()
    paid_id = foreign_id(tmp_path, 1)
    assert (invoice["foreign_id"], invoice["status"]) == (paid_id, "confirmed")
    # Given a second order whose every create call the provider fails (as many as the retries)
    failing_url = place_order(browser, shop_stack, "A coffee that cannot be paid")
    failing_id = foreign_id(tmp_path, 2)
    assert failing_id != paid_id
    shop_stack.sandbox.script(["503"] * shop_stack.settings.max_attempts, foreign_id=failing_id)
    # When the payer clicks pay, then the order shows failed, after the waiting page if the
    # retries outlast the view's wait
    browser.find_element(By.ID, "pay").click()
    # (the URL alone matches at once: the order page stays until the post is answered)
    wait_until(
        browser, lambda b: b.current_url == failing_url and text(b, "status") == "failed", 15
    )
    assert len(shop_stack.sandbox.invoices()) == 1


def test_a_slow_invoice_goes_through_the_waiting_page(
    shop_stack: ShopStack, shop_browser: webdriver.Chrome, tmp_path: Path
) -> None:
    browser = shop_browser
    start_shop(shop_stack, tmp_path)
    # Given a provider slower than the pay view's wait (1 s)
    shop_stack.slow_provider(2)
    order_url = place_order(browser, shop_stack, "A slow coffee")
    # When the payer clicks "Pay with crypto"
    browser.find_element(By.ID, "pay").click()
    # Then the waiting page shows
    wait_until(browser, lambda b: b.find_elements(By.ID, "waiting"))
    screenshot(browser, "django-shop-waiting")
    # When they go back and click again (the invoice may be ready by then, or not)
    browser.back()
    wait_until(browser, lambda b: b.find_elements(By.ID, "pay"))
    browser.find_element(By.ID, "pay").click()
    # Then they reach the invoice page once it exists
    wait_until(browser, lambda b: on_invoice_page(b, shop_stack), timeout=15)
    # And the order awaits payment, with that one invoice (the second click found the job)
    browser.get(order_url)
    assert text(browser, "status") == "awaiting payment"
    invoice_link = str(browser.find_element(By.ID, "invoice").get_attribute("href"))
    assert invoice_link.startswith(shop_stack.sandbox.origin + "/invoice/")
    assert len(shop_stack.sandbox.invoices()) == 1
