"""The invoice queue on RabbitMQ: classic (Celery's default declaration) or quorum.

A quorum queue (``INVOICE_QUEUE_TYPE=quorum``) is replicated by Raft and confirms a publish
once a majority of its replicas holds the message. Celery (5.5+) runs differently on one:

- **No global QoS**: Celery sees the ``x-queue-type`` (``worker_detect_quorum_queues``) and
  sets the prefetch per consumer, fixed at concurrency x ``worker_prefetch_multiplier`` (1).
- So **a countdown cannot wait in worker memory** (an ETA message holds its prefetch slot until
  it is due): countdowns use native delayed delivery instead. Each worker declares 28 levels of
  quorum queues with a TTL of 2^n s (``celery_delayed_0`` .. ``_27``, shared by every Celery app
  in the virtual host) and binds the task queue's exchange to their exit; a message with a
  countdown is published into the levels, its delay spelt in binary in the routing key, and
  comes back through that exchange, which must therefore be a topic exchange. Delays are whole
  seconds, at most 2^28 - 1 (about 8.5 years; ours stop at ``max_countdown``).
- **A delivery limit**: a quorum queue dead-letters a message after ``QUORUM_DELIVERY_LIMIT``
  failed deliveries (a worker that crashed, or a reject with requeue), or drops it if it has no
  dead-letter target. We declare the limit and the target ``<queue>.dead-letter`` (a quorum
  queue, declared by each worker at start), which also receives the messages the consumer
  rejects as malformed. Nothing is lost either way: the job record keeps the message's kwargs,
  and the sweeper sends it again once it is due.

Queue arguments are fixed once a queue exists (RabbitMQ refuses a declaration that differs:
``PRECONDITION_FAILED``), so everything declared here is a constant, and a classic queue cannot
become quorum under the same name.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from celery import bootsteps
from kombu import entity

from invoice_worker.config import Settings
from invoice_worker.constants import QUORUM_DELIVERY_LIMIT, QueueType
from invoice_worker.errors import ConfigError
from invoice_worker.transport import DEAD_LETTER_MAX_ENTRIES

log = logging.getLogger(__name__)

# kombu's entities are untyped; like its transport code, they are used here as Any.
Exchange: Any = entity.Exchange
Queue: Any = entity.Queue

#: Suffix of the dead-letter queue of a quorum invoice queue.
DEAD_LETTER_SUFFIX = ".dead-letter"
#: Seconds a dead letter is kept (the default record TTL): it may hold ``email_user``.
DEAD_LETTER_TTL = 7 * 86400
#: Oldest RabbitMQ for quorum here: native delayed delivery's levels need message TTL on
#: quorum queues and at-least-once dead-lettering, both new in 3.10.
MIN_RABBITMQ = (3, 10)


def dead_letter_queue(queue: str) -> str:
    """The name of the queue that receives ``queue``'s dead letters."""
    return queue + DEAD_LETTER_SUFFIX


def quorum_arguments(queue: str) -> dict[str, Any]:
    """Arguments of a quorum invoice queue: its delivery limit and dead-letter target."""
    return {
        "x-queue-type": QueueType.QUORUM.value,
        "x-delivery-limit": QUORUM_DELIVERY_LIMIT,
        # The default exchange routes by queue name: no exchange of our own to declare.
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead_letter_queue(queue),
    }


def dead_letter_arguments() -> dict[str, Any]:
    """Arguments of the dead-letter queue: bounded like the Redis dead-letter list."""
    return {
        "x-queue-type": QueueType.QUORUM.value,
        "x-max-length": DEAD_LETTER_MAX_ENTRIES,
        "x-overflow": "drop-head",
        "x-message-ttl": DEAD_LETTER_TTL * 1000,
    }


def queue_conf(settings: Settings, transport_options: dict[str, Any]) -> dict[str, Any]:
    """Celery settings for the queue type; nothing for a classic queue (Celery's defaults).

    Args:
        settings: the worker's settings (queue name and type).
        transport_options: the ``broker_transport_options`` already set; they are kept.
    """
    if settings.queue_type is QueueType.CLASSIC:
        return {}
    name = settings.queue
    queue = Queue(
        name, Exchange(name, type="topic"), routing_key=name,
        queue_arguments=quorum_arguments(name),
    )  # fmt: skip
    return {
        "task_queues": [queue],
        # What Celery documents for a quorum default queue; ours is declared above in full.
        "task_default_queue_type": QueueType.QUORUM.value,
        # A callback queue that does not exist yet is declared quorum too.
        "task_create_missing_queue_type": QueueType.QUORUM.value,
        "worker_detect_quorum_queues": True,
        "broker_native_delayed_delivery_queue_type": QueueType.QUORUM.value,
        # A quorum queue's guarantee starts at the publisher confirm (a majority has it).
        "broker_transport_options": {**transport_options, "confirm_publish": True},
    }


def broker_countdown(settings: Settings, seconds: float | None) -> float | None:
    """The countdown to publish: native delayed delivery counts whole seconds (Celery truncates
    with ``int()``) and refuses zero, so on a quorum queue it is rounded up (never early)."""
    if seconds is None or seconds <= 0 or settings.queue_type is QueueType.CLASSIC:
        return seconds
    return float(math.ceil(seconds))


def quorum_support(connection: Any) -> str:
    """The broker's product and version, if it can run our quorum queues.

    Args:
        connection: a connected kombu ``Connection`` (AMQP).

    Raises:
        ConfigError: an older RabbitMQ, or another broker: messages with a countdown would be
            dropped or refused (the sweeper would still send their jobs again, late).
    """
    found = connection.connection.server_properties
    product, version = str(found.get("product", "?")), str(found.get("version", "?"))
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if product != "RabbitMQ" or numbers < MIN_RABBITMQ:
        raise ConfigError(
            f"INVOICE_QUEUE_TYPE=quorum needs RabbitMQ {'.'.join(map(str, MIN_RABBITMQ))} or "
            f"later (native delayed delivery), found {product} {version}"
        )
    return f"{product} {version}"


def dead_letter_step(settings: Settings) -> type[bootsteps.StartStopStep]:
    """A worker consumer step declaring the dead-letter queue (quorum only), on every connect."""

    class DeclareDeadLetterQueue(bootsteps.StartStopStep):  # type: ignore[misc]
        """Declare ``<queue>.dead-letter`` whenever the consumer connects: dead letters routed
        to a queue that does not exist are dropped."""

        requires = ("celery.worker.consumer.connection:Connection",)

        def include_if(self, parent: Any) -> bool:
            return settings.queue_type is QueueType.QUORUM

        def start(self, parent: Any) -> None:
            name = dead_letter_queue(settings.queue)
            connection = parent.connection
            try:
                quorum_support(connection)
            except ConfigError as exc:
                log.error("%s", exc)
            try:
                with connection.channel() as channel:
                    channel.queue_declare(
                        queue=name, durable=True, auto_delete=False,
                        arguments=dead_letter_arguments(),
                    )  # fmt: skip
            except connection.channel_errors as exc:
                # Declared before with other arguments: it still receives the dead letters.
                log.warning("dead-letter queue %s kept as it is: %s", name, exc)

    return DeclareDeadLetterQueue
