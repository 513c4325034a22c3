"""The task message contract: what a producer (Python or not) puts in ``invoices.create``.

kwargs:
    request (object): the create-invoice fields; ``amount`` a decimal *string* (e.g. "0.1").
    deadline (number | null): Unix seconds; past it the job ends ``expired`` uncalled.
    callback_task (string | null): a Celery task name sent the final record.
    callback_queue (string | null): the queue for that callback task.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

from celery import Celery

from invoice_worker.constants import TASK_NAME
from invoice_worker.errors import InvalidRequestError
from invoice_worker.models import InvoiceRequest, parse_request

MASK = "***"
#: Fields never shown by Celery (Flower, logs, events): they are personal data.
PERSONAL_FIELDS = frozenset({"email_user"})


@dataclass(frozen=True)
class Message:
    """A decoded task message."""

    request: InvoiceRequest
    deadline: float | None = None
    callback_task: str | None = None
    callback_queue: str | None = None

    def kwargs(self) -> dict[str, Any]:
        """Return the JSON-safe task kwargs."""
        return {
            "request": self.request.to_message(),
            "deadline": self.deadline,
            "callback_task": self.callback_task,
            "callback_queue": self.callback_queue,
        }

    def fingerprint(self) -> str:
        """Hash of the request alone: options like the deadline do not make a conflict."""
        return self.request.fingerprint()


def decode(kwargs: dict[str, Any]) -> Message:
    """Validate task kwargs from any producer.

    Raises:
        InvalidRequestError: naming each bad field (request fields prefixed ``request.``).
    """
    errors: dict[str, str] = {}
    unknown = set(kwargs) - {"request", "deadline", "callback_task", "callback_queue"}
    for name in sorted(unknown):
        errors[name] = "is not an argument of invoices.create"
    deadline = kwargs.get("deadline")
    if deadline is not None and (
        isinstance(deadline, bool) or not isinstance(deadline, int | float)
    ):
        errors["deadline"] = "must be a number of Unix seconds or null"
    for name in ("callback_task", "callback_queue"):
        value = kwargs.get(name)
        if value is not None and (not isinstance(value, str) or not value or len(value) > 255):
            errors[name] = "must be a non-empty string of at most 255 characters, or null"
    request: InvoiceRequest | None = None
    raw = kwargs.get("request")
    if raw is None:
        errors["request"] = "is required: an object with the create-invoice fields"
    elif not isinstance(raw, dict):
        errors["request"] = "must be an object with the create-invoice fields"
    else:
        try:
            request = parse_request(raw)
        except InvalidRequestError as exc:
            errors.update({f"request.{k}": v for k, v in exc.errors.items()})
    if errors or request is None:
        raise InvalidRequestError(errors)
    return Message(
        request,
        float(deadline) if deadline is not None else None,
        kwargs.get("callback_task"),
        kwargs.get("callback_queue"),
    )


def raw_fingerprint(kwargs: Any) -> str:
    """Hash of an undecodable message, so its failure record cannot clash with a real job."""
    text = json.dumps(kwargs, sort_keys=True, default=repr)
    return "raw:" + hashlib.sha256(text.encode()).hexdigest()


def masked(value: Any) -> Any:
    """Return ``value`` with personal fields replaced by ``***``, at any depth."""
    if isinstance(value, dict):
        return {k: MASK if k in PERSONAL_FIELDS else masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [masked(v) for v in value]
    return value


def kwargs_repr(kwargs: dict[str, Any]) -> str:
    """What Celery shows for the kwargs (``kwargsrepr``): masked, and short."""
    text = repr(masked(kwargs))
    return text if len(text) <= 1024 else text[:1021] + "..."


def redis_envelope(app: Celery, kwargs: dict[str, Any], task_id: str, queue: str) -> str:
    """The message exactly as kombu's Redis transport stores it for ``send_task``.

    Celery builds the protocol-2 headers and body; we add kombu's envelope ourselves so the
    enqueue script can push it in the same atomic step as the record (a test compares it with
    kombu's own output). Celery publishes to the default exchange, i.e. straight onto the list
    named after the queue, so no binding lookup is involved.
    """
    repr_kwargs = kwargs_repr(kwargs)
    headers, properties, body, _ = app.amqp.as_task_v2(
        task_id,
        TASK_NAME,
        args=(),
        kwargs=kwargs,
        argsrepr="()",
        kwargsrepr=repr_kwargs,
        ignore_result=None,  # as send_task does: the task's own setting decides
    )
    properties.update(
        reply_to=app.thread_oid,
        argsrepr="()",
        kwargsrepr=repr_kwargs,
        delivery_mode=2,
        delivery_info={"exchange": "", "routing_key": queue},
        priority=0,
        body_encoding="base64",
        delivery_tag=str(uuid.uuid4()),
    )
    payload = base64.b64encode(json.dumps(body).encode()).decode()
    return json.dumps(
        {
            "body": payload,
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": properties,
        }
    )
