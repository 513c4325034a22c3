"""The events stream, read as a consumer group: what a shop's order bookkeeping runs on.

Each event is handed to one consumer of the group (any number of web processes share the
work), and stays pending until that consumer acknowledges it, so a consumer that dies mid-event
does not lose it: after ``claim_idle`` seconds another consumer of the group (or the same one,
restarted under its name) claims it again (``XAUTOCLAIM``). Delivery is therefore at least
once, and a handler must be idempotent per event (an order marked paid twice is still paid).

A group starts at the beginning of the stream (``start="0"``), so events announced before the
shop's first consumer ran are not skipped; a group lost with a Redis failover that did not keep
it is created again the same way, and its consumers see old events once more (idempotent
handlers again). Entries this release cannot read (no ``foreign_id``, a ``kind`` of a later
release, trimmed away while pending) are acknowledged and logged, never handed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar

import redis

from invoice_worker.connection import async_redis_client, redis_client
from invoice_worker.constants import EventKind, InvoiceStatus, JobState
from invoice_worker.errors import ConfigError

if TYPE_CHECKING:
    import redis.asyncio

    from invoice_worker.config import Settings

log = logging.getLogger(__name__)

#: What ``run`` rides out (Redis restarting, failing over, a network blip): it waits, longer
#: each time up to ``RETRY_CAP`` seconds, and reads again; whatever was read but not
#: acknowledged comes back after ``claim_idle``.
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)
RETRY_CAP = 5.0


def _next_delay(delay: float, exc: Exception) -> float:
    delay = min(max(2 * delay, 0.5), RETRY_CAP)
    log.warning(
        "events stream unreachable (%s); reading again in %.1f s", type(exc).__name__, delay
    )
    return delay


@dataclass(frozen=True)
class Event:
    """One entry of the events stream (see the README's table for the fields of each kind)."""

    id: str
    kind: EventKind
    foreign_id: str
    fields: Mapping[str, str] = field(repr=False)

    @classmethod
    def parse(cls, entry_id: str, fields: Mapping[str, str] | None) -> Event | None:
        """The event of a stream entry, or None for one this release cannot read."""
        if not fields or not fields.get("foreign_id"):
            return None
        try:
            # Entries of releases before status events have no kind: they are job events.
            kind = EventKind(fields.get("kind", EventKind.JOB))
        except ValueError:
            return None
        return cls(entry_id, kind, fields["foreign_id"], dict(fields))

    @property
    def state(self) -> JobState | None:
        """The job's final state, for a job event."""
        value = self.fields.get("state", "") if self.kind is EventKind.JOB else ""
        return JobState(value) if value in set(JobState) else None

    @property
    def status(self) -> InvoiceStatus | None:
        """The invoice's new status, for a status event."""
        value = self.fields.get("status", "") if self.kind is EventKind.STATUS else ""
        return InvoiceStatus(value) if value in set(InvoiceStatus) else None

    @property
    def url(self) -> str | None:
        """The invoice URL of a ``created`` job event."""
        return self.fields.get("url") or None

    @property
    def error_code(self) -> str | None:
        """Why a job ended ``failed`` or ``expired``."""
        return self.fields.get("error_code") or None


@dataclass(frozen=True)
class Group:
    """Where a consumer reads: the stream, its group and this consumer's name in it."""

    stream: str
    name: str
    consumer: str
    #: Seconds an event may stay unacknowledged before another consumer takes it over.
    claim_idle: float = 60.0
    #: Where a new group starts reading: "0" the whole stream, "$" only what comes next.
    start: str = "0"

    def events(self, entries: Any) -> tuple[list[Event], list[str]]:
        """Split entries read for this group into events and ids to acknowledge unread."""
        events, unreadable = [], []
        for entry_id, fields in entries or []:
            event = Event.parse(entry_id, fields)
            if event is None:
                log.warning("skipped unreadable events entry %s", entry_id)
                unreadable.append(entry_id)
            else:
                events.append(event)
        return events, unreadable


def _stream_entries(reply: Any) -> Any:
    """The entries of an XREADGROUP reply on one stream (RESP2 list or RESP3 dict)."""
    if isinstance(reply, dict):
        return next(iter(reply.values()), [[]])[0]
    return reply[0][1] if reply else []


def _decoding(client: Any) -> Any:
    """``client``, if it decodes replies to str: from one that returns bytes, every entry
    would look unreadable and be acknowledged unhandled.

    Raises:
        ConfigError: a client made without ``decode_responses=True``.
    """
    if not client.get_connection_kwargs().get("decode_responses"):
        raise ConfigError("events consumer: the Redis client needs decode_responses=True")
    return client


@dataclass(frozen=True)
class Call:
    """One Redis command a :class:`Reader` asks its transport to run."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def on(self, client: Any) -> Any:
        """Run on ``client``: the reply, or for an asyncio client the awaitable of it."""
        return getattr(client, self.method)(*self.args, **self.kwargs)


#: What a Reader's steps are: commands out, their replies (or errors, thrown in) back.
Steps = Generator[Call, Any, list[Event]]


class Reader:
    """What one ``read`` does, as steps without I/O: the sync and the async consumer run the
    same steps, each on its own client (one implementation of the rules, two transports)."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self._claimed_at = float("-inf")
        self._cursor = "0-0"  # where the pass over the pending list goes on
        self._ready = False

    def read(self, count: int, block_ms: int) -> Steps:
        """Steps of a read; a group that has gone (NOGROUP) is created again, once."""
        try:
            return (yield from self._read(count, block_ms))
        except redis.ResponseError as exc:
            if not str(exc).startswith("NOGROUP"):
                raise
            self._ready = False  # deleted, or lost with a failover: make it again
            return (yield from self._read(count, block_ms))

    def _read(self, count: int, block_ms: int) -> Steps:
        g = self.group
        if not self._ready:
            try:
                yield Call("xgroup_create", (g.stream, g.name), {"id": g.start, "mkstream": True})
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._ready = True
        # Claiming scans the group's pending list (XAUTOCLAIM looks at 10 x count entries a
        # call): a pass a few times per claim_idle, each pass going on from where the last
        # call stopped until it has seen the whole list, so fresh entries at its front cannot
        # hide idle ones behind them.
        if self._cursor != "0-0" or time.monotonic() - self._claimed_at >= g.claim_idle / 4:
            if self._cursor == "0-0":
                self._claimed_at = time.monotonic()
            idle_ms = int(g.claim_idle * 1000)
            reply = yield Call(
                "xautoclaim",
                (g.stream, g.name, g.consumer, idle_ms, self._cursor),
                {"count": count},
            )
            self._cursor = reply[0]
            events = yield from self._readable(reply[1])
            if events:
                return events
        reply = yield Call("xreadgroup", (g.name, g.consumer, {g.stream: ">"}, count, block_ms))
        return (yield from self._readable(_stream_entries(reply)))

    def _readable(self, entries: Any) -> Steps:
        events, unreadable = self.group.events(entries)
        if unreadable:
            yield self.ack(unreadable)
        return events

    def ack(self, events: Iterable[Event | str]) -> Call:
        """The command acknowledging ``events`` (or entry ids)."""
        ids = [e.id if isinstance(e, Event) else e for e in events]
        return Call("xack", (self.group.stream, self.group.name, *ids))


def advance(steps: Steps, reply: Any, error: redis.ResponseError | None) -> Call | list[Event]:
    """Hand ``steps`` the last command's reply (or its error): the next command to run, or
    the read's events once it is done."""
    try:
        return steps.throw(error) if error else steps.send(reply)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


ClientT = TypeVar("ClientT")


class _Member(Generic[ClientT]):
    """What both consumers are: a member of one group, on a client of their kind."""

    #: How ``from_settings`` connects: the job store's Redis (Sentinel too).
    _connect: Callable[[Settings], ClientT]

    def __init__(
        self,
        client: ClientT,
        *,
        stream: str,
        group: str,
        consumer: str,
        claim_idle: float = 60.0,
        start: str = "0",
    ) -> None:
        self.redis: ClientT = _decoding(client)
        self.reader = Reader(Group(stream, group, consumer, claim_idle, start))

    @classmethod
    def from_settings(
        cls, settings: Settings, *, group: str, consumer: str, **options: Any
    ) -> Self:
        """A consumer of ``settings.events_stream`` on the job store's Redis."""
        stream = settings.events_stream
        client = cls._connect(settings)
        return cls(client, stream=stream, group=group, consumer=consumer, **options)


class EventConsumer(_Member["redis.Redis"]):
    """A consumer of the events stream in a consumer group, on a blocking Redis client.

    ``read`` returns up to ``count`` events: first those of dead consumers that waited longer
    than ``claim_idle``, then new ones; ``ack`` them once handled. ``run`` does both in a loop.
    """

    _connect = staticmethod(redis_client)

    def read(self, count: int = 100, block_ms: int = 5000) -> list[Event]:
        """Events for this consumer, waiting up to ``block_ms`` for new ones."""
        steps = self.reader.read(count, block_ms)
        step = advance(steps, None, None)
        while isinstance(step, Call):
            try:
                reply, error = step.on(self.redis), None
            except redis.ResponseError as exc:
                reply, error = None, exc
            step = advance(steps, reply, error)
        return step

    def ack(self, *events: Event | str) -> None:
        """Acknowledge handled events (or entry ids): they are not delivered again."""
        if events:
            self.reader.ack(events).on(self.redis)

    def run(
        self,
        handle: Callable[[Event], None],
        *,
        stop: threading.Event | None = None,
        block_ms: int = 1000,
    ) -> None:
        """Hand each event to ``handle`` and acknowledge it once ``handle`` returns, until
        ``stop`` is set. An event whose handler raises is logged and left pending: it comes
        back after ``claim_idle``. Redis unreachable: see ``UNREACHABLE``; any other error
        (a bug, a key of the wrong type) is raised."""
        stop, delay = stop or threading.Event(), 0.0
        while not stop.is_set():
            try:
                for event in self.read(block_ms=block_ms):
                    try:
                        handle(event)
                    except Exception:
                        log.exception("event %s of %s not handled", event.id, event.foreign_id)
                    else:
                        self.ack(event)
            except UNREACHABLE as exc:
                delay = _next_delay(delay, exc)
                stop.wait(delay)
            else:
                delay = 0.0

    def close(self) -> None:
        """Release the Redis connections."""
        self.redis.close()


class AsyncEventConsumer(_Member["redis.asyncio.Redis"]):
    """:class:`EventConsumer` for asyncio code, on a ``redis.asyncio`` client."""

    _connect = staticmethod(async_redis_client)

    async def read(self, count: int = 100, block_ms: int = 5000) -> list[Event]:
        """Events for this consumer, waiting up to ``block_ms`` for new ones."""
        steps = self.reader.read(count, block_ms)
        step = advance(steps, None, None)
        while isinstance(step, Call):
            try:
                reply, error = await step.on(self.redis), None
            except redis.ResponseError as exc:
                reply, error = None, exc
            step = advance(steps, reply, error)
        return step

    async def ack(self, *events: Event | str) -> None:
        """Acknowledge handled events (or entry ids): they are not delivered again."""
        if events:
            await self.reader.ack(events).on(self.redis)

    async def run(
        self,
        handle: Callable[[Event], Awaitable[None]],
        *,
        stop: asyncio.Event | None = None,
        block_ms: int = 1000,
    ) -> None:
        """As :meth:`EventConsumer.run`, awaiting ``handle``; cancel the task or set ``stop``."""
        stop, delay = stop or asyncio.Event(), 0.0
        while not stop.is_set():
            try:
                for event in await self.read(block_ms=block_ms):
                    try:
                        await handle(event)
                    except Exception:
                        log.exception("event %s of %s not handled", event.id, event.foreign_id)
                    else:
                        await self.ack(event)
            except UNREACHABLE as exc:
                delay = _next_delay(delay, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            else:
                delay = 0.0

    async def aclose(self) -> None:
        """Release the Redis connections."""
        await self.redis.aclose()
