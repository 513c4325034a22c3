"""The callback receiver's throughput and CPU per callback: ``python -m bench.receiver``.

A private redis-server holds N created jobs; the standalone receiver (``invoice-worker
callbacks``, one process) serves on loopback; client threads in this process POST signed
callbacks, a fresh connection each as the provider opens them: ``processing`` for every invoice,
then ``confirmed`` for every one, so each callback is a status change (one script, one event).
Then the same callbacks again (duplicates: one script, no event). Reported: callbacks per second,
the receiver's and Redis' CPU per callback (from /proc), and ``Receiver.handle`` called in this
process without HTTP, for the cost of the application alone.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.measure import cpu_seconds, machine_ticks
from invoice_worker.config import Settings
from invoice_worker.constants import JobState
from invoice_worker.devstack.embedded import EmbeddedRedis, free_port
from invoice_worker.devstack.processes import ChildProcess, receiver_process
from invoice_worker.receiver import CALLBACK_PATH, Receiver
from invoice_worker.store import JobStore

KEY, SECRET = "bench-key", "bench-secret"  # the receiver's made-up key pair
Signed = tuple[bytes, str]


def body(invoice_id: int, foreign_id: str, status: str, confirmations: int) -> bytes:
    """A callback as the provider (and the sandbox) writes it: compact, its documented keys."""
    tx = {"id": invoice_id * 10, "currency": "BTC", "transaction_type": "blockchain",
          "type": "deposit", "address": "3Bench", "tag": None, "amount": "0.01230000",
          "txid": hashlib.sha256(str(invoice_id).encode()).hexdigest(),
          "confirmations": str(confirmations)}  # fmt: skip
    data = {
        "id": invoice_id, "foreign_id": foreign_id, "type": "invoice",
        "crypto_address": {"id": invoice_id, "currency": "BTC", "address": "3Bench", "tag": None},
        "currency_sent": {"currency": "BTC", "amount": "0.01230000",
                          "remaining_amount": "0.00000000"},
        "currency_received": {"currency": "BTC", "amount": "0.01230000"},
        "transactions": [tx], "fees": [], "error": "", "status": status,
        "fixed_at": 1_700_000_000, "expires_at": 1_700_086_400,
    }  # fmt: skip
    return json.dumps(data, separators=(",", ":")).encode()


def sign(raw: bytes) -> Signed:
    return raw, hmac.new(SECRET.encode(), raw, hashlib.sha512).hexdigest()


def seed(store: JobStore, tag: str, count: int, first_id: int) -> list[tuple[str, int]]:
    """``count`` jobs made final ``created`` through the store's own scripts."""
    jobs = []
    for n in range(count):
        fid, invoice_id = f"bench-{tag}-{n:06d}", first_id + n
        store.claim(fid, "seed", fingerprint="fp", fields={"task_id": "t"}, kwargs="{}")
        values = {"invoice_id": invoice_id, "url": "https://pay.example.com/i", "status": "pending",
                  "provider_foreign_id": fid}  # fmt: skip
        store.finish(fid, "seed", JobState.CREATED, values)
        jobs.append((fid, invoice_id))
    return jobs


def post_all(port: int, items: Sequence[Signed], threads: int) -> float:
    """POST every item from ``threads`` threads (a connection per callback); wall seconds."""
    lock, cursor, failures = threading.Lock(), iter(items), []

    def work() -> None:
        while True:
            with lock:
                item = next(cursor, None)
            if item is None:
                return
            raw, signature = item
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            headers = {"Content-Type": "application/json", "X-Processing-Key": KEY,
                       "X-Processing-Signature": signature}  # fmt: skip
            conn.request("POST", CALLBACK_PATH, body=raw, headers=headers)
            response = conn.getresponse()
            response.read()
            conn.close()
            if response.status != 200:
                failures.append(response.status)

    started = time.perf_counter()
    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not failures, failures[:5]
    return time.perf_counter() - started


def measured(
    name: str, count: int, run: Callable[[], float], pids: dict[str, int], own: bool = False
) -> dict[str, float | str]:
    """Run once and read callbacks/s and CPU ms per callback of each pid (and of this process
    when ``own``: the in-process case)."""
    before = {k: cpu_seconds(pid) for k, pid in pids.items()}
    own_before, (busy0, total0) = time.process_time(), machine_ticks()
    seconds = run()
    busy1, total1 = machine_ticks()
    row: dict[str, float | str] = {"case": name, "callbacks": count, "seconds": round(seconds, 2)}
    row["per_second"] = round(count / seconds)
    for key, pid in pids.items():
        row[f"{key}_cpu_ms"] = round((cpu_seconds(pid) - before[key]) * 1000 / count, 3)
    if own:
        row["handle_cpu_ms"] = round((time.process_time() - own_before) * 1000 / count, 3)
    row["machine_busy"] = round((busy1 - busy0) / max(1, total1 - total0), 2)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.receiver", description=__doc__)
    parser.add_argument("--invoices", type=int, default=2000, help="2 callbacks each")
    parser.add_argument("--threads", type=int, default=16, help="client threads")
    args = parser.parse_args(argv)
    n = args.invoices
    rows = []
    with (
        EmbeddedRedis(use_binary=True) as server,
        tempfile.TemporaryDirectory(prefix="bench-receiver-") as tmp,
    ):
        assert server.process is not None, "the benchmark needs a real redis-server"
        settings = Settings(
            _env_file=None, api_url="http://127.0.0.1:9/api/v2", api_key=KEY, api_secret=SECRET,
            broker_url=server.url, key_prefix="bench:", events_stream="bench:events",
            task_events=False,
        )  # fmt: skip
        store = JobStore.from_settings(settings)
        port = free_port()
        receiver: ChildProcess = receiver_process(settings, Path(tmp), port=port)
        receiver.start(ready="callback receiver at")
        assert receiver.process is not None
        pids = {"receiver": receiver.process.pid, "redis": server.process.pid}
        try:
            jobs = seed(store, "http", n, 1_000_000)
            processing = [sign(body(i, f, "processing", 0)) for f, i in jobs]
            confirmed = [sign(body(i, f, "confirmed", 1)) for f, i in jobs]

            def both() -> float:
                return post_all(port, processing, args.threads) + post_all(
                    port, confirmed, args.threads
                )

            rows.append(measured("HTTP, status changes", 2 * n, both, pids))
            again = processing + confirmed
            rows.append(
                measured(
                    "HTTP, duplicates", 2 * n, lambda: post_all(port, again, args.threads), pids
                )
            )
            stats = store.redis.hgetall(store.stats)
            assert stats.get("callbacks:applied") == str(2 * n), stats
            assert stats.get("callbacks:duplicate") == str(2 * n), stats
            # The application alone: Receiver.handle in this process, one thread.
            local = Receiver(settings, store=store)
            jobs = seed(store, "local", n, 2_000_000)
            changes = (("processing", 0), ("confirmed", 1))
            items = [sign(body(i, f, s, c)) for f, i in jobs for s, c in changes]

            def handle_all() -> float:
                started = time.perf_counter()
                for raw, signature in items:
                    headers = {"X-Processing-Key": KEY, "X-Processing-Signature": signature}
                    assert local.handle(raw, headers)[0] == 200
                return time.perf_counter() - started

            rows.append(
                measured("handle() in-process", 2 * n, handle_all, {"redis": pids["redis"]}, True)
            )
        finally:
            receiver.stop()
    python = sys.version.split()[0]
    print(f"cpu: {os.cpu_count()} cores; python {python}; {args.threads} client threads")
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
