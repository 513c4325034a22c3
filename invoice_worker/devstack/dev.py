"""``invoice-worker dev``: the whole stack on one machine, with nothing installed beforehand.

Redis: ``INVOICE_BROKER_URL`` / ``INVOICE_REDIS_URL`` when set, else an embedded one.
Provider: ``INVOICE_API_URL`` when set, else the sandbox, with ``INVOICE_API_KEY`` /
``INVOICE_API_SECRET`` when both are set (so an app's own receiver verifies its callbacks),
else with generated ones.
Then a worker, the callback receiver (the sandbox's callbacks go to it; with
``--callback-url`` they go to that URL instead, an app's receiver, and none is started), Flower
when installed, and with ``--demo N`` a scripted run of N invoices, created, then paid (or not).
"""

from __future__ import annotations

import argparse
import importlib.util
import secrets
import signal
import sys
import tempfile
import threading
from contextlib import ExitStack
from pathlib import Path
from types import FrameType

from invoice_worker.config import Settings
from invoice_worker.devstack.demo import Demo
from invoice_worker.devstack.embedded import EmbeddedRedis, free_port
from invoice_worker.devstack.processes import flower_process, receiver_process, worker_process
from invoice_worker.errors import ConfigError
from invoice_worker.privacy import redact_url
from invoice_worker.producer import Producer
from invoice_worker.receiver import CALLBACK_PATH
from invoice_worker.sandbox import Sandbox
from invoice_worker.sandbox.callbacks import check_url

#: The sandbox's callback retries, 100 times faster than the provider's: the first after 0.6 s.
CALLBACK_TIME_SCALE = 0.01


def add_dev_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``invoice-worker dev``."""
    parser.add_argument(
        "--demo", type=int, metavar="N", help="enqueue N sample invoices, show them, exit"
    )
    parser.add_argument(
        "--pool", default="threads", choices=["threads", "prefork", "solo", "gevent"]
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--flower-port", type=int, default=5555)
    parser.add_argument("--no-flower", dest="flower", action="store_false")
    parser.add_argument("--timeout", type=float, default=120, help="--demo gives up after this")
    parser.add_argument(
        "--fakeredis", action="store_true", help="embed fakeredis even if redis-server exists"
    )
    parser.add_argument(
        "--callback-url",
        metavar="URL",
        help="the sandbox sends its callbacks here (your app's receiver) instead of to a "
        "receiver of its own; set INVOICE_API_KEY and INVOICE_API_SECRET so both sides agree",
    )


def configure(parser: argparse.ArgumentParser) -> None:
    """Make `parser` the ``invoice-worker dev`` command: its options and its ``run``."""
    add_dev_arguments(parser)
    parser.set_defaults(run=run_dev)


def run_dev(args: argparse.Namespace, settings: Settings) -> int:
    """Start the stack; with ``--demo`` run it and exit, else serve until Ctrl-C.

    Raises:
        ConfigError: for ``--callback-url`` with ``--demo`` or a provider that is not the
            sandbox, a bad callback URL, or only one of INVOICE_API_KEY / INVOICE_API_SECRET.
    """
    _check_options(args, settings)
    with ExitStack() as stack:
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="invoice-dev-")))
        settings, sandbox = _start_services(settings, stack, use_binary=not args.fakeredis)
        worker = worker_process(settings, log_dir, pool=args.pool, concurrency=args.concurrency)
        stack.callback(worker.stop)
        worker.start(ready="ready.")
        print(f"worker     {args.pool} x {args.concurrency} on queue {settings.queue!r}")
        print(f"           log: {worker.log_path}")
        if args.callback_url and sandbox is not None:
            sandbox.set_callbacks(url=args.callback_url, time_scale=CALLBACK_TIME_SCALE)
            shown = redact_url(args.callback_url)
            print(f"callbacks  {shown} (the sandbox sends here; no receiver started)")
        else:
            _start_receiver(settings, sandbox, stack, log_dir)
        if args.flower and importlib.util.find_spec("flower") is not None:
            flower = flower_process(settings, log_dir, port=args.flower_port)
            stack.callback(flower.stop)
            flower.start()
            print(f"flower     http://127.0.0.1:{args.flower_port}/")
        elif args.flower:
            print("flower     not installed (pip install 'invoice-worker[flower]')")
        producer = Producer(settings)
        stack.callback(producer.close)
        if args.demo:
            code = Demo(producer, sandbox, worker).run(args.demo, timeout=args.timeout)
            if sys.stdout.isatty():  # so the invoice pages printed above open in a browser
                print("\nthe stack stays up (the invoice pages above open); Ctrl-C stops")
                _wait_for_signal()
            return code
        print("\nready: enqueue with  invoice-worker enqueue --file request.json --wait 30")
        print(
            "        (in another shell, with the INVOICE_* variables printed above); Ctrl-C stops"
        )
        _wait_for_signal()
        print("\nstopping...")
    return 0


def _check_options(args: argparse.Namespace, settings: Settings) -> None:
    given = settings.model_fields_set
    if len(given & {"api_key", "api_secret"}) == 1 and "api_url" not in given:
        raise ConfigError(
            "set both INVOICE_API_KEY and INVOICE_API_SECRET for the sandbox, or neither "
            "(then it makes up its own)"
        )
    if not args.callback_url:
        return
    if args.demo:
        raise ConfigError("--callback-url and --demo: the demo needs the stack's own receiver")
    if "api_url" in given:
        raise ConfigError(
            "--callback-url sets where the sandbox sends callbacks; with INVOICE_API_URL set the "
            "provider is not the sandbox: set the callback URL in its back office"
        )
    try:
        check_url(args.callback_url)
    except ValueError as exc:
        raise ConfigError(f"--callback-url: {exc}") from None


def _start_receiver(
    settings: Settings, sandbox: Sandbox | None, stack: ExitStack, log_dir: Path
) -> None:
    port = free_port()
    receiver = receiver_process(settings, log_dir, port=port)
    stack.callback(receiver.stop)
    receiver.start(ready="callback receiver at")
    callback_url = f"http://127.0.0.1:{port}{CALLBACK_PATH}"
    if sandbox is not None:
        sandbox.set_callbacks(url=callback_url, time_scale=CALLBACK_TIME_SCALE)
    print(f"callbacks  {callback_url}" + (" (the sandbox sends here)" if sandbox else ""))
    print(f"           log: {receiver.log_path}")


def _start_services(
    settings: Settings, stack: ExitStack, *, use_binary: bool
) -> tuple[Settings, Sandbox | None]:
    given = settings.model_fields_set
    if "broker_url" in given or "redis_url" in given:
        print(f"redis      {redact_url(settings.state_url)} (from INVOICE_*)")
    else:
        redis_server = stack.enter_context(EmbeddedRedis(use_binary=use_binary))
        settings = settings.replace(broker_url=redis_server.url, redis_url=redis_server.url)
        print(f"redis      {redis_server.url} (embedded {redis_server.kind})")
    sandbox = None
    if "api_url" in given:
        print(f"provider   {redact_url(settings.api_url)} (from INVOICE_API_URL)")
    else:
        own = {"api_key", "api_secret"} <= given
        if own:
            key, secret = (
                settings.api_key.get_secret_value(),
                settings.api_secret.get_secret_value(),
            )
        else:
            key, secret = f"dev-{secrets.token_hex(6)}", secrets.token_urlsafe(24)
        sandbox = stack.enter_context(Sandbox(key, secret, port=free_port()))
        settings = settings.replace(api_url=sandbox.url, api_key=key, api_secret=secret)
        print(f"provider   {sandbox.url} (sandbox; admin at {sandbox.admin_url})")
        if own:
            print(f"           key {key!r} and its secret from INVOICE_API_KEY / _SECRET")
    print(f"\n{export_lines(settings, given)}")
    return settings, sandbox


def export_lines(settings: Settings, given: set[str]) -> str:
    """What points another shell at this stack, without any password in it.

    The URLs the stack chose itself (embedded Redis, sandbox) are printed (they carry no
    password); the ones read from ``INVOICE_*`` (`given`) are already in the caller's shell, so
    they are named, never repeated.
    """
    names = ("broker_url", "redis_url", "api_url")
    chosen = [
        f"INVOICE_{name.upper()}={redact_url(value)}"
        for name in names
        if name not in given and (value := getattr(settings, name))
    ]
    lines = [f"export {' '.join(chosen)}"] if chosen else []
    if kept := [f"INVOICE_{name.upper()}" for name in names if name in given]:
        names_kept = ", ".join(kept)
        lines.append(f"# and {names_kept} as set in this shell (not printed: may hold a password)")
    return "\n".join(lines)


def _wait_for_signal() -> None:
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    stop.wait()
