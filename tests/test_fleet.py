"""The fleet as one client: rate limit, 429 pause and circuit breaker shared through Redis."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from invoice_worker import constants as c
from invoice_worker.config import Settings
from invoice_worker.constants import Circuit, ErrorCode, JobState
from invoice_worker.fleet import provider_status
from invoice_worker.job import InvoiceJob
from invoice_worker.producer import Producer
from invoice_worker.record import JobRecord
from invoice_worker.sandbox import Faults, Sandbox
from tests.conftest import KEY, SECRET, job_kwargs, make_job, make_settings, request_data


def run(job: InvoiceJob, kwargs: dict[str, Any], owner: str = "o") -> Any:
    return job.run(kwargs, task_id="t", owner=owner)


def test_rate_limit_defers_with_spaced_slots_and_no_attempt(
    settings: Settings, sandbox: Sandbox
) -> None:
    job = make_job(settings.replace(provider_rate_limit=2, provider_burst=1))
    jobs = [job_kwargs() for _ in range(4)]
    outcomes = [run(job, kwargs) for kwargs in jobs]
    assert outcomes[0].record.state == JobState.CREATED
    waits = [o.retry_in for o in outcomes[1:]]
    # Each turned-away job holds its own slot, one interval (0.5 s) after the previous one.
    assert waits == pytest.approx([0.5, 1.0, 1.5], abs=0.1)
    record = job.store.get(jobs[3]["request"]["foreign_id"])
    assert record is not None
    assert (record.state, record.attempts, record.deferred) == (
        JobState.RETRYING,
        0,
        "rate_limited",
    )
    assert sum(sandbox.create_calls(k["request"]["foreign_id"]) for k in jobs) == 1
    # Coming back at its slot, a job is admitted without queueing again.
    time.sleep(0.55)
    assert run(job, jobs[1]).record.state == JobState.CREATED


def test_429_pauses_the_whole_fleet(settings: Settings, sandbox: Sandbox) -> None:
    job = make_job(settings)
    first = job_kwargs()
    sandbox.script(["429"], foreign_id=first["request"]["foreign_id"])
    assert run(job, first).retry_in == pytest.approx(sandbox.faults.retry_after, abs=0.1)
    other = run(job, job_kwargs())  # another job, maybe on another worker
    assert other.retry_in is not None
    assert 0.5 < other.retry_in <= sandbox.faults.retry_after + 1.1
    status = provider_status(job.store, job.settings)
    assert 0 < status["paused_for"] <= sandbox.faults.retry_after


def test_circuit_opens_probes_and_closes(settings: Settings, sandbox: Sandbox) -> None:
    job = make_job(settings.replace(circuit_threshold=3, circuit_cooldown=0.5, circuit_probes=1))
    # Given three failures in a row
    for _ in range(3):
        kwargs = job_kwargs()
        sandbox.script(["503"], foreign_id=kwargs["request"]["foreign_id"])
        run(job, kwargs)
    assert provider_status(job.store, job.settings)["circuit"] == Circuit.OPEN
    # Then jobs are deferred without calling the provider
    blocked = job_kwargs()
    outcome = run(job, blocked)
    assert outcome.retry_in is not None
    assert sandbox.create_calls(blocked["request"]["foreign_id"]) == 0
    assert job.store.get(blocked["request"]["foreign_id"]).deferred == "circuit_open"  # type: ignore[union-attr]
    # After the cool-down one probe goes through; the others keep waiting
    time.sleep(0.55)
    probe, waiting = job_kwargs(), job_kwargs()
    assert run(job, probe).record.state == JobState.CREATED
    assert provider_status(job.store, job.settings)["circuit"] == Circuit.CLOSED
    assert run(job, waiting).record.state == JobState.CREATED


def test_failed_probe_reopens(settings: Settings, sandbox: Sandbox) -> None:
    job = make_job(settings.replace(circuit_threshold=1, circuit_cooldown=0.3, circuit_probes=1))
    kwargs = job_kwargs()
    sandbox.script(["502", "502"], foreign_id=kwargs["request"]["foreign_id"])
    run(job, kwargs, "a")
    assert provider_status(job.store, job.settings)["circuit"] == Circuit.OPEN
    time.sleep(0.35)
    run(job, kwargs, "b")  # the probe: fails again
    status = provider_status(job.store, job.settings)
    assert status["circuit"] == Circuit.OPEN
    assert status["circuit_open_for"] > 0.1


def test_deadline_still_applies_while_circuit_open(settings: Settings, sandbox: Sandbox) -> None:
    job = make_job(settings.replace(circuit_threshold=1, circuit_cooldown=30))
    kwargs = job_kwargs()
    sandbox.script(["500"], foreign_id=kwargs["request"]["foreign_id"])
    run(job, kwargs)
    late = job_kwargs(deadline=time.time() + 2)
    outcome = run(job, late)
    assert outcome.record is not None
    assert (outcome.record.state, outcome.record.error_code) == (
        JobState.EXPIRED,
        ErrorCode.DEADLINE_PASSED,
    )
    assert "circuit_open" in str(outcome.record.error)
    assert sandbox.create_calls(late["request"]["foreign_id"]) == 0


def test_status_provider_cli(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from invoice_worker import cli

    for name, value in settings.replace(provider_rate_limit=5).to_env().items():
        monkeypatch.setenv(name, value)
    assert cli.main(["status", "--provider", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["circuit"], status["rate_limit"], status["paused_for"]) == (
        Circuit.CLOSED,
        5.0,
        0.0,
    )
    assert cli.main(["status"]) == cli.EXIT_USAGE


# Three real worker processes acting as one client of the provider.
pytestmark_slow = pytest.mark.slow


@pytest.fixture
def fleet(redis_server: Any, start_worker: Any) -> Iterator[Any]:
    def start(sandbox: Sandbox, **overrides: Any) -> Producer:
        settings = make_settings(redis_server.url, sandbox.url, **overrides)
        for pool, concurrency in (("threads", 8), ("threads", 8), ("prefork", 2)):
            workers.append(start_worker(settings, pool=pool, concurrency=concurrency))
        producers.append(Producer(settings))
        return producers[-1]

    producers: list[Producer] = []
    workers: list[Any] = []
    start.workers = workers  # type: ignore[attr-defined]
    yield start
    for producer in producers:
        producer.close()


def wait_all(producer: Producer, ids: list[str], timeout: float) -> list[JobRecord | None]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = producer.store.states(ids)
        if all(s in c.FINAL_STATES for s in states):
            break
        time.sleep(0.2)
    return [producer.get(fid) for fid in ids]


@pytestmark_slow
def test_fleet_rate_never_exceeds_limit(fleet: Any) -> None:
    with Sandbox(KEY, SECRET) as sandbox:
        producer = fleet(sandbox, provider_rate_limit=25, provider_burst=5)
        jobs = [request_data() for _ in range(150)]
        producer.enqueue_many(jobs)
        records = wait_all(producer, [j["foreign_id"] for j in jobs], timeout=60)
        per_second = sandbox.stats()["per_second"]
    assert all(getattr(r, "state", None) == JobState.CREATED for r in records)
    print("calls per second:", sorted(per_second.items()))
    assert sum(per_second.values()) == 150
    assert max(per_second.values()) <= 25 + 5, per_second
    # Paced, not merely capped: ~150 / 25 = 6 s of calls.
    assert len(per_second) >= 5


@pytestmark_slow
def test_outage_calls_stay_bounded_and_jobs_complete(fleet: Any) -> None:
    with Sandbox(KEY, SECRET) as sandbox:
        producer = fleet(sandbox, circuit_threshold=5, circuit_cooldown=1.0, circuit_probes=2,
                         max_attempts=30, retry_cap=1.0)  # fmt: skip
        # Given a provider that is down for 6 seconds
        sandbox.set_faults(Faults(error_503=1.0))
        jobs = [request_data() for _ in range(60)]
        producer.enqueue_many(jobs)
        time.sleep(6)
        during = sandbox.stats()["create_calls"]
        sandbox.set_faults(Faults())
        # Then the fleet made a bounded number of calls, and every job completes afterwards
        records = wait_all(producer, [j["foreign_id"] for j in jobs], timeout=60)
    assert all(getattr(r, "state", None) == JobState.CREATED for r in records), [
        getattr(r, "state", None) for r in records
    ]
    print("calls during outage:", during)
    # The circuit's changes are logged once each, by one worker, not once per job.
    logs = "".join(w.log() for w in fleet.workers)
    opened = int(producer.store.redis.hget(producer.store.stats, "circuit_opened") or 0)
    assert opened >= 1
    assert len(re.findall(r"provider circuit open ", logs)) == opened
    # Before opening: at most threshold + calls already in flight (18 slots); then
    # 2 probes per 1 s cool-down.
    assert during <= 5 + 18 + 2 * 7, during
    assert during < len(jobs)
