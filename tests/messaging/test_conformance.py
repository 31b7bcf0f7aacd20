"""The conformance suite: every broker adapter must pass it (cases in ``conftest.py``).

Tests branch on ``broker.capabilities``, never on the adapter's name. Timings use
short leases and delays (0.2-0.5 s) and accept being up to ``SLACK`` seconds late, so
the same test holds on the virtual clock (memory, SQLite) and on real time (servers);
"not before" is always checked exactly.
"""

from __future__ import annotations

import asyncio

import pytest

from headrace import Clock, ClosedResourceError, ConfigurationError, HeadraceError
from headrace.messaging import Broker, Message, OutgoingMessage, TopicStats

from .conftest import BrokerCase

# How late a real-time wake-up may be (scheduling, polling, a busy shared machine).
SLACK = 0.5


def out(*bodies: bytes, **fields: object) -> list[OutgoingMessage]:
    return [OutgoingMessage(body, **fields) for body in bodies]  # type: ignore[arg-type]


def numbered(count: int) -> list[OutgoingMessage]:
    return [OutgoingMessage(str(n).encode()) for n in range(count)]


async def fetch_all(broker: Broker, topic: str, expected: int, *, lease: float = 30.0) -> list:
    """Fetch until ``expected`` messages arrived (or 5 s passed without one)."""
    got: list[Message] = []
    while len(got) < expected:
        batch = await broker.fetch(topic, expected - len(got), timeout=5.0, lease=lease)
        if not batch:
            break
        got.extend(batch)
    return got


async def test_publish_returns_ids_and_fetch_delivers_fields(broker_case: BrokerCase) -> None:
    """publish returns one distinct id per message; fetch gives body, headers, key, attempt 1."""
    async with broker_case.open() as broker:
        ids = await broker.publish(
            "jobs",
            [
                OutgoingMessage(b"one", key="k1", headers={"trace": "abc"}),
                OutgoingMessage(b"two"),
            ],
        )
        assert len(ids) == 2
        assert len(set(ids)) == 2
        assert all(isinstance(i, str) and i for i in ids)
        got = await fetch_all(broker, "jobs", 2)
        by_id = {m.id: m for m in got}
        assert set(by_id) == set(ids)
        first = by_id[ids[0]]
        assert (first.topic, first.body, first.key, first.attempt) == ("jobs", b"one", "k1", 1)
        assert first.headers.get("trace") == "abc"
        second = by_id[ids[1]]
        assert (second.body, second.key, second.attempt) == (b"two", None, 1)
        await broker.ack(got)


async def test_bodies_and_headers_round_trip(broker_case: BrokerCase) -> None:
    """Empty, binary (not UTF-8) and 1 MiB bodies and unicode headers and keys come back
    byte for byte."""
    bodies = [b"", bytes(range(256)) * 4, b"\x00\xff" * (512 * 1024)]
    headers = {"trace-id": "\u6f22\u5b57 \u2713", "empty": ""}
    async with broker_case.open() as broker:
        limit = broker.capabilities.max_message_bytes
        if limit is not None and limit <= len(bodies[-1]):
            # NATS: max_payload (1 MiB here) bounds body and headers together.
            bodies[-1] = bodies[-1][: limit - 4096]
        ids = await broker.publish(
            "jobs", [OutgoingMessage(body, key="\u30ad\u30fc", headers=headers) for body in bodies]
        )
        got = {m.id: m for m in await fetch_all(broker, "jobs", 3)}
        assert [got[i].body for i in ids] == bodies
        assert all(got[i].key == "\u30ad\u30fc" for i in ids)
        assert all({k: got[i].headers.get(k) for k in headers} == headers for i in ids)
        await broker.ack(list(got.values()))


async def test_publish_of_nothing_returns_no_ids(broker_case: BrokerCase) -> None:
    """publish with an empty batch is a no-op returning []."""
    async with broker_case.open() as broker:
        assert await broker.publish("jobs", []) == []
        assert await broker.fetch("jobs", 10, timeout=0, lease=1.0) == []


async def test_topics_are_separate(broker_case: BrokerCase) -> None:
    """A message published to one topic is never fetched from another."""
    async with broker_case.open() as broker:
        await broker.publish("a", out(b"for-a"))
        assert await broker.fetch("b", 10, timeout=0.1, lease=1.0) == []
        [message] = await broker.fetch("a", 10, timeout=1.0, lease=1.0)
        assert message.body == b"for-a"
        await broker.ack([message])


async def test_fetch_respects_max_messages(broker_case: BrokerCase) -> None:
    """fetch never returns more than max_messages, and the rest stay for the next fetch."""
    async with broker_case.open() as broker:
        await broker.publish("jobs", numbered(10))
        first = await broker.fetch("jobs", 3, timeout=1.0, lease=30.0)
        assert 1 <= len(first) <= 3
        rest = await fetch_all(broker, "jobs", 10 - len(first))
        assert len(first) + len(rest) == 10
        assert {m.id for m in first}.isdisjoint(m.id for m in rest)
        await broker.ack(first + rest)


async def test_ordered_delivery(broker_case: BrokerCase) -> None:
    """Where the broker promises order, one consumer sees a topic in publish order."""
    async with broker_case.open() as broker:
        if not broker.capabilities.ordered:
            pytest.skip("adapter does not promise ordering")
        await broker.publish("jobs", numbered(30))
        bodies: list[bytes] = []
        while len(bodies) < 30:
            batch = await broker.fetch("jobs", 7, timeout=1.0, lease=30.0)
            assert batch
            bodies.extend(m.body for m in batch)
            await broker.ack(batch)
        assert bodies == [str(n).encode() for n in range(30)]


async def test_empty_fetch_waits_for_timeout(broker_case: BrokerCase, clock: Clock) -> None:
    """fetch on an empty topic returns [] after its timeout, not before."""
    async with broker_case.open() as broker:
        start = clock.now()
        assert await broker.fetch("jobs", 10, timeout=0.3, lease=1.0) == []
        assert 0.3 <= clock.now() - start < 0.3 + SLACK


async def test_waiting_fetch_wakes_on_publish(broker_case: BrokerCase, clock: Clock) -> None:
    """A fetch waiting on an empty topic returns soon after a publish, before its timeout."""
    async with broker_case.open() as consumer, broker_case.open() as producer:
        start = clock.now()

        async def publish_later() -> None:
            await asyncio.sleep(0.2)
            await producer.publish("jobs", out(b"late"))

        async with asyncio.TaskGroup() as group:
            group.create_task(publish_later())
            got = await consumer.fetch("jobs", 10, timeout=10.0, lease=30.0)
        assert [m.body for m in got] == [b"late"]
        assert 0.2 <= clock.now() - start < 0.2 + SLACK
        await consumer.ack(got)


async def test_ack_removes_for_good(broker_case: BrokerCase) -> None:
    """An acked message is not delivered again, even after its lease would have expired."""
    async with broker_case.open() as broker:
        await broker.publish("jobs", out(b"x"))
        got = await broker.fetch("jobs", 1, timeout=1.0, lease=0.2)
        await broker.ack(got)
        assert await broker.fetch("jobs", 10, timeout=0.5, lease=1.0) == []


async def test_batch_ack(broker_case: BrokerCase) -> None:
    """One ack call with a whole batch removes every message of it."""
    async with broker_case.open() as broker:
        await broker.publish("jobs", numbered(50))
        got = await fetch_all(broker, "jobs", 50, lease=0.2)
        assert len(got) == 50
        await broker.ack(got)
        assert await broker.fetch("jobs", 100, timeout=0.5, lease=1.0) == []


async def test_lease_expiry_redelivers_with_next_attempt(
    broker_case: BrokerCase, clock: Clock
) -> None:
    """An unacked message comes back after its lease, not before, as attempt 2."""
    async with broker_case.open() as broker:
        [message_id] = await broker.publish("jobs", out(b"x"))
        [first] = await broker.fetch("jobs", 1, timeout=1.0, lease=0.3)
        leased_at = clock.now()
        assert (first.id, first.attempt) == (message_id, 1)
        assert await broker.fetch("jobs", 1, timeout=0.1, lease=0.3) == []
        [second] = await broker.fetch("jobs", 1, timeout=2.0, lease=30.0)
        assert clock.now() - leased_at >= 0.3
        assert (second.id, second.body, second.attempt) == (message_id, b"x", 2)
        await broker.ack([second])


async def test_stale_delivery_cannot_release_a_new_lease(broker_case: BrokerCase) -> None:
    """After redelivery, the old delivery's nack/hand_back does not free the new lease."""
    async with broker_case.open() as broker:
        await broker.publish("jobs", out(b"x"))
        [old] = await broker.fetch("jobs", 1, timeout=1.0, lease=0.2)
        [new] = await broker.fetch("jobs", 1, timeout=2.0, lease=30.0)
        assert new.id == old.id
        await broker.nack([old])
        await broker.hand_back([old])
        assert await broker.fetch("jobs", 1, timeout=0.3, lease=30.0) == []
        await broker.ack([new])


async def test_nack_without_delay_redelivers_at_once(broker_case: BrokerCase) -> None:
    """nack() makes the message ready again immediately, with the attempt counted."""
    async with broker_case.open() as broker:
        await broker.publish("jobs", out(b"x"))
        [first] = await broker.fetch("jobs", 1, timeout=1.0, lease=30.0)
        await broker.nack([first])
        [second] = await broker.fetch("jobs", 1, timeout=1.0, lease=30.0)
        assert (second.id, second.attempt) == (first.id, 2)
        await broker.ack([second])


async def test_nack_delay_is_respected(broker_case: BrokerCase, clock: Clock) -> None:
    """nack(delay) holds the message back for delay seconds, then delivers attempt 2."""
    async with broker_case.open() as broker:
        if not broker.capabilities.delayed_nack:
            pytest.skip("adapter has no delayed nack")
        await broker.publish("jobs", out(b"x"))
        [first] = await broker.fetch("jobs", 1, timeout=1.0, lease=30.0)
        nacked_at = clock.now()
        await broker.nack([first], delay=0.4)
        assert await broker.fetch("jobs", 1, timeout=0.1, lease=30.0) == []
        [second] = await broker.fetch("jobs", 1, timeout=3.0, lease=30.0)
        waited = clock.now() - nacked_at
        assert 0.4 <= waited < 0.4 + SLACK
        assert (second.id, second.attempt) == (first.id, 2)
        await broker.ack([second])


async def test_delayed_publish(broker_case: BrokerCase, clock: Clock) -> None:
    """A message published with delay is not delivered before the delay passed."""
    async with broker_case.open() as broker:
        if not broker.capabilities.delayed_nack:
            pytest.skip("adapter has no delayed delivery")
        start = clock.now()
        await broker.publish("jobs", out(b"later", delay=0.3))
        assert await broker.fetch("jobs", 1, timeout=0.1, lease=30.0) == []
        [message] = await broker.fetch("jobs", 1, timeout=3.0, lease=30.0)
        assert 0.3 <= clock.now() - start < 0.3 + SLACK
        await broker.ack([message])


async def test_hand_back_is_immediate(broker_case: BrokerCase, clock: Clock) -> None:
    """hand_back returns messages at once; free of an attempt where the flag says so."""
    async with broker_case.open() as broker:
        await broker.publish("jobs", numbered(3))
        got = await fetch_all(broker, "jobs", 3, lease=30.0)
        start = clock.now()
        await broker.hand_back(got)
        again = await fetch_all(broker, "jobs", 3, lease=30.0)
        assert clock.now() - start < SLACK
        assert sorted(m.id for m in again) == sorted(m.id for m in got)
        expected = 2 if broker.capabilities.handback_costs_attempt else 1
        assert {m.attempt for m in again} == {expected}
        if broker.capabilities.ordered:
            assert [m.body for m in again] == [b"0", b"1", b"2"]
        await broker.ack(again)


async def test_extend_lease_prevents_redelivery(broker_case: BrokerCase, clock: Clock) -> None:
    """extend_lease keeps a message from being re-delivered past its first lease."""
    async with broker_case.open() as broker:
        if not broker.capabilities.lease_extension:
            pytest.skip("adapter cannot extend leases")
        await broker.publish("jobs", out(b"x"))
        [message] = await broker.fetch("jobs", 1, timeout=1.0, lease=0.3)
        await broker.extend_lease([message], 2.0)
        assert await broker.fetch("jobs", 1, timeout=0.8, lease=30.0) == []
        await broker.ack([message])


async def test_dead_letter_stores_message_and_error(broker_case: BrokerCase) -> None:
    """dead_letter removes the message and keeps it with its JSON error record."""
    async with broker_case.open() as broker:
        [message_id] = await broker.publish(
            "jobs", [OutgoingMessage(b"poison", key="k", headers={"h": "v"})]
        )
        [message] = await broker.fetch("jobs", 1, timeout=1.0, lease=30.0)
        try:
            raise ValueError("bad payload")
        except ValueError as exc:
            error = HeadraceError.wrap(exc, code="handler_failed").to_dict()
        await broker.dead_letter(message, error)
        assert await broker.fetch("jobs", 1, timeout=0.1, lease=30.0) == []
        [letter] = await broker.dead_letters("jobs")
        assert letter.message.id == message_id
        assert (letter.message.body, letter.message.key) == (b"poison", "k")
        assert letter.message.headers.get("h") == "v"
        assert letter.error == error
        assert letter.error["code"] == "handler_failed"
        assert "bad payload" in letter.error["traceback"]
        assert isinstance(letter.dead_lettered_at, float)


async def test_dead_letter_refuses_non_json_error(broker_case: BrokerCase) -> None:
    """An error record JSON cannot hold is refused and the message stays leased."""
    async with broker_case.open() as broker:
        await broker.publish("jobs", out(b"x"))
        [message] = await broker.fetch("jobs", 1, timeout=1.0, lease=30.0)
        with pytest.raises(ConfigurationError, match="JSON"):
            await broker.dead_letter(message, {"bad": object()})
        assert await broker.dead_letters("jobs") == []
        await broker.ack([message])


async def test_dead_letters_newest_first_with_limit(broker_case: BrokerCase) -> None:
    """dead_letters lists the newest first and at most limit."""
    async with broker_case.open() as broker:
        ids = await broker.publish("jobs", numbered(3))
        got = await fetch_all(broker, "jobs", 3)
        by_id = {m.id: m for m in got}
        for message_id in ids:
            await broker.dead_letter(by_id[message_id], {"code": f"e{message_id}"})
        letters = await broker.dead_letters("jobs", limit=2)
        assert [d.message.id for d in letters] == [ids[2], ids[1]]


async def test_max_deliveries_dead_letters_a_crash_loop(broker_case: BrokerCase) -> None:
    """A message whose lease expired max_deliveries times is dead-lettered by the broker."""
    async with broker_case.open(max_deliveries=2) as broker:
        [message_id] = await broker.publish("jobs", out(b"crash"))
        [first] = await broker.fetch("jobs", 1, timeout=1.0, lease=0.2)
        [second] = await broker.fetch("jobs", 1, timeout=2.0, lease=0.2)
        assert (first.attempt, second.attempt) == (1, 2)
        assert await broker.fetch("jobs", 1, timeout=1.0, lease=0.2) == []
        [letter] = await broker.dead_letters("jobs")
        assert letter.message.id == message_id
        assert letter.message.body == b"crash"
        assert letter.error["code"] == "max_deliveries_exceeded"


async def test_replay_dead_letters(broker_case: BrokerCase) -> None:
    """replay publishes chosen dead letters again (attempt 1) and removes them from the store."""
    async with broker_case.open() as broker:
        ids = await broker.publish("jobs", numbered(3))
        got = await fetch_all(broker, "jobs", 3)
        for message in got:
            await broker.dead_letter(message, {"code": "failed"})
        by_body = {m.body: m.id for m in got}
        assert await broker.replay_dead_letters("jobs", [by_body[b"0"], by_body[b"2"]]) == 2
        replayed = await fetch_all(broker, "jobs", 2)
        assert sorted(m.body for m in replayed) == [b"0", b"2"]
        assert {m.attempt for m in replayed} == {1}
        await broker.ack(replayed)
        assert [d.message.id for d in await broker.dead_letters("jobs")] == [ids[1]]
        assert await broker.replay_dead_letters("jobs") == 1
        assert await broker.dead_letters("jobs") == []
        [last] = await fetch_all(broker, "jobs", 1)
        assert last.body == b"1"
        await broker.ack([last])


async def test_concurrent_consumers_never_share_a_message(broker_case: BrokerCase) -> None:
    """4 concurrent fetchers on 2 connections over 500 messages: each id exactly once."""
    async with broker_case.open() as one, broker_case.open() as two:
        ids = []
        for _ in range(5):
            ids += await one.publish("jobs", numbered(100))
        seen: list[str] = []

        async def consume(broker: Broker) -> None:
            while True:
                batch = await broker.fetch("jobs", 10, timeout=0.3, lease=30.0)
                if not batch:
                    return
                seen.extend(m.id for m in batch)
                await asyncio.sleep(0)
                await broker.ack(batch)

        async with asyncio.TaskGroup() as group:
            for broker in (one, two, one, two):
                group.create_task(consume(broker))
        assert len(seen) == 500
        assert sorted(seen) == sorted(ids)


async def test_at_least_once_after_a_consumer_dies(broker_case: BrokerCase) -> None:
    """Messages a consumer fetched and never acked reach another consumer after the lease."""
    async with broker_case.open() as survivor:
        async with broker_case.open() as doomed:
            ids = await doomed.publish("jobs", numbered(5))
            taken = await fetch_all(doomed, "jobs", 5, lease=0.3)
            assert len(taken) == 5
        # doomed closed without acking or handing back: like a crash.
        again = await fetch_all(survivor, "jobs", 5, lease=30.0)
        assert sorted(m.id for m in again) == sorted(ids)
        assert {m.attempt for m in again} == {2}
        await survivor.ack(again)


async def test_persistent_messages_survive_reopen(broker_case: BrokerCase) -> None:
    """Where the broker is persistent, a new broker on the same store sees old messages."""
    async with broker_case.open() as first:
        if not first.capabilities.persistent:
            pytest.skip("adapter is not persistent")
        await first.publish("jobs", out(b"kept"))
    async with broker_case.open() as second:
        [message] = await second.fetch("jobs", 1, timeout=1.0, lease=30.0)
        assert message.body == b"kept"
        await second.ack([message])


@pytest.mark.parametrize("yields", [0, 1, 3])
async def test_cancelled_fetch_parks_nothing(
    broker_case: BrokerCase, clock: Clock, yields: int
) -> None:
    """A fetch cancelled mid-flight leaves no message leased: all come back at once,
    without an attempt charged (not after the 30 s lease)."""
    async with broker_case.open() as broker:
        await broker.publish("jobs", numbered(3))
        task = asyncio.create_task(broker.fetch("jobs", 3, timeout=5.0, lease=30.0))
        for _ in range(yields + 1):
            await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        else:  # the fetch finished first: its caller hands the messages back
            await broker.hand_back(task.result())
        start = clock.now()
        got = await fetch_all(broker, "jobs", 3, lease=30.0)
        assert clock.now() - start < SLACK
        assert sorted((m.body, m.attempt) for m in got) == [(b"0", 1), (b"1", 1), (b"2", 1)]
        await broker.ack(got)


async def test_use_after_close_raises(broker_case: BrokerCase) -> None:
    """Every operation on a closed broker raises ClosedResourceError; close is idempotent."""
    async with broker_case.open() as broker:
        await broker.publish("jobs", out(b"x"))
        [message] = await broker.fetch("jobs", 1, timeout=1.0, lease=30.0)
    await broker.close()
    operations = [
        broker.publish("jobs", out(b"y")),
        broker.fetch("jobs", 1, timeout=0, lease=1.0),
        broker.ack([message]),
        broker.nack([message]),
        broker.hand_back([message]),
        broker.extend_lease([message], 1.0),
        broker.dead_letter(message, {"code": "x"}),
        broker.dead_letters("jobs"),
        broker.replay_dead_letters("jobs"),
    ]
    for operation in operations:
        with pytest.raises(ClosedResourceError):
            await operation


async def test_close_ends_a_waiting_fetch(broker_case: BrokerCase, clock: Clock) -> None:
    """A fetch waiting on the broker when it closes ends promptly with ClosedResourceError."""
    broker = broker_case.make()
    await broker.connect()
    start = clock.now()

    async def close_later() -> None:
        await asyncio.sleep(0.2)
        await broker.close()

    async with asyncio.TaskGroup() as group:
        group.create_task(close_later())
        with pytest.raises(ClosedResourceError):
            await broker.fetch("jobs", 1, timeout=30.0, lease=1.0)
    assert clock.now() - start < 0.2 + SLACK


@pytest.mark.parametrize(
    ("max_messages", "timeout", "lease"),
    [(0, 1.0, 1.0), (1, -1.0, 1.0), (1, 1.0, 0.0), (1, 1.0, float("nan")), (True, 1.0, 1.0)],
)
async def test_fetch_rejects_bad_arguments(
    broker_case: BrokerCase, max_messages: int, timeout: float, lease: float
) -> None:
    """fetch with a non-positive size, a negative timeout or a bad lease is a ConfigurationError."""
    async with broker_case.open() as broker:
        with pytest.raises(ConfigurationError):
            await broker.fetch("jobs", max_messages, timeout=timeout, lease=lease)


async def test_publish_rejects_non_bytes_body(broker_case: BrokerCase) -> None:
    """A str body is refused with InvalidMessage, nothing is stored."""
    from headrace import InvalidMessage

    async with broker_case.open() as broker:
        with pytest.raises(InvalidMessage, match="bytes"):
            await broker.publish("jobs", [OutgoingMessage("text")])  # type: ignore[arg-type]
        assert await broker.fetch("jobs", 1, timeout=0, lease=1.0) == []


async def test_topic_stats_count_where_messages_are(broker_case: BrokerCase) -> None:
    """topic_stats counts ready, delayed (publish delay and delayed nack), in-flight and
    dead-lettered messages, per topic; an unknown topic is all zeros."""
    async with broker_case.open() as broker:
        assert await broker.topic_stats("jobs") == TopicStats("jobs", 0, 0, 0, 0)
        await broker.publish("jobs", numbered(4))
        await broker.publish("jobs", out(b"later", delay=60.0))
        await broker.publish("other", numbered(2))
        fetched = await fetch_all(broker, "jobs", 3)
        assert len(fetched) == 3
        stats = await broker.topic_stats("jobs")
        assert stats == TopicStats("jobs", ready=1, delayed=1, in_flight=3, dead_letters=0)
        assert stats.stored == 5
        await broker.nack([fetched[0]], delay=30.0)
        await broker.dead_letter(fetched[1], {"code": "bad"})
        stats = await broker.topic_stats("jobs")
        assert stats == TopicStats("jobs", ready=1, delayed=2, in_flight=1, dead_letters=1)
        assert await broker.topic_stats("other") == TopicStats("other", 2, 0, 0, 0)
        await broker.ack([fetched[2]])
        assert (await broker.topic_stats("jobs")).in_flight == 0
