"""RedisBroker against the real Redis on this machine: what the conformance suite cannot see.

Each test works under its own key prefix (deleted afterwards) in the test database.
Timings are real: "not before" is checked exactly, "soon after" with ``SLACK``.
"""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio

from headrace import BrokerConnectionError, ConfigurationError
from headrace.messaging import Message, OutgoingMessage, open_broker
from headrace.messaging.brokers.redis import RedisBroker

from ._apps.tcp_proxy import ChaosProxy

pytestmark = pytest.mark.real_time

# How late a real-time wake-up may be on a busy shared machine.
SLACK = 0.5


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A fresh key prefix; every key under it is deleted after the test."""
    name = f"test-redis-{uuid.uuid4().hex}:"
    yield name
    with redis.Redis.from_url(redis_url) as client:
        for key in client.scan_iter(match=name + "*"):
            client.delete(key)


@pytest.fixture
def admin(redis_url: str) -> Iterator[redis.Redis]:
    """A plain synchronous client to look at the keys behind the broker's back."""
    with redis.Redis.from_url(redis_url) as client:
        yield client


def numbered(count: int) -> list[OutgoingMessage]:
    return [OutgoingMessage(str(n).encode()) for n in range(count)]


def pending(admin: redis.Redis, stream: str, group: str = "headrace") -> list[dict[str, Any]]:
    return admin.xpending_range(stream, group, "-", "+", 1000)  # type: ignore[return-value]


async def test_own_pending_entries_come_back_first_after_a_crash(
    redis_url: str, prefix: str
) -> None:
    """A new process with the crashed one's consumer name gets its unacked messages at once."""
    crashed = RedisBroker(redis_url, prefix=prefix, consumer="worker-1")
    ids = await crashed.publish("jobs", numbered(3))
    taken = await crashed.fetch("jobs", 3, timeout=1.0, lease=30.0)
    assert [m.id for m in taken] == ids
    [newer_id] = await crashed.publish("jobs", [OutgoingMessage(b"newer")])
    # A crash: nothing acked or handed back; the 30 s leases are still running.
    await crashed.close()

    async with RedisBroker(redis_url, prefix=prefix, consumer="worker-1") as restarted:
        start = time.monotonic()
        again = await restarted.fetch("jobs", 10, timeout=0, lease=30.0)
        assert time.monotonic() - start < SLACK
        assert [(m.id, m.body, m.attempt) for m in again] == [
            (ids[0], b"0", 2),
            (ids[1], b"1", 2),
            (ids[2], b"2", 2),
            (newer_id, b"newer", 1),
        ]
        await restarted.ack(again)


async def test_another_consumer_reclaims_an_expired_lease(
    redis_url: str, prefix: str, admin: redis.Redis
) -> None:
    """XAUTOCLAIM hands an expired delivery to another consumer as attempt + 1, not before."""
    async with (
        RedisBroker(redis_url, prefix=prefix, consumer="a") as a,
        RedisBroker(redis_url, prefix=prefix, consumer="b") as b,
    ):
        [message_id] = await a.publish("jobs", [OutgoingMessage(b"x")])
        [first] = await a.fetch("jobs", 1, timeout=1.0, lease=0.5)
        leased_at = time.monotonic()
        [second] = await b.fetch("jobs", 1, timeout=3.0, lease=30.0)
        waited = time.monotonic() - leased_at
        assert 0.5 <= waited < 0.5 + SLACK
        assert (second.id, second.attempt) == (message_id, 2)
        [entry] = pending(admin, a.stream_key("jobs"))
        assert (entry["consumer"], entry["times_delivered"]) == (b"b", 2)
        # The stale holder's late decisions do not touch b's delivery.
        await a.nack([first], delay=0)
        await a.hand_back([first])
        await a.extend_lease([first], 10.0)
        await a.dead_letter(first, {"code": "late"})
        assert await a.dead_letters("jobs") == []
        [entry] = pending(admin, a.stream_key("jobs"))
        assert (entry["consumer"], entry["times_delivered"]) == (b"b", 2)
        await b.ack([second])
        assert pending(admin, a.stream_key("jobs")) == []
        assert await a.fetch("jobs", 1, timeout=0.3, lease=30.0) == []


async def test_delivery_cap_dead_letters_with_an_error_record(
    redis_url: str, prefix: str, admin: redis.Redis
) -> None:
    """A message re-delivered past max_deliveries goes to the dead-letter stream, not out."""
    async with RedisBroker(redis_url, prefix=prefix, max_deliveries=3) as broker:
        [message_id] = await broker.publish("jobs", [OutgoingMessage(b"poison", key="k")])
        attempts = []
        for _ in range(3):
            [message] = await broker.fetch("jobs", 1, timeout=3.0, lease=0.2)
            attempts.append(message.attempt)
        assert attempts == [1, 2, 3]
        assert await broker.fetch("jobs", 1, timeout=0.6, lease=0.2) == []
        [letter] = await broker.dead_letters("jobs")
        assert (letter.message.id, letter.message.body, letter.message.key) == (
            message_id,
            b"poison",
            "k",
        )
        assert letter.message.attempt == 4
        assert letter.error["code"] == "max_deliveries_exceeded"
        assert letter.error["context"]["max_deliveries"] == 3
        assert len(letter.error["error_id"]) == 32
        stream = broker.stream_key("jobs")
        assert pending(admin, stream) == []
        assert admin.xlen(stream) == 0
        assert admin.xlen(stream + ":dead") == 1


async def test_delayed_nack_waits_outside_the_stream(
    redis_url: str, prefix: str, admin: redis.Redis
) -> None:
    """nack(delay) keeps the message in the delay set, unreclaimable, until it is due."""
    async with (
        RedisBroker(redis_url, prefix=prefix) as broker,
        RedisBroker(redis_url, prefix=prefix) as other,
    ):
        [message_id] = await broker.publish("jobs", [OutgoingMessage(b"x", headers={"h": "v"})])
        [first] = await broker.fetch("jobs", 1, timeout=1.0, lease=0.2)
        nacked_at = time.monotonic()
        await broker.nack([first], delay=0.8)
        stream = broker.stream_key("jobs")
        assert pending(admin, stream) == []
        assert admin.zcard(stream + ":delayed") == 1
        # Longer than the old lease: a reclaim must find nothing.
        assert await other.fetch("jobs", 1, timeout=0.5, lease=0.2) == []
        [second] = await other.fetch("jobs", 1, timeout=3.0, lease=30.0)
        waited = time.monotonic() - nacked_at
        assert 0.8 <= waited < 0.8 + SLACK
        assert (second.id, second.body, second.headers, second.attempt) == (
            message_id,
            b"x",
            {"h": "v"},
            2,
        )
        assert admin.zcard(stream + ":delayed") == 0
        await other.ack([second])


async def test_hand_back_wakes_a_waiting_consumer_in_order_without_an_attempt(
    redis_url: str, prefix: str, admin: redis.Redis
) -> None:
    """A hand-back reaches a consumer blocked in fetch at once, in order, same attempt."""
    async with (
        RedisBroker(redis_url, prefix=prefix, consumer="leaving") as leaving,
        RedisBroker(redis_url, prefix=prefix, consumer="staying") as staying,
    ):
        ids = await leaving.publish("jobs", numbered(3))
        taken = await leaving.fetch("jobs", 3, timeout=1.0, lease=30.0)
        assert len(taken) == 3

        async def wait_for_work() -> tuple[list[Message], float]:
            got = await staying.fetch("jobs", 10, timeout=10.0, lease=30.0)
            return got, time.monotonic()

        waiter = asyncio.create_task(wait_for_work())
        await asyncio.sleep(0.3)
        assert not waiter.done()
        handed_at = time.monotonic()
        await leaving.hand_back(taken)
        got, woke_at = await waiter
        assert woke_at - handed_at < SLACK
        assert [(m.id, m.attempt) for m in got] == [(i, 1) for i in ids]
        assert [e["consumer"] for e in pending(admin, leaving.stream_key("jobs"))] == [
            b"staying"
        ] * 3
        await staying.ack(got)


async def test_acked_entries_are_trimmed_up_to_the_oldest_pending(
    redis_url: str, prefix: str, admin: redis.Redis
) -> None:
    """The fetch's housekeeping trims acked entries, never one still pending or unread."""
    async with RedisBroker(redis_url, prefix=prefix, reclaim_interval=0.05) as broker:
        stream = broker.stream_key("jobs")
        ids = await broker.publish("jobs", numbered(250))
        got = await broker.fetch("jobs", 200, timeout=1.0, lease=30.0)
        assert [m.id for m in got] == ids[:200]
        await broker.ack(got[:150] + got[151:])
        await asyncio.sleep(0.1)
        rest = await broker.fetch("jobs", 100, timeout=1.0, lease=30.0)
        assert [m.id for m in rest] == ids[200:]
        # 150 is still pending: it and everything after it stay.
        assert admin.xlen(stream) == 100
        assert admin.xrange(stream, count=1)[0][0].decode() == ids[150]
        await broker.ack([got[150], *rest])
        await asyncio.sleep(0.1)
        assert await broker.fetch("jobs", 1, timeout=0, lease=30.0) == []
        assert admin.xlen(stream) == 0


async def test_nack_without_delay_keeps_the_place_in_the_stream(
    redis_url: str, prefix: str
) -> None:
    """nack() re-delivers ahead of newer messages, as attempt 2."""
    async with RedisBroker(redis_url, prefix=prefix) as broker:
        await broker.publish("jobs", numbered(4))
        [first] = await broker.fetch("jobs", 1, timeout=1.0, lease=30.0)
        await broker.nack([first])
        got = await broker.fetch("jobs", 10, timeout=1.0, lease=30.0)
        assert [(m.body, m.attempt) for m in got] == [(b"0", 2), (b"1", 1), (b"2", 1), (b"3", 1)]
        await broker.ack(got)


@pytest.mark.parametrize("yields", range(8))
async def test_cancelled_fetch_strands_nothing(redis_url: str, prefix: str, yields: int) -> None:
    """A fetch cancelled at any point leaves its messages free at once, as attempt 1."""
    async with RedisBroker(redis_url, prefix=prefix) as broker:
        ids = await broker.publish("jobs", numbered(5))
        task = asyncio.create_task(broker.fetch("jobs", 5, timeout=1.0, lease=30.0))
        for _ in range(yields):
            await asyncio.sleep(0)
        task.cancel()
        try:
            got = await task
        except asyncio.CancelledError:
            got = []
        if not got:
            got = await broker.fetch("jobs", 10, timeout=0.5, lease=30.0)
        assert [(m.id, m.attempt) for m in got] == [(i, 1) for i in ids]
        await broker.ack(got)


async def test_extend_lease_outlasts_the_first_lease(redis_url: str, prefix: str) -> None:
    """extend_lease moves the reclaim time to lease seconds from the extension."""
    async with (
        RedisBroker(redis_url, prefix=prefix) as holder,
        RedisBroker(redis_url, prefix=prefix) as other,
    ):
        await holder.publish("jobs", [OutgoingMessage(b"long")])
        [message] = await holder.fetch("jobs", 1, timeout=1.0, lease=0.3)
        extended_at = time.monotonic()
        await holder.extend_lease([message], 1.0)
        [again] = await other.fetch("jobs", 1, timeout=3.0, lease=30.0)
        assert time.monotonic() - extended_at >= 1.0
        assert (again.id, again.attempt) == (message.id, 2)
        await other.ack([again])


async def test_replay_keeps_the_message_id(redis_url: str, prefix: str) -> None:
    """A replayed dead letter is the same message (same id) on its first attempt again."""
    async with RedisBroker(redis_url, prefix=prefix) as broker:
        [message_id] = await broker.publish("jobs", [OutgoingMessage(b"x", key="k")])
        [message] = await broker.fetch("jobs", 1, timeout=1.0, lease=30.0)
        await broker.nack([message])
        [message] = await broker.fetch("jobs", 1, timeout=1.0, lease=30.0)
        await broker.dead_letter(message, {"code": "boom"})
        [letter] = await broker.dead_letters("jobs")
        assert letter.message.attempt == 2
        assert await broker.replay_dead_letters("jobs", [message_id]) == 1
        [replayed] = await broker.fetch("jobs", 1, timeout=1.0, lease=30.0)
        assert (replayed.id, replayed.key, replayed.attempt) == (message_id, "k", 1)
        await broker.ack([replayed])
        assert await broker.replay_dead_letters("jobs") == 0


async def test_entries_from_other_producers_are_readable(
    redis_url: str, prefix: str, admin: redis.Redis
) -> None:
    """An entry XADDed by another program arrives with its extra fields as headers."""
    async with RedisBroker(redis_url, prefix=prefix) as broker:
        entry_id = admin.xadd(broker.stream_key("jobs"), {"b": b"\xff\x00", "source": "legacy"})
        [message] = await broker.fetch("jobs", 1, timeout=1.0, lease=30.0)
        assert (message.id, message.body, message.headers) == (
            entry_id.decode(),  # type: ignore[union-attr]
            b"\xff\x00",
            {"source": "legacy"},
        )
        await broker.ack([message])


async def test_deleted_stream_is_recreated(redis_url: str, prefix: str, admin: redis.Redis) -> None:
    """If the stream (and its group) is deleted under a running broker, fetch starts over."""
    async with RedisBroker(redis_url, prefix=prefix) as broker:
        await broker.publish("jobs", [OutgoingMessage(b"1")])
        [one] = await broker.fetch("jobs", 1, timeout=1.0, lease=30.0)
        await broker.ack([one])
        admin.delete(broker.stream_key("jobs"))
        await broker.publish("jobs", [OutgoingMessage(b"2")])
        [two] = await broker.fetch("jobs", 1, timeout=1.0, lease=30.0)
        assert two.body == b"2"
        await broker.ack([two])


async def test_close_forgets_a_consumer_that_holds_nothing(
    redis_url: str, prefix: str, admin: redis.Redis
) -> None:
    """close() removes this consumer from the group unless it still holds messages."""
    idle = RedisBroker(redis_url, prefix=prefix, consumer="idle")
    holding = RedisBroker(redis_url, prefix=prefix, consumer="holding")
    await idle.publish("jobs", numbered(2))
    [one] = await idle.fetch("jobs", 1, timeout=1.0, lease=30.0)
    await idle.ack([one])
    [two] = await holding.fetch("jobs", 1, timeout=1.0, lease=30.0)
    await idle.close()
    await holding.close()
    names = [c["name"] for c in admin.xinfo_consumers(idle.stream_key("jobs"), "headrace")]
    assert names == [b"holding"]
    assert two.body == b"1"


async def test_connection_error_is_translated_without_the_password() -> None:
    """A refused connection is a transient BrokerConnectionError; the password never shows."""
    broker = RedisBroker("redis://:hunter2@127.0.0.1:1/0")
    assert "hunter2" not in repr(broker)
    with pytest.raises(BrokerConnectionError) as caught:
        await broker.connect()
    error = caught.value
    assert error.transient
    assert error.code == "broker_unavailable"
    assert isinstance(error.__cause__, redis.exceptions.ConnectionError)
    for text in (str(error), repr(error), str(error.to_dict())):
        assert "hunter2" not in text
    assert "127.0.0.1:1" in str(error)
    await broker.close()


async def test_lost_connection_during_fetch_is_translated(redis_url: str, prefix: str) -> None:
    """A fetch whose connection is reset mid-read raises BrokerConnectionError.

    The reset comes from a proxy in front of Redis, while the blocking read is in
    flight: a ``CLIENT KILL`` would not do, since Redis first answers the blocked read
    and a client that checks its pooled connections then just reconnects."""
    server = urlsplit(redis_url)
    async with ChaosProxy(server.hostname or "127.0.0.1", server.port or 6379) as proxy:
        proxied = server._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()
        async with RedisBroker(proxied, prefix=prefix) as broker:
            await broker.publish("warm-up", [OutgoingMessage(b"x")])  # connected, group made
            waiting = asyncio.create_task(broker.fetch("jobs", 1, timeout=10.0, lease=30.0))
            await asyncio.sleep(0.3)  # the blocking read is now waiting on the server
            assert not waiting.done()
            assert proxy.cut_all() >= 1
            with pytest.raises(BrokerConnectionError):
                await waiting


def test_url_options_and_open_broker(redis_url: str) -> None:
    """Query parameters set the broker's options; keywords win; bad values are refused."""
    broker = open_broker(f"{redis_url}?group=billing&consumer=w7&max_deliveries=3&lease=5")
    assert isinstance(broker, RedisBroker)
    assert (broker.group, broker.consumer, broker.max_deliveries) == ("billing", "w7", 3)
    assert open_broker(f"{redis_url}?group=billing", group="other").group == "other"  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="max_deliveries"):
        RedisBroker(f"{redis_url}?max_deliveries=many")
    with pytest.raises(ConfigurationError, match="max_lease"):
        RedisBroker(redis_url, lease=10.0, max_lease=5.0)
    with pytest.raises(ConfigurationError, match="group"):
        RedisBroker(redis_url, group="")
    with pytest.raises(ConfigurationError, match="poll_interval"):
        RedisBroker(redis_url, poll_interval=0.1)


async def test_lease_above_max_lease_is_refused(redis_url: str, prefix: str) -> None:
    """fetch and extend_lease refuse a lease longer than max_lease, naming both."""
    async with RedisBroker(redis_url, prefix=prefix, max_lease=60.0) as broker:
        with pytest.raises(ConfigurationError, match=r"fetch\(lease\)=61.0 exceeds .*60.0"):
            await broker.fetch("jobs", 1, timeout=0, lease=61.0)


def test_import_headrace_does_not_import_redis() -> None:
    """Only the Redis adapter module imports redis-py."""
    code = (
        "import sys, headrace, headrace.messaging; "
        "assert 'redis' not in sys.modules, 'redis imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


async def test_large_batches_with_short_leases(redis_url: str, prefix: str) -> None:
    """Batches of thousands (leases set in chunks) hand back and come again in order."""
    async with RedisBroker(redis_url, prefix=prefix) as broker:
        ids = await broker.publish("jobs", numbered(2500))
        got = await broker.fetch("jobs", 2500, timeout=1.0, lease=5.0)
        assert [m.id for m in got] == ids
        await broker.hand_back(got)
        again = await broker.fetch("jobs", 2500, timeout=1.0, lease=5.0)
        assert [(m.id, m.attempt) for m in again] == [(i, 1) for i in ids]
        await broker.ack(again)


async def test_busy_consumer_picks_up_a_hand_back_within_the_reclaim_interval(
    redis_url: str, prefix: str
) -> None:
    """A consumer reading a busy stream still serves another's hand-back within the interval."""
    async with (
        RedisBroker(redis_url, prefix=prefix, consumer="leaving") as leaving,
        RedisBroker(redis_url, prefix=prefix, consumer="busy", reclaim_interval=0.1) as busy,
    ):
        [first_id] = await leaving.publish("jobs", [OutgoingMessage(b"first")])
        [first] = await leaving.fetch("jobs", 1, timeout=1.0, lease=30.0)
        await leaving.publish("jobs", numbered(2000))
        await busy.ack(await busy.fetch("jobs", 10, timeout=1.0, lease=30.0))
        handed_at = time.monotonic()
        await leaving.hand_back([first])
        while True:
            batch = await busy.fetch("jobs", 10, timeout=1.0, lease=30.0)
            assert batch
            await busy.ack(batch)
            found = [m for m in batch if m.id == first_id]
            if found:
                break
        assert time.monotonic() - handed_at < 0.1 + SLACK
        assert found[0].attempt == 1


async def test_unclosed_broker_warns(redis_url: str, prefix: str) -> None:
    """A connected broker dropped without close() emits a ResourceWarning."""
    # Our own client, closed by the test, so that only the broker's warning is seen.
    client = redis.asyncio.Redis.from_url(redis_url)
    brokers = [RedisBroker(redis_url, prefix=prefix, client=client)]
    await brokers[0].connect()
    with pytest.warns(ResourceWarning, match="unclosed RedisBroker"):
        brokers.clear()
    gc.collect()
    await client.aclose()


_CRASHING_CONSUMER = """
import asyncio, sys
from headrace.messaging.brokers.redis import RedisBroker

async def main():
    broker = RedisBroker(sys.argv[1], prefix=sys.argv[2], consumer="worker-1")
    got = await broker.fetch("jobs", 100, timeout=5.0, lease=30.0)
    print(len(got), flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_kill_9_loses_nothing_and_the_same_name_recovers_at_once(
    redis_url: str, prefix: str
) -> None:
    """A consumer process killed with SIGKILL: its restart re-reads every message at once."""
    async with RedisBroker(redis_url, prefix=prefix) as producer:
        ids = await producer.publish("jobs", numbered(20))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CRASHING_CONSUMER,
        redis_url,
        prefix,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=20.0)
        assert line.strip() == b"20"
    finally:
        process.kill()
        await process.wait()
    async with RedisBroker(redis_url, prefix=prefix, consumer="worker-1") as restarted:
        again = await restarted.fetch("jobs", 100, timeout=0, lease=30.0)
        assert [(m.id, m.attempt) for m in again] == [(i, 2) for i in ids]
        await restarted.ack(again)
