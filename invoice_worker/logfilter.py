"""A filter on Celery's and kombu's own loggers: no message bodies, no forged lines.

Celery writes what a message carries into its log lines: whole bodies and headers when it
discards a message (``email_user`` included; ``invoice_worker.consumer`` logs its own lines for
those instead), task ids and exception texts as they came, and the task's args and kwargs in the
arguments of its "received" and "succeeded" lines (for handlers that read ``record.args`` or
``record.data``, such as error trackers). On the loggers in ``LOGGERS`` this filter:

- drops Celery's four body-dump records (``UNKNOWN_TASK_ERROR`` and friends);
- rewrites the two other lines that print a whole message: a task whose ETA cannot be converted
  (celery 5.7.0 ``worker/strategy.py`` line 187) and a message kombu could not restore
  (kombu 5.7.0 ``transport/redis.py`` line 1284);
- escapes control characters in every argument and in exception texts, so a task id or a
  content type with a newline cannot write a line of its own;
- replaces ``args`` and ``kwargs`` in Celery's context dicts with ``HIDDEN``.

Nothing is installed at import: ``install()`` is called by the worker's consumer.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from celery.worker.consumer.consumer import (
    INVALID_TASK_ERROR,
    MESSAGE_DECODE_ERROR,
    UNKNOWN_FORMAT,
    UNKNOWN_TASK_ERROR,
)

from invoice_worker.privacy import escape_controls

#: Loggers whose lines carry message data (celery 5.7.0, kombu 5.7.0).
LOGGERS = (
    "celery.worker.consumer.consumer",
    "celery.worker.strategy",
    "celery.worker.request",
    "celery.app.trace",
    "kombu.transport.redis",
)
HIDDEN = "<hidden>"
#: Longest text taken from a message into a line (task name, id, queue, content type).
FIELD_LIMIT = 200

#: Celery's body dumps: dropped (the consumer logs a line without the body instead).
DUMPS = frozenset({UNKNOWN_TASK_ERROR, INVALID_TASK_ERROR, MESSAGE_DECODE_ERROR, UNKNOWN_FORMAT})
ETA_ERROR = "Couldn't convert ETA %r to timestamp: %r. Task: %r"
RESTORE_ERROR = "Could not restore message: %r"


def field(value: Any) -> str:
    """A value taken from a message, as one bounded, escaped piece of a line."""
    text = value if isinstance(value, str) else repr(value)
    return escape_controls(text[:FIELD_LIMIT] + ("..." if len(text) > FIELD_LIMIT else ""))


class CeleryLogFilter(logging.Filter):
    """Drops, rewrites or escapes the records described in the module docstring."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return self._make_safe(record)
        except Exception:  # a filter must not raise into the code that logs
            record.msg, record.args = "(a log line was withheld: it could not be made safe)", ()
            record.exc_info = record.exc_text = None
            return True

    def _make_safe(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if isinstance(msg, str):
            if msg in DUMPS:
                return False
            if msg == ETA_ERROR and isinstance(record.args, tuple) and len(record.args) == 3:
                eta, exc, info = record.args
                record.msg = "Couldn't convert ETA %s to timestamp: %s. Task: %s[%s]"
                record.args = (field(eta), field(exc), *_name_id(info))
            elif msg == RESTORE_ERROR:
                # logging unpacks a lone dict argument: record.args is then the payload itself
                payload = (
                    record.args[0]
                    if isinstance(record.args, tuple) and record.args
                    else record.args
                )
                headers = payload.get("headers") if isinstance(payload, dict) else None
                record.msg = "Could not restore message %s[%s] (payload not logged)"
                record.args = _name_id({"name": _get(headers, "task"), "id": _get(headers, "id")})
        record.args = _escaped(record.args)
        if isinstance(record.args, dict) and isinstance(getattr(record, "data", None), dict):
            record.data = record.args  # Celery passes the same context dict as ``extra``
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = _traceback(record.exc_info)
        return True


def install() -> None:
    """Attach one ``CeleryLogFilter`` to each of ``LOGGERS`` (idempotent)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, CeleryLogFilter) for f in logger.filters):
            logger.addFilter(CeleryLogFilter())


class _Escaped:
    """An argument that formats (``%s`` or ``%r``) with its control characters escaped."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        return escape_controls(str(self.value))

    def __repr__(self) -> str:
        return escape_controls(repr(self.value))


def _escaped(args: Any) -> Any:
    if isinstance(args, tuple):
        return tuple(_wrap(a) for a in args)
    if isinstance(args, Mapping):  # logging takes a lone mapping argument as the args
        return {k: HIDDEN if k in ("args", "kwargs") else _wrap(v) for k, v in args.items()}
    return args


def _wrap(value: object) -> object:
    # Numbers stay numbers: a template may format them with %d or %.2f. A printable str has
    # no control character (they are all Unicode "Other" or "Separator", which isprintable
    # refuses), nor has its repr: most of Celery's arguments, left as they are.
    if value is None or isinstance(value, int | float | _Escaped):
        return value
    if type(value) is str and value.isprintable():
        return value
    return _Escaped(value)


def _name_id(info: object) -> tuple[str, str]:
    return field(_get(info, "name")), field(_get(info, "id"))


def _get(mapping: object, key: str) -> object:
    return mapping.get(key, "?") if isinstance(mapping, dict) else "?"


_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def _traceback(exc_info: _ExcInfo) -> str:
    """The traceback as logging would print it, with each exception's text escaped."""
    text = "".join(traceback.format_exception(*exc_info)).rstrip("\n")
    seen: set[int] = set()
    exc: BaseException | None = exc_info[1]
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        try:
            message = str(exc)
        except Exception:  # a broken __str__ is printed by traceback as <exception str() failed>
            message = ""
        escaped = escape_controls(message)
        if message and escaped != message:
            text = text.replace(message, escaped)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return text
