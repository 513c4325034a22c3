"""``python -m invoice_worker.sandbox [options]``: serve the sandbox provider."""

import sys

from invoice_worker import cli

raise SystemExit(cli.main(["sandbox", *sys.argv[1:]]))
