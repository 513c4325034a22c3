from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from invoice_worker.config import DEFAULT_API_URL, Settings
from invoice_worker.constants import QueueType
from invoice_worker.errors import ConfigError
from invoice_worker.privacy import redact_url


def test_defaults() -> None:
    s = Settings(_env_file=None)
    assert s.api_url == DEFAULT_API_URL
    assert s.broker_url == "redis://localhost:6379/0"
    assert s.state_url == s.broker_url
    assert s.orphan_policy == "recreate"


def test_state_url_follows_redis_broker_only() -> None:
    assert Settings(_env_file=None, broker_url="rediss://r:6380/2").state_url == "rediss://r:6380/2"
    # Changed in the restructure: a non-Redis broker no longer falls back to the local Redis;
    # INVOICE_REDIS_URL is required with it.
    with pytest.raises(ValidationError, match="INVOICE_REDIS_URL is required"):
        Settings(_env_file=None, broker_url="amqp://guest@localhost//")
    explicit = Settings(_env_file=None, broker_url="amqp://x//", redis_url="redis://state:6379/3")
    assert explicit.state_url == "redis://state:6379/3"


def test_env_prefix_and_env_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INVOICE_API_KEY", "k-from-env")
    (tmp_path / ".env").write_text("INVOICE_API_SECRET=s-from-file\nINVOICE_READ_TIMEOUT=7\n")
    s = Settings(_env_file=tmp_path / ".env")
    assert s.api_key.get_secret_value() == "k-from-env"
    assert s.api_secret.get_secret_value() == "s-from-file"
    assert s.read_timeout == 7


def test_secret_never_in_repr() -> None:
    s = Settings(_env_file=None, api_key="the-key", api_secret="the-secret")
    assert "the-secret" not in repr(s)
    assert "the-secret" not in str(s)
    assert "the-secret" not in str(s.model_dump())


@pytest.mark.parametrize(
    ("key", "secret", "missing"),
    [
        ("", "s", "INVOICE_API_KEY"),
        ("k", "  ", "INVOICE_API_SECRET"),
        ("", "", "INVOICE_API_KEY and"),
    ],
)
def test_require_credentials(key: str, secret: str, missing: str) -> None:
    with pytest.raises(ConfigError, match=missing):
        Settings(_env_file=None, api_key=key, api_secret=secret).require_credentials()
    Settings(_env_file=None, api_key="k", api_secret="s").require_credentials()


def test_timing_is_ordered() -> None:
    s = Settings(_env_file=None, connect_timeout=2, read_timeout=10)
    assert s.http_deadline == 12
    # Every limit leaves room for the one before it.
    assert s.lease > 2 * s.http_deadline
    assert s.soft_time_limit >= 3 * s.http_deadline
    assert s.hard_time_limit > s.soft_time_limit
    assert s.broker_visibility_timeout > max(s.retry_cap, s.lease) + s.hard_time_limit


def test_lease_shorter_than_two_calls_is_refused() -> None:
    with pytest.raises(ValidationError, match="LEASE_SECONDS"):
        Settings(_env_file=None, connect_timeout=1, read_timeout=4, lease_seconds=9)


@pytest.mark.parametrize(
    ("field", "value"),
    [("read_timeout", 0), ("max_attempts", 0), ("orphan_policy", "retry"), ("events_maxlen", 5),
     ("log_format", "xml"), ("key_prefix", "")],
)  # fmt: skip
def test_bad_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(_env_file=None).replace(**{field: value})


def test_to_env_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(_env_file=None, api_key="k", api_secret="s", lease_seconds=99, task_events=False)
    env = s.to_env()
    assert env["INVOICE_API_SECRET"] == "s"
    assert env["INVOICE_TASK_EVENTS"] == "false"
    assert "INVOICE_REDIS_URL" not in env
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings(_env_file=None) == s


def test_replace_validates() -> None:
    s = Settings(_env_file=None)
    assert s.replace(read_timeout=5).read_timeout == 5
    with pytest.raises(ValidationError, match="read_timeout"):
        s.replace(read_timeout=-1)


def test_redact_url() -> None:
    assert redact_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("amqp://guest:guest@h//") == "amqp://guest:***@h//"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


def test_waiting_for_replicas_must_fit_in_the_lease() -> None:
    ok = Settings(_env_file=None, redis_min_replicas=1, lease_seconds=50, redis_wait_timeout=2)
    assert ok.redis_min_replicas == 1
    with pytest.raises(ConfigError, match=r"INVOICE_REDIS_WAIT_TIMEOUT .* counts against"):
        Settings.load(_env_file=None, redis_min_replicas=1, lease_seconds=47, redis_wait_timeout=1)
    # Without replicas to wait for, the timeout only bounds WAITAOF: no rule applies.
    Settings(_env_file=None, lease_seconds=47, redis_wait_timeout=1)
    with pytest.raises(ConfigError, match="INVOICE_REDIS_MIN_REPLICAS"):
        Settings.load(_env_file=None, redis_min_replicas=-1)


AMQP: dict[str, Any] = {
    "broker_url": "amqp://guest:guest@rabbit:5672//",
    "redis_url": "redis://state:6379/0",
}


def test_queue_type_is_classic_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(_env_file=None).queue_type is QueueType.CLASSIC
    monkeypatch.setenv("INVOICE_QUEUE_TYPE", "quorum")
    assert Settings.load(_env_file=None, **AMQP).queue_type is QueueType.QUORUM


@pytest.mark.parametrize(
    "broker", ["redis://:pw@localhost:6379/0", "rediss://r:6380/1", "sentinel://s:26379"]
)
def test_quorum_needs_a_rabbitmq_broker(broker: str) -> None:
    with pytest.raises(ConfigError, match="INVOICE_QUEUE_TYPE=quorum needs a RabbitMQ") as info:
        Settings.load(_env_file=None, broker_url=broker, redis_url=AMQP["redis_url"],
                      queue_type="quorum")  # fmt: skip
    assert broker not in str(info.value)  # named, never repeated (it may hold a password)


@pytest.mark.parametrize("scheme", ["amqp", "amqps", "pyamqp"])
def test_quorum_on_amqp_schemes(scheme: str) -> None:
    url = AMQP["broker_url"].replace("amqp", scheme, 1)
    settings = Settings(_env_file=None, broker_url=url, redis_url=AMQP["redis_url"],
                        queue_type="quorum")  # fmt: skip
    assert settings.queue_type == "quorum"


def test_unknown_queue_type_is_named() -> None:
    with pytest.raises(ConfigError, match="INVOICE_QUEUE_TYPE: Input should be 'classic' or"):
        Settings.load(_env_file=None, queue_type="stream", **AMQP)


def test_quorum_redelivery_cap_stays_below_the_delivery_limit() -> None:
    # A crashed worker fails every message it prefetched: the queue's limit counts those too.
    quorum: dict[str, Any] = {**AMQP, "queue_type": "quorum"}
    assert Settings(_env_file=None, max_redeliveries=9, **quorum).max_redeliveries == 9
    with pytest.raises(ConfigError, match="INVOICE_MAX_REDELIVERIES must be below 10"):
        Settings.load(_env_file=None, max_redeliveries=10, **quorum)
    assert Settings(_env_file=None, max_redeliveries=10, **AMQP).max_redeliveries == 10


def test_quorum_sweep_margin_covers_whole_second_countdowns() -> None:
    quorum: dict[str, Any] = {**AMQP, "queue_type": "quorum"}
    with pytest.raises(ConfigError, match="INVOICE_VISIBILITY_TIMEOUT must be at least 5"):
        Settings.load(_env_file=None, visibility_timeout=4, **quorum)
    assert Settings(_env_file=None, visibility_timeout=5, **quorum).broker_visibility_timeout == 5
    assert Settings(_env_file=None, visibility_timeout=4, **AMQP).broker_visibility_timeout == 4
    assert Settings(_env_file=None, **quorum).broker_visibility_timeout >= 60  # the default


SENTINELS = "sentinel://:pw@h1:26379/2;sentinel://h2:26379/2"


def test_a_sentinel_url_needs_the_master_name_and_never_shows_its_password() -> None:
    for field in ("broker_url", "redis_url"):
        with pytest.raises(ValidationError, match="INVOICE_REDIS_SENTINEL_MASTER is required") as e:
            Settings(_env_file=None).replace(**{field: SENTINELS})
        assert "pw@" not in str(e.value)
    with pytest.raises(ConfigError, match="INVOICE_REDIS_URL: the URL's entries give different"):
        Settings.load(
            _env_file=None, redis_url="sentinel://:a@h1;sentinel://:b@h2", redis_sentinel_master="m"
        )


def test_a_sentinel_broker_is_a_redis_broker() -> None:
    s = Settings(_env_file=None, broker_url=SENTINELS, redis_sentinel_master="mymaster")
    assert s.state_url == SENTINELS  # no INVOICE_REDIS_URL needed
    assert s.max_countdown == s.broker_visibility_timeout / 2  # kombu's visibility timeout rules
    state = Settings(
        _env_file=None, broker_url="amqp://x//", redis_url=SENTINELS, redis_sentinel_master="m"
    )
    assert state.state_url == SENTINELS


def test_sentinel_settings_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(
        _env_file=None, broker_url=SENTINELS, redis_sentinel_master="m",
        redis_sentinel_password="s3nt",
    )  # fmt: skip
    assert "s3nt" not in repr(s)
    env = s.to_env()
    assert env["INVOICE_REDIS_SENTINEL_PASSWORD"] == "s3nt"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings(_env_file=None) == s


def test_redact_url_sentinel_entries() -> None:
    assert redact_url(SENTINELS + ";sentinel://u:pw2@h3") == (
        "sentinel://:***@h1:26379/2;sentinel://h2:26379/2;sentinel://u:***@h3"
    )
