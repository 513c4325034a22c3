"""The invariants a chaos run must keep, checked against Redis, the sandbox and the logs."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from invoice_worker.constants import DERIVED_SEPARATOR, Cleanup
from invoice_worker.record import JobRecord
from invoice_worker.sandbox.faults import HOSTILE
from invoice_worker.store import JobStore

FINAL = ("created", "failed", "expired")
# A final job may still have a live invoice while the sweeper retries its cancel, or once it
# gave up (a human must look): the record says so, and the run reports them apart.
LEFT_TO_CLEANUP = (Cleanup.PENDING, Cleanup.MAY_REMAIN)
LEASE_LOST = re.compile(r"\boutcome=lease_lost\b")
SIGNATURE = re.compile(r"\b[0-9a-f]{128}\b")
PAYER = re.compile(r"payer\d+@example\.com")


@dataclass
class Report:
    rows: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, name: str, value: object) -> None:
        self.rows.append((name, str(value)))

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)

    def table(self) -> str:
        width = max(len(name) for name, _ in self.rows)
        lines = [f"{name:<{width}}  {value}" for name, value in self.rows]
        lines.append(f"{'invariants':<{width}}  " + ("all hold" if not self.problems else "BROKEN"))
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def verify(
    *,
    store: JobStore,
    accepted: dict[str, str],
    conflicts: list[str],
    plan_conflicts: set[str],
    invoices: list[dict[str, Any]],
    create_calls: dict[str, int],
    logs: str,
    secret: str,
    counts: Counter[str],
    wall: float,
    producer_retries: int,
    outcomes: dict[str, int],
    shown: list[tuple[str, str]] | None = None,
    paid: dict[str, tuple[str, str]] | None = None,
    settled: float = 0.0,
) -> Report:
    report = Report()
    records = {fid: store.get(fid) for fid in accepted}
    states = Counter(str(r.state) if r else "missing" for r in records.values())
    live: dict[str, list[dict[str, Any]]] = {fid: [] for fid in accepted}
    for invoice in invoices:
        base = invoice["foreign_id"].split(DERIVED_SEPARATOR)[0]
        if base in live and not invoice["cancelled"]:
            live[base].append(invoice)
    every_event = store.events()
    events = Counter(e["foreign_id"] for _, e in every_event if e.get("kind", "job") == "job")

    report.add("jobs accepted", len(accepted))
    report.add("final states", ", ".join(f"{states[s]} {s}" for s in FINAL if states[s]) or "none")
    forgotten = sum(1 for r in records.values() if r is None)
    report.add("accepted jobs without a record (enqueue forgotten)", forgotten)
    stuck = [fid for fid, r in records.items() if not r or r.state not in FINAL]
    keep = ("state", "attempts", "deferred", "last_error_code", "next_attempt_at", "crashes")
    examples = [
        {"foreign_id": fid, **{k: getattr(records[fid], k, None) for k in keep}}
        for fid in stuck[:3]
    ]
    report.check(not stuck, f"{len(stuck)} jobs not final (lost or stuck), e.g. {examples}")
    wrong, left = [], []
    for fid, record in records.items():
        if record and record.state == "created":
            if not _holds(record, live[fid], accepted[fid]):
                wrong.append(fid)
        elif live[fid] and record and record.orphan in LEFT_TO_CLEANUP:
            left.append(fid)
        elif live[fid]:
            wrong.append(fid)
    evidence = [_evidence(fid, records[fid], live[fid]) for fid in wrong[:3]]
    report.check(
        not wrong, f"{len(wrong)} jobs without exactly one matching live invoice: {evidence}"
    )
    report.add("one matching live invoice per created job, none behind the others", not wrong)
    pending = Counter(r.orphan for r in records.values() if r and r.orphan in LEFT_TO_CLEANUP)
    report.add(
        "cleanups left (orphan=pending / may_remain)",
        f"{pending[Cleanup.PENDING]} / {pending[Cleanup.MAY_REMAIN]}",
    )
    report.add("final jobs whose live invoice is left to a cleanup", len(left))
    if left:
        report.add("  e.g.", [_evidence(fid, records[fid], live[fid]) for fid in left[:3]])
    expected = Counter(dict.fromkeys(plan_conflicts, 1))
    report.add("conflicting enqueues rejected", f"{len(conflicts)} of {len(plan_conflicts)}")
    report.check(
        Counter(conflicts) == expected, "conflicting enqueues not rejected exactly once each"
    )
    bad_events = [fid for fid in accepted if events[fid] != 1]
    report.add(
        "jobs with exactly one final event", f"{len(accepted) - len(bad_events)} of {len(accepted)}"
    )
    report.check(
        not bad_events, f"{len(bad_events)} jobs without exactly one event: {bad_events[:3]}"
    )
    if shown is not None:
        _check_shown(report, shown, invoices, records)
    done = [r for r in records.values() if r]
    calls = sum(create_calls.values())
    report.add("provider create calls", f"{calls} ({calls / max(1, len(accepted)):.2f} per job)")
    report.add("retries (attempts beyond the first)", sum(r.attempts - 1 for r in done))
    report.add("orphans cancelled and recreated", sum(1 for r in done if r.generation))
    report.add("redeliveries after a crash mid-job", sum(r.crashes for r in done))
    stats = store.redis.hgetall(store.stats)
    report.add("messages re-sent by the sweeper", stats.get("resent", 0))
    report.add("circuit opened", stats.get("circuit_opened", 0))
    # The last four happen only in some runs: shown when they did.
    disruptions = ("worker kills", "worker freezes", "provider outages")
    happened = ("receiver kills", "redis kills", "clean failovers", "failovers losing writes")
    for name in (*disruptions, *(name for name in happened if name in counts)):
        report.add(name, counts[name])
    report.add("attempts that found their lease lost", len(LEASE_LOST.findall(logs)))
    hostile = {name: outcomes.get(name, 0) for name in (*sorted(HOSTILE), "answer_huge")}
    detail = ", ".join(f"{n.removeprefix('answer_')} {k}" for n, k in hostile.items())
    report.add("hostile 200 answers injected", f"{sum(hostile.values())} ({detail})")
    report.add("trickled answers", outcomes.get("trickle", 0))
    report.add("producer retries while Redis was down", producer_retries)
    if paid is not None:
        _callbacks(report, store, records, paid, invoices, every_event)
        report.add("paid invoices settled after", f"{settled:.1f} s")
    report.add("wall time", f"{wall:.1f} s")
    report.add("throughput", f"{len(accepted) / wall:.1f} jobs/s")

    dumped = json.dumps([r.to_dict() for r in done]) + json.dumps([e for _, e in every_event])
    leaks = [
        name for name, found in (
            ("API secret in logs/records/events", secret in logs or secret in dumped),
            ("a signature in logs/records/events", bool(SIGNATURE.search(logs + dumped))),
            ("email_user in logs/records/events", bool(PAYER.search(logs + dumped))),
        ) if found
    ]  # fmt: skip
    report.add("secrets or personal data leaked", ", ".join(leaks) or "none")
    report.check(not leaks, f"leak: {leaks}")
    return report


#: The final status each payer action leads to.
EXPECTED = {"full": "confirmed", "instalments": "confirmed", "less": "failed", "expire": "failed"}


def _callbacks(
    report: Report,
    store: JobStore,
    records: dict[str, JobRecord | None],
    paid: dict[str, tuple[str, str]],
    invoices: list[dict[str, Any]],
    events: list[tuple[str, dict[str, str]]],
) -> None:
    """Every paid invoice's final status applied exactly once (record and one status event),
    and no status event twice for one invoice."""
    status_at_provider = {i["foreign_id"]: i["status"] for i in invoices}
    changes = Counter(
        (e["foreign_id"], e["generation"], e["status"]) for _, e in events if e["kind"] == "status"
    )
    modes = Counter(mode for _, mode in paid.values())
    report.add(
        "invoices paid", f"{len(paid)} (" + ", ".join(f"{n} {m}" for m, n in modes.items()) + ")"
    )
    wrong = []
    for fid, (provider_id, mode) in paid.items():
        record, final = records.get(fid), EXPECTED[mode]
        generation = str(record.generation if record else "?")
        if (
            record is None
            or record.invoice_status != final
            or status_at_provider.get(provider_id) != final
            or changes[fid, generation, final] != 1
        ):
            wrong.append(
                {"foreign_id": fid, "mode": mode, "record": record and record.invoice_status,
                 "provider": status_at_provider.get(provider_id),
                 "events": changes[fid, generation, final]}
            )  # fmt: skip
    report.add(
        "paid invoices whose final status was applied exactly once",
        f"{len(paid) - len(wrong)} of {len(paid)}",
    )
    report.check(not wrong, f"{len(wrong)} paid invoices not settled exactly once: {wrong[:3]}")
    twice = [key for key, n in changes.items() if n > 1]
    report.add("status events for a change already announced", len(twice))
    report.check(not twice, f"status changes announced twice: {twice[:3]}")
    stats: dict[str, str] = store.redis.hgetall(store.stats)  # type: ignore[assignment]
    names = ("applied", "recorded", "duplicate", "orphan", "history", "early", "unknown",
             "dead_letter")  # fmt: skip
    report.add(
        "callbacks (receiver's outcomes)",
        ", ".join(f"{name} {stats.get(f'callbacks:{name}', 0)}" for name in names),
    )
    refused = sum(int(v) for k, v in stats.items() if k.startswith("callbacks:refused:"))
    report.add("callbacks refused (bad signature fault)", refused)


def _check_shown(
    report: Report,
    shown: list[tuple[str, str]],
    invoices: list[dict[str, Any]],
    records: dict[str, JobRecord | None],
) -> None:
    """Every URL the shop read must stay the job's one live invoice."""
    live_urls = {i["url"] for i in invoices if not i["cancelled"]}
    taken_back = [
        (fid, url) for fid, url in shown
        if url not in live_urls or getattr(records.get(fid), "url", None) != url
    ]  # fmt: skip
    report.add("URLs the shop read", len(shown))
    report.add("  of them taken back (cancelled, replaced or forgotten)", len(taken_back))
    report.check(not taken_back, f"{len(taken_back)} URLs shown, then taken back: {taken_back[:3]}")


def _holds(record: JobRecord, live: list[dict[str, Any]], amount: str) -> bool:
    """The record of a created job names its one live invoice, at the amount enqueued."""
    if len(live) != 1:
        return False
    (invoice,) = live
    return (
        (record.url, record.invoice_id, record.currency) == (invoice["url"], invoice["id"], "BTC")
        and invoice["currency"] == "BTC"
        and Decimal(str(record.amount)) == Decimal(invoice["amount"]) == Decimal(amount)
    )


def _evidence(fid: str, record: JobRecord | None, live: list[dict[str, Any]]) -> dict[str, Any]:
    """What a reader needs to diagnose a job that broke the invariant (no personal data)."""
    keep = (
        "state", "provider_foreign_id", "generation", "invoice_id", "url", "amount", "currency",
        "attempts", "crashes", "ambiguous", "orphan", "error_code", "error",
    )  # fmt: skip
    shown = ("foreign_id", "id", "url", "amount", "currency", "status")
    return {
        "foreign_id": fid,
        "record": {k: getattr(record, k, None) for k in keep},
        "live": [{k: invoice[k] for k in shown} for invoice in live],
    }
