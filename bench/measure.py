"""Readings from /proc (CPU time of process groups, peak RSS, machine CPU) and statistics."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 is the state)."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text.rsplit(")", 1)[1].split()


def group_pids(pgid: int) -> list[int]:
    """Every live process in process group ``pgid`` (a worker and its pool children)."""
    pids = []
    for entry in PROC.iterdir():
        if entry.name.isdecimal():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[2]) == pgid:
                pids.append(int(entry.name))
    return pids


def _members(pid: int, group: bool) -> list[int]:
    """``pid`` alone, or every live process of its process group."""
    return group_pids(pid) if group else [pid]


def cpu_seconds(pid: int, *, group: bool = False) -> float:
    """User + system CPU of ``pid`` (with ``group``: of its whole process group, including
    children that already exited and were reaped by the leader)."""
    total = 0
    for member in _members(pid, group):
        fields = _stat_fields(member)
        if fields is None:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
        if member == pid:
            total += int(fields[13]) + int(fields[14])  # cutime, cstime: reaped children
    return total / TICK


def pin(pids: list[int], cpus: set[int]) -> None:
    """Run every thread of ``pids`` on ``cpus`` only. Threads a pinned thread starts later
    inherit it; the threads are listed again until a pass finds no new one, so one started by
    a thread not yet pinned during a pass is caught by the next."""
    done: set[int] = set()
    while True:
        found = {tid for pid in pids for tid in _threads(pid)} - done
        if not found:
            return
        for tid in found:
            with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                os.sched_setaffinity(tid, cpus)
        done |= found


def _threads(pid: int) -> list[int]:
    try:
        return [int(t.name) for t in (PROC / str(pid) / "task").iterdir()]
    except FileNotFoundError:
        return []


def _status_number(status: Path, key: str) -> int:
    """The number after ``key:`` in a /proc ``status`` file (0 when it or the process is gone)."""
    try:
        text = status.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for line in text.splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    return 0


def voluntary_switches(pid: int, *, group: bool = False) -> int:
    """Voluntary context switches so far of every live thread of ``pid`` (with ``group``: of
    its process group): a thread's sleeps on I/O, locks and the GIL."""
    return sum(
        _status_number(PROC / str(member) / "task" / str(tid) / "status", "voluntary_ctxt_switches")
        for member in _members(pid, group)
        for tid in _threads(member)
    )


def peak_rss_mb(pid: int, *, group: bool = False) -> float:
    """Sum of VmHWM (peak resident set) over ``pid`` or its process group, in MiB."""
    kb = sum(_status_number(PROC / str(m) / "status", "VmHWM") for m in _members(pid, group))
    return kb / 1024


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot, all cores."""
    values = [int(v) for v in (PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle, total


@dataclass
class CpuWindow:
    """CPU seconds and voluntary context switches of named processes, and the machine's busy
    share, between start() and stop() (switches of threads that end meanwhile are lost: fine
    for workers, whose pool threads live as long as they do)."""

    pids: dict[str, list[tuple[int, bool]]]  # name -> [(pid, whole group?)]
    start_switches: dict[str, float] = field(default_factory=dict)
    switches: dict[str, float] = field(default_factory=dict)
    start_cpu: dict[str, float] | None = None
    start_machine: tuple[int, int] | None = None
    cpu: dict[str, float] | None = None
    machine_busy: float = 0.0  # share of all cores, 0..1
    busy_seconds: float = 0.0  # CPU seconds used on the whole machine
    wall_seconds: float = 0.0

    def _sum(self, reading: Callable[..., float]) -> dict[str, float]:
        """``reading(pid, group=...)`` summed over each name's processes."""
        return {
            name: sum(reading(pid, group=group) for pid, group in members)
            for name, members in self.pids.items()
        }

    def start(self) -> None:
        self.start_switches = self._sum(voluntary_switches)
        self.start_cpu, self.start_machine = self._sum(cpu_seconds), machine_ticks()
        self.start_cpu["bench"] = cpu_seconds(os.getpid())

    def stop(self) -> None:
        assert self.start_cpu is not None
        assert self.start_machine is not None
        end = self._sum(cpu_seconds)
        self.cpu = {name: end[name] - self.start_cpu[name] for name in end}
        switches = self._sum(voluntary_switches)
        self.switches = {name: switches[name] - self.start_switches[name] for name in switches}
        busy, total = machine_ticks()
        span = total - self.start_machine[1]
        self.machine_busy = (busy - self.start_machine[0]) / span if span else 0.0
        self.busy_seconds = (busy - self.start_machine[0]) / TICK
        self.wall_seconds = span / TICK / (os.cpu_count() or 1)
        self.cpu["bench"] = cpu_seconds(os.getpid()) - self.start_cpu["bench"]

    def other_cores(self, reported: float = 0.0) -> float:
        """Cores used meanwhile by processes outside the benchmark (other users of the
        machine); ``reported`` is CPU that exited children measured themselves."""
        assert self.cpu is not None
        ours = sum(self.cpu.values()) + reported
        return (
            max(0.0, (self.busy_seconds - ours) / self.wall_seconds) if self.wall_seconds else 0.0
        )


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of already sorted ``values``; NaN if empty."""
    if not values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(values)))
    return values[min(rank, len(values)) - 1]


def per_job_ms(seconds: float | None, jobs: int) -> float | None:
    """CPU milliseconds per job, or None when not measured."""
    return None if seconds is None or not jobs else seconds * 1000 / jobs


def stream_ms(entry_id: str) -> int:
    """Redis time in milliseconds at which a stream entry was added (its id's first part)."""
    return int(entry_id.split("-", 1)[0])
