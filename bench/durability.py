"""The durability section: what ``INVOICE_REDIS_MIN_REPLICAS`` costs in latency.

One worker process drains jobs offered at a fixed rate below saturation (open loop), once per
setting of N, on the private Redis with one replica attached in every run (only the setting
differs). Latency runs from the producer's ``enqueue`` call starting (its wall clock) to the
job's final event (the stream entry id: Redis' wall clock, same host, millisecond resolution).
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.load import foreign_ids
from bench.measure import CpuWindow, per_job_ms, percentile
from bench.scenarios import READY_TIMEOUT, Row, check_events, check_provider, job_args
from bench.stack import Stack
from invoice_worker.constants import DeferReason
from invoice_worker.store import JobStore


@dataclass(frozen=True)
class DurabilityCase:
    """One run: ``replicas`` is INVOICE_REDIS_MIN_REPLICAS; ``jobs`` offered at ``rate``/s."""

    replicas: int
    jobs: int
    rate: float
    pool: str = "threads"
    concurrency: int = 16


def run_durability(stack: Stack, case: DurabilityCase, tag: str) -> Row:
    """Start the replica (once), one worker and one paced producer; measure; check; stop."""
    stack.replicate()
    stack.reset(0)
    settings = stack.settings(tag, redis_min_replicas=case.replicas)
    try:
        pace = ["--mode", "enqueue", "--rate", case.rate, "--timings"]
        producer = stack.child("bench.load", job_args(tag, 0, case.jobs, *pace), settings)
        worker = stack.start_worker(
            settings, bare=False, pool=case.pool, concurrency=case.concurrency
        )
        producer.wait_ready(READY_TIMEOUT)
        assert worker.process is not None
        window = CpuWindow(
            {"worker": [(worker.process.pid, True)], "sandbox": [(stack.sandbox_pid, False)]}
            | {"redis": [(stack.redis_pid, False), (stack.replica_pid, False)]}
        )
        window.start()
        producer.go()
        result = producer.result(120 + case.jobs / case.rate)
        stack.wait(lambda: stack.client.xlen(settings.events_stream) >= case.jobs, 120)
        window.stop()
    finally:
        stack.stop_children()
    cpu = window.cpu or {}
    row = Row(
        "durability", "ours", case.pool, case.concurrency, jobs=case.jobs,
        replicas=case.replicas, rate=case.rate,
        worker_cpu_ms=per_job_ms(cpu.get("worker"), case.jobs),
        redis_cpu_ms=per_job_ms(cpu.get("redis"), case.jobs),
        producer_cpu_ms=per_job_ms(result["cpu_s"], case.jobs),
        sandbox_cpu_ms=per_job_ms(cpu.get("sandbox"), case.jobs),
        machine_busy=window.machine_busy, other_cores=window.other_cores(result["cpu_s"]),
    )  # fmt: skip
    fids = foreign_ids(tag, 0, case.jobs)
    check_provider(stack, fids, row, bare=False)
    done_ms = check_events(stack, settings, fids, row, None)
    starts = dict(zip(fids, result["starts"], strict=True))
    lat = sorted(done_ms[fid] - starts[fid] * 1000 for fid in fids if fid in done_ms)
    row.p50_ms, row.p95_ms, row.p99_ms = (percentile(lat, q) for q in (50, 95, 99))
    calls = sorted(s * 1000 for s in result["calls"])
    row.enqueue_p50_ms, row.enqueue_p99_ms = percentile(calls, 50), percentile(calls, 99)
    if done_ms:
        row.seconds = max(done_ms.values()) / 1000 - min(result["starts"])
        row.jobs_per_s = case.jobs / row.seconds
    stats = JobStore(stack.client, settings).stats
    deferred = stack.client.hget(stats, f"deferrals:{DeferReason.NOT_DURABLE}")
    row.unconfirmed = result["unconfirmed"] + int(deferred or 0)
    return row
