"""The results as a text table, a Markdown table, targets, JSON and a plot."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import plot
from bench.scenarios import Row

Key = tuple[str, int, int, float, bool, bool, int]


def _key(row: Row) -> Key:
    return (*row.config, row.round)


def _ideal(row: Row) -> float | None:
    """c / latency over all worker processes: what a pure I/O wait would allow."""
    slots = row.concurrency * row.processes
    return slots / (row.latency_ms / 1000) if row.latency_ms else None


def _pool(row: Row) -> str:
    pool = row.pool if row.processes == 1 else f"{row.pool} x{row.processes}"
    return f"{pool} pinned" if row.pinned else pool


def _pool_cell(res: Results, row: Row) -> str:
    """The table's pool column: which round, for a case run in rounds."""
    return f"{_pool(row)} #{row.round + 1}" if row.config in res.in_rounds else _pool(row)


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _quotient(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _ratio(a: float | None, b: float | None) -> str:
    q = _quotient(a, b)
    return "-" if q is None else f"{q:.2f}"


class Results:
    """Rows of one run, with the lookups the table and the targets need."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows
        self.by: dict[tuple[str, Key], Row] = {
            (r.kind, _key(r)): r for r in rows if r.group == "workers"
        }
        self.in_rounds = {r.config for r in rows if r.group == "workers" and r.round}

    def ref(self, row: Row, kind: str) -> Row | None:
        """The reference run of ``kind`` for ``row``'s configuration, if it finished."""
        ref = self.by.get((kind, _key(row)))
        return ref if ref is not None and ref.jobs_per_s > 0 and not ref.problems else None

    def workers(self) -> list[Row]:
        order = ["ours", "bare", "ceiling"]
        rows = [r for r in self.rows if r.group == "workers"]
        return sorted(
            rows,
            key=lambda r: (
                r.latency_ms, r.processes, r.pool, r.concurrency, r.pinned, r.round, not r.events,
                order.index(r.kind) if r.kind in order else len(order),
            ),
        )  # fmt: skip

    def producers(self) -> list[Row]:
        return [r for r in self.rows if r.group == "producer"]

    def durability(self, replicas: int) -> list[Row]:
        """The durability runs with INVOICE_REDIS_MIN_REPLICAS = ``replicas``, in run order."""
        return [r for r in self.rows if r.group == "durability" and r.replicas == replicas]

    def producer(self, kind: str, events: bool, path: str) -> Row | None:
        for row in self.producers():
            if row.kind == kind and row.events == events and row.pool == path:
                return row
        return None


WORKER_COLUMNS = (
    "provider", "pool", "c", "events", "kind", "jobs", "jobs/s", "ideal", "/bare", "/ceil",
    "p50 ms", "p95 ms", "p99 ms", "worker CPU", "/bare", "switches", "redis CPU", "prod CPU",
    "sandbox CPU",
    "machine", "other", "RSS MB", "calls/job", "ok",
)  # fmt: skip
PRODUCER_COLUMNS = (
    "mode", "path", "task-sent events", "jobs", "jobs/s", "/send_task", "producer CPU",
    "redis CPU", "other", "ok",
)  # fmt: skip


def worker_cells(res: Results, row: Row) -> list[str]:
    bare, ceil = res.ref(row, "bare"), res.ref(row, "ceiling")
    ideal = _ideal(row)
    mine = row.kind == "ours"
    return [
        f"{row.latency_ms:g} ms", _pool_cell(res, row), str(row.concurrency),
        "on" if row.events else "off",
        row.kind, str(row.jobs), _num(row.jobs_per_s), _num(ideal),
        _ratio(row.jobs_per_s, bare.jobs_per_s) if mine and bare else "",
        _ratio(row.jobs_per_s, ceil.jobs_per_s) if mine and ceil else "",
        _num(row.p50_ms), _num(row.p95_ms), _num(row.p99_ms), _num(row.worker_cpu_ms, 2),
        _ratio(row.worker_cpu_ms, bare.worker_cpu_ms) if mine and bare else "",
        _num(row.switches_per_job, 1), _num(row.redis_cpu_ms, 2), _num(row.producer_cpu_ms, 2),
        _num(row.sandbox_cpu_ms, 2),
        f"{row.machine_busy:.0%}", _num(row.other_cores, 2), _num(row.worker_rss_mb),
        _num(row.calls_per_job, 3),
        "ok" if not row.problems else "FAIL",
    ]  # fmt: skip


def producer_cells(res: Results, row: Row) -> list[str]:
    base = res.producer("send_task", row.events, "")
    return [
        row.kind, row.pool or "celery", "on" if row.events else "off", str(row.jobs),
        _num(row.jobs_per_s), _ratio(row.jobs_per_s, base.jobs_per_s) if base else "-",
        _num(row.producer_cpu_ms, 3), _num(row.redis_cpu_ms, 3), _num(row.other_cores, 2),
        "ok" if not row.problems else "FAIL",
    ]  # fmt: skip


DURABILITY_COLUMNS = (
    "N", "run", "jobs", "offered/s", "jobs/s", "p50 ms", "p99 ms", "enqueue p50", "enqueue p99",
    "N1/N0 p50", "worker CPU", "redis CPU", "unconfirmed", "machine", "other", "ok",
)  # fmt: skip
#: Fields of a durability row whose median over the runs of one N is reported.
MEDIANS = (
    "jobs_per_s", "p50_ms", "p95_ms", "p99_ms", "enqueue_p50_ms", "enqueue_p99_ms",
    "worker_cpu_ms", "redis_cpu_ms", "machine_busy", "other_cores",
)  # fmt: skip


def durability_medians(res: Results) -> dict[int, Row]:
    """Per N, one row holding the medians of its runs that passed their checks (jobs and
    ``unconfirmed`` summed, problems of every run kept)."""
    out = {}
    for n in sorted({r.replicas for r in res.rows if r.group == "durability"}):
        runs = res.durability(n)
        ok = [r for r in runs if not r.problems] or runs
        values: dict[str, Any] = {}
        for name in MEDIANS:
            measured = [v for r in ok if (v := getattr(r, name)) is not None]
            values[name] = statistics.median(measured) if measured else None
        out[n] = replace(
            runs[0], **values, jobs=sum(r.jobs for r in runs),
            unconfirmed=sum(r.unconfirmed for r in runs),
            problems=[p for r in runs for p in r.problems],
        )  # fmt: skip
    return out


def durability_lines(res: Results) -> list[list[str]]:
    """Each run in run order (N = 1 next to the N = 0 run of its round), then the medians."""
    zero = res.durability(0)
    lines = []
    for row in (r for r in res.rows if r.group == "durability"):
        nth = res.durability(row.replicas).index(row)
        base = zero[nth] if row.replicas and nth < len(zero) else None
        lines.append(_durability_cells(row, str(nth + 1), base))
    medians = durability_medians(res)
    for n, row in medians.items():
        lines.append(_durability_cells(row, "median", medians.get(0) if n else None))
    return lines


def _durability_cells(row: Row, run: str, base: Row | None) -> list[str]:
    return [
        str(row.replicas), run, str(row.jobs), _num(row.rate), _num(row.jobs_per_s),
        _num(row.p50_ms, 1), _num(row.p99_ms, 1), _num(row.enqueue_p50_ms, 2),
        _num(row.enqueue_p99_ms, 2), _ratio(row.p50_ms, base.p50_ms) if base else "",
        _num(row.worker_cpu_ms, 2), _num(row.redis_cpu_ms, 2), str(row.unconfirmed),
        f"{row.machine_busy:.0%}", _num(row.other_cores, 2), "ok" if not row.problems else "FAIL",
    ]  # fmt: skip


def text_table(columns: tuple[str, ...], lines: list[list[str]]) -> str:
    widths = [max([len(c), *(len(line[i]) for line in lines)]) for i, c in enumerate(columns)]
    out = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    out += ["  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(out)


def markdown_table(columns: tuple[str, ...], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(v or " " for v in line) + " |" for line in lines]
    return "\n".join(out)


def tables(res: Results, fmt: Callable[[tuple[str, ...], list[list[str]]], str]) -> str:
    parts = []
    if rows := [worker_cells(res, r) for r in res.workers()]:
        parts.append(fmt(WORKER_COLUMNS, rows))
    if rows := [producer_cells(res, r) for r in res.producers()]:
        parts.append(fmt(PRODUCER_COLUMNS, rows))
    if rows := durability_lines(res):
        parts.append(fmt(DURABILITY_COLUMNS, rows))
    return "\n\n".join(parts)


def knees(res: Results) -> dict[str, dict[str, Any]]:
    """Per pool, at the slow provider: the last concurrency still >= 0.9 x c/latency, the
    first below it, and the highest throughput measured."""
    out: dict[str, dict[str, Any]] = {}
    for row in res.workers():
        if row.kind != "ours" or not row.latency_ms:
            continue
        info = out.setdefault(_pool(row), {"linear_up_to": None, "below_at": None, "peak": 0.0})
        ideal = _ideal(row) or 1.0
        if row.jobs_per_s >= 0.9 * ideal and info["below_at"] is None:
            info["linear_up_to"] = row.concurrency
        elif row.jobs_per_s < 0.9 * ideal and info["below_at"] is None:
            info["below_at"] = row.concurrency
        info["peak"] = max(info["peak"], row.jobs_per_s)
    return out


def targets(res: Results) -> list[tuple[str, bool, str]]:
    """(target, held, measured) for every target of the issue that this run measured.

    A 0 ms case run in rounds (``bench.run.IN_ROUNDS``) is judged on the medians of its
    rounds' ratios, each ours run against the bare run of its round.
    """
    out: list[tuple[str, bool, str]] = []
    slow: list[tuple[str, bool, str]] = []
    rounds: dict[str, list[tuple[float, float | None]]] = {}  # 0 ms: name -> ratios per round
    for row in res.workers():
        bare = res.ref(row, "bare")
        if row.kind != "ours" or bare is None:
            continue
        name = f"{_pool(row)} -c {row.concurrency}, events {'on' if row.events else 'off'}"
        if not row.latency_ms:
            ratios = (
                row.jobs_per_s / bare.jobs_per_s,
                _quotient(row.worker_cpu_ms, bare.worker_cpu_ms),
            )
            rounds.setdefault(name, []).append(ratios)
        elif row.pool == "threads":
            ideal = _ideal(row) or 1.0
            if bare.jobs_per_s >= 0.9 * ideal:
                eff = row.jobs_per_s / ideal
                label = f"{row.latency_ms:g} ms {name}: jobs/s >= 0.9 x c/latency"
                slow.append((label, eff >= 0.9, f"{eff:.2f} (bare {bare.jobs_per_s / ideal:.2f})"))
    for name, runs in rounds.items():
        of = f", median of {len(runs)} rounds" if len(runs) > 1 else ""
        out += _cost_targets(f"0 ms {name}{of}", runs)
    out += slow
    for events in (False, True):
        mine, base = (
            res.producer("enqueue", events, "atomic"),
            res.producer("send_task", events, ""),
        )
        if mine and base and base.jobs_per_s:
            ratio = mine.jobs_per_s / base.jobs_per_s
            label = (
                f"enqueue >= 0.8 x send_task loop (task-sent events {'on' if events else 'off'})"
            )
            out.append((label, ratio >= 0.8, f"{ratio:.2f}"))
    for row in res.producers():
        if row.kind == "enqueue_many" and row.pool == "atomic":
            out.append(
                ("enqueue_many >= 10,000 jobs/s", row.jobs_per_s >= 10_000, _num(row.jobs_per_s))
            )
    return out


def _cost_targets(name: str, runs: list[tuple[float, float | None]]) -> list[tuple[str, bool, str]]:
    """The two 0 ms targets over ``runs`` of (throughput, CPU per job) ratios to bare Celery:
    their medians, and the range when there are several."""
    out: list[tuple[str, bool, str]] = []
    tput, cpu = [t for t, _ in runs], [c for _, c in runs if c is not None]
    for label, values, limit, at_least in (
        ("jobs/s >= 0.8 x bare", tput, 0.8, True),
        ("CPU/job <= 1.3 x bare", cpu, 1.3, False),
    ):
        if values:
            median = statistics.median(values)
            spread = f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""
            held = median >= limit if at_least else median <= limit
            out.append((f"{name}: {label}", held, f"{median:.2f}{spread}"))
    return out


def write_json(path: Path, meta: dict[str, Any], res: Results) -> None:
    data = {
        "meta": meta,
        "rows": [r.as_dict() for r in res.rows],
        "targets": [{"target": t, "held": ok, "measured": m} for t, ok, m in targets(res)],
        "knees": knees(res),
        "durability_medians": {f"N={n}": r.as_dict() for n, r in durability_medians(res).items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def load(path: Path) -> tuple[dict[str, Any], Results]:
    """Read a results file written by write_json."""
    data = json.loads(path.read_text())
    return data["meta"], Results([Row(**row) for row in data["rows"]])


def main(argv: list[str] | None = None) -> int:
    """Print the tables of a results file again and redraw its plot: no benchmark is run."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results", type=Path, help="e.g. bench/results/quick.json")
    parser.add_argument("--plot", type=Path, help="write the plot here")
    parser.add_argument("--markdown", action="store_true", help="tables as Markdown")
    args = parser.parse_args(argv)
    meta, res = load(args.results)
    print(tables(res, markdown_table if args.markdown else text_table))
    if args.plot:
        plot.draw(args.plot, res.workers(), plot.title(meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
