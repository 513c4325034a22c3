"""What an asyncio web app imports (FastAPI, Starlette, aiohttp): the producer on ``redis.asyncio``.

``AsyncProducer`` keeps the sync Producer's rules (``invoice_worker.enqueue``: validation,
idempotency per foreign_id, the atomic enqueue script, the Barrier, results and errors); only
the I/O differs, and one thing is added: enqueues made in the same turn of the event loop share
one pipelined round trip (each job's script still runs alone, so each behaves exactly as if
sent by itself). Broker and state in one Redis: record and message in one script call, as in
the sync path. Otherwise (RabbitMQ, another Redis) the records are written here and the
messages published through Celery, whose publish blocks: it runs in a thread
(``asyncio.to_thread``), and a publish that fails discards the records it just created, as the
sync path does. A cancelled enqueue may still have been written (and sent) with its round trip,
never half of it; enqueueing the same request again returns that record and sends nothing twice.

``redis.asyncio`` connections belong to the event loop that opened them, so the module-level
coroutines keep one default AsyncProducer per running loop, built from ``Settings.load()`` on
first use there and closed when that loop shuts down (``asyncio.run`` and uvicorn finalize
async generators on the way out) or by :func:`aclose_default`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence

import redis
import redis.asyncio
from celery import Celery
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError

from invoice_worker.app import create_app
from invoice_worker.barrier import NO_WAITAOF, Barrier, check_aof, settle, wanted_barrier
from invoice_worker.config import Settings
from invoice_worker.connection import async_redis_client
from invoice_worker.enqueue import (
    Deadline,
    Outcome,
    Request,
    Result,
    Routes,
    Send,
    is_atomic,
    new_job,
    one,
    publish,
    refused_for_want_of_replicas,
    status_in,
    task_message,
    task_messages,
)
from invoice_worker.errors import ConfigError, ConflictError
from invoice_worker.keys import Keys
from invoice_worker.message import TaskMessage
from invoice_worker.record import JobRecord
from invoice_worker.scripts import Enqueued, NewJob, load, script_conf

#: Round trips one AsyncProducer has in flight at once (enqueue, get, discard); more wait their
#: turn here. Redis runs commands one at a time, so beyond a few dozen connections more only
#: add connection churn; ``redis.asyncio``'s pool would refuse them past its size instead.
MAX_IN_FLIGHT = 64
#: Jobs in one coalesced pipeline at most (a round trip's reply stays a few hundred KB).
MAX_PIPELINE = 1000
#: The client's pool size: the round trips above, plus one connection per wait in progress
#: (a wait holds its subscription until the job is final or the timeout passes).
MAX_CONNECTIONS = 2048


_Answer = asyncio.Future[list[Enqueued]]


class AsyncJobStore(Keys):
    """The part of ``store.JobStore`` a producer needs, on ``redis.asyncio``: the same scripts
    and keys, the same pipelined call with the Barrier after it."""

    def __init__(self, client: redis.asyncio.Redis, settings: Settings) -> None:
        super().__init__(settings)
        self.redis = client
        self.settings = settings
        conf = script_conf(settings)
        self._enqueue = client.register_script(load("enqueue", conf))
        self._discard = client.register_script(load("discard", conf))
        self._barrier: Barrier | bool | None = False  # False: not looked up yet
        self._turns = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._pending: list[tuple[Sequence[NewJob], _Answer]] = []  # enqueues of this turn
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def from_settings(cls, settings: Settings) -> AsyncJobStore:
        """Connect to ``settings.state_url`` (any form ``invoice_worker.connection`` takes)."""
        return cls(async_redis_client(settings, max_connections=MAX_CONNECTIONS), settings)

    async def barrier(self) -> Barrier | None:
        """As ``JobStore.barrier`` (looked up once).

        Raises:
            ConfigError: as ``barrier.find_barrier``.
        """
        if self._barrier is False:
            barrier = wanted_barrier(self.settings)
            if barrier is not None and barrier.aof:
                try:
                    await self.redis.execute_command("WAITAOF", 0, 0, 0)  # type: ignore[no-untyped-call]
                except redis.ResponseError:
                    raise ConfigError(NO_WAITAOF) from None
                check_aof(await self.redis.info("persistence"))
            self._barrier = barrier
        return self._barrier  # type: ignore[return-value]

    async def enqueue(self, jobs: Sequence[NewJob]) -> list[Enqueued]:
        """As ``JobStore.enqueue``; calls made in the same turn of the event loop share one
        pipelined round trip (1,000 enqueues gathered at once are a few pipelines, not
        1,000): each job's script runs alone as ever, and the Barrier's wait covers them all.
        """
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[list[Enqueued]] = loop.create_future()
        self._pending.append((jobs, answer))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        return await answer

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        batch: list[tuple[Sequence[NewJob], _Answer]] = []
        size = 0
        for n, item in enumerate(pending, start=1):
            batch.append(item)
            size += len(item[0])
            if size >= MAX_PIPELINE or n == len(pending):
                task = asyncio.create_task(self._send_batch(batch))
                self._tasks.add(task)  # the loop keeps only a weak reference
                task.add_done_callback(self._tasks.discard)
                batch, size = [], 0

    async def _send_batch(self, batch: list[tuple[Sequence[NewJob], _Answer]]) -> None:
        try:
            replies = await self._round_trip([job for jobs, _ in batch for job in jobs])
        except BaseException as exc:
            for _, answer in batch:
                if answer.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    answer.cancel()
                else:
                    answer.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        start = 0
        for jobs, answer in batch:
            mine, start = replies[start : start + len(jobs)], start + len(jobs)
            # A script's error (WRONGTYPE, NOREPLICAS) is its own caller's, not the batch's.
            error = next((r for r in mine if isinstance(r, Exception)), None)
            if answer.done():  # a caller that was cancelled meanwhile
                continue
            answer.set_exception(error) if error else answer.set_result(mine)  # type: ignore[arg-type]

    async def _round_trip(self, jobs: Sequence[NewJob]) -> list[Enqueued | Exception]:
        """The script sent as plain EVALSHA (no SCRIPT EXISTS first; on NOSCRIPT it is loaded
        and the pipeline run again, which the script answers as it did the first time), then
        the Barrier's wait, in one round trip; a job's error is its reply."""
        barrier = await self.barrier()
        async with self._turns:
            replies = await self._pipeline(jobs, barrier).execute(raise_on_error=False)
            if any(isinstance(reply, NoScriptError) for reply in replies):
                await self.redis.script_load(self._enqueue.script)
                replies = await self._pipeline(jobs, barrier).execute(raise_on_error=False)
        if errors := [r for r in replies[len(jobs) :] if isinstance(r, Exception)]:
            raise errors[0]  # the Barrier's own commands: every caller's
        replies, durable = settle(barrier, replies)
        return [r if isinstance(r, Exception) else Enqueued.from_reply(r, durable) for r in replies]

    def _pipeline(self, jobs: Sequence[NewJob], barrier: Barrier | None) -> Pipeline:
        pipe = self.redis.pipeline(transaction=False)
        for job in jobs:
            keys, args = self.enqueue_call(job)
            pipe.evalsha(self._enqueue.sha, len(keys), *keys, *args)
        if barrier is not None:
            barrier.add(pipe, self.probe)
        return pipe

    async def discard(self, foreign_id: str, task_id: str) -> None:
        """As ``JobStore.discard``."""
        keys, args = self.discard_call(foreign_id, task_id)
        async with self._turns:
            await self._discard(keys=keys, args=args)

    async def get(self, foreign_id: str) -> JobRecord | None:
        """As ``JobStore.get``."""
        async with self._turns:
            raw: dict[str, str] = await self.redis.hgetall(self.key(foreign_id))  # type: ignore[assignment]
        return JobRecord.from_redis(raw) if raw.get("state") else None

    async def wait(
        self,
        foreign_id: str,
        timeout: float,
        until: Callable[[JobRecord], bool] = lambda record: record.final,
    ) -> JobRecord | None:
        """As ``JobStore.wait``: on the job's channel, not by polling."""
        deadline = time.monotonic() + timeout
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            # Subscribe before reading, so a final state set in between is not missed.
            await pubsub.subscribe(self.channel(foreign_id))
            record = await self.get(foreign_id)
            while record is None or not until(record):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if await pubsub.get_message(timeout=left) is not None:
                    record = await self.get(foreign_id)
            return record
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]


class AsyncProducer:
    """``producer.Producer`` for asyncio code: the same arguments, results and errors, as
    coroutines. Use it from one event loop (its connections belong to that loop)."""

    def __init__(
        self,
        settings: Settings,
        *,
        app: Celery | None = None,
        store: AsyncJobStore | None = None,
    ) -> None:
        self.settings = settings
        self.app = app or create_app(settings)
        self.store = store or AsyncJobStore.from_settings(settings)
        self.atomic = is_atomic(settings)  # see invoice_worker.enqueue
        self._tasks: set[asyncio.Future[list[Result]]] = set()  # enqueues still finishing

    async def enqueue(
        self,
        request: Request,
        *,
        deadline: Deadline = None,
        callback_task: str | None = None,
        callback_queue: str | None = None,
        status_task: str | None = None,
        status_queue: str | None = None,
    ) -> JobRecord:
        """Validate, record as ``queued`` and send the job; see ``Producer.enqueue``.

        Raises:
            InvalidRequestError: the request or an option breaks a rule (nothing is written).
            ConflictError: the foreign_id was enqueued before with a different request.
            NotDurableError: with ``INVOICE_REDIS_MIN_REPLICAS``, not confirmed in time.
        """
        routes = Routes(callback_task, callback_queue, status_task, status_queue)
        return one(await self._enqueue([task_message(request, deadline, routes, self.settings)]))

    async def enqueue_many(
        self,
        requests: Sequence[Request],
        *,
        deadline: Deadline = None,
        callback_task: str | None = None,
        callback_queue: str | None = None,
        status_task: str | None = None,
        status_queue: str | None = None,
    ) -> list[JobRecord | ConflictError]:
        """Enqueue a batch in one round trip; see ``Producer.enqueue_many``.

        Raises:
            InvalidRequestError: fields named ``[i].field``; nothing at all is enqueued.
            NotDurableError: as :meth:`enqueue`, for the whole batch.
        """
        routes = Routes(callback_task, callback_queue, status_task, status_queue)
        return await self._enqueue(task_messages(requests, deadline, routes, self.settings))

    async def _enqueue(self, messages: list[TaskMessage]) -> list[Result]:
        if self.atomic:  # each record goes with its message: nothing to finish without us
            return await self._write_and_send(messages)
        # A cancelled caller's records are written anyway: its sends must go too (shielded).
        self._tasks.add(task := asyncio.ensure_future(self._write_and_send(messages)))
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)  # (which retrieves the error of a cancelled caller)

    async def _write_and_send(self, messages: list[TaskMessage]) -> list[Result]:
        jobs = [new_job(m, self.settings, self.app, atomic=self.atomic) for m in messages]
        with refused_for_want_of_replicas(jobs):
            outcome = Outcome.of(messages, jobs, await self.store.enqueue(jobs))
        if outcome.sends:
            await self._send(outcome.sends)
        return outcome.checked()

    async def _send(self, sends: list[Send]) -> None:
        try:
            await asyncio.to_thread(publish, self.app, self.settings.queue, sends)
        except Exception:
            for message, task_id, new in sends:
                if new:
                    await self.store.discard(message.request.foreign_id, task_id)
            raise

    async def get(self, foreign_id: str) -> JobRecord | None:
        """Return the job record of ``foreign_id``, or None if it was never enqueued."""
        return await self.store.get(foreign_id)

    async def wait(self, foreign_id: str, timeout: float) -> JobRecord | None:
        """Wait (on a Redis channel, not by polling) until the job is final or time is up;
        returns the record, or None if no job with that id exists by then."""
        return await self.store.wait(foreign_id, timeout)

    async def wait_for_status(
        self, foreign_id: str, statuses: Iterable[str], timeout: float
    ) -> JobRecord | None:
        """Wait until the invoice's status is one of ``statuses``; see
        ``Producer.wait_for_status``."""
        return await self.store.wait(foreign_id, timeout, until=status_in(statuses))

    async def aclose(self) -> None:
        """Release Redis and broker connections (after the enqueues in progress)."""
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.redis.aclose()
        self.app.close()


_defaults: dict[asyncio.AbstractEventLoop, tuple[AsyncProducer, AsyncGenerator[None, None]]] = {}


async def default_producer() -> AsyncProducer:
    """The running loop's AsyncProducer, built from the environment on first use there."""
    loop = asyncio.get_running_loop()
    if loop not in _defaults:
        producer = AsyncProducer(Settings.load())
        closer = _closed_with(loop, producer)
        _defaults[loop] = (producer, closer)
        await anext(closer)  # now the loop holds it, and finalizes it when it shuts down
    return _defaults[loop][0]


async def _closed_with(
    loop: asyncio.AbstractEventLoop, producer: AsyncProducer
) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        _defaults.pop(loop, None)
        await producer.aclose()


async def aclose_default() -> None:
    """Close the running loop's default AsyncProducer, if it has one (e.g. in a FastAPI
    lifespan's shutdown; a loop that ends through ``asyncio.run`` closes it anyway)."""
    entry = _defaults.get(asyncio.get_running_loop())
    if entry is not None:
        await entry[1].aclose()


async def enqueue_invoice(
    request: Request,
    *,
    deadline: Deadline = None,
    callback_task: str | None = None,
    callback_queue: str | None = None,
    status_task: str | None = None,
    status_queue: str | None = None,
) -> JobRecord:
    """Enqueue with the default producer; see :meth:`AsyncProducer.enqueue`."""
    return await (await default_producer()).enqueue(
        request, deadline=deadline, callback_task=callback_task, callback_queue=callback_queue,
        status_task=status_task, status_queue=status_queue,
    )  # fmt: skip


async def enqueue_many(
    requests: Sequence[Request],
    *,
    deadline: Deadline = None,
    callback_task: str | None = None,
    callback_queue: str | None = None,
    status_task: str | None = None,
    status_queue: str | None = None,
) -> list[JobRecord | ConflictError]:
    """Enqueue a batch with the default producer; see :meth:`AsyncProducer.enqueue_many`."""
    return await (await default_producer()).enqueue_many(
        requests, deadline=deadline, callback_task=callback_task, callback_queue=callback_queue,
        status_task=status_task, status_queue=status_queue,
    )  # fmt: skip


async def get_invoice(foreign_id: str) -> JobRecord | None:
    """Return the job record, or None; see :meth:`AsyncProducer.get`."""
    return await (await default_producer()).get(foreign_id)


async def wait_for_invoice(foreign_id: str, timeout: float) -> JobRecord | None:
    """Wait for a final state; see :meth:`AsyncProducer.wait`."""
    return await (await default_producer()).wait(foreign_id, timeout)


async def wait_for_status(
    foreign_id: str, statuses: Iterable[str], timeout: float
) -> JobRecord | None:
    """Wait for an invoice status; see :meth:`AsyncProducer.wait_for_status`."""
    return await (await default_producer()).wait_for_status(foreign_id, statuses, timeout)
