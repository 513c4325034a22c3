"""Child process: the ceiling reference. ``--threads`` threads call ``InvoiceJob.run`` directly
on pre-recorded jobs: the same HTTP client, the same Redis scripts (claim, final record and
event) and the same job log line as a worker, but no queue and no Celery.

Run by bench.scenarios: prints ``ready``, waits for ``go`` on stdin, writes JSON to --result.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import resource
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench.load import foreign_ids, request_data
from invoice_worker.client import ProviderClient
from invoice_worker.config import Settings
from invoice_worker.job import InvoiceJob
from invoice_worker.message import TaskMessage
from invoice_worker.models import parse_request
from invoice_worker.producer import Producer
from invoice_worker.record import JobRecord
from invoice_worker.store import JobStore


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args(argv)
    # Job lines at INFO, as a worker started with -l INFO writes them.
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    logging.getLogger("invoice_worker.job").setLevel(logging.INFO)

    settings = Settings()
    requests = [request_data(fid) for fid in foreign_ids(args.tag, args.index, args.count)]
    records = Producer(settings).enqueue_many(requests)  # queued records, as a producer leaves
    work: queue.Queue[tuple[dict[str, Any], str]] = queue.Queue()
    for request, record in zip(requests, records, strict=True):
        assert isinstance(record, JobRecord), record
        work.put((TaskMessage(request=parse_request(request)).kwargs(), record.task_id))
    job = InvoiceJob(
        JobStore.from_settings(settings), ProviderClient.from_settings(settings), settings
    )
    failures: list[str] = []

    def loop() -> None:
        while True:
            try:
                kwargs, task_id = work.get_nowait()
            except queue.Empty:
                return
            owner = f"ceiling:{os.getpid()}:{uuid.uuid4().hex[:12]}"
            outcome = job.run(kwargs, task_id=task_id, owner=owner)
            if outcome.record is None or outcome.record.state != "created":
                failures.append(kwargs["request"]["foreign_id"])

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(args.threads)]
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    cpu0, first = time.process_time(), time.time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    last, cpu = time.time(), time.process_time() - cpu0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"first": first, "last": last, "cpu_s": cpu, "rss_mb": rss_mb, "failed": failures}
    args.result.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
