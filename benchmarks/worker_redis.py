"""B3 (adapter part): consuming a Redis stream with a no-op handler, messages per second.

Every variant consumes a pre-filled stream of its own (filling is not timed) through a
consumer group and acks everything:

* ``hand-written``: redis-py ``XREADGROUP COUNT 100 BLOCK`` + one ``XACK`` of the batch;
  the floor a careful engineer writes with nothing but the driver.
* ``headrace fetch+ack``: ``RedisBroker.fetch(topic, 100, lease=30)`` + ``ack(batch)``
  with the defaults: each fetch is one script that also promotes due delayed retries,
  re-delivers hand-backs and, every 0.25 s, reclaims expired leases and trims acked
  entries off the stream; ack is one ``XACK``.
* ``headrace trim_acked=False``: the same without trimming acked entries off the stream.
* ``FastStream``: a FastStream Redis stream subscriber (``StreamSub`` with group and
  consumer, otherwise defaults) with a no-op handler; its logger is switched off, which
  only helps it. It is slow, so it consumes ``--faststream-messages`` (its rate is what
  counts).

The variants run interleaved (A B C D, A B C D, ...) ``--rounds`` times (at least 5);
the table shows median rates and the medians of the per-round ratios. The full
``Worker`` on Redis is measured by the worker benchmark. Goal (B3, for the Worker):
>= 0.9x hand-written, >= 8x FastStream.

    python benchmarks/worker_redis.py [--messages 50000] [--rounds 5] [--quick]
        [--url redis://127.0.0.1:6379/15]
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from headrace.messaging.brokers.redis import RedisBroker

if __package__:  # python -m benchmarks.worker_redis
    from . import _harness as harness
else:  # python benchmarks/worker_redis.py
    import _harness as harness

GROUP = "bench"
BATCH = 100
BODY = b'{"order": 12345, "sku": "A-1"}'


def stream_name(prefix: str, variant: str, round_: int) -> str:
    return f"{prefix}{variant}-{round_}"


async def fill(client: aioredis.Redis, key: str, fields: dict[bytes, bytes], count: int) -> None:
    """Add ``count`` copies of ``fields`` to the stream ``key`` (pipelined, untimed)."""
    await client.delete(key)
    for start in range(0, count, 2000):
        pipe = client.pipeline(transaction=False)
        for _ in range(min(2000, count - start)):
            pipe.xadd(key, fields)  # type: ignore[arg-type]
        await pipe.execute()
    await client.xgroup_create(key, GROUP, id="0")


async def hand_written(url: str, key: str, count: int) -> float:
    client = aioredis.from_url(url)
    await fill(client, key, {b"b": BODY}, count)
    handled = 0
    started = time.perf_counter()
    while handled < count:
        reply = await client.xreadgroup(GROUP, "c1", {key: ">"}, count=BATCH, block=1000)
        for _stream, entries in reply:
            ids = [entry_id for entry_id, _fields in entries]
            handled += len(ids)  # the no-op handler
            await client.xack(key, GROUP, *ids)
    elapsed = time.perf_counter() - started
    await client.delete(key)
    await client.aclose()
    return count / elapsed


async def headrace_loop(url: str, key: str, count: int, **options: Any) -> float:
    client = aioredis.from_url(url)
    await fill(client, key, {b"b": BODY}, count)
    await client.aclose()
    handled = 0
    async with RedisBroker(url, prefix="", group=GROUP, **options) as broker:
        started = time.perf_counter()
        while handled < count:
            batch = await broker.fetch(key, BATCH, timeout=1.0, lease=30.0)
            handled += len(batch)  # the no-op handler
            await broker.ack(batch)
        elapsed = time.perf_counter() - started
        assert handled == count, handled
    client = aioredis.from_url(url)
    await client.delete(key)
    await client.aclose()
    return count / elapsed


async def headrace_default(url: str, key: str, count: int) -> float:
    return await headrace_loop(url, key, count)


async def headrace_keep(url: str, key: str, count: int) -> float:
    return await headrace_loop(url, key, count, trim_acked=False)


async def faststream(url: str, key: str, count: int) -> float:
    from faststream.redis import RedisBroker as FastStreamBroker
    from faststream.redis import StreamSub

    client = aioredis.from_url(url)
    # One message in FastStream's own wire format, copied: its parser sees real messages.
    await client.delete(key)
    async with FastStreamBroker(url, logger=None) as publisher:
        await publisher.publish(BODY, stream=key)
    [(_id, fields)] = await client.xrange(key)
    await fill(client, key, fields, count)
    broker = FastStreamBroker(url, logger=None)
    handled = 0
    done = asyncio.Event()

    @broker.subscriber(stream=StreamSub(key, group=GROUP, consumer="c1"))
    async def handle(message: Any) -> None:
        nonlocal handled
        handled += 1
        if handled == count:
            done.set()

    rate = await harness.drain_rate(broker, done, count)
    pending = await client.xpending(key, GROUP)
    await client.delete(key)
    await client.aclose()
    assert pending["pending"] == 0, pending
    return rate


Variant = Callable[[str, str, int], Awaitable[float]]


def main() -> None:
    parser = harness.parser(
        __doc__,
        url="redis://127.0.0.1:6379/15",
        messages=50_000,
        quick_help="10k messages (FastStream 2k)",
    )
    parser.add_argument("--faststream-messages", type=int, default=5_000)
    parser.add_argument("--no-faststream", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.messages, args.faststream_messages = 10_000, 2_000
    rounds = max(args.rounds, 5)
    prefix = f"bench-worker-redis-{os.getpid()}:"
    variants: dict[str, tuple[Variant, int]] = {
        "hand-written": (hand_written, args.messages),
        "headrace fetch+ack": (headrace_default, args.messages),
        "headrace trim_acked=False": (headrace_keep, args.messages),
    }
    if not args.no_faststream:
        variants["FastStream"] = (faststream, args.faststream_messages)

    def warm(name: str, variant: Variant) -> harness.Make:
        return lambda: variant(args.url, stream_name(prefix, "warm", 0) + name[:4], 500)

    def per_round(name: str, variant: Variant, count: int) -> harness.Make:
        round_ = itertools.count()  # each contender runs once per round, in round order
        tag = name.split()[0].lower()
        return lambda: variant(args.url, stream_name(prefix, tag, next(round_)), count)

    rates = harness.run_rounds(
        [(name, per_round(name, variant, count)) for name, (variant, count) in variants.items()],
        rounds,
        # Warm-up: imports, script loading, connection setup.
        warmup=[warm(name, variant) for name, (variant, _count) in variants.items()],
    )
    base = rates["hand-written"]
    ours = rates["headrace fetch+ack"]
    ratios = {name: harness.ratios(values, base) for name, values in rates.items()}
    vs_faststream = harness.ratios(ours, rates["FastStream"]) if "FastStream" in rates else []
    print(
        f"Redis stream, no-op handler, batches of {BATCH}: {args.messages} messages "
        f"(FastStream {args.faststream_messages}), {rounds} interleaved rounds"
    )
    print(f"{'variant':<30}{'msgs/s (median)':>17}{'vs hand-written':>17}")
    for name in variants:
        print(
            f"{name:<30}{statistics.median(rates[name]):>17,.0f}"
            f"{statistics.median(ratios[name]):>16.2f}x"
        )
    for name in variants:
        print(f"  {name} per round: {', '.join(f'{r:,.0f}' for r in rates[name])}")
    if vs_faststream:
        print(
            f"headrace fetch+ack vs FastStream: {statistics.median(vs_faststream):.1f}x "
            f"(per round: {', '.join(f'{r:.1f}' for r in vs_faststream)})"
        )
    harness.write_json(
        Path(__file__).parent / "results" / "worker_redis.json",
        {
            "messages": args.messages,
            "faststream_messages": args.faststream_messages,
            "batch": BATCH,
            "rounds": rounds,
            "rates": rates,
            "ratios_vs_hand_written": ratios,
            "median_ratios_vs_hand_written": {
                name: statistics.median(values) for name, values in ratios.items()
            },
            "headrace_vs_faststream": vs_faststream,
            "median_headrace_vs_faststream": statistics.median(vs_faststream)
            if vs_faststream
            else None,
        },
        announce=False,
    )


if __name__ == "__main__":
    main()
