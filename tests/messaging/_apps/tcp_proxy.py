"""A TCP proxy that can drop its connections and refuse or blackhole new ones (for R4).

:class:`ChaosProxy` sits between a client (a worker subprocess) and a real server
(Redis) and plays the network and the server going away, without touching the server:

* :meth:`ChaosProxy.cut_all` resets every proxied connection at once, mid-command (a
  dropped connection: the client sees a reset, whatever it was waiting for);
* ``await proxy.outage(seconds, "reset")`` cuts everything, then for ``seconds``
  resets each new connection as soon as it is accepted (a server being restarted);
* ``await proxy.outage(seconds, "blackhole")`` stalls every open connection and
  accepts new ones without ever answering (a hung server, or a network that drops
  every packet), then resets all of them (the server came back restarted).

After an outage the proxy accepts and forwards again.

Every connection attempt is timestamped (``proxy.attempts``), so a test can count how
often the client tried while the server was away. All tasks belong to the proxy and
end in :meth:`ChaosProxy.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from dataclasses import dataclass, field

# SO_LINGER on, zero seconds: close() sends RST, as a crashed peer's kernel would.
_LINGER_RESET = struct.pack("ii", 1, 0)


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.transport.abort()


@dataclass(eq=False)  # hashed by identity: links live in a set
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    pumps: list[asyncio.Task[None]] = field(default_factory=list)

    def reset(self) -> None:
        _reset(self.client)
        if self.upstream is not None:
            _reset(self.upstream)


class ChaosProxy:
    """Forward TCP from ``127.0.0.1:<port>`` to ``upstream``; break it on demand.

    ``mode`` is ``"forward"`` normally, ``"reset"`` or ``"blackhole"`` during an
    outage. ``attempts`` holds ``(time.time(), mode)`` for every accepted connection.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.mode = "forward"
        self.attempts: list[tuple[float, str]] = []
        self.cuts = 0
        self.connections_cut = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._held: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._outage_over = asyncio.Event()
        # Cleared while a blackhole stalls the open connections.
        self._flowing = asyncio.Event()
        self._flowing.set()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> ChaosProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        """Stop listening, reset every connection and wait for their tasks to end."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.mode = "forward"
        self._outage_over.set()
        self._flowing.set()
        # A connection accepted just before the close has a task that has not run yet.
        await asyncio.sleep(0)
        while self._tasks:
            self.cut_all()
            # Not cancelled: on Python 3.11 a cancelled client_connected_cb task makes
            # asyncio's streams report an error to the loop. Reset, they end at once.
            done, _ = await asyncio.wait(list(self._tasks), timeout=5.0)
            assert done, "proxy connections did not end after a reset"
            self._tasks.difference_update(done)

    async def __aenter__(self) -> ChaosProxy:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def cut_all(self) -> int:
        """Reset every proxied connection now (both sides); return how many."""
        links = list(self._links)
        for link in links:
            link.reset()
        for writer in list(self._held):
            _reset(writer)
        self.cuts += 1
        self.connections_cut += len(links)
        return len(links)

    async def outage(self, seconds: float, mode: str) -> tuple[float, float]:
        """Break the upstream for ``seconds`` (``"reset"`` or ``"blackhole"``, see the
        module doc), then forward again. Returns ``(start, end)`` in ``time.time()``."""
        if mode not in ("reset", "blackhole"):
            raise ValueError(f"outage(mode={mode!r}) must be 'reset' or 'blackhole'")
        start = time.time()
        self._outage_over.clear()
        self.mode = mode
        if mode == "reset":
            self.cut_all()
        else:
            self._flowing.clear()
        try:
            await asyncio.sleep(seconds)
        finally:
            self.mode = "forward"
            if mode == "blackhole":
                # A restarted server does not know the connections the hung one had.
                self.cut_all()
            self._flowing.set()
            self._outage_over.set()
        return start, time.time()

    def attempts_between(self, start: float, end: float) -> int:
        return sum(1 for at, _ in self.attempts if start <= at <= end)

    # -- connections ---------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            mode = self.mode
            self.attempts.append((time.time(), mode))
            if mode == "reset":
                _reset(writer)
            elif mode == "blackhole":
                await self._blackhole(reader, writer)
            else:
                await self._forward(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _blackhole(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._held.add(writer)
        try:
            # Swallow whatever the client sends, answer nothing, until the outage ends.
            drain = asyncio.ensure_future(self._swallow(reader))
            try:
                await self._outage_over.wait()
            finally:
                drain.cancel()
                await asyncio.gather(drain, return_exceptions=True)
        finally:
            self._held.discard(writer)
            _reset(writer)

    @staticmethod
    async def _swallow(reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                pass

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer)
        self._links.add(link)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
            except OSError:
                _reset(writer)
                return
            link.upstream = up_writer
            if self.mode != "forward" or link not in self._links:
                link.reset()
                return
            link.pumps = [
                asyncio.ensure_future(self._pump(reader, up_writer)),
                asyncio.ensure_future(self._pump(up_reader, writer)),
            ]
            try:
                await asyncio.wait(link.pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                # One side closed or failed: the other goes too, abruptly.
                link.reset()
                for pump in link.pumps:
                    pump.cancel()
                await asyncio.gather(*link.pumps, return_exceptions=True)
        finally:
            self._links.discard(link)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if not self._flowing.is_set():
                    # Stalled: the bytes never arrive (the link is reset at the end).
                    await self._flowing.wait()
                    return
                writer.write(data)
                await writer.drain()
