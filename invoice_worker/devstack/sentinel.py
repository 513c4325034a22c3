"""A Redis Sentinel topology on loopback, for tests and the chaos runner.

``SentinelCluster`` runs, as private child processes on free loopback ports in a temporary
directory, one primary ``redis-server``, ``replicas`` replicas of it and ``sentinels``
``redis-server --sentinel`` processes that monitor it under ``master_name``. It never touches
the machine's own Redis. Each process is a ``Node`` (``invoice_worker.devstack.nodes``).

The primitives compose into the faults a Redis deployment meets: ``failover()`` is a clean,
operator-driven switch; ``pause``/``resume`` (SIGSTOP/SIGCONT) a stalled host; ``kill``
(SIGKILL) a crash; ``restart`` the crashed host coming back. A lossy failover is: pause the
replica, keep writing to the primary until it drops the silent replica (``repl-timeout``, 2 s
here; ``wait_detached``), SIGKILL the primary, resume the replica, ``wait_for_new_master``: the
writes made after the drop existed only on the dead primary. Every wait for a new master ends
with ``settle()``: each sentinel has seen every node in its new role, so the next fault starts
from a state Sentinel agrees on (otherwise a sentinel that lags may demote a fresh master).

Waits end with ``ClusterError`` naming what did not happen and the tail of every node's log.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import redis

from invoice_worker.devstack.nodes import (
    DATA_DEFAULTS,
    HOST,
    SENTINEL_DEBUG,
    Node,
    data_config,
    sentinel_config,
)

__all__ = ["SENTINEL_DEBUG", "ClusterError", "Node", "SentinelCluster"]
T = TypeVar("T")


class ClusterError(RuntimeError):
    """Raised when a node does not start or the topology does not reach a wanted state in time."""


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
        ports = iter(_free_ports(replicas + 1 + sentinels))
        self.nodes = [self._node(f"redis-{i}", next(ports), False) for i in range(replicas + 1)]
        self.sentinels = [self._node(f"sentinel-{i}", next(ports), True) for i in range(sentinels)]

    @staticmethod
    def available() -> bool:
        """True when ``redis-server`` (which also runs the sentinels) is on PATH."""
        return shutil.which("redis-server") is not None

    def _node(self, name: str, port: int, sentinel: bool) -> Node:
        path = self.dir / name
        path.mkdir()
        password = self.sentinel_password if sentinel else self.password
        return Node(name, port, path, sentinel, password)

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
        return [sentinel.names_master(self.master_name) for sentinel in self.sentinels]

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
            for node in self.nodes:
                config = data_config(
                    node, self.redis_options, self.password, None if node is primary else primary
                )
                node.config.write_text(config)
            known = [(sentinel, secrets.token_hex(20)) for sentinel in self.sentinels]
            for sentinel in self.sentinels:
                sentinel.config.write_text(
                    sentinel_config(
                        sentinel, master_name=self.master_name, primary=primary,
                        quorum=self.quorum, down_after_ms=self.down_after_ms,
                        failover_timeout_ms=self.failover_timeout_ms, password=self.password,
                        known=known, replicas=replicas,
                    )
                )  # fmt: skip
            for node in [*self.nodes, *self.sentinels]:
                node.spawn(self.binary)
            for node in [*self.nodes, *self.sentinels]:
                self._wait_answers(node, timeout)
            for sentinel in self.sentinels:
                sentinel.tune()
            self._wait(lambda: self._formed(primary), timeout, "the topology to form")
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_answers(self, node: Node, timeout: float) -> None:
        def answers() -> bool:
            if not node.alive:
                raise ClusterError(f"{node.name} exited\n{self.logs()}")
            return node.answers()

        self._wait(answers, timeout, f"{node.name} to answer PING")

    def _formed(self, primary: Node) -> bool:
        others = len(self.sentinels) - 1
        if not all(s.other_sentinels(self.master_name) >= others for s in self.sentinels):
            return False
        return self.master_address() == primary.address and self._settled()

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until every running sentinel sees the topology as it is (see ``_settled``).

        Sentinel acts on what it last observed: a sentinel that has not yet seen a demoted
        master report its new role still counts it as a master, and after four publish periods
        demotes whatever it finds claiming that role, which may be the replica just promoted.
        The next fault must start from a settled topology.

        Raises:
            ClusterError: not settled within ``timeout``.
        """
        self._wait(self._settled, timeout, "every sentinel to see the topology as it is")

    def _settled(self) -> bool:
        """The master the sentinels name answers ``role`` master, and every running sentinel
        names it, undisturbed (no down flag, no failover), with every running data node as its
        replica reporting that role, its link up."""
        try:
            master = self.node_at(self.master_address())
        except ClusterError:
            return False
        if master.role() != "master":
            return False
        expected = [n for n in self.nodes if n is not master and n.alive and not n.paused]
        ports = {n.port for n in expected}
        live = [s for s in self.sentinels if s.alive and not s.paused]
        if not all(s.sees(self.master_name, master, ports) for s in live):
            return False
        if not all(node.replicates(master) for node in expected):
            return False
        return master.online_replicas() >= {n.port for n in expected}

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
        self._signal(node, signal.SIGSTOP)

    def resume(self, node: Node) -> None:
        """Thaw a paused ``node`` (SIGCONT)."""
        self._signal(node, signal.SIGCONT)

    def _signal(self, node: Node, sig: int) -> None:
        try:
            node.signal(sig)
        except RuntimeError as exc:
            raise ClusterError(str(exc)) from None

    def kill(self, node: Node) -> None:
        """SIGKILL ``node`` and reap it: no shutdown save, sockets reset (a crash)."""
        node.kill()

    def restart(self, node: Node, timeout: float = 30.0) -> None:
        """Start a killed ``node`` again from its (Sentinel-rewritten) config and wait until it
        is back in a settled topology (``settle``): a data node as the master the sentinels name
        or, mostly, a replica of it in sync (an old primary comes back as a master, and Sentinel
        demotes it after four publish periods, see ``SENTINEL_DEBUG``).

        Raises:
            ClusterError: it did not rejoin within ``timeout``.
        """
        node.kill()
        node.spawn(self.binary)
        self._wait_answers(node, timeout)
        if node.sentinel:
            node.tune()
        self.settle(timeout)

    def failover(self, timeout: float = 30.0) -> Node:
        """``SENTINEL FAILOVER``, then wait until every sentinel names the new master, it
        answers ``role`` master, the old master is its replica, in sync, and every sentinel has
        seen all that (``settle``).

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
            lambda: old.replicates(new), max(1.0, deadline - time.monotonic()),
            f"{old.name} to become a replica of {new.name}",
        )  # fmt: skip
        self.settle(max(1.0, deadline - time.monotonic()))
        return new

    def wait_for_new_master(self, old: Node, timeout: float = 30.0) -> Node:
        """Wait until every running, unpaused sentinel names one master other than ``old``,
        that node answers ``role`` master, and the topology has settled (``settle``).

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
            return node if node.role() == "master" else None

        deadline = time.monotonic() + timeout
        found = self._wait(agreed, timeout, f"Sentinel to promote a master other than {old.name}")
        assert found is not None
        self.settle(max(1.0, deadline - time.monotonic()))
        return found

    def wait_detached(self, replica: Node, timeout: float = 30.0) -> None:
        """Wait until the master no longer counts ``replica`` among its connected replicas
        (a paused replica is dropped after ``repl-timeout``): from then on, what the master
        takes is not on ``replica`` at all, not even in its socket buffers."""
        master = self.primary

        self._wait(
            lambda: replica.port not in master.online_replicas(any_state=True), timeout,
            f"{master.name} to drop {replica.name}",
        )  # fmt: skip

    # -- helpers -----------------------------------------------------------------------------

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


def _free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago: bound all at once, since
    ports asked for one by one may come back twice."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((HOST, 0))
        return [int(sock.getsockname()[1]) for sock in socks]
