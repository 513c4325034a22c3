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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import requests

from chaos.failover import clean_failover, lossy_failover, private_vhost, watch
from chaos.proxy import Proxy
from chaos.verify import Report, verify
from invoice_worker.config import Settings
from invoice_worker.devstack.embedded import EmbeddedRedis, free_port
from invoice_worker.devstack.processes import ChildProcess, receiver_process, worker_process
from invoice_worker.devstack.sentinel import SentinelCluster
from invoice_worker.errors import ConflictError
from invoice_worker.producer import Producer
from invoice_worker.receiver import CALLBACK_PATH

KEY, SECRET = "chaos-key", "chaos-secret-never-logged"
POOLS = [("prefork", 2), ("threads", 8), ("threads", 8)]
FAULTS = {  # ~10% 5xx, ~5% 429 (half with Retry-After), ~5% commit-then-fail, a few stalls
    "error-500": 0.04, "error-502": 0.03, "error-503": 0.03, "rate-limit": 0.025,
    "rate-limit-bare": 0.025, "commit-then-drop": 0.025, "commit-then-502": 0.025,
    "timeout": 0.005, "stall-seconds": 2, "latency-ms": 5, "jitter-ms": 20, "retry-after": 1,
    # 0.5% each: a committed call answered with a 200 that is not the invoice asked for, ~50 MB
    # long, or trickled a byte every 0.3 s (far longer than a call's bound).
    "answer-wrong-id": 0.005, "answer-bad-url": 0.005, "answer-wrong-amount": 0.005,
    "answer-wrong-currency": 0.005, "answer-huge": 0.005, "trickle": 0.005,
    "trickle-seconds": 0.3,
}  # fmt: skip
CALLBACK_FAULTS = {
    "callback-duplicate": 0.05, "callback-concurrent": 0.05, "callback-bad-signature": 0.05,
    "callback-out-of-order": 0.1,
}  # fmt: skip
#: What the payer does with the invoices it pays, and how often.
PAYER_MODES = (("full", 0.6), ("instalments", 0.2), ("less", 0.1), ("expire", 0.1))
# Scripted for the first create call of one job each, so even a short run sees every one.
SCRIPTED = ("answer_wrong_id", "answer_bad_url", "answer_wrong_amount", "answer_wrong_currency",
            "answer_huge", "trickle")  # fmt: skip


@dataclass
class Config:
    jobs: int = 300
    producers: int = 3
    duplicates: float = 0.20
    conflicts: float = 0.02
    kill_every: float = 2.0
    freeze_every: float = 10.0
    outage_seconds: float = 6.0
    timeout: float = 240.0
    seed: int = 7
    #: "single": one Redis (AOF, fsync always), killed and restarted once. "sentinel": a
    #: primary, a replica and three sentinels (AOF, fsync every second), failed over once
    #: cleanly and once losing writes (chaos/failover.py).
    topology: str = "single"
    min_replicas: int = 0  # INVOICE_REDIS_MIN_REPLICAS
    #: "redis": the job store's Redis is the broker too; "quorum": RabbitMQ quorum queues in
    #: a private vhost (INVOICE_QUEUE_TYPE=quorum).
    broker: str = "redis"
    callbacks: bool = True
    pay_share: float = 0.5  # of the created invoices
    #: The provider's retry schedule (12 retries over ~24 h) times this: 0.001 is its day in
    #: 88 s. A failover that takes a publication back leaves that job's callbacks answered
    #: "early" until the job is published again, minutes later once the sweeper resends it (a
    #: drained queue first): scaled too far, the provider gives up before that, which a real
    #: day never does. The failover runs use 0.01 (its day in ~15 minutes).
    callback_time_scale: float = 0.001


@dataclass
class Plan:
    """Every enqueue call the producers make, and what the run must show for them."""

    calls: list[list[dict[str, Any]]]  # one list of requests per producer process
    conflicting: set[str] = field(default_factory=set)
    scripted: dict[str, str] = field(default_factory=dict)  # foreign_id: its first call's outcome


def make_plan(cfg: Config, run_id: str) -> Plan:
    rng = random.Random(cfg.seed)
    calls: list[list[dict[str, Any]]] = [[] for _ in range(cfg.producers)]
    plan = Plan(calls)
    for n in range(cfg.jobs):
        foreign_id = f"chaos-{run_id}-{n:05d}"
        request: dict[str, Any] = {
            "timer": rng.random() < 0.5, "title": f"Chaos order {n}",
            "foreign_id": foreign_id, "currency": "BTC",
            "amount": f"0.00{rng.randint(100, 999)}", "email_user": f"payer{n}@example.com",
            "url_success": "https://shop.example.com/ok", "url_failed": "https://shop.example.com/ko",
        }  # fmt: skip
        first = rng.randrange(cfg.producers)
        calls[first].append(request)
        other = (first + 1 + rng.randrange(cfg.producers - 1)) % cfg.producers
        if rng.random() < cfg.duplicates:
            calls[other].append(dict(request))
        elif rng.random() < cfg.conflicts / (1 - cfg.duplicates):
            calls[other].append({**request, "amount": "0.5"})
            plan.conflicting.add(foreign_id)
    for queue in calls:
        rng.shuffle(queue)
    for k, outcome in enumerate(SCRIPTED):
        plan.scripted[f"chaos-{run_id}-{(k + 1) * cfg.jobs // (len(SCRIPTED) + 1):05d}"] = outcome
    return plan


def produce(settings: Settings, requests_: list[dict[str, Any]], seconds: float, out: Any) -> None:
    """A web app: enqueue each request (spread over ``seconds``), retrying while Redis is
    away (enqueue is idempotent, so a retry after an unknown outcome is safe)."""
    producer = Producer(settings)
    accepted, conflicts, retries = [], [], 0
    start, step = time.monotonic(), seconds / max(1, len(requests_))
    for i, request in enumerate(requests_):
        time.sleep(max(0.0, start + i * step - time.monotonic()))
        while True:
            try:
                record = producer.enqueue(request)
                accepted.append((record.foreign_id, request["amount"]))
                break
            except ConflictError:
                conflicts.append(request["foreign_id"])
                break
            except Exception:  # Redis or broker down: a real web app retries too
                retries += 1
                time.sleep(0.2)
    out.put((accepted, conflicts, retries))


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
