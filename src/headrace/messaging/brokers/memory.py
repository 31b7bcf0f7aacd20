"""The in-memory reference broker: the contract of ``Broker``, with nothing in the way.

Use :class:`MemoryBroker` in tests and examples, and as the reference when reading what
an adapter must do; use :class:`~headrace.messaging.SqliteBroker` when messages must
survive the process, and a server broker (Redis...) when several machines share a queue.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from ..._clock import Clock, TimerHandle, default_clock
from .._broker import BrokerCapabilities, DeadLetter, Message, OutgoingMessage, TopicStats
from . import (
    check_dead_letters_limit,
    check_error_record,
    check_fetch_arguments,
    check_lease,
    check_max_deliveries,
    check_nack_delay,
    check_outgoing,
    check_topic,
    max_deliveries_record,
)
from ._base import BrokerLifecycle

__all__ = ["MemoryBroker"]

_CAPABILITIES = BrokerCapabilities(
    handback_costs_attempt=False,
    counts_attempts=True,
    ordered=True,
    delayed_nack=True,
    lease_extension=True,
    persistent=False,
)


class _Record:
    """One stored message; ``version`` invalidates heap entries made before a change."""

    __slots__ = (
        "attempt",
        "body",
        "headers",
        "id",
        "key",
        "lease_token",
        "ready_at",
        "seq",
        "version",
    )

    def __init__(
        self, id: str, seq: int, body: bytes, headers: dict[str, str], key: str | None
    ) -> None:
        self.id = id
        self.seq = seq
        self.body = body
        self.headers = headers
        self.key = key
        # The attempt number of the current or last delivery, or of the next one after a
        # nack or hand-back; a delivery after an expired lease adds one.
        self.attempt = 1
        # The current or last delivery's token; None once returned (nack, hand-back).
        self.lease_token: int | None = None
        # Deliverable from (clock seconds); also its place in the order: messages are
        # delivered by (ready_at, seq), like the SQLite broker's (ready_at, id).
        self.ready_at = 0.0
        self.version = 0


class _Topic:
    """The queues of one topic. Heaps hold ``(..., version, id)`` and are cleaned lazily."""

    __slots__ = ("dead", "delayed", "leases", "ready", "records", "waiters")

    def __init__(self) -> None:
        self.records: dict[str, _Record] = {}
        self.ready: list[tuple[float, int, int, str]] = []  # (ready_at, seq, version, id)
        self.delayed: list[tuple[float, int, int, str]] = []  # (ready_at, seq, version, id)
        self.leases: list[tuple[float, int, str]] = []  # (lease_until, version, id)
        self.dead: list[DeadLetter] = []
        self.waiters: set[asyncio.Future[None]] = set()

    def live(self, version: int, id: str) -> _Record | None:
        record = self.records.get(id)
        return record if record is not None and record.version == version else None

    def requeue(self, record: _Record, now: float, ready_at: float | None) -> None:
        """Make ``record`` deliverable from ``ready_at`` (None: keep its place)."""
        record.lease_token = None
        if ready_at is not None:
            record.ready_at = ready_at
        self.queue(record, now)

    def queue(self, record: _Record, now: float) -> None:
        record.version += 1
        entry = (record.ready_at, record.seq, record.version, record.id)
        heapq.heappush(self.delayed if record.ready_at > now else self.ready, entry)

    def next_due(self) -> float | None:
        """When a delayed message becomes ready or a lease expires (may be stale: early)."""
        due = [heap[0][0] for heap in (self.delayed, self.leases) if heap]
        return min(due) if due else None

    def wake(self) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)


class _Store:
    """The messages of one ``memory://name``; shared by every broker opened on the name."""

    def __init__(self) -> None:
        self.topics: dict[str, _Topic] = {}
        self.sequence = itertools.count(1)
        self.tokens = itertools.count(1)

    def topic(self, name: str) -> _Topic:
        topic = self.topics.get(name)
        if topic is None:
            topic = self.topics[name] = _Topic()
        return topic


# Named stores live as long as some broker refers to them.
_NAMED_STORES: weakref.WeakValueDictionary[str, _Store] = weakref.WeakValueDictionary()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class MemoryBroker(BrokerLifecycle):
    """An in-process broker with leases, delayed retries and a dead-letter store.

    The reference adapter of the :class:`~headrace.messaging.Broker` contract: every
    rule of the contract holds (the conformance suite runs against it first), nothing is
    persisted. Messages of a topic are delivered in publish order; a message handed back
    or whose lease expired goes back to its place in that order, a nacked one goes to
    the end after waiting ``delay`` seconds (the same order as :class:`SqliteBroker`,
    which a differential test checks). All time (leases, delays, ``fetch`` timeouts) is read through
    ``clock``, so tests on a virtual clock see exact times.

    ``name`` shares the messages between every ``MemoryBroker`` of this process opened
    with the same name (``memory://jobs`` in a worker and in a producer) for as long as
    one of them exists; ``name=None`` (``memory://``) gives a private store.
    ``max_deliveries`` (default 20, ``None`` for no cap) dead-letters a message that was
    delivered that many times without an ack, e.g. because its consumer crashed each
    time; set it above the worker's own ``max_attempts``. ``lease`` is the default of
    ``fetch(lease=...)`` in seconds.

    Safe to share between the tasks of one event loop; not thread-safe.

    Example::

        async with MemoryBroker() as broker:
            await broker.publish("jobs", [OutgoingMessage(b"hello")])
            [message] = await broker.fetch("jobs", 10, timeout=1.0, lease=30.0)
            await broker.ack([message])
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        max_deliveries: int | None = 20,
        lease: float = 30.0,
        clock: Clock | None = None,
    ) -> None:
        max_deliveries = check_max_deliveries(max_deliveries, broker="MemoryBroker")
        self._lease = check_lease(lease, where="MemoryBroker(lease)")
        self._name = name
        if name is None:
            self._store = _Store()
        else:
            store = _NAMED_STORES.get(name)
            if store is None:
                store = _Store()
                _NAMED_STORES[name] = store
            self._store = store
        self._max_deliveries = max_deliveries
        self._clock = clock if clock is not None else default_clock()
        self._closed = False
        self._waiters: set[asyncio.Future[None]] = set()

    @property
    def capabilities(self) -> BrokerCapabilities:
        """Everything supported; ``persistent`` is false."""
        return _CAPABILITIES

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"MemoryBroker(name={self._name!r}, {state})"

    async def connect(self) -> None:
        """Nothing to connect; refuses a closed broker."""
        self._check_open("connect")

    async def close(self) -> None:
        """Close this broker (idempotent); a ``fetch`` waiting on it raises
        ``ClosedResourceError``. The stored messages stay for other brokers of the name."""
        if self._closed:
            return
        self._closed = True
        for waiter in self._waiters:
            _wake(waiter)

    async def publish(self, topic: str, messages: Sequence[OutgoingMessage]) -> list[str]:
        """Store ``messages`` at the end of ``topic``; return their ids (in order)."""
        self._check_open("publish")
        check_topic(topic)
        outgoing = check_outgoing(topic, messages)
        queue = self._store.topic(topic)
        now = self._clock.now()
        ids: list[str] = []
        for message in outgoing:
            seq = next(self._store.sequence)
            record = _Record(str(seq), seq, message.body, dict(message.headers), message.key)
            queue.records[record.id] = record
            queue.requeue(record, now, now + message.delay)
            ids.append(record.id)
        if ids:
            queue.wake()
        return ids

    async def fetch(
        self,
        topic: str,
        max_messages: int,
        *,
        timeout: float,
        lease: float | None = None,
    ) -> list[Message]:
        """Lease up to ``max_messages`` ready messages, waiting up to ``timeout`` seconds
        for the first; ``lease`` seconds (default: the broker's) until redelivery."""
        self._check_open("fetch")
        check_topic(topic)
        lease = self._lease if lease is None else lease
        check_fetch_arguments(max_messages, timeout, lease)
        queue = self._store.topic(topic)
        clock = self._clock
        deadline = clock.now() + timeout
        while True:
            now = clock.now()
            batch = self._claim(topic, queue, max_messages, now, lease)
            if batch or now >= deadline:
                return batch
            due = queue.next_due()
            wake_at = deadline if due is None else min(deadline, due)
            await self._wait(queue, wake_at)
            self._check_open("fetch")

    async def _wait(self, queue: _Topic, wake_at: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        handle: TimerHandle | None = None
        if math.isfinite(wake_at):
            handle = self._clock.call_at(wake_at, lambda: _wake(future))
        queue.waiters.add(future)
        self._waiters.add(future)
        try:
            await future
        finally:
            if handle is not None:
                handle.cancel()
            queue.waiters.discard(future)
            self._waiters.discard(future)

    def _claim(
        self, topic: str, queue: _Topic, limit: int, now: float, lease: float
    ) -> list[Message]:
        # Expired leases first: those messages go back to their place. They keep their
        # token (a late nack or extend_lease of that delivery still counts, as in SQLite)
        # and their next delivery counts one more attempt.
        while queue.leases and queue.leases[0][0] <= now:
            _, version, id = heapq.heappop(queue.leases)
            record = queue.live(version, id)
            if record is not None:
                queue.queue(record, now)
        while queue.delayed and queue.delayed[0][0] <= now:
            heapq.heappush(queue.ready, heapq.heappop(queue.delayed))
        batch: list[Message] = []
        cap = self._max_deliveries
        until = now + lease
        while queue.ready and len(batch) < limit:
            _, _, version, id = heapq.heappop(queue.ready)
            record = queue.live(version, id)
            if record is None:
                continue
            attempt = record.attempt + (record.lease_token is not None)
            if cap is not None and attempt > cap:
                del queue.records[id]
                message = self._message(topic, record, None)
                message.attempt = attempt - 1  # the last delivery's attempt
                error = max_deliveries_record(topic, id, attempt - 1, cap)
                queue.dead.append(DeadLetter(message, error, time.time()))
                continue
            record.attempt = attempt
            record.lease_token = next(self._store.tokens)
            record.version += 1
            heapq.heappush(queue.leases, (until, record.version, id))
            batch.append(self._message(topic, record, record.lease_token))
        return batch

    @staticmethod
    def _message(topic: str, record: _Record, receipt: int | None) -> Message:
        return Message(
            id=record.id,
            topic=topic,
            body=record.body,
            headers=dict(record.headers),
            attempt=record.attempt,
            key=record.key,
            receipt=receipt,
        )

    def _leased(self, message: Message) -> tuple[_Topic, _Record] | None:
        """The message's record if ``message`` is its current delivery."""
        queue = self._store.topics.get(message.topic)
        if queue is None:
            return None
        record = queue.records.get(message.id)
        if record is None or record.lease_token is None or record.lease_token != message.receipt:
            return None
        return queue, record

    async def ack(self, messages: Sequence[Message]) -> None:
        """Remove handled messages for good, even if their lease expired meanwhile."""
        self._check_open("ack")
        for message in messages:
            queue = self._store.topics.get(message.topic)
            if queue is not None:
                queue.records.pop(message.id, None)

    async def nack(self, messages: Sequence[Message], *, delay: float = 0.0) -> None:
        """Return messages for a retry after ``delay`` seconds; counts an attempt.

        Messages whose delivery is no longer current (lease expired and re-delivered,
        acked) are left alone."""
        self._check_open("nack")
        check_nack_delay(delay)
        self._return(messages, float(delay), cost=1)

    async def hand_back(self, messages: Sequence[Message]) -> None:
        """Return fetched-but-unhandled messages at once, without counting an attempt."""
        self._check_open("hand_back")
        self._return(messages, None, cost=0)

    def _return(self, messages: Sequence[Message], delay: float | None, *, cost: int) -> None:
        # delay None: back at once, at the message's place in the order (a hand-back).
        now = self._clock.now()
        woken: set[int] = set()
        for message in messages:
            found = self._leased(message)
            if found is None:
                continue
            queue, record = found
            record.attempt += cost
            queue.requeue(record, now, None if delay is None else now + delay)
            if id(queue) not in woken:
                woken.add(id(queue))
                # Also for a delay: waiting fetches must re-plan their wake-up time.
                queue.wake()

    async def extend_lease(self, messages: Sequence[Message], lease: float) -> None:
        """Renew the leases of messages still held by this delivery to ``lease`` s from now."""
        self._check_open("extend_lease")
        check_lease(lease, where="extend_lease(lease)")
        until = self._clock.now() + lease
        for message in messages:
            found = self._leased(message)
            if found is None:
                continue
            queue, record = found
            record.version += 1
            heapq.heappush(queue.leases, (until, record.version, record.id))

    async def dead_letter(self, message: Message, error: Mapping[str, Any]) -> None:
        """Move ``message`` to the topic's dead letters with ``error`` (a JSON-safe record).

        A message already acked or dead-lettered is not stored twice."""
        self._check_open("dead_letter")
        encoded = check_error_record(error)
        queue = self._store.topics.get(message.topic)
        if queue is None:
            return
        record = queue.records.pop(message.id, None)
        if record is None:
            return
        stored = self._message(message.topic, record, None)
        stored.attempt = message.attempt
        record_copy: dict[str, Any] = msgspec.json.decode(encoded)
        queue.dead.append(DeadLetter(stored, record_copy, time.time()))

    async def dead_letters(self, topic: str, *, limit: int = 100) -> list[DeadLetter]:
        """The newest ``limit`` dead letters of ``topic``, newest first."""
        self._check_open("dead_letters")
        check_topic(topic)
        check_dead_letters_limit(limit)
        queue = self._store.topics.get(topic)
        if queue is None:
            return []
        return list(reversed(queue.dead[-limit:]))

    async def topic_stats(self, topic: str) -> TopicStats:
        """Counts of the topic's ready, delayed, in-flight and dead-lettered messages."""
        self._check_open("topic_stats")
        check_topic(topic)
        queue = self._store.topics.get(topic)
        if queue is None:
            return TopicStats(topic, 0, 0, 0, 0)
        now = self._clock.now()
        leased = {
            id
            for until, version, id in queue.leases
            if until > now and queue.live(version, id) is not None
        }
        ready = delayed = in_flight = 0
        for record in queue.records.values():
            if record.lease_token is not None and record.id in leased:
                in_flight += 1
            elif record.ready_at > now:
                delayed += 1
            else:
                ready += 1
        return TopicStats(topic, ready, delayed, in_flight, len(queue.dead))

    async def replay_dead_letters(self, topic: str, ids: Sequence[str] | None = None) -> int:
        """Publish dead letters of ``topic`` again as new messages (attempt 1, same body,
        key and headers), all of them or those whose message id is in ``ids``; return how
        many. They leave the dead-letter store."""
        self._check_open("replay_dead_letters")
        check_topic(topic)
        queue = self._store.topics.get(topic)
        if queue is None:
            return 0
        wanted = None if ids is None else set(ids)
        chosen = [d for d in queue.dead if wanted is None or d.message.id in wanted]
        if not chosen:
            return 0
        queue.dead = [d for d in queue.dead if not (wanted is None or d.message.id in wanted)]
        await self.publish(
            topic,
            [
                OutgoingMessage(d.message.body, key=d.message.key, headers=d.message.headers)
                for d in chosen
            ],
        )
        return len(chosen)
