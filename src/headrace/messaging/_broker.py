"""The message and the broker contract every adapter implements.

Delivery is **at-least-once**: a fetched message is *leased* to one consumer until it
is acked, nacked, handed back, dead-lettered, or its lease expires; an expired lease
makes the message deliverable again (to anyone), with its attempt count raised.

Meaning of each operation (adapters must keep it; the conformance suite checks it):

* ``fetch`` leases up to ``max_messages`` ready messages of one topic, waiting at most
  ``timeout`` seconds for the first; never returns a message another consumer holds
  under a live lease. A message whose delivery count passed the broker's
  ``max_deliveries`` (the consumer crashed on it again and again) is dead-lettered by
  the broker instead of delivered.
* ``ack`` removes handled messages for good. Acking a message whose lease expired and
  that was re-delivered elsewhere is allowed and harmless where the broker can tell.
  ``ack`` and ``dead_letter`` act on the message id; ``nack``, ``hand_back`` and
  ``extend_lease`` act only while ``message.receipt`` is still the current delivery
  (after a lease expired and someone else fetched the message, they do nothing).
* ``nack(delay)`` returns messages for a retry after ``delay`` seconds; it counts as
  a failed attempt.
* ``hand_back`` returns fetched-but-unhandled messages at once, e.g. on shutdown. Where
  ``capabilities.handback_costs_attempt`` is false, the attempt is not counted.
* ``extend_lease`` keeps long handlers' messages from being re-delivered.
* ``dead_letter`` moves one message to the topic's dead-letter store together with a
  JSON-safe error record (``HeadraceError.to_dict()``); atomically where the broker can.
* ``close`` flushes pending acks and releases connections; fetched messages not acked
  by then are handed back by the worker *before* close, never silently dropped. A
  ``fetch`` waiting on the broker when it closes, and every operation after close,
  raise :class:`~headrace.ClosedResourceError`; ``close`` itself is idempotent.
* ``publish([])`` returns ``[]``; bodies must be ``bytes`` (else ``InvalidMessage``);
  bad arguments (``max_messages < 1``, negative timeout, lease <= 0) raise
  ``ConfigurationError``. The shared checks live in :mod:`headrace.messaging.brokers`.

``tests/messaging/test_conformance.py`` checks all of this for every adapter registered
in ``tests/messaging/conftest.py``; :class:`~headrace.messaging.MemoryBroker` is the
reference implementation.

Adapters are used from one event loop; one instance may be shared by the tasks of a
worker (fetch, ack and publish may run concurrently).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Broker",
    "BrokerCapabilities",
    "DeadLetter",
    "Message",
    "OutgoingMessage",
    "TopicStats",
]


@dataclass(slots=True)
class Message:
    """One delivery of a message to a consumer.

    ``id`` is stable across redeliveries of the same message; ``attempt`` is 1 on the
    first delivery and grows with each failed or expired one; ``key`` is the
    idempotency/partition key given at publish (``None`` if none). ``receipt`` is the
    broker's private handle for this delivery (a lease token, a stream entry id, a
    delivery tag); only the adapter that produced the message reads it.
    """

    id: str
    topic: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    attempt: int = 1
    key: str | None = None
    receipt: Any = field(default=None, repr=False, compare=False)

    def text(self, encoding: str = "utf-8") -> str:
        """The body decoded as text."""
        return self.body.decode(encoding)

    def json(self) -> Any:
        """The body decoded as JSON (msgspec; raises ``msgspec.DecodeError`` if invalid)."""
        import msgspec

        return msgspec.json.decode(self.body)


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """A message to publish: body bytes, optional key and headers, optional delay."""

    body: bytes
    key: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A dead-lettered message and the error record stored with it."""

    message: Message
    error: Mapping[str, Any]
    dead_lettered_at: float


@dataclass(frozen=True, slots=True)
class TopicStats:
    """How many messages of one topic are where, at one moment (``headrace stats``).

    ``ready``: deliverable now, including messages whose lease expired (the next fetch
    takes them again); ``delayed``: held back by a retry or publish delay;
    ``in_flight``: leased to a consumer (fetched, not yet acked, nacked or handed back);
    ``dead_letters``: in the topic's dead-letter store. An adapter that cannot tell an
    expired lease from a live one without reading every delivery (Redis) counts both as
    in flight; its docstring says so.
    """

    topic: str
    ready: int
    delayed: int
    in_flight: int
    dead_letters: int

    @property
    def stored(self) -> int:
        """Messages not yet settled: ready, delayed and in flight."""
        return self.ready + self.delayed + self.in_flight


@dataclass(frozen=True, slots=True)
class BrokerCapabilities:
    """What an adapter can do; the worker and the conformance suite branch on these.

    ``handback_costs_attempt``: a shutdown hand-back raises the delivery count (NATS).
    ``counts_attempts``: the broker counts deliveries itself (else a header does).
    ``ordered``: messages of one topic are delivered in publish order (modulo retries).
    ``delayed_nack``: ``nack(delay>0)`` holds the message back for ``delay`` seconds.
    ``lease_extension``: ``extend_lease`` works.
    ``persistent``: messages survive a restart of the consumer process.
    ``max_message_bytes``: the largest message the broker stores, headers included
    (``None``: no limit below the adapters' own); NATS refuses more than the server's
    ``max_payload`` (1 MiB by default).
    """

    handback_costs_attempt: bool = False
    counts_attempts: bool = True
    ordered: bool = True
    delayed_nack: bool = True
    lease_extension: bool = True
    persistent: bool = True
    max_message_bytes: int | None = None


@runtime_checkable
class Broker(Protocol):
    """The contract between the worker/producer and one message broker (see module doc)."""

    @property
    def capabilities(self) -> BrokerCapabilities: ...

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, topic: str, messages: Sequence[OutgoingMessage]) -> list[str]:
        """Store ``messages`` durably; return their ids once the broker confirmed them."""
        ...

    async def fetch(
        self, topic: str, max_messages: int, *, timeout: float, lease: float
    ) -> list[Message]: ...

    async def ack(self, messages: Sequence[Message]) -> None: ...

    async def nack(self, messages: Sequence[Message], *, delay: float = 0.0) -> None: ...

    async def hand_back(self, messages: Sequence[Message]) -> None: ...

    async def extend_lease(self, messages: Sequence[Message], lease: float) -> None: ...

    async def dead_letter(self, message: Message, error: Mapping[str, Any]) -> None: ...

    async def dead_letters(self, topic: str, *, limit: int = 100) -> list[DeadLetter]:
        """The newest dead letters of ``topic`` (for ``headrace dlq list``)."""
        ...

    async def replay_dead_letters(self, topic: str, ids: Sequence[str] | None = None) -> int:
        """Publish dead letters again (all of the topic's, or those ``ids``); return count."""
        ...

    async def topic_stats(self, topic: str) -> TopicStats:
        """Counts of the topic's ready, delayed, in-flight and dead-lettered messages."""
        ...
