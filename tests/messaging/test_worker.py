"""The Worker on the in-memory broker, on the virtual clock: exact retry and shutdown times."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
from collections.abc import Sequence
from typing import Any

import msgspec
import pytest

from headrace import Clock, ConfigurationError, HeadraceError, InvalidMessage, Retry
from headrace._ratelimit import TokenBucket
from headrace.messaging import MemoryBroker, Message, OutgoingMessage
from headrace.messaging._idempotency import MemoryIdempotencyStore
from headrace.messaging._worker import Worker, worker_retryable

NO_JITTER = Retry(max_attempts=3, initial_delay=1.0, multiplier=2.0, jitter="none",
                  retry_on=lambda exc: True)  # fmt: skip


class SpyBroker(MemoryBroker):
    """A real MemoryBroker that also records the batch sizes it was asked for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fetch_sizes: list[int] = []
        self.ack_sizes: list[int] = []
        self.handed_back: list[tuple[float, list[str]]] = []

    async def fetch(
        self, topic: str, max_messages: int, *, timeout: float, lease: float | None = None
    ) -> list[Message]:
        self.fetch_sizes.append(max_messages)
        return await super().fetch(topic, max_messages, timeout=timeout, lease=lease)

    async def ack(self, messages: Sequence[Message]) -> None:
        self.ack_sizes.append(len(messages))
        await super().ack(messages)

    async def hand_back(self, messages: Sequence[Message]) -> None:
        loop = asyncio.get_running_loop()
        self.handed_back.append((loop.time(), [m.id for m in messages]))
        await super().hand_back(messages)


async def publish(broker: MemoryBroker, topic: str, bodies: list[bytes], **kw: Any) -> list[str]:
    return await broker.publish(topic, [OutgoingMessage(body, **kw) for body in bodies])


async def remaining(broker: MemoryBroker, topic: str) -> list[Message]:
    """Everything still deliverable in ``topic`` (leased away, so call it last)."""
    return await broker.fetch(topic, 10_000, timeout=0, lease=1000)


async def test_default_prefetch_tops_the_fetch_up_to_the_ack_batch(clock: Clock) -> None:
    """By default a fetch asks for free slots + prefetch = ack_batch messages."""
    broker = SpyBroker(max_deliveries=None, clock=clock)
    await publish(broker, "jobs", [b"x"] * 30)
    worker = Worker(broker, clock=clock, ack_batch=20)

    @worker.handler("jobs", concurrency=8)
    async def handle(message: Message) -> None:
        await asyncio.sleep(0.01)

    stats = await worker.run(exit_when_idle=1.0, handle_signals=False)
    assert broker.fetch_sizes[0] == 20
    assert (stats.handled, stats.acked) == (30, 30)


async def test_handles_and_acks_every_message(clock: Clock) -> None:
    """Every message is handled once and acked; nothing is left in the broker."""
    broker = SpyBroker(max_deliveries=None, clock=clock)
    await publish(broker, "jobs", [str(i).encode() for i in range(250)])
    worker = Worker(broker, clock=clock, ack_batch=100, ack_interval=0.5)
    seen: list[bytes] = []

    @worker.handler("jobs", concurrency=8, prefetch=0)
    async def handle(message: Message) -> None:
        await asyncio.sleep(0.01)
        seen.append(message.body)

    stats = await worker.run(exit_when_idle=1.0, handle_signals=False)
    assert sorted(seen) == sorted(str(i).encode() for i in range(250))
    assert (stats.handled, stats.acked, stats.failed, stats.handed_back) == (250, 250, 0, 0)
    assert broker.fetch_sizes[0] == 8
    assert max(broker.fetch_sizes) == 8
    assert sum(broker.ack_sizes) == 250
    assert max(broker.ack_sizes) == 100
    assert await remaining(broker, "jobs") == []


async def test_slow_handlers_fan_out_to_every_slot_at_once(clock: Clock) -> None:
    """Slots wake one after another, but all within the same instant: 8 slow handlers
    all start at t=0 and run together."""
    broker = MemoryBroker(max_deliveries=None, clock=clock)
    await publish(broker, "jobs", [str(i).encode() for i in range(16)])
    worker = Worker(broker, clock=clock)
    starts: list[float] = []
    running = peak = 0

    @worker.handler("jobs", concurrency=8)
    async def handle(message: Message) -> None:
        nonlocal running, peak
        starts.append(clock.now())
        running += 1
        peak = max(peak, running)
        await clock.sleep(1.0)
        running -= 1

    stats = await worker.run(exit_when_idle=1.0, handle_signals=False)
    assert stats.handled == 16
    assert sorted(starts) == [0.0] * 8 + [1.0] * 8
    assert peak == 8


async def test_instant_handlers_drain_a_batch_in_one_slot(clock: Clock) -> None:
    """Handlers that never suspend are run back to back by the first slot woken, not
    one task switch per message: a few slot tasks for 4 batches of 50, not 50."""
    broker = MemoryBroker(max_deliveries=None, clock=clock)
    await publish(broker, "jobs", [str(i).encode() for i in range(200)])
    worker = Worker(broker, clock=clock)
    tasks: set[asyncio.Task[Any] | None] = set()

    @worker.handler("jobs", concurrency=50)
    async def handle(message: Message) -> None:
        tasks.add(asyncio.current_task())

    stats = await worker.run(exit_when_idle=1.0, handle_signals=False)
    assert (stats.handled, stats.acked) == (200, 200)
    assert 1 <= len(tasks) <= 5  # per batch: the slot woken, and the one it woke


async def test_retries_use_delayed_nack_at_exact_backoff_times(clock: Clock) -> None:
    """A failing handler is retried after 1 s, then 2 s (the policy's backoff), not slept."""
    broker = MemoryBroker(max_deliveries=None, clock=clock)
    await publish(broker, "jobs", [b"flaky"])
    worker = Worker(broker, clock=clock, fetch_timeout=10.0)
    attempts: list[tuple[float, int]] = []

    @worker.handler("jobs", retry=NO_JITTER)
    async def handle(message: Message) -> None:
        attempts.append((clock.now(), message.attempt))
        if message.attempt < 3:
            raise ConnectionError("flaky downstream")

    stats = await worker.run(exit_when_idle=5.0, handle_signals=False)
    assert attempts == [(0.0, 1), (1.0, 2), (3.0, 3)]
    assert (stats.retried, stats.handled, stats.dead_lettered) == (2, 1, 0)


async def test_dead_letters_after_max_attempts_with_the_error_record(clock: Clock) -> None:
    """After max_attempts, the message is dead-lettered with a kind="bug" error record."""
    broker = MemoryBroker(max_deliveries=None, clock=clock)
    [message_id] = await publish(broker, "jobs", [b"poison"])
    worker = Worker(broker, clock=clock)

    @worker.handler("jobs", retry=NO_JITTER)
    async def handle(message: Message) -> None:
        raise KeyError("missing field")

    stats = await worker.run(exit_when_idle=5.0, handle_signals=False)
    assert (stats.failed, stats.retried, stats.dead_lettered) == (3, 2, 1)
    [dead] = await broker.dead_letters("jobs")
    assert dead.message.id == message_id
    assert dead.message.attempt == 3
    error = dead.error
    assert error["code"] == "internal_error"
    assert error["kind"] == "bug"
    assert error["reason"] == "max_attempts"
    assert error["attempt"] == 3
    assert len(error["error_id"]) == 32
    assert "KeyError" in error["traceback"]
    assert error["cause"]["type"] == "builtins.KeyError"


async def test_non_transient_headrace_error_is_dead_lettered_at_once(clock: Clock) -> None:
    """The default policy does not retry a HeadraceError that says it is not transient."""
    broker = MemoryBroker(max_deliveries=None, clock=clock)
    await publish(broker, "jobs", [b"x"])
    worker = Worker(broker, clock=clock)
    calls = 0

    @worker.handler("jobs")
    async def handle(message: Message) -> None:
        nonlocal calls
        calls += 1
        raise HeadraceError("refused by the ledger", code="ledger_refused", transient=False)

    await worker.run(exit_when_idle=1.0, handle_signals=False)
    [dead] = await broker.dead_letters("jobs")
    assert calls == 1
    assert (dead.error["code"], dead.error["reason"]) == ("ledger_refused", "not_retryable")


async def test_handler_timeout_is_exact_and_retried(clock: Clock) -> None:
    """A handler over its timeout is cancelled at exactly `timeout` and retried."""
    broker = MemoryBroker(max_deliveries=None, clock=clock)
    await publish(broker, "jobs", [b"slow"])
    worker = Worker(broker, clock=clock)
    started: list[float] = []

    @worker.handler("jobs", timeout=2.0, retry=NO_JITTER)
    async def handle(message: Message) -> None:
        started.append(clock.now())
        await asyncio.sleep(100)

    await worker.run(exit_when_idle=5.0, handle_signals=False)
    # attempt 1 at 0, times out at 2, retry after 1 s -> 3, times out at 5, +2 s -> 7.
    assert started == [0.0, 3.0, 7.0]
    [dead] = await broker.dead_letters("jobs")
    assert dead.error["code"] == "deadline_exceeded"
    assert dead.error["context"]["timeout"] == 2.0


async def test_oversized_and_undecodable_payloads_go_straight_to_the_dlq(clock: Clock) -> None:
    """Too-large and undecodable bodies are dead-lettered on attempt 1; good ones handled."""
    broker = MemoryBroker(max_deliveries=None, clock=clock)

    class Order(msgspec.Struct):
        id: int

    await publish(broker, "orders", [b'{"id": 1}', b"x" * 2000, b"{not json", b'{"id": "two"}'])
    worker = Worker(broker, clock=clock)
    handled: list[int] = []

    @worker.handler("orders", max_message_bytes=1000)
    async def handle(message: Message) -> None:
        handled.append(msgspec.json.decode(message.body, type=Order).id)

    stats = await worker.run(exit_when_idle=1.0, handle_signals=False)
    assert handled == [1]
    dead = sorted(await broker.dead_letters("orders"), key=lambda d: d.message.id)
    assert [d.error["code"] for d in dead] == [
        "message_too_large",
        "invalid_message",
        "invalid_message",
    ]
    assert all(d.message.attempt == 1 and len(d.error["error_id"]) == 32 for d in dead)
    assert (stats.dead_lettered, stats.retried) == (3, 0)


async def test_shutdown_order_acks_handled_and_hands_back_the_rest(clock: Clock) -> None:
    """On stop: unstarted messages go back at once; in-flight ones are cancelled after
    shutdown_timeout and handed back; handled ones are acked; no attempt is charged."""
    broker = SpyBroker(max_deliveries=None, clock=clock)
    await publish(broker, "jobs", [b"fast", b"fast"] + [b"slow"] * 8)
    # A long ack interval: handled messages sit in the ack buffer until the stop flushes it.
    worker = Worker(broker, clock=clock, shutdown_timeout=5.0, ack_interval=1000.0)
    cancelled: list[float] = []

    @worker.handler("jobs", concurrency=4, prefetch=2)
    async def handle(message: Message) -> None:
        if message.body == b"slow":
            try:
                await asyncio.sleep(100)
            except asyncio.CancelledError:
                cancelled.append(clock.now())
                raise

    async def stop_later() -> None:
        await clock.sleep(1.0)
        worker.stop()

    stopper = asyncio.create_task(stop_later())
    stats = await worker.run(handle_signals=False)
    await stopper
    assert clock.now() == 6.0
    assert cancelled == [6.0] * 4
    # The buffered (fetched, never started) messages went back at the stop itself.
    assert broker.handed_back[0][0] == 1.0
    assert len(broker.handed_back[0][1]) == 2
    assert broker.handed_back[1] == (6.0, broker.handed_back[1][1])
    assert len(broker.handed_back[1][1]) == 4
    assert (stats.handled, stats.acked, stats.handed_back) == (2, 2, 6)
    left = await remaining(broker, "jobs")
    assert sorted(m.body for m in left) == [b"slow"] * 8
    assert {m.attempt for m in left} == {1}


async def test_second_stop_forces_a_fast_stop_without_losing_anything(clock: Clock) -> None:
    """stop(force=True) cancels in-flight handlers at once; they are still handed back."""
    broker = MemoryBroker(max_deliveries=None, clock=clock)
    await publish(broker, "jobs", [b"slow"] * 3)
    worker = Worker(broker, clock=clock, shutdown_timeout=60.0)

    @worker.handler("jobs", concurrency=3)
    async def handle(message: Message) -> None:
        await asyncio.sleep(100)

    async def signals() -> None:
        await clock.sleep(1.0)
        worker.stop()
        await clock.sleep(1.0)
        worker.stop(force=True)

    signaller = asyncio.create_task(signals())
    stats = await worker.run(handle_signals=False)
    await signaller
    assert clock.now() == 2.0
    assert stats.handed_back == 3
    assert len(await remaining(broker, "jobs")) == 3


async def test_sigterm_then_sigint_stop_the_worker(clock: Clock) -> None:
    """Real signals: the first stops gracefully, the second forces; nothing is lost."""
    broker = MemoryBroker(max_deliveries=None, clock=clock)
    await publish(broker, "jobs", [b"slow"] * 2)
    worker = Worker(broker, clock=clock, shutdown_timeout=60.0)

    @worker.handler("jobs", concurrency=2)
    async def handle(message: Message) -> None:
        await asyncio.sleep(100)

    async def signals() -> None:
        await clock.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)
        await clock.sleep(1.0)
        os.kill(os.getpid(), signal.SIGINT)

    signaller = asyncio.create_task(signals())
    stats = await worker.run()
    await signaller
    assert stats.handed_back == 2
    assert clock.now() < 60.0
    assert len(await remaining(broker, "jobs")) == 2


async def test_idempotent_handler_has_its_effect_once_per_key(clock: Clock) -> None:
    """Two deliveries of one key: the handler runs once, the duplicate is acked."""
    broker = MemoryBroker(max_deliveries=None, clock=clock)
    await publish(broker, "pay", [b"charge"], key="order-7")
    await publish(broker, "pay", [b"charge"], key="order-7")
    await publish(broker, "pay", [b"charge"], key="order-8")
    store = MemoryIdempotencyStore()
    worker = Worker(broker, clock=clock, idempotency=store)
    effects: list[str | None] = []

    @worker.handler("pay", concurrency=1, idempotent=True)
    async def handle(message: Message) -> None:
        effects.append(message.key)

    stats = await worker.run(exit_when_idle=1.0, handle_signals=False)
    assert effects == ["order-7", "order-8"]
    assert (stats.duplicates, stats.acked) == (1, 3)
    assert await store.seen("pay:order-7")


async def test_failed_idempotent_handler_is_not_recorded(clock: Clock) -> None:
    """A key is recorded only after success, so a failed attempt is retried."""
    broker = MemoryBroker(max_deliveries=None, clock=clock)
    await publish(broker, "pay", [b"charge"], key="k")
    store = MemoryIdempotencyStore()
    worker = Worker(broker, clock=clock)
    calls = 0

    @worker.handler("pay", idempotent=store, retry=NO_JITTER)
    async def handle(message: Message) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("down")

    await worker.run(exit_when_idle=2.0, handle_signals=False)
    assert calls == 2
    assert len(store) == 1


async def test_rate_limit_spaces_handler_calls(clock: Clock) -> None:
    """A TokenBucket(rate=2, burst=1) lets one call start every 0.5 s."""
    broker = MemoryBroker(max_deliveries=None, clock=clock)
    await publish(broker, "jobs", [b"x"] * 5)
    worker = Worker(broker, clock=clock)
    starts: list[float] = []

    @worker.handler("jobs", concurrency=5, rate_limit=TokenBucket(2.0, 1, clock=clock))
    async def handle(message: Message) -> None:
        starts.append(clock.now())

    await worker.run(exit_when_idle=1.0, handle_signals=False)
    assert starts == [0.0, 0.5, 1.0, 1.5, 2.0]


async def test_long_handler_keeps_its_message_by_extending_the_lease(clock: Clock) -> None:
    """A 10 s handler with a 3 s lease is not re-delivered: the lease is extended."""
    broker = MemoryBroker(max_deliveries=None, clock=clock)
    await publish(broker, "jobs", [b"long"])
    worker = Worker(broker, clock=clock, lease=3.0, fetch_timeout=0.5)
    calls: list[float] = []

    @worker.handler("jobs", concurrency=2)
    async def handle(message: Message) -> None:
        calls.append(clock.now())
        await asyncio.sleep(10)

    stats = await worker.run(exit_when_idle=1.0, handle_signals=False)
    assert calls == [0.0]
    assert stats.acked == 1


async def test_worker_keeps_running_through_many_bad_messages(clock: Clock) -> None:
    """Every kind of handler failure is settled; good messages still get handled."""
    broker = MemoryBroker(max_deliveries=None, clock=clock)
    bodies = [b"ok", b"raise", b"invalid", b"base", b"ok"] * 20
    await publish(broker, "jobs", bodies)
    worker = Worker(broker, clock=clock)
    handled = 0
    # The worker's default policy (worker_retryable), without jitter: deterministic.
    policy = Retry(max_attempts=2, initial_delay=0.1, jitter="none", retry_on=worker_retryable)

    @worker.handler("jobs", concurrency=4, retry=policy)
    async def handle(message: Message) -> None:
        nonlocal handled
        if message.body == b"raise":
            raise RuntimeError("boom")
        if message.body == b"invalid":
            raise InvalidMessage("bad schema")
        if message.body == b"base":
            raise ArithmeticError("still an Exception")
        handled += 1

    stats = await worker.run(exit_when_idle=2.0, handle_signals=False)
    assert handled == 40
    assert stats.dead_lettered == 60
    assert len(await broker.dead_letters("jobs", limit=1000)) == 60
    assert await remaining(broker, "jobs") == []


async def test_stop_before_run_returns_at_once(clock: Clock) -> None:
    """stop() before run(): run() starts, stops, and hands everything back."""
    broker = MemoryBroker(max_deliveries=None, clock=clock)
    await publish(broker, "jobs", [b"x"] * 3)
    worker = Worker(broker, clock=clock)

    @worker.handler("jobs")
    async def handle(message: Message) -> None:
        raise AssertionError("must not run")

    worker.stop()
    stats = await worker.run(handle_signals=False)
    assert stats.handled == 0
    assert len(await remaining(broker, "jobs")) == 3


def test_configuration_errors_name_the_inputs() -> None:
    """Bad arguments fail at construction or registration, naming the argument."""
    broker = MemoryBroker()
    with pytest.raises(ConfigurationError, match="max_attempts=0"):
        Worker(broker, max_attempts=0)
    with pytest.raises(ConfigurationError, match="lease=-1"):
        Worker(broker, lease=-1)
    with pytest.raises(ConfigurationError, match="needs a Broker"):
        Worker(42)  # type: ignore[arg-type]
    worker = Worker(broker)
    with pytest.raises(ConfigurationError, match="concurrency=0"):
        worker.handler("t", concurrency=0)
    with pytest.raises(ConfigurationError, match="idempotent=True"):
        worker.handler("t", idempotent=True)
    with pytest.raises(ConfigurationError, match="not one"):
        worker.handler("t")(lambda m: None)  # type: ignore[arg-type,return-value]

    @worker.handler("t")
    async def handle(message: Message) -> None:
        pass

    with pytest.raises(ConfigurationError, match="already has a handler"):
        worker.handler("t")(handle)


async def test_run_twice_is_refused(clock: Clock) -> None:
    """A worker runs once."""
    worker = Worker(MemoryBroker(clock=clock), clock=clock)

    @worker.handler("t")
    async def handle(message: Message) -> None:
        pass

    worker.stop()
    await worker.run(handle_signals=False)
    with pytest.raises(ConfigurationError, match="already"):
        await worker.run(handle_signals=False)
    with pytest.raises(ConfigurationError, match="after run"):
        worker.handler("u")


async def test_worker_opens_and_closes_a_broker_url(clock: Clock) -> None:
    """Given a URL, the worker opens the broker and closes it when done."""
    shared = MemoryBroker("worker-url-test", clock=clock)
    await publish(shared, "jobs", [b"a", b"b"])
    worker = Worker("memory://worker-url-test", clock=clock)
    got: list[bytes] = []

    @worker.handler("jobs")
    async def handle(message: Message) -> None:
        got.append(message.body)

    await worker.run(exit_when_idle=1.0, handle_signals=False)
    assert sorted(got) == [b"a", b"b"]
    assert await remaining(shared, "jobs") == []


async def test_never_fetches_more_than_the_free_slots(clock: Clock) -> None:
    """With every slot busy, nothing more is fetched (a message handed to a slot that
    has not resumed yet still counts as taken)."""
    broker = SpyBroker(max_deliveries=None, clock=clock)
    await publish(broker, "jobs", [b"x"] * 100)
    worker = Worker(broker, clock=clock, shutdown_timeout=0)

    @worker.handler("jobs", concurrency=4, prefetch=1)
    async def handle(message: Message) -> None:
        await asyncio.sleep(100)

    async def stop_later() -> None:
        await clock.sleep(5.0)
        worker.stop()

    stopper = asyncio.create_task(stop_later())
    stats = await worker.run(handle_signals=False)
    await stopper
    assert stats.fetched == 5
    assert broker.fetch_sizes == [5]
    assert stats.handed_back == 5


async def test_fetch_in_progress_at_stop_is_finished_and_handed_back(clock: Clock) -> None:
    """A long poll running when stop() comes is not cancelled (that could strand what
    it leased): what it returns is handed back at once, unhandled, attempt 1."""
    broker = SpyBroker(max_deliveries=None, clock=clock)
    worker = Worker(broker, clock=clock, fetch_timeout=10.0)

    @worker.handler("jobs")
    async def handle(message: Message) -> None:
        raise AssertionError("must not run after stop")

    async def scenario() -> None:
        await clock.sleep(1.0)
        worker.stop()
        await clock.sleep(0.5)
        await publish(broker, "jobs", [b"late"])

    script = asyncio.create_task(scenario())
    stats = await worker.run(handle_signals=False)
    await script
    assert clock.now() == 1.5
    assert (stats.fetched, stats.handed_back, stats.handled) == (1, 1, 0)
    assert broker.handed_back[0][0] == 1.5
    [left] = await remaining(broker, "jobs")
    assert (left.body, left.attempt) == (b"late", 1)


async def test_cancelling_run_acks_handled_and_hands_back_the_rest(clock: Clock) -> None:
    """Cancelling the task running worker.run() is a forced stop: handled messages are
    still acked, in-flight ones handed back, and the cancellation propagates."""
    broker = MemoryBroker(max_deliveries=None, clock=clock)
    await publish(broker, "jobs", [b"fast"] * 3 + [b"slow"] * 2)
    worker = Worker(broker, clock=clock, ack_interval=1000.0, shutdown_timeout=60.0)

    @worker.handler("jobs", concurrency=5)
    async def handle(message: Message) -> None:
        if message.body == b"slow":
            await asyncio.sleep(100)

    task = asyncio.create_task(worker.run(handle_signals=False))
    await clock.sleep(1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert clock.now() == 1.0
    stats = worker.statistics()
    assert (stats.handled, stats.acked, stats.handed_back) == (3, 3, 2)
    left = await remaining(broker, "jobs")
    assert sorted((m.body, m.attempt) for m in left) == [(b"slow", 1), (b"slow", 1)]


async def test_broker_refusing_the_settings_stops_the_worker_with_the_error(
    clock: Clock,
) -> None:
    """A ConfigurationError from fetch (e.g. a lease over the broker's max_lease) is not
    retried forever: the worker stops in order and run() raises it."""

    class Strict(MemoryBroker):
        async def fetch(
            self, topic: str, max_messages: int, *, timeout: float, lease: float | None = None
        ) -> list[Message]:
            raise ConfigurationError(f"fetch(lease)={lease} exceeds max_lease=10")

    worker = Worker(Strict(clock=clock), clock=clock, lease=30.0)

    @worker.handler("jobs")
    async def handle(message: Message) -> None:
        pass

    with pytest.raises(ConfigurationError, match="max_lease"):
        await worker.run(handle_signals=False)


class FlakyAckBroker(SpyBroker):
    """A real MemoryBroker whose acks fail (a broker away) until ``ack_ok_from``; with
    ``hang``, they and hand-backs never answer instead (a blackholed connection)."""

    def __init__(self, *args: Any, ack_ok_from: float, hang: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ack_ok_from = ack_ok_from
        self.hang = hang
        self.ack_tries: list[float] = []

    async def ack(self, messages: Sequence[Message]) -> None:
        now = asyncio.get_running_loop().time()
        self.ack_tries.append(now)
        if now < self.ack_ok_from:
            if self.hang:
                await asyncio.Event().wait()
            raise ConnectionError("broker away")
        await super().ack(messages)

    async def hand_back(self, messages: Sequence[Message]) -> None:
        if self.hang:
            await asyncio.Event().wait()
        await super().hand_back(messages)


async def test_failed_acks_are_retried_with_backoff_until_the_broker_is_back(clock: Clock) -> None:
    """An ack that fails while the broker is away is tried again, with growing pauses
    (0.05 s doubling to 1 s, jittered), and lands once the broker is back: nothing is
    delivered twice."""
    start = clock.now()
    broker = FlakyAckBroker(max_deliveries=None, clock=clock, ack_ok_from=start + 5.0)
    await publish(broker, "jobs", [b"x"] * 10)
    worker = Worker(broker, clock=clock, lease=30.0, ack_batch=10)

    @worker.handler("jobs", concurrency=10)
    async def handle(message: Message) -> None:
        return None

    stats = await worker.run(exit_when_idle=2.0, handle_signals=False)
    assert (stats.handled, stats.acked, stats.ack_failures) == (10, 10, 0)
    tries = [t - start for t in broker.ack_tries]
    assert tries[-1] >= 5.0
    pauses = [b - a for a, b in itertools.pairwise(tries)]
    assert all(0.025 <= p <= 1.0 for p in pauses)
    assert 8 <= len(tries) <= 15  # not a hot loop: ~0.05 .. 1 s apart for 5 s
    assert await remaining(broker, "jobs") == []


async def test_acks_are_given_up_after_a_lease(clock: Clock) -> None:
    """With the broker away for good, a batch is given up a lease after its first
    failed ack (its leases have expired by then: the messages come back) and counted."""
    start = clock.now()
    # max_deliveries=1: once their leases expire the messages are dead-lettered rather
    # than delivered again, so the worker goes idle and the test ends.
    broker = FlakyAckBroker(max_deliveries=1, clock=clock, ack_ok_from=float("inf"))
    await publish(broker, "jobs", [b"x"] * 5)
    worker = Worker(broker, clock=clock, lease=8.0, ack_batch=5, max_attempts=1)

    @worker.handler("jobs", concurrency=5)
    async def handle(message: Message) -> None:
        return None

    stats = await worker.run(exit_when_idle=2.0, handle_signals=False)
    assert (stats.handled, stats.acked, stats.ack_failures) == (5, 0, 5)
    first, last = broker.ack_tries[0] - start, broker.ack_tries[-1] - start
    assert last - first <= 8.0  # the lease
    assert last - first >= 7.0  # and not much less (the last pause is at most 1 s)


async def test_shutdown_with_the_broker_away_ends_within_settle_timeout(clock: Clock) -> None:
    """On stop, the final acks and hand-backs share settle_timeout: with the broker not
    answering at all, the worker still returns by then, and counts the acks it could
    not make (three tries of settle_timeout per batch took 35 s in the R4 work)."""
    start = clock.now()
    broker = FlakyAckBroker(max_deliveries=None, clock=clock, ack_ok_from=float("inf"), hang=True)
    await publish(broker, "jobs", [b"x"] * 40)
    worker = Worker(broker, clock=clock, lease=60.0, ack_batch=10, settle_timeout=2.0)
    handled = 0

    @worker.handler("jobs", concurrency=10)
    async def handle(message: Message) -> None:
        nonlocal handled
        handled += 1
        if handled == 20:
            worker.stop()

    stats = await worker.run(handle_signals=False)
    assert stats.acked == 0
    assert stats.ack_failures == stats.handled >= 20
    assert stats.handed_back == 0  # nothing got through; those leases expire instead
    assert clock.now() - start <= 2.5  # stop at ~0, then at most settle_timeout


class TrickleBroker(SpyBroker):
    """A real MemoryBroker whose fetch returns at most ``per_fetch`` messages, as a
    broker that streams deliveries in does (RabbitMQ's prefetch window filling, NATS
    long polls) when asked while only a few have arrived."""

    def __init__(self, *args: Any, per_fetch: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.per_fetch = per_fetch
        self.asked: list[int] = []

    async def fetch(
        self, topic: str, max_messages: int, *, timeout: float, lease: float | None = None
    ) -> list[Message]:
        self.asked.append(max_messages)
        return await super().fetch(
            topic, min(max_messages, self.per_fetch), timeout=timeout, lease=lease
        )


async def test_small_fetches_still_fill_every_slot_at_once(clock: Clock) -> None:
    """A broker that hands over a few messages per fetch: once the slots have taken
    what was buffered, the fetch loop fetches again at once, so slow handlers fill
    every slot in the first instant instead of waiting for a handler to finish."""
    broker = TrickleBroker(max_deliveries=None, clock=clock, per_fetch=6)
    await publish(broker, "jobs", [b"x"] * 100)
    worker = Worker(broker, clock=clock, shutdown_timeout=0.0)
    started: list[float] = []

    @worker.handler("jobs", concurrency=16)
    async def handle(message: Message) -> None:
        started.append(clock.now())
        await asyncio.sleep(60)

    async def stop_soon() -> None:
        await clock.sleep(1.0)
        worker.stop()

    async with asyncio.TaskGroup() as group:
        group.create_task(stop_soon())
        await worker.run(handle_signals=False)
    start = started[0]
    assert started == [start] * 16
    # Free room each time (the default prefetch tops a fetch up to the ack batch).
    assert broker.asked[:3] == [100, 94, 88]
