"""The :class:`Worker`: register handlers, run them, shut down without losing a message."""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..._cancel import deadline, shielded
from ..._clock import Clock, default_clock
from ..._errors import ConfigurationError
from ..._retry import Retry
from .._broker import Broker, Message
from ._route import Counters, Handler, HandlerSpec, RateLimiter, Route, worker_retryable

if TYPE_CHECKING:
    from .._idempotency import IdempotencyStore

__all__ = ["Worker", "WorkerStatistics"]

logger = logging.getLogger("headrace.messaging.worker")


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class WorkerStatistics:
    """A snapshot of a worker's counters (all since ``run()`` started).

    ``handled``: handlers that returned (or idempotent duplicates skipped);
    ``failed``: handler failures (each is either ``retried`` or ``dead_lettered``, or
    counted in ``settle_failures`` when the broker refused the nack/dead-letter);
    ``acked``/``ack_failures``: messages in ack batches that the broker confirmed or
    refused; ``handed_back``: fetched-but-unhandled messages returned on shutdown;
    ``in_flight``/``buffered``: right now.
    """

    fetched: int
    handled: int
    failed: int
    retried: int
    dead_lettered: int
    duplicates: int
    acked: int
    handed_back: int
    ack_failures: int
    settle_failures: int
    in_flight: int
    buffered: int
    elapsed: float


class Worker:
    """Pulls messages, runs a handler per topic, acks in batches; never loses a message.

    ``broker`` is a :class:`~headrace.messaging.Broker` (you own it: the worker does not
    close it) or a URL such as ``"sqlite:///jobs.db"`` (the worker opens and closes it).
    Register handlers with :meth:`handler`, then ``await worker.run()`` (or
    :meth:`run_sync` from a script). Delivery is at-least-once: a message is acked only
    after its handler returned.

    Defaults: ``lease=30`` seconds per delivery (extended every ``lease/3`` while a
    handler runs); ``max_attempts=5`` deliveries before the dead-letter queue, with
    exponential backoff from ``retry_delay=1`` s up to 60 s between them (jittered);
    ``shutdown_timeout=10`` s for in-flight handlers to finish on SIGTERM; acks go out
    in batches of ``ack_batch=100`` or every ``ack_interval=0.05`` s, whichever first;
    ``fetch_timeout=1`` s is how long one fetch long-polls an empty topic (and so
    the longest a graceful stop waits for the fetch in progress; its messages are
    handed back at once).

    Shutdown (SIGTERM, SIGINT, or :meth:`stop`), in this order: stop fetching and hand
    back every fetched-but-unstarted message at once (no attempt is counted where the
    broker allows); let in-flight handlers finish within ``shutdown_timeout``, then
    cancel the rest; ack everything handled; hand back the cancelled ones; close the
    broker if the worker opened it; return. A second signal (``stop(force=True)``)
    cancels in-flight handlers at once but still acks what was handled and hands back
    the rest. Handler failures never stop the worker: they are retried with a
    delayed nack (the worker never sleeps on a retry) or dead-lettered with the
    error's ``to_dict()`` (error id, code, traceback); payloads over
    ``max_message_bytes`` and decode errors go to the dead-letter queue at once.

    Not thread-safe; run it in one event loop. One ``run()`` per worker::

        worker = Worker("sqlite:///jobs.db")

        @worker.handler("emails", concurrency=32, timeout=10)
        async def send(message: Message) -> None:
            await mailer.send(message.json())

        worker.run_sync()
    """

    def __init__(
        self,
        broker: Broker | str,
        *,
        shutdown_timeout: float = 10.0,
        lease: float = 30.0,
        max_attempts: int = 5,
        retry_delay: float = 1.0,
        fetch_timeout: float = 1.0,
        ack_batch: int = 100,
        ack_interval: float = 0.05,
        settle_timeout: float = 10.0,
        idempotency: IdempotencyStore | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not isinstance(broker, str | Broker):
            raise ConfigurationError(
                f"Worker(broker={broker!r}) needs a Broker or a broker URL such as "
                "'sqlite:///jobs.db'"
            )
        _positive("shutdown_timeout", shutdown_timeout, allow_zero=True)
        _positive("lease", lease)
        if not math.isfinite(lease):
            raise ConfigurationError(f"Worker(lease={lease!r}) must be finite seconds")
        _positive("fetch_timeout", fetch_timeout, allow_zero=True)
        _positive("ack_interval", ack_interval, allow_zero=True)
        _positive("settle_timeout", settle_timeout)
        _positive("retry_delay", retry_delay, allow_zero=True)
        if max_attempts < 1:
            raise ConfigurationError(f"Worker(max_attempts={max_attempts}) must be >= 1")
        if ack_batch < 1:
            raise ConfigurationError(f"Worker(ack_batch={ack_batch}) must be >= 1")
        self._broker_arg = broker
        self.shutdown_timeout = shutdown_timeout
        self.lease = lease
        self.max_attempts = max_attempts
        self.fetch_timeout = fetch_timeout
        self.ack_batch = ack_batch
        self.ack_interval = ack_interval
        self.settle_timeout = settle_timeout
        self.idempotency = idempotency
        self.default_retry = Retry(
            max_attempts=max_attempts,
            initial_delay=retry_delay,
            max_delay=max(60.0, retry_delay),
            retry_on=worker_retryable,
        )
        self._clock = clock or default_clock()
        self._specs: list[HandlerSpec] = []
        self._state = _State.NEW
        self._counters = Counters()
        self._routes: list[Route] = []
        self._stop_requested: asyncio.Event | None = None
        self._force_requested: asyncio.Event | None = None
        self._early_stop: bool | None = None  # stop() before run(): None, False or force
        self._started_at = self._clock.now()
        self._signals_seen = 0

    def __repr__(self) -> str:
        from ..._errors import redact

        broker = redact(self._broker_arg) if isinstance(self._broker_arg, str) else self._broker_arg
        topics = [spec.topic for spec in self._specs]
        return f"Worker(broker={broker!r}, topics={topics!r}, state={self._state.value!r})"

    # -- registration ---------------------------------------------------------------

    def handler(
        self,
        topic: str,
        *,
        concurrency: int = 16,
        prefetch: int | None = None,
        timeout: float | None = None,
        retry: Retry | None = None,
        rate_limit: RateLimiter | None = None,
        idempotent: bool | IdempotencyStore = False,
        max_message_bytes: int | None = 1 << 20,
    ) -> Callable[[Handler], Handler]:
        """Register ``async def fn(message) -> None`` for ``topic``; returns ``fn`` unchanged.

        ``concurrency``: handlers running at once for this topic. A fetch asks for as
        many messages as there are free slots plus up to ``prefetch`` extra held ready;
        by default ``prefetch`` tops the batch up to the worker's ``ack_batch`` (84 at
        concurrency 16), because a broker round trip per 16 messages costs more than
        the messages (B4: 0.54x the hand-written SQLite loop without, 1.16x with).
        Held messages have their leases extended and are handed back at once on
        shutdown; pass ``prefetch=0`` when other consumers should get every message
        this one cannot start right away (long handlers, few messages).
        ``timeout``: seconds per call (a :class:`~headrace.DeadlineExceeded`, retried).
        ``retry``: the policy for failures (default: the worker's ``max_attempts`` and
        backoff, every exception retried except non-transient headrace errors);
        ``Retry.max_attempts`` counts deliveries. ``rate_limit``: awaited
        (``acquire()``) before each call.
        ``idempotent``: ``True`` uses the worker's ``idempotency`` store, or pass a
        store; the handler then runs at most once per message key (or id) *that
        completed*: the key is recorded after the handler returns, so a crash between
        the effect and the record can repeat the effect (use
        :meth:`SqliteIdempotencyStore.transaction` to commit both together).
        ``max_message_bytes``: larger bodies are dead-lettered unread (``None``: no cap).
        """
        if self._state is not _State.NEW:
            raise ConfigurationError(
                f"Worker.handler({topic!r}) after run() started: handlers cannot be added "
                "to a running worker"
            )
        if not topic or not isinstance(topic, str):
            raise ConfigurationError(f"Worker.handler(topic={topic!r}) needs a non-empty str")
        if any(spec.topic == topic for spec in self._specs):
            raise ConfigurationError(f"Worker.handler({topic!r}): topic already has a handler")
        if concurrency < 1:
            raise ConfigurationError(f"Worker.handler({topic!r}, concurrency={concurrency}) < 1")
        if prefetch is None:
            prefetch = max(0, self.ack_batch - concurrency)
        elif prefetch < 0:
            raise ConfigurationError(f"Worker.handler({topic!r}, prefetch={prefetch}) < 0")
        if timeout is not None:
            _positive("timeout", timeout)
        if max_message_bytes is not None and max_message_bytes < 1:
            raise ConfigurationError(
                f"Worker.handler({topic!r}, max_message_bytes={max_message_bytes}) must be >= 1"
            )
        if rate_limit is not None and not callable(getattr(rate_limit, "acquire", None)):
            raise ConfigurationError(
                f"Worker.handler({topic!r}, rate_limit={rate_limit!r}) has no acquire() method"
            )
        store: IdempotencyStore | None
        if idempotent is True:
            if self.idempotency is None:
                raise ConfigurationError(
                    f"Worker.handler({topic!r}, idempotent=True) needs "
                    "Worker(idempotency=<store>) or idempotent=<store>"
                )
            store = self.idempotency
        elif idempotent is False:
            store = None
        else:
            store = idempotent

        def register(fn: Handler) -> Handler:
            if not asyncio.iscoroutinefunction(fn):
                raise ConfigurationError(
                    f"Worker.handler({topic!r}) decorates async functions; "
                    f"{getattr(fn, '__qualname__', fn)!r} is not one"
                )
            self._specs.append(
                HandlerSpec(
                    topic=topic,
                    fn=fn,
                    name=getattr(fn, "__qualname__", repr(fn)),
                    concurrency=concurrency,
                    prefetch=prefetch,
                    timeout=timeout,
                    retry=retry or self.default_retry,
                    rate_limit=rate_limit,
                    idempotency=store,
                    max_message_bytes=max_message_bytes,
                )
            )
            return fn

        return register

    def use_broker(self, broker: Broker | str) -> None:
        """Replace the broker given at construction (``headrace worker --broker URL``).

        Only before :meth:`run`; the same ownership rule applies (a URL is opened and
        closed by the worker, a :class:`Broker` is yours).
        """
        if self._state is not _State.NEW:
            raise ConfigurationError("Worker.use_broker() after run() started")
        if not isinstance(broker, str | Broker):
            raise ConfigurationError(f"Worker.use_broker({broker!r}) needs a Broker or a URL")
        self._broker_arg = broker

    @property
    def topics(self) -> list[str]:
        """The topics with a registered handler, in registration order."""
        return [spec.topic for spec in self._specs]

    # -- control --------------------------------------------------------------------

    def stop(self, *, force: bool = False) -> None:
        """Begin the graceful shutdown (``force=True``: cancel in-flight handlers now).

        Safe to call from a signal handler or callback on the worker's loop, and
        before :meth:`run` (which then stops as soon as it started).
        """
        if self._stop_requested is None:
            self._early_stop = force or bool(self._early_stop)
            return
        self._stop_requested.set()
        # Stop fetching and starting handlers in this very instant, not when the
        # shutdown task next runs: a slot could otherwise take one more message.
        for route in self._routes:
            route.stop()
        if force:
            assert self._force_requested is not None
            self._force_requested.set()

    def _on_signal(self, signum: int) -> None:
        self._signals_seen += 1
        name = signal.Signals(signum).name
        if self._signals_seen == 1:
            logger.warning("%s: stopping (again to force a faster stop)", name)
            self.stop()
        else:
            logger.warning("%s again: cancelling in-flight handlers now", name)
            self.stop(force=True)

    def statistics(self) -> WorkerStatistics:
        """The counters right now (cheap; safe to poll from a progress display)."""
        c = self._counters
        return WorkerStatistics(
            fetched=c.fetched,
            handled=c.handled,
            failed=c.failed,
            retried=c.retried,
            dead_lettered=c.dead_lettered,
            duplicates=c.duplicates,
            acked=c.acked,
            handed_back=c.handed_back,
            ack_failures=c.ack_failures,
            settle_failures=c.settle_failures,
            in_flight=sum(len(route.in_flight) for route in self._routes),
            buffered=sum(len(route.buffer) for route in self._routes),
            elapsed=self._clock.now() - self._started_at,
        )

    def run_sync(self, *, exit_when_idle: float | None = None) -> WorkerStatistics:
        """Run the worker in a new event loop until it stops (the script entry point)."""
        return asyncio.run(self.run(exit_when_idle=exit_when_idle))

    async def run(
        self,
        *,
        exit_when_idle: float | None = None,
        handle_signals: bool = True,
    ) -> WorkerStatistics:
        """Fetch and handle until stopped; return the final statistics.

        ``exit_when_idle``: stop by itself once every topic was empty, nothing was in
        flight and nothing was waiting for an ack for that many seconds (for batch
        jobs and CI; a retry this worker scheduled keeps it busy until it came due).
        ``handle_signals``: install SIGINT/SIGTERM handlers for the run (only possible
        in the main thread; skipped elsewhere).
        """
        if self._state is not _State.NEW:
            raise ConfigurationError("Worker.run() was already called; make a new Worker")
        if not self._specs:
            raise ConfigurationError("Worker.run() with no handlers: use @worker.handler(topic)")
        if exit_when_idle is not None:
            _positive("exit_when_idle", exit_when_idle, allow_zero=True)
        self._state = _State.RUNNING
        self._started_at = self._clock.now()
        self._stop_requested = asyncio.Event()
        self._force_requested = asyncio.Event()
        broker, owned = await self._open_broker()
        routes = [
            Route(
                spec,
                broker,
                self._counters,
                clock=self._clock,
                lease=self.lease,
                fetch_timeout=self.fetch_timeout,
                ack_batch=self.ack_batch,
                ack_interval=self.ack_interval,
                settle_timeout=self.settle_timeout,
            )
            for spec in self._specs
        ]
        self._routes = routes
        if self._early_stop is not None:
            self.stop(force=self._early_stop)
        installed = self._install_signals() if handle_signals else []
        fetchers: list[asyncio.Task[None]] = []
        slots: list[asyncio.Task[None]] = []
        ackers: list[asyncio.Task[None]] = []
        helpers: list[asyncio.Task[None]] = []
        try:
            for route in routes:
                topic = route.spec.topic
                fetchers.append(asyncio.create_task(route.fetch_loop(), name=f"fetch:{topic}"))
                slots.extend(
                    asyncio.create_task(route.slot(), name=f"handle:{topic}:{index}")
                    for index in range(route.spec.concurrency)
                )
                ackers.append(asyncio.create_task(route.ack_loop(), name=f"ack:{topic}"))
                helpers.append(asyncio.create_task(route.lease_loop(), name=f"lease:{topic}"))
            if exit_when_idle is not None:
                helpers.append(
                    asyncio.create_task(self._idle_watch(exit_when_idle), name="idle-watch")
                )
            stop_wait = asyncio.create_task(self._stop_requested.wait(), name="stop-wait")
            try:
                await asyncio.wait([stop_wait, *fetchers, *ackers], return_when="FIRST_COMPLETED")
            except asyncio.CancelledError:
                # Cancelling run() is a forced stop: handlers are cut short, but what was
                # handled is still acked and the rest handed back, in a task of its own.
                self.stop(force=True)
                self._state = _State.STOPPING
                await shielded(
                    self._shutdown(broker, routes, fetchers, slots, ackers),
                    timeout=3 * self.settle_timeout,
                    cause="worker shutdown after cancellation",
                    clock=self._clock,
                )
                raise
            finally:
                stop_wait.cancel()
                await asyncio.gather(stop_wait, return_exceptions=True)
            failure: BaseException | None = None
            for task in (*fetchers, *ackers):
                if task.done() and not task.cancelled() and task.exception() is not None:
                    failure = failure or task.exception()
                    logger.error("worker task %s died: %r", task.get_name(), task.exception())
            self._state = _State.STOPPING
            await self._shutdown(broker, routes, fetchers, slots, ackers)
            if failure is not None:
                # Stopped in order (acked, handed back) first; now say why.
                raise failure
        finally:
            every = [*fetchers, *slots, *ackers, *helpers]
            for task in every:
                task.cancel()
            await asyncio.gather(*every, return_exceptions=True)
            for signum in installed:
                asyncio.get_running_loop().remove_signal_handler(signum)
            try:
                if owned:
                    await broker.close()
            finally:
                self._state = _State.STOPPED
        return self.statistics()

    async def _open_broker(self) -> tuple[Broker, bool]:
        if not isinstance(self._broker_arg, str):
            return self._broker_arg, False
        from .._url import open_broker

        broker = open_broker(self._broker_arg)
        await broker.connect()
        return broker, True

    def _install_signals(self) -> list[int]:
        loop = asyncio.get_running_loop()
        installed: list[int] = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, self._on_signal, signum)
            except (NotImplementedError, RuntimeError, ValueError):
                # Not the main thread, or a loop without signal support: the caller
                # stops the worker with stop() instead.
                continue
            installed.append(signum)
        return installed

    async def _idle_watch(self, idle: float) -> None:
        period = max(idle / 4, 0.01) if idle > 0 else 0.01
        while True:
            await self._clock.sleep(period)
            now = self._clock.now()
            if all(route.idle_for(now) >= idle for route in self._routes):
                logger.info("idle for %.3g s: stopping", idle)
                self.stop()
                return

    async def _shutdown(
        self,
        broker: Broker,
        routes: list[Route],
        fetchers: list[asyncio.Task[None]],
        slots: list[asyncio.Task[None]],
        ackers: list[asyncio.Task[None]],
    ) -> None:
        assert self._force_requested is not None
        force = self._force_requested
        # 1. Stop fetching; return what nobody started at once, so other consumers get it.
        for route in routes:
            route.stop()
        await self._hand_back(broker, [m for route in routes for m in route.take_buffer()])
        stopped_at = self._clock.now()

        async def drain_fetches() -> None:
            # The fetch in progress (a long poll) may still be running: let it finish
            # (at most fetch_timeout) and hand back what it brought at once. Cancelling
            # it would leave a claim that commits after the cancel to the adapter, which
            # may only return it after we closed the broker, so it would wait for its
            # lease to expire (measured here, R2 on SQLite). A forced stop cancels it.
            await self._wait(
                fetchers, until=stopped_at + self.fetch_timeout + self.settle_timeout, force=force
            )
            for task in fetchers:
                task.cancel()
            await asyncio.gather(*fetchers, return_exceptions=True)
            await self._hand_back(broker, [m for route in routes for m in route.take_buffer()])

        fetches_drained = asyncio.create_task(drain_fetches(), name="drain-fetches")
        try:
            # 2. In-flight handlers get shutdown_timeout seconds, then are cancelled.
            await self._wait(slots, until=stopped_at + self.shutdown_timeout, force=force)
            for task in slots:
                task.cancel()
            await asyncio.gather(*slots, return_exceptions=True)
        finally:
            await fetches_drained
        # 3. Ack everything handled (the ackers flush their whole backlog, then exit)
        # and 4. hand back what was cancelled mid-handler or fetched during the stop,
        # both within settle_timeout: with the broker away, what is not through by
        # then comes back when its lease expires, and the worker still exits.
        settle_by = self._clock.now() + self.settle_timeout
        for route in routes:
            route.stop_acker(settle_by)
        await asyncio.gather(*ackers, return_exceptions=True)
        leftovers: list[Message] = []
        for route in routes:
            leftovers.extend(route.take_buffer())
            leftovers.extend(route.in_flight.values())
            route.in_flight.clear()
        await self._hand_back(broker, leftovers, until=settle_by)

    async def _wait(
        self, tasks: Iterable[asyncio.Task[None]], *, until: float, force: asyncio.Event
    ) -> None:
        pending = {task for task in tasks if not task.done()}
        if not pending or force.is_set():
            return
        force_wait = asyncio.ensure_future(force.wait())
        timer = None
        if math.isfinite(until):
            timer = self._clock.call_at(until, force_wait.cancel)
        try:
            await asyncio.wait([*pending, force_wait], return_when="FIRST_COMPLETED")
            while not force_wait.done() and any(not task.done() for task in pending):
                pending = {task for task in pending if not task.done()}
                await asyncio.wait([*pending, force_wait], return_when="FIRST_COMPLETED")
        finally:
            if timer is not None:
                timer.cancel()
            force_wait.cancel()
            await asyncio.gather(force_wait, return_exceptions=True)

    async def _hand_back(
        self, broker: Broker, messages: list[Message], *, until: float | None = None
    ) -> None:
        if not messages:
            return
        by_topic: dict[str, list[Message]] = {}
        for message in messages:
            by_topic.setdefault(message.topic, []).append(message)
        for topic, batch in by_topic.items():
            budget = self.settle_timeout
            if until is not None:
                budget = min(budget, until - self._clock.now())
            if budget <= 0:
                logger.error(
                    "hand-back of %d messages on %r skipped: the shutdown deadline passed; "
                    "they return when their leases expire",
                    len(batch),
                    topic,
                )
                continue
            try:
                async with deadline(budget, cause="hand-back", clock=self._clock):
                    await broker.hand_back(batch)
            except Exception as exc:
                logger.error(
                    "hand-back of %d messages on %r failed (%s); they return when their "
                    "leases expire",
                    len(batch),
                    topic,
                    exc,
                )
            else:
                self._counters.handed_back += len(batch)


def _positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, int | float) and not math.isnan(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(f"{name}={value!r} must be a number {bound} (seconds)")
