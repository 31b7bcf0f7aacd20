"""Fetches waiting in this process, by database file, so that a publish wakes them.

A publish, nack, hand-back or replay in this process wakes the idle fetches of the
same file and topic at once, whichever broker object and event loop they wait in;
fetches waiting in other processes see the message at their next ``poll_interval``.
This registry is process-wide state, guarded by a lock because brokers of one
process may run in several threads' event loops.
"""

from __future__ import annotations

import asyncio
import threading

__all__ = ["LOCAL_LOCK", "LOCAL_WAITERS", "Waiter", "notify_local", "wake"]


class Waiter:
    """One idle fetch: the future that wakes it, its loop, its topic."""

    __slots__ = ("future", "loop", "topic")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[None], topic: str
    ) -> None:
        self.loop = loop
        self.future = future
        self.topic = topic


# fetches waiting in this process, by database file: a local publish wakes them at once.
LOCAL_WAITERS: dict[str, set[Waiter]] = {}
LOCAL_LOCK = threading.Lock()


def wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def notify_local(path_key: str, topic: str) -> None:
    with LOCAL_LOCK:
        waiters = [w for w in LOCAL_WAITERS.get(path_key, ()) if w.topic == topic]
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    for waiter in waiters:
        if waiter.loop is running:
            wake(waiter.future)
        else:
            try:
                waiter.loop.call_soon_threadsafe(wake, waiter.future)
            except RuntimeError:  # that loop is closed; its fetch is gone
                pass
