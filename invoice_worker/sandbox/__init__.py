"""The sandbox provider: a local stand-in for the CoinsPaid / CryptoProcessing API v2.

Development tooling (tests, ``invoice-worker dev``, benchmarks, chaos runs): no product module
imports this package. ``server`` is the HTTP server and its state, ``handler`` its wire side,
``faults`` the outcomes it can inject, ``rules`` the provider's validation rules;
``python -m invoice_worker.sandbox`` serves it.
"""

from invoice_worker.sandbox.faults import OUTCOMES, Faults
from invoice_worker.sandbox.server import Sandbox

__all__ = ["OUTCOMES", "Faults", "Sandbox"]
