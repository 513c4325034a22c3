"""The Redis job store: one hash per foreign_id, leases, atomic transitions and final events.

Every transition is one Lua script (one round trip, atomic). A worker holds a job only through
a lease (owner token + expiry read from Redis' own clock), and only the owner may move it on, so
a duplicate or redelivered message can never act on a job another worker is running.
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
from invoice_worker.config import Settings

_NOW = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"
_FINAL = "local final = {created=true, failed=true, expired=true}\n"

# KEYS: record, broker queue. ARGV: fingerprint, ttl_s, requeue_after_ms, message ('' when the
# caller sends it through Celery), field/value pairs for a new record.
# Returns {'new'} | {'conflict'} | {'exists', record, stale}. A new record and its message are
# written together: no crash can leave one without the other.
_ENQUEUE = (
    _NOW
    + """
local fp = redis.call('HGET', KEYS[1], 'fingerprint')
if fp then
  if fp ~= ARGV[1] then return {'conflict'} end
  local stale = 0
  local at = tonumber(redis.call('HGET', KEYS[1], 'enqueued_ms') or '0')
  if redis.call('HGET', KEYS[1], 'state') == 'queued' and now - at > tonumber(ARGV[3]) then
    redis.call('HSET', KEYS[1], 'enqueued_ms', now)
    stale = 1
  end
  return {'exists', redis.call('HGETALL', KEYS[1]), stale}
end
redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'state', 'queued', 'attempts', 0,
  'created_at', now / 1000, 'updated_at', now / 1000, 'enqueued_ms', now, unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[1], ARGV[2])
if ARGV[4] ~= '' then redis.call('LPUSH', KEYS[2], ARGV[4]) end
return {'new'}
"""
)

# KEYS: record. ARGV: owner, lease_ms, fingerprint, max_crashes, ttl_s, fields for a record the
# producer never wrote (a message sent straight to Celery).
# Returns {status, record, wait_ms}: claimed | poison | done | busy | early | conflict.
_CLAIM = (
    _NOW
    + _FINAL
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  redis.call('HSET', KEYS[1], 'fingerprint', ARGV[3], 'state', 'queued', 'attempts', 0,
    'created_at', now / 1000, 'enqueued_ms', now, unpack(ARGV, 6))
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  state = 'queued'
elseif redis.call('HGET', KEYS[1], 'fingerprint') ~= ARGV[3] then
  return {'conflict', {}, 0}
end
if final[state] then return {'done', redis.call('HGETALL', KEYS[1]), 0} end
local lease_until = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0')
if lease_until > now then
  if redis.call('HGET', KEYS[1], 'lease_owner') == ARGV[1] then
    return {'claimed', redis.call('HGETALL', KEYS[1]), 0}  -- a retried call that already ran
  end
  return {'busy', {}, lease_until - now}
end
local next_at = tonumber(redis.call('HGET', KEYS[1], 'next_attempt_ms') or '0')
if state == 'retrying' and next_at > now + 1000 then return {'early', {}, next_at - now} end
local status = 'claimed'
if state == 'processing' then
  -- the last holder vanished mid-attempt: its call may have reached the provider
  local crashes = redis.call('HINCRBY', KEYS[1], 'crashes', 1)
  redis.call('HSET', KEYS[1], 'ambiguous', 1)
  if crashes > tonumber(ARGV[4]) then status = 'poison' end
end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'state', 'processing', 'lease_owner', ARGV[1],
  'lease_until', now + tonumber(ARGV[2]), 'updated_at', now / 1000)
redis.call('HDEL', KEYS[1], 'next_attempt_ms', 'next_attempt_at')
return {status, redis.call('HGETALL', KEYS[1]), 0}
"""
)

# KEYS: record, events stream. ARGV: owner, state, mode (renew|release|final), lease_ms,
# delay_ms, ttl_s, maxlen, channel, n_fields, field/value pairs, then event field/value pairs.
# Returns 1 (the final record for a final state), or 0 when the caller no longer owns the job
# (nothing is written then).
_TRANSITION = (
    _NOW
    + _FINAL
    + """
if redis.call('HGET', KEYS[1], 'lease_owner') ~= ARGV[1] then return 0 end
if final[redis.call('HGET', KEYS[1], 'state')] then return 0 end
local n = tonumber(ARGV[9])
local fields = {}
for i = 10, 9 + n * 2 do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'updated_at', now / 1000, unpack(fields))
local mode = ARGV[3]
if mode == 'renew' then
  redis.call('HSET', KEYS[1], 'lease_until', now + tonumber(ARGV[4]))
else
  redis.call('HDEL', KEYS[1], 'lease_owner', 'lease_until')
end
local delay = tonumber(ARGV[5])
if delay >= 0 then
  local at = now + delay
  redis.call('HSET', KEYS[1], 'next_attempt_ms', at, 'next_attempt_at', at / 1000)
end
if mode == 'final' then
  local event = {}
  for i = 10 + n * 2, #ARGV do event[#event + 1] = ARGV[i] end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', unpack(event))
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  redis.call('PUBLISH', ARGV[8], ARGV[2])
  return redis.call('HGETALL', KEYS[1])
end
return 1
"""
)

# KEYS: record. ARGV: task_id. Undoes an enqueue whose message could not be sent.
_DISCARD = """
local state, task = unpack(redis.call('HMGET', KEYS[1], 'state', 'task_id'))
if state == 'queued' and task == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_INTERNAL = ("fingerprint", "lease_owner", "lease_until", "enqueued_ms", "next_attempt_ms")
_NUMERIC = {"attempts": int, "crashes": int, "invoice_id": int, "fixed_at": int, "release_at": int}
_FLOATS = ("created_at", "updated_at", "next_attempt_at", "deadline")


@dataclass(frozen=True)
class NewJob:
    """A job to record as queued (and, with ``message``, to push onto ``queue`` atomically)."""

    foreign_id: str
    fingerprint: str
    fields: dict[str, Any]
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
    """What a worker learned when it tried to take a job."""

    status: str
    record: dict[str, Any]
    wait: float = 0.0


class JobStore:
    """Job records in Redis under ``key_prefix``; every method is one round trip."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.prefix = settings.key_prefix
        self.stream = settings.events_stream
        self.maxlen = settings.events_maxlen
        self.ttl = settings.record_ttl
        self.requeue_after_ms = settings.broker_visibility_timeout * 1000
        self._enqueue = client.register_script(_ENQUEUE)
        self._claim = client.register_script(_CLAIM)
        self._transition = client.register_script(_TRANSITION)
        self._discard = client.register_script(_DISCARD)

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
            self._enqueue(
                keys=[self.key(job.foreign_id), job.queue],
                args=[job.fingerprint, self.ttl, self.requeue_after_ms, job.message, *pairs],
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
        self._discard(keys=[self.key(foreign_id)], args=[task_id])

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
    ) -> Claim:
        """Try to take the job for ``lease`` seconds (creating the record if none exists)."""
        pairs = _flatten(_with_id(foreign_id, fields))
        status, raw, wait_ms = self._claim(
            keys=[self.key(foreign_id)],
            args=[owner, int(lease * 1000), fingerprint, max_crashes, self.ttl, *pairs],
        )
        return Claim(status, _record(raw) if raw else {}, int(wait_ms) / 1000)

    def transition(
        self,
        foreign_id: str,
        owner: str,
        state: str,
        fields: dict[str, Any] | None = None,
        *,
        lease: float | None = None,
        delay: float | None = None,
    ) -> bool:
        """Move an owned job to a non-final ``state``; False if the lease was lost.

        ``lease`` renews the lease (the job stays held); otherwise it is released, and
        ``delay`` sets ``next_attempt_at``.
        """
        assert state not in c.FINAL_STATES, "use finish()"
        mode = "renew" if lease is not None else "release"
        return bool(self._run(foreign_id, owner, state, mode, fields, lease=lease, delay=delay))

    def finish(
        self, foreign_id: str, owner: str, state: str, fields: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Make an owned job final, append its event and announce it, in one atomic step.

        Returns:
            The final record, or None if the lease was lost (nothing is written then).
        """
        assert state in c.FINAL_STATES, state
        reply = self._run(foreign_id, owner, state, "final", fields)
        return _record(reply) if reply else None

    def _run(
        self,
        foreign_id: str,
        owner: str,
        state: str,
        mode: str,
        fields: dict[str, Any] | None,
        *,
        lease: float | None = None,
        delay: float | None = None,
    ) -> Any:
        fields = {k: v for k, v in (fields or {}).items() if v is not None}
        event = _event(foreign_id, state, fields) if mode == "final" else []
        pairs = _flatten(fields)
        args: list[str | int] = [owner, state, mode, int((lease or 0) * 1000)]
        args += [-1 if delay is None else int(delay * 1000), self.ttl, self.maxlen]
        args += [self.channel(foreign_id), len(pairs) // 2, *pairs, *event]
        return self._transition(keys=[self.key(foreign_id), self.stream], args=args)

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
