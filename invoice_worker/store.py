"""The Redis job store: one hash per foreign_id, leases, atomic transitions and final events.

Every transition is one Lua script (``lua/*.lua``: one round trip, atomic). A worker holds a job
only through a lease (owner token + expiry read from Redis' own clock), and only the owner may
move it on, so a duplicate or redelivered message can never act on a job another worker is
running. Each script is idempotent for its caller: redis-py re-sends a script whose reply was
lost, and the re-run answers what the first run did. The same scripts keep the fleet's view of
the provider (rate limit, 429 pause, circuit breaker) and the counters behind the metrics.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis
from redis.client import Pipeline

from invoice_worker import constants as c
from invoice_worker.barrier import Barrier, durably, find_barrier
from invoice_worker.config import Settings
from invoice_worker.connection import redis_client
from invoice_worker.constants import Circuit, ClaimStatus, DeferReason, JobState
from invoice_worker.keys import Keys
from invoice_worker.record import JobRecord
from invoice_worker.scripts import (
    Claim,
    ClaimArgs,
    Enqueued,
    Lua,
    Moved,
    NewJob,
    Report,
    TransitionArgs,
    argv,
    fields_json,
    flatten,
    latency_bucket,
    load,
    record_of,
    script_conf,
)


class JobStore(Keys):
    """Job records in Redis under ``key_prefix``; every method is one round trip."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        super().__init__(settings)
        self.redis = client
        self.settings = settings
        self.ttl = settings.record_ttl
        self.requeue_after_ms = settings.broker_visibility_timeout * 1000
        conf = script_conf(settings)
        # A random prefix, then a counter: uuid4 per call cost ~2 % of a busy worker's CPU.
        self._token_prefix = uuid.uuid4().hex[:12]
        self._tokens = itertools.count()
        self._barrier: Barrier | bool | None = False  # False: not looked up yet
        self._enqueue = Lua(client, load("enqueue", conf))
        self._claim = Lua(client, load("claim", conf))
        self._transition = Lua(client, load("transition", conf))
        self._discard = Lua(client, load("discard", conf))
        self._sweep = Lua(client, load("sweep", conf))
        self._cleanup = Lua(client, load("cleanup", conf))
        self._mark = Lua(client, load("mark", conf))

    @classmethod
    def from_settings(cls, settings: Settings) -> JobStore:
        """Connect to ``settings.state_url``, directly or through Sentinel (connections are
        pooled and thread-safe; see invoice_worker.connection for the retry policy)."""
        return cls(redis_client(settings), settings)

    @property
    def barrier(self) -> Barrier | None:
        """This store's Barrier, or None when writes are acted on at once (looked up once)."""
        if self._barrier is False:
            self._barrier = find_barrier(self.redis, self.settings)
        return self._barrier  # type: ignore[return-value]

    def durably(self, write: Callable[[Pipeline], None]) -> tuple[list[Any], bool]:
        """``barrier.durably`` on this store's Barrier: the commands ``write`` queues, then the
        wait, in one round trip; returns their replies and whether they are durable."""
        return durably(self.redis, self.barrier, self.probe, write)

    def set_alias(self, provider_id: str, foreign_id: str) -> None:
        """Name the job of a hashed derived provider id, so its callbacks find it."""
        ttl = max(self.ttl, self.settings.callback_ttl)
        self.redis.set(self.alias(provider_id), foreign_id, ex=ttl)

    def enqueue(self, jobs: Sequence[NewJob]) -> list[Enqueued]:
        """Record each job as queued unless its foreign_id exists: one pipelined round trip.

        A job with a ``message`` has it pushed onto ``queue`` in the same atomic step.
        """

        def write(pipe: Pipeline) -> None:
            for job in jobs:
                keys, args = self.enqueue_call(job)
                self._enqueue(keys=keys, args=args, client=pipe)

        replies, durable = self.durably(write)
        return [Enqueued.from_reply(reply, durable) for reply in replies]

    def states(self, foreign_ids: Sequence[str]) -> list[JobState | None]:
        """The state of each job (None when unknown), in one pipelined round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for foreign_id in foreign_ids:
            pipe.hget(self.key(foreign_id), "state")
        return [JobState(s) if s else None for s in pipe.execute()]

    def discard(self, foreign_id: str, task_id: str) -> None:
        """Delete a still-queued record created by ``task_id`` (its message was never sent)."""
        keys, args = self.discard_call(foreign_id, task_id)
        self._discard(keys=keys, args=args)

    def sweep(self, queue_depth: int, limit: int = 100) -> list[tuple[str, str, dict[str, Any]]]:
        """Take the jobs whose message was lost: (foreign_id, task_id, task kwargs) each.

        A job is due when it should have moved on by now had its message survived, and only
        while the broker queue is empty (``queue_depth``, read from the broker); each one
        returned is not returned again for another broker redelivery delay.
        """
        args: list[str | int] = [limit, queue_depth]
        reply = self._sweep(keys=[self.due, self.stats, self._batch()], args=args)
        return [(reply[i], reply[i + 1], json.loads(reply[i + 2])) for i in range(0, len(reply), 3)]

    def take_cleanups(self, retry_after: float, limit: int = 20) -> list[tuple[str, str, int]]:
        """Due pending cleanups, each held for ``retry_after`` seconds by this caller:
        (foreign_id, provider_foreign_id, tries so far)."""
        args: list[str | int] = ["take", self.token(), int(retry_after * 1000), limit]
        reply = self._cleanup(keys=[self.cleanups, self.stats, self._batch()], args=args)
        return [(reply[i], reply[i + 1], int(reply[i + 2])) for i in range(0, len(reply), 3)]

    def settle_cleanup(
        self, foreign_id: str, outcome: c.Cleanup, *, retry_after: float, max_tries: int
    ) -> c.Cleanup:
        """Record how a cleanup's cancel went; returns the job's new ``orphan`` value."""
        args: list[str | int] = ["settle", self.token(), int(retry_after * 1000)]
        args += [self.member(foreign_id), str(outcome), max_tries]
        reply = self._cleanup(keys=[self.cleanups, self.stats, self._batch()], args=args)
        return c.Cleanup(reply)

    def token(self) -> str:
        """A token no other call (in any process) uses: for ops, batches and lease owners."""
        return f"{self._token_prefix}-{next(self._tokens)}"

    def _batch(self) -> str:
        """A fresh key for one script call's answer (kept for a re-run after a lost reply)."""
        return f"{self.prefix}{c.BATCH_KEY}{self.token()}"

    def get(self, foreign_id: str) -> JobRecord | None:
        """Return the record of ``foreign_id``, or None (also for a hash without a state)."""
        raw: dict[str, str] = self.redis.hgetall(self.key(foreign_id))  # type: ignore[assignment]
        return JobRecord.from_redis(raw) if raw.get("state") else None

    def claim(
        self,
        foreign_id: str,
        owner: str,
        *,
        fingerprint: str,
        fields: dict[str, Any],
        gated: bool = True,
        kwargs: str = "",
    ) -> Claim:
        """Try to take the job for a lease (creating the record if none exists), through the
        fleet gate unless ``gated`` is False (no provider call will follow): a 429 pause, an
        open circuit or the rate limit then defer it without using an attempt. ``kwargs``
        (JSON) is kept to send the job again should its message be lost. ``fields`` are
        written only with a record created here, which a gated claim without ``kwargs`` never
        does (it answers ``missing``): nearly every claim, so those skip their JSON."""
        creates = bool(kwargs) or not gated
        new_fields = fields_json({"foreign_id": foreign_id, **fields}) if creates else "{}"
        member = self.member(foreign_id)
        args = ClaimArgs(owner, fingerprint, int(gated), member, kwargs, new_fields)
        keys = [self.key(foreign_id), self.provider, self.stats, self.due, self.copy(foreign_id)]
        if self.barrier is None:
            reply, durable = self._claim(keys=keys, args=argv(args)), True
        else:
            [reply], durable = self.durably(
                lambda pipe: self._claim(keys=keys, args=argv(args), client=pipe)
            )
        status, raw, wait_ms, reason, circuit = reply
        return Claim(
            ClaimStatus(status),
            record_of(raw) if raw else None,
            float(wait_ms) / 1000,
            reason,
            Circuit(circuit) if circuit else None,
            durable,
        )

    def transition(
        self,
        foreign_id: str,
        owner: str,
        state: JobState,
        fields: Mapping[str, Any] | None = None,
        *,
        renew: bool = False,
        delay: float | None = None,
        report: Report | None = None,
    ) -> Moved | None:
        """Move an owned job to a non-final ``state``; None if the caller no longer holds it.

        ``renew`` renews the lease for ``settings.lease`` (the job stays held: also the fence
        before a provider call, so it passes the Barrier: see ``Moved.durable``); otherwise it
        is released, and ``delay`` sets ``next_attempt_at``.
        """
        assert not state.final, "use finish()"
        mode = "renew" if renew else "release"
        return self._run(foreign_id, owner, mode, state, fields, delay, report, None, durable=renew)

    def defer(
        self, foreign_id: str, owner: str, delay: float, report: Report | None, **fields: Any
    ) -> Moved | None:
        """Release a held job for ``delay`` seconds because a write of it was not durable in
        time (the provider was not called on it); recorded as ``deferred=not_durable`` and
        counted as that deferral, not as a retry."""
        values = {**fields, "deferred": DeferReason.NOT_DURABLE}
        moved = self._run(
            foreign_id, owner, "defer", JobState.RETRYING, values, delay, report, None
        )
        self.redis.hincrby(self.stats, f"deferrals:{DeferReason.NOT_DURABLE}", 1)
        return moved

    def finish(
        self,
        foreign_id: str,
        owner: str,
        state: JobState,
        fields: Mapping[str, Any] | None = None,
        report: Report | None = None,
        *,
        cleanup_in: float | None = None,
        wait: bool = True,
    ) -> Moved | None:
        """Make an owned job final, append its event and announce it, in one atomic step;
        with a Barrier (and ``wait``), in two: staged, durable, then published (see
        :meth:`publish`).

        ``cleanup_in`` schedules a retried cancel of the job's provider id (a pending cleanup).

        Returns:
            The final record, or None if the caller no longer holds the job (nothing is
            written then); a Moved without a record when the deadline had passed
            (``past_deadline``) or the staged outcome is not yet durable (``durable`` False:
            it stays staged, unseen, and the next claim publishes it).
        """
        assert state.final, state
        if self.barrier is None or not wait:
            return self._run(foreign_id, owner, "final", state, fields, None, report, cleanup_in)
        staged = self._run(
            foreign_id, owner, "stage", state, fields, None, report, cleanup_in, durable=True
        )
        if staged is None or staged.past_deadline or not staged.durable:
            return staged
        moved = self.publish(foreign_id, owner)
        if moved is None or moved.past_deadline:  # the deadline passed while it waited
            return moved
        return Moved(moved.record, staged.circuit)

    def publish(self, foreign_id: str, owner: str, *, again: bool = False) -> Moved | None:
        """Make a held job's staged outcome final: its event and announcement, as ``finish``
        does in one step. None if the caller no longer holds it or nothing is staged.

        ``again``: a staged outcome found by a claim, which may have been published (and read)
        before a failover took that back: the deadline no longer refuses it (transition.lua).
        """
        mode = "republish" if again else "publish"
        return self._run(foreign_id, owner, mode, None, None, None, None, None)

    def _run(
        self,
        foreign_id: str,
        owner: str,
        mode: str,
        state: JobState | None,
        fields: Mapping[str, Any] | None,
        delay: float | None,
        report: Report | None,
        cleanup_in: float | None,
        *,
        durable: bool = False,
    ) -> Moved | None:
        report = report or Report()
        latency = report.latency
        args = TransitionArgs(
            owner, self.token(), str(state or ""), mode,
            -1 if delay is None else int(delay * 1000), self.channel(foreign_id),
            str(report.outcome), int(report.pause * 1000),
            "" if latency is None else latency_bucket(latency), (latency or 0) * 1000,
            self.member(foreign_id), -1 if cleanup_in is None else int(cleanup_in * 1000),
            foreign_id, fields_json(fields or {}),
        )  # fmt: skip
        keys = [self.key(foreign_id), self.stream, self.provider, self.stats, self.due]
        keys += [self.copy(foreign_id), self.cleanups]
        held = True
        if durable and self.barrier is not None:
            [reply], held = self.durably(
                lambda pipe: self._transition(keys=keys, args=argv(args), client=pipe)
            )
        else:
            reply = self._transition(keys=keys, args=argv(args))
        if not reply[0]:
            return None
        if reply[0] == 2:
            return Moved(None, past_deadline=True)
        return Moved(
            record_of(reply[1]) if reply[1] else None,
            Circuit(reply[2]) if reply[2] else None,
            durable=held,
        )

    def mark(self, foreign_id: str, **fields: Any) -> bool:
        """Set bookkeeping fields that need no lease (e.g. ``callback_sent`` after a final);
        False when the record no longer exists (nothing is written then)."""
        return bool(self._mark(keys=[self.key(foreign_id)], args=list(flatten(fields))))

    def events(
        self, after: str = "0", *, count: int | None = None, block_ms: int | None = None
    ) -> list[tuple[str, dict[str, str]]]:
        """Read final events after stream id ``after`` (``block_ms`` waits for new ones)."""
        reply: Any = self.redis.xread({self.stream: after}, count=count, block=block_ms)
        return [(entry_id, fields) for _, entries in reply or [] for entry_id, fields in entries]

    def wait(
        self,
        foreign_id: str,
        timeout: float,
        until: Callable[[JobRecord], bool] = lambda record: record.final,
    ) -> JobRecord | None:
        """Block until the job is final (or ``until`` holds) or ``timeout`` passes; returns
        the record, or None if no job with that id exists by then. Final states and invoice
        status changes are announced on one channel."""
        deadline = time.monotonic() + timeout
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call, unused-ignore]
        try:
            # Subscribe before reading, so a final state set in between is not missed.
            pubsub.subscribe(self.channel(foreign_id))
            record = self.get(foreign_id)
            # An unknown job may still appear (a message sent without the producer).
            while record is None or not until(record):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if pubsub.get_message(timeout=left) is not None:
                    record = self.get(foreign_id)
            return record
        finally:
            pubsub.close()
