"""Names shared by the producer, the worker and the store; each documented where defined."""

from __future__ import annotations

#: Celery task name; the message contract for non-Python producers is keyed on it.
TASK_NAME = "invoices.create"

#: Job states. ``retrying`` sits between attempts; the last three are final.
QUEUED = "queued"
PROCESSING = "processing"
RETRYING = "retrying"
CREATED = "created"
FAILED = "failed"
EXPIRED = "expired"
FINAL_STATES = frozenset({CREATED, FAILED, EXPIRED})

#: Record key: ``<key_prefix>job:<foreign_id>`` (a hash). Wait channel: ``<key_prefix>done:<id>``.
JOB_KEY = "job:"
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

#: Circuit breaker states.
CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"

#: Upper bounds (seconds) of the provider latency histogram.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: Error codes we set ourselves (provider codes are stored as the provider sent them).
ORPHANED = "orphaned"
DEADLINE_PASSED = "deadline_passed"
WORKER_LOST = "worker_lost"
INVALID_MESSAGE = "invalid_message"

#: Fields copied from the provider's invoice into the job record.
INVOICE_FIELDS = (
    "invoice_id",
    "url",
    "address",
    "status",
    "amount",
    "currency",
    "fixed_at",
    "release_at",
)
