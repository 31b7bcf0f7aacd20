"""One rate limit shared by many processes, kept in Redis.

:class:`RedisTokenBucket` and :class:`RedisMultiLimiter` run the reservation model of
:mod:`headrace._ratelimit` inside Redis: one Lua script reads the server's clock
(``TIME``), decides when ``n`` tokens can be granted, records the reservation and returns
the wait, so each caller makes one round trip and then sleeps once, whatever the number
of processes. Using the server's clock means the processes' own clocks never need to
agree. The state of each bucket is one number, the time at which it would be full again
(the "theoretical arrival time" of GCRA), so a bucket that has refilled expires from
Redis by itself.

``redis`` (redis-py >= 5, ``pip install 'headrace[redis]'``) is imported only when a
limiter is created, so ``import headrace`` stays free of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._clock import Clock, default_clock
from ._errors import BrokerConnectionError, BrokerError, ConfigurationError, RateLimitExceeded
from ._errors import translate_errors as _translate_errors

if TYPE_CHECKING:
    import redis.asyncio

__all__ = ["RedisMultiLimiter", "RedisReservation", "RedisTokenBucket"]

# KEYS: one per bucket. ARGV: n, max_wait (µs, < 0: none), then per bucket the interval
# (µs per token) and the burst. Returns {1, wait_us, act_us, tat_1, ...} or {0, wait_us}.
# Numbers travel as strings: Redis turns a Lua number reply into an integer.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])
local max_wait = tonumber(ARGV[2])
local act = now
local tats = {}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[1 + 2 * i])
  local burst = tonumber(ARGV[2 + 2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  tats[i] = tat
  local earliest = tat - (burst - n) * interval
  if earliest > act then act = earliest end
end
local wait = act - now
if max_wait >= 0 and wait > max_wait then
  return {0, string.format('%.17g', wait)}
end
local reply = {1, string.format('%.17g', wait), string.format('%.17g', act)}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[1 + 2 * i])
  local tat = tats[i]
  if act > tat then tat = act end
  tat = tat + n * interval
  redis.call('SET', KEYS[i], string.format('%.17g', tat), 'PX',
             math.floor((tat - now) / 1000) + 1000)
  reply[#reply + 1] = string.format('%.17g', tat)
end
return reply
"""

# KEYS: the buckets. ARGV: n, act (µs), then per bucket the interval and the tat that
# this reservation left. Returns 1 if tokens went back, 0 if the grant time had passed.
_CANCEL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])
local act = tonumber(ARGV[2])
if act <= now then return 0 end
for i = 1, #KEYS do
  local interval = tonumber(ARGV[1 + 2 * i])
  local left = tonumber(ARGV[2 + 2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  -- Reservations made after ours pushed the tat beyond what we left; they were
  -- scheduled counting on our tokens, so only the rest can go back.
  local give = n * interval - (tat - left)
  if give > 0 and tat > now then
    tat = tat - give
    redis.call('SET', KEYS[i], string.format('%.17g', tat), 'PX',
               math.max(1, math.floor((tat - now) / 1000) + 1000))
  end
end
return 1
"""


def _error_mapping() -> dict[type[BaseException], type[BrokerError]]:
    import redis.exceptions

    return {
        redis.exceptions.ConnectionError: BrokerConnectionError,
        redis.exceptions.TimeoutError: BrokerConnectionError,
        redis.exceptions.RedisError: BrokerError,
    }


class RedisReservation:
    """Tokens reserved in Redis: ``ok``, ``delay`` (seconds) and an async :meth:`cancel`.

    ``cancel()`` gives the tokens back if the grant time has not come (judged by the
    Redis server's clock), minus what reservations made after it already count on.
    """

    __slots__ = ("_limiter", "_tats", "act_us", "delay", "ok", "tokens")

    def __init__(
        self,
        limiter: RedisMultiLimiter,
        *,
        ok: bool,
        tokens: float,
        delay: float,
        act_us: float,
        tats: tuple[float, ...],
    ) -> None:
        self._limiter = limiter
        self.ok = ok
        self.tokens = tokens
        self.delay = delay
        self.act_us = act_us
        self._tats = tats

    async def cancel(self) -> bool:
        """Return the tokens if the grant time has not passed; return whether it did."""
        if not self.ok or not self._tats:
            return False
        tats, self._tats = self._tats, ()
        return await self._limiter._cancel(self.tokens, self.act_us, tats)

    async def wait(self, clock: Clock | None = None) -> None:
        """Sleep ``delay`` seconds; cancel the reservation if the sleep is cancelled."""
        if not self.ok:
            raise RateLimitExceeded(
                f"reservation of {self.tokens:g} tokens was refused (wait {self.delay:.6g} s)",
                context={"tokens": self.tokens, "delay": self.delay},
            )
        if self.delay <= 0:
            return
        clock = clock or self._limiter.clock
        try:
            await clock.sleep(self.delay)
        except BaseException:
            await _cancel_quietly(self)
            raise

    def __repr__(self) -> str:
        return f"RedisReservation(ok={self.ok!r}, tokens={self.tokens:g}, delay={self.delay!r})"


async def _cancel_quietly(reservation: RedisReservation) -> None:
    # Best effort on the way out of a cancelled wait: if Redis is unreachable the
    # tokens stay taken, which errs on the side of the limit.
    try:
        await reservation.cancel()
    except BrokerError:
        pass


class RedisMultiLimiter:
    """Several token buckets in Redis, reserved all-or-nothing at the slowest one's time.

    ``limits`` is a sequence of ``(rate, burst)`` pairs (tokens per second, depth). All
    processes that build a limiter with the same ``name`` and ``limits`` share it. The
    keys are ``{prefix}{{name}}:r<rate>:b<burst>``; the braces keep every key of one
    limiter in one Redis Cluster slot. ``redis`` is a URL (the limiter then owns the
    connection: call :meth:`aclose`, or use ``async with``) or a ``redis.asyncio.Redis``
    that the caller owns. ``clock`` is only used to sleep; time is the server's.

    Each call costs one round trip (measured here: ~0.55 ms on localhost on a busy
    2-core machine, sequential calls from one task). A
    cancelled waiter gives back what no later reservation counts on; unlike
    :class:`~headrace.TokenBucket`, there is no ledger in Redis, so a refund that later
    reservations counted on is not given back when they are cancelled in turn (the
    limit errs on the strict side). Safe to share between tasks of one loop.
    """

    def __init__(
        self,
        redis: str | redis.asyncio.Redis,
        name: str,
        limits: Sequence[tuple[float, float]],
        *,
        prefix: str = "headrace:ratelimit:",
        clock: Clock | None = None,
    ) -> None:
        import redis.asyncio as aioredis

        if not limits:
            raise ConfigurationError(
                f"RedisMultiLimiter(name={name!r}) needs at least one (rate, burst)",
                code="invalid_limiter",
            )
        intervals: list[float] = []
        bursts: list[float] = []
        for rate, burst in limits:
            if not (rate > 0 and math.isfinite(rate)):
                raise ConfigurationError(
                    f"RedisMultiLimiter(rate={rate!r}) must be a finite number > 0 per second",
                    code="invalid_rate",
                    context={"rate": rate},
                )
            if not (burst >= 1 and math.isfinite(burst)):
                raise ConfigurationError(
                    f"RedisMultiLimiter(burst={burst!r}) must be a finite number >= 1",
                    code="invalid_burst",
                    context={"burst": burst},
                )
            intervals.append(1_000_000.0 / rate)
            bursts.append(float(burst))
        self._owns_client = isinstance(redis, str)
        self._client: aioredis.Redis = (
            aioredis.Redis.from_url(redis) if isinstance(redis, str) else redis
        )
        self._keys = [f"{prefix}{{{name}}}:r{rate:g}:b{burst:g}" for rate, burst in limits]
        self._intervals = intervals
        self._bursts = bursts
        self._max_n = min(bursts)
        self._reserve_script = self._client.register_script(_RESERVE)
        self._cancel_script = self._client.register_script(_CANCEL)
        self._errors = _error_mapping()
        self.name = name
        self.clock = clock if clock is not None else default_clock()

    @property
    def keys(self) -> tuple[str, ...]:
        """The Redis keys holding the buckets' state."""
        return tuple(self._keys)

    def _check_n(self, n: float, where: str) -> None:
        if n > self._max_n:
            raise ConfigurationError(
                f"{where}(n={n:g}) exceeds burst {self._max_n:g}",
                code="rate_limit_exceeds_burst",
                context={"n": n, "burst": self._max_n, "name": self.name},
            )
        if not n >= 0:
            raise ConfigurationError(
                f"{where}(n={n!r}) must be >= 0 tokens", code="invalid_tokens", context={"n": n}
            )

    async def reserve(self, n: float = 1, *, max_wait: float | None = None) -> RedisReservation:
        """Reserve ``n`` tokens; ``ok`` is false (nothing taken) if the wait > ``max_wait``."""
        self._check_n(n, "reserve")
        if max_wait is not None and not max_wait >= 0:
            raise ConfigurationError(
                f"reserve(max_wait={max_wait!r}) must be >= 0 seconds or None",
                code="invalid_timeout",
            )
        args: list[Any] = [repr(float(n)), -1 if max_wait is None else repr(max_wait * 1e6)]
        for interval, burst in zip(self._intervals, self._bursts, strict=True):
            args += [repr(interval), repr(burst)]
        with _translate_errors(self._errors, context={"limiter": self.name}):
            reply = await self._reserve_script(keys=self._keys, args=args)
        ok = int(reply[0]) == 1
        delay = max(0.0, float(reply[1]) / 1e6)
        if not ok:
            return RedisReservation(self, ok=False, tokens=n, delay=delay, act_us=0.0, tats=())
        return RedisReservation(
            self,
            ok=True,
            tokens=n,
            delay=delay,
            act_us=float(reply[2]),
            tats=tuple(float(value) for value in reply[3:]),
        )

    async def _cancel(self, n: float, act_us: float, tats: tuple[float, ...]) -> bool:
        args: list[Any] = [repr(float(n)), repr(act_us)]
        for interval, tat in zip(self._intervals, tats, strict=True):
            args += [repr(interval), repr(tat)]
        with _translate_errors(self._errors, context={"limiter": self.name}):
            reply = await self._cancel_script(keys=self._keys, args=args)
        return int(reply) == 1

    async def try_acquire(self, n: float = 1) -> bool:
        """Take ``n`` tokens if they are available now; never waits."""
        self._check_n(n, "try_acquire")
        return (await self.reserve(n, max_wait=0.0)).ok

    async def acquire(self, n: float = 1, *, timeout: float | None = None) -> None:
        """Wait for ``n`` tokens (one round trip, one sleep).

        Raises :class:`~headrace.RateLimitExceeded` at once, taking nothing, if the wait
        would exceed ``timeout`` seconds; :class:`~headrace.ConfigurationError` if ``n``
        exceeds the smallest burst. Cancelled while waiting, it gives its tokens back.
        """
        self._check_n(n, "acquire")
        reservation = await self.reserve(n, max_wait=timeout)
        if not reservation.ok:
            raise RateLimitExceeded(
                f"acquire(n={n:g}) would wait {reservation.delay:.6g} s, more than "
                f"timeout={timeout:g}",
                context={
                    "n": n,
                    "wait": reservation.delay,
                    "timeout": timeout,
                    "limiter": self.name,
                },
            )
        await reservation.wait(self.clock)

    async def reset(self) -> None:
        """Delete the shared state: every bucket is full again (for tests and operators)."""
        with _translate_errors(self._errors, context={"limiter": self.name}):
            await self._client.delete(*self._keys)

    async def aclose(self) -> None:
        """Close the connection if this limiter opened it (from a URL)."""
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> RedisMultiLimiter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        limits = ", ".join(
            f"({1e6 / interval:g}/s, burst {burst:g})"
            for interval, burst in zip(self._intervals, self._bursts, strict=True)
        )
        return f"{type(self).__name__}(name={self.name!r}, limits=[{limits}])"


class RedisTokenBucket(RedisMultiLimiter):
    """One token bucket (``rate`` per second, depth ``burst``) shared through Redis.

    The cross-process twin of :class:`~headrace.TokenBucket`: same ``acquire`` /
    ``try_acquire`` / ``reserve`` semantics, except that they are coroutines (each is
    one Redis round trip) and time is the Redis server's. Every process that creates
    ``RedisTokenBucket(url, "partner-api", rate=500, burst=10)`` shares the same 500/s::

        async with RedisTokenBucket("redis://localhost", "partner-api", 500, 10) as limit:
            await limit.acquire()
    """

    def __init__(
        self,
        redis: str | redis.asyncio.Redis,
        name: str,
        rate: float,
        burst: float,
        *,
        prefix: str = "headrace:ratelimit:",
        clock: Clock | None = None,
    ) -> None:
        super().__init__(redis, name, [(rate, burst)], prefix=prefix, clock=clock)
        self.rate = float(rate)
        self.burst = float(burst)
