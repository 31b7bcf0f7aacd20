"""Tests for headrace.http: a local keep-alive server on 127.0.0.1, never an outside address.

The ``real_time`` tests use real sockets; their time bounds are lower bounds (a wait that
must have happened) or generous upper bounds (10x the expected figure) because the
machine is shared.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import gc
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest

import headrace.http
from headrace import (
    Clock,
    ClosedResourceError,
    ConfigurationError,
    DeadlineExceeded,
    HedgePolicy,
    HttpError,
    HttpStatusError,
    HttpTransportError,
    KeyedLimiter,
    Pipeline,
    Retry,
    RetryBudget,
    TokenBucket,
)
from headrace.http import (
    Fetcher,
    Request,
    Response,
    Result,
    Timeouts,
    parse_retry_after,
    redact_url,
)
from headrace.http._deadlines import EXPIRED, AttemptDeadlines
from headrace.http._models import get_request, new_response, new_result, status_error
from headrace.http._retrying import next_delay
from headrace.http._slots import Slots
from http_server import HttpTestServer

real_time = pytest.mark.real_time

FAST_RETRY = Retry(max_attempts=3, initial_delay=0.01, max_delay=0.05)


# -- pure pieces ---------------------------------------------------------------------------


def test_exports_are_pinned() -> None:
    """headrace.http exports exactly the documented names."""
    assert headrace.http.__all__ == [
        "DEFAULT_RETRY",
        "IDEMPOTENT_METHODS",
        "RETRYABLE_STATUSES",
        "Fetcher",
        "FetcherStatistics",
        "Request",
        "Response",
        "Result",
        "ResultStream",
        "StreamResponse",
        "SupportsAcquire",
        "Timeouts",
        "parse_retry_after",
        "redact_url",
    ]


def test_import_headrace_does_not_import_aiohttp() -> None:
    """`import headrace` leaves aiohttp unimported; only headrace.http pulls it in."""
    code = "import sys, headrace; print('aiohttp' in sys.modules)"
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert output.strip() == "False"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("120", 120.0),
        (" 3 ", 3.0),
        ("1.5", 1.5),
        ("0", 0.0),
        ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),
        ("-1", None),
        ("inf", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    """Retry-After is read as delta-seconds or as an HTTP date relative to now."""
    now = dt.datetime(2015, 10, 21, 7, 28, 0, tzinfo=dt.UTC)
    assert parse_retry_after(header, now=now) == expected


def test_redact_url_hides_credentials_and_secret_parameters() -> None:
    """User info and secret-looking query values never survive redaction."""
    url = "https://bob:hunter2@api.example/v1/items?api_key=abc123&page=2&token=t0k"
    assert redact_url(url) == "https://***@api.example/v1/items?api_key=***&page=2&token=***"
    assert redact_url("http://127.0.0.1:80/x?q=1") == "http://127.0.0.1:80/x?q=1"


def test_request_normalises_method_and_knows_idempotency() -> None:
    """Methods are upper-cased; GET/PUT/DELETE are idempotent, POST only when told."""
    assert Request("http://h/", method="get").method == "GET"
    assert Request("http://h/").is_idempotent
    assert Request("http://h/", method="PUT").is_idempotent
    assert not Request("http://h/", method="POST").is_idempotent
    assert Request("http://h/", method="POST", idempotent=True).is_idempotent
    assert repr(
        Request("http://u:pw@h/?secret=1", tag=7)
    ) == "Request(GET http://***@h/?secret=*** tag=7)".replace(" tag", ", tag")


def test_hot_path_constructors_build_the_same_frozen_objects() -> None:
    """The fetcher's fast constructors equal the dataclass ones, and the results stay frozen."""
    request = get_request("http://h/x")
    assert request == Request("http://h/x")
    response = new_response(request, 200, "OK", {"A": "b"}, b"body", "http://h/x", 0.5, 2)
    assert response == Response(
        request=request,
        status=200,
        reason="OK",
        headers={"A": "b"},
        body=b"body",
        url="http://h/x",
        elapsed=0.5,
        attempts=2,
    )
    result = new_result(3, request, response, None)
    assert result == Result(3, request, response, None)
    assert result.ok
    for frozen, name in ((request, "url"), (response, "status"), (result, "index")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(frozen, name, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"concurrency": 0}, "Fetcher(concurrency=0) must be >= 1"),
        ({"per_host": 0}, "Fetcher(per_host=0) must be an int >= 1"),
        ({"max_body_size": -1}, "Fetcher(max_body_size=-1) must be an int >= 0 (bytes)"),
        ({"timeout": "fast"}, "timeout='fast' must be a number of seconds or a Timeouts"),
        ({"rate_limit": -5.0}, "Fetcher(rate_limit=-5.0) must be > 0 requests per second"),
        ({"rate_limit": "x"}, "Fetcher(rate_limit='x') must be requests per second"),
    ],
)
def test_fetcher_rejects_bad_configuration(kwargs: dict[str, object], message: str) -> None:
    """Bad constructor arguments raise ConfigurationError naming the input."""
    with pytest.raises(ConfigurationError) as info:
        Fetcher(**kwargs)  # type: ignore[arg-type]
    assert info.value.message.startswith(message)


def test_timeouts_validate_and_coerce() -> None:
    """A number sets only the total timeout; non-positive values are refused."""
    assert Timeouts.coerce(2.5) == Timeouts(total=2.5)
    assert Timeouts.coerce(None) == Timeouts(None, None, None, None)
    with pytest.raises(ConfigurationError, match=r"Timeouts\(read=0\)"):
        Timeouts(read=0)


async def test_fetch_all_refuses_bad_arguments() -> None:
    """fetch_all validates workers and the request source before starting anything."""
    fetcher = Fetcher()
    with pytest.raises(ConfigurationError, match=r"fetch_all\(workers=0\)"):
        fetcher.fetch_all([], workers=0)
    with pytest.raises(ConfigurationError, match="must be an iterable"):
        fetcher.fetch_all("http://127.0.0.1/")  # type: ignore[arg-type]


async def test_fetch_all_window_hands_places_over_and_survives_cancellation() -> None:
    """A returned window place goes to the first parked worker; one cancelled after
    being handed a place passes it on, one cancelled while parked is skipped."""
    fetcher = Fetcher()
    stream = fetcher.fetch_all([], workers=1, buffer=0)
    stream._room = 0
    order: list[str] = []

    async def park(name: str) -> None:
        await stream._wait_for_room()
        order.append(name)

    first = asyncio.create_task(park("first"))
    second = asyncio.create_task(park("second"))
    third = asyncio.create_task(park("third"))
    await asyncio.sleep(0)
    second.cancel()  # cancelled while parked
    await asyncio.sleep(0)
    stream._give_room()  # -> first
    first.cancel()  # handed a place, cancelled before it ran: the place moves on
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert order == ["third"]
    assert first.cancelled()
    assert second.cancelled()
    stream._give_room()  # nobody parked any more: the counter takes it
    assert stream._room == 1
    await third


async def test_slot_wait_expires_at_exactly_slot_wait(clock: Clock) -> None:
    """On the virtual clock, a request that finds every slot taken fails with
    http_slot_timeout at exactly slot_wait seconds, without touching the network."""
    timeouts = Timeouts(slot_wait=0.25)
    async with Fetcher(concurrency=1, timeout=timeouts, clock=clock) as fetcher:
        # White-box: hold the only slot the way an in-flight request would.
        assert fetcher._slots is not None
        await fetcher._slots.acquire()
        started = clock.now()
        with pytest.raises(DeadlineExceeded) as info:
            await fetcher.fetch("http://127.0.0.1:9/never-sent")
        assert clock.now() - started == 0.25
        assert fetcher.statistics().waiting_for_slot == 0
        assert fetcher.statistics().attempts == 0
        fetcher._slots.release()
    assert info.value.code == "http_slot_timeout"
    assert info.value.context["elapsed"] == 0.25
    assert "slot_wait=0.25 s (concurrency=1, per_host=None)" in info.value.message


async def test_slots_hand_over_in_order_and_survive_cancellation() -> None:
    """A released slot goes to the first live waiter (FIFO), never to a newcomer; a
    waiter cancelled after being handed one passes it on, one cancelled while queued
    leaves the line."""
    slots = Slots(asyncio.get_running_loop(), 1)
    assert slots.try_acquire()
    assert not slots.try_acquire()
    order: list[str] = []

    async def take(name: str) -> None:
        await slots.acquire()
        order.append(name)

    first = asyncio.create_task(take("first"))
    second = asyncio.create_task(take("second"))
    third = asyncio.create_task(take("third"))
    await asyncio.sleep(0)
    second.cancel()  # cancelled while queued
    await asyncio.sleep(0)
    slots.release()  # -> first
    assert not slots.try_acquire()  # handed over, not free: a newcomer cannot take it
    first.cancel()  # handed the slot, cancelled before it ran: the slot moves on
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert order == ["third"]
    assert first.cancelled()
    assert second.cancelled()
    await third
    slots.release()
    assert slots.try_acquire()
    assert not slots._waiters


async def test_attempt_deadlines_expire_in_order_and_yield_to_other_cancels() -> None:
    """Each attempt's task is cancelled at exactly start + seconds; settle_expired says
    the CancelledError was the deadline's, unless someone else cancelled too."""
    loop = asyncio.get_running_loop()
    deadlines = AttemptDeadlines(loop, 0.5)
    outcomes: dict[str, tuple[float, bool]] = {}

    async def attempt(name: str, cancel_too: bool) -> None:
        task = asyncio.current_task()
        assert task is not None
        entry = deadlines.start(task)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError as exc:
            if cancel_too:
                task.cancel()  # a second cancel, e.g. the caller giving up
            assert entry[2] == EXPIRED
            outcomes[name] = (loop.time(), deadlines.settle_expired(entry, exc))
        finally:
            deadlines.finish(entry)

    started = loop.time()
    first = asyncio.create_task(attempt("first", cancel_too=False))
    await asyncio.sleep(0.25)
    second = asyncio.create_task(attempt("second", cancel_too=True))
    await first
    # The second was cancelled twice and took back only the deadline's cancel.
    with pytest.raises(asyncio.CancelledError):
        await second
    assert outcomes == {
        "first": (started + 0.5, True),
        "second": (started + 0.75, False),
    }
    deadlines.close()


async def test_attempt_deadlines_finished_entries_do_not_pile_up() -> None:
    """Finished attempts leave the queue, even behind a slow one at its head, and a
    finished attempt is never cancelled."""
    loop = asyncio.get_running_loop()
    deadlines = AttemptDeadlines(loop, 10.0)
    task = asyncio.current_task()
    assert task is not None
    slow = deadlines.start(task)
    for _ in range(1_000):
        deadlines.finish(deadlines.start(task))
    assert len(deadlines._entries) <= 2 * 1 + 64 + 1
    deadlines.finish(slow)
    await asyncio.sleep(20)  # past every deadline: nothing is cancelled
    assert task.cancelling() == 0
    deadlines.close()


def _status(status: int, retry_after: float | None) -> HttpStatusError:
    request = Request("http://h/x")
    response = Response(request, status, "", {}, b"", request.url, 0.0, 1)
    return status_error(response, retry_after=retry_after)


@pytest.mark.parametrize(
    ("status", "retry_after", "failures", "expected"),
    [
        (503, None, 1, 0.1),  # the policy's own backoff
        (503, None, 2, 0.2),
        (429, 2.0, 1, 2.0),  # Retry-After is longer: it wins
        (429, 0.01, 1, 0.1),  # Retry-After is shorter: the backoff still applies
        (503, 61.0, 1, None),  # longer than max_retry_after: give up now
        (503, None, 3, None),  # max_attempts reached
        (404, None, 1, None),  # not transient
    ],
)
def test_retry_decision(
    status: int, retry_after: float | None, failures: int, expected: float | None
) -> None:
    """The wait before a retry is max(backoff, Retry-After), within max_retry_after."""
    policy = Retry(max_attempts=3, initial_delay=0.1, jitter="none")
    error = _status(status, retry_after)
    assert next_delay(policy, None, error, failures, 0.0, max_retry_after=60.0) == expected


def test_retry_budget_can_veto_a_retry() -> None:
    """An exhausted RetryBudget stops retries even when the policy would retry."""
    policy = Retry(max_attempts=3, initial_delay=0.1, jitter="none")
    empty = RetryBudget(ratio=0.0, min_per_second=0.0)
    error = _status(503, None)
    assert next_delay(policy, empty, error, 1, 0.0, max_retry_after=60.0) is None


# -- against the local server --------------------------------------------------------------


@real_time
async def test_fan_out_opens_at_most_concurrency_connections() -> None:
    """500 GETs through concurrency=10 open <= 10 connections and reuse them."""
    async with HttpTestServer() as server, Fetcher(concurrency=10) as fetcher:
        urls = [server.url(f"/ok?size=2048&i={i}") for i in range(500)]
        results = [result async for result in fetcher.fetch_all(urls)]
        stats = fetcher.statistics()
    assert len(results) == 500
    assert all(result.ok for result in results)
    assert {len(result.unwrap().body) for result in results} == {2048}
    assert sorted(result.index for result in results) == list(range(500))
    assert server.accepted <= 10
    assert server.peak_active <= 10
    assert stats.connections_opened == server.accepted
    assert stats.connections_opened + stats.connections_reused == 500
    assert stats.requests == stats.attempts == stats.responses == 500
    assert stats.statuses == {200: 500}
    assert stats.in_flight == 0


@real_time
async def test_connections_read_in_64_kib_pieces() -> None:
    """Our plain-HTTP sockets are read 64 KiB at a time, not asyncio's 256 KiB (which
    glibc may serve with an mmap per read); bodies larger than that still arrive whole."""
    async with HttpTestServer() as server, Fetcher(concurrency=2) as fetcher:
        response = await fetcher.fetch(server.url("/ok?size=300000"))
        assert len(response.body) == 300_000
        assert fetcher._connector is not None
        protocols = [proto for conns in fetcher._connector._conns.values() for proto, _ in conns]
        assert protocols
        assert {proto.transport.max_size for proto in protocols} == {64 * 1024}


@real_time
async def test_chunked_bodies_are_read_and_connections_reused() -> None:
    """Bodies without Content-Length are read to the end, so one connection serves all."""
    async with HttpTestServer() as server, Fetcher(concurrency=1) as fetcher:
        for _ in range(20):
            response = await fetcher.fetch(server.url("/chunked?size=20000"))
            assert response.body == b"y" * 20000
    assert server.accepted == 1


@real_time
async def test_ignored_small_stream_body_is_drained_and_connection_reused() -> None:
    """A stream whose body the caller never reads is drained, so the connection is reused."""
    async with HttpTestServer() as server, Fetcher(concurrency=1) as fetcher:
        for _ in range(10):
            async with fetcher.stream(server.url("/ok?size=30000")) as response:
                assert response.status == 200
        stats = fetcher.statistics()
    assert server.accepted == 1
    assert stats.connections_discarded == 0
    assert stats.connections_reused == 9


@real_time
async def test_ignored_large_stream_body_closes_the_connection() -> None:
    """An unread rest larger than drain_limit is not downloaded: the connection is closed."""
    async with (
        HttpTestServer() as server,
        Fetcher(concurrency=1, drain_limit=10_000) as fetcher,
    ):
        for _ in range(3):
            async with fetcher.stream(server.url("/ok?size=500000")) as response:
                assert (await anext(response.iter_chunks(100))) == b"x" * 100
        stats = fetcher.statistics()
        await asyncio.sleep(0.05)  # let the server notice the closed sockets
    assert server.accepted == 3
    assert stats.connections_discarded == 3


@real_time
async def test_cancellation_mid_body_releases_the_connection() -> None:
    """Cancelling a fetch whose body is still arriving closes that connection and frees
    the slot for the next request."""
    async with HttpTestServer() as server, Fetcher(concurrency=1) as fetcher:
        task = asyncio.create_task(fetcher.fetch(server.url("/hang-body")))
        await server.wait_for_request()
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stats = fetcher.statistics()
        assert stats.in_flight == 0
        assert stats.connections_discarded == 1
        response = await asyncio.wait_for(fetcher.fetch(server.url("/ok")), 10)
        assert response.status == 200
        for _ in range(100):
            if server.alive == 1:
                break
            await asyncio.sleep(0.01)
        assert server.alive == 1  # the cancelled one is gone; the new one is pooled
    assert server.accepted == 2


@real_time
async def test_breaking_out_of_fetch_all_stops_the_workers() -> None:
    """Leaving `async with fetch_all(...)` early cancels and awaits every worker."""
    async with HttpTestServer() as server, Fetcher(concurrency=5) as fetcher:
        urls = (server.url(f"/slow?delay=0.02&i={i}") for i in range(10_000))
        async with fetcher.fetch_all(urls) as results:
            seen = 0
            async for result in results:
                assert result.ok
                seen += 1
                if seen == 20:
                    break
        assert fetcher.statistics().in_flight == 0
    # At most workers + buffer (2 x 10 by default) more than were consumed were taken
    # from the endless source.
    assert server.requests <= 20 + 20


@real_time
async def test_retries_idempotent_get_on_503_then_succeeds() -> None:
    """A GET answered 503 twice is retried and succeeds on the third attempt."""
    async with HttpTestServer() as server, Fetcher(retry=FAST_RETRY) as fetcher:
        response = await fetcher.fetch(server.url("/flaky?key=get&fail=2&status=503"))
        stats = fetcher.statistics()
    assert response.status == 200
    assert response.attempts == 3
    assert len(server.arrivals["get"]) == 3
    assert stats.retries == 2
    assert stats.requests == 1
    assert stats.attempts == 3


@real_time
async def test_post_is_never_retried() -> None:
    """A POST answered 503 is not retried: the status error comes back after one try."""
    async with HttpTestServer() as server, Fetcher(retry=FAST_RETRY) as fetcher:
        url = server.url("/flaky?key=post&fail=1&status=503")
        with pytest.raises(HttpStatusError) as info:
            await fetcher.fetch(Request(url, method="POST", body=b"payload"))
    assert len(server.arrivals["post"]) == 1
    assert info.value.context["status"] == 503
    assert info.value.context["method"] == "POST"
    assert info.value.code == "http_status_503"
    assert info.value.transient


@real_time
async def test_post_marked_idempotent_is_retried() -> None:
    """A POST the caller declares idempotent (idempotency key) may be retried."""
    async with HttpTestServer() as server, Fetcher(retry=FAST_RETRY) as fetcher:
        url = server.url("/flaky?key=postkey&fail=1&status=502")
        response = await fetcher.fetch(Request(url, method="POST", idempotent=True))
    assert response.status == 200
    assert len(server.arrivals["postkey"]) == 2


@real_time
async def test_retry_after_is_honoured() -> None:
    """After a 429 with Retry-After: 0.4 the retry waits at least 0.4 s, although the
    policy's own backoff would be 10 ms."""
    async with HttpTestServer() as server, Fetcher(retry=FAST_RETRY) as fetcher:
        url = server.url("/flaky?key=ra&fail=1&status=429&retry_after=0.4")
        response = await fetcher.fetch(url)
    first, second = server.arrivals["ra"]
    assert response.status == 200
    assert 0.4 <= second - first < 4.0


@real_time
async def test_retry_after_beyond_max_retry_after_is_not_waited_for() -> None:
    """A Retry-After longer than max_retry_after ends the retries at once."""
    async with HttpTestServer() as server, Fetcher(retry=FAST_RETRY, max_retry_after=1) as fetcher:
        url = server.url("/flaky?key=long&fail=1&status=503&retry_after=3600")
        started = time.monotonic()
        with pytest.raises(HttpStatusError) as info:
            await fetcher.fetch(url)
    assert time.monotonic() - started < 3
    assert len(server.arrivals["long"]) == 1
    assert info.value.context["retry_after"] == 3600.0


@real_time
async def test_non_retryable_status_is_not_retried() -> None:
    """A 404 is final: one attempt, an HttpStatusError that is not transient."""
    async with HttpTestServer() as server, Fetcher(retry=FAST_RETRY) as fetcher:
        with pytest.raises(HttpStatusError) as info:
            await fetcher.fetch(server.url("/status/404"))
        stats = fetcher.statistics()
    assert not info.value.transient
    assert stats.attempts == 1
    assert stats.errors == {"http_status_404": 1}


@real_time
async def test_raise_for_status_false_returns_the_error_response() -> None:
    """With raise_for_status=False a 500 comes back as a response with its body."""
    async with HttpTestServer() as server, Fetcher(raise_for_status=False) as fetcher:
        response = await fetcher.fetch(server.url("/status/500"))
    assert (response.status, response.body, response.ok) == (500, b"no", False)


@real_time
async def test_per_host_limit_holds_for_each_host() -> None:
    """per_host=2 keeps at most 2 requests in progress per host, across two hosts."""
    async with HttpTestServer() as server, Fetcher(concurrency=10, per_host=2) as fetcher:
        urls = [
            server.url(f"/slow?delay=0.03&i={i}", host=host)
            for i in range(12)
            for host in ("127.0.0.1", "localhost")
        ]
        results = [result async for result in fetcher.fetch_all(urls)]
    assert all(result.ok for result in results)
    assert server.peak_by_host["127.0.0.1"] == 2
    assert server.peak_by_host["localhost"] == 2
    assert server.accepted <= 4


@real_time
async def test_rate_limiter_is_asked_once_per_attempt_per_host() -> None:
    """A per-host limiter factory is called once per host and acquired for every attempt."""
    acquired: list[str] = []
    created: list[str] = []

    class Recorder:
        def __init__(self, host: str) -> None:
            self.host = host

        async def acquire(self) -> None:
            acquired.append(self.host)

    def factory(host: str) -> Recorder:
        created.append(host)
        return Recorder(host)

    async with HttpTestServer() as server, Fetcher(rate_limit=factory, retry=FAST_RETRY) as fetcher:
        await fetcher.fetch(server.url("/flaky?key=rl&fail=1&status=503"))
        await fetcher.fetch(server.url("/ok", host="localhost"))
    a = f"http://127.0.0.1:{server.port}"
    b = f"http://localhost:{server.port}"
    assert created == [a, b]
    assert acquired == [a, a, b]


@real_time
async def test_token_bucket_rate_limit_spaces_requests() -> None:
    """rate_limit=20.0 (per host) spaces 11 requests over at least 0.5 s."""
    async with HttpTestServer() as server, Fetcher(rate_limit=20.0) as fetcher:
        started = time.monotonic()
        results = [r async for r in fetcher.fetch_all([server.url("/ok")] * 11)]
        elapsed = time.monotonic() - started
    assert all(result.ok for result in results)
    assert elapsed >= 0.5 * 0.95


@real_time
async def test_read_timeout_on_a_hanging_server() -> None:
    """A server that accepts but never answers trips the read timeout with a clear error."""
    timeouts = Timeouts(connect=5, read=0.2, total=30)
    async with HttpTestServer() as server, Fetcher(timeout=timeouts, retry=None) as fetcher:
        with pytest.raises(HttpTransportError) as info:
            await fetcher.fetch(server.url("/hang?token=s3cret"))
    error = info.value
    assert error.code == "http_read_timeout"
    assert error.context["phase"] == "read"
    assert error.context["url"] == f"http://127.0.0.1:{server.port}/hang?token=***"
    assert "GET http://127.0.0.1" in error.message
    assert "s3cret" not in str(error)
    assert "read=0.2 s" in error.message


@real_time
async def test_total_timeout_on_a_hanging_server() -> None:
    """Without a read timeout, the total timeout ends the attempt as DeadlineExceeded."""
    timeouts = Timeouts(connect=5, read=None, total=0.3)
    async with HttpTestServer() as server, Fetcher(timeout=timeouts, retry=None) as fetcher:
        with pytest.raises(DeadlineExceeded) as info:
            await fetcher.fetch(server.url("/hang-body"))
        stats = fetcher.statistics()
    assert info.value.code == "http_timeout"
    assert info.value.context["phase"] == "total"
    assert "total=0.3 s" in info.value.message
    assert stats.errors == {"http_timeout": 1}
    assert stats.connections_discarded == 1


@real_time
async def test_timeouts_are_retried_for_get() -> None:
    """A GET that times out is retried (timeouts are transient) up to max_attempts."""
    timeouts = Timeouts(read=0.1)
    retry = Retry(max_attempts=2, initial_delay=0.01)
    async with HttpTestServer() as server, Fetcher(timeout=timeouts, retry=retry) as fetcher:
        with pytest.raises(HttpTransportError) as info:
            await fetcher.fetch(server.url("/hang"))
    assert server.requests == 2
    assert "gave up after 2 attempts" in "".join(info.value.__notes__)


@real_time
async def test_slot_wait_timeout_is_separate_from_total() -> None:
    """Queueing for a slot does not count against total; slot_wait bounds it on its own."""
    queued = Timeouts(total=0.3, slot_wait=None)
    async with HttpTestServer() as server, Fetcher(concurrency=1, timeout=queued) as fetcher:
        # Each takes ~0.1 s; the last waits ~0.4 s for its slot, more than total=0.3.
        responses = await asyncio.gather(
            *(fetcher.fetch(server.url(f"/slow?delay=0.1&i={i}")) for i in range(5))
        )
        assert [response.status for response in responses] == [200] * 5

    bounded = Timeouts(total=30, slot_wait=0.1)
    async with HttpTestServer() as server, Fetcher(concurrency=1, timeout=bounded) as fetcher:
        busy = asyncio.create_task(fetcher.fetch(server.url("/slow?delay=0.5")))
        await server.wait_for_request()
        with pytest.raises(DeadlineExceeded) as info:
            await fetcher.fetch(server.url("/ok"))
        assert (await busy).status == 200
        assert fetcher.statistics().waiting_for_slot == 0
    assert info.value.code == "http_slot_timeout"
    assert info.value.context["phase"] == "slot_wait"
    assert server.requests == 1


@real_time
async def test_connection_refused_is_a_transport_error() -> None:
    """A port nobody listens on gives HttpTransportError(http_connect_error), retried."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with Fetcher(retry=Retry(max_attempts=2, initial_delay=0.01)) as fetcher:
        with pytest.raises(HttpTransportError) as info:
            await fetcher.fetch(f"http://127.0.0.1:{port}/")
        stats = fetcher.statistics()
    assert info.value.code == "http_connect_error"
    assert stats.attempts == 2
    assert stats.errors == {"http_connect_error": 1}


@real_time
async def test_body_size_cap() -> None:
    """Bodies over max_body_size fail with http_body_too_large, with or without a length."""
    async with HttpTestServer() as server, Fetcher(max_body_size=1000) as fetcher:
        for path in ("/ok?size=5000", "/chunked?size=5000"):
            with pytest.raises(HttpError) as info:
                await fetcher.fetch(server.url(path))
            assert info.value.code == "http_body_too_large"
            assert not info.value.transient
        assert len((await fetcher.fetch(server.url("/ok?size=1000"))).body) == 1000


@real_time
async def test_fetch_all_keeps_going_past_bad_urls() -> None:
    """A bad URL and an error status become error results; every other request succeeds."""
    async with HttpTestServer() as server, Fetcher(retry=None) as fetcher:
        requests = [
            server.url("/ok?size=10"),
            "not a url",
            server.url("/status/404"),
            "",
            Request(server.url("/echo"), method="POST", body=b"hi", tag="mine"),
        ]
        results = {result.index: result async for result in fetcher.fetch_all(requests)}
    assert results[0].ok
    assert results[1].error is not None
    assert results[1].error.code == "http_invalid_url"
    assert results[2].error is not None
    assert results[2].response is not None
    assert results[2].response.status == 404
    assert results[4].unwrap().body == b"POST hi"
    assert results[4].request.tag == "mine"
    assert results[3].error is not None
    assert results[3].error.code == "http_invalid_url"


@real_time
async def test_fetch_all_fail_fast_raises_the_first_error() -> None:
    """fail_fast=True raises the first failed request's error and stops the workers."""
    async with HttpTestServer() as server, Fetcher(retry=None) as fetcher:
        requests = [server.url("/ok")] * 3 + [server.url("/status/500")]
        with pytest.raises(HttpStatusError):
            async for _ in fetcher.fetch_all(requests, workers=1, fail_fast=True):
                pass


@real_time
async def test_fetch_all_ordered_yields_in_input_order() -> None:
    """ordered=True yields results in input order although later ones finish first."""
    async with HttpTestServer() as server, Fetcher(concurrency=8) as fetcher:
        delays = [0.2, 0.0, 0.1, 0.0, 0.15, 0.0, 0.05, 0.0]
        urls = [server.url(f"/slow?delay={delay}&i={i}") for i, delay in enumerate(delays)]
        ordered = [r.index async for r in fetcher.fetch_all(urls, ordered=True)]
        unordered = [r.index async for r in fetcher.fetch_all(urls)]
    assert ordered == list(range(8))
    assert sorted(unordered) == list(range(8))
    assert unordered != list(range(8))


@real_time
async def test_fetch_all_from_an_async_generator_with_few_workers() -> None:
    """An async source feeds a bounded pool: only 2 x concurrency worker tasks exist,
    however many requests, and connections stay within concurrency."""

    async def source() -> AsyncIterator[str]:
        for i in range(200):
            yield server.url(f"/ok?size=100&i={i}")

    async with HttpTestServer() as server, Fetcher(concurrency=4) as fetcher:
        peak = 0
        count = 0
        async for result in fetcher.fetch_all(source()):
            assert result.ok
            count += 1
            workers = [t for t in asyncio.all_tasks() if "fetch_all worker" in t.get_name()]
            peak = max(peak, len(workers))
    assert count == 200
    assert peak <= 8  # the default: twice concurrency
    assert server.accepted <= 4


@real_time
async def test_fetch_is_usable_as_a_map_function() -> None:
    """fetch(request) is a plain coroutine function, so any stage runner can call it."""
    async with HttpTestServer() as server, Fetcher(concurrency=3) as fetcher:
        urls = [server.url(f"/ok?size=5&i={i}") for i in range(9)]
        bodies = await asyncio.gather(*map(fetcher.fetch, urls))
    assert [response.body for response in bodies] == [b"xxxxx"] * 9
    assert server.accepted <= 3


@real_time
async def test_closed_fetcher_refuses_work() -> None:
    """A closed fetcher raises ClosedResourceError instead of reopening silently."""
    async with HttpTestServer() as server:
        fetcher = Fetcher()
        async with fetcher:
            await fetcher.fetch(server.url("/ok"))
        with pytest.raises(ClosedResourceError):
            await fetcher.fetch(server.url("/ok"))


def _drop_and_collect(holder: list[Fetcher]) -> None:
    holder.clear()
    gc.collect()  # in case a reference cycle keeps it alive until the collector runs


@real_time
async def test_unclosed_fetcher_warns() -> None:
    """Dropping an open fetcher without aclose() emits ResourceWarning."""
    fetcher = Fetcher()
    fetcher.open()
    # Close aiohttp's session ourselves so that only our own warning is under test.
    assert fetcher._session is not None
    await fetcher._session.close()
    holder = [fetcher]
    del fetcher
    with pytest.warns(ResourceWarning, match="unclosed Fetcher"):
        _drop_and_collect(holder)


@real_time
async def test_results_carry_index_request_and_statistics_count_errors() -> None:
    """Errors are counted by code; results point back to their request."""
    async with HttpTestServer() as server, Fetcher(retry=None) as fetcher:
        requests = [server.url("/status/503"), server.url("/ok"), "ftp://x/"]
        results: list[Result] = [r async for r in fetcher.fetch_all(requests, ordered=True)]
        stats = fetcher.statistics()
    assert [r.request.url for r in results] == requests
    assert stats.errors == {"http_status_503": 1, "http_invalid_url": 1}
    assert stats.statuses == {503: 1, 200: 1}


@real_time
async def test_keyed_limiter_is_asked_per_host() -> None:
    """A KeyedLimiter given as rate_limit is keyed by scheme://host:port."""
    keyed: KeyedLimiter[str, TokenBucket] = KeyedLimiter(lambda host: TokenBucket(1000, 10))
    async with HttpTestServer() as server, Fetcher(rate_limit=keyed) as fetcher:
        await fetcher.fetch(server.url("/ok"))
        await fetcher.fetch(server.url("/ok", host="localhost"))
        await fetcher.fetch(server.url("/ok"))
    a = keyed.limiter(f"http://127.0.0.1:{server.port}")
    b = keyed.limiter(f"http://localhost:{server.port}")
    assert a.statistics().granted == 2
    assert b.statistics().granted == 1


@real_time
async def test_per_host_rate_limit_does_not_slow_other_hosts() -> None:
    """rate_limit=2.0 is per host: two hosts get 2/s each, not 2/s between them."""
    async with HttpTestServer() as server, Fetcher(rate_limit=2.0) as fetcher:
        urls = [server.url("/ok", host=host) for host in ("127.0.0.1", "localhost")] * 3
        started = time.monotonic()
        results = [r async for r in fetcher.fetch_all(urls)]
        elapsed = time.monotonic() - started
    assert all(result.ok for result in results)
    # 3 per host at 2/s with burst 1: at 0, 0.5 and 1.0 s, both hosts side by side. A
    # limit shared between the hosts would need 2.5 s for the 6; 1 s of slack for noise.
    assert 1.0 * 0.95 <= elapsed < 2.0


@real_time
async def test_hedged_get_beats_a_stalled_first_attempt() -> None:
    """With a hedge policy, a GET whose first attempt stalls is answered by the hedge
    and the stalled attempt's connection is closed."""
    policy = HedgePolicy(delay=0.05)
    async with HttpTestServer() as server, Fetcher(hedge=policy) as fetcher:
        started = time.monotonic()
        response = await fetcher.fetch(server.url("/first-slow?key=h&delay=10"))
        elapsed = time.monotonic() - started
        stats = fetcher.statistics()
    assert response.body == b"answer 2"
    assert elapsed < 5
    assert len(server.arrivals["h"]) == 2
    assert stats.attempts == 2
    assert stats.connections_discarded == 1
    assert policy.statistics().extra_attempts == 1


@real_time
async def test_post_is_never_hedged() -> None:
    """Hedging applies to GET and HEAD only; a POST waits for its one attempt."""
    policy = HedgePolicy(delay=0.01)
    async with HttpTestServer() as server, Fetcher(hedge=policy) as fetcher:
        url = server.url("/first-slow?key=p&delay=0.2")
        response = await fetcher.fetch(Request(url, method="POST"))
    assert response.body == b"answer 1"
    assert len(server.arrivals["p"]) == 1


@real_time
async def test_fetch_as_a_pipeline_stage() -> None:
    """fetcher.fetch composes with Pipeline.map; the pool still bounds the connections."""
    async with HttpTestServer() as server, Fetcher(concurrency=4) as fetcher:
        urls = [server.url(f"/ok?size=3&i={i}") for i in range(40)]
        bodies = await Pipeline(urls).map(fetcher.fetch, workers=8).map(lambda r: r.body).collect()
    assert bodies == [b"xxx"] * 40
    assert server.accepted <= 4
    assert server.peak_active <= 4


@real_time
async def test_stream_read_is_capped_and_full_reads_reuse_the_connection() -> None:
    """stream().read() stops at max_body_size; a body read to the end keeps the connection."""
    async with (
        HttpTestServer() as server,
        Fetcher(concurrency=1, max_body_size=1000) as fetcher,
    ):
        with pytest.raises(HttpError) as info:
            async with fetcher.stream(server.url("/chunked?size=200000")) as response:
                await response.read()
        assert info.value.code == "http_body_too_large"
        for _ in range(3):
            async with fetcher.stream(server.url("/chunked?size=900")) as response:
                chunks = [chunk async for chunk in response.iter_chunks(300)]
            assert b"".join(chunks) == b"y" * 900
        stats = fetcher.statistics()
    assert stats.connections_discarded == 1
    assert server.accepted == 2  # one closed by the cap, one reused three times


@real_time
async def test_head_and_text_bodies() -> None:
    """HEAD gets no body and keeps the connection; a str body is sent UTF-8 encoded."""
    async with HttpTestServer() as server, Fetcher(concurrency=1) as fetcher:
        head = await fetcher.fetch(Request(server.url("/ok?size=100"), method="HEAD"))
        echo = await fetcher.fetch(Request(server.url("/echo"), method="PUT", body="héllo"))
    assert (head.status, head.body) == (200, b"")
    assert echo.text() == "PUT héllo"
    assert server.accepted == 1
