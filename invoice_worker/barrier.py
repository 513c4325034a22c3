"""The Barrier: what makes a job-store write durable before anyone acts on it.

Production Redis loses acknowledged writes (a host crash under ``appendfsync everysec``, a
failover to an asynchronous replica). With ``INVOICE_REDIS_MIN_REPLICAS`` the store pipelines a
``WAIT`` after each write that must survive (a claim, the fence before a provider call, a staged
final, an enqueue): one round trip, on the script's own connection, as WAIT requires. With
``INVOICE_REDIS_WAIT_AOF`` it is ``WAITAOF 1 N`` instead: the primary's own AOF must have the
write on disk too (Redis >= 7.2), which also covers a primary that restarts from its disk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from redis.client import Pipeline
from redis.exceptions import NoScriptError

from invoice_worker.config import Settings
from invoice_worker.errors import ConfigError

if TYPE_CHECKING:
    from redis.asyncio.client import Pipeline as AsyncPipeline

NO_WAITAOF = "INVOICE_REDIS_WAIT_AOF needs Redis >= 7.2 (WAITAOF) for the job store"


@dataclass(frozen=True)
class Barrier:
    """What makes a write durable before anyone acts on it: ``replicas`` replicas have it
    (``WAIT``), and with ``aof`` the primary's AOF has it on disk too (``WAITAOF 1 replicas``).
    Redis cannot wait inside a script, so the caller pipelines the wait after one."""

    replicas: int
    timeout_ms: int
    aof: bool = False

    def add(self, pipe: Pipeline | AsyncPipeline, probe_key: str) -> None:
        """Append the wait to ``pipe`` (after the writes it must cover); either transport's
        pipeline queues without I/O."""
        # WAIT covers this connection's last write; a script that wrote nothing (an existing
        # job) would leave an older one, so write something of our own first.
        pipe.set(probe_key, "1", px=60_000)
        if self.aof:
            command: tuple[Any, ...] = ("WAITAOF", 1, self.replicas, self.timeout_ms)
        else:
            command = ("WAIT", self.replicas, self.timeout_ms)
        pipe.execute_command(*command)

    def held(self, reply: Any) -> bool:
        """Whether the wait's reply says the writes are durable."""
        if self.aof:
            return int(reply[0]) >= 1 and int(reply[1]) >= self.replicas
        return int(reply) >= self.replicas


def wanted_barrier(settings: Settings) -> Barrier | None:
    """The Barrier ``settings`` ask for (no I/O: one with ``aof`` still needs
    :func:`check_aof` on the server), or None when writes are acted on at once."""
    # Rounded up: a timeout of 0 ms would make WAIT (and WAITAOF) block until they are met.
    timeout_ms = max(1, math.ceil(settings.redis_wait_timeout * 1000))
    if settings.redis_wait_aof:
        return Barrier(settings.redis_min_replicas, timeout_ms, aof=True)
    if settings.redis_min_replicas:
        return Barrier(settings.redis_min_replicas, timeout_ms)
    return None


def check_aof(persistence: Mapping[str, Any]) -> None:
    """Raise ConfigError unless ``INFO persistence`` says the AOF is on."""
    if persistence.get("aof_enabled") != 1:
        raise ConfigError("INVOICE_REDIS_WAIT_AOF needs appendonly yes on the job store")


def find_barrier(client: redis.Redis, settings: Settings) -> Barrier | None:
    """The Barrier ``settings`` ask for, or None when writes are acted on at once.

    Raises:
        ConfigError: ``INVOICE_REDIS_WAIT_AOF`` on a server without ``WAITAOF`` (before 7.2)
            or without an AOF: nothing could ever be confirmed.
    """
    barrier = wanted_barrier(settings)
    if barrier is not None and barrier.aof:
        try:
            client.execute_command("WAITAOF", 0, 0, 0)  # type: ignore[no-untyped-call]
        except redis.ResponseError:
            raise ConfigError(NO_WAITAOF) from None
        persistence: Any = client.info("persistence")
        check_aof(persistence)
    return barrier


def durably(
    client: redis.Redis,
    barrier: Barrier | None,
    probe_key: str,
    write: Callable[[Pipeline], None],
) -> tuple[list[Any], bool]:
    """Run the commands ``write`` queues, then the Barrier, in one round trip; returns their
    replies and whether they are durable (always, without a Barrier).

    ``write`` may queue store scripts: they are sent as EVALSHA alone. redis-py's pipeline asks
    SCRIPT EXISTS first, one more round trip every time; here a server that lacks a script (a
    restart, a newly promoted replica) answers NOSCRIPT, and the whole pipeline runs again
    after loading them (safe: each script answers a re-run as it did the first run).
    """
    pipe, scripts = _pipeline(client, barrier, probe_key, write)
    try:
        replies = pipe.execute()
    except NoScriptError:
        for script in scripts:
            client.script_load(script.script)
        replies = _pipeline(client, barrier, probe_key, write)[0].execute()
    return settle(barrier, replies)


def settle(barrier: Barrier | None, replies: list[Any]) -> tuple[list[Any], bool]:
    """Split a pipeline's replies (the Barrier's two last) into the writes' and whether they
    are durable."""
    if barrier is None:
        return replies, True
    *replies, _, waited = replies
    return replies, barrier.held(waited)


def _pipeline(
    client: redis.Redis,
    barrier: Barrier | None,
    probe_key: str,
    write: Callable[[Pipeline], None],
) -> tuple[Pipeline, list[Any]]:
    pipe = client.pipeline(transaction=False)
    write(pipe)
    scripts = list(pipe.scripts)
    pipe.scripts.clear()  # sent as plain EVALSHA: no SCRIPT EXISTS round trip first
    if barrier is not None:
        barrier.add(pipe, probe_key)
    return pipe, scripts
