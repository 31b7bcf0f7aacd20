"""Time, injectable: the :class:`Clock` protocol, the default clock and a virtual clock.

Every timing primitive in headrace (deadlines, rate limiters, heartbeats, hedges,
supervisors, retries) reads time and sleeps through a :class:`Clock`. The default,
:class:`MonotonicClock`, reads the running event loop's time, so it agrees with
``asyncio.timeout`` and ``loop.call_at``. :class:`VirtualClock` runs an event loop whose
time only moves when every task is blocked: it then jumps straight to the next timer,
so tests assert exact times (``assert clock.now() == 0.25``) and run in milliseconds.

Why the ``looptime`` package drives it rather than a loop of our own: we wrote a
selector-wrapping loop first and compared the two (looptime 0.9). Both jump to the next
timer when idle and both let time flow while executor threads are busy, but looptime
keeps time as integer ticks, so three ``sleep(0.1)`` end at exactly ``0.3`` where ours
drifted to ``0.30000000000000004``; and it is maintained for exactly this job. It works
without its pytest plugin (``looptime.new_event_loop``), so :class:`VirtualClock` wraps
it into a :class:`Clock` that users can run with ``asyncio.Runner`` or our pytest plugin.
It is imported only when a virtual loop is made (``pip install headrace[testing]``).
"""

from __future__ import annotations

import asyncio
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


class VirtualClock:
    """A clock for tests: time stands still while tasks run and jumps when all wait.

    Create one, then run code on its loop with :meth:`run` (or pass
    :meth:`new_event_loop` as ``asyncio.Runner(loop_factory=...)``). Inside, every
    ``asyncio.sleep``, ``asyncio.timeout``, ``loop.call_later`` and headrace primitive
    sees virtual time, starting at ``start`` (0.0 by default) with a resolution of one
    microsecond. When no callback is ready and no I/O arrives for a few loop cycles,
    time moves to the next timer at once. While executor threads are running, time
    flows at real speed instead, so a thread gets to answer before a virtual timeout
    fires. Do not test real network I/O on a virtual clock: a reply that takes a real
    millisecond loses the race against any pending timer.

    Time is kept in whole microseconds, which is what makes ``0.1 + 0.2`` come out as
    ``0.3``. The flip side: a float deadline like ``0.14 + 0.01``
    (``0.15000000000000002``) is reached when ``now()`` says ``0.15``, so a loop that
    re-arms a timer while ``now() < deadline`` spins; compare with a margin of 1e-6 s.

    One clock drives one loop at a time; it is not thread-safe.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._start = float(start)
        self._loop: asyncio.AbstractEventLoop | None = None

    def now(self) -> float:
        return self._loop.time() if self._loop is not None else self._start

    async def sleep(self, seconds: float) -> None:
        await _DEFAULT_CLOCK.sleep(seconds)

    async def sleep_until(self, deadline: float) -> None:
        await _DEFAULT_CLOCK.sleep_until(deadline)

    def call_at(self, when: float, callback: Callable[[], object]) -> TimerHandle:
        return _DEFAULT_CLOCK.call_at(when, callback)

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        """Return a new event loop that runs on this clock's virtual time."""
        try:
            import looptime
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise ImportError(
                "VirtualClock needs the looptime package: pip install 'headrace[testing]'"
            ) from exc
        start = self.now()
        loop: asyncio.AbstractEventLoop = looptime.new_event_loop(start=start)
        self._loop = loop
        return loop

    def run(self, main: Coroutine[Any, Any, _T], *, debug: bool | None = None) -> _T:
        """Run ``main`` to completion on a new virtual-time loop, like ``asyncio.run``."""
        with asyncio.Runner(loop_factory=self.new_event_loop, debug=debug) as runner:
            return runner.run(main)

    def __repr__(self) -> str:
        return f"VirtualClock(now={self.now()!r})"
