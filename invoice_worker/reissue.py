"""Re-issue: a fresh invoice for an order whose invoice failed (the customer tries again).

The job is moved on, never copied: one script (``lua/reissue.lua``) checks that the current
invoice failed, keeps it in the record's history, takes the next generation's derived provider
id (``<foreign_id>~r<n>``, the counter the orphan path also uses) and queues the job again; the
ordinary claim and attempt then create the invoice, exactly once. The caller names the
generation it saw fail, so any number of concurrent or repeated calls replace it once. Callbacks
for the replaced invoice keep arriving for a while: they update its history entry, never the
new invoice (``lua/callback.lua`` tells them apart by generation).
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from celery import Celery

from invoice_worker.attempt import derived_foreign_id
from invoice_worker.config import Settings
from invoice_worker.constants import TASK_NAME
from invoice_worker.errors import (
    ConflictError,
    NotDurableError,
    ReissueRefusedError,
)
from invoice_worker.message import TaskMessage, redis_envelope, unix_deadline
from invoice_worker.models import InvoiceRequest, parse_request
from invoice_worker.privacy import kwargs_repr
from invoice_worker.record import JobRecord
from invoice_worker.scripts import Lua, ReissueArgs, argv, load, script_conf
from invoice_worker.store import JobStore

if TYPE_CHECKING:
    import argparse
    from collections.abc import Mapping
    from datetime import datetime

    from redis.client import Pipeline


class Reissuer:
    """Re-issues failed invoices; ``atomic`` as the Producer's (broker and store one Redis)."""

    def __init__(self, store: JobStore, app: Celery, settings: Settings, *, atomic: bool) -> None:
        self.store = store
        self.app = app
        self.settings = settings
        self.atomic = atomic
        self._script = Lua(store.redis, load("reissue", script_conf(settings)))

    def reissue(
        self,
        foreign_id: str,
        *,
        generation: int | None = None,
        deadline: datetime | float | None = None,
        request: InvoiceRequest | Mapping[str, Any] | None = None,
    ) -> JobRecord:
        """Replace the failed invoice of ``generation`` (default: the current one) by a new one.

        The request sent is the job's own (kept with the record until its invoice is paid), or
        ``request`` when given (it must be the same request). ``deadline`` applies to the new
        attempt as at enqueue. Returns the record: queued under the next generation, or as it is
        when that generation was already replaced by another call.

        Raises:
            ReissueRefusedError: no job, no invoice yet, or one that can still be (or was) paid.
            ConflictError: ``request`` differs from the job's.
            InvalidRequestError: a bad ``request`` or ``deadline``.
            NotDurableError: as for enqueue; call again with the same ``generation``.
        """
        store = self.store
        record = store.get(foreign_id)
        if record is None:
            raise ReissueRefusedError(foreign_id, "not_found")
        foreign_id = record.foreign_id
        replaces = record.generation if generation is None else generation
        message = self._message(foreign_id, record, request, unix_deadline(deadline))
        kwargs = message.kwargs()
        new_id = derived_foreign_id(foreign_id, replaces + 1)
        task_id = str(uuid.uuid4())
        queue = self.settings.queue
        envelope = redis_envelope(self.app, kwargs, task_id, queue) if self.atomic else ""
        args = ReissueArgs(
            replaces, new_id, task_id, envelope, json.dumps(kwargs), store.member(foreign_id),
            "" if message.deadline is None else repr(message.deadline),
        )  # fmt: skip
        keys = [store.key(foreign_id), queue, store.stats, store.due, store.copy(foreign_id)]

        def write(pipe: Pipeline) -> None:
            self._script(keys=keys, args=argv(args), client=pipe)

        if not new_id.startswith(foreign_id):  # hashed: its callbacks need the way back
            store.set_alias(new_id, foreign_id)
        [reply], durable = store.durably(write)
        answer, *rest = reply
        raw = rest[-1]
        record = JobRecord.from_redis(dict(zip(raw[::2], raw[1::2], strict=True))) if raw else None
        if answer == "refused":
            raise ReissueRefusedError(foreign_id, rest[0], record)
        assert record is not None
        # Ours when the record carries our task id (a re-run after a lost reply says 'done').
        if record.task_id == task_id and not self.atomic:
            self.app.send_task(
                TASK_NAME, kwargs=kwargs, task_id=task_id, queue=queue, argsrepr="()",
                kwargsrepr=kwargs_repr(kwargs),
            )  # fmt: skip
        if not durable:
            raise NotDurableError([foreign_id])
        return record

    def _message(
        self,
        foreign_id: str,
        record: JobRecord,
        request: InvoiceRequest | Mapping[str, Any] | None,
        deadline: float | None,
    ) -> TaskMessage:
        """The job's message again, with the new deadline (and ``request`` checked against it)."""
        copy = self.store.redis.get(self.store.copy(foreign_id))
        kept: dict[str, Any] = json.loads(str(copy)) if copy else {}
        options = {
            "callback_task": record.callback_task, "callback_queue": record.callback_queue,
            "status_task": record.status_task, "status_queue": record.status_queue,
        }  # fmt: skip
        if request is not None:
            parsed = parse_request(request)
            fingerprint = self.store.redis.hget(self.store.key(foreign_id), "fingerprint")
            if parsed.fingerprint() != fingerprint:
                raise ConflictError(foreign_id)
            kept["request"] = parsed
        elif "request" not in kept:
            # Deleted once the invoice was paid, or expired with the record's TTL.
            raise ReissueRefusedError(
                foreign_id, "paid" if record.invoice_status == "confirmed" else "not_created",
                record,
            )  # fmt: skip
        kwargs = {**{k: v for k, v in options.items() if v is not None}, "deadline": deadline}
        return TaskMessage.parse({"request": kept["request"], **kwargs}, queue=self.settings.queue)


def configure(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` the ``invoice-worker reissue`` command."""
    parser.add_argument("foreign_id")
    parser.add_argument(
        "--generation", type=int, help="the generation whose failed invoice to replace"
    )
    parser.add_argument(
        "--deadline", type=float, metavar="SECONDS", help="expire the new attempt after this long"
    )
    parser.add_argument("--wait", type=float, metavar="SECONDS", help="wait for the new invoice")
    parser.add_argument("--json", action="store_true", help="print the record as JSON")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace, settings: Settings) -> int:
    import sys
    import time

    from invoice_worker.cli import EXIT_CONFLICT, EXIT_NOT_FOUND, print_record
    from invoice_worker.producer import Producer

    producer = Producer(settings)
    try:
        deadline = time.time() + args.deadline if args.deadline else None
        record = producer.reissue(args.foreign_id, generation=args.generation, deadline=deadline)
        if args.wait is not None:
            record = producer.wait(record.foreign_id, args.wait) or record
    except ReissueRefusedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND if exc.reason == "not_found" else EXIT_CONFLICT
    finally:
        producer.close()
    print_record(record.to_dict(), as_json=args.json, brief=True)
    return 0
