"""Chaos run: jobs from several producers through 3 mixed workers, while the provider fails or
answers with hostile, huge or trickled 200s, workers are SIGKILLed or frozen (SIGSTOP) for longer
than their lease, Redis is killed and restarted from its AOF, and the provider vanishes.

With callbacks (the default; ``--no-callbacks`` leaves them out) the sandbox also sends its signed
callbacks, with their faults (duplicates, concurrent copies, bad signatures, out of order), to a
callback receiver process that is itself SIGKILLed once, and a payer pays a share of the created
invoices (in full, in instalments, less, or lets them expire).

``python -m chaos.run --jobs 5000`` (``make chaos``) prints the summary table and exits 1 when an
invariant broke; ``tests/test_chaos.py`` runs a reduced version inside ``make test``.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis
import requests

from chaos.failover import clean_failover, lossy_failover, private_vhost, watch
from chaos.plan import (
    CALLBACK_FAULTS,
    FAULTS,
    KEY,
    PAYER_MODES,
    POOLS,
    SECRET,
    Config,
    Plan,
    make_plan,
    produce,
)
from chaos.proxy import Proxy
from chaos.verify import Report, verify
from invoice_worker.config import Settings
from invoice_worker.devstack.embedded import EmbeddedRedis, free_port
from invoice_worker.devstack.processes import ChildProcess, receiver_process, worker_process
from invoice_worker.devstack.sentinel import SentinelCluster
from invoice_worker.producer import Producer
from invoice_worker.receiver import CALLBACK_PATH


class Chaos:
    """Owns every process of one run and the disruptions applied to them."""

    def __init__(self, cfg: Config, workdir: Path) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.rng = random.Random(cfg.seed)
        self.redis = EmbeddedRedis(appendonly=True)
        self.cluster: SentinelCluster | None = None
        if cfg.topology == "sentinel":
            aof = {"appendonly": "yes", "appendfsync": "everysec"}
            self.cluster = SentinelCluster(redis_options=aof)
        self.sandbox: ChildProcess | None = None
        self.receiver: ChildProcess | None = None
        self.receiver_port = free_port()
        self.paid: dict[str, tuple[str, str]] = {}  # foreign_id: (provider id, payer mode)
        self.proxy: Proxy | None = None
        self.workers: list[ChildProcess] = []
        self.retired: list[ChildProcess] = []
        self.counts: Counter[str] = Counter()
        self.stop = threading.Event()
        self.lock = threading.Lock()  # around workers and frozen (killer and freezer threads)
        self.frozen: ChildProcess | None = None
        self.exits = contextlib.ExitStack()

    def start(self, plan: Plan) -> Settings:
        topology: dict[str, Any]
        if self.cluster is not None:
            self.cluster.start()
            url, topology = self.cluster.url, {"redis_sentinel_master": self.cluster.master_name}
        else:
            url, topology = self.redis.start().url, {}
        topology["redis_url"] = url
        if self.cfg.broker == "quorum":
            broker = self.exits.enter_context(private_vhost())
            topology |= {"broker_url": broker, "queue_type": "quorum"}
        port = free_port()
        argv = [sys.executable, "-m", "invoice_worker.sandbox", "--port", str(port), "--key", KEY,
                "--secret", SECRET, "--seed", str(self.cfg.seed)]  # fmt: skip
        argv += [arg for name, value in FAULTS.items() for arg in (f"--{name}", str(value))]
        if self.cfg.callbacks:
            argv += ["--callback-url", f"http://127.0.0.1:{self.receiver_port}{CALLBACK_PATH}"]
            argv += [
                a for name, value in CALLBACK_FAULTS.items() for a in (f"--{name}", str(value))
            ]
            argv += ["--callback-time-scale", str(self.cfg.callback_time_scale)]
        self.sandbox = ChildProcess("sandbox", argv, {}, self.workdir).start()
        _wait_http(f"http://127.0.0.1:{port}/api/v2/ping")
        self.admin = f"http://127.0.0.1:{port}/_sandbox"
        for foreign_id, outcome in plan.scripted.items():
            script = {"outcomes": [outcome], "foreign_id": foreign_id}
            requests.post(f"{self.admin}/script", json=script, timeout=5).raise_for_status()
        self.proxy = Proxy(port)
        self.settings = Settings(
            _env_file=None, api_url=f"http://127.0.0.1:{self.proxy.port}/api/v2", api_key=KEY,
            api_secret=SECRET, key_prefix="chaos:",
            events_stream="chaos:events", queue="chaos", connect_timeout=0.5, read_timeout=1.0,
            lease_seconds=4.0, visibility_timeout=6, retry_base=0.1, retry_cap=2.0,
            max_attempts=40, max_redeliveries=8, circuit_threshold=10, circuit_cooldown=2.0,
            redis_min_replicas=self.cfg.min_replicas, **{"broker_url": url, **topology},
        )  # fmt: skip
        for pool, concurrency in POOLS:
            self._start_worker(pool, concurrency)
        if self.cfg.callbacks:
            self._start_receiver()
        return self.settings

    def _start_receiver(self) -> None:
        self.receiver = receiver_process(self.settings, self.workdir, port=self.receiver_port)
        self.receiver.start(ready="callback receiver at")

    def pay(self, foreign_ids: list[str]) -> None:
        """The payers: pay a share of the invoices as their jobs are created."""
        rng, store = random.Random(self.cfg.seed + 2), Producer(self.settings).store
        pending, modes = list(foreign_ids), [m for m, _ in PAYER_MODES]
        weights = [w for _, w in PAYER_MODES]
        while pending and not self.stop.wait(0.5):
            try:
                pipe = store.redis.pipeline(transaction=False)
                for fid in pending:
                    pipe.hmget(store.key(fid), "state", "provider_foreign_id")
                found = pipe.execute()
            except redis.RedisError:
                continue
            waiting = []
            for fid, (state, provider_id) in zip(pending, found, strict=True):
                if state in ("failed", "expired"):
                    continue
                if state != "created":
                    waiting.append(fid)
                elif rng.random() < self.cfg.pay_share:
                    mode = rng.choices(modes, weights)[0]
                    url = f"{self.admin}/invoices/{provider_id}/pay"
                    if requests.post(url, json={"mode": mode}, timeout=10).status_code == 200:
                        self.paid[fid] = (provider_id, mode)
            pending = waiting

    def _start_worker(self, pool: str, concurrency: int) -> None:
        worker = worker_process(self.settings, self.workdir, pool=pool, concurrency=concurrency)
        worker.pool = (pool, concurrency)  # type: ignore[attr-defined]
        self.workers.append(worker.start(ready="ready."))

    def disrupt(self, started: float, duration_hint: float) -> None:
        """Kill a worker every few seconds; once kill Redis (or fail it over cleanly, then
        losing writes); once cut the provider off."""
        redis_at, outage_at = started + duration_hint * 0.3, started + duration_hint * 0.55
        lossy_at = started + duration_hint * 0.45
        receiver_at = started + duration_hint * 0.45
        while not self.stop.wait(self.cfg.kill_every):
            with self.lock:  # a frozen worker is left to thaw: its waking up is the test
                victim = self.rng.choice([w for w in self.workers if w is not self.frozen])
                self.workers.remove(victim)
                victim.kill(signal.SIGKILL)
                self.retired.append(victim)
                self.counts["worker kills"] += 1
                self._start_worker(*victim.pool)  # type: ignore[attr-defined]
            now = time.monotonic()
            if self.cluster is not None:
                if now >= redis_at and not self.counts["clean failovers"]:
                    clean_failover(self.cluster)
                    self.counts["clean failovers"] += 1
                if now >= lossy_at and not self.counts["failovers losing writes"]:
                    lossy_failover(self.cluster)
                    self.counts["failovers losing writes"] += 1
            elif now >= redis_at and not self.counts["redis kills"]:
                self.redis.kill()  # SIGKILL: no shutdown save; the AOF has every write
                time.sleep(3.0)  # longer than redis-py's own retries: callers see it
                self.redis.start()
                self.counts["redis kills"] += 1
            if now >= receiver_at and self.receiver and not self.counts["receiver kills"]:
                self.receiver.kill(signal.SIGKILL)  # mid-request, perhaps: the provider retries
                time.sleep(2.0)  # (its successor appends to the same log)
                self._start_receiver()
                self.counts["receiver kills"] += 1
            if now >= outage_at and not self.counts["provider outages"]:
                assert self.proxy is not None
                self.proxy.cut()
                time.sleep(self.cfg.outage_seconds)
                self.proxy.restore()
                self.counts["provider outages"] += 1

    def freeze(self) -> None:
        """Every few seconds freeze a worker's process group (SIGSTOP, as a paused container or
        VM) for longer than the lease plus the broker's redelivery delay, so that other workers
        take its jobs over; then thaw it, to find its leases gone."""
        settings, rng = self.settings, random.Random(self.cfg.seed + 1)
        seconds = settings.lease + settings.broker_visibility_timeout
        while not self.stop.wait(self.cfg.freeze_every):
            with self.lock:
                self.frozen = victim = rng.choice(self.workers)
                victim.signal_group(signal.SIGSTOP)
            time.sleep(seconds)  # not stop.wait: a frozen worker is always thawed
            self.thaw()
            self.counts["worker freezes"] += 1

    def thaw(self) -> None:
        with self.lock:
            if self.frozen is not None:
                self.frozen.signal_group(signal.SIGCONT)
                self.frozen = None

    def logs(self) -> str:
        receiver = [self.receiver] if self.receiver else []
        return "".join(w.log() for w in self.workers + self.retired + receiver)

    def close(self) -> None:
        self.stop.set()
        self.thaw()
        for worker in self.workers:
            worker.stop(timeout=10)
        if self.receiver is not None:
            self.receiver.stop()
        if self.proxy is not None:
            self.proxy.close()
        if self.sandbox is not None:
            self.sandbox.stop()
        self.redis.stop()
        if self.cluster is not None:
            self.cluster.stop()
        self.exits.close()


def run(cfg: Config) -> Report:
    """One chaos run; the report lists every broken invariant in ``problems``."""
    run_id = f"{random.Random().getrandbits(24):06x}"
    plan = make_plan(cfg, run_id)
    with tempfile.TemporaryDirectory(prefix="invoice-chaos-") as tmp:
        chaos = Chaos(cfg, Path(tmp))
        try:
            settings = chaos.start(plan)
            ctx = multiprocessing.get_context("spawn")
            out = ctx.Queue()
            started = time.monotonic()
            # Enqueue over the first 60% of the run, so Redis dies under producers and workers.
            duration = max(10.0, cfg.jobs / 40)
            producers = [
                ctx.Process(target=produce, args=(settings, calls, duration * 0.6, out))
                for calls in plan.calls
            ]
            for p in producers:
                p.start()
            fids = [r["foreign_id"] for calls in plan.calls for r in calls]
            watching, shown_out = ctx.Event(), ctx.Queue()
            watcher = ctx.Process(target=watch, args=(settings, fids, watching, shown_out))
            watcher.start()
            disruptor = threading.Thread(
                target=chaos.disrupt, args=(started, duration), daemon=True
            )
            disruptor.start()
            freezer = threading.Thread(target=chaos.freeze, daemon=True)
            freezer.start()
            every_id = [r["foreign_id"] for calls in plan.calls for r in calls]
            payer = threading.Thread(target=chaos.pay, args=(list(dict.fromkeys(every_id)),))
            if cfg.callbacks:
                payer.start()
            results = [out.get(timeout=cfg.timeout) for _ in producers]
            for p in producers:
                p.join(timeout=30)
            accepted = {fid: amount for r in results for fid, amount in r[0]}
            conflicts = [fid for r in results for fid in r[1]]
            store = Producer(settings).store
            deadline = started + cfg.timeout
            while time.monotonic() < deadline and not _all_final(store, accepted):
                time.sleep(0.5)
            wall = time.monotonic() - started
            watching.set()
            shown, _ = shown_out.get(timeout=60)
            watcher.join(timeout=30)
            if cfg.callbacks:
                payer.join(timeout=max(1.0, deadline - time.monotonic()))
                while time.monotonic() < deadline and not _all_settled(store, chaos.paid):
                    time.sleep(0.5)
            settled = time.monotonic() - started
            chaos.stop.set()
            disruptor.join(timeout=cfg.outage_seconds + 30)
            freezer.join(timeout=settings.lease + settings.broker_visibility_timeout + 30)
            invoices = requests.get(f"{chaos.admin}/invoices", timeout=10).json()
            outcomes = requests.get(f"{chaos.admin}/stats", timeout=10).json()["outcomes"]
            report = verify(
                store=store, accepted=accepted, conflicts=conflicts,
                plan_conflicts=plan.conflicting, invoices=invoices["invoices"],
                create_calls=invoices["create_calls"],
                logs=chaos.logs(), secret=SECRET, counts=chaos.counts, wall=wall,
                producer_retries=sum(r[2] for r in results), outcomes=outcomes,
                shown=[tuple(pair) for pair in shown],
                paid=chaos.paid if cfg.callbacks else None, settled=settled,
            )  # fmt: skip
            if report.problems:  # keep the evidence: the work directory goes away
                kept = Path(tempfile.gettempdir()) / f"invoice-chaos-{run_id}.log"
                kept.write_text(chaos.logs())
                report.add("worker logs kept at", kept)
            return report
        finally:
            chaos.close()


def _all_final(store: Any, accepted: dict[str, str]) -> bool:
    try:
        states = store.states(list(accepted))
    except redis.RedisError:
        return False
    return all(state in ("created", "failed", "expired") for state in states)


def _all_settled(store: Any, paid: dict[str, tuple[str, str]]) -> bool:
    """Every paid invoice's final status has reached its record."""
    try:
        pipe = store.redis.pipeline(transaction=False)
        for fid in paid:
            pipe.hget(store.key(fid), "invoice_status")
        return all(status in ("confirmed", "failed") for status in pipe.execute())
    except redis.RedisError:
        return False


def _wait_http(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            requests.get(url, timeout=1)
            return
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.run", description=__doc__)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--producers", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--topology", choices=("single", "sentinel"), default="single")
    parser.add_argument("--min-replicas", type=int, default=0)
    parser.add_argument("--broker", choices=("redis", "quorum"), default="redis")
    parser.add_argument(
        "--expect-broken", action="store_true",
        help="succeed only if an invariant breaks (to show what --min-replicas 0 risks)",
    )  # fmt: skip
    parser.add_argument(
        "--no-callbacks", dest="callbacks", action="store_false", help="no receiver, no payer"
    )
    parser.add_argument("--callback-time-scale", type=float, default=0.001)
    args = parser.parse_args(argv)
    cfg = Config(
        jobs=args.jobs, producers=args.producers, timeout=args.timeout, seed=args.seed,
        topology=args.topology, min_replicas=args.min_replicas, broker=args.broker,
        callbacks=args.callbacks, callback_time_scale=args.callback_time_scale,
    )  # fmt: skip
    report = run(cfg)
    print(report.table())
    return 0 if bool(report.problems) == args.expect_broken else 1


if __name__ == "__main__":
    sys.exit(main())
