from __future__ import annotations

import json
import logging

import pytest

from invoice_worker.logs import JsonFormatter, log_job


def test_text_line_has_every_field(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="invoice_worker.job"):
        log_job(
            logging.INFO,
            "order-1",
            "task-9",
            "created",
            attempt=2,
            latency_ms=183.25,
            error_code=None,
        )
    assert caplog.messages == [
        "job order-1 task_id=task-9 outcome=created attempt=2 latency_ms=183.2"
    ]


def test_json_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="invoice_worker.job"):
        log_job(
            logging.WARNING, "order-2", "task-1", "retrying", attempt=1, error_code="server_error"
        )
    data = json.loads(JsonFormatter().format(caplog.records[0]))
    assert data["level"] == "WARNING"
    assert (data["foreign_id"], data["task_id"], data["outcome"]) == (
        "order-2",
        "task-1",
        "retrying",
    )
    assert (data["attempt"], data["error_code"]) == (1, "server_error")
    assert data["ts"].endswith("Z")


def test_json_line_with_exception(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("invoice_worker.test")
    with caplog.at_level(logging.ERROR, logger="invoice_worker.test"):
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed")
    data = json.loads(JsonFormatter().format(caplog.records[0]))
    assert "RuntimeError: boom" in data["exc"]
