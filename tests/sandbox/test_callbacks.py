"""Callbacks over real HTTP: a sandbox on loopback POSTs to a real receiver that records them."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from invoice_worker.client import verify_signature
from invoice_worker.devstack.embedded import free_port
from invoice_worker.sandbox import Faults, Sandbox, payments
from invoice_worker.sandbox.callbacks import RETRY_MINUTES
from tests.sandbox.receiver import Receiver
from tests.sandbox.test_payments import SEQUENCES
from tests.sandbox.test_server import KEY, SECRET, cancel, create

SCALE = 0.001  # the first retry after 60 ms, the third after 0.9 s


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:
        yield server


@pytest.fixture
def sandbox(receiver: Receiver) -> Iterator[Sandbox]:
    with Sandbox(KEY, SECRET, callback_url=receiver.url, callback_time_scale=SCALE) as server:
        yield server


def pay(http: requests.Session, sandbox: Sandbox, key: str, mode: str) -> requests.Response:
    return http.post(f"{sandbox.admin_url}/invoices/{key}/pay", json={"mode": mode}, timeout=5)


def statuses(bodies: list[bytes]) -> list[str]:
    return [json.loads(body)["status"] for body in bodies]


def settled(sandbox: Sandbox, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The callbacks, once none is pending any more."""
    deadline = time.monotonic() + timeout
    while True:
        listing = sandbox.callbacks()
        if all(c["state"] != "pending" for c in listing):
            return listing
        assert time.monotonic() < deadline, listing
        time.sleep(0.02)


def good_signature(body: bytes, headers: dict[str, str]) -> int | None:
    """A receiver's check: 403 unless the signature verifies over the raw body."""
    return None if verify_signature(body, headers["X-Processing-Signature"], SECRET) else 403


def test_callbacks_are_signed_over_the_raw_body(
    sandbox: Sandbox, receiver: Receiver, http: requests.Session
) -> None:
    # Given an invoice, when it is paid in full
    create(http, sandbox)
    assert pay(http, sandbox, "order-42", "full").json()["callbacks_queued"] == 2
    # Then each callback is signed, by hand and by the product's verifier, over the bytes sent
    for received in receiver.wait_for(2):
        expected = hmac.new(SECRET.encode(), received.body, hashlib.sha512).hexdigest()
        assert received.headers["X-Processing-Signature"] == expected
        assert verify_signature(received.body, received.headers["X-Processing-Signature"], SECRET)
        assert received.headers["X-Processing-Key"] == KEY
        assert received.headers["Content-Type"] == "application/json"
        assert received.path == "/callbacks"
        # Compact JSON, as the provider writes it: re-encoding with spaces changes the bytes.
        data = json.loads(received.body)
        assert json.dumps(data, separators=(",", ":")).encode() == received.body
        assert not verify_signature(json.dumps(data).encode(), expected, SECRET)
    # And the admin API lists what was sent and how it went
    listing = settled(sandbox)
    assert [c["body"].encode() for c in listing] == [r.body for r in receiver.received]
    assert [(c["state"], len(c["attempts"])) for c in listing] == [("delivered", 1)] * 2
    assert listing[0]["attempts"][0]["status"] == 200


@pytest.mark.parametrize(("timer", "mode"), list(SEQUENCES))
def test_each_action_sends_its_sequence(
    sandbox: Sandbox, receiver: Receiver, http: requests.Session, timer: bool, mode: str
) -> None:
    data = create(http, sandbox, timer=timer).json()["data"]
    expected, error = SEQUENCES[timer, mode]
    # By foreign_id or by invoice id, the admin endpoint plays the action.
    key = "order-42" if timer else str(data["id"])
    answer = pay(http, sandbox, key, mode).json()
    assert (answer["data"]["status"], answer["callbacks_queued"]) == (expected[-1], len(expected))
    bodies = [r.body for r in receiver.wait_for(len(expected))]
    assert statuses(bodies) == expected
    assert json.loads(bodies[-1])["error"] == error
    assert {json.loads(b)["id"] for b in bodies} == {data["id"]}
    time.sleep(0.05)
    assert len(receiver.received) == len(expected)  # one callback per change, no more


def test_cancel_sends_a_failed_callback(
    sandbox: Sandbox, receiver: Receiver, http: requests.Session
) -> None:
    create(http, sandbox)
    assert cancel(http, sandbox, "order-42").status_code == 200
    (received,) = receiver.wait_for(1)
    body = json.loads(received.body)
    assert (body["status"], body["error"]) == ("failed", payments.CANCELLED)
    # A failed invoice cannot be paid any more.
    refused = pay(http, sandbox, "order-42", "full")
    assert refused.status_code == 409
    assert refused.json()["code"] == "invalid_invoice_state"


def test_a_timer_running_out_fails_the_invoice(receiver: Receiver, http: requests.Session) -> None:
    with Sandbox(KEY, SECRET, callback_url=receiver.url, timer_seconds=1) as sandbox:
        data = create(http, sandbox).json()["data"]
        assert data["release_at"] == data["fixed_at"] + 1
        create(http, sandbox, foreign_id="no-timer", timer=False)
        (received,) = receiver.wait_for(1, timeout=4)
        body = json.loads(received.body)
        assert (body["foreign_id"], body["status"]) == ("order-42", "failed")
        assert (body["error"], body["expires_at"]) == (payments.NOT_PAID, data["release_at"])
        statuses = {i["foreign_id"]: i["status"] for i in sandbox.invoices()}
        assert statuses == {"order-42": "failed", "no-timer": "created"}


def test_pay_refusals(sandbox: Sandbox, http: requests.Session) -> None:
    create(http, sandbox)
    assert pay(http, sandbox, "nope", "full").status_code == 404
    assert pay(http, sandbox, "order-42", "twice").status_code == 400
    url = f"{sandbox.admin_url}/invoices/order-42/pay"
    assert http.post(url, json=["full"], timeout=5).status_code == 400
    assert http.get(url, timeout=5).status_code == 404
    assert sandbox.invoices()[0]["status"] == "pending"


def test_retries_follow_the_scaled_schedule_until_a_200(
    sandbox: Sandbox, receiver: Receiver, http: requests.Session
) -> None:
    # Given a receiver that answers 500, 502, then 503 before it takes the callback
    receiver.answers.extend([500, 502, 503])
    create(http, sandbox, timer=False)
    pay(http, sandbox, "order-42", "expire")
    # Then the attempts come 1, 5 and 15 minutes apart, times the scale
    arrivals = receiver.wait_for(4, timeout=5)
    assert [r.status for r in arrivals] == [500, 502, 503, 200]
    for before, after, minutes in zip(arrivals, arrivals[1:], RETRY_MINUTES, strict=False):
        gap = after.started - before.answered
        assert minutes * 60 * SCALE <= gap < minutes * 60 * SCALE + 0.5, (minutes, gap)
    assert len({r.body for r in arrivals}) == 1  # the same bytes every time
    (callback,) = settled(sandbox)
    assert callback["state"] == "delivered"
    assert [a["number"] for a in callback["attempts"]] == [0, 1, 2, 3]
    assert [a["status"] for a in callback["attempts"]] == [500, 502, 503, 200]
    time.sleep(0.3)
    assert len(receiver.received) == 4


def test_retries_stop_after_twelve(receiver: Receiver, http: requests.Session) -> None:
    # Given a receiver that never answers 200, and a scale that fits ~24 h into ~0.9 s
    receiver.status = 500
    with Sandbox(KEY, SECRET, callback_url=receiver.url, callback_time_scale=1e-5) as sandbox:
        create(http, sandbox)
        pay(http, sandbox, "order-42", "expire")
        # Then the callback is sent once and retried 12 times, then given up
        arrivals = receiver.wait_for(13, timeout=10)
        (callback,) = settled(sandbox)
        assert callback["state"] == "failed"
        assert callback["next_at"] is None
        assert [a["number"] for a in callback["attempts"]] == list(range(13))
        total = arrivals[-1].started - arrivals[0].answered
        assert total >= sum(RETRY_MINUTES) * 60 * 1e-5
        time.sleep(0.3)
        assert len(receiver.received) == 13


def test_a_receiver_down_for_a_while_gets_everything_once_back(http: requests.Session) -> None:
    # Given a callback URL where nothing listens yet
    port = free_port()
    url = f"http://127.0.0.1:{port}/callbacks"
    with Sandbox(KEY, SECRET, callback_url=url, callback_time_scale=SCALE) as sandbox:
        for n, mode in enumerate(["full", "less", "instalments", "expire"]):
            create(http, sandbox, foreign_id=f"order-{n}")
            pay(http, sandbox, f"order-{n}", mode)
        time.sleep(0.2)  # the first attempts and the first retries fail
        refused = sandbox.callbacks()[0]["attempts"][0]
        assert (refused["status"], refused["error"].split(":")[0]) == (
            None, "ConnectionRefusedError"
        )  # fmt: skip
        # When the receiver comes up
        with Receiver(port) as receiver:
            # Then every callback arrives, each once, in the end
            listing = settled(sandbox, timeout=10)
            assert {c["state"] for c in listing} == {"delivered"}
            assert len(listing) == 2 + 2 + 3 + 1
            assert sorted(r.body for r in receiver.received) == sorted(
                c["body"].encode() for c in listing
            )


@pytest.mark.parametrize("fault", ["callback_duplicate", "callback_concurrent"])
def test_duplicates_send_the_same_bytes_twice(
    sandbox: Sandbox, receiver: Receiver, http: requests.Session, fault: str
) -> None:
    receiver.delay = 0.2  # a slow receiver, so concurrent copies overlap
    sandbox.set_faults(Faults.from_dict({fault: 1}))
    create(http, sandbox, timer=False)
    pay(http, sandbox, "order-42", "expire")
    first, second = receiver.wait_for(2)
    assert (first.body, first.headers["X-Processing-Signature"]) == (
        second.body, second.headers["X-Processing-Signature"]
    )  # fmt: skip
    overlapped = second.started < first.answered
    assert overlapped == (fault == "callback_concurrent")
    (callback,) = settled(sandbox)
    assert callback["faults"] == [fault.removeprefix("callback_")]
    assert [(a["number"], a["copy"]) for a in callback["attempts"]] == [(0, 1), (0, 2)]


def test_out_of_order_sends_confirmed_before_processing(
    sandbox: Sandbox, receiver: Receiver, http: requests.Session
) -> None:
    sandbox.set_faults(Faults(callback_out_of_order=1))
    create(http, sandbox)
    pay(http, sandbox, "order-42", "full")
    assert statuses([r.body for r in receiver.wait_for(2)]) == ["confirmed", "processing"]
    assert {tuple(c["faults"]) for c in settled(sandbox)} == {("out_of_order",)}


def test_a_bad_signature_is_refused_then_retried_signed(
    sandbox: Sandbox, receiver: Receiver, http: requests.Session
) -> None:
    # Given a receiver that checks signatures, and a badly signed first attempt
    receiver.judge = good_signature
    sandbox.set_faults(Faults(callback_bad_signature=1))
    create(http, sandbox, timer=False)
    pay(http, sandbox, "order-42", "expire")
    # Then the receiver refuses it, and the retry (signed right) goes through
    bad, good = receiver.wait_for(2)
    assert (bad.status, good.status, bad.body) == (403, 200, good.body)
    (callback,) = settled(sandbox)
    assert [a["signature_valid"] for a in callback["attempts"]] == [False, True]


def test_callback_faults_replay_with_a_seed(
    sandbox: Sandbox, receiver: Receiver, http: requests.Session
) -> None:
    def run() -> list[list[str]]:
        sandbox.reset()
        sandbox.set_faults(Faults(callback_duplicate=0.5, callback_out_of_order=0.5, seed=3))
        for n in range(8):
            create(http, sandbox, foreign_id=f"order-{n}")
            pay(http, sandbox, f"order-{n}", "full")
        return [c["faults"] for c in sandbox.callbacks()]

    first = run()
    assert first == run()
    assert {f for faults in first for f in faults} == {"duplicate", "out_of_order"}


def test_settings_at_run_time(sandbox: Sandbox, receiver: Receiver, http: requests.Session) -> None:
    admin = f"{sandbox.admin_url}/callbacks"
    # Nowhere to send: actions play, nothing is queued.
    assert http.put(admin, json={"url": ""}, timeout=5).json()["url"] is None
    create(http, sandbox, foreign_id="quiet", timer=False)
    assert pay(http, sandbox, "quiet", "full").json()["callbacks_queued"] == 0
    # Then a receiver again, and another scale.
    changed = {"url": receiver.url, "time_scale": 0.5, "timeout": 2}
    assert http.put(admin, json=changed, timeout=5).json() == changed
    assert http.put(admin, json={"time_scale": 0.01}, timeout=5).json()["url"] == receiver.url
    for bad in (
        {"url": "ftp://x"}, {"url": 5}, {"time_scale": -1}, {"time_scale": "1"}, {"timeout": 0},
        {"retries": 3}, ["x"],
    ):  # fmt: skip
        assert http.put(admin, json=bad, timeout=5).status_code == 400, bad
    create(http, sandbox)
    pay(http, sandbox, "order-42", "expire")
    receiver.wait_for(1)
    listing = http.get(admin, timeout=5).json()
    assert {k: v for k, v in listing.items() if k != "callbacks"} == {
        "url": receiver.url, "time_scale": 0.01, "timeout": 2.0
    }  # fmt: skip
    assert [c["foreign_id"] for c in listing["callbacks"]] == ["order-42"]
    # Reset forgets the callbacks, not where they go.
    http.post(f"{sandbox.admin_url}/reset", timeout=5)
    assert http.get(admin, timeout=5).json() == {**changed, "time_scale": 0.01, "callbacks": []}


def test_a_hanging_receiver_blocks_neither_requests_nor_stop(
    receiver: Receiver, http: requests.Session
) -> None:
    receiver.delay = 30  # never answers in this test's time
    sandbox = Sandbox(KEY, SECRET, callback_url=receiver.url).start()
    try:
        create(http, sandbox)
        started = time.monotonic()
        pay(http, sandbox, "order-42", "full")
        create(http, sandbox, foreign_id="order-43")
        assert time.monotonic() - started < 0.5
        receiver.wait_arrived(1)  # the first attempt is in flight, its answer never comes
    finally:
        started = time.monotonic()
        sandbox.stop()
    assert time.monotonic() - started < 1
    assert {c["state"] for c in sandbox.callbacks()} == {"pending"}
