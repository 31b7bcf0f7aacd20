"""NatsBroker against the real NATS JetStream on this machine: what conformance cannot see.

Each test works under its own stream-name prefix; its streams are deleted afterwards.
Timings are real: "not before" is checked exactly, "soon after" with ``SLACK``.
"""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import nats
import pytest

from headrace import BrokerConnectionError, ConfigurationError, InvalidMessage
from headrace.messaging import Message, OutgoingMessage, Worker, open_broker
from headrace.messaging.brokers.nats import NatsBroker

from ._apps.tcp_proxy import ChaosProxy
from ._nats import delete_nats_streams

pytestmark = pytest.mark.real_time

# How late a real-time wake-up may be on a busy shared machine.
SLACK = 0.5

Maker = Callable[..., NatsBroker]


@pytest.fixture
def prefix(nats_url: str) -> Iterator[str]:
    """A fresh stream-name prefix; every stream under it is deleted after the test."""
    name = f"test-nats-{uuid.uuid4().hex[:12]}"
    yield name
    delete_nats_streams(nats_url, name)


@pytest.fixture
def make(nats_url: str, prefix: str) -> Maker:
    def make(**options: Any) -> NatsBroker:
        return NatsBroker(nats_url, prefix=prefix, **options)

    return make


def numbered(count: int) -> list[OutgoingMessage]:
    return [OutgoingMessage(str(n).encode()) for n in range(count)]


# -- URLs, names, secrets ------------------------------------------------------------


def test_url_options_and_open_broker(nats_url: str) -> None:
    """Query parameters set the broker's options; keywords win; bad values are refused."""
    broker = open_broker(f"{nats_url}?prefix=billing&durable=w7&max_deliveries=3&lease=5")
    assert isinstance(broker, NatsBroker)
    assert broker.max_deliveries == 3
    assert broker.max_lease == 5.0
    assert "prefix='billing'" in repr(broker)
    assert "durable='w7'" in repr(broker)
    assert open_broker(f"{nats_url}?max_deliveries=off").max_deliveries is None  # type: ignore[attr-defined]
    assert open_broker(f"{nats_url}?lease=5", lease=7.0).max_lease == 7.0  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="max_deliveries"):
        NatsBroker(f"{nats_url}?max_deliveries=many")
    with pytest.raises(ConfigurationError, match="unknown option"):
        NatsBroker(f"{nats_url}?group=g")
    with pytest.raises(ConfigurationError, match="max_lease"):
        NatsBroker(nats_url, lease=10.0, max_lease=5.0)
    with pytest.raises(ConfigurationError, match="prefix"):
        NatsBroker(nats_url, prefix="a.b")
    with pytest.raises(ConfigurationError, match="storage"):
        NatsBroker(nats_url, storage="disk")
    with pytest.raises(ConfigurationError, match="not a NATS URL"):
        NatsBroker("redis://127.0.0.1:6379")


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("nats://alice:hunter2@127.0.0.1:1", "hunter2"),
        ("nats://s3cr3t-t0ken@127.0.0.1:1", "s3cr3t-t0ken"),
    ],
)
async def test_connection_error_is_translated_without_the_secret(url: str, secret: str) -> None:
    """A refused connection is a transient BrokerConnectionError; password or token never
    shows in it, in its record, in the repr or in an option error."""
    broker = NatsBroker(url, request_timeout=1.0)
    assert secret not in repr(broker)
    with pytest.raises(BrokerConnectionError) as caught:
        await broker.connect()
    error = caught.value
    assert error.transient
    assert error.code == "broker_unavailable"
    for text in (str(error), repr(error), str(error.to_dict())):
        assert secret not in text
    assert "127.0.0.1:1" in str(error)
    with pytest.raises(ConfigurationError) as refused:
        NatsBroker(url + "?lease=soon")
    assert secret not in str(refused.value)
    await broker.close()


def test_import_headrace_does_not_import_nats() -> None:
    """Only the NATS adapter imports nats-py."""
    code = (
        "import sys, headrace, headrace.messaging; "
        "assert 'nats' not in sys.modules, 'nats imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


async def test_any_topic_name_gets_streams_of_its_own(make: Maker, prefix: str) -> None:
    """Topics with dots, wildcards, spaces, unicode or 300 characters are kept apart."""
    topics = ["a.b", "a_2Eb", "*", ">", "with space/slash", "\u6f22\u5b57", "x" * 300, "x" * 299]
    async with make() as broker:
        for topic in topics:
            await broker.publish(topic, [OutgoingMessage(topic.encode())])
        names = {broker.stream_name(topic) for topic in topics}
        assert len(names) == len(topics)
        assert all(name.startswith(prefix + "-") and len(name) < 120 for name in names)
        for topic in topics:
            [message] = await broker.fetch(topic, 10, timeout=1.0, lease=30.0)
            assert (message.topic, message.body) == (topic, topic.encode())
            await broker.ack([message])


async def test_oversized_message_is_refused_before_sending(make: Maker) -> None:
    """A message over max_payload (headers included) is InvalidMessage, nothing is stored,
    and the connection stays up (NATS would have closed it)."""
    async with make() as broker:
        limit = broker.capabilities.max_message_bytes
        assert limit is not None
        with pytest.raises(InvalidMessage, match="max_payload") as caught:
            await broker.publish(
                "jobs", [OutgoingMessage(b"ok"), OutgoingMessage(b"x" * limit, key="k")]
            )
        assert caught.value.code == "message_too_large"
        [fitting] = await broker.publish("jobs", [OutgoingMessage(b"x" * (limit - 64))])
        [message] = await broker.fetch("jobs", 10, timeout=1.0, lease=30.0)
        assert message.id == fitting
        await broker.ack([message])


async def test_messages_from_other_nats_clients_are_readable(
    make: Maker, nats_url: str, prefix: str
) -> None:
    """A message published by plain nats-py keeps its headers; its id is its sequence."""
    async with make() as broker:
        await broker.publish("jobs", [OutgoingMessage(b"first")])
        client = await nats.connect(nats_url)
        try:
            ack = await client.jetstream().publish(
                f"{prefix}.jobs", b"plain", headers={"trace": "t1"}
            )
        finally:
            await client.close()
        got = await broker.fetch("jobs", 10, timeout=1.0, lease=30.0)
        assert [(m.body, m.headers) for m in got] == [(b"first", {}), (b"plain", {"trace": "t1"})]
        assert got[1].id == str(ack.seq)
        await broker.ack(got)


# -- JetStream semantics ---------------------------------------------------------------


async def test_hand_back_costs_an_attempt_and_counts_toward_max_deliveries(
    make: Maker,
) -> None:
    """Every hand-back is a nak JetStream counts: the third delivery of a message handed
    back twice is attempt 3, and max_deliveries=2 dead-letters it instead."""
    async with make(max_deliveries=2) as broker:
        assert broker.capabilities.handback_costs_attempt
        [message_id] = await broker.publish("jobs", [OutgoingMessage(b"x")])
        [first] = await broker.fetch("jobs", 1, timeout=1.0, lease=30.0)
        await broker.hand_back([first])
        [second] = await broker.fetch("jobs", 1, timeout=1.0, lease=30.0)
        assert (second.id, second.attempt) == (message_id, 2)
        await broker.hand_back([second])
        assert await broker.fetch("jobs", 1, timeout=0.3, lease=30.0) == []
        [letter] = await broker.dead_letters("jobs")
        assert (letter.message.id, letter.error["code"]) == (message_id, "max_deliveries_exceeded")


async def test_in_progress_keeps_a_message_past_ack_wait(make: Maker) -> None:
    """extend_lease with the full AckWait (in_progress) keeps a long handler's message
    from another consumer for as long as it is sent; then it expires as usual."""
    async with make(lease=0.6) as holder, make(lease=0.6) as other:
        await holder.publish("jobs", [OutgoingMessage(b"long")])
        [message] = await holder.fetch("jobs", 1, timeout=1.0)
        for _ in range(3):  # 1.2 s in all, twice the AckWait
            await asyncio.sleep(0.4)
            await holder.extend_lease([message], 0.6)
        assert await other.fetch("jobs", 1, timeout=0.3) == []
        [again] = await other.fetch("jobs", 1, timeout=0.6 + SLACK)
        assert (again.id, again.attempt) == (message.id, 2)
        # The old delivery lost its lease: extending it must not hold the new one.
        await holder.extend_lease([message], 0.6)
        await other.ack([again])


async def test_short_lease_holds_after_a_crash(make: Maker) -> None:
    """A lease shorter than AckWait is kept by the server (a delayed nak), so it expires
    on time even though its consumer is gone; not before."""
    async with make() as survivor:
        doomed = make()
        await doomed.publish("jobs", numbered(3))
        taken = await doomed.fetch("jobs", 3, timeout=1.0, lease=0.5)
        fetched_at = time.monotonic()
        assert len(taken) == 3
        # A crash: the connection goes without acks, hand-backs or close().
        client = doomed._client
        assert client is not None
        await client.close()
        doomed._closed = True
        got: list[Message] = []
        while len(got) < 3:
            got += await survivor.fetch("jobs", 3, timeout=2.0, lease=30.0)
        waited = time.monotonic() - fetched_at
        assert 0.5 - 0.05 <= waited < 0.5 + SLACK
        assert {m.attempt for m in got} == {2}
        await survivor.ack(got)


async def test_close_hands_back_what_a_cancelled_long_poll_brought(make: Maker) -> None:
    """A fetch cancelled during its long poll leaves the request on the server; a message
    it brings afterwards is handed back by close(), not held for the AckWait."""
    async with make() as other:
        broker = make()
        await broker.connect()
        waiting = asyncio.create_task(broker.fetch("jobs", 1, timeout=10.0, lease=30.0))
        await asyncio.sleep(0.2)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await other.publish("jobs", [OutgoingMessage(b"late")])
        await asyncio.sleep(0.1)  # delivered to the cancelled long poll, held by `broker`
        assert (await other.topic_stats("jobs")).in_flight == 1
        await broker.close()
        start = time.monotonic()
        [message] = await other.fetch("jobs", 1, timeout=2.0, lease=30.0)
        assert time.monotonic() - start < SLACK
        assert (message.body, message.attempt) == (b"late", 2)
        await other.ack([message])


async def test_acks_are_applied_when_ack_returns(make: Maker) -> None:
    """ack() returns once JetStream applied the whole batch: closing right after loses none,
    and the stream is empty (work-queue retention removes acked messages)."""
    async with make() as other:
        broker = make()
        await broker.connect()
        await broker.publish("jobs", numbered(500))
        got: list[Message] = []
        while len(got) < 500:
            got += await broker.fetch("jobs", 500 - len(got), timeout=1.0, lease=30.0)
        await broker.ack(got)
        await broker.close()
        stats = await other.topic_stats("jobs")
        assert (stats.ready, stats.in_flight) == (0, 0)
        assert await other.fetch("jobs", 10, timeout=0.2, lease=30.0) == []


async def test_delayed_nack_keeps_id_and_attempts_outside_ack_pending(make: Maker) -> None:
    """nack(delay) moves the message to the delayed subject: it holds no ack-pending slot
    meanwhile, and comes back with its id and the next attempt."""
    async with make() as broker:
        [message_id] = await broker.publish("jobs", [OutgoingMessage(b"x", key="k")])
        [first] = await broker.fetch("jobs", 1, timeout=1.0, lease=30.0)
        await broker.nack([first], delay=0.3)
        stats = await broker.topic_stats("jobs")
        assert (stats.in_flight, stats.delayed) == (0, 1)
        [second] = await broker.fetch("jobs", 1, timeout=2.0, lease=30.0)
        assert (second.id, second.key, second.attempt) == (message_id, "k", 2)
        await broker.nack([second], delay=0.2)
        [third] = await broker.fetch("jobs", 1, timeout=2.0, lease=30.0)
        assert (third.id, third.attempt) == (message_id, 3)
        await broker.ack([third])


async def test_deleted_stream_is_made_again(make: Maker, nats_url: str) -> None:
    """A topic stream deleted behind the broker's back: the next publish makes it again;
    a fetch in between fails as BrokerConnectionError once, then works."""
    async with make(request_timeout=1.0) as broker:
        await broker.publish("jobs", [OutgoingMessage(b"old")])
        await broker.fetch("jobs", 1, timeout=1.0, lease=30.0)
        client = await nats.connect(nats_url)
        try:
            await client.jetstream().delete_stream(broker.stream_name("jobs"))
        finally:
            await client.close()
        with pytest.raises(BrokerConnectionError, match="deleted"):
            await broker.fetch("jobs", 1, timeout=0, lease=30.0)
        assert await broker.fetch("jobs", 1, timeout=0, lease=30.0) == []
        await broker.publish("jobs", [OutgoingMessage(b"new")])
        [message] = await broker.fetch("jobs", 1, timeout=1.0, lease=30.0)
        assert message.body == b"new"
        await broker.ack([message])
        client = await nats.connect(nats_url)
        try:
            await client.jetstream().delete_stream(broker.stream_name("jobs"))
        finally:
            await client.close()
        await broker.publish("jobs", [OutgoingMessage(b"newer")])
        [message] = await broker.fetch("jobs", 1, timeout=1.0, lease=30.0)
        assert message.body == b"newer"
        await broker.ack([message])


async def test_lease_above_max_lease_is_refused(make: Maker) -> None:
    """fetch and extend_lease refuse a lease longer than max_lease (the AckWait)."""
    async with make(max_lease=60.0) as broker:
        with pytest.raises(ConfigurationError, match=r"fetch\(lease\)=61.0 exceeds .*60.0"):
            await broker.fetch("jobs", 1, timeout=0, lease=61.0)


# -- connections ---------------------------------------------------------------------


async def test_waiting_fetch_survives_a_dropped_connection(nats_url: str, prefix: str) -> None:
    """A fetch waiting when the connection drops asks again once nats-py reconnected, and
    gets a message published after the drop."""
    server = urlsplit(nats_url)
    async with ChaosProxy(server.hostname or "127.0.0.1", server.port or 4222) as proxy:
        proxied = server._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()
        async with (
            NatsBroker(proxied, prefix=prefix) as broker,
            NatsBroker(nats_url, prefix=prefix) as producer,
        ):
            await broker.publish("jobs", [OutgoingMessage(b"before")])
            await broker.ack(await broker.fetch("jobs", 1, timeout=1.0, lease=30.0))
            waiting = asyncio.create_task(broker.fetch("jobs", 1, timeout=10.0, lease=30.0))
            await asyncio.sleep(0.3)
            assert proxy.cut_all() >= 1
            await asyncio.sleep(0.2)
            await producer.publish("jobs", [OutgoingMessage(b"after")])
            [message] = await asyncio.wait_for(waiting, 8.0)
            assert message.body == b"after"
            await broker.ack([message])


async def test_operations_fail_with_broker_connection_error_while_the_server_is_away(
    nats_url: str, prefix: str
) -> None:
    """With the server unreachable, a request times out as BrokerConnectionError."""
    server = urlsplit(nats_url)
    async with ChaosProxy(server.hostname or "127.0.0.1", server.port or 4222) as proxy:
        proxied = server._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()
        async with NatsBroker(proxied, prefix=prefix, request_timeout=0.5) as broker:
            await broker.publish("jobs", [OutgoingMessage(b"x")])
            outage = asyncio.create_task(proxy.outage(2.0, "blackhole"))
            await asyncio.sleep(0.1)
            with pytest.raises(BrokerConnectionError):
                await broker.publish("jobs", [OutgoingMessage(b"y")])
            await outage


async def test_unclosed_broker_warns(make: Maker) -> None:
    """A connected broker dropped without close() emits a ResourceWarning."""
    brokers = [make()]
    await brokers[0].connect()
    client = brokers[0]._client
    assert client is not None
    # The last reference goes: nothing but the broker's own callbacks (weak) is left.
    with pytest.warns(ResourceWarning, match="unclosed NatsBroker"):
        brokers.clear()
    gc.collect()
    await client.close()


async def test_worker_runs_on_nats(make: Maker) -> None:
    """The Worker on a NatsBroker: every message handled, a failure retried, all acked."""
    async with make() as broker:
        await broker.publish("jobs", numbered(300))
        worker = Worker(broker, retry_delay=0.1, fetch_timeout=0.2)
        seen: list[tuple[bytes, int]] = []

        @worker.handler("jobs", concurrency=8)
        async def handle(message: Message) -> None:
            seen.append((message.body, message.attempt))
            if message.body == b"7" and message.attempt == 1:
                raise ValueError("first try fails")
            if len({body for body, _ in seen}) == 300 and (b"7", 2) in seen:
                worker.stop()

        await asyncio.wait_for(worker.run(), 20.0)
        assert {body for body, _ in seen} == {str(n).encode() for n in range(300)}
        assert (b"7", 2) in seen
        stats = await broker.topic_stats("jobs")
        assert (stats.ready, stats.delayed, stats.in_flight) == (0, 0, 0)


async def test_pull_requests_are_forgotten(make: Maker) -> None:
    """Fetches that get full batches, partial ones or nothing leave no request behind."""
    async with make() as broker:
        await broker.publish("jobs", numbered(250))
        for _ in range(3):
            await broker.ack(await broker.fetch("jobs", 100, timeout=1.0, lease=30.0))
        assert await broker.fetch("jobs", 100, timeout=0.3, lease=30.0) == []
        assert broker._pulls == {}
        assert broker._pub_acks == {}
