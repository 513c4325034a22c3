"""The invoice page over real HTTP: what it shows, what it escapes, what its forms do."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

import pytest
import requests

from invoice_worker.sandbox import Sandbox
from invoice_worker.sandbox.pages import BUTTONS
from tests.sandbox.receiver import Receiver
from tests.sandbox.test_callbacks import pay, settled
from tests.sandbox.test_payments import SEQUENCES
from tests.sandbox.test_server import KEY, SECRET, cancel, create

TWINS = ("by-page", "by-admin")
VOID = {"meta", "link", "img", "input", "br", "hr"}
HOSTILE_TITLE = "<script>alert(1)</script>"
HOSTILE_DESCRIPTION = "\"><img src=x onerror=alert(2)> & 'quotes' </dd><form action=//evil>"


class Page(HTMLParser):
    """What a browser would take from the page: texts by element id, forms and their buttons."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.texts: dict[str, str] = {}
        self.attrs: dict[str, dict[str, str | None]] = {}
        self.forms: list[dict[str, Any]] = []
        self.tags: list[str] = []
        self.scripts: list[str] = []
        self._open: list[tuple[str, str | None]] = []  # (tag, id) of the elements open
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        values = dict(attrs)
        if (ident := values.get("id")) is not None:
            self.attrs[ident] = values
            self.texts.setdefault(ident, "")
        if tag == "form":
            self.forms.append({**values, "buttons": []})
        if tag == "button" and self.forms:
            self.forms[-1]["buttons"].append(values)
        if tag not in VOID:
            self._open.append((tag, ident))

    def handle_endtag(self, tag: str) -> None:
        while self._open and self._open.pop()[0] != tag:
            pass

    def handle_data(self, data: str) -> None:
        if self._open and self._open[-1][0] == "script":
            self.scripts.append(data)
        for _, ident in self._open:
            if ident is not None:
                self.texts[ident] += data


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:
        yield server


@pytest.fixture
def sandbox(receiver: Receiver) -> Iterator[Sandbox]:
    with Sandbox(KEY, SECRET, callback_url=receiver.url, callback_time_scale=0.001) as server:
        yield server


def open_page(http: requests.Session, url: str) -> tuple[requests.Response, Page]:
    response = http.get(url, timeout=5)
    return response, Page(response.text)


def submit(http: requests.Session, url: str, page: Page, mode: str) -> requests.Response:
    """Click the button of `mode` as a browser would: POST the form's field to its action."""
    (form,) = page.forms
    (button,) = [b for b in form["buttons"] if b["value"] == mode]
    assert form["method"] == "post"
    target = requests.compat.urljoin(url, form["action"])
    return http.post(target, data={button["name"]: button["value"]}, timeout=5)


def test_the_page_shows_the_invoice(sandbox: Sandbox, http: requests.Session) -> None:
    data = create(http, sandbox, description="Two books\nand a pen").json()["data"]
    response, page = open_page(http, data["url"])
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert page.texts["title"] == "Order 42"
    assert page.texts["description"] == "Two books\nand a pen"
    assert page.texts["amount"] == "0.01230000 BTC"
    assert page.texts["address"] == data["address"]
    assert page.texts["status"] == "pending"
    seconds = int(page.attrs["timer"]["data-seconds-left"] or "")
    assert 895 <= seconds <= 900
    assert re.fullmatch(r"1[45]:\d\d", page.texts["timer"])
    assert "sender-amount" not in page.texts  # paid in the invoice's own currency
    assert [(b["value"], b["id"]) for b in page.forms[0]["buttons"]] == [
        (mode, f"pay-{mode}") for mode in BUTTONS
    ]
    # Nothing loaded from elsewhere: no src or href attributes, one inline style and script.
    assert not [v for attrs in page.attrs.values() for k, v in attrs.items() if k in ("src",)]
    assert page.tags.count("script") == page.tags.count("style") == 1
    assert "link" not in page.tags
    assert "img" not in page.tags


def test_a_page_without_a_timer_and_in_another_currency(
    sandbox: Sandbox, http: requests.Session
) -> None:
    data = create(http, sandbox, timer=False, currency="EUR", amount="26", sender_currency="BTC")
    _, page = open_page(http, data.json()["data"]["url"])
    assert page.texts["amount"] == "26.00000000 EUR"
    assert page.texts["sender-amount"].endswith(" BTC")
    assert page.texts["status"] == "created"
    assert page.texts["timer-row"].startswith("no timer")
    assert "timer" not in page.attrs


def test_hostile_merchant_input_is_escaped(sandbox: Sandbox, http: requests.Session) -> None:
    data = create(http, sandbox, title=HOSTILE_TITLE, description=HOSTILE_DESCRIPTION)
    response, page = open_page(http, data.json()["data"]["url"])
    html = response.text
    # Shown as text, never as markup
    assert page.texts["title"] == HOSTILE_TITLE
    assert page.texts["description"] == HOSTILE_DESCRIPTION
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>alert" not in html
    assert "<img" not in html
    assert "<form action=//evil" not in html
    assert "&quot;&gt;&lt;img src=x onerror=alert(2)&gt; &amp; &#x27;quotes&#x27;" in html
    assert page.tags.count("script") == 1
    assert "img" not in page.tags
    assert len(page.forms) == 1
    assert page.forms[0]["action"].startswith("/invoice/")
    assert all("alert" not in script for script in page.scripts)
    # And a policy that would refuse any script but the page's own
    csp = response.headers["Content-Security-Policy"]
    nonce = re.search(r"script-src 'nonce-([\w-]+)'", csp)
    assert nonce is not None
    assert f'<script nonce="{nonce[1]}">' in html
    assert "default-src 'none'" in csp
    assert "form-action 'self'" in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    again = http.get(data.json()["data"]["url"], timeout=5).headers["Content-Security-Policy"]
    assert f"'nonce-{nonce[1]}'" not in again  # a new nonce for every answer


@pytest.mark.parametrize(("timer", "mode"), list(SEQUENCES))
def test_buttons_do_what_the_admin_api_does(
    sandbox: Sandbox, receiver: Receiver, http: requests.Session, timer: bool, mode: str
) -> None:
    # Given two like invoices
    url = create(http, sandbox, foreign_id="by-page", timer=timer).json()["data"]["url"]
    create(http, sandbox, foreign_id="by-admin", timer=timer)
    # When one is paid by its page's button, the other by the admin API
    _, page = open_page(http, url)
    response = submit(http, url, page, mode)
    pay(http, sandbox, "by-admin", mode)
    # Then the button answered with a redirect to the page, which shows the outcome
    assert response.status_code == 200
    assert response.history[0].status_code == 303
    assert response.url == url
    expected, error = SEQUENCES[timer, mode]
    after = Page(response.text)
    assert after.texts["status"] == expected[-1]
    assert after.texts.get("error", "") == error
    assert after.forms == []  # nothing left to pay
    # And both sent the same callbacks
    listing = settled(sandbox)
    sent = {name: [c["status"] for c in listing if c["foreign_id"] == name] for name in TWINS}
    assert sent == {"by-page": expected, "by-admin": expected}
    bodies = [json.loads(c["body"]) for c in listing if c["foreign_id"] == "by-page"]
    assert [b["error"] for b in bodies][-1] == error


@pytest.mark.parametrize("mode", ["full", "expire"])
def test_a_finished_invoice_shows_its_status_and_no_buttons(
    sandbox: Sandbox, http: requests.Session, mode: str
) -> None:
    url = create(http, sandbox).json()["data"]["url"]
    pay(http, sandbox, "order-42", mode)
    response, page = open_page(http, url)
    status = "confirmed" if mode == "full" else "failed"
    assert (response.status_code, page.texts["status"]) == (200, status)
    assert page.forms == []
    assert not [k for k in page.attrs if k.startswith("pay-")]
    assert page.texts["timer-row"] == "-"
    back = "https://shop.example.com/paid" if mode == "full" else "https://shop.example.com/failed"
    assert page.attrs["back"]["href"] == back
    # A stale page's form posted again is refused, and nothing changes.
    again = http.post(url, data={"mode": "full"}, timeout=5, allow_redirects=False)
    assert again.status_code == 409
    assert "cannot be paid" in Page(again.text).texts["notice"]
    assert Page(again.text).texts["status"] == status


def test_a_cancelled_invoice_page(sandbox: Sandbox, http: requests.Session) -> None:
    url = create(http, sandbox).json()["data"]["url"]
    assert cancel(http, sandbox, "order-42").status_code == 200
    _, page = open_page(http, url)
    assert (page.texts["status"], page.texts["error"]) == ("failed", "Invoice cancelled.")
    assert page.forms == []


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/invoice/nope00", b"", 404),
        ("POST", "/invoice/nope00", b"mode=full", 404),
        ("PUT", "/invoice/{code}", b"", 405),
        ("POST", "/invoice/{code}", b"mode=all", 400),
        ("POST", "/invoice/{code}", b"mode=full&mode=less", 400),
        ("POST", "/invoice/{code}", b"", 400),
        ("POST", "/invoice/{code}", b"&".join([b"a=1"] * 20), 400),
    ],
)
def test_bad_page_requests(
    sandbox: Sandbox, http: requests.Session, method: str, path: str, body: bytes, status: int
) -> None:
    code = create(http, sandbox).json()["data"]["url"].rsplit("/", 1)[1]
    url = f"{sandbox.origin}{path.format(code=code)}"
    response = http.request(method, url, data=body, timeout=5, allow_redirects=False)
    assert response.status_code == status
    assert sandbox.invoices()[0]["status"] == "pending"
    # Pages count as neither API calls nor API responses.
    assert sandbox.stats()["responses"] == {"200": 1}
