"""Per-stage counters, their frozen snapshots, and the error policies."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .._channel import Channel
from .._errors import PipelineError

__all__ = [
    "FailedItem",
    "Link",
    "OnError",
    "PipelineError",
    "PipelineStatistics",
    "StageCounters",
    "StageStatistics",
]


class OnError(enum.Enum):
    """What a stage does when ``fn`` fails for an item (after retries, if any).

    ``FAIL`` (the default): the first failure cancels every stage and the pipeline
    raises :class:`PipelineError` naming the stage and the item, with the original
    error as ``__cause__``. ``SKIP``: drop the item, count it in ``errors`` and keep
    the :class:`FailedItem` in ``PipelineStatistics.failures``. To route failures to a
    dead-letter sink instead, pass a callable (sync or async) taking a
    :class:`FailedItem` as ``on_error=``; ``dead_letters.append`` is a fine sink.
    """

    FAIL = "fail"
    SKIP = "skip"


DeadLetterSink = Callable[["FailedItem"], "Awaitable[object] | object"]
ErrorPolicy = OnError | str | DeadLetterSink


@dataclass(frozen=True, slots=True)
class FailedItem:
    """An item a stage could not process: which stage, the item, the error."""

    stage: str
    item: Any
    error: Exception


@dataclass(frozen=True, slots=True)
class StageStatistics:
    """A snapshot of one stage.

    ``items_in``/``items_out``: items received / emitted (a filter emits fewer, a
    flat_map or unbatch more); ``errors``: items whose call failed after retries;
    ``retries``: retry attempts made; ``queue_depth``: items waiting in the stage's
    input channel; ``busy_time``: seconds spent processing (summed over workers).
    """

    name: str
    workers: int
    items_in: int
    items_out: int
    errors: int
    retries: int
    queue_depth: int
    busy_time: float


@dataclass(frozen=True, slots=True)
class PipelineStatistics:
    """A snapshot of a whole pipeline run: its stages in build order and the totals.

    ``items_out`` counts what reached the sink; ``failures`` holds the items skipped
    with ``on_error="skip"`` (the first 1000); ``elapsed`` is seconds since the run
    started (until it ended, once it has).
    """

    stages: tuple[StageStatistics, ...]
    items_out: int
    elapsed: float
    running: bool
    failures: tuple[FailedItem, ...]

    def stage(self, name: str) -> StageStatistics:
        """The statistics of the stage called ``name``."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage named {name!r}; stages: {[s.name for s in self.stages]}")


class Link:
    """A channel of chunks between two stages, counting the items put into it."""

    __slots__ = ("channel", "sent")

    def __init__(self, channel: Channel[list[Any]]) -> None:
        self.channel = channel
        self.sent = 0


class StageCounters:
    """The mutable counters one stage updates as it runs (read by snapshots)."""

    __slots__ = ("busy", "errors", "inputs", "items_in", "items_out", "name", "retries", "workers")

    def __init__(self, name: str, workers: int, inputs: list[Link]) -> None:
        self.name = name
        self.workers = workers
        self.inputs = inputs
        self.items_in = 0
        self.items_out = 0
        self.errors = 0
        self.retries = 0
        self.busy = 0.0

    def on_retry(self, exc: BaseException, failures: int, delay: float) -> None:
        self.retries += 1

    def snapshot(self) -> StageStatistics:
        depth = sum(link.sent for link in self.inputs) - self.items_in
        return StageStatistics(
            name=self.name,
            workers=self.workers,
            items_in=self.items_in,
            items_out=self.items_out,
            errors=self.errors,
            retries=self.retries,
            queue_depth=max(depth, 0),
            busy_time=self.busy,
        )
