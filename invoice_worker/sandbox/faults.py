"""The sandbox's fault settings: the outcomes a create or cancel call can get, and how often.

The outcomes, as the sandbox plays them:

    ok                 process normally
    500, 502, 503      fail before processing, with a plain-text or HTML body like a proxy's
    429, 429_bare      rate limited: JSON and Retry-After, or a CDN's `error code: 1015` without
    timeout            stall `stall_seconds`, then process normally: the invoice may exist although
                       the client gave up (a stopping sandbox drops the request instead)
    commit_then_drop   create the invoice, then close the connection without a response
    commit_then_502    create the invoice, then answer 502

and, for a call the sandbox processed (the invoice is created or cancelled), answers that are not
what a client should accept; a call that fails (e.g. a duplicate foreign_id) gets its real answer:

    answer_wrong_id        a 200 showing another invoice (another foreign_id, url, amount)
    answer_bad_url         a 200 whose url is `javascript:alert(1)`
    answer_wrong_amount    a 200 whose amount is 1 more than the invoice's
    answer_wrong_currency  a 200 in another currency
    answer_huge            the real 200 padded to `huge_bytes` (streamed, never built in memory)
    trickle                the real answer, status line included, one byte every `trickle_seconds`

Callbacks (see `callbacks`) have faults of their own, each drawn per callback (out of order: per
payer action) from a generator apart from the calls', so a seed replays both:

    callback_duplicate       the first attempt is sent twice, one copy after the other
    callback_concurrent      the first attempt is sent twice at once, on two connections
    callback_bad_signature   the first attempt is signed with another secret (retries are not)
    callback_out_of_order    an action's callbacks are queued newest first (confirmed before
                             processing)
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from decimal import Decimal
from typing import Any

ENV_PREFIX = "INVOICE_SANDBOX_"
# The outcome of each Faults rate field, in the order a random draw walks them.
_RATED = {
    "error_500": "500",
    "error_502": "502",
    "error_503": "503",
    "rate_limit": "429",
    "rate_limit_bare": "429_bare",
    "timeout": "timeout",
    "commit_then_drop": "commit_then_drop",
    "commit_then_502": "commit_then_502",
    # Appended, so a seed replays the earlier outcomes the same while these rates are 0.
    "answer_wrong_id": "answer_wrong_id",
    "answer_bad_url": "answer_bad_url",
    "answer_wrong_amount": "answer_wrong_amount",
    "answer_wrong_currency": "answer_wrong_currency",
    "answer_huge": "answer_huge",
    "trickle": "trickle",
}
OUTCOMES = frozenset({"ok", *_RATED.values()})
# The callback fault of each Faults rate field that applies to one callback.
_CALLBACK_RATED = {
    "callback_duplicate": "duplicate",
    "callback_concurrent": "concurrent",
    "callback_bad_signature": "bad_signature",
}
_RATES = (*_RATED, *_CALLBACK_RATED, "callback_out_of_order")
#: The outcomes that answer a processed call with a small 200 body showing another invoice.
HOSTILE = frozenset(
    {"answer_wrong_id", "answer_bad_url", "answer_wrong_amount", "answer_wrong_currency"}
)
BAD_URL = "javascript:alert(1)"
#: The fields read as integers; every other field but `seed` is a float.
INTEGERS = frozenset({"retry_after", "seed", "huge_bytes"})
# The upper bound of each field that is not a rate (rates are 0..1).
_MAXIMA = {
    "latency_ms": 1e6, "jitter_ms": 1e6, "retry_after": 1e6, "stall_seconds": 1e6,
    "trickle_seconds": 60, "huge_bytes": 1 << 32,
}  # fmt: skip
# (status, content type, body) of the outcomes that answer instead of processing the call.
REPLIES = {
    "500": (500, "text/plain", b"Internal Server Error"),
    "502": (502, "text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
    "503": (503, "text/html", b"<html><body><h1>503 Service Unavailable</h1></body></html>"),
    "429": (429, "application/json", b'{"error":"Too Many Attempts.","code":"too_many_requests"}'),
    "429_bare": (429, "text/plain", b"error code: 1015"),
}


@dataclass
class Faults:
    """Fault rates (each 0..1) and timings for create and cancel calls, and for callbacks.

    A call draws one number in [0, 1) and takes the first outcome, in field order, whose
    cumulative rate exceeds it: rates are shares of the traffic while they sum to at most 1.
    The callback rates are drawn each on its own (a callback may be both duplicated and badly
    signed).
    """

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_500: float = 0.0
    error_502: float = 0.0
    error_503: float = 0.0
    rate_limit: float = 0.0
    rate_limit_bare: float = 0.0
    timeout: float = 0.0
    commit_then_drop: float = 0.0
    commit_then_502: float = 0.0
    answer_wrong_id: float = 0.0
    answer_bad_url: float = 0.0
    answer_wrong_amount: float = 0.0
    answer_wrong_currency: float = 0.0
    answer_huge: float = 0.0
    trickle: float = 0.0
    callback_duplicate: float = 0.0
    callback_concurrent: float = 0.0
    callback_bad_signature: float = 0.0
    callback_out_of_order: float = 0.0
    retry_after: int = 1
    stall_seconds: float = 30.0
    trickle_seconds: float = 0.3
    huge_bytes: int = 50_000_000
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in (*_RATES, *_MAXIMA):
            if not 0 <= getattr(self, name) <= _MAXIMA.get(name, 1):
                raise ValueError(f"{name} out of range: {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: Faults | None = None) -> Faults:
        """Return `base` (default: no faults) with the fields in `data` replaced.

        Raises:
            ValueError: for an unknown field, or a value of the wrong type or out of range.
        """
        values: dict[str, Any] = {}
        for name, value in data.items():
            if name not in {f.name for f in fields(cls)}:
                raise ValueError(f"unknown fault field {name!r}")
            kind = int if name in INTEGERS else float
            try:
                values[name] = None if name == "seed" and value is None else kind(value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{name}={value!r}: {e}") from e
        return replace(base or cls(), **values)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Faults:
        """Read INVOICE_SANDBOX_<FIELD> variables, e.g. INVOICE_SANDBOX_ERROR_502=0.1.

        Raises:
            ValueError: as `from_dict`.
        """
        names = (f.name for f in fields(cls))
        return cls.from_dict({n: v for n in names if (v := environ.get(ENV_PREFIX + n.upper()))})

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict."""
        return asdict(self)

    def outcome(self, draw: float) -> str:
        """Return the outcome of a call that drew `draw` in [0, 1): "ok" past every rate."""
        edge = 0.0
        for rate, outcome in _RATED.items():
            edge += getattr(self, rate)
            if draw < edge:
                return outcome
        return "ok"

    def callback_faults(self, rng: random.Random) -> frozenset[str]:
        """Draw the faults of one callback: a subset of "duplicate", "concurrent",
        "bad_signature". Every rate draws, so a seed replays whatever the rates are."""
        hits = set()
        for rate, fault in _CALLBACK_RATED.items():
            if rng.random() < getattr(self, rate):
                hits.add(fault)
        return frozenset(hits)

    def out_of_order(self, rng: random.Random) -> bool:
        """Draw whether one action's callbacks are queued newest first."""
        return rng.random() < self.callback_out_of_order


def hostile(outcome: str, data: dict[str, Any], other: dict[str, Any] | None) -> dict[str, Any]:
    """Return the invoice `data` of a 200 answer as the HOSTILE `outcome` shows it.

    `answer_wrong_id` shows `other` (another invoice, as a mixed-up cache or proxy would), or
    `data` under a made-up foreign_id if there is no other invoice.

    Raises:
        ValueError: if `outcome` is not in HOSTILE.
    """
    match outcome:
        case "answer_wrong_id":
            return other or {**data, "foreign_id": f"{data['foreign_id']}-other"}
        case "answer_bad_url":
            return {**data, "url": BAD_URL}
        case "answer_wrong_amount":
            return {**data, "amount": f"{Decimal(data['amount']) + 1:f}"}
        case "answer_wrong_currency":
            return {**data, "currency": "ETH" if data["currency"] != "ETH" else "BTC"}
    raise ValueError(f"not a hostile answer: {outcome!r}")
