"""Idempotency stores: remember which message keys already had their effect.

At-least-once delivery means a handler can see a message twice (a crash after the
effect but before the ack, an expired lease). A handler registered with
``idempotent=True`` asks the store first and skips keys recorded as done; the worker
records the key after the handler returned. What "effect once" means, precisely:

* **Record after success** (every store, the default): a key is recorded only once
  its handler returned, so a failed attempt can be retried. A process that dies
  *between* the effect and the record (a narrow window, microseconds on SQLite) runs
  the effect again on redelivery. Two consumers can also run one key at the same time
  if a lease expired under a slow handler; keep ``lease`` well above the handler time.
* **Effect and record in one transaction** (:meth:`SqliteIdempotencyStore.transaction`):
  when the effect is a write to the same SQLite file, the write and the key commit
  together or not at all, so a crash at any point leaves no duplicate effect. This is
  the only way to get exactly-once effects; other stores cannot offer it for effects
  outside themselves.

Keys are ``"<topic>:<message key or id>"``; give messages a ``key`` at publish when the
same business operation may be published twice.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .._errors import BrokerConnectionError, ConfigurationError, translate_errors
from ._broker import Message
from ._worker._route import idempotency_key

__all__ = [
    "IdempotencyStore",
    "IdempotentTransaction",
    "MemoryIdempotencyStore",
    "RedisIdempotencyStore",
    "SqliteIdempotencyStore",
]


@runtime_checkable
class IdempotencyStore(Protocol):
    """Where a worker records keys whose handler completed (see the module doc)."""

    async def seen(self, key: str) -> bool:
        """Whether ``key`` was recorded (and has not expired)."""
        ...

    async def record(self, key: str) -> None:
        """Record ``key`` as done (idempotent)."""
        ...

    async def close(self) -> None: ...


def _check_ttl(ttl: float | None, where: str) -> float | None:
    if ttl is not None and not (isinstance(ttl, int | float) and math.isfinite(ttl) and ttl > 0):
        raise ConfigurationError(f"{where}(ttl={ttl!r}) must be None or seconds > 0")
    return ttl


class MemoryIdempotencyStore:
    """Keys in a dict: for tests and single-process jobs (lost when the process exits).

    ``ttl`` seconds (default: forever) bounds how long a key is remembered, by
    ``wall_time`` (default ``time.time``). Safe to share between the tasks of one loop.
    """

    def __init__(
        self, *, ttl: float | None = None, wall_time: Callable[[], float] = time.time
    ) -> None:
        self.ttl = _check_ttl(ttl, "MemoryIdempotencyStore")
        self._time = wall_time
        self._keys: dict[str, float] = {}

    async def seen(self, key: str) -> bool:
        expires = self._keys.get(key)
        if expires is None:
            return False
        if expires <= self._time():
            del self._keys[key]
            return False
        return True

    async def record(self, key: str) -> None:
        self._keys[key] = math.inf if self.ttl is None else self._time() + self.ttl

    async def close(self) -> None:
        self._keys.clear()

    def __len__(self) -> int:
        return len(self._keys)


@dataclass(slots=True)
class IdempotentTransaction:
    """An open SQLite transaction for one message: write the effect through
    ``connection``; ``already_done`` says the key was committed before (do nothing)."""

    connection: sqlite3.Connection
    key: str
    already_done: bool


class SqliteIdempotencyStore:
    """Keys in a SQLite file (WAL); shared by every worker process on the machine.

    ``path`` may be the broker's own database file or another; the table is
    ``headrace_idempotency``. ``ttl`` seconds (default: forever) bounds how long keys
    are kept (expired keys are purged on :meth:`purge`). Operations are short local
    transactions run on the event loop thread (tens of microseconds; ``busy_timeout``
    seconds bounds the wait for another process's write lock).

    :meth:`transaction` gives exactly-once effects for effects written to the same
    file. Safe to share between the tasks of one loop (transactions are serialised).
    """

    def __init__(
        self, path: str | Path, *, ttl: float | None = None, busy_timeout: float = 10.0
    ) -> None:
        self.path = str(path)
        self.ttl = _check_ttl(ttl, "SqliteIdempotencyStore")
        self.busy_timeout = busy_timeout
        self._connection: sqlite3.Connection | None = None
        self._lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return f"SqliteIdempotencyStore({self.path!r})"

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            connection = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute(
                "CREATE TABLE IF NOT EXISTS headrace_idempotency ("
                " key TEXT PRIMARY KEY, done_at REAL NOT NULL, expires_at REAL)"
            )
            self._connection = connection
        return self._connection

    def _get_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def _seen_sync(self, connection: sqlite3.Connection, key: str) -> bool:
        row = connection.execute(
            "SELECT expires_at FROM headrace_idempotency WHERE key = ?", (key,)
        ).fetchone()
        return row is not None and (row[0] is None or row[0] > time.time())

    def _record_sync(self, connection: sqlite3.Connection, key: str) -> None:
        now = time.time()
        expires = None if self.ttl is None else now + self.ttl
        connection.execute(
            "INSERT INTO headrace_idempotency (key, done_at, expires_at) VALUES (?, ?, ?)"
            " ON CONFLICT(key) DO UPDATE SET done_at = excluded.done_at,"
            " expires_at = excluded.expires_at",
            (key, now, expires),
        )

    async def seen(self, key: str) -> bool:
        with translate_errors({sqlite3.OperationalError: BrokerConnectionError}):
            return self._seen_sync(self._connect(), key)

    async def record(self, key: str) -> None:
        async with self._get_lock():
            with translate_errors({sqlite3.OperationalError: BrokerConnectionError}):
                self._record_sync(self._connect(), key)

    @asynccontextmanager
    async def transaction(self, message: Message | str) -> AsyncIterator[IdempotentTransaction]:
        """Open a write transaction for ``message`` (or a key) and commit effect + key.

        Inside, check ``already_done`` and write the effect with ``connection``. On a
        normal exit the key is recorded and everything commits at once; on an
        exception (or cancellation) everything rolls back. The write lock is held for
        the block, so keep it short and do no other I/O inside::

            async with store.transaction(message) as tx:
                if not tx.already_done:
                    tx.connection.execute("INSERT INTO payments VALUES (?, ?)", row)
        """
        key = message if isinstance(message, str) else idempotency_key(message)
        async with self._get_lock():
            with translate_errors({sqlite3.OperationalError: BrokerConnectionError}):
                connection = self._connect()
                connection.execute("BEGIN IMMEDIATE")
            try:
                done = self._seen_sync(connection, key)
                yield IdempotentTransaction(connection, key, done)
                if not done:
                    self._record_sync(connection, key)
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            else:
                with translate_errors({sqlite3.OperationalError: BrokerConnectionError}):
                    connection.execute("COMMIT")

    async def purge(self) -> int:
        """Delete expired keys; return how many."""
        async with self._get_lock():
            cursor = self._connect().execute(
                "DELETE FROM headrace_idempotency WHERE expires_at IS NOT NULL AND expires_at < ?",
                (time.time(),),
            )
            return cursor.rowcount

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class RedisIdempotencyStore:
    """Keys in Redis (``SET key 1 [EX ttl]``), shared by workers on many machines.

    ``redis`` is a URL or a ``redis.asyncio.Redis`` client (you then own it).
    ``prefix`` namespaces the keys; ``ttl`` seconds (default one week) bounds memory.
    Records after success, like every store; Redis cannot join an effect elsewhere in
    one transaction. Safe to share between the tasks of one loop.
    """

    def __init__(
        self,
        redis: Any,
        *,
        prefix: str = "headrace:idem:",
        ttl: float | None = 7 * 24 * 3600.0,
    ) -> None:
        self.prefix = prefix
        self.ttl = _check_ttl(ttl, "RedisIdempotencyStore")
        self._owned = isinstance(redis, str)
        if isinstance(redis, str):
            import redis.asyncio as aioredis

            self._client: Any = aioredis.Redis.from_url(redis)
        else:
            self._client = redis

    def __repr__(self) -> str:
        return f"RedisIdempotencyStore(prefix={self.prefix!r})"

    def _errors(self) -> Any:
        import redis.exceptions

        return translate_errors(
            {
                redis.exceptions.ConnectionError: BrokerConnectionError,
                redis.exceptions.TimeoutError: BrokerConnectionError,
            }
        )

    async def seen(self, key: str) -> bool:
        with self._errors():
            return bool(await self._client.exists(self.prefix + key))

    async def record(self, key: str) -> None:
        with self._errors():
            if self.ttl is None:
                await self._client.set(self.prefix + key, b"1")
            else:
                await self._client.set(self.prefix + key, b"1", px=int(self.ttl * 1000))

    async def close(self) -> None:
        if self._owned:
            await self._client.aclose()
