"""What a broker entry and a task message must be before kombu and Celery dereference them.

kombu's Redis transport decodes each entry it pops and reads its fields without a check, and
Celery's worker then does the same with the task fields: an entry that is not JSON, a JSON
list, an envelope without ``properties``, task headers without an ``id`` or a body that is not
``[args, kwargs, embed]`` raise inside the consumer's event loop, and the worker process exits
("Unrecoverable error"; celery#1113) or reconnects to the broker in a loop (kombu counts a
``KeyError`` as a connection error). Two checks answer before that code runs:

- ``read_envelope``, for a raw Redis entry (``invoice_worker.transport``): ``not_json``
  (including kombu's ``__type__`` hooks), ``not_an_object``, ``no_properties``,
  ``no_delivery_tag``, ``no_delivery_info``, ``bad_headers`` (not a mapping),
  ``bad_content_type`` (not a string), ``bad_body`` (its ``body_encoding`` cannot decode it);
- ``task_problem``, for a kombu message on any broker (``invoice_worker.consumer``):
  ``bad_task_headers`` (``task`` or ``id`` not a string) and ``bad_task_body`` (a JSON body
  Celery would unpack without a check).

Whatever passes either runs or is refused by Celery's own handlers (unregistered task name,
content type not accepted, a body that does not decode), which discard it without crashing.
Reasons name what was wrong, never the content.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

JSON = "application/json"

Envelope = dict[str, Any]
#: A channel's ``decode_body(body, body_encoding)``: base64 and the like (kombu codecs).
BodyDecoder = Callable[[Any, Any], Any]


def read_envelope(raw: bytes | str, decode_body: BodyDecoder) -> tuple[Envelope | None, str]:
    """Decode a Redis broker entry as kombu does and check what kombu reads from it.

    Returns:
        ``(envelope, "")`` for an entry kombu can deliver, else ``(None, reason)``.
    """
    payload = _json(raw)
    if payload is _INVALID:
        return None, "not_json"
    reason = envelope_problem(payload, decode_body)
    return (None, reason) if reason else (payload, "")


def read_unacked(
    raw: bytes | str, decode_body: BodyDecoder
) -> tuple[tuple[Envelope, str, str] | None, str]:
    """Decode an entry of kombu's ``unacked`` hash: ``[envelope, exchange, routing_key]``.

    Returns:
        ``((envelope, exchange, routing_key), "")``, else ``(None, "bad_unacked_entry")``.
    """
    entry = _json(raw)
    if not (isinstance(entry, list) and len(entry) == 3):
        return None, "bad_unacked_entry"
    payload, exchange, routing_key = entry
    if not (isinstance(exchange, str) and isinstance(routing_key, str)):
        return None, "bad_unacked_entry"
    if envelope_problem(payload, decode_body):
        return None, "bad_unacked_entry"
    return (payload, exchange, routing_key), ""


def envelope_problem(payload: Any, decode_body: BodyDecoder) -> str:
    """Return why kombu could not build a message from ``payload`` (decoded JSON), or ``""``."""
    if not isinstance(payload, dict):
        return "not_an_object"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return "no_properties"
    if not isinstance(properties.get("delivery_tag"), str):
        return "no_delivery_tag"
    info = properties.get("delivery_info")
    if not (
        isinstance(info, dict)
        and isinstance(info.get("exchange"), str)
        and isinstance(info.get("routing_key"), str)
    ):
        return "no_delivery_info"
    if not isinstance(payload.get("headers"), dict | None):
        return "bad_headers"
    if not all(
        isinstance(payload.get(k), str | None) for k in ("content-type", "content-encoding")
    ):
        return "bad_content_type"
    body = payload.get("body")
    if body:  # kombu decodes only a non-empty body
        try:
            decode_body(body, properties.get("body_encoding"))
        except Exception:  # any codec failure (binascii, unknown encoding, wrong type)
            return "bad_body"
    return ""


def task_problem(message: Any) -> str:
    """Return why Celery's worker could not unpack this kombu message, or ``""``.

    Only JSON bodies are read, through ``message.payload``, which kombu memoizes for Celery; a
    body that does not decode is left to Celery, which reports and discards it.
    """
    headers = message.headers
    if not isinstance(headers, dict | None):
        return "bad_task_headers"
    headers = headers or {}
    if "task" in headers and not (
        isinstance(headers["task"], str) and isinstance(headers.get("id"), str)
    ):
        return "bad_task_headers"
    if message.content_type != JSON:
        return ""
    try:
        data = message.payload
    except Exception:  # Celery's on_decode_error reports it
        return ""
    if "task" in headers:
        if isinstance(data, list):
            ok = (
                len(data) == 3
                and isinstance(data[0], list)
                and isinstance(data[1], dict)
                and isinstance(data[2], dict | None)
            )
        else:  # the hybrid protocol: a protocol 1 body under protocol 2 headers
            ok = isinstance(data, dict) and "args" in data and _args_ok(data)
        return "" if ok else "bad_task_body"
    if isinstance(data, dict) and "task" in data:  # protocol 1
        ok = isinstance(data["task"], str) and isinstance(data.get("id"), str) and _args_ok(data)
        return "" if ok else "bad_task_body"
    return ""  # not a task message: Celery discards it as unknown


def _args_ok(data: dict[str, Any]) -> bool:
    return isinstance(data.get("args", []), list) and isinstance(data.get("kwargs", {}), dict)


_INVALID = object()


def _json(raw: Any) -> Any:
    try:
        return loads(bytes_to_str(raw))  # type: ignore[no-untyped-call]
    except Exception:  # kombu's object hooks raise more than ValueError (Decimal, UUID, ...)
        return _INVALID
