"""Test helpers for the NATS adapter: cleaning up the streams a test created."""

from __future__ import annotations

import asyncio
import threading


def delete_nats_streams(url: str, prefix: str) -> None:
    """Delete every JetStream stream whose name starts with ``prefix-`` (test cleanup)."""
    import nats

    async def delete() -> None:
        client = await nats.connect(url)
        try:
            js = client.jetstream()
            for info in await js.streams_info():
                name = info.config.name
                if name and name.startswith(prefix + "-"):
                    await js.delete_stream(name)
        finally:
            await client.close()

    # On a thread of its own: a finalizer may run while a test's event loop is current.
    thread = threading.Thread(target=asyncio.run, args=(delete(),))
    thread.start()
    thread.join()
