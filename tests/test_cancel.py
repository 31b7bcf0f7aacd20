"""Deadlines, shielded cleanup and cancel tokens, on the virtual clock."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest

from headrace import (
    CancelToken,
    DeadlineExceeded,
    current_cancel_token,
    deadline,
    deadline_remaining,
    run_in_thread,
    shielded,
)
from headrace.testing import VirtualClock


def _cancelling() -> int:
    task = asyncio.current_task()
    assert task is not None
    return task.cancelling()


async def test_deadline_fires_at_exactly_its_time(clock: VirtualClock) -> None:
    """The block is cut off at the deadline, with cause, timeout and elapsed time."""
    await asyncio.sleep(0.5)
    with pytest.raises(DeadlineExceeded) as caught:
        async with deadline(0.25, cause="inventory lookup"):
            await asyncio.sleep(10)
    assert clock.now() == 0.75
    assert caught.value.cause == "inventory lookup"
    assert caught.value.timeout == 0.25
    assert caught.value.elapsed == 0.25
    assert isinstance(caught.value.__cause__, asyncio.CancelledError)
    assert _cancelling() == 0


async def test_deadline_not_reached_leaves_no_trace(clock: VirtualClock) -> None:
    """A block that finishes in time returns normally and leaves no pending cancel."""
    async with deadline(1.0) as scope:
        await asyncio.sleep(0.4)
    assert not scope.expired
    assert scope.remaining() == pytest.approx(0.6)
    await asyncio.sleep(5)  # a leftover timer would cancel us here
    assert clock.now() == 5.4
    assert _cancelling() == 0


async def test_no_deadline_with_none_or_inf(clock: VirtualClock) -> None:
    """None and inf mean no deadline at all."""
    async with deadline(None) as scope:
        await asyncio.sleep(100)
    async with deadline(math.inf):
        await asyncio.sleep(100)
    assert scope.remaining() == math.inf
    assert clock.now() == 200


async def test_inner_deadline_fires_first(clock: VirtualClock) -> None:
    """A shorter inner deadline raises inside; the outer one keeps running."""
    async with deadline(10, cause="outer") as outer:
        with pytest.raises(DeadlineExceeded) as caught:
            async with deadline(1, cause="inner"):
                await asyncio.sleep(5)
        await asyncio.sleep(2)
    assert caught.value.cause == "inner"
    assert not outer.expired
    assert clock.now() == 3


async def test_outer_deadline_fires_through_inner(clock: VirtualClock) -> None:
    """When the outer deadline fires, the inner block does not claim the timeout."""
    with pytest.raises(DeadlineExceeded) as caught:
        async with deadline(1, cause="outer"), deadline(10, cause="inner"):
            await asyncio.sleep(5)
    assert caught.value.cause == "outer"
    assert clock.now() == 1
    assert _cancelling() == 0


async def test_same_instant_nested_deadlines_report_the_outer(clock: VirtualClock) -> None:
    """Two deadlines expiring together: one DeadlineExceeded, counts balanced."""
    with pytest.raises(DeadlineExceeded) as caught:
        async with deadline(1, cause="outer"), deadline(1, cause="inner"):
            await asyncio.sleep(5)
    assert caught.value.cause == "outer"
    assert _cancelling() == 0


async def test_outside_cancel_inside_deadline_stays_cancelled(clock: VirtualClock) -> None:
    """A cancellation from outside is never turned into a timeout."""

    async def victim() -> None:
        async with deadline(10):
            await asyncio.sleep(5)

    task = asyncio.create_task(victim())
    await asyncio.sleep(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert clock.now() == 1


async def test_outside_cancel_racing_the_deadline_wins(clock: VirtualClock) -> None:
    """Cancelled from outside in the same instant the deadline fires: CancelledError."""

    async def victim() -> None:
        async with deadline(1):
            await asyncio.sleep(5)

    task = asyncio.create_task(victim())
    # Runs at t=1 right after the deadline's timer (scheduled earlier for the same time).
    asyncio.get_running_loop().call_at(1.0, task.cancel)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelling() >= 1


async def test_body_swallowing_the_cancel_leaves_counts_balanced(clock: VirtualClock) -> None:
    """A body that catches our CancelledError finishes; no stray cancel is left behind."""
    async with deadline(1) as scope:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            pass
    assert scope.expired
    assert _cancelling() == 0
    await asyncio.sleep(1)
    assert clock.now() == 2


async def test_timeout_racing_completion(clock: VirtualClock) -> None:
    """Work finishing at the deadline's instant either completes or times out, cleanly."""
    outcomes = []
    for _ in range(2):
        try:
            async with deadline(1):
                await asyncio.sleep(1)
            outcomes.append("done")
        except DeadlineExceeded:
            outcomes.append("timeout")
        assert _cancelling() == 0
    assert outcomes in (["done", "done"], ["timeout", "timeout"])
    await asyncio.sleep(1)  # nothing pending fires later


async def test_deadline_inside_taskgroup_sibling_failure(clock: VirtualClock) -> None:
    """A TaskGroup's cancellation passes through a deadline as CancelledError."""

    async def sleeper() -> None:
        async with deadline(10):
            await asyncio.sleep(5)

    async def failer() -> None:
        await asyncio.sleep(1)
        raise ValueError("boom")

    with pytest.raises(ExceptionGroup) as caught:
        async with asyncio.TaskGroup() as group:
            group.create_task(sleeper())
            group.create_task(failer())
    assert caught.group_contains(ValueError)
    assert not caught.group_contains(DeadlineExceeded)
    assert clock.now() == 1


async def test_shielded_cleanup_finishes_despite_cancel(clock: VirtualClock) -> None:
    """Rollback runs to the end while the caller is cancelled, then the cancel arrives."""
    log: list[tuple[str, float]] = []

    async def rollback() -> None:
        await asyncio.sleep(2)
        log.append(("rolled back", clock.now()))

    async def handler() -> None:
        try:
            await asyncio.sleep(10)  # step 2
        except asyncio.CancelledError:
            await shielded(rollback(), timeout=5)
            raise

    task = asyncio.create_task(handler())
    await asyncio.sleep(1)
    task.cancel()
    await asyncio.sleep(0.5)
    task.cancel()  # a second cancellation during the rollback is held back too
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log == [("rolled back", 3)]
    assert clock.now() == 3


async def test_shielded_is_bounded_by_its_own_timeout(clock: VirtualClock) -> None:
    """A stuck cleanup is cut at its timeout, then the pending cancellation re-raised."""
    started = asyncio.Event()

    async def stuck() -> None:
        started.set()
        await asyncio.sleep(100)

    async def caller() -> None:
        await shielded(stuck(), timeout=3)

    task = asyncio.create_task(caller())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert clock.now() == 3


async def test_shielded_without_cancel_returns_result_or_error(clock: VirtualClock) -> None:
    """Uncancelled, shielded() is a bounded await: result, error, or DeadlineExceeded."""

    async def answer() -> int:
        await asyncio.sleep(1)
        return 42

    async def fail() -> None:
        raise ValueError("undo failed")

    assert await shielded(answer(), timeout=2) == 42
    with pytest.raises(ValueError, match="undo failed"):
        await shielded(fail(), timeout=2)
    with pytest.raises(DeadlineExceeded):
        await shielded(asyncio.sleep(5), timeout=2, cause="rollback")
    assert clock.now() == 3
    assert _cancelling() == 0


def test_cancel_token_runs_callbacks_once() -> None:
    """cancel() is idempotent; callbacks run once, late ones immediately."""
    token = CancelToken()
    calls: list[str] = []
    token.on_cancel(lambda: calls.append("early"))
    token.cancel("stop")
    token.cancel("again")
    token.on_cancel(lambda: calls.append("late"))
    assert calls == ["early", "late"]
    assert token.reason == "stop"
    with pytest.raises(asyncio.CancelledError):
        token.raise_if_cancelled()


def test_current_cancel_token_outside_a_thread_call_is_inert() -> None:
    """Outside run_in_thread the current token is never cancelled."""
    assert not current_cancel_token().cancelled


@pytest.mark.real_time
async def test_run_in_thread_cancels_the_token_and_waits_for_the_thread() -> None:
    """Cancelling the awaiting task cancels the thread's token; the task waits for it."""
    loop = asyncio.get_running_loop()
    entered = asyncio.Event()
    finished = threading.Event()

    def work() -> str:
        token = current_cancel_token()
        loop.call_soon_threadsafe(entered.set)
        while not token.wait(0.01):
            pass
        time.sleep(0.05)  # cleanup in the thread after it noticed
        finished.set()
        return "stopped"

    task = asyncio.create_task(run_in_thread(work))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished.is_set()


@pytest.mark.real_time
async def test_run_in_thread_returns_and_raises() -> None:
    """Results and exceptions of the thread come back to the caller."""
    assert await run_in_thread(sum, [1, 2, 3]) == 6
    with pytest.raises(ZeroDivisionError):
        await run_in_thread(lambda: 1 / 0)


async def test_virtual_time_flows_while_a_thread_works(clock: VirtualClock) -> None:
    """On the virtual clock, a thread gets to answer before a virtual timeout fires."""
    async with deadline(5):
        result = await run_in_thread(lambda: time.sleep(0.05) or "ok")
    assert result == "ok"
    assert clock.now() < 5


async def test_deadline_remaining_sees_the_tightest_enclosing_scope(clock: VirtualClock) -> None:
    """deadline_remaining() reports the nearest deadline of the enclosing scopes."""
    assert deadline_remaining() is None
    async with deadline(10):
        await asyncio.sleep(1)
        assert deadline_remaining() == 9
        async with deadline(20):
            assert deadline_remaining() == 9
        async with deadline(2):
            await asyncio.sleep(0.5)
            assert deadline_remaining() == 1.5
        assert deadline_remaining() == 8.5
    assert deadline_remaining() is None


async def test_deadline_remaining_is_per_task(clock: VirtualClock) -> None:
    """A task started inside a deadline scope does not leak the scope to its siblings."""
    seen: list[float | None] = []

    async def outside() -> None:
        seen.append(deadline_remaining())

    async with deadline(5):
        pass
    await asyncio.create_task(outside())
    assert seen == [None]
