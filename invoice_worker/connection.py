"""Redis clients from a URL, directly or through Redis Sentinel: the one place that builds them.

The job store, the producer, the sweeper, the metrics exporter, the CLI and the worker's
preflight all connect here, so all of them follow a Sentinel failover without a restart.

URL forms:

- ``redis://``, ``rediss://``, ``unix://``: one server (``redis.Redis.from_url``);
- ``sentinel://[[user]:password@]host[:port][/db]`` entries joined by ``;`` (Celery's form),
  with ``INVOICE_REDIS_SENTINEL_MASTER`` naming the master: every sentinel listed is asked for
  the master's address, and the client connects there. A user, password or database given on
  any entry holds for all (entries may not disagree); they are the Redis master's, not the
  sentinels' (those take ``INVOICE_REDIS_SENTINEL_PASSWORD``), as in kombu's Sentinel
  transport.

How a Sentinel client follows a failover (redis-py 8.1, ``redis/sentinel.py``): the pool asks
the sentinels for the master each time it opens a connection, and closes its idle connections
when the answer changes. A connection still open to a demoted master gets ``READONLY`` for a
write, which ``SentinelManagedConnection.read_response`` turns into a ``ConnectionError``
after disconnecting; the retry policy below then runs the command again on a fresh connection
to the new master. Sentinel itself closes every client connection of a node it demotes
(``CLIENT KILL TYPE normal`` in the reconfiguration it sends), so reads move over too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import hiredis
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

if TYPE_CHECKING:
    import redis.asyncio

    from invoice_worker.config import Settings

SENTINEL_SCHEME = "sentinel://"
DEFAULT_SENTINEL_PORT = 26379
#: Seconds one sentinel may take to answer: master discovery asks the next one after it, so a
#: sentinel on a stalled host costs this long, not forever.
SENTINEL_TIMEOUT = 2.0


def sentinel_options(password: str | None) -> dict[str, Any]:
    """Connection options for the sentinels themselves (not the master).

    No retries: redis-py's default would retry a sentinel that is down or refuses the password
    three times with 1-4 s backoff before discovery asks the next one; discovery itself is
    retried by the master connection's policy.
    """
    options: dict[str, Any] = {
        "socket_timeout": SENTINEL_TIMEOUT,
        "socket_connect_timeout": SENTINEL_TIMEOUT,
        "retry": None,
    }
    if password is not None:
        options["password"] = password
    return options


def default_options(retry: type[Any] = Retry) -> dict[str, Any]:
    """What every client gets unless overridden: the job store's policy (``retry``: the
    transport's Retry class, ``redis.asyncio.retry.Retry`` for an asyncio client)."""
    return {
        "decode_responses": True,
        # Ride out a short Redis restart or a failover; a script re-run after a lost reply is
        # safe because every script is idempotent for the same caller.
        "retry": retry(ExponentialBackoff(cap=1.0, base=0.05), retries=5),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        "health_check_interval": 30,
    }


@dataclass(frozen=True)
class SentinelURL:
    """A parsed ``sentinel://`` URL: the sentinels, and the master's database and login."""

    sentinels: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def entry(self, index: int = 0) -> str:
        """Entry ``index`` as a URL of its own, carrying the login and database (secret
        included: never print it, see ``privacy.redact_url``)."""
        host, port = self.sentinels[index]
        login = ""
        if self.username or self.password:
            login = f"{self.username or ''}{':' + self.password if self.password else ''}@"
        return f"{SENTINEL_SCHEME}{login}{host}:{port}/{self.db}"


def is_sentinel(url: str | None) -> bool:
    """True for a ``sentinel://`` URL (the form Celery and kombu use for Redis Sentinel)."""
    return bool(url) and str(url).startswith(SENTINEL_SCHEME)


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse ``sentinel://...;sentinel://...``.

    Raises:
        ValueError: a malformed entry, or entries that disagree on login or database. The
            message names the entry by position, never its text (it may hold a password).
    """
    hosts: list[tuple[str, int]] = []
    found: dict[str, set[str]] = {"username": set(), "password": set(), "db": set()}
    for number, entry in enumerate(url.split(";"), start=1):
        if not entry.startswith(SENTINEL_SCHEME):
            raise ValueError(f"entry {number} of the URL is not sentinel://host:port")
        parts = urlsplit(entry)
        try:
            port = parts.port or DEFAULT_SENTINEL_PORT
        except ValueError:
            raise ValueError(f"entry {number} of the URL has an invalid port") from None
        if not parts.hostname or parts.query or parts.fragment:
            raise ValueError(f"entry {number} of the URL needs a host and takes no ?options")
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f"entry {number} of the URL has a database that is not a number")
        hosts.append((parts.hostname, port))
        for key, value in (("username", parts.username), ("password", parts.password)):
            if value:
                found[key].add(unquote(value))
        if db:
            found["db"].add(str(int(db)))
    for key, values in found.items():
        if len(values) > 1:
            raise ValueError(f"the URL's entries give different values for the {key}")
    return SentinelURL(
        tuple(hosts),
        int(next(iter(found["db"]), "0")),
        next(iter(found["username"]), None),
        next(iter(found["password"]), None),
    )


def redis_client(settings: Settings, **overrides: Any) -> redis.Redis:
    """A client of the job store's Redis (``settings.state_url``); see ``client_from_url``."""
    client: redis.Redis = client_from_url(settings.state_url, **_master(settings), **overrides)
    return client


def async_redis_client(settings: Settings, **overrides: Any) -> redis.asyncio.Redis:
    """An asyncio client of the job store's Redis, as :func:`redis_client` (same URL forms,
    options and retry policy). Its connections belong to the event loop that first uses it."""
    return _connect(settings.state_url, _asyncio(), **_master(settings), **overrides)  # type: ignore[no-any-return]


def _master(settings: Settings) -> dict[str, Any]:
    secret = settings.redis_sentinel_password
    return {
        "master_name": settings.redis_sentinel_master,
        "sentinel_password": secret.get_secret_value() if secret else None,
    }


def client_from_url(
    url: str,
    *,
    master_name: str | None = None,
    sentinel_password: str | None = None,
    **overrides: Any,
) -> redis.Redis:
    """A pooled, thread-safe client of ``url`` with ``default_options()`` and ``overrides``.

    For a ``sentinel://`` URL the client talks to whichever node the sentinels name as
    ``master_name`` and follows it through failovers; closing it also closes its connections
    to the sentinels.

    Raises:
        ValueError: a ``sentinel://`` URL without ``master_name``, or a malformed one.
    """
    flavour = _Flavour(redis, Retry, Sentinel, _SentinelPool)
    options = dict(overrides)
    if not {"encoding", "encoding_errors"} & options.keys():  # PACKER writes strict UTF-8
        options.setdefault("command_packer", PACKER)
    client: redis.Redis = _connect(url, flavour, master_name, sentinel_password, **options)
    return client


class HiredisPacker:
    """redis-py's hiredis command packer, without its pass over the arguments in Python.

    redis-py encodes each argument in Python before handing them to ``hiredis.pack_command``,
    which takes str (as UTF-8), bytes, int and float itself and writes them as that pass does
    (floats by ``repr``). For the twenty-odd arguments of a store script the pass cost more
    CPU than the rest of the call's packing and sending. Anything else goes through the same
    conversions and checks as in redis-py (``DataError`` for a bool, None or another type);
    clients given another ``encoding`` keep redis-py's packer (see ``client_from_url``).
    """

    def pack(self, *args: Any) -> list[bytes]:
        name = args[0]
        if (isinstance(name, str) and " " in name) or (isinstance(name, bytes) and b" " in name):
            args = (*name.split(), *args[1:])  # "SCRIPT LOAD" is two words on the wire
        if memoryview not in map(type, args):  # hiredis ignores a view's strides
            try:
                return [hiredis.pack_command(args)]
            except TypeError:  # an int subclass, a bool, None, ...: redis-py's rules below
                pass
        checked: tuple[Any, ...] = tuple(_packable(arg) for arg in args)
        return [hiredis.pack_command(checked)]


def _packable(arg: object) -> object:
    """One argument as redis-py's ``Encoder.encode`` takes it (str, bytes and exact int and
    float pass as they are: hiredis writes them the same)."""
    if isinstance(arg, str | bytes) or type(arg) in (int, float):
        return arg
    if isinstance(arg, bytearray | memoryview):
        return bytes(arg)
    if isinstance(arg, int | float) and not isinstance(arg, bool):
        return repr(arg).encode()  # an IntEnum writes as redis-py writes it
    raise redis.DataError(
        f"Invalid input of type: '{type(arg).__name__}'. "
        "Convert to a bytes, string, int or float first."
    )


PACKER = HiredisPacker()  # stateless: one for every connection of the sync clients


@dataclass(frozen=True)
class _Flavour:
    """One transport of redis-py: its client module and the classes ``_connect`` needs."""

    module: ModuleType
    retry: type[Any]
    sentinel: type[Any]
    pool: type[Any]


def _asyncio() -> _Flavour:
    # Imported here: only the asyncio producer (invoice_worker.aio) needs it.
    import redis.asyncio
    from redis.asyncio.retry import Retry as AsyncRetry
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel

    return _Flavour(redis.asyncio, AsyncRetry, AsyncSentinel, _async_sentinel_pool())


def _connect(
    url: str,
    flavour: _Flavour,
    master_name: str | None = None,
    sentinel_password: str | None = None,
    **overrides: Any,
) -> Any:
    options = {**default_options(flavour.retry), **overrides}
    if not is_sentinel(url):
        return flavour.module.Redis.from_url(url, **options)
    if not master_name:
        raise ValueError("a sentinel:// URL needs the master's name")
    parsed = parse_sentinel_url(url)
    sentinel_kwargs = sentinel_options(sentinel_password)
    manager = flavour.sentinel(list(parsed.sentinels), sentinel_kwargs=sentinel_kwargs)
    return manager.master_for(
        master_name,
        connection_pool_class=flavour.pool,
        db=parsed.db,
        username=parsed.username,
        password=parsed.password,
        **options,
    )


class _SentinelPool(SentinelConnectionPool):
    """redis-py's Sentinel pool; closing it (``client.close()``) also closes the connections
    its Sentinel manager keeps to each sentinel, which redis-py leaves to the caller."""

    def disconnect(self, inuse_connections: bool = True) -> None:
        super().disconnect(inuse_connections)
        if inuse_connections:
            self.sentinel_manager.close()


@functools.cache
def _async_sentinel_pool() -> type[Any]:
    """:class:`_SentinelPool` for asyncio (``await client.aclose()``)."""
    from redis.asyncio.sentinel import SentinelConnectionPool as AsyncPool

    class _AsyncSentinelPool(AsyncPool):
        async def disconnect(self, inuse_connections: bool = True) -> None:
            await super().disconnect(inuse_connections)
            if inuse_connections:
                await self.sentinel_manager.aclose()

    return _AsyncSentinelPool
