"""The provider's answer bodies: compact JSON, and the error bodies the real API sends."""

from __future__ import annotations

import json
from typing import Any


def json_bytes(obj: Any) -> bytes:
    """Compact JSON, as the provider writes it."""
    return json.dumps(obj, separators=(",", ":")).encode()


def error_body(message: str, code: str) -> bytes:
    return json_bytes({"error": message, "code": code})


NO_KEY = error_body("No key header", "required_header_key")
NO_SIGNATURE = error_body("No signature header", "required_header_signature")
BAD_KEY = error_body("Bad key header", "bad_header_key")
BAD_SIGNATURE = error_body("Bad signature header", "bad_header_signature")
BAD_FORMAT = error_body("Bad content format", "bad_content_format")
NOT_FOUND = error_body("Invoice not found", "invoice_not_found")  # undocumented, so a guess
_STATE = error_body("Invoice cannot be failed in its current state.", "invalid_invoice_state")
BAD_STATE = b'{"errors":' + _STATE + b"}"
