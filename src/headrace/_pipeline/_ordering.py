"""Fan-out within one stage: N workers, a shared feed, and an in-order collector.

``workers=N`` runs N long-lived worker tasks that take *single items* from a shared
:class:`Feed` (so one slow item never holds up a whole chunk), plus one collector task
that owns the stage's output. Each item gets a sequence number when it is taken; the
collector emits results in that order (``ordered=True``) or as they complete.

The reorder window bounds memory: a worker may not take item ``seq`` until
``seq < released + window``, where ``released`` counts the results the collector has
passed on. A slow head item therefore stalls the stage after ``window`` items instead
of letting finished results pile up without limit. The same bound applies unordered,
so a stalled downstream cannot make the collector hoard results either.

Everything here runs on one event loop, so the shared state needs no locks: only the
points marked ``await`` can interleave.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable
from typing import Any

from .._clock import Clock
from .._errors import EndOfChannel, WouldBlock
from ._executors import StageCall
from ._stages import FILTER, MAP, ErrorHandler, emit
from ._stats import Link, StageCounters

__all__ = ["FanOut"]

_SKIPPED = object()


def _wake(waiters: deque[asyncio.Future[None]], count: int) -> None:
    while count > 0 and waiters:
        future = waiters.popleft()
        if not future.done():
            future.set_result(None)
            count -= 1


class FanOut:
    """The shared state of one fanned-out stage (see the module docstring)."""

    __slots__ = (
        "_active",
        "_call",
        "_chunk_size",
        "_clock",
        "_collector_wake",
        "_completed",
        "_ended",
        "_errors",
        "_fetching",
        "_items",
        "_mode",
        "_next_seq",
        "_ordered",
        "_output",
        "_released",
        "_results",
        "_source",
        "_taken",
        "_waiters",
        "_window",
        "counters",
    )

    def __init__(
        self,
        call: StageCall,
        mode: int,
        *,
        workers: int,
        ordered: bool,
        window: int,
        source: Link,
        output: Link,
        counters: StageCounters,
        errors: ErrorHandler,
        chunk_size: int,
        clock: Clock,
    ) -> None:
        self._call = call
        self._mode = mode
        self._ordered = ordered
        self._window = window
        self._source = source
        self._output = output
        self.counters = counters
        self._errors = errors
        self._chunk_size = chunk_size
        self._clock = clock
        self._active = workers
        # Feed state.
        self._items: deque[Any] = deque()
        self._taken = 0
        self._fetching = False
        self._ended = False
        self._waiters: deque[asyncio.Future[None]] = deque()
        # Collector state.
        self._released = 0
        self._next_seq = 0
        self._results: dict[int, Any] = {}
        self._completed: deque[Any] = deque()
        self._collector_wake: asyncio.Future[None] | None = None

    # -- feed --------------------------------------------------------------------

    async def _take(self) -> tuple[int, Any]:
        """The next item and its sequence number; EndOfChannel when the input ended."""
        loop = asyncio.get_running_loop()
        while True:
            items = self._items
            if items and self._taken - self._released < self._window:
                seq = self._taken
                self._taken = seq + 1
                item = items.popleft()
                if (
                    self._waiters
                    and (items or not self._ended)
                    and seq + 1 - self._released < self._window
                ):
                    # Chain wake-up: each worker that gets an item wakes one more while
                    # there may be work (items here, or more to fetch), so N workers
                    # start within N turns, one of them always watches the input, and
                    # a stage whose first worker does everything (a trivial fn) wakes
                    # one sleeper per window instead of all of them.
                    _wake(self._waiters, 1)
                return seq, item
            if not items and self._ended:
                raise EndOfChannel
            if items or self._fetching:
                # Window full, or another worker is already fetching the next chunk.
                future: asyncio.Future[None] = loop.create_future()
                self._waiters.append(future)
                await future
                continue
            self._fetching = True
            channel = self._source.channel
            try:
                try:
                    chunk = channel.receive_nowait()
                except WouldBlock:
                    chunk = await channel.receive()
            except EndOfChannel:
                self._ended = True
                _wake(self._waiters, len(self._waiters))
                raise
            finally:
                self._fetching = False
            self.counters.items_in += len(chunk)
            items.extend(chunk)
            # No wake-up here: the fetcher loops, takes an item and starts the chain.

    # -- workers -----------------------------------------------------------------

    async def worker(self) -> None:
        """One of the N long-lived workers of the stage."""
        call = self._call.call
        inline = self._call.inline
        mode = self._mode
        handle = self._errors.handle
        counters = self.counters
        now = self._clock.now
        items = self._items
        window = self._window
        ordered = self._ordered
        results = self._results
        completed = self._completed
        # Busy time is measured from one wait for input to the next, so a worker
        # that never waits reads the clock twice in all rather than twice per item.
        started = now()
        try:
            while True:
                if items and self._taken - self._released < window:
                    # Fast path: the next item is here and inside the window.
                    seq = self._taken
                    self._taken = seq + 1
                    item = items.popleft()
                else:
                    counters.busy += now() - started
                    try:
                        seq, item = await self._take()
                    finally:
                        started = now()
                value: Any
                try:
                    result = call(item) if inline else await call(item)
                except Exception as exc:
                    await handle(item, exc)
                    value = _SKIPPED
                else:
                    if mode == MAP:
                        value = result
                    elif mode == FILTER:
                        value = item if result else _SKIPPED
                    elif isinstance(result, AsyncIterable):
                        value = [element async for element in result]
                    else:
                        value = list(result)
                if ordered:
                    results[seq] = value
                    if seq == self._next_seq:
                        self._wake_collector()
                else:
                    completed.append(value)
                    self._wake_collector()
        except EndOfChannel:
            return
        finally:
            counters.busy += now() - started
            self._active -= 1
            if self._active == 0:
                self._wake_collector()

    def _wake_collector(self) -> None:
        future = self._collector_wake
        if future is not None and not future.done():
            future.set_result(None)

    # -- collector ---------------------------------------------------------------

    async def collector(self) -> None:
        """Emit results in order (or completion order) into the stage's output."""
        loop = asyncio.get_running_loop()
        output = self._output
        counters = self.counters
        chunk_size = self._chunk_size
        flatten = self._mode not in (MAP, FILTER)
        results = self._results
        completed = self._completed
        buffer: list[Any] = []
        while True:
            released = 0
            if self._ordered:
                seq = self._next_seq
                while seq in results:
                    value = results.pop(seq)
                    seq += 1
                    if value is not _SKIPPED:
                        if flatten:
                            buffer.extend(value)
                        else:
                            buffer.append(value)
                released = seq - self._next_seq
                self._next_seq = seq
            else:
                while completed:
                    value = completed.popleft()
                    released += 1
                    if value is not _SKIPPED:
                        if flatten:
                            buffer.extend(value)
                        else:
                            buffer.append(value)
            if released:
                self._released += released
                _wake(self._waiters, 1)  # the window moved: start a chain (see _take)
            if len(buffer) >= chunk_size:
                counters.items_out += len(buffer)
                await emit(output, buffer)
                buffer = []
                continue
            if released:
                continue
            if self._active == 0 and not results and not completed:
                break
            if buffer:
                # About to wait: flush the partial chunk rather than hold it back.
                counters.items_out += len(buffer)
                await emit(output, buffer)
                buffer = []
                continue
            self._collector_wake = loop.create_future()
            await self._collector_wake
            self._collector_wake = None
        if buffer:
            counters.items_out += len(buffer)
            await emit(output, buffer)
        output.channel.close()
