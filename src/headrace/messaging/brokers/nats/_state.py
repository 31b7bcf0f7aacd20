"""What a broker remembers per topic, and the pull requests in flight."""

from __future__ import annotations

import asyncio
from collections import deque

from nats.aio.msg import Msg

from ._options import encode_topic


class _Pull:
    """One pull request in flight; done when its status came or enough messages did."""

    __slots__ = ("delayed", "done", "limit", "start", "state", "status")

    def __init__(self, state: _TopicState, limit: int, *, delayed: bool = False) -> None:
        self.state = state
        self.limit = limit
        # A request on the delayed consumer (whose messages never reach a caller).
        self.delayed = delayed
        self.start = state.delayed_count if delayed else state.count
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.status: str | None = None


class _TopicState:
    """Names and what this broker instance remembers about one topic."""

    __slots__ = (
        "arrived",
        "count",
        "dead_stream",
        "dead_subject",
        "delayed_arrived",
        "delayed_consumer",
        "delayed_count",
        "delayed_subject",
        "ensured",
        "next_promote",
        "pulls",
        "stream",
        "subject",
        "topic",
    )

    def __init__(self, topic: str, prefix: str) -> None:
        encoded = encode_topic(topic)
        self.topic = topic
        self.stream = f"{prefix}-{encoded}"
        self.dead_stream = f"{prefix}-{encoded}-dead"
        self.subject = f"{prefix}.{encoded}"
        self.delayed_subject = f"{prefix}.{encoded}.delayed"
        self.dead_subject = f"{prefix}.{encoded}.dead"
        self.delayed_consumer = ""
        self.ensured: asyncio.Future[None] | None = None
        self.next_promote = 0.0
        # Messages JetStream delivered to this connection and no fetch took yet, with
        # when they arrived (the broker's clock). Pull requests of one topic share
        # them: a fetch takes what is there, so one that was cancelled, or that a
        # long poll outlived, leaves its messages to the next fetch, as the same
        # attempt.
        self.arrived: deque[tuple[Msg, float]] = deque()
        # The same for the delayed consumer (taken by the next promote).
        self.delayed_arrived: deque[Msg] = deque()
        # Messages ever delivered here, to tell when a pull request has its batch.
        self.count = 0
        self.delayed_count = 0
        # Pull requests waiting on this topic.
        self.pulls: set[_Pull] = set()
