"""SqliteBroker beyond the conformance suite: processes, durability, the file itself."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import tempfile
import warnings
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from headrace import BrokerError, Clock, ConfigurationError
from headrace._clock import TimerHandle
from headrace.messaging import MemoryBroker, Message, OutgoingMessage, SqliteBroker, open_broker
from headrace.testing import run


class FakeWallTime:
    """A settable Unix time, so lease and delay decisions can be asserted exactly."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def numbered(count: int, start: int = 0) -> list[OutgoingMessage]:
    return [OutgoingMessage(str(n).encode()) for n in range(start, start + count)]


def rows(path: Path, sql: str, *args: object) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql, args).fetchall()


# A consumer process: fetch, ack, print the ids it handled as JSON; optionally die
# (SIGKILL itself) after fetching its first batch without acking it.
CONSUMER = """
import asyncio, json, os, signal, sys
from headrace.messaging import SqliteBroker

async def main(path, die):
    handled = []
    async with SqliteBroker(path, poll_interval=0.02) as broker:
        idle = 0
        while idle < 3:
            batch = await broker.fetch("jobs", 25, timeout=0.3, lease=float(sys.argv[3]))
            if not batch:
                idle += 1
                continue
            idle = 0
            if die:
                print(json.dumps([m.id for m in batch]), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            handled.extend((m.id, m.attempt) for m in batch)
            await broker.ack(batch)
    print(json.dumps(handled), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2] == "die"))
"""


# A producer process: publish batches of its own bodies, print {id: body} as JSON.
PRODUCER = """
import asyncio, json, sys
from headrace.messaging import OutgoingMessage, SqliteBroker

async def main(path, name):
    published = {}
    async with SqliteBroker(path) as broker:
        for batch in range(20):
            bodies = [f"{name}-{batch}-{n}".encode() for n in range(25)]
            ids = await broker.publish("jobs", [OutgoingMessage(b) for b in bodies])
            published.update(zip(ids, (b.decode() for b in bodies)))
            await asyncio.sleep(0.005)
    print(json.dumps(published), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""

# A consumer that reports {id: body} of what it handled; it stops at the first empty
# fetch after the file named by argv[2] exists (the producers are done).
BODY_CONSUMER = """
import asyncio, json, os, sys
from headrace.messaging import SqliteBroker

async def main(path, done):
    handled = {}
    async with SqliteBroker(path, poll_interval=0.02) as broker:
        while True:
            finished = os.path.exists(done)
            batch = await broker.fetch("jobs", 10, timeout=0.2, lease=30.0)
            if not batch:
                if finished:
                    break
                continue
            for m in batch:
                assert m.id not in handled, m.id
                handled[m.id] = m.body.decode()
            await broker.ack(batch)
    print(json.dumps(handled), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def run_script(script: str, *args: str) -> dict[str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, *args, stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await process.communicate()
    assert process.returncode == 0
    result: dict[str, str] = json.loads(stdout)
    return result


@pytest.mark.real_time
@pytest.mark.slow
async def test_processes_publish_and_consume_at_once(tmp_path: Path) -> None:
    """2 producer and 3 consumer processes on one file at the same time: every id that
    publish returned names the body it was given, and each is consumed exactly once."""
    path = tmp_path / "jobs.db"
    done = tmp_path / "producers-done"
    async with SqliteBroker(path):  # create the schema before the race
        pass

    async def produce() -> list[dict[str, str]]:
        produced = await asyncio.gather(
            run_script(PRODUCER, str(path), "a"), run_script(PRODUCER, str(path), "b")
        )
        done.touch()
        return produced

    produced, *handled_by = await asyncio.gather(
        produce(), *(run_script(BODY_CONSUMER, str(path), str(done)) for _ in range(3))
    )
    published = {**produced[0], **produced[1]}
    assert len(published) == 1000
    consumed: dict[str, str] = {}
    for handled in handled_by:
        assert not set(handled) & set(consumed)
        consumed.update(handled)
    assert consumed == published


async def run_consumer(path: Path, mode: str, lease: float) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CONSUMER,
        str(path),
        mode,
        str(lease),
        stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode()


@pytest.mark.real_time
@pytest.mark.slow
async def test_several_processes_share_one_file(tmp_path: Path) -> None:
    """3 consumer processes on one file handle 1,500 messages: each exactly once, none lost."""
    path = tmp_path / "jobs.db"
    async with SqliteBroker(path) as producer:
        ids: list[str] = []
        for start in range(0, 1500, 500):
            ids += await producer.publish("jobs", numbered(500, start))
    results = await asyncio.gather(*(run_consumer(path, "work", 30.0) for _ in range(3)))
    handled = []
    for returncode, output in results:
        assert returncode == 0
        handled += [message_id for message_id, _ in json.loads(output)]
    assert sorted(handled, key=int) == ids
    assert rows(path, "SELECT count(*) FROM headrace_messages") == [(0,)]


@pytest.mark.real_time
@pytest.mark.slow
async def test_kill_9_loses_nothing(tmp_path: Path) -> None:
    """A consumer SIGKILLed holding a batch: another process gets that batch after the lease."""
    path = tmp_path / "jobs.db"
    async with SqliteBroker(path) as producer:
        ids = await producer.publish("jobs", numbered(100))
    returncode, output = await run_consumer(path, "die", 0.5)
    assert returncode == -signal.SIGKILL
    taken = json.loads(output)
    assert len(taken) == 25
    returncode, output = await run_consumer(path, "work", 30.0)
    assert returncode == 0
    handled = dict(json.loads(output))
    assert sorted(handled, key=int) == ids
    assert {handled[i] for i in taken} == {2}
    assert {handled[i] for i in ids if i not in taken} == {1}


async def test_messages_and_leases_survive_reopen(tmp_path: Path) -> None:
    """Unacked and dead-lettered messages persist in the file across a close and reopen."""
    path = tmp_path / "jobs.db"
    wall = FakeWallTime()
    async with SqliteBroker(path, time=wall) as broker:
        ids = await broker.publish("jobs", numbered(3))
        leased = await broker.fetch("jobs", 2, timeout=0, lease=10.0)
        assert [m.id for m in leased] == ids[:2]
        await broker.dead_letter(leased[1], {"code": "poison"})
    async with SqliteBroker(path, time=wall) as broker:
        [free] = await broker.fetch("jobs", 5, timeout=0, lease=100.0)
        assert free.id == ids[2]
        wall.now += 10.0
        [again] = await broker.fetch("jobs", 5, timeout=0, lease=10.0)
        assert (again.id, again.attempt) == (ids[0], 2)
        [letter] = await broker.dead_letters("jobs")
        assert (letter.message.id, letter.error) == (ids[1], {"code": "poison"})


async def test_file_is_in_wal_mode(tmp_path: Path) -> None:
    """The broker puts the file in WAL mode, and a reader can read during its writes."""
    path = tmp_path / "jobs.db"
    async with SqliteBroker(path) as broker:
        await broker.publish("jobs", numbered(1))
        assert rows(path, "PRAGMA journal_mode") == [("wal",)]
        assert rows(path, "SELECT topic, body FROM headrace_messages") == [("jobs", b"0")]


async def test_lease_expiry_follows_wall_time(tmp_path: Path) -> None:
    """Leases are stored as wall-clock times: expiry is decided by the time source alone."""
    wall = FakeWallTime()
    async with SqliteBroker(tmp_path / "jobs.db", time=wall) as broker:
        await broker.publish("jobs", numbered(1))
        [first] = await broker.fetch("jobs", 1, timeout=0, lease=10.0)
        assert rows(tmp_path / "jobs.db", "SELECT lease_until FROM headrace_messages") == [
            (wall.now + 10.0,)
        ]
        wall.now += 9.999
        assert await broker.fetch("jobs", 1, timeout=0, lease=10.0) == []
        wall.now += 0.001
        [second] = await broker.fetch("jobs", 1, timeout=0, lease=10.0)
        assert (second.id, second.attempt) == (first.id, 2)


async def test_delayed_retry_uses_ready_at(tmp_path: Path) -> None:
    """nack(delay) stores ready_at = now + delay and counts the attempt; not delivered before."""
    path = tmp_path / "jobs.db"
    wall = FakeWallTime()
    async with SqliteBroker(path, time=wall) as broker:
        await broker.publish("jobs", numbered(1))
        [first] = await broker.fetch("jobs", 1, timeout=0, lease=30.0)
        await broker.nack([first], delay=5.0)
        assert rows(
            path, "SELECT ready_at, attempt, lease_token, lease_until FROM headrace_messages"
        ) == [(wall.now + 5.0, 2, 2**60, -0.5)]  # -0.5 and 2**60: no lease
        wall.now += 4.999
        assert await broker.fetch("jobs", 1, timeout=0, lease=30.0) == []
        wall.now += 0.001
        [second] = await broker.fetch("jobs", 1, timeout=0, lease=30.0)
        assert second.attempt == 2


async def test_dead_letter_table_rows(tmp_path: Path) -> None:
    """dead_letter moves the row to headrace_dead_letters with the JSON error and attempt."""
    path = tmp_path / "jobs.db"
    wall = FakeWallTime()
    async with SqliteBroker(path, time=wall) as broker:
        [message_id] = await broker.publish("jobs", [OutgoingMessage(b"x", key="k")])
        await broker.nack(await broker.fetch("jobs", 1, timeout=0, lease=30.0))
        [message] = await broker.fetch("jobs", 1, timeout=0, lease=30.0)
        await broker.dead_letter(message, {"code": "boom", "error_id": "e1"})
    assert rows(path, "SELECT count(*) FROM headrace_messages") == [(0,)]
    [(stored_id, topic, body, key, attempt, error, at)] = rows(
        path,
        "SELECT message_id, topic, body, key, attempt, error, dead_lettered_at "
        "FROM headrace_dead_letters",
    )
    assert (stored_id, topic, body, key, attempt, at) == (
        message_id,
        "jobs",
        b"x",
        "k",
        2,
        wall.now,
    )
    assert json.loads(error) == {"code": "boom", "error_id": "e1"}


async def test_max_deliveries_record(tmp_path: Path) -> None:
    """The broker's own dead-letter record names the delivery count and the cap."""
    wall = FakeWallTime()
    async with SqliteBroker(tmp_path / "jobs.db", time=wall, max_deliveries=1) as broker:
        [message_id] = await broker.publish("jobs", numbered(1))
        await broker.fetch("jobs", 1, timeout=0, lease=1.0)
        wall.now += 1.0
        assert await broker.fetch("jobs", 1, timeout=0, lease=1.0) == []
        [letter] = await broker.dead_letters("jobs")
    assert letter.message.id == message_id
    assert letter.message.attempt == 1
    assert letter.error["code"] == "max_deliveries_exceeded"
    assert letter.error["context"] == {
        "topic": "jobs",
        "message_id": message_id,
        "deliveries": 1,
        "max_deliveries": 1,
    }


async def test_local_publish_wakes_a_waiting_fetch(tmp_path: Path, clock: Clock) -> None:
    """A publish through another broker of this process wakes a fetch without polling."""
    path = tmp_path / "jobs.db"
    async with SqliteBroker(path, poll_interval=30.0) as consumer, SqliteBroker(path) as producer:
        await consumer.fetch("jobs", 1, timeout=0, lease=1.0)  # create the schema first
        start = clock.now()

        async def publish_later() -> None:
            await asyncio.sleep(1.0)
            await producer.publish("jobs", numbered(1))

        async with asyncio.TaskGroup() as group:
            group.create_task(publish_later())
            [message] = await consumer.fetch("jobs", 1, timeout=20.0, lease=1.0)
        # Woken by the publish at 1.0, long before the next poll at 30.0.
        assert 1.0 <= clock.now() - start < 5.0
        await consumer.ack([message])


async def test_cancelled_fetch_hands_its_claim_back(tmp_path: Path) -> None:
    """A fetch cancelled while its claim runs hands the claimed messages back, no attempt lost."""
    path = tmp_path / "jobs.db"
    wall = FakeWallTime()
    # inline=False: an inline claim runs to its end before the fetch can be cancelled.
    async with SqliteBroker(path, time=wall, poll_interval=0.01, inline=False) as broker:
        await broker.publish("jobs", numbered(3))
        task = asyncio.create_task(broker.fetch("jobs", 3, timeout=0, lease=30.0))
        await asyncio.sleep(0)  # the claim is now running on the broker's thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        got = []
        while len(got) < 3:
            got += await broker.fetch("jobs", 3, timeout=1.0, lease=30.0)
        assert [m.body for m in got] == [b"0", b"1", b"2"]
        assert {m.attempt for m in got} == {1}


async def test_concurrent_acks_commit_together(tmp_path: Path) -> None:
    """Acks issued at once (and during a claim) all commit before each ack() returns."""
    path = tmp_path / "jobs.db"
    async with SqliteBroker(path) as broker:
        await broker.publish("jobs", numbered(120))
        batches = [await broker.fetch("jobs", 10, timeout=0, lease=30.0) for _ in range(10)]
        assert sum(map(len, batches)) == 100
        acked = 0

        async def ack(batch: list) -> None:
            nonlocal acked
            await broker.ack(batch)
            # Durable on return: another connection no longer sees these rows.
            ids = [int(m.id) for m in batch]
            marks = ",".join("?" * len(ids))
            assert rows(path, f"SELECT id FROM headrace_messages WHERE id IN ({marks})", *ids) == []
            acked += len(batch)

        async with asyncio.TaskGroup() as group:
            for batch in batches:
                group.create_task(ack(batch))
            rest = group.create_task(broker.fetch("jobs", 50, timeout=1.0, lease=30.0))
        assert acked == 100
        assert [m.body for m in rest.result()] == [str(n).encode() for n in range(100, 120)]
        await broker.ack(rest.result())
    assert rows(path, "SELECT count(*) FROM headrace_messages") == [(0,)]


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "thread"])
@pytest.mark.parametrize("first_batch", [10, 20])
async def test_ack_rides_on_the_next_claim(tmp_path: Path, first_batch: int, inline: bool) -> None:
    """An ack issued as the next fetch starts commits in that claim's transaction (one
    COMMIT for both), also when the claim finds nothing deliverable; on the loop's
    connection and on the thread's."""
    path = tmp_path / "jobs.db"
    async with SqliteBroker(path, inline=inline) as broker:
        await broker.publish("jobs", numbered(15))
        batch = await broker.fetch("jobs", first_batch, timeout=0, lease=30.0)
        assert len(batch) == min(first_batch, 15)
        statements: list[str] = []
        connections = [broker._store.conn]
        if inline:
            assert broker._inline_store is not None
            connections.append(broker._inline_store.conn)
        for conn in connections:
            assert conn is not None
            conn.set_trace_callback(statements.append)
        acked = asyncio.ensure_future(broker.ack(batch))
        await asyncio.sleep(0)  # the ack waits a tick for a claim to carry it
        rest = await broker.fetch("jobs", 10, timeout=0, lease=30.0)
        await acked
        for conn in connections:
            conn.set_trace_callback(None)
        assert [m.body for m in rest] == [str(n).encode() for n in range(len(batch), 15)]
        # Durable on return, and only one transaction committed both.
        ids = [int(m.id) for m in batch]
        marks = ",".join("?" * len(ids))
        assert rows(path, f"SELECT id FROM headrace_messages WHERE id IN ({marks})", *ids) == []
        assert statements.count("COMMIT") == 1
        await broker.ack(rest)
    assert rows(path, "SELECT count(*) FROM headrace_messages") == [(0,)]


async def test_ack_alone_gets_its_own_transaction(tmp_path: Path) -> None:
    """With no fetch coming, an ack still commits (one flush job) before it returns."""
    path = tmp_path / "jobs.db"
    async with SqliteBroker(path) as broker:
        await broker.publish("jobs", numbered(5))
        batch = await broker.fetch("jobs", 5, timeout=0, lease=30.0)
        await broker.ack(batch)
        assert rows(path, "SELECT count(*) FROM headrace_messages") == [(0,)]


async def test_close_lets_running_acks_commit(tmp_path: Path) -> None:
    """close() while acks are on their way: they commit first, nothing fails."""
    path = tmp_path / "jobs.db"
    broker = SqliteBroker(path)
    await broker.connect()
    await broker.publish("jobs", numbered(30))
    batches = [await broker.fetch("jobs", 10, timeout=0, lease=30.0) for _ in range(3)]
    async with asyncio.TaskGroup() as group:
        for batch in batches:
            group.create_task(broker.ack(batch))
        await asyncio.sleep(0)  # the acks are queued on the broker's thread
        group.create_task(broker.close())
    assert rows(path, "SELECT count(*) FROM headrace_messages") == [(0,)]


@pytest.mark.parametrize("yields", [0, 1, 2, 5])
async def test_cancelled_fetch_then_close_loses_no_lease(tmp_path: Path, yields: int) -> None:
    """A fetch cancelled during its claim, then close() at once: the claim is handed back
    before the connection closes, whichever side of the claim's commit the cancel fell."""
    path = tmp_path / "jobs.db"
    wall = FakeWallTime()
    async with SqliteBroker(path, time=wall) as producer:
        await producer.publish("jobs", numbered(3))
    broker = SqliteBroker(path, time=wall)
    await broker.connect()
    task = asyncio.create_task(broker.fetch("jobs", 3, timeout=0, lease=30.0))
    for _ in range(yields + 1):
        await asyncio.sleep(0)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    else:  # the fetch won the race: its caller got the messages and hands them back
        await broker.hand_back(task.result())
    await broker.close()
    async with SqliteBroker(path, time=wall) as again:  # no time passes: no lease expires
        got = await again.fetch("jobs", 3, timeout=0, lease=30.0)
    assert [(m.body, m.attempt) for m in got] == [(b"0", 1), (b"1", 1), (b"2", 1)]


async def _while_locked(path: Path, *operations: Coroutine[Any, Any, Any]) -> tuple[list[Any], int]:
    """Run ``operations`` while another connection holds the write lock for 0.5 s; return
    their results and how many 10 ms ticks the event loop managed meanwhile."""
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    try:
        async with asyncio.TaskGroup() as group:
            ticker = group.create_task(tick())
            tasks = [group.create_task(operation) for operation in operations]
            await asyncio.sleep(0.5)
            assert not any(task.done() for task in tasks)
            blocker.execute("COMMIT")
            results = [await task for task in tasks]
            ticker.cancel()
    finally:
        blocker.close()
    return results, ticks


@pytest.mark.real_time
async def test_a_locked_file_never_blocks_the_loop(tmp_path: Path) -> None:
    """While another connection holds the write lock, publish waits on the broker's
    thread and the event loop keeps running; it completes once the lock is released."""
    path = tmp_path / "jobs.db"
    async with SqliteBroker(path) as broker:
        await broker.fetch("jobs", 1, timeout=0, lease=1.0)  # schema in place
        [ids], ticks = await _while_locked(path, broker.publish("jobs", numbered(1)))
        assert len(ids) == 1
        # ~50 ticks at 10 ms in 0.5 s; a blocked loop would have managed none.
        assert ticks >= 10


@pytest.mark.real_time
async def test_a_locked_file_sends_fetch_and_ack_to_the_thread(tmp_path: Path) -> None:
    """The loop's own connection never waits for a lock: while another connection holds
    it, a fetch and an ack wait on the broker's thread instead, the loop keeps running,
    and both complete (the ack durably) once the lock is released."""
    path = tmp_path / "jobs.db"
    async with SqliteBroker(path) as broker:
        await broker.publish("jobs", numbered(6))
        first = await broker.fetch("jobs", 3, timeout=0, lease=30.0)  # inline: lock free
        [_, second], ticks = await _while_locked(
            path,
            broker.ack(first),
            broker.fetch("jobs", 3, timeout=5.0, lease=30.0),
        )
        assert ticks >= 10  # ~50 at 10 ms in 0.5 s; a blocked loop would have managed none
        assert [m.body for m in second] == [b"3", b"4", b"5"]
        assert rows(path, "SELECT count(*) FROM headrace_messages") == [(3,)]
        await broker.ack(second)


async def test_inline_writes_ask_the_thread_for_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop's connection never checkpoints (that copies the WAL back and fsyncs);
    past the WAL size threshold it asks the broker's thread to, so the WAL stays small."""
    from headrace.messaging.brokers.sqlite import _connection

    monkeypatch.setattr(_connection, "_CHECKPOINT_WAL_BYTES", 64 << 10)
    path = tmp_path / "jobs.db"
    async with SqliteBroker(path) as broker:
        checkpoints = 0
        checkpoint = broker._checkpoint_sync

        def counting_checkpoint() -> None:
            nonlocal checkpoints
            checkpoints += 1
            checkpoint()

        broker._checkpoint_sync = counting_checkpoint  # type: ignore[method-assign]
        await broker.publish("jobs", numbered(3000))
        largest_wal = 0
        while batch := await broker.fetch("jobs", 10, timeout=0, lease=30.0):
            await broker.ack(batch)
            # Let a requested checkpoint finish (its job is internal: no event to await).
            while broker._checkpoint_queued:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
            largest_wal = max(largest_wal, os.stat(f"{path}-wal").st_size)
        assert checkpoints >= 2
        # Hundreds of commits of several pages each: without checkpoints the WAL grows
        # to ~5.8 MB (measured); with them it restarts from its head.
        assert largest_wal < 2 << 20


async def test_busy_timeout_is_a_broker_error(tmp_path: Path) -> None:
    """A write lock held longer than busy_timeout fails the operation with BrokerError."""
    path = tmp_path / "jobs.db"
    async with SqliteBroker(path, busy_timeout=0.05) as broker:
        await broker.fetch("jobs", 1, timeout=0, lease=1.0)
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(BrokerError, match="locked") as info:
                await broker.publish("jobs", numbered(1))
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert info.value.context["operation"] == "publish"
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        # The broker is still usable afterwards.
        assert len(await broker.publish("jobs", numbered(1))) == 1


async def test_large_batches(tmp_path: Path) -> None:
    """Publishing and acking 2,500 messages in one call (beyond one statement's limit) works."""
    async with SqliteBroker(tmp_path / "jobs.db") as broker:
        ids = await broker.publish("jobs", numbered(2500))
        assert ids == [str(i) for i in range(1, 2501)]
        got = await broker.fetch("jobs", 2500, timeout=0, lease=30.0)
        assert [m.id for m in got] == ids
        await broker.ack(got)
        assert await broker.fetch("jobs", 1, timeout=0, lease=30.0) == []


async def test_unclosed_broker_warns(tmp_path: Path) -> None:
    """A connected broker dropped without close() emits a ResourceWarning."""
    holder = [SqliteBroker(tmp_path / "jobs.db")]
    await holder[0].connect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        holder.clear()
        # The broker's thread may hold the last reference for a moment after it answered.
        for _ in range(500):
            if caught:
                break
            await asyncio.sleep(0.01)
    assert [w.category for w in caught] == [ResourceWarning]
    assert "unclosed SqliteBroker" in str(caught[0].message)


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A file written by a newer schema version is refused with a clear BrokerError."""
    path = tmp_path / "jobs.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    broker = SqliteBroker(path)
    with pytest.raises(BrokerError, match="schema version 99") as info:
        await broker.connect()
    assert info.value.code == "incompatible_schema"
    await broker.close()


async def test_in_memory_database() -> None:
    """SqliteBroker(":memory:") works as a private, non-durable broker."""
    async with open_broker("sqlite:///:memory:") as broker:
        await broker.publish("jobs", numbered(2))
        got = await broker.fetch("jobs", 5, timeout=0, lease=1.0)
        assert [m.body for m in got] == [b"0", b"1"]
        await broker.ack(got)


def test_constructor_validates() -> None:
    """Bad options are ConfigurationErrors naming the option."""
    with pytest.raises(ConfigurationError, match="max_deliveries=0"):
        SqliteBroker("x.db", max_deliveries=0)
    with pytest.raises(ConfigurationError, match="synchronous='fast'"):
        SqliteBroker("x.db", synchronous="fast")
    with pytest.raises(ConfigurationError, match="poll_interval"):
        SqliteBroker("x.db", poll_interval=0)


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///jobs.db", "jobs.db"),
        ("sqlite:////var/lib/jobs.db", "/var/lib/jobs.db"),
        ("sqlite:///data/my%20jobs.db?max_deliveries=10&lease=30", "data/my jobs.db"),
    ],
)
def test_sqlite_urls(url: str, path: str) -> None:
    """sqlite:///relative and sqlite:////absolute paths, with query options."""
    broker = open_broker(url)
    assert isinstance(broker, SqliteBroker)
    assert broker.path == path
    if "max_deliveries" in url:
        assert broker.max_deliveries == 10


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///x.db?lease=soon"])
def test_bad_sqlite_urls(url: str) -> None:
    """A sqlite URL without a file, or with a malformed option, is a ConfigurationError."""
    with pytest.raises(ConfigurationError) as info:
        open_broker(url)
    assert info.value.code == "invalid_broker_url"


# -- differential: the SQLite broker behaves exactly like the reference MemoryBroker ----


class FakeClock:
    """A Clock whose now() is a FakeWallTime (no waiting happens: every fetch has timeout 0)."""

    def __init__(self, wall: FakeWallTime) -> None:
        self.wall = wall

    def now(self) -> float:
        return self.wall.now

    async def sleep(self, seconds: float) -> None:
        raise AssertionError("the differential test never waits")

    async def sleep_until(self, deadline: float) -> None:
        raise AssertionError("the differential test never waits")

    def call_at(self, when: float, callback: Callable[[], object]) -> TimerHandle:
        raise AssertionError("the differential test never waits")


held_index = st.integers(min_value=0, max_value=20)
fetches = st.tuples(st.just("fetch"), st.integers(1, 5), st.sampled_from([1.0, 5.0]))
advances = st.tuples(st.just("advance"), st.sampled_from([0.5, 1.0, 3.0]))
operations = st.lists(
    # Fetches and time steps weigh triple, so crash loops (expiry after expiry up to
    # max_deliveries) are common.
    st.one_of(
        st.tuples(st.just("publish"), st.integers(1, 4), st.sampled_from([0.0, 1.0, 5.0])),
        fetches,
        fetches,
        fetches,
        advances,
        advances,
        st.tuples(st.just("ack"), held_index),
        st.tuples(st.just("nack"), held_index, st.sampled_from([0.0, 2.0])),
        st.tuples(st.just("hand_back"), held_index),
        st.tuples(st.just("extend"), held_index, st.sampled_from([1.0, 10.0])),
        st.tuples(st.just("dead_letter"), held_index),
        st.tuples(st.just("replay"), st.booleans()),
        st.tuples(st.just("advance"), st.sampled_from([0.5, 1.0, 3.0])),
    ),
    min_size=15,
    max_size=60,
)


def view(messages: list[Message]) -> list[tuple[str, bytes, int, str | None]]:
    return [(m.id, m.body, m.attempt, m.key) for m in messages]


async def play(script: list[tuple[Any, ...]], directory: str) -> None:
    wall = FakeWallTime()
    reference = MemoryBroker(max_deliveries=3, clock=FakeClock(wall))
    subject = SqliteBroker(Path(directory) / "diff.db", max_deliveries=3, time=wall)
    held: list[tuple[Message, Message]] = []
    counter = 0
    async with reference, subject:
        for step in [("publish", 4, 0.0), *script]:
            kind = step[0]
            pick = held[step[1] % len(held)] if held and kind not in SKIP_PICK else None
            if kind == "publish":
                batch = [
                    OutgoingMessage(str(counter + n).encode(), key=f"k{n}", delay=step[2])
                    for n in range(step[1])
                ]
                counter += step[1]
                assert await reference.publish("t", batch) == await subject.publish("t", batch)
            elif kind == "fetch":
                expected = await reference.fetch("t", step[1], timeout=0, lease=step[2])
                actual = await subject.fetch("t", step[1], timeout=0, lease=step[2])
                assert view(actual) == view(expected), (step, wall.now)
                for message in actual:
                    event(f"attempt {message.attempt}")
                held += zip(expected, actual, strict=True)
            elif kind == "advance":
                wall.now += step[1]
            elif kind == "replay":
                ids = (
                    None
                    if step[1]
                    else [d.message.id for d in await reference.dead_letters("t")][:1]
                )
                assert await reference.replay_dead_letters("t", ids) == (
                    await subject.replay_dead_letters("t", ids)
                )
            elif pick is not None:
                for broker, message in ((reference, pick[0]), (subject, pick[1])):
                    if kind == "ack":
                        await broker.ack([message])
                    elif kind == "nack":
                        await broker.nack([message], delay=step[2])
                    elif kind == "hand_back":
                        await broker.hand_back([message])
                    elif kind == "extend":
                        await broker.extend_lease([message], step[2])
                    else:
                        await broker.dead_letter(message, {"code": "poison"})
        letters = [await b.dead_letters("t", limit=1000) for b in (reference, subject)]
        assert [(view([d.message]), d.error["code"]) for d in letters[1]] == [
            (view([d.message]), d.error["code"]) for d in letters[0]
        ]
        wall.now += 100.0
        assert view(await subject.fetch("t", 1000, timeout=0, lease=1.0)) == view(
            await reference.fetch("t", 1000, timeout=0, lease=1.0)
        )


SKIP_PICK = {"publish", "fetch", "advance", "replay"}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=operations)
def test_sqlite_matches_the_reference_broker(script: list[tuple[Any, ...]]) -> None:
    """Random publish/fetch/ack/nack/hand-back/extend/dead-letter/replay/time scripts: the
    SQLite broker delivers exactly what MemoryBroker delivers (ids, order, attempts)."""
    with tempfile.TemporaryDirectory() as directory:
        run(play(script, directory))


async def test_a_failing_loop_connection_hands_over_to_the_thread(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """If the loop's own connection breaks (not a lock: an error), the broker says so
    once and goes on with the thread's connection; no fetch fails, no ack is lost."""
    path = tmp_path / "jobs.db"
    async with SqliteBroker(path) as broker:
        await broker.publish("jobs", numbered(4))
        first = await broker.fetch("jobs", 2, timeout=0, lease=30.0)
        inline = broker._inline_store
        assert inline is not None
        assert inline.conn is not None
        inline.conn.close()  # every statement on it now raises sqlite3.ProgrammingError
        acked = asyncio.ensure_future(broker.ack(first))
        second = await broker.fetch("jobs", 2, timeout=1.0, lease=30.0)
        await acked
        assert [m.body for m in second] == [b"2", b"3"]
        assert broker._inline_store is None
        await broker.ack(second)
        assert await broker.fetch("jobs", 10, timeout=0, lease=30.0) == []
    assert rows(path, "SELECT count(*) FROM headrace_messages") == [(0,)]
    assert "using the broker's thread only" in caplog.text
