"""Heartbeat: beats never block, monitors hear them at exact virtual times."""

from __future__ import annotations

import asyncio

import pytest

from headrace import ClosedResourceError, ConfigurationError
from headrace._clock import Clock
from headrace._heartbeat import Heartbeat, Pulse


async def test_beat_records_time_and_details(clock: Clock) -> None:
    """A beat records its clock time and details; a beat without details keeps them."""
    heartbeat = Heartbeat(1.0, clock=clock)
    assert heartbeat.last_beat is None
    await clock.sleep(0.25)
    pulse = heartbeat.beat({"offset": 7})
    assert pulse == Pulse(0.25, 1, {"offset": 7})
    await clock.sleep(0.5)
    heartbeat.beat()
    assert heartbeat.last_beat == 0.75
    assert heartbeat.details == {"offset": 7}
    assert heartbeat.beats == 2


async def test_beat_nobody_listens_is_dropped(clock: Clock) -> None:
    """A beat with no waiter and no iterator returns at once and is counted as dropped."""
    heartbeat = Heartbeat(clock=clock)
    for _ in range(3):
        heartbeat.beat()
    statistics = heartbeat.statistics()
    assert (statistics.beats, statistics.dropped, statistics.last_beat) == (3, 3, 0.0)
    assert clock.now() == 0.0


async def test_wait_returns_next_pulse_at_its_time(clock: Clock) -> None:
    """wait() returns the next beat, at the virtual time the worker made it."""
    heartbeat = Heartbeat(clock=clock)

    async def worker() -> None:
        await clock.sleep(0.3)
        heartbeat.beat("unit 1")

    task = asyncio.create_task(worker())
    pulse = await heartbeat.wait(timeout=1.0)
    await task
    assert pulse == Pulse(0.3, 1, "unit 1")
    assert clock.now() == 0.3
    assert heartbeat.statistics().dropped == 0


async def test_every_listener_hears_the_same_pulse(clock: Clock) -> None:
    """Two waiters and an iterator all receive the one beat; nothing is dropped."""
    heartbeat = Heartbeat(clock=clock)
    pulses = aiter(heartbeat)
    waiters = [asyncio.create_task(heartbeat.wait()) for _ in range(2)]
    await asyncio.sleep(0)  # let the waiters register
    clock.call_at(0.5, lambda: heartbeat.beat("x"))
    received = [await waiter for waiter in waiters]
    heartbeat.close()
    streamed = [pulse async for pulse in pulses]
    assert received == [Pulse(0.5, 1, "x")] * 2
    assert streamed == [Pulse(0.5, 1, "x")]
    assert heartbeat.statistics().dropped == 0


async def test_wait_times_out_exactly(clock: Clock) -> None:
    """wait(timeout) returns None exactly ``timeout`` seconds after a silent start."""
    heartbeat = Heartbeat(clock=clock)
    assert await heartbeat.wait(timeout=2.5) is None
    assert clock.now() == 2.5
    assert heartbeat.statistics().waiting == 0


async def test_close_wakes_waiters_with_none(clock: Clock) -> None:
    """close() ends waits with None at once; a closed heartbeat refuses beats."""
    heartbeat = Heartbeat(clock=clock)
    clock.call_at(1.0, heartbeat.close)
    assert await heartbeat.wait() is None
    assert clock.now() == 1.0
    assert await heartbeat.wait(5.0) is None
    assert clock.now() == 1.0
    with pytest.raises(ClosedResourceError):
        heartbeat.beat()


async def test_iteration_buffers_one_pulse_and_ends_on_close(clock: Clock) -> None:
    """An iterator keeps at most one unread pulse (Go's buffer of one); others drop."""
    heartbeat = Heartbeat(clock=clock)
    pulses = aiter(heartbeat)  # subscribes now
    heartbeat.beat(1)
    heartbeat.beat(2)  # the slot is full: dropped
    heartbeat.beat(3)
    first = await anext(pulses)
    assert (first.sequence, first.details) == (1, 1)

    async def worker() -> None:
        await clock.sleep(1.0)
        heartbeat.beat(4)
        await clock.sleep(1.0)
        heartbeat.close()

    task = asyncio.create_task(worker())
    rest = [(pulse.time, pulse.details) async for pulse in pulses]
    await task
    assert rest == [(1.0, 4)]
    assert heartbeat.statistics().dropped == 2


async def test_iteration_drains_buffered_pulse_after_close(clock: Clock) -> None:
    """A pulse buffered before close() is still delivered, then iteration ends."""
    heartbeat = Heartbeat(clock=clock)
    pulses = aiter(heartbeat)
    heartbeat.beat("last")
    heartbeat.close()
    assert [pulse.details async for pulse in pulses] == ["last"]
    assert heartbeat.statistics().subscribers == 0


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        # (time of each tick() call, whether it beat) with interval 1.0
        ([0.0, 0.5, 0.99, 1.0, 1.5, 2.0, 3.5], [True, False, False, True, False, True, True]),
        ([0.2, 1.1, 1.3, 2.3], [True, False, True, True]),
    ],
)
def test_tick_beats_once_per_interval(times: list[float], expected: list[bool]) -> None:
    """tick() beats only when an interval has passed since the last pulse."""
    from headrace.testing import VirtualClock, run

    virtual = VirtualClock()

    async def main() -> list[bool]:
        heartbeat = Heartbeat(1.0, clock=virtual)
        results = []
        for at in times:
            await virtual.sleep_until(at)
            results.append(heartbeat.tick())
        return results

    assert run(main, clock=virtual) == expected


async def test_beat_resets_the_tick_interval(clock: Clock) -> None:
    """A per-unit beat counts as a pulse: the next tick() waits a whole interval."""
    heartbeat = Heartbeat(1.0, clock=clock)
    assert heartbeat.tick() is True
    await clock.sleep(0.8)
    heartbeat.beat()
    await clock.sleep(0.5)
    assert heartbeat.tick() is False
    await clock.sleep(0.5)
    assert heartbeat.tick() is True


async def test_pulsing_beats_every_interval_during_a_wait(clock: Clock) -> None:
    """pulsing() beats on entry and every interval from a timer, and stops on exit."""
    heartbeat = Heartbeat(0.5, clock=clock)
    pulses = aiter(heartbeat)
    seen: list[float] = []

    async def monitor() -> None:
        async for pulse in pulses:
            seen.append(pulse.time)

    task = asyncio.create_task(monitor())
    with heartbeat.pulsing("waiting"):
        await clock.sleep(1.75)
    await clock.sleep(2.0)  # no pulses after the block
    heartbeat.close()
    await task
    assert seen == [0.0, 0.5, 1.0, 1.5]
    assert heartbeat.details == "waiting"


async def test_silent_for_counts_from_start_or_last_beat(clock: Clock) -> None:
    """silent_for() measures from the later of the last beat and ``since``."""
    heartbeat = Heartbeat(clock=clock)
    await clock.sleep(2.0)
    assert heartbeat.silent_for(since=0.5) == 1.5
    heartbeat.beat()
    await clock.sleep(0.25)
    assert heartbeat.silent_for(since=0.5) == 0.25
    assert Heartbeat(clock=clock).silent_for() == float("inf")


@pytest.mark.parametrize("interval", [0, -1.0, float("inf"), "1"])
def test_bad_interval_is_refused(interval: object) -> None:
    """An interval that is not a positive finite number raises ConfigurationError."""
    with pytest.raises(ConfigurationError, match="Heartbeat\\(interval="):
        Heartbeat(interval)  # type: ignore[arg-type]


def test_tick_needs_an_interval() -> None:
    """tick() on a heartbeat without interval explains what is missing."""
    with pytest.raises(ConfigurationError, match="interval"):
        Heartbeat().tick()
