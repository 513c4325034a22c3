"""Names shared by the producer, the worker and the store; each documented where defined.

The Lua scripts receive the key suffixes and the final states from here (``store.py`` writes
them into each script's header), so no name is spelled twice.
"""

from __future__ import annotations

from enum import StrEnum

#: Celery task name; the message contract for non-Python producers is keyed on it.
TASK_NAME = "invoices.create"

#: Separator of derived provider ids (``<foreign_id>~r<n>``). Reserved: no accepted
#: ``foreign_id`` may contain it, so a derived id can never be another order's id.
DERIVED_SEPARATOR = "~"


class JobState(StrEnum):
    """Where a job stands. ``retrying`` sits between attempts; the last three are final."""

    #: Recorded by the producer (or by a worker for a message sent without one); not yet taken.
    QUEUED = "queued"
    #: Held by a worker under a lease; a provider call may be in flight.
    PROCESSING = "processing"
    #: Waiting for its next attempt (a transient error, or deferred by the fleet gate).
    RETRYING = "retrying"
    #: Final: the invoice exists and its URL is recorded.
    CREATED = "created"
    #: Final: no invoice for this job (``error_code`` says why).
    FAILED = "failed"
    #: Final: the deadline passed first.
    EXPIRED = "expired"

    @property
    def final(self) -> bool:
        """True for the states a job never leaves."""
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.CREATED, JobState.FAILED, JobState.EXPIRED})


class InvoiceStatus(StrEnum):
    """The provider's status of one invoice, as its callbacks report it. It only moves forward:
    ``created`` -> ``pending`` -> ``processing`` -> ``confirmed`` | ``failed`` (the last two
    final, and neither ever left)."""

    #: No currency chosen yet (an invoice created without ``timer``).
    CREATED = "created"
    #: Waiting for the payment (an invoice with ``timer`` starts here); part payments too.
    PENDING = "pending"
    #: A payment is in the mempool; treat as pending until ``confirmed``.
    PROCESSING = "processing"
    #: Final: paid.
    CONFIRMED = "confirmed"
    #: Final: expired, paid less, not confirmed in time, or cancelled (``invoice_error`` says).
    FAILED = "failed"

    @property
    def rank(self) -> int:
        """Its place in the order above; a callback never moves an invoice to a lower one."""
        return INVOICE_RANK[self]

    @property
    def final(self) -> bool:
        """True for ``confirmed`` and ``failed``."""
        return self.rank == INVOICE_RANK[InvoiceStatus.CONFIRMED]


INVOICE_RANK = {
    InvoiceStatus.CREATED: 0,
    InvoiceStatus.PENDING: 1,
    InvoiceStatus.PROCESSING: 2,
    InvoiceStatus.CONFIRMED: 3,
    InvoiceStatus.FAILED: 3,
}


class EventKind(StrEnum):
    """What an entry of the events stream reports (its ``kind`` field)."""

    #: A job reached a final state (``state``: created, failed or expired).
    JOB = "job"
    #: The job's current invoice changed status (``status``), from a provider callback.
    STATUS = "status"


class CallbackOutcome(StrEnum):
    """What the receiver made of one authenticated callback (also the metric label)."""

    #: The job's current invoice moved to a new status (one status event).
    APPLIED = "applied"
    #: The job's current invoice, without a status change (an instalment, an older status
    #: arriving late): its transactions are accumulated.
    RECORDED = "recorded"
    #: The same invoice, status and transactions were received before: nothing changes.
    DUPLICATE = "duplicate"
    #: An earlier invoice of the job (one it re-issued): its history entry is updated.
    HISTORY = "history"
    #: An invoice an ambiguous attempt created and the job replaced or cancelled: recorded in
    #: the job's history, the job's invoice status untouched.
    ORPHAN = "orphan"
    #: No job of ours has that id: kept and counted, nothing else.
    UNKNOWN = "unknown"
    #: The job's current provider id, before its create answer is recorded: answered 503, so
    #: the provider sends it again once the job knows its invoice (or has replaced it).
    EARLY = "early"


class ClaimStatus(StrEnum):
    """What the claim script answered to a worker that tried to take a job."""

    #: The job is held by this worker: call the provider.
    CLAIMED = "claimed"
    #: Held, but its workers died too often mid-attempt: end it ``worker_lost``.
    POISON = "poison"
    #: Held, but the deadline passes before the provider may be called: end it ``expired``.
    EXPIRE = "expire"
    #: Held, and its final outcome is already staged (durable before anyone saw it): publish
    #: it, never call the provider again.
    STAGED = "staged"
    #: Already final: nothing to do but report the record.
    DONE = "done"
    #: Another worker holds a live lease: come back when it ends.
    BUSY = "busy"
    #: A retry whose time has not come yet.
    EARLY = "early"
    #: Turned away by the fleet gate (429 pause, open circuit, rate limit); no attempt used.
    DEFERRED = "deferred"
    #: The message's request differs from the recorded one: ignore the message.
    CONFLICT = "conflict"
    #: No record and no stored copy given: the caller must claim again with the kwargs.
    MISSING = "missing"


class DeferReason(StrEnum):
    """Why the fleet gate deferred a job (also the ``deferrals`` metric label)."""

    RATE_LIMITED = "rate_limited"
    PROVIDER_PAUSED = "provider_paused"
    CIRCUIT_OPEN = "circuit_open"
    #: Not the fleet gate: Redis did not confirm a write on enough replicas in time
    #: (``INVOICE_REDIS_MIN_REPLICAS``), so the provider was not called.
    NOT_DURABLE = "not_durable"


class Circuit(StrEnum):
    """The fleet's circuit breaker."""

    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


class CallReport(StrEnum):
    """What one attempt tells the fleet about the provider."""

    #: No call was made (or it failed for a reason that says nothing about the provider).
    NONE = ""
    #: It answered (even with a refusal): the provider is up.
    OK = "ok"
    #: Unreachable, 5xx or a timeout: counts towards opening the circuit.
    FAILURE = "failure"
    #: 429: the whole fleet pauses.
    RATE_LIMITED = "rate_limited"


class ErrorCode(StrEnum):
    """Error codes we set ourselves (provider codes are stored as the provider sent them)."""

    #: An earlier attempt created the invoice, its answer was lost, and the policy is ``fail``.
    ORPHANED = "orphaned"
    DEADLINE_PASSED = "deadline_passed"
    #: The job's workers kept dying mid-attempt (``INVOICE_MAX_REDELIVERIES``).
    WORKER_LOST = "worker_lost"
    #: The task message broke the contract; nothing was sent to the provider.
    INVALID_MESSAGE = "invalid_message"


class Cleanup(StrEnum):
    """What became of an invoice an ambiguous attempt may have created (``orphan`` field)."""

    #: Nothing to clean up: no ambiguous attempt.
    NONE = "none"
    #: Cancelled at the provider.
    CANCELLED = "cancelled"
    #: The provider says it is already final (or never existed): nothing live remains.
    FINAL = "final"
    #: The cancel has not succeeded yet: the sweeper keeps retrying it (``<prefix>cleanup``).
    PENDING = "pending"
    #: Retries exhausted: a live invoice may remain; a human must look.
    MAY_REMAIN = "may_remain"


class QueueType(StrEnum):
    """How RabbitMQ keeps the invoice queue (``INVOICE_QUEUE_TYPE``, see ``queues.py``)."""

    #: One node's queue, as Celery declares it by default; countdowns wait in worker memory.
    CLASSIC = "classic"
    #: Replicated (Raft); countdowns wait in the broker (native delayed delivery).
    QUORUM = "quorum"


#: Failed deliveries of one message a quorum queue allows before it dead-letters it (RabbitMQ
#: 4's default, declared so that 3.x behaves the same). A queue argument cannot change once
#: declared; a ``delivery-limit`` policy can lower it (RabbitMQ takes the lower of the two).
QUORUM_DELIVERY_LIMIT = 20

# Redis keys, all under ``INVOICE_KEY_PREFIX``.
#: Record: a hash per job, ``<prefix>job:<foreign_id>``.
JOB_KEY = "job:"
#: Wait channel (pub/sub) announcing a job's final state: ``<prefix>done:<foreign_id>``.
DONE_CHANNEL = "done:"
#: The fleet's shared view of the provider (rate-limit cursor, 429 pause, circuit): a hash.
PROVIDER_KEY = "provider"
#: Counters for metrics (jobs by state, retries, deferrals, latency histogram): a hash.
STATS_KEY = "stats"
#: Broker entries the worker could not decode, raw (``invoice_worker.transport``): a capped
#: list. Like the broker message they may hold ``email_user``.
DEAD_LETTER_KEY = "dead-letter"
#: Jobs not yet final, scored by when they must have moved on: a sorted set (the sweeper's).
DUE_KEY = "due"
#: The task kwargs of a job not yet final, to send again if its message is lost: a string.
#: Like the broker message, it holds ``email_user``; it is deleted when the job is final.
COPY_KEY = "msg:"
#: Invoices to cancel after a final job (a give-up cancel that failed): a sorted set of
#: provider ids scored by the next try; the details live in ``<prefix>cleanup:<id>`` hashes.
CLEANUP_KEY = "cleanup"
#: A script's answer kept for a short while under ``<prefix>batch:<op>``, so that a re-run after
#: a lost reply (redis-py re-sends the script) answers what the first run did.
BATCH_KEY = "batch:"
#: Callbacks of one invoice: a hash of the raw bodies received (``raw:<sha256>``, kept
#: ``INVOICE_CALLBACK_TTL`` for audit) and of what each distinct one came to (``seen:<id>``):
#: ``<prefix>callback:<invoice id>``.
CALLBACK_KEY = "callback:"
#: Callbacks naming no job of ours (invoice id, provider id, status, when): a capped list.
CALLBACK_UNKNOWN_KEY = "callbacks:unknown"
#: Signed callbacks that could not be read or applied, raw: a capped list (never dropped).
CALLBACK_DEAD_LETTER_KEY = "callbacks:dead-letter"
#: The job of a derived provider id too long to carry its foreign_id whole (a hashed one):
#: ``<prefix>alias:<provider id>`` holds the foreign_id.
ALIAS_KEY = "alias:"
#: Written just before a Redis WAIT, so the wait covers every write before it (store.Barrier).
PROBE_KEY = "durable-probe"
#: Cancels tried for one pending cleanup before it is left to a human (about 2 hours), and the
#: longest wait between two of them.
CLEANUP_TRIES = 12
CLEANUP_BACKOFF_CAP = 900.0
#: Record of a message that could not be decoded and whose foreign_id is not a valid one.
INVALID_MESSAGE_ID = "invalid-message:"

#: Upper bounds (seconds) of the provider latency histogram.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
