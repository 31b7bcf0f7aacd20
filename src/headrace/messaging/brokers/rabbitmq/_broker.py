"""RabbitMQBroker: the Broker operations on RabbitMQ quorum queues (see the package doc).

Publish (confirmed, all in flight at once), fetch from the topic consumer's buffer,
and settling: ack and nack as delivery-tag frames (``multiple=True`` where the tags
allow), hand-back, delayed nack and dead-lettering as a confirmed copy plus an ack,
lease extension (local), dead letters and their replay.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import aiormq
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from ...._errors import BrokerError, ConfigurationError
from ..._broker import DeadLetter, Message, OutgoingMessage, TopicStats
from .. import (
    check_dead_letters_limit,
    check_error_record,
    check_fetch_arguments,
    check_lease,
    check_nack_delay,
    check_outgoing,
    check_topic,
    max_deliveries_record,
)
from ._codec import (
    _Delivery,
    copy_properties,
    dead_letter_of,
    dead_letter_properties,
    new_properties,
)
from ._connection import _RabbitConnection
from ._consumer import _Consumer, _wake

__all__ = ["RabbitMQBroker", "delay_level"]

# Below this many milliseconds a delay queue per millisecond; above, a grid with 8
# steps per doubling (a delay is rounded up by at most 9 %).
_EXACT_BELOW_MS = 16
_STEPS_PER_DOUBLING = 8


# How long a fetch with a shorter timeout waits for messages the queue counts as ready
# when its consumer's buffer is empty (seconds).
_IN_TRANSIT_GRACE = 0.25


def delay_level(seconds: float) -> int:
    """The delay queue (its TTL in milliseconds) for a delay of ``seconds``: the smallest
    grid value not below it, so a message is never delivered early."""
    milliseconds = max(1, math.ceil(seconds * 1000))
    if milliseconds <= _EXACT_BELOW_MS:
        return milliseconds
    step = math.ceil(_STEPS_PER_DOUBLING * math.log2(milliseconds))
    level = math.ceil(2 ** (step / _STEPS_PER_DOUBLING))
    while level < milliseconds:  # float rounding at an exact power
        step += 1
        level = math.ceil(2 ** (step / _STEPS_PER_DOUBLING))
    return level


def _check_receipts(messages: Sequence[Message]) -> None:
    for message in messages:
        if not isinstance(message.receipt, _Delivery):
            raise ConfigurationError(
                f"message {message.id!r} of topic {message.topic!r} was not fetched from "
                "a RabbitMQBroker (it has no delivery receipt)",
                code="invalid_message_receipt",
            )


class RabbitMQBroker(_RabbitConnection):
    """A :class:`~headrace.messaging.Broker` on RabbitMQ quorum queues (AMQP 0-9-1).

    ``url`` is an aio-pika URL (``amqp://user:password@host:5672/vhost``, ``amqps://``)
    whose query may also set this class's options (``?prefetch=50&prefix=billing.``);
    keyword arguments win over the URL. ``prefix`` (default ``"headrace."``) is
    prepended to topic names to make queue names. ``prefetch`` (default 200) is how
    many unacked deliveries RabbitMQ pushes to this process per topic: the consumer's
    local buffer, which ``fetch`` takes from; lower it (to the handler's concurrency)
    when handlers are slow and other processes should share the work. ``lease``
    (default 30 s) is the default of ``fetch(lease=...)``: a delivery neither acked nor
    extended by then is requeued by this process (RabbitMQ itself would hold it until
    the channel closes). ``max_deliveries`` (default 20, ``None``: no cap)
    dead-letters a message delivered more often than that. ``connect_timeout``
    (seconds, default 10); other keyword arguments go to ``aio_pika.connect``.
    ``clock`` paces leases and fetch timeouts.

    Measured here (``benchmarks/worker_rabbitmq.py``, 50k messages, no-op handler): the
    worker at concurrency 16 on this broker ran at 1.41x a hand-written aio-pika loop
    (prefetch 100 + multiple-ack) and 4.3x a FastStream subscriber.

    Safe to share between the tasks of one event loop (fetch, ack and publish may run
    concurrently); one instance per process.

    Example::

        async with RabbitMQBroker("amqp://guest:guest@localhost/") as broker:
            await broker.publish("jobs", [OutgoingMessage(b"hello")])
            for message in await broker.fetch("jobs", 100, timeout=5.0, lease=30.0):
                ...
                await broker.ack([message])
    """

    # -- publish ---------------------------------------------------------------------

    async def publish(self, topic: str, messages: Sequence[OutgoingMessage]) -> list[str]:
        """Publish ``messages`` to ``topic``'s queue, persistent and confirmed; return
        their ids (random hex) in order.

        All are in flight at once (chunks of 1000) and confirmed before this returns. A
        message with ``delay`` goes to the topic's delay queue for that delay (rounded up
        by at most 9 %), which dead-letters it back to the topic's queue when due.
        """
        self._check_open("publish")
        check_topic(topic)
        outgoing = check_outgoing(topic, messages)
        if not outgoing:
            return []
        ids: list[str] = []
        items: list[tuple[str, bytes, Basic.Properties]] = []
        with self._translated("publish", topic):
            queue = await self._topic_queue(topic)
            for message in outgoing:
                message_id = uuid.uuid4().hex
                ids.append(message_id)
                target = queue
                if message.delay > 0:
                    target = await self._delay_queue(topic, delay_level(message.delay))
                items.append(
                    (target, message.body, new_properties(message_id, message.headers, message.key))
                )
            await self._publish_raw(items)
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
        seconds for the first; this process requeues each one ``lease`` seconds from now
        unless it was settled or extended by then (default: the broker's ``lease``).

        Takes from the topic consumer's buffer (started on the first fetch of a topic),
        so it costs no round trip while messages flow. A fetch with a timeout under
        0.25 s that finds the buffer empty asks RabbitMQ whether messages are ready and,
        if so, waits up to 0.25 s for them: they are deliverable, only not here yet
        (``timeout=0`` would otherwise miss every message a new consumer is about to
        get). At most ``prefetch`` messages are leased at a time. Cancel-safe: a fetch cancelled
        after it took messages puts them back in the buffer, in order and uncharged.
        A consumer whose channel died raises :class:`~headrace.BrokerConnectionError`;
        the next fetch starts a new one (connecting again if needed).
        """
        self._check_open("fetch")
        check_topic(topic)
        lease = self._lease if lease is None else lease
        check_fetch_arguments(max_messages, timeout, lease)
        consumer = await self._consumer(topic)
        clock = self._clock
        deadline = clock.now() + timeout
        if (
            timeout < _IN_TRANSIT_GRACE
            and not consumer.buffer
            and len(consumer.outstanding) < self._prefetch
        ):
            # A short fetch on an empty buffer: messages RabbitMQ counts as ready are
            # deliverable now, on their way to a consumer with room (a fresh consumer
            # has had none delivered yet). Wait a little for them rather than answer
            # "nothing" (one round trip to ask).
            with self._translated("fetch", topic):
                ready = await self._count(consumer.queue)
            if ready:
                deadline = max(deadline, clock.now() + _IN_TRANSIT_GRACE)
        waited = False
        while True:
            if consumer.buffer:
                if waited:
                    # Woken by the first delivery of a burst: let the rest of what
                    # already arrived reach the buffer, to hand out one batch.
                    await asyncio.sleep(0)
                taken = self._take(consumer, max_messages)
                kept = await self._over_the_cap(consumer, taken)
                if kept:
                    self._lease_out(kept, float(lease))
                    return kept
                continue
            self._check_open("fetch")
            if not consumer.alive:
                self._raise_dead(consumer)
            if consumer.cancelled:
                self._retire(consumer)
                raise BrokerError(
                    f"RabbitMQ cancelled the consumer of topic {topic!r} on {self._shown} "
                    f"(was queue {consumer.queue!r} deleted?); the next fetch starts another",
                    code="consumer_cancelled",
                    context={"topic": topic, "queue": consumer.queue},
                )
            now = clock.now()
            if now >= deadline:
                return []
            await self._wait(consumer, deadline)
            waited = True

    @staticmethod
    def _take(consumer: _Consumer, limit: int) -> list[Message]:
        buffer = consumer.buffer
        if len(buffer) <= limit:
            taken = list(buffer)
            buffer.clear()
            return taken
        return [buffer.popleft() for _ in range(limit)]

    async def _over_the_cap(self, consumer: _Consumer, taken: list[Message]) -> list[Message]:
        """Dead-letter the messages delivered more than ``max_deliveries`` times; return
        the rest (put back in the buffer if the caller is cancelled meanwhile)."""
        cap = self._max_deliveries
        if cap is None or all(message.attempt <= cap for message in taken):
            return taken
        kept = [message for message in taken if message.attempt <= cap]
        try:
            for message in taken:
                if message.attempt > cap:
                    record = max_deliveries_record(
                        message.topic, message.id, message.attempt - 1, cap
                    )
                    await self._move_to_dead(message, check_error_record(record))
        except BaseException:
            consumer.buffer.extendleft(reversed(kept))
            raise
        return kept

    async def _wait(self, consumer: _Consumer, deadline: float) -> None:
        """Wait for a delivery, the deadline, the consumer's death or the broker's close."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        consumer.waiters.add(waiter)
        self._close_waiters.add(waiter)
        # fetch(timeout=inf) waits for a delivery only.
        handle = (
            self._clock.call_at(deadline, lambda: _wake(waiter))
            if math.isfinite(deadline)
            else None
        )
        try:
            await waiter
        finally:
            if handle is not None:
                handle.cancel()
            consumer.waiters.discard(waiter)
            self._close_waiters.discard(waiter)

    def _raise_dead(self, consumer: _Consumer) -> None:
        error = consumer.error
        with self._translated("fetch", consumer.topic):
            if isinstance(error, Exception):
                raise error
            raise aiormq.exceptions.ChannelInvalidStateError("the consumer's channel closed")

    # -- settle ----------------------------------------------------------------------

    async def ack(self, messages: Sequence[Message]) -> None:
        """Remove handled messages for good: one ``basic.ack`` with ``multiple=True`` for
        the longest run of deliveries at the front of the channel, one frame per other
        message; returns once the frames are written.

        A message whose lease ran out (this process requeued it) or whose channel died
        (RabbitMQ put it back) cannot be acked any more: it is delivered again, and the
        ack does nothing (as the contract allows for expired leases)."""
        self._check_open("ack")
        _check_receipts(messages)
        if not messages:
            return
        with self._translated("ack", messages[0].topic):
            await self._settle_messages(messages, requeue=None)

    async def nack(self, messages: Sequence[Message], *, delay: float = 0.0) -> None:
        """Return messages for a retry after ``delay`` seconds; counts an attempt.

        ``delay=0``: ``basic.nack`` with requeue (the quorum queue counts the delivery
        and puts the message at the back). ``delay>0``: a confirmed copy to the topic's
        delay queue for that delay (rounded up by at most 9 %), carrying the attempt
        count, then an ack. Messages no longer held by this delivery are left alone.
        """
        self._check_open("nack")
        check_nack_delay(delay)
        _check_receipts(messages)
        if not messages:
            return
        if delay == 0:
            with self._translated("nack", messages[0].topic):
                await self._settle_messages(messages, requeue=True)
            return
        level = delay_level(delay)

        async def target(message: Message) -> tuple[str, Basic.Properties]:
            queue = await self._delay_queue(message.topic, level)
            return queue, copy_properties(message.receipt.properties, attempts=message.attempt)

        await self._copy_then_ack("nack", messages, target)

    async def hand_back(self, messages: Sequence[Message]) -> None:
        """Return fetched-but-unhandled messages at once, without counting an attempt:
        a confirmed copy (same id, attempt count in a header) goes to the back of the
        queue, then the original is acked. A requeue would be one frame, but a quorum
        queue counts it as a delivery."""
        self._check_open("hand_back")
        _check_receipts(messages)
        await self._hand_back_now(messages)

    async def _hand_back_now(self, messages: Sequence[Message]) -> None:
        async def target(message: Message) -> tuple[str, Basic.Properties]:
            queue = await self._topic_queue(message.topic)
            return queue, copy_properties(message.receipt.properties, attempts=message.attempt - 1)

        await self._copy_then_ack("hand_back", messages, target)

    async def extend_lease(self, messages: Sequence[Message], lease: float) -> None:
        """Keep this process from requeueing messages still held by this delivery for
        ``lease`` seconds from now (local: RabbitMQ has no lease to extend)."""
        self._check_open("extend_lease")
        until = self._clock.now() + check_lease(lease, where="extend_lease(lease)")
        _check_receipts(messages)
        for message in messages:
            delivery: _Delivery = message.receipt
            if delivery.live:
                delivery.lease_until = until

    async def dead_letter(self, message: Message, error: Mapping[str, Any]) -> None:
        """Move ``message`` to its topic's dead-letter queue with ``error`` (JSON, in a
        header): a confirmed copy, then an ack. A message no longer held by this
        delivery is not stored."""
        self._check_open("dead_letter")
        encoded = check_error_record(error)
        _check_receipts([message])
        await self._move_to_dead(message, encoded)

    async def _move_to_dead(self, message: Message, encoded: bytes) -> None:
        async def target(message: Message) -> tuple[str, Basic.Properties]:
            queue = await self._dead_queue(message.topic)
            return queue, dead_letter_properties(
                message.receipt.properties, message.attempt, encoded
            )

        await self._copy_then_ack("dead_letter", [message], target)

    # -- dead letters ----------------------------------------------------------------

    async def _read_dead(
        self, topic: str
    ) -> tuple[aiormq.abc.AbstractChannel | None, list[DeliveredMessage]]:
        """Take every message of the topic's dead-letter queue on a channel of its own
        (``basic.get`` without ack). Closing that channel puts back what was not acked,
        in its old place: RabbitMQ queues cannot be read without taking."""
        queue = self.queue_name(topic) + ".dead"
        if await self._count(queue) is None:
            return None, []
        channel = await self._open_channel(confirms=False)
        taken: list[DeliveredMessage] = []
        try:
            while True:
                delivered = await channel.basic_get(queue, no_ack=False)
                if not isinstance(delivered.delivery, Basic.GetOk):
                    break
                taken.append(delivered)
        except BaseException:
            await channel.close()
            raise
        return channel, taken

    async def dead_letters(self, topic: str, *, limit: int = 100) -> list[DeadLetter]:
        """The newest ``limit`` dead letters of ``topic``, newest first.

        Reads the whole dead-letter queue (and puts it back): fine for the thousands of
        messages a dead-letter queue should hold. ``dead_lettered_at`` is Unix time in
        seconds (the dead-lettering process's clock; RabbitMQ's for messages it
        dead-lettered itself)."""
        self._check_open("dead_letters")
        check_topic(topic)
        check_dead_letters_limit(limit)
        with self._translated("dead_letters", topic):
            channel, taken = await self._read_dead(topic)
            if channel is not None:
                await channel.close()
        letters = [
            dead_letter_of(topic, delivered.body, delivered.header.properties)
            for delivered in taken
        ]
        order = sorted(
            range(len(letters)),
            key=lambda index: (letters[index].dead_lettered_at, index),
            reverse=True,
        )
        return [letters[index] for index in order[:limit]]

    async def replay_dead_letters(self, topic: str, ids: Sequence[str] | None = None) -> int:
        """Publish dead letters of ``topic`` again as fresh messages (attempt 1, same id,
        body, key and headers): all of them, or those whose message id is in ``ids``;
        return how many. Each copy is confirmed before its dead letter is acked."""
        self._check_open("replay_dead_letters")
        check_topic(topic)
        wanted = None if ids is None else set(ids)
        with self._translated("replay_dead_letters", topic):
            channel, taken = await self._read_dead(topic)
            if channel is None:
                return 0
            try:
                chosen = [
                    delivered
                    for delivered in taken
                    if wanted is None or delivered.header.properties.message_id in wanted
                ]
                if chosen:
                    queue = await self._topic_queue(topic)
                    await self._publish_raw(
                        [
                            (
                                queue,
                                delivered.body,
                                copy_properties(delivered.header.properties, attempts=0),
                            )
                            for delivered in chosen
                        ]
                    )
                    for delivered in chosen:
                        await channel.basic_ack(
                            delivered.delivery.delivery_tag,  # type: ignore[union-attr,arg-type]
                            wait=False,
                        )
            finally:
                await channel.close()
        return len(chosen)

    async def topic_stats(self, topic: str) -> TopicStats:
        """Counts of the topic's ready, delayed, in-flight and dead-lettered messages.

        ``ready``: the queue's ready messages plus those in this process's buffer;
        ``in_flight``: deliveries this process leased (AMQP tells no unacked counts
        without the management plugin: other processes' leases and buffers count
        nowhere); ``delayed``: the delay queues this process declared since it started.
        """
        self._check_open("topic_stats")
        check_topic(topic)
        consumer = self._current_consumer(topic)
        with self._translated("topic_stats", topic):
            ready = await self._count(self.queue_name(topic)) or 0
            delayed = 0
            for name in sorted(self._delay_queues.get(topic, ())):
                delayed += await self._count(name) or 0
            dead = await self._count(self.queue_name(topic) + ".dead") or 0
        buffered = len(consumer.buffer) if consumer is not None else 0
        leased = consumer.leased if consumer is not None else 0
        return TopicStats(
            topic, ready=ready + buffered, delayed=delayed, in_flight=leased, dead_letters=dead
        )
