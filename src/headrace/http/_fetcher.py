"""The :class:`Fetcher`: bounded, pooled, rate-limited HTTP fan-out over one aiohttp session.

Why it looks like this (seed 004, and the measurements in issue 7): 5,000 concurrent
GETs die of port exhaustion when every request opens its own connection. Three things
keep the number of sockets at the concurrency limit: one shared connection pool whose
size equals the concurrency, a bounded set of long-lived workers instead of one task per
URL, and reading (or deliberately closing) every body so that each connection goes back
to the pool. The fetcher does all three and counts what happened.

This module holds the class, its lifecycle and its public methods, with the hot path
(:meth:`Fetcher._execute`: one request and its retries) written out in one piece. The
rest of its methods come from base classes, one module per concept, so that they work
on the fetcher's own attributes (a helper object would cost a lookup per use on the
per-request path):

* ``_statistics``: the counters and :meth:`Fetcher.statistics`;
* ``_admission``: the rate limit and the connection slots a request waits for;
* ``_attempt``: one attempt, reading or discarding its body, the errors it becomes.

``_retrying`` decides whether and when to try again (a pure function).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import warnings
import weakref
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Mapping,
)
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from .._clock import Clock, MonotonicClock, default_clock
from .._errors import (
    ClosedResourceError,
    ConfigurationError,
    HeadraceError,
    InternalError,
)
from .._hedge import HedgePolicy
from .._retry import Retry, RetryBudget
from ._admission import RateLimit, limiter_lookup
from ._attempt import NO_BODY_STATUSES, AttemptMixin
from ._deadlines import AttemptDeadlines
from ._fanout import ResultStream, coerce_request
from ._models import (
    RETRYABLE_STATUSES,
    Request,
    Response,
    Result,
    Timeouts,
    get_request,
    parse_retry_after,
    redact_url,
    status_error,
)
from ._retrying import DEFAULT_RETRY, HEDGEABLE, next_delay
from ._slots import Slots
from ._statistics import count
from ._transport import (
    CountingConnector,
    Prepared,
    StreamResponse,
    translate,
)

__all__ = ["Fetcher"]


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class Fetcher(AttemptMixin):
    """Bounded, pooled, rate-limited HTTP client for fanning out many requests.

    One aiohttp ``ClientSession`` whose connection pool holds at most
    ``concurrency`` connections (``per_host`` per host, default: no separate
    limit) kept alive for ``keepalive_expiry`` seconds; so 5,000 requests open about
    ``concurrency`` connections, not 5,000. Every body is read in full (up to
    ``max_body_size`` bytes, default 16 MiB) or the connection is closed, also on
    cancellation, so connections always return to the pool in a known state.

    * ``timeout``: a :class:`Timeouts` (connect / read / total / slot_wait), or a number
      of seconds for ``total`` alone.
    * ``rate_limit``: requests per second per host (a ``headrace.TokenBucket`` of burst
      1 per host), an object with ``await acquire()`` shared by all hosts (a
      ``TokenBucket``, a ``MultiLimiter``), a ``headrace.KeyedLimiter`` keyed by host, or
      a callable ``host -> limiter``; ``host`` is ``"scheme://host:port"``. The wait for
      a token happens before a connection slot is taken, so it never holds a socket.
    * ``retry``: a :class:`~headrace.Retry` (default :data:`DEFAULT_RETRY`; ``None``
      never retries) applied only to idempotent requests, on connect errors, timeouts,
      429 and 502-504, honouring ``Retry-After`` (seconds or HTTP date) up to
      ``max_retry_after`` seconds, and only while ``retry_budget`` (default: 20 % extra
      load, shared by this fetcher) allows.
    * ``raise_for_status`` (default ``True``): a final status >= 400 is an
      :class:`~headrace.HttpStatusError` (with ``context["status"]``).
    * ``hedge``: a :class:`~headrace.HedgePolicy` for GET and HEAD requests (default
      ``None``: no hedging). A request still unanswered after the policy's delay is
      sent again on another connection; the first response wins and the loser's
      connection is closed. Each hedged attempt takes its own slot.

    Use :meth:`fetch` for one request (also as a ``Pipeline.map`` function),
    :meth:`fetch_all` to stream results of many from a bounded pool of workers, and
    :meth:`stream` to read a large body yourself. Safe to share between the tasks of one
    event loop; it is an async context manager, and an unclosed fetcher warns
    (``ResourceWarning``).

    Measured here (B6 in ``benchmarks/http_fanout.py``: 5,000 GETs of 2 KB, concurrency 100,
    server in its own process, 7 interleaved rounds): exactly 100 TCP connections
    accepted, like aiohttp + semaphore; ``fetch_all`` 1.38x its requests per second
    (every round 1.14-1.71x) at 0.71x its client CPU per request, 500 concurrent
    ``fetch`` callers 1.20x (1.05-1.52x) at 0.87x. What pays for the Request/Response
    objects, retries and statistics: one loop timer for all ``total`` timeouts, slots
    that need no ``getpid()``, 64 KiB socket reads that never ``mmap``, one worker per
    connection (``docs/decisions.md``, HTTP). 22-24x httpx 0.28 + semaphore, whose
    20-connection keep-alive cap churned up to 106 connections; 3.3-3.7x a client per
    request (1,000 connections, as many sockets left in TIME-WAIT)::

        async with Fetcher(concurrency=100, per_host=20, rate_limit=50.0) as fetcher:
            async for result in fetcher.fetch_all(urls):
                if result.ok:
                    store(result.request.url, result.response.body)
    """

    def __init__(
        self,
        *,
        concurrency: int = 100,
        per_host: int | None = None,
        rate_limit: RateLimit | None = None,
        timeout: Timeouts | float | None = None,
        retry: Retry | None = DEFAULT_RETRY,
        retry_budget: RetryBudget | None = None,
        max_retry_after: float = 60.0,
        max_body_size: int = 16 * 1024 * 1024,
        drain_limit: int = 64 * 1024,
        keepalive_expiry: float = 15.0,
        raise_for_status: bool = True,
        hedge: HedgePolicy | None = None,
        headers: Mapping[str, str] | None = None,
        clock: Clock | None = None,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int):
            raise ConfigurationError(f"Fetcher(concurrency={concurrency!r}) must be an int")
        if concurrency < 1:
            raise ConfigurationError(f"Fetcher(concurrency={concurrency}) must be >= 1")
        if per_host is not None and (
            isinstance(per_host, bool) or not isinstance(per_host, int) or per_host < 1
        ):
            raise ConfigurationError(f"Fetcher(per_host={per_host!r}) must be an int >= 1")
        if retry is not None and not isinstance(retry, Retry):
            raise ConfigurationError(f"Fetcher(retry={retry!r}) must be a headrace.Retry or None")
        for name, value in (("max_body_size", max_body_size), ("drain_limit", drain_limit)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigurationError(f"Fetcher({name}={value!r}) must be an int >= 0 (bytes)")
        if not keepalive_expiry > 0:
            raise ConfigurationError(
                f"Fetcher(keepalive_expiry={keepalive_expiry!r}) must be > 0 seconds"
            )
        if not max_retry_after >= 0:
            raise ConfigurationError(
                f"Fetcher(max_retry_after={max_retry_after!r}) must be >= 0 seconds"
            )
        self.concurrency = concurrency
        self.per_host = per_host if per_host is not None and per_host < concurrency else None
        self.timeouts = Timeouts() if timeout is None else Timeouts.coerce(timeout)
        self.retry = retry
        self.max_retry_after = float(max_retry_after)
        self.max_body_size = max_body_size
        self.drain_limit = drain_limit
        self.keepalive_expiry = float(keepalive_expiry)
        self.raise_for_status = raise_for_status
        if hedge is not None and not isinstance(hedge, HedgePolicy):
            raise ConfigurationError(f"Fetcher(hedge={hedge!r}) must be a headrace.HedgePolicy")
        self.hedge = hedge
        self._default_headers = dict(headers) if headers else None
        self._clock = clock or default_clock()
        self._retry_budget = retry_budget
        self._limiter_for = limiter_lookup(rate_limit, self._clock)
        self._rate_limited = rate_limit is not None
        # No limiter and no per-host limit: a free global slot is all a request needs.
        self._fast_slots = rate_limit is None and self.per_host is None
        # The clock read twice per request; open() swaps in the loop's own time() when
        # the clock is the default one (the same reading without the lookup).
        self._now: Callable[[], float] = self._clock.now

        self._state = _State.NEW
        self._session: aiohttp.ClientSession | None = None
        self._connector: CountingConnector | None = None
        # ``total`` is not aiohttp's: its per-request timer cost ~7 % of B6's client
        # instructions; AttemptDeadlines runs every attempt's ``total`` (after our slots,
        # so queueing is not counted, and covering the body) on one loop timer.
        # ``connect`` stays None: it would include waiting for the pool, which our
        # slots replace.
        self._client_timeout = aiohttp.ClientTimeout(
            total=None,
            connect=None,
            sock_connect=self.timeouts.connect,
            sock_read=self.timeouts.read,
        )
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None,
            connect=None,
            sock_connect=self.timeouts.connect,
            sock_read=self.timeouts.read,
        )
        self._slots: Slots | None = None
        self._deadlines: AttemptDeadlines | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._host_slots: dict[str, Slots] = {}
        self._streams: weakref.WeakSet[ResultStream] = weakref.WeakSet()

        self._init_statistics()

    # -- lifecycle ------------------------------------------------------------------

    def open(self) -> None:
        """Create the session and pool (done for you by ``async with`` or the first call).

        Must run inside the event loop that will use the fetcher.
        """
        if self._state is _State.OPEN:
            return
        if self._state is _State.CLOSED:
            raise ClosedResourceError("Fetcher is closed; create a new one", code="http_closed")
        connector = CountingConnector(
            limit=self.concurrency,
            limit_per_host=self.per_host or 0,
            keepalive_timeout=self.keepalive_expiry,
        )
        self._connector = connector
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._client_timeout,
            headers=self._default_headers,
            raise_for_status=False,
            auto_decompress=True,
        )
        loop = self._loop = asyncio.get_running_loop()
        self._slots = Slots(loop, self.concurrency)
        if self.timeouts.total is not None:
            self._deadlines = AttemptDeadlines(loop, self.timeouts.total)
        if type(self._clock) is MonotonicClock:
            self._now = loop.time
        if self._retry_budget is None and self.retry is not None:
            self._retry_budget = RetryBudget(clock=self._clock)
        self._state = _State.OPEN

    async def aclose(self) -> None:
        """Stop every :meth:`fetch_all` stream of this fetcher and close the pool.

        Idempotent. Requests still in flight in other tasks fail with a transport error.
        """
        if self._state is _State.CLOSED:
            return
        streams = list(self._streams)
        self._state = _State.CLOSED
        for stream in streams:
            await stream.aclose()
        if self._session is not None:
            await self._session.close()
        if self._deadlines is not None:
            self._deadlines.close()

    def _ensure_open(self) -> None:
        if self._state is not _State.OPEN:
            self.open()

    async def __aenter__(self) -> Fetcher:
        self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        if getattr(self, "_state", None) is _State.OPEN:
            _warn(
                f"unclosed {self!r}: use 'async with Fetcher(...)' or 'await fetcher.aclose()'",
                ResourceWarning,
                source=self,
            )

    def __repr__(self) -> str:
        return (
            f"Fetcher(concurrency={self.concurrency}, per_host={self.per_host}, "
            f"state={self._state.value})"
        )

    # -- single requests ------------------------------------------------------------

    async def fetch(self, request: Request | str) -> Response:
        """Make one request (with retries if idempotent) and return the full response.

        A string is a GET of that URL. Raises :class:`~headrace.HttpStatusError` for a
        final status >= 400 (unless ``raise_for_status=False``),
        :class:`~headrace.HttpTransportError` for connect/read failures,
        :class:`~headrace.DeadlineExceeded` when ``total`` or ``slot_wait`` runs out, and
        :class:`~headrace.HttpError` for an invalid URL or a body over ``max_body_size``.
        Usable directly as a pipeline stage: ``Pipeline(urls).map(fetcher.fetch,
        workers=100)``.
        """
        response = await self._execute(
            get_request(request) if type(request) is str else coerce_request(request)
        )
        if response.status >= 400 and self.raise_for_status:
            error = status_error(
                response, retry_after=parse_retry_after(response.headers.get("Retry-After"))
            )
            count(self._errors, error.code)
            raise error
        return response

    async def _execute(
        self, request: Request, *, bounded: bool = True, task: asyncio.Task[Any] | None = None
    ) -> Response:
        """Send ``request`` with retries; ``task`` is the one running this (default: ask)."""
        if self._state is not _State.OPEN:
            self.open()
        self._requests += 1
        try:
            prepared = Prepared(request)
        except HeadraceError as exc:
            count(self._errors, exc.code)
            raise
        idempotent = request.is_idempotent
        policy = self.retry if idempotent else None
        hedge = self.hedge
        if hedge is not None and not (idempotent and request.method in HEDGEABLE):
            hedge = None
        budget = self._retry_budget if policy is not None else None
        if budget is not None:
            budget.record_request()
        session = self._session
        slots = self._slots
        deadlines = self._deadlines
        assert session is not None
        assert slots is not None
        # No limiter, no per-host limit, no slot_wait bound: a plain wait for a global
        # slot does it, without the helper's two extra coroutine levels.
        fast_slots = self._fast_slots and (not bounded or self.timeouts.slot_wait is None)
        started = self._now()
        failures = 0
        while True:
            try:
                if hedge is not None:
                    response = await hedge.call(
                        functools.partial(self._attempt, prepared, started, failures + 1)
                    )
                else:
                    # The body of _attempt, inlined: every coroutine level between the
                    # worker and aiohttp is paid again on every resume, and in B6 the
                    # extra levels cost more client CPU than everything else we add.
                    attempt = failures + 1
                    if fast_slots:
                        host_slots = None
                        if not slots.try_acquire():
                            self._waiting += 1
                            try:
                                await slots.wait()
                            finally:
                                self._waiting -= 1
                    else:
                        host_slots = await self._acquire_slot(prepared, bounded)
                    self._attempts += 1
                    self._in_flight += 1
                    # ``total`` starts here, after the slot: queueing is not counted.
                    if deadlines is None:
                        entry = None
                    else:
                        if task is None:
                            task = self._current_task()
                        entry = deadlines.start(task)
                    try:
                        try:
                            raw = await session.request(
                                request.method,
                                prepared.url,
                                headers=request.headers,
                                data=prepared.data,
                            )
                        except BaseException as exc:
                            error = self._request_failed(exc, prepared, started, attempt, entry)
                            if error is exc:
                                raise
                            raise error from exc
                        length = raw.content_length
                        try:
                            if (
                                length is not None
                                and length <= self.max_body_size
                                and request.method != "HEAD"
                                and raw.status not in NO_BODY_STATUSES
                            ):
                                body = await raw.read()
                            else:
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
                        slots.release()
                        if host_slots is not None:
                            host_slots.release()
                    response = self._response(prepared, raw, body, started, attempt)
            except HeadraceError as exc:
                failures += 1
                delay = next_delay(
                    policy, budget, exc, failures, self._now() - started, self.max_retry_after
                )
                if delay is None:
                    count(self._errors, exc.code)
                    if failures > 1:
                        exc.add_note(f"headrace.http: gave up after {failures} attempts")
                    raise
            else:
                status = response.status
                if policy is None or status not in RETRYABLE_STATUSES:
                    # count inlined (once per request).
                    try:
                        self._statuses[status] += 1
                    except KeyError:
                        self._statuses[status] = 1
                    return response
                failures += 1
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                error = status_error(response, retry_after=retry_after)
                delay = next_delay(
                    policy, budget, error, failures, self._now() - started, self.max_retry_after
                )
                if delay is None:
                    count(self._statuses, response.status)
                    return response
            self._retries += 1
            await self._clock.sleep(delay)

    # -- streaming one body -----------------------------------------------------------

    @asynccontextmanager
    async def stream(self, request: Request | str) -> AsyncIterator[StreamResponse]:
        """Send one request and let the block read the body itself, bounded by ``read``.

        No retries (the body is yours, so a retry could not be transparent) and no
        ``total`` timeout (your block's time is yours). On leaving the block whatever is
        unread is drained if it is at most ``drain_limit`` bytes, so the connection is
        reused; otherwise, and on any exception or cancellation, the connection is
        closed. Status errors are not raised here: check ``status``.
        """
        self._ensure_open()
        session = self._session
        assert session is not None
        self._requests += 1
        try:
            prepared = Prepared(coerce_request(request))
        except HeadraceError as exc:
            count(self._errors, exc.code)
            raise
        req = prepared.request
        host_slots = await self._acquire_slot(prepared)
        self._attempts += 1
        self._in_flight += 1
        try:
            try:
                response = await session.request(
                    req.method,
                    prepared.url,
                    headers=req.headers,
                    data=prepared.data,
                    timeout=self._stream_timeout,
                )
            except aiohttp.ClientError as exc:
                error = translate(exc, prepared, self.timeouts)
                count(self._errors, error.code)
                raise error from exc
            self._responses += 1
            count(self._statuses, response.status)
            handle = StreamResponse(response, prepared, self.max_body_size)
            try:
                yield handle
            except BaseException:
                self._discard(response)
                raise
            await self._finish(response, handle)
        finally:
            self._in_flight -= 1
            self._release_slot(host_slots)

    # -- fan-out ----------------------------------------------------------------------

    def fetch_all(
        self,
        requests: Iterable[Request | str] | AsyncIterable[Request | str],
        *,
        ordered: bool = False,
        workers: int | None = None,
        fail_fast: bool = False,
        buffer: int | None = None,
    ) -> ResultStream:
        """Stream a :class:`Result` per request, fetched by a bounded pool of workers.

        ``workers`` (default ``concurrency``) long-lived tasks pull requests from
        the (sync or async, possibly endless) iterable one at a time, so memory stays
        flat however many requests there are; connections stay within
        ``concurrency`` whatever the number of workers. Why one worker per
        connection: a worker that finishes a request hands its result over and sends
        the next one on the same slot without suspending, so no slot idles; extra
        workers would only park on the slots, and each park and wake-up (plus the
        garbage collections that the parked objects trigger) cost B6 about 20 % of
        the client's instructions per request (callgrind; 2x workers had looked
        faster in earlier, noisier wall-clock runs). The workers queue for connection slots without
        ``slot_wait`` (that bound is for :meth:`fetch` callers competing for slots).
        Results come in completion order, or in input order with ``ordered=True``; at
        most ``workers + buffer`` (default ``2 * workers``) requests are in flight or
        finished-but-not-consumed, so a slow consumer or a slow head-of-line request
        pauses the workers instead of growing a buffer. A failed request yields a
        :class:`Result` with ``error`` set and the rest go on; ``fail_fast=True`` raises
        the first error instead and stops the workers.
        Iterate it with ``async for``; wrap it in ``async with`` if you may stop early,
        so that the workers are stopped and awaited when you leave.
        """
        if workers is None:
            workers = self.concurrency
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigurationError(f"fetch_all(workers={workers!r}) must be an int >= 1")
        if buffer is None:
            buffer = workers
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 0:
            raise ConfigurationError(f"fetch_all(buffer={buffer!r}) must be an int >= 0")
        stream = ResultStream(self, requests, ordered, workers, fail_fast, workers + buffer)
        self._streams.add(stream)
        return stream

    def _result_of(self, index: int, request: Request, response: Response) -> Result:
        """The :class:`Result` for a response (an error status becomes its error)."""
        if self.raise_for_status and response.status >= 400:
            failure = status_error(
                response, retry_after=parse_retry_after(response.headers.get("Retry-After"))
            )
            count(self._errors, failure.code)
            return Result(index, request, response, failure)
        return Result(index, request, response, None)

    def _unexpected(self, index: int, request: Request, exc: Exception) -> Result:
        """A bug below us (not a HeadraceError) becomes an InternalError result."""
        error = InternalError.wrap(
            exc,
            f"unexpected {type(exc).__name__} fetching {request!r}: {exc}",
            context={"method": request.method, "url": redact_url(request.url)},
        )
        count(self._errors, error.code)
        return Result(index, request, None, error)
