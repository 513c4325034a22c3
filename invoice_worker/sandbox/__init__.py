"""The sandbox provider: a local stand-in for the CoinsPaid / CryptoProcessing API v2.

Development tooling (tests, ``invoice-worker dev``, benchmarks, chaos runs): no product module
imports this package. ``server`` is the HTTP server, ``ledger`` its state, ``handler`` its wire
side, ``bodies`` the provider's answer bodies, ``faults`` the outcomes it can inject, ``rules``
the provider's validation rules; ``pages`` the invoice page a payer opens, ``payments`` what
paying does to an invoice, ``callbacks`` the signed callbacks that follow, ``admin`` the admin
API; ``python -m invoice_worker.sandbox`` serves it.
"""

from invoice_worker.sandbox.faults import OUTCOMES, Faults
from invoice_worker.sandbox.server import Sandbox

__all__ = ["OUTCOMES", "Faults", "Sandbox"]
