"""The Redis job store: one hash per foreign_id, leases, atomic transitions and final events.

Every transition is one Lua script (``scripts.py``: one round trip, atomic). A worker holds a job
only through a lease (owner token + expiry read from Redis' own clock), and only the owner may
move it on, so a duplicate or redelivered message can never act on a job another worker is
running. The same scripts keep the fleet's view of the provider (rate limit, 429 pause, circuit
breaker) and the counters behind the metrics, at no extra round trip.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from invoice_worker import constants as c
from invoice_worker import scripts
from invoice_worker.config import Settings

_INTERNAL = (
    "fingerprint", "lease_owner", "lease_until", "enqueued_ms", "next_attempt_ms", "slot_ms",
)  # fmt: skip
_NUMERIC = {"attempts": int, "crashes": int, "invoice_id": int, "fixed_at": int, "release_at": int}
_FLOATS = ("created_at", "updated_at", "next_attempt_at", "deadline")


@dataclass(frozen=True)
class NewJob:
    """A job to record as queued (and, with ``message``, to push onto ``queue`` atomically)."""

    foreign_id: str
    fingerprint: str
    fields: dict[str, Any]
    kwargs: str  # the task kwargs as JSON, kept to send again if the message is lost
    message: str = ""
    queue: str = ""


@dataclass(frozen=True)
class Enqueued:
    """The outcome of one enqueue: new | exists | conflict.

    ``resend`` is True when an existing job is still queued long after it was sent: its
    message may have been lost (a producer that died, a Redis that lost writes).
    """

    status: str
    record: dict[str, Any] | None
    resend: bool = False


@dataclass(frozen=True)
class Claim:
    """What a worker learned when it tried to take a job.

    ``reason`` says why a ``deferred`` job waits (rate_limited, provider_paused, circuit_open);
    ``circuit`` is the breaker's new state when this claim changed it (log it once).
    """

    status: str
    record: dict[str, Any]
    wait: float = 0.0
    reason: str = ""
    circuit: str = ""


@dataclass(frozen=True)
class Moved:
    """A transition that happened: the final record (final states only) and the breaker's
    new state when this attempt's report changed it."""

    record: dict[str, Any] | None
    circuit: str = ""


@dataclass(frozen=True)
class Report:
    """What an attempt says about the provider, for the whole fleet.

    ``outcome``: ok (it answered), failure (unreachable, 5xx, timeout), rate_limited (429), or
    empty when no call was made. ``pause``: seconds the fleet holds off after a 429.
    ``latency``: seconds spent in provider calls, for the latency histogram.
    """

    outcome: str = ""
    pause: float = 0.0
    latency: float | None = None


class JobStore:
    """Job records in Redis under ``key_prefix``; every method is one round trip."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.prefix = settings.key_prefix
        self.stream = settings.events_stream
        self.maxlen = settings.events_maxlen
        self.ttl = settings.record_ttl
        self.requeue_after_ms = settings.broker_visibility_timeout * 1000
        self.provider = f"{self.prefix}{c.PROVIDER_KEY}"
        self.stats = f"{self.prefix}{c.STATS_KEY}"
        self.due = f"{self.prefix}{c.DUE_KEY}"
        rate = settings.provider_rate_limit
        self.gate = [
            1000 / rate if rate else 0, settings.provider_burst, settings.circuit_threshold,
            int(settings.circuit_cooldown * 1000), settings.circuit_probes,
        ]  # fmt: skip
        self.breaker = [
            settings.circuit_threshold, int(settings.circuit_window * 1000),
            int(settings.circuit_cooldown * 1000),
        ]  # fmt: skip
        self._enqueue = client.register_script(scripts.ENQUEUE)
        self._claim = client.register_script(scripts.CLAIM)
        self._transition = client.register_script(scripts.TRANSITION)
        self._discard = client.register_script(scripts.DISCARD)
        self._sweep = client.register_script(scripts.SWEEP)

    @classmethod
    def from_settings(cls, settings: Settings) -> JobStore:
        """Connect to ``settings.state_url`` (connections are pooled and thread-safe)."""
        client = redis.Redis.from_url(
            settings.state_url,
            decode_responses=True,
            # Ride out a short Redis restart; a script re-run after a lost reply is safe
            # because every script is idempotent for the same owner.
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=5),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            health_check_interval=30,
        )
        return cls(client, settings)

    def key(self, foreign_id: str) -> str:
        """Return the record key of ``foreign_id``."""
        return f"{self.prefix}{c.JOB_KEY}{foreign_id}"

    def copy(self, foreign_id: str) -> str:
        """Return the key of the stored task kwargs of ``foreign_id``."""
        return f"{self.prefix}{c.COPY_KEY}{foreign_id}"

    def channel(self, foreign_id: str) -> str:
        """Return the pub/sub channel announcing the final state of ``foreign_id``."""
        return f"{self.prefix}{c.DONE_CHANNEL}{foreign_id}"

    def enqueue(self, jobs: Sequence[NewJob]) -> list[Enqueued]:
        """Record each job as queued unless its foreign_id exists: one pipelined round trip.

        A job with a ``message`` has it pushed onto ``queue`` in the same atomic step.
        """
        pipe = self.redis.pipeline(transaction=False)
        for job in jobs:
            pairs = _flatten(_with_id(job.foreign_id, job.fields))
            fid = job.foreign_id
            args: list[str | int] = [job.fingerprint, self.ttl, self.requeue_after_ms]
            args += [job.message, job.kwargs, fid]
            self._enqueue(
                keys=[self.key(fid), job.queue, self.stats, self.due, self.copy(fid)],
                args=[*args, *pairs],
                client=pipe,
            )
        return [
            Enqueued(
                r[0], _record(r[1]) if r[0] == "exists" else None, r[0] == "exists" and bool(r[2])
            )
            for r in pipe.execute()
        ]

    def states(self, foreign_ids: Sequence[str]) -> list[str | None]:
        """The state of each job (None when unknown), in one pipelined round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for foreign_id in foreign_ids:
            pipe.hget(self.key(foreign_id), "state")
        return list(pipe.execute())

    def discard(self, foreign_id: str, task_id: str) -> None:
        """Delete a still-queued record created by ``task_id`` (its message was never sent)."""
        keys = [self.key(foreign_id), self.stats, self.due, self.copy(foreign_id)]
        self._discard(keys=keys, args=[task_id, foreign_id])

    def sweep(self, queue: str, limit: int = 100) -> list[tuple[str, str, dict[str, Any]]]:
        """Take the jobs whose message was lost: (foreign_id, task_id, task kwargs) each.

        A job is due when it should have moved on by now had its message survived, and only
        while ``queue`` (the broker list) is empty; each one returned is not returned again for
        another broker redelivery delay.
        """
        keys = [self.due, self.stats, queue]
        reply = self._sweep(keys=keys, args=[self.prefix, limit, self.requeue_after_ms])
        return [(reply[i], reply[i + 1], json.loads(reply[i + 2])) for i in range(0, len(reply), 3)]

    def get(self, foreign_id: str) -> dict[str, Any] | None:
        """Return the public record of ``foreign_id``, or None."""
        raw: dict[str, str] = self.redis.hgetall(self.key(foreign_id))  # type: ignore[assignment]
        return _public(raw) if raw else None

    def claim(
        self,
        foreign_id: str,
        owner: str,
        *,
        lease: float,
        fingerprint: str,
        max_crashes: int,
        fields: dict[str, Any],
        gated: bool = True,
        kwargs: str = "",
    ) -> Claim:
        """Try to take the job for ``lease`` seconds (creating the record if none exists),
        through the fleet gate unless ``gated`` is False (no provider call will follow): a 429
        pause, an open circuit or the rate limit then defer it without using an attempt.
        ``kwargs`` (JSON) is kept to send the job again should its message be lost."""
        gate = [*self.gate, self.requeue_after_ms, foreign_id, kwargs]
        gate += _flatten(_with_id(foreign_id, fields))
        status, raw, wait_ms, reason, circuit = self._claim(
            keys=[self.key(foreign_id), self.provider, self.stats, self.due, self.copy(foreign_id)],
            args=[owner, int(lease * 1000), fingerprint, max_crashes, self.ttl, int(gated), *gate],
        )
        return Claim(status, _record(raw) if raw else {}, float(wait_ms) / 1000, reason, circuit)

    def transition(
        self,
        foreign_id: str,
        owner: str,
        state: str,
        fields: dict[str, Any] | None = None,
        *,
        lease: float | None = None,
        delay: float | None = None,
        report: Report | None = None,
    ) -> Moved | None:
        """Move an owned job to a non-final ``state``; None if the lease was lost.

        ``lease`` renews the lease (the job stays held); otherwise it is released, and
        ``delay`` sets ``next_attempt_at``.
        """
        assert state not in c.FINAL_STATES, "use finish()"
        mode = "renew" if lease is not None else "release"
        return self._run(foreign_id, owner, state, mode, fields, lease, delay, report)

    def finish(
        self,
        foreign_id: str,
        owner: str,
        state: str,
        fields: dict[str, Any] | None = None,
        report: Report | None = None,
    ) -> Moved | None:
        """Make an owned job final, append its event and announce it, in one atomic step.

        Returns:
            The final record, or None if the lease was lost (nothing is written then).
        """
        assert state in c.FINAL_STATES, state
        return self._run(foreign_id, owner, state, "final", fields, None, None, report)

    def _run(
        self,
        foreign_id: str,
        owner: str,
        state: str,
        mode: str,
        fields: dict[str, Any] | None,
        lease: float | None,
        delay: float | None,
        report: Report | None,
    ) -> Moved | None:
        report = report or Report()
        fields = {k: v for k, v in (fields or {}).items() if v is not None}
        event = _event(foreign_id, state, fields) if mode == "final" else []
        pairs = _flatten(fields)
        latency = report.latency
        bucket = "" if latency is None else _bucket(latency)
        args: list[str | int | float] = [owner, state, mode, int((lease or 0) * 1000)]
        args += [-1 if delay is None else int(delay * 1000), self.ttl, self.maxlen]
        args += [self.channel(foreign_id), report.outcome, int(report.pause * 1000), *self.breaker]
        args += [bucket, (latency or 0) * 1000, self.requeue_after_ms, foreign_id]
        args += [len(pairs) // 2, *pairs, *event]
        keys = [self.key(foreign_id), self.stream, self.provider, self.stats, self.due]
        keys.append(self.copy(foreign_id))
        reply = self._transition(keys=keys, args=args)
        if not reply[0]:
            return None
        return Moved(_record(reply[1]) if reply[1] else None, reply[2])

    def mark(self, foreign_id: str, **fields: Any) -> None:
        """Set bookkeeping fields that need no lease (e.g. ``callback_sent`` after a final)."""
        self.redis.hset(self.key(foreign_id), mapping=dict(_pairs(fields)))

    def events(
        self, after: str = "0", *, count: int | None = None, block_ms: int | None = None
    ) -> list[tuple[str, dict[str, str]]]:
        """Read final events after stream id ``after`` (``block_ms`` waits for new ones)."""
        reply: Any = self.redis.xread({self.stream: after}, count=count, block=block_ms)
        return [(entry_id, fields) for _, entries in reply or [] for entry_id, fields in entries]

    def wait(self, foreign_id: str, timeout: float) -> dict[str, Any] | None:
        """Block until the job is final or ``timeout`` passes; returns the record, or None if
        no job with that id exists by then."""
        deadline = time.monotonic() + timeout
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        try:
            # Subscribe before reading, so a final state set in between is not missed.
            pubsub.subscribe(self.channel(foreign_id))
            record = self.get(foreign_id)
            # An unknown job may still appear (a message sent without the producer).
            while record is None or record["state"] not in c.FINAL_STATES:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if pubsub.get_message(timeout=left) is not None:
                    record = self.get(foreign_id)
            return record
        finally:
            pubsub.close()


def _pairs(fields: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, dict | list):
            value = json.dumps(value, separators=(",", ":"))
        elif isinstance(value, bool):
            value = int(value)
        out.append((key, str(value)))
    return out


def _with_id(foreign_id: str, fields: dict[str, Any]) -> dict[str, Any]:
    return {"foreign_id": foreign_id, **fields}


def _flatten(fields: dict[str, Any]) -> list[str]:
    return [item for pair in _pairs(fields) for item in pair]


def _event(foreign_id: str, state: str, fields: dict[str, Any]) -> list[str]:
    keep = ("url", "invoice_id", "error_code", "error", "task_id", "attempts")
    return _flatten({"foreign_id": foreign_id, "state": state, **{k: fields.get(k) for k in keep}})


def _bucket(latency: float) -> str:
    for i, bound in enumerate(c.LATENCY_BUCKETS):
        if latency <= bound:
            return str(i)
    return "inf"


def _record(raw: list[str]) -> dict[str, Any]:
    return _public(dict(zip(raw[::2], raw[1::2], strict=True)))


def _public(raw: dict[str, str]) -> dict[str, Any]:
    """Drop internal bookkeeping and give numbers their types."""
    out: dict[str, Any] = {k: v for k, v in raw.items() if k not in _INTERNAL}
    for key, kind in _NUMERIC.items():
        if key in out:
            out[key] = kind(out[key])
    for key in _FLOATS:
        if key in out:
            out[key] = float(out[key])
    if "errors" in out:
        out["errors"] = json.loads(out["errors"])
    out["ambiguous"] = out.get("ambiguous") == "1"
    return out
