"""What sits between the :class:`Fetcher` and aiohttp: parsed requests, the counting
connector, streamed responses, and the errors built from them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from yarl import URL

from .._errors import HeadraceError, HttpError, HttpTransportError
from ._models import Request, Timeouts, redact_url

__all__ = [
    "READ_CHUNK",
    "CountingConnector",
    "Prepared",
    "StreamResponse",
    "body_too_large",
    "invalid_url",
    "translate",
]

READ_CHUNK = 64 * 1024


class Prepared:
    """A request with its URL parsed once (hot path); ``host`` is built on demand."""

    __slots__ = ("data", "request", "url")

    def __init__(self, request: Request) -> None:
        self.request = request
        try:
            url = URL(request.url)
        except (ValueError, TypeError) as exc:
            raise invalid_url(request, self.url_text, str(exc)) from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise invalid_url(request, self.url_text, "an absolute http(s) URL is required")
        self.url = url
        body = request.body
        self.data = body.encode() if isinstance(body, str) else body

    @property
    def host(self) -> str:
        """``"scheme://host:port"``, the key of per-host slots and rate limits.

        A property, not a field: only fetchers with ``per_host`` or ``rate_limit`` ask,
        and B6 showed the f-string on every request.
        """
        url = self.url
        return f"{url.scheme}://{url.host}:{url.port}"

    @property
    def url_text(self) -> str:
        """The URL for messages and logs, secrets redacted (only built when needed)."""
        return redact_url(self.request.url)


def invalid_url(request: Request, url_text: str, why: str) -> HttpError:
    return HttpError(
        f"{request.method} {url_text}: invalid URL ({why})",
        code="http_invalid_url",
        public_message="The request URL is invalid.",
        transient=False,
        context={"method": request.method, "url": url_text},
    )


def body_too_large(prepared: Prepared, limit: int, seen: int | None) -> HttpError:
    request = prepared.request
    size = "unknown" if seen is None else str(seen)
    return HttpError(
        f"{request.method} {prepared.url_text}: body exceeds max_body_size={limit} bytes "
        f"(at least {size} bytes)",
        code="http_body_too_large",
        public_message="An upstream response was too large.",
        transient=False,
        context={"method": request.method, "url": prepared.url_text, "max_body_size": limit},
    )


class CountingConnector(aiohttp.TCPConnector):
    """aiohttp's TCP connector, counting connections opened and handed out.

    ``opened`` counts connections created (in ``_create_connection``, which runs only
    for new ones), ``acquired`` every connection handed to a request, so ``reused`` is
    the difference. Why not aiohttp's ``TraceConfig`` hooks: with any trace config
    installed, aiohttp builds trace objects and awaits a dozen signals per request,
    which cost about 12 % of B6's throughput; here it is one addition per request (an
    earlier version looked each protocol up in a ``WeakSet``, about 1 % of B6's CPU).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.opened = 0
        self.acquired = 0

    @property
    def reused(self) -> int:
        """Connections handed out that were already open (from the keep-alive pool)."""
        # max(): a connection opened for a request that then failed (the connector was
        # closed meanwhile) counts as opened but never handed out.
        return max(0, self.acquired - self.opened)

    async def _create_connection(
        self, req: ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout
    ) -> ResponseHandler:
        protocol = await _CREATE_CONNECTION(self, req, traces, timeout)
        self.opened += 1
        _shrink_reads(protocol.transport)
        return protocol

    async def connect(
        self, req: ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout
    ) -> Connection:
        # The base method by reference, not super(): this runs on every request.
        connection = await _CONNECT(self, req, traces, timeout)
        self.acquired += 1
        return connection


def _shrink_reads(transport: asyncio.BaseTransport | None) -> None:
    """Make asyncio read this socket in 64 KiB pieces instead of 256 KiB.

    asyncio's selector transport calls ``sock.recv(max_size)`` with 256 KiB, so CPython
    allocates 256 KiB for every read, however few bytes arrive. glibc serves a block
    that large with ``mmap`` (then ``mremap`` to shrink it, ``munmap`` to free it)
    unless its adaptive threshold was raised by some earlier large free: three system
    calls and a page fault per response, or none, depending on the process's history.
    B6 measured both modes (``perf stat``: 1.0 or 0.0 mmap per request) and they were
    its largest source of run-to-run spread. 64 KiB, aiohttp's own read buffer, always
    comes from the heap. TLS transports read through their own buffer; other event
    loops (uvloop) have no ``max_size``: both are left alone.
    """
    if transport is not None and getattr(transport, "max_size", 0) > _READ_SIZE:
        with contextlib.suppress(AttributeError):
            transport.max_size = _READ_SIZE  # type: ignore[attr-defined]


_READ_SIZE = 64 * 1024
_CONNECT = aiohttp.TCPConnector.connect
_CREATE_CONNECTION = aiohttp.TCPConnector._create_connection


class StreamResponse:
    """A response whose body you read yourself, inside :meth:`Fetcher.stream`.

    ``status``, ``reason``, ``headers`` and ``url`` are available at once; read the body
    with :meth:`read` (capped at the fetcher's ``max_body_size``) or iterate
    :meth:`iter_chunks`. Whatever you leave unread is drained (up to ``drain_limit``
    bytes) or the connection closed when the ``async with`` block ends. Belongs to the
    task that opened it.
    """

    __slots__ = ("_consumed", "_limit", "_prepared", "_response")

    def __init__(self, response: aiohttp.ClientResponse, prepared: Prepared, limit: int) -> None:
        self._response = response
        self._prepared = prepared
        self._limit = limit
        self._consumed = 0

    @property
    def status(self) -> int:
        return self._response.status

    @property
    def reason(self) -> str:
        return self._response.reason or ""

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    @property
    def url(self) -> str:
        return str(self._response.url)

    async def iter_chunks(self, size: int = READ_CHUNK) -> AsyncIterator[bytes]:
        """Yield the body in chunks of at most ``size`` bytes (no cap: you decide)."""
        while True:
            chunk = await self._response.content.read(size)
            if not chunk:
                return
            self._consumed += len(chunk)
            yield chunk

    async def read(self) -> bytes:
        """Read the rest of the body; raise ``http_body_too_large`` past the cap."""
        chunks: list[bytes] = []
        async for chunk in self.iter_chunks():
            if self._consumed > self._limit:
                raise body_too_large(self._prepared, self._limit, self._consumed)
            chunks.append(chunk)
        return b"".join(chunks)

    def __repr__(self) -> str:
        return f"StreamResponse({self.status} {redact_url(self.url)})"


def translate(exc: aiohttp.ClientError, prepared: Prepared, timeouts: Timeouts) -> HeadraceError:
    """The one place where aiohttp's exceptions become headrace errors."""
    request = prepared.request
    where = f"{request.method} {prepared.url_text}"
    context: dict[str, Any] = {"method": request.method, "url": prepared.url_text}
    public = "An upstream service could not be reached."
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        seconds = timeouts.connect
        context.update(phase="connect", timeout=seconds)
        return HttpTransportError(
            f"{where}: connect timed out after {seconds} s",
            code="http_connect_timeout",
            public_message=public,
            context=context,
        )
    if isinstance(exc, aiohttp.ServerTimeoutError):
        seconds = timeouts.read
        context.update(phase="read", timeout=seconds)
        return HttpTransportError(
            f"{where}: the server sent nothing for read={seconds} s",
            code="http_read_timeout",
            public_message="An upstream service took too long.",
            context=context,
        )
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return invalid_url(request, prepared.url_text, type(exc).__name__)
    if isinstance(exc, aiohttp.TooManyRedirects):
        return HttpError(
            f"{where}: too many redirects",
            code="http_too_many_redirects",
            public_message=public,
            context=context,
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        context.update(phase="connect", errno=exc.os_error.errno)
        return HttpTransportError(
            f"{where}: cannot connect ({exc.os_error.strerror or exc.os_error})",
            code="http_connect_error",
            public_message=public,
            context=context,
        )
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return HttpTransportError(
            f"{where}: the server closed the connection before answering",
            code="http_disconnected",
            public_message=public,
            context=context,
        )
    if isinstance(exc, aiohttp.ClientPayloadError):
        return HttpTransportError(
            f"{where}: the response body was cut short ({exc})",
            code="http_payload_error",
            public_message=public,
            context=context,
        )
    return HttpTransportError(
        f"{where}: {type(exc).__name__}: {exc}",
        code="http_transport",
        public_message=public,
        context=context,
    )
