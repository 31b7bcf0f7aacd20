"""What the SqliteBroker operations share: options, the two connections, errors.

:class:`_SqliteConnection` is the base of :class:`~._broker.SqliteBroker`. It
validates the options and owns the two connections to the file: the broker's
thread's (a single-thread executor; :meth:`~_SqliteConnection._call` runs a store
method there, behind the jobs already queued) and the event loop's own
(:meth:`~_SqliteConnection._run_inline` runs on it when the file's write lock is free
at that instant, else reports "busy" so the caller takes the thread). The inline
connection never checkpoints; :meth:`~_SqliteConnection._after_inline_write` asks
the thread to when the WAL has grown. It also translates ``sqlite3`` errors at one
choke point, hands back the messages of claims abandoned by cancelled fetches, and
connects and closes. The :class:`~headrace.messaging.Broker` operations live in
``_broker``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sqlite3
import threading
import time as _time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ...._clock import Clock, default_clock
from ...._errors import (
    BrokerError,
    ConfigurationError,
    HeadraceError,
    translate_errors,
)
from ..._broker import BrokerCapabilities, Message
from .. import check_lease, check_max_deliveries
from .._base import BrokerLifecycle
from ._store import SqliteStore
from ._wakeups import Waiter, wake

__all__ = ["ERRORS", "Abandon", "_SqliteConnection"]

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

ERRORS: Mapping[type[BaseException], type[HeadraceError]] = {sqlite3.Error: BrokerError}


class Abandon:
    """A claim whose fetch was cancelled while it ran: its messages must go back."""

    __slots__ = ("cancelled", "messages", "released")

    def __init__(self) -> None:
        self.cancelled = False
        self.released = False
        self.messages: list[Message] = []


# WAL size at which the inline path asks the thread for a checkpoint (SQLite's automatic
# checkpoint starts at 1000 pages of 4 KiB).
_CHECKPOINT_WAL_BYTES = 4 << 20
# How long that checkpoint waits for other connections (ms) before trying again later.
_CHECKPOINT_BUSY_MS = 200


def _is_busy(exc: sqlite3.Error) -> bool:
    """Another connection holds the lock we need (SQLITE_BUSY / SQLITE_LOCKED)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class _SqliteConnection(BrokerLifecycle):
    """The state and plumbing of a :class:`~._broker.SqliteBroker` (its base class).

    The constructor's arguments are documented on :class:`~._broker.SqliteBroker`.
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
        self._waiters: set[Waiter] = set()
        # Guards what the loop and the broker's thread share: the acks waiting for the
        # thread (the next flush job or claim commits them) and abandoned claims.
        self._lock = threading.Lock()
        self._abandoned: set[Abandon] = set()
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

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._connected else "new"
        return f"SqliteBroker({self._path!r}, {state})"

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
            ERRORS,
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
            ERRORS,
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
            wake(waiter.future)
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

    def _release_sync(self, abandon: Abandon) -> None:
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
