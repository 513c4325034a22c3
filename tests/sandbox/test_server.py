"""The sandbox provider over real HTTP on loopback, signing requests by hand (not via client.py)."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import socket
import time
import tracemalloc
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import requests

from invoice_worker.sandbox import Sandbox
from invoice_worker.sandbox.faults import Faults
from invoice_worker.sandbox.server import _origin

KEY = "sandbox-test-key"
SECRET = "AbCdEfG123456"  # the secret of the provider's official signature vector
VECTOR_BODY = b'{"currency":"BTC","foreign_id":"123456"}'
VECTOR_SIGNATURE = (
    "03c25fcf7cd35e7d995e402cd5d51edd72d48e1471e865907967809a0c189ba55b90815f20e2bb10f82c7a9e"
    "9d865546fda58989c2ae9e8e2ff7bc29195fa1ec"
)
NO_KEY = {"error": "No key header", "code": "required_header_key"}
NO_SIGNATURE = {"error": "No signature header", "code": "required_header_signature"}
BAD_KEY = {"error": "Bad key header", "code": "bad_header_key"}
BAD_SIGNATURE = {"error": "Bad signature header", "code": "bad_header_signature"}
BAD_FORMAT = {"error": "Bad content format", "code": "bad_content_format"}
TOO_MANY = {"error": "Too Many Attempts.", "code": "too_many_requests"}
MISSING = object()


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    """A fresh sandbox per test (this module's tests count calls and reset state)."""
    with Sandbox(KEY, SECRET) as server:
        yield server


def sign(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha512).hexdigest()


def invoice(**changes: Any) -> dict[str, Any]:
    """A valid create body; a change to MISSING drops the field."""
    body = {
        "timer": True,
        "title": "Order 42",
        "foreign_id": "order-42",
        "currency": "BTC",
        "amount": "0.0123",
        "url_success": "https://shop.example.com/paid",
        "url_failed": "https://shop.example.com/failed",
        "email_user": "buyer@example.com",
        **changes,
    }
    return {k: v for k, v in body.items() if v is not MISSING}


def post(
    http: requests.Session,
    url: str,
    payload: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, Any] | None = None,
    timeout: float = 5,
    stream: bool = False,
) -> requests.Response:
    """POST signed bytes; a header set to None in `headers` is left out."""
    body = raw if raw is not None else json.dumps(payload).encode()
    signed = {"Content-Type": "application/json", "X-Processing-Key": KEY}
    signed["X-Processing-Signature"] = sign(body)
    headers = {**signed, **(headers or {})}
    return http.post(url, data=body, headers=headers, timeout=timeout, stream=stream)


def create(
    http: requests.Session, sandbox: Sandbox, timeout: float = 5, **changes: Any
) -> requests.Response:
    return post(http, f"{sandbox.url}/invoices/create", invoice(**changes), timeout=timeout)


def cancel(http: requests.Session, sandbox: Sandbox, foreign_id: str) -> requests.Response:
    return post(http, f"{sandbox.url}/invoices/{foreign_id}/cancel/", {})


# Auth and content


def test_accepts_the_official_signature_vector(sandbox: Sandbox, http: requests.Session) -> None:
    assert sign(VECTOR_BODY) == VECTOR_SIGNATURE
    response = post(
        http,
        f"{sandbox.url}/invoices/create",
        raw=VECTOR_BODY,
        headers={"X-Processing-Signature": VECTOR_SIGNATURE},
    )
    # Authenticated, so it reaches validation: only the fields the vector lacks fail.
    assert response.status_code == 400
    assert set(response.json()["errors"]) == {
        "timer",
        "title",
        "amount",
        "url_success",
        "url_failed",
        "email_user",
    }


VALID_SIGNATURE = sign(json.dumps(invoice()).encode())


@pytest.mark.parametrize(
    ("headers", "status", "expected"),
    [
        ({"X-Processing-Key": None}, 403, NO_KEY),
        ({"X-Processing-Key": None, "X-Processing-Signature": None}, 403, NO_KEY),
        ({"X-Processing-Key": "", "X-Processing-Signature": "00"}, 403, NO_KEY),
        ({"X-Processing-Signature": None}, 403, NO_SIGNATURE),
        ({"X-Processing-Key": "other"}, 403, BAD_KEY),
        ({"X-Processing-Key": "other", "X-Processing-Signature": "00"}, 403, BAD_KEY),
        ({"X-Processing-Signature": "00"}, 403, BAD_SIGNATURE),
        ({"X-Processing-Signature": sign(b"{}")}, 403, BAD_SIGNATURE),
        ({"X-Processing-Signature": VALID_SIGNATURE.upper()}, 403, BAD_SIGNATURE),
        ({"X-Processing-Signature": sign(json.dumps(invoice()).encode(), "x")}, 403, BAD_SIGNATURE),
        ({"Content-Type": "text/plain"}, 400, BAD_FORMAT),
        ({"Content-Type": None}, 400, BAD_FORMAT),
    ],
)
def test_auth_and_content_type_errors(
    sandbox: Sandbox,
    http: requests.Session,
    headers: dict[str, Any],
    status: int,
    expected: dict[str, str],
) -> None:
    response = post(http, f"{sandbox.url}/invoices/create", invoice(), headers=headers)
    assert response.status_code == status
    assert response.json() == expected
    assert sandbox.invoices() == []


@pytest.mark.parametrize(
    "raw", [b"{", b"[]", b'"x"', b"", b'{"amount": NaN}', b"\xff\xfe\x00"], ids=repr
)
def test_bad_content_format(sandbox: Sandbox, http: requests.Session, raw: bytes) -> None:
    response = post(http, f"{sandbox.url}/invoices/create", raw=raw)
    assert response.status_code == 400
    assert response.json() == BAD_FORMAT
    assert sandbox.stats()["create_calls"] == 1  # authenticated, so counted


def test_content_type_parameters_are_allowed(sandbox: Sandbox, http: requests.Session) -> None:
    headers = {"Content-Type": "application/json; charset=utf-8"}
    response = post(http, f"{sandbox.url}/invoices/create", invoice(), headers=headers)
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v2/invoices/create"),
        ("POST", "/api/v2/invoices"),
        ("POST", "/api/v2/invoices/x/cancel/extra"),
        ("GET", "/"),
        ("DELETE", "/api/v2/ping"),
    ],
)
def test_unknown_urls_answer_like_a_missing_key(
    sandbox: Sandbox, http: requests.Session, method: str, path: str
) -> None:
    response = http.request(method, f"http://127.0.0.1:{sandbox.port}{path}", timeout=5)
    assert response.status_code == 403
    assert response.json() == NO_KEY


def test_ping_needs_no_auth(sandbox: Sandbox, http: requests.Session) -> None:
    response = http.get(f"{sandbox.url}/ping", timeout=5)
    assert response.status_code == 200
    assert response.text == "OK"
    assert response.headers["Content-Type"].startswith("text/plain")


# Create


def test_create_with_timer_matches_the_documented_shape(
    sandbox: Sandbox, http: requests.Session
) -> None:
    before = int(time.time())
    response = create(http, sandbox)
    assert response.status_code == 200
    data = response.json()["data"]
    assert list(data) == [
        "id",
        "url",
        "foreign_id",
        "address",
        "title",
        "status",
        "currency",
        "amount",
        "sender_currency",
        "sender_amount",
        "fixed_at",
        "release_at",
        "seconds_left",
    ]
    assert data["id"] >= 100000
    # The invoice page is on the sandbox itself (see test_pages.py).
    assert re.fullmatch(rf"http://127\.0\.0\.1:{sandbox.port}/invoice/\w{{6}}", data["url"])
    assert re.fullmatch(r"[1-9A-HJ-NP-Za-km-z]{34}", data["address"])
    assert (data["foreign_id"], data["title"], data["status"]) == (
        "order-42",
        "Order 42",
        "pending",
    )
    assert (data["currency"], data["amount"]) == ("BTC", "0.01230000")
    assert (data["sender_currency"], data["sender_amount"]) == ("BTC", "0.01230000")
    assert before <= data["fixed_at"] <= time.time()
    assert data["release_at"] == data["fixed_at"] + 900
    assert 898 <= data["seconds_left"] <= 900


def test_create_without_timer(sandbox: Sandbox, http: requests.Session) -> None:
    first = create(http, sandbox, foreign_id="a").json()["data"]
    second = create(http, sandbox, foreign_id="b", timer=False).json()["data"]
    assert second["id"] == first["id"] + 1
    assert second["status"] == "created"
    assert second["release_at"] is None
    assert second["seconds_left"] is None


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        ("0.1", "0.10000000"),
        ('"0.1"', "0.10000000"),
        ("12345678.12345678", "12345678.12345678"),  # a float would round this
        ("1", "1.00000000"),
        ("1e-8", "0.00000001"),
        ('"2.5E+3"', "2500.00000000"),
    ],
)
def test_amounts_stay_exact(
    sandbox: Sandbox, http: requests.Session, literal: str, expected: str
) -> None:
    raw = json.dumps(invoice(amount="@")).replace('"@"', literal).encode()
    response = post(http, f"{sandbox.url}/invoices/create", raw=raw)
    assert response.json()["data"]["amount"] == expected


def test_sender_currency_is_converted(sandbox: Sandbox, http: requests.Session) -> None:
    data = create(http, sandbox, amount="0.01", sender_currency="USDT").json()["data"]
    assert data["sender_currency"] == "USDT"
    assert re.fullmatch(r"\d+\.\d{8}", data["sender_amount"])
    assert Decimal(data["sender_amount"]) > Decimal(data["amount"])


def test_older_clients_may_send_an_integer_foreign_id(
    sandbox: Sandbox, http: requests.Session
) -> None:
    assert create(http, sandbox, foreign_id=123).json()["data"]["foreign_id"] == "123"
    assert create(http, sandbox, foreign_id="123").json() == {
        "errors": {"foreign_id": "The foreign id has already been taken."}
    }


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("type", "instant", "The selected type is invalid."),
        ("timer", MISSING, "The timer field is required."),
        ("timer", "yes", "The timer field must be true or false."),
        ("timer", 2, "The timer field must be true or false."),
        ("title", MISSING, "The title field is required."),
        ("title", "  ", "The title field is required."),
        ("title", 5, "The title must be a string."),
        ("title", "x" * 51, "The title may not be greater than 50 characters."),
        ("description", "x" * 1001, "The description may not be greater than 1000 characters."),
        ("foreign_id", MISSING, "The foreign id field is required."),
        ("foreign_id", "x" * 256, "The foreign id may not be greater than 255 characters."),
        ("foreign_id", "order-jane.doe@example.com", "The foreign id format is invalid."),
        ("currency", MISSING, "The currency field is required."),
        ("currency", "btc", "The selected currency is invalid."),
        ("currency", "B", "The selected currency is invalid."),
        ("sender_currency", "US DOLLAR", "The selected sender currency is invalid."),
        ("amount", MISSING, "The amount field is required."),
        ("amount", "ten", "The amount must be a number."),
        ("amount", True, "The amount must be a number."),
        ("amount", 0, "The amount must be greater than 0."),
        ("amount", "-1.5", "The amount must be greater than 0."),
        ("amount", "1e13", "The amount may not be greater than 1000000000000."),
        ("url_success", MISSING, "The url success field is required."),
        ("url_success", "http://shop.example.com/paid", "The url success format is invalid."),
        ("url_success", "https://127.0.0.1/paid", "The url success format is invalid."),
        ("url_success", "https://[::1]/paid", "The url success format is invalid."),
        ("url_success", "https://localhost/paid", "The url success format is invalid."),
        ("url_failed", "https://me:pw@shop.example.com/x", "The url failed format is invalid."),
        ("url_failed", "shop.example.com/failed", "The url failed format is invalid."),
        ("url_failed", 42, "The url failed format is invalid."),
        ("email_user", MISSING, "The email user field is required."),
        ("email_user", "buyer-at-example.com", "The email user must be a valid email address."),
    ],
)
def test_validation_messages(
    sandbox: Sandbox, http: requests.Session, name: str, value: Any, message: str
) -> None:
    response = create(http, sandbox, **{name: value})
    assert response.status_code == 400
    assert response.json() == {"errors": {name: message}}
    assert sandbox.invoices() == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("type", "good_until_expired"),
        ("timer", 1),
        ("timer", "0"),
        ("description", ""),
        ("url_success", "https://Shop.Example.COM:8443/paid?order=42#top"),
        ("email_user", "first.last+tag@mail.example.co.uk"),
    ],
)
def test_valid_variants_are_accepted(
    sandbox: Sandbox, http: requests.Session, name: str, value: Any
) -> None:
    assert create(http, sandbox, **{name: value}).status_code == 200


def test_every_failing_field_is_reported_at_once(sandbox: Sandbox, http: requests.Session) -> None:
    response = post(http, f"{sandbox.url}/invoices/create", {"type": "x"})
    assert response.status_code == 400
    assert set(response.json()["errors"]) == {
        "type",
        "timer",
        "title",
        "foreign_id",
        "currency",
        "amount",
        "url_success",
        "url_failed",
        "email_user",
    }


def test_minimum_amount_is_in_eur(http: requests.Session) -> None:
    too_small = {"amount": "The amount is too small. The minimum amount is 10.00 EUR."}
    with Sandbox(KEY, SECRET, min_amount=Decimal(10)) as sandbox:
        response = create(http, sandbox, currency="EUR", amount="9.99")
        assert response.json() == {"errors": too_small}
        assert create(http, sandbox, currency="BTC", amount="0.0001").json() == {
            "errors": too_small
        }
        assert create(http, sandbox, currency="EUR", amount="10").status_code == 200


def test_duplicate_foreign_id_whatever_the_status(sandbox: Sandbox, http: requests.Session) -> None:
    taken = {"errors": {"foreign_id": "The foreign id has already been taken."}}
    assert create(http, sandbox).status_code == 200
    response = create(http, sandbox, amount="1")
    assert (response.status_code, response.json()) == (400, taken)
    assert cancel(http, sandbox, "order-42").status_code == 200
    assert create(http, sandbox).json() == taken
    assert len(sandbox.invoices()) == 1
    assert sandbox.create_calls("order-42") == 3


# Cancel


def test_cancel(sandbox: Sandbox, http: requests.Session) -> None:
    # Given an open invoice
    created = create(http, sandbox).json()["data"]
    # When it is cancelled (trailing slash optional)
    response = post(http, f"{sandbox.url}/invoices/order-42/cancel", {})
    # Then it has failed, and cannot be cancelled again
    assert response.status_code == 200
    data = response.json()["data"]
    assert (data["id"], data["status"], data["seconds_left"]) == (created["id"], "failed", None)
    assert sandbox.invoices()[0]["cancelled"] is True
    again = cancel(http, sandbox, "order-42")
    assert again.status_code == 400
    assert again.json() == {
        "errors": {
            "error": "Invoice cannot be failed in its current state.",
            "code": "invalid_invoice_state",
        }
    }


def test_cancel_unknown_invoice(sandbox: Sandbox, http: requests.Session) -> None:
    response = cancel(http, sandbox, "nope")
    assert response.status_code == 404
    assert response.json() == {"error": "Invoice not found", "code": "invoice_not_found"}


def test_cancel_needs_auth(sandbox: Sandbox, http: requests.Session) -> None:
    create(http, sandbox)
    url = f"{sandbox.url}/invoices/order-42/cancel/"
    response = post(http, url, {}, headers={"X-Processing-Signature": sign(b"{ }")})
    assert response.json()["code"] == "bad_header_signature"
    assert sandbox.invoices()[0]["status"] == "pending"


# Faults


@pytest.mark.parametrize(
    ("outcome", "status", "ctype", "text"),
    [
        ("500", 500, "text/plain", "Internal Server Error"),
        ("502", 502, "text/html", "<html><body><h1>502 Bad Gateway</h1></body></html>"),
        ("503", 503, "text/html", "<html><body><h1>503 Service Unavailable</h1></body></html>"),
        ("429", 429, "application/json", json.dumps(TOO_MANY, separators=(",", ":"))),
        ("429_bare", 429, "text/plain", "error code: 1015"),
    ],
)
def test_scripted_failures_create_nothing(
    sandbox: Sandbox, http: requests.Session, outcome: str, status: int, ctype: str, text: str
) -> None:
    sandbox.script([outcome], foreign_id="order-42")
    response = create(http, sandbox)
    assert (response.status_code, response.headers["Content-Type"], response.text) == (
        status,
        ctype,
        text,
    )
    assert response.headers.get("Retry-After") == ("1" if outcome == "429" else None)
    assert sandbox.invoices() == []
    # The script is used up: the retry goes through.
    assert create(http, sandbox).status_code == 200
    assert sandbox.create_calls("order-42") == 2


def test_retry_after_is_configurable(sandbox: Sandbox, http: requests.Session) -> None:
    sandbox.set_faults(Faults(rate_limit=1.0, retry_after=7))
    assert create(http, sandbox).headers["Retry-After"] == "7"


def test_commit_then_drop_creates_but_never_answers(
    sandbox: Sandbox, http: requests.Session
) -> None:
    sandbox.script(["commit_then_drop"], foreign_id="order-42")
    with pytest.raises(requests.ConnectionError):
        create(http, sandbox)
    assert [i["foreign_id"] for i in sandbox.invoices()] == ["order-42"]
    assert create(http, sandbox).json()["errors"]["foreign_id"].endswith("already been taken.")
    assert sandbox.create_calls("order-42") == 2
    assert sandbox.stats()["responses"] == {"dropped": 1, "400": 1}


def test_commit_then_502_creates_but_answers_502(sandbox: Sandbox, http: requests.Session) -> None:
    sandbox.script(["commit_then_502"], foreign_id="order-42")
    assert create(http, sandbox).status_code == 502
    assert [i["foreign_id"] for i in sandbox.invoices()] == ["order-42"]


def test_timeout_stalls_then_processes(sandbox: Sandbox, http: requests.Session) -> None:
    sandbox.set_faults(Faults(stall_seconds=0.4))
    sandbox.script(["timeout"], foreign_id="order-42")
    started = time.monotonic()
    with pytest.raises(requests.ReadTimeout):
        create(http, sandbox, timeout=0.1)
    assert time.monotonic() - started < 0.4
    assert sandbox.invoices() == []
    deadline = time.monotonic() + 3
    while not sandbox.invoices() and time.monotonic() < deadline:
        time.sleep(0.02)
    # The stalled request was processed after all, although its client gave up.
    assert [i["foreign_id"] for i in sandbox.invoices()] == ["order-42"]


def test_stop_ends_stalled_requests_at_once(http: requests.Session) -> None:
    with Sandbox(KEY, SECRET, faults=Faults(timeout=1.0)) as sandbox:
        with pytest.raises(requests.ReadTimeout):
            create(http, sandbox, timeout=0.1)
        started = time.monotonic()
        sandbox.stop()
        assert time.monotonic() - started < 1
        time.sleep(0.05)
        assert sandbox.invoices() == []  # dropped, not processed
        with pytest.raises(requests.ConnectionError):
            http.get(f"{sandbox.url}/ping", timeout=1)


@pytest.mark.parametrize(
    ("outcome", "field", "shown"),
    [
        ("answer_bad_url", "url", "javascript:alert(1)"),
        ("answer_wrong_amount", "amount", "1.01230000"),
        ("answer_wrong_currency", "currency", "ETH"),
    ],
)
def test_hostile_answers_misstate_the_invoice_created(
    sandbox: Sandbox, http: requests.Session, outcome: str, field: str, shown: str
) -> None:
    sandbox.script([outcome], foreign_id="order-42")
    response = create(http, sandbox, timer=False)  # no seconds_left, which ticks
    # A 200 that differs from the invoice in one field; the invoice exists as asked.
    assert response.status_code == 200
    answer, (created,) = response.json()["data"], sandbox.invoices()
    assert answer[field] == shown != created[field]
    assert {k: v for k, v in answer.items() if k != field} == {
        k: v for k, v in created.items() if k not in (field, "cancelled")
    }
    assert (created["foreign_id"], created["amount"]) == ("order-42", "0.01230000")
    assert sandbox.stats()["outcomes"] == {outcome: 1}


def test_wrong_id_shows_another_invoice(sandbox: Sandbox, http: requests.Session) -> None:
    # Given two invoices, and a wrong-id answer scripted for the next create
    create(http, sandbox, foreign_id="order-40")
    create(http, sandbox, foreign_id="order-41", amount="0.5", timer=False)
    sandbox.script(["answer_wrong_id"])
    # When order-42 is created, the answer shows order-41 (the newest other invoice)
    answer = create(http, sandbox).json()["data"]
    other, created = sandbox.invoices()[1:]
    assert created["foreign_id"] == "order-42"
    assert answer == {k: v for k, v in other.items() if k != "cancelled"}
    # With no other invoice, it shows the invoice under a made-up id.
    sandbox.reset()
    sandbox.script(["answer_wrong_id"])
    assert create(http, sandbox).json()["data"]["foreign_id"] == "order-42-other"


@pytest.mark.parametrize("outcome", ["answer_bad_url", "answer_huge"])
def test_answer_faults_leave_a_refused_call_its_real_answer(
    sandbox: Sandbox, http: requests.Session, outcome: str
) -> None:
    create(http, sandbox)
    sandbox.script([outcome], foreign_id="order-42")
    assert create(http, sandbox).json()["errors"]["foreign_id"].endswith("already been taken.")
    assert sandbox.stats()["outcomes"] == {}


def test_hostile_answer_to_a_cancel_after_cancelling(
    sandbox: Sandbox, http: requests.Session
) -> None:
    create(http, sandbox)
    sandbox.set_faults(Faults(answer_wrong_amount=1.0))
    assert cancel(http, sandbox, "order-42").json()["data"]["amount"] == "1.01230000"
    assert sandbox.invoices()[0]["status"] == "failed"


def test_huge_answer_is_streamed_not_built(sandbox: Sandbox, http: requests.Session) -> None:
    # Given a 50 MB answer (the default size) scripted for the next call
    sandbox.script(["answer_huge"])
    tracemalloc.start()
    try:
        # When a client streams it, keeping only the head and the tail
        body = invoice(timer=False)  # no seconds_left, which ticks
        response = post(http, f"{sandbox.url}/invoices/create", body, stream=True)
        head, size = b"", 0
        for chunk in response.iter_content(1 << 16):
            head, tail, size = head or chunk, chunk, size + len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Then it is the real answer padded to 50 MB, and neither side held it whole
    assert int(response.headers["Content-Length"]) == size == 50_000_000
    assert peak < 10_000_000
    data = json.loads(head[: head.index(b',"padding":"')] + b"}")["data"]
    assert data == {k: v for k, v in sandbox.invoices()[0].items() if k != "cancelled"}
    assert tail.endswith(b'xx"}')


def test_huge_answer_is_valid_json(http: requests.Session) -> None:
    with Sandbox(KEY, SECRET, faults=Faults(answer_huge=1.0, huge_bytes=100_000)) as sandbox:
        response = create(http, sandbox)
    assert len(response.content) == 100_000
    assert response.json()["data"]["foreign_id"] == "order-42"
    assert set(response.json()["padding"]) == {"x"}


def _raw_create(sandbox: Sandbox) -> socket.socket:
    body = json.dumps(invoice()).encode()
    head = (
        f"POST /api/v2/invoices/create HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"X-Processing-Key: {KEY}\r\nX-Processing-Signature: {sign(body)}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", sandbox.port), timeout=5)
    sock.sendall(head.encode() + body)
    return sock


def test_trickle_sends_the_answer_a_byte_at_a_time(sandbox: Sandbox) -> None:
    sandbox.set_faults(Faults(trickle_seconds=0.05))
    sandbox.script(["trickle"])
    started = time.monotonic()
    with _raw_create(sandbox) as sock:
        received = b"".join(sock.recv(100) for _ in range(5))
        elapsed = time.monotonic() - started
    # Each recv got one byte: even the status line comes slowly, as through a stalled proxy.
    assert received == b"HTTP/"
    assert 0.2 <= elapsed < 2
    # The invoice was committed before the first byte left.
    assert [i["foreign_id"] for i in sandbox.invoices()] == ["order-42"]
    assert sandbox.stats()["outcomes"] == {"trickle": 1}


def test_a_finished_trickle_is_the_real_answer(sandbox: Sandbox, http: requests.Session) -> None:
    sandbox.set_faults(Faults(trickle=1.0, trickle_seconds=0.0005))
    response = create(http, sandbox)
    assert response.status_code == 200
    assert response.json()["data"]["url"] == sandbox.invoices()[0]["url"]
    # A refused call trickles its real answer too.
    assert create(http, sandbox).status_code == 400


def test_stop_ends_a_trickle_at_once(http: requests.Session) -> None:
    with Sandbox(KEY, SECRET, faults=Faults(trickle=1.0, trickle_seconds=30)) as sandbox:
        with pytest.raises(requests.ReadTimeout):
            create(http, sandbox, timeout=0.2)
        started = time.monotonic()
        sandbox.stop()
        assert time.monotonic() - started < 1


def test_global_script_applies_to_any_foreign_id_after_its_own(
    sandbox: Sandbox, http: requests.Session
) -> None:
    sandbox.script(["502", "ok"])
    sandbox.script(["503"], foreign_id="b")
    assert create(http, sandbox, foreign_id="b").status_code == 503
    assert create(http, sandbox, foreign_id="a").status_code == 502
    assert create(http, sandbox, foreign_id="b").status_code == 200
    assert create(http, sandbox, foreign_id="c").status_code == 200


def test_script_rejects_unknown_outcomes(sandbox: Sandbox) -> None:
    with pytest.raises(ValueError, match="teapot"):
        sandbox.script(["ok", "teapot"])


def test_random_faults_at_rate_one(sandbox: Sandbox, http: requests.Session) -> None:
    sandbox.set_faults(Faults(error_502=1.0, seed=1))
    assert {create(http, sandbox, foreign_id=f"id-{n}").status_code for n in range(5)} == {502}
    sandbox.set_faults(Faults(error_503=1.0))
    assert cancel(http, sandbox, "anything").status_code == 503  # cancel calls get faults too


def test_a_seed_replays_the_same_faults(sandbox: Sandbox, http: requests.Session) -> None:
    def run() -> list[int]:
        sandbox.reset()
        sandbox.set_faults(Faults(error_500=0.3, rate_limit=0.3, seed=7))
        return [create(http, sandbox, foreign_id=f"id-{n}").status_code for n in range(30)]

    first = run()
    assert first == run()
    assert set(first) == {200, 429, 500}


def test_latency(sandbox: Sandbox, http: requests.Session) -> None:
    sandbox.set_faults(Faults(latency_ms=100, jitter_ms=20))
    started = time.monotonic()
    assert create(http, sandbox).status_code == 200
    assert 0.1 <= time.monotonic() - started < 1


# Admin API, stats and reset


def test_admin_api(sandbox: Sandbox, http: requests.Session) -> None:
    admin = sandbox.admin_url
    # Faults: partial updates merge, bad ones are refused.
    assert http.put(f"{admin}/faults", json={"error_502": 0.5}, timeout=5).status_code == 200
    assert http.put(f"{admin}/faults", json={"retry_after": 5}, timeout=5).status_code == 200
    faults = http.get(f"{admin}/faults", timeout=5).json()
    assert faults == Faults(error_502=0.5, retry_after=5).to_dict()
    for bad in ({"error_502": 2}, {"no_such_fault": 1}, ["x"]):
        assert http.put(f"{admin}/faults", json=bad, timeout=5).status_code == 400
    assert http.put(f"{admin}/faults", json={"error_502": 0}, timeout=5).status_code == 200
    # Script, then the invoices and per-foreign_id call counts.
    script = {"foreign_id": "order-42", "outcomes": ["502", "ok"]}
    assert http.post(f"{admin}/script", json=script, timeout=5).status_code == 200
    bad_script = {"foreign_id": None, "outcomes": ["teapot"]}
    assert http.post(f"{admin}/script", json=bad_script, timeout=5).status_code == 400
    assert create(http, sandbox).status_code == 502
    assert create(http, sandbox).status_code == 200
    listing = http.get(f"{admin}/invoices", timeout=5).json()
    assert listing["create_calls"] == {"order-42": 2}
    assert [(i["foreign_id"], i["cancelled"]) for i in listing["invoices"]] == [("order-42", False)]
    # Reset forgets everything.
    assert http.post(f"{admin}/reset", timeout=5).status_code == 200
    assert http.get(f"{admin}/invoices", timeout=5).json() == {"invoices": [], "create_calls": {}}
    assert http.get(f"{admin}/nothing", timeout=5).status_code == 404


def test_admin_can_be_disabled(http: requests.Session) -> None:
    with Sandbox(KEY, SECRET, admin=False) as sandbox:
        response = http.get(f"{sandbox.admin_url}/invoices", timeout=5)
    assert response.status_code == 403
    assert response.json() == NO_KEY


def test_stats(sandbox: Sandbox, http: requests.Session) -> None:
    sandbox.script(["502"])
    before = int(time.time())
    for n in range(3):
        create(http, sandbox, foreign_id=f"id-{n}")
    create(http, sandbox, foreign_id="id-0")
    post(http, f"{sandbox.url}/invoices/create", invoice(), headers={"X-Processing-Key": "x"})
    http.get(f"{sandbox.url}/ping", timeout=5)
    stats = sandbox.stats()
    assert stats["create_calls"] == 4  # the unauthenticated call does not count
    assert stats["responses"] == {"502": 1, "200": 4, "403": 1}  # 200s include the ping
    assert stats["outcomes"] == {"502": 1}
    assert sum(stats["per_second"].values()) == 4
    assert all(before <= int(second) <= time.time() for second in stats["per_second"])
    assert http.get(f"{sandbox.admin_url}/stats", timeout=5).json() == sandbox.stats()


def test_reset(sandbox: Sandbox, http: requests.Session) -> None:
    create(http, sandbox)
    sandbox.set_faults(Faults(error_500=0.5))
    sandbox.script(["502"])
    sandbox.reset()
    assert sandbox.invoices() == []
    assert sandbox.create_calls("order-42") == 0
    assert sandbox.faults == Faults()
    assert sandbox.stats() == {
        "create_calls": 0, "responses": {}, "outcomes": {}, "per_second": {}
    }  # fmt: skip
    assert create(http, sandbox).status_code == 200  # neither the script nor the invoice remain


@pytest.mark.parametrize(
    ("host", "origin"),
    [
        ("127.0.0.1", "http://127.0.0.1:8080"),
        ("0.0.0.0", "http://127.0.0.1:8080"),  # noqa: S104 - a wildcard is reached on loopback
        ("::", "http://[::1]:8080"),
        ("::1", "http://[::1]:8080"),
        ("localhost", "http://localhost:8080"),
    ],
)
def test_invoice_pages_are_on_the_address_bound(host: str, origin: str) -> None:
    assert _origin(host, 8080) == origin
