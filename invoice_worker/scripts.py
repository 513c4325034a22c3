"""The Lua scripts of the job store (``lua/*.lua``), as Redis runs them, their arguments and
their answers (typed records: the store's results).

Each script opens by binding every KEYS and ARGV entry to a named local; on this side one frozen
dataclass per script lists the ARGV entries in the same order, so a call is built in one place.
The names both sides share (final states, key suffixes, the record fields an attempt reads)
are defined in Python and written into each script's header, never spelled twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
from redis.client import Pipeline
from redis.exceptions import NoScriptError

from invoice_worker import constants as c
from invoice_worker.config import Settings
from invoice_worker.constants import CallReport, Circuit, ClaimStatus, EventKind
from invoice_worker.record import JobRecord

#: Record fields a claimed attempt reads (the claim returns only these, not the whole record).
ATTEMPT_FIELDS = (
    "foreign_id", "state", "task_id", "attempts", "provider_foreign_id", "ambiguous", "generation",
    "deadline",
)  # fmt: skip


def lua_value(value: str | float) -> str:
    """A Lua literal: numbers as they are, strings quoted byte by byte (``\\ddd`` escapes for
    anything but plain printable ASCII, so no setting can break out of the string)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return repr(value)
    safe = (
        chr(b) if 32 <= b < 127 and chr(b) not in '\\"' else f"\\{b:03d}"
        for b in str(value).encode()
    )
    return '"' + "".join(safe) + '"'


def _lua_list(names: tuple[str, ...]) -> str:
    return "{" + ", ".join(lua_value(name) for name in names) + "}"


def load(name: str, conf: Mapping[str, str | float]) -> str:
    """A script as Redis runs it: a header with the shared names and this store's settings
    (``CONF``: constant per store, so calls do not carry them), the shared functions
    (``_lib.lua``), then the script itself."""
    finals = ", ".join(f"{state}=true" for state in sorted(c.FINAL_STATES))
    ranks = ", ".join(f"{status}={rank}" for status, rank in c.INVOICE_RANK.items())
    settings = ", ".join(f"{key}={lua_value(value)}" for key, value in sorted(conf.items()))
    header = (
        f"local FINAL = {{{finals}}}\n"
        f"local JOB_KEY, COPY_KEY = '{c.JOB_KEY}', '{c.COPY_KEY}'\n"
        f"local ATTEMPT_FIELDS = {_lua_list(ATTEMPT_FIELDS)}\n"
        f"local EVENT_FIELDS = {_lua_list(EVENT_FIELDS)}\n"
        f"local JOB_EVENT = {lua_value(EventKind.JOB)}\n"
        f"local INVOICE_RANK = {{{ranks}}}\n"
        f"local CONF = {{{settings}}}\n"
    )
    lua = resources.files("invoice_worker") / "lua"
    return header + (lua / "_lib.lua").read_text() + (lua / f"{name}.lua").read_text()


def script_conf(settings: Settings) -> dict[str, str | float]:
    """A store's settings as its scripts read them (``CONF`` in their header)."""
    rate = settings.provider_rate_limit
    return {
        "prefix": settings.key_prefix,
        "ttl_s": settings.record_ttl,
        "due_after_ms": settings.broker_visibility_timeout * 1000,
        "lease_ms": int(settings.lease * 1000),
        "max_crashes": settings.max_redeliveries,
        "max_wait_ms": int(settings.max_countdown * 1000),
        "interval_ms": 1000 / rate if rate else 0,
        "burst": settings.provider_burst,
        "threshold": settings.circuit_threshold,
        "window_ms": int(settings.circuit_window * 1000),
        "cooldown_ms": int(settings.circuit_cooldown * 1000),
        "probes": settings.circuit_probes,
        "stream_maxlen": settings.events_maxlen,
        "cleanup_horizon_s": int(settings.cleanup_horizon),
        "callback_ttl_s": settings.callback_ttl,
    }


def argv(args: Any) -> list[Any]:
    """A script's ARGV from its dataclass: fields in order (a dataclass instance keeps them in
    that order), a trailing tuple spread out."""
    out = list(vars(args).values())
    if out and isinstance(out[-1], tuple):
        out[-1:] = out[-1]
    return out


class Lua:
    """One store script on a sync client, sent as EVALSHA, loaded again after a NOSCRIPT (a
    restarted or newly promoted Redis).

    Sent as ``Redis.execute_command`` sends a command (a pooled connection, the client's retry
    policy, which disconnects before each retry) but without what redis-py 8 adds around it on
    every call: its OpenTelemetry hooks (operation duration, pool names, error counts) and
    response-callback lookup, 15 of 81 us a call in a loop (two calls a job). Those metrics
    are not recorded for the store's scripts; nothing here configures them. redis-py's
    ``Script.__call__`` also asks whether the client is a cluster pipeline (a Protocol check)
    on every call. On a pipeline the script is registered as redis-py does, for
    ``barrier.durably``.
    """

    def __init__(self, client: redis.Redis, source: str) -> None:
        self.client: Any = client  # redis-py leaves execute_command untyped
        self.script = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - Redis' script id

    def __call__(
        self, keys: Sequence[str], args: Sequence[Any], client: Pipeline | None = None
    ) -> Any:
        command = ("EVALSHA", self.sha, len(keys), *keys, *args)
        if client is not None:
            pipe: Any = client
            pipe.scripts.add(self)
            return pipe.execute_command(*command)
        try:
            return self._execute(command)
        except NoScriptError:
            self.client.script_load(self.script)
            return self._execute(command)

    def _execute(self, command: tuple[Any, ...]) -> Any:
        if self.client.connection is not None:  # a single-connection client: redis-py's lock
            return self.client.execute_command(*command)
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            return conn.retry.call_with_retry(
                lambda: _round_trip(conn, command), lambda _error: conn.disconnect()
            )
        finally:
            if conn.should_reconnect():  # a maintenance notice asked for it (redis-py does so)
                conn.disconnect()
            pool.release(conn)


def _round_trip(conn: Any, command: tuple[Any, ...]) -> Any:
    conn.send_command(*command)
    return conn.read_response()


@dataclass(frozen=True)
class EnqueueArgs:
    """ARGV of enqueue.lua, in order."""

    fingerprint: str
    task_id: str
    broker_message: str
    task_kwargs: str
    due_member: str
    new_fields: str  # fields_json()


@dataclass(frozen=True)
class ClaimArgs:
    """ARGV of claim.lua, in order."""

    owner: str
    fingerprint: str
    gated: int
    due_member: str
    task_kwargs: str
    new_fields: str  # fields_json(), written only with a record created here


@dataclass(frozen=True)
class TransitionArgs:
    """ARGV of transition.lua, in order."""

    owner: str
    op: str
    new_state: str
    mode: str
    delay_ms: int
    done_channel: str
    report: str
    pause_ms: int
    latency_bucket: str
    latency_ms: float
    due_member: str
    cleanup_in_ms: int
    foreign_id: str  # as the job's event names it
    fields: str  # fields_json(); a final's event takes EVENT_FIELDS from them


@dataclass(frozen=True)
class CallbackArgs:
    """ARGV of callback.lua, in order."""

    op: str
    invoice_id: str
    provider_id: str  # lower-cased, as the store keys ids
    generation: int  # -1: not an id we derive
    digest: str  # of the raw body
    raw_body: str
    identity: str  # (invoice id, status, transaction ids): what makes two callbacks one
    status: str
    error: str
    transactions: str  # JSON object by transaction id
    done_channel: str
    invoice_fields: tuple[str, ...]  # sent/received amounts, as field/value pairs


@dataclass(frozen=True)
class ReissueArgs:
    """ARGV of reissue.lua, in order."""

    replaces: int  # the generation whose failed invoice the caller saw
    provider_id: str  # derived id of the next generation
    task_id: str
    broker_message: str
    task_kwargs: str
    due_member: str
    deadline: str  # '' for none


#: What a job's event carries besides ``kind``, ``foreign_id`` and ``state``, in this order
#: when the final transition sets them (the stream schema; the README documents it, status
#: events included). transition.lua builds the event from the final's own fields.
EVENT_FIELDS = ("url", "invoice_id", "error_code", "error", "task_id", "attempts", "orphan")


def pairs(fields: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Field/value pairs as Redis stores them: None left out, JSON for containers, 1/0."""
    out = []
    for key, value in fields.items():
        if value is None:
            continue
        if type(value) is str:  # most of them: no conversion
            out.append((key, value))
            continue
        if isinstance(value, dict | list):
            value = json.dumps(value, separators=(",", ":"))
        elif isinstance(value, bool):
            value = int(value)
        out.append((key, str(value)))
    return out


def flatten(fields: Mapping[str, Any]) -> tuple[str, ...]:
    """``pairs`` spread into one argument tuple."""
    return tuple(item for pair in pairs(fields) for item in pair)


def fields_json(fields: Mapping[str, Any]) -> str:
    """``pairs`` as one JSON object of strings: a single script argument (field_list() in
    _lib.lua spreads it), far cheaper to send than one argument per field and value."""
    return json.dumps(dict(pairs(fields)), ensure_ascii=False, separators=(",", ":"))


def latency_bucket(latency: float) -> str:
    """The latency histogram bucket a call of ``latency`` seconds falls in."""
    for i, bound in enumerate(c.LATENCY_BUCKETS):
        if latency <= bound:
            return str(i)
    return "inf"


def record_of(raw: list[str]) -> JobRecord:
    """A record as the scripts return it: a flat field/value list."""
    return JobRecord.from_redis(dict(zip(raw[::2], raw[1::2], strict=True)))


@dataclass(frozen=True)
class NewJob:
    """A job to record as queued (and, with ``message``, to push onto ``queue`` atomically)."""

    foreign_id: str
    task_id: str
    fingerprint: str
    fields: dict[str, Any]
    kwargs: str  # the task kwargs as JSON, kept to send again if the message is lost
    message: str = ""
    queue: str = ""


@dataclass(frozen=True)
class Enqueued:
    """The outcome of one enqueue; ``record`` is None only for a conflict.

    ``resend`` is True when an existing job is still queued long after it was sent: its
    message may have been lost (a producer that died, a Redis that lost writes). ``durable``
    is False when the Barrier did not confirm the write in time.
    """

    new: bool
    record: JobRecord | None
    resend: bool = False
    durable: bool = True

    @classmethod
    def from_reply(cls, reply: list[Any], durable: bool) -> Enqueued:
        """Parse one enqueue.lua reply: status, then the record and the resend flag if any."""
        record = record_of(reply[1]) if len(reply) > 1 else None
        return cls(reply[0] == "new", record, len(reply) > 2 and bool(reply[2]), durable)


@dataclass(frozen=True)
class Claim:
    """What a worker learned when it tried to take a job.

    ``reason`` says why a ``deferred`` job waits (a DeferReason); ``circuit`` is the breaker's
    new state when this claim changed it (log it once).
    """

    status: ClaimStatus
    record: JobRecord | None
    wait: float = 0.0
    reason: str = ""
    circuit: Circuit | None = None
    #: False when the Barrier did not confirm the claim in time: do not call the provider.
    durable: bool = True


@dataclass(frozen=True)
class Moved:
    """A transition that happened: the final record (final states only) and the breaker's
    new state when this attempt's report changed it."""

    record: JobRecord | None
    circuit: Circuit | None = None
    #: A ``created`` final refused by the script: the record's deadline had passed.
    past_deadline: bool = False
    #: False when the Barrier did not confirm the write in time (a renewal: do not call the
    #: provider; a final: it stays staged, unseen, until someone publishes it).
    durable: bool = True


@dataclass(frozen=True)
class Report:
    """What an attempt says about the provider, for the whole fleet.

    ``pause``: seconds the fleet holds off after a 429. ``latency``: seconds spent in provider
    calls, for the latency histogram (None: no call was made).
    """

    outcome: CallReport = CallReport.NONE
    pause: float = 0.0
    latency: float | None = None
