"""The SQLite broker's file, seen from one connection: the schema and every statement.

:class:`SqliteStore` is synchronous and owns one ``sqlite3`` connection; the broker's
dedicated thread calls it, and so does the event loop for the inline store (see the
package doc for the design notes, ``_connection`` and ``_broker`` for the asyncio
side). Keeping the SQL here keeps the async code about waiting, wake-ups and group
commit, and lets the statements be read (and measured) on their own.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import msgspec

from ...._errors import BrokerError
from ..._broker import DeadLetter, Message, TopicStats
from .. import max_deliveries_record

__all__ = ["SqliteStore", "encode_headers", "new_token"]

_T = TypeVar("_T")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS headrace_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, so a stale ack cannot hit a newer row
    topic TEXT NOT NULL,
    body BLOB NOT NULL,
    headers TEXT,                          -- JSON object, NULL when empty
    key TEXT,
    ready_at REAL NOT NULL,                -- Unix seconds: deliverable from
    attempt INTEGER NOT NULL DEFAULT 1,    -- attempt number of the next or current delivery
    lease_token INTEGER NOT NULL DEFAULT 1152921504606846976,  -- last delivery (2**60: none)
    lease_until REAL NOT NULL DEFAULT -0.5,  -- Unix seconds: lease expiry (-0.5: none)
    published_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS headrace_messages_ready ON headrace_messages (topic, ready_at);
CREATE TABLE IF NOT EXISTS headrace_dead_letters (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    body BLOB NOT NULL,
    headers TEXT,
    key TEXT,
    attempt INTEGER NOT NULL,
    error TEXT NOT NULL,                   -- JSON error record (HeadraceError.to_dict())
    dead_lettered_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS headrace_dead_letters_topic ON headrace_dead_letters (topic, seq);
"""

# "No lease" is stored as values of the same size as a real lease (an 8-byte integer, a
# non-integral REAL): rows that grew when leased split their pages, which made claims
# and acks about 1.4x slower than with NULLs (benchmarks/sqlite_broker.py).
NO_TOKEN = 1 << 60
NO_LEASE = -0.5
assert f"DEFAULT {NO_TOKEN}" in _SCHEMA
assert f"DEFAULT {NO_LEASE}" in _SCHEMA
# The schema is split on ";" below, so its comments must not hold one.
assert all(";" not in line.partition("--")[2] for line in _SCHEMA.splitlines())

# SQLite's default limit on bound parameters per statement is 32766; stay well below.
_CHUNK = 900


def new_token() -> int:
    """A random lease token in [2**59, 2**60): always 8 bytes on disk, never NO_TOKEN."""
    return secrets.randbits(59) | (1 << 59)


def encode_headers(headers: Mapping[str, str]) -> str | None:
    return msgspec.json.encode(dict(headers)).decode() if headers else None


def _decode_headers(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    decoded: dict[str, str] = msgspec.json.decode(text)
    return decoded


def _chunks(items: Sequence[_T], size: int = _CHUNK) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _marks(count: int) -> str:
    return ",".join("?" * count)


class SqliteStore:
    """Every statement of the SQLite broker, run by one thread on one connection.

    Not thread-safe: :class:`~._broker.SqliteBroker` calls the thread's store only from
    its single-thread executor, and the inline store only under its lock. Times are
    Unix seconds passed in by the caller (the store never reads a clock). Errors are
    ``sqlite3`` ones; the broker translates them.
    """

    def __init__(
        self,
        path: str,
        *,
        busy_timeout: float,
        synchronous: str,
        max_deliveries: int | None,
        inline: bool = False,
    ) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous
        self._max_deliveries = max_deliveries
        self._inline = inline

    def open(self) -> None:
        """Open the file in WAL mode and create the schema if missing (idempotent).

        An ``inline`` store (the event loop's own connection, see ``_connection``) opens
        a file the thread's store already set up: no schema work, and no automatic
        checkpoint, which would copy the WAL back and fsync on the loop's thread."""
        if self.conn is not None:
            return
        conn = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout,
            isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
            check_same_thread=False,  # one thread at a time, under the broker's discipline
        )
        if self._inline:
            try:
                conn.execute(f"PRAGMA synchronous={self._synchronous}")
                conn.execute("PRAGMA wal_autocheckpoint=0")
            except BaseException:
                conn.close()
                raise
            self.conn = conn
            return
        try:
            conn.execute("PRAGMA journal_mode=WAL").fetchone()
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise BrokerError(
                    f"{self.path!r} has headrace schema version {version}; this headrace "
                    f"reads version {SCHEMA_VERSION}",
                    code="incompatible_schema",
                )
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        self.conn = conn

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` (the write lock up front, so no deadlock on upgrade)."""
        conn = self.conn
        assert conn is not None, "used before open()"
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            # Also when COMMIT itself failed (busy, I/O): never leave the connection
            # inside a transaction that holds the write lock.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # -- publishing ---------------------------------------------------------------------

    def publish(self, rows: list[tuple[Any, ...]]) -> list[str]:
        """Insert ``(topic, body, headers, key, ready_at, published_at)`` rows; their ids."""
        with self.transaction() as conn:
            conn.executemany(
                "INSERT INTO headrace_messages (topic, body, headers, key, ready_at, "
                "published_at) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            # AUTOINCREMENT ids are consecutive inside our write transaction.
            (last,) = conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'headrace_messages'"
            ).fetchone()
        first = last - len(rows) + 1
        return [str(i) for i in range(first, last + 1)]

    # -- consuming ----------------------------------------------------------------------

    def ready(self, topic: str, now: float) -> bool:
        """Whether a message of ``topic`` is deliverable at ``now`` (a read, no lock).

        The index walk over leased head rows runs inside SQLite, not row by row in
        Python as :meth:`next_due` does; a busy consumer pays only this."""
        conn = self.conn
        assert conn is not None, "used before open()"
        return (
            conn.execute(
                "SELECT 1 FROM headrace_messages WHERE topic = ? AND ready_at <= ? AND "
                "lease_until <= ? LIMIT 1",
                (topic, now, now),
            ).fetchone()
            is not None
        )

    def next_due(self, topic: str) -> float | None:
        """When the topic's first message becomes deliverable (None: the topic is empty).

        A read without the write lock. Walks the index from its head over leased rows up
        to the first free one: a free row is due at ``ready_at``, a leased one at
        ``max(ready_at, lease_until)``, and no row after the first free one can be due
        earlier."""
        conn = self.conn
        assert conn is not None, "used before open()"
        due: float | None = None
        for ready_at, lease_until in conn.execute(
            "SELECT ready_at, lease_until FROM headrace_messages WHERE topic = ? "
            "ORDER BY ready_at, id",
            (topic,),
        ):
            if lease_until == NO_LEASE:
                return float(ready_at) if due is None else min(due, float(ready_at))
            candidate = float(max(ready_at, lease_until))
            due = candidate if due is None else min(due, candidate)
        return due

    def claim(
        self,
        topic: str,
        limit: int,
        now: float,
        until: float,
        token: int,
        take_acks: Callable[[bool], list[int]],
    ) -> list[Message]:
        """Lease up to ``limit`` deliverable messages until ``until``, in order.

        One transaction that also deletes the acked ids ``take_acks(last)`` hands over, at
        its start and again just before the commit (acks that arrived meanwhile), and
        dead-letters messages over ``max_deliveries`` instead of delivering them."""
        cap = self._max_deliveries
        with self.transaction() as conn:
            acked = take_acks(False)
            if acked:
                self._delete(conn, acked)
            rows: list[Any] = []
            # Again only when messages over max_deliveries took places in the batch.
            while len(rows) < limit:
                found = conn.execute(
                    "SELECT id, body, headers, key, attempt + (lease_token != ?) "
                    "FROM headrace_messages WHERE topic = ? AND ready_at <= ? AND "
                    "lease_until <= ? ORDER BY ready_at, id LIMIT ?",
                    (NO_TOKEN, topic, now, now, limit - len(rows)),
                ).fetchall()
                over = [] if cap is None else [r for r in found if r[4] > cap]
                if cap is not None and over:
                    self._dead_letter_rows(conn, topic, over, now, cap)
                    found = [r for r in found if r[4] <= cap]
                if found:
                    # Only unindexed columns change: no index entry moves.
                    conn.execute(
                        "UPDATE headrace_messages SET lease_until = ?, lease_token = ?, "
                        "attempt = attempt + (lease_token != ?) "
                        f"WHERE id IN ({_marks(len(found))})",
                        (until, token, NO_TOKEN, *(row[0] for row in found)),
                    )
                    rows += found
                if not over:
                    break
            # Acks that arrived while we claimed (the worker acks one batch while it
            # fetches the next) still make this commit; the last take.
            acked = take_acks(True)
            if acked:
                self._delete(conn, acked)
        # Positional arguments: the claim builds one Message per row (hot path).
        return [
            Message(
                str(id),
                topic,
                body,
                _decode_headers(headers) if headers else {},
                attempt,
                key,
                token,
            )
            for id, body, headers, key, attempt in rows
        ]

    @staticmethod
    def _dead_letter_rows(
        conn: sqlite3.Connection, topic: str, rows: list[Any], now: float, cap: int
    ) -> None:
        conn.executemany(
            "INSERT INTO headrace_dead_letters (message_id, topic, body, headers, key, "
            "attempt, error, dead_lettered_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    str(id),
                    topic,
                    body,
                    headers,
                    key,
                    attempt - 1,
                    msgspec.json.encode(
                        max_deliveries_record(topic, str(id), attempt - 1, cap)
                    ).decode(),
                    now,
                )
                for id, body, headers, key, attempt in rows
            ],
        )
        SqliteStore._delete(conn, [r[0] for r in rows])

    @staticmethod
    def _delete(conn: sqlite3.Connection, ids: Sequence[int]) -> None:
        for chunk in _chunks(ids):
            conn.execute(
                f"DELETE FROM headrace_messages WHERE id IN ({_marks(len(chunk))})",
                tuple(chunk),
            )

    def delete(self, ids: list[int]) -> None:
        """Ack: delete these messages, whoever holds them, in one transaction."""
        with self.transaction() as conn:
            self._delete(conn, ids)

    def release(self, messages: Sequence[Message], ready_at: float | None, cost: int) -> None:
        """End the deliveries of ``messages`` still current (their token matches): nack
        (``ready_at``: deliverable from then, ``cost`` 1) or hand back (``ready_at``
        None: at once, at the message's place in the order, ``cost`` 0)."""
        rows = [(cost, int(m.id), m.receipt) for m in messages if m.receipt is not None]
        with self.transaction() as conn:
            if ready_at is None:
                conn.executemany(
                    "UPDATE headrace_messages SET lease_until = ?, lease_token = ?, "
                    "attempt = attempt + ? WHERE id = ? AND lease_token = ?",
                    [(NO_LEASE, NO_TOKEN, *row) for row in rows],
                )
            else:
                conn.executemany(
                    "UPDATE headrace_messages SET ready_at = ?, lease_until = ?, "
                    "lease_token = ?, attempt = attempt + ? WHERE id = ? AND lease_token = ?",
                    [(ready_at, NO_LEASE, NO_TOKEN, *row) for row in rows],
                )

    def extend(self, messages: Sequence[Message], until: float) -> None:
        """Move the lease expiry of deliveries still current to ``until``."""
        rows = [(until, int(m.id), m.receipt) for m in messages if m.receipt is not None]
        with self.transaction() as conn:
            conn.executemany(
                "UPDATE headrace_messages SET lease_until = ? WHERE id = ? AND lease_token = ?",
                rows,
            )

    # -- dead letters -------------------------------------------------------------------

    def dead_letter(self, message: Message, error: str, now: float) -> None:
        """Move the message (if still stored) and its JSON error to the dead letters."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO headrace_dead_letters (message_id, topic, body, headers, key, "
                "attempt, error, dead_lettered_at) "
                "SELECT id, topic, body, headers, key, ?, ?, ? FROM headrace_messages "
                "WHERE id = ?",
                (message.attempt, error, now, int(message.id)),
            )
            conn.execute("DELETE FROM headrace_messages WHERE id = ?", (int(message.id),))

    def dead_letters(self, topic: str, limit: int) -> list[DeadLetter]:
        conn = self.conn
        assert conn is not None, "used before open()"
        rows = conn.execute(
            "SELECT message_id, body, headers, key, attempt, error, dead_lettered_at "
            "FROM headrace_dead_letters WHERE topic = ? ORDER BY seq DESC LIMIT ?",
            (topic, limit),
        ).fetchall()
        return [
            DeadLetter(
                Message(
                    id=message_id,
                    topic=topic,
                    body=body,
                    headers=_decode_headers(headers),
                    attempt=attempt,
                    key=key,
                ),
                msgspec.json.decode(error),
                dead_lettered_at,
            )
            for message_id, body, headers, key, attempt, error, dead_lettered_at in rows
        ]

    def topic_stats(self, topic: str, now: float) -> TopicStats:
        """Ready / delayed / leased / dead-lettered counts, read in one snapshot."""
        conn = self.conn
        assert conn is not None, "used before open()"
        conn.execute("BEGIN")  # a read transaction: both counts from one snapshot
        try:
            ready, delayed, leased = conn.execute(
                "SELECT count(*) FILTER (WHERE lease_until <= ?1 AND ready_at <= ?1), "
                "count(*) FILTER (WHERE lease_until <= ?1 AND ready_at > ?1), "
                "count(*) FILTER (WHERE lease_until > ?1) "
                "FROM headrace_messages WHERE topic = ?2",
                (now, topic),
            ).fetchone()
            (dead,) = conn.execute(
                "SELECT count(*) FROM headrace_dead_letters WHERE topic = ?", (topic,)
            ).fetchone()
        finally:
            conn.execute("COMMIT")
        return TopicStats(topic, ready, delayed, leased, dead)

    def replay(self, topic: str, ids: list[str] | None, now: float) -> int:
        """Re-insert dead letters (all, or those message ids) as new messages; count."""
        with self.transaction() as conn:
            if ids is None:
                rows = conn.execute(
                    "SELECT seq, body, headers, key FROM headrace_dead_letters "
                    "WHERE topic = ? ORDER BY seq",
                    (topic,),
                ).fetchall()
            else:
                rows = []
                for chunk in _chunks(ids):
                    rows += conn.execute(
                        "SELECT seq, body, headers, key FROM headrace_dead_letters "
                        f"WHERE topic = ? AND message_id IN ({_marks(len(chunk))})",
                        (topic, *chunk),
                    ).fetchall()
                rows.sort()
            conn.executemany(
                "INSERT INTO headrace_messages (topic, body, headers, key, ready_at, "
                "published_at) VALUES (?, ?, ?, ?, ?, ?)",
                [(topic, body, headers, key, now, now) for _, body, headers, key in rows],
            )
            for chunk in _chunks([r[0] for r in rows]):
                conn.execute(
                    f"DELETE FROM headrace_dead_letters WHERE seq IN ({_marks(len(chunk))})",
                    tuple(chunk),
                )
        return len(rows)
