from __future__ import annotations

import requests
from prometheus_client.parser import text_string_to_metric_families

from invoice_worker.client import ProviderClient
from invoice_worker.config import Settings
from invoice_worker.devstack.embedded import free_port
from invoice_worker.job import InvoiceJob
from invoice_worker.message import TaskMessage
from invoice_worker.metrics import serve
from invoice_worker.models import parse_request
from invoice_worker.producer import Producer
from invoice_worker.sandbox import Sandbox
from invoice_worker.store import JobStore
from tests.conftest import request_data


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_reflect_the_fleet(settings: Settings, sandbox: Sandbox) -> None:
    settings = settings.replace(circuit_threshold=2)
    port = free_port()
    serve(settings, port, "127.0.0.1")
    producer = Producer(settings)
    job = InvoiceJob(
        JobStore.from_settings(settings), ProviderClient.from_settings(settings), settings
    )
    # Given three queued jobs, one created, one retrying after a 503, and one more 503
    queued = [request_data() for _ in range(3)]
    producer.enqueue_many(queued)
    done, retrying, failing = (TaskMessage(request=parse_request(d)).kwargs() for d in queued)
    job.run(done, task_id="a", owner="a")
    sandbox.script(["503"], foreign_id=retrying["request"]["foreign_id"])
    sandbox.script(["503"], foreign_id=failing["request"]["foreign_id"])
    job.run(retrying, task_id="b", owner="b")
    job.run(failing, task_id="c", owner="c")
    # And two broker entries a worker set aside (as invoice_worker.transport counts them)
    job.store.redis.hincrby(job.store.stats, "dead_letters", 2)
    # And callbacks, as the receiver's script and refusals count them
    job.store.redis.hincrby(job.store.stats, "callbacks:applied", 3)
    job.store.redis.hincrby(job.store.stats, "callbacks:refused:bad_signature", 1)
    metrics = scrape(port)
    producer.close()
    # Then
    assert metrics[("invoice_queue_depth", (("queue", settings.queue),))] == 3  # no worker ran
    assert metrics[("invoice_jobs", (("state", "retrying"),))] == 2
    assert metrics[("invoice_jobs", (("state", "queued"),))] == 0
    assert metrics[("invoice_jobs_final_total", (("state", "created"),))] == 1
    assert metrics[("invoice_retries_total", ())] == 2
    assert metrics[("invoice_provider_latency_seconds_count", ())] == 3
    assert metrics[("invoice_provider_latency_seconds_bucket", (("le", "+Inf"),))] == 3
    assert metrics[("invoice_circuit_state", ())] == 2  # two failures in a row: open
    assert metrics[("invoice_circuit_opened_total", ())] == 1
    assert metrics[("invoice_dead_letters_total", ())] == 2
    assert metrics[("invoice_callbacks_total", (("outcome", "applied"),))] == 3
    assert metrics[("invoice_callbacks_total", (("outcome", "unknown"),))] == 0
    assert metrics[("invoice_callbacks_refused_total", (("reason", "bad_signature"),))] == 1
