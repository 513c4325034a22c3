"""The sweeper: sends again the jobs whose message the broker lost, and retries the cancels
of invoices that final jobs left behind.

The Redis broker is at-least-once only while a message is tracked: a worker killed between
the broker's pop and its own bookkeeping loses the message, and so can a Redis restart that
drops recent writes. The job record is the source of truth, so every worker runs this loop: a
job that has not moved on by its due time (last step + the redelivery delay) and holds no lease
gets its stored kwargs sent again, once the broker queue has drained (a backlog may still hold
it). A second copy is harmless; the claim absorbs it.

A final job whose ambiguous attempt may have left a live invoice, and whose cancel failed, has
a pending cleanup: the sweeper retries that cancel with backoff, ``cleanup_tries`` times at most,
then records ``orphan=may_remain`` for a human (both visible in metrics and ``status``).
"""

from __future__ import annotations

import logging
import threading

from celery import Celery
from kombu.exceptions import ChannelError

from invoice_worker.attempt import backoff
from invoice_worker.client import ProviderClient
from invoice_worker.config import Settings
from invoice_worker.constants import TASK_NAME, Cleanup
from invoice_worker.errors import InvoiceNotFoundError, InvoiceStateError, ProviderError
from invoice_worker.privacy import escape_controls, kwargs_repr
from invoice_worker.store import JobStore

log = logging.getLogger(__name__)

#: Cancels tried for one pending cleanup before it is left to a human (about 2 hours).
CLEANUP_TRIES = 12
#: Longest wait between two tries of one cleanup.
CLEANUP_BACKOFF_CAP = 900.0


def broker_queue_depth(app: Celery, queue: str) -> int:
    """Messages waiting in ``queue``, asked of the broker itself (Redis list or RabbitMQ
    queue), wherever the job store lives."""
    with app.connection_for_read() as conn, conn.channel() as channel:
        try:
            ok = channel.queue_declare(queue=queue, passive=True)
        except ChannelError as exc:
            # No such queue: on Redis an empty queue is no key at all, so this is the common
            # case of a drained queue (and on RabbitMQ an undeclared queue holds nothing).
            if str(exc.reply_code) == "404":
                return 0
            raise
        return int(ok.message_count)


class Sweeper:
    """Resend lost jobs and retry pending cleanups every ``settings.sweep_interval`` seconds,
    in a daemon thread."""

    def __init__(
        self,
        app: Celery,
        settings: Settings,
        store: JobStore | None = None,
        client: ProviderClient | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.store = store or JobStore.from_settings(settings)
        self.client = client or ProviderClient.from_settings(settings)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> int:
        """One pass for lost messages; returns how many jobs were sent again."""
        depth = broker_queue_depth(self.app, self.settings.queue)
        resent = 0
        for foreign_id, task_id, kwargs in self.store.sweep(depth):
            self.app.send_task(
                TASK_NAME, kwargs=kwargs, task_id=task_id or None, queue=self.settings.queue,
                argsrepr="()", kwargsrepr=kwargs_repr(kwargs),
            )  # fmt: skip
            log.warning(
                "job %s task_id=%s outcome=resent (its message was lost)",
                escape_controls(foreign_id), task_id,
            )  # fmt: skip
            resent += 1
        return resent

    def clean_up(self) -> int:
        """One pass over the due pending cleanups; returns how many were settled."""
        settled = 0
        hold = self.settings.exchange_timeout + 10  # no other sweeper takes it meanwhile
        for foreign_id, provider_id, tries in self.store.take_cleanups(hold):
            try:
                self.client.cancel_invoice(provider_id)
                outcome = Cleanup.CANCELLED
            except (InvoiceNotFoundError, InvoiceStateError):
                outcome = Cleanup.FINAL
            except ProviderError as exc:
                outcome = Cleanup.PENDING
                log.warning(
                    "job %s cleanup of %s failed: %s", escape_controls(foreign_id),
                    escape_controls(provider_id), exc.code,
                )  # fmt: skip
            retry = backoff(tries + 1, self.settings.retry_base * 10, CLEANUP_BACKOFF_CAP)
            result = self.store.settle_cleanup(
                foreign_id, outcome, retry_after=retry, max_tries=CLEANUP_TRIES
            )
            level = logging.ERROR if result is Cleanup.MAY_REMAIN else logging.INFO
            log.log(level, "job %s orphan=%s", escape_controls(foreign_id), result)
            settled += result is not Cleanup.PENDING
        return settled

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="invoice-sweeper")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.sweep_interval):
            for step in (self.sweep, self.clean_up):
                try:
                    step()
                except Exception:  # Redis, broker or provider away: the next pass tries again
                    log.warning(
                        "%s failed; retrying in %.0fs", step.__name__,
                        self.settings.sweep_interval, exc_info=True,
                    )  # fmt: skip
