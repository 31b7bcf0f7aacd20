"""Retry policies: exponential backoff with jitter, a time budget, and retry budgets.

A :class:`Retry` is an immutable description (safe to share between tasks and to put
in module-level constants); :meth:`Retry.call` runs a coroutine function under it.
The decision parts (:meth:`Retry.is_retryable`, :meth:`Retry.backoff`) are pure, so
the worker can use the same policy to compute a delayed-nack time instead of sleeping.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from ._clock import Clock, default_clock
from ._errors import ConfigurationError, HeadraceError

__all__ = ["Retry", "RetryBudget", "default_retryable"]

_T = TypeVar("_T")

Jitter = Literal["full", "equal", "none"]


def default_retryable(exc: BaseException) -> bool:
    """Retry what is likely to pass next time: transient headrace errors, timeouts and
    connection failures. Never cancellation, never bugs."""
    if isinstance(exc, HeadraceError):
        return exc.transient
    return isinstance(exc, TimeoutError | ConnectionError)


@dataclass(frozen=True, slots=True)
class Retry:
    """How often and how patiently to try again.

    ``max_attempts`` counts every try, the first included (``1`` = never retry).
    Delays grow ``initial_delay * multiplier**(failures-1)`` up to ``max_delay``
    seconds; ``jitter="full"`` draws uniformly from ``[0, delay]`` (AWS's "full
    jitter", which spreads a thundering herd best), ``"equal"`` from
    ``[delay/2, delay]``. ``budget`` caps the total seconds spent across attempts and
    waits: a retry whose wait would pass it is not made. ``retry_on`` is a predicate or
    a tuple of exception types; by default transient errors, timeouts and connection
    errors are retried (:func:`default_retryable`). An exception with a ``retry_after``
    attribute (seconds, e.g. from HTTP 429) waits at least that long.
    """

    max_attempts: int = 3
    initial_delay: float = 0.1
    max_delay: float = 10.0
    multiplier: float = 2.0
    jitter: Jitter = "full"
    budget: float | None = None
    retry_on: Callable[[BaseException], bool] | tuple[type[BaseException], ...] = field(
        default=default_retryable
    )

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError(f"Retry(max_attempts={self.max_attempts}) must be >= 1")
        if self.initial_delay < 0 or self.max_delay < 0:
            raise ConfigurationError(
                f"Retry delays must be >= 0 (initial_delay={self.initial_delay}, "
                f"max_delay={self.max_delay})"
            )
        if self.multiplier < 1:
            raise ConfigurationError(f"Retry(multiplier={self.multiplier}) must be >= 1")
        if self.jitter not in ("full", "equal", "none"):
            raise ConfigurationError(f"Retry(jitter={self.jitter!r}) is not full, equal or none")
        if self.budget is not None and not self.budget > 0:
            raise ConfigurationError(f"Retry(budget={self.budget}) must be > 0 seconds")

    def is_retryable(self, exc: BaseException) -> bool:
        """Whether ``exc`` is worth another attempt (never for cancellation)."""
        if not isinstance(exc, Exception):
            return False
        if isinstance(self.retry_on, tuple):
            return isinstance(exc, self.retry_on)
        return self.retry_on(exc)

    def backoff(self, failures: int, *, rng: Callable[[], float] = random.random) -> float:
        """Seconds to wait after the ``failures``-th failure (1-based), jitter applied."""
        if failures < 1:
            return 0.0
        exponent = min(failures - 1, 64)  # beyond this the cap applies anyway
        delay = min(self.max_delay, self.initial_delay * self.multiplier**exponent)
        if self.jitter == "full":
            return delay * rng()
        if self.jitter == "equal":
            return delay / 2 + delay / 2 * rng()
        return delay

    def next_delay(
        self,
        exc: BaseException,
        failures: int,
        elapsed: float,
        *,
        rng: Callable[[], float] = random.random,
    ) -> float | None:
        """The wait before the next attempt, or ``None`` when the policy gives up.

        ``failures`` is how many attempts have failed so far (this one included),
        ``elapsed`` the seconds since the first attempt started.
        """
        if failures >= self.max_attempts or not self.is_retryable(exc):
            return None
        delay = self.backoff(failures, rng=rng)
        retry_after = getattr(exc, "retry_after", None)
        if isinstance(retry_after, int | float) and math.isfinite(retry_after):
            delay = max(delay, float(retry_after))
        if self.budget is not None and elapsed + delay >= self.budget:
            return None
        return delay

    async def call(
        self,
        fn: Callable[[], Awaitable[_T]],
        *,
        clock: Clock | None = None,
        on_retry: Callable[[BaseException, int, float], object] | None = None,
        budget: RetryBudget | None = None,
    ) -> _T:
        """Await ``fn()`` until it succeeds or the policy gives up; re-raise the last error.

        ``on_retry(exc, failures, delay)`` is called before each wait (for statistics
        and logs). A shared :class:`RetryBudget` can veto retries under overload. The
        last error is re-raised as it is, with a note saying how many attempts were made.
        """
        clock = clock or default_clock()
        started = clock.now()
        failures = 0
        while True:
            try:
                if budget is not None:
                    budget.record_request()
                return await fn()
            except Exception as exc:
                failures += 1
                delay = self.next_delay(exc, failures, clock.now() - started)
                if delay is not None and budget is not None and not budget.try_spend():
                    delay = None
                if delay is None:
                    if failures > 1:
                        exc.add_note(f"headrace.Retry: gave up after {failures} attempts")
                    raise
                if on_retry is not None:
                    on_retry(exc, failures, delay)
            await clock.sleep(delay)


class RetryBudget:
    """Caps retries to a fraction of requests, shared by every caller of a service.

    Finagle's and gRPC's lesson: per-call retry limits still multiply load by
    ``max_attempts`` when a whole service is down. A budget lets retries add at most
    ``ratio`` extra load (0.2 = 20 %), plus ``min_per_second`` retries so that a quiet
    client can still retry at all. Safe to share between tasks of one loop.
    """

    __slots__ = ("_clock", "_last_refill", "_reserve", "_tokens", "min_per_second", "ratio")

    def __init__(
        self, ratio: float = 0.2, min_per_second: float = 10.0, *, clock: Clock | None = None
    ) -> None:
        if not 0 <= ratio <= 1:
            raise ConfigurationError(f"RetryBudget(ratio={ratio}) must be within [0, 1]")
        if min_per_second < 0:
            raise ConfigurationError(f"RetryBudget(min_per_second={min_per_second}) must be >= 0")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self._clock = clock or default_clock()
        self._tokens = 0.0
        self._reserve = min_per_second
        self._last_refill = self._clock.now()

    def record_request(self) -> None:
        """Count one first attempt; it earns ``ratio`` of a retry."""
        self._tokens = min(self._tokens + self.ratio, max(1.0, self.ratio * 1000))

    def try_spend(self) -> bool:
        """Take one retry from the budget if there is one."""
        now = self._clock.now()
        self._reserve = min(
            self.min_per_second, self._reserve + (now - self._last_refill) * self.min_per_second
        )
        self._last_refill = now
        # The epsilon forgives float sums: ten deposits of 0.2 must buy two retries.
        if self._tokens >= 1.0 - 1e-9:
            self._tokens -= 1.0
            return True
        if self._reserve >= 1.0:
            self._reserve -= 1.0
            return True
        return False
