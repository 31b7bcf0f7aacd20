"""KeyedLimiter: one limiter per key (user, host, tenant), dropped once idle."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

from .._clock import Clock, default_clock
from .._errors import ConfigurationError
from ._reservation import Limiter, Reservation

_K = TypeVar("_K", bound=Hashable)
_L = TypeVar("_L", bound="Limiter")


class KeyedLimiter(Generic[_K, _L]):
    """One limiter per key (user, host, tenant), made on first use by ``factory(key)``.

    Keys never share state or wait on each other: there is no lock, and a caller
    waiting on one key's limiter sleeps on its own reservation. A key's limiter is
    dropped once it has been unused for ``idle_timeout`` seconds (default 60) *and* is
    idle (full, nobody waiting), so eviction never hands out a fresh burst early. The
    sweep runs on access, at most once per ``idle_timeout``, and costs O(keys).
    Safe to share between tasks of one event loop::

        per_host = KeyedLimiter(lambda host: TokenBucket(rate=5, burst=5))
        await per_host.acquire("example.com")
    """

    __slots__ = ("_clock", "_factory", "_idle_timeout", "_last_used", "_limiters", "_next_sweep")

    def __init__(
        self,
        factory: Callable[[_K], _L],
        *,
        idle_timeout: float = 60.0,
        clock: Clock | None = None,
    ) -> None:
        if not idle_timeout > 0:
            raise ConfigurationError(
                f"KeyedLimiter(idle_timeout={idle_timeout!r}) must be > 0 seconds",
                code="invalid_timeout",
            )
        self._factory = factory
        self._idle_timeout = float(idle_timeout)
        self._clock = clock if clock is not None else default_clock()
        self._limiters: dict[_K, _L] = {}
        self._last_used: dict[_K, float] = {}
        self._next_sweep = self._clock.now() + self._idle_timeout

    def limiter_at(self, now: float, key: _K) -> _L:
        """The limiter for ``key`` (made now if needed), marked as used at ``now``."""
        if now >= self._next_sweep:
            self.evict_idle_at(now)
        limiter = self._limiters.get(key)
        if limiter is None:
            limiter = self._limiters[key] = self._factory(key)
        self._last_used[key] = now
        return limiter

    def limiter(self, key: _K) -> _L:
        """The limiter for ``key``, made on first use."""
        return self.limiter_at(self._clock.now(), key)

    def evict_idle_at(self, now: float) -> int:
        """Drop the limiters unused for ``idle_timeout`` that are idle; return how many."""
        self._next_sweep = now + self._idle_timeout
        horizon = now - self._idle_timeout
        stale = [
            key
            for key, used in self._last_used.items()
            if used <= horizon and self._limiters[key].is_idle_at(now)
        ]
        for key in stale:
            del self._limiters[key]
            del self._last_used[key]
        return len(stale)

    def evict_idle(self) -> int:
        return self.evict_idle_at(self._clock.now())

    def try_acquire(self, key: _K, n: float = 1) -> bool:
        return self.limiter(key).try_acquire(n)

    def reserve(self, key: _K, n: float = 1, *, max_wait: float | None = None) -> Reservation:
        return self.limiter(key).reserve(n, max_wait=max_wait)

    async def acquire(self, key: _K, n: float = 1, *, timeout: float | None = None) -> None:
        """Wait for ``n`` tokens of ``key``'s limiter; other keys are never delayed."""
        await self.limiter(key).acquire(n, timeout=timeout)

    def __len__(self) -> int:
        return len(self._limiters)

    def __contains__(self, key: object) -> bool:
        return key in self._limiters

    def __iter__(self) -> Iterator[_K]:
        return iter(list(self._limiters))

    def __repr__(self) -> str:
        return f"KeyedLimiter(keys={len(self._limiters)}, idle_timeout={self._idle_timeout:g})"
