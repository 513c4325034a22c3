"""The ``invoice-worker`` command: enqueue, status, reissue, callbacks, metrics, watch, check,
flower; sandbox, dev.

Exit codes (also in the README):
    0 success; 1 the job ended failed/expired (``--wait``) or ``check`` found a fault;
    2 usage; 3 invalid request; 4 conflict; 5 not found; 6 Redis, broker or provider
    unreachable; 7 ``--wait`` timed out; 8 bad settings.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import redis
from kombu.exceptions import OperationalError

from invoice_worker import __version__
from invoice_worker.config import Settings
from invoice_worker.connection import redis_client
from invoice_worker.constants import JobState, QueueType
from invoice_worker.dashboard import cmd_flower
from invoice_worker.errors import (
    ConfigError,
    ConflictError,
    InvalidRequestError,
    NotDurableError,
)
from invoice_worker.privacy import escape_controls, redact_url

EXIT_NOT_CREATED, EXIT_USAGE, EXIT_INVALID, EXIT_CONFLICT = 1, 2, 3, 4
EXIT_NOT_FOUND, EXIT_UNREACHABLE, EXIT_TIMEOUT, EXIT_CONFIG = 5, 6, 7, 8

# Development tooling, imported only when its command is given (so the product commands and
# `--help` never load the sandbox or the dev stack): name -> (help, "module:function"), where the
# function adds the command's options to its parser and sets the parser's ``run`` default.
TOOLING = {
    "sandbox": ("serve the local sandbox provider API", "invoice_worker.sandbox.cli:configure"),
    "dev": (
        "run the whole stack locally (Redis, sandbox, worker, Flower)",
        "invoice_worker.devstack.dev:configure",
    ),
}
# Product commands registered the same way, so `--help` and the other commands stay light.
SERVICES = {
    "callbacks": (
        "serve the callback receiver (POST /callbacks/coinspaid)",
        "invoice_worker.receiver:configure",
    ),
    "reissue": ("re-issue a failed invoice for the same order", "invoice_worker.reissue:configure"),
}
_REQUEST_FLAGS = (
    "type", "title", "description", "foreign_id", "currency", "sender_currency", "amount",
    "url_success", "url_failed", "email_user",
)  # fmt: skip


def cmd_enqueue(args: argparse.Namespace, settings: Settings) -> int:
    from invoice_worker.producer import Producer

    data = _request_from(args)
    producer = Producer(settings)
    try:
        deadline = time.time() + args.deadline if args.deadline else None
        record = producer.enqueue(
            data, deadline=deadline, callback_task=args.callback_task,
            callback_queue=args.callback_queue,
        )  # fmt: skip
        if args.wait is not None:
            record = producer.wait(record.foreign_id, args.wait) or record
    finally:
        producer.close()
    print_record(record.to_dict(), as_json=args.json, brief=True)
    if args.wait is not None and not record.final:
        print(f"timed out after {args.wait}s waiting for a final state", file=sys.stderr)
        return EXIT_TIMEOUT
    return EXIT_NOT_CREATED if record.state in (JobState.FAILED, JobState.EXPIRED) else 0


def _request_from(args: argparse.Namespace) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if args.file:
        stream: TextIO = sys.stdin if args.file == "-" else open(args.file)  # noqa: SIM115
        with stream:
            try:
                loaded = json.load(stream)
            except ValueError as exc:
                raise InvalidRequestError({"request": f"is not valid JSON ({exc})"}) from None
        if not isinstance(loaded, dict):
            raise InvalidRequestError({"request": "must be a JSON object"})
        data.update(loaded)
    data.update({k: getattr(args, k) for k in _REQUEST_FLAGS if getattr(args, k) is not None})
    if args.timer is not None:
        data["timer"] = args.timer
    return data


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from invoice_worker.store import JobStore

    store = JobStore.from_settings(settings)
    if args.provider:
        from invoice_worker.fleet import provider_status

        print_record(provider_status(store, settings), as_json=args.json)
        return 0
    if args.foreign_id is None:
        print("error: give a FOREIGN_ID, or --provider", file=sys.stderr)
        return EXIT_USAGE
    record = store.get(args.foreign_id)
    if record is None:
        print(f"no job with foreign_id {escape_controls(args.foreign_id)!r}", file=sys.stderr)
        return EXIT_NOT_FOUND
    print_record(record.to_dict(), as_json=args.json)
    return 0


def cmd_metrics(args: argparse.Namespace, settings: Settings) -> int:
    from invoice_worker.metrics import serve

    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # before the server thread: it inherits it
    serve(settings, args.port, args.addr)
    print(f"metrics on http://{args.addr}:{args.port}/metrics (Ctrl-C stops)", flush=True)
    signal.sigwait(stop)
    return 0


def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    from invoice_worker.store import JobStore

    store = JobStore.from_settings(settings)
    after, seen = args.since, 0
    try:
        while args.count is None or seen < args.count:
            for entry_id, event in store.events(after, count=100, block_ms=1000):
                after, seen = entry_id, seen + 1
                if args.json:
                    print(json.dumps({"id": entry_id, **event}), flush=True)
                elif event.get("kind") == "status":
                    detail = (
                        f"{event.get('previous')} -> {event['status']} {event.get('error', '')}"
                    )
                    print(f"{entry_id}  {event['foreign_id']}  status   {detail}", flush=True)
                else:
                    detail = event.get("url") or f"{event.get('error_code')}: {event.get('error')}"
                    print(
                        f"{entry_id}  {event['foreign_id']}  {event['state']:<8} {detail}",
                        flush=True,
                    )
                if args.count is not None and seen >= args.count:
                    break
    except KeyboardInterrupt:
        pass
    return 0


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    from invoice_worker.app import create_app
    from invoice_worker.client import ProviderClient

    results: list[tuple[bool, str, str]] = []

    def probe(name: str, target: str, fn: Callable[[], object]) -> None:
        try:
            found = fn()
            ok, detail = bool(found), (found if isinstance(found, str) else "")
        except Exception as exc:  # every failure is reported, none is fatal to the check
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        results.append((ok, name, f"{target} {detail}".rstrip()))

    def credentials() -> bool:
        settings.require_credentials()
        return True

    probe("credentials", "INVOICE_API_KEY / INVOICE_API_SECRET", credentials)
    probe(
        "redis",
        redact_url(settings.state_url),
        lambda: _ping(settings),
    )

    from invoice_worker.preflight import require_noeviction, server_settings

    def job_store() -> str:
        with redis_client(settings, socket_timeout=3) as client:
            found = server_settings(client)
            require_noeviction(client)
        return " ".join(f"{k}={v}" for k, v in found.items())

    probe("job store", "eviction policy and persistence", job_store)
    app = create_app(settings)

    def broker() -> bool | str:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
            if settings.queue_type is QueueType.CLASSIC:
                return True
            from invoice_worker.queues import quorum_support

            return f"quorum queue {settings.queue} on {quorum_support(conn)}"

    probe("broker", redact_url(settings.broker_url), broker)
    if args.provider:
        probe("provider", settings.api_url, lambda: ProviderClient.from_settings(settings).ping())
    for ok, name, detail in results:
        print(f"{'ok  ' if ok else 'FAIL'}  {name:<12} {detail}")
    if all(ok for ok, _, _ in results):
        return 0
    return EXIT_CONFIG if not results[0][0] else EXIT_UNREACHABLE


def _ping(settings: Settings) -> bool:
    with redis_client(settings, socket_timeout=3) as client:
        return bool(client.ping())


def print_record(record: dict[str, Any], *, as_json: bool, brief: bool = False) -> None:
    if as_json:
        print(json.dumps(record, indent=2, sort_keys=True, default=str))
        return
    if brief:
        extra = record.get("url") or (
            f"{record.get('error_code')}: {record.get('error')}" if record.get("error_code") else ""
        )
        print(f"{record['foreign_id']}  {record['state']}  {extra}".rstrip())
        return
    width = max(len(k) for k in record)
    for key in sorted(record):
        value = record[key]
        if key in (
            "created_at",
            "updated_at",
            "next_attempt_at",
            "deadline",
            "status_at",
        ) and isinstance(value, float):
            value = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))
        print(f"{key:<{width}}  {value}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of every sub-command; of the `TOOLING` ones, only `command`'s."""
    parser = argparse.ArgumentParser(
        prog="invoice-worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    enqueue = commands.add_parser("enqueue", help="enqueue one invoice job")
    enqueue.add_argument(
        "--file", "-f", help="JSON request file, or - for stdin (flags override it)"
    )
    for name in _REQUEST_FLAGS:
        enqueue.add_argument(f"--{name.replace('_', '-')}")
    enqueue.add_argument("--timer", action=argparse.BooleanOptionalAction, default=None)
    enqueue.add_argument(
        "--deadline", type=float, metavar="SECONDS", help="expire the job after this long"
    )
    enqueue.add_argument("--callback-task")
    enqueue.add_argument("--callback-queue")
    enqueue.add_argument("--wait", type=float, metavar="SECONDS", help="wait for the final state")
    enqueue.add_argument("--json", action="store_true", help="print the record as JSON")
    enqueue.set_defaults(run=cmd_enqueue)

    status = commands.add_parser("status", help="show a job record, or the provider's state")
    status.add_argument("foreign_id", nargs="?")
    status.add_argument("--provider", action="store_true", help="circuit, 429 pause, rate limit")
    status.add_argument("--json", action="store_true")
    status.set_defaults(run=cmd_status)

    metrics = commands.add_parser("metrics", help="serve Prometheus metrics for the fleet")
    metrics.add_argument("--port", type=int, default=9808)
    metrics.add_argument("--addr", default="0.0.0.0")  # noqa: S104 - an exporter is scraped
    metrics.set_defaults(run=cmd_metrics)

    watch = commands.add_parser("watch", help="follow the events stream (jobs and statuses)")
    watch.add_argument("--since", default="$", help="stream id to start after (0 = from the start)")
    watch.add_argument("--count", type=int, help="stop after this many events")
    watch.add_argument("--json", action="store_true")
    watch.set_defaults(run=cmd_watch)

    check = commands.add_parser(
        "check", help="validate settings and reach Redis, broker and provider"
    )
    check.add_argument(
        "--no-provider", dest="provider", action="store_false",
        help="skip the provider (for container health checks: its outage is not ours)",
    )  # fmt: skip
    check.set_defaults(run=cmd_check)

    flower = commands.add_parser(
        "flower", help="serve Flower, never without a login", allow_abbrev=False,
        description="Run celery -A invoice_worker.worker flower with the other options (--port=N,"
        " --address=A, ...) once a login is configured: FLOWER_BASIC_AUTH=user:password,"
        " --basic-auth=user:password, or --auth=... with Flower's OAuth settings.",
    )  # fmt: skip
    flower.add_argument(
        "--dev-no-auth", action="store_true",
        help="development only: no login, bound to 127.0.0.1 (any other --address is refused)",
    )  # fmt: skip
    flower.set_defaults(run=cmd_flower, pass_through=True)

    for name, (text, target) in {**SERVICES, **TOOLING}.items():
        tool = commands.add_parser(name, help=text, description=text)
        if name == command:
            module, _, function = target.partition(":")
            getattr(importlib.import_module(module), function)(tool)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # The command is the first word: the top-level options (--help, --version) take no value.
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser(command)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "pass_through", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra  # the options `flower` hands on
    try:
        settings = Settings.load()
    except ConfigError as exc:
        if getattr(args, "no_settings", False):
            settings = Settings.model_construct()
        else:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    try:
        return int(args.run(args, settings))
    except InvalidRequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except ConflictError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFLICT
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except NotDurableError as exc:  # INVOICE_REDIS_MIN_REPLICAS: run the same enqueue again
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (redis.RedisError, OperationalError, OSError) as exc:
        print(f"error: unreachable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE


if __name__ == "__main__":
    sys.exit(main())
