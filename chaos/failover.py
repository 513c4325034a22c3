"""The failover scenarios of a chaos run: the job store (and the Redis broker) on a Sentinel
setup, failed over cleanly and with lost writes, and a shop that remembers every URL it saw.

A lossy failover: the replica is stopped (SIGSTOP) and its link cut (a stopped process still
receives into its socket buffer and would apply it on resuming; a cut link, as in a network
partition, does not), the primary goes on accepting writes for a while, then is SIGKILLed; the
replica resumes and Sentinel promotes it, without those writes. The old primary comes back as a
replica of the new one (Sentinel reconfigures it), its own data replaced.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import redis

from invoice_worker.config import Settings
from invoice_worker.devstack.sentinel import SentinelCluster
from invoice_worker.producer import Producer

#: Seconds the primary keeps accepting writes that its replica never gets.
LOSS_WINDOW = 2.0


@contextlib.contextmanager
def private_vhost() -> Iterator[str]:
    """A RabbitMQ vhost of this run's own (Celery's delayed-delivery exchanges have fixed
    names, so a shared vhost would mix runs); yields its ``amqp://`` URL, deletes it after."""
    name = f"invoice-chaos-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@127.0.0.1:5672/{quote(name, safe='')}"
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _rabbitmqctl("delete_vhost", name)


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(  # noqa: S603 - our own argv, no shell
        ["rabbitmqctl", "-q", *args],  # noqa: S607 - the broker admin tool on PATH
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip


def clean_failover(cluster: SentinelCluster) -> None:
    """``SENTINEL FAILOVER``: the replica is caught up first, nothing is lost."""
    cluster.failover()


def lossy_failover(cluster: SentinelCluster) -> None:
    """Promote a replica that misses the primary's last ``LOSS_WINDOW`` seconds of writes."""
    primary = cluster.primary
    [replica] = cluster.replicas
    cluster.pause(replica)
    with primary.client() as r:
        r.client_kill_filter(_type="replica")
    time.sleep(LOSS_WINDOW)
    cluster.kill(primary)
    cluster.resume(replica)
    cluster.wait_for_new_master(primary, timeout=30)
    cluster.restart(primary)


def watch(settings: Settings, fids: list[str], stop: Any, out: Any) -> None:
    """A shop's web processes: read every job's record over and over (``get_invoice``, as a
    status page polls) and remember each URL shown, whatever Redis is going through."""
    store = Producer(settings).store
    shown: set[tuple[str, str]] = set()
    reads = 0
    while not stop.is_set():
        for start in range(0, len(fids), 500):
            batch = fids[start : start + 500]
            with contextlib.suppress(redis.RedisError):
                pipe = store.redis.pipeline(transaction=False)
                for fid in batch:
                    pipe.hmget(store.key(fid), "state", "url")
                for fid, (state, url) in zip(batch, pipe.execute(), strict=True):
                    if state == "created" and url:
                        shown.add((fid, url))
                reads += len(batch)
        stop.wait(0.2)
    out.put((sorted(shown), reads))
