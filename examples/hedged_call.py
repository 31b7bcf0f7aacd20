"""A hedged call against two local HTTP replicas, one of which has hiccups.

    python examples/hedged_call.py [--requests 40] [--delay 0.05]

The script starts two tiny HTTP servers on 127.0.0.1 (ephemeral ports): replica A
answers in ~5 ms but stalls for 500 ms on every 5th request (a GC pause); replica B
answers in ~8 ms. It then reads a value ``--requests`` times three ways and prints the
latency of each:

1. plain: always ask A;
2. ``HedgePolicy(delay=...)``: ask A, and B too if A has not answered after ``delay``
   (the first answer wins, the slow request is cancelled and its connection closed);
3. ``first_completed``: ask A and B at once (twice the load, the best latency).

Reading is idempotent, which is what makes hedging it safe: a hedge repeats the request.
Everything stops by itself; no server or task is left running.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

from headrace import HedgePolicy, first_completed


class Replica:
    """A minimal HTTP/1.0 server answering GET with its name after a delay."""

    def __init__(self, name: str, latency: float, stall_every: int = 0) -> None:
        self.name = name
        self.latency = latency
        self.stall_every = stall_every
        self.served = 0
        self.abandoned = 0  # requests whose client went away before the answer
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.served += 1
            stall = self.stall_every and self.served % self.stall_every == 0
            # Wait for the reply time, or for the client to hang up (a cancelled hedge).
            hang_up = asyncio.ensure_future(reader.read(1))
            done, _ = await asyncio.wait({hang_up}, timeout=0.5 if stall else self.latency)
            if done:
                self.abandoned += 1
                return
            hang_up.cancel()
            body = self.name.encode()
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.abandoned += 1
        finally:
            writer.close()


async def http_get(port: int) -> str:
    """GET / from 127.0.0.1:port; closes the connection even when cancelled."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        response = await reader.read()
        return response.split(b"\r\n\r\n", 1)[1].decode()
    finally:
        writer.close()


async def measure(
    label: str, call: Callable[[], Awaitable[str]], requests: int
) -> tuple[list[float], dict[str, int]]:
    latencies: list[float] = []
    winners: dict[str, int] = {}
    for _ in range(requests):
        started = time.perf_counter()
        answer = await call()
        latencies.append(time.perf_counter() - started)
        winners[answer] = winners.get(answer, 0) + 1
    ordered = sorted(latencies)
    print(
        f"{label:<16} median {statistics.median(ordered) * 1000:6.1f} ms   "
        f"max {ordered[-1] * 1000:6.1f} ms   answered by {winners}"
    )
    return latencies, winners


async def main(requests: int, delay: float) -> None:
    replica_a = Replica("A", latency=0.005, stall_every=5)
    replica_b = Replica("B", latency=0.008)
    await replica_a.start()
    await replica_b.start()
    try:
        plain, _ = await measure("plain (A only)", lambda: http_get(replica_a.port), requests)

        policy = HedgePolicy(delay=delay)

        async def hedged_get() -> str:
            replicas = iter([replica_a.port, replica_b.port])  # attempt 1: A; the hedge: B
            return await policy.call(lambda: http_get(next(replicas)))

        hedged, _ = await measure(f"hedged ({delay * 1000:g} ms)", hedged_get, requests)
        both, _ = await measure(
            "first_completed",
            lambda: first_completed(
                lambda: http_get(replica_a.port), lambda: http_get(replica_b.port)
            ),
            requests,
        )
        stats = policy.statistics()
        print(
            f"hedge statistics: {stats.calls} calls, {stats.attempts} attempts "
            f"(+{stats.extra_load:.0%} load), wins by attempt {stats.wins_by_attempt}"
        )
        await asyncio.sleep(0.05)  # let the servers notice the last hang-ups
        print(
            f"replica A served {replica_a.served} requests ({replica_a.abandoned} abandoned "
            f"by cancelled attempts), B served {replica_b.served} ({replica_b.abandoned})"
        )
        assert max(hedged) < max(plain), "hedging should have cut the worst latency"
        assert max(both) < max(plain)
    finally:
        await replica_a.stop()
        await replica_b.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="hedged call against two local replicas")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--delay", type=float, default=0.05, help="hedge delay, seconds")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.requests, arguments.delay))
