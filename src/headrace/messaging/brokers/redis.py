"""The Redis Streams broker: consumer groups, leases by idle time, scripts for atomicity.

Use :class:`RedisBroker` when several machines share one queue and a Redis (>= 6.2; 7
here) is at hand; use :class:`~headrace.messaging.SqliteBroker` on one machine and
:class:`~headrace.messaging.MemoryBroker` in tests. This is the only module that imports
redis-py; ``open_broker("redis://...")`` imports it on demand.

How the contract maps onto Redis (keys for topic ``jobs`` with the default prefix):

* ``headrace:jobs`` is the stream; one consumer group (``group``, default
  ``"headrace"``) makes it a work queue: each entry goes to one consumer of the group.
  ``publish`` is pipelined ``XADD``. While messages flow, ``fetch`` is a plain
  ``XREADGROUP ... COUNT max_messages``; on a consumer's first fetch, every
  ``reclaim_interval``, after it returned messages itself, and whenever a read finds
  nothing, it runs one script instead that also moves due delayed retries into the
  stream, re-delivers handed-back messages and reclaims expired leases
  (``XAUTOCLAIM``) in the same round trip.
* A lease is the idle time of a pending entry. Every consumer reclaims with the same
  ``XAUTOCLAIM`` min-idle-time, ``max_lease`` (default: the broker's ``lease``, 30 s);
  a delivery leased for a shorter ``lease`` gets its delivery time moved
  ``max_lease - lease`` into the past (``XCLAIM ... TIME ... JUSTID``, which counts no
  delivery), so it is reclaimable exactly ``lease`` seconds after the fetch, whatever
  lease the reclaimer asked for. ``extend_lease`` does the same from now. Fetching with
  ``lease == max_lease`` skips that ``XCLAIM`` (measured: a third of the server's work
  per batch). Expired leases are looked for every ``reclaim_interval`` (default
  0.25 s) by every fetching consumer.
* On its first fetch of a topic, a consumer re-reads its *own* pending entries (id
  ``0``): with a stable ``consumer`` name (a pod or host name), whatever the previous
  process of that name fetched and did not ack comes back at once after a crash. The
  default name is unique per process; then a crashed process's messages come back by
  ``XAUTOCLAIM`` once their lease expires.
* ``attempt`` comes from Redis's delivery counter (``XPENDING``), so crashes count;
  ``max_deliveries`` (default 20, ``None``: no cap) dead-letters a message delivered
  more often than that without an ack, with a ``max_deliveries_exceeded`` error record.
* ``ack`` is one ``XACK`` per topic and batch (pipelined when a batch spans topics),
  exactly what a hand-written loop sends. Acked entries leave the stream by the
  fetch's periodic housekeeping: ``XTRIM MINID`` up to the oldest entry still pending
  or undelivered, which frees whole stream nodes instead of deleting entry by entry
  (``XDEL`` cost the server more than ``XREADGROUP`` per batch). ``trim_acked=False``
  keeps them (trim the stream yourself then).
* ``hand_back`` leaves the entry pending, lowers its delivery counter by one
  (``XCLAIM ... RETRYCOUNT``) and lists it in the sorted set ``headrace:jobs:returned``;
  a consumer claims it, in stream order and as the same attempt, on its next fetch if
  it was waiting (a small signal stream, ``:signal``, wakes it) or within
  ``reclaim_interval`` if it is busy. ``nack(delay=0)`` does the same but counts the
  attempt.
* ``nack(delay>0)``: Redis 7 has no delayed redelivery, so a script moves the entry out
  of the stream (``XACK`` + ``XDEL``) into the sorted set ``:delayed`` in one step; a
  fetch moves it back to the end of the stream when it is due (Redis server time).
* ``dead_letter`` moves the entry to the stream ``:dead`` with the JSON error record,
  atomically; ``replay_dead_letters`` adds them back as fresh messages (same id).

Standalone Redis or a Sentinel-managed primary (pass ``client=``); not Redis Cluster.
One consumer group per stream: a delayed retry or a replay re-adds the entry, which a
second group would see as a new message. Every operation that checks ownership does
so against the delivery it was given: a nack, hand-back, dead-letter or lease extension
of a message whose lease expired and that was delivered again does nothing. Driver
errors become :class:`~headrace.BrokerConnectionError` (connection lost, timeouts) or
:class:`~headrace.BrokerError`; the URL's password never appears in them or in reprs.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import socket
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec
import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from ..._cancel import shielded
from ..._clock import Clock, default_clock
from ..._errors import (
    BrokerConnectionError,
    BrokerError,
    ClosedResourceError,
    ConfigurationError,
    redact,
    translate_errors,
)
from .._broker import BrokerCapabilities, DeadLetter, Message, OutgoingMessage
from . import _redis_scripts as scripts
from . import (
    check_error_record,
    check_fetch_arguments,
    check_lease,
    check_outgoing,
    check_topic,
    max_deliveries_record,
)

__all__ = ["RedisBroker"]

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

# Options that may be given in the URL's query (?group=g&consumer=c); redis-py reads
# the rest of the query itself.
_URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "group": str,
    "consumer": str,
    "prefix": str,
    "max_deliveries": lambda text: None if text.lower() in ("none", "off", "") else int(text),
    "lease": float,
    "trim_acked": lambda text: text.lower() in ("1", "true", "yes", "on"),
    "reclaim_interval": float,
    "max_lease": float,
}

# Seconds a cancelled fetch may spend handing back what it had already leased.
_CLEANUP_TIMEOUT = 5.0
# Publishes are pipelined in chunks of this many commands.
_PUBLISH_CHUNK = 1000

_json_encode = msgspec.json.Encoder().encode
_headers_decoder = msgspec.json.Decoder(dict[str, str])


class _Receipt(NamedTuple):
    """Which delivery a message is: the stream entry and Redis's delivery counter."""

    entry_id: bytes
    deliveries: int


class _Keys(NamedTuple):
    stream: str
    delayed: str
    returned: str
    signal: str
    dead: str


class _Translated:
    """The choke point where redis-py errors become headrace errors (a context manager).

    A class rather than a generator: it is entered twice per fetch-and-ack batch, and
    does nothing at all unless the block raises.
    """

    __slots__ = ("operation", "topic", "url")

    def __init__(self, url: str, operation: str, topic: str | None) -> None:
        self.url = url
        self.operation = operation
        self.topic = topic

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Returns None, never true: an error is translated or passed on, never swallowed.
        if exc is None or not isinstance(exc, Exception):
            return
        url = redact(self.url)
        context: dict[str, Any] = {"url": url, "operation": self.operation}
        where = f"redis {self.operation}"
        if self.topic is not None:
            context["topic"] = self.topic
            where += f"({self.topic!r})"
        with translate_errors(
            _ERRORS,
            message=lambda error: (
                f"{where} failed on {url}: {type(error).__name__}: {redact(str(error))}"
            ),
            context=context,
        ):
            raise exc.with_traceback(traceback)


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


class _Step(NamedTuple):
    messages: list[Message]
    # Milliseconds until the earliest delayed retry (None: none waiting).
    due_in: float | None
    last_delivered: str
    signal_last: str


def _default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def _split_url(url: str) -> tuple[str, dict[str, Any]]:
    """Remove our options from the URL's query; return the URL for redis-py and them."""
    parts = urlsplit(url)
    if not parts.query:
        return url, {}
    ours: dict[str, Any] = {}
    theirs: list[tuple[str, str]] = []
    for name, text in parse_qsl(parts.query, keep_blank_values=True):
        convert = _URL_OPTIONS.get(name)
        if convert is None:
            theirs.append((name, text))
            continue
        try:
            ours[name] = convert(text)
        except ValueError as exc:
            raise ConfigurationError(
                f"option {name}={text!r} in broker URL {redact(url)!r} is not valid: {exc}",
                code="invalid_broker_url",
            ) from exc
    return urlunsplit(parts._replace(query=urlencode(theirs))), ours


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisBroker:
    """A :class:`~headrace.messaging.Broker` on Redis Streams with one consumer group.

    ``url`` is a redis-py URL (``redis://[:password@]host:6379/0``, ``rediss://``,
    ``unix://``) whose query may also set this class's options (``?group=billing``);
    keyword arguments win over the URL. ``group`` names the consumer group (default
    ``"headrace"``); ``consumer`` names this consumer within it: give each worker
    process a stable, unique name (its pod name) so that it re-reads its own unacked
    messages at once after a crash; the default is unique per process
    (host-pid-random). Never give one name to two live processes: each would re-read
    the other's messages. ``prefix`` (default ``"headrace:"``) is prepended to topic
    names to make keys. ``lease`` (default 30 s) is the default of ``fetch(lease=...)``;
    ``max_lease`` (default: ``lease``) is the longest lease a fetch or ``extend_lease``
    may ask for and must be the same for every consumer of a stream (it is the reclaim
    threshold, see the module doc); fetches with exactly ``max_lease`` are the cheapest.
    ``max_deliveries`` (default 20, ``None`` for no cap) dead-letters a message
    delivered that many times without an ack (set it above the worker's
    ``max_attempts``); ``trim_acked`` (default true) trims acked entries off the stream;
    ``reclaim_interval`` (default 0.25 s) is how often a fetching consumer looks for
    expired leases. ``client`` lets you pass your own ``redis.asyncio.Redis`` (made with
    ``decode_responses=False``; :meth:`close` leaves it open); other keyword arguments
    go to ``redis.asyncio.from_url``. ``clock`` is read only to pace reclaims and
    ``fetch`` timeouts.

    Measured here (``benchmarks/worker_redis.py``, 50k messages, no-op handling): the
    ``fetch`` + ``ack`` loop ran at 0.99x a hand-written ``XREADGROUP COUNT 100`` +
    ``XACK`` loop and 16x a FastStream stream subscriber.

    Safe to share between the tasks of one event loop (fetch, ack and publish may run
    concurrently); one instance per process and consumer name.

    Example::

        async with RedisBroker("redis://localhost:6379/0", consumer="worker-1") as broker:
            await broker.publish("jobs", [OutgoingMessage(b"hello")])
            for message in await broker.fetch("jobs", 100, timeout=5.0, lease=30.0):
                ...
                await broker.ack([message])
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
        if not isinstance(url, str):
            raise ConfigurationError(
                f"RedisBroker(url=...) must be a string, got {type(url).__name__}",
                code="invalid_broker_url",
            )
        redis_url, from_url = _split_url(url)
        given: dict[str, Any] = {
            "group": group,
            "consumer": consumer,
            "prefix": prefix,
            "lease": lease,
            "max_lease": max_lease,
            "max_deliveries": max_deliveries,
            "trim_acked": trim_acked,
            "reclaim_interval": reclaim_interval,
        }
        defaults = RedisBroker.__init__.__kwdefaults__ or {}
        # A keyword argument left at its default yields to the URL's value.
        options = {
            name: from_url[name] if name in from_url and value == defaults.get(name) else value
            for name, value in given.items()
        }
        for name in ("group", "consumer", "prefix"):
            value = options[name]
            if value is None and name == "consumer":
                continue
            if not isinstance(value, str) or (not value and name != "prefix"):
                raise ConfigurationError(
                    f"RedisBroker({name}={value!r}) must be a non-empty string",
                    code="invalid_configuration",
                )
        cap = options["max_deliveries"]
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ConfigurationError(
                f"RedisBroker(max_deliveries={cap!r}) must be an integer >= 1 or None",
                code="invalid_max_deliveries",
            )
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

    def __del__(self) -> None:
        # getattr: __init__ may have failed before setting the attributes.
        if getattr(self, "_connected", False) and not getattr(self, "_closed", True):
            warnings.warn(
                f"unclosed {self!r}: call await broker.close() (or use async with)",
                ResourceWarning,
                stacklevel=2,
                source=self,
            )

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisBroker:
        """The broker for ``url``; keyword ``options`` win over the URL's query."""
        return cls(url, **options)

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

    @property
    def max_deliveries(self) -> int | None:
        return self._max_deliveries

    @property
    def closed(self) -> bool:
        return self._closed

    def stream_key(self, topic: str) -> str:
        """The Redis key of ``topic``'s stream; the other keys add ``:delayed``,
        ``:returned``, ``:signal`` and ``:dead`` to it."""
        return self._prefix + check_topic(topic)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"RedisBroker(url={redact(self._url)!r}, group={self._group!r}, "
            f"consumer={self._consumer!r}, {state})"
        )

    async def __aenter__(self) -> RedisBroker:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

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

    def _translated(self, operation: str, topic: str | None = None) -> _Translated:
        return _Translated(self._url, operation, topic)

    def _check_open(self, operation: str) -> None:
        if self._closed:
            raise ClosedResourceError(
                f"{operation}() on a closed {self!r}", context={"operation": operation}
            )

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

    # -- publish ---------------------------------------------------------------------

    async def publish(self, topic: str, messages: Sequence[OutgoingMessage]) -> list[str]:
        """Add ``messages`` to the end of ``topic``'s stream; return their ids in order.

        One pipelined ``XADD`` per message (chunks of 1000); a message with ``delay`` goes
        to the delay set instead (due by Redis server time) with an id of its own
        (``d-<hex>``).
        """
        self._check_open("publish")
        check_topic(topic)
        outgoing = check_outgoing(topic, messages)
        if not outgoing:
            return []
        if not self._connected:
            await self.connect()
        keys = self._state(topic).keys
        ids: list[str] = []
        with self._translated("publish", topic):
            for start in range(0, len(outgoing), _PUBLISH_CHUNK):
                pipe = self._client.pipeline(transaction=False)
                given: list[str | None] = []
                for message in outgoing[start : start + _PUBLISH_CHUNK]:
                    fields: list[bytes | str] = ["b", message.body]
                    if message.key is not None:
                        fields += ["k", message.key]
                    if message.headers:
                        fields += ["h", _json_encode(dict(message.headers))]
                    if message.delay > 0:
                        message_id = f"d-{secrets.token_hex(8)}"
                        fields += ["i", message_id]
                        packed = _pack_fields(
                            [f if isinstance(f, bytes) else f.encode() for f in fields]
                        )
                        pipe.eval(
                            _DELAYED_PUBLISH,
                            1,
                            keys.delayed,
                            math.ceil(message.delay * 1000),
                            packed,
                        )
                        given.append(message_id)
                    else:
                        pipe.execute_command("XADD", keys.stream, "*", *fields)
                        given.append(None)
                results = await pipe.execute()
                ids.extend(
                    known if known is not None else _text(result)
                    for known, result in zip(given, results, strict=True)
                )
        return ids

    # -- fetch -----------------------------------------------------------------------

    async def fetch(
        self,
        topic: str,
        max_messages: int,
        *,
        timeout: float,
        lease: float | None = None,
    ) -> list[Message]:
        """Lease up to ``max_messages`` messages of ``topic``, waiting up to ``timeout``
        seconds for the first; each is reclaimable by others ``lease`` seconds from now
        (default: the broker's ``lease``; at most ``max_lease``).

        Order of what comes back: this consumer's own pending entries left by an earlier
        process of the same name, then handed-back messages, then expired leases of any
        consumer (every ``reclaim_interval``), then new entries. Cancel-safe: if the
        caller is cancelled while the server already leased a batch, the batch is
        handed back before the cancellation propagates, so nothing waits for a lease.
        """
        self._check_open("fetch")
        check_topic(topic)
        lease = self._lease if lease is None else lease
        check_fetch_arguments(max_messages, timeout, lease)
        self._check_lease_bound(float(lease), "fetch(lease)")
        if not self._connected:
            await self.connect()
        state = self._state(topic)
        await self._ensure_group(topic, state)
        clock = self._clock
        deadline = clock.now() + timeout
        while True:
            try:
                step = await self._step_cancel_safe(topic, state, max_messages, float(lease))
            except BrokerError:
                # close() pulled the connection from under this fetch: say so.
                self._check_open("fetch")
                raise
            if step.messages:
                return step.messages
            now = clock.now()
            if now >= deadline:
                return []
            wait = min(deadline - now, max(0.0, state.next_reclaim - now))
            if step.due_in is not None:
                wait = min(wait, step.due_in / 1000)
            await self._wait_for_news(topic, state, step, wait)

    async def _step_cancel_safe(
        self, topic: str, state: _TopicState, limit: int, lease: float
    ) -> _Step:
        inner = asyncio.ensure_future(self._step(topic, state, limit, lease))
        try:
            return await asyncio.shield(inner)
        except asyncio.CancelledError:
            # The script may already have leased a batch that the caller will never see:
            # give it back now rather than after a lease expiry.
            await shielded(self._hand_back_result(inner), timeout=_CLEANUP_TIMEOUT)
            raise

    async def _hand_back_result(self, inner: asyncio.Future[_Step]) -> None:
        try:
            step = await inner
        except Exception:
            return
        if step.messages:
            try:
                await self._return(step.messages, mode="h", delay=0.0)
            except Exception:
                # Redis is gone or the broker closed: the batch comes back when its lease
                # expires. Raising here would replace the cancellation being delivered.
                return

    async def _step(self, topic: str, state: _TopicState, limit: int, lease: float) -> _Step:
        now = self._clock.now()
        reclaim = now >= state.next_reclaim
        if reclaim:
            state.next_reclaim = now + self._reclaim_interval
        elif (
            not state.housekeeping
            and not state.own_cursor
            and lease >= self._max_lease
            and state.group_ready
        ):
            # While messages flow, a plain XREADGROUP is all a fetch needs: the
            # housekeeping runs every reclaim_interval, and whenever this read finds
            # nothing (the full script also says what to wait for).
            messages = await self._read_new(topic, state, limit)
            if messages:
                return _Step(messages, None, "", "")
        state.housekeeping = False
        keys = state.keys
        args: list[Any] = [
            self._group,
            self._consumer,
            limit,
            state.own_cursor,
            "1" if reclaim else "0",
            math.ceil(self._max_lease * 1000),
            state.claim_cursor,
            # Due retries moved per fetch; Lua's unpack() takes at most ~8000 values.
            min(1000, max(100, limit)),
            math.ceil(lease * 1000),
            "1" if reclaim and self._trim_acked else "0",
        ]
        script_keys = [keys.stream, keys.delayed, keys.returned, keys.signal]
        with self._translated("fetch", topic):
            try:
                reply = await self._fetch_script(keys=script_keys, args=args)
            except redis_errors.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # The stream was deleted under us (and its group with it): start over.
                state.group_ready = False
                await self._ensure_group(topic, state)
                reply = await self._fetch_script(keys=script_keys, args=args)
        state.own_cursor = _text(reply[0])
        state.claim_cursor = _text(reply[1])
        messages = [
            _message(topic, reply[index], reply[index + 1], _pairs(reply[index + 2]))
            for index in range(5, len(reply), 3)
        ]
        due_in = None if reply[2] == -1 else float(reply[2])
        return _Step(
            await self._over_the_cap(topic, messages), due_in, _text(reply[3]), _text(reply[4])
        )

    async def _read_new(self, topic: str, state: _TopicState, limit: int) -> list[Message]:
        """``XREADGROUP ... >``: new entries only, leased for ``max_lease``."""
        stream = state.keys.stream
        with self._translated("fetch", topic):
            try:
                reply = await self._client.xreadgroup(
                    self._group, self._consumer, {stream: ">"}, count=limit
                )
            except redis_errors.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                state.group_ready = False
                await self._ensure_group(topic, state)
                return []
        if not reply:
            return []
        # RESP3 gives {stream: [entries]}, RESP2 [[stream, entries]].
        raw: Any = reply
        entries: list[tuple[bytes, dict[bytes, bytes]]] = (
            next(iter(raw.values()))[0] if isinstance(raw, dict) else raw[0][1]
        )
        if any(len(fields) != 1 or b"b" not in fields for _, fields in entries):
            return await self._over_the_cap(
                topic,
                [
                    _message(topic, entry_id, 1, fields.items())
                    for entry_id, fields in entries
                    if fields
                ],
            )
        # The common entry: a body and nothing else, on its first delivery.
        return [
            Message(
                id=entry_id.decode(), topic=topic, body=fields[b"b"], receipt=_Receipt(entry_id, 1)
            )
            for entry_id, fields in entries
        ]

    async def _over_the_cap(self, topic: str, messages: list[Message]) -> list[Message]:
        """Dead-letter the messages delivered more than ``max_deliveries`` times."""
        cap = self._max_deliveries
        if cap is None or all(message.attempt <= cap for message in messages):
            return messages
        kept: list[Message] = []
        for message in messages:
            if message.attempt > cap:
                record = max_deliveries_record(topic, message.id, message.attempt - 1, cap)
                await self._dead_letter(message, _json_encode(record))
            else:
                kept.append(message)
        return kept

    async def _wait_for_news(
        self, topic: str, state: _TopicState, step: _Step, seconds: float
    ) -> None:
        """Wait up to ``seconds`` for a new entry or a hand-back signal on ``topic``.

        A plain ``XREAD`` (not ``XREADGROUP``) claims nothing, so cancelling it, or
        closing the broker under it, can never strand a message in a pending list.
        """
        # Whatever ends the wait (a signal, a due retry, the reclaim time), the next
        # fetch looks everywhere.
        state.housekeeping = True
        if seconds > 0:
            block_ms = max(1, math.ceil(seconds * 1000))
            streams: dict[Any, Any] = {
                state.keys.stream: step.last_delivered or "0-0",
                state.keys.signal: step.signal_last,
            }
            reader = asyncio.ensure_future(self._client.xread(streams, count=1, block=block_ms))
            closed = asyncio.get_running_loop().create_future()
            self._close_waiters.add(closed)
            try:
                await asyncio.wait({reader, closed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._close_waiters.discard(closed)
                if not reader.done():
                    reader.cancel()
                    # Let the read end here so that no task outlives the fetch.
                    await asyncio.wait({reader})
            if not reader.cancelled() and not self._closed:
                error = reader.exception()
                if error is not None:
                    with self._translated("fetch", topic):
                        raise error
        self._check_open("fetch")

    # -- settle ----------------------------------------------------------------------

    @staticmethod
    def _by_topic(messages: Sequence[Message]) -> dict[str, list[Message]]:
        groups: dict[str, list[Message]] = {}
        for message in messages:
            if not isinstance(message.receipt, _Receipt):
                raise ConfigurationError(
                    f"message {message.id!r} of topic {message.topic!r} was not fetched "
                    "from a RedisBroker (it has no stream receipt)",
                    code="invalid_message_receipt",
                )
            groups.setdefault(message.topic, []).append(message)
        return groups

    async def ack(self, messages: Sequence[Message]) -> None:
        """Mark handled messages done: one ``XACK`` per topic of the batch.

        They are never delivered again, and leave the stream with the next trim (see the
        module doc). Acking a message whose lease expired and that was delivered again
        elsewhere is harmless: it counts as handled, the other delivery's ack, nack or
        hand-back then does nothing.
        """
        self._check_open("ack")
        groups = self._by_topic(messages)
        if not groups:
            return
        with self._translated("ack"):
            if len(groups) == 1:
                [(topic, batch)] = groups.items()
                await self._client.xack(
                    self._state(topic).keys.stream,
                    self._group,
                    *[message.receipt.entry_id for message in batch],
                )
                return
            pipe = self._client.pipeline(transaction=False)
            for topic, batch in groups.items():
                stream = self._state(topic).keys.stream
                entry_ids = [message.receipt.entry_id for message in batch]
                pipe.execute_command("XACK", stream, self._group, *entry_ids)
            await pipe.execute()

    async def nack(self, messages: Sequence[Message], *, delay: float = 0.0) -> None:
        """Return messages for a retry after ``delay`` seconds; counts an attempt.

        ``delay=0`` re-delivers at once in stream order; ``delay>0`` moves the message
        to the delay set atomically and back to the end of the stream when due.
        Messages no longer held by this delivery are left alone.
        """
        self._check_open("nack")
        if (
            isinstance(delay, bool)
            or not isinstance(delay, int | float)
            or not math.isfinite(delay)
            or delay < 0
        ):
            raise ConfigurationError(
                f"nack(delay={delay!r}) must be a number of seconds >= 0", code="invalid_nack"
            )
        await self._return(messages, mode="n", delay=float(delay))

    async def hand_back(self, messages: Sequence[Message]) -> None:
        """Return fetched-but-unhandled messages at once, without counting an attempt."""
        self._check_open("hand_back")
        await self._return(messages, mode="h", delay=0.0)

    async def _return(self, messages: Sequence[Message], *, mode: str, delay: float) -> None:
        delay_ms = math.ceil(delay * 1000)
        horizon_ms = math.ceil(self._max_lease * 1000)
        for topic, batch in self._by_topic(messages).items():
            state = self._state(topic)
            state.housekeeping = True
            keys = state.keys
            args: list[Any] = [self._group, self._consumer, mode, delay_ms, horizon_ms]
            for message in batch:
                args += [message.receipt.entry_id, message.receipt.deliveries]
            with self._translated("hand_back" if mode == "h" else "nack", topic):
                await self._return_script(
                    keys=[keys.stream, keys.delayed, keys.returned, keys.signal], args=args
                )

    async def extend_lease(self, messages: Sequence[Message], lease: float) -> None:
        """Make messages still held by this delivery reclaimable only ``lease`` seconds
        from now (at most ``max_lease``); counts no delivery."""
        self._check_open("extend_lease")
        self._check_lease_bound(check_lease(lease, where="extend_lease(lease)"), "extend_lease")
        for topic, batch in self._by_topic(messages).items():
            args: list[Any] = [
                self._group,
                self._consumer,
                math.ceil(lease * 1000),
                math.ceil(self._max_lease * 1000),
            ]
            for message in batch:
                args += [message.receipt.entry_id, message.receipt.deliveries]
            with self._translated("extend_lease", topic):
                await self._extend_script(keys=[self._state(topic).keys.stream], args=args)

    async def dead_letter(self, message: Message, error: Mapping[str, Any]) -> None:
        """Move ``message`` to its topic's dead-letter stream with ``error``, atomically.

        A message no longer held by this delivery (acked, or delivered again) is not
        stored."""
        self._check_open("dead_letter")
        encoded = check_error_record(error)
        self._by_topic([message])
        await self._dead_letter(message, encoded)

    async def _dead_letter(self, message: Message, encoded: bytes) -> None:
        keys = self._state(message.topic).keys
        receipt: _Receipt = message.receipt
        with self._translated("dead_letter", message.topic):
            await self._dead_letter_script(
                keys=[keys.stream, keys.dead],
                args=[
                    self._group,
                    self._consumer,
                    receipt.entry_id,
                    receipt.deliveries,
                    message.attempt,
                    encoded,
                ],
            )

    # -- dead letters ----------------------------------------------------------------

    async def dead_letters(self, topic: str, *, limit: int = 100) -> list[DeadLetter]:
        """The newest ``limit`` dead letters of ``topic``, newest first.

        ``dead_lettered_at`` is the Redis server's Unix time in seconds."""
        self._check_open("dead_letters")
        check_topic(topic)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigurationError(
                f"dead_letters(limit={limit!r}) must be an integer >= 1", code="invalid_limit"
            )
        keys = self._state(topic).keys
        with self._translated("dead_letters", topic):
            entries = await self._client.xrevrange(keys.dead, "+", "-", count=limit)
        return [_dead_letter_of(topic, entry) for entry in entries or ()]

    async def replay_dead_letters(self, topic: str, ids: Sequence[str] | None = None) -> int:
        """Add dead letters of ``topic`` back to its stream as new messages (attempt 1,
        same id, body, key and headers): all of them, or those whose message id is in
        ``ids``; return how many. Each moves atomically (no loss, no double replay)."""
        self._check_open("replay_dead_letters")
        check_topic(topic)
        wanted = None if ids is None else set(ids)
        keys = self._state(topic).keys
        replayed = 0
        start = "-"
        with self._translated("replay_dead_letters", topic):
            while True:
                entries = await self._client.xrange(keys.dead, start, "+", count=500)
                if not entries:
                    return replayed
                chosen = [
                    _text(entry[0])
                    for entry in entries
                    if wanted is None or _dead_letter_of(topic, entry).message.id in wanted
                ]
                if chosen:
                    replayed += int(
                        await self._replay_script(keys=[keys.stream, keys.dead], args=chosen)
                    )
                start = "(" + _text(entries[-1][0])


_DELAYED_PUBLISH = (
    "local t = redis.call('TIME') "
    "return redis.call('ZADD', KEYS[1], "
    "t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[1]), ARGV[2])"
)


def _pack_fields(fields: Sequence[bytes]) -> bytes:
    """Pack byte strings as a msgpack array the way Redis's Lua ``cmsgpack`` reads it.

    Redis's ``cmsgpack`` predates msgpack's ``bin`` types, so every field goes as a
    ``str`` holding the raw bytes (Lua strings are byte strings; nothing is decoded).
    """
    parts = [_msgpack_header(len(fields), 0x90, 0xDC, 0xDD, short=16)]
    for field in fields:
        parts.append(_msgpack_header(len(field), 0xA0, 0xDA, 0xDB, short=32, byte=0xD9))
        parts.append(field)
    return b"".join(parts)


def _msgpack_header(
    size: int, fix: int, head16: int, head32: int, *, short: int, byte: int | None = None
) -> bytes:
    if size < short:
        return bytes([fix | size])
    if byte is not None and size < 0x100:
        return bytes([byte, size])
    if size < 0x10000:
        return bytes([head16]) + size.to_bytes(2, "big")
    return bytes([head32]) + size.to_bytes(4, "big")


def _pairs(flat: Sequence[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """``(name, value)`` pairs of a flat ``[name, value, ...]`` field list."""
    values = iter(flat)
    return zip(values, values, strict=True)


def _message(
    topic: str, entry: bytes, deliveries: int, fields: Iterable[tuple[bytes, bytes]]
) -> Message:
    """The :class:`Message` of one stream entry and its delivery count."""
    message_id = entry.decode()
    body = b""
    key: str | None = None
    headers: dict[str, str] = {}
    base = 0
    for name, value in fields:
        if name == b"b":
            body = value
        elif name == b"k":
            key = value.decode()
        elif name == b"h":
            headers.update(_headers_decoder.decode(value))
        elif name == b"i":
            message_id = value.decode()
        elif name == b"a":
            base = int(value)
        else:
            # An entry added by some other producer: its extra fields become headers.
            headers[name.decode(errors="replace")] = value.decode(errors="replace")
    return Message(
        id=message_id,
        topic=topic,
        body=body,
        headers=headers,
        attempt=base + deliveries,
        key=key,
        receipt=_Receipt(entry, deliveries),
    )


def _dead_letter_of(topic: str, entry: Any) -> DeadLetter:
    """The :class:`DeadLetter` of one entry of a dead-letter stream (as redis-py parses it)."""
    entry_id, fields = entry[0], entry[1]
    error: dict[str, Any] = {}
    attempt = 1
    when = 0.0
    kept: list[tuple[bytes, bytes]] = []
    for name, value in fields.items():
        if name == b"e":
            error = msgspec.json.decode(value)
        elif name == b"n":
            attempt = int(value)
        elif name == b"t":
            when = int(value) / 1000
        else:
            kept.append((name, value))
    message = _message(topic, entry_id, attempt, kept)
    message.receipt = None
    return DeadLetter(message, error, when)
