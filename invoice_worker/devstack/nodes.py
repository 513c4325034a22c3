"""The processes of a Sentinel topology (``invoice_worker.devstack.sentinel``): one
``redis-server`` each, a data node or a sentinel, run from a config file of its own.

Every node runs from a file, not from arguments, because Sentinel rewrites them (``CONFIG
REWRITE`` on a data node it reconfigures, its own state in a sentinel's): a restarted node
comes back with what Sentinel last wrote, as it would on a real host.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from invoice_worker.devstack.embedded import kill_process

HOST = "127.0.0.1"
#: Options every data node gets (``redis_options`` may override them). Replication starts at
#: once (no diskless-sync delay), and a primary drops a replica silent for 2 s (``repl-timeout``)
#: instead of 60: what makes a paused replica fall behind within a test.
DATA_DEFAULTS = {
    "save": '""',
    "appendonly": "no",
    "repl-diskless-sync": "yes",
    "repl-diskless-sync-delay": "0",
    "repl-ping-replica-period": "1",
    "repl-timeout": "2",
}
#: Sentinel's internal periods (``SENTINEL DEBUG``, Redis 7.0+), shortened so a failover takes
#: about 4 s instead of 12. Sentinel demotes a node that claims to be a master against its view
#: (an old primary after a failover or a restart) four publish periods after its INFO (every
#: info period) first says so. That wait must stay well above the time the failover's leader
#: takes to see its promoted replica (INFO every 1 s during a failover, fixed) and announce it:
#: at 200 ms a sentinel that had not heard yet demoted the replica just promoted, and the
#: master flipped back. A sentinel that stalls for tilt-trigger (a paused host, a loaded
#: machine) stops acting for a tilt period.
SENTINEL_DEBUG = {"publish-period": 600, "info-period": 300, "tilt-period": 3000}


@dataclass
class Node:
    """One process of the topology: a data node (primary or replica) or a sentinel."""

    name: str
    port: int
    dir: Path
    sentinel: bool
    password: str | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    paused: bool = False

    @property
    def address(self) -> tuple[str, int]:
        return (HOST, self.port)

    @property
    def config(self) -> Path:
        return self.dir / ("sentinel.conf" if self.sentinel else "redis.conf")

    @property
    def log_path(self) -> Path:
        return self.dir / "node.log"

    @property
    def alive(self) -> bool:
        """Running (a paused process counts: it still holds its port)."""
        return self.process is not None and self.process.poll() is None

    def client(self, **kwargs: Any) -> redis.Redis:
        """A client of this node alone (no Sentinel, no retries): for checks and faults."""
        options: dict[str, Any] = {
            "password": self.password,
            "socket_timeout": 2,
            "socket_connect_timeout": 2,
            "retry": None,
        }
        options.update(kwargs)
        return redis.Redis(HOST, self.port, **options)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- process -----------------------------------------------------------------------------

    def spawn(self, binary: str) -> None:
        """Start ``redis-server`` on this node's config file."""
        argv = [binary, str(self.config), *(["--sentinel"] if self.sentinel else [])]
        with (self.dir / "stdout.log").open("ab") as out:
            self.process = subprocess.Popen(  # noqa: S603 - our own argv, no shell
                argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.dir
            )
        self.paused = False

    def signal(self, sig: int) -> None:
        """Send ``sig`` (SIGSTOP, SIGCONT) to the running process."""
        if self.process is None or not self.alive:
            raise RuntimeError(f"{self.name} is not running")
        self.process.send_signal(sig)
        self.paused = sig == signal.SIGSTOP

    def kill(self) -> None:
        """SIGKILL and reap (no shutdown save, sockets reset); nothing if not running."""
        if self.process is not None:
            kill_process(self.process)
            self.process = None
        self.paused = False

    def answers(self) -> bool:
        """PING answered (a paused node hangs until the short timeout)."""
        try:
            with self.client(socket_timeout=0.5, socket_connect_timeout=0.5) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def tune(self) -> None:
        """Shorten a sentinel's periods (``SENTINEL_DEBUG``)."""
        args = [str(x) for pair in SENTINEL_DEBUG.items() for x in pair]
        with self.client() as client, contextlib.suppress(redis.ResponseError):
            # An older Redis has no SENTINEL DEBUG: it only fails over more slowly.
            client.execute_command("SENTINEL DEBUG", *args)

    # -- a sentinel's view ------------------------------------------------------------------

    def names_master(self, master_name: str) -> tuple[str, int] | None:
        """The master this sentinel names (None: paused, dead or not answering)."""
        if self.paused or not self.alive:
            return None
        try:
            with self.client(socket_timeout=0.5, decode_responses=True) as client:
                found = client.sentinel_get_master_addr_by_name(master_name)
        except redis.RedisError:
            return None
        return (str(found[0]), int(found[1])) if found else None

    def other_sentinels(self, master_name: str) -> int:
        """How many other sentinels this one knows (-1: not answering)."""
        try:
            with self.client() as client:
                state: dict[str, Any] = client.sentinel_master(master_name)
        except redis.RedisError:
            return -1
        return int(state["num-other-sentinels"])

    def sees(self, master_name: str, master: Node, replicas: set[int]) -> bool:
        """This sentinel sees ``master`` undisturbed (no down flag, no failover running) and
        each port of ``replicas`` as its replica, reporting that role, its link up."""
        try:
            with self.client(decode_responses=True) as client:
                state: dict[str, Any] = client.sentinel_master(master_name)
                listed: list[dict[str, Any]] = client.sentinel_slaves(master_name)
        except redis.RedisError:
            return False
        if (state["ip"], int(state["port"])) != master.address or state["flags"] != "master":
            return False
        seen = {
            int(r["port"]) for r in listed
            if r["flags"] == "slave" and r["role-reported"] == "slave"
            and r["master-link-status"] == "ok" and int(r["master-port"]) == master.port
        }  # fmt: skip
        return replicas <= seen

    # -- replication -------------------------------------------------------------------------

    def role(self) -> str | None:
        """``master`` or ``slave`` as the node says (None: paused, dead or not answering)."""
        if self.paused or not self.alive:
            return None
        try:
            with self.client(decode_responses=True) as client:
                role: list[Any] = client.execute_command("ROLE")
            return str(role[0])
        except redis.RedisError:
            return None

    def online_replicas(self, *, any_state: bool = False) -> set[int]:
        """Ports of the replicas this node streams to (``any_state``: or still syncs)."""
        try:
            with self.client(decode_responses=True) as client:
                info: dict[str, Any] = client.info("replication")
        except redis.RedisError:
            return set()
        return {
            int(v["port"]) for k, v in info.items()
            if k.startswith("slave") and isinstance(v, dict)
            and (any_state or v.get("state") == "online")
        }  # fmt: skip

    def replicates(self, master: Node) -> bool:
        """This node is a replica of ``master`` with its link up."""
        if self.paused or not self.alive:
            return False
        try:
            with self.client(decode_responses=True) as client:
                info: dict[str, Any] = client.info("replication")
        except redis.RedisError:
            return False
        return (
            info.get("role") == "slave"
            and int(info.get("master_port", 0)) == master.port
            and info.get("master_link_status") == "up"
        )


def data_config(
    node: Node, options: Mapping[str, str], password: str | None, primary: Node | None
) -> str:
    """redis.conf of a data node (a replica of ``primary`` when given)."""
    lines = [
        f"port {node.port}",
        f"bind {HOST}",
        f"dir {node.dir}",
        f"logfile {node.log_path}",
        *(f"{k} {v}" for k, v in options.items()),
    ]
    if password:
        lines += [f"requirepass {password}", f"masterauth {password}"]
    if primary is not None:
        lines.append(f"replicaof {HOST} {primary.port}")
    return "\n".join(lines) + "\n"


def sentinel_config(
    node: Node,
    *,
    master_name: str,
    primary: Node,
    quorum: int,
    down_after_ms: int,
    failover_timeout_ms: int,
    password: str | None,
    known: Sequence[tuple[Node, str]],
    replicas: Sequence[Node],
) -> str:
    """sentinel.conf: ``known`` holds every sentinel with its id (this one's is its myid).

    The other sentinels and the replicas are written in as already known: Sentinel would find
    them by itself (hello messages every 2 s, the primary's INFO), only slower.
    """
    name = master_name
    myid = next(myid for other, myid in known if other is node)
    lines = [
        f"port {node.port}",
        f"bind {HOST}",
        f"dir {node.dir}",
        f"logfile {node.log_path}",
        f"sentinel myid {myid}",
        f"sentinel monitor {name} {HOST} {primary.port} {quorum}",
        f"sentinel down-after-milliseconds {name} {down_after_ms}",
        f"sentinel failover-timeout {name} {failover_timeout_ms}",
        f"sentinel parallel-syncs {name} 1",
    ]
    if password:
        lines.append(f"sentinel auth-pass {name} {password}")
    if node.password:
        lines.append(f"requirepass {node.password}")
    for other, other_id in known:
        if other is not node:
            lines.append(f"sentinel known-sentinel {name} {HOST} {other.port} {other_id}")
    lines += [f"sentinel known-replica {name} {HOST} {r.port}" for r in replicas]
    return "\n".join(lines) + "\n"
