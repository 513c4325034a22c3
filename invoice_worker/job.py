"""One run of the invoice job, as a plain function of (message, store, client, settings).

The provider's ``foreign_id`` is the idempotency key: it is fixed before the first attempt and
sent unchanged on every retry and redelivery. The only time another id is sent is the orphan
"recreate" path, under a derived id recorded as ``provider_foreign_id`` before it is used.

States, and who moves each edge (``claim`` and ``transition`` are the Lua scripts)::

    (enqueue.lua or claim.lua) -> queued
    queued | retrying --claim--> processing          (lease held; or deferred -> retrying)
    processing --claim by another after the lease--> processing (crashes+1, ambiguous)
    processing --transition release--> retrying      (transient error; next_attempt_at)
    processing --transition renew--> processing      (fence before each further call)
    processing --transition final--> created | failed | expired   (+ one event, announced)
    processing --transition stage--> processing (staged)   (INVOICE_REDIS_MIN_REPLICAS: then
        WAIT for the replicas, then --transition publish--> final, as "final" does in one step;
        a staged job's next claim publishes it, and never calls the provider)

Every provider call is fenced: the caller still holds the lease (the claim, or a renewal just
before), and the request is not sent after ``send_by``, the instant from which the whole
exchange could outlast the lease or the job's deadline. Every final state after an ambiguous
attempt either cancels the invoice that attempt may have created or leaves a pending cleanup
that the sweeper retries (``orphan`` in the record says which).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Callable
from typing import Any, assert_never

from invoice_worker.attempt import Attempt, Outcome, full_jitter
from invoice_worker.client import ProviderClient
from invoice_worker.config import Settings
from invoice_worker.constants import (
    INVALID_MESSAGE_ID,
    ClaimStatus,
    DeferReason,
    ErrorCode,
    JobState,
)
from invoice_worker.errors import (
    InvalidRequestError,
)
from invoice_worker.logs import log_circuit, log_job
from invoice_worker.message import TaskMessage, raw_fingerprint
from invoice_worker.models import check_foreign_id
from invoice_worker.scripts import Claim
from invoice_worker.store import JobStore

log = logging.getLogger(__name__)

# Lower case only: records are keyed case-folded, so "T-1" and "t-1" must not meet there.
_SAFE_TASK_ID = re.compile(r"[a-z0-9._:-]{1,64}")


def safe_task_id(task_id: str) -> str:
    """The task id as we log and key it: a hostile producer chooses it, so anything but a
    plain id is replaced by its hash."""
    if _SAFE_TASK_ID.fullmatch(task_id):
        return task_id
    return "sha256-" + hashlib.sha256(task_id.encode()).hexdigest()[:32]


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

    def run(self, kwargs: Any, *, task_id: str, owner: str) -> Outcome:
        """Run one delivery of a task message; never raises for a job-level failure."""
        task_id = safe_task_id(task_id)
        try:
            message = TaskMessage.parse(kwargs, queue=self.settings.queue, wire=True)
        except InvalidRequestError as exc:
            return self._reject(kwargs, exc, task_id=task_id, owner=owner)
        foreign_id = message.request.foreign_id
        fields = {
            "task_id": task_id,
            "deadline": message.deadline,
            "callback_task": message.callback_task,
            "callback_queue": message.callback_queue,
            "status_task": message.status_task,
            "status_queue": message.status_queue,
        }
        claimed_at = time.monotonic()
        claim = self._claim(message, owner, fields)
        if claim.status is ClaimStatus.MISSING:  # sent without the producer: keep a copy
            claimed_at = time.monotonic()
            claim = self._claim(message, owner, fields, json.dumps(message.kwargs()))
        log_circuit(claim.circuit, foreign_id, task_id)
        match claim.status:
            case ClaimStatus.CONFLICT:
                error = InvalidRequestError(
                    {"request": "differs from the request recorded under this foreign_id"}
                )
                return self._reject(kwargs, error, task_id=task_id, owner=owner, conflict=True)
            case ClaimStatus.DONE:
                return Outcome(claim.record)
            case ClaimStatus.BUSY | ClaimStatus.EARLY | ClaimStatus.DEFERRED:
                return self._defer(claim, foreign_id, task_id)
            case ClaimStatus.POISON | ClaimStatus.EXPIRE | ClaimStatus.CLAIMED | ClaimStatus.STAGED:
                assert claim.record is not None
                attempt = Attempt(self, message, claim.record, task_id, owner, fenced_at=claimed_at)
                return attempt.start(claim.status, claim.reason, durable=claim.durable)
            case ClaimStatus.MISSING:
                raise RuntimeError("the claim asked for the message copy twice")
            case _:
                assert_never(claim.status)

    def _defer(self, claim: Claim, foreign_id: str, task_id: str) -> Outcome:
        reason = claim.reason or claim.status
        wait = claim.wait
        if reason in (DeferReason.PROVIDER_PAUSED, DeferReason.CIRCUIT_OPEN):
            # Everyone deferred until the same instant: spread the comeback.
            wait += full_jitter(min(claim.wait, 1.0), self.rand)
        wait = min(wait, self.settings.max_countdown)
        log_job(logging.INFO, foreign_id, task_id, "deferred", reason=reason, retry_in=wait)
        return Outcome(None, retry_in=wait + 0.01)

    def _claim(
        self, message: TaskMessage, owner: str, fields: dict[str, Any], kwargs: str = ""
    ) -> Claim:
        return self.store.claim(
            message.request.foreign_id, owner, fingerprint=message.fingerprint(),
            fields=fields, kwargs=kwargs,
        )  # fmt: skip

    def _reject(
        self,
        kwargs: Any,
        exc: InvalidRequestError,
        *,
        task_id: str,
        owner: str,
        conflict: bool = False,
    ) -> Outcome:
        """Record an invalid message as failed, once, without calling the provider.

        It is recorded under its foreign_id only when that id passes the producer's rules
        (else it could be an e-mail address, a forged log line or another order's id) and no
        other job holds it; otherwise under ``invalid-message:<task_id>``.
        """
        fid = f"{INVALID_MESSAGE_ID}{task_id}"
        if not conflict:
            request = kwargs.get("request") if isinstance(kwargs, dict) else None
            candidate = request.get("foreign_id") if isinstance(request, dict) else None
            if isinstance(candidate, str) and len(candidate) <= 255:
                with contextlib.suppress(ValueError):
                    fid = check_foreign_id(candidate)
        fields = {"task_id": task_id}
        claim = self.store.claim(
            fid, owner, fingerprint=raw_fingerprint(kwargs), fields=fields, gated=False
        )
        if claim.status is ClaimStatus.CONFLICT and not fid.startswith(INVALID_MESSAGE_ID):
            return self._reject(kwargs, exc, task_id=task_id, owner=owner, conflict=True)
        code = "conflict" if conflict else ErrorCode.INVALID_MESSAGE
        match claim.status:
            case ClaimStatus.CLAIMED | ClaimStatus.POISON | ClaimStatus.STAGED:
                # Not through the Barrier: no provider call or URL hangs on it, and a message
                # Celery could not unpack never comes back to publish a staged failure.
                values = {"error_code": code, "error": str(exc), "errors": exc.errors}
                moved = self.store.finish(fid, owner, JobState.FAILED, values, wait=False)
            case _:
                log_job(logging.WARNING, fid, task_id, "ignored", reason=ErrorCode.INVALID_MESSAGE)
                return Outcome(claim.record)
        log_job(logging.WARNING, fid, task_id, JobState.FAILED, error_code=code)
        return Outcome(moved.record if moved else None, finished=moved is not None)
