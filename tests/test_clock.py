"""The clocks, and the test helpers that run code on them."""

from __future__ import annotations

import asyncio
import time

import pytest

from headrace import Clock, MonotonicClock, default_clock
from headrace.testing import LeakError, VirtualClock, run


def test_clocks_satisfy_the_protocol() -> None:
    """Both clocks are Clocks."""
    assert isinstance(MonotonicClock(), Clock)
    assert isinstance(VirtualClock(), Clock)
    assert isinstance(default_clock(), MonotonicClock)


def test_monotonic_clock_outside_a_loop_reads_time_monotonic() -> None:
    """Without a running loop the default clock falls back to time.monotonic()."""
    before = time.monotonic()
    assert before <= MonotonicClock().now() <= time.monotonic()


async def test_virtual_time_jumps_exactly(clock: VirtualClock) -> None:
    """Time jumps to exactly each timer's time (float sums are ordinary float sums)."""
    assert clock.now() == 0.0
    for _ in range(3):
        await asyncio.sleep(0.25)
    assert clock.now() == 0.75
    await clock.sleep(0.1)
    await clock.sleep(0.2)
    assert clock.now() == 0.75 + 0.1 + 0.2
    await clock.sleep_until(2.25)
    assert clock.now() == 2.25


async def test_a_woken_sleeper_never_sees_now_before_its_deadline(clock: VirtualClock) -> None:
    """A timer due a fraction of a microsecond ahead wakes with now() >= due (no spin)."""
    await asyncio.sleep(5.123456)
    due = clock.now() + 5e-10
    wakeups = 0
    while clock.now() < due:
        wakeups += 1
        assert wakeups < 3, "re-armed timer spins at one virtual instant"
        await clock.sleep_until(due)
    assert clock.now() == due


async def test_default_clock_reads_virtual_time_on_a_virtual_loop(clock: VirtualClock) -> None:
    """Code that forgot to pass the clock still sees virtual time."""
    await default_clock().sleep(7)
    assert default_clock().now() == 7 == clock.now()


async def test_sleep_until_the_past_returns_at_once(clock: VirtualClock) -> None:
    """Sleeping until a time already passed does not move time."""
    await asyncio.sleep(1)
    await clock.sleep_until(0.5)
    await clock.sleep(0)
    await clock.sleep(-1)
    assert clock.now() == 1


async def test_call_at_fires_at_its_time(clock: VirtualClock) -> None:
    """Timers scheduled through the clock fire at exactly their time, in order."""
    fired: list[float] = []
    clock.call_at(2.0, lambda: fired.append(clock.now()))
    clock.call_at(1.0, lambda: fired.append(clock.now()))
    cancelled = clock.call_at(1.5, lambda: fired.append(-1))
    cancelled.cancel()
    await asyncio.sleep(3)
    assert fired == [1.0, 2.0]


def test_virtual_clock_runs_hours_in_milliseconds() -> None:
    """A day of virtual sleeping takes no real time to speak of."""
    clock = VirtualClock(start=100.0)
    started = time.monotonic()
    clock.run(asyncio.sleep(86_400))
    assert clock.now() == 86_500.0
    assert time.monotonic() - started < 5  # generous: only guards against real sleeping


def test_run_reports_leaked_tasks() -> None:
    """testing.run fails when the coroutine leaves a task running."""

    async def leaky() -> None:
        asyncio.get_running_loop().create_task(asyncio.sleep(10), name="forgotten")

    with pytest.raises(LeakError, match="forgotten"):
        run(leaky)


def test_run_reports_loop_errors() -> None:
    """testing.run fails when the loop logged an exception nobody handled."""

    async def broken_callback() -> None:
        asyncio.get_running_loop().call_soon(lambda: 1 / 0)
        await asyncio.sleep(0)

    with pytest.raises(LeakError, match="ZeroDivisionError"):
        run(broken_callback)


def test_run_returns_the_result_on_a_real_clock() -> None:
    """testing.run works on a real-time loop too."""

    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    assert run(answer, clock=MonotonicClock()) == 42


def test_run_reports_a_dropped_pending_task_when_collecting() -> None:
    """With collect_garbage, a pending task nobody references is reported."""

    async def drops_a_task() -> None:
        loop = asyncio.get_running_loop()
        holder = [loop.create_future()]

        async def waits_forever(future: asyncio.Future[None]) -> None:
            await future

        task = loop.create_task(waits_forever(holder.pop()))
        await asyncio.sleep(0)
        # Forget the task and its future: only the garbage collector can find them now.
        del task

    with pytest.raises(LeakError, match="destroyed but it is pending"):
        run(drops_a_task, collect_garbage=True)
