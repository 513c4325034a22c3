"""The demo of ``invoice-worker dev --demo N``: sample invoices, duplicates, faults; then the payer
pays most of them (one underpaid, one left to expire) and the callbacks bring every invoice to
``confirmed`` or ``failed``; a report."""

from __future__ import annotations

import secrets
import sys
import time
from typing import Any

from invoice_worker.constants import FINAL_STATES, InvoiceStatus, JobState
from invoice_worker.devstack.processes import ChildProcess
from invoice_worker.errors import ConflictError, InvalidRequestError
from invoice_worker.producer import Producer
from invoice_worker.record import JobRecord
from invoice_worker.sandbox import Faults, Sandbox

# Faults the demo injects (by job number) when it runs its own sandbox.
DEMO_FAULTS = {3: ["503"], 5: ["429"], 8: ["502", "500"], 11: ["commit_then_502"]}
# Callback faults while the invoices are paid: the receiver absorbs them.
CALLBACK_FAULTS = Faults(callback_duplicate=0.15, callback_out_of_order=0.25, seed=11)
SETTLED = (InvoiceStatus.CONFIRMED, InvoiceStatus.FAILED)


def payer_mode(n: int, count: int) -> str:
    """What the payer does with the n-th (0-based) of ``count`` invoices: most pay in full,
    every fourth in two instalments, the second pays less, the third lets the timer run out."""
    if count >= 3 and n == 1:
        return "less"
    if count >= 3 and n == 2:
        return "expire"
    return "instalments" if n % 4 == 3 else "full"


def demo_request(run: str, n: int) -> dict[str, Any]:
    """The n-th sample invoice of a demo run."""
    return {
        "timer": n % 2 == 0,
        "title": f"Demo order {n}",
        "foreign_id": f"demo-{run}-{n:03d}",
        "currency": "BTC",
        "amount": f"0.00{100 + n}",
        "url_success": "https://shop.example.com/paid",
        "url_failed": "https://shop.example.com/failed",
        "email_user": f"buyer{n}@example.com",
    }


class Demo:
    """Enqueue N invoices (with duplicates, one invalid, some faults) and show them settle."""

    def __init__(self, producer: Producer, sandbox: Sandbox | None, worker: ChildProcess) -> None:
        self.producer = producer
        self.sandbox = sandbox
        self.worker = worker
        self.run_id = secrets.token_hex(3)
        self.tty = sys.stdout.isatty()

    def run(self, count: int, *, timeout: float) -> int:
        started = time.monotonic()
        ids, duplicates = self._enqueue(count)
        records = self._follow(ids, timeout)
        created = all(r["state"] == JobState.CREATED for r in records.values())
        modes: dict[str, str] = {}
        if self.sandbox is not None and created:
            modes = self._pay(records)
            records = self._follow_payments(ids, started + timeout)
        self._report(records, duplicates, modes)
        if not all(r["state"] in FINAL_STATES for r in records.values()):
            return 1
        return 0 if all(r.get("invoice_status") in SETTLED for r in records.values()) else 1

    def _pay(self, records: dict[str, dict[str, Any]]) -> dict[str, str]:
        """Play the payer on each invoice page (the buttons' admin twin), callback faults on."""
        assert self.sandbox is not None
        self.sandbox.set_faults(CALLBACK_FAULTS)
        modes = {fid: payer_mode(n, len(records)) for n, fid in enumerate(records)}
        counts = {mode: list(modes.values()).count(mode) for mode in dict.fromkeys(modes.values())}
        print(
            "\ndemo: the payer acts on each invoice page: "
            + ", ".join(f"{n} {_MODE_TEXT[mode]}" for mode, n in counts.items())
            + "; callbacks sent twice or out of order now and then"
        )
        for fid, mode in modes.items():
            self.sandbox.pay(records[fid]["provider_foreign_id"], mode)
        return modes

    def _follow_payments(self, ids: list[str], deadline: float) -> dict[str, dict[str, Any]]:
        store, last = self.producer.store, ""
        while True:
            pipe = store.redis.pipeline(transaction=False)
            for fid in ids:
                pipe.hmget(store.key(fid), "invoice_status", "status")
            statuses = [a or b or "?" for a, b in pipe.execute()]
            counts = {s: statuses.count(s) for s in (*InvoiceStatus, "?") if statuses.count(s)}
            done = sum(counts.get(s, 0) for s in SETTLED)
            bar = "#" * (30 * done // len(ids)) + "." * (30 - 30 * done // len(ids))
            line = f"[{bar}] {done}/{len(ids)} settled  " + "  ".join(
                f"{k} {v}" for k, v in counts.items()
            )
            if line != last:
                print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", flush=True)
                last = line
            if done == len(ids) or time.monotonic() > deadline:
                if self.tty:
                    print()
                return {fid: _as_dict(self.producer.get(fid)) for fid in ids}
            time.sleep(0.1)

    def _enqueue(self, count: int) -> tuple[list[str], int]:
        print(f"\ndemo: enqueueing {count} invoices (every 4th twice; faults injected into some)")
        ids, duplicates = [], 0
        for n in range(1, count + 1):
            data = demo_request(self.run_id, n)
            if self.sandbox is not None and n in DEMO_FAULTS:
                self.sandbox.script(DEMO_FAULTS[n], foreign_id=data["foreign_id"])
            first = self.producer.enqueue(data).to_dict()
            ids.append(first["foreign_id"])
            if n % 4 == 0:
                again = self.producer.enqueue(data).to_dict()
                duplicates += again["task_id"] == first["task_id"]
        bad = {
            **demo_request(self.run_id, 0),
            "foreign_id": "order-jane@example.com",
            "amount": "-1",
        }
        try:
            self.producer.enqueue(bad)
        except InvalidRequestError as exc:
            print(f"demo: rejected one invalid request, as it should be:\n      {exc}")
        try:
            self.producer.enqueue({**demo_request(self.run_id, 1), "amount": "9.99"})
        except ConflictError as exc:
            print(f"demo: rejected a conflicting reuse of a foreign_id: {exc}")
        return ids, duplicates

    def _follow(self, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            # One pipelined read of the states per refresh; the records only once, at the end.
            counts: dict[str, int] = {s: 0 for s in JobState}
            for state in self.producer.store.states(ids):
                counts[state or "?"] = counts.get(state or "?", 0) + 1
            done = sum(counts[s] for s in FINAL_STATES)
            bar = "#" * (30 * done // len(ids)) + "." * (30 - 30 * done // len(ids))
            line = f"[{bar}] {done}/{len(ids)}  " + "  ".join(
                f"{k} {v}" for k, v in counts.items() if v
            )
            if line != last:
                print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", flush=True)
                last = line
            if done == len(ids) or time.monotonic() > deadline or not self.worker.alive:
                if self.tty:
                    print()
                return {fid: _as_dict(self.producer.get(fid)) for fid in ids}
            time.sleep(0.1)

    def _report(
        self, records: dict[str, dict[str, Any]], duplicates: int, modes: dict[str, str]
    ) -> None:
        print(f"\n{'foreign_id':<22} {'state':<8} {'invoice':<10} {'tries':>5}  url / error")
        for fid, r in records.items():
            detail = r.get("url") or f"{r.get('error_code')}: {r.get('error')}"
            invoice = r.get("invoice_status", "")
            print(f"{fid:<22} {r['state']:<8} {invoice:<10} {r.get('attempts', 0):>5}  {detail}")
        states = [r["state"] for r in records.values()]
        summary = ", ".join(
            f"{states.count(s)} {s}"
            for s in (JobState.CREATED, JobState.FAILED, JobState.EXPIRED)
            if states.count(s)
        )
        print(
            f"\nsummary: {len(records)} jobs: {summary}; {duplicates} duplicate enqueues absorbed"
        )
        retries = sum(r.get("attempts", 1) - 1 for r in records.values())
        recreated = sum(1 for r in records.values() if r.get("generation"))
        line = f"         {retries} retries, {recreated} orphaned invoices cancelled and recreated"
        if self.sandbox is not None:
            calls = sum(self.sandbox.create_calls(f) for f in records)
            live = sum(
                1
                for i in self.sandbox.invoices()
                if i["foreign_id"].startswith(f"demo-{self.run_id}") and not i["cancelled"]
            )
            line += (
                f"; provider: {calls} create calls, {live} live invoices for {len(records)} orders"
            )
        print(line)
        if modes:
            print(self._invoices_line(records, modes))

    def _invoices_line(self, records: dict[str, dict[str, Any]], modes: dict[str, str]) -> str:
        """How the invoices ended, and what the receiver made of the callbacks."""
        ended = [r.get("invoice_status") for r in records.values()]
        failed = [modes[fid] for fid, r in records.items() if r.get("invoice_status") == "failed"]
        reasons = ", ".join(
            f"{failed.count(mode)} {_MODE_TEXT[mode]}" for mode in dict.fromkeys(failed)
        )
        stats = self.producer.store.redis.hgetall(self.producer.store.stats)
        applied, duplicate = (int(stats.get(f"callbacks:{k}", 0)) for k in ("applied", "duplicate"))
        recorded = int(stats.get("callbacks:recorded", 0))
        return (
            f"invoices: {ended.count('confirmed')} confirmed, {ended.count('failed')} failed"
            + (f" ({reasons})" if reasons else "")
            + f"; callbacks: {applied} status changes applied, {recorded} without a change"
            f" (instalments, late ones), {duplicate} duplicates absorbed"
        )


_MODE_TEXT = {
    "full": "paid in full",
    "instalments": "paid in two instalments",
    "less": "paid less",
    "expire": "let expire",
}


def _as_dict(record: JobRecord | None) -> dict[str, Any]:
    return record.to_dict() if record is not None else {"state": "?"}
