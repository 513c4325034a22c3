"""The embedded Redis: redis-server when installed, else fakeredis, else a clear way out."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import redis

from invoice_worker.devstack.embedded import EmbeddedRedis
from invoice_worker.errors import ConfigError


def test_fakeredis_fallback_serves_over_tcp() -> None:
    with EmbeddedRedis(use_binary=False) as server:
        assert server.kind == "fakeredis"
        client = redis.Redis.from_url(server.url)
        assert client.set("k", "v")
        assert client.get("k") == b"v"
        client.close()


@pytest.mark.parametrize(
    ("use_binary", "message"),
    [
        (True, "no redis-server on PATH and fakeredis is not installed: "),
        (False, "fakeredis is not installed: "),
    ],
)
def test_without_fakeredis_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, use_binary: bool, message: str
) -> None:
    monkeypatch.setitem(sys.modules, "fakeredis", None)  # what a production install has
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server either
    server = EmbeddedRedis(use_binary=use_binary)
    with pytest.raises(ConfigError) as raised:
        server.start()
    server.stop()
    assert str(raised.value) == f"{message}pip install 'invoice-worker[devstack]'"
