"""Enqueue rate, sync and asyncio: ``python -m bench.run --only enqueue-aio``.

One process (this one) enqueues against a private redis-server (broker and state one Redis:
the atomic path), no workers: a ``Producer.enqueue`` loop, the same from 16 threads, an
``AsyncProducer`` with 1,000 enqueues in flight at once (``asyncio.gather``), and
``enqueue_many`` in batches of 100 from each. Every run uses its own prefix and queue and is
checked: as many messages on the queue as jobs. Each figure is the median of ``ROUNDS`` runs.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis

from bench.load import request_data
from bench.stack import KEY, SECRET
from invoice_worker.aio import AsyncProducer
from invoice_worker.config import Settings
from invoice_worker.devstack.embedded import EmbeddedRedis
from invoice_worker.producer import Producer

ROUNDS = 3
JOBS = 3000
BATCH = 100
THREADS = 16
IN_FLIGHT = 1000


def _settings(url: str) -> Settings:
    tag = f"ba{uuid.uuid4().hex[:8]}"
    return Settings(
        _env_file=None, api_url="http://127.0.0.1:9/", api_key=KEY, api_secret=SECRET,
        broker_url=url, redis_url=url, key_prefix=f"{tag}:", queue=f"bench-{tag}",
        events_stream=f"{tag}:events",
    )  # fmt: skip


def _requests(settings: Settings, count: int) -> list[dict[str, Any]]:
    return [request_data(f"{settings.key_prefix}{i}") for i in range(count)]


def sync_loop(settings: Settings, requests: list[dict[str, Any]]) -> None:
    producer = Producer(settings)
    for request in requests:
        producer.enqueue(request)
    producer.close()


def sync_threads(settings: Settings, requests: list[dict[str, Any]]) -> None:
    producer = Producer(settings)
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(producer.enqueue, requests))
    producer.close()


def sync_many(settings: Settings, requests: list[dict[str, Any]]) -> None:
    producer = Producer(settings)
    for i in range(0, len(requests), BATCH):
        producer.enqueue_many(requests[i : i + BATCH])
    producer.close()


def async_gather(settings: Settings, requests: list[dict[str, Any]]) -> None:
    async def main() -> None:
        producer = AsyncProducer(settings)
        for i in range(0, len(requests), IN_FLIGHT):
            await asyncio.gather(*(producer.enqueue(r) for r in requests[i : i + IN_FLIGHT]))
        await producer.aclose()

    asyncio.run(main())


def async_many(settings: Settings, requests: list[dict[str, Any]]) -> None:
    async def main() -> None:
        producer = AsyncProducer(settings)
        batches = [requests[i : i + BATCH] for i in range(0, len(requests), BATCH)]
        await asyncio.gather(*(producer.enqueue_many(batch) for batch in batches))
        await producer.aclose()

    asyncio.run(main())


#: (label, function, jobs per run)
CASES: list[tuple[str, Callable[[Settings, list[dict[str, Any]]], None], int]] = [
    ("sync `enqueue` loop", sync_loop, JOBS),
    (f"sync `enqueue`, {THREADS} threads", sync_threads, JOBS),
    (f"async `enqueue`, {IN_FLIGHT:,} in flight (`gather`)", async_gather, JOBS),
    (f"sync `enqueue_many`, batches of {BATCH}", sync_many, JOBS * 3),
    (f"async `enqueue_many`, batches of {BATCH}, all in flight", async_many, JOBS * 3),
]


def measure(url: str, scale: float) -> list[tuple[str, int, list[float]]]:
    """Jobs/s of each case, ``ROUNDS`` times, in turns (a drift of the machine favours none)."""
    rates: dict[str, list[float]] = {label: [] for label, _, _ in CASES}
    check = redis.Redis.from_url(url)
    for _ in range(ROUNDS):
        for label, run, jobs in CASES:
            settings = _settings(url)
            requests = _requests(settings, max(BATCH, int(jobs * scale)))
            started = time.perf_counter()
            run(settings, requests)
            rates[label].append(len(requests) / (time.perf_counter() - started))
            if (sent := check.llen(settings.queue)) != len(requests):
                raise RuntimeError(f"{label}: {sent} messages for {len(requests)} jobs")
            check.flushdb()
    check.close()
    return [(label, max(BATCH, int(jobs * scale)), rates[label]) for label, _, jobs in CASES]


def table(rows: list[tuple[str, int, list[float]]]) -> str:
    lines = [
        f"| How ({ROUNDS} runs each) | Jobs per run | Jobs/s (median) | Range |",
        "|---|--:|--:|--:|",
    ]
    for label, jobs, rates in rows:
        lines.append(
            f"| {label} | {jobs:,} | {statistics.median(rates):,.0f} | "
            f"{min(rates):,.0f}-{max(rates):,.0f} |"
        )
    return "\n".join(lines)


def main(scale: float = 1.0) -> int:
    """Measure and print the table (markdown)."""
    with EmbeddedRedis() as server:
        if server.kind != "redis-server":
            print("enqueue-aio: needs redis-server on PATH")
            return 1
        rows = measure(server.url, scale)
    print(
        f"\nenqueue rate, one process, {os.cpu_count()} cores, private redis-server on loopback\n"
    )
    print(table(rows))
    return 0
