"""What the RabbitMQBroker operations share: options, the connection and its channels,
consumers and their buffers, local leases, settling frames, and the error choke point.

:class:`_RabbitConnection` is the base of :class:`~._broker.RabbitMQBroker`. It owns
one AMQP connection (aio-pika) with a *publish* channel in confirm mode, a *control*
channel for declarations and counts, and one *consumer* channel per fetched topic. The
hot path (deliveries, acks, publishes) talks to aiormq's channel objects under
aio-pika's, which saves aio-pika's per-message wrapper objects. The
:class:`~headrace.messaging.Broker` operations themselves live in ``_broker``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any, cast

import aio_pika
import aiormq
import aiormq.exceptions as amqp_errors
from pamqp.commands import Basic

from ...._clock import Clock, default_clock
from ...._errors import (
    BrokerConnectionError,
    BrokerError,
    ConfigurationError,
    redact,
)
from ..._broker import BrokerCapabilities, Message
from .. import check_lease, check_max_deliveries, check_topic
from .._base import ServerBroker, Translated
from .._options import check_url_type, merge_url_options
from ._codec import LIVE, SETTLED, SETTLING, _Delivery
from ._consumer import _Consumer, _wake
from ._options import split_url

__all__ = ["_Consumer", "_RabbitConnection"]

logger = logging.getLogger("headrace.messaging.rabbitmq")

_CAPABILITIES = BrokerCapabilities(
    # A hand-back republishes the message with its attempt count (see the package
    # doc): a requeue would raise the quorum queue's delivery count.
    handback_costs_attempt=False,
    counts_attempts=True,
    ordered=True,
    delayed_nack=True,
    lease_extension=True,
    persistent=True,
)

# translate_errors picks the most specific match along the raised type's MRO.
_ERRORS: dict[type[BaseException], type[BrokerError]] = {
    amqp_errors.AMQPConnectionError: BrokerConnectionError,  # lost, refused, closed
    amqp_errors.ChannelInvalidStateError: BrokerConnectionError,  # channel already gone
    ConnectionError: BrokerConnectionError,
    OSError: BrokerConnectionError,
    TimeoutError: BrokerConnectionError,
    amqp_errors.AMQPError: BrokerError,  # a refused declaration, a nacked publish...
}

# Seconds close() may spend handing back buffered messages and closing channels.
CLEANUP_TIMEOUT = 5.0
# AMQP names are short strings: at most 255 bytes.
_MAX_NAME = 255
# Before cancelling its consumers, close() waits until none had a delivery or an ack
# for _STRAY_QUIET seconds (at most _STRAY_MAX): see _release_buffers.
_STRAY_QUIET = 0.1
_STRAY_MAX = 1.0
# A delay queue is re-declared (which restarts its x-expires clock) when its last
# declaration is older than its TTL plus this many seconds (see _delay_queue).
_REDECLARE_MARGIN = 30.0


class _Translated(Translated):
    """The choke point where aio-pika/aiormq errors become headrace errors."""

    __slots__ = ()
    errors = _ERRORS
    system = "rabbitmq"

    def describe(self, error: BaseException) -> str:
        # A lost connection's error often has no text of its own.
        return super().describe(error) or "connection closed"


class _RabbitConnection(ServerBroker):
    """The state and plumbing of a :class:`~._broker.RabbitMQBroker` (its base class).

    The constructor's arguments are documented on :class:`~._broker.RabbitMQBroker`.
    """

    def __init__(
        self,
        url: str = "amqp://guest:guest@127.0.0.1:5672/",
        *,
        prefix: str = "headrace.",
        prefetch: int = 200,
        lease: float = 30.0,
        max_deliveries: int | None = 20,
        connect_timeout: float = 10.0,
        clock: Clock | None = None,
        **connect_options: Any,
    ) -> None:
        amqp_url, from_url = split_url(check_url_type(url, "RabbitMQBroker(url=...)"))
        options = merge_url_options(
            from_url,
            _RabbitConnection.__init__.__kwdefaults__,
            prefix=prefix,
            prefetch=prefetch,
            lease=lease,
            max_deliveries=max_deliveries,
        )
        prefix, prefetch = options["prefix"], options["prefetch"]
        if not isinstance(prefix, str) or len(prefix.encode()) > 100:
            raise ConfigurationError(
                f"RabbitMQBroker(prefix={prefix!r}) must be a string of at most 100 bytes",
                code="invalid_configuration",
            )
        if prefix.startswith("amq."):
            raise ConfigurationError(
                f"RabbitMQBroker(prefix={prefix!r}): names starting with 'amq.' are "
                "reserved by RabbitMQ",
                code="invalid_configuration",
            )
        if (
            isinstance(prefetch, bool)
            or not isinstance(prefetch, int)
            or not 1 <= prefetch <= 65535
        ):
            raise ConfigurationError(
                f"RabbitMQBroker(prefetch={prefetch!r}) must be an integer from 1 to 65535",
                code="invalid_configuration",
            )
        self._max_deliveries = check_max_deliveries(
            options["max_deliveries"], broker="RabbitMQBroker"
        )
        self._lease = check_lease(options["lease"], where="RabbitMQBroker(lease)")
        self._connect_timeout = check_lease(
            connect_timeout, where="RabbitMQBroker(connect_timeout)"
        )
        self._url = amqp_url
        self._shown: str = redact(url)
        self._prefix: str = prefix
        self._prefetch: int = prefetch
        self._connect_options = connect_options
        self._clock = clock if clock is not None else default_clock()
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._publisher: aiormq.abc.AbstractChannel | None = None
        self._control: aiormq.abc.AbstractChannel | None = None
        self._connect_lock = asyncio.Lock()
        self._channel_lock = asyncio.Lock()
        # One consumer per topic, made in a task of its own so that a fetch cancelled
        # while the consumer is being set up cannot leave an orphan consumer behind.
        self._consumers: dict[str, asyncio.Task[_Consumer]] = {}
        # Consumers RabbitMQ cancelled: their channels close with the broker.
        self._retired: list[_Consumer] = []
        # Queues this broker declared (names), and when each delay queue last was.
        self._declared: set[str] = set()
        self._delay_declared: dict[str, float] = {}
        self._delay_queues: dict[str, set[str]] = {}
        # When the lease keeper wakes next (clock time); a fetch with an earlier lease
        # end wakes it sooner.
        self._lease_wake = math.inf
        self._lease_changed = asyncio.Event()
        self._lease_keeper: asyncio.Task[None] | None = None
        self._connected = False
        self._closed = False
        self._close_waiters: set[asyncio.Future[None]] = set()

    # -- properties ------------------------------------------------------------------

    @property
    def capabilities(self) -> BrokerCapabilities:
        """Everything supported; hand-backs are free; attempts are counted by the
        quorum queue (plus a header across delayed retries)."""
        return _CAPABILITIES

    @property
    def prefetch(self) -> int:
        """How many unacked deliveries RabbitMQ pushes to each topic's consumer."""
        return self._prefetch

    @property
    def declared_queues(self) -> frozenset[str]:
        """Names of every queue this broker declared (for cleanup in tests and tools)."""
        return frozenset(self._declared)

    def queue_name(self, topic: str) -> str:
        """The quorum queue of ``topic``; its dead letters are in ``<name>.dead``, its
        delayed messages in ``<name>.delay.<milliseconds>``."""
        name = self._prefix + check_topic(topic)
        if len(name.encode()) > _MAX_NAME - 20:
            raise ConfigurationError(
                f"topic {topic!r} is too long for a RabbitMQ queue name "
                f"(prefix + topic must stay within {_MAX_NAME - 20} bytes)",
                code="invalid_topic",
            )
        return name

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"RabbitMQBroker(url={self._shown!r}, prefix={self._prefix!r}, {state})"

    # -- plumbing --------------------------------------------------------------------

    def _translated(self, operation: str, topic: str | None = None) -> _Translated:
        return _Translated(self._shown, operation, topic)

    @staticmethod
    def _is_open(connection: aio_pika.abc.AbstractConnection | None) -> bool:
        """``connection`` is usable: aio-pika's own flag lags behind aiormq's (it is
        set by a close callback that runs later), so look at both."""
        if connection is None or connection.is_closed:
            return False
        transport = getattr(connection, "transport", None)
        return transport is not None and not transport.connection.is_closed

    async def _ensure_connection(self) -> aio_pika.abc.AbstractConnection:
        connection = self._connection
        if self._is_open(connection):
            return connection  # type: ignore[return-value]
        async with self._connect_lock:
            self._check_open("connect")
            connection = self._connection
            if self._is_open(connection):
                return connection  # type: ignore[return-value]
            with self._translated("connect"):
                connection = cast(
                    "aio_pika.abc.AbstractConnection",
                    await aio_pika.connect(
                        self._url, timeout=self._connect_timeout, **self._connect_options
                    ),
                )
            if self._closed:  # close() ran meanwhile
                await connection.close()
                self._check_open("connect")
            self._connection = connection
            self._publisher = self._control = None
            self._connected = True
            if self._lease_keeper is None:
                self._lease_keeper = asyncio.create_task(
                    self._keep_leases(), name="headrace-rabbitmq-leases"
                )
            return connection

    async def _open_channel(self, *, confirms: bool) -> aiormq.abc.AbstractChannel:
        connection = await self._ensure_connection()
        channel = await connection.channel(publisher_confirms=confirms, on_return_raises=confirms)
        return await channel.get_underlay_channel()

    async def _publish_channel(self) -> aiormq.abc.AbstractChannel:
        channel = self._publisher
        if channel is None or channel.is_closed:
            async with self._channel_lock:
                channel = self._publisher
                if channel is None or channel.is_closed:
                    channel = self._publisher = await self._open_channel(confirms=True)
        return channel

    async def _control_channel(self) -> aiormq.abc.AbstractChannel:
        channel = self._control
        if channel is None or channel.is_closed:
            async with self._channel_lock:
                channel = self._control
                if channel is None or channel.is_closed:
                    channel = self._control = await self._open_channel(confirms=False)
        return channel

    # -- queues ----------------------------------------------------------------------

    async def _declare(self, name: str, arguments: dict[str, Any]) -> None:
        channel = await self._control_channel()
        await channel.queue_declare(name, durable=True, arguments=arguments)
        self._declared.add(name)

    async def _topic_queue(self, topic: str) -> str:
        """Declare ``topic``'s quorum queue (once per broker); return its name.

        Its dead-letter target is the topic's dead-letter queue, so that whatever
        RabbitMQ dead-letters by itself (RabbitMQ 4's default delivery limit, a policy)
        lands there too; the arguments must be the same for every declarer."""
        name = self.queue_name(topic)
        if name not in self._declared:
            await self._declare(
                name,
                {
                    "x-queue-type": "quorum",
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": name + ".dead",
                },
            )
        return name

    async def _dead_queue(self, topic: str) -> str:
        """Declare ``topic``'s dead-letter queue (a classic queue: it is read by taking
        every message and putting it back, which keeps its order and counts nothing)."""
        name = self.queue_name(topic) + ".dead"
        if name not in self._declared:
            await self._declare(name, {"x-queue-type": "classic"})
        return name

    async def _delay_queue(self, topic: str, milliseconds: int) -> str:
        """Declare the delay queue of ``topic`` for ``milliseconds`` (see the package doc).

        Every message in it waits the queue's TTL and is then dead-lettered back to the
        topic's queue. It deletes itself after ``x-expires`` without a declaration, which
        is why a publish re-declares it once its last declaration is older than its TTL
        plus a margin: nothing in it can then outlive the queue."""
        main = self.queue_name(topic)
        name = f"{main}.delay.{milliseconds}"
        now = self._clock.now()
        last = self._delay_declared.get(name)
        if last is None or now - last > milliseconds / 1000 + _REDECLARE_MARGIN:
            await self._declare(
                name,
                {
                    "x-queue-type": "classic",
                    "x-message-ttl": milliseconds,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": main,
                    "x-expires": 2 * milliseconds + math.ceil(2_000 * _REDECLARE_MARGIN),
                },
            )
            self._delay_declared[name] = now
            self._delay_queues.setdefault(topic, set()).add(name)
        return name

    async def _count(self, name: str) -> int | None:
        """Ready messages in queue ``name``; ``None`` if there is no such queue."""
        channel = await self._control_channel()
        try:
            result = await channel.queue_declare(name, passive=True)
        except amqp_errors.ChannelNotFoundEntity:
            # The 404 closed the control channel; the next call opens another.
            return None
        return int(result.message_count or 0)

    # -- consumers -------------------------------------------------------------------

    async def _consumer(self, topic: str) -> _Consumer:
        task = self._consumers.get(topic)
        if task is not None and task.done() and not self._usable(task):
            task = None
        if task is None:
            task = asyncio.create_task(self._start_consumer(topic), name=f"consume:{topic}")
            self._consumers[topic] = task
        # Shielded: a fetch cancelled meanwhile leaves the consumer to the next fetch.
        return await asyncio.shield(task)

    async def _start_consumer(self, topic: str) -> _Consumer:
        with self._translated("consume", topic):
            queue = await self._topic_queue(topic)
            raw = await self._open_channel(confirms=False)
            consumer = _Consumer(topic, queue, raw, self._clock)
            try:
                await raw.basic_qos(prefetch_count=self._prefetch)
                ok = await raw.basic_consume(queue, consumer.on_message)
            except BaseException:
                await raw.close()
                raise
            consumer.tag = ok.consumer_tag or ""
            raw.closing.add_done_callback(consumer.on_closed)
            raw.on_consumer_cancel_callbacks.add(consumer.on_cancel)
            return consumer

    @staticmethod
    def _usable(task: asyncio.Task[_Consumer]) -> bool:
        """``task`` (done) made a consumer that is still alive."""
        if task.cancelled() or task.exception() is not None:
            return False
        consumer = task.result()
        return consumer.alive and not consumer.cancelled

    def _retire(self, consumer: _Consumer) -> None:
        """Forget a consumer RabbitMQ cancelled; its channel closes with the broker, and
        the topic's queue is declared again by the next fetch or publish."""
        task = self._consumers.get(consumer.topic)
        if task is not None and task.done() and not self._usable(task):
            del self._consumers[consumer.topic]
        self._declared.discard(consumer.queue)
        self._retired.append(consumer)

    def _current_consumer(self, topic: str) -> _Consumer | None:
        """``topic``'s consumer if it is running (no I/O)."""
        task = self._consumers.get(topic)
        if task is None or not task.done() or not self._usable(task):
            return None
        return task.result()

    # -- settling --------------------------------------------------------------------

    async def _settle(
        self, consumer: _Consumer, deliveries: Iterable[_Delivery], *, requeue: bool | None
    ) -> None:
        """Ack (``requeue=None``) or nack (with ``requeue``) deliveries of ``consumer``.

        The longest run of tags at the front of the channel's outstanding deliveries
        that this call settles goes out as one frame with ``multiple=True`` (what a
        hand-written consumer sends); the others one frame each. The last frame is
        awaited until written to the socket, so the ack is on its way when this returns.
        """
        async with consumer.lock:
            outstanding = consumer.outstanding
            tags: set[int] = set()
            for delivery in deliveries:
                if delivery.state == SETTLED or delivery.consumer is not consumer:
                    continue
                delivery.state = SETTLED
                if outstanding.pop(delivery.tag, None) is not None:
                    tags.add(delivery.tag)
            if not tags or not consumer.alive:
                return
            consumer.last_activity = self._clock.now()
            order = consumer.order
            top = 0
            while order and order[0] not in outstanding:
                tag = order.popleft()
                if tag in tags:
                    top = tag
            singles = sorted(tag for tag in tags if tag > top)
            raw = consumer.raw
            frames: list[tuple[int, bool]] = ([(top, True)] if top else []) + [
                (tag, False) for tag in singles
            ]
            last = len(frames) - 1
            for index, (tag, multiple) in enumerate(frames):
                if requeue is None:
                    await raw.basic_ack(tag, multiple=multiple, wait=index == last)
                else:
                    await raw.basic_nack(
                        tag, multiple=multiple, requeue=requeue, wait=index == last
                    )

    async def _settle_messages(self, messages: Sequence[Message], *, requeue: bool | None) -> None:
        by_consumer: dict[int, tuple[_Consumer, list[_Delivery]]] = {}
        for message in messages:
            delivery: _Delivery = message.receipt
            entry = by_consumer.get(id(delivery.consumer))
            if entry is None:
                by_consumer[id(delivery.consumer)] = (delivery.consumer, [delivery])
            else:
                entry[1].append(delivery)
        for consumer, deliveries in by_consumer.values():
            await self._settle(consumer, deliveries, requeue=requeue)

    async def _publish_raw(self, items: Sequence[tuple[str, bytes, Basic.Properties]]) -> None:
        """Publish ``(queue, body, properties)`` items through the default exchange and
        wait for every confirmation (all in flight at once, in chunks of 1000).

        ``mandatory``: a message no queue took (its queue was deleted) comes back as an
        error instead of vanishing."""
        channel = await self._publish_channel()
        for start in range(0, len(items), 1000):
            chunk = items[start : start + 1000]
            try:
                confirmations = await asyncio.gather(
                    *(
                        channel.basic_publish(
                            body, routing_key=queue, properties=properties, mandatory=True
                        )
                        for queue, body, properties in chunk
                    )
                )
            except amqp_errors.DeliveryError:
                # Returned: a queue is gone (deleted behind our back). Declare it again
                # next time rather than fail every publish until a restart.
                for queue, _, _ in chunk:
                    self._declared.discard(queue)
                    self._delay_declared.pop(queue, None)
                raise
            for confirmation in confirmations:
                if not isinstance(confirmation, Basic.Ack):
                    raise BrokerError(
                        f"RabbitMQ did not confirm a publish on {self._shown} "
                        f"({type(confirmation).__name__})",
                        code="publish_not_confirmed",
                    )

    async def _copy_then_ack(
        self,
        operation: str,
        messages: Sequence[Message],
        target: Any,
    ) -> None:
        """Publish a copy of each still-live message (``target(message)`` gives its queue
        and properties), then ack the originals: how a delivery moves to another queue.

        While it runs the deliveries are ``SETTLING``: nothing else touches them. If the
        copies could not be confirmed, the originals stay leased (they come back when the
        lease ends); if the channel died after the copies went out, RabbitMQ returns the
        originals too, and the message is delivered twice (at least once)."""
        live = [message for message in messages if message.receipt.live]
        if not live:
            return
        for message in live:
            message.receipt.state = SETTLING
        try:
            items: list[tuple[str, bytes, Basic.Properties]] = []
            for message in live:
                queue, properties = await target(message)
                items.append((queue, message.body, properties))
            with self._translated(operation, live[0].topic):
                await self._publish_raw(items)
        except BaseException:
            for message in live:
                if message.receipt.state == SETTLING:
                    message.receipt.state = LIVE
            raise
        # Still SETTLING (no one else touches them): _settle makes them SETTLED.
        with self._translated(operation, live[0].topic):
            await self._settle_messages(live, requeue=None)

    # -- leases ----------------------------------------------------------------------

    def _lease_out(self, messages: list[Message], lease: float) -> None:
        until = self._clock.now() + lease
        for message in messages:
            message.receipt.lease_until = until
        if until < self._lease_wake:
            self._lease_wake = until
            self._lease_changed.set()

    def _expired(self, now: float) -> tuple[list[tuple[_Consumer, list[_Delivery]]], float]:
        """The live deliveries whose lease ended by ``now``, per consumer, and the end
        of the earliest lease still running. A scan of the outstanding deliveries: at
        most ``prefetch`` per topic, and a heap of leases would keep every settled
        delivery alive until its lease would have ended."""
        expired: list[tuple[_Consumer, list[_Delivery]]] = []
        earliest = math.inf
        for topic in self._consumers:
            consumer = self._current_consumer(topic)
            if consumer is None:
                continue
            due: list[_Delivery] = []
            for delivery in consumer.outstanding.values():
                if delivery.state != LIVE:
                    continue
                until = delivery.lease_until
                if until <= now:
                    due.append(delivery)
                elif until < earliest:
                    earliest = until
            if due:
                expired.append((consumer, due))
        return expired, earliest

    async def _keep_leases(self) -> None:
        """Requeue deliveries whose lease ended (counts an attempt, as an expiry does
        elsewhere); runs from the first connection until close."""
        clock = self._clock
        changed = self._lease_changed
        while True:
            expired, self._lease_wake = self._expired(clock.now())
            for consumer, deliveries in expired:
                try:
                    await self._settle(consumer, deliveries, requeue=True)
                except Exception as exc:
                    # The channel is gone (RabbitMQ returned them anyway), or broken
                    # (closing it returns them): either way they are not lost.
                    logger.warning("requeueing %d expired leases failed: %s", len(deliveries), exc)
            wake = self._lease_wake
            changed.clear()
            handle = clock.call_at(wake, changed.set) if math.isfinite(wake) else None
            try:
                await changed.wait()
            finally:
                if handle is not None:
                    handle.cancel()

    # -- connect and close -----------------------------------------------------------

    async def connect(self) -> None:
        """Open the connection (idempotent). Refuses a closed broker."""
        self._check_open("connect")
        await self._ensure_connection()

    async def close(self) -> None:
        """Hand back buffered messages, close the channels and the connection
        (idempotent).

        Acks already returned are on the wire before the channels close (RabbitMQ
        applies a channel's frames in order). Messages fetched and neither acked nor
        handed back go back to their queue when their channel closes, as after a crash,
        with the attempt counted. A ``fetch`` waiting meanwhile raises
        :class:`~headrace.ClosedResourceError`.
        """
        if self._closed:
            return
        self._closed = True
        for waiter in self._close_waiters:
            _wake(waiter)
        keeper, self._lease_keeper = self._lease_keeper, None
        if keeper is not None:
            keeper.cancel()
            await asyncio.wait({keeper})
        tasks = list(self._consumers.values())
        self._consumers.clear()
        consumers: list[_Consumer] = []
        for task in tasks:
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
            if not task.cancelled() and task.exception() is None:
                consumers.append(task.result())
        for consumer in consumers:
            consumer.wake()
        connection = self._connection
        if connection is None:
            return
        try:
            if self._is_open(connection):
                async with asyncio.timeout(CLEANUP_TIMEOUT):
                    await self._release_buffers(consumers)
                    for consumer in [*consumers, *self._retired]:
                        if not consumer.raw.is_closed:
                            await consumer.raw.close()
        except Exception as exc:
            # Best effort: whatever was not handed back returns when the connection
            # closes (with a delivery counted).
            logger.warning("handing back buffered messages on close failed: %s", exc)
        finally:
            self._connection = None
            with self._translated("close"):
                await connection.close()

    async def _release_buffers(self, consumers: list[_Consumer]) -> None:
        """Stop the consumers, then hand back (free of an attempt) what they had buffered
        and no fetch took: closing the channel would count a delivery for each.

        A quorum queue refills the prefetch window as acks arrive. A refill that races
        the cancel is lost to the client: RabbitMQ 3.10 keeps those deliveries on the
        channel without sending them (measured: 200 acked and cancelled at once, all
        200 refills came back from the closed channel with a delivery counted, none
        reached aiormq). So close first waits until the consumers are quiet (no
        delivery or ack for ``_STRAY_QUIET`` seconds, or a full window; at most
        ``_STRAY_MAX``), then cancels without waiting for the answer, keeps the
        callback registered for anything still on its way (aiormq forgets a cancelled
        consumer and drops its deliveries), and hands back the buffers."""
        clock = self._clock
        give_up = clock.now() + _STRAY_MAX
        waiting = [consumer for consumer in consumers if consumer.alive]
        while waiting and clock.now() < give_up:
            waiting = [
                consumer
                for consumer in waiting
                if consumer.alive
                and len(consumer.outstanding) < self._prefetch
                and clock.now() - consumer.last_activity < _STRAY_QUIET
            ]
            if waiting:
                await asyncio.sleep(_STRAY_QUIET / 4)
        for consumer in consumers:
            raw = consumer.raw
            if consumer.alive and not raw.is_closed:
                await raw.basic_cancel(consumer.tag, nowait=True)
                raw.consumers[consumer.tag] = consumer.on_message  # type: ignore[attr-defined]
        await asyncio.sleep(0)
        for consumer in consumers:
            buffered = list(consumer.buffer)
            consumer.buffer.clear()
            if buffered and consumer.alive:
                await self._hand_back_now(buffered)

    async def _hand_back_now(self, messages: Sequence[Message]) -> None:
        raise NotImplementedError  # _broker.RabbitMQBroker
