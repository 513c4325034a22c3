"""One claimed attempt at the provider: the only code that calls it (see job.py for the
states). Every call is fenced by the lease and bounded by ``send_by``."""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from invoice_worker.constants import (
    DERIVED_SEPARATOR,
    CallReport,
    ClaimStatus,
    Cleanup,
    DeferReason,
    ErrorCode,
    JobState,
)
from invoice_worker.errors import (
    AmbiguousResponseError,
    DuplicateForeignIdError,
    InvoiceNotFoundError,
    InvoiceStateError,
    ProviderError,
    RateLimitedError,
    TransientProviderError,
)
from invoice_worker.logs import log_circuit, log_job
from invoice_worker.message import TaskMessage
from invoice_worker.models import Invoice
from invoice_worker.record import JobRecord
from invoice_worker.scripts import Moved, Report

if TYPE_CHECKING:
    from invoice_worker.job import InvoiceJob

log = logging.getLogger(__name__)

#: Seconds kept between the last instant a request may leave and the end of the lease (at most
#: a tenth of the lease, so a short lease still lets a call through).
FENCE_MARGIN = 1.0


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential ceiling for retry ``attempt`` (1-based): base, 2*base, 4*base ... cap."""
    return min(cap, base * 2.0 ** max(0, attempt - 1))


def full_jitter(ceiling: float, rand: Callable[[], float] = random.random) -> float:
    """AWS "full jitter": uniform in [0, ceiling], so retries of a burst spread out."""
    return ceiling * rand()


def derived_foreign_id(foreign_id: str, generation: int) -> str:
    """The provider id of recreate ``generation`` (deterministic, at most 255 characters).

    It contains the reserved separator, so it can never be an accepted ``foreign_id``.
    """
    suffix = f"{DERIVED_SEPARATOR}r{generation}"
    if len(foreign_id) + len(suffix) <= 255:
        return foreign_id + suffix
    digest = hashlib.sha256(foreign_id.encode()).hexdigest()[:16]
    return f"{foreign_id[: 255 - len(suffix) - 17]}{DERIVED_SEPARATOR}{digest}{suffix}"


@dataclass(frozen=True)
class Outcome:
    """What the task wrapper must do after a run."""

    record: JobRecord | None
    retry_in: float | None = None
    finished: bool = False  # this run made the final transition (not a redelivery of a done job)


class Attempt:
    """One claimed attempt: the only code that calls the provider."""

    def __init__(
        self,
        job: InvoiceJob,
        message: TaskMessage,
        record: JobRecord,
        task_id: str,
        owner: str,
        *,
        fenced_at: float,
    ) -> None:
        self.job = job
        self.settings = job.settings
        self.message = message
        self.record = record
        self.task_id = task_id
        self.owner = owner
        self.foreign_id = message.request.foreign_id
        self.generation = record.generation
        self.attempts = record.attempts or 1
        self.latency_ms = 0.0
        self.report = Report()  # what the last provider call said about the provider
        # Taken before the claim was sent: its lease runs from a moment after this, so a
        # stall between the claim and this attempt counts against the lease, not past it.
        self.fenced_at = fenced_at
        # The record, not the message, is the authority on the deadline: a resent message
        # (another enqueue of the same request) must not widen it.
        self.deadline = record.deadline

    def start(self, status: ClaimStatus, reason: str = "", *, durable: bool = True) -> Outcome:
        provider_id = self.record.provider_foreign_id or self.foreign_id
        ambiguous = self.record.ambiguous
        if not durable and status in (ClaimStatus.CLAIMED, ClaimStatus.STAGED):
            # A claim a failover could take back must not reach the provider (nor publish).
            return self._not_durable(undo_attempt=status is ClaimStatus.CLAIMED)
        if status is ClaimStatus.STAGED:
            moved = self.job.store.publish(self.foreign_id, self.owner, again=True)
            return self._settled(moved, provider_id)
        if status is ClaimStatus.POISON:
            # No call here: the call itself may be what kills the worker. The sweeper cancels.
            return self._end(
                JobState.FAILED, ambiguous, error_code=ErrorCode.WORKER_LOST,
                error="the job's worker died too often",
            )  # fmt: skip
        if status is ClaimStatus.EXPIRE:
            return self._end(
                JobState.EXPIRED, ambiguous, error_code=ErrorCode.DEADLINE_PASSED,
                error=f"deadline passes before the provider may be called ({reason})",
            )  # fmt: skip
        if self._past_deadline():
            return self._give_up(
                JobState.EXPIRED, provider_id, ambiguous, error_code=ErrorCode.DEADLINE_PASSED,
                error="deadline passed before the invoice was created",
            )  # fmt: skip
        return self._create(provider_id, ambiguous=ambiguous)

    def _create(self, provider_id: str, *, ambiguous: bool) -> Outcome:
        request = self.message.request.with_foreign_id(provider_id)
        send_by = self._send_by(creating=True)
        try:
            invoice = self._call(lambda: self.job.client.create_invoice(request, send_by=send_by))
        except DuplicateForeignIdError as exc:
            if not ambiguous:
                return self.finish(JobState.FAILED, **exc.to_dict())
            return self._orphan(provider_id, exc)
        except TransientProviderError as exc:
            return self._retry(exc, ambiguous=ambiguous or exc.ambiguous, provider_id=provider_id)
        except ProviderError as exc:
            # After an ambiguous attempt an invoice may exist whatever this answer says.
            return self._give_up(JobState.FAILED, provider_id, ambiguous, **exc.to_dict())
        if self._past_deadline():
            # Answered after the deadline: the shop has moved on, so this invoice must not live.
            return self._give_up(
                JobState.EXPIRED, provider_id, True, error_code=ErrorCode.DEADLINE_PASSED,
                error="the invoice was created after the deadline, and cancelled",
            )  # fmt: skip
        return self.finish(
            JobState.CREATED, provider_foreign_id=provider_id, **_invoice_fields(invoice)
        )

    def _orphan(self, provider_id: str, exc: DuplicateForeignIdError) -> Outcome:
        """The earlier ambiguous call created an invoice whose URL we never saw."""
        if self.settings.orphan_policy == "fail":
            return self._give_up(
                JobState.FAILED, provider_id, True, error_code=ErrorCode.ORPHANED,
                http_status=exc.status,
                error="an earlier attempt created the invoice but its answer was lost; "
                "the provider has no look-up, so the URL is unknown",
            )  # fmt: skip
        if (stop := self._fence()) is not None:
            return stop
        try:
            self._call(lambda: self.job.client.cancel_invoice(provider_id, send_by=self._send_by()))
        except (InvoiceStateError, InvoiceNotFoundError):
            pass  # already final (e.g. a cancel whose answer was lost): nothing live to kill
        except TransientProviderError as exc2:
            return self._retry(exc2, ambiguous=True, provider_id=provider_id)
        except ProviderError as exc2:
            return self._end(JobState.FAILED, True, **exc2.to_dict())
        self.generation += 1
        new_id = derived_foreign_id(self.foreign_id, self.generation)
        if not new_id.startswith(self.foreign_id):  # hashed: its callbacks need the way back
            self.job.store.set_alias(new_id, self.foreign_id)
        # Recorded before the call, so a crash mid-call retries this same id, never a new one.
        values = {"provider_foreign_id": new_id, "generation": self.generation, "ambiguous": 0}
        if (stop := self._fence(values)) is not None:
            return stop
        self._log("orphan_cancelled", recreate_as=new_id)
        if self._past_deadline():
            return self.finish(
                JobState.EXPIRED, orphan=Cleanup.CANCELLED, error_code=ErrorCode.DEADLINE_PASSED,
                error="deadline passed while an orphaned invoice was replaced",
            )  # fmt: skip
        return self._create(new_id, ambiguous=False)

    def _retry(self, exc: TransientProviderError, *, ambiguous: bool, provider_id: str) -> Outcome:
        settings = self.settings
        error = exc.to_dict()
        if self.attempts >= settings.max_attempts:
            error["error"] = f"gave up after {self.attempts} attempts: {error['error']}"
            return self._give_up(JobState.FAILED, provider_id, ambiguous, **error)
        delay = full_jitter(
            backoff(self.attempts, settings.retry_base, settings.retry_cap), self.job.rand
        )
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            delay = min(max(delay, retry_after), settings.retry_cap)
        deadline = self.deadline
        if deadline is not None and time.time() + delay >= deadline:
            return self._give_up(
                JobState.EXPIRED, provider_id, ambiguous, error_code=ErrorCode.DEADLINE_PASSED,
                error=f"deadline passes before the next attempt ({error['error']})",
            )  # fmt: skip
        values = {
            "last_error": f"{error['error_code']}: {error['error']}",
            "last_error_code": error["error_code"],
            "ambiguous": int(ambiguous),
            "provider_foreign_id": provider_id,
        }
        moved = self.job.store.transition(
            self.foreign_id, self.owner, JobState.RETRYING, values, delay=delay,
            report=self.report,
        )  # fmt: skip
        if moved is None:
            return self._lost()
        self._circuit(moved)
        self._log("retrying", error_code=error["error_code"], retry_in=round(delay, 2))
        return Outcome(None, retry_in=delay)

    def _give_up(
        self, state: JobState, provider_id: str, ambiguous: bool, **values: Any
    ) -> Outcome:
        """End without an invoice; first cancel the one an ambiguous attempt may have made,
        so no customer can pay an invoice this job never reported."""
        if not ambiguous:
            return self.finish(state, **values)
        if (stop := self._fence()) is not None:
            return stop
        try:
            self._call(lambda: self.job.client.cancel_invoice(provider_id, send_by=self._send_by()))
        except (InvoiceNotFoundError, InvoiceStateError):
            return self.finish(state, orphan=Cleanup.FINAL, **values)
        except ProviderError:
            return self._end(state, True, **values)
        return self.finish(state, orphan=Cleanup.CANCELLED, **values)

    def _end(self, state: JobState, ambiguous: bool, **values: Any) -> Outcome:
        """End the job; after an ambiguous attempt, leave its cancel to the sweeper."""
        if not ambiguous:
            return self.finish(state, **values)
        return self.finish(
            state, orphan=Cleanup.PENDING, cleanup_in=self.settings.retry_base, **values
        )

    def finish(self, state: JobState, *, cleanup_in: float | None = None, **values: Any) -> Outcome:
        values = {"task_id": self.task_id, "attempts": self.attempts, **values}
        moved = self.job.store.finish(
            self.foreign_id, self.owner, state, values, self.report, cleanup_in=cleanup_in
        )
        self.report = Report()  # reported once, with the final or its staging
        return self._settled(moved, values.get("provider_foreign_id"))

    def _settled(self, moved: Moved | None, provider_id: str | None) -> Outcome:
        """What a final (or the publication of a staged one) came to."""
        if moved is None:
            return self._lost()
        if moved.past_deadline:  # checked by the script itself, on Redis' clock
            return self._give_up(
                JobState.EXPIRED, provider_id or self.foreign_id, True,
                error_code=ErrorCode.DEADLINE_PASSED,
                error="the invoice was created after the deadline, and cancelled",
            )  # fmt: skip
        self._circuit(moved)
        if not moved.durable:  # staged, unseen: whoever claims it next publishes it
            return self._not_durable(undo_attempt=False, unseen=True)
        record = moved.record
        assert record is not None, "a final transition returns its record"
        self._log(record.state, error_code=record.error_code, orphan=record.orphan)
        return Outcome(record, finished=True)

    def _fence(self, values: dict[str, Any] | None = None) -> Outcome | None:
        """Renew the lease before a further provider call, past the Barrier; None to go on,
        else what to do instead (the job was taken over, or the renewal is not durable)."""
        started = time.monotonic()
        moved = self.job.store.transition(
            self.foreign_id, self.owner, JobState.PROCESSING, values, renew=True,
            report=self.report,
        )  # fmt: skip
        self.report = Report()  # reported once; the next call reports afresh
        if moved is None:
            return self._lost()
        self._circuit(moved)
        if not moved.durable:
            return self._not_durable(undo_attempt=False)
        self.fenced_at = started
        return None

    def _not_durable(self, *, undo_attempt: bool, unseen: bool = False) -> Outcome:
        """Hand the job back without calling the provider: Redis did not confirm on enough
        replicas a write that a failover must not take back (a claim, a fence, a staged
        final). ``undo_attempt``: the claim's attempt was not used."""
        delay = self.settings.retry_base + full_jitter(self.settings.retry_base, self.job.rand)
        fields: dict[str, Any] = {"attempts": self.attempts - 1} if undo_attempt else {}
        if unseen:  # a staged final handed back before anyone could read it (transition.lua)
            fields["staged_unseen"] = 1
        moved = self.job.store.defer(self.foreign_id, self.owner, delay, self.report, **fields)
        self.report = Report()
        if moved is None:
            return self._lost()
        self._log("deferred", reason=DeferReason.NOT_DURABLE, retry_in=round(delay, 2))
        return Outcome(None, retry_in=delay)

    def _send_by(self, *, creating: bool = False) -> float:
        """The last monotonic instant a request may leave: its whole exchange must end while
        the lease is held, and no create may start after the job's deadline."""
        settings = self.settings
        margin = min(FENCE_MARGIN, settings.lease / 10)
        send_by = self.fenced_at + settings.lease - settings.exchange_timeout - margin
        deadline = self.deadline
        if creating and deadline is not None:
            send_by = min(send_by, time.monotonic() + deadline - time.time())
        return send_by

    def _past_deadline(self) -> bool:
        deadline = self.deadline
        return deadline is not None and time.time() >= deadline

    def _circuit(self, moved: Moved) -> None:
        log_circuit(moved.circuit, self.foreign_id, self.task_id)

    def _lost(self) -> Outcome:
        self._log("lease_lost", level=logging.WARNING)
        return Outcome(None)

    def _call(self, fn: Callable[[], Invoice]) -> Invoice:
        start = time.perf_counter()
        settings = self.settings
        try:
            result = fn()
        except RateLimitedError as exc:
            pause = exc.retry_after if exc.retry_after is not None else settings.rate_limit_pause
            self._reported(CallReport.RATE_LIMITED, start, min(pause, settings.retry_cap))
            raise
        except TransientProviderError:
            self._reported(CallReport.FAILURE, start)
            raise
        except ProviderError:
            self._reported(CallReport.OK, start)  # it answered: the provider is up
            raise
        except Exception as exc:
            # A bug or a soft time limit mid-call: the request may have gone out, so retry it
            # as ambiguous (bounded by max_attempts) instead of crashing the message. It says
            # nothing about the provider, so the breaker hears nothing.
            self._reported(CallReport.NONE, start)
            log.exception(
                "job %s task=%s unexpected error in provider call", self.foreign_id, self.task_id
            )
            raise AmbiguousResponseError(
                f"unexpected {type(exc).__name__} during the call"
            ) from exc
        self._reported(CallReport.OK, start)
        return result

    def _reported(self, outcome: CallReport, start: float, pause: float = 0.0) -> None:
        self.latency_ms += (time.perf_counter() - start) * 1000
        self.report = Report(outcome, pause, self.latency_ms / 1000)

    def _log(self, outcome: str, level: int = logging.INFO, **detail: Any) -> None:
        log_job(
            level, self.foreign_id, self.task_id, outcome,
            attempt=self.attempts, latency_ms=round(self.latency_ms, 1), **detail,
        )  # fmt: skip


def _invoice_fields(invoice: Invoice) -> dict[str, Any]:
    return {
        "invoice_id": invoice.id,
        "url": invoice.url,
        "address": invoice.address,
        "status": invoice.status,
        "amount": format(invoice.amount, "f"),
        "currency": invoice.currency,
        "fixed_at": invoice.fixed_at,
        "release_at": invoice.release_at,
    }
