"""Time, injectable: the :class:`Clock` protocol, the default clock and a virtual clock.

Every timing primitive in headrace (deadlines, rate limiters, heartbeats, hedges,
supervisors, retries) reads time and sleeps through a :class:`Clock`. The default,
:class:`MonotonicClock`, reads the running event loop's time, so it agrees with
``asyncio.timeout`` and ``loop.call_at``. :class:`VirtualClock` runs an event loop whose
time only moves when every task is blocked: it then jumps straight to the next timer,
so tests assert exact times (``assert clock.now() == 0.25``) and run in milliseconds.

Why a loop of our own and not the ``looptime`` package (both tried here): looptime keeps
time as integer microseconds, which makes ``0.1 + 0.2`` come out as ``0.3``, but asyncio
runs a timer when ``when < time() + 1e-9``; a timer due a fraction of a microsecond past
a tick then runs while ``now() < when``, and code that re-checks ``now < due`` and
re-arms spins forever at one virtual instant (it hung our randomized-cancellation run
and a worker test; a dozen lines reproduce it). Our loop jumps time to exactly the
``when`` of the next timer, as trio's ``MockClock`` does, so a woken sleeper always
sees ``now() >= when``; sums of sleeps follow ordinary float arithmetic (assert exact
times with representable values like 0.25, or ``pytest.approx``). While executor
threads are in flight, time flows at real speed instead, never past the next timer.
"""

from __future__ import annotations

import asyncio
import selectors
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = ["Clock", "MonotonicClock", "TimerHandle", "VirtualClock", "default_clock"]

_T = TypeVar("_T")


@runtime_checkable
class TimerHandle(Protocol):
    """A scheduled callback that can be cancelled (``asyncio.TimerHandle`` fits)."""

    def cancel(self) -> None: ...


@runtime_checkable
class Clock(Protocol):
    """Where headrace's primitives read the time and wait.

    ``now()`` is in seconds on an arbitrary monotonic scale; only differences matter.
    ``sleep_until`` and ``call_at`` take absolute times on that scale. Implementations
    must be safe to share between tasks of one event loop.
    """

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...

    async def sleep_until(self, deadline: float) -> None: ...

    def call_at(self, when: float, callback: Callable[[], object]) -> TimerHandle: ...


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class MonotonicClock:
    """The default clock: the running event loop's monotonic time.

    Under a :class:`VirtualClock` loop it reads virtual time too, so code that forgot to
    pass a clock still runs deterministically in tests. Outside a running loop it falls
    back to ``time.monotonic()`` (the same scale the default loop uses).
    """

    __slots__ = ()

    def now(self) -> float:
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:
            return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        await self.sleep_until(self.now() + seconds)

    async def sleep_until(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        if deadline <= loop.time():
            await asyncio.sleep(0)
            return
        # call_at with the exact deadline (not call_later with a difference) so that a
        # virtual loop wakes the sleeper at precisely ``deadline``.
        future: asyncio.Future[None] = loop.create_future()
        handle = loop.call_at(deadline, _wake, future)
        try:
            await future
        finally:
            handle.cancel()

    def call_at(self, when: float, callback: Callable[[], object]) -> TimerHandle:
        return asyncio.get_running_loop().call_at(when, callback)

    def __repr__(self) -> str:
        return "MonotonicClock()"


_DEFAULT_CLOCK = MonotonicClock()


def default_clock() -> Clock:
    """Return the process-wide :class:`MonotonicClock`."""
    return _DEFAULT_CLOCK


class _VirtualSelector:
    """Wraps a real selector: polls real I/O, and jumps time instead of blocking."""

    def __init__(self, selector: selectors.BaseSelector, clock: VirtualClock) -> None:
        self._selector = selector
        self._clock = clock
        self.loop: _VirtualTimeLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = self._selector.select(0)
        if events or (timeout is not None and timeout <= 0):
            return events
        loop = self.loop
        assert loop is not None
        next_when = loop._next_timer()
        if loop._threads_in_flight > 0 or next_when is None:
            # A worker thread is busy (or nothing is scheduled at all): wait for real,
            # and let virtual time flow at real speed meanwhile, never past the next timer.
            started = time.monotonic()
            events = self._selector.select(timeout)
            if next_when is not None:
                elapsed = time.monotonic() - started
                self._clock._now = min(self._clock._now + elapsed, next_when)
                if not events:
                    self._clock._now = max(self._clock._now, next_when)
            return events
        # Every task is blocked: jump to exactly the next timer's time.
        self._clock._now = max(self._clock._now, next_when)
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._selector, name)


class _VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose ``time()`` is a :class:`VirtualClock`'s."""

    def __init__(self, clock: VirtualClock) -> None:
        selector = _VirtualSelector(selectors.DefaultSelector(), clock)
        super().__init__(selector)  # type: ignore[arg-type]
        selector.loop = self
        self._virtual_clock = clock
        self._threads_in_flight = 0

    def time(self) -> float:
        return self._virtual_clock._now

    def _next_timer(self) -> float | None:
        # The loop keeps its timers in a heap; its head is the next deadline. The loop
        # pops cancelled heads before it computes the select timeout.
        scheduled: list[asyncio.TimerHandle] = self._scheduled  # type: ignore[attr-defined]
        for handle in scheduled[:1]:
            return handle.when()
        return None

    def run_in_executor(  # type: ignore[override]  # same call, looser annotations
        self, executor: Any, func: Callable[..., _T], *args: Any
    ) -> Any:
        future = super().run_in_executor(executor, func, *args)
        self._threads_in_flight += 1

        def _done(_: object) -> None:
            self._threads_in_flight -= 1

        future.add_done_callback(_done)
        return future


class VirtualClock:
    """A clock for tests: time stands still while tasks run and jumps when all wait.

    Create one, then run code on its loop with :meth:`run` (or pass
    :meth:`new_event_loop` as ``asyncio.Runner(loop_factory=...)``). Inside, every
    ``asyncio.sleep``, ``asyncio.timeout``, ``loop.call_later`` and headrace primitive
    sees virtual time, starting at ``start`` (0.0 by default). When no callback is
    ready and no I/O is pending, the loop moves time to exactly the next timer's
    ``when``. While executor threads are running, time flows at real speed instead, so
    a thread gets to answer before a virtual timeout fires. Do not test real network
    I/O on a virtual clock: a reply that takes a real millisecond loses the race
    against any pending timer.

    One clock drives one loop at a time; it is not thread-safe.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        await _DEFAULT_CLOCK.sleep(seconds)

    async def sleep_until(self, deadline: float) -> None:
        await _DEFAULT_CLOCK.sleep_until(deadline)

    def call_at(self, when: float, callback: Callable[[], object]) -> TimerHandle:
        return _DEFAULT_CLOCK.call_at(when, callback)

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        """Return a new event loop that runs on this clock's virtual time."""
        return _VirtualTimeLoop(self)

    def run(self, main: Coroutine[Any, Any, _T], *, debug: bool | None = None) -> _T:
        """Run ``main`` to completion on a new virtual-time loop, like ``asyncio.run``."""
        with asyncio.Runner(loop_factory=self.new_event_loop, debug=debug) as runner:
            return runner.run(main)

    def __repr__(self) -> str:
        return f"VirtualClock(now={self._now!r})"
