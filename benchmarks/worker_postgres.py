"""B7 (PostgreSQL): the headrace Worker on PostgresBroker vs hand-written psycopg loops.

Every contender consumes the same number of messages, inserted beforehand into a fresh
table of its own (not timed), with a no-op handler, and removes each one after it was
handled. Contenders:

* ``hand-written lease + batch delete`` (the B7 baseline for a lease-based queue, which
  survives a crashed consumer without holding a transaction open): one statement claims
  100 rows (``UPDATE ... SET leased_until = now() + 30 s WHERE id IN (SELECT ... ORDER
  BY id LIMIT 100 FOR UPDATE SKIP LOCKED) RETURNING id, body``), the handlers run
  (``gather``), one ``DELETE ... WHERE id = ANY(%s)`` removes the batch. Autocommit:
  two round trips and two commits per batch.
* ``hand-written SKIP LOCKED delete-in-tx``: ``BEGIN``; ``SELECT id, body ... ORDER BY
  id LIMIT 100 FOR UPDATE SKIP LOCKED``; ``gather`` the handlers; ``DELETE ... = ANY``;
  ``COMMIT`` (a crash rolls back and frees the rows; the transaction stays open while
  the handlers run).
* ``headrace c=16`` / ``headrace c=100``: ``Worker(PostgresBroker(url))`` with its
  defaults and ``@worker.handler(topic, concurrency=c)``, run until every message was
  handled and acked.
* ``headrace fetch(100)+ack``: the adapter alone, ``fetch(topic, 100)`` then
  ``ack(batch)`` in a loop (the worker's floor on this broker).

Both hand-written loops use psycopg 3 async with its defaults (statements are prepared
after five runs), one connection, batches of 100. Contenders run interleaved (A B C
..., A B C ...) for ``--rounds`` rounds (at least 5); the table shows median msg/s and
the median of the per-round ratios to each hand-written loop. Goal (B7): >= 0.8x
hand-written. Run it under ``flock /tmp/bench.lock``.

    python benchmarks/worker_postgres.py [--messages 50000] [--rounds 5] [--quick]
        [--url postgresql://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

from headrace.messaging import Worker
from headrace.messaging.brokers.postgres import PostgresBroker

if __package__:  # python -m benchmarks.worker_postgres
    from . import _harness as harness
else:  # python benchmarks/worker_postgres.py
    import _harness as harness

URL = os.environ.get("HEADRACE_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
RESULTS = Path(__file__).parent / "results" / "worker_postgres.json"
BODY = b'{"order": 12345, "amount": 99.5}'
BATCH = 100
noop = harness.noop


async def _fill(conn: psycopg.AsyncConnection[Any], table: str, count: int) -> None:
    await conn.execute(
        f"CREATE TABLE {table} (id bigserial PRIMARY KEY, body bytea NOT NULL, "
        "leased_until timestamptz)"
    )
    async with conn.cursor() as cursor, cursor.copy(f"COPY {table} (body) FROM STDIN") as copy:
        for _ in range(count):
            await copy.write_row((BODY,))


async def lease_batch_delete(url: str, count: int) -> float:
    table = f"bench_pg_lease_{uuid.uuid4().hex[:8]}"
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    try:
        await _fill(conn, table, count)
        claim = (
            f"UPDATE {table} SET leased_until = now() + interval '30 seconds' "
            f"WHERE id IN (SELECT id FROM {table} "
            "WHERE leased_until IS NULL OR leased_until < now() "
            f"ORDER BY id LIMIT {BATCH} FOR UPDATE SKIP LOCKED) RETURNING id, body"
        )
        delete = f"DELETE FROM {table} WHERE id = ANY(%s)"
        handled = 0
        started = time.perf_counter()
        while True:
            cursor = await conn.execute(claim)
            rows = await cursor.fetchall()
            if not rows:
                break
            await asyncio.gather(*(noop(body) for _, body in rows))
            await conn.execute(delete, ([row[0] for row in rows],))
            handled += len(rows)
        elapsed = time.perf_counter() - started
        assert handled == count, handled
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()
    return count / elapsed


async def delete_in_transaction(url: str, count: int) -> float:
    table = f"bench_pg_tx_{uuid.uuid4().hex[:8]}"
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    try:
        await _fill(conn, table, count)
        await conn.set_autocommit(False)
        select = f"SELECT id, body FROM {table} ORDER BY id LIMIT {BATCH} FOR UPDATE SKIP LOCKED"
        delete = f"DELETE FROM {table} WHERE id = ANY(%s)"
        handled = 0
        started = time.perf_counter()
        while True:
            async with conn.transaction():
                cursor = await conn.execute(select)
                rows = await cursor.fetchall()
                if rows:
                    await asyncio.gather(*(noop(body) for _, body in rows))
                    await conn.execute(delete, ([row[0] for row in rows],))
            if not rows:
                break
            handled += len(rows)
        elapsed = time.perf_counter() - started
        assert handled == count, handled
    finally:
        await conn.set_autocommit(True)
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()
    return count / elapsed


async def _filled_broker(url: str, count: int) -> PostgresBroker:
    broker = PostgresBroker(url, prefix=f"bench_pg_{uuid.uuid4().hex[:8]}_")
    await broker.connect()
    await harness.publish(broker, "jobs", BODY, count)
    return broker


async def _drop(url: str, broker: PostgresBroker) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(
            f"DROP TABLE IF EXISTS {broker.messages_table}, {broker.dead_letters_table}".encode()
        )


async def headrace_worker(url: str, count: int, concurrency: int) -> float:
    broker = await _filled_broker(url, count)
    try:
        return await harness.worker_rate(Worker(broker), count, "jobs", concurrency)
    finally:
        await broker.close()
        await _drop(url, broker)


async def headrace_fetch_ack(url: str, count: int) -> float:
    broker = await _filled_broker(url, count)
    try:
        return await harness.fetch_ack_rate(broker, "jobs", count, BATCH)
    finally:
        await broker.close()
        await _drop(url, broker)


BASELINES = ("hand-written lease + batch delete", "hand-written SKIP LOCKED delete-in-tx")


def main() -> int:
    arguments = harness.parser(__doc__, url=URL, only=True).parse_args()
    count = harness.message_count(arguments)
    rounds = max(5, arguments.rounds)
    url = arguments.url
    contenders: list[tuple[str, harness.Make]] = [
        (BASELINES[0], lambda: lease_batch_delete(url, count)),
        (BASELINES[1], lambda: delete_in_transaction(url, count)),
        ("headrace c=16", lambda: headrace_worker(url, count, 16)),
        ("headrace c=100", lambda: headrace_worker(url, count, 100)),
        ("headrace fetch(100)+ack", lambda: headrace_fetch_ack(url, count)),
    ]
    table = harness.compare(
        contenders,
        [(BASELINES[0], "vs lease+delete", 17), (BASELINES[1], "vs delete-in-tx", 17)],
        rounds=rounds,
        only=arguments.only,
        width=40,
        title=f"\nB7 postgres: {count:,} messages, no-op handler, {rounds} interleaved rounds",
    )
    harness.write_json(RESULTS, {"messages": count, "rounds": rounds, "results": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
