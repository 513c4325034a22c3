"""The invariants a chaos run must keep, checked against Redis, the sandbox and the logs."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from invoice_worker.store import JobStore

FINAL = ("created", "failed", "expired")
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
) -> Report:
    report = Report()
    records = {fid: store.get(fid) for fid in accepted}
    states = Counter(str(r.state) if r else "missing" for r in records.values())
    live: dict[str, list[dict[str, Any]]] = {fid: [] for fid in accepted}
    for invoice in invoices:
        base = invoice["foreign_id"].split("~r")[0]
        if base in live and not invoice["cancelled"]:
            live[base].append(invoice)
    events = Counter(e["foreign_id"] for _, e in store.events())

    report.add("jobs accepted", len(accepted))
    report.add("final states", ", ".join(f"{states[s]} {s}" for s in FINAL if states[s]) or "none")
    stuck = [fid for fid, r in records.items() if not r or r.state not in FINAL]
    keep = ("state", "attempts", "deferred", "last_error_code", "next_attempt_at", "crashes")
    examples = [
        {"foreign_id": fid, **{k: getattr(records[fid], k, None) for k in keep}}
        for fid in stuck[:3]
    ]
    report.check(not stuck, f"{len(stuck)} jobs not final (lost or stuck), e.g. {examples}")
    wrong = []
    for fid, record in records.items():
        if record and record.state == "created":
            ok = len(live[fid]) == 1 and live[fid][0]["url"] == record.url
            ok = ok and Decimal(str(record.amount)) == Decimal(accepted[fid])
            if not ok:
                wrong.append(fid)
        elif live[fid]:
            wrong.append(fid)
    report.check(
        not wrong, f"{len(wrong)} jobs without exactly one matching live invoice: {wrong[:3]}"
    )
    report.add("one live invoice per created job, URL and amount match", not wrong)
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
    done = [r for r in records.values() if r]
    calls = sum(create_calls.values())
    report.add("provider create calls", f"{calls} ({calls / max(1, len(accepted)):.2f} per job)")
    report.add("retries (attempts beyond the first)", sum(r.attempts - 1 for r in done))
    report.add("orphans cancelled and recreated", sum(1 for r in done if r.generation))
    report.add("redeliveries after a crash mid-job", sum(r.crashes for r in done))
    stats = store.redis.hgetall(store.stats)
    report.add("messages re-sent by the sweeper", stats.get("resent", 0))
    report.add("circuit opened", stats.get("circuit_opened", 0))
    for name in ("worker kills", "redis kills", "provider outages"):
        report.add(name, counts[name])
    report.add("producer retries while Redis was down", producer_retries)
    report.add("wall time", f"{wall:.1f} s")
    report.add("throughput", f"{len(accepted) / wall:.1f} jobs/s")

    dumped = json.dumps([r.to_dict() for r in done]) + json.dumps([e for _, e in store.events()])
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
