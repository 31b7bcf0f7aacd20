"""Fetch thousands of URLs without running out of ports: headrace.http.Fetcher.

The situation (seed 004 in ../shared/seeds): 5,000 GETs fired at once, each opening its
own connection, filled the ephemeral ports with TIME-WAIT sockets and stalled halfway.
The fix is a bounded pool of connections that are reused, bodies that are always read so
that a connection can be reused, and retries that respect the server's ``Retry-After``.

To be self-contained the script starts a small "catalogue service" on 127.0.0.1 (a free
port) that counts the TCP connections it accepts. One item in 250 does not exist (404)
and the service sheds load with ``503 Retry-After: 0.05`` on every 40th request, which
the fetcher retries. It then fetches every item through ``Fetcher.fetch_all`` with 50
connections and prints what the server and the fetcher saw. Finishes in a few seconds::

    python examples/http_fanout.py [--items 3000] [--concurrency 50]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aiohttp import web

from headrace import Retry
from headrace.http import Fetcher, Request


class CatalogueService:
    """The stand-in for a real API: JSON items, some missing, some 503s, counted sockets."""

    def __init__(self) -> None:
        self.accepted = 0
        self.requests = 0
        owner = self

        class CountingServer(web.Server):
            def connection_made(
                self, handler: web.RequestHandler, transport: asyncio.Transport
            ) -> None:
                super().connection_made(handler, transport)
                owner.accepted += 1

        self._runner = web.ServerRunner(CountingServer(self._handle), shutdown_timeout=1)
        self.port = 0

    async def __aenter__(self) -> CatalogueService:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._runner.cleanup()

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        self.requests += 1
        item = int(request.path.rsplit("/", 1)[-1])
        if self.requests % 40 == 0:
            return web.Response(status=503, headers={"Retry-After": "0.05"})
        if item % 250 == 249:
            return web.json_response({"error": "no such item"}, status=404)
        return web.json_response({"item": item, "name": f"widget {item}", "price": item % 97})


async def main(items: int, concurrency: int) -> None:
    async with CatalogueService() as service:
        requests = (
            Request(f"http://127.0.0.1:{service.port}/items/{item}", tag=item)
            for item in range(items)
        )
        retry = Retry(max_attempts=4, initial_delay=0.01, max_delay=0.5)
        total_price = 0
        missing: list[int] = []
        started = time.perf_counter()
        async with Fetcher(concurrency=concurrency, retry=retry) as fetcher:
            # A generator of requests: fetch_all pulls from it as workers free up, so
            # memory stays flat however long the list is.
            async for result in fetcher.fetch_all(requests):
                if result.ok:
                    total_price += result.unwrap().json()["price"]
                elif result.error is not None and result.error.context.get("status") == 404:
                    missing.append(result.request.tag)
                else:
                    raise SystemExit(f"unexpected failure: {result.error}")
            stats = fetcher.statistics()
        seconds = time.perf_counter() - started

    print(f"fetched {items} items in {seconds:.2f} s ({items / seconds:,.0f} req/s)")
    print(f"  total price of the found items: {total_price}")
    print(f"  missing (404): {len(missing)} items, e.g. {sorted(missing)[:3]}")
    print(f"  retries after 503 + Retry-After: {stats.retries}")
    print(
        f"  TCP connections accepted by the server: {service.accepted} "
        f"(limit {concurrency}); the fetcher opened {stats.connections_opened} "
        f"and reused them {stats.connections_reused} times"
    )
    assert service.accepted <= concurrency, "more connections than the limit"
    assert len(missing) == items // 250
    assert stats.errors == {"http_status_404": len(missing)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=50)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.items, arguments.concurrency))
