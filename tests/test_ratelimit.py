"""Tests for TokenBucket, MultiLimiter and KeyedLimiter (virtual clock, exact times)."""

from __future__ import annotations

import asyncio
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headrace import ConfigurationError, RateLimitExceeded
from headrace import deadline as deadline_scope
from headrace._clock import Clock
from headrace._ratelimit import (
    KeyedLimiter,
    MultiLimiter,
    RateLimiterStatistics,
    Reservation,
    TokenBucket,
)

# -- pure timelines ------------------------------------------------------------------

# (rate, burst, [(arrival time, n, expected grant time), ...]), in the spirit of
# golang.org/x/time/rate's rate_test.go: each row is reserve_at(t, n).
RESERVE_TIMELINES = [
    pytest.param(10.0, 1, [(0, 1, 0), (0, 1, 0.1), (0, 1, 0.2), (0, 1, 0.3)], id="burst1-queue"),
    pytest.param(
        1.0, 3, [(0, 3, 0), (0, 1, 1), (2.5, 1, 2.5), (2.5, 1, 3)], id="refill-after-wait"
    ),
    pytest.param(1.0, 2, [(0, 2, 0), (10, 2, 10), (10, 1, 11)], id="idle-refill-capped-at-burst"),
    pytest.param(1.0, 5, [(0, 5, 0), (0, 5, 5), (0, 1, 6), (1, 1, 7)], id="fifo-mixed-n"),
    pytest.param(2.0, 4, [(0, 1, 0), (0, 4, 0.5), (0.25, 1, 1.0)], id="big-request-not-starved"),
    pytest.param(4.0, 2, [(0, 0, 0), (0, 2, 0), (0, 0, 0), (0, 1, 0.25)], id="zero-tokens-free"),
    pytest.param(1.0, 1, [(0, 1, 0), (0.5, 1, 1), (5, 1, 5), (5, 1, 6)], id="wait-then-idle"),
]


@pytest.mark.parametrize(("rate", "burst", "timeline"), RESERVE_TIMELINES)
def test_reserve_timeline(
    rate: float, burst: int, timeline: list[tuple[float, int, float]]
) -> None:
    """reserve_at grants each (t, n) at exactly the time the token arithmetic says."""
    bucket = TokenBucket(rate, burst, clock=_Frozen())
    for t, n, expected in timeline:
        reservation = bucket.reserve_at(t, n)
        assert reservation.ok
        assert reservation.time_to_act == pytest.approx(expected, abs=1e-12), (t, n)
        assert reservation.delay == pytest.approx(expected - t, abs=1e-12)


# (rate, burst, [(t, n, granted?), ...]) for try_acquire_at, which never queues.
TRY_TIMELINES = [
    pytest.param(
        1.0,
        2,
        [(0, 1, True), (0, 1, True), (0, 1, False), (0.5, 1, False), (1, 1, True)],
        id="drain-and-refill",
    ),
    pytest.param(
        10.0,
        3,
        [(0, 3, True), (0.2, 3, False), (0.2, 2, True), (0.25, 1, False), (0.3, 1, True)],
        id="partial-refill",
    ),
    pytest.param(1.0, 1, [(0, 1, True), (100, 1, True), (100, 1, False)], id="never-above-burst"),
]


@pytest.mark.parametrize(("rate", "burst", "timeline"), TRY_TIMELINES)
def test_try_acquire_timeline(
    rate: float, burst: int, timeline: list[tuple[float, int, bool]]
) -> None:
    """try_acquire_at grants exactly when the tokens are there, and a refusal takes none."""
    bucket = TokenBucket(rate, burst, clock=_Frozen())
    for t, n, expected in timeline:
        assert bucket.try_acquire_at(t, n) is expected, (t, n)


def test_try_acquire_fails_while_others_wait() -> None:
    """A waiter holds its place: try_acquire cannot jump the queue even after refill."""
    bucket = TokenBucket(1.0, 1, clock=_Frozen())
    assert bucket.try_acquire_at(0, 1)
    assert bucket.reserve_at(0, 1).time_to_act == 1
    assert not bucket.try_acquire_at(0.9, 1)
    assert bucket.try_acquire_at(2.0, 1)


def test_max_wait_refusal_reserves_nothing() -> None:
    """A reservation refused for max_wait leaves the next caller's time unchanged."""
    bucket = TokenBucket(2.0, 1, clock=_Frozen())
    assert bucket.reserve_at(0, 1).time_to_act == 0
    refused = bucket.reserve_at(0, 1, max_wait=0.4)
    assert not refused.ok
    assert refused.delay == 0.5
    assert "max_wait=0.4" in (refused.reason or "")
    assert refused.delay_from(0) == math.inf
    assert bucket.reserve_at(0, 1, max_wait=0.5).time_to_act == 0.5
    stats = bucket.statistics_at(0)
    assert (stats.granted, stats.denied) == (2, 1)


def test_n_above_burst_is_a_configuration_error() -> None:
    """Asking for more than the burst can never succeed, so it raises and names the inputs."""
    bucket = TokenBucket(10.0, 3, clock=_Frozen())
    with pytest.raises(ConfigurationError, match=r"reserve\(n=5\) exceeds burst 3") as info:
        bucket.reserve_at(0, 5)
    assert info.value.code == "rate_limit_exceeds_burst"
    with pytest.raises(ConfigurationError, match=r"try_acquire\(n=4\) exceeds burst 3"):
        bucket.try_acquire_at(0, 4)
    with pytest.raises(ConfigurationError, match=r"must be >= 0"):
        bucket.reserve_at(0, -1)
    assert bucket.statistics_at(0).tokens == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 0, "burst": 1}, r"rate=0\) must be > 0"),
        ({"rate": float("nan"), "burst": 1}, r"rate=nan\) must be > 0"),
        ({"rate": "fast", "burst": 1}, r"rate='fast'\) must be a number"),
        ({"rate": 1, "burst": 0}, r"burst=0\) must be a finite number >= 1"),
        ({"rate": 1, "burst": math.inf}, r"burst=inf\) must be a finite number >= 1"),
        ({"rate": 1, "burst": 2, "initial": 3}, r"initial=3\) must be a finite number <= burst 2"),
    ],
)
def test_bad_configuration_names_the_inputs(kwargs: dict[str, object], message: str) -> None:
    """Invalid constructor arguments raise ConfigurationError quoting the argument."""
    with pytest.raises(ConfigurationError, match=message):
        TokenBucket(**kwargs)  # type: ignore[arg-type]


def test_initial_level() -> None:
    """initial sets the starting level; a negative one is a debt new callers wait out."""
    bucket = TokenBucket(2.0, 4, initial=-1, clock=_Frozen())
    assert bucket.reserve_at(0, 1).time_to_act == 1.0


def test_infinite_rate_disables_limiting() -> None:
    """rate=inf grants everything at once, any n, and still counts."""
    bucket = TokenBucket(math.inf, 1, clock=_Frozen())
    for _ in range(1000):
        assert bucket.try_acquire_at(0, 1)
    assert bucket.reserve_at(0, 50).time_to_act == 0
    stats = bucket.statistics_at(0)
    assert (stats.granted, stats.denied, stats.waiters) == (1001, 0, 0)


# -- cancellation ----------------------------------------------------------------------


def test_cancel_returns_tokens_to_the_next_caller() -> None:
    """Cancelling the last waiter returns all its tokens: the next caller takes its slot."""
    bucket = TokenBucket(1.0, 1, clock=_Frozen())
    bucket.reserve_at(0, 1)
    waiting = bucket.reserve_at(0, 1)
    assert waiting.time_to_act == 1
    assert waiting.cancel_at(0.5)
    assert waiting.cancelled
    assert bucket.reserve_at(0.5, 1).time_to_act == 1
    assert bucket.statistics_at(0.5).cancelled == 1


def test_cancel_keeps_what_later_reservations_depend_on() -> None:
    """A cancelled waiter with packed waiters behind it refunds nothing until they go too."""
    bucket = TokenBucket(1.0, 1, clock=_Frozen())
    reservations = [bucket.reserve_at(0, 1) for _ in range(4)]  # at 0, 1, 2, 3
    assert reservations[1].cancel_at(0)
    # The waiters at 2 and 3 keep their times and a newcomer still queues behind them.
    assert bucket.statistics_at(0).tokens == -3
    assert reservations[2].cancel_at(0)
    assert reservations[3].cancel_at(0)
    # With nobody left behind it, every cancelled token is back.
    assert bucket.statistics_at(0).tokens == 0
    assert bucket.reserve_at(0, 1).time_to_act == 1


@pytest.mark.parametrize("order", ["first-to-last", "last-to-first", "middle-out"])
def test_cancel_result_does_not_depend_on_order(order: str) -> None:
    """Cancelling the same waiters in any order leaves the bucket in the same state."""
    bucket = TokenBucket(2.0, 3, clock=_Frozen())
    bucket.reserve_at(0, 3)
    waiters = [bucket.reserve_at(0, n) for n in (1, 2, 1, 3)]
    keep = bucket.reserve_at(0, 1)
    indices = {
        "first-to-last": [0, 1, 2, 3],
        "last-to-first": [3, 2, 1, 0],
        "middle-out": [1, 2, 0, 3],
    }[order]
    for index in indices:
        assert waiters[index].cancel_at(0.1)
    # Only `keep` (due at 4.0) remains, and the bucket refills to its burst of 3 long
    # before then: the level is what 0.1 s of refill gave, and a newcomer goes ahead of
    # `keep` as soon as its token has accrued.
    assert keep.time_to_act == 4.0
    assert bucket.statistics_at(0.1).tokens == pytest.approx(0.2)
    assert bucket.reserve_at(0.1, 1).time_to_act == pytest.approx(0.5)
    assert bucket.statistics_at(0.1).waiters == 2


def test_cancel_refund_absorbed_by_burst_golang_56924() -> None:
    """Later waiters that only needed what the burst holds do not eat the refund (go#56924)."""
    bucket = TokenBucket(1.0, 10, clock=_Frozen())
    bucket.reserve_at(0, 10)
    big = bucket.reserve_at(0, 5)
    small = bucket.reserve_at(0, 1)
    assert (big.time_to_act, small.time_to_act) == (5, 6)
    assert big.cancel_at(0)
    # Go refunds 5 - 1·(6 - 5) = 4 tokens here (level -2, next token at 3). All 5 can go
    # back: the waiter at 6 finds its token in the refilled bucket either way, and a
    # newcomer may even go ahead of it, as soon as its own token has accrued.
    assert bucket.statistics_at(0).tokens == -1
    assert bucket.reserve_at(0, 1).time_to_act == 1
    # Going ahead is only tried in front of the first sleeper; the next one queues by
    # the last sleeper's level (4 left at 6, so -2 now): conservative, never unsafe.
    assert bucket.reserve_at(0, 1).time_to_act == 3
    assert small.time_to_act == 6


def test_cancel_after_grant_time_is_a_no_op() -> None:
    """Once its time has come a reservation was used: cancel() returns False, no refund."""
    bucket = TokenBucket(1.0, 1, clock=_Frozen())
    bucket.reserve_at(0, 1)
    waiting = bucket.reserve_at(0, 1)
    assert not waiting.cancel_at(1.0)
    assert not waiting.cancelled
    assert bucket.reserve_at(1.0, 1).time_to_act == 2.0


def test_immediate_and_refused_reservations_cancel_as_no_ops() -> None:
    """Cancelling an immediate grant or a refusal returns False and changes nothing."""
    bucket = TokenBucket(1.0, 1, clock=_Frozen())
    now = bucket.reserve_at(0, 1)
    refused = bucket.reserve_at(0, 1, max_wait=0)
    assert not now.cancel_at(0)
    assert not refused.cancel_at(0)
    assert bucket.statistics_at(0).cancelled == 0


# -- rate and burst changes ----------------------------------------------------------------


def test_set_rate_up_keeps_sleepers_and_queues_newcomers_behind() -> None:
    """Faster rate mid-wait: sleepers keep their times; newcomers follow at the new rate."""
    bucket = TokenBucket(1.0, 1, clock=_Frozen())
    times = [bucket.reserve_at(0, 1).time_to_act for _ in range(3)]
    assert times == [0, 1, 2]
    bucket.set_rate_at(0.5, 2.0)
    assert bucket.reserve_at(0.5, 1).time_to_act == 2.5
    assert bucket.reserve_at(0.5, 1).time_to_act == 3.0


def test_set_rate_down_charges_the_debt_to_newcomers() -> None:
    """Slower rate mid-wait: sleepers keep their times; the debt they ran up is repaid first."""
    bucket = TokenBucket(1.0, 1, clock=_Frozen())
    [bucket.reserve_at(0, 1) for _ in range(3)]  # at 0, 1, 2
    bucket.set_rate_at(0.5, 0.5)
    # Replayed at 0.5/s from a level of 0.5 at t=0.5: -0.25 after the grant at 1,
    # -0.75 after the one at 2, so one more token is due 3.5 s later.
    assert bucket.reserve_at(0.5, 1).time_to_act == pytest.approx(5.5)


def test_set_rate_to_infinity_and_back() -> None:
    """inf lifts the limit at once; going back to a finite rate starts from a full bucket."""
    bucket = TokenBucket(1.0, 2, clock=_Frozen())
    bucket.reserve_at(0, 2)
    bucket.set_rate_at(1, math.inf)
    assert all(bucket.try_acquire_at(1, 1) for _ in range(10))
    bucket.set_rate_at(2, 1.0)
    assert bucket.try_acquire_at(2, 2)
    assert not bucket.try_acquire_at(2, 1)


def test_set_burst_cuts_the_level_and_never_adds() -> None:
    """A smaller burst trims the stored tokens; a larger one lets more accumulate later."""
    bucket = TokenBucket(1.0, 5, clock=_Frozen())
    bucket.set_burst_at(0, 2)
    assert bucket.statistics_at(0).tokens == 2
    bucket.set_burst_at(0, 4)
    assert bucket.statistics_at(0).tokens == 2
    assert bucket.statistics_at(10).tokens == 4
    with pytest.raises(ConfigurationError, match=r"set_burst\(burst=0\)"):
        bucket.set_burst_at(10, 0)
    with pytest.raises(ConfigurationError, match=r"set_rate\(rate=-1\)"):
        bucket.set_rate_at(10, -1)


# -- statistics -----------------------------------------------------------------------------


def test_statistics_snapshot() -> None:
    """statistics() is a frozen snapshot of the level, waiters and counters."""
    bucket = TokenBucket(2.0, 2, clock=_Frozen())
    bucket.try_acquire_at(0, 2)
    bucket.try_acquire_at(0, 1)
    first = bucket.reserve_at(0, 1)
    bucket.reserve_at(0, 1)
    first.cancel_at(0)
    stats = bucket.statistics_at(0)
    assert stats == RateLimiterStatistics(
        rate=2.0,
        burst=2.0,
        tokens=-1.0,
        waiters=1,
        granted=3,
        granted_tokens=4.0,
        denied=1,
        cancelled=1,
        total_wait=1.5,
    )
    with pytest.raises(AttributeError):
        stats.tokens = 5  # type: ignore[misc]


# -- async behaviour on the virtual clock -------------------------------------------------------


async def test_acquire_grants_at_exact_times(clock: Clock) -> None:
    """Concurrent acquirers at 10/s, burst 1, are let through at 0, 0.1, 0.2, ..."""
    bucket = TokenBucket(10.0, 1, clock=clock)
    granted: list[float] = []

    async def one() -> None:
        await bucket.acquire()
        granted.append(clock.now())

    async with asyncio.TaskGroup() as group:
        for _ in range(5):
            group.create_task(one())
    assert granted == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4], abs=1e-6)


async def test_acquire_fifo_with_mixed_sizes(clock: Clock) -> None:
    """A large request queued first is served first; small ones do not starve it."""
    bucket = TokenBucket(1.0, 4, clock=clock)
    order: list[tuple[str, float]] = []

    async def take(name: str, n: int) -> None:
        await bucket.acquire(n)
        order.append((name, clock.now()))

    await bucket.acquire(4)
    async with asyncio.TaskGroup() as group:
        group.create_task(take("big", 4))
        await asyncio.sleep(0)
        for index in range(3):
            group.create_task(take(f"small{index}", 1))
            await asyncio.sleep(0)
    assert order == [("big", 4.0), ("small0", 5.0), ("small1", 6.0), ("small2", 7.0)]


async def test_acquire_timeout_fails_fast_without_consuming(clock: Clock) -> None:
    """A wait longer than the timeout raises at once (no sleep) and reserves nothing."""
    bucket = TokenBucket(1.0, 2, clock=clock)
    await bucket.acquire(2)
    with pytest.raises(RateLimitExceeded, match=r"acquire\(n=1\) would wait 1 s") as info:
        await bucket.acquire(1, timeout=0.5)
    assert clock.now() == 0
    assert info.value.context["timeout"] == 0.5
    assert info.value.transient
    await bucket.acquire(1, timeout=1.0)
    assert clock.now() == 1.0
    with pytest.raises(ConfigurationError, match=r"acquire\(n=3\) exceeds burst 2"):
        await bucket.acquire(3)


async def test_cancelled_waiter_gives_tokens_back(clock: Clock) -> None:
    """A waiter cancelled by a timeout returns its tokens; the next waiter moves up."""
    bucket = TokenBucket(1.0, 1, clock=clock)
    await bucket.acquire()
    # asyncio.timeout, not headrace's deadline(): the latter would be refused up front.
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await bucket.acquire()
    assert clock.now() == 0.5
    assert bucket.statistics().cancelled == 1
    await bucket.acquire()
    assert clock.now() == 1.0


async def test_mass_cancellation_restores_the_bucket(clock: Clock) -> None:
    """Cancelling every waiter (a shutdown) leaves the bucket as if they never came."""
    bucket = TokenBucket(100.0, 1, clock=clock)
    await bucket.acquire()
    tasks = [asyncio.create_task(bucket.acquire()) for _ in range(500)]
    await asyncio.sleep(0.001)
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(result, asyncio.CancelledError) for result in results)
    stats = bucket.statistics()
    assert (stats.waiters, stats.cancelled) == (0, 500)
    # At 0.001 s the bucket has refilled 0.1 of the token taken at 0.
    assert stats.tokens == pytest.approx(0.1)


async def test_reservation_wait_and_cancel(clock: Clock) -> None:
    """reserve() + wait() sleeps until time_to_act; a cancelled reservation refuses wait()."""
    bucket = TokenBucket(4.0, 1, clock=clock)
    bucket.reserve()
    reservation = bucket.reserve()
    assert isinstance(reservation, Reservation)
    assert reservation.delay == 0.25
    await reservation.wait()
    assert clock.now() == 0.25
    later = bucket.reserve()
    assert later.cancel()
    with pytest.raises(RateLimitExceeded, match="was cancelled"):
        await later.wait()
    refused = bucket.reserve(max_wait=0)
    with pytest.raises(RateLimitExceeded, match="was refused"):
        await refused.wait()


async def test_async_with_takes_one_token(clock: Clock) -> None:
    """``async with`` a bucket or a MultiLimiter waits for one token, like acquire()."""
    bucket = TokenBucket(2.0, 1, clock=clock)
    both = MultiLimiter(bucket, TokenBucket(1.0, 1, clock=clock))
    async with bucket:
        assert clock.now() == 0
    async with bucket:
        assert clock.now() == 0.5
    async with both:
        assert clock.now() == 1.0
    assert bucket.statistics().granted == 3


async def test_dynamic_rate_change_mid_wait(clock: Clock) -> None:
    """Sleepers wake at the times they were given; later callers follow the new rate."""
    bucket = TokenBucket(1.0, 1, clock=clock)
    woke: dict[str, float] = {}

    async def take(name: str) -> None:
        await bucket.acquire()
        woke[name] = clock.now()

    async with asyncio.TaskGroup() as group:
        for name in ("a", "b", "c"):
            group.create_task(take(name))
        await asyncio.sleep(0.5)
        bucket.set_rate(4.0)
        group.create_task(take("d"))
        group.create_task(take("e"))
    assert woke == {"a": 0.0, "b": 1.0, "c": 2.0, "d": 2.25, "e": 2.5}


# -- MultiLimiter ---------------------------------------------------------------------------


def test_multi_limiter_grants_at_the_slowest_time() -> None:
    """All buckets are charged at the slowest bucket's time, each in its own queue."""
    clock = _Frozen()
    fast, slow = TokenBucket(10.0, 10, clock=clock), TokenBucket(1.0, 1, clock=clock)
    both = MultiLimiter(fast, slow)
    assert both.reserve_at(0, 1).time_to_act == 0
    waiting = both.reserve_at(0, 1)
    assert waiting.time_to_act == 1.0
    # The fast bucket was not drained while the request waits on the slow one: its
    # other callers can still take the 9 it holds now (it refills before 1.0).
    assert fast.try_acquire_at(0, 9)
    assert not fast.try_acquire_at(0, 1)
    assert slow.reserve_at(0, 1).time_to_act == 2.0


def test_multi_limiter_refusal_is_all_or_nothing() -> None:
    """A refused or failed multi-request takes nothing from any bucket."""
    clock = _Frozen()
    fast, slow = TokenBucket(10.0, 10, clock=clock), TokenBucket(1.0, 1, clock=clock)
    both = MultiLimiter(fast, slow)
    assert both.try_acquire_at(0, 1)
    assert not both.try_acquire_at(0, 1)
    refused = both.reserve_at(0, 1, max_wait=0.5)
    assert not refused.ok
    assert fast.statistics_at(0).tokens == 9
    with pytest.raises(ConfigurationError, match=r"exceeds burst 1"):
        both.reserve_at(0, 2)
    assert fast.statistics_at(0).tokens == 9


def test_multi_limiter_cancel_returns_to_every_bucket() -> None:
    """Cancelling a multi-reservation refunds each bucket it was charged to."""
    clock = _Frozen()
    first, second = TokenBucket(1.0, 1, clock=clock), TokenBucket(2.0, 1, clock=clock)
    both = MultiLimiter(first, second)
    both.reserve_at(0, 1)
    waiting = both.reserve_at(0, 1)
    assert waiting.time_to_act == 1.0
    assert waiting.cancel_at(0.2)
    assert first.reserve_at(0.2, 1).time_to_act == 1.0
    assert second.reserve_at(0.2, 1).time_to_act == 0.5


def test_per_second_and_minute_helper() -> None:
    """per_second_and_minute(2, 3): 2 at once, the third at 0.5 s, then one per 20 s."""
    clock = _Frozen()
    limits = MultiLimiter.per_second_and_minute(2, 3, clock=clock)
    assert [b.rate for b in limits.limiters] == [2.0, 3 / 60]
    times = [limits.reserve_at(0, 1).time_to_act for _ in range(5)]
    assert times == pytest.approx([0, 0, 0.5, 20.0, 40.0])


def test_multi_limiter_rejects_non_buckets() -> None:
    """MultiLimiter refuses anything but buckets, and needs at least one."""
    with pytest.raises(ConfigurationError, match="takes TokenBucket"):
        MultiLimiter(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="at least one"):
        MultiLimiter()


async def test_multi_limiter_acquire_and_timeout(clock: Clock) -> None:
    """acquire() on a MultiLimiter waits once for the slowest; a short timeout fails fast."""
    both = MultiLimiter(TokenBucket(10.0, 1, clock=clock), TokenBucket(2.0, 1, clock=clock))
    await both.acquire()
    with pytest.raises(RateLimitExceeded):
        await both.acquire(timeout=0.1)
    assert clock.now() == 0
    await both.acquire()
    assert clock.now() == 0.5
    assert [s.granted for s in both.statistics()] == [2, 2]


# -- KeyedLimiter ---------------------------------------------------------------------------


async def test_keyed_limiter_keys_are_independent(clock: Clock) -> None:
    """A key whose callers wait for seconds never delays another key."""
    keyed: KeyedLimiter[str, TokenBucket] = KeyedLimiter(
        lambda key: TokenBucket(1.0, 1, clock=clock), clock=clock
    )
    finished: dict[str, float] = {}

    async def take(key: str, label: str) -> None:
        await keyed.acquire(key)
        finished[label] = clock.now()

    async with asyncio.TaskGroup() as group:
        for index in range(3):
            group.create_task(take("slow.example", f"slow{index}"))
        await asyncio.sleep(0)
        group.create_task(take("fast.example", "fast"))
    assert finished == {"slow0": 0.0, "slow1": 1.0, "slow2": 2.0, "fast": 0.0}
    assert len(keyed) == 2
    assert "slow.example" in keyed
    assert sorted(keyed) == ["fast.example", "slow.example"]


def test_keyed_limiter_evicts_only_idle_full_limiters() -> None:
    """Eviction waits for idle_timeout *and* a full bucket, so no burst is handed out early."""
    clock = _Frozen()
    made: list[str] = []

    def factory(key: str) -> TokenBucket:
        made.append(key)
        return TokenBucket(0.01, 1, clock=clock)  # refills in 100 s

    keyed: KeyedLimiter[str, TokenBucket] = KeyedLimiter(factory, idle_timeout=10, clock=clock)
    assert keyed.limiter_at(0, "a").try_acquire_at(0, 1)
    keyed.limiter_at(0, "b")
    assert keyed.evict_idle_at(10) == 1  # "b" is full and idle; "a" is still refilling
    assert list(keyed) == ["a"]
    assert not keyed.limiter_at(50, "a").try_acquire_at(50, 1)  # the same, empty bucket
    assert keyed.evict_idle_at(150) == 1
    assert keyed.limiter_at(150, "a").try_acquire_at(150, 1)
    assert made == ["a", "b", "a"]


def test_keyed_limiter_sweeps_on_access() -> None:
    """Idle keys are swept automatically when the limiter is used after idle_timeout."""
    clock = _Frozen()
    keyed: KeyedLimiter[int, TokenBucket] = KeyedLimiter(
        lambda key: TokenBucket(1.0, 1, clock=clock), idle_timeout=5, clock=clock
    )
    for key in range(100):
        keyed.limiter_at(0, key)
    keyed.limiter_at(6, -1)
    assert list(keyed) == [-1]
    with pytest.raises(ConfigurationError, match="idle_timeout=0"):
        KeyedLimiter(lambda key: TokenBucket(1, 1), idle_timeout=0)


# -- the b + r·T bound, as a property ----------------------------------------------------------

_OPS = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=40),  # time step, in 1/40 s
        st.sampled_from(["reserve", "try", "reserve_wait", "multi", "cancel"]),
        st.integers(min_value=0, max_value=4),  # n
        st.integers(min_value=0, max_value=1000),  # which reservation to cancel; max_wait
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rate=st.sampled_from([0.5, 1.0, 3.0, 10.0]),
    burst=st.integers(min_value=1, max_value=4),
    other_rate=st.sampled_from([0.25, 2.0, 7.0]),
    ops=_OPS,
)
def test_no_window_sees_more_than_burst_plus_rate_times_length(
    rate: float, burst: int, other_rate: float, ops: list[tuple[int, str, int, int]]
) -> None:
    """Whatever the mix of reserve, try, cancel and multi-requests, b + r·T always holds."""
    clock = _Frozen()
    bucket = TokenBucket(rate, burst, clock=clock)
    other = TokenBucket(other_rate, 2, clock=clock)
    both = MultiLimiter(bucket, other)
    now = 0.0
    made: list[tuple[Reservation, bool]] = []  # (reservation, charged to `other` too)
    for step, kind, n, pick in ops:
        now += step / 40
        n = min(n, burst, 2) if kind == "multi" else min(n, burst)
        if kind == "reserve":
            made.append((bucket.reserve_at(now, n), False))
        elif kind == "reserve_wait":
            made.append((bucket.reserve_at(now, n, max_wait=pick / 400), False))
        elif kind == "try":
            if bucket.try_acquire_at(now, n):
                made.append(
                    (Reservation(ok=True, tokens=n, time_to_act=now, delay=0, clock=clock), False)
                )
        elif kind == "multi":
            made.append((both.reserve_at(now, n), True))
        elif kind == "cancel" and made:
            made[pick % len(made)][0].cancel_at(now)
    grants = [(r.time_to_act, r.tokens) for r, _ in made if r.ok and not r.cancelled]
    _assert_bound(grants, rate, burst)
    _assert_bound(
        [(r.time_to_act, r.tokens) for r, multi in made if multi and r.ok and not r.cancelled],
        other_rate,
        2,
    )


@settings(max_examples=200, deadline=None)
@given(
    rate=st.sampled_from([0.5, 1.0, 3.0, 10.0, 1000.0]),
    burst=st.integers(min_value=1, max_value=5),
    ops=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=50),
            st.booleans(),
            st.integers(min_value=0, max_value=5),
        ),
        max_size=60,
    ),
)
def test_without_cancellations_it_is_the_go_arithmetic(
    rate: float, burst: int, ops: list[tuple[int, bool, int]]
) -> None:
    """With no cancels, grant times equal x/time/rate's token arithmetic (a tiny model)."""
    bucket = TokenBucket(rate, burst, clock=_Frozen())
    tokens, last, now = float(burst), 0.0, 0.0
    for step, try_only, n in ops:
        now += step / 50
        n = min(n, burst)
        tokens = min(burst, tokens + (now - last) * rate)
        last = now
        # One deliberate difference: asking for 0 tokens never waits (Go queues it).
        expected_wait = max(0.0, (n - tokens) / rate) if n else 0.0
        if try_only:
            granted = bucket.try_acquire_at(now, n)
            assert granted == (expected_wait <= 1e-9 / rate)
            if granted:
                tokens -= n
        else:
            reservation = bucket.reserve_at(now, n)
            tokens -= n
            assert reservation.time_to_act == pytest.approx(now + expected_wait, abs=1e-9)


def _assert_bound(grants: list[tuple[float, float]], rate: float, burst: float) -> None:
    grants = sorted(grants)
    for i in range(len(grants)):
        total = 0.0
        for j in range(i, len(grants)):
            total += grants[j][1]
            window = grants[j][0] - grants[i][0]
            assert total <= burst + rate * window + 1e-9, (grants[i], grants[j], total)


class _Frozen:
    """A clock for the pure tests: they pass ``now`` explicitly, so it always reads 0."""

    def now(self) -> float:
        return 0.0

    async def sleep(self, seconds: float) -> None:  # pragma: no cover - never awaited
        raise AssertionError("pure tests do not sleep")

    async def sleep_until(self, deadline: float) -> None:  # pragma: no cover
        raise AssertionError("pure tests do not sleep")

    def call_at(self, when: float, callback: object) -> object:  # pragma: no cover
        raise AssertionError("pure tests do not schedule")


async def test_acquire_fails_fast_against_an_enclosing_deadline(clock: Clock) -> None:
    """A wait that would outlast the enclosing deadline() is refused at once, untaken."""
    bucket = TokenBucket(rate=1, burst=1, clock=clock)
    await bucket.acquire()
    async with deadline_scope(0.5):
        with pytest.raises(RateLimitExceeded, match="enclosing deadline"):
            await bucket.acquire()
    assert clock.now() == 0
    async with deadline_scope(2):
        await bucket.acquire()  # a 1 s wait fits in a 2 s deadline
    assert clock.now() == 1
    assert bucket.statistics().denied == 1
