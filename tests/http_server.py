"""A local HTTP/1.1 keep-alive server for the ``headrace.http`` tests (127.0.0.1 only).

It counts what the tests need to see from the server's side: TCP connections accepted,
connections alive (now and at peak), requests in progress (overall and per ``Host``
header, now and at peak), and when each request of a ``/flaky`` key arrived.

Routes: ``/ok?size=N`` (N bytes, Content-Length), ``/chunked?size=N`` (chunked, no
length), ``/slow?delay=S``, ``/hang`` (never answers), ``/hang-body`` (headers and 1 KB,
then nothing), ``/status/CODE?retry_after=V``, ``/flaky?key=K&fail=N&status=S&retry_after=V``
(the first N requests of key K answer S, then 200), ``/first-slow?key=K&delay=S``
(the first request of K stalls S seconds, the rest answer at once), ``/echo`` (method
and body back).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, defaultdict
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler


class _CountingServer(web.Server):
    """aiohttp's low-level server, counting connections as they come and go."""

    def __init__(self, owner: HttpTestServer, **kwargs: Any) -> None:
        # handler_cancellation: a client that hangs up cancels its handler, as a real
        # server would, instead of leaving it parked until shutdown.
        super().__init__(owner._handle, handler_cancellation=True, **kwargs)
        self._owner = owner

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self._owner.accepted += 1
        self._owner.peak_alive = max(self._owner.peak_alive, len(self.connections))

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self._owner.closed += 1


class HttpTestServer:
    """Start with ``async with HttpTestServer() as server``; ``server.url("/ok")``."""

    def __init__(self) -> None:
        self.accepted = 0
        self.closed = 0
        self.peak_alive = 0
        self.active = 0
        self.peak_active = 0
        self.active_by_host: Counter[str] = Counter()
        self.peak_by_host: Counter[str] = Counter()
        self.requests = 0
        self.methods: Counter[str] = Counter()
        self.arrivals: defaultdict[str, list[float]] = defaultdict(list)
        self._flaky_seen: Counter[str] = Counter()
        self._stop = asyncio.Event()
        self._request_seen = asyncio.Event()
        self._server = _CountingServer(self)
        self._runner = web.ServerRunner(self._server, shutdown_timeout=1.0)
        self.port = 0

    async def __aenter__(self) -> HttpTestServer:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()  # release the handlers that are hanging on purpose
        await self._runner.cleanup()

    @property
    def alive(self) -> int:
        """Connections open right now."""
        return len(self._server.connections)

    async def wait_for_request(self) -> None:
        """Return once the server has started handling at least one request."""
        await self._request_seen.wait()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        host = request.headers.get("Host", "").split(":")[0]
        self.requests += 1
        self._request_seen.set()
        self.methods[request.method] += 1
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        self.active_by_host[host] += 1
        self.peak_by_host[host] = max(self.peak_by_host[host], self.active_by_host[host])
        try:
            return await self._route(request)
        finally:
            self.active -= 1
            self.active_by_host[host] -= 1

    async def _route(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        query = request.query
        if path == "/ok":
            return web.Response(body=b"x" * int(query.get("size", "2048")))
        if path == "/chunked":
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            remaining = int(query.get("size", "2048"))
            while remaining > 0:
                part = min(remaining, 8192)
                await response.write(b"y" * part)
                remaining -= part
            await response.write_eof()
            return response
        if path == "/slow":
            await asyncio.sleep(float(query.get("delay", "0.05")))
            return web.Response(body=b"slow")
        if path == "/hang":
            await self._stop.wait()
            return web.Response(status=503, body=b"shutting down")
        if path == "/hang-body":
            response = web.StreamResponse(headers={"Content-Length": "100000"})
            await response.prepare(request)
            await response.write(b"z" * 1024)
            await self._stop.wait()
            return response
        if path.startswith("/status/"):
            headers = {}
            if "retry_after" in query:
                headers["Retry-After"] = query["retry_after"]
            return web.Response(status=int(path.rsplit("/", 1)[1]), headers=headers, body=b"no")
        if path == "/flaky":
            key = query["key"]
            self.arrivals[key].append(time.monotonic())
            self._flaky_seen[key] += 1
            if self._flaky_seen[key] <= int(query.get("fail", "1")):
                headers = {}
                if "retry_after" in query:
                    headers["Retry-After"] = query["retry_after"]
                return web.Response(
                    status=int(query.get("status", "503")), headers=headers, body=b"later"
                )
            return web.Response(body=b"fine")
        if path == "/first-slow":
            # The first request of a key stalls (until cancelled or shutdown); the rest
            # answer at once: the shape a hedged request is meant to beat.
            key = query["key"]
            self.arrivals[key].append(time.monotonic())
            if len(self.arrivals[key]) == 1:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), float(query.get("delay", "5")))
            return web.Response(body=b"answer %d" % len(self.arrivals[key]))
        if path == "/echo":
            body = await request.read()
            return web.Response(body=request.method.encode() + b" " + body)
        return web.Response(status=404, body=b"unknown route")
