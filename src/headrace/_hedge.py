"""Hedged and replicated requests: spend a little extra load to cut the latency tail.

A *hedged* call starts ``fn`` once and, if no answer came within ``delay``, starts it
again (up to ``max_attempts``); the first success wins and every other attempt is
cancelled **and awaited** (bounded by ``cancel_timeout``), so no attempt outlives the
call. "The Tail at Scale" (Dean & Barroso, 2013) measured this on BigTable: hedging
after the 95th-percentile latency cut the 99.9th percentile from 1,800 ms to 74 ms for
2 % more requests. gRPC's hedging policy (proposal A6) and Finagle's backup requests
add the parts reproduced here: a delay taken from a percentile of observed latency
(:class:`PercentileDelay`), a budget that caps the extra load (:class:`HedgeBudget`,
a ratio of calls plus a small token reserve), and *non-fatal* errors that fire the next
attempt at once instead of waiting for the delay.

Hedging is **opt-in per call**: every extra attempt repeats the request's side effects.
Hedge only idempotent operations (reads, idempotent writes, requests carrying an
idempotency key).

:func:`first_completed` is the replicated request of *Concurrency in Go* §5.4: the same
request sent at once to several different handlers (replicas, regions, caches).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from ._clock import Clock, TimerHandle, default_clock
from ._errors import ConfigurationError
from ._retry import default_retryable

__all__ = [
    "HedgeBudget",
    "HedgePolicy",
    "HedgeStatistics",
    "LatencyTracker",
    "LoadBudget",
    "PercentileDelay",
    "first_completed",
    "hedge",
]

_T = TypeVar("_T")

logger = logging.getLogger("headrace.hedge")

# Attempts that ignored cancellation past ``cancel_timeout``: referenced here until they
# end, so that they are neither garbage-collected while pending nor silently lost.
_STRAGGLERS: set[asyncio.Task[Any]] = set()

# A timer may fire a hair before the float time it was set for (the loop's clock
# resolution; a virtual loop rounds to microseconds). Within this margin a hedge is due;
# without it the timer would be re-armed for a time that already counts as "now".
_EPSILON = 1e-6


class LatencyTracker:
    """The last ``window`` latencies (seconds) and their percentiles.

    Keeps a ring buffer and a sorted copy, so ``record`` costs O(window) memmove at
    worst (a few microseconds at the default 1,000) and ``percentile`` O(1). Safe to
    share between tasks of one event loop.
    """

    __slots__ = ("_order", "_sorted", "window")

    def __init__(self, window: int = 1000) -> None:
        if not (isinstance(window, int) and window >= 1):
            raise ConfigurationError(f"LatencyTracker(window={window!r}) must be an int >= 1")
        self.window = window
        self._order: deque[float] = deque()
        self._sorted: list[float] = []

    def record(self, seconds: float) -> None:
        """Add one observation, forgetting the oldest once the window is full."""
        if len(self._order) == self.window:
            oldest = self._order.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, oldest)]
        self._order.append(seconds)
        bisect.insort(self._sorted, seconds)

    def percentile(self, percent: float) -> float | None:
        """The ``percent``-th percentile (nearest rank) of the window; ``None`` if empty."""
        if not self._sorted:
            return None
        rank = math.ceil(percent / 100.0 * len(self._sorted))
        return self._sorted[min(max(rank, 1), len(self._sorted)) - 1]

    def __len__(self) -> int:
        return len(self._order)

    def __repr__(self) -> str:
        return f"LatencyTracker(window={self.window}, samples={len(self._order)})"


class PercentileDelay:
    """A hedge delay that follows the ``percentile``-th latency of recent calls.

    The latency of each call's *first* attempt is recorded (when a hedge won, the first
    attempt's elapsed time at cancellation is recorded: a lower bound, which keeps it
    counted above the percentile). The delay is never below ``floor`` seconds, so a
    burst of fast answers cannot make every call hedge. Until ``min_samples`` latencies
    were seen the delay is ``initial`` seconds, or no time-based hedge at all when
    ``initial`` is ``None``. Keep one per remote operation and share it between calls
    (and tasks of one loop); :class:`HedgePolicy` does.
    """

    __slots__ = ("floor", "initial", "min_samples", "percentile", "tracker")

    def __init__(
        self,
        percentile: float = 95.0,
        *,
        window: int = 1000,
        floor: float = 0.001,
        min_samples: int = 20,
        initial: float | None = None,
    ) -> None:
        if not 0 < percentile < 100:
            raise ConfigurationError(
                f"PercentileDelay(percentile={percentile!r}) must be in (0, 100)"
            )
        if not floor >= 0:
            raise ConfigurationError(f"PercentileDelay(floor={floor!r}) must be >= 0 seconds")
        if min_samples < 1:
            raise ConfigurationError(f"PercentileDelay(min_samples={min_samples!r}) must be >= 1")
        if initial is not None and not (initial >= 0 and math.isfinite(initial)):
            raise ConfigurationError(f"PercentileDelay(initial={initial!r}) must be >= 0 seconds")
        self.percentile = float(percentile)
        self.floor = float(floor)
        self.min_samples = min_samples
        self.initial = initial
        self.tracker = LatencyTracker(window)

    def current(self) -> float | None:
        """The delay to use now (seconds), or ``None`` for "do not hedge on time yet"."""
        if len(self.tracker) < self.min_samples:
            return self.initial
        value = self.tracker.percentile(self.percentile)
        assert value is not None
        return max(self.floor, value)

    def record(self, seconds: float) -> None:
        self.tracker.record(seconds)

    def __repr__(self) -> str:
        return (
            f"PercentileDelay(percentile={self.percentile!r}, floor={self.floor!r}, "
            f"samples={len(self.tracker)}, current={self.current()!r})"
        )


@runtime_checkable
class LoadBudget(Protocol):
    """What a hedge needs from a budget: count calls, grant or refuse extra attempts.

    :class:`HedgeBudget` and :class:`~headrace.RetryBudget` both fit, so retries and
    hedges to one service can share a single budget, as Finagle does.
    """

    def record_request(self) -> None: ...

    def try_spend(self) -> bool: ...


class HedgeBudget:
    """Caps the extra attempts of hedged calls to a fraction of all calls.

    Each call deposits ``ratio`` of a token (0.05: at most 5 % extra load in the long
    run); each extra attempt takes one whole token and is not made without it. The
    balance never exceeds ``burst`` tokens (how many hedges may happen in a row after
    a quiet spell) and starts at ``initial`` (default: ``burst``). This is gRPC's
    throttling and Finagle's budget reduced to the part that matters for hedges; it
    counts calls, not time, so it needs no clock. Safe to share between tasks of one
    loop; share one per downstream service.
    """

    __slots__ = ("_tokens", "burst", "ratio")

    def __init__(self, ratio: float = 0.05, *, burst: float = 10.0, initial: float | None = None):
        if not 0 <= ratio <= 1:
            raise ConfigurationError(f"HedgeBudget(ratio={ratio!r}) must be within [0, 1]")
        if not burst >= 1:
            raise ConfigurationError(f"HedgeBudget(burst={burst!r}) must be >= 1 token")
        if initial is not None and not 0 <= initial <= burst:
            raise ConfigurationError(
                f"HedgeBudget(initial={initial!r}) must be within [0, burst={burst!r}]"
            )
        self.ratio = float(ratio)
        self.burst = float(burst)
        self._tokens = self.burst if initial is None else float(initial)

    @property
    def tokens(self) -> float:
        return self._tokens

    def record_request(self) -> None:
        """Count one call; it earns ``ratio`` of an extra attempt."""
        self._tokens = min(self.burst, self._tokens + self.ratio)

    def try_spend(self) -> bool:
        """Take one extra attempt from the budget if a whole token is there."""
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def __repr__(self) -> str:
        return f"HedgeBudget(ratio={self.ratio!r}, burst={self.burst!r}, tokens={self._tokens:.3g})"


@dataclass(frozen=True, slots=True)
class HedgeStatistics:
    """Counters of a :class:`HedgePolicy`.

    ``calls`` made, ``attempts`` started (first attempts included), ``wins_by_attempt``
    (index 0: calls won by the first attempt, 1: by the first hedge...), ``failures``
    (calls that raised), ``budget_denied`` (hedges the budget refused) and
    ``stragglers`` (cancelled attempts still running after ``cancel_timeout``).
    """

    calls: int
    attempts: int
    wins_by_attempt: tuple[int, ...]
    failures: int
    budget_denied: int
    stragglers: int

    @property
    def extra_attempts(self) -> int:
        return self.attempts - self.calls

    @property
    def extra_load(self) -> float:
        """Extra attempts per call (0.02 = 2 % more requests than without hedging)."""
        return self.extra_attempts / self.calls if self.calls else 0.0


def _is_non_fatal(
    predicate: Callable[[BaseException], bool] | tuple[type[BaseException], ...],
    exc: BaseException,
) -> bool:
    if not isinstance(exc, Exception):
        return False
    if isinstance(predicate, tuple):
        return isinstance(exc, predicate)
    return predicate(exc)


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _retrieve(task: asyncio.Task[Any]) -> None:
    # Mark the outcome as retrieved: a loser's error is not news to anyone.
    if not task.cancelled():
        task.exception()


class HedgePolicy:
    """Hedged calls with shared latency tracking, budget and statistics.

    ``delay`` is seconds (``0.05``) or a :class:`PercentileDelay`; the next attempt
    starts ``delay`` after the previous one unless an answer came first. ``max_attempts``
    counts every attempt (``2`` = one hedge at most). ``budget`` (a :class:`HedgeBudget`,
    a :class:`~headrace.RetryBudget`, or ``None`` for no cap) may refuse hedges.
    An attempt that fails with a *non-fatal* error (by default what
    :func:`~headrace._retry.default_retryable` accepts: transient headrace errors,
    timeouts, connection errors) starts the next attempt at once; any other error
    ends the call with that error. When every attempt failed, the last error is raised.
    ``cancel_timeout`` bounds how long a call waits for cancelled losers to finish
    (``None``: as long as they take); a loser that outlives it is logged, kept
    referenced until it ends, and counted in ``stragglers``.

    Cost: each call runs its attempts in tasks; a call answered before the delay
    costs about 15 µs of CPU more than a plain ``await`` (measured by
    ``benchmarks/hedge.py`` on a shared 2-core machine), noise next to a network call.

    Safe to share between tasks of one loop; keep one per remote operation. Prefer
    :func:`hedge` for a one-off call and :func:`first_completed` for different
    handlers. Hedging duplicates side effects: use it for idempotent operations only::

        lookup = HedgePolicy(delay=PercentileDelay(95), budget=HedgeBudget(0.05))
        row = await lookup.call(lambda: replica.get(key))
        print(lookup.statistics().extra_load)
    """

    __slots__ = (
        "_attempts",
        "_budget_denied",
        "_calls",
        "_clock",
        "_failures",
        "_stragglers",
        "_wins",
        "budget",
        "cancel_timeout",
        "delay",
        "max_attempts",
        "non_fatal",
    )

    def __init__(
        self,
        *,
        delay: float | PercentileDelay,
        max_attempts: int = 2,
        budget: LoadBudget | None = None,
        non_fatal: Callable[[BaseException], bool]
        | tuple[type[BaseException], ...] = default_retryable,
        cancel_timeout: float | None = 1.0,
        clock: Clock | None = None,
    ) -> None:
        if not isinstance(delay, PercentileDelay) and not (
            isinstance(delay, int | float) and delay >= 0 and math.isfinite(delay)
        ):
            raise ConfigurationError(
                f"hedge delay={delay!r} must be seconds >= 0 or a PercentileDelay"
            )
        if not (isinstance(max_attempts, int) and max_attempts >= 1):
            raise ConfigurationError(f"hedge max_attempts={max_attempts!r} must be an int >= 1")
        if cancel_timeout is not None and not cancel_timeout >= 0:
            raise ConfigurationError(
                f"hedge cancel_timeout={cancel_timeout!r} must be >= 0 seconds or None"
            )
        if budget is not None and not isinstance(budget, LoadBudget):
            raise ConfigurationError(
                f"hedge budget={budget!r} needs record_request() and try_spend()"
            )
        self.delay = delay
        self.max_attempts = max_attempts
        self.budget = budget
        self.non_fatal = non_fatal
        self.cancel_timeout = cancel_timeout
        self._clock = clock or default_clock()
        self._calls = 0
        self._attempts = 0
        self._wins = [0] * max_attempts
        self._failures = 0
        self._budget_denied = 0
        self._stragglers = 0

    def current_delay(self) -> float | None:
        """Seconds before the next hedge right now (``None``: no time-based hedge)."""
        if isinstance(self.delay, PercentileDelay):
            return self.delay.current()
        return float(self.delay)

    async def call(self, fn: Callable[[], Awaitable[_T]], /) -> _T:
        """Await ``fn()``, hedged per this policy; return the first success."""
        if not callable(fn):
            raise ConfigurationError(f"HedgePolicy.call(fn={fn!r}) needs a callable")

        async def attempt(_: int) -> _T:
            return await fn()

        if self.budget is not None:
            self.budget.record_request()
        tracker = self.delay if isinstance(self.delay, PercentileDelay) else None
        return await self._race(
            attempt,
            attempts=self.max_attempts,
            delay=self.current_delay(),
            non_fatal=lambda exc: _is_non_fatal(self.non_fatal, exc),
            spend=self.budget.try_spend if self.budget is not None else None,
            record=tracker.record if tracker is not None else None,
        )

    async def _race(
        self,
        start_attempt: Callable[[int], Coroutine[Any, Any, _T]],
        *,
        attempts: int,
        delay: float | None,
        non_fatal: Callable[[BaseException], bool],
        spend: Callable[[], bool] | None,
        record: Callable[[float], None] | None,
    ) -> _T:
        clock = self._clock
        loop = asyncio.get_running_loop()
        started = clock.now()
        self._calls += 1
        tasks: list[asyncio.Task[_T]] = []
        running: list[asyncio.Task[_T]] = []
        wake: asyncio.Future[None] | None = None
        timer: TimerHandle | None = None
        next_hedge = math.inf
        owed = 0  # attempts owed right away to replace non-fatal failures
        refused = False
        last_error: BaseException | None = None
        won = False

        def poke(_: object = None) -> None:
            if wake is not None and not wake.done():
                wake.set_result(None)

        def launch() -> None:
            nonlocal next_hedge
            number = len(tasks)
            task = loop.create_task(start_attempt(number), name=f"hedge attempt {number + 1}")
            task.add_done_callback(_retrieve)
            task.add_done_callback(poke)
            tasks.append(task)
            running.append(task)
            self._attempts += 1
            next_hedge = clock.now() + delay if delay is not None else math.inf

        try:
            launch()
            while True:
                # Outcomes in launch order, so that of two answers in the same instant
                # the earlier attempt wins (deterministic statistics).
                for task in [task for task in running if task.done()]:
                    running.remove(task)
                    if task.cancelled():
                        owed += 1  # cancelled from outside: treat as a non-fatal failure
                        continue
                    exc = task.exception()
                    if exc is None:
                        number = tasks.index(task)
                        self._wins[number] += 1
                        won = True
                        if record is not None and number == 0:
                            record(clock.now() - started)
                        return task.result()
                    if not non_fatal(exc):
                        raise exc
                    last_error = exc
                    owed += 1
                now = clock.now()
                while (
                    len(tasks) < attempts
                    and not refused
                    and (owed > 0 or now >= next_hedge - _EPSILON)
                ):
                    if spend is not None and not spend():
                        self._budget_denied += 1
                        refused = True
                        break
                    owed = max(0, owed - 1)
                    launch()
                if not running:
                    assert last_error is not None or not tasks
                    if last_error is None:  # only cancelled attempts: nothing better to say
                        raise asyncio.CancelledError()
                    if len(tasks) > 1:
                        last_error.add_note(
                            f"headrace.hedge: all {len(tasks)} attempts failed; last error shown"
                        )
                    raise last_error
                wake = loop.create_future()
                if len(tasks) < attempts and not refused and math.isfinite(next_hedge):
                    timer = clock.call_at(next_hedge, poke)
                try:
                    await wake
                finally:
                    if timer is not None:
                        timer.cancel()
                        timer = None
        except BaseException:
            if not won:
                self._failures += 1
            raise
        finally:
            losers = [task for task in tasks if not task.done()]
            if losers:
                if record is not None and tasks[0] in losers and won:
                    # A lower bound of the first attempt's latency (it was still running).
                    record(clock.now() - started)
                for task in losers:
                    task.cancel()
                await self._await_losers(losers)

    async def _await_losers(self, losers: list[asyncio.Task[Any]]) -> None:
        loop = asyncio.get_running_loop()
        remaining = [task for task in losers if not task.done()]
        if not remaining:
            return
        all_done: asyncio.Future[None] = loop.create_future()

        def check(_: object = None) -> None:
            if not all_done.done() and all(task.done() for task in remaining):
                all_done.set_result(None)

        for task in remaining:
            task.add_done_callback(check)
        timer: TimerHandle | None = None
        if self.cancel_timeout is not None:
            timer = self._clock.call_at(
                self._clock.now() + self.cancel_timeout,
                lambda: _set_done(all_done),
            )
        try:
            await all_done
        finally:
            if timer is not None:
                timer.cancel()
            for task in remaining:
                task.remove_done_callback(check)
        for task in remaining:
            if not task.done():
                self._stragglers += 1
                _STRAGGLERS.add(task)
                task.add_done_callback(_STRAGGLERS.discard)
                logger.warning(
                    "hedge: cancelled %s still running after cancel_timeout=%s s",
                    task.get_name(),
                    self.cancel_timeout,
                )

    def statistics(self) -> HedgeStatistics:
        """A snapshot of the counters."""
        return HedgeStatistics(
            calls=self._calls,
            attempts=self._attempts,
            wins_by_attempt=tuple(self._wins),
            failures=self._failures,
            budget_denied=self._budget_denied,
            stragglers=self._stragglers,
        )

    def __repr__(self) -> str:
        return (
            f"HedgePolicy(delay={self.delay!r}, max_attempts={self.max_attempts}, "
            f"budget={self.budget!r})"
        )


async def hedge(
    fn: Callable[[], Awaitable[_T]],
    *,
    delay: float | PercentileDelay,
    max_attempts: int = 2,
    budget: LoadBudget | None = None,
    non_fatal: Callable[[BaseException], bool]
    | tuple[type[BaseException], ...] = default_retryable,
    cancel_timeout: float | None = 1.0,
    clock: Clock | None = None,
) -> _T:
    """Await ``fn()``; if it has not answered after ``delay`` seconds, start it again.

    The first success wins; the other attempts are cancelled and awaited (at most
    ``cancel_timeout`` seconds) before this returns. ``delay`` is seconds or a shared
    :class:`PercentileDelay`; ``max_attempts`` counts the first attempt; ``budget``
    (default ``None``: no cap beyond ``max_attempts``) may refuse hedges; a non-fatal
    error starts the next attempt at once. See :class:`HedgePolicy` for the details
    and for statistics across calls.

    Opt in per call, for idempotent operations only: a hedge repeats side effects::

        user = await hedge(lambda: users.get(user_id), delay=0.05)
    """
    policy = HedgePolicy(
        delay=delay,
        max_attempts=max_attempts,
        budget=budget,
        non_fatal=non_fatal,
        cancel_timeout=cancel_timeout,
        clock=clock,
    )
    return await policy.call(fn)


async def first_completed(
    *callables: Callable[[], Awaitable[_T]],
    cancel_timeout: float | None = 1.0,
    clock: Clock | None = None,
) -> _T:
    """Start every callable at once and return the first success (replicated request).

    Send the same request to *different* handlers (replicas, regions, a cache and the
    database); the others are cancelled and awaited (at most ``cancel_timeout``
    seconds) before this returns. A handler that fails does not end the race while
    another may still answer; when all fail, the last error is raised. Like
    :func:`hedge`, it repeats side effects: idempotent requests only::

        page = await first_completed(lambda: mirror_a.get(url), lambda: mirror_b.get(url))
    """
    if not callables:
        raise ConfigurationError("first_completed() needs at least one callable")
    for index, candidate in enumerate(callables):
        if not callable(candidate):
            raise ConfigurationError(
                f"first_completed() argument {index} is {candidate!r}, not a callable"
            )
    policy = HedgePolicy(
        delay=0.0, max_attempts=len(callables), cancel_timeout=cancel_timeout, clock=clock
    )

    async def attempt(number: int) -> _T:
        return await callables[number]()

    return await policy._race(
        attempt,
        attempts=len(callables),
        delay=0.0,
        non_fatal=lambda exc: isinstance(exc, Exception),
        spend=None,
        record=None,
    )
