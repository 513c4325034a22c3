"""The fleet's shared view of the provider, as operators read it (CLI and metrics).

Workers change it only inside the store's scripts (``scripts.py``): the claim passes every job
through the gate (429 pause, circuit breaker, rate limit) and each attempt reports back.
"""

from __future__ import annotations

from typing import Any

from invoice_worker.config import Settings
from invoice_worker.constants import Circuit
from invoice_worker.store import JobStore

CIRCUIT_LEVEL = {Circuit.CLOSED: 0, Circuit.HALF_OPEN: 1, Circuit.OPEN: 2}


def provider_status(store: JobStore, settings: Settings) -> dict[str, Any]:
    """Circuit, pause and rate limiter as the whole fleet sees them right now."""
    raw: dict[str, str] = store.redis.hgetall(store.provider)  # type: ignore[assignment]
    now_ms = _redis_now_ms(store)
    circuit = Circuit(raw.get("circuit", Circuit.CLOSED))
    open_left = max(0.0, (float(raw.get("open_until", 0)) - now_ms) / 1000)
    paused = max(0.0, (float(raw.get("pause_until", 0)) - now_ms) / 1000)
    rate = settings.provider_rate_limit
    backlog = max(0.0, (float(raw.get("tat", 0)) - now_ms) / 1000) if rate else 0.0
    return {
        "circuit": circuit,
        "circuit_open_for": round(open_left, 3) if circuit is Circuit.OPEN else 0.0,
        "recent_failures": int(raw.get("failures", 0)),
        "circuit_threshold": settings.circuit_threshold,
        "paused_for": round(paused, 3),
        "rate_limit": rate,
        "burst": settings.provider_burst,
        "rate_limit_backlog_seconds": round(backlog, 3),
        "pending_cleanups": int(store.redis.zcard(store.cleanups)),
    }


def job_stats(store: JobStore) -> dict[str, float]:
    """The counters the scripts keep (jobs by state, retries, deferrals, latency histogram)."""
    raw: dict[str, str] = store.redis.hgetall(store.stats)  # type: ignore[assignment]
    return {key: float(value) for key, value in raw.items()}


def _redis_now_ms(store: JobStore) -> float:
    seconds, micros = store.redis.time()
    return float(seconds) * 1000 + float(micros) / 1000
