"""CPU per job as instructions: ``python -m bench.run --only instructions`` (needs valgrind).

Worker CPU per job, measured in seconds, moves by up to 30 % between identical runs on a shared
2-core machine (scheduling, the GIL handed among 16 threads), more than the changes it should
judge. Instructions do not: ``valgrind --tool=callgrind`` counts what a process executes,
whatever else the machine does. Against a private redis-server and the sandbox (0 ms), two
measures, each for ours and for bare Celery (``bench/bare_app.py``):

- **worker**: a real Celery worker (``-P solo``, task events on, ``-l INFO``) under callgrind;
  after ``WARM`` jobs its counters are zeroed (``callgrind_control -z``), ``WORKER_JOBS`` jobs
  are sent and done, and the counters dumped: instructions per job with Celery's own work
  (consumer, acks, events, log lines) in;
- **task**: the task body alone in a plain loop, run twice (``SMALL`` and ``LARGE`` jobs) and
  differenced, start-up cancelled out: ``InvoiceJob.run`` on an enqueued job (claim, signed
  POST, final state and event), against ``ProviderClient.create_invoice``.

User-space instructions of the process only: not the kernel's share of its system calls, not
Redis, not the sandbox, and no GIL contention (valgrind runs one thread at a time), so these
are the CPU ratios of the work itself, the floor under a threads worker's measured ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from bench.bare_app import TASK_NAME, create_bare_app
from bench.load import request_data
from bench.stack import KEY, ROOT, SECRET, Stack, bench_env
from invoice_worker.client import ProviderClient
from invoice_worker.config import Settings
from invoice_worker.devstack.processes import worker_process
from invoice_worker.job import InvoiceJob
from invoice_worker.models import parse_request
from invoice_worker.producer import Producer
from invoice_worker.store import JobStore

SMALL, LARGE = 100, 300
WARM, WORKER_JOBS = 20, 200
KINDS = ("ours", "bare")


def child(kind: str, jobs: int, tag: str, redis_url: str, api_url: str) -> None:
    """Run ``jobs`` jobs of ``kind`` (``enqueue`` only enqueues them, for ``ours``)."""
    settings = Settings(
        _env_file=None, api_url=api_url, api_key=KEY, api_secret=SECRET, broker_url=redis_url,
        redis_url=redis_url, key_prefix=f"{tag}:", queue=f"bench-{tag}",
        events_stream=f"{tag}:events",
    )  # fmt: skip
    ids = [f"{tag}-{i}" for i in range(jobs + 1)]  # one more, to warm up (scripts loaded)
    if kind == "enqueue":
        producer = Producer(settings)
        for foreign_id in ids:
            producer.enqueue(request_data(foreign_id))
        producer.close()
        return
    client = ProviderClient.from_settings(settings)
    if kind == "ours":
        job = InvoiceJob(JobStore.from_settings(settings), client, settings)
        for i, foreign_id in enumerate(ids):
            owner = f"bench:1:{job.store.token()}"
            outcome = job.run({"request": request_data(foreign_id)}, task_id=f"t{i}", owner=owner)
            if outcome.record is None or not outcome.record.url:
                raise RuntimeError(f"{foreign_id}: no invoice ({outcome})")
    else:
        for foreign_id in ids:
            client.create_invoice(parse_request(request_data(foreign_id)))


def count(kind: str, jobs: int, stack: Stack) -> int:
    """Instructions of one child process running ``jobs`` jobs of ``kind`` under callgrind."""
    tag = f"i{uuid.uuid4().hex[:8]}"
    args = [kind, str(jobs), tag, stack.redis.url, stack.api_url]
    me = [sys.executable, "-m", "bench.instructions", "--child"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    if kind == "ours":
        subprocess.run([*me, "enqueue", *args[1:]], env=env, check=True)  # noqa: S603
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        subprocess.run([*_callgrind(out), *me, *args], env=env, check=True, capture_output=True)  # noqa: S603
        return _total(out)


def worker_count(kind: str, stack: Stack, logs: Path) -> int:
    """Instructions of a ``-P solo`` worker of ``kind`` per job, Celery included."""
    tag = f"w{uuid.uuid4().hex[:8]}"
    settings = stack.settings(tag, task_events=True)
    stack.reset(0.0)
    out = logs / f"callgrind-{tag}.out"
    worker = worker_process(settings, logs, pool="solo", concurrency=1)
    if kind == "bare":
        worker.argv[worker.argv.index("-A") + 1] = "bench.bare_app"
    worker.env = bench_env(settings)
    worker.argv = [*_callgrind(out), *worker.argv]
    worker.start(ready="ready.", timeout=900)
    send = _sender(kind, settings)
    try:
        _run_jobs(kind, stack, settings, send, tag, 0, WARM)
        pid = str(worker.process.pid if worker.process else "")
        control = shutil.which("callgrind_control") or "callgrind_control"
        subprocess.run([control, "-z", pid], check=True, capture_output=True)  # noqa: S603
        _run_jobs(kind, stack, settings, send, tag, WARM, WARM + WORKER_JOBS)
        subprocess.run([control, "-d", pid], check=True, capture_output=True)  # noqa: S603
    finally:
        worker.stop(timeout=60)
    dumps = sorted(logs.glob(f"callgrind-{tag}.out.*"))  # the -d dump: <file>.<n>
    return _total(dumps[0]) // WORKER_JOBS


def _callgrind(out: Path) -> list[str]:
    """The command prefix that runs a process under callgrind, its counts written to ``out``."""
    return [
        shutil.which("valgrind") or "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
    ]


def _total(dump: Path) -> int:
    """The instruction total of a callgrind output file."""
    for line in dump.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"callgrind wrote no total in {dump.name}")


def _sender(kind: str, settings: Settings) -> Callable[[str], object]:
    """Send one job by foreign id: our producer, or bare Celery's ``send_task``."""
    if kind == "ours":
        producer = Producer(settings)
        return lambda foreign_id: producer.enqueue(request_data(foreign_id))
    app = create_bare_app(settings)
    return lambda foreign_id: app.send_task(
        TASK_NAME, kwargs={"request": request_data(foreign_id)}, queue=settings.queue
    )


def _run_jobs(
    kind: str, stack: Stack, settings: Settings, send: Callable[[str], object], tag: str,
    first: int, last: int,
) -> None:  # fmt: skip
    for i in range(first, last):
        send(f"{tag}-{i}")
    if kind == "ours":
        stack.wait(lambda: stack.client.xlen(settings.events_stream) >= last, 900)
    else:
        stack.wait(lambda: stack.answered() >= last, 900)


def main() -> int:
    """Measure both kinds both ways; print instructions per job and their ratios."""
    if shutil.which("valgrind") is None:
        print("instructions: needs valgrind (apt-get install valgrind)")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        stack = Stack(logs).start()
        try:
            worker = {kind: worker_count(kind, stack, logs) for kind in KINDS}
            stack.reset(0.0)
            task = {
                kind: (count(kind, LARGE, stack) - count(kind, SMALL, stack)) / (LARGE - SMALL)
                for kind in KINDS
            }
        finally:
            stack.stop()
    print("\ninstructions per job (callgrind, user space, 0 ms sandbox)\n")
    print("| measure | ours | bare Celery | ours / bare |\n|---|--:|--:|--:|")
    for label, counts in (("worker, -P solo", worker), ("task body, in-process", task)):
        ours, bare = counts["ours"], counts["bare"]
        print(f"| {label} | {ours:,.0f} | {bare:,.0f} | {ours / bare:.2f} |")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", nargs=5, metavar=("KIND", "JOBS", "TAG", "REDIS", "API"))
    options = parser.parse_args()
    if options.child:
        kind, jobs, tag, redis_url, api_url = options.child
        child(kind, int(jobs), tag, redis_url, api_url)
        sys.exit(0)
    sys.exit(main())
