"""B7 (RabbitMQ): the headrace Worker on RabbitMQBroker vs a hand-written aio-pika loop
and a FastStream RabbitMQ subscriber.

Every contender consumes the same number of messages from a quorum queue of its own,
filled beforehand (not timed; persistent messages, confirmed), with a no-op handler,
and acks each one. Contenders:

* ``hand-written aio-pika`` (the B7 baseline): ``channel.set_qos(prefetch_count=100)``,
  ``async for message in queue.iterator()``, the no-op handler, and
  ``message.ack(multiple=True)`` on every 50th message (half the window, so that it
  never runs dry) and on the last.
* ``FastStream``: a FastStream ``RabbitBroker`` subscriber on the same kind of queue
  (``RabbitQueue(name, queue_type=QUORUM, declare=False)``), otherwise defaults (it
  acks each message after its handler); its logger is switched off, which only helps it.
* ``headrace c=16`` / ``headrace c=100``: ``Worker(RabbitMQBroker(url))`` with its
  defaults and ``@worker.handler(topic, concurrency=c)``, run until every message was
  handled and acked.
* ``headrace c=16 prefetch=100``: the same with the baseline's window (the broker's
  default is 200).
* ``headrace fetch(100)+ack``: the adapter alone, ``fetch(topic, 100)`` then
  ``ack(batch)`` in a loop.

Contenders run interleaved (A B C ..., A B C ...) for ``--rounds`` rounds (at least 5);
the table shows median msg/s and the median of the per-round ratios to the
hand-written loop and to FastStream. Goal (B7): >= 0.8x hand-written, >= 1.5x
FastStream. Run it under ``flock /tmp/bench.lock``.

    python benchmarks/worker_rabbitmq.py [--messages 50000] [--rounds 5] [--quick]
        [--url amqp://guest:guest@127.0.0.1:5672/]
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
from pamqp.commands import Basic

from headrace.messaging import Worker
from headrace.messaging.brokers.rabbitmq import RabbitMQBroker

if __package__:  # python -m benchmarks.worker_rabbitmq
    from . import _harness as harness
else:  # python benchmarks/worker_rabbitmq.py
    import _harness as harness

URL = os.environ.get("HEADRACE_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
RESULTS = Path(__file__).parent / "results" / "worker_rabbitmq.json"
BODY = b'{"order": 12345, "amount": 99.5}'
PREFETCH = 100
ACK_EVERY = 50
noop = harness.noop


async def _fill_queue(url: str, name: str, count: int) -> None:
    """Declare the quorum queue ``name`` and publish ``count`` persistent messages."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        raw = await channel.get_underlay_channel()
        await raw.queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
        properties = Basic.Properties(delivery_mode=2)
        for start in range(0, count, 1000):
            await asyncio.gather(
                *(
                    raw.basic_publish(BODY, routing_key=name, properties=properties)
                    for _ in range(min(1000, count - start))
                )
            )
    finally:
        await connection.close()


async def _delete(url: str, names: list[str]) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        raw = await channel.get_underlay_channel()
        for name in names:
            await raw.queue_delete(name)
    finally:
        await connection.close()


async def hand_written(url: str, count: int) -> float:
    name = f"bench-rmq-hand-{uuid.uuid4().hex[:8]}"
    await _fill_queue(url, name, count)
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await channel.get_queue(name)
        handled = 0
        started = time.perf_counter()
        async with queue.iterator() as messages:
            async for message in messages:
                await noop(message.body)
                handled += 1
                if handled % ACK_EVERY == 0 or handled == count:
                    await message.ack(multiple=True)
                if handled == count:
                    break
        elapsed = time.perf_counter() - started
    finally:
        await connection.close()
        await _delete(url, [name])
    return count / elapsed


async def faststream(url: str, count: int) -> float:
    from faststream.rabbit import QueueType, RabbitQueue
    from faststream.rabbit import RabbitBroker as FastStreamBroker

    name = f"bench-rmq-fs-{uuid.uuid4().hex[:8]}"
    await _fill_queue(url, name, count)
    broker = FastStreamBroker(url, logger=None)
    handled = 0
    done = asyncio.Event()

    @broker.subscriber(RabbitQueue(name, queue_type=QueueType.QUORUM, declare=False))
    async def handle(body: Any) -> None:
        nonlocal handled
        handled += 1
        if handled == count:
            done.set()

    try:
        return await harness.drain_rate(broker, done, count, timeout=300)
    finally:
        await _delete(url, [name])


async def _filled_broker(url: str, count: int, **options: Any) -> RabbitMQBroker:
    broker = RabbitMQBroker(url, prefix=f"bench-rmq-{uuid.uuid4().hex[:8]}.", **options)
    await broker.connect()
    await harness.publish(broker, "jobs", BODY, count)
    return broker


async def headrace_worker(url: str, count: int, concurrency: int, **options: Any) -> float:
    broker = await _filled_broker(url, count, **options)
    try:
        return await harness.worker_rate(Worker(broker), count, "jobs", concurrency)
    finally:
        await broker.close()
        await _delete(url, sorted(broker.declared_queues))


async def headrace_fetch_ack(url: str, count: int) -> float:
    broker = await _filled_broker(url, count)
    try:
        return await harness.fetch_ack_rate(broker, "jobs", count, 100)
    finally:
        await broker.close()
        await _delete(url, sorted(broker.declared_queues))


BASELINES = ("hand-written aio-pika", "FastStream")


def main() -> int:
    arguments = harness.parser(__doc__, url=URL, only=True).parse_args()
    count = harness.message_count(arguments)
    rounds = max(5, arguments.rounds)
    url = arguments.url
    contenders: list[tuple[str, harness.Make]] = [
        (BASELINES[0], lambda: hand_written(url, count)),
        (BASELINES[1], lambda: faststream(url, count)),
        ("headrace c=16", lambda: headrace_worker(url, count, 16)),
        ("headrace c=100", lambda: headrace_worker(url, count, 100)),
        ("headrace c=16 prefetch=100", lambda: headrace_worker(url, count, 16, prefetch=100)),
        ("headrace fetch(100)+ack", lambda: headrace_fetch_ack(url, count)),
    ]
    table = harness.compare(
        contenders,
        [(BASELINES[0], "vs hand-written", 17), (BASELINES[1], "vs FastStream", 15)],
        rounds=rounds,
        only=arguments.only,
        width=30,
        title=f"\nB7 rabbitmq: {count:,} messages, no-op handler, {rounds} interleaved rounds",
    )
    harness.write_json(RESULTS, {"messages": count, "rounds": rounds, "results": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
