"""What the NatsBroker operations share: configuration, the connection, routing, errors.

:class:`_NatsConnection` is the base of :class:`~._broker.NatsBroker`: it validates the
options, owns the nats-py client and one wildcard inbox subscription that every pull
request and publish acknowledgement answers to, creates each topic's streams and
consumers, translates driver errors at one choke point, publishes pipelined with
JetStream acks, and connects and closes. The operations live in ``_broker``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import nats
import nats.errors as nats_errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from ...._clock import Clock, default_clock
from ...._errors import (
    BrokerError,
    ClosedResourceError,
    ConfigurationError,
    InvalidMessage,
)
from ..._broker import BrokerCapabilities
from .. import check_lease, check_max_deliveries
from .._base import ServerBroker
from .._options import check_url_type, merge_url_options
from . import _codec as codec
from ._options import Scrubber, check_name, split_options
from ._state import _Pull, _TopicState
from ._translate import _Translated

logger = logging.getLogger("headrace.messaging.nats")

_CAPABILITIES = BrokerCapabilities(
    # JetStream counts every redelivery, a nak included: a hand-back is never free.
    handback_costs_attempt=True,
    counts_attempts=True,
    ordered=True,
    delayed_nack=True,
    lease_extension=True,
    persistent=True,
    max_message_bytes=1024 * 1024,
)

# Publishes wait for their acks in windows of this many messages.
_PUBLISH_WINDOW = 2000
# Seconds close() waits for the last pull requests' messages and the final flush.
_CLOSE_TIMEOUT = 5.0


def _seen(task: asyncio.Future[Any]) -> None:
    """Mark a shared task's error as retrieved (each waiter re-raises it itself)."""
    if not task.cancelled():
        task.exception()


def _weak(owner: Any, method: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """``method`` of ``owner`` as a callback that does not keep ``owner`` alive."""
    ref = weakref.ref(owner)

    async def call(*args: Any) -> None:
        target = ref()
        if target is not None:
            await method(target, *args)

    return call


class _NatsConnection(ServerBroker):
    """The state and plumbing of a :class:`~._broker.NatsBroker` (its base class).

    The constructor's arguments are documented on :class:`~._broker.NatsBroker`.
    """

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        *,
        prefix: str = "headrace",
        durable: str = "headrace",
        lease: float = 30.0,
        max_lease: float | None = None,
        max_deliveries: int | None = 20,
        max_ack_pending: int = 20_000,
        replicas: int = 1,
        storage: str = "file",
        request_timeout: float = 5.0,
        promote_interval: float = 0.25,
        clock: Clock | None = None,
        **nats_options: Any,
    ) -> None:
        self._scrub = Scrubber(check_url_type(url, "NatsBroker(url=...)"))
        nats_url, from_url = split_options(url)
        options = merge_url_options(
            from_url,
            _NatsConnection.__init__.__kwdefaults__,
            prefix=prefix,
            durable=durable,
            lease=lease,
            max_lease=max_lease,
            max_deliveries=max_deliveries,
            max_ack_pending=max_ack_pending,
            replicas=replicas,
            storage=storage,
            request_timeout=request_timeout,
            promote_interval=promote_interval,
        )
        self._prefix = check_name(options["prefix"], "prefix")
        self._durable = check_name(options["durable"], "durable")
        self._max_deliveries = check_max_deliveries(options["max_deliveries"], broker="NatsBroker")
        default_lease = check_lease(options["lease"], where="NatsBroker(lease)")
        self._max_lease = (
            default_lease
            if options["max_lease"] is None
            else check_lease(options["max_lease"], where="NatsBroker(max_lease)")
        )
        self._lease = self._check_lease_bound(default_lease, "NatsBroker(lease)")
        self._request_timeout = check_lease(
            options["request_timeout"], where="NatsBroker(request_timeout)"
        )
        self._promote_interval = check_lease(
            options["promote_interval"], where="NatsBroker(promote_interval)"
        )
        for name in ("max_ack_pending", "replicas"):
            value = options[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(
                    f"NatsBroker({name}={value!r}) must be an integer >= 1",
                    code="invalid_configuration",
                )
        self._max_ack_pending: int = options["max_ack_pending"]
        self._replicas: int = options["replicas"]
        if options["storage"] not in ("file", "memory"):
            raise ConfigurationError(
                f"NatsBroker(storage={options['storage']!r}) must be 'file' or 'memory'",
                code="invalid_configuration",
            )
        self._storage = StorageType.FILE if options["storage"] == "file" else StorageType.MEMORY
        self._url = nats_url
        self._shown = self._scrub(nats_url)
        self._nats_options = nats_options
        self._clock = clock if clock is not None else default_clock()
        self._client: Client | None = None
        self._inbox = ""
        self._tokens = itertools.count()
        self._pulls: dict[str, _Pull] = {}
        # Stream subject -> (topic state, is the delayed subject): pulled messages
        # arrive with the subject they were published to.
        self._subjects: dict[str, tuple[_TopicState, bool]] = {}
        self._pub_acks: dict[str, asyncio.Future[bytes]] = {}
        self._topics: dict[str, _TopicState] = {}
        # NATS's default until the server tells its own.
        self._max_payload = 1024 * 1024
        self._capabilities = _CAPABILITIES
        self._connected = False
        self._closed = False
        self._connecting: asyncio.Future[None] | None = None

    # -- properties ------------------------------------------------------------------

    @property
    def capabilities(self) -> BrokerCapabilities:
        """Everything supported; a hand-back costs an attempt (JetStream counts naks);
        messages up to the server's ``max_payload`` (known once connected)."""
        return self._capabilities

    @property
    def max_lease(self) -> float:
        """The consumers' AckWait in seconds: the longest lease a fetch may ask for."""
        return self._max_lease

    def stream_name(self, topic: str) -> str:
        """The JetStream stream of ``topic`` (its dead letters: the same plus ``-dead``)."""
        return self._state(topic).stream

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"NatsBroker(url={self._shown!r}, prefix={self._prefix!r}, "
            f"durable={self._durable!r}, {state})"
        )

    # -- plumbing --------------------------------------------------------------------

    def _check_lease_bound(self, lease: float, where: str) -> float:
        if lease > self._max_lease:
            raise ConfigurationError(
                f"{where}={lease!r} exceeds this broker's max_lease={self._max_lease!r} "
                "(the consumers' AckWait); raise it on every consumer of the topic "
                "(NatsBroker(max_lease=...) or ?max_lease=... in the URL)",
                code="invalid_lease",
            )
        return lease

    def _translated(self, operation: str, topic: str | None = None) -> _Translated:
        return _Translated(self._scrub, self._shown, operation, topic)

    def _state(self, topic: str) -> _TopicState:
        state = self._topics.get(topic)
        if state is None:
            state = self._topics[topic] = _TopicState(topic, self._prefix)
            state.delayed_consumer = f"{self._durable}-delayed"
            self._subjects[state.subject] = (state, False)
            self._subjects[state.delayed_subject] = (state, True)
        return state

    @property
    def _nc(self) -> Client:
        client = self._client
        if client is None:
            raise ClosedResourceError(f"{self!r} is not connected")
        return client

    def _token(self) -> str:
        return f"{self._inbox}.{next(self._tokens)}"

    # -- connect and close -----------------------------------------------------------

    async def connect(self) -> None:
        """Connect to NATS and check that JetStream answers; idempotent."""
        self._check_open("connect")
        if self._connected:
            return
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(_seen)
        try:
            await asyncio.shield(self._connecting)
        except BaseException:
            if self._connecting.done():
                self._connecting = None
            raise

    async def _connect(self) -> None:
        options: dict[str, Any] = {
            "name": "headrace",
            "allow_reconnect": True,
            # The first connect tries each server twice and fails (the caller retries);
            # once connected, see below.
            "max_reconnect_attempts": 1,
            "reconnect_time_wait": 0.5,
            "connect_timeout": self._request_timeout,
            "drain_timeout": _CLOSE_TIMEOUT,
            # Weak: the client must not keep an unclosed broker alive (so it can warn).
            "error_cb": _weak(self, _NatsConnection._on_error),
            "disconnected_cb": _weak(self, _NatsConnection._on_disconnected),
            "reconnected_cb": _weak(self, _NatsConnection._on_reconnected),
        }
        options.update(self._nats_options)
        with self._translated("connect"):
            client = await nats.connect(self._url, **options)
        if "max_reconnect_attempts" not in self._nats_options:
            # Connected: keep reconnecting while the server restarts, for ever;
            # operations meanwhile fail with BrokerConnectionError (their timeouts) and
            # the worker backs off.
            client.options["max_reconnect_attempts"] = -1
        try:
            self._inbox = client.new_inbox()
            with self._translated("connect"):
                await client.subscribe(
                    self._inbox + ".*",
                    cb=_weak(self, _NatsConnection._on_inbox),
                    pending_msgs_limit=1_000_000,
                    pending_bytes_limit=1 << 30,
                )
                await client.jetstream().account_info()
        except BaseException:
            await client.close()
            raise
        self._client = client
        self._max_payload = client.max_payload or self._max_payload
        self._capabilities = dataclasses.replace(_CAPABILITIES, max_message_bytes=self._max_payload)
        self._connected = True

    async def _on_error(self, error: Exception) -> None:
        logger.warning("nats: %s: %s", type(error).__name__, self._scrub(str(error)))

    async def _on_disconnected(self) -> None:
        # Pull requests die with the connection (the server drops requests whose reply
        # subject has no interest): end them so their fetches ask again.
        for pull in list(self._pulls.values()):
            if not pull.done.done():
                pull.status = "disconnected"
                pull.done.set_result(None)
        self._pulls.clear()

    async def _on_reconnected(self) -> None:
        logger.info("nats: reconnected to %s", self._scrub(self._url))

    async def close(self) -> None:
        """Flush, hand back what no fetch took, close the connection (idempotent).

        Acks are confirmed before :meth:`ack` returns, so none is pending here; lease
        naks and hand-backs sent without a reply are flushed before the connection
        goes. Messages delivered for a pull request after its fetch ended (it was
        cancelled) that no fetch took are handed back (an attempt each). A ``fetch``
        waiting meanwhile raises :class:`~headrace.ClosedResourceError`.
        """
        if self._closed:
            return
        self._closed = True
        for pull in list(self._pulls.values()):
            if not pull.done.done():
                pull.done.set_result(None)
        self._pulls.clear()
        client = self._client
        if client is None:
            if self._connecting is not None and not self._connecting.done():
                self._connecting.cancel()
            return
        try:
            if client.is_connected:
                # A round trip first: a connection that died unnoticed would hold
                # drain() for its whole timeout.
                await client.flush(timeout=max(1, math.ceil(min(self._request_timeout, 2.0))))
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    for state in self._topics.values():
                        while state.arrived:
                            await client.publish(state.arrived.popleft()[0].reply, codec.NAK)
                        while state.delayed_arrived:
                            msg = state.delayed_arrived.popleft()
                            await client.publish(msg.reply, codec.NAK)
                # drain(): stop the subscription, run its callbacks for what already
                # arrived (they hand it back), flush, close; bounded by drain_timeout.
                await client.drain()
        except (nats_errors.Error, OSError, TimeoutError):
            pass
        finally:
            if not client.is_closed:
                with self._translated("close"):
                    await client.close()

    # -- routing ---------------------------------------------------------------------

    async def _on_inbox(self, msg: Msg) -> None:
        """Route one message on the inbox: a pulled message (by the subject it was
        published to), a pull request's status or a publish ack (by reply token)."""
        if msg.reply.startswith("$JS.ACK."):
            route = self._subjects.get(msg.subject)
            if route is None:
                return
            if self._closed:
                await self._late(msg)
                return
            state, delayed = route
            if delayed:
                state.delayed_arrived.append(msg)
                state.delayed_count += 1
                count = state.delayed_count
            else:
                state.arrived.append((msg, self._clock.now()))
                state.count += 1
                count = state.count
            for waiting in state.pulls:
                if (
                    waiting.delayed is delayed
                    and count - waiting.start >= waiting.limit
                    and not waiting.done.done()
                ):
                    waiting.done.set_result(None)
            return
        token = msg.subject
        pull: _Pull | None = self._pulls.pop(token, None)
        if pull is not None:
            headers = msg.headers
            status = headers.get(codec.STATUS) if headers else None
            if status == "100":  # an idle heartbeat: the request goes on
                self._pulls[token] = pull
                return
            pull.status = status or "?"
            if not pull.done.done():
                pull.done.set_result(None)
            return
        waiter = self._pub_acks.pop(token, None)
        if waiter is not None and not waiter.done():
            headers = msg.headers
            if headers and headers.get(codec.STATUS) == "503":
                waiter.set_exception(nats_errors.NoRespondersError())
            else:
                waiter.set_result(msg.data)

    async def _late(self, msg: Msg) -> None:
        if self._closed and self._client is not None:
            try:
                await self._client.publish(msg.reply, codec.NAK)
            except nats_errors.Error:
                pass

    # -- topics ----------------------------------------------------------------------

    async def _ensure(self, state: _TopicState) -> None:
        """Create the topic's streams and consumers once per broker (idempotent)."""
        ensured = state.ensured
        if ensured is None or (ensured.done() and ensured.exception() is not None):
            ensured = state.ensured = asyncio.ensure_future(self._create(state))
            # Its caller may be cancelled before it ends: the error is still seen here.
            ensured.add_done_callback(_seen)
        await asyncio.shield(ensured)

    async def _create(self, state: _TopicState) -> None:
        js = self._nc.jetstream(timeout=self._request_timeout)
        with self._translated("create stream", state.topic):
            await js.add_stream(
                StreamConfig(
                    name=state.stream,
                    subjects=[state.subject, state.delayed_subject],
                    retention=RetentionPolicy.WORK_QUEUE,
                    storage=self._storage,
                    num_replicas=self._replicas,
                    # Publishes carry no Nats-Msg-Id: keep the dedupe window small.
                    duplicate_window=1.0,
                )
            )
            await js.add_stream(
                StreamConfig(
                    name=state.dead_stream,
                    subjects=[state.dead_subject],
                    storage=self._storage,
                    num_replicas=self._replicas,
                    duplicate_window=1.0,
                )
            )
            for name, subject in (
                (self._durable, state.subject),
                (state.delayed_consumer, state.delayed_subject),
            ):
                await js.add_consumer(
                    state.stream,
                    ConsumerConfig(
                        durable_name=name,
                        filter_subject=subject,
                        deliver_policy=DeliverPolicy.ALL,
                        ack_policy=AckPolicy.EXPLICIT,
                        ack_wait=self._max_lease,
                        # No server cap: MaxDeliver would only park a message for good
                        # (it does not dead-letter); max_deliveries does that here.
                        max_deliver=-1,
                        max_ack_pending=self._max_ack_pending if name == self._durable else -1,
                        max_waiting=4096,
                    ),
                )

    # -- publishing ------------------------------------------------------------------

    def _check_size(self, topic: str, body: bytes, headers: dict[str, str] | None) -> None:
        size = len(body)
        if headers:
            size += 12 + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())
        if size > self._max_payload:
            raise InvalidMessage(
                f"publish({topic!r}): message of {size} bytes (body {len(body)}) exceeds the "
                f"NATS server's max_payload of {self._max_payload} bytes",
                code="message_too_large",
                context={"topic": topic, "size": size, "max_payload": self._max_payload},
            )

    async def _publish_many(
        self,
        topic: str,
        items: Sequence[tuple[str, bytes, dict[str, str] | None]],
        operation: str = "publish",
    ) -> list[int]:
        """Publish ``(subject, body, headers)`` items pipelined; their stream sequences.

        Every item goes out with a reply subject on the inbox; the JetStream acks are
        awaited per window of 2000, so one round trip covers a window.
        """
        client = self._nc
        sequences: list[int] = []
        loop = asyncio.get_running_loop()
        with self._translated(operation, topic):
            for start in range(0, len(items), _PUBLISH_WINDOW):
                waiters: list[asyncio.Future[bytes]] = []
                tokens: list[str] = []
                late: set[asyncio.Future[bytes]] = set()
                try:
                    for subject, body, headers in items[start : start + _PUBLISH_WINDOW]:
                        token = self._token()
                        waiter: asyncio.Future[bytes] = loop.create_future()
                        self._pub_acks[token] = waiter
                        waiters.append(waiter)
                        tokens.append(token)
                        await client.publish(subject, body, reply=token, headers=headers)
                    _done, late = await asyncio.wait(waiters, timeout=self._request_timeout)
                finally:
                    # Whatever ended the window (a timeout, a failed write, a cancel),
                    # no waiter stays registered.
                    for token, waiter in zip(tokens, waiters, strict=True):
                        if not waiter.done():
                            waiter.cancel()
                            self._pub_acks.pop(token, None)
                if late:
                    raise nats_errors.TimeoutError
                replies = [waiter.result() for waiter in waiters]
                for reply in replies:
                    ack = codec.pub_ack_decoder.decode(reply)
                    if ack.error is not None:
                        raise BrokerError(
                            f"nats {operation}({topic!r}) refused by JetStream: "
                            f"{ack.error.get('description', ack.error)}",
                            context={"topic": topic, "error": ack.error},
                        )
                    sequences.append(ack.seq)
        return sequences

    async def _settle(
        self, topic: str, replies: Sequence[str], payload: bytes, operation: str
    ) -> None:
        """Send ``payload`` (an ack, nak, ...) to each delivery; the last one with a reply,
        awaited: JetStream handles a consumer's acks in order, so once it answers, all
        of them took effect."""
        if not replies:
            return
        client = self._nc
        with self._translated(operation, topic):
            publish = client.publish
            for reply in replies[:-1]:
                await publish(reply, payload)
            await client.request(replies[-1], payload, timeout=self._request_timeout)

    async def _api(self, subject: str, request: dict[str, Any] | None = None) -> Any:
        """A JetStream API request (``STREAM.INFO...``) and its decoded JSON reply."""
        import msgspec

        payload = b"" if request is None else codec.json_encode(request)
        reply = await self._nc.request(f"$JS.API.{subject}", payload, timeout=self._request_timeout)
        return msgspec.json.decode(reply.data)

    @staticmethod
    def _now_ms() -> int:
        return int(time.time() * 1000)
