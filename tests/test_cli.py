"""The ``invoice-worker`` command, in-process (and ``sandbox`` / ``metrics`` as subprocesses)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from invoice_worker import cli
from invoice_worker.config import Settings
from invoice_worker.constants import JobState
from invoice_worker.devstack.embedded import EmbeddedRedis, free_port
from tests.conftest import SECRET, request_data


@pytest.fixture
def env(settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    """Point the CLI (which reads INVOICE_* itself) at this test's settings."""
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in [k for k in os.environ if k.startswith("INVOICE_")]:
        monkeypatch.delenv(name)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    return settings


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def flags(data: dict[str, Any]) -> list[str]:
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in data.items() if k != "timer"]
    return [*argv, "--timer" if data["timer"] else "--no-timer"]


def test_enqueue_with_flags_and_wait(
    env: Settings, start_worker: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    start_worker(env)
    data = request_data()
    code, out, _ = run(capsys, "enqueue", *flags(data), "--wait", "20")
    assert code == 0
    page = env.api_url.removesuffix("/api/v2") + "/invoice/"  # the sandbox's invoice page
    assert out.startswith(f"{data['foreign_id']}  created  {page}")
    code, out, _ = run(capsys, "status", data["foreign_id"], "--json")
    assert code == 0
    assert json.loads(out)["state"] == JobState.CREATED
    code, out, _ = run(capsys, "status", data["foreign_id"])
    assert "url" in out
    assert "created_at" in out
    code, out, _ = run(capsys, "watch", "--since", "0", "--count", "1", "--json")
    assert code == 0
    assert json.loads(out)["foreign_id"] == data["foreign_id"]


def test_enqueue_from_stdin(
    env: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = request_data()
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(data)))
    code, out, _ = run(capsys, "enqueue", "--file", "-", "--title", "From flag")
    assert (code, out.split()) == (0, [data["foreign_id"], "queued"])


def test_enqueue_wait_times_out(env: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "enqueue", *flags(request_data()), "--wait", "0.2")
    assert code == cli.EXIT_TIMEOUT
    assert "timed out" in err


def test_enqueue_failed_job_exit_code(
    env: Settings, start_worker: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    start_worker(env)
    code, out, _ = run(capsys, "enqueue", *flags(request_data(amount="0.00001")), "--wait", "20")
    assert code == cli.EXIT_NOT_CREATED
    assert "validation_error" in out


def test_invalid_request(env: Settings, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "enqueue", *flags(request_data(currency="btc")))
    assert code == cli.EXIT_INVALID
    assert "currency: must be an upper-case ticker" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = run(capsys, "enqueue", "--file", str(bad))
    assert code == cli.EXIT_INVALID
    assert "not valid JSON" in err


def test_conflict(env: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    data = request_data()
    assert run(capsys, "enqueue", *flags(data))[0] == 0
    code, _, err = run(capsys, "enqueue", *flags({**data, "amount": "2"}))
    assert code == cli.EXIT_CONFLICT
    assert "different request" in err


def test_status_not_found(env: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "status", "no-such-order")
    assert code == cli.EXIT_NOT_FOUND
    assert "no-such-order" in err


def test_unreachable_redis(
    env: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INVOICE_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    code, _, err = run(capsys, "status", "x")
    assert code == cli.EXIT_UNREACHABLE
    assert "unreachable" in err


def test_bad_settings(
    env: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INVOICE_READ_TIMEOUT", "-1")
    code, _, err = run(capsys, "status", "x")
    assert code == cli.EXIT_CONFIG
    assert "INVOICE_READ_TIMEOUT" in err  # settings errors now name the variable


def test_check_with_password_redis_never_prints_it(
    env: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with EmbeddedRedis(password="hunter2") as protected:
        monkeypatch.setenv("INVOICE_BROKER_URL", protected.url)
        monkeypatch.setenv("INVOICE_REDIS_URL", protected.url)
        code, out, _ = run(capsys, "check")
        assert code == 0, out
        assert "redis://:***@127.0.0.1" in out
        monkeypatch.setenv("INVOICE_REDIS_URL", protected.url.replace("hunter2", "wrong"))
        code, out, _ = run(capsys, "check")
    assert code == cli.EXIT_UNREACHABLE
    assert "FAIL  redis" in out
    assert "hunter2" not in out
    assert SECRET not in out


def test_check(
    env: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = run(capsys, "check")
    assert code == 0, out
    assert SECRET not in out
    monkeypatch.setenv("INVOICE_API_URL", f"http://127.0.0.1:{free_port()}/api/v2")
    code, out, _ = run(capsys, "check")
    assert code == cli.EXIT_UNREACHABLE
    assert "FAIL  provider" in out
    code, out, _ = run(capsys, "check", "--no-provider")
    assert code == 0
    monkeypatch.setenv("INVOICE_API_SECRET", "")
    code, out, _ = run(capsys, "check", "--no-provider")
    assert code == cli.EXIT_CONFIG
    assert "INVOICE_API_SECRET must be set" in out


def test_tooling_commands_load_on_demand(capsys: pytest.CaptureFixture[str]) -> None:
    for command, option in (("sandbox", "--error-502 N"), ("dev", "--demo N")):
        with pytest.raises(SystemExit) as exited:
            cli.main([command, "--help"])
        assert exited.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: invoice-worker {command} ")
        assert option in out


def test_sandbox_command_serves(tmp_path: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "invoice_worker.cli", "sandbox", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/api/v2/ping", timeout=1).text == "OK":
                    break
            except requests.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0].decode()
    assert proc.returncode == 0
    assert f"127.0.0.1:{port}" in out


def test_metrics_command_serves_and_stops(env: Settings, tmp_path: Path) -> None:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "invoice_worker.cli",
        "metrics",
        "--port",
        str(port),
        "--addr",
        "127.0.0.1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert "invoice_queue_depth" in text
        assert "invoice_circuit_state" in text
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert proc.returncode == 0


class Exec(Exception):
    """What the fake os.execv raises, with the argv it was given."""


@pytest.fixture
def flower_env(env: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """No FLOWER_* variables, and an os.execv that raises Exec(argv) instead of replacing us."""
    for name in [k for k in os.environ if k.startswith("FLOWER_")]:
        monkeypatch.delenv(name)

    def execv(path: str, argv: list[str]) -> None:
        assert path == argv[0]
        raise Exec(argv)

    monkeypatch.setattr(os, "execv", execv)


FLOWER = [sys.executable, "-m", "celery", "-A", "invoice_worker.worker", "flower"]


@pytest.mark.parametrize(
    ("environ", "argv"),
    [
        ({}, ["--port=5555", "--address=0.0.0.0"]),
        ({"FLOWER_BASIC_AUTH": ""}, []),
        ({"FLOWER_BASIC_AUTH": "ops:"}, []),
        ({"FLOWER_BASIC_AUTH": "ops:s3cret,admin"}, []),
        ({"FLOWER_BASIC_AUTH": "ops:s3cret"}, ["--basic-auth="]),  # the argument wins
        ({}, ["--basic_auth=ops"]),
        ({}, ["--dev-no-auth", "--address=0.0.0.0"]),
        ({"FLOWER_ADDRESS": "0.0.0.0"}, ["--dev-no-auth"]),  # noqa: S104 - refused
        ({}, ["--dev-no-auth", "--address="]),  # Flower's "" is every interface
    ],
)
def test_flower_refuses_to_start_without_a_login(
    flower_env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    environ: dict[str, str],
    argv: list[str],
) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    code, out, err = run(capsys, "flower", *argv)
    assert (code, out) == (cli.EXIT_CONFIG, "")
    assert "FLOWER_BASIC_AUTH" in err or "loopback only" in err


@pytest.mark.parametrize(
    ("environ", "argv", "expected"),
    [
        ({"FLOWER_BASIC_AUTH": "ops:s3cret"}, ["--port=5555", "--address=0.0.0.0"], None),
        ({}, ["--basic-auth=ops:s3cret,admin:pw", "--port=1"], None),
        (
            {},
            ["--auth=.*@example\\.com", "--auth_provider=flower.views.auth.GithubLoginHandler"],
            None,
        ),
        ({"FLOWER_AUTH": ".*@example\\.com"}, [], None),
        ({}, ["--dev-no-auth", "--port=1"], ["--port=1", "--address=127.0.0.1"]),
        ({}, ["--dev-no-auth", "--address=localhost"], ["--address=localhost"]),
    ],
)
def test_flower_execs_celery_flower_with_a_login(
    flower_env: None,
    monkeypatch: pytest.MonkeyPatch,
    environ: dict[str, str],
    argv: list[str],
    expected: list[str] | None,
) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(Exec) as executed:
        cli.main(["flower", *argv])
    assert executed.value.args[0] == [*FLOWER, *(argv if expected is None else expected)]


def test_flower_needs_flower_installed(
    flower_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "ops:s3cret")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    code, _, err = run(capsys, "flower")
    assert code == cli.EXIT_CONFIG
    assert "pip install 'invoice-worker[flower]'" in err


def test_unknown_options_are_refused_outside_flower(
    env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["status", "x", "--port=5555"])
    assert exited.value.code == cli.EXIT_USAGE
    assert "unrecognized arguments: --port=5555" in capsys.readouterr().err
