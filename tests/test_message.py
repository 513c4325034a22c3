"""The task-message contract (invoice_worker.message): TaskMessage.parse and the envelope."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from invoice_worker.app import create_app
from invoice_worker.constants import TASK_NAME
from invoice_worker.errors import InvalidRequestError
from invoice_worker.message import MAX_DEADLINE, TaskMessage, raw_fingerprint, redis_envelope
from invoice_worker.models import parse_request
from tests.conftest import make_settings, request_data

QUEUE = "invoices"
NOT_AN_ARGUMENT = "is not an argument of invoices.create"
BAD_NAME = "must be 1-255 printable characters without spaces"


def errors_of(kwargs: Any, queue: str | None = QUEUE) -> dict[str, str]:
    with pytest.raises(InvalidRequestError) as info:
        TaskMessage.parse(kwargs, queue=queue)
    return info.value.errors


def test_valid_kwargs_parse() -> None:
    data = request_data()
    message = TaskMessage.parse(
        {"request": data, "deadline": 1_900_000_000, "callback_task": "shop.paid",
         "callback_queue": "shop"},
        queue=QUEUE,
    )  # fmt: skip
    assert message.request == parse_request(data)
    assert message.deadline == 1_900_000_000.0
    assert isinstance(message.deadline, float)
    assert (message.callback_task, message.callback_queue) == ("shop.paid", "shop")


def test_only_request_is_required() -> None:
    message = TaskMessage.parse({"request": request_data()})
    assert (message.deadline, message.callback_task, message.callback_queue) == (None, None, None)


def test_an_invoice_request_is_taken_as_it_is() -> None:
    request = parse_request(request_data())
    assert TaskMessage.parse({"request": request}).request is request


@pytest.mark.parametrize("kwargs", [None, [], "request", 42, [("request", {})]])
def test_kwargs_must_be_an_object(kwargs: Any) -> None:
    assert errors_of(kwargs) == {"kwargs": "must be an object (the task's keyword args)"}


@pytest.mark.parametrize("request_value", ["missing", None, "x", 7, ["a"]])
def test_request_must_be_an_object(request_value: Any) -> None:
    kwargs = {} if request_value == "missing" else {"request": request_value}
    assert errors_of(kwargs) == {"request": "is required: an object with the create-invoice fields"}


def test_request_field_errors_are_prefixed() -> None:
    errors = errors_of({"request": request_data(amount="abc", title="", unexpected=1)})
    assert errors == {
        "request.title": "String should have at least 1 character",
        "request.amount": "must be a decimal number",
        "request.unexpected": "is not a field of the create-invoice request",
    }


def test_unknown_arguments_are_named_with_every_other_error() -> None:
    errors = errors_of({"request": request_data(), "args": [1], "priority": 9, "deadline": "x"})
    assert errors == {
        "args": NOT_AN_ARGUMENT,
        "priority": NOT_AN_ARGUMENT,
        "deadline": "must be a number of Unix seconds, or null",
    }


@pytest.mark.parametrize(
    ("deadline", "expected"),
    [(None, None), (0, 0.0), (1_900_000_000, 1_900_000_000.0), (1.5, 1.5),
     (MAX_DEADLINE, float(MAX_DEADLINE))],
)  # fmt: skip
def test_deadline_accepted(deadline: Any, expected: float | None) -> None:
    assert TaskMessage.parse({"request": request_data(), "deadline": deadline}).deadline == expected


@pytest.mark.parametrize(
    ("deadline", "error"),
    [
        (True, "must be a number of Unix seconds, or null"),
        ("1900000000", "must be a number of Unix seconds, or null"),
        ([1], "must be a number of Unix seconds, or null"),
        (-1, f"must be Unix seconds between 0 and {MAX_DEADLINE}"),
        (MAX_DEADLINE + 1, f"must be Unix seconds between 0 and {MAX_DEADLINE}"),
        (1_900_000_000_000, f"must be Unix seconds between 0 and {MAX_DEADLINE}"),  # ms
        (float("inf"), f"must be Unix seconds between 0 and {MAX_DEADLINE}"),
        (float("nan"), f"must be Unix seconds between 0 and {MAX_DEADLINE}"),
    ],
)
def test_deadline_refused(deadline: Any, error: str) -> None:
    assert errors_of({"request": request_data(), "deadline": deadline}) == {"deadline": error}


@pytest.mark.parametrize(
    "name", ["shop.tasks.paid", "a", "x" * 255, "celery@host:queue/1", "~!#$%^&*()[]{}"]
)
def test_callback_names_accepted(name: str) -> None:
    message = TaskMessage.parse(
        {"request": request_data(), "callback_task": name, "callback_queue": name}, queue=QUEUE
    )
    assert (message.callback_task, message.callback_queue) == (name, name)


@pytest.mark.parametrize(
    "name", ["", "x" * 256, "shop paid", "shop.paid\n", "\nshop", "shop\tpaid", "café", "a\x00"]
)
def test_callback_names_refused(name: str) -> None:
    assert errors_of(
        {"request": request_data(), "callback_task": "shop.paid", "callback_queue": name}
    ) == {"callback_queue": BAD_NAME}
    # An invalid task name is the only error: the queue's route rules need a valid task.
    assert errors_of(
        {"request": request_data(), "callback_task": name, "callback_queue": "shop"}
    ) == {"callback_task": BAD_NAME}


@pytest.mark.parametrize("value", [5, ["shop"], {"name": "shop"}])
def test_callback_names_must_be_strings(value: Any) -> None:
    errors = errors_of({"request": request_data(), "callback_task": value, "callback_queue": "q"})
    assert errors == {"callback_task": "Input should be a valid string"}


def test_callback_task_requires_a_queue() -> None:
    errors = errors_of({"request": request_data(), "callback_task": "shop.paid"})
    assert list(errors) == ["callback_queue"]
    assert errors["callback_queue"].startswith("is required with callback_task")


def test_callback_queue_requires_a_task() -> None:
    errors = errors_of({"request": request_data(), "callback_queue": "shop"})
    assert errors == {"callback_queue": "is given without callback_task"}


def test_callback_queue_cannot_be_the_invoice_queue() -> None:
    kwargs = {"request": request_data(), "callback_task": "shop.paid", "callback_queue": QUEUE}
    assert errors_of(kwargs, queue=QUEUE) == {
        "callback_queue": "must not be the invoice queue: its workers would discard the callback"
    }
    # Another invoice queue (another deployment's) is an ordinary queue here.
    assert TaskMessage.parse(kwargs, queue="invoices-eu").callback_queue == QUEUE
    # Without a queue context (a producer that does not know it) the rule cannot apply.
    assert TaskMessage.parse(kwargs).callback_queue == QUEUE


def test_every_error_at_once() -> None:
    errors = errors_of(
        {"request": request_data(currency="btc"), "deadline": -5, "callback_queue": "shop",
         "extra": 1},
    )  # fmt: skip
    assert set(errors) == {"request.currency", "deadline", "callback_queue", "extra"}


def test_kwargs_round_trip() -> None:
    kwargs = {
        "request": request_data(amount="0.10", description=None, type="fill_or_kill"),
        "deadline": 1_900_000_000.5,
        "callback_task": "shop.paid",
        "callback_queue": "shop",
    }
    message = TaskMessage.parse(kwargs, queue=QUEUE)
    out = message.kwargs()
    assert json.loads(json.dumps(out)) == out  # JSON-safe: primitives only
    assert out["request"]["amount"] == "0.10"  # a decimal string, exactly as given
    assert "description" not in out["request"]
    assert {k: v for k, v in out.items() if k != "request"} == {
        "deadline": 1_900_000_000.5, "callback_task": "shop.paid", "callback_queue": "shop"
    }  # fmt: skip
    assert TaskMessage.parse(out, queue=QUEUE) == message
    assert TaskMessage.parse(out, queue=QUEUE).kwargs() == out


def test_fingerprint_is_the_requests_and_ignores_options() -> None:
    data = request_data(amount="0.1")
    plain = TaskMessage.parse({"request": data})
    with_options = TaskMessage.parse(
        {"request": {**data, "amount": "0.10"}, "deadline": 1_900_000_000,
         "callback_task": "shop.paid", "callback_queue": "shop"}
    )  # fmt: skip
    assert plain.fingerprint() == with_options.fingerprint() == parse_request(data).fingerprint()
    other = TaskMessage.parse({"request": {**data, "amount": "0.2"}})
    assert other.fingerprint() != plain.fingerprint()


def test_raw_fingerprint_is_stable_and_apart_from_request_fingerprints() -> None:
    assert raw_fingerprint({"a": 1, "b": [2]}) == raw_fingerprint({"b": [2], "a": 1})
    assert raw_fingerprint({"a": 1}) != raw_fingerprint({"a": 2})
    assert raw_fingerprint([1, object()]).startswith("raw:")  # anything, even unserialisable
    assert not TaskMessage.parse({"request": request_data()}).fingerprint().startswith("raw:")


def test_redis_envelope_shape() -> None:
    app = create_app(make_settings("redis://127.0.0.1:1/0", "http://127.0.0.1:1"))
    kwargs = TaskMessage.parse({"request": request_data()}).kwargs()
    data = json.loads(redis_envelope(app, kwargs, "task-1", "invoices-x"))
    assert set(data) == {"body", "content-encoding", "content-type", "headers", "properties"}
    assert (data["content-type"], data["content-encoding"]) == ("application/json", "utf-8")
    assert json.loads(base64.b64decode(data["body"])) == [
        [],
        kwargs,
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
    ]
    headers = data["headers"]
    assert (headers["task"], headers["id"], headers["root_id"]) == (TASK_NAME, "task-1", "task-1")
    assert headers["argsrepr"] == "()"
    assert "buyer@example.com" not in headers["kwargsrepr"]
    assert "'email_user': '***'" in headers["kwargsrepr"]
    props = data["properties"]
    assert props["delivery_info"] == {"exchange": "", "routing_key": "invoices-x"}
    assert (props["delivery_mode"], props["priority"], props["body_encoding"]) == (2, 0, "base64")
    assert props["correlation_id"] == "task-1"
    assert props["kwargsrepr"] == headers["kwargsrepr"]
    assert (
        props["delivery_tag"]
        != json.loads(redis_envelope(app, kwargs, "task-1", "invoices-x"))["properties"][
            "delivery_tag"
        ]
    )


def test_a_json_number_amount_is_the_same_request_as_its_string() -> None:
    # Given the same order sent by a JavaScript producer (0.1) and by a Python one ("0.1")
    data = request_data(amount="0.1")
    wire = TaskMessage.parse({"request": {**data, "amount": 0.1}}, queue=QUEUE, wire=True)
    python = TaskMessage.parse({"request": data}, queue=QUEUE)
    # Then the worker sees one request: no conflict, the same copy and provider body
    assert wire.fingerprint() == python.fingerprint()
    assert wire.kwargs() == python.kwargs()
    assert wire.kwargs()["request"]["amount"] == "0.1"
    assert b'"amount":0.1,' in wire.request.to_body()


@pytest.mark.parametrize(
    ("amount", "rule"),
    [
        (0.1 + 0.2, "at most 8 places in its shortest form"),
        (1e-9, "at most 8 places in its shortest form"),
        (float("nan"), "must be a finite number"),
        (True, "must be a decimal number, not a boolean"),
        (-0.5, "greater than 0"),
    ],
)
def test_a_json_number_amount_is_refused_unless_exact(amount: Any, rule: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        TaskMessage.parse({"request": request_data(amount=amount)}, queue=QUEUE, wire=True)
    assert list(info.value.errors) == ["request.amount"]
    assert rule in info.value.errors["request.amount"]


def test_the_python_api_still_refuses_a_float_amount() -> None:
    errors = errors_of({"request": request_data(amount=0.1)})
    assert errors == {"request.amount": "must be a decimal string or an integer, not a float"}
