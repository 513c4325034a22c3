"""The broker-entry and task-message checks: tables of what kombu and Celery can unpack.

``tests/test_transport.py`` runs the same kinds of entries through real worker processes.
"""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace
from typing import Any

import pytest
from kombu.message import Message
from kombu.transport import virtual

from invoice_worker import constants as c
from invoice_worker.app import create_app
from invoice_worker.envelope import read_envelope, read_unacked, task_problem
from invoice_worker.message import redis_envelope
from tests.conftest import job_kwargs, make_settings

#: kombu's own ``Channel.decode_body`` (it only reads the channel's codecs).
_channel = SimpleNamespace(codecs=virtual.Channel.codecs)
_decode_body: Any = virtual.Channel.decode_body


def decode_body(body: Any, encoding: Any) -> Any:
    return _decode_body(_channel, body, encoding)


def envelope(**changes: Any) -> dict[str, Any]:
    """A valid envelope for our task, as the producer writes it, with ``changes``."""
    app = create_app(make_settings("redis://127.0.0.1:1/0", "http://127.0.0.1:1"))
    data: dict[str, Any] = json.loads(redis_envelope(app, job_kwargs(), "task-1", "invoices"))
    data.update(changes)
    return data


def body(value: Any) -> str:
    return base64.b64encode(
        value if isinstance(value, bytes) else json.dumps(value).encode()
    ).decode()


def props(**changes: Any) -> dict[str, Any]:
    return {**envelope()["properties"], **changes}


def reason_for(data: Any) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    message, reason = read_envelope(raw, decode_body)
    assert (message is None) == bool(reason)
    return reason


def test_valid_envelope_passes() -> None:
    data = envelope()
    assert read_envelope(json.dumps(data).encode(), decode_body) == (data, "")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "not_json"),
        (b"x" * 100_000, "not_json"),
        (b"[" * 100_000, "not_json"),  # past the decoder's recursion limit
        (b"\xff\xfe", "not_json"),
        (b'{"__type__": "decimal", "__value__": "abc"}', "not_json"),  # kombu's type hooks
        (b'{"__type__": "nope", "__value__": 1}', "not_json"),
        (b"[1,2]", "not_an_object"),
        (b'"a string"', "not_an_object"),
        (b"null", "not_an_object"),
        (b"{}", "no_properties"),
        (b'{"body": "!!notbase64"}', "no_properties"),
    ],
)
def test_not_an_envelope(raw: bytes, reason: str) -> None:
    assert reason_for(raw) == reason


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"properties": [1]}, "no_properties"),
        ({"properties": props(delivery_tag=None)}, "no_delivery_tag"),
        ({"properties": props(delivery_tag={"a": 1})}, "no_delivery_tag"),
        ({"properties": props(delivery_info=None)}, "no_delivery_info"),
        ({"properties": props(delivery_info={"exchange": ""})}, "no_delivery_info"),
        ({"properties": props(delivery_info={"exchange": 1, "routing_key": "q"})},
         "no_delivery_info"),
        ({"headers": [1]}, "bad_headers"),
        ({"headers": "x"}, "bad_headers"),
        ({"content-type": ["application/json"]}, "bad_content_type"),
        ({"content-encoding": 5}, "bad_content_type"),
        ({"properties": props(body_encoding="rot13")}, "bad_body"),
        ({"properties": props(body_encoding=5)}, "bad_body"),
        ({"body": "!!notbase64"}, "bad_body"),
        ({"body": ["not", "a", "string"]}, "bad_body"),
    ],
)  # fmt: skip
def test_envelope_kombu_or_celery_cannot_use(changes: dict[str, Any], reason: str) -> None:
    assert reason_for(envelope(**changes)) == reason


def test_envelopes_with_any_task_fields_pass() -> None:
    # Task headers and bodies are the consumer's to check (task_problem), on every broker.
    assert reason_for(envelope(headers={"task": ["x"]}, body=body([1]))) == ""


def task_message(headers: Any, task_body: Any, content_type: str = "application/json") -> Any:
    """A kombu message as Celery's task consumer hands it over (JSON accepted only)."""
    raw = task_body if isinstance(task_body, bytes) else json.dumps(task_body).encode()
    return Message(  # type: ignore[no-untyped-call]
        body=raw, headers=headers, content_type=content_type, content_encoding="utf-8",
        accept={"application/json"},
    )  # fmt: skip


def test_valid_task_message_passes_and_stays_decoded() -> None:
    message = task_message({"task": c.TASK_NAME, "id": "1"}, [[], {"request": {}}, {}])
    assert task_problem(message) == ""
    assert message._decoded_cache == [[], {"request": {}}, {}]  # Celery decodes nothing again


@pytest.mark.parametrize(
    "headers",
    [
        {"task": ["x"], "id": "1"},  # unhashable: strategies[type_] raises TypeError
        {"task": c.TASK_NAME},  # no id: KeyError, which kombu counts as a connection error
        {"task": c.TASK_NAME, "id": ["x"]},  # unhashable: the revoked-set lookup
    ],
)
def test_task_headers_celery_would_crash_on(headers: Any) -> None:
    assert task_problem(task_message(headers, [[], {}, {}])) == "bad_task_headers"


@pytest.mark.parametrize(
    "task_body",
    [
        [1],  # Celery unpacks args, kwargs, embed without a check
        [[], {}],
        [{}, {}, {}],
        [[], [], {}],
        [[], {}, []],
        "abc",  # three characters unpack too
        {"kwargs": {}},  # protocol 2 headers with a dict body need "args"
        {"args": {}, "kwargs": {}},
        {"args": [], "kwargs": []},
    ],
)
def test_task_bodies_celery_would_crash_on(task_body: Any) -> None:
    message = task_message({"task": c.TASK_NAME, "id": "1"}, task_body)
    assert task_problem(message) == "bad_task_body"


@pytest.mark.parametrize(
    "task_body",
    [
        [[], {"request": {}}, {}],
        [["a", 1], {}, None],
        {"args": [], "kwargs": {"request": {}}},  # hybrid protocol
    ],
)
def test_task_bodies_celery_can_unpack(task_body: Any) -> None:
    # Whether their arguments are valid is the task's business (it records invalid_message).
    assert task_problem(task_message({"task": c.TASK_NAME, "id": "1"}, task_body)) == ""


@pytest.mark.parametrize(
    ("task_body", "reason"),
    [
        ({"task": c.TASK_NAME, "id": "1", "args": [], "kwargs": {}}, ""),
        ({"task": "shop.unknown", "id": "1"}, ""),
        ({"hello": "world"}, ""),  # not a task message: Celery discards it as unknown
        ({"task": ["x"], "id": "1"}, "bad_task_body"),
        ({"task": c.TASK_NAME}, "bad_task_body"),
        ({"task": c.TASK_NAME, "id": "1", "kwargs": []}, "bad_task_body"),
    ],
)
def test_protocol_1_task_bodies(task_body: Any, reason: str) -> None:
    assert task_problem(task_message({}, task_body)) == reason


def test_bodies_celery_refuses_itself_are_left_to_it() -> None:
    headers = {"task": c.TASK_NAME, "id": "1"}
    assert task_problem(task_message(headers, b"not json")) == ""  # on_decode_error
    pickled = task_message(headers, b"\x80\x04N.", "application/x-python-serialize")
    assert task_problem(pickled) == ""  # on_invalid_task: content type not accepted


def test_non_task_messages_pass() -> None:
    # Remote-control (pidbox) messages: no task headers, any body; plain text too.
    assert reason_for(envelope(headers={}, body=body({"method": "ping", "arguments": {}}))) == ""
    data = envelope(headers={}, body="hello", **{"content-type": "text/plain"})
    data["properties"]["body_encoding"] = None
    assert reason_for(data) == ""


def test_unacked_entries() -> None:
    good = envelope()
    assert read_unacked(json.dumps([good, "", "q"]), decode_body) == ((good, "", "q"), "")
    for entry in ["not json", [good, "", "q", 1], [good, None, "q"], [[1, 2], "", "q"], {}]:
        raw = entry if isinstance(entry, str) else json.dumps(entry)
        assert read_unacked(raw, decode_body) == (None, "bad_unacked_entry")
