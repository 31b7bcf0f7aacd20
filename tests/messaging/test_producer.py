"""Producer: batched publishing, and close() that accounts for every message."""

from __future__ import annotations

import gc
from collections.abc import Sequence

import pytest

from headrace import (
    BrokerConnectionError,
    Clock,
    ClosedResourceError,
    InvalidMessage,
    PublishError,
    Retry,
)
from headrace.messaging import MemoryBroker, OutgoingMessage
from headrace.messaging._producer import Producer, ProducerCloseError


class FlakyBroker(MemoryBroker):
    """A real MemoryBroker whose publish to topic "down" always fails, and which records
    batch sizes and publish times."""

    def __init__(self, clock: Clock, fail_first: int = 0) -> None:
        super().__init__(clock=clock)
        self.clock = clock
        self.batches: list[tuple[str, int, float]] = []
        self.fail_first = fail_first

    async def publish(self, topic: str, messages: Sequence[OutgoingMessage]) -> list[str]:
        self.batches.append((topic, len(messages), self.clock.now()))
        if topic == "down":
            raise BrokerConnectionError("broker unreachable")
        if self.fail_first > 0:
            self.fail_first -= 1
            raise BrokerConnectionError("blip")
        return await super().publish(topic, messages)


async def test_close_drains_everything_and_reports_it(clock: Clock) -> None:
    """10k publishes then close(): every message confirmed and stored (R7, success)."""
    broker = FlakyBroker(clock)
    producer = Producer(broker, batch_size=500)
    for i in range(10_000):
        await producer.publish("jobs", {"n": i})
    report = await producer.close()
    assert (report.published, report.confirmed, report.failed) == (10_000, 10_000, 0)
    stored = await broker.fetch("jobs", 20_000, timeout=0, lease=60)
    assert len(stored) == 10_000
    assert stored[0].json() == {"n": 0}
    assert max(size for _, size, _ in broker.batches) == 500


async def test_close_reports_every_failure(clock: Clock) -> None:
    """Messages the broker never confirmed are reported by close(), none dropped (R7)."""
    broker = FlakyBroker(clock)
    producer = Producer(broker, retry=Retry(max_attempts=3, initial_delay=0.1, jitter="none"))
    for i in range(300):
        await producer.publish("down" if i % 3 == 0 else "jobs", str(i))
    with pytest.raises(ProducerCloseError) as info:
        await producer.close()
    report = info.value.report
    assert (report.published, report.confirmed, report.failed) == (300, 200, 100)
    assert sorted(int(f.message.body) for f in report.failures) == list(range(0, 300, 3))
    assert all(f.error.code == "publish_failed" for f in report.failures)
    assert all(isinstance(f.error.__cause__, BrokerConnectionError) for f in report.failures)
    # Interleaved topics still go out in full batches, one topic per broker call.
    assert [size for topic, size, _ in broker.batches if topic == "jobs"] == [200]
    assert info.value.context["failed"] == 100
    assert len(await broker.fetch("jobs", 1000, timeout=0, lease=60)) == 200


async def test_transient_failures_are_retried_with_backoff(clock: Clock) -> None:
    """A batch that fails twice is retried after 0.1 s and 0.2 s, then confirmed."""
    broker = FlakyBroker(clock, fail_first=2)
    producer = Producer(broker, retry=Retry(max_attempts=5, initial_delay=0.1, jitter="none"))
    message_id = await producer.publish_and_wait("jobs", b"x")
    assert [t for _, _, t in broker.batches] == [0.0, 0.1, pytest.approx(0.3)]
    report = await producer.close()
    assert (report.confirmed, report.failed) == (1, 0)
    [stored] = await broker.fetch("jobs", 10, timeout=0, lease=60)
    assert stored.id == message_id


async def test_publish_and_wait_raises_the_failure(clock: Clock) -> None:
    """publish_and_wait surfaces the failure to its caller too."""
    producer = Producer(FlakyBroker(clock), retry=Retry(max_attempts=1))
    with pytest.raises(PublishError) as info:
        await producer.publish_and_wait("down", b"x")
    assert isinstance(info.value.__cause__, BrokerConnectionError)
    report = await producer.close(raise_on_failure=False)
    assert report.failed == 1


async def test_bodies_are_bytes_text_or_json(clock: Clock) -> None:
    """bytes pass through, str is UTF-8, other values are JSON; others are refused."""
    broker = MemoryBroker(clock=clock)
    async with Producer(broker) as producer:
        await producer.publish("t", b"\x00raw")
        await producer.publish("t", "héllo", key="k1", headers={"h": "v"})
        await producer.publish("t", [1, {"a": None}])
        with pytest.raises(InvalidMessage, match="object"):
            await producer.publish("t", object())
    stored = await broker.fetch("t", 10, timeout=0, lease=60)
    assert [m.body for m in stored] == [b"\x00raw", "héllo".encode(), b'[1,{"a":null}]']
    assert (stored[1].key, stored[1].headers) == ("k1", {"h": "v"})


async def test_backpressure_bounds_the_queue(clock: Clock) -> None:
    """With max_pending=10, publish waits instead of queueing more than 10."""
    broker = MemoryBroker(clock=clock)
    producer = Producer(broker, max_pending=10, batch_size=4)
    peak = 0
    for i in range(100):
        await producer.publish("t", str(i))
        peak = max(peak, producer.pending)
    assert peak <= 10
    assert (await producer.close()).confirmed == 100


async def test_publish_after_close_is_refused(clock: Clock) -> None:
    """A closed producer refuses new messages."""
    producer = Producer(MemoryBroker(clock=clock))
    await producer.publish("t", b"x")
    await producer.close()
    with pytest.raises(ClosedResourceError):
        await producer.publish("t", b"y")


async def test_unclosed_producer_warns(clock: Clock) -> None:
    """A producer garbage-collected without close() emits ResourceWarning."""

    def abandon() -> None:
        Producer(MemoryBroker(clock=clock))  # dropped at once, never closed
        gc.collect()

    with pytest.warns(ResourceWarning, match="unclosed"):
        abandon()
