"""Every masking and redaction rule, in one place.

Personal data (``email_user``) and secrets must never reach a log line, an event, an error, a
record or Flower. The rules here are linear in the length of their input and bound it first:
they run on text that a provider, a proxy or a broker entry chose, and a regex that backtracks
on such text would hold the GIL and stall every thread of a worker.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
#: Fields never shown by Celery (Flower, logs, events): they are personal data.
PERSONAL_FIELDS = frozenset({"email_user"})
#: Longest provider or message text we keep (in errors, records and events).
TEXT_LIMIT = 500
#: Longest ``kwargsrepr`` Celery shows.
REPR_LIMIT = 1024
# Longest e-mail address (RFC 5321: 64-character local part, "@", 255-character domain).
_ADDRESS_MAX = 320

_LOCAL_PUNCT = frozenset(".!#$%&'*+/=?^_`{|}~-")
_DOMAIN_PUNCT = frozenset(".-")
# Control characters (C0, DEL, C1) and Unicode line breaks forge log lines: shown escaped.
_CONTROLS = {
    cp: f"\\x{cp:02x}" if cp < 0x100 else f"\\u{cp:04x}"
    for cp in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]
}


def _local_char(ch: str) -> bool:
    return ch.isalnum() or ch in _LOCAL_PUNCT


def _domain_char(ch: str) -> bool:
    return ch.isalnum() or ch in _DOMAIN_PUNCT


def _email_spans(text: str) -> list[tuple[int, int]]:
    """Spans of what looks like an e-mail address: one left and one right scan per ``@``,
    never past the previous span or ``@``, so the whole search is linear."""
    spans: list[tuple[int, int]] = []
    floor = 0
    at = text.find("@")
    while at != -1:
        start = at
        while start > floor and _local_char(text[start - 1]):
            start -= 1
        end = at + 1
        while end < len(text) and _domain_char(text[end]):
            end += 1
        domain = text[at + 1 : end].rstrip(".-")
        if start < at and "." in domain.strip(".-") and not domain.startswith((".", "-")):
            end = at + 1 + len(domain)
            spans.append((start, end))
            floor = end
        else:
            floor = at + 1
        at = text.find("@", max(end, at + 1))
    return spans


def contains_email(text: str) -> bool:
    """True when ``text`` holds something shaped like an e-mail address."""
    return bool(_email_spans(text))


def mask_emails(text: str) -> str:
    """Replace every e-mail address in ``text`` by ``***``."""
    spans = _email_spans(text)
    if not spans:
        return text
    parts, pos = [], 0
    for start, end in spans:
        parts += [text[pos:start], MASK]
        pos = end
    parts.append(text[pos:])
    return "".join(parts)


def escape_controls(text: str) -> str:
    """Show control characters as escapes, so no value can start a forged log line."""
    # Every one of _CONTROLS is Unicode "Other" or "Separator", which isprintable refuses: a
    # printable text (nearly all) has none, and the C scan is far cheaper than translate.
    return text if text.isprintable() else text.translate(_CONTROLS)


def redact(text: str, limit: int = TEXT_LIMIT) -> str:
    """Bound, unmask-proof and log-safe: at most ``limit`` characters before control
    characters are escaped, e-mail addresses masked.

    A long text is masked over its first ``limit`` characters plus the longest address, then
    cut: an address the cut runs through is masked whole instead of shown in part.
    """
    if len(text) > limit:
        text = mask_emails(text[: limit + _ADDRESS_MAX])[: limit - 3] + "..."
    else:
        text = mask_emails(text)
    return escape_controls(text)


def masked(value: Any) -> Any:
    """Return ``value`` with personal fields replaced by ``***``, at any depth."""
    if isinstance(value, dict):
        return {k: MASK if k in PERSONAL_FIELDS else masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [masked(v) for v in value]
    return value


def kwargs_repr(kwargs: Any) -> str:
    """What Celery shows for the kwargs (``kwargsrepr``): masked, bounded, one line."""
    return redact(repr(masked(kwargs)), REPR_LIMIT)


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (safe to print or log).

    A ``sentinel://`` URL lists its sentinels as entries joined by ``;`` (Celery's form): each
    entry is redacted on its own, so no password in a later entry is mistaken for a path.
    """
    if url.startswith("sentinel://"):
        return ";".join(_redact_one(entry) for entry in url.split(";"))
    return _redact_one(url)


def _redact_one(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))
