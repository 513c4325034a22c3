"""Lost messages are sent again from the job's stored kwargs."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis

from invoice_worker.config import Settings
from invoice_worker.constants import JobState
from invoice_worker.producer import Producer
from invoice_worker.store import JobStore
from invoice_worker.sweeper import Sweeper
from tests.conftest import request_data


@pytest.fixture
def fast(settings: Settings) -> Settings:
    # Due one second after the last step. Retries must now fit in half the redelivery delay
    # (INVOICE_RETRY_CAP <= max_countdown), so the cap comes down with it.
    return settings.replace(visibility_timeout=1, retry_cap=0.5)


def test_lost_queued_message_is_sent_again(fast: Settings, redis_client: redis.Redis) -> None:
    producer = Producer(fast)
    data = request_data()
    record = producer.enqueue(data)
    # Given the broker lost the message
    assert redis_client.delete(fast.queue) == 1
    sweeper = Sweeper(producer.app, fast)
    assert sweeper.sweep() == 0  # not due yet
    time.sleep(1.1)
    # When the sweeper runs
    assert sweeper.sweep() == 1
    # Then the same task is back on the queue, with masked kwargsrepr, and only once
    [raw] = redis_client.lrange(fast.queue, 0, -1)
    redis_client.delete(fast.queue)
    assert sweeper.sweep() == 0  # not again before another redelivery delay
    message = json.loads(raw)
    assert message["headers"]["id"] == record.task_id
    assert data["email_user"] not in message["headers"]["kwargsrepr"]
    producer.close()


def test_a_backlog_is_not_mistaken_for_loss(fast: Settings, redis_client: redis.Redis) -> None:
    producer = Producer(fast)
    waiting = [request_data() for _ in range(3)]
    producer.enqueue_many(waiting)  # still in line: the queue is not empty
    time.sleep(1.1)
    assert Sweeper(producer.app, fast).sweep() == 0
    assert redis_client.llen(fast.queue) == 3
    producer.close()


def test_held_and_final_jobs_are_left_alone(fast: Settings, redis_client: redis.Redis) -> None:
    producer = Producer(fast)
    store = producer.store
    held, done = request_data(), request_data()
    producer.enqueue_many([held, done])
    for data, owner in ((held, "w1"), (done, "w2")):
        fid = data["foreign_id"]
        fingerprint = str(redis_client.hget(store.key(fid), "fingerprint"))
        # The lease and crash limit now come from the settings (model_copy: no validation).
        holder = JobStore(
            store.redis, fast.model_copy(update={"lease_seconds": 30, "max_redeliveries": 3})
        )
        holder.claim(fid, owner, fingerprint=fingerprint, fields={})
    store.finish(done["foreign_id"], "w2", JobState.CREATED, {"url": "https://i.example.com/x"})
    # A created job keeps its copy (a re-issue sends it again); the sweeper leaves it alone.
    assert redis_client.get(store.copy(done["foreign_id"])) is not None
    assert redis_client.get(store.copy(held["foreign_id"])) is not None
    time.sleep(1.1)
    # sweep() now takes the broker queue's depth (read by the caller); an empty queue, so
    # only the live lease and the final state keep these jobs back.
    assert store.sweep(0) == []
    assert redis_client.zscore(store.due, done["foreign_id"]) is None
    producer.close()


@pytest.mark.slow
def test_worker_finishes_a_job_whose_message_was_lost(fast: Settings, start_worker: Any) -> None:
    settings = fast.replace(visibility_timeout=3)
    producer = Producer(settings)
    data = request_data()
    producer.enqueue(data)
    producer.store.redis.delete(settings.queue)
    start_worker(settings)
    record = producer.wait(data["foreign_id"], 30)
    producer.close()
    assert record is not None
    assert record.state == JobState.CREATED


@pytest.mark.parametrize("broker", ["redis-db-1", "rabbitmq"])
def test_a_backlog_on_a_broker_apart_is_not_taken_for_lost_messages(
    fast: Settings, redis_server: Any, broker: str
) -> None:
    # Given a broker that is not the job store (another Redis database, or RabbitMQ)
    if broker == "rabbitmq":
        import socket

        try:
            socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
        except OSError:
            pytest.skip("no RabbitMQ on 127.0.0.1:5672")
        broker_url = "amqp://guest:guest@127.0.0.1:5672//"
    else:
        broker_url = redis_server.url.rsplit("/", 1)[0] + "/1"
    settings = fast.replace(broker_url=broker_url, redis_url=fast.state_url)
    producer = Producer(settings)
    assert not producer.atomic
    try:
        # And a backlog no worker has taken yet, past its due time
        for _ in range(3):
            producer.enqueue(request_data())
        time.sleep(1.1)
        # When the sweeper runs, it asks the broker itself how many messages wait
        sweeper = Sweeper(producer.app, settings)
        assert sweep_depth(sweeper) == 3
        # Then nothing is sent again: a backlog is not a lost message
        assert sweeper.sweep() == 0
    finally:
        with producer.app.connection_for_write() as conn:
            conn.default_channel.queue_purge(settings.queue)
            if broker == "rabbitmq":
                conn.default_channel.queue_delete(settings.queue)
                conn.default_channel.exchange_delete(settings.queue)
        producer.close()


def sweep_depth(sweeper: Sweeper) -> int:
    from invoice_worker.sweeper import broker_queue_depth

    return broker_queue_depth(sweeper.app, sweeper.settings.queue)
