"""Child process: enqueue ``--count`` jobs as a web app would, and report time and CPU.

Modes: ``enqueue`` (a ``Producer.enqueue`` loop), ``enqueue_many`` (batches), ``send_task``
(a bare ``app.send_task`` loop of the bare-Celery app, the reference). With ``--backlog B`` it
keeps at most about B messages waiting in the broker queue (so workers always have work and
latency is not a growing backlog), with ``--rate R`` it offers R jobs/s; else it sends as fast
as it can. ``--timings`` also reports when each ``enqueue`` call started and how long it took
(an enqueue Redis did not confirm on its replicas in time is repeated, as a web app would).

Run by bench.scenarios: prints ``ready``, waits for ``go`` on stdin, writes JSON to --result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import redis

from invoice_worker.config import Settings
from invoice_worker.errors import NotDurableError

STALL_TIMEOUT = 120.0  # seconds without the queue draining: the workers are gone


def foreign_ids(tag: str, index: int, count: int) -> list[str]:
    """The foreign_ids producer ``index`` of scenario ``tag`` enqueues."""
    return [f"{tag}-{index}-{i}" for i in range(count)]


def request_data(foreign_id: str) -> dict[str, Any]:
    """A valid create request, as a web shop would build it."""
    return {
        "timer": True,
        "title": "Order #1",
        "description": "Two coffees",
        "foreign_id": foreign_id,
        "currency": "BTC",
        "amount": "0.0123",
        "url_success": "https://shop.example.com/paid",
        "url_failed": "https://shop.example.com/failed",
        "email_user": "buyer@example.com",
    }


class Pacer:
    """Holds the sender back to ``rate`` jobs/s, and while the broker queue has ``backlog``
    or more messages."""

    def __init__(self, settings: Settings, backlog: int, rate: float) -> None:
        self.redis = redis.Redis.from_url(settings.broker_url)
        self.queue = settings.queue
        self.backlog = backlog
        self.rate = rate
        self.every = max(1, backlog // 4)  # one LLEN per few sends

    def wait(self, sent: int, start: float) -> None:
        if self.rate and (ahead := start + sent / self.rate - time.time()) > 0:
            time.sleep(ahead)
        if not self.backlog or sent % self.every:
            return
        deadline = time.monotonic() + STALL_TIMEOUT
        while self.redis.llen(self.queue) >= self.backlog:
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue {self.queue} did not drain in {STALL_TIMEOUT:.0f}s")
            time.sleep(0.001)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--mode", choices=("enqueue", "enqueue_many", "send_task"), required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--backlog", type=int, default=0)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=0.0, help="jobs/s to offer (0: no limit)")
    parser.add_argument("--timings", action="store_true", help="per enqueue call (enqueue mode)")
    parser.add_argument(
        "--no-sent-event", action="store_true", help="send_task without task-sent events"
    )
    args = parser.parse_args(argv)

    settings = Settings()
    requests = [request_data(fid) for fid in foreign_ids(args.tag, args.index, args.count)]
    pacer = Pacer(settings, args.backlog, args.rate)
    if args.mode == "send_task":
        from bench.bare_app import TASK_NAME, app

        if args.no_sent_event:
            app.conf.task_send_sent_event = False
        messages = [{"request": r, "deadline": None} for r in requests]
        app.connection_for_write().ensure_connection(max_retries=3)
    else:
        from invoice_worker.producer import Producer

        producer = Producer(settings)
        producer.store.redis.ping()

    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    cpu0, first = time.process_time(), time.time()
    timings: dict[str, list[float]] = {"starts": [], "calls": []}
    unconfirmed = 0
    if args.mode == "send_task":
        for i, kwargs in enumerate(messages):
            pacer.wait(i, first)
            app.send_task(TASK_NAME, kwargs=kwargs, queue=settings.queue)
    elif args.mode == "enqueue":
        for i, request in enumerate(requests):
            pacer.wait(i, first)
            started, t0 = time.time(), time.perf_counter()
            while True:
                try:
                    producer.enqueue(request)
                    break
                except NotDurableError:
                    unconfirmed += 1
            if args.timings:
                timings["starts"].append(started)
                timings["calls"].append(time.perf_counter() - t0)
    else:
        for start in range(0, len(requests), args.batch):
            producer.enqueue_many(requests[start : start + args.batch])
    last, cpu = time.time(), time.process_time() - cpu0
    result = {"first": first, "last": last, "cpu_s": cpu, "count": args.count}
    if args.timings:
        result |= timings | {"unconfirmed": unconfirmed}
    args.result.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
