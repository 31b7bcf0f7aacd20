"""The :class:`Producer`: batched publishing whose ``close()`` accounts for every message.

sarama's lesson (seed 004): an asynchronous producer whose close only stops accepting
work drops the messages still in flight, silently. Here ``publish`` queues a message
and returns; a sender task publishes batches; ``close()`` waits until every queued
message was confirmed by the broker or failed for good, and reports the failures.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import warnings
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from .._clock import Clock, default_clock
from .._errors import (
    ClosedResourceError,
    ConfigurationError,
    HeadraceError,
    InvalidMessage,
    PublishError,
)
from .._retry import Retry
from ._broker import Broker, OutgoingMessage

__all__ = ["ProducerCloseError", "ProducerReport", "Producer", "PublishFailure"]

logger = logging.getLogger("headrace.messaging.producer")

_ENCODER = msgspec.json.Encoder()


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class PublishFailure:
    """One message the broker never confirmed, with the last error."""

    topic: str
    message: OutgoingMessage
    error: HeadraceError


@dataclass(frozen=True, slots=True)
class ProducerReport:
    """What happened to everything published through a producer."""

    published: int
    confirmed: int
    failures: tuple[PublishFailure, ...]

    @property
    def failed(self) -> int:
        return len(self.failures)


class ProducerCloseError(PublishError):
    """``Producer.close()`` found messages that were not confirmed; see ``report``."""

    default_code = "publish_failed"
    report: ProducerReport


@dataclass(slots=True)
class _Pending:
    topic: str
    message: OutgoingMessage
    future: asyncio.Future[str] | None


def encode_body(body: Any) -> bytes:
    """bytes as they are, str as UTF-8, anything else as JSON (msgspec)."""
    if isinstance(body, bytes):
        return body
    if isinstance(body, bytearray | memoryview):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8")
    try:
        return _ENCODER.encode(body)
    except (TypeError, msgspec.EncodeError) as exc:
        raise InvalidMessage(
            f"publish body of type {type(body).__name__} is not bytes, str or JSON-able: {exc}",
            context={"type": type(body).__name__},
        ) from exc


class Producer:
    """Publishes messages in batches and, on ``close()``, reports every one not confirmed.

    ``await publish(topic, body, key=..., headers=...)`` queues the message and returns
    at once (it waits only when ``max_pending`` messages are already queued:
    backpressure). A sender task publishes up to ``batch_size`` messages of a topic per
    broker call; a failed batch is retried with ``retry`` (default: 5 attempts,
    exponential backoff, transient errors only) and then recorded as failed.
    ``await publish_and_wait(...)`` returns the broker's message id (or raises
    :class:`~headrace.PublishError`). ``await flush()`` waits until everything queued so
    far is settled. ``await close()`` flushes, stops the sender and returns a
    :class:`ProducerReport`; with ``raise_on_failure=True`` (default) it raises
    :class:`ProducerCloseError` (with ``.report``) if any message failed. Nothing is
    dropped silently; a producer garbage-collected unclosed emits ``ResourceWarning``.

    ``broker`` is a :class:`Broker` you own or a URL (opened on first publish and closed
    by ``close()``). Safe to share between the tasks of one event loop. Use it as
    ``async with Producer(broker) as producer:`` (closing raises on failures).
    """

    def __init__(
        self,
        broker: Broker | str,
        *,
        batch_size: int = 500,
        max_pending: int = 10_000,
        retry: Retry | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not isinstance(broker, str | Broker):
            raise ConfigurationError(f"Producer(broker={broker!r}) needs a Broker or a URL")
        if batch_size < 1:
            raise ConfigurationError(f"Producer(batch_size={batch_size}) must be >= 1")
        if max_pending < 1:
            raise ConfigurationError(f"Producer(max_pending={max_pending}) must be >= 1")
        self._broker_arg = broker
        self._broker: Broker | None = None if isinstance(broker, str) else broker
        self._owned = isinstance(broker, str)
        self.batch_size = batch_size
        self.max_pending = max_pending
        self.retry = retry or Retry(max_attempts=5, initial_delay=0.05, max_delay=2.0)
        self._clock = clock or default_clock()
        self._state = _State.NEW
        # One queue per topic, so that interleaved topics still make full batches.
        self._queues: dict[str, deque[_Pending]] = {}
        self._queued = 0
        self._in_flight = 0
        self._published = 0
        self._confirmed = 0
        self._failures: list[PublishFailure] = []
        self._sender: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._settled: asyncio.Event | None = None
        self._space: asyncio.Event | None = None
        self._open_lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return (
            f"Producer(state={self._state.value!r}, queued={self._queued}, "
            f"in_flight={self._in_flight}, confirmed={self._confirmed}, "
            f"failed={len(self._failures)})"
        )

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if getattr(self, "_state", _State.CLOSED) is not _State.CLOSED:
            _warn(
                f"unclosed {self!r}: messages may not have been published; await producer.close()",
                ResourceWarning,
                source=self,
                stacklevel=2,
            )

    async def __aenter__(self) -> Producer:
        await self._start()
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # Do not mask the block's own error with our report; still never drop silently.
        await self.close(raise_on_failure=exc is None)

    @property
    def pending(self) -> int:
        """Messages queued or being published, not yet confirmed or failed."""
        return self._queued + self._in_flight

    def report(self) -> ProducerReport:
        """The counts so far (final after ``close()``)."""
        return ProducerReport(self._published, self._confirmed, tuple(self._failures))

    async def _start(self) -> None:
        if self._state is _State.OPEN:
            return
        if self._state is not _State.NEW:
            raise ClosedResourceError(f"publish on a {self._state.value} producer")
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self._sender is not None:  # another task opened it while we waited
                return
            if self._broker is None:
                from ._url import open_broker

                assert isinstance(self._broker_arg, str)
                broker = open_broker(self._broker_arg)
                await broker.connect()
                self._broker = broker
            self._wake = asyncio.Event()
            self._settled = asyncio.Event()
            self._settled.set()
            self._space = asyncio.Event()
            self._space.set()
            self._sender = asyncio.create_task(self._send_loop(), name="producer-sender")
            self._state = _State.OPEN

    async def publish(
        self,
        topic: str,
        body: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
    ) -> None:
        """Queue one message (bytes, str, or a JSON-able value); return once queued."""
        await self._enqueue(topic, body, key, headers, delay, None)

    async def publish_and_wait(
        self,
        topic: str,
        body: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
    ) -> str:
        """Publish one message and wait for the broker's confirmation; return its id."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        await self._enqueue(topic, body, key, headers, delay, future)
        return await future

    async def _enqueue(
        self,
        topic: str,
        body: Any,
        key: str | None,
        headers: Mapping[str, str] | None,
        delay: float,
        future: asyncio.Future[str] | None,
    ) -> None:
        if self._state is not _State.OPEN:
            await self._start()
        if not isinstance(topic, str) or not topic:
            raise ConfigurationError(f"publish(topic={topic!r}) needs a non-empty str")
        message = OutgoingMessage(
            encode_body(body), key=key, headers=dict(headers or {}), delay=delay
        )
        assert self._space is not None
        assert self._wake is not None
        assert self._settled is not None
        while self.pending >= self.max_pending:
            self._space.clear()
            await self._space.wait()
            if self._state is not _State.OPEN:
                raise ClosedResourceError("publish on a closing producer")
        queue = self._queues.get(topic)
        if queue is None:
            queue = self._queues[topic] = deque()
        queue.append(_Pending(topic, message, future))
        self._queued += 1
        self._published += 1
        self._settled.clear()
        self._wake.set()

    async def flush(self) -> None:
        """Wait until every message queued so far is confirmed or failed."""
        if self._settled is not None:
            await self._settled.wait()

    async def close(self, *, raise_on_failure: bool = True) -> ProducerReport:
        """Publish everything queued, stop, and report (idempotent).

        Raises :class:`ProducerCloseError` when messages failed and
        ``raise_on_failure`` is true; the report is also returned by :meth:`report`.
        If the caller is cancelled while draining, the sender is cancelled too and the
        messages it had not published are reported as failed (never lost silently).
        """
        if self._state is _State.NEW:
            self._state = _State.CLOSED
            return self.report()
        if self._state is _State.OPEN:
            self._state = _State.CLOSING
            assert self._sender is not None
            assert self._wake is not None
            self._wake.set()
            if self._space is not None:
                self._space.set()
            try:
                await asyncio.shield(self._sender)
            except asyncio.CancelledError:
                self._sender.cancel()
                await asyncio.gather(self._sender, return_exceptions=True)
                self._fail_queued("producer closed while draining (cancelled)")
                await self._finish()
                raise
            await self._finish()
        report = self.report()
        if raise_on_failure and report.failures:
            first = report.failures[0].error
            error = ProducerCloseError(
                f"{report.failed} of {report.published} published messages were not "
                f"confirmed (first error: {first.message})",
                context={
                    "published": report.published,
                    "confirmed": report.confirmed,
                    "failed": report.failed,
                    "first_error_id": first.error_id,
                },
            )
            error.report = report
            raise error
        return report

    async def _finish(self) -> None:
        self._state = _State.CLOSED
        if self._owned and self._broker is not None:
            await self._broker.close()

    def _fail_queued(self, reason: str) -> None:
        for queue in self._queues.values():
            while queue:
                item = queue.popleft()
                self._record_failure(item, PublishError(reason, context={"topic": item.topic}))
        self._queues.clear()
        self._queued = 0

    def _record_failure(self, item: _Pending, error: HeadraceError) -> None:
        self._failures.append(PublishFailure(item.topic, item.message, error))
        if item.future is not None and not item.future.done():
            item.future.set_exception(error)

    async def _send_loop(self) -> None:
        assert self._wake is not None
        assert self._settled is not None
        assert self._space is not None
        while True:
            if not self._queued:
                self._settled.set()
                if self._state is not _State.OPEN:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            # The topic queued longest first (dicts keep insertion order); one topic per
            # broker call, in publish order within the topic.
            topic, queue = next(iter(self._queues.items()))
            count = min(len(queue), self.batch_size)
            batch = [queue.popleft() for _ in range(count)]
            if not queue:
                del self._queues[topic]
            self._queued -= count
            self._in_flight = count
            try:
                await self._publish_batch(topic, batch)
            finally:
                self._in_flight = 0
                self._space.set()

    async def _publish_batch(self, topic: str, batch: list[_Pending]) -> None:
        assert self._broker is not None
        messages = [item.message for item in batch]
        started = self._clock.now()
        failures = 0
        while True:
            try:
                ids = await self._broker.publish(topic, messages)
            except Exception as exc:
                failures += 1
                delay = self.retry.next_delay(exc, failures, self._clock.now() - started)
                if delay is None:
                    error = (
                        exc
                        if isinstance(exc, PublishError)
                        else PublishError.wrap(
                            exc,
                            f"publishing {len(batch)} messages to {topic!r} failed after "
                            f"{failures} attempt(s): {type(exc).__name__}: {exc}",
                            context={"topic": topic, "attempts": failures},
                        )
                    )
                    logger.error("%s", error)
                    for item in batch:
                        self._record_failure(item, error)
                    return
                await self._clock.sleep(delay)
                continue
            self._confirmed += len(batch)
            for item, message_id in zip(batch, ids, strict=False):
                if item.future is not None and not item.future.done():
                    item.future.set_result(message_id)
            return
