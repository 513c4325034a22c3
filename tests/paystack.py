"""A stack whose invoices can be paid: real Redis, the sandbox sending its signed callbacks over
real HTTP to the receiver served by a real (threaded WSGI) server, and the job machinery."""

from __future__ import annotations

import threading
import time
from typing import Any

import requests

from invoice_worker.constants import JobState
from invoice_worker.receiver import CALLBACK_PATH, Receiver, make_server
from invoice_worker.record import JobRecord
from invoice_worker.sandbox import Faults, Sandbox
from tests.conftest import KEY, SECRET, job_kwargs, make_job, make_settings, new_id

#: Callback retries 1000 times faster than the provider's: the first after 60 ms.
SCALE = 0.001
FINAL_STATUSES = ("confirmed", "failed")


class PayStack:
    """``with PayStack(redis_url) as stack:``; everything it started is stopped on exit."""

    def __init__(self, redis_url: str, *, faults: Faults | None = None, **overrides: Any) -> None:
        self.sandbox = Sandbox(KEY, SECRET, faults=faults, callback_time_scale=SCALE).start()
        self.settings = make_settings(redis_url, self.sandbox.url, **overrides)
        self.receiver = Receiver(self.settings)
        self.httpd = make_server(self.receiver, "127.0.0.1", 0)
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}{CALLBACK_PATH}"
        self.sandbox.set_callbacks(url=self.url)
        self.job = make_job(self.settings)
        self.store = self.job.store

    def __enter__(self) -> PayStack:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sandbox.stop()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.job.client.close()

    def create(self, **overrides: Any) -> JobRecord:
        """A job run to ``created`` through the real job machinery and the sandbox."""
        outcome = self.job.run(job_kwargs(**overrides), task_id=new_id(), owner=new_id())
        assert outcome.record is not None
        assert outcome.record.state == JobState.CREATED, outcome.record
        return outcome.record

    def pay(self, record: JobRecord, mode: str) -> int:
        """Play a payer action on the job's current invoice; returns the callbacks queued."""
        assert record.provider_foreign_id is not None
        return self.sandbox.pay(record.provider_foreign_id, mode)[1]

    def settle(self, foreign_id: str, timeout: float = 10.0) -> JobRecord:
        """The record once its invoice is confirmed or failed."""
        record = self.store.wait(
            foreign_id, timeout, until=lambda r: r.invoice_status in FINAL_STATUSES
        )
        assert record is not None, record
        assert record.invoice_status in FINAL_STATUSES, record
        return record

    def delivered(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The sandbox's callbacks, once none is pending any more."""
        deadline = time.monotonic() + timeout
        while True:
            listing = self.sandbox.callbacks()
            if all(c["state"] != "pending" for c in listing):
                return listing
            assert time.monotonic() < deadline, [(c["status"], c["state"]) for c in listing]
            time.sleep(0.02)

    def events(self, foreign_id: str, kind: str = "status") -> list[dict[str, str]]:
        """This job's events of one kind, oldest first."""
        return [
            e for _, e in self.store.events() if e["foreign_id"] == foreign_id and e["kind"] == kind
        ]

    def stats(self) -> dict[str, str]:
        return self.store.redis.hgetall(self.store.stats)  # type: ignore[return-value]

    def post(self, body: bytes, signature: str, key: str = KEY) -> requests.Response:
        """POST a callback to the receiver as the provider would."""
        headers = {"X-Processing-Key": key, "X-Processing-Signature": signature}
        headers["Content-Type"] = "application/json"
        return requests.post(self.url, data=body, headers=headers, timeout=5)
