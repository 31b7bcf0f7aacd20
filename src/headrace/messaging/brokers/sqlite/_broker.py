"""SqliteBroker: the Broker operations on one SQLite file (see the package doc).

Publish; the fetch path (a claim, inline or on the thread, that also deletes the acks
waiting for it; a fetch cancelled mid-claim hands the claim back; an idle fetch waits
for the next due message, a local publish or ``poll_interval``); acks, which ride on
the next claim or commit together; nack, hand-back, lease extension, dead letters and
their replay.
"""

from __future__ import annotations

import asyncio
import functools
import math
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from ...._clock import TimerHandle
from ...._errors import ClosedResourceError, translate_errors
from ..._broker import DeadLetter, Message, OutgoingMessage, TopicStats
from .. import (
    check_dead_letters_limit,
    check_error_record,
    check_fetch_arguments,
    check_lease,
    check_nack_delay,
    check_outgoing,
    check_topic,
)
from ._connection import ERRORS, Abandon, _SqliteConnection
from ._store import SqliteStore, encode_headers, new_token
from ._wakeups import LOCAL_LOCK, LOCAL_WAITERS, Waiter, notify_local, wake

__all__ = ["SqliteBroker"]

# Loop ticks an ack waits for a claim to carry it before it gets a flush job of its own
# (1 was enough for the worker: 392 of 500 acks got their own transaction, then 1).
_FLUSH_TICKS = 1

# The acks a job committed (or failed to) and the error, settled on the loop's thread.
_AckOutcome = tuple[list["asyncio.Future[None]"], BaseException | None]
# A claim's messages, when the next one is due, and the acks its transaction committed.
_ClaimOutcome = tuple[list[Message], float | None, list["asyncio.Future[None]"]]


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


class SqliteBroker(_SqliteConnection):
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
        notify_local(self._path_key, topic)
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
        waiter = Waiter(loop, future, topic)
        handle: TimerHandle | None = None
        if math.isfinite(wake_at):
            handle = self._clock.call_at(wake_at, lambda: wake(future))
        with LOCAL_LOCK:
            LOCAL_WAITERS.setdefault(self._path_key, set()).add(waiter)
        self._waiters.add(waiter)
        try:
            await future
        finally:
            if handle is not None:
                handle.cancel()
            self._waiters.discard(waiter)
            with LOCAL_LOCK:
                local = LOCAL_WAITERS.get(self._path_key)
                if local is not None:
                    local.discard(waiter)
                    if not local:
                        del LOCAL_WAITERS[self._path_key]

    async def _claim(
        self, topic: str, limit: int, now: float, lease: float
    ) -> tuple[list[Message], float | None]:
        self._check_open("fetch")
        if not self._connected:
            await self.connect()
        token = new_token()
        abandon = Abandon()
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
                ERRORS,
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

    def _release_orphans(self, abandon: Abandon, future: asyncio.Future[_ClaimOutcome]) -> None:
        if abandon.released:
            return
        try:
            self._executor.submit(self._release_sync, abandon)
        except RuntimeError:  # closed: _close_sync released it already
            pass

    def _claim_sync(
        self, topic: str, limit: int, now: float, until: float, token: int, abandon: Abandon
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
        abandon: Abandon,
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
            ERRORS,
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
        check_nack_delay(delay)
        if messages:
            ready_at = self._wall() + delay
            await self._call("nack", self._store.release, list(messages), ready_at, 1)
            for topic in {m.topic for m in messages}:
                notify_local(self._path_key, topic)

    async def hand_back(self, messages: Sequence[Message]) -> None:
        """Return fetched-but-unhandled messages at once, to their place in the order,
        without counting an attempt."""
        self._check_open("hand_back")
        if messages:
            await self._call("hand_back", self._store.release, list(messages), None, 0)
            for topic in {m.topic for m in messages}:
                notify_local(self._path_key, topic)

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
        check_dead_letters_limit(limit)
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
            notify_local(self._path_key, topic)
        return count
