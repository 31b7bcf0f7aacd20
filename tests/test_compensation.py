"""Compensation: undos run in reverse, shielded, on failure, cancellation and deadlines."""

from __future__ import annotations

import asyncio
import random

import pytest

from headrace import Clock, ConfigurationError, DeadlineExceeded, deadline
from headrace._compensation import Compensation, CompensationError


async def test_success_discards_the_undos(clock: Clock) -> None:
    """A block that finishes normally runs no undo."""
    undone: list[str] = []

    async def undo() -> None:
        undone.append("a")

    async with Compensation() as comp:
        comp.on_rollback(undo)
        assert comp.pending == 1
    assert undone == []
    assert comp.pending == 0


async def test_failure_runs_undos_in_reverse_and_reraises(clock: Clock) -> None:
    """When step 3 fails, step 2's then step 1's undo run, and the error continues."""
    undone: list[str] = []

    def undo(name: str):  # type: ignore[no-untyped-def]
        async def run() -> None:
            await asyncio.sleep(0.1)
            undone.append(name)

        return run

    with pytest.raises(ValueError, match="step 3"):
        async with Compensation() as comp:
            comp.on_rollback(undo("step1"))
            comp.on_rollback(undo("step2"))
            raise ValueError("step 3 failed")
    assert undone == ["step2", "step1"]
    assert clock.now() == pytest.approx(0.2)


async def test_cancel_during_step_two_still_runs_step_one_undo(clock: Clock) -> None:
    """R6: cancelled during step 2, step 1's undo runs to the end; 1,000 trials."""
    rng = random.Random(6)
    ran = 0
    for _ in range(1000):
        undone: list[float] = []

        async def undo(undone: list[float] = undone) -> None:
            await asyncio.sleep(0.05)  # the rollback call takes time; it must not be cut
            undone.append(clock.now())

        async def handler() -> None:
            async with Compensation(timeout=1.0) as comp:
                await asyncio.sleep(0.01)  # step 1 (api1.call)
                comp.on_rollback(undo)
                await asyncio.sleep(1.0)  # step 2 (api2.call), cancelled meanwhile

        task = asyncio.create_task(handler())
        cancel_at = clock.now() + 0.011 + rng.random() * 0.9
        await clock.sleep_until(cancel_at)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert undone == [pytest.approx(cancel_at + 0.05, abs=2e-6)]
        ran += 1
    assert ran == 1000


async def test_cancel_during_step_one_runs_no_undo(clock: Clock) -> None:
    """An undo registered after the cancelled step never runs (the step never finished)."""
    undone: list[str] = []

    async def undo() -> None:
        undone.append("x")

    async def handler() -> None:
        async with Compensation() as comp:
            await asyncio.sleep(1.0)
            comp.on_rollback(undo)

    task = asyncio.create_task(handler())
    await clock.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert undone == []


async def test_deadline_in_step_two_becomes_deadline_exceeded_after_the_undo(clock: Clock) -> None:
    """A handler timeout cancels step 2; the undo runs; the caller sees DeadlineExceeded."""
    undone: list[float] = []

    async def undo() -> None:
        await asyncio.sleep(0.3)
        undone.append(clock.now())

    with pytest.raises(DeadlineExceeded):
        async with deadline(2.0, clock=clock), Compensation(timeout=5) as comp:
            comp.on_rollback(undo)
            await asyncio.sleep(10)
    assert undone == [2.3]


async def test_second_cancel_during_rollback_does_not_cut_it(clock: Clock) -> None:
    """A second cancellation (a forced shutdown) waits for the undo, then arrives."""
    undone: list[float] = []

    async def undo() -> None:
        await asyncio.sleep(1.0)
        undone.append(clock.now())

    async def handler() -> None:
        async with Compensation(timeout=5) as comp:
            comp.on_rollback(undo)
            await asyncio.sleep(10)

    task = asyncio.create_task(handler())
    await clock.sleep(1.0)
    task.cancel()
    await clock.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert undone == [2.0]


async def test_failing_undo_turns_the_error_into_compensation_error(clock: Clock) -> None:
    """An undo that fails does not stop the others; the step's error becomes
    CompensationError (not transient) naming the failed undo, with the original as cause."""
    undone: list[str] = []

    async def good() -> None:
        undone.append("good")

    async def bad() -> None:
        raise ConnectionError("api1 down")

    with pytest.raises(CompensationError) as info:
        async with Compensation(name="order 7") as comp:
            comp.on_rollback(good, name="undo-booking")
            comp.on_rollback(bad, name="undo-charge")
            raise RuntimeError("step 3")
    assert undone == ["good"]
    assert info.value.transient is False
    assert info.value.context["failed_undos"] == ["undo-charge"]
    assert isinstance(info.value.__cause__, RuntimeError)


async def test_stuck_undo_is_bounded_by_the_rollback_timeout(clock: Clock) -> None:
    """A stuck undo is cut at its own deadline; the next one still runs."""
    undone: list[float] = []

    async def stuck() -> None:
        await asyncio.sleep(100)

    async def quick() -> None:
        undone.append(clock.now())

    with pytest.raises(CompensationError):
        async with Compensation(timeout=10, step_timeout=2) as comp:
            comp.on_rollback(quick)
            comp.on_rollback(stuck)
            raise RuntimeError("step failed")
    assert undone == [2.0]
    assert [name for name, _ in comp.failures] == [
        "test_stuck_undo_is_bounded_by_the_rollback_timeout.<locals>.stuck"
    ]


def test_bad_arguments_are_refused() -> None:
    """Timeouts must be positive; undos must be callable."""
    with pytest.raises(ConfigurationError, match="timeout=0"):
        Compensation(timeout=0)
    with pytest.raises(ConfigurationError, match="needs a callable"):
        Compensation().on_rollback(42)  # type: ignore[arg-type]
