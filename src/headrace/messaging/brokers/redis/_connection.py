"""What the RedisBroker operations share: configuration, client, per-topic state, errors.

:class:`_RedisConnection` is the base of :class:`~._broker.RedisBroker`: it validates
the options, owns the redis-py client and the registered scripts, names each topic's
keys, translates driver errors at one choke point, and connects and closes. The
:class:`~headrace.messaging.Broker` operations themselves live in ``_broker``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from ...._clock import Clock, default_clock
from ...._errors import (
    BrokerConnectionError,
    BrokerError,
    ConfigurationError,
    redact,
)
from ..._broker import BrokerCapabilities
from .. import check_lease, check_max_deliveries, check_topic
from .._base import ServerBroker, Translated
from .._options import check_url_type, merge_url_options
from . import _scripts as scripts
from ._options import _default_consumer, _split_url

_CAPABILITIES = BrokerCapabilities(
    handback_costs_attempt=False,
    counts_attempts=True,
    ordered=True,
    delayed_nack=True,
    lease_extension=True,
    persistent=True,
)

# Most specific first is not needed: translate_errors walks the raised type's MRO.
_ERRORS = {
    redis_errors.ConnectionError: BrokerConnectionError,
    redis_errors.TimeoutError: BrokerConnectionError,
    redis_errors.BusyLoadingError: BrokerConnectionError,
    OSError: BrokerConnectionError,
    redis_errors.RedisError: BrokerError,
}

_T = TypeVar("_T")

# Seconds a cancelled fetch may spend handing back what it had already leased.
_CLEANUP_TIMEOUT = 5.0


class _Keys(NamedTuple):
    stream: str
    delayed: str
    returned: str
    signal: str
    dead: str


class _Translated(Translated):
    """The choke point where redis-py errors become headrace errors (a context manager).

    A class rather than a generator: it is entered twice per fetch-and-ack batch, and
    does nothing at all unless the block raises.
    """

    __slots__ = ()
    errors = _ERRORS
    system = "redis"


class _TopicState:
    """What this broker instance remembers about one topic."""

    __slots__ = (
        "claim_cursor",
        "group_ready",
        "housekeeping",
        "keys",
        "next_reclaim",
        "own_cursor",
    )

    def __init__(self, keys: _Keys) -> None:
        self.keys = keys
        self.group_ready = False
        # '0': own pending entries not yet re-read; '' once they all have been.
        self.own_cursor = "0"
        self.claim_cursor = "0-0"
        self.next_reclaim = -math.inf
        # The next fetch must run the full script: something may be waiting in the
        # returned or delayed sets (we returned messages, or a wait was cut short).
        self.housekeeping = True


def _socket_timeout(client: aioredis.Redis) -> float | None:
    """The read timeout of ``client``'s connections in seconds (``None``: none).

    redis-py keeps it on the connection, with a default of its own (5 s in redis-py 6
    and later, none before) when the URL or the caller did not set one: ask a
    connection built the way the pool builds them (no I/O).
    """
    pool = client.connection_pool
    try:
        timeout = pool.connection_class(**pool.connection_kwargs).socket_timeout
    except Exception:
        # A pool whose connections need more than their kwargs (Sentinel's): use
        # what was configured, if anything.
        timeout = pool.connection_kwargs.get("socket_timeout")
    if isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0:
        return float(timeout)
    return None


class _RedisConnection(ServerBroker):
    """The state and plumbing of a :class:`~._broker.RedisBroker` (its base class).

    Split off so that the broker's operations fit one file; the constructor's arguments
    are documented on :class:`~._broker.RedisBroker`.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        group: str = "headrace",
        consumer: str | None = None,
        prefix: str = "headrace:",
        lease: float = 30.0,
        max_lease: float | None = None,
        max_deliveries: int | None = 20,
        trim_acked: bool = True,
        reclaim_interval: float = 0.25,
        client: aioredis.Redis | None = None,
        clock: Clock | None = None,
        **redis_options: Any,
    ) -> None:
        redis_url, from_url = _split_url(check_url_type(url, "RedisBroker(url=...)"))
        options = merge_url_options(
            from_url,
            _RedisConnection.__init__.__kwdefaults__,
            group=group,
            consumer=consumer,
            prefix=prefix,
            lease=lease,
            max_lease=max_lease,
            max_deliveries=max_deliveries,
            trim_acked=trim_acked,
            reclaim_interval=reclaim_interval,
        )
        for name in ("group", "consumer", "prefix"):
            value = options[name]
            if value is None and name == "consumer":
                continue
            if not isinstance(value, str) or (not value and name != "prefix"):
                raise ConfigurationError(
                    f"RedisBroker({name}={value!r}) must be a non-empty string",
                    code="invalid_configuration",
                )
        cap = check_max_deliveries(options["max_deliveries"], broker="RedisBroker")
        default_lease = check_lease(options["lease"], where="RedisBroker(lease)")
        self._max_lease = (
            default_lease
            if options["max_lease"] is None
            else check_lease(options["max_lease"], where="RedisBroker(max_lease)")
        )
        self._lease = self._check_lease_bound(default_lease, "RedisBroker(lease)")
        self._reclaim_interval = check_lease(
            options["reclaim_interval"], where="RedisBroker(reclaim_interval)"
        )
        self._url = redis_url
        self._shown: str = redact(redis_url)
        self._group: str = options["group"]
        self._consumer: str = options["consumer"] or _default_consumer()
        self._prefix: str = options["prefix"]
        self._max_deliveries: int | None = cap
        self._trim_acked = bool(options["trim_acked"])
        self._clock = clock if clock is not None else default_clock()
        self._owns_client = client is None
        if client is None:
            try:
                client = aioredis.from_url(redis_url, **redis_options)
                # redis-py builds connections lazily: make one (no I/O) so that an
                # unknown option fails here, not at the first command.
                pool = client.connection_pool
                pool.connection_class(**pool.connection_kwargs)
            except (ValueError, TypeError) as exc:
                raise ConfigurationError(
                    f"broker URL {redact(url)!r} is not a valid Redis URL: {redact(str(exc))}",
                    code="invalid_broker_url",
                ) from None
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ConfigurationError(
                "RedisBroker(client=...) needs a client made with decode_responses=False "
                "(message bodies are bytes)",
                code="invalid_configuration",
            )
        self._client: aioredis.Redis = client
        # How long a reply may take before redis-py gives up on the connection: a
        # blocking read must return well within it (see _wait_for_news).
        self._read_timeout = _socket_timeout(client)
        self._fetch_script = client.register_script(scripts.FETCH)
        self._return_script = client.register_script(scripts.RETURN)
        self._dead_letter_script = client.register_script(scripts.DEAD_LETTER)
        self._extend_script = client.register_script(scripts.EXTEND)
        self._replay_script = client.register_script(scripts.REPLAY)
        self._release_script = client.register_script(scripts.RELEASE)
        self._topics: dict[str, _TopicState] = {}
        self._connected = False
        self._closed = False
        self._close_waiters: set[asyncio.Future[None]] = set()

    # -- properties ------------------------------------------------------------------

    @property
    def capabilities(self) -> BrokerCapabilities:
        """Everything supported; hand-backs are free; attempts are Redis's counter."""
        return _CAPABILITIES

    @property
    def consumer(self) -> str:
        """This broker's consumer name in the group."""
        return self._consumer

    @property
    def group(self) -> str:
        """The consumer group's name."""
        return self._group

    def stream_key(self, topic: str) -> str:
        """The Redis key of ``topic``'s stream; the other keys add ``:delayed``,
        ``:returned``, ``:signal`` and ``:dead`` to it."""
        return self._prefix + check_topic(topic)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"RedisBroker(url={self._shown!r}, group={self._group!r}, "
            f"consumer={self._consumer!r}, {state})"
        )

    # -- plumbing --------------------------------------------------------------------

    def _check_lease_bound(self, lease: float, where: str) -> float:
        if lease > self._max_lease:
            raise ConfigurationError(
                f"{where}={lease!r} exceeds this broker's max_lease={self._max_lease!r}; "
                "raise it on every consumer of the stream (RedisBroker(max_lease=...) or "
                "?max_lease=... in the URL)",
                code="invalid_lease",
            )
        return lease

    async def _repeatable(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``call``, a command that is safe to send twice (an ``XACK``; a settle
        script, which checks the delivery it acts on); if its connection turns out
        dead, send it once more on a fresh one.

        A connection that Redis closed while it sat idle in redis-py's pool (a restart,
        a proxy's idle timeout) fails the next command sent on it, with Redis up:
        redis-py 8.1.0's asyncio pool skips its check for such connections when
        maintenance notifications are on, its default with RESP3 (redis-py issue 4252).
        An ack failed that way left its messages to be delivered again. The failed
        connection goes back to the pool disconnected and is the next one handed out
        (the pool is last-in first-out), so the second try connects afresh. Fetches
        and publishes are not repeated here: their callers retry (a fetch or publish
        repeated after a lost reply would lease or add a second batch).
        """
        try:
            return await call()
        except redis_errors.ConnectionError as exc:
            # Only the plain one: not a refused password, a server still loading, a
            # full pool.
            if type(exc) is not redis_errors.ConnectionError or self._closed:
                raise
        return await call()

    def _translated(self, operation: str, topic: str | None = None) -> _Translated:
        return _Translated(self._shown, operation, topic)

    def _state(self, topic: str) -> _TopicState:
        state = self._topics.get(topic)
        if state is None:
            stream = self._prefix + topic
            keys = _Keys(
                stream,
                stream + ":delayed",
                stream + ":returned",
                stream + ":signal",
                stream + ":dead",
            )
            state = self._topics[topic] = _TopicState(keys)
        return state

    async def _ensure_group(self, topic: str, state: _TopicState) -> None:
        if state.group_ready:
            return
        with self._translated("create group", topic):
            try:
                # From id 0: messages published before any consumer existed are work too.
                await self._client.xgroup_create(
                    state.keys.stream, self._group, id="0", mkstream=True
                )
            except redis_errors.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        state.group_ready = True

    async def connect(self) -> None:
        """Check that Redis answers (``PING``); idempotent. Refuses a closed broker."""
        self._check_open("connect")
        if self._connected:
            return
        with self._translated("connect"):
            await self._client.ping()
        self._connected = True

    async def close(self) -> None:
        """Forget this consumer where it holds nothing, close the connections (idempotent).

        Fetched messages that were neither acked nor handed back stay pending: they come
        back when their lease expires (or at once to a consumer of the same name). A
        ``fetch`` waiting meanwhile raises :class:`~headrace.ClosedResourceError`.
        """
        if self._closed:
            return
        self._closed = True
        for waiter in self._close_waiters:
            if not waiter.done():
                waiter.set_result(None)
        try:
            if self._connected:
                # Hygiene, bounded so that a hung server cannot hold up a shutdown: default
                # (random) consumer names would pile up in the group; one that still
                # holds messages must stay.
                async with asyncio.timeout(_CLEANUP_TIMEOUT):
                    for state in self._topics.values():
                        if state.group_ready:
                            await self._release_script(
                                keys=[state.keys.stream], args=[self._group, self._consumer]
                            )
        except (redis_errors.RedisError, OSError, TimeoutError):
            pass
        finally:
            if self._owns_client:
                with self._translated("close"):
                    await self._client.aclose()
