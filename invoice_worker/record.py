"""The typed job record: what ``enqueue``, ``get_invoice``, the events and the callback tasks
report, parsed from the Redis hash in one place."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from invoice_worker.constants import Cleanup, InvoiceStatus, JobState


def _opt_int(value: str) -> int | None:
    return int(value) if value else None


def _opt_float(value: str) -> float | None:
    return float(value) if value else None


def _count(value: str) -> int:
    return int(value or 0)


def _flag(value: str) -> bool:
    return value == "1"


def _errors(value: str) -> dict[str, str]:
    return json.loads(value) if value else {}


def _orphan(value: str) -> Cleanup | None:
    return Cleanup(value) if value else None


def _status(value: str | None) -> InvoiceStatus | None:
    # The create answer's status is the provider's text: one we do not know is no status.
    try:
        return InvoiceStatus(value) if value else None
    except ValueError:
        return None


def _by_number(raw: str | None) -> list[dict[str, Any]]:
    """A JSON object keyed by number (transaction id, generation) as a list in that order.

    The scripts keep these as objects, not arrays: Lua's cjson cannot tell an empty array
    from an empty object, and an object merges by key."""
    items = json.loads(raw) if raw else {}
    if isinstance(items, list):  # fakeredis' cjson writes an empty object as []
        return items
    return [items[k] for k in sorted(items, key=lambda k: (len(k), k))]


def paid_amount(transactions: list[dict[str, Any]]) -> str | None:
    """What the transactions add up to (the payer's currency), None without any."""
    if not transactions:
        return None
    try:
        total = sum((Decimal(str(tx.get("amount", "0"))) for tx in transactions), Decimal(0))
    except InvalidOperation:
        return None
    return format(total, "f")


@dataclass(frozen=True)
class JobRecord:
    """A job as the store holds it: what ``enqueue``, ``get_invoice`` and the events report.

    Parsed from the Redis hash in one place (:meth:`from_redis`); internal bookkeeping (the
    fingerprint, the lease, the message copy) stays behind. ``to_dict`` gives the JSON form the
    callback and status tasks and the CLI receive.
    """

    foreign_id: str
    state: JobState
    task_id: str = ""
    attempts: int = 0
    created_at: float | None = None
    updated_at: float | None = None
    deadline: float | None = None
    callback_task: str | None = None
    callback_queue: str | None = None
    status_task: str | None = None
    status_queue: str | None = None
    #: The id sent to the provider: ``foreign_id``, or a derived ``<id>~r<n>`` after an orphan
    #: or a re-issue (``generation`` is n).
    provider_foreign_id: str | None = None
    generation: int = 0
    # The invoice, once created.
    invoice_id: int | None = None
    url: str | None = None
    address: str | None = None
    #: The status the create answer gave (``invoice_status`` follows the callbacks).
    status: str | None = None
    amount: str | None = None
    currency: str | None = None
    fixed_at: int | None = None
    release_at: int | None = None
    # The invoice's life after creation, from the provider's callbacks.
    #: The provider's status of the current invoice: the latest the callbacks brought (only
    #: ever forward), else the create answer's.
    invoice_status: InvoiceStatus | None = None
    #: The provider's ``error`` text of a failed invoice ("Timer expired. User paid less ...").
    invoice_error: str | None = None
    #: When the last status change was received (Unix seconds).
    status_at: float | None = None
    #: What the payer must send (``currency_sent``) and what the invoice is worth
    #: (``currency_received``), as the callbacks say.
    sent_amount: str | None = None
    sent_currency: str | None = None
    received_amount: str | None = None
    received_currency: str | None = None
    #: Every transaction the callbacks reported (instalments accumulated), oldest id first:
    #: id, amount, currency, txid, confirmations.
    transactions: list[dict[str, Any]] = field(default_factory=list)
    #: The sum of their amounts (in ``sent_currency``).
    paid: str | None = None
    #: Earlier invoices of this job, by generation: re-issued ones (``reissued_at``) and
    #: orphans an ambiguous attempt left (``orphan``), each with what its callbacks said.
    history: list[dict[str, Any]] = field(default_factory=list)
    # Why it failed (final) or why the last attempt did (retrying).
    error_code: str | None = None
    error: str | None = None
    http_status: int | None = None
    errors: dict[str, str] = field(default_factory=dict)
    last_error: str | None = None
    last_error_code: str | None = None
    next_attempt_at: float | None = None
    deferred: str | None = None
    #: An attempt was sent and its answer lost: an invoice may exist under provider_foreign_id.
    ambiguous: bool = False
    #: What became of that possible invoice once the job was final.
    orphan: Cleanup | None = None
    crashes: int = 0
    callback_sent: bool = False

    @classmethod
    def from_redis(cls, raw: Mapping[str, str]) -> JobRecord:
        """Build the record from a Redis hash (strings); unknown fields are ignored.

        Only the fields present are converted (``_PARSE``), the rest keep their defaults: a
        claim's reply holds eight fields, a whole record about thirty of fifty.
        """
        values: dict[str, Any] = {"foreign_id": ""}
        for key, value in raw.items():
            if key in _PARSE:
                parse = _PARSE[key]
                values[key] = value if parse is None else parse(value)
        values["state"] = JobState(raw["state"])
        values["invoice_status"] = _status(raw.get("invoice_status") or raw.get("status"))
        if "transactions" in values:
            values["paid"] = paid_amount(values["transactions"])
        return cls(**values)

    @property
    def final(self) -> bool:
        """True once the job is created, failed or expired."""
        return self.state.final

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (what the callback task receives): fields that are set."""
        return {
            k: v for k, v in asdict(self).items() if v is not None and v != {} and v != []
        }  # fmt: skip


#: How each field of the hash becomes the record's (None: the text as it is). ``state``,
#: ``invoice_status`` and ``paid`` are built from the others in ``from_redis``.
_PARSE: dict[str, Callable[[str], Any] | None] = {
    **dict.fromkeys((
        "foreign_id", "task_id", "callback_task", "callback_queue", "status_task",
        "status_queue", "provider_foreign_id", "url", "address", "status", "amount", "currency",
        "sent_amount", "sent_currency", "received_amount", "received_currency", "error_code",
        "error", "last_error", "last_error_code", "deferred",
    )),
    **dict.fromkeys(("attempts", "generation", "crashes"), _count),
    **dict.fromkeys(
        ("created_at", "updated_at", "deadline", "status_at", "next_attempt_at"), _opt_float
    ),
    **dict.fromkeys(("invoice_id", "fixed_at", "release_at", "http_status"), _opt_int),
    **dict.fromkeys(("ambiguous", "callback_sent"), _flag),
    "invoice_error": lambda value: value or None,
    "transactions": _by_number,
    "history": _by_number,
    "errors": _errors,
    "orphan": _orphan,
}  # fmt: skip
