"""Tests for headrace.Channel: FIFO, backpressure, close, clone, cancellation."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headrace import testing
from headrace._channel import CHECKPOINT_EVERY, Channel, ChannelStatistics
from headrace._clock import Clock
from headrace._errors import ClosedResourceError, ConfigurationError, EndOfChannel, WouldBlock


@pytest.mark.parametrize("capacity", [0, -1, 1.5, True, "3"])
def test_bad_capacity_is_a_configuration_error(capacity: object) -> None:
    """A capacity that is not an int >= 1 is refused with a message naming it."""
    with pytest.raises(ConfigurationError, match=r"Channel\(capacity="):
        Channel(capacity)  # type: ignore[arg-type]


async def test_nowait_fifo_and_would_block() -> None:
    """send_nowait fills up to capacity, then WouldBlock; receive_nowait drains in order."""
    channel = Channel[int](2)
    channel.send_nowait(1)
    channel.send_nowait(2)
    with pytest.raises(WouldBlock):
        channel.send_nowait(3)
    assert channel.receive_nowait() == 1
    assert channel.receive_nowait() == 2
    with pytest.raises(WouldBlock):
        channel.receive_nowait()


async def test_backpressure_blocks_sender_until_receive(clock: Clock) -> None:
    """A sender on a full channel waits exactly until a receiver makes room."""
    channel = Channel[int](1)
    sent_at: list[float] = []

    async def producer() -> None:
        for i in range(3):
            await channel.send(i)
            sent_at.append(clock.now())
        channel.close()

    async with asyncio.TaskGroup() as group:
        group.create_task(producer())
        received = []
        for _ in range(3):
            await asyncio.sleep(1.0)
            received.append(await channel.receive())
    assert received == [0, 1, 2]
    assert sent_at == [0.0, 1.0, 2.0]


async def test_close_while_receivers_wait_ends_them() -> None:
    """Receivers waiting on an empty channel get EndOfChannel when it closes."""
    channel = Channel[int](4)
    results: list[object] = []

    async def receiver() -> None:
        try:
            results.append(await channel.receive())
        except EndOfChannel:
            results.append("end")

    async with asyncio.TaskGroup() as group:
        for _ in range(3):
            group.create_task(receiver())
        await asyncio.sleep(0.1)
        assert channel.statistics().waiting_receivers == 3
        channel.close()
    assert results == ["end", "end", "end"]


async def test_close_lets_receivers_drain_first() -> None:
    """After close, buffered items are still received, then EndOfChannel."""
    channel = Channel[int](4)
    channel.send_nowait(1)
    channel.send_nowait(2)
    channel.close()
    assert [item async for item in channel] == [1, 2]
    with pytest.raises(EndOfChannel):
        channel.receive_nowait()
    with pytest.raises(EndOfChannel):
        await channel.receive()


async def test_close_while_senders_wait_fails_them() -> None:
    """Senders waiting on a full channel get ClosedResourceError when it closes."""
    channel = Channel[int](1)
    channel.send_nowait(0)
    other = channel.clone()
    errors: list[str] = []

    async def sender(value: int) -> None:
        try:
            await other.send(value)
        except ClosedResourceError as exc:
            errors.append(exc.code)

    async with asyncio.TaskGroup() as group:
        group.create_task(sender(1))
        group.create_task(sender(2))
        await asyncio.sleep(0.1)
        channel.close()
        other.close()
    assert errors == ["channel_closed", "channel_closed"]
    assert channel.receive_nowait() == 0
    with pytest.raises(EndOfChannel):
        channel.receive_nowait()


async def test_send_on_closed_handle_raises() -> None:
    """Sending through a closed handle raises even while other clones are open."""
    channel = Channel[int](4)
    other = channel.clone()
    channel.close()
    channel.close()  # idempotent
    with pytest.raises(ClosedResourceError, match="this handle"):
        channel.send_nowait(1)
    with pytest.raises(ClosedResourceError):
        await channel.send(1)
    with pytest.raises(ClosedResourceError):
        channel.clone()
    other.send_nowait(5)
    assert channel.receive_nowait() == 5


async def test_clone_closes_on_last_clone() -> None:
    """Fan-in: the channel ends only when every clone has been closed."""
    channel = Channel[int](8)
    clones = [channel.clone() for _ in range(3)]
    channel.close()

    async def producer(handle: Channel[int], base: int) -> None:
        async with handle:
            for i in range(3):
                await handle.send(base + i)

    async with asyncio.TaskGroup() as group:
        for index, handle in enumerate(clones):
            group.create_task(producer(handle, index * 10))
        received = [item async for item in channel]
    assert sorted(received) == [0, 1, 2, 10, 11, 12, 20, 21, 22]
    assert channel.statistics().closed
    assert channel.statistics().open_senders == 0


async def test_cancelled_waiting_receiver_takes_nothing() -> None:
    """A receiver cancelled while waiting consumes no item; the next receiver gets it."""
    channel = Channel[int](2)
    waiting = asyncio.ensure_future(channel.receive())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert channel.statistics().waiting_receivers == 0
    channel.send_nowait(7)
    assert await channel.receive() == 7


async def test_receiver_woken_then_cancelled_passes_item_on() -> None:
    """A receiver woken for an item but cancelled before it ran hands the wake-up on."""
    channel = Channel[int](2)
    first = asyncio.ensure_future(channel.receive())
    second = asyncio.ensure_future(channel.receive())
    await asyncio.sleep(0)
    channel.send_nowait(42)  # wakes `first`
    first.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await second == 42
    assert channel.statistics().items_received == 1


async def test_sender_woken_then_cancelled_passes_slot_on() -> None:
    """A sender woken with a reserved slot but cancelled sends nothing; the next sender
    gets the slot, and FIFO order holds."""
    channel = Channel[str](1)
    channel.send_nowait("a")
    first = asyncio.ensure_future(channel.send("b"))
    second = asyncio.ensure_future(channel.send("c"))
    await asyncio.sleep(0)
    assert channel.receive_nowait() == "a"  # reserves the slot for `first`
    with pytest.raises(WouldBlock):
        channel.send_nowait("newcomer")  # cannot overtake waiting senders
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await second
    assert channel.receive_nowait() == "c"
    with pytest.raises(WouldBlock):
        channel.receive_nowait()
    assert channel.statistics().items_sent == 2


async def test_sends_complete_in_fifo_order() -> None:
    """Senders waiting on a full channel are admitted oldest first."""
    channel = Channel[int](1)
    channel.send_nowait(-1)
    senders = [asyncio.ensure_future(channel.send(i)) for i in range(5)]
    await asyncio.sleep(0)
    received = [await channel.receive() for _ in range(6)]
    await asyncio.gather(*senders)
    assert received == [-1, 0, 1, 2, 3, 4]


async def test_never_blocking_channel_observes_cancellation() -> None:
    """A producer/consumer pair that never waits still yields, so it can be cancelled."""
    channel = Channel[int](10)

    async def spin() -> None:
        while True:
            await channel.send(1)
            await channel.receive()

    task = asyncio.ensure_future(spin())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert channel.statistics().items_sent <= CHECKPOINT_EVERY


async def test_statistics_snapshot() -> None:
    """statistics() is a frozen snapshot of capacity, buffer, waiters and counts."""
    channel = Channel[int](3)
    channel.send_nowait(1)
    channel.send_nowait(2)
    channel.receive_nowait()
    stats = channel.statistics()
    assert stats == ChannelStatistics(
        capacity=3,
        buffered=1,
        open_senders=1,
        waiting_senders=0,
        waiting_receivers=0,
        items_sent=2,
        items_received=1,
        closed=False,
    )
    with pytest.raises(AttributeError):
        stats.buffered = 5  # type: ignore[misc]
    assert "capacity=3" in repr(channel)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    capacity=st.integers(1, 4),
    cancel_at=st.lists(st.integers(0, 40), max_size=6),
)
def test_random_cancellation_never_loses_or_duplicates(
    seed: int, capacity: int, cancel_at: list[int]
) -> None:
    """Producers and consumers cancelled at random times: every item a send reported as
    done is received exactly once, and nothing that was not sent appears."""

    async def main() -> None:
        rng = random.Random(seed)
        channel = Channel[int](capacity)
        confirmed: list[int] = []
        received: list[int] = []

        async def producer(base: int) -> None:
            for i in range(20):
                await asyncio.sleep(rng.random() * 0.01)
                await channel.send(base + i)
                confirmed.append(base + i)

        async def consumer() -> None:
            while True:
                await asyncio.sleep(rng.random() * 0.01)
                received.append(await channel.receive())

        tasks = [asyncio.ensure_future(producer(b)) for b in (0, 100)]
        tasks += [asyncio.ensure_future(consumer()) for _ in range(2)]
        for tick in sorted(cancel_at):
            await asyncio.sleep(0.001 * tick)
            rng.choice(tasks).cancel()
        # Stop the producers, then drain what they managed to send.
        for task in tasks[:2]:
            task.cancel()
        await asyncio.gather(*tasks[:2], return_exceptions=True)
        for task in tasks[2:]:
            task.cancel()
        await asyncio.gather(*tasks[2:], return_exceptions=True)
        channel.close()
        received.extend([item async for item in channel])
        assert sorted(received) == sorted(confirmed)
        assert len(set(received)) == len(received)

    testing.run(main)
