"""The task message contract: what a producer (Python or not) puts in ``invoices.create``.

kwargs:
    request (object): the create-invoice fields; ``amount`` a decimal string (e.g. "0.1"), an
        integer, or a JSON number exact to 8 decimal places (``models.json_amount``).
    deadline (number | null): Unix seconds; past it the job ends ``expired`` uncalled.
    callback_task (string | null): a Celery task name sent the final record.
    callback_queue (string | null): the queue for that callback task; required with it, and
        not the invoice queue itself (our workers would discard the callback there).
    status_task, status_queue (string | null, optional): a Celery task sent the record at each
        change of the invoice's status (by the callback receiver), and its queue, under the
        same rules. Left out of a message when unset, so workers that predate them read it.

One model, :class:`TaskMessage`, validates the options for the producer (before anything is
written) and for the worker (whatever sent the message), so both apply exactly the same rules.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import uuid
from datetime import datetime
from typing import Annotated, Any

from celery import Celery
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from invoice_worker.constants import TASK_NAME
from invoice_worker.errors import InvalidRequestError
from invoice_worker.models import JSON_NUMBERS, InvoiceRequest, validation_messages
from invoice_worker.privacy import kwargs_repr

#: Latest deadline accepted (the year 2100): a larger number is a unit mistake (milliseconds).
MAX_DEADLINE = 4_102_444_800
# A Celery task or queue name: printable, no spaces (it becomes a routing key and a log field).
_NAME_RE = re.compile(r"^[\x21-\x7e]{1,255}$")


def _deadline(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number of Unix seconds, or null")
    if not math.isfinite(value) or not 0 <= value <= MAX_DEADLINE:
        raise ValueError(f"must be Unix seconds between 0 and {MAX_DEADLINE}")
    return float(value)


def _name(value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise ValueError("must be 1-255 printable characters without spaces")
    return value


Name = Annotated[str, AfterValidator(_name)]


class TaskMessage(BaseModel):
    """The kwargs of one ``invoices.create`` message.

    Validate with ``context={"queue": <invoice queue>}`` so a callback cannot be routed to the
    queue our own workers consume (they would discard it as an unknown task).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    request: InvoiceRequest
    deadline: Annotated[float | None, BeforeValidator(_deadline)] = None
    callback_task: Name | None = None
    callback_queue: Name | None = Field(None, validate_default=True)

    status_task: Name | None = None
    status_queue: Name | None = Field(None, validate_default=True)

    @field_validator("callback_queue", "status_queue")
    @classmethod
    def _route(cls, queue: str | None, info: ValidationInfo) -> str | None:
        task_field = f"{str(info.field_name).removesuffix('_queue')}_task"
        task = info.data.get(task_field)
        what = "the callback" if task_field == "callback_task" else "the status task"
        if queue is None:
            if task is not None:
                raise ValueError(
                    f"is required with {task_field}: Celery's default queue is the invoice "
                    f"queue, whose workers would discard {what}"
                )
            return queue
        if task is None and task_field not in info.data:
            return queue  # the task name itself is invalid: that error says enough
        if task is None:
            raise ValueError(f"is given without {task_field}")
        if queue == (info.context or {}).get("queue"):
            raise ValueError(f"must not be the invoice queue: its workers would discard {what}")
        return queue

    @classmethod
    def parse(cls, kwargs: Any, *, queue: str | None = None, wire: bool = False) -> TaskMessage:
        """Validate task kwargs (or producer options) from any source.

        ``wire`` is for kwargs decoded from a broker message (the worker): there a JSON number
        ``amount`` is read as its shortest decimal form (``models.json_amount``), which the
        Python API refuses.

        Raises:
            InvalidRequestError: naming each bad field (request fields as ``request.<name>``).
        """
        if not isinstance(kwargs, dict):
            raise InvalidRequestError({"kwargs": "must be an object (the task's keyword args)"})
        errors = {
            str(name): "is not an argument of invoices.create"
            for name in kwargs
            if name not in _FIELDS
        }
        request = kwargs.get("request")
        if not isinstance(request, dict | InvoiceRequest):
            errors["request"] = "is required: an object with the create-invoice fields"
        try:
            message = cls.model_validate(
                {k: v for k, v in kwargs.items() if k in _FIELDS},
                context={"queue": queue, JSON_NUMBERS: wire},
            )
        except ValidationError as exc:
            errors = {**validation_messages(exc), **errors}
        if errors:
            raise InvalidRequestError(errors)
        return message

    def kwargs(self) -> dict[str, Any]:
        """Return the JSON-safe task kwargs."""
        kwargs = {
            "request": self.request.to_message(),
            "deadline": self.deadline,
            "callback_task": self.callback_task,
            "callback_queue": self.callback_queue,
        }
        if self.status_task is not None:
            kwargs.update(status_task=self.status_task, status_queue=self.status_queue)
        return kwargs

    def fingerprint(self) -> str:
        """Hash of the request alone: options like the deadline do not make a conflict."""
        return self.request.fingerprint()


#: TaskMessage's field names. pydantic 2.11+ computes ``TaskMessage.model_fields`` on every
#: access (a descriptor that calls a classmethod), about 0.7 us; parse asks twice per key.
_FIELDS = frozenset(TaskMessage.model_fields)


def unix_deadline(deadline: datetime | float | None) -> float | None:
    """A deadline option as Unix seconds (a producer may give an aware datetime).

    Raises:
        InvalidRequestError: for a naive datetime (its instant is unknown).
    """
    if isinstance(deadline, datetime):
        if deadline.tzinfo is None:
            raise InvalidRequestError({"deadline": "must be a timezone-aware datetime"})
        return deadline.timestamp()
    return deadline


def raw_fingerprint(kwargs: Any) -> str:
    """Hash of an undecodable message, so its failure record cannot clash with a real job."""
    text = json.dumps(kwargs, sort_keys=True, default=repr)
    return "raw:" + hashlib.sha256(text.encode()).hexdigest()


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
