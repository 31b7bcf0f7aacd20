"""Idempotency stores: seen/record, TTLs, and the SQLite effect+key transaction."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import pytest

from headrace import Clock, ConfigurationError
from headrace.messaging import (
    MemoryBroker,
    MemoryIdempotencyStore,
    Message,
    OutgoingMessage,
    RedisIdempotencyStore,
    SqliteIdempotencyStore,
    Worker,
)


async def test_memory_store_records_and_forgets_after_ttl(clock: Clock) -> None:
    """A key is seen once recorded; with a TTL it is forgotten exactly at expiry."""
    store = MemoryIdempotencyStore()
    assert not await store.seen("a")
    await store.record("a")
    assert await store.seen("a")
    now = [100.0]
    short = MemoryIdempotencyStore(ttl=5, wall_time=lambda: now[0])
    await short.record("b")
    now[0] = 104.999
    assert await short.seen("b")
    now[0] = 105.0
    assert not await short.seen("b")


async def test_sqlite_store_is_shared_through_the_file(clock: Clock, tmp_path: Path) -> None:
    """Two store instances on one file (two processes, in effect) see each other's keys."""
    one = SqliteIdempotencyStore(tmp_path / "keys.db")
    two = SqliteIdempotencyStore(tmp_path / "keys.db")
    await one.record("orders:7")
    assert await two.seen("orders:7")
    assert not await two.seen("orders:8")
    await one.close()
    await two.close()


async def test_sqlite_transaction_commits_effect_and_key_together(
    clock: Clock, tmp_path: Path
) -> None:
    """Inside transaction(): the effect and the key commit at once; a failure rolls
    back both, so the retry runs the effect again exactly once."""
    path = tmp_path / "app.db"
    store = SqliteIdempotencyStore(path)
    message = Message(id="1", topic="pay", body=b"", key="order-9")
    with sqlite3.connect(path) as setup:
        setup.execute("CREATE TABLE charges (key TEXT)")

    with pytest.raises(RuntimeError):
        async with store.transaction(message) as tx:
            assert not tx.already_done
            tx.connection.execute("INSERT INTO charges VALUES (?)", (tx.key,))
            raise RuntimeError("crash after the effect, before the commit")
    assert not await store.seen("pay:order-9")

    for _ in range(2):
        async with store.transaction(message) as tx:
            if not tx.already_done:
                tx.connection.execute("INSERT INTO charges VALUES (?)", (tx.key,))
    with sqlite3.connect(path) as check:
        assert check.execute("SELECT key FROM charges").fetchall() == [("pay:order-9",)]
    assert await store.seen("pay:order-9")
    await store.close()


async def test_worker_with_sqlite_transaction_has_each_effect_once(
    clock: Clock, tmp_path: Path
) -> None:
    """Redelivered messages (the same key published three times) have one effect."""
    path = tmp_path / "app.db"
    store = SqliteIdempotencyStore(path)
    with sqlite3.connect(path) as setup:
        setup.execute("CREATE TABLE effects (key TEXT)")
    broker = MemoryBroker(max_deliveries=None, clock=clock)
    for _ in range(3):
        await broker.publish("pay", [OutgoingMessage(b"", key="k1"), OutgoingMessage(b"")])
    worker = Worker(broker, clock=clock, idempotency=store)

    @worker.handler("pay", concurrency=4, idempotent=True)
    async def handle(message: Message) -> None:
        async with store.transaction(message) as tx:
            if not tx.already_done:
                tx.connection.execute("INSERT INTO effects VALUES (?)", (tx.key,))

    stats = await worker.run(exit_when_idle=1.0, handle_signals=False)
    with sqlite3.connect(path) as check:
        rows = [row[0] for row in check.execute("SELECT key FROM effects")]
    # One effect for key k1, one per keyless message (keyed by their distinct ids).
    assert sorted(rows) == ["pay:2", "pay:4", "pay:6", "pay:k1"]
    assert stats.acked == 6
    await store.close()


def test_bad_ttl_is_refused() -> None:
    """A TTL must be positive seconds or None."""
    with pytest.raises(ConfigurationError, match="ttl=0"):
        MemoryIdempotencyStore(ttl=0)


@pytest.mark.real_time
async def test_redis_store_records_with_ttl(redis_url: str) -> None:
    """On the real Redis: a recorded key is seen by another client, and has a TTL."""
    import redis.asyncio as aioredis

    prefix = f"hr-idem-{uuid.uuid4().hex[:8]}:"
    store = RedisIdempotencyStore(redis_url, prefix=prefix, ttl=60)
    other = RedisIdempotencyStore(redis_url, prefix=prefix)
    try:
        assert not await store.seen("jobs:1")
        await store.record("jobs:1")
        assert await other.seen("jobs:1")
        client = aioredis.Redis.from_url(redis_url)
        ttl = await client.pttl(prefix + "jobs:1")
        await client.delete(prefix + "jobs:1")
        await client.aclose()
        assert 0 < ttl <= 60_000
    finally:
        await store.close()
        await other.close()
