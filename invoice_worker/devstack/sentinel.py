"""A Redis Sentinel topology on loopback, for tests and the chaos runner.

``SentinelCluster`` runs, as private child processes on free loopback ports in a temporary
directory, one primary ``redis-server``, ``replicas`` replicas of it and ``sentinels``
``redis-server --sentinel`` processes that monitor it under ``master_name``. It never touches
the machine's own Redis. Every node runs from a config file of its own, because Sentinel
rewrites them (``CONFIG REWRITE`` on data nodes it reconfigures, its own state in the
sentinels'), and a restarted node must come back with what Sentinel last wrote, as it would on
a real host.

The primitives compose into the faults a Redis deployment meets: ``failover()`` is a clean,
operator-driven switch; ``pause``/``resume`` (SIGSTOP/SIGCONT) a stalled host; ``kill``
(SIGKILL) a crash; ``restart`` the crashed host coming back. A lossy failover is: pause the
replica, keep writing to the primary until it drops the silent replica (``repl-timeout``, 2 s
here; ``wait_detached``), SIGKILL the primary, resume the replica, ``wait_for_new_master``: the
writes made after the drop existed only on the dead primary.

Waits end with ``ClusterError`` naming what did not happen and the tail of every node's log.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import redis

from invoice_worker.devstack.embedded import free_port

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
#: Sentinel's internal periods (``SENTINEL DEBUG``, Redis 7.0+), shortened so a test waits
#: about a second where production waits ten: Sentinel demotes a node that claims to be a master
#: against its view (an old primary after a failover or a restart) only after four publish
#: periods with INFO refreshed every info period, and a sentinel that stalls for tilt-trigger
#: (a paused host, a loaded machine) stops acting for a tilt period.
SENTINEL_DEBUG = {"publish-period": 200, "info-period": 300, "tilt-period": 3000}
T = TypeVar("T")


class ClusterError(RuntimeError):
    """Raised when a node does not start or the topology does not reach a wanted state in time."""


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


class SentinelCluster:
    """One primary, ``replicas`` replicas and ``sentinels`` sentinels on loopback.

    Args:
        replicas: replicas of the primary (at least 1: Sentinel promotes one of them).
        sentinels: sentinel processes (3 by default; ``quorum`` of them must agree).
        master_name: the name Sentinel monitors the primary under.
        quorum: sentinels that must see the primary down before a failover.
        down_after_ms: silence after which a sentinel sees a node down.
        failover_timeout_ms: Sentinel's failover-timeout (a failover that stalls this long is
            aborted; the next one waits twice as long).
        redis_options: redis.conf options for every data node, e.g.
            ``{"appendonly": "yes", "appendfsync": "everysec"}``.
        password: ``requirepass`` (and ``masterauth``) of the data nodes; the sentinels use it
            too. It is the password in ``url``.
        sentinel_password: ``requirepass`` of the sentinels themselves (not in ``url``).
    """

    def __init__(
        self,
        *,
        replicas: int = 1,
        sentinels: int = 3,
        master_name: str = "invoice-main",
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 4000,
        redis_options: Mapping[str, str] | None = None,
        password: str | None = None,
        sentinel_password: str | None = None,
    ) -> None:
        if replicas < 1 or sentinels < quorum:
            raise ValueError("need at least one replica and quorum <= sentinels")
        binary = shutil.which("redis-server")
        if binary is None:
            raise ClusterError("redis-server is not on PATH")
        self.binary = binary
        self.master_name = master_name
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.redis_options = {**DATA_DEFAULTS, **(redis_options or {})}
        self.password = password
        self.sentinel_password = sentinel_password
        self.dir = Path(tempfile.mkdtemp(prefix="invoice-sentinel-"))
        self.nodes = [self._node(f"redis-{i}", sentinel=False) for i in range(replicas + 1)]
        self.sentinels = [self._node(f"sentinel-{i}", sentinel=True) for i in range(sentinels)]

    @staticmethod
    def available() -> bool:
        """True when ``redis-server`` (which also runs the sentinels) is on PATH."""
        return shutil.which("redis-server") is not None

    def _node(self, name: str, *, sentinel: bool) -> Node:
        path = self.dir / name
        path.mkdir()
        password = self.sentinel_password if sentinel else self.password
        return Node(name, free_port(), path, sentinel, password)

    # -- addresses ---------------------------------------------------------------------------

    def url_for(self, db: int = 0) -> str:
        """The ``sentinel://`` URL of database ``db`` (the data nodes' password in each entry)."""
        auth = f":{self.password}@" if self.password else ""
        return ";".join(f"sentinel://{auth}{HOST}:{s.port}/{db}" for s in self.sentinels)

    @property
    def url(self) -> str:
        """The ``sentinel://`` URL of database 0, every sentinel listed."""
        return self.url_for(0)

    @property
    def primary(self) -> Node:
        """The data node the sentinels agree is the master now."""
        return self.node_at(self.master_address())

    @property
    def replicas(self) -> list[Node]:
        """The data nodes other than the current master."""
        master = self.master_address()
        return [n for n in self.nodes if n.address != master]

    def node_at(self, address: tuple[str, int]) -> Node:
        for node in self.nodes:
            if node.address == (address[0], int(address[1])):
                return node
        raise ClusterError(f"no data node at {address}")

    def master_views(self) -> list[tuple[str, int] | None]:
        """What each sentinel names as the master (None: paused, dead or not answering)."""
        views: list[tuple[str, int] | None] = []
        for sentinel in self.sentinels:
            if sentinel.paused or not sentinel.alive:
                views.append(None)
                continue
            try:
                with sentinel.client(socket_timeout=0.5, decode_responses=True) as client:
                    found = client.sentinel_get_master_addr_by_name(self.master_name)
                views.append((str(found[0]), int(found[1])) if found else None)
            except redis.RedisError:
                views.append(None)
        return views

    def master_address(self) -> tuple[str, int]:
        """The master most answering sentinels name.

        Raises:
            ClusterError: no sentinel answers.
        """
        views = Counter(v for v in self.master_views() if v is not None)
        if not views:
            raise ClusterError(f"no sentinel names a master\n{self.logs()}")
        return views.most_common(1)[0][0]

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> SentinelCluster:
        """Start every node and wait until the sentinels agree on the primary, know each
        other and every replica, and the replicas are in sync.

        Raises:
            ClusterError: a node exited or the topology did not form within ``timeout``.
        """
        try:
            primary, *replicas = self.nodes
            self._write_data_config(primary, None)
            for replica in replicas:
                self._write_data_config(replica, primary)
            ids = [secrets.token_hex(20) for _ in self.sentinels]
            for sentinel, myid in zip(self.sentinels, ids, strict=True):
                self._write_sentinel_config(sentinel, myid, ids, primary, replicas)
            for node in [*self.nodes, *self.sentinels]:
                self._spawn(node)
            for node in [*self.nodes, *self.sentinels]:
                self._wait_answers(node, timeout)
            for sentinel in self.sentinels:
                self._tune(sentinel)
            self._wait(lambda: self._formed(primary), timeout, "the topology to form")
        except BaseException:
            self.stop()
            raise
        return self

    def _write_data_config(self, node: Node, primary: Node | None) -> None:
        lines = [
            f"port {node.port}",
            f"bind {HOST}",
            f"dir {node.dir}",
            f"logfile {node.log_path}",
            *(f"{k} {v}" for k, v in self.redis_options.items()),
        ]
        if self.password:
            lines += [f"requirepass {self.password}", f"masterauth {self.password}"]
        if primary is not None:
            lines.append(f"replicaof {HOST} {primary.port}")
        node.config.write_text("\n".join(lines) + "\n")

    def _write_sentinel_config(
        self, node: Node, myid: str, ids: list[str], primary: Node, replicas: list[Node]
    ) -> None:
        # The sentinels and replicas are written in as already known: Sentinel would find them
        # by itself (hello messages every 2 s, the primary's INFO), only slower.
        name = self.master_name
        lines = [
            f"port {node.port}",
            f"bind {HOST}",
            f"dir {node.dir}",
            f"logfile {node.log_path}",
            f"sentinel myid {myid}",
            f"sentinel monitor {name} {HOST} {primary.port} {self.quorum}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {name} {self.password}")
        if self.sentinel_password:
            lines.append(f"requirepass {self.sentinel_password}")
        for other, other_id in zip(self.sentinels, ids, strict=True):
            if other is not node:
                lines.append(f"sentinel known-sentinel {name} {HOST} {other.port} {other_id}")
        lines += [f"sentinel known-replica {name} {HOST} {r.port}" for r in replicas]
        node.config.write_text("\n".join(lines) + "\n")

    def _spawn(self, node: Node) -> None:
        argv = [self.binary, str(node.config)]
        if node.sentinel:
            argv.append("--sentinel")
        with (node.dir / "stdout.log").open("ab") as out:
            node.process = subprocess.Popen(  # noqa: S603 - our own argv, no shell
                argv, stdout=out, stderr=subprocess.STDOUT, cwd=node.dir
            )
        node.paused = False

    def _wait_answers(self, node: Node, timeout: float) -> None:
        def answers() -> bool:
            if not node.alive:
                raise ClusterError(f"{node.name} exited\n{self.logs()}")
            try:
                with node.client(socket_timeout=0.5, socket_connect_timeout=0.5) as client:
                    return bool(client.ping())
            except redis.RedisError:
                return False

        self._wait(answers, timeout, f"{node.name} to answer PING")

    def _formed(self, primary: Node) -> bool:
        others = len(self.sentinels) - 1
        for sentinel in self.sentinels:
            try:
                with sentinel.client() as client:
                    state: dict[str, Any] = client.sentinel_master(self.master_name)
            except redis.RedisError:
                return False
            if (state["ip"], int(state["port"])) != primary.address:
                return False
            if state["num-other-sentinels"] < others or state["num-slaves"] < len(self.nodes) - 1:
                return False
            if state["is_sdown"] or state["is_odown"]:
                return False
        if not all(self._replicates(node, primary) for node in self.nodes if node is not primary):
            return False
        return self._online_replicas(primary) >= {n.port for n in self.nodes if n is not primary}

    def stop(self) -> None:
        """Kill every process and remove the directory (idempotent)."""
        for node in [*self.sentinels, *self.nodes]:
            self.kill(node)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SentinelCluster:
        return self.start()

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- faults ------------------------------------------------------------------------------

    def pause(self, node: Node) -> None:
        """Freeze ``node`` (SIGSTOP): its sockets stay open and nothing answers, like a host
        that stalls."""
        if node.process is None or not node.alive:
            raise ClusterError(f"cannot pause {node.name}: it is not running")
        os.kill(node.process.pid, signal.SIGSTOP)
        node.paused = True

    def resume(self, node: Node) -> None:
        """Thaw a paused ``node`` (SIGCONT)."""
        if node.process is None or not node.alive:
            raise ClusterError(f"cannot resume {node.name}: it is not running")
        os.kill(node.process.pid, signal.SIGCONT)
        node.paused = False

    def kill(self, node: Node) -> None:
        """SIGKILL ``node`` and reap it: no shutdown save, sockets reset (a crash)."""
        if node.process is not None:
            with contextlib.suppress(ProcessLookupError):
                node.process.send_signal(signal.SIGKILL)
            node.process.wait()
            node.process = None
        node.paused = False

    def restart(self, node: Node, timeout: float = 30.0) -> None:
        """Start a killed ``node`` again from its (Sentinel-rewritten) config and wait until it
        is back in the topology: a data node must be the master the sentinels name or, mostly,
        a replica of it in sync (an old primary comes back as a master, and Sentinel demotes
        it after four publish periods, see ``SENTINEL_DEBUG``); a sentinel must name a master.

        Raises:
            ClusterError: it did not rejoin within ``timeout``.
        """
        self.kill(node)
        self._spawn(node)
        self._wait_answers(node, timeout)
        if node.sentinel:
            self._tune(node)
            self._wait(
                lambda: self.master_views()[self.sentinels.index(node)] is not None,
                timeout, f"{node.name} to name a master",
            )  # fmt: skip
            return
        self._wait(lambda: self._in_topology(node), timeout, f"{node.name} to rejoin as a replica")

    def failover(self, timeout: float = 30.0) -> Node:
        """``SENTINEL FAILOVER``, then wait until every sentinel names the new master, it
        answers ``role`` master, and the old master is its replica, in sync.

        Returns:
            The new master.

        Raises:
            ClusterError: the failover was refused (e.g. no replica fit to promote) or did not
                complete within ``timeout``.
        """
        old = self.primary
        deadline = time.monotonic() + timeout

        def started() -> bool:
            sentinel = next(s for s in self.sentinels if s.alive and not s.paused)
            try:
                with sentinel.client() as client:
                    client.execute_command("SENTINEL FAILOVER", self.master_name)
                return True
            except redis.ResponseError as exc:
                if "INPROG" in str(exc) or "NOGOODSLAVE" in str(exc):
                    return False  # a failover is running, or the replica is not ready yet
                raise

        self._wait(started, timeout, "Sentinel to accept SENTINEL FAILOVER")
        new = self.wait_for_new_master(old, max(1.0, deadline - time.monotonic()))
        self._wait(
            lambda: self._replicates(old, new), max(1.0, deadline - time.monotonic()),
            f"{old.name} to become a replica of {new.name}",
        )  # fmt: skip
        return new

    def wait_for_new_master(self, old: Node, timeout: float = 30.0) -> Node:
        """Wait until every running, unpaused sentinel names one master other than ``old``
        and that node answers ``role`` master.

        Returns:
            The new master.

        Raises:
            ClusterError: that did not happen within ``timeout``.
        """

        def agreed() -> Node | None:
            live = [
                v for v, s in zip(self.master_views(), self.sentinels, strict=True)
                if s.alive and not s.paused
            ]  # fmt: skip
            if not live or None in live or len(set(live)) != 1 or live[0] == old.address:
                return None
            assert live[0] is not None
            node = self.node_at(live[0])
            return node if self._role(node) == "master" else None

        found = self._wait(agreed, timeout, f"Sentinel to promote a master other than {old.name}")
        assert found is not None
        return found

    def wait_detached(self, replica: Node, timeout: float = 30.0) -> None:
        """Wait until the master no longer counts ``replica`` among its connected replicas
        (a paused replica is dropped after ``repl-timeout``): from then on, what the master
        takes is not on ``replica`` at all, not even in its socket buffers."""
        master = self.primary

        self._wait(
            lambda: replica.port not in self._online_replicas(master, any_state=True), timeout,
            f"{master.name} to drop {replica.name}",
        )  # fmt: skip

    # -- helpers -----------------------------------------------------------------------------

    def _in_topology(self, node: Node) -> bool:
        """``node`` is the master the sentinels name, or a replica of it in sync (asked anew
        each time: Sentinel may fail over meanwhile)."""
        try:
            master = self.node_at(self.master_address())
        except ClusterError:
            return False
        if master is node:
            return self._role(node) == "master"
        return self._replicates(node, master)

    def _tune(self, sentinel: Node) -> None:
        args = [str(x) for pair in SENTINEL_DEBUG.items() for x in pair]
        with sentinel.client() as client, contextlib.suppress(redis.ResponseError):
            # An older Redis has no SENTINEL DEBUG: it only fails over more slowly.
            client.execute_command("SENTINEL DEBUG", *args)

    def _role(self, node: Node) -> str | None:
        if node.paused or not node.alive:
            return None
        try:
            with node.client() as client:
                role: list[Any] = client.execute_command("ROLE")
            return role[0].decode() if isinstance(role[0], bytes) else str(role[0])
        except redis.RedisError:
            return None

    def _online_replicas(self, master: Node, *, any_state: bool = False) -> set[int]:
        """Ports of the replicas ``master`` streams to (``any_state``: or still syncs)."""
        try:
            with master.client(decode_responses=True) as client:
                info: dict[str, Any] = client.info("replication")
        except redis.RedisError:
            return set()
        return {
            int(v["port"]) for k, v in info.items()
            if k.startswith("slave") and isinstance(v, dict)
            and (any_state or v.get("state") == "online")
        }  # fmt: skip

    def _replicates(self, node: Node, master: Node) -> bool:
        """``node`` is a replica of ``master`` with its link up."""
        if node.paused or not node.alive:
            return False
        try:
            with node.client(decode_responses=True) as client:
                info: dict[str, Any] = client.info("replication")
        except redis.RedisError:
            return False
        return (
            info.get("role") == "slave"
            and int(info.get("master_port", 0)) == master.port
            and info.get("master_link_status") == "up"
        )

    def _wait(self, check: Callable[[], T], timeout: float, what: str) -> T:
        deadline = time.monotonic() + timeout
        while True:
            found = check()
            if found:
                return found
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}"
                )
            time.sleep(0.05)

    def logs(self, lines: int = 25) -> str:
        """The last ``lines`` of every node's log, for error messages."""
        return "\n".join(
            f"--- {node.name} (port {node.port}):\n{node.log_tail(lines)}"
            for node in [*self.nodes, *self.sentinels]
        )
