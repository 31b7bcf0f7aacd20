"""B3/B4: the headrace Worker vs a hand-written loop on the same broker (and FastStream).

B3 (Redis Streams): headrace ``Worker`` on ``RedisBroker`` (concurrency 100) vs a
hand-written redis-py loop (XREADGROUP COUNT 100, gather the handlers, one pipelined
XACK per batch) vs FastStream's Redis stream subscriber with defaults.
B4 (SQLite): headrace ``Worker`` on ``SqliteBroker`` with its defaults (concurrency 16:
the default prefetch tops each fetch up to the ack batch of 100, like the hand-written
loop's batches; and concurrency 100) vs a hand-written sqlite3 loop (BEGIN IMMEDIATE;
select 100 ready; gather the handlers; delete; commit), plus batched publishing
(``Producer`` vs ``executemany``). Extra rows: concurrency 16 with ``prefetch=0``
(fetches of 16: what the default saves), and the worker on ``memory://`` (its own
overhead, without a disk broker).

Every contender consumes the same number of pre-published messages with a no-op
handler; only consumption is timed (publishing is set-up, except in the publish rows).
Contenders run interleaved (A B C A B C ...) for ``--rounds`` rounds; the table shows
median msg/s and the median of the per-round ratios to the hand-written loop.
FastStream is much slower, so it consumes a fifth of the messages (rates compare).

    python benchmarks/worker.py            # 50k messages, 5 rounds
    python benchmarks/worker.py --quick    # 10k messages, 5 rounds
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from headrace.messaging import OutgoingMessage, Producer, SqliteBroker, Worker

if __package__:  # python -m benchmarks.worker
    from . import _harness as harness
else:  # python benchmarks/worker.py (before this folder leaves sys.path, below)
    import _harness as harness

# Python puts this script's folder first on sys.path, where benchmarks/http.py would
# shadow the standard library's http package (which FastStream imports later).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

REDIS_URL = os.environ.get("HEADRACE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
RESULTS = Path(__file__).parent / "results" / "worker.json"
BODY = b'{"order": 12345, "amount": 99.5}'
noop = harness.noop


# -- Redis --------------------------------------------------------------------------


async def _redis_client():  # type: ignore[no-untyped-def]
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(REDIS_URL)


async def _xadd_many(stream: str, count: int, fields: dict[bytes, bytes]) -> None:
    client = await _redis_client()
    try:
        for start in range(0, count, 1000):
            pipe = client.pipeline(transaction=False)
            for _ in range(min(1000, count - start)):
                pipe.xadd(stream, fields)
            await pipe.execute()
    finally:
        await client.aclose()


async def redis_handwritten(count: int) -> float:
    stream = f"bench-hw-{uuid.uuid4().hex[:8]}"
    client = await _redis_client()
    await client.xgroup_create(stream, "g", id="0", mkstream=True)
    await _xadd_many(stream, count, {b"body": BODY})
    handled = 0
    started = time.perf_counter()
    while handled < count:
        reply = await client.xreadgroup("g", "c", {stream: ">"}, count=100, block=1000)
        if not reply:
            continue
        entries = reply[0][1]
        await asyncio.gather(*(noop(fields) for _, fields in entries))
        pipe = client.pipeline(transaction=False)
        pipe.xack(stream, "g", *[entry_id for entry_id, _ in entries])
        await pipe.execute()
        handled += len(entries)
    elapsed = time.perf_counter() - started
    await client.delete(stream)
    await client.aclose()
    return count / elapsed


async def redis_headrace(count: int) -> float:
    from headrace.messaging.brokers.redis import RedisBroker

    prefix = f"bench-hr-{uuid.uuid4().hex[:8]}:"
    broker = RedisBroker(REDIS_URL, prefix=prefix)
    await broker.connect()
    await harness.publish(broker, "jobs", BODY, count)
    rate = await harness.worker_rate(Worker(broker), count, "jobs", 100)
    await broker.close()
    client = await _redis_client()
    keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()
    return rate


async def redis_faststream(count: int) -> float:
    from faststream.redis import RedisBroker as FastStreamBroker
    from faststream.redis import StreamSub

    stream = f"bench-fs-{uuid.uuid4().hex[:8]}"
    client = await _redis_client()
    await client.xgroup_create(stream, "g", id="0", mkstream=True)
    await _xadd_many(stream, count, {b"__data__": BODY})
    broker = FastStreamBroker(REDIS_URL, logger=None)
    done = asyncio.Event()
    handled = 0

    @broker.subscriber(stream=StreamSub(stream, group="g", consumer="c"))
    async def handle(body: Any) -> None:  # FastStream decodes the JSON body by itself
        nonlocal handled
        handled += 1
        if handled >= count:
            done.set()

    rate = await harness.drain_rate(broker, done, count)
    await client.delete(stream)
    await client.aclose()
    return rate


# -- SQLite -------------------------------------------------------------------------


def _fresh(directory: Path, name: str) -> Path:
    path = directory / f"{name}-{uuid.uuid4().hex[:8]}.db"
    return path


async def sqlite_handwritten(count: int, directory: Path) -> float:
    path = _fresh(directory, "hw")
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    connection.execute("BEGIN")
    connection.executemany("INSERT INTO jobs (body) VALUES (?)", [(BODY,)] * count)
    connection.execute("COMMIT")
    handled = 0
    started = time.perf_counter()
    while True:
        connection.execute("BEGIN IMMEDIATE")
        rows = connection.execute("SELECT id, body FROM jobs ORDER BY id LIMIT 100").fetchall()
        if not rows:
            connection.execute("COMMIT")
            break
        await asyncio.gather(*(noop(body) for _, body in rows))
        marks = ",".join("?" * len(rows))
        connection.execute(f"DELETE FROM jobs WHERE id IN ({marks})", [row[0] for row in rows])
        connection.execute("COMMIT")
        handled += len(rows)
    elapsed = time.perf_counter() - started
    connection.close()
    assert handled == count
    return count / elapsed


async def _sqlite_broker_with(count: int, directory: Path) -> SqliteBroker:
    broker = SqliteBroker(_fresh(directory, "hr"))
    await broker.connect()
    await harness.publish(broker, "jobs", BODY, count)
    return broker


async def sqlite_headrace(
    count: int, directory: Path, concurrency: int, prefetch: int | None = None
) -> float:
    broker = await _sqlite_broker_with(count, directory)
    rate = await harness.worker_rate(Worker(broker), count, "jobs", concurrency, prefetch)
    await broker.close()
    return rate


async def memory_headrace(count: int) -> float:
    """The worker's own floor: the same run on the in-memory broker."""
    from headrace.messaging import MemoryBroker

    broker = MemoryBroker(max_deliveries=None)
    await broker.publish("jobs", [OutgoingMessage(BODY)] * count)
    rate = await harness.worker_rate(Worker(broker), count, "jobs", 100)
    await broker.close()
    return rate


async def sqlite_publish_handwritten(count: int, directory: Path) -> float:
    connection = sqlite3.connect(_fresh(directory, "pub-hw"), isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    started = time.perf_counter()
    for start in range(0, count, 500):
        connection.execute("BEGIN")
        connection.executemany(
            "INSERT INTO jobs (body) VALUES (?)", [(BODY,)] * min(500, count - start)
        )
        connection.execute("COMMIT")
    elapsed = time.perf_counter() - started
    connection.close()
    return count / elapsed


async def sqlite_publish_producer(count: int, directory: Path) -> float:
    broker = SqliteBroker(_fresh(directory, "pub-hr"))
    await broker.connect()
    started = time.perf_counter()
    producer = Producer(broker, batch_size=500)
    for _ in range(count):
        await producer.publish("jobs", BODY)
    report = await producer.close()
    elapsed = time.perf_counter() - started
    assert report.confirmed == count
    await broker.close()
    return count / elapsed


# -- driver -------------------------------------------------------------------------

Contender = tuple[str, str, harness.Make]


def main() -> int:
    parser = harness.parser(__doc__)
    parser.add_argument("--no-redis", action="store_true")
    parser.add_argument("--no-faststream", action="store_true")
    parser.add_argument(
        "--group",
        action="append",
        default=None,
        help="run only the groups whose name contains this (repeatable): sqlite, publish, redis",
    )
    arguments = parser.parse_args()
    count = harness.message_count(arguments)
    directory = Path(tempfile.mkdtemp(prefix="headrace-bench-"))

    groups: dict[str, list[Contender]] = {
        "B4 sqlite": [
            ("hand-written", "baseline", lambda: sqlite_handwritten(count, directory)),
            ("headrace c=16", "headrace", lambda: sqlite_headrace(count, directory, 16)),
            ("headrace c=100", "headrace", lambda: sqlite_headrace(count, directory, 100)),
            (
                "headrace c=16 pf=0",
                "other",
                lambda: sqlite_headrace(count, directory, 16, prefetch=0),
            ),
            ("headrace memory://", "other", lambda: memory_headrace(count)),
        ],
        "B4 publish": [
            ("executemany 500", "baseline", lambda: sqlite_publish_handwritten(count, directory)),
            ("Producer", "headrace", lambda: sqlite_publish_producer(count, directory)),
        ],
    }
    if not arguments.no_redis:
        redis_group: list[Contender] = [
            ("hand-written", "baseline", lambda: redis_handwritten(count)),
            ("headrace c=100", "headrace", lambda: redis_headrace(count)),
        ]
        if not arguments.no_faststream:
            redis_group.append(
                ("FastStream defaults", "other", lambda: redis_faststream(max(1000, count // 5)))
            )
        groups["B3 redis"] = redis_group

    if arguments.group:
        groups = {
            name: contenders
            for name, contenders in groups.items()
            if any(wanted in name for wanted in arguments.group)
        }
    rates = harness.run_rounds(
        [
            ((group, name), make)
            for group, contenders in groups.items()
            for name, _, make in contenders
        ],
        arguments.rounds,
        label=lambda key: f"{key[0]:<10} {key[1]:<20}",
    )

    print(f"\nworker benchmark: {count:,} messages, no-op handler, {arguments.rounds} rounds")
    print(f"{'group':<11}{'contender':<22}{'median msg/s':>14}{'ratio vs baseline':>20}")
    table: list[dict[str, object]] = []
    for group, contenders in groups.items():
        baseline = next(name for name, role, _ in contenders if role == "baseline")
        base_rates = rates[group, baseline]
        for name, role, _ in contenders:
            mine = rates[group, name]
            ratio = harness.median_ratio(mine, base_rates)
            print(f"{group:<11}{name:<22}{statistics.median(mine):>14,.0f}{ratio:>19.2f}x")
            table.append(
                {
                    "group": group,
                    "contender": name,
                    "role": role,
                    "median_rate": statistics.median(mine),
                    "rates": mine,
                    "ratio_vs_baseline": ratio,
                }
            )
        if group == "B3 redis" and (group, "FastStream defaults") in rates:
            ours = rates[group, "headrace c=100"]
            theirs = rates[group, "FastStream defaults"]
            versus = harness.median_ratio(ours, theirs)
            print(f"{'':<11}{'headrace / FastStream':<22}{'':>14}{versus:>19.2f}x")
            table.append({"group": group, "contender": "headrace/FastStream", "ratio": versus})
    harness.write_json(RESULTS, {"messages": count, "rounds": arguments.rounds, "results": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
