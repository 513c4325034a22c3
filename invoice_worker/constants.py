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
