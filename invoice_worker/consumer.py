"""The worker's consumer: Celery's, safe against malformed task messages and quiet about bodies.

Two things Celery's own consumer (celery 5.7.0, ``worker/consumer/consumer.py``) does not do:

- **Survive a task message it cannot unpack.** Task headers without a string ``id``, or a JSON
  body that is not ``[args, kwargs, embed]``, raise inside ``on_task_received`` (line 806) and
  the worker exits, on any broker. Each message is checked first
  (``invoice_worker.envelope.task_problem``, no extra decoding: kombu memoizes the body for
  Celery); a bad one is logged without its content and discarded: on Redis it goes to the
  dead-letter list like any malformed entry (``invoice_worker.transport``), on RabbitMQ it is
  rejected without requeue (to the queue's dead-letter exchange, if it has one).
- **Discard a message without logging its body.** Celery logs the whole body and headers
  (``email_user``, and the unmasked ``kwargsrepr`` that Celery's own ``send_task`` adds) at
  ERROR for an unregistered task name (``on_unknown_task``, line 752) or a refused content type
  or invalid task message (``on_invalid_task``, line 785), at CRITICAL for a body it cannot
  decode (``on_decode_error``, line 565) and at WARNING for a message that is not a task
  (``on_unknown_message``, line 747). Here each logs one line with what an operator needs (task
  name, id, queue, content type, the reason) and does with the message what Celery's does; the
  dumps themselves are dropped by ``invoice_worker.logfilter``, which this consumer installs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from celery import signals
from celery.exceptions import InvalidTaskError
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.utils.json import dumps

from invoice_worker import logfilter
from invoice_worker.constants import TASK_NAME
from invoice_worker.envelope import task_problem
from invoice_worker.logfilter import field
from invoice_worker.privacy import REPR_LIMIT, redact
from invoice_worker.transport import Channel

log = logging.getLogger(__name__)

#: Exceptions whose text is Celery's or kombu's own wording about the message's headers or
#: format, never a piece of its body (a ``ValueError`` from a JSON hook may quote the body).
_TEXT_SAFE = (ContentDisallowed, InvalidTaskError, json.JSONDecodeError)


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer: malformed task messages set aside, discards logged without bodies."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The worker's main process builds its consumer before it forks pool children, which
        # inherit the filters.
        logfilter.install()
        super().__init__(*args, **kwargs)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        handle: Callable[[Any], Any] = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            problem = task_problem(message)
            if problem:
                return self.on_malformed_task(message, problem)
            mask_reprs(message)
            return handle(message)

        return on_task_received

    def on_malformed_task(self, message: Any, problem: str) -> None:
        """Set aside (Redis) or reject (other brokers) a message Celery cannot unpack; one of
        ours with a usable task id also ends as a recorded ``invalid_message`` failure."""
        log.error("discarded a malformed task message: %s reason=%s", describe(message), problem)
        self._record_ours(message)
        channel = message.channel
        if isinstance(channel, Channel):
            raw = dumps(message._raw)  # type: ignore[no-untyped-call]
            channel.set_aside(raw, _queue(message), problem)
            message.ack_log_error(log, self.connection_errors)
        else:
            message.reject_log_error(log, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=None)

    def _record_ours(self, message: Any) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        task_id = headers.get("id")
        task = self.app.tasks.get(TASK_NAME)
        if headers.get("task") != TASK_NAME or not isinstance(task_id, str) or task is None:
            return
        try:
            body = message.payload
            kwargs = body[1] if isinstance(body, list) and len(body) > 1 else body
            task.record_invalid(kwargs, task_id)
        except Exception:  # the dead-letter copy still holds it; the job store may be away
            log.warning("could not record the malformed message %s", field(task_id))

    def on_unknown_message(self, body: Any, message: Any) -> None:
        log.warning("discarded a message that is not a task message: %s", describe(message, body))
        message.reject_log_error(log, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=None)

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        log.error(
            "discarded an invalid task message: %s reason=%s", describe(message, body), reason(exc)
        )
        message.reject_log_error(log, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        log.critical(
            "discarded a message that cannot be decoded: %s reason=%s",
            describe(message), reason(exc),
        )  # fmt: skip
        message.ack()

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        log.error("discarded a message for an unregistered task: %s", describe(message, body))
        # Celery's handler also rejects it, reports the failure and sends task_unknown; the
        # dump it logs first is dropped by the filter.
        super().on_unknown_task(body, message, exc)


def mask_reprs(message: Any) -> None:
    """Mask e-mail addresses in the ``argsrepr`` / ``kwargsrepr`` a producer sent: Celery shows
    them in the worker's task events (Flower) and logs, and Celery's own ``send_task`` writes
    them unmasked (``saferepr`` of the arguments) unless the producer passes its own. The text
    itself is masked (bounded, linear): the body is not decoded here, it may be refused."""
    headers = message.headers
    if not isinstance(headers, dict):
        return
    for name in ("argsrepr", "kwargsrepr"):
        shown = headers.get(name)
        if isinstance(shown, str) and "@" in shown:
            headers[name] = redact(shown, REPR_LIMIT)


def _queue(message: Any) -> str:
    delivery = message.delivery_info if isinstance(message.delivery_info, dict) else {}
    return str(delivery.get("routing_key", "?"))


def describe(message: Any, body: Any = None) -> str:
    """``task=... id=... queue=... content_type=...`` of a kombu message, body left out.

    ``body`` is the decoded body Celery passes for protocol 1, where the task fields live.
    """
    headers = message.headers if isinstance(message.headers, dict) else {}
    if "task" not in headers and isinstance(body, dict):
        headers = body
    return (
        f"task={field(headers.get('task', '?'))} id={field(headers.get('id', '?'))} "
        f"queue={field(_queue(message))} "
        f"content_type={field(message.content_type)} (body not logged)"
    )


def reason(exc: BaseException) -> str:
    """The exception's type, with its text only when that text cannot quote the body."""
    if isinstance(exc, DecodeError) and exc.args and isinstance(exc.args[0], BaseException):
        return f"DecodeError({reason(exc.args[0])})"
    if isinstance(exc, _TEXT_SAFE):
        return f"{type(exc).__name__}({field(str(exc))})"
    return type(exc).__name__
