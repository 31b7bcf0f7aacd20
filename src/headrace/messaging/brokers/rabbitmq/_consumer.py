"""A topic's consumer: a channel with a prefetch window feeding a local buffer.

RabbitMQ pushes deliveries; :class:`_Consumer` keeps them in delivery order, knows
every outstanding delivery tag of its channel (for ``multiple=True`` acks, and for the
broker's lease keeper to find expired leases), and turns the channel's close into
stale receipts and woken fetches.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import aiormq
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from ...._clock import Clock
from ..._broker import Message
from ._codec import SETTLED, _Delivery, message_of

__all__ = ["_Consumer", "_wake"]


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Consumer:
    """One topic's consumer: a channel with a prefetch window feeding a local buffer.

    RabbitMQ pushes up to ``prefetch`` unacked deliveries; each lands in ``buffer``
    (ready for the next ``fetch``) and in ``outstanding`` (every delivery of this
    channel not yet acked or nacked, by tag). ``order`` holds the tags in delivery
    order, so that an ack can use ``multiple=True`` for the longest run of settled
    tags at the front. When the channel closes (a lost connection, a server error, the
    broker's close), RabbitMQ puts every outstanding delivery back: the consumer is
    dead, and its receipts are stale.
    """

    __slots__ = (
        "alive",
        "buffer",
        "cancelled",
        "clock",
        "error",
        "last_activity",
        "lock",
        "order",
        "outstanding",
        "queue",
        "raw",
        "tag",
        "topic",
        "waiters",
    )

    def __init__(
        self, topic: str, queue: str, raw: aiormq.abc.AbstractChannel, clock: Clock
    ) -> None:
        self.topic = topic
        self.clock = clock
        # When a delivery arrived or an ack went out last (clock time).
        self.last_activity = clock.now()
        self.queue = queue
        self.raw = raw
        self.tag = ""
        self.alive = True
        # RabbitMQ cancelled the consumer (its queue was deleted): no more deliveries,
        # though the channel and what it delivered stay valid.
        self.cancelled = False
        self.error: BaseException | None = None
        self.buffer: deque[Message] = deque()
        self.outstanding: dict[int, _Delivery] = {}
        self.order: deque[int] = deque()
        self.waiters: set[asyncio.Future[None]] = set()
        # Settling frames are written under it, so that the multiple-ack bookkeeping
        # and the order of the frames on the wire agree.
        self.lock = asyncio.Lock()

    async def on_message(self, delivered: DeliveredMessage) -> None:
        """aiormq's consumer callback (it runs in a task of aiormq's per delivery,
        in delivery order; never awaits, so the buffer keeps that order)."""
        if not self.alive:
            return
        tag: int = delivered.delivery.delivery_tag  # type: ignore[union-attr,assignment]
        properties: Basic.Properties = delivered.header.properties
        receipt = _Delivery(self, tag, properties)
        self.outstanding[tag] = receipt
        self.order.append(tag)
        self.buffer.append(message_of(self.topic, delivered.body, properties, receipt))
        self.last_activity = self.clock.now()
        if self.waiters:
            self.wake()

    def on_closed(self, closing: asyncio.Future[Any]) -> None:
        """The channel closed: everything outstanding went back to the queue."""
        self.alive = False
        if not closing.cancelled():
            self.error = closing.exception()
        self.buffer.clear()
        for delivery in self.outstanding.values():
            delivery.state = SETTLED
        self.outstanding.clear()
        self.order.clear()
        self.wake()

    def on_cancel(self, frame: Basic.Cancel) -> None:
        """aiormq's callback for a ``basic.cancel`` from the server."""
        if frame.consumer_tag == self.tag:
            self.cancelled = True
            self.wake()

    def wake(self) -> None:
        for waiter in self.waiters:
            _wake(waiter)

    @property
    def leased(self) -> int:
        """Deliveries handed out by fetch and not yet settled."""
        return len(self.outstanding) - len(self.buffer)
