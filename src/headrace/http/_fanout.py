"""``fetch_all``'s machinery: a bounded pool of long-lived workers over a request source."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import TYPE_CHECKING

from .._errors import ConfigurationError, HeadraceError
from ._models import Request, Result, get_request, new_result

if TYPE_CHECKING:
    from ._fetcher import Fetcher

__all__ = ["ResultStream", "coerce_request"]


def coerce_request(item: object) -> Request:
    if isinstance(item, Request):
        return item
    if isinstance(item, str):
        return get_request(item)
    raise ConfigurationError(
        f"expected a headrace.http.Request or a URL string, got {type(item).__name__}"
    )


_END = object()


class _Failure:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class ResultStream:
    """The async iterator :meth:`Fetcher.fetch_all` returns (also an async context manager).

    Starts its workers on the first ``__anext__``; :meth:`aclose` cancels and awaits
    them. Iterate it from one task only.
    """

    def __init__(
        self,
        fetcher: Fetcher,
        requests: Iterable[Request | str] | AsyncIterable[Request | str],
        ordered: bool,
        workers: int,
        fail_fast: bool,
        window: int,
    ) -> None:
        self._fetcher = fetcher
        self._sync_source: Iterator[Request | str] | None = None
        self._async_source: AsyncIterator[Request | str] | None = None
        if isinstance(requests, AsyncIterable):
            self._async_source = aiter(requests)
        elif isinstance(requests, Iterable) and not isinstance(requests, str | bytes):
            self._sync_source = iter(requests)
        else:
            raise ConfigurationError(
                f"fetch_all(requests=<{type(requests).__name__}>) must be an iterable of "
                "Request or URL strings"
            )
        self._ordered = ordered
        self._worker_count = workers
        self._fail_fast = fail_fast
        # The window: how many more requests the workers may take from the source
        # before the consumer catches up. A counter and a queue of parked workers
        # rather than an asyncio.Semaphore: taking and returning a place happen once
        # per request each, and here they cost an integer update, not a coroutine.
        self._room = window
        self._room_waiters: deque[asyncio.Future[None]] = deque()
        self._source_lock = asyncio.Lock()
        # Finished results, and the consumer's wake-up call when it waits for one. A
        # deque and one future instead of an asyncio.Queue: there is exactly one
        # consumer, and the window already bounds how much can pile up.
        self._ready: deque[object] = deque()
        self._consumer: asyncio.Future[None] | None = None
        self._pending: dict[int, Result] = {}
        self._next_index = 0
        self._next_expected = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._alive = 0
        self._exhausted = False
        self._started = False
        self._finished = False
        self._closed = False

    def __aiter__(self) -> ResultStream:
        return self

    async def __aenter__(self) -> ResultStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _source_done(self) -> bool:
        return self._exhausted

    def _number(self, item: Request | str) -> tuple[int, Request]:
        index = self._next_index
        self._next_index += 1
        return index, coerce_request(item)

    async def _next_async(self) -> tuple[int, Request] | None:
        assert self._async_source is not None
        # An async generator refuses concurrent __anext__ calls; take turns.
        async with self._source_lock:
            if self._source_done():
                return None
            try:
                item = await anext(self._async_source)
            except StopAsyncIteration:
                self._exhausted = True
                return None
        return self._number(item)

    def _deliver(self, item: object) -> None:
        self._ready.append(item)
        waiter = self._consumer
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _take(self) -> object:
        if not self._ready:
            waiter = asyncio.get_running_loop().create_future()
            self._consumer = waiter
            try:
                await waiter  # only ever completed right after an append
            finally:
                self._consumer = None
        return self._ready.popleft()

    async def _wait_for_room(self) -> None:
        """Park until the consumer hands this worker a place in the window."""
        waiter = asyncio.get_running_loop().create_future()
        self._room_waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            # Handed a place just as we were cancelled: pass it on. A cancelled waiter
            # stays queued; _give_room skips it (removing it here could race with a
            # _give_room that already dropped it).
            if waiter.done() and not waiter.cancelled():
                self._give_room()
            raise

    def _give_room(self) -> None:
        """Return one place: straight to the first parked worker, else to the counter."""
        waiters = self._room_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._room += 1

    async def _work(self) -> None:
        fetcher = self._fetcher
        execute = fetcher._execute
        # Passed to each request for its total timeout (one lookup per worker, not per
        # request).
        task = asyncio.current_task()
        ready = self._ready
        sync_source = self._sync_source
        try:
            while True:
                if self._room > 0:
                    self._room -= 1
                else:
                    await self._wait_for_room()
                if sync_source is not None:
                    # Inlined rather than a helper method: this runs once per request.
                    if self._exhausted:
                        self._give_room()
                        return
                    try:
                        item = next(sync_source)
                    except StopIteration:
                        self._exhausted = True
                        self._give_room()
                        return
                    index = self._next_index
                    self._next_index = index + 1
                    request = item if type(item) is Request else coerce_request(item)
                else:
                    numbered = await self._next_async()
                    if numbered is None:
                        self._give_room()
                        return
                    index, request = numbered
                # Awaiting _execute directly (not through a helper coroutine): one await
                # level less to pass through on every resume.
                try:
                    response = await execute(request, bounded=False, task=task)
                except HeadraceError as exc:
                    result = new_result(index, request, None, exc)
                except Exception as exc:
                    result = fetcher._unexpected(index, request, exc)
                else:
                    if response.status < 400 or not fetcher.raise_for_status:
                        result = new_result(index, request, response, None)
                    else:
                        result = fetcher._result_of(index, request, response)
                # _deliver inlined.
                ready.append(result)
                waiter = self._consumer
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._deliver(_Failure(exc))
        finally:
            self._alive -= 1
            if self._alive == 0:
                self._deliver(_END)

    def _start(self) -> None:
        self._started = True
        self._fetcher._ensure_open()
        self._alive = self._worker_count
        self._tasks = [
            asyncio.create_task(self._work(), name=f"headrace.http.fetch_all worker {number}")
            for number in range(self._worker_count)
        ]

    async def __anext__(self) -> Result:
        if self._closed:
            raise StopAsyncIteration
        if not self._started:
            self._start()
        finished = self._ready
        if finished and not self._ordered and not self._fail_fast:
            # The common case, without a coroutine call: results are waiting (workers
            # finish in batches, one loop iteration wakes several) and need no sorting.
            head = finished[0]
            if type(head) is Result:
                finished.popleft()
                self._give_room()
                return head
        while True:
            if self._ordered:
                ready = self._pending.pop(self._next_expected, None)
                if ready is not None:
                    self._next_expected += 1
                    self._give_room()
                    return ready
            if self._finished:
                await self.aclose()
                raise StopAsyncIteration
            item = await self._take()
            if item is _END:
                self._finished = True
                continue
            if isinstance(item, _Failure):
                await self.aclose()
                raise item.error
            assert isinstance(item, Result)
            if self._fail_fast and item.error is not None:
                await self.aclose()
                raise item.error
            if not self._ordered:
                self._give_room()
                return item
            self._pending[item.index] = item

    async def aclose(self) -> None:
        """Cancel the workers (closing their connections) and wait for them. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._pending.clear()
