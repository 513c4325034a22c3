"""``python manage.py consume_invoice_events``: follow the invoice events, mark the orders.

Run one or more (each with its own ``--consumer`` name): the consumer group hands each event to
one of them, and an event a stopped consumer had not acknowledged goes to another after a
minute (or to the same name when it comes back).
"""

from __future__ import annotations

import signal
import socket
import threading
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from invoice_worker.config import Settings
from invoice_worker.events import EventConsumer
from orders.events import apply


class Command(BaseCommand):
    help = "Mark orders from the invoice events stream (a consumer group), until stopped."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--group", default="shop")
        parser.add_argument(
            "--consumer", default=socket.gethostname(), help="this consumer's name in the group"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        settings = Settings.load()
        consumer = EventConsumer.from_settings(
            settings, group=options["group"], consumer=options["consumer"]
        )
        self.stdout.write(
            f"consuming {settings.events_stream!r} as {options['consumer']!r} "
            f"in group {options['group']!r}",
        )
        self.stdout.flush()
        try:
            consumer.run(apply, stop=stop)  # rides out Redis restarting or failing over
        finally:
            consumer.close()
