"""Settings, read once from ``INVOICE_*`` variables (or a ``.env`` file) at the process edge."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from invoice_worker.errors import ConfigError

DEFAULT_API_URL = "https://app.cryptoprocessing.com/api/v2"
DEFAULT_BROKER_URL = "redis://localhost:6379/0"


class Settings(BaseSettings):
    """Every knob of the worker and the producer; the README's settings table mirrors it."""

    model_config = SettingsConfigDict(
        env_prefix="INVOICE_", env_file=".env", extra="ignore", frozen=True
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
    key_prefix: str = Field("invoice:", min_length=1)
    queue: str = "invoices"
    events_stream: str = "invoices:events"
    events_maxlen: int = Field(100_000, ge=100)
    record_ttl: int = Field(7 * 86400, ge=60)
    lease_seconds: float | None = Field(None, gt=0)
    visibility_timeout: int | None = Field(None, ge=1)

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

    # operation
    task_events: bool = True
    log_format: Literal["text", "json"] = "text"

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.lease_seconds is not None and self.lease_seconds <= 2 * self.http_deadline:
            raise ValueError(
                f"lease_seconds ({self.lease_seconds}) must exceed two provider calls "
                f"(2 x (connect_timeout + read_timeout) = {2 * self.http_deadline}): a shorter "
                "lease lets a second worker call the provider while the first still waits"
            )
        if self.retry_cap < self.retry_base:
            raise ValueError("retry_cap must be >= retry_base")
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
    def state_url(self) -> str:
        """The Redis holding job records: ``redis_url``, else the broker when it is Redis."""
        if self.redis_url:
            return self.redis_url
        if self.broker_url.startswith(("redis://", "rediss://", "unix://")):
            return self.broker_url
        return "redis://localhost:6379/0"

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


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (safe to print or log)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
