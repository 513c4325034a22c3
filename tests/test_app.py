"""What ``create_app(settings)`` sets on ``app.conf``, and that building an app reads nothing
and connects nothing more than once (``invoice_worker.worker`` is the one that reads the env).
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from celery import _state, signals
from celery.utils.dispatch import Signal
from celery.utils.quorum_queues import detect_quorum_queues
from celery.worker.consumer.delayed_delivery import DelayedDelivery

from invoice_worker.app import create_app
from invoice_worker.config import Settings
from invoice_worker.constants import TASK_NAME
from invoice_worker.errors import ConfigError
from invoice_worker.producer import Producer
from invoice_worker.queues import quorum_arguments
from invoice_worker.transport import TRANSPORT
from tests.conftest import make_settings, request_data

ROOT = Path(__file__).resolve().parent.parent
# Valid as a name, invalid as a value: it breaks Settings.load(), i.e. any hidden env read.
# make_settings sets read_timeout explicitly, so explicit settings never look at it.
BAD_ENV = {"INVOICE_READ_TIMEOUT": "not-a-number", "INVOICE_QUEUE": "from-the-environment"}


def offline_settings(**overrides: object) -> Settings:
    return make_settings("redis://127.0.0.1:1/0", "http://127.0.0.1:1", **overrides)


def test_messages_are_json_only() -> None:
    conf = create_app(offline_settings()).conf
    assert conf.task_serializer == "json"
    assert conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"]


def test_delivery_guarantees() -> None:
    conf = create_app(offline_settings()).conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.task_acks_on_timeout is False
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_ignore_result is True
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is False


def test_visibility_timeout_in_both_transport_options() -> None:
    settings = offline_settings(visibility_timeout=42, lease_seconds=4.0)
    conf = create_app(settings).conf
    assert settings.broker_visibility_timeout == 42
    assert conf.broker_transport_options["visibility_timeout"] == 42
    assert conf.result_backend_transport_options["visibility_timeout"] == 42


def test_time_limits_and_events_come_from_the_settings() -> None:
    settings = offline_settings(task_events=False)
    conf = create_app(settings).conf
    assert conf.task_soft_time_limit == settings.soft_time_limit
    assert conf.task_time_limit == settings.hard_time_limit
    assert conf.worker_send_task_events is False
    assert conf.task_send_sent_event is False


def test_routes_and_default_queue() -> None:
    conf = create_app(offline_settings(queue="invoices-eu")).conf
    assert conf.task_default_queue == "invoices-eu"
    assert conf.task_routes == {TASK_NAME: {"queue": "invoices-eu"}}


def test_guarded_transport_and_consumer() -> None:
    settings = offline_settings()
    conf = create_app(settings).conf
    assert conf.broker_url == settings.broker_url  # the URL is left as it is
    assert conf.broker_transport == TRANSPORT
    assert conf.broker_transport_options["dead_letter_key"].startswith(settings.key_prefix)
    assert conf.worker_consumer == "invoice_worker.consumer:Consumer"


def test_amqp_broker_keeps_kombus_transport() -> None:
    conf = create_app(offline_settings(broker_url="amqp://guest:guest@127.0.0.1:1//")).conf
    assert conf.broker_transport is None
    assert conf.worker_consumer == "invoice_worker.consumer:Consumer"


def test_task_registered_and_apps_independent() -> None:
    # Given two apps built in one process, before either is finalized
    finalizers = len(_state._on_app_finalizers)
    first = create_app(offline_settings(queue="q-one"))
    second = create_app(offline_settings(queue="q-two"))
    # Then neither left a hook that registers its task on every app built later
    assert len(_state._on_app_finalizers) == finalizers
    # And each app's task runs with that app's settings (a shared task ran one app's settings
    # in every app, and warned: DuplicateTaskNameWarning)
    for app, queue in [(first, "q-one"), (second, "q-two")]:
        task = app.tasks[TASK_NAME]
        runtime = inspect.getclosurevars(task._decorated_fun).nonlocals["runtime"]
        assert runtime.settings.queue == queue
        assert app.conf.task_default_queue == queue
    assert first.tasks[TASK_NAME] is not second.tasks[TASK_NAME]


def all_signals() -> dict[str, Signal]:
    return {name: s for name, s in vars(signals).items() if isinstance(s, Signal)}


def test_two_apps_do_not_connect_receivers_twice() -> None:
    settings = offline_settings(log_format="json")
    create_app(settings)  # whatever a first app connects, once
    before = {name: len(s.receivers) for name, s in all_signals().items()}
    create_app(settings)
    create_app(offline_settings(log_format="json", queue="other"))
    assert {name: len(s.receivers) for name, s in all_signals().items()} == before
    # The JSON log receivers are connected, exactly once each.
    for signal, uid in [
        (signals.after_setup_logger, "invoice_worker.json_logs"),
        (signals.after_setup_task_logger, "invoice_worker.json_task"),
    ]:
        keys = [key for key, _ in signal.receivers]
        assert [key for key in keys if uid in key] != [], uid
        assert len([key for key in keys if uid in key]) == 1, uid


def test_the_bad_variables_do_break_an_environment_read(monkeypatch: pytest.MonkeyPatch) -> None:
    # Guards the next test: without this, it could pass on variables nothing would refuse.
    for name, value in BAD_ENV.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="INVOICE_READ_TIMEOUT"):
        Settings.load(_env_file=None)


def test_create_app_and_producer_read_no_environment(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    for name, value in BAD_ENV.items():
        monkeypatch.setenv(name, value)
    explicit = Settings(_env_file=None, **settings.model_dump())
    assert explicit.queue == settings.queue
    app = create_app(explicit)
    assert app.conf.task_default_queue == settings.queue
    producer = Producer(explicit)
    try:
        record = producer.enqueue(request_data())
        assert record.task_id
        assert producer.app.conf.task_default_queue == settings.queue
    finally:
        producer.close()


def run_python(code: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INVOICE_")}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={**clean, **env},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_only_the_worker_module_reads_the_environment(tmp_path: Path) -> None:
    # Given every product module except the `celery -A` entry
    modules = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in (ROOT / "invoice_worker").rglob("*.py")
        if path.stem not in ("worker", "__main__")
    )
    assert len(modules) > 20
    # When they are imported with invalid INVOICE_* variables, they import
    imported = run_python(f"import {', '.join(modules)}", BAD_ENV, tmp_path)
    assert imported.returncode == 0, imported.stderr
    # But the entry module refuses the same environment, naming the variable
    entry = run_python("import invoice_worker.worker", BAD_ENV, tmp_path)
    assert entry.returncode != 0
    assert "INVOICE_READ_TIMEOUT" in entry.stderr
    assert "not-a-number" not in entry.stderr  # settings errors never echo values
    # And builds its app from a valid one
    valid = run_python(
        "from invoice_worker.worker import app; print(app.conf.task_default_queue)",
        {"INVOICE_QUEUE": "from-the-environment"},
        tmp_path,
    )
    assert valid.returncode == 0, valid.stderr
    assert valid.stdout.strip() == "from-the-environment"


AMQP_URL = "amqp://guest:guest@127.0.0.1:1//"


def test_classic_amqp_keeps_celerys_default_queue() -> None:
    app = create_app(offline_settings(broker_url=AMQP_URL))
    conf = app.conf
    assert conf.task_queues is None  # Celery declares task_default_queue: direct, classic
    assert conf.task_default_queue_type == "classic"
    assert conf.task_create_missing_queue_type == "classic"
    assert "confirm_publish" not in conf.broker_transport_options
    consumer = SimpleNamespace(app=app)
    assert not DelayedDelivery(consumer).include_if(consumer)
    step = next(s for s in app.steps["consumer"] if s.__name__ == "DeclareDeadLetterQueue")
    assert not step(consumer).include_if(consumer)


def test_quorum_queue_settings() -> None:
    settings = offline_settings(broker_url=AMQP_URL, queue_type="quorum", visibility_timeout=42)
    app = create_app(settings)
    conf = app.conf
    # The invoice queue: quorum, with its delivery limit and dead-letter target, on a topic
    # exchange (native delayed delivery routes through it)
    [queue] = conf.task_queues
    assert (queue.name, queue.routing_key) == (settings.queue, settings.queue)
    assert (queue.exchange.name, queue.exchange.type) == (settings.queue, "topic")
    assert queue.queue_arguments == quorum_arguments(settings.queue)
    # What Celery documents for quorum queues
    assert conf.task_default_queue_type == "quorum"
    assert conf.task_create_missing_queue_type == "quorum"  # a callback queue
    assert conf.worker_detect_quorum_queues is True
    assert conf.broker_native_delayed_delivery_queue_type == "quorum"
    assert conf.broker_transport_options["confirm_publish"] is True
    assert conf.broker_transport_options["visibility_timeout"] == 42  # kept
    # And what Celery makes of it: the task routed there, quorum detected, so its worker uses
    # per-consumer QoS and native delayed delivery
    assert app.amqp.router.route({}, TASK_NAME)["queue"] is queue
    assert detect_quorum_queues(app, "amqp") == (True, settings.queue)
    consumer = SimpleNamespace(app=app)
    assert DelayedDelivery(consumer).include_if(consumer)
    step = next(s for s in app.steps["consumer"] if s.__name__ == "DeclareDeadLetterQueue")
    assert step(consumer).include_if(consumer)
