"""Heartbeats: a concurrent process tells the outside that it is alive and progressing.

Two kinds, as in *Concurrency in Go* §5.3:

* **per unit of work** — :meth:`Heartbeat.beat` at the start (or end) of each unit; a
  test or a monitor then knows exactly when work happened, which makes otherwise
  nondeterministic tests deterministic;
* **per interval** — :meth:`Heartbeat.tick` from inside a long-running loop (it beats
  only when ``interval`` seconds have passed since the last pulse, so calling it on
  every iteration is cheap), or ``async with heartbeat.pulsing():`` around a wait that
  is expected to be long (waiting for input), which keeps pulsing from a loop timer.

A beat never blocks the worker. It always records ``last_beat`` and ``details``; it is
*delivered* only to monitors that are listening: tasks inside :meth:`Heartbeat.wait`,
and async iterators, each of which buffers at most one pulse (Go's buffered channel of
one with ``select``/``default``). A beat nobody listens for is dropped and counted.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ._clock import Clock, TimerHandle, default_clock
from ._errors import ClosedResourceError, ConfigurationError

__all__ = ["Heartbeat", "HeartbeatStatistics", "Pulse"]


@dataclass(frozen=True, slots=True)
class Pulse:
    """One heartbeat: when it happened (clock seconds), its sequence number (1-based)
    and the details the worker attached (a checkpoint, progress; ``None`` if none)."""

    time: float
    sequence: int
    details: Any = None


@dataclass(frozen=True, slots=True)
class HeartbeatStatistics:
    """Counters of a :class:`Heartbeat`: beats made, beats delivered to no listener
    (``dropped``), listeners right now, and the time of the last beat (``None`` if none)."""

    beats: int
    dropped: int
    waiting: int
    subscribers: int
    last_beat: float | None


class _Subscriber:
    """One async iterator's mailbox: at most one undelivered pulse."""

    __slots__ = ("pending", "waiter")

    def __init__(self) -> None:
        self.pending: Pulse | None = None
        self.waiter: asyncio.Future[Pulse | None] | None = None


class Heartbeat:
    """A liveness signal from a worker to its monitors (a steward, a test, a broker lease).

    ``interval`` (seconds, or ``None``) is the period of interval pulses made with
    :meth:`tick` and :meth:`pulsing`; per-unit beats with :meth:`beat` need none.
    ``details`` seeds :attr:`details`, e.g. the checkpoint a previous attempt left.

    The worker side (:meth:`beat`, :meth:`tick`) never blocks and never raises on a
    missing listener. The monitor side is :meth:`wait` (next beat or ``None`` after a
    timeout), ``async for pulse in heartbeat`` (ends after :meth:`close`) and the
    :attr:`last_beat` / :attr:`details` attributes, which a watchdog can poll without
    subscribing. Safe to share between tasks of one event loop (not between threads).
    Reads time only through ``clock``::

        heartbeat = Heartbeat(1.0)

        async def worker() -> None:
            async for job in jobs:
                heartbeat.beat({"offset": job.offset})  # per unit of work
                await handle(job)

        pulse = await heartbeat.wait(timeout=3.0)
        if pulse is None:
            ...  # silent for 3 s: the worker is stuck

    Use :class:`Heartbeat` to observe *progress*; use a deadline to bound one call.
    """

    __slots__ = (
        "_beats",
        "_clock",
        "_closed",
        "_details",
        "_dropped",
        "_last_beat",
        "_last_tick",
        "_subscribers",
        "_waiters",
        "interval",
    )

    def __init__(
        self, interval: float | None = None, *, clock: Clock | None = None, details: Any = None
    ) -> None:
        if interval is not None and not (isinstance(interval, int | float) and interval > 0):
            raise ConfigurationError(
                f"Heartbeat(interval={interval!r}) must be a number of seconds > 0 or None"
            )
        if interval is not None and not math.isfinite(interval):
            raise ConfigurationError(f"Heartbeat(interval={interval!r}) must be finite")
        self.interval = None if interval is None else float(interval)
        self._clock = clock or default_clock()
        self._details = details
        self._last_beat: float | None = None
        self._last_tick: float | None = None
        self._beats = 0
        self._dropped = 0
        self._closed = False
        self._waiters: list[asyncio.Future[Pulse | None]] = []
        self._subscribers: set[_Subscriber] = set()

    # -- worker side -----------------------------------------------------------------

    def beat(self, details: Any = None) -> Pulse:
        """Record a pulse now and hand it to whoever listens; never blocks.

        ``details`` (a checkpoint, progress) replaces :attr:`details` unless ``None``,
        so a beat without details keeps the last checkpoint. Returns the pulse.
        Beating a closed heartbeat raises :class:`ClosedResourceError`.
        """
        if self._closed:
            raise ClosedResourceError("beat() on a closed Heartbeat")
        now = self._clock.now()
        self._beats += 1
        self._last_beat = now
        self._last_tick = now
        if details is not None:
            self._details = details
        pulse = Pulse(now, self._beats, self._details)
        delivered = False
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(pulse)
                    delivered = True
        for subscriber in self._subscribers:
            waiter_ = subscriber.waiter
            if waiter_ is not None and not waiter_.done():
                subscriber.waiter = None
                waiter_.set_result(pulse)
                delivered = True
            elif subscriber.pending is None:
                subscriber.pending = pulse
                delivered = True
        if not delivered:
            self._dropped += 1
        return pulse

    def tick(self, details: Any = None) -> bool:
        """Beat if ``interval`` seconds have passed since the last pulse; return whether
        it did. Cheap: call it on every iteration of a long-running loop. Needs an
        ``interval``."""
        if self.interval is None:
            raise ConfigurationError("tick() needs Heartbeat(interval=...) to be set")
        last = self._last_tick
        # The margin absorbs float error (1.3 + 1.0 vs 2.3) and timer resolution.
        if last is not None and self._clock.now() < last + self.interval - 1e-9:
            return False
        self.beat(details)
        return True

    @contextmanager
    def pulsing(self, details: Any = None) -> Iterator[Heartbeat]:
        """Beat every ``interval`` seconds from a loop timer while the block runs.

        For waits that are legitimately long (waiting for input, a slow dependency):
        the monitor keeps hearing "alive, nothing to do" without a helper task. It
        proves that the event loop runs, not that the block progresses, so keep it
        around waits only and beat per unit of work elsewhere. Beats once on entry.
        """
        interval = self.interval
        if interval is None:
            raise ConfigurationError("pulsing() needs Heartbeat(interval=...) to be set")
        handle: TimerHandle | None = None
        active = True

        def fire(when: float) -> None:
            nonlocal handle
            if not active or self._closed:
                return
            self.beat(details)
            handle = self._clock.call_at(when + interval, lambda: fire(when + interval))

        start = self._clock.now()
        self.beat(details)
        handle = self._clock.call_at(start + interval, lambda: fire(start + interval))
        try:
            yield self
        finally:
            active = False
            handle.cancel()

    def close(self) -> None:
        """Say the work is over: iterators end after their buffered pulse, waiters get
        ``None``. Idempotent."""
        if self._closed:
            return
        self._closed = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        for subscriber in self._subscribers:
            if subscriber.waiter is not None and not subscriber.waiter.done():
                subscriber.waiter.set_result(None)
                subscriber.waiter = None

    # -- monitor side ----------------------------------------------------------------

    @property
    def last_beat(self) -> float | None:
        """Clock time of the last beat, ``None`` before the first."""
        return self._last_beat

    @property
    def details(self) -> Any:
        """The details of the last beat that carried any (the latest checkpoint)."""
        return self._details

    @property
    def beats(self) -> int:
        """How many beats were made."""
        return self._beats

    @property
    def closed(self) -> bool:
        return self._closed

    def silent_for(self, since: float | None = None) -> float:
        """Seconds since the last beat, or since ``since`` if that is later (e.g. when
        the worker started) — what a watchdog compares with its timeout."""
        reference = self._last_beat
        if since is not None and (reference is None or since > reference):
            reference = since
        if reference is None:
            return math.inf
        return self._clock.now() - reference

    async def wait(self, timeout: float | None = None) -> Pulse | None:
        """Wait for the next beat and return it; ``None`` after ``timeout`` seconds of
        silence or when the heartbeat is closed. ``timeout=None`` waits forever."""
        if self._closed:
            return None
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Pulse | None] = loop.create_future()
        self._waiters.append(waiter)
        handle: TimerHandle | None = None
        if timeout is not None:
            handle = self._clock.call_at(
                self._clock.now() + timeout, lambda: _resolve(waiter, None)
            )
        try:
            return await waiter
        finally:
            if handle is not None:
                handle.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def __aiter__(self) -> AsyncIterator[Pulse]:
        """Iterate over pulses from now on, one buffered at most; ends after close()."""
        # Subscribe now, not at the first __anext__, so that no beat made between
        # ``aiter()`` and the first ``anext()`` is lost.
        subscriber = _Subscriber()
        self._subscribers.add(subscriber)
        return self._iterate(subscriber)

    async def _iterate(self, subscriber: _Subscriber) -> AsyncIterator[Pulse]:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if subscriber.pending is not None:
                    pulse, subscriber.pending = subscriber.pending, None
                    yield pulse
                    continue
                if self._closed:
                    return
                waiter: asyncio.Future[Pulse | None] = loop.create_future()
                subscriber.waiter = waiter
                try:
                    received = await waiter
                finally:
                    subscriber.waiter = None
                if received is None:
                    return
                yield received
        finally:
            self._subscribers.discard(subscriber)

    def statistics(self) -> HeartbeatStatistics:
        """A snapshot of the counters."""
        return HeartbeatStatistics(
            beats=self._beats,
            dropped=self._dropped,
            waiting=sum(1 for waiter in self._waiters if not waiter.done()),
            subscribers=len(self._subscribers),
            last_beat=self._last_beat,
        )

    def __repr__(self) -> str:
        return (
            f"Heartbeat(interval={self.interval!r}, beats={self._beats}, "
            f"last_beat={self._last_beat!r}, closed={self._closed!r})"
        )


def _resolve(future: asyncio.Future[Pulse | None], value: Pulse | None) -> None:
    if not future.done():
        future.set_result(value)
