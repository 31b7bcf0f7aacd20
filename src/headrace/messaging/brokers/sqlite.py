"""The embedded default broker: a SQLite file in WAL mode, shared by local processes.

Why SQLite: zero setup, durable, and several worker processes on one machine can share
one file safely (``BEGIN IMMEDIATE`` serialises the claims; WAL lets readers run during
a write). Why these choices:

* **One row per message; the lease lives in columns no index covers.** A message is
  deliverable when ``ready_at <= now`` (index ``(topic, ready_at)``, which also serves
  delayed retries) and it holds no live lease (``lease_until`` in the past). A claim
  writes only ``lease_until``/``lease_token``, so it rewrites rows but never moves index
  entries (measured: about a third of the cost of moving ``ready_at``); a hand-back
  clears the lease and the message is back at its place in the order. An expired
  lease needs no reaper: the row is simply deliverable again, and the claim that takes
  it (still carrying the old token) counts one more attempt. Leased rows sit at the
  head of the index until acked, so a claim steps over at most the in-flight messages.
  "No lease" is stored as same-size sentinels rather than NULLs, so a claimed row does
  not grow and split its page.
* **Wall-clock time** (``time.time()``, injectable): leases are compared across
  processes, which do not share a monotonic clock.
* **Two connections: the loop's, and a dedicated thread's.** Fetches and acks first
  try the loop's own connection, which never waits for a lock (busy timeout 0) and
  never checkpoints: when the write lock is free, a claim of 100 commits in well under
  a millisecond with no thread hop. Running it on the thread instead cost more than the
  SQL: the hop, and GIL hand-offs that stall the thread for up to the interpreter's 5 ms
  switch interval while the loop runs handlers (B4, ``benchmarks/worker.py``: 0.67x ->
  1.1x the hand-written loop). When the lock is busy (another process, our own thread),
  the operation goes to the thread, which waits ``busy_timeout``; so do publishes,
  nacks, dead letters, and checkpoints (asked for by the loop's side when the WAL passes
  ~4 MiB), and everything when ``inline=False``.
* **Waiting:** an idle ``fetch`` sleeps until the earliest of its timeout, the next
  delayed message or lease expiry (one indexed read), a publish in this process (an
  in-process wake-up), or ``poll_interval`` (publishes by other processes).
* **Batches:** publish is one transaction with ``executemany``; ack is one
  ``DELETE ... WHERE id IN (...)``. An ack rides in the transaction of the next claim
  when one is queued or starts within a loop tick (the worker acks a batch as it
  fetches the next: one commit and one thread hop for both); otherwise the acks that
  arrived while the thread was busy commit together (group commit). A claim is one
  ``SELECT`` and one ``UPDATE ... WHERE id IN (...)`` in a ``BEGIN IMMEDIATE``,
  preceded by a lock-free readiness read unless the previous claim filled its batch.

Bodies are stored as BLOBs, headers as JSON; nothing is pickled. The schema and every
statement live in :mod:`._sqlite_store` (synchronous, run on the broker's thread); this
module is the asyncio side: waiting, wake-ups, group commit, cancellation.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import sqlite3
import threading
import time as _time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..._clock import Clock, TimerHandle, default_clock
from ..._errors import (
    BrokerError,
    ClosedResourceError,
    ConfigurationError,
    HeadraceError,
    translate_errors,
)
from .._broker import BrokerCapabilities, DeadLetter, Message, OutgoingMessage, TopicStats
from . import (
    check_error_record,
    check_fetch_arguments,
    check_lease,
    check_max_deliveries,
    check_outgoing,
    check_topic,
)
from ._sqlite_store import SqliteStore, encode_headers, new_token

__all__ = ["SqliteBroker"]

_T = TypeVar("_T")

logger = logging.getLogger("headrace.messaging.sqlite")

_CAPABILITIES = BrokerCapabilities(
    handback_costs_attempt=False,
    counts_attempts=True,
    ordered=True,
    delayed_nack=True,
    lease_extension=True,
    persistent=True,
)

_SYNCHRONOUS = ("off", "normal", "full", "extra")

_ERRORS: Mapping[type[BaseException], type[HeadraceError]] = {sqlite3.Error: BrokerError}


class _Abandon:
    """A claim whose fetch was cancelled while it ran: its messages must go back."""

    __slots__ = ("cancelled", "messages", "released")

    def __init__(self) -> None:
        self.cancelled = False
        self.released = False
        self.messages: list[Message] = []


class _Waiter:
    __slots__ = ("future", "loop", "topic")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[None], topic: str
    ) -> None:
        self.loop = loop
        self.future = future
        self.topic = topic


# fetches waiting in this process, by database file: a local publish wakes them at once.
_LOCAL_WAITERS: dict[str, set[_Waiter]] = {}
_LOCAL_LOCK = threading.Lock()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# WAL size at which the inline path asks the thread for a checkpoint (SQLite's automatic
# checkpoint starts at 1000 pages of 4 KiB).
_CHECKPOINT_WAL_BYTES = 4 << 20
# How long that checkpoint waits for other connections (ms) before trying again later.
_CHECKPOINT_BUSY_MS = 200

# Loop ticks an ack waits for a claim to carry it before it gets a flush job of its own
# (1 was enough for the worker: 392 of 500 acks got their own transaction, then 1).
_FLUSH_TICKS = 1

# The acks a job committed (or failed to) and the error, settled on the loop's thread.
_AckOutcome = tuple[list["asyncio.Future[None]"], BaseException | None]
# A claim's messages, when the next one is due, and the acks its transaction committed.
_ClaimOutcome = tuple[list[Message], float | None, list["asyncio.Future[None]"]]


def _is_busy(exc: sqlite3.Error) -> bool:
    """Another connection holds the lock we need (SQLITE_BUSY / SQLITE_LOCKED)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _settle(acks: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for done in acks:
        if done.done():
            continue
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)


def _settle_acks(job: asyncio.Future[_AckOutcome]) -> None:
    # Runs on the loop's thread when a flush job returns; flush jobs never raise.
    if not job.cancelled() and job.exception() is None:
        _settle(*job.result())


def _notify_local(path_key: str, topic: str) -> None:
    with _LOCAL_LOCK:
        waiters = [w for w in _LOCAL_WAITERS.get(path_key, ()) if w.topic == topic]
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    for waiter in waiters:
        if waiter.loop is running:
            _wake(waiter.future)
        else:
            try:
                waiter.loop.call_soon_threadsafe(_wake, waiter.future)
            except RuntimeError:  # that loop is closed; its fetch is gone
                pass


class SqliteBroker:
    """A durable broker in one SQLite file, shared by the processes of one machine.

    The embedded default: ``sqlite:///jobs.db`` needs no server, survives restarts and
    crashes (WAL journal), and lets several worker processes consume one topic without
    ever holding the same message at once. Use :class:`MemoryBroker` for tests that need
    no durability, and Redis (or another server broker) when consumers run on several
    machines. Measured here (2 busy shared cores): ``benchmarks/sqlite_broker.py
    --quick``, fetch(100) + ack about 90k msgs/s per process, about half a hand-written
    delete-in-transaction loop on a bare table (the price of a lease that survives a
    crash and lets other processes consume meanwhile); ``benchmarks/worker.py`` (B4,
    7 interleaved rounds), the :class:`~headrace.messaging.Worker` on it at 1.16x a
    hand-written sqlite3 worker loop at concurrency 16, because it needs no task per
    message.

    ``path`` is the database file (created if missing; ``":memory:"`` for a private,
    non-durable one). ``max_deliveries`` (default 20, ``None`` for no cap)
    dead-letters a message delivered that many times without an ack (a consumer crash
    loop); set it above the worker's ``max_attempts``. ``lease`` is the default of
    ``fetch(lease=...)``; ``poll_interval`` (seconds, default 0.1) bounds how late an
    idle ``fetch`` sees a message published by *another process*; ``busy_timeout``
    (seconds, default 30) is how long a statement waits for another process's write
    lock before failing with :class:`~headrace.BrokerError`; ``synchronous`` is SQLite's
    setting (``"normal"``: durable against process crashes, the last transactions may
    roll back on power loss; ``"full"``: durable against power loss, slower). ``inline``
    (default on) runs fetches and acks on the event loop's thread whenever the file's
    write lock is free at that instant (no thread hop; a claim of 100 takes well under a
    millisecond) and on the broker's thread otherwise; ``False`` keeps every statement
    off the loop (a file on slow or network storage). ``time``
    returns Unix seconds (leases, delays; injectable for tests) and ``clock`` drives the
    waiting.

    Safe to share between the tasks of one event loop (operations queue on the
    broker's thread); use one broker per process. Always ``close()`` it (or use
    ``async with``); an unclosed broker emits ``ResourceWarning``.

    Example::

        async with SqliteBroker("jobs.db") as broker:
            await broker.publish("emails", [OutgoingMessage(b'{"to": "a@b.c"}')])
            batch = await broker.fetch("emails", 100, timeout=5.0, lease=30.0)
            ...  # handle them, then
            await broker.ack(batch)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_deliveries: int | None = 20,
        lease: float = 30.0,
        poll_interval: float = 0.1,
        busy_timeout: float = 30.0,
        synchronous: str = "normal",
        inline: bool = True,
        time: Callable[[], float] | None = None,
        clock: Clock | None = None,
    ) -> None:
        max_deliveries = check_max_deliveries(max_deliveries, broker="SqliteBroker")
        self._lease = check_lease(lease, where="SqliteBroker(lease)")
        self._poll_interval = check_lease(poll_interval, where="SqliteBroker(poll_interval)")
        self._busy_timeout = check_lease(busy_timeout, where="SqliteBroker(busy_timeout)")
        if not isinstance(synchronous, str) or synchronous.lower() not in _SYNCHRONOUS:
            raise ConfigurationError(
                f"SqliteBroker(synchronous={synchronous!r}) must be one of "
                f"{', '.join(_SYNCHRONOUS)}",
                code="invalid_configuration",
            )
        self._synchronous = synchronous.lower()
        self._path = os.fspath(path)
        if not self._path:
            raise ConfigurationError("SqliteBroker(path='') names no file", code="invalid_path")
        if self._path == ":memory:":
            self._path_key = f":memory:{id(self)}"
        else:
            self._path_key = os.path.realpath(self._path)
        self._max_deliveries = max_deliveries
        self._time = time if time is not None else _time.time
        self._last_wall = -math.inf
        self._clock = clock if clock is not None else default_clock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="headrace-sqlite")
        self._store = SqliteStore(
            self._path,
            busy_timeout=self._busy_timeout,
            synchronous=self._synchronous,
            max_deliveries=max_deliveries,
        )
        # The loop's own connection: claims and acks run on it at once when the file is
        # free (no thread hop, no GIL hand-off), and go to the thread when it is not.
        # ":memory:" is a database per connection, so it has only the thread's.
        self._inline_store: SqliteStore | None = None
        if inline and self._path != ":memory:":
            self._inline_store = SqliteStore(
                self._path,
                busy_timeout=0.0,
                synchronous=self._synchronous,
                max_deliveries=max_deliveries,
                inline=True,
            )
        # Held while the inline connection is in use (only ever tried, never waited
        # for: a broker used from a second thread takes the thread path instead).
        self._inline_lock = threading.Lock()
        self._inline_commits = 0
        self._checkpoint_queued = False
        self._connected = False
        self._closed = False
        self._waiters: set[_Waiter] = set()
        # Guards what the loop and the broker's thread share: the acks waiting for the
        # thread (the next flush job or claim commits them) and abandoned claims.
        self._lock = threading.Lock()
        self._abandoned: set[_Abandon] = set()
        self._pending_ids: list[int] = []
        self._pending_acks: list[asyncio.Future[None]] = []
        self._flush_queued = False
        # Claims submitted to the thread that have not yet taken the pending acks for
        # the last time: each one commits the acks queued before it, so an ack needs
        # no transaction (nor thread hop) of its own while one is armed.
        self._claims_armed = 0
        # Topics whose last claim filled its batch (either path: set updates are atomic).
        self._full_topics: set[str] = set()

    # -- plumbing ---------------------------------------------------------------------

    @property
    def capabilities(self) -> BrokerCapabilities:
        """Everything supported, persistent."""
        return _CAPABILITIES

    @property
    def path(self) -> str:
        return self._path

    @property
    def max_deliveries(self) -> int | None:
        return self._max_deliveries

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._connected else "new"
        return f"SqliteBroker({self._path!r}, {state})"

    async def __aenter__(self) -> SqliteBroker:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __del__(self) -> None:
        if getattr(self, "_connected", False) and not self._closed:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self, stacklevel=1)
            try:
                self._executor.submit(self._store.close)
            except RuntimeError:
                pass
            if self._inline_store is not None:
                self._inline_store.close()
            self._executor.shutdown(wait=False)

    def _check_open(self, operation: str) -> None:
        if self._closed:
            raise ClosedResourceError(
                f"{operation}() on a closed {self!r}", context={"operation": operation}
            )

    def _wall(self) -> float:
        # Never backwards within this broker (NTP steps), so publish order stays order.
        now = self._time()
        if now < self._last_wall:
            now = self._last_wall
        self._last_wall = now
        return now

    async def _call(self, operation: str, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` on the broker's thread, connecting first if needed."""
        self._check_open(operation)
        if not self._connected:
            await self.connect()
        loop = asyncio.get_running_loop()
        with translate_errors(
            _ERRORS,
            message=lambda exc: f"SQLite {operation}() on {self._path!r} failed: {exc}",
            context={"operation": operation, "path": self._path},
        ):
            return await loop.run_in_executor(self._executor, fn, *args)

    async def connect(self) -> None:
        """Open the file (WAL mode, schema created if missing); idempotent."""
        self._check_open("connect")
        if self._connected:
            return
        loop = asyncio.get_running_loop()
        with translate_errors(
            _ERRORS,
            message=lambda exc: f"cannot open SQLite broker {self._path!r}: {exc}",
            context={"operation": "connect", "path": self._path},
        ):
            await loop.run_in_executor(self._executor, self._open_sync)
        self._connected = True

    def _open_sync(self) -> None:
        self._store.open()
        if self._inline_store is not None:
            self._inline_store.open()

    async def close(self) -> None:
        """Close the connection and the broker's thread (idempotent).

        A ``fetch`` waiting on this broker raises :class:`~headrace.ClosedResourceError`.
        Operations already running finish first. Leased messages stay leased until
        their lease expires (the worker hands them back before closing).
        """
        if self._closed:
            return
        self._closed = True
        for waiter in list(self._waiters):
            _wake(waiter.future)
        try:
            if self._connected:
                # Queued behind the operations already submitted (acks being flushed, a
                # claim), which still need the connection.
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._executor, self._close_sync)
        finally:
            self._executor.shutdown(wait=False)

    def _close_sync(self) -> None:
        # Claims abandoned by cancelled fetches whose hand-back is not through yet.
        with self._lock:
            abandoned = list(self._abandoned)
        for abandon in abandoned:
            self._release_sync(abandon)
        self._store.close()
        if self._inline_store is not None:
            with self._inline_lock:
                self._inline_store.close()

    # -- the inline path ----------------------------------------------------------------

    def _run_inline(self, fn: Callable[..., _T], *args: Any) -> tuple[bool, _T | None]:
        """Run ``fn(inline_store, *args)`` on the loop's thread if the file's write lock
        is free right now: ``(True, result)``; ``(False, None)`` when it is busy (another
        process or our thread holds it), and the caller takes the thread path.

        A claim of 100 is ~0.4 ms of SQLite, less than a thread hop and the GIL
        hand-offs it costs (B4: 0.67x -> 0.89x the hand-written loop, which runs its
        SQL on the loop too). The connection never waits for a lock (busy timeout 0)
        and never checkpoints (see :meth:`_after_inline_write`), so the loop blocks
        only for the statements themselves."""
        store = self._inline_store
        if store is None or store.conn is None or not self._inline_lock.acquire(blocking=False):
            return False, None
        try:
            return True, fn(store, *args)
        except sqlite3.Error as exc:
            if not _is_busy(exc):
                # Not a lock: this connection may be what is broken. The thread's
                # connection takes over for good, and reports the error if it is real.
                logger.warning(
                    "SQLite broker %r: the event loop's connection failed (%s); "
                    "using the broker's thread only",
                    self._path,
                    exc,
                )
                self._inline_store = None
                store.close()
            return False, None
        finally:
            self._inline_lock.release()

    def _after_inline_write(self) -> None:
        # The inline connection does not checkpoint; this does what SQLite's automatic
        # checkpoint would (at ~1000 pages of WAL), on the thread, off the loop.
        self._inline_commits += 1
        if self._inline_commits % 32 or self._checkpoint_queued:
            return
        try:
            size = os.stat(self._path + "-wal").st_size
        except OSError:
            return
        if size < _CHECKPOINT_WAL_BYTES:
            return
        self._checkpoint_queued = True
        job = asyncio.get_running_loop().run_in_executor(self._executor, self._checkpoint_sync)
        job.add_done_callback(self._checkpoint_done)

    def _checkpoint_sync(self) -> None:
        # RESTART, not PASSIVE: a passive checkpoint racing the loop's next commits
        # never catches up, so the WAL never starts over and grows without end. The
        # inline writes meanwhile find the lock busy and queue here, behind it. A short
        # busy timeout: a reader in another process can hold the checkpoint off, and
        # this thread's queue must not wait for it.
        conn = self._store.conn
        if conn is None:
            return
        conn.execute(f"PRAGMA busy_timeout = {_CHECKPOINT_BUSY_MS}")
        try:
            conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        finally:
            conn.execute(f"PRAGMA busy_timeout = {round(self._busy_timeout * 1000)}")

    def _checkpoint_done(self, job: asyncio.Future[None]) -> None:
        self._checkpoint_queued = False
        if not job.cancelled() and job.exception() is not None:
            # The thread's own automatic checkpoints still run; nothing is at stake.
            logger.debug("SQLite checkpoint of %r failed: %s", self._path, job.exception())

    # -- publishing ---------------------------------------------------------------------

    async def publish(self, topic: str, messages: Sequence[OutgoingMessage]) -> list[str]:
        """Append ``messages`` to ``topic`` in one transaction; return their ids in order.

        The ids are returned once the transaction committed (durable per
        ``synchronous``)."""
        self._check_open("publish")
        check_topic(topic)
        outgoing = check_outgoing(topic, messages)
        if not outgoing:
            return []
        now = self._wall()
        rows = [
            (
                topic,
                message.body,
                encode_headers(message.headers),
                message.key,
                now + message.delay,
                now,
            )
            for message in outgoing
        ]
        ids = await self._call("publish", self._store.publish, rows)
        _notify_local(self._path_key, topic)
        return ids

    # -- consuming ----------------------------------------------------------------------

    async def fetch(
        self,
        topic: str,
        max_messages: int,
        *,
        timeout: float,
        lease: float | None = None,
    ) -> list[Message]:
        """Lease up to ``max_messages`` ready messages of ``topic`` (publish order),
        waiting up to ``timeout`` seconds for the first; ``lease`` seconds (default: the
        broker's) until they are delivered again."""
        self._check_open("fetch")
        check_topic(topic)
        lease = self._lease if lease is None else lease
        check_fetch_arguments(max_messages, timeout, lease)
        clock = self._clock
        deadline = clock.now() + timeout
        while True:
            wall = self._wall()
            batch, next_ready = await self._claim(topic, max_messages, wall, lease)
            if batch:
                return batch
            now = clock.now()
            if now >= deadline:
                return []
            wake_at = min(deadline, now + self._poll_interval)
            if next_ready is not None:
                wake_at = min(wake_at, now + max(0.0, next_ready - wall))
            await self._wait(topic, wake_at)
            self._check_open("fetch")

    async def _wait(self, topic: str, wake_at: float) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        waiter = _Waiter(loop, future, topic)
        handle: TimerHandle | None = None
        if math.isfinite(wake_at):
            handle = self._clock.call_at(wake_at, lambda: _wake(future))
        with _LOCAL_LOCK:
            _LOCAL_WAITERS.setdefault(self._path_key, set()).add(waiter)
        self._waiters.add(waiter)
        try:
            await future
        finally:
            if handle is not None:
                handle.cancel()
            self._waiters.discard(waiter)
            with _LOCAL_LOCK:
                local = _LOCAL_WAITERS.get(self._path_key)
                if local is not None:
                    local.discard(waiter)
                    if not local:
                        del _LOCAL_WAITERS[self._path_key]

    async def _claim(
        self, topic: str, limit: int, now: float, lease: float
    ) -> tuple[list[Message], float | None]:
        self._check_open("fetch")
        if not self._connected:
            await self.connect()
        token = new_token()
        abandon = _Abandon()
        ran, outcome = self._run_inline(
            self._claim_on, topic, limit, now, now + lease, token, abandon, False
        )
        if ran:
            assert outcome is not None
            messages, due, acks = outcome
            _settle(acks, None)
            self._after_inline_write()
            return messages, due
        loop = asyncio.get_running_loop()
        with self._lock:
            self._claims_armed += 1
        try:
            # Shielded below, so the job always runs once submitted (and disarms).
            future = loop.run_in_executor(
                self._executor, self._claim_sync, topic, limit, now, now + lease, token, abandon
            )
        except BaseException:
            with self._lock:
                self._claims_armed -= 1
            raise
        future.add_done_callback(self._after_claim)
        try:
            with translate_errors(
                _ERRORS,
                message=lambda exc: f"SQLite fetch() on {self._path!r} failed: {exc}",
                context={"operation": "fetch", "path": self._path, "topic": topic},
            ):
                messages, due, _ = await asyncio.shield(future)
                return messages, due
        except asyncio.CancelledError:
            # The claim may commit after we stop waiting: its messages go back at once
            # (not after their lease), by the claim's own job if it sees the flag in
            # time, else by a hand-back queued when it returns.
            with self._lock:
                abandon.cancelled = True
                self._abandoned.add(abandon)
            future.add_done_callback(functools.partial(self._release_orphans, abandon))
            raise

    def _after_claim(self, future: asyncio.Future[_ClaimOutcome]) -> None:
        # On the loop's thread: settle the acks the claim committed, or, if it failed,
        # make sure they are retried by a flush job (the claim put them back).
        if future.cancelled():
            return
        if future.exception() is None:
            _settle(future.result()[2], None)
        else:
            self._schedule_ack_flush()

    def _release_orphans(self, abandon: _Abandon, future: asyncio.Future[_ClaimOutcome]) -> None:
        if abandon.released:
            return
        try:
            self._executor.submit(self._release_sync, abandon)
        except RuntimeError:  # closed: _close_sync released it already
            pass

    def _release_sync(self, abandon: _Abandon) -> None:
        """Hand an abandoned claim's messages back (on the thread; idempotent)."""
        with self._lock:
            self._abandoned.discard(abandon)
            if abandon.released or not abandon.messages or self._store.conn is None:
                return
            abandon.released = True
        try:
            self._store.release(abandon.messages, None, 0)
        except Exception:  # the leases expire instead; never lost
            pass

    def _claim_sync(
        self, topic: str, limit: int, now: float, until: float, token: int, abandon: _Abandon
    ) -> _ClaimOutcome:
        return self._claim_on(self._store, topic, limit, now, until, token, abandon, True)

    def _claim_on(
        self,
        store: SqliteStore,
        topic: str,
        limit: int,
        now: float,
        until: float,
        token: int,
        abandon: _Abandon,
        armed: bool,
    ) -> _ClaimOutcome:
        # A thread job is armed (counted in _claims_armed) until its last take of the
        # pending acks: acks queued meanwhile rely on it to commit them, on every path
        # out. An inline claim is never armed: nothing can queue while it runs.
        taken_ids: list[int] = []
        taken_acks: list[asyncio.Future[None]] = []

        def take_acks(last: bool = False) -> list[int]:
            nonlocal armed
            ids, acks = self._take_acks(disarm=last and armed)
            if last:
                armed = False
            taken_ids.extend(ids)
            taken_acks.extend(acks)
            return ids

        try:
            # A read first (no write lock): idle consumers must not queue on the lock.
            # Skipped right after a full batch, when more are likely ready: there it
            # cost as much as the claim's own SELECT (benchmarks/worker.py, B4).
            if topic not in self._full_topics and not store.ready(topic, now):
                due = store.next_due(topic)
                if take_acks(last=True):
                    store.delete(taken_ids)
                return [], due, taken_acks
            messages = store.claim(topic, limit, now, until, token, take_acks)
        except Exception:
            with self._lock:
                if armed:
                    self._claims_armed -= 1
                if taken_ids:  # the acks did not commit: they wait for the next flush
                    self._pending_ids[:0] = taken_ids
                    self._pending_acks[:0] = taken_acks
            raise
        due = None
        if len(messages) >= limit:
            self._full_topics.add(topic)
        else:
            self._full_topics.discard(topic)
            if not messages:
                try:
                    due = store.next_due(topic)
                except Exception:  # the fetch waits poll_interval instead
                    pass
        abandon.messages = messages
        if abandon.cancelled:
            self._release_sync(abandon)
        return messages, due, taken_acks

    async def ack(self, messages: Sequence[Message]) -> None:
        """Delete handled messages for good, even if their lease expired meanwhile.

        Returns once the deletion committed. The deletion joins the transaction of a
        claim queued on the broker's thread or starting within one loop tick; acks
        that arrive while the thread is busy are committed together (group commit):
        one transaction instead of one per call."""
        self._check_open("ack")
        ids = [int(m.id) for m in messages]
        if not ids:
            return
        if not self._connected:
            await self.connect()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._pending_ids.extend(ids)
            self._pending_acks.append(done)
            armed = self._claims_armed > 0
        if not armed:  # else the claim on its way commits them in its transaction
            self._schedule_ack_flush_soon(loop, _FLUSH_TICKS)
        with translate_errors(
            _ERRORS,
            message=lambda exc: f"SQLite ack() on {self._path!r} failed: {exc}",
            context={"operation": "ack", "path": self._path},
        ):
            await done

    def _schedule_ack_flush_soon(self, loop: asyncio.AbstractEventLoop, ticks: int) -> None:
        # A worker acks a batch and fetches the next one in the same few loop ticks,
        # the ack usually first: waiting those ticks lets the claim carry the acks in
        # its transaction (one commit, no flush job) instead of two back to back.
        if ticks > 0:
            loop.call_soon(self._schedule_ack_flush_soon, loop, ticks - 1)
        else:
            self._schedule_ack_flush()

    def _schedule_ack_flush(self) -> None:
        with self._lock:
            if self._flush_queued or not self._pending_acks or self._claims_armed > 0:
                return
        ran, outcome = self._run_inline(self._flush_on)
        if ran:
            assert outcome is not None
            _settle(*outcome)
            self._after_inline_write()
            return
        with self._lock:
            if self._flush_queued or not self._pending_acks or self._claims_armed > 0:
                return
            self._flush_queued = True
        loop = asyncio.get_running_loop()
        try:
            # run_in_executor (not executor.submit): the virtual clock waits for it.
            job = loop.run_in_executor(self._executor, self._flush_acks_sync)
        except RuntimeError:  # the thread is gone (closed): these acks cannot commit
            _settle(self._take_acks()[1], ClosedResourceError(f"ack() on a closed {self!r}"))
            return
        job.add_done_callback(_settle_acks)

    def _take_acks(self, *, disarm: bool = False) -> tuple[list[int], list[asyncio.Future[None]]]:
        with self._lock:
            if disarm:
                self._claims_armed -= 1
            ids, self._pending_ids = self._pending_ids, []
            acks, self._pending_acks = self._pending_acks, []
        return ids, acks

    def _flush_on(self, store: SqliteStore) -> _AckOutcome:
        """Delete the pending acks inline; on failure put them back for the thread."""
        ids, acks = self._take_acks()
        if not ids:
            return acks, None
        try:
            store.delete(ids)
        except sqlite3.Error:
            # Back in the queue for the thread's flush job (see _run_inline).
            with self._lock:
                self._pending_ids[:0] = ids
                self._pending_acks[:0] = acks
            raise
        return acks, None

    def _flush_acks_sync(self) -> _AckOutcome:
        with self._lock:
            self._flush_queued = False
            # One thread runs the jobs in order: an armed claim is queued behind this
            # job and commits these acks with its claim, one transaction for both.
            if self._claims_armed > 0:
                return [], None
        ids, acks = self._take_acks()
        if not ids:
            return acks, None
        try:
            self._store.delete(ids)
        except Exception as exc:
            return acks, exc
        return acks, None

    async def nack(self, messages: Sequence[Message], *, delay: float = 0.0) -> None:
        """Return messages for a retry after ``delay`` seconds, counting an attempt.

        Messages no longer held by this delivery (lease expired and taken by another
        consumer, acked) are left alone."""
        self._check_open("nack")
        if (
            isinstance(delay, bool)
            or not isinstance(delay, int | float)
            or not math.isfinite(delay)
            or delay < 0
        ):
            raise ConfigurationError(
                f"nack(delay={delay!r}) must be finite seconds >= 0", code="invalid_nack"
            )
        if messages:
            ready_at = self._wall() + delay
            await self._call("nack", self._store.release, list(messages), ready_at, 1)
            for topic in {m.topic for m in messages}:
                _notify_local(self._path_key, topic)

    async def hand_back(self, messages: Sequence[Message]) -> None:
        """Return fetched-but-unhandled messages at once, to their place in the order,
        without counting an attempt."""
        self._check_open("hand_back")
        if messages:
            await self._call("hand_back", self._store.release, list(messages), None, 0)
            for topic in {m.topic for m in messages}:
                _notify_local(self._path_key, topic)

    async def extend_lease(self, messages: Sequence[Message], lease: float) -> None:
        """Renew the leases of messages still held by this delivery to ``lease`` s from now."""
        self._check_open("extend_lease")
        check_lease(lease, where="extend_lease(lease)")
        if messages:
            until = self._wall() + lease
            await self._call("extend_lease", self._store.extend, list(messages), until)

    # -- dead letters -------------------------------------------------------------------

    async def dead_letter(self, message: Message, error: Mapping[str, Any]) -> None:
        """Move ``message`` and its JSON ``error`` record to the dead-letter table in one
        transaction. A message already acked or dead-lettered is not stored twice."""
        self._check_open("dead_letter")
        encoded = check_error_record(error).decode()
        await self._call("dead_letter", self._store.dead_letter, message, encoded, self._wall())

    async def dead_letters(self, topic: str, *, limit: int = 100) -> list[DeadLetter]:
        """The newest ``limit`` dead letters of ``topic``, newest first."""
        self._check_open("dead_letters")
        check_topic(topic)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigurationError(
                f"dead_letters(limit={limit!r}) must be an integer >= 1", code="invalid_limit"
            )
        return await self._call("dead_letters", self._store.dead_letters, topic, limit)

    async def topic_stats(self, topic: str) -> TopicStats:
        """Counts of the topic's ready, delayed, in-flight and dead-lettered messages."""
        self._check_open("topic_stats")
        check_topic(topic)
        return await self._call("topic_stats", self._store.topic_stats, topic, self._wall())

    async def replay_dead_letters(self, topic: str, ids: Sequence[str] | None = None) -> int:
        """Publish dead letters of ``topic`` again as new messages (attempt 1, same body,
        key and headers), all of them or those whose message id is in ``ids``, in one
        transaction; return how many. They leave the dead-letter table."""
        self._check_open("replay_dead_letters")
        check_topic(topic)
        wanted = None if ids is None else [str(i) for i in ids]
        count = await self._call(
            "replay_dead_letters", self._store.replay, topic, wanted, self._wall()
        )
        if count:
            _notify_local(self._path_key, topic)
        return count
