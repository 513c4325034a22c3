"""The sandbox's command line: its options, ``python -m invoice_worker.sandbox``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import requests

from invoice_worker.sandbox.cli import add_arguments, run
from tests.sandbox.receiver import Receiver
from tests.sandbox.test_server import invoice, sign

ROOT = Path(__file__).resolve().parent.parent.parent


def test_arguments() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--port", "0", "--error-502", "0.5", "--seed", "3", "--no-admin"])
    assert (args.port, args.fault_error_502, args.fault_seed, args.admin) == (0, 0.5, 3, False)
    assert args.fault_latency_ms is None  # so INVOICE_SANDBOX_LATENCY_MS can apply
    hostile = ["--answer-bad-url", "0.01", "--trickle", "0.02", "--trickle-seconds", "0.5"]
    args = parser.parse_args([*hostile, "--huge-bytes", "1000"])
    assert (args.fault_answer_bad_url, args.fault_trickle) == (0.01, 0.02)
    assert (args.fault_trickle_seconds, args.fault_huge_bytes) == (0.5, 1000)
    with pytest.raises(SystemExit):
        parser.parse_args(["--huge-bytes", "1.5"])
    assert parser.parse_args(["--min-amount", "10.5"]).min_amount == Decimal("10.5")
    callbacks = ["--callback-url", "http://127.0.0.1:9/cb", "--callback-time-scale", "0.01"]
    args = parser.parse_args([*callbacks, "--callback-duplicate", "1", "--timer-seconds", "5"])
    assert (args.callback_url, args.callback_time_scale) == ("http://127.0.0.1:9/cb", 0.01)
    assert (args.fault_callback_duplicate, args.timer_seconds) == (1.0, 5)
    defaults = parser.parse_args([])
    assert (defaults.callback_url, defaults.callback_time_scale) == (None, None)  # env may apply
    assert defaults.timer_seconds == 900
    with pytest.raises(SystemExit):
        parser.parse_args(["--min-amount", "ten"])


@pytest.mark.parametrize("secret_from_env", [False, True])
def test_command_line(http: requests.Session, secret_from_env: bool) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVOICE_")}
    env |= {"INVOICE_SANDBOX_ERROR_503": "1", "INVOICE_API_KEY": "cli-key"}
    if secret_from_env:
        env["INVOICE_API_SECRET"] = "cli-secret"
    command = [sys.executable, "-m", "invoice_worker.sandbox", "--port", "0", "--error-503", "0"]
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[-1]
        assert proc.stdout.readline() == "key: cli-key\n"
        secret = "cli-secret" if secret_from_env else proc.stdout.readline().split()[-1]
        body = json.dumps(invoice()).encode()
        headers = {"X-Processing-Key": "cli-key", "X-Processing-Signature": sign(body, secret)}
        headers["Content-Type"] = "application/json"
        # The flag (0) beats the environment (1) for error_503.
        response = http.post(f"{url}/invoices/create", data=body, headers=headers, timeout=5)
        assert response.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert proc.stdout.read() == ""  # nothing more, in particular no secret from the env


def test_module_help_runs_the_package_once() -> None:
    # -W error: runpy warns (here: fails) when the package had already imported its __main__.
    command = [sys.executable, "-W", "error", "-m", "invoice_worker.sandbox", "--help"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.startswith("usage: python -m invoice_worker.sandbox")
    assert "--error-502 N" in proc.stdout
    assert "--min-amount EUR" in proc.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--callback-url", "ftp://example.com/cb"], "not an http(s) callback URL"),
        (["--callback-time-scale", "-1"], "time_scale out of range"),
        (["--timer-seconds", "0"], "timer_seconds must be at least 1"),
    ],
)
def test_bad_callback_settings_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--port", "0", *argv])) == 2
    assert message in capsys.readouterr().err


def test_command_line_sends_callbacks(http: requests.Session) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVOICE_")}
    with Receiver() as receiver:
        env |= {"INVOICE_SANDBOX_CALLBACK_URL": receiver.url}
        command = [sys.executable, "-m", "invoice_worker.sandbox", "--port", "0", "--key", "k",
                   "--secret", "s", "--callback-time-scale", "0.001"]  # fmt: skip
        with subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
        ) as proc:
            assert proc.stdout is not None
            url = proc.stdout.readline().split()[-1]
            assert proc.stdout.readline() == "key: k\n"
            assert proc.stdout.readline() == f"callbacks to {receiver.url} (retry delays x 0.001)\n"
            body = json.dumps(invoice()).encode()
            headers = {"X-Processing-Key": "k", "X-Processing-Signature": sign(body, "s")}
            headers["Content-Type"] = "application/json"
            http.post(f"{url}/invoices/create", data=body, headers=headers, timeout=5)
            admin = url.replace("/api/v2", "/_sandbox")
            http.post(f"{admin}/invoices/order-42/pay", json={"mode": "expire"}, timeout=5)
            (received,) = receiver.wait_for(1)
            assert received.headers["X-Processing-Signature"] == sign(received.body, "s")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=5) == 0
