"""``invoice-worker flower``: Flower over the workers' events, only behind a login (it shows
task names, ids and results of the whole fleet, so it must not be served openly)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence

from invoice_worker.config import Settings
from invoice_worker.errors import ConfigError

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def cmd_flower(args: argparse.Namespace, settings: Settings) -> int:
    """Exec ``celery -A invoice_worker.worker flower`` with the other arguments, if it asks for a
    login (see `flower_argv`); never returns otherwise.

    Raises:
        ConfigError: Flower is not installed, or it would serve without authentication.
    """
    if importlib.util.find_spec("flower") is None:
        raise ConfigError("Flower is not installed: pip install 'invoice-worker[flower]'")
    argv = flower_argv(args.extra, os.environ, dev_no_auth=args.dev_no_auth)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)  # noqa: S606 - our argv; Flower takes this process (signals)


def flower_argv(
    flower_args: Sequence[str], environ: Mapping[str, str], *, dev_no_auth: bool = False
) -> list[str]:
    """The ``celery flower`` command line for `flower_args`, if Flower will ask for a login.

    Flower reads ``FLOWER_<OPTION>`` variables, then ``--option=value`` arguments (which win);
    a login is basic auth (``user:password`` entries) or OAuth (``--auth``). A flowerconfig.py
    is not read here, so it cannot be the only place that sets one.

    Raises:
        ConfigError: no login is configured and not `dev_no_auth`; or `dev_no_auth` with an
            address other than loopback (it binds 127.0.0.1 when none is given).
    """
    given = {
        k.removeprefix("FLOWER_").lower(): v for k, v in environ.items() if k.startswith("FLOWER_")
    }
    for arg in flower_args:
        name, _, value = arg.lstrip("-").partition("=")
        given[name.replace("-", "_")] = value
    argv = [sys.executable, "-m", "celery", "-A", "invoice_worker.worker", "flower", *flower_args]
    if dev_no_auth:
        if (address := given.get("address", "127.0.0.1")) not in _LOOPBACK:
            raise ConfigError(f"--dev-no-auth serves on loopback only, not on {address!r}")
        return argv if "address" in given else [*argv, "--address=127.0.0.1"]
    logins = [entry.partition(":") for entry in given.get("basic_auth", "").split(",")]
    if all(user and password for user, _, password in logins) or given.get("auth"):
        return argv
    raise ConfigError(
        "Flower refuses to serve without authentication: set FLOWER_BASIC_AUTH=user:password "
        "(or --basic-auth=user:password, or --auth=... with Flower's OAuth settings); "
        "--dev-no-auth is for a local stack only"
    )
