"""An order-processing worker on the embedded SQLite broker (the README's main job).

Each order message is decoded, then processed in two external steps, "reserve stock"
and "charge the card"; when the charge fails or the handler is cancelled (Ctrl-C, a
timeout), the reservation is undone under a shielded rollback. A few demo orders are
flaky (the payment API times out once: retried after a delayed nack), a few are
poison (always refused: dead-lettered after 3 attempts with their error id) and a few
are not even JSON (dead-lettered at once).

Run everything at once (publish demo orders, then work until the queue is drained)::

    python examples/worker_app.py [--messages 3000] [--db demo.db]

Or in two steps, as ``scripts/main-job`` does, with the ``headrace`` command::

    python examples/worker_app.py publish --db demo.db --messages 5000 --fresh
    headrace worker examples/worker_app.py:worker --broker sqlite:///demo.db --exit-when-idle 2

Ctrl-C stops cleanly: handled orders are acked, unhandled ones go back to the queue.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
from pathlib import Path

import msgspec

from headrace import Compensation
from headrace.messaging import Message, Producer, Worker
from headrace.messaging._worker._progress import Progress

worker = Worker(
    os.environ.get("HEADRACE_BROKER_URL", "sqlite:///headrace-demo.db"),
    max_attempts=3,
    retry_delay=0.05,
    shutdown_timeout=5.0,
    ack_interval=0.02,
)


class Order(msgspec.Struct):
    id: int
    amount: float
    kind: str = "normal"  # "flaky" or "poison" in the demo data


class PaymentTimeout(ConnectionError):
    """The (simulated) payment API did not answer in time; worth a retry."""


async def external_call(milliseconds: float) -> None:
    """Stands in for an HTTP call to another service."""
    await asyncio.sleep(milliseconds / 1000)


@worker.handler("orders", concurrency=64, timeout=2.0)
async def process_order(message: Message) -> None:
    order = msgspec.json.decode(message.body, type=Order)  # bad JSON: dead-lettered at once
    async with Compensation(timeout=2.0, name=f"order {order.id}") as rollback:
        await external_call(random.uniform(0.5, 2.0))  # reserve stock
        rollback.on_rollback(lambda: external_call(0.5), name="release stock")
        if order.kind == "flaky" and message.attempt == 1:
            raise PaymentTimeout(f"payment API timed out for order {order.id}")
        if order.kind == "poison":
            raise ValueError(f"order {order.id}: amount {order.amount} refused by the ledger")
        await external_call(random.uniform(0.5, 2.0))  # charge the card


def demo_orders(count: int, seed: int = 7) -> list[bytes]:
    """``count`` demo payloads: 3% flaky, 0.5% poison, 0.5% not JSON at all."""
    rng = random.Random(seed)
    payloads: list[bytes] = []
    for number in range(count):
        roll = rng.random()
        if roll < 0.005:
            payloads.append(b"\xff not json {")
            continue
        kind = "flaky" if roll < 0.035 else "poison" if roll < 0.04 else "normal"
        order = Order(id=number, amount=round(rng.uniform(5, 500), 2), kind=kind)
        payloads.append(msgspec.json.encode(order))
    return payloads


async def publish_demo(url: str, count: int) -> None:
    async with Producer(url) as producer:
        for payload in demo_orders(count):
            await producer.publish("orders", payload)
    print(f"published {count:,} demo orders to {url}", file=sys.stderr)


async def run_until_drained(url: str, idle: float) -> None:
    worker.use_broker(url)
    async with Progress(worker):
        await worker.run(exit_when_idle=idle)


def main(argv: list[str] | None = None) -> int:
    # Failures are part of the demo; the progress display counts them and
    # `headrace dlq list orders` shows each one with its error id.
    logging.basicConfig(level=logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", nargs="?", choices=["all", "publish"], default="all")
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--db", default=os.environ.get("HEADRACE_DEMO_DB", "headrace-demo.db"))
    parser.add_argument("--fresh", action="store_true", help="delete the database first")
    parser.add_argument("--exit-when-idle", type=float, default=1.0, metavar="SECONDS")
    arguments = parser.parse_args(argv)
    path = Path(arguments.db)
    if arguments.fresh or arguments.mode == "all":
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{path}"  # an absolute path gives sqlite:////abs/path, as it should
    asyncio.run(publish_demo(url, arguments.messages))
    if arguments.mode == "all":
        asyncio.run(run_until_drained(url, arguments.exit_when_idle))
        print(f"dead letters: headrace dlq list orders --broker {url}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
