"""What the job store's Redis must be for the guarantees to hold, checked before work starts
(by every worker at start and by ``invoice-worker check``)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import redis

from invoice_worker.errors import ConfigError

log = logging.getLogger(__name__)


def server_settings(client: redis.Redis) -> dict[str, str]:
    """The Redis settings the guarantees depend on: eviction policy and persistence
    (``unknown`` where the server does not say, e.g. CONFIG disabled on managed Redis)."""
    info: dict[str, Any] = {}
    for section in ("memory", "persistence"):
        with contextlib.suppress(redis.ResponseError):
            info.update(client.info(section))
    out = {"maxmemory_policy": str(info.get("maxmemory_policy", "unknown"))}
    out["aof_enabled"] = str(info.get("aof_enabled", "unknown"))
    try:
        conf: dict[str, str] = client.config_get("appendfsync")  # type: ignore[assignment]
        out["appendfsync"] = conf.get("appendfsync", "unknown")
    except redis.ResponseError:
        out["appendfsync"] = "unknown"
    return out


def require_noeviction(client: redis.Redis) -> None:
    """Refuse a job store that may evict keys: an evicted record forgets a job (and an
    ambiguous attempt) silently.

    Raises:
        ConfigError: the policy is not ``noeviction``.
    """
    try:
        policy = server_settings(client)["maxmemory_policy"]
    except redis.ConnectionError:
        log.warning("could not read the job store's eviction policy: Redis unreachable")
        return
    if policy not in ("noeviction", "unknown"):
        raise ConfigError(
            f"the job store Redis evicts keys (maxmemory-policy {policy}); set "
            "maxmemory-policy noeviction: an evicted record forgets its job"
        )
