"""Plain data for :mod:`headrace.http`: requests, responses, results, timeouts, statistics.

Nothing here touches the network; the fetcher builds and consumes these values. They are
frozen (safe to share between tasks) and their reprs never show credentials or secret
query parameters.
"""

from __future__ import annotations

import datetime as _dt
import email.utils
import json as _json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .._errors import ConfigurationError, HeadraceError, HttpStatusError

__all__ = [
    "IDEMPOTENT_METHODS",
    "RETRYABLE_STATUSES",
    "FetcherStatistics",
    "Request",
    "Response",
    "Result",
    "Timeouts",
    "parse_retry_after",
    "redact_url",
]

# RFC 9110 section 9.2.2: repeating these has the same effect as sending them once.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Statuses that say "not now" rather than "never": overload (429, 503) and trouble
# between a gateway and its upstream (502, 504).
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})

_METHOD = re.compile(r"^[A-Z]+$")
_COMMON_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Query parameters whose values are secrets (signed URLs, API keys, OAuth tokens).
_SECRET_PARAM = re.compile(
    r"pass(word|wd)?|secret|token|api[_-]?key|^key$|auth|credential|signature|^sig$|session",
    re.I,
)


def redact_url(url: str) -> str:
    """Return ``url`` with its user info and secret-looking query values replaced by ``***``.

    ``https://bob:pw@api.example/v1?api_key=abc&page=2`` becomes
    ``https://***@api.example/v1?api_key=***&page=2``. Used in every error message,
    error context and repr that mentions a URL. Unparseable input is returned with only
    the generic password redaction applied.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"//[^/@\s]*@", "//***@", url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(key, "***" if _SECRET_PARAM.search(key) else value) for key, value in pairs],
            safe="*",
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def parse_retry_after(value: str | None, *, now: _dt.datetime | None = None) -> float | None:
    """Seconds to wait according to a ``Retry-After`` header, or ``None`` if unusable.

    Accepts delta-seconds (``"120"``, and leniently ``"1.5"``) and an HTTP date
    (``"Wed, 21 Oct 2015 07:28:00 GMT"``), which is compared with ``now`` (default:
    the current UTC wall time, since the server's date is wall time). A date in the past
    means ``0.0``; negative, non-finite or malformed values mean ``None``.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.UTC)
    reference = now if now is not None else _dt.datetime.now(_dt.UTC)
    return max(0.0, (when - reference).total_seconds())


def _check_seconds(name: str, value: float | None) -> None:
    if value is None:
        return
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise ConfigurationError(f"Timeouts({name}={value!r}) must be a positive number of seconds")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long each phase of a request may take, in seconds (``None``: no limit).

    ``connect`` bounds opening one TCP (and TLS) connection; ``read`` bounds the silence
    between two chunks from the server (a server that stops sending trips it even while
    the total is far away); ``total`` bounds one attempt from sending the request to
    having read the whole body, and raises :class:`~headrace.DeadlineExceeded`;
    ``slot_wait`` bounds the wait for a free connection slot (global and per host)
    *before* the attempt starts, so time spent queueing behind other requests never
    counts against ``total``. Retries get a fresh ``total`` each; the retry policy's own
    ``budget`` bounds the whole. The defaults (10 s connect, 60 s total, no read or slot
    limit) suit APIs; lower them for latency-sensitive fan-out. ``read`` is off by
    default because ``total`` already bounds a silent server and aiohttp's per-chunk
    timer cost about 15 % of B6's throughput on 2 KB bodies; set it for large downloads
    and :meth:`Fetcher.stream`, where there is no ``total``.

    ``connect``, ``read`` and ``total`` run on the event loop's clock (aiohttp's timers
    for the first two, one loop timer per fetcher for ``total``), which is what
    :class:`~headrace.MonotonicClock` reads; ``slot_wait`` and retry
    backoff go through the fetcher's ``clock``.
    """

    connect: float | None = 10.0
    read: float | None = None
    total: float | None = 60.0
    slot_wait: float | None = None

    def __post_init__(self) -> None:
        for name in ("connect", "read", "total", "slot_wait"):
            _check_seconds(name, getattr(self, name))

    @classmethod
    def coerce(cls, value: Timeouts | float | None) -> Timeouts:
        """A :class:`Timeouts` from ``value``: a number sets ``total`` only, ``None`` none."""
        if isinstance(value, Timeouts):
            return value
        if value is None:
            return cls(connect=None, read=None, total=None, slot_wait=None)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return cls(total=float(value))
        raise ConfigurationError(f"timeout={value!r} must be a number of seconds or a Timeouts")


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request to make: method, URL, headers, body, and your own ``tag``.

    ``idempotent`` overrides the method's default (GET, HEAD, OPTIONS, TRACE, PUT and
    DELETE are; POST and PATCH are not): set it to ``True`` for a POST that carries an
    idempotency key, so it may be retried. ``tag`` is any value you want back with the
    result (a row id, a file name); headrace never looks at it. Immutable.
    """

    url: str
    method: str = "GET"
    headers: Mapping[str, str] | None = None
    body: bytes | str | None = None
    idempotent: bool | None = None
    tag: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.url, str):
            # Only the type is checked here: a malformed URL string (even "") is a
            # per-request failure (http_invalid_url) so that fetch_all can carry on.
            raise ConfigurationError(f"Request(url={self.url!r}) must be a string")
        if self.method in _COMMON_METHODS and (self.body is None or type(self.body) is bytes):
            return  # the hot path: fetch_all makes one Request per URL string
        method = self.method.upper() if isinstance(self.method, str) else self.method
        if not isinstance(method, str) or not _METHOD.match(method):
            raise ConfigurationError(f"Request(method={self.method!r}) is not an HTTP method")
        object.__setattr__(self, "method", method)
        if self.body is not None and not isinstance(self.body, bytes | str):
            raise ConfigurationError(
                f"Request(body=<{type(self.body).__name__}>) must be bytes, str or None"
            )

    @property
    def is_idempotent(self) -> bool:
        """Whether a retry cannot cause a duplicate effect (``idempotent`` or the method)."""
        if self.idempotent is not None:
            return self.idempotent
        return self.method in IDEMPOTENT_METHODS

    def __repr__(self) -> str:
        tag = "" if self.tag is None else f", tag={self.tag!r}"
        return f"Request({self.method} {redact_url(self.url)}{tag})"


@dataclass(frozen=True, slots=True, repr=False)
class Response:
    """A completed response: the body was read in full and the connection handed back.

    ``headers`` is case-insensitive (``response.headers["content-type"]``); ``url`` is
    the final URL after redirects (the request's own URL, as given, when there were
    none); ``elapsed`` covers every attempt and backoff, in
    seconds; ``attempts`` counts them (1 = no retry). Immutable and safe to share.
    """

    request: Request
    status: int
    reason: str
    headers: Mapping[str, str]
    body: bytes
    url: str
    elapsed: float
    attempts: int

    @property
    def ok(self) -> bool:
        """``True`` for statuses below 400."""
        return self.status < 400

    def text(self, encoding: str | None = None, errors: str = "replace") -> str:
        """The body decoded with ``encoding``, the charset the server declared, or UTF-8."""
        if encoding is None:
            content_type = self.headers.get("Content-Type", "")
            match = re.search(r"charset=([\w.-]+)", content_type, re.I)
            encoding = match.group(1) if match else "utf-8"
        return self.body.decode(encoding, errors)

    def json(self) -> Any:
        """The body parsed as JSON."""
        return _json.loads(self.body)

    def raise_for_status(self) -> Response:
        """Return ``self`` if ``ok``, else raise :class:`~headrace.HttpStatusError`."""
        if self.status >= 400:
            raise status_error(self)
        return self

    def __repr__(self) -> str:
        return (
            f"Response({self.status} {self.request.method} {redact_url(self.url)}, "
            f"{len(self.body)} bytes, attempts={self.attempts})"
        )


def status_error(response: Response, *, retry_after: float | None = None) -> HttpStatusError:
    """The :class:`HttpStatusError` for ``response``; transient for 429 and 502-504."""
    request = response.request
    url = redact_url(response.url)
    error = HttpStatusError(
        f"{request.method} {url} answered {response.status} {response.reason}".rstrip(),
        code=f"http_status_{response.status}",
        public_message="An upstream service answered with an error.",
        transient=response.status in RETRYABLE_STATUSES,
        context={
            "method": request.method,
            "url": url,
            "status": response.status,
            "attempts": response.attempts,
            "retry_after": retry_after,
        },
    )
    # Retry.next_delay waits at least ``retry_after`` seconds when the error carries it.
    error.retry_after = retry_after  # type: ignore[attr-defined]
    return error


@dataclass(frozen=True, slots=True)
class Result:
    """What :meth:`Fetcher.fetch_all` yields for one request: a response or an error.

    ``index`` is the request's position in the input; ``response`` is set whenever the
    server answered (also for an error status, so you can read its body); ``error`` is
    the structured :class:`~headrace.HeadraceError` if the request failed (transport,
    timeout, error status, body too large). Exactly one of "answered fine" (``ok``) or
    "has an error" holds.
    """

    index: int
    request: Request
    response: Response | None = None
    error: HeadraceError | None = field(default=None)

    @property
    def ok(self) -> bool:
        return self.error is None and self.response is not None

    def unwrap(self) -> Response:
        """Return the response, or raise the error."""
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response


@dataclass(frozen=True, slots=True)
class FetcherStatistics:
    """A snapshot of a :class:`Fetcher`'s counters since it was opened.

    ``requests`` counts calls (first attempts), ``attempts`` every try including
    retries; ``connections_opened`` and ``connections_reused`` come from aiohttp's
    tracing (a healthy fan-out opens about ``concurrency`` connections and reuses
    them for everything else); ``connections_discarded`` counts attempts abandoned
    mid-flight (cancelled, lost hedges, timeouts, bodies over the cap or over
    ``drain_limit``) whose connection was closed instead of going back to the pool;
    ``errors`` counts final failures by error ``code``;
    ``statuses`` counts final response statuses; ``in_flight`` and
    ``waiting_for_slot`` are the current gauges.
    """

    requests: int
    attempts: int
    retries: int
    responses: int
    connections_opened: int
    connections_reused: int
    connections_discarded: int
    bytes_received: int
    errors: Mapping[str, int]
    statuses: Mapping[int, int]
    in_flight: int
    waiting_for_slot: int


# -- hot-path constructors ---------------------------------------------------------------
#
# A frozen dataclass's generated __init__ assigns each field through
# ``object.__setattr__(self, "name", value)``: about 0.9 us for a Response, paid once per
# request, and B6 counts every microsecond against aiohttp. Writing the slots through
# their descriptors builds the same immutable object in about half the time. Only for
# values the fetcher itself produced (no validation to skip: these classes have none,
# and a URL string is checked where it is taken).

_new = object.__new__


def _setters(cls: type, names: str) -> tuple[Callable[[Any, Any], None], ...]:
    """The slot descriptors' ``__set__`` of ``cls``'s fields ``names``, in order."""
    return tuple(cls.__dict__[name].__set__ for name in names.split())


(
    _set_request,
    _set_status,
    _set_reason,
    _set_headers,
    _set_body,
    _set_url,
    _set_elapsed,
    _set_attempts,
) = _setters(Response, "request status reason headers body url elapsed attempts")
_set_index, _set_result_request, _set_response, _set_error = _setters(
    Result, "index request response error"
)
_set_req_url, _set_method, _set_req_headers, _set_req_body, _set_idempotent, _set_tag = _setters(
    Request, "url method headers body idempotent tag"
)


def new_response(
    request: Request,
    status: int,
    reason: str,
    headers: Mapping[str, str],
    body: bytes,
    url: str,
    elapsed: float,
    attempts: int,
) -> Response:
    """``Response(...)`` for the fetcher's hot path (same object, built faster)."""
    response: Response = _new(Response)
    _set_request(response, request)
    _set_status(response, status)
    _set_reason(response, reason)
    _set_headers(response, headers)
    _set_body(response, body)
    _set_url(response, url)
    _set_elapsed(response, elapsed)
    _set_attempts(response, attempts)
    return response


def new_result(
    index: int, request: Request, response: Response | None, error: HeadraceError | None
) -> Result:
    """``Result(...)`` for ``fetch_all``'s workers (same object, built faster)."""
    result: Result = _new(Result)
    _set_index(result, index)
    _set_result_request(result, request)
    _set_response(result, response)
    _set_error(result, error)
    return result


def get_request(url: str) -> Request:
    """``Request(url)`` for a URL string (a GET; same object, built faster)."""
    request: Request = _new(Request)
    _set_req_url(request, url)
    _set_method(request, "GET")
    _set_req_headers(request, None)
    _set_req_body(request, None)
    _set_idempotent(request, None)
    _set_tag(request, None)
    return request
