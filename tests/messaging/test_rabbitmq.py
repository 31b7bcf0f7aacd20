"""RabbitMQBroker against the real RabbitMQ on this machine: what the conformance suite
cannot see.

Each test works under its own queue prefix; every queue a broker declared is deleted
afterwards. Timings are real: "not before" is checked exactly, "soon after" with
``SLACK``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import pytest
from pamqp.commands import Basic

from headrace import BrokerConnectionError, BrokerError, ConfigurationError
from headrace.messaging import Message, OutgoingMessage, Worker, open_broker
from headrace.messaging.brokers.rabbitmq import RabbitMQBroker
from headrace.messaging.brokers.rabbitmq._broker import delay_level

from ._apps.tcp_proxy import ChaosProxy
from ._rabbitmq import delete_queues

pytestmark = pytest.mark.real_time

# How late a real-time wake-up may be on a busy shared machine.
SLACK = 0.5

Maker = Callable[..., RabbitMQBroker]


@pytest.fixture
def make(amqp_url: str) -> Iterator[Maker]:
    """Builds brokers on a fresh queue prefix; their queues are deleted afterwards."""
    import uuid

    prefix = f"test-rabbitmq-{uuid.uuid4().hex[:12]}."
    made: list[RabbitMQBroker] = []

    def build(url: str | None = None, **options: Any) -> RabbitMQBroker:
        broker = RabbitMQBroker(url or amqp_url, prefix=prefix, **options)
        made.append(broker)
        return broker

    yield build
    delete_queues(amqp_url, {name for broker in made for name in broker.declared_queues})


@asynccontextmanager
async def raw_channel(url: str) -> AsyncIterator[Any]:
    """An aiormq channel of its own, to look at the queues behind the broker's back."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        yield await channel.get_underlay_channel()
    finally:
        await connection.close()


async def fetch_all(broker: RabbitMQBroker, topic: str, expected: int) -> list[Message]:
    got: list[Message] = []
    while len(got) < expected:
        batch = await broker.fetch(topic, expected - len(got), timeout=5.0, lease=30.0)
        if not batch:
            break
        got.extend(batch)
    return got


# -- URLs, options, secrets -----------------------------------------------------------


def test_url_options_and_open_broker(amqp_url: str) -> None:
    """Query parameters set the broker's options, keywords win, aio-pika's own
    parameters pass through, and amqp:// and amqps:// open this adapter."""
    broker = open_broker(f"{amqp_url}?prefetch=50&prefix=billing.&max_deliveries=none&lease=5")
    assert isinstance(broker, RabbitMQBroker)
    assert (broker.prefetch, broker.max_deliveries, broker.queue_name("jobs")) == (
        50,
        None,
        "billing.jobs",
    )
    assert RabbitMQBroker(f"{amqp_url}?prefetch=50", prefetch=7).prefetch == 7
    assert isinstance(open_broker("amqps://user:pw@rabbit.example/vhost"), RabbitMQBroker)
    kept = RabbitMQBroker(f"{amqp_url}?heartbeat=5&prefetch=9")
    assert "heartbeat=5" in kept._url
    assert "prefetch" not in kept._url


@pytest.mark.parametrize(
    ("url", "options", "match"),
    [
        ("amqp://u:hunter2@h/?prefetch=lots", {}, "prefetch"),
        ("amqp://u:hunter2@h/", {"prefetch": 0}, "prefetch"),
        ("amqp://u:hunter2@h/", {"prefix": "amq.x"}, "reserved"),
        ("amqp://u:hunter2@h/", {"max_deliveries": 0}, "max_deliveries"),
        ("amqp://u:hunter2@h/", {"lease": -1.0}, "lease"),
        ("http://u:hunter2@h/", {}, "not an AMQP URL"),
    ],
)
def test_bad_options_are_refused_without_the_password(
    url: str, options: dict[str, Any], match: str
) -> None:
    """Bad options fail at construction with a message naming them, never the password."""
    with pytest.raises(ConfigurationError, match=match) as caught:
        RabbitMQBroker(url, **options)
    assert "hunter2" not in str(caught.value)


def test_repr_hides_the_password() -> None:
    """The password never appears in the broker's repr."""
    broker = RabbitMQBroker("amqp://guest:hunter2@127.0.0.1:5672/")
    assert "hunter2" not in repr(broker)
    assert "guest:***@" in repr(broker)


async def test_refused_connection_is_a_broker_connection_error() -> None:
    """Nobody listening: BrokerConnectionError, with the password redacted."""
    broker = RabbitMQBroker("amqp://guest:hunter2@127.0.0.1:1/", connect_timeout=2.0)
    with pytest.raises(BrokerConnectionError) as caught:
        await broker.connect()
    assert "hunter2" not in str(caught.value)
    assert "hunter2" not in repr(caught.value.to_dict())
    await broker.close()


def test_delay_levels_are_never_early_and_at_most_9_percent_late() -> None:
    """Delays round up to the grid: never below the delay, at most 9 % above it, and
    few distinct queues for jittered retries."""
    for milliseconds in [*range(1, 2000), 29_999, 30_000, 86_400_000]:
        level = delay_level(milliseconds / 1000)
        assert level >= milliseconds
        assert level <= max(milliseconds + 1, math.ceil(milliseconds * 1.0906))
    assert len({delay_level(1.0 + n / 1000) for n in range(1000)}) <= 9


# -- deliveries and attempts ----------------------------------------------------------


async def test_a_requeue_counts_a_delivery_on_a_quorum_queue(amqp_url: str, make: Maker) -> None:
    """The measurement behind hand_back: on a quorum queue (RabbitMQ 3.10) a requeue
    raises x-delivery-count and puts the message at the back, so a requeue is never a
    free hand-back; hand_back (a copy, then an ack) keeps the attempt and the id."""
    async with make() as broker:
        await broker.publish("jobs", [OutgoingMessage(b"0"), OutgoingMessage(b"1")])
        queue = broker.queue_name("jobs")
    async with raw_channel(amqp_url) as channel:
        first = await channel.basic_get(queue)
        assert (first.body, first.header.properties.headers["x-delivery-count"]) == (b"0", 0)
        await channel.basic_nack(first.delivery.delivery_tag, requeue=True)
        second = await channel.basic_get(queue)
        third = await channel.basic_get(queue)
        assert [second.body, third.body] == [b"1", b"0"]  # requeued to the back
        assert third.header.properties.headers["x-delivery-count"] == 1
        await channel.basic_nack(second.delivery.delivery_tag, requeue=True)
        await channel.basic_nack(third.delivery.delivery_tag, requeue=True)
    async with make() as broker:
        got = await fetch_all(broker, "jobs", 2)
        # b"0" was requeued twice, b"1" once: each return counted.
        assert sorted((m.body, m.attempt) for m in got) == [(b"0", 3), (b"1", 2)]
        await broker.hand_back(got)
        again = await fetch_all(broker, "jobs", 2)
        assert sorted((m.id, m.attempt) for m in again) == sorted((m.id, m.attempt) for m in got)
        await broker.ack(again)


async def test_hand_back_keeps_headers_key_and_foreign_properties(
    amqp_url: str, make: Maker
) -> None:
    """A handed-back copy keeps the id, headers, key, content type and attempt."""
    async with make() as broker:
        queue = broker.queue_name("jobs")
        await broker.publish("jobs", [])  # nothing, but declares nothing either
        await broker.publish(
            "jobs", [OutgoingMessage(b"x", key="k", headers={"trace": "t1", "x-custom": "c"})]
        )
        [first] = await fetch_all(broker, "jobs", 1)
        await broker.nack([first])
        [second] = await fetch_all(broker, "jobs", 1)
        assert second.attempt == 2
        await broker.hand_back([second])
        [third] = await fetch_all(broker, "jobs", 1)
        assert (third.id, third.key, third.attempt) == (first.id, "k", 2)
        assert third.headers == {"trace": "t1", "x-custom": "c"}
        await broker.ack([third])
    async with raw_channel(amqp_url) as channel:
        assert (await channel.queue_declare(queue, passive=True)).message_count == 0


async def test_channel_close_returns_deliveries_at_once(make: Maker) -> None:
    """Messages a closed (crashed) consumer held come back at once, long before their
    30 s lease, with the attempt counted by the quorum queue."""
    async with make() as survivor:
        doomed = make()
        await doomed.connect()
        await doomed.publish("jobs", [OutgoingMessage(str(n).encode()) for n in range(5)])
        taken = await fetch_all(doomed, "jobs", 5)
        assert len(taken) == 5
        # What a crash does: the connection goes, nothing is acked or handed back.
        assert doomed._connection is not None
        await doomed._connection.close()
        loop = asyncio.get_running_loop()
        start = loop.time()
        again = await fetch_all(survivor, "jobs", 5)
        assert loop.time() - start < SLACK
        assert sorted((m.id, m.attempt) for m in again) == sorted((m.id, 2) for m in taken)
        await survivor.ack(again)
        await doomed.close()


async def test_expired_lease_is_requeued(make: Maker) -> None:
    """This process requeues a delivery whose lease ran out, after the lease and not
    before, as attempt 2; whichever consumer RabbitMQ gives it to next (the holder's
    own prefetch window may take it back), and a late ack of the old delivery does
    nothing, nor breaks the channel."""
    async with make() as holder, make() as other:
        await holder.publish("jobs", [OutgoingMessage(b"x")])
        loop = asyncio.get_running_loop()
        [held] = await holder.fetch("jobs", 1, timeout=5.0, lease=0.4)
        leased_at = loop.time()
        results = await asyncio.gather(
            holder.fetch("jobs", 1, timeout=1.5, lease=30.0),
            other.fetch("jobs", 1, timeout=1.5, lease=30.0),
        )
        assert loop.time() - leased_at >= 0.4
        [again] = [message for batch in results for message in batch]
        assert (again.id, again.attempt) == (held.id, 2)
        await holder.ack([held])  # stale: does nothing
        assert holder._current_consumer("jobs") is not None  # the channel is fine
        await holder.ack(results[0])
        await other.ack(results[1])


async def test_attempts_carry_across_delayed_nacks(make: Maker) -> None:
    """A delayed retry republishes the message: the attempt count travels with it
    (header), and the quorum queue's count adds to it."""
    async with make() as broker:
        [message_id] = await broker.publish("jobs", [OutgoingMessage(b"x", key="k")])
        [first] = await fetch_all(broker, "jobs", 1)
        await broker.nack([first], delay=0.05)
        [second] = await fetch_all(broker, "jobs", 1)
        await broker.nack([second])  # plain requeue
        [third] = await fetch_all(broker, "jobs", 1)
        await broker.nack([third], delay=0.05)
        [fourth] = await fetch_all(broker, "jobs", 1)
        assert [m.attempt for m in (first, second, third, fourth)] == [1, 2, 3, 4]
        assert {m.id for m in (first, second, third, fourth)} == {message_id}
        assert (fourth.key, fourth.headers) == ("k", {})
        await broker.ack([fourth])


# -- acks -----------------------------------------------------------------------------


class AckSpy:
    """Records the ack frames a consumer's channel sends."""

    def __init__(self, broker: RabbitMQBroker, topic: str) -> None:
        consumer = broker._current_consumer(topic)
        assert consumer is not None
        self.frames: list[tuple[int, bool]] = []
        original = consumer.raw.basic_ack

        async def spy(tag: int, multiple: bool = False, wait: bool = True) -> None:
            self.frames.append((tag, multiple))
            await original(tag, multiple=multiple, wait=wait)

        consumer.raw.basic_ack = spy  # type: ignore[method-assign,assignment]


async def test_acks_use_multiple_for_the_run_at_the_front(make: Maker) -> None:
    """A batch acked in one call is one multiple-ack frame; a batch behind unacked
    deliveries goes out tag by tag, and the front run then is one frame again."""
    async with make() as broker:
        await broker.publish("jobs", [OutgoingMessage(str(n).encode()) for n in range(110)])
        batch = await fetch_all(broker, "jobs", 100)
        spy = AckSpy(broker, "jobs")
        await broker.ack(batch)
        assert spy.frames == [(batch[-1].receipt.tag, True)]
        rest = await fetch_all(broker, "jobs", 10)
        spy.frames.clear()
        await broker.ack(rest[5:])
        assert spy.frames == [(m.receipt.tag, False) for m in rest[5:]]
        spy.frames.clear()
        await broker.ack(rest[:5])
        assert spy.frames == [(rest[4].receipt.tag, True)]
        assert await broker.fetch("jobs", 1, timeout=0.2, lease=30.0) == []
        stats = await broker.topic_stats("jobs")
        assert (stats.ready, stats.in_flight) == (0, 0)


async def test_close_flushes_acks_and_hands_back_the_buffer(make: Maker) -> None:
    """Acks sent before close are applied; what the prefetch window brought and no
    fetch took goes back uncharged (attempt 1), not with a counted delivery."""
    async with make(prefetch=100) as broker:
        await broker.publish("jobs", [OutgoingMessage(str(n).encode()) for n in range(50)])
        first = await broker.fetch("jobs", 10, timeout=5.0, lease=30.0)
        await asyncio.sleep(0.2)  # the other 40 are in the buffer by now
        stats = await broker.topic_stats("jobs")
        assert (stats.ready, stats.in_flight) == (50 - len(first), len(first))
        await broker.ack(first)
    async with make() as broker:
        rest = await fetch_all(broker, "jobs", 50 - len(first))
        assert len(rest) == 50 - len(first)
        assert {m.attempt for m in rest} == {1}
        assert {m.body for m in rest}.isdisjoint(m.body for m in first)
        await broker.ack(rest)
        assert await broker.fetch("jobs", 1, timeout=0.2, lease=30.0) == []


# -- lost connections -----------------------------------------------------------------


async def test_lost_connection_fails_a_waiting_fetch_and_the_next_one_reconnects(
    amqp_url: str, make: Maker
) -> None:
    """A connection reset mid-wait ends the fetch with BrokerConnectionError at once;
    deliveries of the dead channel are stale (their ack does nothing) and come back
    with the attempt counted; the next fetch reconnects and gets them."""
    server = urlsplit(amqp_url)
    async with ChaosProxy(server.hostname or "127.0.0.1", server.port or 5672) as proxy:
        netloc = f"{server.username}:{server.password}@127.0.0.1:{proxy.port}"
        async with make(server._replace(netloc=netloc).geturl()) as broker:
            await broker.publish("jobs", [OutgoingMessage(b"x")])
            [held] = await fetch_all(broker, "jobs", 1)
            waiting = asyncio.create_task(broker.fetch("jobs", 1, timeout=10.0, lease=30.0))
            await asyncio.sleep(0.2)
            assert not waiting.done()
            assert proxy.cut_all() >= 1
            with pytest.raises(BrokerConnectionError) as caught:
                await waiting
            assert "guest:***@" in str(caught.value) or "guest" not in str(caught.value)
            await broker.ack([held])  # stale: the server already put it back
            [again] = await fetch_all(broker, "jobs", 1)
            assert (again.id, again.attempt) == (held.id, 2)
            await broker.ack([again])
            await broker.publish("jobs", [OutgoingMessage(b"after")])
            [after] = await fetch_all(broker, "jobs", 1)
            assert after.body == b"after"
            await broker.ack([after])


async def test_publish_to_a_deleted_queue_fails_instead_of_vanishing(
    amqp_url: str, make: Maker
) -> None:
    """Publishes are mandatory: a queue deleted behind the broker's back makes the
    publish fail with BrokerError rather than drop the message; the next publish
    declares the queue again."""
    async with make() as broker:
        await broker.publish("jobs", [OutgoingMessage(b"x")])
        async with raw_channel(amqp_url) as channel:
            await channel.queue_delete(broker.queue_name("jobs"))
        with pytest.raises(BrokerError):
            await broker.publish("jobs", [OutgoingMessage(b"lost?")])
        await broker.publish("jobs", [OutgoingMessage(b"kept")])  # declared again
        [kept] = await fetch_all(broker, "jobs", 1)
        assert kept.body == b"kept"
        await broker.ack([kept])


# -- dead letters and isolation -------------------------------------------------------


async def test_server_dead_lettered_messages_are_listed_with_a_record(
    amqp_url: str, make: Maker
) -> None:
    """A message RabbitMQ dead-letters by itself (here a reject without requeue; a
    delivery limit alike) lands in the topic's dead-letter queue, listed with a record
    made from x-death, and can be replayed."""
    async with make() as broker:
        [message_id] = await broker.publish("jobs", [OutgoingMessage(b"x", key="k")])
        await broker.dead_letters("jobs")  # declares nothing; no queue yet
        queue = broker.queue_name("jobs")
        async with raw_channel(amqp_url) as channel:
            await channel.queue_declare(queue + ".dead", durable=True)
            delivered = await channel.basic_get(queue)
            await channel.basic_reject(delivered.delivery.delivery_tag, requeue=False)
        await asyncio.sleep(0.1)
        [letter] = await broker.dead_letters("jobs")
        assert (letter.message.id, letter.message.key) == (message_id, "k")
        assert letter.error["code"] == "rabbitmq_rejected"
        assert letter.dead_lettered_at > 0
        assert await broker.replay_dead_letters("jobs") == 1
        [replayed] = await fetch_all(broker, "jobs", 1)
        assert (replayed.id, replayed.attempt) == (message_id, 1)
        await broker.ack([replayed])
        assert await broker.dead_letters("jobs") == []
    delete_queues(amqp_url, [queue + ".dead"])


async def test_prefixes_isolate_brokers(amqp_url: str, make: Maker) -> None:
    """Two prefixes on one server never see each other's messages."""
    async with make() as mine, RabbitMQBroker(amqp_url, prefix=mine.queue_name("x")) as other:
        try:
            await mine.publish("jobs", [OutgoingMessage(b"mine")])
            await other.publish("jobs", [OutgoingMessage(b"other")])
            [got] = await fetch_all(mine, "jobs", 1)
            assert got.body == b"mine"
            assert await mine.fetch("jobs", 1, timeout=0.2, lease=30.0) == []
            [theirs] = await fetch_all(other, "jobs", 1)
            assert theirs.body == b"other"
            await mine.ack([got])
            await other.ack([theirs])
        finally:
            names = other.declared_queues
    delete_queues(amqp_url, names)


async def test_foreign_messages_without_id_or_headers_are_readable(
    amqp_url: str, make: Maker
) -> None:
    """A message published by another AMQP client (no message id, odd header types)
    is delivered with an id of its own and string headers."""
    async with make() as broker:
        await broker.publish("jobs", [])
        await broker.fetch("jobs", 1, timeout=0, lease=1.0)  # declares the queue
        queue = broker.queue_name("jobs")
        async with raw_channel(amqp_url) as channel:
            await channel.basic_publish(
                b"foreign",
                routing_key=queue,
                properties=Basic.Properties(headers={"n": 5, "b": bytearray(b"raw")}),
            )
        [message] = await fetch_all(broker, "jobs", 1)
        assert message.body == b"foreign"
        assert message.headers == {"n": "5", "b": "raw"}
        assert message.id
        assert message.attempt == 1
        await broker.hand_back([message])  # the copy keeps the foreign header types
        [again] = await fetch_all(broker, "jobs", 1)
        assert (again.id, again.headers) == (message.id, {"n": "5", "b": "raw"})
        await broker.ack([again])


async def test_worker_shutdown_returns_the_rest_uncharged(make: Maker) -> None:
    """A worker stopped mid-run acks what it handled and returns everything else, its
    own buffer and the consumer's prefetch window, at once and as the same attempt:
    nothing lost, nothing twice, no attempt counted for a message nobody handled
    (quorum queues count every requeue and every return of a closed channel)."""
    async with make() as broker:
        await broker.publish("jobs", [OutgoingMessage(str(n).encode()) for n in range(1000)])
        worker = Worker(broker)
        handled: list[bytes] = []

        @worker.handler("jobs", concurrency=16)
        async def handle(message: Message) -> None:
            await asyncio.sleep(0.01)
            handled.append(message.body)

        async def stop_soon() -> None:
            await asyncio.sleep(0.5)
            worker.stop()

        async with asyncio.TaskGroup() as group:
            group.create_task(stop_soon())
            stats = await worker.run(handle_signals=False)
        assert stats.acked == len(handled) > 0
    async with make() as broker:
        rest: list[Message] = []
        # Acked as they come: a consumer leases at most `prefetch` (200) at a time.
        while batch := await broker.fetch("jobs", 100, timeout=1.0, lease=30.0):
            rest += batch
            await broker.ack(batch)
        assert sorted(handled + [m.body for m in rest]) == sorted(
            str(n).encode() for n in range(1000)
        )
        assert {m.attempt for m in rest} == {1}


async def test_a_deleted_queue_ends_the_waiting_fetch_and_the_next_one_recovers(
    amqp_url: str, make: Maker
) -> None:
    """A queue deleted under a waiting fetch (RabbitMQ cancels the consumer) ends it with
    BrokerError (code consumer_cancelled) instead of leaving it idle forever; the next
    publish and fetch declare the queue again."""
    async with make() as broker:
        await broker.publish("jobs", [OutgoingMessage(b"x")])
        [message] = await fetch_all(broker, "jobs", 1)
        await broker.ack([message])
        waiting = asyncio.create_task(broker.fetch("jobs", 1, timeout=10.0, lease=30.0))
        await asyncio.sleep(0.1)
        async with raw_channel(amqp_url) as channel:
            await channel.queue_delete(broker.queue_name("jobs"))
        with pytest.raises(BrokerError) as caught:
            await asyncio.wait_for(waiting, 2.0)
        assert caught.value.code == "consumer_cancelled"
        await broker.publish("jobs", [OutgoingMessage(b"again")])
        [again] = await fetch_all(broker, "jobs", 1)
        assert again.body == b"again"
        await broker.ack([again])


async def test_fetch_without_timeout_waits_for_a_delivery(make: Maker) -> None:
    """fetch(timeout=inf) sets no timer: it returns on the first delivery."""
    async with make() as consumer, make() as producer:

        async def publish_later() -> None:
            await asyncio.sleep(0.2)
            await producer.publish("jobs", [OutgoingMessage(b"late")])

        async with asyncio.TaskGroup() as group:
            group.create_task(publish_later())
            got = await consumer.fetch("jobs", 10, timeout=math.inf, lease=30.0)
        assert [m.body for m in got] == [b"late"]
        await consumer.ack(got)


async def test_worker_rides_out_a_dropped_connection(amqp_url: str, make: Maker) -> None:
    """Connections reset mid-run: the worker's fetch fails, it backs off, the broker
    connects again, and every message is handled; what the dead channel held comes
    back (at least once), none is lost."""
    server = urlsplit(amqp_url)
    async with ChaosProxy(server.hostname or "127.0.0.1", server.port or 5672) as proxy:
        netloc = f"{server.username}:{server.password}@127.0.0.1:{proxy.port}"
        async with make(server._replace(netloc=netloc).geturl()) as broker:
            await broker.publish("jobs", [OutgoingMessage(str(n).encode()) for n in range(600)])
            worker = Worker(broker)
            handled: set[bytes] = set()
            halfway = asyncio.Event()

            @worker.handler("jobs", concurrency=16)
            async def handle(message: Message) -> None:
                await asyncio.sleep(0.002)
                handled.add(message.body)
                if len(handled) == 300:
                    halfway.set()
                if len(handled) == 600:
                    worker.stop()

            async def cut() -> None:
                await halfway.wait()
                assert proxy.cut_all() >= 1

            async with asyncio.TaskGroup() as group:
                group.create_task(cut())
                await asyncio.wait_for(worker.run(handle_signals=False), 20.0)
        assert handled == {str(n).encode() for n in range(600)}
        assert len(proxy.attempts) >= 2  # connected again after the cut


async def test_a_zero_timeout_fetch_gets_what_is_ready(make: Maker) -> None:
    """fetch(timeout=0) on a new consumer returns the ready messages still on their way
    to its buffer (it asks the queue first), and [] at once on an empty queue."""
    async with make() as producer, make() as consumer:
        await producer.publish("jobs", [OutgoingMessage(str(n).encode()) for n in range(5)])
        got = await consumer.fetch("jobs", 10, timeout=0, lease=30.0)
        while len(got) < 5:
            more = await consumer.fetch("jobs", 10, timeout=0, lease=30.0)
            assert more
            got += more
        await consumer.ack(got)
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await consumer.fetch("jobs", 10, timeout=0, lease=30.0) == []
        assert loop.time() - start < 0.2
