"""The Barrier: what makes a job-store write durable before anyone acts on it.

Production Redis loses acknowledged writes (a host crash under ``appendfsync everysec``, a
failover to an asynchronous replica). With ``INVOICE_REDIS_MIN_REPLICAS`` the store pipelines a
``WAIT`` after each write that must survive (a claim, the fence before a provider call, a staged
final, an enqueue): one round trip, on the script's own connection, as WAIT requires.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import Pipeline

from invoice_worker.config import Settings


@dataclass(frozen=True)
class Barrier:
    """What makes a write durable before anyone acts on it: ``WAIT`` until ``replicas``
    replicas have it, or with none, ``WAITAOF`` until the local AOF has it (Redis >= 7.2 with
    appendonly on). Redis cannot wait inside a script, so the caller pipelines it after one."""

    replicas: int
    timeout_ms: int

    def add(self, pipe: Pipeline, probe_key: str) -> None:
        """Append the wait to ``pipe`` (after the writes it must cover)."""
        # WAIT covers this connection's last write; a script that wrote nothing (an existing
        # job) would leave an older one, so write something of our own first.
        pipe.set(probe_key, "1", px=60_000)
        if self.replicas:
            pipe.execute_command("WAIT", self.replicas, self.timeout_ms)  # type: ignore[no-untyped-call]
        else:
            pipe.execute_command("WAITAOF", 1, 0, self.timeout_ms)  # type: ignore[no-untyped-call]

    def held(self, reply: Any) -> bool:
        """Whether the wait's reply says the writes are durable."""
        if self.replicas:
            return int(reply) >= self.replicas
        return int(reply[0]) >= 1


def find_barrier(client: redis.Redis, settings: Settings) -> Barrier | None:
    """The Barrier for ``settings`` on this server, or None when writes are acted on at once
    (no replicas asked for, and no AOF to fsync or a Redis before 7.2 without WAITAOF)."""
    # Rounded up: a timeout of 0 ms would make WAIT (and WAITAOF) block until they are met.
    timeout_ms = max(1, math.ceil(settings.redis_wait_timeout * 1000))
    if settings.redis_min_replicas:
        return Barrier(settings.redis_min_replicas, timeout_ms)
    try:
        client.execute_command("WAITAOF", 0, 0, 0)  # type: ignore[no-untyped-call]
    except redis.ResponseError:
        return None
    aof: Any = client.info("persistence")
    return Barrier(0, timeout_ms) if aof.get("aof_enabled") == 1 else None


def durably(
    client: redis.Redis,
    barrier: Barrier | None,
    probe_key: str,
    write: Callable[[Pipeline], None],
) -> tuple[list[Any], bool]:
    """Run the commands ``write`` queues, then the Barrier, in one round trip; returns their
    replies and whether they are durable (always, without a Barrier)."""
    pipe = client.pipeline(transaction=False)
    write(pipe)
    if barrier is None:
        return pipe.execute(), True
    barrier.add(pipe, probe_key)
    *replies, _, waited = pipe.execute()
    return replies, barrier.held(waited)
