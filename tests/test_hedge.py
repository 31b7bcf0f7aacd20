"""Hedged and replicated calls: exact firing times, cancellation of losers, budgets."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headrace import ConfigurationError, RetryBudget
from headrace._clock import Clock
from headrace._hedge import (
    HedgeBudget,
    HedgePolicy,
    LatencyTracker,
    PercentileDelay,
    first_completed,
    hedge,
)
from headrace.testing import VirtualClock, run


class Service:
    """A fake remote call whose n-th attempt takes ``latencies[n]`` seconds (or raises)."""

    def __init__(self, clock: Clock, outcomes: list[float | BaseException]) -> None:
        self.clock = clock
        self.outcomes = list(outcomes)
        self.log: list[tuple[str, int, float]] = []
        self.calls = 0

    async def __call__(self) -> str:
        number = self.calls
        self.calls += 1
        self.log.append(("start", number, self.clock.now()))
        outcome = self.outcomes[number]
        try:
            if isinstance(outcome, BaseException):
                await self.clock.sleep(0.05)
                self.log.append(("fail", number, self.clock.now()))
                raise outcome
            await self.clock.sleep(outcome)
        except asyncio.CancelledError:
            self.log.append(("cancelled", number, self.clock.now()))
            raise
        self.log.append(("done", number, self.clock.now()))
        return f"answer {number}"


async def test_fast_answer_needs_no_hedge(clock: Clock) -> None:
    """An answer before the delay returns at its time and starts no second attempt."""
    service = Service(clock, [0.1, 0.1])
    policy = HedgePolicy(delay=0.2, clock=clock)
    assert await policy.call(service) == "answer 0"
    assert clock.now() == 0.1
    assert service.calls == 1
    statistics = policy.statistics()
    assert (statistics.calls, statistics.attempts, statistics.wins_by_attempt) == (1, 1, (1, 0))
    assert statistics.extra_load == 0.0


async def test_hedge_fires_at_exactly_delay_and_wins(clock: Clock) -> None:
    """The hedge starts at exactly ``delay``; its answer cancels the slow first attempt."""
    service = Service(clock, [10.0, 0.3])
    policy = HedgePolicy(delay=0.2, clock=clock)
    assert await policy.call(service) == "answer 1"
    assert clock.now() == 0.5
    assert service.log == [
        ("start", 0, 0.0),
        ("start", 1, 0.2),
        ("done", 1, 0.5),
        ("cancelled", 0, 0.5),
    ]
    statistics = policy.statistics()
    assert statistics.wins_by_attempt == (0, 1)
    assert statistics.extra_attempts == 1


async def test_winner_at_t_cancels_loser_at_t(clock: Clock) -> None:
    """When the first attempt answers at t after a hedge started, the hedge dies at t."""
    service = Service(clock, [0.35, 5.0])
    assert await hedge(service, delay=0.25, clock=clock) == "answer 0"
    assert clock.now() == 0.35
    assert service.log[-2:] == [("done", 0, 0.35), ("cancelled", 1, 0.35)]


async def test_each_hedge_waits_delay_after_the_previous(clock: Clock) -> None:
    """With max_attempts=3 the attempts start at 0, delay and 2*delay."""
    service = Service(clock, [9.0, 9.0, 0.5])
    assert await hedge(service, delay=0.25, max_attempts=3, clock=clock) == "answer 2"
    starts = [at for event, _, at in service.log if event == "start"]
    assert starts == [0.0, 0.25, 0.5]
    assert clock.now() == 1.0


async def test_non_fatal_error_fires_next_attempt_at_once(clock: Clock) -> None:
    """A non-fatal failure (a connection error) starts the next attempt immediately."""
    service = Service(clock, [ConnectionError("reset"), 0.1])
    policy = HedgePolicy(delay=1.0, clock=clock)
    assert await policy.call(service) == "answer 1"
    assert service.log == [
        ("start", 0, 0.0),
        ("fail", 0, 0.05),
        ("start", 1, 0.05),
        ("done", 1, pytest.approx(0.15)),
    ]


async def test_fatal_error_ends_the_call_and_cancels_the_rest(clock: Clock) -> None:
    """A fatal error is raised at once and the attempts still running are cancelled."""
    service = Service(clock, [5.0, ValueError("bad request")])
    policy = HedgePolicy(delay=0.1, clock=clock)
    with pytest.raises(ValueError, match="bad request"):
        await policy.call(service)
    assert clock.now() == pytest.approx(0.15)
    assert service.log[-1] == ("cancelled", 0, pytest.approx(0.15))
    assert policy.statistics().failures == 1


async def test_all_attempts_failing_raises_the_last_error(clock: Clock) -> None:
    """When every attempt fails with non-fatal errors, the last one is raised, noted."""
    service = Service(clock, [TimeoutError("first"), TimeoutError("second")])
    with pytest.raises(TimeoutError, match="second") as caught:
        await hedge(service, delay=1.0, clock=clock)
    assert "all 2 attempts failed" in "".join(caught.value.__notes__)
    assert clock.now() == pytest.approx(0.1)


async def test_budget_refuses_hedges_beyond_its_tokens(clock: Clock) -> None:
    """An empty budget refuses the hedge: the call waits for its single attempt."""
    budget = HedgeBudget(0.0, burst=1.0, initial=0.0)
    service = Service(clock, [2.0, 0.1])
    policy = HedgePolicy(delay=0.5, budget=budget, clock=clock)
    assert await policy.call(service) == "answer 0"
    assert clock.now() == 2.0
    assert service.calls == 1
    assert policy.statistics().budget_denied == 1


async def test_budget_caps_extra_load_to_its_ratio(clock: Clock) -> None:
    """Over 200 slow calls, a 1/16 budget with burst 2 allows 2 + floor(198/16) hedges.

    The first call's deposit is lost to the full bucket; 1/16 is exact in binary, so
    the count does not depend on rounding.
    """
    budget = HedgeBudget(0.0625, burst=2.0)
    policy = HedgePolicy(delay=0.01, budget=budget, clock=clock)

    async def slow() -> None:
        await clock.sleep(0.02)

    for _ in range(200):
        await policy.call(slow)
    statistics = policy.statistics()
    assert statistics.extra_attempts == 14
    assert statistics.budget_denied == 186
    assert statistics.extra_load == pytest.approx(0.07)


async def test_retry_budget_can_be_shared_with_hedges(clock: Clock) -> None:
    """A RetryBudget fits the budget protocol, so retries and hedges can share one."""
    budget = RetryBudget(ratio=0.5, min_per_second=0, clock=clock)
    service = Service(clock, [3.0, 3.0, 0.05])
    policy = HedgePolicy(delay=0.1, budget=budget, clock=clock)
    assert await policy.call(service) == "answer 0"  # half a token: no hedge
    assert await policy.call(service) == "answer 2"  # a whole token: hedged
    statistics = policy.statistics()
    assert (statistics.extra_attempts, statistics.budget_denied) == (1, 1)


async def test_caller_cancellation_cancels_and_awaits_every_attempt(clock: Clock) -> None:
    """Cancelling the caller cancels all attempts at that instant; none outlives it."""
    service = Service(clock, [5.0, 5.0])
    task = asyncio.create_task(hedge(service, delay=0.1, clock=clock))
    await clock.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert clock.now() == 0.3
    assert sorted(event for event in service.log if event[0] == "cancelled") == [
        ("cancelled", 0, 0.3),
        ("cancelled", 1, 0.3),
    ]


async def test_loser_that_ignores_cancellation_is_bounded(clock: Clock) -> None:
    """A loser still cleaning up after cancel_timeout no longer delays the answer."""
    cleanup_done: list[float] = []

    async def stubborn() -> str:
        try:
            await clock.sleep(10.0)
        except asyncio.CancelledError:
            await clock.sleep(2.0)  # slow cleanup
            cleanup_done.append(clock.now())
            raise
        return "late"

    async def quick() -> str:
        await clock.sleep(0.1)
        return "quick"

    policy = HedgePolicy(delay=0.0, max_attempts=2, cancel_timeout=0.5, clock=clock)
    attempts = iter([stubborn, quick])
    assert await policy.call(lambda: next(attempts)()) == "quick"
    assert clock.now() == pytest.approx(0.6)
    assert policy.statistics().stragglers == 1
    await clock.sleep(2.0)  # the straggler ends on its own; nothing is left behind
    assert cleanup_done == [pytest.approx(2.1)]


async def test_percentile_delay_follows_observed_latency(clock: Clock) -> None:
    """After min_samples calls the hedge fires at the observed percentile, not before."""
    delay = PercentileDelay(90, min_samples=10, floor=0.001)
    policy = HedgePolicy(delay=delay, clock=clock)
    assert policy.current_delay() is None  # no data: no time-based hedge yet
    for latency in [0.01 * (index + 1) for index in range(10)]:

        async def answer(latency: float = latency) -> None:
            await clock.sleep(latency)

        await policy.call(answer)
    assert policy.statistics().extra_attempts == 0
    assert policy.current_delay() == pytest.approx(0.09)
    service = Service(clock, [5.0, 0.01])
    started = clock.now()
    await policy.call(service)
    assert service.log[1] == ("start", 1, pytest.approx(started + 0.09))


async def test_percentile_delay_records_a_lost_first_attempt_as_a_lower_bound(
    clock: Clock,
) -> None:
    """When a hedge wins, the first attempt's elapsed time at cancellation is recorded,
    so slow first attempts keep counting above the percentile."""
    delay = PercentileDelay(95, min_samples=1, initial=0.1)
    delay.record(0.1)
    policy = HedgePolicy(delay=delay, clock=clock)
    service = Service(clock, [9.0, 0.05])
    await policy.call(service)
    tracker = delay.tracker
    assert len(tracker) == 2
    assert tracker.percentile(100) == pytest.approx(0.15)  # cancelled at 0.15 (0.1 + 0.05)


async def test_percentile_delay_has_a_floor_and_an_initial_value(clock: Clock) -> None:
    """The delay never drops below ``floor``; ``initial`` applies until enough samples."""
    delay = PercentileDelay(50, min_samples=3, floor=0.05, initial=0.2)
    assert delay.current() == 0.2
    for _ in range(3):
        delay.record(0.001)
    assert delay.current() == 0.05


def test_latency_tracker_is_a_rolling_window() -> None:
    """Percentiles use nearest rank over the last ``window`` samples only."""
    tracker = LatencyTracker(window=4)
    assert tracker.percentile(50) is None
    for value in [5.0, 1.0, 3.0, 2.0]:
        tracker.record(value)
    assert (tracker.percentile(50), tracker.percentile(100)) == (2.0, 5.0)
    tracker.record(4.0)  # evicts 5.0
    assert (len(tracker), tracker.percentile(100), tracker.percentile(1)) == (4, 4.0, 1.0)


async def test_first_completed_returns_the_fastest_handler(clock: Clock) -> None:
    """All handlers start at once; the first success wins and the rest die at that time."""
    events: list[tuple[str, float]] = []

    def handler(name: str, seconds: float) -> Callable[[], Awaitable[str]]:
        async def call() -> str:
            try:
                await clock.sleep(seconds)
            except asyncio.CancelledError:
                events.append((f"{name} cancelled", clock.now()))
                raise
            return name

        return call

    result = await first_completed(
        handler("a", 0.4), handler("b", 0.2), handler("c", 0.3), clock=clock
    )
    assert result == "b"
    assert clock.now() == 0.2
    assert sorted(events) == [("a cancelled", 0.2), ("c cancelled", 0.2)]


async def test_first_completed_ignores_a_failing_handler(clock: Clock) -> None:
    """A handler that fails does not end the race while another can still answer."""

    async def broken() -> str:
        raise KeyError("replica lost")

    async def slow() -> str:
        await clock.sleep(1.0)
        return "slow but fine"

    assert await first_completed(broken, slow, clock=clock) == "slow but fine"
    assert clock.now() == 1.0
    with pytest.raises(KeyError):
        await first_completed(broken, broken, clock=clock)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"delay": -1.0}, "delay=-1.0"),
        ({"delay": "soon"}, "delay='soon'"),
        ({"delay": 0.1, "max_attempts": 0}, "max_attempts=0"),
        ({"delay": 0.1, "cancel_timeout": -1}, "cancel_timeout=-1"),
        ({"delay": 0.1, "budget": object()}, "record_request"),
    ],
)
def test_bad_configuration_is_refused(kwargs: dict[str, object], match: str) -> None:
    """Invalid hedge settings raise ConfigurationError naming the input."""
    with pytest.raises(ConfigurationError, match=match):
        HedgePolicy(**kwargs)  # type: ignore[arg-type]


async def test_call_needs_a_callable() -> None:
    """HedgePolicy.call() with something that is not callable is refused at once."""
    with pytest.raises(ConfigurationError, match="needs a callable"):
        await HedgePolicy(delay=0.1).call(42)  # type: ignore[arg-type]


async def test_first_completed_needs_callables() -> None:
    """first_completed() without handlers, or with a non-callable, is refused."""
    with pytest.raises(ConfigurationError, match="at least one"):
        await first_completed()
    with pytest.raises(ConfigurationError, match="argument 1"):
        await first_completed(lambda: asyncio.sleep(0), 3)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    latencies=st.lists(st.integers(1, 400), min_size=3, max_size=3),
    delay=st.integers(1, 200),
)
def test_hedge_finishes_at_the_earliest_attempt_completion(
    latencies: list[int], delay: int
) -> None:
    """For any latencies, a hedged call ends when the first launched attempt would end.

    Attempt k starts at k*delay if no attempt finished by then; times are in
    milliseconds, with odd delays against even latencies so that no two events tie.
    """
    clock = VirtualClock()
    delay_ms = 2 * delay + 1
    latency_ms = [2 * value for value in latencies]

    async def main() -> tuple[float, int]:
        service = Service(clock, [value / 1000 for value in latency_ms])
        await hedge(service, delay=delay_ms / 1000, max_attempts=3, clock=clock)
        return clock.now(), service.calls

    finished, calls = run(main, clock=clock)
    expected = latency_ms[0]
    launched = 1
    for number in (1, 2):
        start = number * delay_ms
        if start >= expected:
            break
        launched += 1
        expected = min(expected, start + latency_ms[number])
    assert finished == pytest.approx(expected / 1000)
    assert calls == launched


@settings(max_examples=80, deadline=None)
@given(
    latencies=st.lists(st.integers(1, 300), min_size=3, max_size=3),
    delay=st.integers(1, 100),
    cancel_at=st.integers(1, 400),
)
def test_cancelling_a_hedge_at_any_time_leaves_nothing_behind(
    latencies: list[int], delay: int, cancel_at: int
) -> None:
    """Cancelled at a random instant, a hedged call ends then with every attempt ended.

    Times in ms: odd cancel instants against even latencies and delays, so no tie.
    ``run`` fails the example if any task outlives it.
    """
    clock = VirtualClock()
    cancel_ms = 2 * cancel_at + 1

    async def main() -> tuple[str, float, Service]:
        service = Service(clock, [2 * value / 1000 for value in latencies])
        task = asyncio.create_task(
            hedge(service, delay=2 * delay / 1000, max_attempts=3, clock=clock)
        )
        clock.call_at(cancel_ms / 1000, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled", clock.now(), service
        return "answered", clock.now(), service

    outcome, ended, service = run(main, clock=clock)
    started = {number for event, number, _ in service.log if event == "start"}
    finished = {number for event, number, _ in service.log if event in ("done", "cancelled")}
    assert started == finished
    if outcome == "cancelled":
        assert ended == pytest.approx(cancel_ms / 1000)
    else:
        assert ended < cancel_ms / 1000


@pytest.mark.real_time
async def test_hedge_on_the_real_clock() -> None:
    """On a real loop, a hedge rescues a call whose first attempt stalls (tolerant:
    the stall is 2 s, the hedge fires at 20 ms; anything under 1 s proves it)."""
    loop = asyncio.get_running_loop()
    attempts = iter([2.0, 0.01])

    async def call() -> float:
        latency = next(attempts)
        await asyncio.sleep(latency)
        return latency

    started = loop.time()
    assert await hedge(call, delay=0.02) == 0.01
    assert loop.time() - started < 1.0
