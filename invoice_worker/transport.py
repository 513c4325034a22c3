"""kombu's Redis transport, with every decode of a broker entry guarded.

A malformed entry on a queue list (pushed by hand, by a buggy client, or by anyone who can write
to the broker) would otherwise kill the worker that pops it. Here it is set aside instead: its
raw bytes go to the dead-letter list ``<key_prefix>dead-letter`` (newest first, at most
``DEAD_LETTER_MAX_ENTRIES`` entries of at most ``DEAD_LETTER_MAX_BYTES`` each, expiring
``record_ttl`` after the last one), the ``dead_letters`` field of ``<key_prefix>stats`` counts
it, one WARNING names its queue, length and reason (never its content), and the worker goes on.
Entries may hold personal data (``email_user``): the list is as sensitive as the queue. The
worker's consumer (``invoice_worker.consumer``) sets aside the same way the task messages kombu
can deliver but Celery cannot unpack.

kombu decodes entries in four places (kombu 5.7.0, ``kombu/transport/redis.py``); each is
guarded by ``invoice_worker.envelope``:

- ``Channel._brpop_read`` (line 1476), every message a worker consumes: copied, one line
  changed (kombu offers no hook between the pop and ``loads``);
- ``Channel._get`` (line 1645), ``basic_get``: copied, one line changed;
- ``Channel._handle_message`` (line 1399), fanout (remote control) messages before
  ``_receive_one`` decodes them: wrapped, no copy;
- ``QoS.restore_by_tag`` (line 551), which gives unacked messages back after the visibility
  timeout (a broken entry there stopped every worker at start, in ``on_poll_init``): copied,
  one line changed.

A ``sentinel://`` broker gets the same channel on kombu's Sentinel transport
(``SentinelChannel``, line 2267). kombu takes the sentinels from the URL's ``;``-separated
entries, but it also treats those entries as failover URLs: after a connection error
``Connection.switch`` re-parses the next one, which makes the transport kombu's own again
(``parse_url() sets transport to the raw URL scheme``, ``kombu/connection.py``) and keeps
only that entry's password and database. So kombu is given the first entry alone (with the
login and database of the whole URL) and the channel reads every sentinel from the
``sentinels`` transport option: ``SentinelChannel._sentinel_managed_pool`` (line 2334) is
copied with that one change. redis-py's Sentinel pool then asks each sentinel in turn, which is
all the failover a Sentinel broker needs.

``tests/test_transport.py`` fingerprints the four copied methods, so a kombu upgrade that
changes them fails a test until the copies are read again.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import Mapping
from queue import Empty
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from kombu.transport import redis as _kombu_redis
from kombu.utils import encoding as _encoding
from kombu.utils.url import as_url

from invoice_worker import constants as c
from invoice_worker.config import Settings
from invoice_worker.connection import PACKER, is_sentinel, parse_sentinel_url, sentinel_options
from invoice_worker.envelope import read_envelope, read_unacked

log = logging.getLogger(__name__)

# kombu's transport code is untyped; like Celery's, it is used here as Any.
kombu_redis: Any = _kombu_redis
bytes_to_str: Any = _encoding.bytes_to_str

#: ``broker_transport`` values: kombu imports the class by this path.
TRANSPORT = "invoice_worker.transport:Transport"
SENTINEL_TRANSPORT = "invoice_worker.transport:SentinelTransport"
#: Newest entries kept in the dead-letter list (older ones are trimmed).
DEAD_LETTER_MAX_ENTRIES = 1000
#: Bytes of one entry as stored (a longer one is cut, ``truncated`` says so): the list holds
#: about 16 MiB at most.
DEAD_LETTER_MAX_BYTES = 16 * 1024


def broker_conf(settings: Settings, transport_options: Mapping[str, Any]) -> dict[str, Any]:
    """Celery settings that select the guarded transport for a ``redis://``, ``rediss://`` or
    ``sentinel://`` broker.

    A Redis URL is left as it is; a Sentinel one is cut to its first entry (see the module
    docstring) with every sentinel in the transport options. Other schemes (``amqp://``,
    ``redis+socket://``) keep kombu's own transport: nothing is returned for them.

    Args:
        settings: the worker's settings (key prefix, record TTL, broker URL, Sentinel).
        transport_options: the ``broker_transport_options`` already set; they are kept.
    """
    options = {
        **transport_options,
        "dead_letter_key": settings.key_prefix + c.DEAD_LETTER_KEY,
        "dead_letter_stats_key": settings.key_prefix + c.STATS_KEY,
        "dead_letter_ttl": settings.record_ttl,
    }
    if is_sentinel(settings.broker_url):
        return _sentinel_conf(settings, options)
    parts = urlsplit(settings.broker_url)
    if parts.scheme not in ("redis", "rediss"):
        return {}
    conf: dict[str, Any] = {"broker_transport": TRANSPORT, "broker_transport_options": options}
    # kombu turns on TLS for a "rediss" transport name only; named by its class path, ours would
    # connect in plain text. Verify the certificate, as redis-py does for the job store on the
    # same URL; ssl_* options in the URL's query string still win.
    if parts.scheme == "rediss" and not any(k.startswith("ssl_") for k in parse_qs(parts.query)):
        conf["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return conf


def _sentinel_conf(settings: Settings, options: dict[str, Any]) -> dict[str, Any]:
    url = parse_sentinel_url(settings.broker_url)
    secret = settings.redis_sentinel_password
    options.update(
        master_name=settings.redis_sentinel_master,
        sentinels=[list(address) for address in url.sentinels],
        sentinel_kwargs=sentinel_options(secret.get_secret_value() if secret else None),
    )
    return {
        "broker_url": url.entry(0),
        "broker_transport": SENTINEL_TRANSPORT,
        "broker_transport_options": options,
    }


def _bounded(data: bytes) -> tuple[str, bool]:
    """The entry as text of at most ``DEAD_LETTER_MAX_BYTES`` once stored, and whether it was cut.

    Bytes that are not UTF-8 (no envelope can hold them) are kept as ``\\xNN``; JSON escapes
    control characters in up to six bytes each, so the stored size is measured, not assumed.
    """
    text = data[:DEAD_LETTER_MAX_BYTES].decode("utf-8", "backslashreplace")
    truncated = len(data) > DEAD_LETTER_MAX_BYTES
    while len(json.dumps(text, ensure_ascii=False).encode()) > DEAD_LETTER_MAX_BYTES:
        text, truncated = text[: len(text) // 2], True
    return text, truncated


class QoS(kombu_redis.QoS):  # type: ignore[misc]
    """kombu's QoS, with a broken ``unacked`` entry set aside instead of raised on."""

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        channel: Channel = self.channel

        def restore_transaction(pipe: Any) -> None:
            p = pipe.hget(self.unacked_key, tag)
            pipe.multi()
            self._remove_from_indices(tag, pipe)
            if p:
                entry, reason = read_unacked(p, channel.decode_body)
                if entry is None:
                    channel.set_aside(p, "unacked", reason, pipe)
                else:
                    channel._do_restore_message(*entry, pipe, leftmost)

        with self.channel.conn_or_acquire(client) as client:
            client.transaction(restore_transaction, self.unacked_key)


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    """kombu's Redis channel; entries it cannot deliver go to the dead-letter list."""

    QoS = QoS

    from_transport_options = (
        *kombu_redis.Channel.from_transport_options,
        "dead_letter_key",
        "dead_letter_stats_key",
        "dead_letter_ttl",
    )
    dead_letter_key = "invoice:" + c.DEAD_LETTER_KEY
    dead_letter_stats_key = "invoice:" + c.STATS_KEY
    dead_letter_ttl = 7 * 86400

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        params: dict[str, Any] = super()._connparams(asynchronous)
        params["command_packer"] = PACKER  # as the job store's clients (connection.py)
        return params

    def set_aside(self, raw: bytes | str, queue: str, reason: str, pipe: Any = None) -> None:
        """Keep ``raw`` in the dead-letter list, count it, and log it without its content.

        With ``pipe`` (a transaction already in ``MULTI``) the writes join it.
        """
        data = raw.encode() if isinstance(raw, str) else raw
        payload, truncated = _bounded(data)
        record = json.dumps(
            {
                "at": round(time.time(), 3),
                "queue": queue,
                "reason": reason,
                "length": len(data),
                "truncated": truncated,
                "payload": payload,
            },
            ensure_ascii=False,
        )
        if pipe is not None:
            self._dead_letter(pipe, record)
        else:
            with self.conn_or_acquire() as client:
                self._dead_letter(client.pipeline(), record).execute()
        log.warning(
            "set aside a malformed broker entry: queue=%r length=%d reason=%s (kept in %s)",
            queue, len(data), reason, self.dead_letter_key,
        )  # fmt: skip

    def _dead_letter(self, pipe: Any, record: str) -> Any:
        return (
            pipe.lpush(self.dead_letter_key, record)
            .ltrim(self.dead_letter_key, 0, DEAD_LETTER_MAX_ENTRIES - 1)
            .expire(self.dead_letter_key, self.dead_letter_ttl)
            .hincrby(self.dead_letter_stats_key, "dead_letters", 1)
        )

    def _admit(self, item: bytes | str, queue: str) -> dict[str, Any] | None:
        message, reason = read_envelope(item, self.decode_body)
        if message is None:
            self.set_aside(item, queue, reason)
        return message

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # if there's a ConnectionError, disconnect so the next
                # iteration will reconnect automatically.
                self.client.connection.disconnect()
                raise
            if dest__item:
                dest, item = dest__item
                dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
                self._queue_cycle.rotate(dest)
                message = self._admit(item, dest)  # kombu: loads(bytes_to_str(item))
                if message is None:
                    raise Empty()
                self.connection._deliver(message, dest)
                return True
            else:
                raise Empty()
        finally:
            self._in_poll = None
            # The BRPOP connection is now idle (its reply has been fully
            # consumed and no new BRPOP has been issued yet): this is the
            # safe moment to flush any pending streaming re-auth token.
            self._flush_brpop_reauth()

    def _get(self, queue: str) -> dict[str, Any]:
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                item = client.rpop(self._q_for_pri(queue, pri))
                if item:
                    self._maybe_update_queues_expire(client, queue)
                    message = self._admit(item, queue)  # kombu: loads(bytes_to_str(item))
                    if message is None:
                        raise Empty()
                    return message

            self._maybe_update_queues_expire(client, queue)
            raise Empty()

    def _handle_message(self, client: Any, r: Any) -> dict[str, Any]:
        payload: dict[str, Any] = super()._handle_message(client, r)
        if bytes_to_str(payload["type"]).endswith("message") and payload["data"]:
            channel = bytes_to_str(payload["channel"])
            if channel[0] == "/":
                _, _, channel = channel.partition(".")
            message, reason = read_envelope(payload["data"], self.decode_body)
            if message is None:
                self.set_aside(payload["data"], channel.split("/", 1)[0], reason)
                payload["data"] = None  # _receive_one then skips it
        return payload


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    """kombu's Redis transport with the guarded channel; shown with its ``redis(s)://`` URL."""

    Channel = Channel

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        # kombu names the connection after its transport (here a class path, which breaks
        # Flower's broker view and hides TLS), unless the instance says it parses URLs. The
        # class keeps False: kombu must still parse the URL into host, port and credentials.
        self.can_parse_url = True

    def as_uri(self, uri: str, include_password: bool = False, mask: str = "**") -> str:
        """The connection's URL as kombu prints a Redis one, ``rediss`` when TLS is on."""
        return _as_uri(self, "rediss" if self.client.ssl else "redis", include_password, mask)


class SentinelChannel(Channel, kombu_redis.SentinelChannel):  # type: ignore[misc]
    """kombu's Sentinel channel with the guarded reads; the sentinels come from the
    ``sentinels`` transport option (``[[host, port], ...]``), not from the URL."""

    from_transport_options = (
        *Channel.from_transport_options,
        *(
            name for name in kombu_redis.SentinelChannel.from_transport_options
            if name not in Channel.from_transport_options
        ),
        "sentinels",
    )  # fmt: skip
    sentinels: list[list[Any]] | None = None

    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        if not self.sentinels:
            return super()._sentinel_managed_pool(asynchronous)
        connparams = self._connparams(asynchronous)

        additional_params = connparams.copy()

        additional_params.pop("host", None)
        additional_params.pop("port", None)

        sentinels = [(str(host), int(port)) for host, port in self.sentinels]  # kombu: alt URLs

        sentinel_inst = kombu_redis.sentinel.Sentinel(
            sentinels,
            min_other_sentinels=getattr(self, "min_other_sentinels", 0),
            sentinel_kwargs=getattr(self, "sentinel_kwargs", None),
            **additional_params,
        )

        # Keep a reference to the Sentinel instance so that the
        # connections it opened to the sentinel nodes can be closed again
        # in :meth:`_disconnect_pools` (celery/kombu#1108).
        if asynchronous:
            self._async_sentinel_manager = sentinel_inst
        else:
            self._sentinel_manager = sentinel_inst

        master_name = getattr(self, "master_name", None)

        if master_name is None:
            raise ValueError("'master_name' transport option must be specified.")

        master_kwargs = {
            k: additional_params[k] for k in ("username", "password") if k in additional_params
        }

        return sentinel_inst.master_for(
            master_name,
            kombu_redis.redis.Redis,
            **master_kwargs,
        ).connection_pool


class SentinelTransport(Transport, kombu_redis.SentinelTransport):  # type: ignore[misc]
    """kombu's Sentinel transport with the guarded channel; shown with its ``sentinel://`` URL."""

    Channel = SentinelChannel

    def as_uri(self, uri: str, include_password: bool = False, mask: str = "**") -> str:
        """The connection's URL as kombu prints a Sentinel one (the first sentinel)."""
        return _as_uri(self, "sentinel", include_password, mask)


def _as_uri(transport: Any, scheme: str, include_password: bool, mask: str) -> str:
    info = transport.client.info()
    password = info["password"] if include_password else mask
    return str(
        as_url(
            scheme, info["hostname"], info["port"], info["userid"], password,
            quote(info["virtual_host"]), sanitize=not include_password, mask=mask,
        )
    )  # fmt: skip
