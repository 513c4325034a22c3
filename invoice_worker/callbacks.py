"""Provider callbacks: read a signed body, and apply it to the job it names.

The provider POSTs one callback per status change and per instalment of an invoice, retries any
answer but 200 for about a day, and has no event id: a callback is known by what it says
(invoice id, status, transaction ids), and applying one is made harmless to repeat. Reading is
:meth:`Callback.parse` (tolerant of fields it does not know, strict about the ones it uses);
applying is :meth:`CallbackStore.apply`, one atomic script (``lua/callback.lua``) pipelined with
the store's Barrier, so a callback is acknowledged only once it is as durable as an enqueue.
The HTTP side (authentication, answers, the status task) is ``receiver``'s.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from redis.client import Pipeline

from invoice_worker import constants as c
from invoice_worker.constants import DERIVED_SEPARATOR, CallbackOutcome, InvoiceStatus
from invoice_worker.errors import InvalidCallbackError
from invoice_worker.models import validation_messages
from invoice_worker.privacy import redact
from invoice_worker.record import JobRecord
from invoice_worker.scripts import CallbackArgs, Lua, argv, flatten, load, script_conf
from invoice_worker.store import JobStore

#: Largest callback body read (the provider's are about 1-2 KiB; one per instalment).
MAX_CALLBACK_BYTES = 256 * 1024
#: Most transactions one callback may list.
MAX_TRANSACTIONS = 200
#: Newest dead letters kept, and how much of each body.
DEAD_LETTER_MAX_ENTRIES = 1000
DEAD_LETTER_MAX_BYTES = 16 * 1024
_DERIVED = re.compile(rf"^(?P<base>[^{DERIVED_SEPARATOR}]+){DERIVED_SEPARATOR}r(?P<n>[1-9]\d*)$")
_HASHED = re.compile(
    rf"^[^{DERIVED_SEPARATOR}]*{DERIVED_SEPARATOR}[0-9a-f]{{16}}{DERIVED_SEPARATOR}r(?P<n>[1-9]\d*)$"
)


def _amount(value: Any) -> Any:
    # JSON numbers arrive as Decimal (parse_float), strings as the provider writes them; either
    # is bounded before arithmetic, as a request's amount is.
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise ValueError("must be a decimal number")
    text = str(value).strip()
    if len(text) > 64:
        raise ValueError("must be at most 64 characters")
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise ValueError("must be a decimal number") from None
    if not number.is_finite() or number < 0 or (number and number.adjusted() > 30):
        raise ValueError("must be a finite, non-negative amount")
    return number


def _text_id(value: Any) -> Any:
    # Older API versions used integer foreign ids; ids are compared as text.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _count(value: Any) -> Any:
    # ``confirmations`` is sometimes a string, sometimes an integer (the provider's examples).
    if isinstance(value, str) and value.strip().isdecimal():
        return int(value)
    return value


Amount = Annotated[Decimal, BeforeValidator(_amount)]


class Transaction(BaseModel):
    """One blockchain transaction a callback reports (unknown fields ignored)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: int
    currency: str | None = Field(None, max_length=20)
    amount: Amount
    txid: str | None = Field(None, max_length=200)
    confirmations: Annotated[int, BeforeValidator(_count)] = Field(0, ge=0)


class Money(BaseModel):
    """A currency and an amount (``currency_received``)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    currency: str = Field(max_length=20)
    amount: Amount


class Sent(Money):
    """What the payer sends (``currency_sent``), with what is still unpaid."""

    remaining_amount: Amount | None = None


class Callback(BaseModel):
    """An invoice callback, shaped as the provider documents it; fields we do not use (and new
    ones the provider adds) are ignored, the ones we use are checked."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: int = Field(ge=0)
    foreign_id: Annotated[str, BeforeValidator(_text_id)] = Field(min_length=1, max_length=300)
    type: str = "invoice"
    status: InvoiceStatus
    error: str | None = None
    currency_sent: Sent | None = None
    currency_received: Money | None = None
    transactions: list[Transaction] = Field(default_factory=list, max_length=MAX_TRANSACTIONS)

    @classmethod
    def parse(cls, raw: bytes) -> Callback:
        """Read a callback from its raw body.

        Raises:
            InvalidCallbackError: naming what is wrong, never echoing the body.
        """
        try:
            data = json.loads(raw, parse_float=Decimal)
        except (ValueError, RecursionError):
            raise InvalidCallbackError("not JSON") from None
        if not isinstance(data, dict):
            raise InvalidCallbackError("not a JSON object")
        try:
            callback = cls.model_validate(data)
        except ValidationError as exc:
            detail = "; ".join(f"{k}: {v}" for k, v in validation_messages(exc).items())
            raise InvalidCallbackError(redact(f"not an invoice callback: {detail}")) from None
        if callback.type != "invoice":
            raise InvalidCallbackError(redact(f"not an invoice callback (type {callback.type!r})"))
        return callback

    @property
    def identity(self) -> str:
        """What makes two callbacks the same one: the invoice, its status, its transactions."""
        txs = ",".join(str(i) for i in sorted({tx.id for tx in self.transactions}))
        return hashlib.sha256(f"{self.id}|{self.status}|{txs}".encode()).hexdigest()[:32]

    @property
    def error_text(self) -> str:
        """The provider's error text, bounded and masked (it is shown in records and events)."""
        return redact(self.error or "")

    def transactions_json(self) -> str:
        """The transactions as the record keeps them: an object by id, amounts as text."""
        out = {}
        for tx in self.transactions:
            kept = {"id": str(tx.id), "amount": format(tx.amount, "f")}
            if tx.currency:
                kept["currency"] = tx.currency
            if tx.txid:
                kept["txid"] = tx.txid
            out[str(tx.id)] = {**kept, "confirmations": tx.confirmations}
        return json.dumps(out, separators=(",", ":"))

    def invoice_fields(self) -> dict[str, str]:
        """What the payer must send and what the invoice is worth, as the record keeps them."""
        fields = {}
        if self.currency_sent is not None:
            fields["sent_amount"] = format(self.currency_sent.amount, "f")
            fields["sent_currency"] = self.currency_sent.currency
        if self.currency_received is not None:
            fields["received_amount"] = format(self.currency_received.amount, "f")
            fields["received_currency"] = self.currency_received.currency
        return fields


def job_of(provider_id: str) -> tuple[str | None, int]:
    """The foreign_id of the job a provider id was sent for, and the id's generation.

    ``order-1`` is generation 0 of ``order-1``, ``order-1~r2`` generation 2. A hashed derived id
    (a foreign_id too long to carry whole) gives (None, generation): its job is found through
    its alias. An id no job of ours could have sent gives (None, -1).
    """
    if DERIVED_SEPARATOR not in provider_id:
        return provider_id, 0
    if match := _DERIVED.fullmatch(provider_id):
        return match["base"], int(match["n"])
    if match := _HASHED.fullmatch(provider_id):
        return None, int(match["n"])
    return None, -1


def is_hashed(provider_id: str) -> bool:
    """True for a derived id that does not carry its foreign_id whole (see job_of)."""
    return _HASHED.fullmatch(provider_id) is not None


@dataclass(frozen=True)
class Applied:
    """What applying one callback came to."""

    outcome: CallbackOutcome
    #: The job's invoice status moved (one status event was appended).
    changed: bool
    #: The job's foreign_id (None when no job of ours has the callback's id).
    foreign_id: str | None
    #: The job record, when its status task is owed the current status (send it, then mark).
    notify: JobRecord | None = None
    #: False when the Barrier did not confirm the write in time: answer 503.
    durable: bool = True


class CallbackStore:
    """The Redis side of callbacks, on a JobStore's connection, keys and Barrier."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.settings = store.settings
        self.unknown = f"{store.prefix}{c.CALLBACK_UNKNOWN_KEY}"
        self.dead_letters = f"{store.prefix}{c.CALLBACK_DEAD_LETTER_KEY}"
        self._apply = Lua(store.redis, load("callback", script_conf(store.settings)))

    def key(self, invoice_id: int) -> str:
        """The key of an invoice's raw bodies and seen identities."""
        return f"{self.store.prefix}{c.CALLBACK_KEY}{invoice_id}"

    def apply(self, callback: Callback, raw: bytes) -> Applied:
        """Keep ``raw`` and apply ``callback`` to its job, durably (see the module docstring).

        Raises:
            redis.RedisError: the store is unreachable (nothing may have been kept).
        """
        store = self.store
        foreign_id, generation = job_of(callback.foreign_id)
        if foreign_id is None and generation >= 0:
            foreign_id = store.redis.get(store.alias(callback.foreign_id))  # type: ignore[assignment]
        # A key no job can have ('~' is refused in foreign ids) when the id names none.
        job_id = foreign_id if foreign_id is not None else DERIVED_SEPARATOR
        args = CallbackArgs(
            store.token(), str(callback.id), callback.foreign_id, generation,
            hashlib.sha256(raw).hexdigest(), raw.decode("utf-8", "replace"), callback.identity,
            str(callback.status), callback.error_text, callback.transactions_json(),
            store.channel(job_id), flatten(callback.invoice_fields()),
        )  # fmt: skip
        keys = [store.key(job_id), store.stream, store.stats, self.key(callback.id)]
        keys += [self.unknown, store.copy(job_id)]
        if store.barrier is None:  # one round trip: a pipeline asks SCRIPT EXISTS first
            reply, durable = self._apply(keys=keys, args=argv(args)), True
        else:
            [reply], durable = store.durably(
                lambda pipe: self._apply(keys=keys, args=argv(args), client=pipe)
            )
        outcome, changed, notify, raw_record = reply
        record = None
        if notify:
            record = JobRecord.from_redis(dict(zip(raw_record[::2], raw_record[1::2], strict=True)))
        return Applied(
            CallbackOutcome(outcome), bool(changed), None if outcome == "unknown" else foreign_id,
            record, durable,
        )  # fmt: skip

    def dead_letter(self, raw: bytes, reason: str) -> bool:
        """Keep a signed callback that cannot be read or applied, raw (never dropped), and count
        it; returns whether the write is durable.

        Raises:
            redis.RedisError: the store is unreachable.
        """
        entry = json.dumps(
            {
                "at": time.time(),
                "reason": redact(reason),
                "length": len(raw),
                "truncated": len(raw) > DEAD_LETTER_MAX_BYTES,
                "payload": raw[:DEAD_LETTER_MAX_BYTES].decode("utf-8", "replace"),
            }
        )

        def write(pipe: Pipeline) -> None:
            pipe.lpush(self.dead_letters, entry)
            pipe.ltrim(self.dead_letters, 0, DEAD_LETTER_MAX_ENTRIES - 1)
            pipe.expire(self.dead_letters, self.settings.callback_ttl)
            pipe.hincrby(self.store.stats, "callbacks:dead_letter", 1)

        return self.store.durably(write)[1]

    def count(self, name: str) -> None:
        """Add one to the ``callbacks:<name>`` counter (refusals, which change nothing else)."""
        self.store.redis.hincrby(self.store.stats, f"callbacks:{name}", 1)

    def mark_notified(self, record: JobRecord) -> None:
        """Record that the job's status task was sent its current invoice status."""
        if record.invoice_status is not None:
            self.store.mark(record.foreign_id, status_notified=str(record.invoice_status))
