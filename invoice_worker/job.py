"""One run of the invoice job, as a plain function of (message, store, client, settings).

The provider's ``foreign_id`` is the idempotency key: it is fixed before the first attempt and
sent unchanged on every retry and redelivery. The only time another id is sent is the orphan
"recreate" path, under a derived id recorded as ``provider_foreign_id`` before it is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from invoice_worker import constants as c
from invoice_worker.client import ProviderClient
from invoice_worker.config import Settings
from invoice_worker.errors import (
    AmbiguousResponseError,
    DuplicateForeignIdError,
    InvalidRequestError,
    InvoiceNotFoundError,
    InvoiceStateError,
    ProviderError,
    RateLimitedError,
    TransientProviderError,
)
from invoice_worker.logs import log_circuit, log_job
from invoice_worker.message import Message, decode, raw_fingerprint
from invoice_worker.models import Invoice
from invoice_worker.store import Claim, JobStore, Moved, Report

log = logging.getLogger(__name__)


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential ceiling for retry ``attempt`` (1-based): base, 2*base, 4*base ... cap."""
    return min(cap, base * 2.0 ** max(0, attempt - 1))


def full_jitter(ceiling: float, rand: Callable[[], float] = random.random) -> float:
    """AWS "full jitter": uniform in [0, ceiling], so retries of a burst spread out."""
    return ceiling * rand()


def derived_foreign_id(foreign_id: str, generation: int) -> str:
    """The provider id of recreate ``generation`` (deterministic, at most 255 characters)."""
    suffix = f"~r{generation}"
    if len(foreign_id) + len(suffix) <= 255:
        return foreign_id + suffix
    digest = hashlib.sha256(foreign_id.encode()).hexdigest()[:16]
    return f"{foreign_id[: 255 - len(suffix) - 17]}~{digest}{suffix}"


@dataclass(frozen=True)
class Outcome:
    """What the task wrapper must do after a run."""

    record: dict[str, Any] | None
    retry_in: float | None = None
    finished: bool = False  # this run made the final transition (not a redelivery of a done job)


class InvoiceJob:
    """Runs attempts of the invoice job; one instance per worker process."""

    def __init__(
        self,
        store: JobStore,
        client: ProviderClient,
        settings: Settings,
        *,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.store = store
        self.client = client
        self.settings = settings
        self.rand = rand

    def run(self, kwargs: dict[str, Any], *, task_id: str, owner: str) -> Outcome:
        """Run one delivery of a task message; never raises for a job-level failure."""
        try:
            message = decode(kwargs)
        except InvalidRequestError as exc:
            return self._reject(kwargs, exc, task_id=task_id, owner=owner)
        foreign_id = message.request.foreign_id
        fields = {
            "task_id": task_id,
            "deadline": message.deadline,
            "callback_task": message.callback_task,
            "callback_queue": message.callback_queue,
        }
        claim = self._claim(message, owner, fields)
        if claim.status == "missing":  # sent without the producer: keep a copy for the sweeper
            claim = self._claim(message, owner, fields, json.dumps(message.kwargs()))
        log_circuit(claim.circuit, foreign_id, task_id)
        if claim.status == "conflict":
            log_job(logging.WARNING, foreign_id, task_id, "ignored", reason="conflicting_message")
            return Outcome(None)
        if claim.status == "done":
            return Outcome(claim.record)
        if claim.status in ("busy", "early", "deferred"):
            reason = claim.reason or claim.status
            wait = claim.wait
            if reason in ("provider_paused", "circuit_open"):
                # Everyone deferred until the same instant: spread the comeback.
                wait += full_jitter(min(claim.wait, 1.0), self.rand)
            log_job(logging.INFO, foreign_id, task_id, "deferred", reason=reason, retry_in=wait)
            return Outcome(None, retry_in=wait + 0.01)
        attempt = _Attempt(self, message, claim.record, task_id, owner)
        if claim.status == "poison":
            return attempt.finish(
                c.FAILED, error_code=c.WORKER_LOST, error="the job's worker died too often"
            )
        if claim.status == "expire":
            return attempt.finish(
                c.EXPIRED, error_code=c.DEADLINE_PASSED,
                error=f"deadline passes before the provider may be called ({claim.reason})",
            )  # fmt: skip
        return attempt.run()

    def _claim(
        self, message: Message, owner: str, fields: dict[str, Any], kwargs: str = ""
    ) -> Claim:
        return self.store.claim(
            message.request.foreign_id, owner, lease=self.settings.lease,
            fingerprint=message.fingerprint(), max_crashes=self.settings.max_redeliveries,
            fields=fields, kwargs=kwargs,
        )  # fmt: skip

    def _reject(
        self, kwargs: Any, exc: InvalidRequestError, *, task_id: str, owner: str
    ) -> Outcome:
        request = kwargs.get("request") if isinstance(kwargs, dict) else None
        fid = request.get("foreign_id") if isinstance(request, dict) else None
        if not isinstance(fid, str) or not 0 < len(fid) <= 255:
            fid = f"invalid-message:{task_id}"
        claim = self.store.claim(
            fid,
            owner,
            lease=self.settings.lease,
            fingerprint=raw_fingerprint(kwargs),
            max_crashes=self.settings.max_redeliveries,
            fields={"task_id": task_id},
            gated=False,
        )
        if claim.status != "claimed" and claim.status != "poison":
            log_job(logging.WARNING, fid, task_id, "ignored", reason="invalid_message")
            return Outcome(claim.record or None)
        fields = {"error_code": c.INVALID_MESSAGE, "error": str(exc), "errors": exc.errors}
        moved = self.store.finish(fid, owner, c.FAILED, fields)
        log_job(logging.WARNING, fid, task_id, c.FAILED, error_code=c.INVALID_MESSAGE)
        return Outcome(moved.record if moved else None, finished=moved is not None)


class _Attempt:
    """One claimed attempt: the only code that calls the provider."""

    def __init__(
        self, job: InvoiceJob, message: Message, record: dict[str, Any], task_id: str, owner: str
    ) -> None:
        self.job = job
        self.message = message
        self.record = record
        self.task_id = task_id
        self.owner = owner
        self.foreign_id = message.request.foreign_id
        self.attempts = int(record.get("attempts", 1))
        self.latency_ms = 0.0
        self.report = Report()  # what the last provider call said about the provider

    def run(self) -> Outcome:
        deadline = self.message.deadline
        provider_id = self.record.get("provider_foreign_id") or self.foreign_id
        ambiguous = bool(self.record.get("ambiguous"))
        if deadline is not None and time.time() >= deadline:
            return self._give_up(
                c.EXPIRED, provider_id, ambiguous, error_code=c.DEADLINE_PASSED,
                error="deadline passed before the invoice was created",
            )  # fmt: skip
        return self._create(provider_id, ambiguous=ambiguous)

    def _create(self, provider_id: str, *, ambiguous: bool) -> Outcome:
        try:
            invoice = self._call(
                lambda: self.job.client.create_invoice(
                    self.message.request.with_foreign_id(provider_id)
                )
            )
        except DuplicateForeignIdError as exc:
            if not ambiguous:
                return self.finish(c.FAILED, **exc.to_dict())
            return self._orphan(provider_id, exc)
        except TransientProviderError as exc:
            return self._retry(exc, ambiguous=ambiguous or exc.ambiguous, provider_id=provider_id)
        except ProviderError as exc:
            return self.finish(c.FAILED, **exc.to_dict())
        return self.finish(c.CREATED, provider_foreign_id=provider_id, **_invoice_fields(invoice))

    def _orphan(self, provider_id: str, exc: DuplicateForeignIdError) -> Outcome:
        """The earlier ambiguous call created an invoice whose URL we never saw."""
        if self.job.settings.orphan_policy == "fail":
            return self.finish(
                c.FAILED,
                error_code=c.ORPHANED,
                http_status=exc.status,
                error="an earlier attempt created the invoice but its answer was lost; "
                "the provider has no look-up, so the URL is unknown",
            )
        try:
            self._call(lambda: self.job.client.cancel_invoice(provider_id))
        except (InvoiceStateError, InvoiceNotFoundError):
            pass  # already final (e.g. a cancel whose answer was lost): nothing live to kill
        except TransientProviderError as exc2:
            return self._retry(exc2, ambiguous=True, provider_id=provider_id)
        except ProviderError as exc2:
            return self.finish(c.FAILED, **exc2.to_dict())
        generation = int(self.record.get("generation", 0)) + 1
        new_id = derived_foreign_id(self.foreign_id, generation)
        # Recorded before the call, so a crash mid-call retries this same id, never a new one.
        fields = {"provider_foreign_id": new_id, "generation": generation, "ambiguous": 0}
        moved = self.job.store.transition(
            self.foreign_id, self.owner, c.PROCESSING, fields, lease=self.job.settings.lease,
            report=self.report,
        )  # fmt: skip
        if moved is None:
            return self._lost()
        self._circuit(moved)
        self._log("orphan_cancelled", recreate_as=new_id)
        self.record.update(fields)
        return self._create(new_id, ambiguous=False)

    def _retry(self, exc: TransientProviderError, *, ambiguous: bool, provider_id: str) -> Outcome:
        settings = self.job.settings
        error = exc.to_dict()
        if self.attempts >= settings.max_attempts:
            error["error"] = f"gave up after {self.attempts} attempts: {error['error']}"
            return self._give_up(c.FAILED, provider_id, ambiguous, **error)
        delay = full_jitter(
            backoff(self.attempts, settings.retry_base, settings.retry_cap), self.job.rand
        )
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            delay = min(max(delay, retry_after), settings.retry_cap)
        deadline = self.message.deadline
        if deadline is not None and time.time() + delay >= deadline:
            return self._give_up(
                c.EXPIRED, provider_id, ambiguous, error_code=c.DEADLINE_PASSED,
                error=f"deadline passes before the next attempt ({error['error']})",
            )  # fmt: skip
        fields = {
            "last_error": f"{error['error_code']}: {error['error']}",
            "last_error_code": error["error_code"],
            "ambiguous": int(ambiguous),
            "provider_foreign_id": provider_id,
        }
        moved = self.job.store.transition(
            self.foreign_id, self.owner, c.RETRYING, fields, delay=delay, report=self.report
        )
        if moved is None:
            return self._lost()
        self._circuit(moved)
        self._log("retrying", error_code=error["error_code"], retry_in=round(delay, 2))
        return Outcome(None, retry_in=delay)

    def _give_up(self, state: str, provider_id: str, ambiguous: bool, **fields: Any) -> Outcome:
        """End without an invoice; first cancel the one an ambiguous attempt may have made,
        so no customer can pay an invoice this job never reported (``orphan`` says how)."""
        if ambiguous:
            fields["orphan"] = self._cancel_quietly(provider_id)
        return self.finish(state, **fields)

    def _cancel_quietly(self, provider_id: str) -> str:
        try:
            self._call(lambda: self.job.client.cancel_invoice(provider_id))
        except InvoiceNotFoundError:
            return "none"
        except InvoiceStateError:
            return "final"
        except ProviderError:
            return "may_remain"
        return "cancelled"

    def finish(self, state: str, **fields: Any) -> Outcome:
        fields = {"task_id": self.task_id, "attempts": self.attempts, **fields}
        moved = self.job.store.finish(self.foreign_id, self.owner, state, fields, self.report)
        if moved is None:
            return self._lost()
        self._circuit(moved)
        self._log(state, error_code=fields.get("error_code"))
        return Outcome(moved.record, finished=True)

    def _circuit(self, moved: Moved) -> None:
        log_circuit(moved.circuit, self.foreign_id, self.task_id)

    def _lost(self) -> Outcome:
        self._log("lease_lost", level=logging.WARNING)
        return Outcome(None)

    def _call(self, fn: Callable[[], Invoice]) -> Invoice:
        start = time.perf_counter()
        settings = self.job.settings
        try:
            result = fn()
        except RateLimitedError as exc:
            pause = exc.retry_after if exc.retry_after is not None else settings.rate_limit_pause
            self._reported("rate_limited", start, min(pause, settings.retry_cap))
            raise
        except TransientProviderError:
            self._reported("failure", start)
            raise
        except ProviderError:
            self._reported("ok", start)  # it answered: the provider is up
            raise
        except Exception as exc:
            # A bug or a soft time limit mid-call: the request may have gone out, so retry it
            # as ambiguous (bounded by max_attempts) instead of crashing the message. It says
            # nothing about the provider, so the breaker hears nothing.
            self._reported("", start)
            log.exception(
                "job %s task=%s unexpected error in provider call", self.foreign_id, self.task_id
            )
            raise AmbiguousResponseError(
                f"unexpected {type(exc).__name__} during the call"
            ) from exc
        self._reported("ok", start)
        return result

    def _reported(self, outcome: str, start: float, pause: float = 0.0) -> None:
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
