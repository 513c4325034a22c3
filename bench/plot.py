"""The benchmark's plot: throughput at a 0 ms provider per configuration, and throughput
against concurrency at the slow provider."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.scenarios import Row


def draw(path: Path, workers: list[Row], title: str) -> None:
    """Left: jobs/s at a 0 ms provider per configuration (ours, bare Celery, ceiling).
    Right: jobs/s vs concurrency at the slow provider per pool, with the c/latency line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in workers if not r.problems]  # a failed run has no throughput
    if not rows:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), width_ratios=(1, 1.3))
    _bars(left, [r for r in rows if not r.latency_ms])
    slow = [r for r in rows if r.latency_ms]
    if slow:
        _lines(right, slow, slow[0].latency_ms)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


KIND_STYLE = {"ours": "-o", "bare": "--s", "ceiling": ":^"}
KIND_COLOUR = {"ours": "tab:blue", "bare": "tab:gray", "ceiling": "tab:green"}
POOL_COLOUR = {"prefork": "tab:green", "threads": "tab:blue", "gevent": "tab:orange"}


def _bars(ax: Any, rows: list[Row]) -> None:
    configs = sorted({r.config for r in rows}, key=lambda k: (k[2], k[0], k[1], k[5], not k[4]))
    width = 0.8 / len(KIND_STYLE)
    for i, kind in enumerate(KIND_STYLE):
        by: dict[tuple[str, int, int, float, bool, bool], list[float]] = {}
        for r in rows:
            if r.kind == kind:
                by.setdefault(r.config, []).append(r.jobs_per_s)
        heights = [statistics.median(by[k]) if k in by else 0 for k in configs]  # of the rounds
        xs = [n + (i - 1) * width for n in range(len(configs))]
        ax.bar(xs, heights, width, label=kind, color=KIND_COLOUR[kind])
    labels = [
        f"{p}{f' x{n}' if n > 1 else ''} -c {c}{'' if ev else ', events off'}"
        f"{', pinned' if pin else ''}"
        for p, c, n, _, ev, pin in configs
    ]
    ax.set_xticks(range(len(configs)), labels, fontsize=7, rotation=35, ha="right")
    ax.set_ylabel("jobs/s")
    ax.set_title("provider latency 0 ms: cost per job (CPU-bound)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def _lines(ax: Any, rows: list[Row], latency: float) -> None:
    series = sorted({(r.pool, r.processes) for r in rows}, key=lambda s: (s[1], s[0]))
    for pool, procs in series:
        colour = POOL_COLOUR[pool] if procs == 1 else "tab:purple"
        for kind, style in KIND_STYLE.items():
            points = sorted(
                (r.concurrency, r.jobs_per_s)
                for r in rows
                if (r.pool, r.processes, r.kind, r.events) == (pool, procs, kind, True)
            )
            if points:
                xs, ys = zip(*points, strict=True)
                name = pool if procs == 1 else f"{pool} x{procs} processes"
                ax.plot(xs, ys, style, color=colour, label=f"{name} {kind}", alpha=0.9)
    cs = sorted({r.concurrency for r in rows})
    ax.plot(cs, [c / (latency / 1000) for c in cs], "k-", lw=0.8, label="c / latency (1 process)")
    multi = sorted({(r.concurrency, r.processes) for r in rows if r.processes > 1})
    if multi:
        ideal = [c * n / (latency / 1000) for c, n in multi]
        ax.plot([c for c, _ in multi], ideal, "kx", label="c x processes / latency")
    ax.set_xscale("log", base=2)
    ax.set_xticks(cs, [str(c) for c in cs])
    ax.set_xlabel("concurrency per worker process (prefork: pool processes)")
    ax.set_ylabel("jobs/s")
    ax.set_title(f"provider latency {latency:g} ms: concurrency (I/O-bound)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)


def title(meta: dict[str, Any]) -> str:
    """The plot's title: what ran, where."""
    commit = f" @ {meta['commit'][:7]}" if meta.get("commit") else ""
    commit += "+dirty" if meta.get("dirty") else ""
    return (
        f"invoice-worker{commit}, {meta['cores']} cores, Python {meta['python']}, "
        f"Celery {meta['celery_version']} ({meta['plan']} plan)"
    )
