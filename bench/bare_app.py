"""The bare-Celery reference: a task that only does the provider POST.

Same ``ProviderClient.create_invoice``, same broker settings as the real app (copied from
``invoice_worker.worker.create_app``, so pool, prefetch, acks and task events match), but no
claim, no lease, no record and no event. ``celery -A bench.bare_app worker`` reads
``INVOICE_*`` like the real worker.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from invoice_worker.app import create_app
from invoice_worker.client import ProviderClient
from invoice_worker.config import Settings
from invoice_worker.models import parse_request

TASK_NAME = "bench.bare_create"
#: Everything in the real app's conf that shapes delivery and cost, copied as is.
SHARED_CONF = (
    "broker_url", "broker_transport_options", "broker_connection_retry_on_startup",
    "broker_connection_max_retries", "task_serializer", "accept_content",
    "result_serializer", "task_ignore_result", "task_acks_late", "task_reject_on_worker_lost",
    "task_acks_on_timeout", "worker_prefetch_multiplier", "task_soft_time_limit",
    "task_time_limit", "worker_cancel_long_running_tasks_on_connection_loss",
    "worker_send_task_events", "task_send_sent_event", "worker_hijack_root_logger",
)  # fmt: skip


def create_bare_app(settings: Settings) -> Celery:
    """A Celery app with the real app's settings and one task, ``bench.bare_create``."""
    real = create_app(settings).conf
    app = Celery("bench_bare", set_as_current=False)
    app.conf.update({key: real[key] for key in SHARED_CONF})
    app.conf.update(task_default_queue=settings.queue)
    clients: dict[int, ProviderClient] = {}  # per process: prefork children never share one

    @app.task(name=TASK_NAME, acks_late=True, typing=False)  # type: ignore[untyped-decorator]
    def bare_create(request: dict[str, Any], **_: Any) -> None:
        """POST one create; nothing recorded (a failure is simply lost)."""
        pid = os.getpid()
        if pid not in clients:
            clients[pid] = ProviderClient.from_settings(settings)
        clients[pid].create_invoice(parse_request(request))

    return app


app = create_bare_app(Settings())
