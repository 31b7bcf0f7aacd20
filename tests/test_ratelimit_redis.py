"""RedisTokenBucket / RedisMultiLimiter against the real Redis on this machine.

These run in real time (the bucket uses the Redis server's clock), so times are checked
with a tolerance of 50 ms: generous against a loaded 2-core machine, yet far below the
0.5-1 s gaps that tell a correct schedule from a wrong one.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import redis.asyncio as aioredis

from headrace import BrokerConnectionError, ConfigurationError, RateLimitExceeded
from headrace._ratelimit_redis import RedisMultiLimiter, RedisTokenBucket

pytestmark = pytest.mark.real_time

TOLERANCE = 0.05


@asynccontextmanager
async def _client(url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


def _name() -> str:
    return f"test-{uuid.uuid4().hex}"


async def test_burst_then_one_per_interval(redis_url: str) -> None:
    """A full bucket grants its burst at once, then one token per 1/rate seconds."""
    async with RedisTokenBucket(redis_url, _name(), rate=4, burst=2) as bucket:
        delays = [(await bucket.reserve()).delay for _ in range(4)]
        assert delays[:2] == [0.0, 0.0]
        assert delays[2] == pytest.approx(0.25, abs=TOLERANCE)
        assert delays[3] == pytest.approx(0.5, abs=TOLERANCE)
        await bucket.reset()


async def test_acquire_sleeps_once_until_its_time(redis_url: str) -> None:
    """acquire() returns after the reserved delay, measured on the local clock."""
    async with RedisTokenBucket(redis_url, _name(), rate=5, burst=1) as bucket:
        await bucket.acquire()
        started = time.monotonic()
        await bucket.acquire()
        assert time.monotonic() - started == pytest.approx(0.2, abs=TOLERANCE)
        await bucket.reset()


async def test_timeout_fails_fast_and_takes_nothing(redis_url: str) -> None:
    """A wait over the timeout raises at once, and the next caller's wait is unchanged."""
    async with RedisTokenBucket(redis_url, _name(), rate=1, burst=1) as bucket:
        await bucket.acquire()
        started = time.monotonic()
        with pytest.raises(RateLimitExceeded, match=r"acquire\(n=1\) would wait") as info:
            await bucket.acquire(timeout=0.1)
        assert time.monotonic() - started < 0.5
        assert info.value.context["timeout"] == 0.1
        assert not await bucket.try_acquire()
        nxt = await bucket.reserve()
        assert nxt.delay == pytest.approx(1.0, abs=TOLERANCE)
        await bucket.reset()


async def test_cancel_returns_the_tokens(redis_url: str) -> None:
    """Cancelling a waiting reservation frees its slot for the next caller."""
    async with RedisTokenBucket(redis_url, _name(), rate=2, burst=1) as bucket:
        await bucket.acquire()
        waiting = await bucket.reserve()
        assert waiting.delay == pytest.approx(0.5, abs=TOLERANCE)
        assert await waiting.cancel()
        assert not await waiting.cancel()  # only once
        again = await bucket.reserve()
        assert again.delay == pytest.approx(0.5, abs=TOLERANCE)
        await bucket.reset()


async def test_cancel_keeps_what_later_reservations_counted_on(redis_url: str) -> None:
    """Without a ledger in Redis, a refund later waiters counted on stays taken (strict side)."""
    async with RedisTokenBucket(redis_url, _name(), rate=2, burst=1) as bucket:
        await bucket.acquire()
        middle = await bucket.reserve()
        last = await bucket.reserve()
        assert last.delay == pytest.approx(1.0, abs=TOLERANCE)
        assert await middle.cancel()  # `last` was scheduled after it: nothing goes back
        assert (await bucket.reserve(max_wait=0.0)).delay == pytest.approx(1.5, abs=TOLERANCE)
        assert await last.cancel()  # the latest reservation: its own slot goes back
        assert (await bucket.reserve(max_wait=0.0)).delay == pytest.approx(1.0, abs=TOLERANCE)
        await bucket.reset()


async def test_cancelled_waiter_task_returns_its_tokens(redis_url: str) -> None:
    """A task cancelled while it sleeps on its reservation gives the tokens back."""
    async with RedisTokenBucket(redis_url, _name(), rate=2, burst=1) as bucket:
        await bucket.acquire()
        task = asyncio.create_task(bucket.acquire())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        again = await bucket.reserve()
        assert again.delay == pytest.approx(0.4, abs=TOLERANCE)
        await bucket.reset()


async def test_cancel_after_grant_time_keeps_the_tokens(redis_url: str) -> None:
    """A reservation whose time has passed was used: cancel() returns False."""
    async with RedisTokenBucket(redis_url, _name(), rate=10, burst=1) as bucket:
        await bucket.acquire()
        waiting = await bucket.reserve()
        await asyncio.sleep(waiting.delay + 0.05)
        assert not await waiting.cancel()
        await bucket.reset()


async def test_two_clients_share_one_limit(redis_url: str) -> None:
    """Limiters with the same name on separate connections draw from one bucket."""
    name = _name()
    async with _client(redis_url) as one, _client(redis_url) as two:
        first = RedisTokenBucket(one, name, rate=2, burst=1)
        second = RedisTokenBucket(two, name, rate=2, burst=1)
        assert await first.try_acquire()
        assert not await second.try_acquire()
        reservation = await second.reserve()
        assert reservation.delay == pytest.approx(0.5, abs=TOLERANCE)
        assert first.keys == second.keys
        await first.reset()
        assert await one.exists(*first.keys) == 0


async def test_state_expires_once_full(redis_url: str) -> None:
    """The key carries a TTL of about the time to refill, so idle buckets leave Redis."""
    async with _client(redis_url) as client:
        bucket = RedisTokenBucket(client, _name(), rate=1, burst=3)
        await bucket.acquire(3)
        ttl = await client.pttl(bucket.keys[0])
        assert 3000 <= ttl <= 4100
        await bucket.reset()


async def test_multi_limiter_waits_for_the_slowest(redis_url: str) -> None:
    """Per-second and per-minute-style limits: granted at the slower one's time, all-or-none."""
    async with _client(redis_url) as client:
        limits = RedisMultiLimiter(client, _name(), [(100, 2), (2, 1)])
        assert (await limits.reserve()).delay == 0.0
        refused = await limits.reserve(max_wait=0.1)
        assert not refused.ok
        assert refused.delay == pytest.approx(0.5, abs=TOLERANCE)
        # The refusal took nothing from the fast bucket: it still holds its 2nd token.
        fast = RedisTokenBucket(client, limits.name, rate=100, burst=2)
        assert fast.keys[0] == limits.keys[0]
        assert await fast.try_acquire()
        waiting = await limits.reserve()
        assert waiting.delay == pytest.approx(0.5, abs=TOLERANCE)
        await limits.reset()


async def test_bad_arguments_name_the_inputs(redis_url: str) -> None:
    """n above the burst and invalid limits raise ConfigurationError naming them."""
    async with RedisTokenBucket(redis_url, _name(), rate=10, burst=3) as bucket:
        with pytest.raises(ConfigurationError, match=r"acquire\(n=5\) exceeds burst 3"):
            await bucket.acquire(5)
        with pytest.raises(ConfigurationError, match=r"must be >= 0 seconds"):
            await bucket.reserve(max_wait=-1)
    with pytest.raises(ConfigurationError, match=r"rate=0\)"):
        RedisTokenBucket(redis_url, "x", rate=0, burst=1)
    with pytest.raises(ConfigurationError, match=r"burst=0.5\)"):
        RedisTokenBucket(redis_url, "x", rate=1, burst=0.5)
    with pytest.raises(ConfigurationError, match="at least one"):
        RedisMultiLimiter(redis_url, "x", [])


async def test_unreachable_server_is_a_connection_error() -> None:
    """A refused connection surfaces as BrokerConnectionError (a ConnectionError)."""
    async with RedisTokenBucket("redis://127.0.0.1:1/0", _name(), rate=1, burst=1) as bucket:
        with pytest.raises(BrokerConnectionError) as info:
            await bucket.acquire()
    assert isinstance(info.value, ConnectionError)
    assert info.value.transient


def test_module_does_not_import_redis_eagerly() -> None:
    """Importing the module (and headrace) leaves redis unimported until a limiter is made."""
    code = (
        "import sys, headrace._ratelimit_redis\n"
        "assert 'redis' not in sys.modules, 'redis imported eagerly'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
