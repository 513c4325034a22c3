"""Child processes the dev stack and the tests run: Celery workers, the callback receiver and
Flower."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from invoice_worker.config import Settings

APP = "invoice_worker.worker"


class ChildProcess:
    """A process whose output goes to a log file we can wait on; stops its whole group."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready: str | None = None, timeout: float = 60.0) -> ChildProcess:
        """Start, and when ``ready`` is given wait until that text appears in the log."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 - our own argv, no shell
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.log_path.parent, start_new_session=True,
            )  # fmt: skip
        if ready:
            self.wait_for(ready, timeout)
        return self

    def log(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        """Wait until ``text`` is in the log; raise if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not log {text!r}:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the whole process group without waiting (SIGSTOP freezes it like a
        paused container, SIGCONT thaws it)."""
        if self.alive:
            assert self.process is not None
            os.killpg(self.process.pid, sig)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the whole process group (prefork children too) and reap it."""
        if self.alive:
            assert self.process is not None
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=60)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the main process (Celery's warm shutdown: it lets its own pool children
        finish), then SIGKILL to the whole group after ``timeout``."""
        if not self.alive:
            return
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def child_env(settings: Settings) -> dict[str, str]:
    """This environment without ``INVOICE_*``, plus the variables that rebuild ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVOICE_")}
    env.update(settings.to_env())
    return env


def worker_process(
    settings: Settings, log_dir: Path, *, pool: str = "threads", concurrency: int = 16
) -> ChildProcess:
    """A ``celery -A invoice_worker.worker worker`` consuming ``settings.queue``."""
    name = f"worker-{uuid.uuid4().hex[:6]}"
    argv = [
        sys.executable, "-m", "celery", "-A", APP, "worker", "-P", pool, "-c", str(concurrency),
        "-Q", settings.queue, "-n", f"{name}@%h", "-l", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    return ChildProcess(name, argv, child_env(settings), log_dir)


def receiver_process(settings: Settings, log_dir: Path, *, port: int) -> ChildProcess:
    """The callback receiver, ``invoice-worker callbacks``, on loopback ``port``."""
    argv = [sys.executable, "-m", "invoice_worker.cli", "callbacks", "--host", "127.0.0.1"]
    argv += ["--port", str(port)]
    return ChildProcess(f"receiver-{port}", argv, child_env(settings), log_dir)


def flower_process(
    settings: Settings, log_dir: Path, *, port: int, basic_auth: str | None = None
) -> ChildProcess:
    """Flower on loopback ``port`` through ``invoice-worker flower`` (needs the ``flower`` extra).

    With ``basic_auth`` (``user:password``, passed in the environment, not on the command line)
    it asks for that login; without, it runs with the wrapper's dev-only ``--dev-no-auth``.
    """
    argv = [sys.executable, "-m", "invoice_worker.cli", "flower", f"--port={port}"]
    argv.append("--address=127.0.0.1")
    env = child_env(settings)
    if basic_auth:
        env["FLOWER_BASIC_AUTH"] = basic_auth
    else:
        argv.append("--dev-no-auth")
    return ChildProcess(f"flower-{port}", argv, env, log_dir)
