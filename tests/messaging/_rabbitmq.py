"""Helpers for tests against the local RabbitMQ: delete the queues a test declared."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable


def delete_queues(url: str, names: Iterable[str]) -> None:
    """Delete the queues ``names`` (missing ones are fine)."""
    wanted = sorted(set(names))
    if not wanted:
        return

    async def delete() -> None:
        import aio_pika

        connection = await aio_pika.connect(url)
        try:
            channel = await connection.channel()
            raw = await channel.get_underlay_channel()
            for name in wanted:
                await raw.queue_delete(name)
        finally:
            await connection.close()

    # On a thread of its own: a finalizer may run while a test's loop is current.
    thread = threading.Thread(target=asyncio.run, args=(delete(),))
    thread.start()
    thread.join()
