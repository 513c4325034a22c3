"""The producer API against a real Redis broker (no worker: messages stay on the queue)."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import hypothesis
import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

import invoice_worker
from invoice_worker import constants as c
from invoice_worker import producer as producer_module
from invoice_worker.config import Settings
from invoice_worker.constants import JobState
from invoice_worker.devstack.embedded import free_port
from invoice_worker.errors import ConflictError, InvalidRequestError
from invoice_worker.producer import Producer
from invoice_worker.store import JobStore
from tests.conftest import request_data


@pytest.fixture
def producer(settings: Settings) -> Iterator[Producer]:
    p = Producer(settings)
    yield p
    p.close()


def queued(redis_client: redis.Redis, settings: Settings) -> list[dict[str, Any]]:
    return [json.loads(m) for m in redis_client.lrange(settings.queue, 0, -1)]


def test_enqueue_records_and_sends_once(
    producer: Producer, settings: Settings, redis_client: redis.Redis
) -> None:
    data = request_data()
    first = producer.enqueue(data)
    assert (first.state, first.foreign_id) == (JobState.QUEUED, data["foreign_id"])
    again = producer.enqueue(data)
    assert again.task_id == first.task_id
    assert again.state == JobState.QUEUED
    assert len(queued(redis_client, settings)) == 1
    record = producer.get(data["foreign_id"])
    assert record is not None
    assert record.state == JobState.QUEUED
    assert "email_user" not in record.to_dict()
    assert data["email_user"] not in json.dumps(record.to_dict())


def test_message_contract_and_masking(
    producer: Producer, settings: Settings, redis_client: redis.Redis
) -> None:
    data = request_data(amount="0.1")
    producer.enqueue(data, deadline=1_900_000_000.5, callback_task="shop.done", callback_queue="cb")
    [message] = queued(redis_client, settings)
    headers = message["headers"]
    assert headers["task"] == c.TASK_NAME
    assert data["email_user"] not in headers["kwargsrepr"]
    assert "'email_user': '***'" in headers["kwargsrepr"]
    assert headers["argsrepr"] == "()"
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert args == []
    assert kwargs["request"]["amount"] == "0.1"
    assert kwargs["request"]["email_user"] == data["email_user"]  # the provider needs it
    assert (kwargs["deadline"], kwargs["callback_task"], kwargs["callback_queue"]) == (
        1_900_000_000.5, "shop.done", "cb"
    )  # fmt: skip


def test_invalid_request_enqueues_nothing(
    producer: Producer, settings: Settings, redis_client: redis.Redis
) -> None:
    data = request_data(currency="btc", url_success="http://x.example.com")
    with pytest.raises(InvalidRequestError) as info:
        producer.enqueue(data)
    assert set(info.value.errors) == {"currency", "url_success"}
    assert producer.get(data["foreign_id"]) is None
    assert queued(redis_client, settings) == []


def test_conflict(producer: Producer, settings: Settings, redis_client: redis.Redis) -> None:
    data = request_data()
    producer.enqueue(data)
    with pytest.raises(ConflictError, match=data["foreign_id"]):
        producer.enqueue({**data, "title": "Other order"})
    # An equal amount written differently is the same request, and options are not part of it.
    producer.enqueue({**data, "amount": data["amount"] + "0"}, deadline=2_000_000_000)
    assert len(queued(redis_client, settings)) == 1


def test_stale_queued_job_is_resent(
    producer: Producer, settings: Settings, redis_client: redis.Redis
) -> None:
    data = request_data()
    producer.enqueue(data)
    # A redelivery delay of 0 (model_copy: Settings rightly refuses it) makes it stale at once.
    instant = settings.model_copy(update={"visibility_timeout": 0})
    producer.store = JobStore(producer.store.redis, instant)
    time.sleep(0.01)
    producer.enqueue(data)
    messages = queued(redis_client, settings)
    assert len(messages) == 2
    assert {m["headers"]["id"] for m in messages} == {producer.get(data["foreign_id"]).task_id}  # type: ignore[union-attr]


def test_failed_send_leaves_no_record(settings: Settings) -> None:
    broken = Producer(settings.replace(broker_url=f"redis://127.0.0.1:{free_port()}/0"))
    broken.app.conf.broker_connection_timeout = 0.2
    broken.app.conf.task_publish_retry_policy = {
        "max_retries": 1,
        "interval_start": 0,
        "interval_step": 0.1,
    }
    data = request_data()
    with pytest.raises(Exception, match=r"(?i)connect"):
        broken.enqueue(data)
    assert broken.get(data["foreign_id"]) is None
    broken.close()


def test_deadline_forms(producer: Producer) -> None:
    when = datetime.now(UTC) + timedelta(minutes=5)
    record = producer.enqueue(request_data(), deadline=when)
    assert record.deadline == pytest.approx(when.timestamp())
    with pytest.raises(ValueError, match="timezone-aware"):
        producer.enqueue(request_data(), deadline=datetime.now())


def test_many_threads(producer: Producer, settings: Settings, redis_client: redis.Redis) -> None:
    requests = [request_data() for _ in range(40)]
    errors: list[BaseException] = []

    def enqueue(data: dict[str, Any]) -> None:
        try:
            producer.enqueue(data)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=enqueue, args=(d,)) for d in requests + requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(queued(redis_client, settings)) == 40


def test_wait_times_out_on_queued_job(producer: Producer) -> None:
    data = request_data()
    producer.enqueue(data)
    record = producer.wait(data["foreign_id"], 0.2)
    assert record is not None
    assert record.state == JobState.QUEUED


def test_module_functions_read_env_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, redis_client: redis.Redis
) -> None:
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(producer_module, "_default", None)
    data = request_data()
    record = invoice_worker.enqueue_invoice(data)
    assert record.state == JobState.QUEUED
    assert invoice_worker.get_invoice(data["foreign_id"]).task_id == record.task_id  # type: ignore[union-attr]
    assert invoice_worker.wait_for_invoice(data["foreign_id"], 0.05).state == JobState.QUEUED  # type: ignore[union-attr]
    first = producer_module.default_producer()
    monkeypatch.setenv("INVOICE_QUEUE", "elsewhere")
    assert producer_module.default_producer() is first
    assert len(queued(redis_client, settings)) == 1
    first.close()


def test_atomic_envelope_matches_kombu(settings: Settings, redis_client: redis.Redis) -> None:
    # Given the same job published by Celery (separate state DB: the non-atomic path) ...
    celery_way = Producer(settings.replace(redis_url=settings.broker_url.replace("/0", "/1")))
    assert not celery_way.atomic
    data = request_data()
    celery_way.enqueue(data)
    celery_way.close()
    # ... and by our enqueue script
    ours = Producer(settings)
    assert ours.atomic
    ours.enqueue({**data, "foreign_id": data["foreign_id"] + "-b"})
    ours.close()
    theirs_msg, ours_msg = queued(redis_client, settings)[::-1]
    # Then the messages are the same but for ids and the foreign_id
    assert set(ours_msg) == set(theirs_msg)
    assert set(ours_msg["properties"]) == set(theirs_msg["properties"])
    varying = {"id", "root_id", "kwargsrepr"}
    assert {k: v for k, v in ours_msg["headers"].items() if k not in varying} == {
        k: v for k, v in theirs_msg["headers"].items() if k not in varying
    }
    for key in ("delivery_info", "priority", "delivery_mode", "body_encoding"):
        assert ours_msg["properties"][key] == theirs_msg["properties"][key], key
    body = json.loads(base64.b64decode(ours_msg["body"]))
    theirs_body = json.loads(base64.b64decode(theirs_msg["body"]))
    body[1]["request"]["foreign_id"] = data["foreign_id"]
    assert body == theirs_body


def test_enqueue_many(producer: Producer, settings: Settings, redis_client: redis.Redis) -> None:
    batch = [request_data() for _ in range(50)]
    results = producer.enqueue_many([*batch, batch[0], {**batch[1], "amount": "7"}])
    assert [r.state for r in results[:51]] == [JobState.QUEUED] * 51  # type: ignore[union-attr]
    assert results[50].task_id == results[0].task_id  # type: ignore[union-attr]
    assert isinstance(results[51], ConflictError)
    assert len(queued(redis_client, settings)) == 50


def test_enqueue_many_rejects_whole_batch_on_invalid(
    producer: Producer, settings: Settings, redis_client: redis.Redis
) -> None:
    batch = [request_data(), request_data(currency="btc"), request_data(), request_data(timer=None)]
    with pytest.raises(InvalidRequestError) as info:
        producer.enqueue_many(batch)
    assert set(info.value.errors) == {"[1].currency", "[3].timer"}
    assert queued(redis_client, settings) == []
    assert producer.get(batch[0]["foreign_id"]) is None


def test_enqueue_many_through_celery_when_state_is_elsewhere(
    settings: Settings, redis_client: redis.Redis
) -> None:
    split = Producer(settings.replace(redis_url=settings.broker_url.replace("/0", "/2")))
    batch = [request_data() for _ in range(20)]
    split.enqueue_many(batch)
    split.enqueue_many(batch)  # all exist now: nothing sent
    assert len(queued(redis_client, settings)) == 20
    assert split.get(batch[0]["foreign_id"]).state == JobState.QUEUED  # type: ignore[union-attr]
    split.close()


@given(
    field=st.sampled_from(
        ["title", "amount", "currency", "timer", "foreign_id", "email_user", "type"]
    ),
    value=st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=300),
)
@hypothesis.settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_enqueue_any_input_is_queued_or_rejected_cleanly(
    producer: Producer, field: str, value: Any
) -> None:
    data = {**request_data(), field: value}
    try:
        record = producer.enqueue(data)
    except InvalidRequestError as exc:
        assert field in exc.errors
        assert producer.get(str(data["foreign_id"])) is None or field != "foreign_id"
    except ConflictError:
        assert field == "foreign_id"  # a generated id that an earlier example already used
    else:
        assert record.state == JobState.QUEUED
