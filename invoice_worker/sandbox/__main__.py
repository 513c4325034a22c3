"""``python -m invoice_worker.sandbox [options]``: serve the sandbox provider."""

from invoice_worker.sandbox.cli import main

raise SystemExit(main())
