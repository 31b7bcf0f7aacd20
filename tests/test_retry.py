"""Retry policies: pure decisions and the async call loop on the virtual clock."""

from __future__ import annotations

import asyncio

import pytest

from headrace import (
    BrokerConnectionError,
    ConfigurationError,
    HeadraceError,
    InternalError,
    Retry,
    RetryBudget,
)
from headrace.testing import VirtualClock


def test_backoff_grows_and_caps_without_jitter() -> None:
    """Delays double from initial_delay and stop at max_delay."""
    policy = Retry(max_attempts=10, initial_delay=0.5, max_delay=3.0, jitter="none")
    assert [policy.backoff(n) for n in range(0, 6)] == [0.0, 0.5, 1.0, 2.0, 3.0, 3.0]


@pytest.mark.parametrize(
    ("jitter", "draw", "expected"), [("full", 0.25, 0.5), ("equal", 0.5, 1.5), ("none", 0.9, 2.0)]
)
def test_jitter_modes(jitter: str, draw: float, expected: float) -> None:
    """Full jitter draws from [0, d], equal jitter from [d/2, d]."""
    policy = Retry(initial_delay=1.0, jitter=jitter)  # type: ignore[arg-type]
    assert policy.backoff(2, rng=lambda: draw) == expected


def test_default_retryable_follows_the_transient_hint() -> None:
    """Transient errors, timeouts and connection errors retry; bugs and the rest do not."""
    policy = Retry()
    assert policy.is_retryable(BrokerConnectionError("down"))
    assert policy.is_retryable(TimeoutError())
    assert policy.is_retryable(ConnectionResetError())
    assert not policy.is_retryable(InternalError("bug"))
    assert not policy.is_retryable(HeadraceError("x", transient=False))
    assert not policy.is_retryable(ValueError())
    assert not policy.is_retryable(asyncio.CancelledError())


def test_next_delay_respects_attempts_budget_and_retry_after() -> None:
    """The policy gives up at max_attempts or past its budget; Retry-After is a floor."""
    policy = Retry(max_attempts=3, initial_delay=1.0, jitter="none", budget=10.0)
    error = TimeoutError()
    assert policy.next_delay(error, 1, 0.0) == 1.0
    assert policy.next_delay(error, 2, 0.0) == 2.0
    assert policy.next_delay(error, 3, 0.0) is None
    assert policy.next_delay(error, 1, 9.5) is None
    error.retry_after = 4.0  # type: ignore[attr-defined]
    assert policy.next_delay(error, 1, 0.0) == 4.0


def test_invalid_policies_name_their_inputs() -> None:
    """Bad arguments fail at construction with the value in the message."""
    with pytest.raises(ConfigurationError, match="max_attempts=0"):
        Retry(max_attempts=0)
    with pytest.raises(ConfigurationError, match=r"multiplier=0\.5"):
        Retry(multiplier=0.5)
    with pytest.raises(ConfigurationError, match="jitter='sometimes'"):
        Retry(jitter="sometimes")  # type: ignore[arg-type]


async def test_call_retries_at_exact_times(clock: VirtualClock) -> None:
    """Attempts happen at 0, 1 and 3 seconds with doubling delays, then succeed."""
    attempts: list[float] = []

    async def flaky() -> str:
        attempts.append(clock.now())
        if len(attempts) < 3:
            raise ConnectionResetError("reset")
        return "ok"

    retried: list[tuple[int, float]] = []
    policy = Retry(max_attempts=5, initial_delay=1.0, jitter="none")
    result = await policy.call(flaky, on_retry=lambda exc, n, delay: retried.append((n, delay)))
    assert result == "ok"
    assert attempts == [0.0, 1.0, 3.0]
    assert retried == [(1, 1.0), (2, 2.0)]


async def test_call_reraises_the_last_error_with_a_note(clock: VirtualClock) -> None:
    """When attempts run out, the last error itself is raised, annotated."""

    async def always_down() -> None:
        raise BrokerConnectionError("down")

    with pytest.raises(BrokerConnectionError) as caught:
        await Retry(max_attempts=3, initial_delay=0.5, jitter="none").call(always_down)
    assert clock.now() == 1.5
    assert "gave up after 3 attempts" in caught.value.__notes__[0]


async def test_call_does_not_retry_bugs(clock: VirtualClock) -> None:
    """A non-retryable error is raised at once."""
    calls = 0

    async def buggy() -> None:
        nonlocal calls
        calls += 1
        raise KeyError("oops")

    with pytest.raises(KeyError):
        await Retry().call(buggy)
    assert calls == 1
    assert clock.now() == 0


async def test_retry_budget_limits_retries_to_a_ratio(clock: VirtualClock) -> None:
    """With no reserve, 10 requests at ratio 0.2 earn exactly 2 retries."""
    budget = RetryBudget(ratio=0.2, min_per_second=0)
    for _ in range(10):
        budget.record_request()
    assert [budget.try_spend() for _ in range(3)] == [True, True, False]


async def test_retry_budget_reserve_refills_over_time(clock: VirtualClock) -> None:
    """The per-second reserve lets a quiet client retry, refilling with time."""
    budget = RetryBudget(ratio=0.0, min_per_second=2)
    assert [budget.try_spend() for _ in range(3)] == [True, True, False]
    await asyncio.sleep(0.5)
    assert budget.try_spend() is True
    assert budget.try_spend() is False
