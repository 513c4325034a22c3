"""Non-Python producers against a real worker: celery-node, and the README's raw message.

celery-node is installed from ``tests/node/package-lock.json`` by ``make install`` (nothing is
downloaded here); the Node tests are skipped only where ``node`` itself is absent.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

from invoice_worker.config import Settings
from invoice_worker.constants import ErrorCode, JobState
from invoice_worker.devstack.embedded import EmbeddedRedis
from invoice_worker.devstack.processes import ChildProcess, worker_process
from invoice_worker.producer import Producer
from invoice_worker.record import JobRecord
from invoice_worker.sandbox import Sandbox
from invoice_worker.store import JobStore
from tests.conftest import live, make_settings, new_id, request_data

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent
NODE_DIR = Path(__file__).parent / "node"
ENQUEUE_JS = NODE_DIR / "enqueue.js"
BUYER = "buyer@example.com"
# celery-node's own API, as a new user writes it first: no repr headers, push not awaited.
APPLY_ASYNC = """
const { createClient } = require("celery-node");
const url = process.env.INVOICE_BROKER_URL;
const client = createClient(url, url, process.env.INVOICE_QUEUE);
const result = client.createTask("invoices.create").applyAsync([], JSON.parse(process.argv[1]));
client.isReady().then(() => client.disconnect()).then(() => console.log(result.taskId));
"""


class Stack:
    """One worker for the module's tests, and the task events it sends (Flower's view)."""

    def __init__(self, settings: Settings, worker: ChildProcess) -> None:
        self.settings = settings
        self.worker = worker
        self.store = JobStore.from_settings(settings)
        self.events: list[dict[str, Any]] = []
        self._pubsub = redis.Redis.from_url(settings.broker_url).pubsub()  # type: ignore[no-untyped-call, unused-ignore]
        # kombu's Redis transport carries Celery's event exchange on pub/sub channels.
        self._pubsub.psubscribe(**{"*celeryev*": self._on_event})
        self._thread = self._pubsub.run_in_thread(sleep_time=0.05, daemon=True)

    def _on_event(self, item: dict[str, Any]) -> None:
        body = json.loads(base64.b64decode(json.loads(item["data"])["body"]))
        # The worker sends task events in batches (Celery's buffer_group), others one by one.
        self.events.extend(body if isinstance(body, list) else [body])

    def final(self, foreign_id: str, timeout: float = 15) -> JobRecord:
        record = self.store.wait(foreign_id, timeout)
        assert record is not None, foreign_id
        assert record.final, record
        return record

    def kept(self, foreign_id: str) -> dict[str, Any]:
        """The copy of the message's kwargs the worker kept (as it read them)."""
        kwargs = self.store.redis.get(self.store.copy(foreign_id))
        assert kwargs, foreign_id
        return dict(json.loads(kwargs))

    def received(self, task_id: str) -> dict[str, Any]:
        """The ``task-received`` event of ``task_id``: what Flower shows of its arguments."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for event in list(self.events):
                if event.get("type") == "task-received" and event.get("uuid") == task_id:
                    return event
            time.sleep(0.05)
        raise AssertionError(f"no task-received event for {task_id}")

    def close(self) -> None:
        self._thread.stop()
        self._thread.join(5)
        self._pubsub.close()
        self.store.redis.close()


@pytest.fixture(scope="module")
def stack(
    redis_server: EmbeddedRedis, sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    settings = make_settings(redis_server.url, sandbox.url)
    worker = worker_process(settings, tmp_path_factory.mktemp("worker"), concurrency=4)
    stack = Stack(settings, worker.start(ready="ready."))
    yield stack
    worker.stop()
    stack.close()
    assert BUYER not in worker.log()


def readme_block(start: str) -> str:
    """The code block of the README's non-Python section that begins with ``start``."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Message contract for non-Python producers")[1].split("\n## ")[0]
    blocks = re.findall(r"^```\w*\n(.*?)^```$", section, flags=re.S | re.M)
    [block] = [b for b in blocks if b.startswith(start)]
    return str(block)


# -- celery-node ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node() -> str:
    """The ``node`` binary, with celery-node installed beside the script."""
    binary = shutil.which("node")
    if binary is None:
        pytest.skip("needs node (the celery-node producer runs in it)")
    if not (NODE_DIR / "node_modules" / "celery-node").is_dir():
        pytest.fail("celery-node is not installed: run `make install` (npm ci --prefix tests/node)")
    return binary


def node_enqueue(node: str, stack: Stack, kwargs: dict[str, Any], script: str = "") -> str:
    """Run ``tests/node/enqueue.js`` (or ``script``); returns the task id it sent."""
    env = {**os.environ, "INVOICE_BROKER_URL": stack.settings.broker_url}
    env["INVOICE_QUEUE"] = stack.settings.queue
    argv = [node, "-e", script] if script else [node, str(ENQUEUE_JS)]
    done = subprocess.run(
        [*argv, json.dumps(kwargs)], cwd=NODE_DIR,
        env=env, capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_readme_node_example_is_the_tested_script() -> None:
    block = readme_block('const { createClient } = require("celery-node");')
    assert block in ENQUEUE_JS.read_text()


def test_node_number_amount_creates_the_invoice(node: str, stack: Stack, sandbox: Sandbox) -> None:
    # Given a JavaScript order whose amount is the JSON number 0.1
    request = request_data(amount=0.1, email_user=BUYER)
    # When celery-node enqueues it
    task_id = node_enqueue(node, stack, {"request": request, "deadline": time.time() + 60})
    # Then the invoice is created once, for exactly 0.1, and Flower sees no e-mail address
    record = stack.final(request["foreign_id"])
    assert record.state is JobState.CREATED, record
    assert record.task_id == task_id
    [invoice] = live(sandbox, request["foreign_id"])
    # (the provider answers 8 places; the body held 0.1, its copy in the record says so)
    assert Decimal(invoice["amount"]) == Decimal(str(record.amount)) == Decimal("0.1")
    assert stack.kept(request["foreign_id"])["request"]["amount"] == "0.1"
    event = stack.received(task_id)
    assert json.loads(event["kwargs"])["request"]["email_user"] == "***"
    assert BUYER not in json.dumps(event)
    # And the same order from Python, amount "0.1", is the same request: no conflict, no resend
    producer = Producer(stack.settings)
    try:
        again = producer.enqueue({**request, "amount": "0.1"})
    finally:
        producer.close()
    assert (again.state, again.task_id) == (JobState.CREATED, task_id)
    assert len(live(sandbox, request["foreign_id"])) == 1


def test_node_invalid_message_fails_with_field_errors(
    node: str, stack: Stack, sandbox: Sandbox
) -> None:
    # Given a message with 0.1 + 0.2 as its amount and no title
    request = request_data(amount=0.1 + 0.2)
    del request["title"]
    # When celery-node enqueues it
    node_enqueue(node, stack, {"request": request, "deadline": None})
    # Then it fails, naming both fields, and the provider is never called
    record = stack.final(request["foreign_id"])
    assert record.state is JobState.FAILED
    assert record.error_code == ErrorCode.INVALID_MESSAGE
    assert set(record.errors) == {"request.amount", "request.title"}
    assert "at most 8 places" in record.errors["request.amount"]
    assert sandbox.create_calls(request["foreign_id"]) == 0


def test_node_message_past_its_deadline_expires(node: str, stack: Stack, sandbox: Sandbox) -> None:
    request = request_data(amount=0.5)
    node_enqueue(node, stack, {"request": request, "deadline": time.time() - 60})
    record = stack.final(request["foreign_id"])
    assert record.state is JobState.EXPIRED
    assert sandbox.create_calls(request["foreign_id"]) == 0


def test_node_apply_async_shows_no_arguments(node: str, stack: Stack, sandbox: Sandbox) -> None:
    request = request_data(amount=0.25, email_user=BUYER)
    task_id = node_enqueue(node, stack, {"request": request}, script=APPLY_ASYNC)
    assert stack.final(request["foreign_id"]).state is JobState.CREATED
    # Celery shows a protocol-2 message's kwargsrepr header, and celery-node sends none
    assert stack.received(task_id)["kwargs"] == ""


# -- the README's raw message --------------------------------------------------------------


def test_readme_raw_message_creates_the_invoice(
    stack: Stack, sandbox: Sandbox, tmp_path: Path
) -> None:
    # Given the README's shell block, aimed at this test's server, queue and a fresh order
    script = readme_block("BODY=$(base64")
    foreign_id = new_id()
    swaps = {
        '"order-42"': f'"{foreign_id}"',
        '\\"order-42\\"': f'\\"{foreign_id}\\"',
        "LPUSH invoices ": f"LPUSH {stack.settings.queue} ",
        '"routing_key": "invoices"': f'"routing_key": "{stack.settings.queue}"',
        "redis-cli ": f"redis-cli -u {stack.settings.broker_url} ",
    }
    for old, new in swaps.items():
        assert old in script, old
        script = script.replace(old, new)
    assert BUYER not in script.split("kwargsrepr")[1]
    env = {**os.environ}
    if shutil.which("redis-cli") is None:  # the same LPUSH through redis-py
        shim = tmp_path / "redis-cli"
        shim.write_text(
            f"#!{sys.executable}\nimport sys, redis\n"
            "redis.Redis.from_url(sys.argv[2]).lpush(sys.argv[4], sys.argv[5])\n"
        )
        shim.chmod(0o755)
        env["PATH"] = f"{tmp_path}{os.pathsep}{env['PATH']}"
    # When bash runs it
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env=env, capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # Then the invoice is created for 0.1, and the masked kwargsrepr is what Flower shows
    record = stack.final(foreign_id)
    assert record.state is JobState.CREATED, record
    [invoice] = live(sandbox, foreign_id)
    assert Decimal(invoice["amount"]) == Decimal("0.1")
    assert stack.kept(foreign_id)["request"]["amount"] == "0.1"
    event = stack.received(record.task_id)
    assert json.loads(event["kwargs"])["request"]["email_user"] == "***"
    assert BUYER not in json.dumps(event)
