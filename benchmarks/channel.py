"""Channel throughput: a 3-stage relay of N items, headrace.Channel vs asyncio.Queue.

producer -> relay -> relay -> consumer, buffers of 64, one item per send (no chunking:
this measures the channel itself). Both variants run in the same process, interleaved
(queue, channel, queue, channel, ...) ``--rounds`` times; the table shows the median
items/s of each and the median of the per-round ratios (goal: >= 1.3x asyncio.Queue).

    python benchmarks/channel.py [--items 200000] [--rounds 7] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from headrace import Channel

if __package__:  # python -m benchmarks.channel
    from . import _harness as harness
else:  # python benchmarks/channel.py
    import _harness as harness

CAPACITY = 64
_DONE = object()


async def queue_relay(items: int) -> int:
    """The hand-written baseline: asyncio.Queue with a sentinel for end of stream."""
    q1: asyncio.Queue[object] = asyncio.Queue(CAPACITY)
    q2: asyncio.Queue[object] = asyncio.Queue(CAPACITY)
    q3: asyncio.Queue[object] = asyncio.Queue(CAPACITY)

    async def produce() -> None:
        for i in range(items):
            await q1.put(i)
        await q1.put(_DONE)

    async def relay(source: asyncio.Queue[object], sink: asyncio.Queue[object]) -> None:
        while True:
            item = await source.get()
            await sink.put(item)
            if item is _DONE:
                return

    async def consume() -> int:
        count = 0
        while True:
            item = await q3.get()
            if item is _DONE:
                return count
            count += 1

    async with asyncio.TaskGroup() as group:
        group.create_task(produce())
        group.create_task(relay(q1, q2))
        group.create_task(relay(q2, q3))
        consumer = group.create_task(consume())
    return consumer.result()


async def channel_relay(items: int) -> int:
    """The same relay on headrace.Channel, ending with close() instead of a sentinel."""
    c1: Channel[int] = Channel(CAPACITY)
    c2: Channel[int] = Channel(CAPACITY)
    c3: Channel[int] = Channel(CAPACITY)

    async def produce() -> None:
        async with c1:
            for i in range(items):
                await c1.send(i)

    async def relay(source: Channel[int], sink: Channel[int]) -> None:
        async with sink:
            async for item in source:
                await sink.send(item)

    async def consume() -> int:
        count = 0
        async for _ in c3:
            count += 1
        return count

    async with asyncio.TaskGroup() as group:
        group.create_task(produce())
        group.create_task(relay(c1, c2))
        group.create_task(relay(c2, c3))
        consumer = group.create_task(consume())
    return consumer.result()


def timed(fn, items: int) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    count = asyncio.run(fn(items))
    elapsed = time.perf_counter() - started
    assert count == items, (fn.__name__, count)
    return items / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="50k items, 5 rounds")
    args = parser.parse_args()
    if args.quick:
        args.items, args.rounds = 50_000, 5
    rounds = max(args.rounds, 5)
    queue_rates: list[float] = []
    channel_rates: list[float] = []
    timed(queue_relay, 10_000)  # warm up imports and allocator
    timed(channel_relay, 10_000)
    for _ in range(rounds):
        q = timed(queue_relay, args.items)
        c = timed(channel_relay, args.items)
        queue_rates.append(q)
        channel_rates.append(c)
    ratios = harness.ratios(channel_rates, queue_rates)
    ratio = statistics.median(ratios)
    rows = [
        ("asyncio.Queue", statistics.median(queue_rates), 1.0),
        ("headrace.Channel", statistics.median(channel_rates), ratio),
    ]
    print(f"3-stage relay, {args.items} items, capacity {CAPACITY}, {rounds} interleaved rounds")
    print(f"{'variant':<20}{'items/s (median)':>18}{'ratio':>10}")
    for name, rate, r in rows:
        print(f"{name:<20}{rate:>18,.0f}{r:>9.2f}x")
    print(f"per-round ratios: {', '.join(f'{r:.2f}' for r in ratios)}; goal >= 1.30x")
    harness.write_json(
        Path(__file__).parent / "results" / "channel.json",
        {
            "items": args.items,
            "rounds": rounds,
            "capacity": CAPACITY,
            "queue_items_per_s": queue_rates,
            "channel_items_per_s": channel_rates,
            "ratios": ratios,
            "median_ratio": ratio,
            "goal": 1.3,
        },
        announce=False,
    )


if __name__ == "__main__":
    main()
