"""The SQLite broker against hand-written sqlite3 loops on the same file layout.

Three pairs, interleaved (baseline, headrace, baseline, headrace, ...) ``--rounds`` times
in one process, each round on a fresh database file:

* **publish** (B4's "publish >= 50k msgs/s batched"): N messages in batches of 500.
  Baseline: ``executemany`` INSERT in one ``BEGIN IMMEDIATE`` transaction per batch,
  called directly on the loop's thread (no hop, no ids). headrace:
  ``await SqliteBroker.publish(topic, batch)`` (thread hop, returns the ids).
* **consume**: drain N messages in batches of 100, no handler. Baseline (B4's
  hand-written worker): ``BEGIN IMMEDIATE; SELECT 100 ready; DELETE them; COMMIT``
  (delete-in-transaction: no lease, a crash mid-batch loses nothing only because the
  transaction is still open). headrace: ``fetch(100, lease=30)`` then ``ack(batch)``
  (a lease that survives the consumer, then one DELETE: two transactions).
* **overlapped**: the same baseline against fetch+ack the way the worker runs them (the
  ack of one batch in flight while the next is fetched), which lets the broker commit
  the ack inside the next claim's transaction.
* **thread hop**: the cost of one trivial query run off the loop, through the broker's
  dedicated single-thread executor vs ``asyncio.to_thread`` + a lock (how else one would
  share one sqlite3 connection): justifies the executor choice in
  ``brokers/sqlite/_connection.py``.

Prints a table (median msgs/s and median per-round ratio) and writes
``benchmarks/results/sqlite_broker.json``.

    python benchmarks/sqlite_broker.py [--messages 50000] [--rounds 5] [--quick]
"""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from headrace.messaging import OutgoingMessage, SqliteBroker

if __package__:  # python -m benchmarks.sqlite_broker
    from . import _harness as harness
else:  # python benchmarks/sqlite_broker.py
    import _harness as harness

TOPIC = "bench"
PUBLISH_BATCH = 500
FETCH_BATCH = 100
BODY = b'{"n": 12345, "payload": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}'


def fresh_db(directory: Path, name: str) -> Path:
    """A new database with the broker's schema (created by the broker itself)."""
    path = directory / f"{name}-{time.perf_counter_ns()}.db"

    async def create() -> None:
        async with SqliteBroker(path):
            pass

    asyncio.run(create())
    return path


def raw_connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=normal")
    return conn


# -- publish ------------------------------------------------------------------------------


async def publish_baseline(path: Path, count: int) -> float:
    conn = raw_connect(path)
    start = time.perf_counter()
    for offset in range(0, count, PUBLISH_BATCH):
        now = time.time()
        rows = [(TOPIC, BODY, None, None, now, now)] * min(PUBLISH_BATCH, count - offset)
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO headrace_messages (topic, body, headers, key, ready_at, published_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.execute("COMMIT")
        await asyncio.sleep(0)
    elapsed = time.perf_counter() - start
    conn.close()
    return count / elapsed


async def publish_headrace(path: Path, count: int) -> float:
    async with SqliteBroker(path) as broker:
        start = time.perf_counter()
        for offset in range(0, count, PUBLISH_BATCH):
            batch = [OutgoingMessage(BODY)] * min(PUBLISH_BATCH, count - offset)
            await broker.publish(TOPIC, batch)
        elapsed = time.perf_counter() - start
    return count / elapsed


# -- consume ------------------------------------------------------------------------------


def fill(path: Path, count: int) -> None:
    conn = raw_connect(path)
    now = time.time()
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(
        "INSERT INTO headrace_messages (topic, body, headers, key, ready_at, published_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [(TOPIC, BODY, None, None, now, now)] * count,
    )
    conn.execute("COMMIT")
    conn.close()


async def consume_baseline(path: Path, count: int) -> float:
    conn = raw_connect(path)
    handled = 0
    start = time.perf_counter()
    while handled < count:
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute(
            "SELECT id, body FROM headrace_messages WHERE topic = ? AND ready_at <= ? "
            "ORDER BY ready_at, id LIMIT ?",
            (TOPIC, time.time(), FETCH_BATCH),
        ).fetchall()
        ids = [r[0] for r in rows]
        conn.execute(f"DELETE FROM headrace_messages WHERE id IN ({','.join('?' * len(ids))})", ids)
        conn.execute("COMMIT")
        handled += len(rows)
        await asyncio.sleep(0)
    elapsed = time.perf_counter() - start
    conn.close()
    return handled / elapsed


async def consume_headrace(path: Path, count: int) -> float:
    handled = 0
    async with SqliteBroker(path) as broker:
        start = time.perf_counter()
        while handled < count:
            batch = await broker.fetch(TOPIC, FETCH_BATCH, timeout=1.0, lease=30.0)
            await broker.ack(batch)
            handled += len(batch)
        elapsed = time.perf_counter() - start
    return handled / elapsed


async def consume_headrace_overlapped(path: Path, count: int) -> float:
    """As a worker does it: the ack of one batch runs while the next batch is fetched,
    so the broker commits that ack in the claim's transaction (group commit)."""
    handled = 0
    async with SqliteBroker(path) as broker:
        start = time.perf_counter()
        pending: asyncio.Task[None] | None = None
        while handled < count:
            batch = await broker.fetch(TOPIC, FETCH_BATCH, timeout=1.0, lease=30.0)
            if pending is not None:
                await pending
            pending = asyncio.create_task(broker.ack(batch))
            handled += len(batch)
        if pending is not None:
            await pending
        elapsed = time.perf_counter() - start
    return handled / elapsed


# -- thread hop ---------------------------------------------------------------------------


async def hop_executor(path: Path, calls: int) -> float:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    executor = ThreadPoolExecutor(max_workers=1)
    loop = asyncio.get_running_loop()

    def query() -> object:
        return conn.execute("SELECT 1").fetchone()

    start = time.perf_counter()
    for _ in range(calls):
        await loop.run_in_executor(executor, query)
    elapsed = time.perf_counter() - start
    executor.shutdown()
    conn.close()
    return calls / elapsed


async def hop_to_thread(path: Path, calls: int) -> float:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    lock = threading.Lock()

    def query() -> object:
        with lock:
            return conn.execute("SELECT 1").fetchone()

    start = time.perf_counter()
    for _ in range(calls):
        await asyncio.to_thread(query)
    elapsed = time.perf_counter() - start
    conn.close()
    return calls / elapsed


def main() -> None:
    parser = harness.parser(__doc__, messages=50_000, quick_help="10k messages, 3 rounds")
    args = parser.parse_args()
    if args.quick:
        args.messages, args.rounds = 10_000, 3
    count = args.messages
    hops = max(2_000, count // 10)
    results: dict[str, dict[str, list[float]]] = {
        "publish": {"baseline": [], "headrace": []},
        "consume": {"baseline": [], "headrace": []},
        "overlapped": {"baseline": [], "headrace": []},
        "thread hop": {"baseline": [], "headrace": []},
    }
    with tempfile.TemporaryDirectory(prefix="headrace-bench-") as tmp:
        directory = Path(tmp)
        for _ in range(args.rounds):
            results["publish"]["baseline"].append(
                asyncio.run(publish_baseline(fresh_db(directory, "pb"), count))
            )
            results["publish"]["headrace"].append(
                asyncio.run(publish_headrace(fresh_db(directory, "ph"), count))
            )
            for scenario, name, consume in (
                ("consume", "baseline", consume_baseline),
                ("consume", "headrace", consume_headrace),
                ("overlapped", "baseline", consume_baseline),
                ("overlapped", "headrace", consume_headrace_overlapped),
            ):
                path = fresh_db(directory, "c" + name)
                fill(path, count)
                results[scenario][name].append(asyncio.run(consume(path, count)))
            path = fresh_db(directory, "hop")
            results["thread hop"]["baseline"].append(asyncio.run(hop_to_thread(path, hops)))
            results["thread hop"]["headrace"].append(asyncio.run(hop_executor(path, hops)))

    labels = {
        "publish": ("sqlite3 executemany/txn", "SqliteBroker.publish"),
        "consume": ("delete-in-txn loop", "fetch(100)+ack"),
        "overlapped": ("delete-in-txn loop", "fetch+ack overlapped"),
        "thread hop": ("to_thread + lock", "1-thread executor"),
    }
    summary = {}
    print(f"SQLite broker, {count} messages, {args.rounds} rounds (median; ratio = headrace/base)")
    print(
        f"{'scenario':<11} {'baseline':<24} {'base/s':>10} {'headrace':<21} {'ours/s':>10} {'ratio':>6}"
    )
    for scenario, runs in results.items():
        ratios = harness.ratios(runs["headrace"], runs["baseline"])
        base, ours, ratio = (
            statistics.median(runs["baseline"]),
            statistics.median(runs["headrace"]),
            statistics.median(ratios),
        )
        summary[scenario] = {"baseline_per_s": base, "headrace_per_s": ours, "ratio": ratio}
        left, right = labels[scenario]
        print(f"{scenario:<11} {left:<24} {base:>10,.0f} {right:<21} {ours:>10,.0f} {ratio:>5.2f}x")
    out = Path(__file__).parent / "results" / "sqlite_broker.json"
    harness.write_json(
        out,
        {"messages": count, "rounds": args.rounds, "summary": summary, "runs": results},
        announce=False,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
