"""A bounded channel between tasks that tries the non-blocking path first.

:class:`Channel` is headrace's ``asyncio.Queue``: bounded, FIFO, closable by its
senders, cloneable for fan-in, iterable, with :meth:`Channel.statistics`. It is faster
than ``asyncio.Queue`` because the common case (room to send, an item to receive) is a
handful of attribute reads with no extra function calls, and a waiting task is woken
only when the condition it waits for has become true.

Cancellation semantics (the part that is easy to get wrong):

* ``receive()`` raising ``CancelledError`` consumed nothing. A receiver woken for an
  item but cancelled before it ran passes the wake-up on, so the item is not stranded.
* ``send()`` raising ``CancelledError`` sent nothing. A sender woken for a free slot
  reserves that slot; if it is cancelled before it ran, the reservation passes to the
  next waiting sender (or is released), so no slot is lost and no item is duplicated.
* Sends complete in FIFO order: a slot freed while senders wait is reserved for the
  oldest of them, so a newcomer cannot overtake a waiting sender.

A channel that never blocks would never give the event loop a chance to deliver a
cancellation, so ``send()`` and ``receive()`` yield to the loop once every
:data:`CHECKPOINT_EVERY` operations, *before* doing anything (a cancellation delivered
there has moved no item).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

from ._errors import ClosedResourceError, ConfigurationError, EndOfChannel, WouldBlock

__all__ = ["CHECKPOINT_EVERY", "Channel", "ChannelStatistics"]

_T = TypeVar("_T")

#: send()/receive() yield to the event loop once per this many calls that did not wait.
#: A power of two so the check is a mask; 256 keeps the yield cost below 1 % of the
#: fast path while letting a busy producer notice cancellation within microseconds.
CHECKPOINT_EVERY = 256
_CHECKPOINT_MASK = CHECKPOINT_EVERY - 1


@dataclass(frozen=True, slots=True)
class ChannelStatistics:
    """A snapshot of a channel's state (see :meth:`Channel.statistics`).

    ``buffered``: items waiting to be received; ``open_senders``: handles (the channel
    and its clones) not closed yet; ``waiting_senders``/``waiting_receivers``: tasks
    blocked in ``send()``/``receive()``; ``items_sent``/``items_received``: totals
    since creation; ``closed``: whether the last handle has been closed.
    """

    capacity: int
    buffered: int
    open_senders: int
    waiting_senders: int
    waiting_receivers: int
    items_sent: int
    items_received: int
    closed: bool


class _State(Generic[_T]):
    """What every clone of one channel shares."""

    __slots__ = (
        "buffer",
        "capacity",
        "closed",
        "open_handles",
        "ops",
        "received",
        "receivers",
        "reserved",
        "senders",
        "sent",
    )

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buffer: deque[_T] = deque()
        # Futures of tasks waiting for an item / for a slot; a woken future is removed.
        self.receivers: deque[asyncio.Future[None]] = deque()
        self.senders: deque[asyncio.Future[None]] = deque()
        # Slots promised to woken senders that have not run yet (see module docstring).
        self.reserved = 0
        self.closed = False
        self.open_handles = 1
        self.sent = 0
        self.received = 0
        self.ops = 0


def _wake_first(waiters: deque[asyncio.Future[None]]) -> bool:
    """Wake the oldest waiter still waiting; return whether one was woken."""
    while waiters:
        future = waiters.popleft()
        if not future.done():
            future.set_result(None)
            return True
    return False


def _forget(waiters: deque[asyncio.Future[None]], future: asyncio.Future[None]) -> None:
    try:
        waiters.remove(future)
    except ValueError:
        pass


class Channel(Generic[_T]):
    """A bounded FIFO channel for passing items between tasks of one event loop.

    ``Channel(capacity)`` holds at most ``capacity`` items (an int >= 1); ``send()``
    waits while it is full, ``receive()`` while it is empty. Safe to share between
    tasks of one loop; not thread-safe. Use it instead of ``asyncio.Queue`` when you
    want an end-of-stream signal (``close()`` + :class:`EndOfChannel` / ``async for``),
    fan-in with several producers (:meth:`clone`), and about 1.5x the throughput
    (``benchmarks/channel.py``).

    Closing: every handle (the channel itself and each :meth:`clone`) belongs to one
    producer, who calls :meth:`close` (or uses ``async with``) when done sending. When
    the last handle is closed the channel is closed: receivers drain what is buffered,
    then get :class:`EndOfChannel`; waiting and later senders get
    :class:`ClosedResourceError`. Any handle can receive, closed or not::

        channel = Channel[int](64)

        async def produce() -> None:
            async with channel:          # closes this handle on exit
                for i in range(10):
                    await channel.send(i)

        async for item in channel:       # ends when every producer has closed
            print(item)
    """

    __slots__ = ("_buffer", "_closed", "_state")

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigurationError(
                f"Channel(capacity={capacity!r}) must be an int >= 1",
                code="invalid_channel_capacity",
            )
        self._state: _State[_T] = _State(capacity)
        self._buffer = self._state.buffer  # saves one attribute hop on the hot paths
        self._closed = False

    # -- sending -----------------------------------------------------------------

    def send_nowait(self, item: _T) -> None:
        """Put ``item`` in the channel now, or raise :class:`WouldBlock` if it is full.

        Raises :class:`ClosedResourceError` if this handle or the channel is closed.
        """
        state = self._state
        if self._closed or state.closed:
            self._raise_closed()
        buffer = self._buffer
        if len(buffer) + state.reserved >= state.capacity:
            raise WouldBlock
        buffer.append(item)
        state.sent += 1
        if state.receivers:
            _wake_first(state.receivers)

    async def send(self, item: _T) -> None:
        """Put ``item`` in the channel, waiting while it is full.

        If cancelled, the item was not sent. Raises :class:`ClosedResourceError` if
        this handle is closed, or the channel is closed before the item got in.
        """
        state = self._state
        state.ops += 1
        if not state.ops & _CHECKPOINT_MASK:
            await asyncio.sleep(0)
        if self._closed or state.closed:
            self._raise_closed()
        buffer = self._buffer
        if len(buffer) + state.reserved < state.capacity:
            buffer.append(item)
            state.sent += 1
            if state.receivers:
                _wake_first(state.receivers)
            return
        await self._send_slow(item)

    async def _send_slow(self, item: _T) -> None:
        state = self._state
        buffer = self._buffer
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        state.senders.append(future)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                # We were woken with a reserved slot but will not use it: hand it on.
                # (A close() in between already dropped every reservation.)
                if not state.closed:
                    state.reserved -= 1
                    self._offer_slot()
            else:
                _forget(state.senders, future)
            raise
        # Woken: either a slot is reserved for us, or the channel was closed.
        if state.closed:
            self._raise_closed()
        state.reserved -= 1
        buffer.append(item)
        state.sent += 1
        if state.receivers:
            _wake_first(state.receivers)

    def _offer_slot(self) -> None:
        """A slot freed up: reserve it for the oldest waiting sender, if any."""
        state = self._state
        if (
            state.senders
            and not state.closed
            and len(self._buffer) + state.reserved < state.capacity
            and _wake_first(state.senders)
        ):
            state.reserved += 1

    def _raise_closed(self) -> None:
        which = "this handle" if self._closed else "the channel"
        raise ClosedResourceError(
            f"send on a closed channel ({which} was closed)", code="channel_closed"
        )

    # -- receiving ---------------------------------------------------------------

    def receive_nowait(self) -> _T:
        """Take the oldest item now; raise :class:`WouldBlock` if there is none, or
        :class:`EndOfChannel` if the channel is closed and drained."""
        buffer = self._buffer
        if buffer:
            state = self._state
            item = buffer.popleft()
            state.received += 1
            if state.senders:
                self._offer_slot()
            return item
        if self._state.closed:
            raise EndOfChannel
        raise WouldBlock

    async def receive(self) -> _T:
        """Take the oldest item, waiting while the channel is empty.

        If cancelled, nothing was taken. Raises :class:`EndOfChannel` once the channel
        is closed and every buffered item has been received.
        """
        state = self._state
        state.ops += 1
        if not state.ops & _CHECKPOINT_MASK:
            await asyncio.sleep(0)
        buffer = self._buffer
        if buffer:
            item = buffer.popleft()
            state.received += 1
            if state.senders:
                self._offer_slot()
            return item
        return await self._receive_slow()

    async def _receive_slow(self) -> _T:
        state = self._state
        buffer = self._buffer
        loop = asyncio.get_running_loop()
        woken_before = False
        while True:
            if buffer:
                item = buffer.popleft()
                state.received += 1
                if state.senders:
                    self._offer_slot()
                return item
            if state.closed:
                raise EndOfChannel
            future: asyncio.Future[None] = loop.create_future()
            # A receiver woken for an item that someone else took keeps its place.
            if woken_before:
                state.receivers.appendleft(future)
            else:
                state.receivers.append(future)
            try:
                await future
            except BaseException:
                if future.done() and not future.cancelled():
                    # Woken for an item we will not take: wake the next receiver for it.
                    if buffer or state.closed:
                        _wake_first(state.receivers)
                else:
                    _forget(state.receivers, future)
                raise
            woken_before = True

    def __aiter__(self) -> Channel[_T]:
        return self

    async def __anext__(self) -> _T:
        # receive() inlined: one coroutine frame per item less on the hot path.
        state = self._state
        state.ops += 1
        if not state.ops & _CHECKPOINT_MASK:
            await asyncio.sleep(0)
        buffer = self._buffer
        if buffer:
            item = buffer.popleft()
            state.received += 1
            if state.senders:
                self._offer_slot()
            return item
        try:
            return await self._receive_slow()
        except EndOfChannel:
            raise StopAsyncIteration from None

    # -- lifecycle ---------------------------------------------------------------

    def clone(self) -> Channel[_T]:
        """Return another handle to the same channel, for one more producer.

        The channel closes when every handle has been closed. Raises
        :class:`ClosedResourceError` if this handle is already closed.
        """
        if self._closed or self._state.closed:
            self._raise_closed()
        other: Channel[_T] = Channel.__new__(Channel)
        other._state = self._state
        other._buffer = self._buffer
        other._closed = False
        self._state.open_handles += 1
        return other

    def close(self) -> None:
        """Close this handle (idempotent); the last one to close closes the channel.

        On closing the channel, waiting senders get :class:`ClosedResourceError` and
        waiting receivers drain the buffer, then get :class:`EndOfChannel`.
        """
        if self._closed:
            return
        self._closed = True
        state = self._state
        state.open_handles -= 1
        if state.open_handles > 0 or state.closed:
            return
        state.closed = True
        state.reserved = 0
        senders, state.senders = state.senders, deque()
        receivers, state.receivers = state.receivers, deque()
        for future in (*senders, *receivers):
            if not future.done():
                future.set_result(None)

    @property
    def closed(self) -> bool:
        """Whether this handle has been closed (not whether the channel has)."""
        return self._closed

    async def __aenter__(self) -> Channel[_T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def statistics(self) -> ChannelStatistics:
        """Return a snapshot: capacity, buffered items, waiters, counts, closed."""
        state = self._state
        return ChannelStatistics(
            capacity=state.capacity,
            buffered=len(state.buffer),
            open_senders=state.open_handles,
            waiting_senders=sum(1 for future in state.senders if not future.done()),
            waiting_receivers=sum(1 for future in state.receivers if not future.done()),
            items_sent=state.sent,
            items_received=state.received,
            closed=state.closed,
        )

    def __repr__(self) -> str:
        state = self._state
        return (
            f"Channel(capacity={state.capacity}, buffered={len(state.buffer)}, "
            f"closed={state.closed})"
        )
