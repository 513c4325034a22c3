"""Flower and worker processes as an operator runs them."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from invoice_worker import constants as c
from invoice_worker.constants import JobState
from invoice_worker.devstack.embedded import EmbeddedRedis, free_port
from invoice_worker.devstack.processes import ChildProcess, flower_process, worker_process
from invoice_worker.producer import Producer
from invoice_worker.sandbox import Faults, Sandbox
from tests.conftest import KEY, SECRET, make_settings, request_data

pytestmark = pytest.mark.slow


def test_flower_shows_task_without_personal_data(
    redis_server: EmbeddedRedis, sandbox: Sandbox, tmp_path: Path
) -> None:
    settings = make_settings(redis_server.url, sandbox.url)
    port = free_port()
    flower = flower_process(settings, tmp_path, port=port, basic_auth="ops:s3cret")
    worker = worker_process(settings, tmp_path, concurrency=2)
    producer = Producer(settings)
    try:
        flower.start(ready="Visit me at")
        worker.start(ready="ready.")
        api = f"http://127.0.0.1:{port}/api"
        # Given Flower is following the worker's events
        deadline = time.monotonic() + 30
        while worker.name not in str(_get(f"{api}/workers?refresh=1")):
            assert time.monotonic() < deadline, flower.log()[-2000:]
            time.sleep(0.3)
        assert requests.get(f"{api}/tasks", timeout=5).status_code == 401
        # When a job runs
        data = request_data(email_user="private.person@example.com")
        record = producer.enqueue(data)
        assert producer.wait(data["foreign_id"], 20).state == JobState.CREATED  # type: ignore[union-attr]
        # Then Flower reports it by name, SUCCESS, and never shows the e-mail address
        info: dict[str, Any] = {}
        while info.get("state") != "SUCCESS":
            assert time.monotonic() < deadline + 30, info
            info = _get(f"{api}/task/info/{record.task_id}")
            time.sleep(0.2)
        assert info["name"] == c.TASK_NAME
        assert "'email_user': '***'" in info["kwargs"]
        # And a message from a producer that did not mask (Celery's plain send_task, which
        # writes an unmasked kwargsrepr) is masked by the worker before its events leave
        plain = request_data(email_user="plain.sender@example.com")
        sent = producer.app.send_task(c.TASK_NAME, kwargs={"request": plain}, queue=settings.queue)
        info = {}
        while info.get("state") != "SUCCESS":
            assert time.monotonic() < deadline + 60, info
            info = _get(f"{api}/task/info/{sent.id}")
            time.sleep(0.2)
        assert "'email_user': ***" in info["kwargs"]  # the text is masked, quote and all
        everything = str(_get(f"{api}/tasks")) + str(info)
        assert "private.person@example.com" not in everything
        assert "plain.sender@example.com" not in everything
        assert SECRET not in everything
        metrics = requests.get(
            f"http://127.0.0.1:{port}/metrics", auth=("ops", "s3cret"), timeout=5
        )
        assert "flower_events_total" in metrics.text
    finally:
        producer.close()
        worker.stop()
        flower.stop()


def test_dev_flower_serves_loopback_only_without_login(
    redis_server: EmbeddedRedis, sandbox: Sandbox, tmp_path: Path
) -> None:
    settings = make_settings(redis_server.url, sandbox.url)
    port = free_port()
    flower = flower_process(settings, tmp_path, port=port)  # as `invoice-worker dev` starts it
    assert "--dev-no-auth" in flower.argv
    try:
        flower.start(ready="Visit me at")
        # The pages need no login (its API still does, unless FLOWER_UNAUTHENTICATED_API is set)
        response = requests.get(f"http://127.0.0.1:{port}/workers", timeout=5)
        assert response.status_code == 200
        assert f"Visit me at http://127.0.0.1:{port}" in flower.log()
    finally:
        flower.stop()


def _get(url: str) -> Any:
    response = requests.get(url, auth=("ops", "s3cret"), timeout=5)
    return response.json() if response.ok else {}


def test_sigterm_lets_running_job_finish(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    with Sandbox(KEY, SECRET, faults=Faults(latency_ms=1500)) as slow:
        settings = make_settings(redis_server.url, slow.url, read_timeout=3.0, lease_seconds=8.0)
        worker = worker_process(settings, tmp_path, concurrency=2).start(ready="ready.")
        producer = Producer(settings)
        data = request_data()
        producer.enqueue(data)
        deadline = time.monotonic() + 10
        while getattr(producer.get(data["foreign_id"]), "state", None) != JobState.PROCESSING:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # When the platform asks the worker to stop mid-call (Kubernetes, Heroku: SIGTERM)
        assert worker.process is not None
        worker.process.send_signal(signal.SIGTERM)
        worker.process.wait(timeout=30)
        # Then the running job finished before the worker exited
        record = producer.get(data["foreign_id"])
        producer.close()
        assert record is not None
        assert record.state == JobState.CREATED
        assert worker.process.returncode == 0
        assert "Warm shutdown" in worker.log()


def _states(*pids: int) -> set[str]:
    """The state letters of `pids` from /proc (R running, S sleeping, T stopped)."""
    stats = (Path(f"/proc/{pid}/stat").read_text() for pid in pids)
    return {stat.rpartition(")")[2].split()[0] for stat in stats}


def _wait_states(pids: tuple[int, int], expected: set[str]) -> None:
    deadline = time.monotonic() + 5
    while not _states(*pids) <= expected:
        assert time.monotonic() < deadline, _states(*pids)
        time.sleep(0.01)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_signal_group_freezes_and_thaws_the_whole_group(tmp_path: Path) -> None:
    # Given a process with a child of its own (as a prefork worker has)
    code = "import subprocess, sys, time\n"
    code += "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    code += "print('child', p.pid, flush=True)\ntime.sleep(60)\n"
    group = ChildProcess("group", [sys.executable, "-c", code], {}, tmp_path).start(ready="child")
    assert group.process is not None
    group.wait_for("\n")
    pids = (group.process.pid, int(group.log().split()[1]))
    try:
        # When the group is sent SIGSTOP, then SIGCONT
        group.signal_group(signal.SIGSTOP)
        # Then both are stopped, then both run again
        _wait_states(pids, {"T"})
        group.signal_group(signal.SIGCONT)
        _wait_states(pids, {"R", "S"})
    finally:
        group.kill()
    assert not group.alive
