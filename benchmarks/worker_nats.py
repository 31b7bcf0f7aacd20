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

import asyncio
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import nats
from nats.js.api import RetentionPolicy, StreamConfig

from headrace.messaging import OutgoingMessage, Worker
from headrace.messaging.brokers.nats import NatsBroker

if __package__:  # python -m benchmarks.worker_nats
    from . import _harness as harness
else:  # python benchmarks/worker_nats.py
    import _harness as harness

URL = os.environ.get("HEADRACE_BENCH_NATS_URL", "nats://127.0.0.1:4222")
RESULTS = Path(__file__).parent / "results" / "worker_nats.json"
BODY = b'{"order": 12345, "amount": 99.5}'
BATCH = 100
noop = harness.noop


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

    try:
        return await harness.drain_rate(broker, done, count)
    finally:
        await _delete_stream(url, name)


async def _filled_broker(url: str, count: int) -> NatsBroker:
    broker = NatsBroker(url, prefix=f"bench-hr-{uuid.uuid4().hex[:8]}")
    await broker.connect()
    await harness.publish(broker, "jobs", BODY, count, chunk=5000)
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
        return await harness.worker_rate(Worker(broker), count, "jobs", concurrency)
    finally:
        await _drop(url, broker)


async def headrace_fetch_ack(url: str, count: int) -> float:
    broker = await _filled_broker(url, count)
    try:
        return await harness.fetch_ack_rate(broker, "jobs", count, BATCH)
    finally:
        await _drop(url, broker)


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


BASELINE = "hand-written fetch(100)+ack"
FASTSTREAM = "FastStream"


def main() -> int:
    parser = harness.parser(__doc__, url=URL, only=True)
    parser.add_argument("--faststream-messages", type=int, default=None)
    arguments = parser.parse_args()
    count = harness.message_count(arguments)
    fs_count = arguments.faststream_messages or count
    rounds = max(5, arguments.rounds)
    url = arguments.url
    contenders: list[tuple[str, harness.Make]] = [
        (BASELINE, lambda: hand_written(url, count)),
        (FASTSTREAM, lambda: faststream(url, fs_count)),
        ("headrace c=16", lambda: headrace_worker(url, count, 16)),
        ("headrace c=100", lambda: headrace_worker(url, count, 100)),
        ("headrace fetch(100)+ack", lambda: headrace_fetch_ack(url, count)),
        ("headrace publish (batches of 1000)", lambda: publish_rate(url, count)),
    ]
    table = harness.compare(
        contenders,
        [(BASELINE, "vs hand-written", 17), (FASTSTREAM, "vs FastStream", 15)],
        rounds=rounds,
        only=arguments.only,
        width=40,
        title=(
            f"\nB7 NATS JetStream: {count:,} messages (FastStream {fs_count:,}), no-op handler, "
            f"{rounds} interleaved rounds"
        ),
    )
    harness.write_json(
        RESULTS,
        {"messages": count, "faststream_messages": fs_count, "rounds": rounds, "results": table},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
