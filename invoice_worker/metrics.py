"""Prometheus metrics for the fleet, read from Redis at scrape time (``invoice-worker metrics``).

One exporter serves the whole fleet: the counters live in Redis (kept by the store's scripts), so
it needs no access to the workers and any number of them may come and go. Flower's own
``/metrics`` adds per-worker task counts and runtimes.
"""

from __future__ import annotations

from collections.abc import Iterator

from celery import Celery
from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from invoice_worker import constants as c
from invoice_worker.config import Settings
from invoice_worker.constants import CallbackOutcome, Cleanup, DeferReason, JobState
from invoice_worker.fleet import CIRCUIT_LEVEL, job_stats, provider_status
from invoice_worker.store import JobStore
from invoice_worker.sweeper import broker_queue_depth

ACTIVE = (JobState.QUEUED, JobState.PROCESSING, JobState.RETRYING)


class FleetCollector(Collector):
    """Collects queue depth, jobs by state, retries, latency and the circuit on each scrape."""

    def __init__(self, store: JobStore, settings: Settings, app: Celery) -> None:
        self.store = store
        self.settings = settings
        self.app = app

    def collect(self) -> Iterator[Metric]:
        stats = job_stats(self.store)
        queue = self.settings.queue
        depth = GaugeMetricFamily(
            "invoice_queue_depth", "Messages waiting in the broker queue", labels=["queue"]
        )
        depth.add_metric([queue], float(broker_queue_depth(self.app, queue)))
        yield depth
        active = GaugeMetricFamily("invoice_jobs", "Jobs not yet final, by state", labels=["state"])
        for state in ACTIVE:
            active.add_metric([state], max(0.0, stats.get(f"jobs:{state}", 0.0)))
        yield active
        done = CounterMetricFamily(
            "invoice_jobs_final", "Jobs that reached a final state", labels=["state"]
        )
        for state in sorted(c.FINAL_STATES):
            done.add_metric([state], stats.get(f"final:{state}", 0.0))
        yield done
        yield CounterMetricFamily(
            "invoice_retries",
            "Attempts scheduled after a transient error",
            value=stats.get("retries", 0.0),
        )
        deferred = CounterMetricFamily(
            "invoice_deferrals", "Claims deferred by the fleet gate", labels=["reason"]
        )
        for reason in DeferReason:
            deferred.add_metric([reason], stats.get(f"deferrals:{reason}", 0.0))
        yield deferred
        yield CounterMetricFamily(
            "invoice_dead_letters",
            "Broker entries set aside undelivered (see <prefix>dead-letter)",
            value=stats.get("dead_letters", 0.0),
        )
        yield from _callbacks(stats)
        yield _latency(stats)
        status = provider_status(self.store, self.settings)
        yield GaugeMetricFamily(
            "invoice_circuit_state",
            "Provider circuit: 0 closed, 1 half-open, 2 open",
            value=CIRCUIT_LEVEL.get(status["circuit"], 0),
        )
        yield CounterMetricFamily(
            "invoice_circuit_opened",
            "Times the circuit opened",
            value=stats.get("circuit_opened", 0.0),
        )
        yield GaugeMetricFamily(
            "invoice_provider_paused_seconds",
            "Seconds the fleet still waits after a 429",
            value=status["paused_for"],
        )
        yield GaugeMetricFamily(
            "invoice_cleanups_pending",
            "Invoices of final jobs whose cancel is still being retried",
            value=status["pending_cleanups"],
        )
        settled = CounterMetricFamily(
            "invoice_cleanups_settled", "Pending cleanups settled, by outcome", labels=["outcome"]
        )
        for outcome in (Cleanup.CANCELLED, Cleanup.FINAL, Cleanup.MAY_REMAIN):
            settled.add_metric([outcome], stats.get(f"cleanups:{outcome}", 0.0))
        yield settled


def _callbacks(stats: dict[str, float]) -> Iterator[Metric]:
    received = CounterMetricFamily(
        "invoice_callbacks", "Authenticated provider callbacks, by outcome", labels=["outcome"]
    )
    for outcome in (*CallbackOutcome, "dead_letter"):
        received.add_metric([outcome], stats.get(f"callbacks:{outcome}", 0.0))
    yield received
    refused = CounterMetricFamily(
        "invoice_callbacks_refused", "Callbacks refused with 403, by reason", labels=["reason"]
    )
    for reason in ("no_key", "bad_key", "no_signature", "bad_signature"):
        refused.add_metric([reason], stats.get(f"callbacks:refused:{reason}", 0.0))
    yield refused
    yield CounterMetricFamily(
        "invoice_reissued", "Failed invoices re-issued", value=stats.get("reissued", 0.0)
    )


def _latency(stats: dict[str, float]) -> HistogramMetricFamily:
    buckets, total = [], 0.0
    for i, bound in enumerate(c.LATENCY_BUCKETS):
        total += stats.get(f"latency_bucket:{i}", 0.0)
        buckets.append((str(bound), total))
    buckets.append(("+Inf", total + stats.get("latency_bucket:inf", 0.0)))
    return HistogramMetricFamily(
        "invoice_provider_latency_seconds", "Time spent in provider calls per attempt",
        buckets=buckets, sum_value=stats.get("latency_sum", 0.0),
    )  # fmt: skip


def serve(settings: Settings, port: int, addr: str = "0.0.0.0") -> CollectorRegistry:  # noqa: S104
    """Serve ``/metrics`` on ``addr:port`` in a background thread; returns the registry."""
    registry = CollectorRegistry()
    from invoice_worker.app import create_app

    app = create_app(settings)
    registry.register(FleetCollector(JobStore.from_settings(settings), settings, app))
    start_http_server(port, addr=addr, registry=registry)
    return registry
