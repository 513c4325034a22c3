"""What a chaos run does: its settings (``Config``), the provider's faults, the payer's habits,
and every enqueue call of its producers (``make_plan``, ``produce``)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

from invoice_worker.config import Settings
from invoice_worker.errors import ConflictError
from invoice_worker.producer import Producer

KEY, SECRET = "chaos-key", "chaos-secret-never-logged"
POOLS = [("prefork", 2), ("threads", 8), ("threads", 8)]
FAULTS = {  # ~10% 5xx, ~5% 429 (half with Retry-After), ~5% commit-then-fail, a few stalls
    "error-500": 0.04, "error-502": 0.03, "error-503": 0.03, "rate-limit": 0.025,
    "rate-limit-bare": 0.025, "commit-then-drop": 0.025, "commit-then-502": 0.025,
    "timeout": 0.005, "stall-seconds": 2, "latency-ms": 5, "jitter-ms": 20, "retry-after": 1,
    # 0.5% each: a committed call answered with a 200 that is not the invoice asked for, ~50 MB
    # long, or trickled a byte every 0.3 s (far longer than a call's bound).
    "answer-wrong-id": 0.005, "answer-bad-url": 0.005, "answer-wrong-amount": 0.005,
    "answer-wrong-currency": 0.005, "answer-huge": 0.005, "trickle": 0.005,
    "trickle-seconds": 0.3,
}  # fmt: skip
CALLBACK_FAULTS = {
    "callback-duplicate": 0.05, "callback-concurrent": 0.05, "callback-bad-signature": 0.05,
    "callback-out-of-order": 0.1,
}  # fmt: skip
#: What the payer does with the invoices it pays, and how often.
PAYER_MODES = (("full", 0.6), ("instalments", 0.2), ("less", 0.1), ("expire", 0.1))
# Scripted for the first create call of one job each, so even a short run sees every one.
SCRIPTED = ("answer_wrong_id", "answer_bad_url", "answer_wrong_amount", "answer_wrong_currency",
            "answer_huge", "trickle")  # fmt: skip


@dataclass
class Config:
    jobs: int = 300
    producers: int = 3
    duplicates: float = 0.20
    conflicts: float = 0.02
    kill_every: float = 2.0
    freeze_every: float = 10.0
    outage_seconds: float = 6.0
    timeout: float = 240.0
    seed: int = 7
    #: "single": one Redis (AOF, fsync always), killed and restarted once. "sentinel": a
    #: primary, a replica and three sentinels (AOF, fsync every second), failed over once
    #: cleanly and once losing writes (chaos/failover.py).
    topology: str = "single"
    min_replicas: int = 0  # INVOICE_REDIS_MIN_REPLICAS
    #: "redis": the job store's Redis is the broker too; "quorum": RabbitMQ quorum queues in
    #: a private vhost (INVOICE_QUEUE_TYPE=quorum).
    broker: str = "redis"
    callbacks: bool = True
    pay_share: float = 0.5  # of the created invoices
    #: The provider's retry schedule (12 retries over ~24 h) times this: 0.001 is its day in
    #: 88 s. A failover that takes a publication back leaves that job's callbacks answered
    #: "early" until the job is published again, minutes later once the sweeper resends it (a
    #: drained queue first): scaled too far, the provider gives up before that, which a real
    #: day never does. The failover runs use 0.01 (its day in ~15 minutes).
    callback_time_scale: float = 0.001


@dataclass
class Plan:
    """Every enqueue call the producers make, and what the run must show for them."""

    calls: list[list[dict[str, Any]]]  # one list of requests per producer process
    conflicting: set[str] = field(default_factory=set)
    scripted: dict[str, str] = field(default_factory=dict)  # foreign_id: its first call's outcome


def make_plan(cfg: Config, run_id: str) -> Plan:
    rng = random.Random(cfg.seed)
    calls: list[list[dict[str, Any]]] = [[] for _ in range(cfg.producers)]
    plan = Plan(calls)
    for n in range(cfg.jobs):
        foreign_id = f"chaos-{run_id}-{n:05d}"
        request: dict[str, Any] = {
            "timer": rng.random() < 0.5, "title": f"Chaos order {n}",
            "foreign_id": foreign_id, "currency": "BTC",
            "amount": f"0.00{rng.randint(100, 999)}", "email_user": f"payer{n}@example.com",
            "url_success": "https://shop.example.com/ok", "url_failed": "https://shop.example.com/ko",
        }  # fmt: skip
        first = rng.randrange(cfg.producers)
        calls[first].append(request)
        other = (first + 1 + rng.randrange(cfg.producers - 1)) % cfg.producers
        if rng.random() < cfg.duplicates:
            calls[other].append(dict(request))
        elif rng.random() < cfg.conflicts / (1 - cfg.duplicates):
            calls[other].append({**request, "amount": "0.5"})
            plan.conflicting.add(foreign_id)
    for queue in calls:
        rng.shuffle(queue)
    for k, outcome in enumerate(SCRIPTED):
        plan.scripted[f"chaos-{run_id}-{(k + 1) * cfg.jobs // (len(SCRIPTED) + 1):05d}"] = outcome
    return plan


def produce(settings: Settings, requests_: list[dict[str, Any]], seconds: float, out: Any) -> None:
    """A web app: enqueue each request (spread over ``seconds``), retrying while Redis is
    away (enqueue is idempotent, so a retry after an unknown outcome is safe)."""
    producer = Producer(settings)
    accepted, conflicts, retries = [], [], 0
    start, step = time.monotonic(), seconds / max(1, len(requests_))
    for i, request in enumerate(requests_):
        time.sleep(max(0.0, start + i * step - time.monotonic()))
        while True:
            try:
                record = producer.enqueue(request)
                accepted.append((record.foreign_id, request["amount"]))
                break
            except ConflictError:
                conflicts.append(request["foreign_id"])
                break
            except Exception:  # Redis or broker down: a real web app retries too
                retries += 1
                time.sleep(0.2)
    out.put((accepted, conflicts, retries))
