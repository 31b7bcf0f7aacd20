"""MultiLimiter: several token buckets that grant all-or-nothing, at the slowest one's time."""

from __future__ import annotations

from .._clock import Clock
from .._errors import ConfigurationError, RateLimitExceeded
from ._bucket import RateLimiterStatistics, TokenBucket
from ._checks import _check_timeout, _wait_limit
from ._reservation import Reservation


class MultiLimiter:
    """Several token buckets that must all agree: one all-or-nothing reservation.

    A request for ``n`` tokens is granted at the time the slowest bucket can serve it,
    and each bucket's tokens are taken *at that time*: no bucket's tokens are consumed
    while the caller waits for another, and a refused or cancelled request leaves every
    bucket as if it had not asked. Use it for "N per second and M per minute" (see
    :meth:`per_second_and_minute`) or "disk and network". The buckets may also be used on
    their own; a multi-request holds its place in each bucket's FIFO queue, so direct
    callers of a fast bucket queue behind a request that waits on a slow one.

    All buckets must run on the same clock. Safe to share between tasks of one loop.
    """

    __slots__ = ("_clock", "_limiters")

    _limiters: tuple[TokenBucket, ...]

    def __init__(self, *limiters: TokenBucket | MultiLimiter, clock: Clock | None = None) -> None:
        buckets: list[TokenBucket] = []
        for limiter in limiters:
            if isinstance(limiter, MultiLimiter):
                buckets.extend(limiter.limiters)
            elif isinstance(limiter, TokenBucket):
                buckets.append(limiter)
            else:
                raise ConfigurationError(
                    f"MultiLimiter() takes TokenBucket or MultiLimiter, not "
                    f"{type(limiter).__name__}",
                    code="invalid_limiter",
                )
        if not buckets:
            raise ConfigurationError(
                "MultiLimiter() needs at least one limiter", code="invalid_limiter"
            )
        self._limiters = tuple(buckets)
        self._clock = clock if clock is not None else buckets[0].clock

    @classmethod
    def windows(cls, *limits: tuple[float, float], clock: Clock | None = None) -> MultiLimiter:
        """``windows((10, 1.0), (100, 60.0))``: 10 per second and 100 per minute.

        Each ``(count, seconds)`` becomes ``TokenBucket(rate=count/seconds, burst=count)``.
        A token bucket is not a fixed window: it refills continuously, so in any
        ``seconds`` window it grants at most ``2·count`` (``burst + rate·T``), and
        ``count`` on average.
        """
        buckets = [
            TokenBucket(rate=count / seconds, burst=count, clock=clock) for count, seconds in limits
        ]
        return cls(*buckets, clock=clock)

    @classmethod
    def per_second_and_minute(
        cls, per_second: float, per_minute: float, *, clock: Clock | None = None
    ) -> MultiLimiter:
        """``per_second`` per second and ``per_minute`` per minute (see :meth:`windows`)."""
        return cls.windows((per_second, 1.0), (per_minute, 60.0), clock=clock)

    @property
    def limiters(self) -> tuple[TokenBucket, ...]:
        """The buckets, in the order given."""
        return self._limiters

    @property
    def clock(self) -> Clock:
        return self._clock

    def _earliest_at(self, now: float, n: float, where: str) -> float:
        when = now
        for limiter in self._limiters:
            limiter._check_n(n, where)
            t = limiter._earliest_at(now, n)
            if t > when:
                when = t
        return when

    def try_acquire_at(self, now: float, n: float = 1) -> bool:
        """Take ``n`` from every bucket at ``now`` if all have them; else take nothing."""
        if self._earliest_at(now, n, "try_acquire") > now:
            for limiter in self._limiters:
                limiter._denied += 1
            return False
        for limiter in self._limiters:
            limiter._commit_at(now, n, now)
        return True

    def reserve_at(self, now: float, n: float = 1, *, max_wait: float | None = None) -> Reservation:
        """Reserve ``n`` on every bucket at the slowest one's time, or on none."""
        limit = _check_timeout(max_wait, "max_wait", "reserve")
        when = self._earliest_at(now, n, "reserve")
        if when - now > limit:
            for limiter in self._limiters:
                limiter._denied += 1
            return Reservation(
                ok=False,
                tokens=n,
                time_to_act=when,
                delay=when - now,
                clock=self._clock,
                reason=f"needs a wait of {when - now:.6g} s, more than max_wait={limit:g}",
            )
        return self._commit_all(now, n, when)

    def _commit_all(self, now: float, n: float, when: float) -> Reservation:
        children = tuple(
            entry
            for limiter in self._limiters
            if (entry := limiter._commit_at(now, n, when)) is not None
        )
        return Reservation(
            ok=True,
            tokens=n,
            time_to_act=when,
            delay=max(0.0, when - now),
            clock=self._clock,
            children=children,
        )

    def is_idle_at(self, now: float) -> bool:
        return all(limiter.is_idle_at(now) for limiter in self._limiters)

    def try_acquire(self, n: float = 1) -> bool:
        return self.try_acquire_at(self._clock.now(), n)

    def reserve(self, n: float = 1, *, max_wait: float | None = None) -> Reservation:
        return self.reserve_at(self._clock.now(), n, max_wait=max_wait)

    async def acquire(self, n: float = 1, *, timeout: float | None = None) -> None:
        """Wait for ``n`` tokens from every bucket; like :meth:`TokenBucket.acquire`."""
        now = self._clock.now()
        limit, bound = _wait_limit(timeout, self._clock)
        when = self._earliest_at(now, n, "acquire")
        if when - now > limit:
            for limiter in self._limiters:
                limiter._denied += 1
            raise RateLimitExceeded(
                f"acquire(n={n:g}) would wait {when - now:.6g} s, more than {bound}",
                context={"n": n, "wait": when - now, "timeout": limit},
            )
        reservation = self._commit_all(now, n, when)
        if reservation.time_to_act > now:
            await reservation.wait()

    def statistics(self) -> tuple[RateLimiterStatistics, ...]:
        """One snapshot per bucket, in order."""
        return tuple(limiter.statistics() for limiter in self._limiters)

    async def __aenter__(self) -> None:
        """``async with limits:`` waits for one token from every bucket."""
        await self.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    def __repr__(self) -> str:
        return f"MultiLimiter({', '.join(map(repr, self._limiters))})"
