"""B7 (NATS JetStream): the headrace Worker on NatsBroker vs hand-written nats-py and FastStream.

Every contender consumes the same number of messages from a work-queue stream of its
own, filled beforehand (not timed), with a no-op handler, and acks each one.
Contenders:

* ``hand-written fetch(100)+ack`` (the B7 baseline): nats-py ``pull_subscribe`` on a
  durable consumer, ``await psub.fetch(100, timeout=1)``, the handlers (``gather``),
  then ``await msg.ack()`` for each message (acks without a reply, as nats-py's
  ``ack()`` sends them).
* ``FastStream``: a FastStream NATS JetStream subscriber with its defaults
  (``@broker.subscriber(subject, stream=...)``: a push consumer, ack after the
  handler); its logger is off, which only helps it. It consumes ``--faststream-messages``
  (its rate is what counts).
* ``headrace c=16`` / ``headrace c=100``: ``Worker(NatsBroker(url))`` with its defaults
  and ``@worker.handler(topic, concurrency=c)``, run until every message was handled
  and acked (the worker's acks are confirmed by JetStream, see the adapter's doc).
* ``headrace fetch(100)+ack``: the adapter alone, ``fetch(topic, 100)`` then
  ``ack(batch)`` in a loop (the worker's floor on this broker).

Contenders run interleaved (A B C ..., A B C ...) for ``--rounds`` rounds (at least
5); the table shows median msg/s and the median of the per-round ratios to the
hand-written loop and to FastStream. Goal (B7): >= 0.8x hand-written, >= 1.5x
FastStream. Run it under ``flock /tmp/bench.lock``.

    python benchmarks/worker_nats.py [--messages 50000] [--rounds 5] [--quick]
        [--url nats://127.0.0.1:4222] [--only c=16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
from nats.js.api import RetentionPolicy, StreamConfig

from headrace.messaging import Message, OutgoingMessage, Worker
from headrace.messaging.brokers.nats import NatsBroker

URL = os.environ.get("HEADRACE_BENCH_NATS_URL", "nats://127.0.0.1:4222")
RESULTS = Path(__file__).parent / "results" / "worker_nats.json"
BODY = b'{"order": 12345, "amount": 99.5}'
BATCH = 100


async def noop(_: object) -> None:
    return None


async def _plain_stream(url: str, count: int) -> tuple[str, str]:
    """A fresh work-queue stream with ``count`` messages (nats-py, pipelined)."""
    name = f"bench-nats-{uuid.uuid4().hex[:8]}"
    subject = f"{name}.jobs"
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        await js.add_stream(
            StreamConfig(name=name, subjects=[subject], retention=RetentionPolicy.WORK_QUEUE)
        )
        for start in range(0, count, 2000):
            acks = [await js.publish_async(subject, BODY) for _ in range(min(2000, count - start))]
            await asyncio.gather(*acks)
    finally:
        await client.close()
    return name, subject


async def _delete_stream(url: str, name: str) -> None:
    client = await nats.connect(url)
    try:
        await client.jetstream().delete_stream(name)
    finally:
        await client.close()


async def hand_written(url: str, count: int) -> float:
    name, subject = await _plain_stream(url, count)
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        psub = await js.pull_subscribe(subject, durable="bench", stream=name)
        handled = 0
        started = time.perf_counter()
        while handled < count:
            try:
                msgs = await psub.fetch(BATCH, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            await asyncio.gather(*(noop(msg) for msg in msgs))
            for msg in msgs:
                await msg.ack()
            handled += len(msgs)
        await client.flush()
        elapsed = time.perf_counter() - started
        assert handled == count, handled
    finally:
        await client.close()
        await _delete_stream(url, name)
    return count / elapsed


async def faststream(url: str, count: int) -> float:
    from faststream.nats import JStream
    from faststream.nats import NatsBroker as FastStreamBroker

    name, subject = await _plain_stream(url, count)
    broker = FastStreamBroker(url, logger=None)
    handled = 0
    done = asyncio.Event()

    @broker.subscriber(subject, stream=JStream(name, declare=False))
    async def handle(message: Any) -> None:
        nonlocal handled
        handled += 1
        if handled == count:
            done.set()

    started = time.perf_counter()
    await broker.start()
    try:
        await asyncio.wait_for(done.wait(), timeout=600)
        elapsed = time.perf_counter() - started
    finally:
        await broker.stop()
        await _delete_stream(url, name)
    return count / elapsed


async def _filled_broker(url: str, count: int) -> NatsBroker:
    broker = NatsBroker(url, prefix=f"bench-hr-{uuid.uuid4().hex[:8]}")
    await broker.connect()
    for start in range(0, count, 5000):
        await broker.publish("jobs", [OutgoingMessage(BODY)] * min(5000, count - start))
    return broker


async def _drop(url: str, broker: NatsBroker) -> None:
    name = broker.stream_name("jobs")
    await broker.close()
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        await js.delete_stream(name)
        await js.delete_stream(name + "-dead")
    finally:
        await client.close()


async def headrace_worker(url: str, count: int, concurrency: int) -> float:
    broker = await _filled_broker(url, count)
    try:
        worker = Worker(broker)
        handled = 0

        @worker.handler("jobs", concurrency=concurrency)
        async def handle(message: Message) -> None:
            nonlocal handled
            handled += 1
            if handled == count:
                worker.stop()

        started = time.perf_counter()
        stats = await worker.run(handle_signals=False)
        elapsed = time.perf_counter() - started
        assert stats.acked == count, stats
    finally:
        await _drop(url, broker)
    return count / elapsed


async def headrace_fetch_ack(url: str, count: int) -> float:
    broker = await _filled_broker(url, count)
    try:
        handled = 0
        started = time.perf_counter()
        while handled < count:
            batch = await broker.fetch("jobs", BATCH, timeout=1.0, lease=30.0)
            await asyncio.gather(*(noop(message) for message in batch))
            handled += len(batch)
            await broker.ack(batch)
        elapsed = time.perf_counter() - started
        assert handled == count, handled
    finally:
        await _drop(url, broker)
    return count / elapsed


async def publish_rate(url: str, count: int) -> float:
    """``NatsBroker.publish`` of ``count`` messages in batches of 1000, each confirmed."""
    broker = NatsBroker(url, prefix=f"bench-hr-{uuid.uuid4().hex[:8]}")
    await broker.connect()
    try:
        await broker.publish("jobs", [OutgoingMessage(BODY)])
        started = time.perf_counter()
        for start in range(0, count, 1000):
            await broker.publish("jobs", [OutgoingMessage(BODY)] * min(1000, count - start))
        elapsed = time.perf_counter() - started
    finally:
        await _drop(url, broker)
    return count / elapsed


Contender = tuple[str, Callable[[], Awaitable[float]]]

BASELINE = "hand-written fetch(100)+ack"
FASTSTREAM = "FastStream"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--messages", type=int, default=None)
    parser.add_argument("--faststream-messages", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="10k messages instead of 50k")
    parser.add_argument("--url", default=URL)
    parser.add_argument(
        "--only", action="append", default=None, help="extra contenders whose name has this"
    )
    arguments = parser.parse_args()
    count = arguments.messages or (10_000 if arguments.quick else 50_000)
    fs_count = arguments.faststream_messages or count
    rounds = max(5, arguments.rounds)
    url = arguments.url
    contenders: list[Contender] = [
        (BASELINE, lambda: hand_written(url, count)),
        (FASTSTREAM, lambda: faststream(url, fs_count)),
        ("headrace c=16", lambda: headrace_worker(url, count, 16)),
        ("headrace c=100", lambda: headrace_worker(url, count, 100)),
        ("headrace fetch(100)+ack", lambda: headrace_fetch_ack(url, count)),
        ("headrace publish (batches of 1000)", lambda: publish_rate(url, count)),
    ]
    if arguments.only:
        contenders = [
            (name, make)
            for name, make in contenders
            if name in (BASELINE, FASTSTREAM) or any(wanted in name for wanted in arguments.only)
        ]
    rates: dict[str, list[float]] = {name: [] for name, _ in contenders}
    # Warm-up: imports, connections, the server's caches.
    for _name, make in contenders[:1]:
        asyncio.run(make())
    for round_number in range(rounds):
        for name, make in contenders:
            rate = asyncio.run(make())
            rates[name].append(rate)
            print(
                f"round {round_number + 1} {name:<40} {rate:>10,.0f} msg/s",
                file=sys.stderr,
                flush=True,
            )

    print(
        f"\nB7 NATS JetStream: {count:,} messages (FastStream {fs_count:,}), no-op handler, "
        f"{rounds} interleaved rounds"
    )
    print(f"{'contender':<40}{'median msg/s':>14}{'vs hand-written':>17}{'vs FastStream':>15}")
    table: list[dict[str, object]] = []
    for name, _ in contenders:
        mine = rates[name]
        ratios = {
            baseline: statistics.median(a / b for a, b in zip(mine, rates[baseline], strict=True))
            for baseline in (BASELINE, FASTSTREAM)
        }
        print(
            f"{name:<40}{statistics.median(mine):>14,.0f}"
            f"{ratios[BASELINE]:>16.2f}x{ratios[FASTSTREAM]:>14.2f}x"
        )
        table.append(
            {
                "contender": name,
                "rates": mine,
                "median_rate": statistics.median(mine),
                "median_ratio_vs": ratios,
            }
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "messages": count,
                "faststream_messages": fs_count,
                "rounds": rounds,
                "results": table,
            },
            indent=2,
        )
    )
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
