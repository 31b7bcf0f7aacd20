"""What a request waits for before it may use a connection: its rate limit, then slots.

A request first waits for the per-host rate limiter (if any), then for a slot on its
host (``per_host``) and a global slot (``concurrency``). Only then does the ``total``
timeout start, so queueing never eats into a request's own time; the wait for the
slots has its own bound, ``Timeouts.slot_wait``. aiohttp's connector gets the same
limits, so it never has to queue itself.

:func:`limiter_lookup` turns the fetcher's ``rate_limit`` option into a ``host ->
limiter`` function once, at construction. :class:`AdmissionMixin` holds the
fetcher's methods that take and give back the slots; ``Fetcher._execute`` inlines
the common case (no limiter, no per-host limit, a free global slot).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

from .._cancel import deadline
from .._clock import Clock
from .._errors import ConfigurationError, DeadlineExceeded
from .._ratelimit import KeyedLimiter, TokenBucket
from ._models import Timeouts
from ._slots import Slots
from ._statistics import StatisticsMixin
from ._transport import Prepared

__all__ = ["AdmissionMixin", "RateLimit", "SupportsAcquire", "limiter_lookup"]


@runtime_checkable
class SupportsAcquire(Protocol):
    """Anything with ``await acquire()`` that waits for permission (``TokenBucket`` fits)."""

    def acquire(self) -> Awaitable[Any]: ...


RateLimit = SupportsAcquire | KeyedLimiter[str, Any] | Callable[[str], SupportsAcquire] | float


def limiter_lookup(
    rate_limit: RateLimit | None, clock: Clock
) -> Callable[[str], SupportsAcquire | None]:
    """The ``host -> limiter`` function for ``Fetcher(rate_limit=...)`` (see there)."""
    if rate_limit is None:
        return lambda host: None
    if isinstance(rate_limit, int | float) and not isinstance(rate_limit, bool):
        if not rate_limit > 0:
            raise ConfigurationError(
                f"Fetcher(rate_limit={rate_limit!r}) must be > 0 requests per second"
            )
        rate = float(rate_limit)
        # Burst 1: "n per second" should mean evenly spaced, not n at once.
        keyed_buckets: KeyedLimiter[str, TokenBucket] = KeyedLimiter(
            lambda host: TokenBucket(rate, 1, clock=clock), clock=clock
        )
        return keyed_buckets.limiter
    if isinstance(rate_limit, KeyedLimiter):
        # Asked on every request, so that it sees the host as in use and can evict
        # idle hosts' limiters on its own schedule.
        return rate_limit.limiter
    if isinstance(rate_limit, SupportsAcquire):
        shared = rate_limit
        return lambda host: shared
    if callable(rate_limit):
        return _per_host(rate_limit)
    raise ConfigurationError(
        f"Fetcher(rate_limit={rate_limit!r}) must be requests per second, an object "
        "with acquire(), a KeyedLimiter, or a callable host -> limiter"
    )


def _per_host(
    factory: Callable[[str], SupportsAcquire],
) -> Callable[[str], SupportsAcquire | None]:
    limiters: dict[str, SupportsAcquire] = {}

    def lookup(host: str) -> SupportsAcquire | None:
        limiter = limiters.get(host)
        if limiter is None:
            limiter = limiters[host] = factory(host)
        return limiter

    return lookup


class AdmissionMixin(StatisticsMixin):
    """Rate limit and slots of a :class:`~headrace.http.Fetcher` (one of its base classes).

    The attributes are the fetcher's, set by its constructor and ``open()``.
    """

    concurrency: int
    per_host: int | None
    timeouts: Timeouts
    _clock: Clock
    _loop: asyncio.AbstractEventLoop | None
    _slots: Slots | None
    _host_slots: dict[str, Slots]
    _rate_limited: bool
    _limiter_for: Callable[[str], SupportsAcquire | None]

    async def _acquire_slot(self, prepared: Prepared, bounded: bool = True) -> Slots | None:
        """Wait for the rate limiter, then a host slot and a global slot.

        ``bounded=False`` (fetch_all's workers, whose queueing is by design) waits
        without ``slot_wait``.

        Returns the host semaphore to release (with the global one) in
        :meth:`_release_slot`. Inlined rather than an ``async with`` helper: this is the
        hot path, and a generator-based context manager per request showed in B6.
        """
        if self._rate_limited:
            limiter = self._limiter_for(prepared.host)
            if limiter is not None:
                await limiter.acquire()
        slots = self._slots
        assert slots is not None
        host_slots = self._host_slot(prepared.host) if self.per_host is not None else None
        if (host_slots is None or not host_slots.locked()) and not slots.locked():
            # Fast path: both free, nothing to wait for, no timer to arm.
            if host_slots is not None:
                host_slots.try_acquire()
            slots.try_acquire()
            return host_slots
        self._waiting += 1
        try:
            await self._wait_for_slots(
                prepared, host_slots, slots, self.timeouts.slot_wait if bounded else None
            )
        finally:
            self._waiting -= 1
        return host_slots

    def _release_slot(self, host_slots: Slots | None) -> None:
        assert self._slots is not None
        self._slots.release()
        if host_slots is not None:
            host_slots.release()

    async def _wait_for_slots(
        self,
        prepared: Prepared,
        host_slots: Slots | None,
        slots: Slots,
        limit: float | None,
    ) -> None:
        if limit is None:
            # No bound: plain waits, no deadline scope (hundreds may queue here at once).
            if host_slots is None:
                await slots.acquire()
                return
            await host_slots.acquire()
            try:
                await slots.acquire()
            except BaseException:
                host_slots.release()
                raise
            return
        holding_host = False
        try:
            async with deadline(limit, cause="waiting for a connection slot", clock=self._clock):
                if host_slots is not None:
                    await host_slots.acquire()
                    holding_host = True
                await slots.acquire()
        except DeadlineExceeded as exc:
            if holding_host and host_slots is not None:
                host_slots.release()
            request = prepared.request
            raise DeadlineExceeded(
                f"{request.method} {prepared.url_text}: no connection slot within "
                f"slot_wait={limit} s (concurrency={self.concurrency}, "
                f"per_host={self.per_host})",
                code="http_slot_timeout",
                public_message="The service is too busy; try again later.",
                context={
                    "method": request.method,
                    "url": prepared.url_text,
                    "phase": "slot_wait",
                    "timeout": limit,
                    "elapsed": exc.elapsed,
                },
            ) from exc
        except BaseException:
            if holding_host and host_slots is not None:
                host_slots.release()
            raise

    def _host_slot(self, host: str) -> Slots:
        assert self.per_host is not None
        semaphore = self._host_slots.get(host)
        if semaphore is None:
            assert self._loop is not None
            semaphore = self._host_slots[host] = Slots(self._loop, self.per_host)
        return semaphore
