"""One attempt of a request: its body, its connection, and the errors it becomes.

An attempt takes its slots, sends the request and reads the whole body within
``max_body_size``; if anything goes wrong the connection is closed (:meth:`_discard`)
rather than handed back to the pool half read. What went wrong becomes a headrace
error here: the ``total`` deadline (run by :class:`~._deadlines.AttemptDeadlines`)
becomes :class:`~headrace.DeadlineExceeded`, aiohttp's errors go through
:func:`~._transport.translate`. ``Fetcher._execute`` inlines :meth:`_attempt` (every
coroutine level costs on every resume); this copy serves hedging, which starts an
attempt several times. The end of ``Fetcher.stream`` follows the same rule for the
rest of a body the caller did not read (:meth:`_finish`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp

from .._errors import DeadlineExceeded, HeadraceError
from ._admission import AdmissionMixin
from ._deadlines import EXPIRED, AttemptDeadlines
from ._models import Response, new_response
from ._transport import READ_CHUNK, Prepared, StreamResponse, body_too_large, translate

__all__ = ["NO_BODY_STATUSES", "AttemptMixin"]

NO_BODY_STATUSES = frozenset({204, 304})


class AttemptMixin(AdmissionMixin):
    """Attempts and bodies of a :class:`~headrace.http.Fetcher` (one of its base classes).

    The attributes are the fetcher's, set by its constructor and ``open()``.
    """

    max_body_size: int
    drain_limit: int
    _session: aiohttp.ClientSession | None
    _deadlines: AttemptDeadlines | None
    # The clock's now(), or the loop's own time() (see Fetcher.open).
    _now: Callable[[], float]

    def _current_task(self) -> asyncio.Task[Any]:
        # With the loop given, current_task() skips its own loop lookup: 0.1 us instead
        # of 0.5 us on Python 3.11, once per attempt.
        task = asyncio.current_task(self._loop)
        assert task is not None, "Fetcher used outside a task"
        return task

    async def _attempt(self, prepared: Prepared, started: float, attempt: int) -> Response:
        """One attempt: slot, request, body. Inlined in ``Fetcher._execute``; this copy
        is for the hedged path, which needs an attempt it can start several times."""
        session = self._session
        assert session is not None
        request = prepared.request
        host_slots = await self._acquire_slot(prepared)
        self._attempts += 1
        self._in_flight += 1
        deadlines = self._deadlines
        # ``total`` starts here, after the slot: queueing is not counted.
        entry = None if deadlines is None else deadlines.start(self._current_task())
        try:
            try:
                raw = await session.request(
                    request.method, prepared.url, headers=request.headers, data=prepared.data
                )
            except BaseException as exc:
                error = self._request_failed(exc, prepared, started, attempt, entry)
                if error is exc:
                    raise
                raise error from exc
            try:
                body = await self._read_body(raw, prepared)
            except BaseException as exc:
                self._discard(raw)
                error = self._body_failed(exc, prepared, started, attempt, entry)
                if error is exc:
                    raise
                raise error from exc
        finally:
            if entry is not None:
                deadlines.finish(entry)  # type: ignore[union-attr]
            self._in_flight -= 1
            self._release_slot(host_slots)
        return self._response(prepared, raw, body, started, attempt)

    def _request_failed(
        self,
        exc: BaseException,
        prepared: Prepared,
        started: float,
        attempt: int,
        entry: list[Any] | None,
    ) -> BaseException:
        """What to raise when sending the request or waiting for its headers failed."""
        if entry is not None and entry[2] == EXPIRED:
            assert self._deadlines is not None
            if self._deadlines.settle_expired(entry, exc):
                self._discarded += 1  # aiohttp closes the connection it was waiting on
                return self._total_timeout(prepared, started, attempt)
        if isinstance(exc, aiohttp.ClientError):
            return translate(exc, prepared, self.timeouts)
        if isinstance(exc, TimeoutError) and not isinstance(exc, HeadraceError):
            self._discarded += 1  # aiohttp closes the connection it was waiting on
            return self._total_timeout(prepared, started, attempt)
        if isinstance(exc, asyncio.CancelledError):
            self._discarded += 1  # likewise (a lost hedge, a cancelled caller)
        return exc

    def _body_failed(
        self,
        exc: BaseException,
        prepared: Prepared,
        started: float,
        attempt: int,
        entry: list[Any] | None,
    ) -> BaseException:
        """What to raise when reading the body failed (the response is already closed)."""
        if entry is not None and entry[2] == EXPIRED:
            assert self._deadlines is not None
            if self._deadlines.settle_expired(entry, exc):
                return self._total_timeout(prepared, started, attempt)
        if isinstance(exc, aiohttp.ClientError):
            return translate(exc, prepared, self.timeouts)
        if isinstance(exc, TimeoutError) and not isinstance(exc, HeadraceError):
            # aiohttp's total timer also covers the body and raises a bare TimeoutError.
            return self._total_timeout(prepared, started, attempt)
        return exc

    def _response(
        self,
        prepared: Prepared,
        raw: aiohttp.ClientResponse,
        body: bytes,
        started: float,
        attempt: int,
    ) -> Response:
        self._responses += 1
        self._bytes += len(body)
        request = prepared.request
        return new_response(
            request,
            raw.status,
            raw.reason or "",
            raw.headers,
            body,
            # The URL we asked for, unless redirects took us elsewhere (saves a str()).
            str(raw.url) if raw.history else request.url,
            self._now() - started,
            attempt,
        )

    def _total_timeout(self, prepared: Prepared, started: float, attempt: int) -> DeadlineExceeded:
        request = prepared.request
        total = self.timeouts.total
        return DeadlineExceeded(
            f"{request.method} {prepared.url_text}: no complete response within total={total} s",
            code="http_timeout",
            public_message="An upstream service took too long.",
            context={
                "method": request.method,
                "url": prepared.url_text,
                "phase": "total",
                "timeout": total,
                # Since the first attempt started (the hot path reads the clock once).
                "elapsed": self._now() - started,
                "attempt": attempt,
            },
        )

    async def _read_body(self, response: aiohttp.ClientResponse, prepared: Prepared) -> bytes:
        """Read the whole body within ``max_body_size``; the caller maps errors and closes
        the response if this raises."""
        if prepared.request.method == "HEAD" or response.status in NO_BODY_STATUSES:
            response.release()
            return b""
        limit = self.max_body_size
        length = response.content_length
        if length is not None:
            if length > limit:
                raise body_too_large(prepared, limit, length)
            return await response.read()
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = await response.content.read(READ_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise body_too_large(prepared, limit, size)
            chunks.append(chunk)
        response.release()
        return b"".join(chunks)

    def _discard(self, response: aiohttp.ClientResponse) -> None:
        # Counted even when aiohttp already closed it (its read() closes on cancel):
        # either way the connection was thrown away instead of going back to the pool.
        self._discarded += 1
        response.close()

    async def _finish(self, response: aiohttp.ClientResponse, handle: StreamResponse) -> None:
        """Drain a small unread rest so the connection is reused; close on a large one."""
        self._bytes += handle._consumed
        length = response.content_length
        if length is not None and length - handle._consumed > self.drain_limit:
            self._discard(response)
            return
        drained = 0
        try:
            while drained <= self.drain_limit:
                chunk = await response.content.read(READ_CHUNK)
                if not chunk:
                    response.release()
                    return
                drained += len(chunk)
        except BaseException:
            self._discard(response)
            raise
        self._discard(response)
