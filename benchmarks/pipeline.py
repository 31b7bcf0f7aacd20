"""Pipeline throughput, scenarios B1 and B1b of ../shared/BENCHMARKS.md.

B1:  N ints through 3 trivial async stages (a -> b -> c), buffers of 64.
B1b: the same, stage a with 8 workers + fan-in.

Variants, interleaved in one process (hand-written, headrace, floor, aiostream, ...)
for ``--rounds`` rounds; the table shows median items/s and the median of the
per-round ratios headrace / baseline:

* ``hand-written``: asyncio.Queue(64) between long-lived stage tasks, a sentinel at the
  end (B1b: 8 worker tasks on stage a, the sentinel counted back in);
* ``for loop``: ``await c(await b(await a(i)))`` in one task, the floor;
* ``aiostream``: ``stream.iterate | pipe.map(a) | pipe.map(b) | pipe.map(c)``
  (B1b: ``task_limit=8`` on a). aiostream spawns a task per item, so it runs on
  ``--aiostream-items`` items (rates are per item, so the ratio stays fair);
* ``headrace``: ``Pipeline(range(N)).map(a).map(b).map(c).run()`` at defaults
  (B1b: ``.map(a, workers=8)``; ordered, as the defaults are).

    python benchmarks/pipeline.py [--items 200000] [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from headrace import Pipeline

if __package__:  # python -m benchmarks.pipeline
    from . import _harness as harness
else:  # python benchmarks/pipeline.py
    import _harness as harness

BUFFER = 64
FAN_OUT = 8
_DONE = object()


async def stage_a(x: int) -> int:
    return x + 1


async def stage_b(x: int) -> int:
    return x * 2


async def stage_c(x: int) -> int:
    return x - 1


def expected(items: int) -> int:
    return sum((i + 1) * 2 - 1 for i in range(items))


# -- hand-written -----------------------------------------------------------------


async def hand_written(items: int, fan_out: int) -> int:
    q1: asyncio.Queue[object] = asyncio.Queue(BUFFER)
    q2: asyncio.Queue[object] = asyncio.Queue(BUFFER)
    q3: asyncio.Queue[object] = asyncio.Queue(BUFFER)
    q4: asyncio.Queue[object] = asyncio.Queue(BUFFER)

    async def produce() -> None:
        for i in range(items):
            await q1.put(i)
        for _ in range(fan_out):
            await q1.put(_DONE)

    async def worker_a() -> None:
        while True:
            item = await q1.get()
            if item is _DONE:
                await q2.put(_DONE)
                return
            await q2.put(await stage_a(item))  # type: ignore[arg-type]

    async def stage(
        fn: Callable[[int], Awaitable[int]],
        source: asyncio.Queue[object],
        sink: asyncio.Queue[object],
        ends: int,
    ) -> None:
        seen = 0
        while True:
            item = await source.get()
            if item is _DONE:
                seen += 1
                if seen == ends:
                    await sink.put(_DONE)
                    return
                continue
            await sink.put(await fn(item))  # type: ignore[arg-type]

    async def consume() -> int:
        total = 0
        while True:
            item = await q4.get()
            if item is _DONE:
                return total
            total += item  # type: ignore[operator]

    async with asyncio.TaskGroup() as group:
        group.create_task(produce())
        for _ in range(fan_out):
            group.create_task(worker_a())
        group.create_task(stage(stage_b, q2, q3, fan_out))
        group.create_task(stage(stage_c, q3, q4, 1))
        consumer = group.create_task(consume())
    return consumer.result()


async def for_loop(items: int, fan_out: int) -> int:
    total = 0
    for i in range(items):
        total += await stage_c(await stage_b(await stage_a(i)))
    return total


async def with_aiostream(items: int, fan_out: int) -> int:
    from aiostream import pipe, stream

    task_limit = fan_out if fan_out > 1 else 1
    flow = (
        stream.iterate(range(items))
        | pipe.map(stage_a, task_limit=task_limit)
        | pipe.map(stage_b, task_limit=1)
        | pipe.map(stage_c, task_limit=1)
    )
    total = 0
    async with flow.stream() as streamer:
        async for item in streamer:
            total += item
    return total


async def with_headrace(items: int, fan_out: int) -> int:
    total = 0
    pipeline = Pipeline(range(items)).map(stage_a, workers=fan_out).map(stage_b).map(stage_c)
    async for item in pipeline:
        total += item
    return total


VARIANTS: dict[str, Callable[[int, int], Awaitable[int]]] = {
    "hand-written": hand_written,
    "headrace": with_headrace,
    "for loop": for_loop,
    "aiostream": with_aiostream,
}


def timed(name: str, items: int, fan_out: int) -> float:
    started = time.perf_counter()
    total = asyncio.run(VARIANTS[name](items, fan_out))  # type: ignore[arg-type]
    elapsed = time.perf_counter() - started
    assert total == expected(items), (name, total)
    return items / elapsed


def scenario(
    label: str, fan_out: int, items: int, aio_items: int, rounds: int
) -> dict[str, object]:
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for name in VARIANTS:  # warm-up
        timed(name, 2000, fan_out)
    for _ in range(rounds):
        for name in VARIANTS:
            rates[name].append(timed(name, aio_items if name == "aiostream" else items, fan_out))
    ratios = {name: harness.median_ratio(rates["headrace"], rates[name]) for name in VARIANTS}
    print(
        f"\n{label}: {items} ints, 3 trivial async stages"
        + (f", stage a with {fan_out} workers + fan-in" if fan_out > 1 else "")
        + f"; {rounds} interleaved rounds (aiostream on {aio_items} items)"
    )
    print(f"{'variant':<16}{'items/s (median)':>18}{'headrace / variant':>22}")
    for name in VARIANTS:
        print(f"{name:<16}{statistics.median(rates[name]):>18,.0f}{ratios[name]:>21.2f}x")
    return {
        "items": items,
        "aiostream_items": aio_items,
        "fan_out": fan_out,
        "rounds": rounds,
        "items_per_s": rates,
        "median_ratio_headrace_over": ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--aiostream-items", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="50k items, aiostream 5k")
    args = parser.parse_args()
    if args.quick:
        args.items, args.aiostream_items = 50_000, 5_000
    rounds = max(args.rounds, 5)
    results = {
        "B1": scenario("B1", 1, args.items, args.aiostream_items, rounds),
        "B1b": scenario("B1b", FAN_OUT, args.items, args.aiostream_items, rounds),
    }
    print(
        "\ngoals: B1 >= 1.0x hand-written, >= 0.5x for loop (floor), >= 10x aiostream; "
        "B1b >= 1.0x hand-written, >= 20x aiostream"
    )
    harness.write_json(Path(__file__).parent / "results" / "pipeline.json", results, announce=False)


if __name__ == "__main__":
    main()
