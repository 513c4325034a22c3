"""The sandbox's command line: ``invoice-worker sandbox`` and ``python -m invoice_worker.sandbox``.

Fault and callback flags left unset fall back to ``INVOICE_SANDBOX_<FIELD>`` variables (e.g.
``INVOICE_SANDBOX_CALLBACK_URL``); the key and secret to ``INVOICE_API_KEY`` /
``INVOICE_API_SECRET``, else made up (and printed once).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import fields
from decimal import Decimal
from typing import TYPE_CHECKING

from invoice_worker.sandbox.faults import ENV_PREFIX, INTEGERS, Faults
from invoice_worker.sandbox.payments import TIMER_SECONDS
from invoice_worker.sandbox.rules import parse_number
from invoice_worker.sandbox.server import Sandbox

if TYPE_CHECKING:
    from invoice_worker.config import Settings

DESCRIPTION = "Serve the local sandbox provider API (a stand-in for CoinsPaid's API v2)."


def _amount_arg(text: str) -> Decimal:
    if (amount := parse_number(text)) is None or amount < 0:
        raise argparse.ArgumentTypeError(f"not an amount: {text!r}")
    return amount


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the sandbox's options; fault flags left unset fall back to INVOICE_SANDBOX_* values."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (%(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port (%(default)s)")
    parser.add_argument("--key", help="API key (default: $INVOICE_API_KEY, else generated)")
    parser.add_argument("--secret", help="API secret (default: $INVOICE_API_SECRET, else made up)")
    parser.add_argument(
        "--min-amount", type=_amount_arg, default=Decimal(0), metavar="EUR", help="smallest invoice"
    )
    parser.add_argument("--no-admin", dest="admin", action="store_false", help="hide /_sandbox")
    parser.add_argument(
        "--callback-url", metavar="URL", help=f"where to POST callbacks (${ENV_PREFIX}CALLBACK_URL)"
    )
    parser.add_argument(
        "--callback-time-scale",
        type=float,
        metavar="X",
        help=f"multiply the retry delays (${ENV_PREFIX}CALLBACK_TIME_SCALE, else 1)",
    )
    parser.add_argument(
        "--timer-seconds",
        type=int,
        default=TIMER_SECONDS,
        metavar="S",
        help="how long a timer invoice stays payable (%(default)s, the provider's)",
    )
    for f in fields(Faults):
        kind = int if f.name in INTEGERS else float
        text = f"default: ${ENV_PREFIX}{f.name.upper()}, else {f.default}"
        flag = f"--{f.name.replace('_', '-')}"
        parser.add_argument(flag, dest=f"fault_{f.name}", type=kind, metavar="N", help=text)


def run(args: argparse.Namespace) -> int:
    """Serve a sandbox set up by `add_arguments` options until SIGINT or SIGTERM.

    Returns:
        0 after a clean shutdown; 2 for bad fault settings or an address that cannot be bound.
    """
    flags = {f.name: getattr(args, f"fault_{f.name}") for f in fields(Faults)}
    key = args.key or os.environ.get("INVOICE_API_KEY") or f"sandbox-{secrets.token_hex(8)}"
    given_secret = args.secret or os.environ.get("INVOICE_API_SECRET")
    secret = given_secret or secrets.token_urlsafe(32)
    options = {"host": args.host, "port": args.port, "admin": args.admin}
    callback_url = args.callback_url or os.environ.get(f"{ENV_PREFIX}CALLBACK_URL")
    scale = args.callback_time_scale
    try:
        if scale is None:
            scale = float(os.environ.get(f"{ENV_PREFIX}CALLBACK_TIME_SCALE") or 1)
        faults = Faults.from_env(os.environ)
        faults = Faults.from_dict({k: v for k, v in flags.items() if v is not None}, base=faults)
        sandbox = Sandbox(
            key, secret, faults=faults, min_amount=args.min_amount, callback_url=callback_url,
            callback_time_scale=scale, timer_seconds=args.timer_seconds, **options,
        )  # fmt: skip
    except (ValueError, OSError) as e:
        print(f"sandbox: {e}", file=sys.stderr)
        return 2
    print(f"sandbox provider API at {sandbox.url}\nkey: {key}", flush=True)
    if not given_secret:  # made up here, so showing it once is the only way to configure a worker
        print(f"secret: {secret}", flush=True)
    if callback_url:
        print(f"callbacks to {callback_url} (retry delays x {scale:g})", flush=True)

    # A signal must not raise inside the accept loop (a KeyboardInterrupt while it starts a
    # handler thread is swallowed by socketserver and the server keeps serving): the handler
    # asks another thread to stop the loop, which then returns here.
    def request_stop(*_: object) -> None:
        threading.Thread(target=sandbox.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    sandbox.serve_forever()
    sandbox.stop()
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    """Make `parser` the ``invoice-worker sandbox`` command: its options and its ``run``."""
    add_arguments(parser)
    parser.set_defaults(run=_run_command, no_settings=True)


def _run_command(args: argparse.Namespace, _settings: Settings) -> int:
    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m invoice_worker.sandbox``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m invoice_worker.sandbox", description=DESCRIPTION
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
