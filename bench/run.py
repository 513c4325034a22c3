"""Run the benchmark: ``python -m bench.run`` (quick, a few minutes) or ``--full``.

Everything runs on loopback: a private redis-server, the sandbox provider in its own process,
Celery workers, producers and the reference loops as child processes. Prints the tables and
the targets, writes bench/results/<plan>.json and the plot. Exits 1 if any of our jobs was lost
or duplicated (or one of our scenarios failed), 2 with ``--strict`` when a target was missed.
Problems of the bare-Celery reference (it has no idempotency) are reported, not failed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import plot, report
from bench.durability import DurabilityCase, run_durability
from bench.measure import machine_ticks
from bench.scenarios import CORES, ProducerCase, Row, WorkerCase, run_producer, run_workers
from bench.source import from_commit, source
from bench.stack import ROOT, Stack

KINDS = ("ours", "bare", "ceiling")
SLOW_MS = 200.0
#: (pool, concurrency) per provider latency; prefork only at 2 (one process per slot).
PLANS: dict[str, dict[float, list[tuple[str, int]]]] = {
    "quick": {
        0.0: [("prefork", 2), ("threads", 16), ("gevent", 16)],
        # gevent at 200 ms stays in --full: with the Redis broker it can stall for the whole
        # visibility timeout (docs/benchmarks.md), which would blow the quick run's budget.
        SLOW_MS: [("prefork", 2), ("threads", 16), ("threads", 32), ("threads", 64)],
    },
    "full": {
        0.0: [("prefork", 2), ("threads", 2), ("threads", 16), ("threads", 64), ("gevent", 16),
              ("gevent", 64), ("gevent", 128)],
        SLOW_MS: [("prefork", 2), ("threads", 2), ("threads", 16), ("threads", 32),
                  ("threads", 64), ("threads", 128), ("gevent", 16), ("gevent", 64),
                  ("gevent", 128), ("gevent", 256)],
    },
}  # fmt: skip
#: (pool, concurrency, worker processes) also run with several processes, one per core.
MULTI = {
    "quick": [("threads", 32, 2)],
    "full": [("threads", 16, 2), ("threads", 32, 2), ("threads", 64, 2)],
}
#: Scenarios also run with task events off (the bare-Celery orientation numbers had both).
EVENTS_OFF = {"quick": [("prefork", 2)], "full": [("prefork", 2), ("threads", 16)]}
#: Scenarios (0 ms, one worker process) that decide a target, so they run in ROUNDS rounds,
#: ours and bare in turns (ours, bare / bare, ours / ...), and are judged on the medians of the
#: rounds' ratios, each ours run against the bare run of its round: one run of a few seconds
#: moves by several percent with the host. They run twice so: as configured (the worker's 16
#: threads sharing both cores with Redis, the sandbox and the producers), and pinned: the worker
#: alone on one core, the rest on the others (bench.scenarios.pin_apart).
IN_ROUNDS = {"quick": [("threads", 16)], "full": [("threads", 16)]}
ROUNDS = {"quick": 4, "full": 6}  # even: each kind runs first as often
PIN_SCALE = 3  # jobs per pinned run, times the scenario's
#: Scenarios also run at half of c/latency, for the latency of a fleet that is not saturated.
HALF_LOAD = {
    "quick": [("threads", 16)],
    "full": [("threads", 16), ("threads", 64), ("gevent", 128)],
}
SECONDS = {"quick": 3.0, "full": 8.0}  # wanted length of each worker run
PRODUCER_JOBS = {"quick": 3000, "full": 20000}
CPU_BOUND_RATE = 300.0  # about what one worker process manages here, to size the runs
#: The durability section: (rounds, jobs per run); each round runs N = 0 and N = 1, in turns
#: 0,1 / 1,0 / 0,1 / ... so a drift of the machine favours neither. Jobs are offered at
#: DURABILITY_RATE, about a third of what one threads -c 16 worker manages at 0 ms: latency,
#: not queueing.
DURABILITY = {"quick": (4, 400), "full": (6, 1500)}
DURABILITY_RATE = 100.0


def gevent_available() -> bool:
    try:
        import gevent  # noqa: F401
    except ImportError:
        return False
    return True


def job_count(latency_ms: float, slots: int, seconds: float) -> int:
    rate = CPU_BOUND_RATE if not latency_ms else min(CPU_BOUND_RATE, slots / latency_ms * 1000)
    return int(min(10_000, max(40, rate * seconds)))


def worker_cases(plan: str, args: argparse.Namespace) -> list[WorkerCase]:
    pools = {"prefork", "threads"} | ({"gevent"} if gevent_available() else set())
    cases = []
    for latency, configs in PLANS[plan].items():
        runs = [(pool, c, args.workers) for pool, c in configs]
        runs += [(p, c, n) for p, c, n in MULTI[plan] if n != args.workers]
        for pool, c, procs in runs:
            if pool not in pools or (args.only and f"{pool}:{c}" not in args.only):
                continue
            jobs = job_count(latency, c * procs, SECONDS[plan] * args.scale)
            one: dict[str, Any] = {"pool": pool, "concurrency": c, "latency_ms": latency}
            one |= {"jobs": jobs, "workers": procs, "producers": args.producers}
            off = not latency and (pool, c) in EVENTS_OFF[plan] and procs == args.workers
            for events in (True, False) if off else (True,):
                cases += [WorkerCase(kind, events=events, **one) for kind in KINDS]
            if not latency and (pool, c) in IN_ROUNDS[plan] and procs == 1:
                cases += _rounds(ROUNDS[plan], one, first=1)  # round 1: the three runs above
                if len(CORES) > 1:
                    pinned = one | {"jobs": jobs * PIN_SCALE, "pinned": True}
                    cases += _rounds(ROUNDS[plan], pinned)
            if latency and (pool, c) in HALF_LOAD[plan] and procs == args.workers:
                cases.append(WorkerCase("ours", load=0.5, **one | {"jobs": jobs // 2}))
    return cases


def _rounds(rounds: int, case: dict[str, Any], first: int = 0) -> list[WorkerCase]:
    """Ours and bare in turns, rounds ``first`` to ``rounds - 1``."""
    turns = [("ours", "bare") if n % 2 == 0 else ("bare", "ours") for n in range(rounds)]
    return [WorkerCase(k, **case, round=n) for n in range(first, rounds) for k in turns[n]]


def producer_cases(plan: str, scale: float) -> list[ProducerCase]:
    jobs = int(PRODUCER_JOBS[plan] * scale)
    return [
        ProducerCase("send_task", jobs, events=False),
        ProducerCase("send_task", jobs, events=True),
        ProducerCase("enqueue", jobs, events=False),
        ProducerCase("enqueue", jobs, events=True),
        ProducerCase("enqueue_many", jobs * 3, events=True),
        ProducerCase("enqueue", jobs, events=False, split=True),
        ProducerCase("enqueue", jobs, events=True, split=True),
    ]


def durability_cases(plan: str, scale: float) -> list[DurabilityCase]:
    rounds, jobs = DURABILITY[plan]
    order = [(0, 1) if r % 2 == 0 else (1, 0) for r in range(rounds)]
    return [DurabilityCase(n, int(jobs * scale), DURABILITY_RATE) for ns in order for n in ns]


def wait_quiet(seconds: float, busy: float = 0.15) -> float:
    """Wait up to ``seconds`` for the machine to be idle (other users' work skews every number);
    return the busy share of the last look."""
    deadline = time.monotonic() + seconds
    while True:
        before = machine_ticks()
        time.sleep(0.5)
        after = machine_ticks()
        share = (after[0] - before[0]) / max(1, after[1] - before[1])
        if share < busy or time.monotonic() > deadline:
            return share


def machine(stack: Stack) -> dict[str, Any]:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.processor(),
    )  # fmt: skip
    versions: dict[str, str | None] = {}
    for name in ("celery", "kombu", "redis", "requests", "gevent", "invoice-worker"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis_server": stack.client.info("server")["redis_version"],
        **{f"{k}_version": v for k, v in versions.items()},
    }


def run(args: argparse.Namespace) -> int:
    plan = "full" if args.full else "quick"
    started = time.monotonic()
    rows: list[Row] = []
    log_dir = Path(tempfile.mkdtemp(prefix="invoice-bench-"))
    print(f"bench: {plan} plan, logs in {log_dir}", flush=True)
    stack = Stack(log_dir).start()
    try:
        meta = machine(stack) | source() | {"plan": plan, "workers": args.workers}
        meta |= {"producers": args.producers, "date": time.strftime("%Y-%m-%d %H:%M %Z")}
        cases: list[WorkerCase | ProducerCase | DurabilityCase] = []
        if not args.producers_only:
            cases += worker_cases(plan, args)
        if not args.only:
            cases += producer_cases(plan, args.scale)
        if not args.producers_only and (not args.only or "durability" in args.only):
            cases += durability_cases(plan, args.scale)  # last: its replica stays attached
        for n, case in enumerate(cases):
            tag = f"b{n}"
            if args.quiet_wait and (share := wait_quiet(args.quiet_wait)) >= 0.15:
                print(f"  machine still {share:.0%} busy before this scenario", flush=True)
            try:
                if isinstance(case, WorkerCase):
                    row = run_workers(stack, case, tag)
                elif isinstance(case, DurabilityCase):
                    row = run_durability(stack, case, tag)
                else:
                    row = run_producer(stack, case, tag)
            except Exception as exc:  # one broken scenario must not hide the others' numbers
                row = _failed(case, f"{type(exc).__name__}: {exc}")
            rows.append(row)
            print(_progress(n + 1, len(cases), row, started), flush=True)
    finally:
        stack.stop()
    res = report.Results(rows)
    meta["wall_seconds"] = round(time.monotonic() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(args.out / f"{plan}.json", meta, res)
    (args.out / f"{plan}.md").write_text(report.tables(res, report.markdown_table) + "\n")
    print("\n" + report.tables(res, report.text_table))
    _print_targets(res)
    plot.draw(args.plot, res.workers(), plot.title(meta))
    problems = [(r, p) for r in rows for p in r.problems]
    for row, problem in problems:
        # Bare Celery has no claim: its lost or repeated deliveries are findings, not our bugs.
        label = "reference problem" if row.kind == "bare" else "FAIL"
        what = f"N={row.replicas}" if row.group == "durability" else row.kind
        print(f"{label}: {row.group} {what} {row.pool} -c {row.concurrency}: {problem}")
    for row in rows:
        if row.duplicate_calls:
            print(
                f"note: {row.kind} {row.pool} -c {row.concurrency}: {row.duplicate_calls} duplicate"
                " provider calls (Celery delivered messages twice; bare Celery has no claim)"
            )
    print(f"\nwall time {meta['wall_seconds']} s; results in {args.out}, plot {args.plot}")
    if any(row.kind != "bare" for row, _ in problems):
        return 1
    missed = [t for t in report.targets(res) if not t[1]]
    return 2 if args.strict and missed else 0


def _failed(case: WorkerCase | ProducerCase | DurabilityCase, problem: str) -> Row:
    if isinstance(case, WorkerCase):
        return Row("workers", case.kind, case.pool, case.concurrency, case.workers,
                   case.latency_ms, case.events, case.jobs, problems=[problem],
                   pinned=case.pinned, round=case.round)  # fmt: skip
    if isinstance(case, DurabilityCase):
        return Row("durability", "ours", case.pool, case.concurrency, jobs=case.jobs,
                   replicas=case.replicas, rate=case.rate, problems=[problem])  # fmt: skip
    return Row("producer", case.mode, events=case.events, jobs=case.jobs, problems=[problem])


def _progress(n: int, total: int, row: Row, started: float) -> str:
    what = f"{row.kind} {row.pool} -c {row.concurrency} {row.latency_ms:g}ms"
    what += " pinned" if row.pinned else ""
    what += f", round {row.round + 1}" if row.round or row.pinned else ""
    if row.group == "producer":
        what = f"producer {row.kind} {row.pool or 'celery'} events={'on' if row.events else 'off'}"
    elif row.group == "durability":
        what = f"durability N={row.replicas} {row.pool} -c {row.concurrency} at {row.rate:g}/s"
    status = "ok" if not row.problems else "FAIL " + "; ".join(row.problems)
    return (
        f"[{n}/{total} {time.monotonic() - started:5.0f}s] {what}: {row.jobs} jobs, "
        f"{row.jobs_per_s:,.0f}/s {status}"
    )


def _print_targets(res: report.Results) -> None:
    print("\ntargets:")
    for target, held, measured in report.targets(res):
        print(f"  {'held' if held else 'MISSED':6}  {target}: {measured}")
    for pool, info in report.knees(res).items():
        print(
            f"  knee    {pool} at {SLOW_MS:g} ms: c/latency up to -c {info['linear_up_to']}, "
            f"below 0.9 from -c {info['below_at']}, peak {info['peak']:,.0f} jobs/s"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="every scenario, longer runs")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (%(default)s)")
    parser.add_argument("--producers", type=int, default=1, help="producer processes")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply job counts")
    parser.add_argument(
        "--only", nargs="+", metavar="POOL:C",
        help="e.g. threads:16 gevent:64, or durability, or enqueue-aio (sync vs asyncio enqueue"
        " rate, alone), or instructions (CPU per job as instructions, alone; needs valgrind)",
    )  # fmt: skip
    parser.add_argument("--producers-only", action="store_true", help="skip worker scenarios")
    parser.add_argument("--strict", action="store_true", help="exit 2 when a target is missed")
    parser.add_argument(
        "--quiet-wait", type=float, default=10, metavar="S",
        help="wait up to S seconds before each scenario for other load to stop (%(default)s)",
    )  # fmt: skip
    parser.add_argument("--commit", metavar="REF", help="benchmark invoice_worker as of REF")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "benchmarks.png")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every child process is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.out = args.out.resolve()
    if args.commit:
        return from_commit(args.commit, sys.argv[1:] if argv is None else argv, args)
    if args.only and "enqueue-aio" in args.only:
        from bench import enqueue_aio

        return enqueue_aio.main(args.scale)
    if args.only and "instructions" in args.only:
        from bench import instructions

        return instructions.main()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
