"""The Lua scripts of the job store (``lua/*.lua``), as Redis runs them, and their arguments.

Each script opens by binding every KEYS and ARGV entry to a named local; on this side one frozen
dataclass per script lists the ARGV entries in the same order, so a call is built in one place.
The names both sides share (final states, key suffixes, the record fields an attempt reads)
are defined in Python and written into each script's header, never spelled twice.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from importlib import resources
from typing import Any

from invoice_worker import constants as c

#: Record fields a claimed attempt reads (the claim returns only these, not the whole record).
ATTEMPT_FIELDS = (
    "foreign_id", "state", "task_id", "attempts", "provider_foreign_id", "ambiguous", "generation",
)  # fmt: skip


def _lua_list(names: tuple[str, ...]) -> str:
    return "{" + ", ".join(f"'{name}'" for name in names) + "}"


def load(name: str) -> str:
    """A script as Redis runs it: the header with the shared names, the shared functions
    (``_lib.lua``), then the script itself."""
    finals = ", ".join(f"{state}=true" for state in sorted(c.FINAL_STATES))
    header = (
        f"local FINAL = {{{finals}}}\n"
        f"local JOB_KEY, COPY_KEY = '{c.JOB_KEY}', '{c.COPY_KEY}'\n"
        f"local ATTEMPT_FIELDS = {_lua_list(ATTEMPT_FIELDS)}\n"
    )
    lua = resources.files("invoice_worker") / "lua"
    return header + (lua / "_lib.lua").read_text() + (lua / f"{name}.lua").read_text()


def argv(args: Any) -> list[Any]:
    """A script's ARGV from its dataclass: fields in order, a trailing tuple spread out."""
    out: list[Any] = []
    for f in fields(args):
        value = getattr(args, f.name)
        out.extend(value) if isinstance(value, tuple) else out.append(value)
    return out


@dataclass(frozen=True)
class EnqueueArgs:
    """ARGV of enqueue.lua, in order."""

    fingerprint: str
    task_id: str
    ttl_s: int
    due_after_ms: int
    broker_message: str
    task_kwargs: str
    due_member: str
    new_fields: tuple[str, ...]


@dataclass(frozen=True)
class ClaimArgs:
    """ARGV of claim.lua, in order."""

    owner: str
    lease_ms: int
    fingerprint: str
    max_crashes: int
    ttl_s: int
    gated: int
    interval_ms: float
    burst: int
    threshold: int
    cooldown_ms: int
    probes: int
    due_after_ms: int
    due_member: str
    task_kwargs: str
    max_wait_ms: int
    new_fields: tuple[str, ...]


@dataclass(frozen=True)
class TransitionArgs:
    """ARGV of transition.lua, in order."""

    owner: str
    op: str
    new_state: str
    mode: str
    lease_ms: int
    delay_ms: int
    ttl_s: int
    stream_maxlen: int
    done_channel: str
    report: str
    pause_ms: int
    threshold: int
    window_ms: int
    cooldown_ms: int
    latency_bucket: str
    latency_ms: float
    due_after_ms: int
    due_member: str
    cleanup_in_ms: int
    n_fields: int
    fields_and_event: tuple[str, ...]
