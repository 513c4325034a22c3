"""The sweeper: sends again the jobs whose message the broker lost.

The Redis broker is at-least-once only while a message is tracked: a worker killed between
the broker's pop and its own bookkeeping loses the message, and so can a Redis restart that
drops recent writes. The job record is the source of truth, so every worker runs this loop: a
job that has not moved on by its due time (last step + the redelivery delay) and holds no lease
gets its stored kwargs sent again, once the queue has drained (a backlog may still hold it).
A second copy is harmless; the claim absorbs it.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery

from invoice_worker import constants as c
from invoice_worker.config import Settings
from invoice_worker.message import kwargs_repr
from invoice_worker.store import JobStore

log = logging.getLogger(__name__)


class Sweeper:
    """Resend lost jobs every ``settings.sweep_interval`` seconds, in a daemon thread."""

    def __init__(self, app: Celery, settings: Settings, store: JobStore | None = None) -> None:
        self.app = app
        self.settings = settings
        self.store = store or JobStore.from_settings(settings)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> int:
        """One pass; returns how many jobs were sent again."""
        resent = 0
        for foreign_id, task_id, kwargs in self.store.sweep(self.settings.queue):
            self.app.send_task(
                c.TASK_NAME, kwargs=kwargs, task_id=task_id or None, queue=self.settings.queue,
                argsrepr="()", kwargsrepr=kwargs_repr(kwargs),
            )  # fmt: skip
            log.warning(
                "job %s task_id=%s outcome=resent (its message was lost)", foreign_id, task_id
            )
            resent += 1
        return resent

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="invoice-sweeper")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.sweep_interval):
            try:
                self.sweep()
            except Exception:  # Redis or broker away: the next pass tries again
                log.warning(
                    "sweep failed; retrying in %.0fs", self.settings.sweep_interval, exc_info=True
                )
