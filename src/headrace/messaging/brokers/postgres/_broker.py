"""PostgresBroker: the Broker operations on one PostgreSQL table (see the package doc).

Publish; the fetch path (a claim that also deletes the acks waiting for it, then, only
when it found nothing, the time the next message is due, and a wait for that, a
notification or ``poll_interval``); ack, nack, hand-back, lease extension, dead
letters and their replay.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import psycopg

from ...._cancel import shielded
from ...._errors import ClosedResourceError, ConfigurationError
from ..._broker import DeadLetter, Message, OutgoingMessage, TopicStats
from .. import (
    check_dead_letters_limit,
    check_error_record,
    check_fetch_arguments,
    check_lease,
    check_nack_delay,
    check_outgoing,
    check_topic,
    max_deliveries_record,
)
from ._connection import CLEANUP_TIMEOUT, Connection, _PostgresConnection

__all__ = ["PostgresBroker"]

# Loop ticks an ack waits for a claim to carry it before it is deleted on its own (the
# worker acks a batch and fetches the next one within a tick or two).
_FLUSH_TICKS = 1
# How much later than the server said a fetch looks again for a delayed message or an
# expired lease (its clock and ours tick apart by the time replies take), and how long
# it waits at least when the next message is due already but was not claimable (rows
# another consumer's claim holds locked for a moment).
_DUE_MARGIN = 0.002
_MIN_WAIT = 0.01

_decode_json = msgspec.json.decode
_encode_json = msgspec.json.encode


def _settle(acks: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for done in acks:
        if done.done():
            continue
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)


def _int_array(values: Sequence[int]) -> str:
    """An ``int8[]`` literal: one parameter type whatever the values' size (psycopg
    would send ``int2[]``, ``int4[]`` or ``int8[]`` and prepare a statement for each)."""
    return "{" + ",".join(map(str, values)) + "}"


def _new_token() -> int:
    """A lease token: random, never 0 (which means "no lease"), and always big enough
    to be sent as an ``int8`` (one prepared statement, not one per integer size)."""
    return secrets.randbits(61) | (1 << 61)


class PostgresBroker(_PostgresConnection):
    """A :class:`~headrace.messaging.Broker` on a PostgreSQL table, for many machines.

    ``conninfo`` is a libpq URL (``postgresql://user:password@host:5432/dbname``,
    ``postgres://``) or a ``key=value`` conninfo string; a URL's query may also set this
    class's options (``?prefix=billing_&lease=60``), and keyword arguments win over it.
    The tables are ``<prefix>messages`` and ``<prefix>dead_letters`` (default prefix
    ``headrace_``) in ``schema`` (default: the connection's ``search_path``), created
    on first connect when missing. ``lease`` (default 30 s) is the default of
    ``fetch(lease=...)``. ``max_deliveries`` (default 20, ``None`` for no cap)
    dead-letters a message delivered that many times without an ack (set it above the
    worker's ``max_attempts``). ``poll_interval`` (default 1 s) bounds how late an idle
    ``fetch`` sees a message if a notification was lost (the listen connection was
    down); normally a publish from any process wakes it at once (LISTEN/NOTIFY).
    ``connect_timeout`` (seconds, default 10) bounds each connection attempt;
    ``command_timeout`` (seconds, default 30; ``None`` for none) is how long a
    statement may wait for the server's reply before its connection is given up as
    dead (a hung server or a partition) and the operation fails with
    :class:`~headrace.BrokerConnectionError`; the next one reconnects. Other
    keyword arguments go to :func:`psycopg.AsyncConnection.connect` (``sslmode``,
    ``application_name``...). ``clock`` paces fetch timeouts and waits; leases and
    delays run on the server's clock.

    Measured here (``benchmarks/worker_postgres.py``, B7, 50k messages): the
    :class:`~headrace.messaging.Worker` on it at concurrency 16 ran at 1.50x a
    hand-written lease + batch delete loop and 1.15x a ``SKIP LOCKED``
    delete-in-transaction loop, because an ack rides in the next claim's statement.

    Safe to share between the tasks of one event loop (statements queue for the one
    work connection); use one broker per process. Always ``close()`` it (or use
    ``async with``); an unclosed broker emits ``ResourceWarning``.

    Example::

        async with PostgresBroker("postgresql://app@db/jobs") as broker:
            await broker.publish("emails", [OutgoingMessage(b'{"to": "a@b.c"}')])
            batch = await broker.fetch("emails", 100, timeout=5.0, lease=30.0)
            ...  # handle them, then
            await broker.ack(batch)
    """

    def __init__(self, conninfo: str, **options: Any) -> None:
        super().__init__(conninfo, **options)
        # Acks waiting to be deleted: by the next claim (in its statement) or a flush.
        self._pending_ids: list[int] = []
        self._pending_acks: list[asyncio.Future[None]] = []
        self._flush_task: asyncio.Task[None] | None = None
        # Claims waiting for the work connection: a flush leaves its acks to them.
        self._claims_waiting = 0

    # -- publish ---------------------------------------------------------------------

    async def publish(self, topic: str, messages: Sequence[OutgoingMessage]) -> list[str]:
        """Insert ``messages`` into ``topic`` in one statement; return their ids in order.

        The ids are returned once the insert committed; the same commit notifies the
        fetches waiting for ``topic`` in every process."""
        self._check_open("publish")
        check_topic(topic)
        outgoing = check_outgoing(topic, messages)
        if not outgoing:
            return []
        params = {
            "topic": topic,
            "bodies": [message.body for message in outgoing],
            "headers": [
                _encode_json(dict(message.headers)).decode() if message.headers else None
                for message in outgoing
            ],
            "keys": [message.key for message in outgoing],
            "delays": [float(message.delay) for message in outgoing],
            "channel": self._sql.channel,
        }

        async def work(conn: Connection) -> list[str]:
            cursor = await conn.execute(self._sql.publish, params)
            row = await cursor.fetchone()
            assert row is not None
            return [str(message_id) for message_id in row[0]]

        return await self._run("publish", work, topic=topic)

    # -- fetch -----------------------------------------------------------------------

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
        broker's) until they are delivered again.

        Cancel-safe: if the caller is cancelled while the claim runs, the claimed
        messages are handed back before the cancellation propagates."""
        self._check_open("fetch")
        check_topic(topic)
        lease = self._lease if lease is None else lease
        check_fetch_arguments(max_messages, timeout, lease)
        if not self._connected:
            await self.connect()
        clock = self._clock
        deadline = clock.now() + timeout
        loop = asyncio.get_running_loop()
        while True:
            # Listening before the claim: a publish that commits after the claim's
            # snapshot wakes this wait instead of going unnoticed.
            woken: asyncio.Future[None] = loop.create_future()
            waiters = self._waiters.setdefault(topic, set())
            waiters.add(woken)
            try:
                batch, due = await self._claim_cancel_safe(topic, max_messages, float(lease))
                if batch:
                    return batch
                now = clock.now()
                if now >= deadline:
                    return []
                wake_at = min(deadline, now + self._poll_interval)
                if due is not None:
                    wake_at = min(wake_at, now + max(due + _DUE_MARGIN, _MIN_WAIT))
                await self._wait(woken, wake_at)
            finally:
                waiters.discard(woken)
                if not waiters and self._waiters.get(topic) is waiters:
                    del self._waiters[topic]
            self._check_open("fetch")

    async def _claim_cancel_safe(
        self, topic: str, limit: int, lease: float
    ) -> tuple[list[Message], float | None]:
        inner = asyncio.ensure_future(self._claim(topic, limit, lease))
        try:
            return await asyncio.shield(inner)
        except asyncio.CancelledError:
            # The claim may have leased a batch the caller will never see: give it back
            # now rather than after the lease.
            await shielded(self._hand_back_claimed(inner), timeout=CLEANUP_TIMEOUT)
            raise

    async def _hand_back_claimed(
        self, inner: asyncio.Future[tuple[list[Message], float | None]]
    ) -> None:
        try:
            messages, _ = await inner
        except Exception:
            return
        if messages:
            try:
                await self._release("hand_back", messages, None)
            except Exception:
                # The database is gone or the broker closed: the batch comes back when
                # its lease expires. Raising here would replace the cancellation.
                pass

    async def _claim(
        self, topic: str, limit: int, lease: float
    ) -> tuple[list[Message], float | None]:
        """Claim up to ``limit`` messages; with none, also say when the next one is due
        (seconds from now, ``None``: the topic is empty). Deletes the pending acks in
        the claim's statement."""
        self._claims_waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self._claims_waiting -= 1
        try:
            self._check_open("fetch")
            with self._translated("fetch", topic):
                conn = await self._work_connection()
                return await self._answered(
                    conn, lambda conn: self._claim_or_next_due(conn, topic, limit, lease)
                )
        finally:
            self._lock.release()
            if self._pending_acks and self._flush_task is None and not self._closed:
                # This claim failed before it took them: they need a flush of their own.
                self._flush_task = asyncio.create_task(self._flush(), name="headrace-pg-ack")

    async def _claim_or_next_due(
        self, conn: Connection, topic: str, limit: int, lease: float
    ) -> tuple[list[Message], float | None]:
        messages = await self._claim_locked(conn, topic, limit, lease)
        if messages:
            return messages, None
        try:
            cursor = await conn.execute(self._sql.next_due, {"topic": topic})
            row = await cursor.fetchone()
        except psycopg.Error:
            if conn.closed:
                raise
            # Not worth failing the fetch for: it waits poll_interval instead.
            return [], None
        return [], None if row is None or row[0] is None else float(row[0])

    async def _claim_locked(
        self, conn: Connection, topic: str, limit: int, lease: float
    ) -> list[Message]:
        cap = self._max_deliveries
        kept: list[Message] = []
        while True:
            acked, acks = self._take_acks()
            token = _new_token()
            params = {
                "acked": _int_array(acked),
                "topic": topic,
                "limit": limit - len(kept),
                "lease": lease,
                "token": token,
            }
            try:
                cursor = await conn.execute(self._sql.claim, params, prepare=True, binary=True)
                rows = await cursor.fetchall()
            except BaseException:
                # The acks did not commit: they wait for a flush of their own.
                self._return_acks(acked, acks)
                raise
            _settle(acks, None)
            # Positional arguments: the claim builds one Message per row (hot path).
            messages = [
                Message(
                    str(message_id),
                    topic,
                    body,
                    _decode_json(headers) if headers else {},
                    attempt,
                    key,
                    token,
                )
                for message_id, body, headers, key, attempt in rows
            ]
            if cap is None or all(message.attempt <= cap for message in messages):
                return kept + messages
            over = [message for message in messages if message.attempt > cap]
            kept += [message for message in messages if message.attempt <= cap]
            try:
                await self._bury(conn, topic, over, token, cap)
            except psycopg.Error:
                if not kept:
                    raise
                # Deliver what this fetch holds; the others stay leased to it and are
                # dead-lettered by a claim after their lease.
                return kept
            if len(kept) >= limit:
                return kept

    async def _bury(
        self, conn: Connection, topic: str, messages: list[Message], token: int, cap: int
    ) -> None:
        """Dead-letter messages a claim found past ``max_deliveries`` (leased to it)."""
        errors = [
            _encode_json(
                max_deliveries_record(topic, message.id, message.attempt - 1, cap)
            ).decode()
            for message in messages
        ]
        await conn.execute(
            self._sql.bury,
            {
                "ids": _int_array([int(message.id) for message in messages]),
                "errors": errors,
                "token": token,
            },
        )

    # -- ack -------------------------------------------------------------------------

    @staticmethod
    def _ids(messages: Sequence[Message], operation: str) -> list[int]:
        try:
            return [int(message.id) for message in messages]
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"{operation}(): message ids of a PostgresBroker are integers; got "
                f"{[message.id for message in messages][:5]!r}",
                code="invalid_message_receipt",
            ) from None

    async def ack(self, messages: Sequence[Message]) -> None:
        """Delete handled messages for good, even if their lease expired meanwhile.

        Returns once the deletion committed. It rides in the statement of the next
        claim when one is waiting for the connection or starts within a loop tick
        (the worker acks a batch as it fetches the next: one round trip and one commit
        for both); acks that arrive while a statement runs are deleted together."""
        self._check_open("ack")
        ids = self._ids(messages, "ack")
        if not ids:
            return
        if not self._connected:
            await self.connect()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending_ids += ids
        self._pending_acks.append(done)
        if self._flush_task is None:
            self._flush_task = asyncio.create_task(self._flush(), name="headrace-pg-ack")
        await done

    def _take_acks(self) -> tuple[list[int], list[asyncio.Future[None]]]:
        ids, self._pending_ids = self._pending_ids, []
        acks, self._pending_acks = self._pending_acks, []
        return ids, acks

    def _return_acks(self, ids: list[int], acks: list[asyncio.Future[None]]) -> None:
        if not acks:
            return
        self._pending_ids[:0] = ids
        self._pending_acks[:0] = acks
        if self._flush_task is None:
            self._flush_task = asyncio.create_task(self._flush(), name="headrace-pg-ack")

    async def _flush(self, ticks: int = _FLUSH_TICKS) -> None:
        """Delete the pending acks, unless a claim waiting for the connection takes them."""
        for _ in range(ticks):
            await asyncio.sleep(0)
        async with self._lock:
            self._flush_task = None
            if self._claims_waiting and not self._closed:
                return  # the claim next in line deletes them in its statement
            ids, acks = self._take_acks()
            if not acks:
                return
            try:
                with self._translated("ack"):
                    ids_literal = _int_array(ids)

                    async def delete(conn: Connection) -> None:
                        await conn.execute(self._sql.delete, {"ids": ids_literal})

                    conn = await self._work_connection()
                    try:
                        await self._answered(conn, delete)
                    except psycopg.OperationalError:
                        if not conn.closed:
                            raise
                        # A connection that died while idle: once more on a fresh one.
                        conn = await self._work_connection()
                        await self._answered(conn, delete)
            except Exception as exc:
                _settle(acks, exc)
            except BaseException:
                # Cancelled: only close does that, when the database does not answer.
                _settle(acks, self._closed_error("ack"))
                raise
            else:
                _settle(acks, None)

    # -- settle ----------------------------------------------------------------------

    async def nack(self, messages: Sequence[Message], *, delay: float = 0.0) -> None:
        """Return messages for a retry after ``delay`` seconds, counting an attempt.

        Messages no longer held by this delivery (lease expired and taken by another
        consumer, acked) are left alone."""
        self._check_open("nack")
        check_nack_delay(delay)
        await self._release("nack", messages, float(delay))

    async def hand_back(self, messages: Sequence[Message]) -> None:
        """Return fetched-but-unhandled messages at once, to their place in the order,
        without counting an attempt."""
        self._check_open("hand_back")
        await self._release("hand_back", messages, None)

    async def _release(
        self, operation: str, messages: Sequence[Message], delay: float | None
    ) -> None:
        ids = self._ids(messages, operation)
        current = [
            (message_id, message.receipt)
            for message_id, message in zip(ids, messages, strict=True)
            if isinstance(message.receipt, int)
        ]
        if not current:
            return
        params = {
            "ids": _int_array([message_id for message_id, _ in current]),
            "tokens": _int_array([token for _, token in current]),
            "delay": delay,
            "channel": self._sql.channel,
        }
        statement = self._sql.hand_back if delay is None else self._sql.nack

        async def work(conn: Connection) -> None:
            await conn.execute(statement, params)

        await self._run(operation, work, repeatable=True)

    async def extend_lease(self, messages: Sequence[Message], lease: float) -> None:
        """Renew the leases of messages still held by this delivery to ``lease`` s from now."""
        self._check_open("extend_lease")
        check_lease(lease, where="extend_lease(lease)")
        ids = self._ids(messages, "extend_lease")
        current = [
            (message_id, message.receipt)
            for message_id, message in zip(ids, messages, strict=True)
            if isinstance(message.receipt, int)
        ]
        if not current:
            return
        params = {
            "ids": _int_array([message_id for message_id, _ in current]),
            "tokens": _int_array([token for _, token in current]),
            "lease": float(lease),
        }

        async def work(conn: Connection) -> None:
            await conn.execute(self._sql.extend, params)

        await self._run("extend_lease", work, repeatable=True)

    # -- dead letters ----------------------------------------------------------------

    async def dead_letter(self, message: Message, error: Mapping[str, Any]) -> None:
        """Move ``message`` and its JSON ``error`` record to the dead-letter table in one
        statement. A message already acked or dead-lettered is not stored twice."""
        self._check_open("dead_letter")
        encoded = check_error_record(error).decode()
        [message_id] = self._ids([message], "dead_letter")
        params = {"id": message_id, "attempt": message.attempt, "error": encoded}

        async def work(conn: Connection) -> None:
            await conn.execute(self._sql.dead_letter, params)

        await self._run("dead_letter", work, topic=message.topic, repeatable=True)

    async def dead_letters(self, topic: str, *, limit: int = 100) -> list[DeadLetter]:
        """The newest ``limit`` dead letters of ``topic``, newest first
        (``dead_lettered_at``: the server's Unix time in seconds)."""
        self._check_open("dead_letters")
        check_topic(topic)
        check_dead_letters_limit(limit)

        async def work(conn: Connection) -> list[Any]:
            cursor = await conn.execute(self._sql.dead_letters, {"topic": topic, "limit": limit})
            return await cursor.fetchall()

        rows = await self._run("dead_letters", work, topic=topic)
        return [
            DeadLetter(
                Message(
                    id=message_id,
                    topic=topic,
                    body=bytes(body),
                    headers=_decode_json(headers) if headers else {},
                    attempt=attempt,
                    key=key,
                ),
                _decode_json(error),
                at,
            )
            for message_id, body, headers, key, attempt, error, at in rows
        ]

    async def replay_dead_letters(self, topic: str, ids: Sequence[str] | None = None) -> int:
        """Publish dead letters of ``topic`` again as new messages (attempt 1, same body,
        key and headers, a new id), all of them or those whose message id is in
        ``ids``, in one statement; return how many. They leave the dead-letter table."""
        self._check_open("replay_dead_letters")
        check_topic(topic)
        params = {
            "topic": topic,
            "ids": None if ids is None else [str(i) for i in ids],
            "channel": self._sql.channel,
        }

        async def work(conn: Connection) -> int:
            cursor = await conn.execute(self._sql.replay, params)
            row = await cursor.fetchone()
            return 0 if row is None else int(row[0])

        return await self._run("replay_dead_letters", work, topic=topic)

    async def topic_stats(self, topic: str) -> TopicStats:
        """Counts of the topic's ready, delayed, in-flight and dead-lettered messages
        (one statement: one snapshot)."""
        self._check_open("topic_stats")
        check_topic(topic)

        async def work(conn: Connection) -> Any:
            cursor = await conn.execute(self._sql.topic_stats, {"topic": topic})
            return await cursor.fetchone()

        ready, delayed, in_flight, dead = await self._run("topic_stats", work, topic=topic)
        return TopicStats(topic, ready, delayed, in_flight, dead)

    # -- close -----------------------------------------------------------------------

    async def close(self) -> None:
        """Delete the pending acks, stop listening, close the connections (idempotent).

        A ``fetch`` waiting on this broker raises :class:`~headrace.ClosedResourceError`.
        Leased messages stay leased until their lease expires (the worker hands them
        back before closing)."""
        if self._closed:
            return
        self._closed = True
        self._wake_all()
        try:
            await self._stop_listener()
            flush = self._flush_task
            if flush is None and self._pending_acks:
                flush = asyncio.create_task(self._flush(0), name="headrace-pg-ack")
            if flush is not None:
                _, pending = await asyncio.wait({flush}, timeout=CLEANUP_TIMEOUT)
                for task in pending:
                    task.cancel()
                    await asyncio.wait({task})
        finally:
            async with self._lock:
                _settle(self._take_acks()[1], self._closed_error("ack"))
                await self._close_work()

    def _closed_error(self, operation: str) -> BaseException:
        return ClosedResourceError(f"{operation}() on a closed {self!r}")
