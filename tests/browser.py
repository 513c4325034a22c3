"""The one headless Chromium the browser tests drive: Debian's chromium and chromium-driver.

Nothing is downloaded: the driver's path is given, so Selenium Manager never runs. Tests that
need it are marked `needs_chromium` (skipped without the two binaries; `.ci/run` installs
them) and take the `browser` fixture (tests/conftest.py). INVOICE_SCREENSHOTS=1 makes
`screenshot` write docs/<name>.png, the pictures the README shows.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=720,900",
)  # fmt: skip

needs_chromium = pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


@contextmanager
def chromium(work_dir: Path, extra_flags: Sequence[str] = ()) -> Iterator[webdriver.Chrome]:
    """A headless Chromium with its profile and driver log under `work_dir`; quit on exit."""
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, *extra_flags, f"--user-data-dir={work_dir / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(work_dir / "driver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def text(browser: webdriver.Chrome, ident: str) -> str:
    """The visible text of the element with id `ident`."""
    return str(browser.find_element(By.ID, ident).text)


def wait_until(
    browser: webdriver.Chrome, condition: Callable[[webdriver.Chrome], object], timeout: float = 10
) -> None:
    """Wait for `condition`, reading past stale elements: a form post or a redirect replaces
    the page under an element read just before it."""

    def check(driver: webdriver.Chrome) -> object:
        try:
            return condition(driver)
        except WebDriverException as exc:
            # Chromedriver's other word for a stale element, when the page is replaced between
            # finding an element and reading it: an "unknown error", not a stale reference.
            if "does not belong to the document" in str(exc.msg):
                return False
            raise

    wait = WebDriverWait(browser, timeout, ignored_exceptions=(StaleElementReferenceException,))
    wait.until(check)


def screenshot(browser: webdriver.Chrome, name: str) -> None:
    """With INVOICE_SCREENSHOTS=1, save the page to docs/<name>.png."""
    if os.environ.get("INVOICE_SCREENSHOTS") == "1":
        browser.save_screenshot(str(DOCS / f"{name}.png"))


def severe_console_errors(browser: webdriver.Chrome) -> list[dict[str, object]]:
    """The browser console's errors so far (a CSP violation is one)."""
    logs = browser.get_log("browser")  # type: ignore[no-untyped-call]
    return [entry for entry in logs if entry["level"] == "SEVERE"]
