"""One measured run each: workers draining paced producers (ours, bare Celery) or the ceiling
loop, and producers alone. Every run checks exactly-once and returns one result row."""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.load import foreign_ids
from bench.measure import CpuWindow, group_pids, peak_rss_mb, per_job_ms, percentile, pin, stream_ms
from bench.stack import Stack
from invoice_worker.config import Settings
from invoice_worker.store import JobStore

READY_TIMEOUT = 60.0
#: The cores this benchmark may use (taken before any case pins anything).
CORES = sorted(os.sched_getaffinity(0))


@dataclass(frozen=True)
class WorkerCase:
    """A worker scenario: ``kind`` is ours, bare (Celery) or ceiling (no queue)."""

    kind: str
    pool: str
    concurrency: int
    latency_ms: float
    jobs: int
    workers: int = 1
    producers: int = 1
    events: bool = True
    load: float = 0.0  # offer this share of c/latency (ours only); 0 saturates the workers
    pinned: bool = False  # the worker alone on one core, the rest of the stack on the others
    round: int = 0  # of a case run several times in turns (bench.run.IN_ROUNDS)

    @property
    def slots(self) -> int:
        return self.workers * self.concurrency


@dataclass(frozen=True)
class ProducerCase:
    """Enqueue alone: ``mode`` as in bench.load; ``split`` keeps job state in another Redis
    database than the broker, which takes the non-atomic path (record, then send_task)."""

    mode: str
    jobs: int
    events: bool = True
    split: bool = False


@dataclass
class Row:
    """One result: what the table, the JSON file and the targets read."""

    group: str  # workers | producer
    kind: str
    pool: str = ""
    concurrency: int = 0
    processes: int = 1  # worker processes (each with ``concurrency`` slots)
    latency_ms: float = 0.0
    events: bool = True
    jobs: int = 0
    seconds: float = 0.0
    jobs_per_s: float = 0.0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    worker_cpu_ms: float | None = None
    redis_cpu_ms: float | None = None
    producer_cpu_ms: float | None = None
    sandbox_cpu_ms: float | None = None
    machine_busy: float = 0.0
    other_cores: float = 0.0  # CPU used meanwhile by processes outside the benchmark
    worker_rss_mb: float | None = None
    calls_per_job: float | None = None
    duplicate_calls: int = 0  # provider calls beyond one per job (bare Celery only)
    problems: list[str] = field(default_factory=list)
    # durability rows (bench.durability) only: latency from the enqueue call, not created_at
    replicas: int = 0  # INVOICE_REDIS_MIN_REPLICAS
    rate: float = 0.0  # jobs/s offered
    enqueue_p50_ms: float | None = None
    enqueue_p99_ms: float | None = None
    unconfirmed: int = 0  # writes Redis did not confirm in time: enqueues redone, jobs deferred
    pinned: bool = False  # the worker had a core of its own (WorkerCase.pinned)
    round: int = 0  # WorkerCase.round
    switches_per_job: float | None = None  # the workers' voluntary context switches

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def config(self) -> tuple[str, int, int, float, bool, bool]:
        """What a worker run measured, whichever round it was."""
        return (self.pool, self.concurrency, self.processes, self.latency_ms, self.events,
                self.pinned)  # fmt: skip


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_workers(stack: Stack, case: WorkerCase, tag: str) -> Row:
    """Start workers (or ceiling processes) and paced producers; measure; check; stop all."""
    stack.reset(case.latency_ms)
    settings = stack.settings(
        tag, task_events=case.events, http_pool_size=max(64, case.concurrency)
    )
    prefork = case.pool == "prefork"
    shared: list[int] = []  # pinned to the other cores while a pinned case runs
    try:
        if case.kind == "ceiling":
            procs = case.workers * (case.concurrency if prefork else 1)
            threads = 1 if prefork else case.concurrency
            counts = _split(case.jobs, procs)
            children = [
                stack.child("bench.ceiling", job_args(tag, i, n, "--threads", threads), settings)
                for i, n in enumerate(counts)
            ]
            group = []  # the children exit when done: they report their own CPU and RSS
        else:
            counts = _split(case.jobs, case.producers)
            # Bare producers send no task-sent events (ours send none): cheaper, so the
            # reference is not slowed by its producer.
            bare = case.kind == "bare"
            mode = ["--mode", "send_task", "--no-sent-event"] if bare else ["--mode", "enqueue"]
            pace = ["--backlog", max(4, case.slots)]
            if case.load:
                ideal = case.slots / case.latency_ms * 1000
                pace += ["--rate", case.load * ideal / case.producers]
            children = [
                stack.child(
                    "bench.load",
                    job_args(tag, i, n, *mode, *pace),
                    settings,
                )
                for i, n in enumerate(counts)
            ]
            workers = [
                stack.start_worker(
                    settings, bare=case.kind == "bare", pool=case.pool, concurrency=case.concurrency
                )
                for _ in range(case.workers)
            ]
            group = [(w.process.pid, True) for w in workers if w.process is not None]
        for child in children:
            child.wait_ready(READY_TIMEOUT)
        if case.pinned:
            shared = [stack.redis_pid, stack.sandbox_pid, os.getpid(), *(c.pid for c in children)]
            pin_apart([m for pid, _ in group for m in group_pids(pid)], shared)
        window = CpuWindow(
            {"worker": group, "redis": [(stack.redis_pid, False)]}
            | {"sandbox": [(stack.sandbox_pid, False)]}
        )
        window.start()
        for child in children:
            child.go()
        budget = 120 + 5 * case.jobs * max(case.latency_ms, 2) / 1000 / case.slots
        deadline = time.monotonic() + budget  # one budget for the whole run, not per wait
        results = [child.result(max(1.0, deadline - time.monotonic())) for child in children]
        end = _wait_done(stack, settings, case, max(1.0, deadline - time.monotonic()))
        window.stop()
        rss = [peak_rss_mb(pid, group=True) for pid, _ in group]
        rss += [r["rss_mb"] for r in results if "rss_mb" in r]
    finally:
        try:
            pin(shared, set(CORES))  # the stack outlives the case: give it every core again
        finally:
            stack.stop_children()
    fids = [fid for i, n in enumerate(counts) for fid in foreign_ids(tag, i, n)]
    row = _worker_row(case, window, results, rss)
    row.pinned, row.round = case.pinned, case.round
    if group:  # ceiling children are not watched (they exit before the window ends)
        row.switches_per_job = window.switches["worker"] / case.jobs
    check_provider(stack, fids, row, bare=case.kind == "bare")
    if case.kind == "bare":
        row.seconds = end - min(r["first"] for r in results)
    else:
        check_events(stack, settings, fids, row, results if case.kind == "ceiling" else None)
    row.jobs_per_s = case.jobs / row.seconds if row.seconds > 0 else 0.0
    return row


def pin_apart(workers: list[int], shared: list[int]) -> None:
    """Put ``workers`` on the last core and ``shared`` (Redis, the sandbox, producers, this
    process) on the others: a worker host of its own, as in production, instead of 16 threads
    scheduled across both cores of a small machine among the very processes they wait on."""
    if len(CORES) < 2:
        raise RuntimeError("a pinned case needs two cores")
    pin(workers, {CORES[-1]})
    pin(shared, set(CORES[:-1]))


def job_args(tag: str, index: int, count: int, *extra: object) -> list[str]:
    args = ["--tag", tag, "--index", str(index), "--count", str(count)]
    return args + [str(e) for e in extra]


def _wait_done(stack: Stack, settings: Settings, case: WorkerCase, timeout: float) -> float:
    """Wall time at which the last job was seen done: a final event, or for bare Celery an
    answered create (the sandbox counts a call when it arrives, an answer when it is sent)."""
    if case.kind == "bare":
        return stack.wait(lambda: stack.answered() >= case.jobs, timeout)
    return stack.wait(lambda: stack.client.xlen(settings.events_stream) >= case.jobs, timeout)


def _worker_row(
    case: WorkerCase, window: CpuWindow, results: list[dict[str, Any]], rss: list[float]
) -> Row:
    cpu = dict(window.cpu or {})
    reported = sum(r["cpu_s"] for r in results)  # children that exited measured themselves
    if case.kind == "ceiling":
        cpu["worker"] = reported
    producer_cpu = reported if case.kind != "ceiling" else None
    kind = f"{case.kind}@{case.load:.0%}" if case.load else case.kind
    row = Row(
        "workers", kind, case.pool, case.concurrency, case.workers, case.latency_ms,
        case.events, case.jobs, worker_cpu_ms=per_job_ms(cpu.get("worker"), case.jobs),
        redis_cpu_ms=per_job_ms(cpu.get("redis"), case.jobs),
        producer_cpu_ms=per_job_ms(producer_cpu, case.jobs),
        sandbox_cpu_ms=per_job_ms(cpu.get("sandbox"), case.jobs),
        machine_busy=window.machine_busy, worker_rss_mb=max(rss) if rss else None,
        other_cores=window.other_cores(reported),
    )  # fmt: skip
    for r in results:
        row.problems += [f"ceiling: {fid} not created" for fid in r.get("failed", [])[:5]]
    return row


def check_provider(stack: Stack, fids: list[str], row: Row, *, bare: bool) -> None:
    """Exactly one create call per job, and no call for anything else. Bare Celery has no
    idempotency: its duplicate calls (redeliveries) are counted, not failed."""
    calls: dict[str, int] = stack.admin("GET", "/invoices")["create_calls"]
    total = stack.admin("GET", "/stats")["create_calls"]
    row.calls_per_job = total / len(fids) if fids else None
    row.duplicate_calls = sum(max(0, calls.get(fid, 0) - 1) for fid in fids)
    missing = [fid for fid in fids if not calls.get(fid)]
    if missing:
        row.problems.append(f"{len(missing)} jobs without a create call, e.g. {missing[0]}")
    if row.duplicate_calls and not bare:
        row.problems.append(f"{row.duplicate_calls} duplicate create calls")
    if extra := set(calls) - set(fids):
        row.problems.append(f"{len(extra)} create calls for unknown ids, e.g. {min(extra)}")


def check_events(
    stack: Stack,
    settings: Settings,
    fids: list[str],
    row: Row,
    ceiling: list[dict[str, Any]] | None,
) -> dict[str, int]:
    """One final event per job, every record ``created``; sets time span and latencies.
    Returns when each job's final event was added (Redis ms, by foreign_id)."""
    store = JobStore(stack.client, settings)
    events, after = [], "0"
    for _ in range(10_000):
        batch = store.events(after, count=5000)
        if not batch:
            break
        events += batch
        after = batch[-1][0]
    per_job = Counter(fields["foreign_id"] for _, fields in events)
    done_ms = {fields["foreign_id"]: stream_ms(eid) for eid, fields in events}
    not_created = sum(1 for _, fields in events if fields.get("state") != "created")
    pipe = stack.client.pipeline(transaction=False)
    for fid in fids:
        pipe.hmget(store.key(fid), "state", "created_at")
    records = dict(zip(fids, pipe.execute(), strict=True))
    missing = [fid for fid in fids if per_job.get(fid) != 1]
    if missing:
        row.problems.append(f"{len(missing)} jobs without exactly one event, e.g. {missing[0]}")
    if len(per_job) != len(fids) or not_created:
        row.problems.append(f"{len(per_job)} jobs with events, {not_created} not created")
    bad = [fid for fid, (state, _) in records.items() if state != "created"]
    if bad:
        row.problems.append(f"{len(bad)} records not created, e.g. {bad[0]}: {records[bad[0]]}")
    if not done_ms:
        return done_ms
    end_ms = max(done_ms.values())
    if ceiling is not None:  # pre-recorded jobs: the clock starts when the loop starts
        row.seconds = end_ms / 1000 - min(r["first"] for r in ceiling)
        return done_ms
    created = {fid: float(at) * 1000 for fid, (_, at) in records.items() if at}
    row.seconds = (end_ms - min(created.values())) / 1000
    lat = sorted(done_ms[fid] - created[fid] for fid in fids if fid in done_ms and fid in created)
    row.p50_ms, row.p95_ms, row.p99_ms = (percentile(lat, q) for q in (50, 95, 99))
    return done_ms


def run_producer(stack: Stack, case: ProducerCase, tag: str) -> Row:
    """One producer process enqueueing ``case.jobs`` as fast as it can, no workers."""
    stack.reset(0)
    state_url = stack.redis.url[: -len("/0")] + "/1" if case.split else stack.redis.url
    settings = stack.settings(tag, task_events=case.events, redis_url=state_url)
    try:
        child = stack.child(
            "bench.load", job_args(tag, 0, case.jobs, "--mode", case.mode), settings
        )
        child.wait_ready(READY_TIMEOUT)
        window = CpuWindow(
            {"redis": [(stack.redis_pid, False)], "sandbox": [(stack.sandbox_pid, False)]}
        )
        window.start()
        child.go()
        result = child.result(120 + case.jobs / 500)
        window.stop()
    finally:
        stack.stop_children()
    row = Row("producer", case.mode, events=case.events, jobs=case.jobs)
    row.pool = "split" if case.split else ("atomic" if case.mode != "send_task" else "")
    row.seconds = result["last"] - result["first"]
    row.jobs_per_s = case.jobs / row.seconds if row.seconds > 0 else 0.0
    row.producer_cpu_ms = per_job_ms(result["cpu_s"], case.jobs)
    row.redis_cpu_ms = per_job_ms((window.cpu or {}).get("redis"), case.jobs)
    row.machine_busy = window.machine_busy
    row.other_cores = window.other_cores(result["cpu_s"])
    queued = stack.client.llen(settings.queue)
    if queued != case.jobs:
        row.problems.append(f"{queued} messages queued for {case.jobs} jobs")
    if case.mode != "send_task":
        store = JobStore.from_settings(settings)
        pipe = store.redis.pipeline(transaction=False)
        for fid in foreign_ids(tag, 0, case.jobs):
            pipe.exists(store.key(fid))
        if (records := sum(pipe.execute())) != case.jobs:
            row.problems.append(f"{records} records for {case.jobs} jobs")
        store.redis.close()
    return row
