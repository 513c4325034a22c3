"""``invoice-worker dev``: the whole stack as real subprocesses (Redis, sandbox, worker, Flower)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from invoice_worker.cli import EXIT_CONFIG
from invoice_worker.client import verify_signature
from invoice_worker.config import Settings
from invoice_worker.devstack.dev import export_lines
from invoice_worker.devstack.embedded import EmbeddedRedis, free_port
from invoice_worker.devstack.processes import ChildProcess
from invoice_worker.producer import Producer
from tests.conftest import request_data
from tests.sandbox.receiver import Receiver


def dev(tmp_path: Path, *argv: str, **environ: str) -> subprocess.CompletedProcess[str]:
    """Run ``invoice-worker dev`` with no INVOICE_* but `environ`; return the finished process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVOICE_")}
    cmd = [sys.executable, "-m", "invoice_worker.cli", "dev", *argv]
    return subprocess.run(
        cmd, env=env | environ, cwd=tmp_path, capture_output=True, text=True, timeout=150
    )


def path_without_redis_server() -> str:
    """$PATH less every directory holding a redis-server: a machine that never installed it."""
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(d for d in dirs if d and not (Path(d) / "redis-server").exists())


@pytest.mark.slow
@pytest.mark.parametrize("redis_kind", ["redis-server", "fakeredis"])
def test_dev_demo(redis_kind: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVOICE_")}
    cmd = [
        sys.executable,
        "-m",
        "invoice_worker.cli",
        "dev",
        "--demo",
        "12",
        "--no-flower",
        "--timeout",
        "90",
    ]
    if redis_kind == "fakeredis":
        cmd.append("--fakeredis")
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"(embedded {redis_kind})" in out
    assert "summary: 12 jobs: 12 created; 3 duplicate enqueues absorbed" in out
    assert "rejected one invalid request" in out
    assert "12 live invoices for 12 orders" in out
    # Then the payer's part: every invoice confirmed or failed through the receiver
    assert "invoices: 10 confirmed, 2 failed (1 paid less, 1 let expire)" in out
    assert re.search(r"\[#{30}\] 12/12 settled  confirmed 10  failed 2", out), out
    assert "buyer1@example.com" not in out


@pytest.mark.slow
def test_make_run_without_redis_server(tmp_path: Path) -> None:
    # `make run` on a machine without redis-server: fakeredis, and Flower as the stack runs it.
    flower_port = free_port()
    proc = dev(
        tmp_path, "--demo", "4", "--flower-port", str(flower_port), "--timeout", "60",
        PATH=path_without_redis_server(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(embedded fakeredis)" in proc.stdout
    assert f"flower     http://127.0.0.1:{flower_port}/" in proc.stdout
    assert "summary: 4 jobs: 4 created; 1 duplicate enqueues absorbed" in proc.stdout


def test_dev_without_redis_server_or_fakeredis_names_the_extra(tmp_path: Path) -> None:
    # Given a production install (no devstack extra: importing fakeredis fails) and no redis-server
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "fakeredis.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'fakeredis'\", name='fakeredis')\n"
    )
    # When the dev stack starts
    proc = dev(
        tmp_path, "--demo", "1", "--no-flower", PATH=path_without_redis_server(),
        PYTHONPATH=os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")]),
    )  # fmt: skip
    # Then it stops at once with the way out, and no traceback
    assert proc.returncode == 8, proc.stdout + proc.stderr
    assert proc.stderr == (
        "error: no redis-server on PATH and fakeredis is not installed: "
        "pip install 'invoice-worker[devstack]'\n"
    )


@pytest.mark.slow
def test_dev_never_prints_the_broker_password(tmp_path: Path) -> None:
    # Given a password-protected Redis named in INVOICE_BROKER_URL / INVOICE_REDIS_URL
    with EmbeddedRedis(password="dev-pass-never-shown") as protected:
        # When the dev stack runs a demo on it
        proc = dev(
            tmp_path, "--demo", "2", "--no-flower", "--timeout", "60",
            INVOICE_BROKER_URL=protected.url, INVOICE_REDIS_URL=protected.url,
        )  # fmt: skip
    # Then it works, and neither its output nor its errors show the password
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dev-pass-never-shown" not in proc.stdout + proc.stderr
    assert f"redis      redis://:***@127.0.0.1:{protected.port}/0 (from INVOICE_*)" in proc.stdout
    assert "# and INVOICE_BROKER_URL, INVOICE_REDIS_URL as set in this shell" in proc.stdout


def test_export_lines() -> None:
    embedded = "redis://127.0.0.1:6400/0"
    settings = Settings(_env_file=None, broker_url=embedded, redis_url=embedded)
    settings = settings.replace(api_url="http://127.0.0.1:8080/api/v2")
    assert export_lines(settings, set()) == (
        f"export INVOICE_BROKER_URL={embedded} INVOICE_REDIS_URL={embedded} "
        "INVOICE_API_URL=http://127.0.0.1:8080/api/v2"
    )
    given = Settings(_env_file=None, broker_url="redis://:pw@redis.internal:6379/0")
    assert export_lines(given.replace(api_url=settings.api_url), {"broker_url"}) == (
        "export INVOICE_API_URL=http://127.0.0.1:8080/api/v2\n"
        "# and INVOICE_BROKER_URL as set in this shell (not printed: may hold a password)"
    )
    assert export_lines(given, {"broker_url", "api_url"}) == (
        "# and INVOICE_BROKER_URL, INVOICE_API_URL as set in this shell "
        "(not printed: may hold a password)"
    )


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--callback-url", "http://127.0.0.1:1/cb", "--demo", "1"], {}, "--demo"),
        (
            ["--callback-url", "http://127.0.0.1:1/cb"],
            {"INVOICE_API_URL": "https://example.com/api/v2"},
            "not the sandbox",
        ),
        (["--callback-url", "ftp://shop.example.com/cb"], {}, "not an http(s) callback URL"),
        # Review: the refusal repeated the URL, password and all
        (["--callback-url", "ftp://u:cb-pw-never-shown@x.example/cb"], {}, "'ftp://u:***@x"),
        ([], {"INVOICE_API_KEY": "only-the-key"}, "both INVOICE_API_KEY and INVOICE_API_SECRET"),
    ],
)
def test_dev_refuses_callback_options_that_cannot_work(
    tmp_path: Path, argv: list[str], environ: dict[str, str], message: str
) -> None:
    proc = dev(tmp_path, *argv, "--no-flower", **environ)
    assert proc.returncode == EXIT_CONFIG, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "cb-pw-never-shown" not in proc.stderr
    assert proc.stdout == ""  # refused before anything started


@pytest.mark.slow
def test_dev_sends_callbacks_to_the_app_signed_with_its_key(tmp_path: Path) -> None:
    # Given an app's receiver, and its key and secret in the environment
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVOICE_")}
    env |= {"INVOICE_API_KEY": "shop-key", "INVOICE_API_SECRET": "shop-secret-never-shown"}
    with Receiver() as receiver:
        # When the dev stack runs with --callback-url pointing at it
        argv = [sys.executable, "-m", "invoice_worker.cli", "dev", "--no-flower"]
        # (Review: a password in that URL was printed as given)
        url = receiver.url.replace("://", "://shop:cb-pw-never-shown@", 1)
        stack = ChildProcess("dev", [*argv, "--callback-url", url], env, tmp_path)
        stack.start(ready="Ctrl-C stops")
        try:
            out = stack.log()
            # Then it starts no receiver of its own, and shows the key but never the secret
            shown = receiver.url.replace("://", "://shop:***@", 1)
            assert f"callbacks  {shown} (the sandbox sends here; no receiver" in out
            assert "callback receiver at" not in out
            assert "key 'shop-key' and its secret from INVOICE_API_KEY" in out
            # And an invoice created through it and paid sends signed callbacks to the app
            exported = re.search(r"^export (.*)$", out, re.MULTILINE)
            assert exported is not None, out
            urls: dict[str, Any] = {}
            for pair in exported[1].split():
                name, value = pair.split("=", 1)
                urls[name.removeprefix("INVOICE_").lower()] = value
            settings = Settings(_env_file=None, **urls)
            producer = Producer(settings)
            try:
                data = request_data()
                producer.enqueue(data)
                record = producer.wait(data["foreign_id"], timeout=30)
                assert record is not None
                assert record.state == "created", record
            finally:
                producer.close()
            admin = settings.api_url.removesuffix("/api/v2") + "/_sandbox"
            paid = requests.post(
                f"{admin}/invoices/{data['foreign_id']}/pay", json={"mode": "full"}, timeout=10
            )
            assert paid.status_code == 200, paid.text
            received = receiver.wait_for(2)
            for r in received:
                assert r.headers["X-Processing-Key"] == "shop-key"
                signature = r.headers["X-Processing-Signature"]
                assert verify_signature(r.body, signature, "shop-secret-never-shown")
        finally:
            stack.stop()
    assert "shop-secret-never-shown" not in stack.log()
    assert "cb-pw-never-shown" not in stack.log()
