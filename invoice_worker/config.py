"""Settings, read once from ``INVOICE_*`` variables (or a ``.env`` file) at the process edge."""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from invoice_worker.connection import SENTINEL_SCHEME, is_sentinel, parse_sentinel_url
from invoice_worker.constants import (
    CLEANUP_BACKOFF_CAP,
    CLEANUP_TRIES,
    QUORUM_DELIVERY_LIMIT,
    QueueType,
)
from invoice_worker.errors import ConfigError

DEFAULT_API_URL = "https://app.cryptoprocessing.com/api/v2"
DEFAULT_BROKER_URL = "redis://localhost:6379/0"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", SENTINEL_SCHEME)
# What an HTTP header value may hold: a key with a stray newline would be sent (and refused)
# or, worse, split the header.
_HEADER_SAFE = re.compile(r"^[\x21-\x7e]*$")
#: Longest countdown on RabbitMQ: below its default consumer_timeout (30 min), after which it
#: closes the channel of a consumer holding an unacked (ETA) message.
AMQP_MAX_COUNTDOWN = 900.0
#: Seconds a write may wait for its AOF fsync under ``appendfsync everysec``, with a margin.
AOF_SYNC_PERIOD = 1.2
AMQP_SCHEMES = ("amqp://", "amqps://", "pyamqp://")
#: Smallest INVOICE_VISIBILITY_TIMEOUT with quorum queues: the sweeper takes a message for lost
#: that long after its countdown, and a countdown there ends up to ~2 s late (whole seconds,
#: plus the fleet gate's jitter) while the message waits in a delay queue it cannot see.
QUORUM_MIN_SWEEP_MARGIN = 5


class Settings(BaseSettings):
    """Every knob of the worker and the producer; the README's settings table mirrors it."""

    model_config = SettingsConfigDict(
        env_prefix="INVOICE_",
        env_file=".env",
        extra="ignore",
        frozen=True,
        # A validation error must not print the input: it holds the API secret.
        hide_input_in_errors=True,
    )

    # provider
    api_url: str = DEFAULT_API_URL
    api_key: SecretStr = SecretStr("")
    api_secret: SecretStr = SecretStr("")
    connect_timeout: float = Field(3.05, gt=0)
    read_timeout: float = Field(20.0, gt=0)
    http_pool_size: int = Field(64, ge=1)

    # broker and job state
    broker_url: str = DEFAULT_BROKER_URL
    redis_url: str | None = None
    # Redis Sentinel (sentinel:// URLs): the master's name, and the sentinels' own password
    redis_sentinel_master: str | None = Field(None, min_length=1)
    redis_sentinel_password: SecretStr | None = None
    key_prefix: str = Field("invoice:", min_length=1)
    queue: str = "invoices"
    queue_type: QueueType = QueueType.CLASSIC
    events_stream: str = "invoices:events"
    events_maxlen: int = Field(100_000, ge=100)
    record_ttl: int = Field(7 * 86400, ge=60)
    lease_seconds: float | None = Field(None, gt=0)
    visibility_timeout: int | None = Field(None, ge=1)
    #: Replicas that must confirm a write (Redis WAIT) before the provider is called on it or
    #: an outcome is shown; 0 = none. README: "Topologies and what each guarantees".
    redis_min_replicas: int = Field(0, ge=0)
    redis_wait_timeout: float = Field(0.5, gt=0)
    #: Also wait for the primary's own AOF fsync (WAITAOF, Redis >= 7.2); see barrier.py.
    redis_wait_aof: bool = False

    # retries
    max_attempts: int = Field(8, ge=1)
    retry_base: float = Field(1.0, gt=0)
    retry_cap: float = Field(60.0, gt=0)
    max_redeliveries: int = Field(5, ge=0)
    orphan_policy: Literal["recreate", "fail"] = "recreate"

    # the fleet as one client of the provider
    provider_rate_limit: float | None = Field(None, gt=0)
    provider_burst: int = Field(10, ge=1)
    rate_limit_pause: float = Field(1.0, ge=0)
    circuit_threshold: int = Field(10, ge=0)
    circuit_window: float = Field(30.0, gt=0)
    circuit_cooldown: float = Field(15.0, gt=0)
    circuit_probes: int = Field(2, ge=1)

    # callbacks: raw bodies kept for audit this long (at least the provider's ~24 h of retries)
    callback_ttl: int = Field(30 * 86400, ge=2 * 86400)

    # operation
    task_events: bool = True
    log_format: Literal["text", "json"] = "text"

    @classmethod
    def load(cls, **values: Any) -> Settings:
        """Read the environment (and ``values``); the edge every entry point goes through.

        Raises:
            ConfigError: naming each bad variable and its rule, never its value.
        """
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError(settings_errors(exc)) from None

    @field_validator("api_key", "api_secret", mode="before")
    @classmethod
    def _strip(cls, value: Any) -> Any:
        # A trailing newline from a secrets file is the common case; strip it once, here.
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        return value.strip() if isinstance(value, str) else value

    @field_validator("api_key")
    @classmethod
    def _header_safe(cls, value: SecretStr) -> SecretStr:
        if not _HEADER_SAFE.match(value.get_secret_value()):
            raise ValueError("must be printable ASCII without spaces (it is sent as a header)")
        return value

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme == "https" and parts.hostname:
            return value
        if parts.scheme == "http" and loopback_host(parts.hostname or ""):
            return value  # the local sandbox: the signature still protects the body
        raise ValueError(
            "must be an https:// URL (plain http:// only to a loopback host, for the sandbox)"
        )

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.lease_seconds is not None and self.lease_seconds <= 2 * self.http_deadline:
            raise ValueError(
                f"INVOICE_LEASE_SECONDS ({self.lease_seconds}) must exceed two provider calls "
                f"(2 x (connect_timeout + read_timeout) = {2 * self.http_deadline}): a shorter "
                "lease lets a second worker call the provider while the first still waits"
            )
        margin = self.lease - 2 * self.http_deadline
        waits = self.redis_min_replicas or self.redis_wait_aof
        if waits and self.redis_wait_timeout >= margin:
            raise ValueError(
                f"INVOICE_REDIS_WAIT_TIMEOUT ({self.redis_wait_timeout}) must be below the "
                f"lease's margin over two provider calls ({margin:g}"
                " s): waiting for replicas counts against the lease"
            )
        if self.redis_wait_aof and self.redis_wait_timeout < AOF_SYNC_PERIOD:
            raise ValueError(
                f"INVOICE_REDIS_WAIT_TIMEOUT must be at least {AOF_SYNC_PERIOD} s with "
                "INVOICE_REDIS_WAIT_AOF: under appendfsync everysec the AOF is synced once a "
                "second, and a shorter wait would turn that into refusals"
            )
        if self.retry_cap < self.retry_base:
            raise ValueError("INVOICE_RETRY_CAP must be >= INVOICE_RETRY_BASE")
        if self.retry_cap > self.max_countdown:
            raise ValueError(
                f"INVOICE_RETRY_CAP ({self.retry_cap}) must be at most {self.max_countdown}: "
                "half the broker's redelivery delay (INVOICE_VISIBILITY_TIMEOUT), or a waiting "
                "retry is delivered twice"
            )
        if not self.redis_url and not self.broker_url.startswith(REDIS_SCHEMES):
            raise ValueError(
                "INVOICE_REDIS_URL is required when INVOICE_BROKER_URL is not Redis: job "
                "records need a Redis"
            )
        life = self.max_countdown + self.lease + self.broker_visibility_timeout
        if self.record_ttl <= 2 * life:
            raise ValueError(
                f"INVOICE_RECORD_TTL ({self.record_ttl}) must exceed {int(2 * life)} s (twice "
                "the longest pause between two steps of a job): a record that expires mid-job "
                "forgets an ambiguous attempt"
            )
        return self

    @model_validator(mode="after")
    def _quorum(self) -> Settings:
        if self.queue_type is not QueueType.QUORUM:
            return self
        if not self.broker_url.startswith(AMQP_SCHEMES):
            raise ValueError(
                "INVOICE_QUEUE_TYPE=quorum needs a RabbitMQ broker (INVOICE_BROKER_URL amqp:// "
                "or amqps://): quorum queues are RabbitMQ's"
            )
        if self.max_redeliveries >= QUORUM_DELIVERY_LIMIT // 2:
            raise ValueError(
                f"INVOICE_MAX_REDELIVERIES must be below {QUORUM_DELIVERY_LIMIT // 2} with "
                "INVOICE_QUEUE_TYPE=quorum: the queue dead-letters a message after "
                f"{QUORUM_DELIVERY_LIMIT} failed deliveries (a crashed worker fails all it "
                "prefetched), and our own cap must end such a job first (worker_lost)"
            )
        if self.broker_visibility_timeout < QUORUM_MIN_SWEEP_MARGIN:
            raise ValueError(
                f"INVOICE_VISIBILITY_TIMEOUT must be at least {QUORUM_MIN_SWEEP_MARGIN} with "
                "INVOICE_QUEUE_TYPE=quorum: the sweeper would take a message still waiting out "
                "its countdown in a delay queue for a lost one"
            )
        return self

    @model_validator(mode="after")
    def _sentinel(self) -> Settings:
        for name, url in (
            ("INVOICE_BROKER_URL", self.broker_url),
            ("INVOICE_REDIS_URL", self.redis_url),
        ):
            if not is_sentinel(url):
                continue
            assert url is not None
            try:
                parse_sentinel_url(url)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
            if not self.redis_sentinel_master:
                raise ValueError(
                    f"INVOICE_REDIS_SENTINEL_MASTER is required when {name} is a sentinel:// "
                    "URL: it names the master the sentinels monitor"
                )
        return self

    @property
    def http_deadline(self) -> float:
        """Longest a single provider call can take (one connect plus one read)."""
        return self.connect_timeout + self.read_timeout

    @property
    def lease(self) -> float:
        """Seconds a worker holds a job between renewals: a create and a cancel, plus margin."""
        if self.lease_seconds is not None:
            return self.lease_seconds
        return 2 * self.http_deadline + 10

    @property
    def soft_time_limit(self) -> float:
        """The longest run: create, cancel and re-create (the orphan path), plus margin."""
        return 3 * self.http_deadline + 10

    @property
    def hard_time_limit(self) -> float:
        """Celery kills the task this long after it started (soft limit + grace)."""
        return self.soft_time_limit + 5

    @property
    def broker_visibility_timeout(self) -> int:
        """Seconds before the Redis broker redelivers an unacked message.

        A retry is a message whose ETA the worker holds unacked, then runs for up to the hard
        time limit: redelivering sooner would only make duplicates (which leases absorb).
        """
        if self.visibility_timeout is not None:
            return self.visibility_timeout
        return int(max(self.retry_cap, self.lease) + self.hard_time_limit + 60)

    @property
    def sweep_interval(self) -> float:
        """Seconds between two sweeps for lost messages (a fraction of the redelivery delay)."""
        return float(min(10, max(1, self.broker_visibility_timeout // 3)))

    @property
    def max_countdown(self) -> float:
        """Longest a message may wait in a worker before its attempt (retry or deferral).

        The Redis broker delivers a message again once it has been unacked for the
        visibility timeout, and a countdown holds it unacked: half of it leaves the run time.
        """
        if self.broker_url.startswith(REDIS_SCHEMES):
            return self.broker_visibility_timeout / 2
        return AMQP_MAX_COUNTDOWN

    @property
    def cleanup_horizon(self) -> float:
        """Seconds the tries of one pending cleanup may take (the sweeper's backoff), plus an
        hour: how long a record with a pending cleanup is kept at least."""
        base, cap = self.retry_base * 10, CLEANUP_BACKOFF_CAP
        return sum(min(cap, base * 2.0**n) for n in range(CLEANUP_TRIES)) + 3600

    @property
    def exchange_timeout(self) -> float:
        """Wall-clock bound on one provider exchange (DNS, connect, send, read)."""
        return self.http_deadline

    @property
    def state_url(self) -> str:
        """The Redis holding job records: ``redis_url``, else the broker (then Redis)."""
        return self.redis_url or self.broker_url

    def replace(self, **changes: object) -> Settings:
        """Return a validated copy with ``changes`` applied (``model_copy`` skips validation)."""
        values = {name: getattr(self, name) for name in type(self).model_fields}
        values.update(changes)
        return type(self)(_env_file=None, **values)

    def to_env(self) -> dict[str, str]:
        """Return ``INVOICE_*`` variables that rebuild these settings in a child process."""
        env = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, bool):
                value = "true" if value else "false"
            env[f"INVOICE_{name.upper()}"] = str(value)
        return env

    def require_credentials(self) -> None:
        """Fail fast (at worker start) when the provider key or secret is missing.

        Raises:
            ConfigError: naming the empty variable.
        """
        missing = [
            name
            for name, value in (
                ("INVOICE_API_KEY", self.api_key),
                ("INVOICE_API_SECRET", self.api_secret),
            )
            if not value.get_secret_value().strip()
        ]
        if missing:
            raise ConfigError(f"{' and '.join(missing)} must be set to a non-empty value")


def settings_errors(exc: ValidationError) -> str:
    """One line per bad setting, naming the variable and the rule, never the value."""
    lines = []
    for err in exc.errors(include_input=False, include_url=False):
        name = "_".join(str(p) for p in err["loc"])
        where = f"INVOICE_{name.upper()}" if name else "settings"
        lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "invalid settings:\n  " + "\n  ".join(lines)


def loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
