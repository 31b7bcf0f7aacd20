"""A worker process for the reliability tests: handles topic "load" and records effects.

Every handled message writes one row (message id, attempt, pid) to the SQLite file
``--effects``, so the test can count handled, duplicated and lost messages after a
SIGTERM or a kill -9. Modes:

* ``plain``: the effect is written when the handler finishes (at-least-once);
* ``tx``: effect and idempotency key commit in one SQLite transaction
  (``SqliteIdempotencyStore.transaction``), and the handler is ``idempotent``;
* ``fuzz``: the body must decode as an ``Order``; anything else is dead-lettered.

Prints ``READY`` once ``--ready-after`` messages were handled, and ``STATS {json}``
with the worker's final statistics before exiting.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sqlite3
import sys

import msgspec

from headrace.messaging import Message, SqliteIdempotencyStore, Worker


class Order(msgspec.Struct):
    id: int
    amount: float


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--effects", required=True)
    parser.add_argument("--mode", choices=["plain", "tx", "fuzz"], default="plain")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--work-ms", type=float, default=5.0)
    parser.add_argument("--shutdown-timeout", type=float, default=10.0)
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--exit-when-idle", type=float, default=None)
    parser.add_argument("--ready-after", type=int, default=1, help="0: when all slots are busy")
    arguments = parser.parse_args()

    effects = sqlite3.connect(arguments.effects, isolation_level=None, timeout=30)
    effects.execute("PRAGMA journal_mode=WAL")
    effects.execute(
        "CREATE TABLE IF NOT EXISTS effects (message_id TEXT, attempt INTEGER, pid INTEGER)"
    )
    store = SqliteIdempotencyStore(arguments.effects)
    worker = Worker(
        arguments.broker,
        lease=arguments.lease,
        shutdown_timeout=arguments.shutdown_timeout,
        max_attempts=3,
        retry_delay=0.01,
    )
    handled = 0
    started = 0
    pid = os.getpid()

    def handled_one() -> None:
        nonlocal handled
        handled += 1
        if handled == arguments.ready_after:
            print("READY", flush=True)

    async def work() -> None:
        nonlocal started
        started += 1
        if arguments.ready_after == 0 and started == arguments.concurrency:
            # --ready-after 0: ready once every slot is busy (for slow handlers).
            print("READY", flush=True)
        if arguments.work_ms > 0:
            await asyncio.sleep(arguments.work_ms / 1000)

    if arguments.mode == "plain":

        @worker.handler("load", concurrency=arguments.concurrency)
        async def plain(message: Message) -> None:
            await work()
            effects.execute(
                "INSERT INTO effects VALUES (?, ?, ?)", (message.id, message.attempt, pid)
            )
            handled_one()

    elif arguments.mode == "tx":

        @worker.handler("load", concurrency=arguments.concurrency, idempotent=store)
        async def exactly_once(message: Message) -> None:
            await work()
            async with store.transaction(message) as tx:
                if not tx.already_done:
                    tx.connection.execute(
                        "INSERT INTO effects VALUES (?, ?, ?)", (message.id, message.attempt, pid)
                    )
            handled_one()

    else:

        @worker.handler("load", concurrency=arguments.concurrency, max_message_bytes=4096)
        async def decode(message: Message) -> None:
            msgspec.json.decode(message.body, type=Order)
            effects.execute(
                "INSERT INTO effects VALUES (?, ?, ?)", (message.id, message.attempt, pid)
            )
            handled_one()

    stats = asyncio.run(worker.run(exit_when_idle=arguments.exit_when_idle))
    print("STATS " + json.dumps(dataclasses.asdict(stats)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
