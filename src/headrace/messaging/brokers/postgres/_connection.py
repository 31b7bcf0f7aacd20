"""What the PostgresBroker operations share: options, connections, waiting, errors.

:class:`_PostgresConnection` is the base of :class:`~._broker.PostgresBroker`. It
validates the options, owns the two connections (the *work* connection every
statement runs on, one at a time under an ``asyncio.Lock``, and the *listen*
connection whose task turns notifications into wake-ups of waiting fetches),
creates the tables, translates psycopg errors at one choke point, and connects and
closes. The :class:`~headrace.messaging.Broker` operations live in ``_broker``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.string import TextBinaryLoader, TextLoader

from ...._clock import Clock, default_clock
from ...._errors import (
    BrokerConnectionError,
    BrokerError,
    ConfigurationError,
)
from ..._broker import BrokerCapabilities
from .. import check_lease, check_max_deliveries
from .._base import ScrubbedTranslated, ServerBroker
from .._options import check_url_type, merge_url_options
from ._options import Scrubber, split_options
from ._sql import Statements

__all__ = ["_PostgresConnection"]

logger = logging.getLogger("headrace.messaging.postgres")

_T = TypeVar("_T")

Connection = psycopg.AsyncConnection[Any]

_CAPABILITIES = BrokerCapabilities(
    handback_costs_attempt=False,
    counts_attempts=True,
    ordered=True,
    delayed_nack=True,
    lease_extension=True,
    persistent=True,
)

# translate_errors picks the most specific match along the raised type's MRO.
_ERRORS = {
    psycopg.OperationalError: BrokerConnectionError,  # lost, refused, terminated, cancelled
    psycopg.InterfaceError: BrokerConnectionError,
    OSError: BrokerConnectionError,
    psycopg.Error: BrokerError,
}

# Seconds a cancelled fetch may spend handing back what its claim had leased, and
# close may spend on the last acks.
CLEANUP_TIMEOUT = 5.0
# Longest pause between attempts to bring a failed listen connection back (seconds).
_LISTEN_RETRY_MAX = 5.0
# Free space left in each heap page so that a claim's or a hand-back's new row version
# fits beside the old one (a HOT update: no index entry is added).
_FILLFACTOR = 50
# Lowercase identifiers only, so that the tables need no quoting in hand-written SQL;
# short enough for "<prefix>dead_letters_topic" to stay within 63 bytes.
_PREFIX = re.compile(r"[a-z_][a-z0-9_]{0,44}")


def _shut_down(conn: Connection) -> None:
    """End ``conn``'s socket in both directions without closing its descriptor, which
    psycopg still owns: whatever waits on it sees the connection end."""
    with contextlib.suppress(OSError, psycopg.OperationalError):
        fd = conn.pgconn.socket
        with socket.socket(fileno=os.dup(fd)) as duplicate:
            duplicate.shutdown(socket.SHUT_RDWR)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _one_line(scrub: Callable[[str], str], error: BaseException) -> str:
    """A driver message for our errors and logs: password out, libpq's line breaks
    and indented hints folded into one line (one log record, one line)."""
    return " ".join(scrub(str(error)).split())


class _Translated(ScrubbedTranslated):
    """The choke point where psycopg errors become headrace errors (passwords out)."""

    __slots__ = ()
    errors = _ERRORS
    system = "postgres"

    def describe(self, error: BaseException) -> str:
        return _one_line(self.scrub, error)


class _PostgresConnection(ServerBroker):
    """The state and plumbing of a :class:`~._broker.PostgresBroker` (its base class).

    The constructor's arguments are documented on :class:`~._broker.PostgresBroker`.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        schema: str | None = None,
        prefix: str = "headrace_",
        max_deliveries: int | None = 20,
        lease: float = 30.0,
        poll_interval: float = 1.0,
        connect_timeout: float = 10.0,
        command_timeout: float | None = 30.0,
        clock: Clock | None = None,
        **connect_options: Any,
    ) -> None:
        check_url_type(conninfo, "PostgresBroker(conninfo=...)")
        password = connect_options.get("password")
        self._scrub = Scrubber(conninfo, password if isinstance(password, str) else None)
        libpq_conninfo, from_url = split_options(conninfo)
        options = merge_url_options(
            from_url,
            _PostgresConnection.__init__.__kwdefaults__,
            schema=schema,
            prefix=prefix,
            max_deliveries=max_deliveries,
            lease=lease,
            poll_interval=poll_interval,
            command_timeout=command_timeout,
        )
        schema, prefix = options["schema"], options["prefix"]
        if schema is not None and (not isinstance(schema, str) or not schema):
            raise ConfigurationError(
                f"PostgresBroker(schema={schema!r}) must be a non-empty string or None",
                code="invalid_configuration",
            )
        if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
            raise ConfigurationError(
                f"PostgresBroker(prefix={prefix!r}) must be 1-45 characters of a-z, 0-9 "
                "and _, not starting with a digit",
                code="invalid_configuration",
            )
        self._max_deliveries = check_max_deliveries(
            options["max_deliveries"], broker="PostgresBroker"
        )
        self._lease = check_lease(options["lease"], where="PostgresBroker(lease)")
        self._poll_interval = check_lease(
            options["poll_interval"], where="PostgresBroker(poll_interval)"
        )
        timeout = check_lease(connect_timeout, where="PostgresBroker(connect_timeout)")
        self._command_timeout: float | None = (
            None
            if options["command_timeout"] is None
            else check_lease(options["command_timeout"], where="PostgresBroker(command_timeout)")
        )
        try:
            settings = conninfo_to_dict(libpq_conninfo, **connect_options)
        except psycopg.ProgrammingError as exc:
            raise ConfigurationError(
                f"broker URL {self._scrub(conninfo)!r} is not a valid PostgreSQL URL or "
                f"conninfo: {self._scrub(str(exc))}",
                code="invalid_broker_url",
            ) from None
        connect_options.setdefault("application_name", "headrace")
        if "connect_timeout" not in settings:
            # libpq takes whole seconds (and at least 2).
            connect_options["connect_timeout"] = max(2, round(timeout))
        self._conninfo = libpq_conninfo
        self._connect_options = connect_options
        self._shown = self._scrub(conninfo)
        self._schema: str | None = schema
        self._prefix: str = prefix
        self._sql = Statements(schema, prefix, fillfactor=_FILLFACTOR)
        self._clock = clock if clock is not None else default_clock()
        self._connected = False
        self._closed = False
        self._schema_ready = False
        # Every statement runs on this connection, one at a time, under _lock.
        self._work: Connection | None = None
        self._lock = asyncio.Lock()
        # Fetches waiting for news of a topic; the listen task wakes them.
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._listener: asyncio.Task[None] | None = None

    # -- properties ------------------------------------------------------------------

    @property
    def capabilities(self) -> BrokerCapabilities:
        """Everything supported; hand-backs are free; the table counts attempts."""
        return _CAPABILITIES

    @property
    def messages_table(self) -> str:
        """The messages table's (quoted) name; dead letters are in ``dead_letters_table``."""
        return self._sql.messages_name

    @property
    def dead_letters_table(self) -> str:
        return self._sql.dead_letters_name

    @property
    def channel(self) -> str:
        """The LISTEN/NOTIFY channel; a notification's payload is the topic."""
        return self._sql.channel

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._connected else "new"
        return f"PostgresBroker({self._shown!r}, table={self._sql.messages_name!r}, {state})"

    # -- plumbing --------------------------------------------------------------------

    def _translated(self, operation: str, topic: str | None = None) -> _Translated:
        return _Translated(self._scrub, self._shown, operation, topic)

    async def _new_connection(self) -> Connection:
        conn = await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True, **self._connect_options
        )
        try:
            # Headers and error records are JSON we decode with msgspec: keep them text.
            conn.adapters.register_loader("json", TextLoader)
            conn.adapters.register_loader("json", TextBinaryLoader)
            # The tables are often never analysed (autovacuum off, or just created):
            # the planner then guesses a few rows and picks a bitmap scan plus a sort
            # of the whole topic over the ordered index walk a claim needs (measured:
            # 35 ms instead of 3 ms per claim of 100 on 10k messages). Every statement
            # of ours finds rows by an index, so bitmap scans are never what we want.
            await conn.execute(b"SET enable_bitmapscan = off")
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _work_connection(self) -> Connection:
        """The work connection, (re)connected if missing or broken; call under _lock."""
        conn = self._work
        if conn is not None and not conn.closed:
            return conn
        self._work = None
        if conn is not None:
            await conn.close()
        conn = await self._new_connection()
        try:
            if not self._schema_ready:
                await self._ensure_schema(conn)
                self._schema_ready = True
        except BaseException:
            await conn.close()
            raise
        self._work = conn
        return conn

    async def _ensure_schema(self, conn: Connection) -> None:
        statements = self._sql
        cursor = await conn.execute(
            statements.tables_exist,
            {"messages": statements.messages_name, "dead": statements.dead_letters_name},
        )
        row = await cursor.fetchone()
        if row is not None and row[0]:
            return
        # One process at a time: concurrent CREATE ... IF NOT EXISTS can still collide.
        async with conn.transaction():
            await conn.execute(
                b"SELECT pg_advisory_xact_lock(hashtext(%s))", (statements.messages_name,)
            )
            if statements.create_schema is not None:
                await conn.execute(statements.create_schema)
            for statement in statements.schema:
                await conn.execute(statement)

    async def _run(
        self,
        operation: str,
        work: Callable[[Connection], Awaitable[_T]],
        *,
        topic: str | None = None,
        repeatable: bool = False,
    ) -> _T:
        """Run ``work(conn)`` on the work connection (connecting first if needed).

        ``repeatable`` work (an ack, a settle statement that checks the delivery it
        acts on) is sent once more over a fresh connection when the first one turns
        out dead: a connection the server closed while it sat idle (a restart, an
        administrator's ``pg_terminate_backend``, a proxy's idle timeout) fails the
        next statement sent on it. Publishes and claims are not repeated: a lost
        reply may hide a commit, and their callers retry.
        """
        self._check_open(operation)
        if not self._connected:
            await self.connect()
        async with self._lock:
            self._check_open(operation)
            with self._translated(operation, topic):
                conn = await self._work_connection()
                try:
                    return await self._answered(conn, work)
                except psycopg.OperationalError:
                    if not repeatable or not conn.closed or self._closed:
                        raise
                conn = await self._work_connection()
                return await self._answered(conn, work)

    async def _answered(self, conn: Connection, work: Callable[[Connection], Awaitable[_T]]) -> _T:
        """``work(conn)``, the connection given up if the server has not answered
        within ``command_timeout`` seconds.

        A hung server or a partition leaves the socket open and silent, and TCP may
        take many minutes to notice. Cancelling the statement would not help: psycopg
        then asks the server (the hung one) to cancel it and waits for that. So the
        socket is shut down instead: the statement fails at once as on a dropped
        connection, and the next one reconnects.
        """
        timeout = self._command_timeout
        if timeout is None:
            return await work(conn)
        expired = False

        def give_up() -> None:
            nonlocal expired
            expired = True
            _shut_down(conn)

        timer = asyncio.get_running_loop().call_later(timeout, give_up)
        try:
            return await work(conn)
        except psycopg.OperationalError as exc:
            if expired:
                raise psycopg.OperationalError(
                    f"no reply from the server within {timeout:g} s (command_timeout); "
                    "connection given up"
                ) from exc
            raise
        finally:
            timer.cancel()

    # -- waiting ---------------------------------------------------------------------

    def _wake_topic(self, topic: str) -> None:
        for future in self._waiters.get(topic, ()):
            _wake(future)

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for future in waiters:
                _wake(future)

    async def _listen(self, ready: asyncio.Future[None]) -> None:
        """Hold the listen connection and wake the fetches waiting for each topic.

        Runs until close. The first ``LISTEN`` reports to ``connect`` through ``ready``;
        after that, a lost connection is made again with backoff (0.1 s doubling to
        5 s), fetches meanwhile waiting at most ``poll_interval``, and every waiting
        fetch looks again once it is back (what was published meanwhile went unheard).
        """
        failures = 0
        while True:
            conn: Connection | None = None
            try:
                conn = await self._new_connection()
                await conn.execute(self._sql.listen)
                if not ready.done():
                    ready.set_result(None)
                else:
                    self._wake_all()
                failures = 0
                async for notification in conn.notifies():
                    if notification.payload:
                        self._wake_topic(notification.payload)
                    else:
                        self._wake_all()
            except Exception as exc:
                if not ready.done():
                    ready.set_exception(exc)
                    return
                failures += 1
                if not self._closed:
                    logger.warning(
                        "PostgreSQL listen connection of %s failed (%s); idle fetches "
                        "poll every %.2f s until it is back",
                        self._shown,
                        _one_line(self._scrub, exc),
                        self._poll_interval,
                    )
            finally:
                if conn is not None:
                    await conn.close()
            await self._clock.sleep(min(_LISTEN_RETRY_MAX, 0.05 * 2 ** min(failures, 7)))

    async def _wait(self, future: asyncio.Future[None], wake_at: float) -> None:
        handle = self._clock.call_at(wake_at, lambda: _wake(future))
        try:
            await future
        finally:
            handle.cancel()

    # -- connect and close -----------------------------------------------------------

    async def connect(self) -> None:
        """Connect, create the tables if missing, start listening; idempotent."""
        self._check_open("connect")
        if self._connected:
            return
        async with self._lock:
            self._check_open("connect")
            await self._connect_locked()

    async def _connect_locked(self) -> None:
        if self._connected:  # another task connected while this one waited
            return
        with self._translated("connect"):
            await self._work_connection()
            ready = asyncio.get_running_loop().create_future()
            self._listener = asyncio.create_task(self._listen(ready), name="headrace-pg-listen")
            try:
                await ready
            except BaseException:
                self._listener.cancel()
                await asyncio.wait({self._listener})
                await self._close_work()
                raise
        self._connected = True

    async def _stop_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None and not listener.done():
            listener.cancel()
            await asyncio.wait({listener})

    async def _close_work(self) -> None:
        conn, self._work = self._work, None
        if conn is not None:
            await conn.close()
