"""One handler's machinery: the fetch loop, the handler slots, the acker, the leases.

Every fetched message is in exactly one place at any time, so shutdown can account
for all of them:

* ``buffer``: fetched, not yet given to a handler (handed back at once on stop);
* ``in_flight``: a handler is working on it (finished, or handed back if cancelled);
* ``to_ack``: handled, waiting for the next batched ack (always flushed on stop);
* nowhere: acked, nacked for a retry, dead-lettered or handed back (settled).

Nacks and dead-letters run under :func:`~headrace.shielded`, and the message leaves
``in_flight`` inside the shielded call, so a cancellation can never leave it half
settled: either the broker call finished and the message is gone from the books, or
it is still in ``in_flight`` and will be handed back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..._cancel import deadline, shielded
from ..._clock import Clock
from ..._errors import (
    ConfigurationError,
    DeadlineExceeded,
    HeadraceError,
    InternalError,
    InvalidMessage,
)
from ..._retry import Retry
from .._broker import Broker, Message

if TYPE_CHECKING:
    from .._idempotency import IdempotencyStore

__all__ = ["Handler", "HandlerSpec", "RateLimiter", "Route", "worker_retryable"]

logger = logging.getLogger("headrace.messaging.worker")

Handler = Callable[[Message], Awaitable[None]]


class RateLimiter(Protocol):
    """Anything with ``await acquire()``: a :class:`~headrace.TokenBucket`, an aiolimiter."""

    async def acquire(self) -> Any: ...


def worker_retryable(exc: BaseException) -> bool:
    """The worker's default: retry every failure unless a headrace error says it is final.

    A handler's own exceptions (``KeyError``, a driver error) may well pass next time,
    so they are retried up to ``max_attempts``; a :class:`~headrace.HeadraceError` with
    ``transient=False`` (an invalid message, a failed compensation) goes to the
    dead-letter queue at once.
    """
    if not isinstance(exc, Exception):
        return False
    if isinstance(exc, HeadraceError):
        return exc.transient
    return True


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """What ``@worker.handler(...)`` registered (validated by the worker)."""

    topic: str
    fn: Handler
    name: str
    concurrency: int
    prefetch: int
    timeout: float | None
    retry: Retry
    rate_limit: RateLimiter | None
    idempotency: IdempotencyStore | None
    max_message_bytes: int | None


def _decode_error_types() -> tuple[type[BaseException], ...]:
    import msgspec

    return (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError)


class Counters:
    """Mutable counters shared by a worker's routes (read through ``statistics()``)."""

    __slots__ = (
        "ack_failures",
        "acked",
        "dead_lettered",
        "duplicates",
        "failed",
        "fetched",
        "handed_back",
        "handled",
        "retried",
        "settle_failures",
    )

    def __init__(self) -> None:
        self.fetched = 0
        self.handled = 0
        self.failed = 0
        self.retried = 0
        self.dead_lettered = 0
        self.duplicates = 0
        self.acked = 0
        self.handed_back = 0
        self.ack_failures = 0
        self.settle_failures = 0


class Route:
    """The fetch → handle → ack machinery of one handler (one topic)."""

    def __init__(
        self,
        spec: HandlerSpec,
        broker: Broker,
        counters: Counters,
        *,
        clock: Clock,
        lease: float,
        fetch_timeout: float,
        ack_batch: int,
        ack_interval: float,
        settle_timeout: float,
    ) -> None:
        self.spec = spec
        self.broker = broker
        self.counters = counters
        self.clock = clock
        self.lease = lease
        self.fetch_timeout = fetch_timeout
        self.ack_batch = ack_batch
        self.ack_interval = ack_interval
        self.settle_timeout = settle_timeout
        self.capacity = spec.concurrency + spec.prefetch
        self.fetch_batch = min(self.capacity, max(spec.concurrency, ack_batch))
        self.buffer: deque[Message] = deque()
        self.in_flight: dict[int, Message] = {}
        self.to_ack: list[Message] = []
        self.lease_until: dict[int, float] = {}
        self.stopping = False
        self.acker_stopping = False
        # On shutdown, the clock time by which the last acks must be through.
        self.ack_deadline = math.inf
        self.last_activity = clock.now()
        # When the latest retry this worker scheduled comes due: not idle before then.
        self.retry_due = -math.inf
        # Idle slots wait here: True wakes one to take buffered messages, None stops it.
        self._idle_slots: deque[asyncio.Future[bool | None]] = deque()
        # A slot was woken and has not run yet (at most one: see _dispatch).
        self._waking = False
        self._space = asyncio.Event()
        self._fetcher_waiting = False
        self._ack_ready = asyncio.Event()
        self._ack_full: asyncio.Future[None] | None = None
        self._decode_errors = _decode_error_types()

    # -- bookkeeping -------------------------------------------------------------

    @property
    def held(self) -> int:
        return len(self.buffer) + len(self.in_flight)

    def idle_for(self, now: float) -> float:
        """Seconds this route has had nothing to do (0 while busy or a retry is due)."""
        if self.held or self.to_ack:
            return 0.0
        return max(0.0, now - max(self.last_activity, self.retry_due))

    def _release(self, message: Message) -> None:
        """The message left ``in_flight``: its slot and its lease are free."""
        key = id(message)
        self.in_flight.pop(key, None)
        self.lease_until.pop(key, None)
        # Only wake the fetch loop when it waits for room, once (this runs once per
        # message; the acker records activity, so no clock read here either).
        if self._fetcher_waiting:
            self._fetcher_waiting = False
            self._space.set()

    def _buffer_ran_dry(self) -> None:
        """A slot took the last buffered message while the fetch loop waits for room:
        let it fetch now. It waited because a whole batch did not fit yet, expecting
        the buffer to last until a handler finished; a broker that hands over a few
        messages per fetch (RabbitMQ's window filling, NATS long polls) empties it at
        once, and slow handlers would leave the other slots idle until then."""
        self._fetcher_waiting = False
        self._space.set()

    def _settle_ack(self, message: Message) -> None:
        # slot() writes this out for its common path; keep the two in step.
        self._release(message)
        self.to_ack.append(message)
        self.counters.handled += 1
        if len(self.to_ack) == 1:
            self._ack_ready.set()
        if len(self.to_ack) >= self.ack_batch and self._ack_full is not None:
            _resolve(self._ack_full)

    # -- fetching ----------------------------------------------------------------

    async def fetch_loop(self) -> None:
        """Fetch as many messages as there are free slots, until told to stop."""
        failures = 0
        while not self.stopping:
            free = self.capacity - self.held
            # Wait for room unless a whole batch fits or the buffer ran dry (the slots
            # would idle): a fetch per freed slot would cost a round trip per message.
            # Every release re-checks, and so does the slot that takes the last
            # buffered message (_buffer_ran_dry).
            if free <= 0 or (free < self.fetch_batch and self.buffer):
                self._space.clear()
                self._fetcher_waiting = True
                try:
                    await self._space.wait()
                finally:
                    self._fetcher_waiting = False
                # Let the other handlers finishing in this same tick free their slots
                # too, so the next fetch asks for a batch rather than one message.
                await asyncio.sleep(0)
                continue
            try:
                messages = await self.broker.fetch(
                    self.spec.topic,
                    min(free, self.fetch_batch),
                    timeout=self.fetch_timeout,
                    lease=self.lease,
                )
            except ConfigurationError:
                # The broker refuses our settings (a lease over its max_lease...): no
                # retry can help; the worker stops in order and run() raises it.
                raise
            except Exception as exc:
                failures += 1
                # Jittered, so that workers do not all reconnect in the same instant
                # when a broker comes back.
                delay = random.uniform(0.5, 1.0) * min(5.0, 0.05 * 2 ** min(failures, 10))
                logger.warning(
                    "fetch from %r failed (%s); retrying in %.2f s",
                    self.spec.topic,
                    exc,
                    delay,
                    extra={"topic": self.spec.topic},
                )
                await self._sleep_unless_stopping(delay)
                continue
            failures = 0
            if not messages:
                continue
            now = self.clock.now()
            self.last_activity = now
            until = now + self.lease
            lease_until = self.lease_until
            for message in messages:
                lease_until[id(message)] = until
            self.counters.fetched += len(messages)
            self.buffer.extend(messages)
            self._dispatch()

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        end = self.clock.now() + seconds
        while not self.stopping and self.clock.now() < end:
            self._space.clear()
            waiter = asyncio.ensure_future(self._space.wait())
            handle = self.clock.call_at(end, waiter.cancel)
            try:
                await waiter
            except asyncio.CancelledError:
                if not waiter.cancelled() or self._current_task_cancelling():
                    raise
            finally:
                handle.cancel()
                waiter.cancel()

    @staticmethod
    def _current_task_cancelling() -> bool:
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0

    def _dispatch(self) -> None:
        """Wake one idle slot for the buffered messages.

        One at a time: a slot that takes a message wakes the next idle one while more
        wait (:meth:`_next`). Fast handlers are then drained by the first slot without a
        task switch per message (c=100 used to wake 100 tasks per batch), and slow ones
        still fan out to every slot, one loop tick apart. Buffered messages count as
        held until a slot takes them, so the fetch loop never sees them as room."""
        if self._waking or not self.buffer:
            return
        while self._idle_slots:
            waiter = self._idle_slots.popleft()
            if not waiter.done():
                waiter.set_result(True)
                self._waking = True
                return

    def take_buffer(self) -> list[Message]:
        """Remove and return every fetched-but-unstarted message (for a hand-back)."""
        taken = list(self.buffer)
        self.buffer.clear()
        for message in taken:
            self.lease_until.pop(id(message), None)
        return taken

    def stop(self) -> None:
        """Stop fetching and starting handlers; idle slots exit."""
        self.stopping = True
        self._space.set()
        while self._idle_slots:
            waiter = self._idle_slots.popleft()
            if not waiter.done():
                waiter.set_result(None)

    # -- handling ----------------------------------------------------------------

    async def _next(self) -> Message | None:
        while True:
            if self.stopping:
                return None
            if self.buffer:
                message = self.buffer.popleft()
                self.in_flight[id(message)] = message
                if self.buffer:
                    # More waiting: pass the wake-up on (once; see _dispatch).
                    self._dispatch()
                elif self._fetcher_waiting:
                    self._buffer_ran_dry()
                return message
            waiter: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
            self._idle_slots.append(waiter)
            try:
                woken = await waiter
            except asyncio.CancelledError:
                # Woken in the same instant: the wake-up must not vanish with the slot.
                if waiter.done() and not waiter.cancelled() and waiter.result():
                    self._waking = False
                    self._dispatch()
                raise
            if woken is None:  # stop()
                return None
            self._waking = False

    async def slot(self) -> None:
        """One handler slot: take a message, handle it, settle it; repeat.

        The common case (a message already buffered, a handler with no timeout, rate
        limit or idempotency store) is written out here rather than through
        :meth:`_next` and :meth:`_process`: it runs once per message, and the two
        coroutine calls it saves were a tenth of the worker's cost per message (B4)."""
        buffer = self.buffer
        in_flight = self.in_flight
        lease_until = self.lease_until
        counters = self.counters
        spec = self.spec
        fn = spec.fn
        limit = spec.max_message_bytes
        plain = spec.timeout is None and spec.rate_limit is None and spec.idempotency is None
        while True:
            if buffer and not self.stopping:
                message = buffer.popleft()
                in_flight[id(message)] = message
                if buffer:
                    if self._idle_slots and not self._waking:
                        self._dispatch()  # more waiting: wake one idle slot (see _dispatch)
                elif self._fetcher_waiting:
                    self._buffer_ran_dry()
            else:
                next_message = await self._next()
                if next_message is None:
                    return
                message = next_message
            try:
                if plain and (limit is None or len(message.body) <= limit):
                    try:
                        await fn(message)
                    except Exception as exc:
                        await self._failed(message, exc)
                        continue
                    # _settle_ack, written out.
                    key = id(message)
                    in_flight.pop(key, None)
                    lease_until.pop(key, None)
                    if self._fetcher_waiting:
                        self._fetcher_waiting = False
                        self._space.set()
                    to_ack = self.to_ack
                    to_ack.append(message)
                    counters.handled += 1
                    if len(to_ack) == 1:
                        self._ack_ready.set()
                    if len(to_ack) >= self.ack_batch and self._ack_full is not None:
                        _resolve(self._ack_full)
                else:
                    await self._process(message)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug in the worker itself: keep the message on the books (it is
                # handed back on stop) and keep the slot alive.
                logger.exception("worker bug while processing message %s", message.id)

    async def _process(self, message: Message) -> None:
        spec = self.spec
        limit = spec.max_message_bytes
        if limit is not None and len(message.body) > limit:
            error = InvalidMessage(
                f"message {message.id} on {spec.topic!r} is {len(message.body)} bytes, "
                f"over max_message_bytes={limit}",
                code="message_too_large",
                context={"topic": spec.topic, "message_id": message.id, "size": len(message.body)},
            )
            await self._dead_letter(message, error, reason="invalid_message")
            return
        store = spec.idempotency
        key = ""
        if store is not None:
            key = idempotency_key(message)
            if await store.seen(key):
                self.counters.duplicates += 1
                self._settle_ack(message)
                return
        try:
            if spec.rate_limit is not None:
                await spec.rate_limit.acquire()
            if spec.timeout is None:
                await spec.fn(message)
            else:
                async with deadline(
                    spec.timeout, cause=f"handler {spec.name} timeout", clock=self.clock
                ):
                    await spec.fn(message)
        except Exception as exc:
            await self._failed(message, exc)
            return
        if store is not None:
            try:
                await store.record(key)
            except Exception as exc:
                # The effect happened; nacking would repeat it. Ack, and say the key
                # was not recorded (a later redelivery could repeat the effect).
                logger.error("could not record idempotency key %r: %s", key, exc)
        self._settle_ack(message)

    async def _failed(self, message: Message, exc: Exception) -> None:
        spec = self.spec
        self.counters.failed += 1
        context = {
            "topic": spec.topic,
            "handler": spec.name,
            "message_id": message.id,
            "attempt": message.attempt,
        }
        error: HeadraceError
        if isinstance(exc, HeadraceError):
            error = exc
        elif isinstance(exc, self._decode_errors):
            error = InvalidMessage.wrap(
                exc,
                f"handler {spec.name} could not decode message {message.id}: {exc}",
                context=context,
            )
        else:
            error = InternalError.wrap(
                exc,
                f"handler {spec.name} raised {type(exc).__name__} on message {message.id}: {exc}",
                context=context,
            )
        if isinstance(error, InvalidMessage):
            await self._dead_letter(message, error, reason="invalid_message")
            return
        delay = spec.retry.next_delay(exc, message.attempt, 0.0)
        if delay is None:
            reason = (
                "max_attempts" if message.attempt >= spec.retry.max_attempts else "not_retryable"
            )
            await self._dead_letter(message, error, reason=reason)
            return
        logger.info(
            "handler %s failed on message %s (attempt %d, error_id %s): %s; retry in %.3g s",
            spec.name,
            message.id,
            message.attempt,
            error.error_id,
            exc,
            delay,
        )
        await self._settle(self._nack(message, delay), message, "nack")

    async def _nack(self, message: Message, delay: float) -> None:
        # Full jitter can draw a delay of nanoseconds: that is "now", and a broker
        # timer that rounds it to its clock's resolution could wake before the message
        # is due, again and again (seen with MemoryBroker on the virtual clock).
        delayed = delay if self.broker.capabilities.delayed_nack and delay >= 0.001 else 0.0
        await self.broker.nack([message], delay=delayed)
        self.retry_due = max(self.retry_due, self.clock.now() + delayed)
        self.counters.retried += 1

    async def _dead_letter(self, message: Message, error: HeadraceError, *, reason: str) -> None:
        record = error.to_dict()
        record["reason"] = reason
        record["handler"] = self.spec.name
        record["message_id"] = message.id
        record["attempt"] = message.attempt
        logger.warning(
            "dead-lettering message %s of %r (%s, attempt %d, error_id %s): %s",
            message.id,
            self.spec.topic,
            reason,
            message.attempt,
            error.error_id,
            error.message,
        )
        await self._settle(self._store_dead_letter(message, record), message, "dead_letter")

    async def _store_dead_letter(self, message: Message, record: dict[str, Any]) -> None:
        await self.broker.dead_letter(message, record)
        self.counters.dead_lettered += 1

    async def _settle(self, operation: Awaitable[None], message: Message, what: str) -> None:
        async def settle() -> None:
            try:
                await operation
            except Exception as exc:
                # The message stays leased by the broker; its lease expires and it is
                # delivered again, so nothing is lost, only delayed.
                self.counters.settle_failures += 1
                logger.error("%s of message %s failed: %s", what, message.id, exc)
            finally:
                self._release(message)
                self.last_activity = self.clock.now()

        try:
            await shielded(settle(), timeout=self.settle_timeout, cause=f"{what} of {message.id}")
        except DeadlineExceeded as exc:
            self.counters.settle_failures += 1
            logger.error("%s of message %s timed out: %s", what, message.id, exc)

    # -- acking ------------------------------------------------------------------

    async def ack_loop(self) -> None:
        """Ack handled messages in batches: when ``ack_batch`` are ready or after
        ``ack_interval`` seconds; exits only after a final flush once told to stop."""
        loop = asyncio.get_running_loop()
        while True:
            if not self.to_ack:
                if self.acker_stopping:
                    return
                self._ack_ready.clear()
                await self._ack_ready.wait()
                continue
            if len(self.to_ack) < self.ack_batch and not self.acker_stopping:
                full: asyncio.Future[None] = loop.create_future()
                self._ack_full = full
                handle = self.clock.call_at(
                    self.clock.now() + self.ack_interval, functools.partial(_resolve, full)
                )
                try:
                    await full
                finally:
                    handle.cancel()
                    self._ack_full = None
            batch, self.to_ack = self.to_ack[: self.ack_batch], self.to_ack[self.ack_batch :]
            await self._ack(batch)

    async def _ack(self, batch: list[Message]) -> None:
        """Ack ``batch``; on failure retry with jittered backoff (0.05 s doubling to 1 s)
        for one lease (by then the leases, taken before the first failure, have surely
        expired and the messages may be with another consumer), and on shutdown no
        later than :meth:`stop_acker`'s deadline. A batch given up is delivered again:
        late, never lost. Why so long: with three quick tries, every duplicate after a
        broker restart was an ack given up while the broker was away (R4)."""
        give_up_at = math.inf
        pause = 0.05
        while True:
            budget = min(self.settle_timeout, self.ack_deadline - self.clock.now())
            error: Exception | None = None
            if budget > 0:
                try:
                    async with deadline(budget, cause="ack", clock=self.clock):
                        await self.broker.ack(batch)
                except Exception as exc:
                    error = exc
                else:
                    self.counters.acked += len(batch)
                    self.last_activity = self.clock.now()
                    return
            now = self.clock.now()
            if give_up_at == math.inf:
                give_up_at = now + self.lease
            wait = random.uniform(pause / 2, pause)
            if error is None or now + wait >= min(give_up_at, self.ack_deadline):
                self.counters.ack_failures += len(batch)
                logger.error(
                    "ack of %d messages on %r failed (%s); they will be delivered again "
                    "when their leases expire",
                    len(batch),
                    self.spec.topic,
                    error or "no time left before the shutdown deadline",
                )
                return
            logger.warning(
                "ack of %d messages on %r failed (%s); retrying in %.2f s",
                len(batch),
                self.spec.topic,
                error,
                wait,
            )
            await self.clock.sleep(wait)
            pause = min(1.0, pause * 2)

    def stop_acker(self, deadline: float = math.inf) -> None:
        """Let the acker flush everything left, by ``deadline`` (clock time), and exit."""
        self.ack_deadline = deadline
        self.acker_stopping = True
        self._ack_ready.set()
        if self._ack_full is not None:
            _resolve(self._ack_full)

    # -- leases ------------------------------------------------------------------

    async def lease_loop(self) -> None:
        """Extend the leases of held messages a third of the lease before they expire.

        Long handlers would otherwise lose their message to another consumer halfway.
        """
        if not math.isfinite(self.lease) or not self.broker.capabilities.lease_extension:
            return
        period = self.lease / 3
        while True:
            await self.clock.sleep(period)
            now = self.clock.now()
            due = [
                message
                for message in (*self.buffer, *self.in_flight.values())
                if self.lease_until.get(id(message), math.inf) - now <= 2 * period
            ]
            if not due:
                continue
            try:
                await self.broker.extend_lease(due, self.lease)
            except Exception as exc:
                logger.warning("extending %d leases failed: %s", len(due), exc)
                continue
            until = self.clock.now() + self.lease
            for message in due:
                if id(message) in self.lease_until:
                    self.lease_until[id(message)] = until


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def idempotency_key(message: Message) -> str:
    """The key an idempotent handler's effect is recorded under: topic and key (or id)."""
    return f"{message.topic}:{message.key if message.key is not None else message.id}"
