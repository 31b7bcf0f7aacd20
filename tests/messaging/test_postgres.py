"""PostgresBroker specifics beyond the conformance suite: SKIP LOCKED under load, LISTEN
wake-ups across connections, a fetch cancelled while its claim waits in the server,
leases and max_deliveries in the table, URLs and passwords, killed connections.

Needs the PostgreSQL on this machine (``postgres_url``); each test works on tables of
its own (a unique prefix or schema) and drops them afterwards.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import psycopg
import pytest
from psycopg import pq

from headrace import BrokerConnectionError, ClosedResourceError, ConfigurationError
from headrace.messaging import OutgoingMessage, TopicStats, open_broker
from headrace.messaging.brokers.postgres import PostgresBroker

from ._apps.tcp_proxy import ChaosProxy

pytestmark = pytest.mark.real_time

Maker = Callable[..., PostgresBroker]


def out(*bodies: bytes) -> list[OutgoingMessage]:
    return [OutgoingMessage(body) for body in bodies]


@pytest.fixture
def prefix(postgres_url: str) -> Iterator[str]:
    """A table prefix of this test's own; its tables are dropped afterwards."""
    name = f"hr_pgtest_{uuid.uuid4().hex[:12]}_"
    yield name
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}messages, {name}dead_letters")


@pytest.fixture
def make(postgres_url: str, prefix: str) -> Maker:
    """Brokers on this test's tables (``make(**options)``, not yet connected)."""

    def build(**options: Any) -> PostgresBroker:
        return PostgresBroker(postgres_url, prefix=prefix, **options)

    return build


@asynccontextmanager
async def plain(url: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A plain autocommit connection, to look at the tables and play the administrator."""
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    try:
        yield conn
    finally:
        await conn.close()


async def one(conn: psycopg.AsyncConnection[Any], query: str, *params: Any) -> Any:
    cursor = await conn.execute(query.encode(), params)
    row = await cursor.fetchone()
    assert row is not None
    return row[0]


async def terminate(conn: psycopg.AsyncConnection[Any], application_name: str) -> int:
    """pg_terminate_backend every connection of ``application_name``; wait until gone."""
    killed = await one(
        conn,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
        application_name,
    )
    for _ in range(500):
        left = await one(
            conn,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            application_name,
        )
        if not left:
            return int(killed)
        await asyncio.sleep(0.01)
    raise AssertionError(f"connections of {application_name} still alive")


async def test_two_consumers_never_share_a_message_under_load(make: Maker) -> None:
    """Two brokers (two connections each), four fetchers each, while a third publishes:
    every one of 3,000 messages is delivered exactly once and the table ends empty."""
    async with make() as producer, make() as first, make() as second:
        ids: list[str] = []
        seen: list[str] = []
        publishing = True

        async def publish() -> None:
            nonlocal publishing
            for _ in range(20):
                ids.extend(await producer.publish("jobs", [OutgoingMessage(b"x")] * 150))
                await asyncio.sleep(0)
            publishing = False

        async def consume(broker: PostgresBroker) -> None:
            while True:
                batch = await broker.fetch("jobs", 25, timeout=0.5, lease=30.0)
                if not batch and not publishing:
                    return
                seen.extend(message.id for message in batch)
                await asyncio.sleep(0)
                await broker.ack(batch)

        async with asyncio.TaskGroup() as group:
            group.create_task(publish())
            for broker in (first, second) * 4:
                group.create_task(consume(broker))
        assert len(seen) == len(set(seen)) == 3000
        assert sorted(seen) == sorted(ids)
        assert await first.topic_stats("jobs") == TopicStats("jobs", 0, 0, 0, 0)


async def test_publish_from_another_connection_wakes_a_waiting_fetch(make: Maker) -> None:
    """With polling all but off (poll_interval 60 s), a fetch waiting on an empty topic
    returns the message another broker publishes: the NOTIFY woke it."""
    async with make(poll_interval=60.0) as consumer, make() as producer:

        async def publish_soon() -> None:
            await asyncio.sleep(0.2)
            await producer.publish("jobs", out(b"hello"))

        async with asyncio.TaskGroup() as group:
            group.create_task(publish_soon())
            got = await consumer.fetch("jobs", 10, timeout=30.0, lease=30.0)
        assert [m.body for m in got] == [b"hello"]
        await consumer.ack(got)


async def test_a_plain_notify_wakes_the_fetches_of_its_topic_only(
    make: Maker, postgres_url: str
) -> None:
    """The channel's payload is the topic: a NOTIFY sent by hand wakes a fetch of that
    topic (which then finds the row inserted by hand), not one of another topic."""
    async with make(poll_interval=60.0) as broker, plain(postgres_url) as sql:
        table = broker.messages_table

        async def insert_and_notify() -> None:
            await asyncio.sleep(0.2)
            await sql.execute(
                f"INSERT INTO {table} (topic, body, ready_at) "
                "VALUES ('jobs', 'raw', now())".encode()
            )
            await sql.execute(b"SELECT pg_notify(%s, 'jobs')", (broker.channel,))

        async with asyncio.TaskGroup() as group:
            group.create_task(insert_and_notify())
            other = group.create_task(broker.fetch("other", 1, timeout=1.5, lease=30.0))
            got = await broker.fetch("jobs", 1, timeout=30.0, lease=30.0)
        assert [m.body for m in got] == [b"raw"]
        assert other.result() == []
        await broker.ack(got)


async def test_a_topic_too_long_for_a_payload_still_wakes_its_fetch(make: Maker) -> None:
    """Topics of 8000+ bytes cannot be a NOTIFY payload: an empty one wakes every fetch."""
    topic = "t" * 9000
    async with make(poll_interval=60.0) as consumer, make() as producer:

        async def publish_soon() -> None:
            await asyncio.sleep(0.2)
            await producer.publish(topic, out(b"long"))

        async with asyncio.TaskGroup() as group:
            group.create_task(publish_soon())
            got = await consumer.fetch(topic, 1, timeout=30.0, lease=30.0)
        assert [m.body for m in got] == [b"long"]
        await consumer.ack(got)


async def test_fetch_cancelled_while_its_claim_waits_in_the_server(
    make: Maker, postgres_url: str
) -> None:
    """A fetch cancelled while its claim is blocked on a table lock: the claim finishes
    once the lock goes, its messages are handed back before the cancellation arrives,
    and the next fetch gets them at once as attempt 1 (not after the 30 s lease)."""
    async with make() as broker, plain(postgres_url) as sql:
        await broker.publish("jobs", out(b"0", b"1", b"2"))
        table = broker.messages_table
        blocker = await psycopg.AsyncConnection.connect(postgres_url)
        try:
            await blocker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE".encode())
            task = asyncio.create_task(broker.fetch("jobs", 3, timeout=5.0, lease=30.0))
            for _ in range(500):  # until the claim waits for the lock
                waiting = await one(
                    sql,
                    "SELECT count(*) FROM pg_locks WHERE relation = to_regclass(%s) "
                    "AND NOT granted",
                    table,
                )
                if waiting:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the claim never waited for the lock")
            task.cancel()
            await asyncio.sleep(0.05)
            assert not task.done()  # it waits for the claim, which waits for the lock
            await blocker.commit()
        finally:
            await blocker.close()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await broker.topic_stats("jobs") == TopicStats("jobs", 3, 0, 0, 0)
        got = await broker.fetch("jobs", 3, timeout=0, lease=30.0)
        assert [(m.body, m.attempt) for m in got] == [(b"0", 1), (b"1", 1), (b"2", 1)]
        await broker.ack(got)


async def test_expired_lease_is_reclaimed_by_another_consumer_as_next_attempt(
    make: Maker, postgres_url: str
) -> None:
    """A lease runs out on the server's clock; another broker then claims the message as
    attempt 2 under a new token, and the old delivery can no longer extend it."""
    async with make() as first, make() as second, plain(postgres_url) as sql:
        [message_id] = await first.publish("jobs", out(b"x"))
        [old] = await first.fetch("jobs", 1, timeout=1.0, lease=0.2)
        lease_left = await one(
            sql,
            f"SELECT extract(epoch FROM lease_until - now())::float8 FROM {first.messages_table}",
        )
        assert lease_left <= 0.2
        [new] = await second.fetch("jobs", 1, timeout=5.0, lease=30.0)
        assert (new.id, old.attempt, new.attempt) == (message_id, 1, 2)
        assert new.receipt != old.receipt
        await first.extend_lease([old], 60.0)
        token = await one(sql, f"SELECT lease_token FROM {first.messages_table}")
        assert token == new.receipt
        assert await one(sql, f"SELECT attempt FROM {first.messages_table}") == 2
        await second.ack([new])


async def test_max_deliveries_dead_letters_in_the_claim_and_fills_the_batch(
    make: Maker,
) -> None:
    """A message delivered max_deliveries times is dead-lettered by the claim that would
    deliver it again (record: deliveries and cap), and the same fetch goes on to the
    messages behind it."""
    async with make(max_deliveries=3) as broker:
        [crash] = await broker.publish("jobs", out(b"crash"))
        for attempt in (1, 2, 3):
            [message] = await broker.fetch("jobs", 1, timeout=5.0, lease=0.2)
            assert (message.id, message.attempt) == (crash, attempt)
        await broker.publish("jobs", out(b"fine"))
        await asyncio.sleep(0.25)
        # A claim of one finds the crash-looping message first, buries it, claims again.
        got = await broker.fetch("jobs", 1, timeout=5.0, lease=30.0)
        assert [m.body for m in got] == [b"fine"]
        [letter] = await broker.dead_letters("jobs")
        assert (letter.message.id, letter.message.body, letter.message.attempt) == (
            crash,
            b"crash",
            3,
        )
        assert letter.error["code"] == "max_deliveries_exceeded"
        assert letter.error["context"]["deliveries"] == 3
        assert letter.error["context"]["max_deliveries"] == 3
        await broker.ack(got)
        assert await broker.topic_stats("jobs") == TopicStats("jobs", 0, 0, 0, 1)


async def test_killed_connections_fail_one_call_then_recover(
    make: Maker, postgres_url: str
) -> None:
    """pg_terminate_backend on every connection of a broker: the next fetch raises
    BrokerConnectionError, the one after reconnects; an ack is sent again over a fresh
    connection by itself; the listen connection comes back and wakes fetches again."""
    name = f"hr-pgtest-{uuid.uuid4().hex[:8]}"
    async with (
        make(application_name=name, poll_interval=60.0) as broker,
        make() as producer,
        plain(postgres_url) as sql,
    ):
        await producer.publish("jobs", out(b"a", b"b"))
        assert await terminate(sql, name) == 2  # the work and the listen connection
        with pytest.raises(BrokerConnectionError) as caught:
            await broker.fetch("jobs", 1, timeout=0, lease=30.0)
        assert caught.value.context["operation"] == "fetch"
        [first] = await broker.fetch("jobs", 1, timeout=0, lease=30.0)
        assert first.body == b"a"
        await terminate(sql, name)
        await broker.ack([first])  # repeated on a fresh connection, no error
        [second] = await broker.fetch("jobs", 1, timeout=0, lease=30.0)
        assert second.body == b"b"
        await broker.ack([second])

        async def publish_soon() -> None:
            await asyncio.sleep(0.3)
            await producer.publish("jobs", out(b"c"))

        async with asyncio.TaskGroup() as group:
            group.create_task(publish_soon())
            got = await broker.fetch("jobs", 1, timeout=30.0, lease=30.0)
        assert [m.body for m in got] == [b"c"]
        await broker.ack(got)
        assert await broker.topic_stats("jobs") == TopicStats("jobs", 0, 0, 0, 0)


async def test_a_hung_server_fails_the_statement_after_command_timeout(
    postgres_url: str, prefix: str
) -> None:
    """A server that stops answering (open, silent connections, as a hung server or a
    partition leaves them): the statement waiting for it fails with a
    BrokerConnectionError naming command_timeout, close does not hang, and a new
    broker goes on once the server answers again; nothing was lost."""
    assert "127.0.0.1:5432" in postgres_url, postgres_url
    async with ChaosProxy("127.0.0.1", 5432) as proxy:
        url = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        loop = asyncio.get_running_loop()
        async with PostgresBroker(url, prefix=prefix, command_timeout=0.5) as broker:
            await broker.publish("jobs", out(b"a"))
            outage = asyncio.create_task(proxy.outage(1.5, "blackhole"))
            await asyncio.sleep(0.05)
            started = loop.time()
            with pytest.raises(BrokerConnectionError, match="command_timeout") as caught:
                await broker.fetch("jobs", 1, timeout=0, lease=30.0)
            waited = loop.time() - started
            await outage
        # Tolerant: the 0.5 s timer plus scheduling on a loaded machine.
        assert 0.45 <= waited < 1.4, waited
        assert caught.value.context["operation"] == "fetch"
        async with PostgresBroker(url, prefix=prefix, command_timeout=0.5) as broker:
            [message] = await broker.fetch("jobs", 1, timeout=1.0, lease=30.0)
            assert message.body == b"a"
            await broker.ack([message])


async def test_schema_option_creates_its_schema_and_tables(postgres_url: str) -> None:
    """schema= puts the tables in that schema (created if missing); headers are JSON the
    database can read."""
    schema = f"hr_pgtest_{uuid.uuid4().hex[:12]}"
    try:
        async with PostgresBroker(postgres_url, schema=schema) as broker:
            assert broker.messages_table == f'"{schema}"."headrace_messages"'
            await broker.publish("jobs", [OutgoingMessage(b"x", headers={"trace": "t-1"})])
            conn = await psycopg.AsyncConnection.connect(postgres_url, autocommit=True)
            try:
                trace = await one(conn, f"SELECT headers->>'trace' FROM {broker.messages_table}")
            finally:
                await conn.close()
            assert trace == "t-1"
            [message] = await broker.fetch("jobs", 1, timeout=1.0, lease=30.0)
            assert message.headers == {"trace": "t-1"}
            await broker.ack([message])
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'.encode())


def test_url_options_and_open_broker(postgres_url: str) -> None:
    """postgres:// and postgresql:// open a PostgresBroker; the broker's options in the
    query are taken out of the URL (libpq would refuse them); keywords win."""
    broker = open_broker(
        postgres_url.replace("postgresql://", "postgres://")
        + "?prefix=jobs_&lease=60&max_deliveries=none&sslmode=disable"
    )
    assert isinstance(broker, PostgresBroker)
    assert broker.messages_table == '"jobs_messages"'
    assert broker.max_deliveries is None
    broker = open_broker(postgres_url + "?max_deliveries=4", max_deliveries=7)
    assert isinstance(broker, PostgresBroker)
    assert broker.max_deliveries == 7


@pytest.mark.parametrize(
    ("conninfo", "options", "match"),
    [
        ("postgresql://app:s3cret-pw@127.0.0.1/test?bogus=1", {}, "bogus"),
        ("postgresql://app:s3cret-pw@127.0.0.1/test?lease=soon", {}, "lease='soon'"),
        ("host=127.0.0.1 password=s3cret-pw dbname", {}, "dbname"),
        ("postgresql://127.0.0.1/test", {"prefix": "Jobs-"}, "prefix='Jobs-'"),
        ("postgresql://127.0.0.1/test", {"schema": ""}, "schema=''"),
        ("postgresql://127.0.0.1/test", {"poll_interval": 0}, "poll_interval"),
        ("postgresql://127.0.0.1/test?command_timeout=-1", {}, "command_timeout"),
    ],
)
def test_bad_configuration_is_refused_without_the_password(
    conninfo: str, options: dict[str, Any], match: str
) -> None:
    """Malformed URLs, conninfo strings and options raise ConfigurationError at
    construction, naming the problem and never the password."""
    with pytest.raises(ConfigurationError, match=match) as caught:
        PostgresBroker(conninfo, **options)
    assert "s3cret-pw" not in str(caught.value)


@pytest.mark.parametrize("value", [0, -1, True, 2.5, "3"])
def test_bad_max_deliveries_uses_the_shared_check(value: object) -> None:
    """max_deliveries goes through the check every adapter shares (same code)."""
    with pytest.raises(ConfigurationError, match="PostgresBroker\\(max_deliveries=") as caught:
        PostgresBroker("postgresql://127.0.0.1/test", max_deliveries=value)  # type: ignore[arg-type]
    assert caught.value.code == "invalid_max_deliveries"


@pytest.mark.parametrize(
    "conninfo",
    [
        "postgresql://app:s3cret-pw@127.0.0.1:1/test",
        "host=127.0.0.1 port=1 dbname=test user=app password=s3cret-pw",
        "postgresql://app@127.0.0.1:1/test?password=s3cret-pw",
    ],
)
async def test_unreachable_server_is_a_connection_error_without_the_password(
    conninfo: str,
) -> None:
    """Nothing listens on port 1: connect raises BrokerConnectionError; the password is
    in neither the error, its record, nor the broker's repr."""
    broker = PostgresBroker(conninfo, connect_timeout=2)
    with pytest.raises(BrokerConnectionError) as caught:
        await broker.connect()
    assert caught.value.context["operation"] == "connect"
    record = json.dumps(caught.value.to_dict())
    for text in (str(caught.value), record, repr(broker)):
        assert "s3cret-pw" not in text
    await broker.close()
    with pytest.raises(ClosedResourceError):
        await broker.fetch("jobs", 1, timeout=0)


@contextmanager
def statements_sent(broker: PostgresBroker) -> Iterator[list[str]]:
    """The statements the broker's work connection executes inside the block (libpq's
    protocol trace: one ``Execute`` or simple ``Query`` message per statement)."""
    conn = broker._work
    assert conn is not None
    sent: list[str] = []
    with tempfile.TemporaryFile(mode="w+") as trace:
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            yield sent
        finally:
            conn.pgconn.untrace()
            trace.seek(0)
            for line in trace:
                direction, _, kind = line.split("\t")[:3]
                if direction == "F" and kind.split()[0] in ("Execute", "Query"):
                    sent.append(line.strip())


async def test_an_ack_rides_on_the_next_claim(make: Maker) -> None:
    """An ack issued as the next fetch starts is deleted by that fetch's claim: one
    statement (one round trip, one commit) for both; an ack alone is one DELETE."""
    async with make() as broker:
        await broker.publish("jobs", out(b"0", b"1", b"2", b"3", b"4"))
        first = await broker.fetch("jobs", 2, timeout=0, lease=30.0)
        with statements_sent(broker) as sent:
            acked = asyncio.ensure_future(broker.ack(first))
            await asyncio.sleep(0)  # the ack waits a tick for a claim to carry it
            second = await broker.fetch("jobs", 2, timeout=0, lease=30.0)
            await acked
        assert [m.body for m in second] == [b"2", b"3"]
        assert len(sent) == 1
        stats = await broker.topic_stats("jobs")
        assert (stats.ready, stats.in_flight) == (1, 2)  # the acked two are gone
        with statements_sent(broker) as sent:
            await broker.ack(second)
        assert len(sent) == 1
        assert await broker.topic_stats("jobs") == TopicStats("jobs", 1, 0, 0, 0)
