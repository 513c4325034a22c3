"""The Celery app: ``create_app(settings)``, with no side effects (``worker.py`` is the
``celery -A`` entry that reads the environment).

This is the one place that maps Settings onto ``app.conf``; each choice says why.
"""

from __future__ import annotations

import contextlib
from typing import Any

import redis
from celery import Celery, bootsteps

from invoice_worker import logs, tasks
from invoice_worker.barrier import find_barrier
from invoice_worker.config import Settings
from invoice_worker.connection import redis_client
from invoice_worker.constants import TASK_NAME
from invoice_worker.preflight import require_noeviction
from invoice_worker.queues import dead_letter_step, queue_conf
from invoice_worker.transport import broker_conf


def create_app(settings: Settings) -> Celery:
    """Build the Celery app used by workers and producers alike (reads nothing else)."""
    app = Celery("invoice_worker", set_as_current=False)
    vt = settings.broker_visibility_timeout
    transport = {
        "visibility_timeout": vt,
        # kombu scans for abandoned messages every interval*throttle s (default ~100 s).
        "unacked_restore_interval": max(1, min(10, vt // 6)),
        "unacked_restore_throttle": 1,
    }
    app.conf.update(
        broker_url=settings.broker_url,
        # The Redis broker redelivers unacked messages after this; kombu reads it in both places.
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        # Workers started before Redis must wait for it, not exit.
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # JSON only: messages carry primitives, and pickle from a broker is remote code execution.
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # Results live in our own Redis records; Celery's result backend would only duplicate them.
        task_ignore_result=True,
        task_default_queue=settings.queue,
        task_routes={TASK_NAME: {"queue": settings.queue}},
        # Ack after the job is recorded: a crash mid-job redelivers it (the job is idempotent).
        task_acks_late=True,
        # A killed pool child gives its message back instead of acking it as failed.
        task_reject_on_worker_lost=True,
        # A hard time limit also gives the message back; the lease then decides who runs it.
        task_acks_on_timeout=False,
        # One message per process at a time: a prefetched one would wait behind a slow call.
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.soft_time_limit,
        task_time_limit=settings.hard_time_limit,
        # A running job finishes on connection loss; the redelivered copy finds it done.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Events for Flower: received/started/succeeded, and "sent" from producers.
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
        worker_hijack_root_logger=True,
    )
    app.conf.update(broker_conf(settings, transport))  # malformed broker entries: set aside
    app.conf.update(queue_conf(settings, transport))  # RabbitMQ quorum queues (or nothing)
    app.conf.update(worker_consumer="invoice_worker.consumer:Consumer")  # a path: lazy import
    if settings.log_format == "json":
        logs.use_json_logs()
    app.steps["worker"].add(_preflight_step(settings))
    app.steps["worker"].add(_sweeper_step(app, settings))
    app.steps["consumer"].add(dead_letter_step(settings))
    tasks.register(app, settings)
    return app


def _sweeper_step(app: Celery, settings: Settings) -> type[bootsteps.StartStopStep]:
    class RunSweeper(bootsteps.StartStopStep):  # type: ignore[misc]
        """Every worker sweeps for jobs whose message was lost (see invoice_worker.sweeper)."""

        def start(self, parent: Any) -> None:
            from invoice_worker.sweeper import Sweeper

            self.sweeper = Sweeper(app, settings)
            self.sweeper.start()

        def stop(self, parent: Any) -> None:
            self.sweeper.stop()

    return RunSweeper


def _preflight_step(settings: Settings) -> type[bootsteps.Step]:
    class Preflight(bootsteps.Step):  # type: ignore[misc]
        """Refuse to start a worker that could not keep its guarantees: no provider
        credentials, a job store that may evict records, or one that cannot confirm writes
        the way the settings ask (not fail at the first job)."""

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            settings.require_credentials()
            with redis_client(settings, socket_timeout=5) as client:
                require_noeviction(client)
                with contextlib.suppress(redis.ConnectionError):  # unreachable: see above
                    find_barrier(client, settings)  # INVOICE_REDIS_WAIT_AOF it cannot honour
            super().__init__(parent, **kwargs)

    return Preflight
