"""What every scenario runs on: a private redis-server, the sandbox in its own process, worker
processes (ours or bare Celery) and the benchmark's own child processes (load, ceiling)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import redis

from invoice_worker.config import Settings
from invoice_worker.devstack.embedded import EmbeddedRedis, free_port
from invoice_worker.devstack.processes import ChildProcess, child_env, worker_process

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-key"
SECRET = "bench-secret"  # noqa: S105 - the local sandbox's made-up secret


def bench_env(settings: Settings) -> dict[str, str]:
    """The child environment for ``settings``, with this checkout importable (``bench.*``)."""
    env = child_env(settings)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


class Child:
    """A benchmark child (``python -m bench.load`` / ``bench.ceiling``): it prints ``ready``,
    waits for ``go`` on stdin, then writes its result as JSON to ``result_path`` and exits."""

    def __init__(self, module: str, args: list[str], settings: Settings, log_dir: Path) -> None:
        name = f"{module.rsplit('.', 1)[-1]}-{uuid.uuid4().hex[:6]}"
        self.result_path = log_dir / f"{name}.json"
        argv = [sys.executable, "-m", module, "--result", str(self.result_path), *args]
        with (log_dir / f"{name}.log").open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 - our own argv, no shell
                argv, env=bench_env(settings), cwd=ROOT, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=log, start_new_session=True,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float) -> None:
        """Block until the child printed ``ready``; raise if it exits or time runs out."""
        assert self.process.stdout is not None
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if readable else b""
        if line.strip() != b"ready":
            self.kill()
            raise RuntimeError(f"{self.result_path.stem} not ready ({line!r}); see its .log")

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(b"go\n")
        self.process.stdin.flush()

    def result(self, timeout: float) -> dict[str, Any]:
        """Wait for the child to finish and return its result."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(
                f"{self.result_path.stem} still running after {timeout:.0f}s"
            ) from None
        if code != 0:
            raise RuntimeError(f"{self.result_path.stem} exited {code}; see its .log")
        data: dict[str, Any] = json.loads(self.result_path.read_text())
        return data

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


class Stack:
    """Redis and the sandbox for a whole benchmark run; stop() ends everything it started."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.redis = EmbeddedRedis()
        self.replica: EmbeddedRedis | None = None  # started by replicate(), for one section
        self.sandbox: ChildProcess | None = None
        self.sandbox_port = free_port()
        self.children: list[ChildProcess | Child] = []

    def start(self) -> Stack:
        self.redis.start()
        argv = [
            sys.executable, "-m", "invoice_worker.sandbox", "--port", str(self.sandbox_port),
            "--key", KEY, "--secret", SECRET,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("INVOICE_")}
        self.sandbox = ChildProcess("sandbox", argv, env, self.log_dir)
        self.sandbox.start(ready="sandbox provider API at", timeout=30)
        self.client = redis.Redis.from_url(self.redis.url, decode_responses=True)
        return self

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.sandbox_port}/api/v2"

    @property
    def sandbox_pid(self) -> int:
        assert self.sandbox is not None
        assert self.sandbox.process is not None
        return self.sandbox.process.pid

    @property
    def redis_pid(self) -> int:
        assert self.redis.process is not None, "the benchmark needs the redis-server binary"
        return self.redis.process.pid

    @property
    def replica_pid(self) -> int:
        assert self.replica is not None
        assert self.replica.process is not None
        return self.replica.process.pid

    def replicate(self) -> None:
        """Give the private Redis one replica (once; it stays attached until stop())."""
        if self.replica is not None:
            return
        self.client.config_set("repl-diskless-sync-delay", 0)  # default: wait 5 s for more
        self.replica = EmbeddedRedis().start()
        with redis.Redis(port=self.replica.port) as r:
            r.execute_command("REPLICAOF", "127.0.0.1", self.redis.port)
            self.wait(lambda: r.info("replication")["master_link_status"] == "up", 10)
        # A fresh replica's first acknowledgement takes about a second: not in a measured run.
        self.client.set("bench:warm-up", 1)
        if self.client.wait(1, 5000) != 1:
            raise RuntimeError("the replica did not acknowledge a write in 5 s")

    def settings(self, tag: str, **overrides: Any) -> Settings:
        """Settings of one scenario: private prefix, queue and stream; events never trimmed."""
        values: dict[str, Any] = {
            "api_url": self.api_url,
            "api_key": KEY,
            "api_secret": SECRET,
            "broker_url": self.redis.url,
            "redis_url": self.redis.url,
            "key_prefix": f"{tag}:",
            "queue": f"bench-{tag}",
            "events_stream": f"{tag}:events",
            "events_maxlen": 10_000_000,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Call the sandbox admin API (loopback only)."""
        url = f"http://127.0.0.1:{self.sandbox_port}/_sandbox{path}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback only
            return json.loads(response.read())

    def answered(self) -> int:
        """Create calls the sandbox has answered with 200 since its last reset (bare Celery's
        jobs leave no other trace)."""
        return int(self.admin("GET", "/stats")["responses"].get("200", 0))

    def reset(self, latency_ms: float) -> None:
        """Empty Redis and the sandbox, then set the provider latency (reset forgets it)."""
        self.client.flushall()
        self.admin("POST", "/reset", {})
        self.admin("PUT", "/faults", {"latency_ms": latency_ms})

    def start_worker(
        self, settings: Settings, *, bare: bool, pool: str, concurrency: int
    ) -> ChildProcess:
        """Start one worker (ours, or ``bench.bare_app``) and wait until it is ready."""
        worker = worker_process(settings, self.log_dir, pool=pool, concurrency=concurrency)
        if bare:
            app_at = worker.argv.index("-A") + 1
            worker.argv[app_at] = "bench.bare_app"
            worker.env = bench_env(settings)
        self.children.append(worker)
        return worker.start(ready="ready.", timeout=60)

    def child(self, module: str, args: list[str], settings: Settings) -> Child:
        child = Child(module, args, settings, self.log_dir)
        self.children.append(child)
        return child

    def stop_children(self) -> None:
        """Stop every worker and child started so far, then kill what is left of their
        process groups."""
        for child in self.children:
            if isinstance(child, ChildProcess):
                _warm_stop(child, timeout=10)
            else:
                child.kill()
        self.children.clear()

    def wait(self, until: Any, timeout: float, every: float = 0.02) -> float:
        """Poll ``until()`` until true; return the wall time it first was (raise on timeout)."""
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                raise TimeoutError(f"not done after {timeout:.0f}s")
            time.sleep(every)
        return time.time()

    def stop(self) -> None:
        try:
            self.stop_children()
        finally:
            if self.sandbox is not None:
                self.sandbox.stop(timeout=5)
            if self.replica is not None:
                self.replica.stop()
            self.redis.stop()


def _warm_stop(worker: ChildProcess, timeout: float) -> None:
    """SIGTERM to the worker's main process only (Celery's warm shutdown), then SIGKILL to
    the group. ChildProcess.stop signals the whole group, which kills prefork children
    mid-task instead of letting them finish."""
    process = worker.process
    if process is None:
        return
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
