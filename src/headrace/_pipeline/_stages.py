"""The long-lived loops that run a pipeline's stages (one task per loop, never per item).

Items travel between stages in chunks (lists) through bounded :class:`Channel`s:
measured here, lists of 64 through the same queues were 8-10x faster than single
items. A stage fills its output chunk up to ``chunk_size`` and sends it, but it never
sits on a partial chunk while it would wait: it flushes before waiting for input, and
while its function is suspended (see :class:`PartialChunk`); in that second case it
flushes only if the downstream channel has room right away, because a downstream with
a full buffer has work to do anyway and a callback cannot wait. So an item is delayed
by chunking only while the stage is busy computing.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
from collections.abc import AsyncIterable, Callable, Iterable
from typing import Any

from .._cancel import deadline
from .._clock import Clock
from .._errors import DeadlineExceeded, EndOfChannel, HeadraceError, WouldBlock
from ._executors import StageCall
from ._stats import FailedItem, Link, OnError, PipelineError, StageCounters

__all__ = [
    "MAP",
    "FILTER",
    "FLAT",
    "ErrorHandler",
    "emit",
    "run_batch",
    "run_forward",
    "run_single",
    "run_source",
    "run_tee",
]

MAP, FILTER, FLAT = 0, 1, 2

#: how many skipped items a run keeps for ``PipelineStatistics.failures``.
MAX_RECORDED_FAILURES = 1000


def describe(item: Any, limit: int = 200) -> str:
    text = repr(item)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ErrorHandler:
    """Applies a stage's ``on_error`` policy to one failed item."""

    __slots__ = ("counters", "failures", "policy", "stage")

    def __init__(
        self,
        policy: OnError | Callable[[FailedItem], Any],
        stage: str,
        counters: StageCounters,
        failures: list[FailedItem],
    ) -> None:
        self.policy = policy
        self.stage = stage
        self.counters = counters
        self.failures = failures

    async def handle(self, item: Any, exc: Exception) -> None:
        """Count the failure; raise :class:`PipelineError` (fail fast), record, or
        dead-letter it."""
        self.counters.errors += 1
        policy = self.policy
        if policy is OnError.FAIL:
            # A headrace error says itself whether it was expected and may pass on a
            # retry; anything else escaping the user's function is a bug to look at.
            error = PipelineError(
                f"stage {self.stage!r} failed on item {describe(item)}: "
                f"{type(exc).__name__}: {exc}",
                context={"stage": self.stage, "item": item},
                transient=exc.transient if isinstance(exc, HeadraceError) else None,
                kind=exc.kind if isinstance(exc, HeadraceError) else "bug",
            )
            raise error from exc
        failed = FailedItem(self.stage, item, exc)
        if policy is OnError.SKIP:
            if len(self.failures) < MAX_RECORDED_FAILURES:
                self.failures.append(failed)
            return
        outcome = policy(failed)
        if inspect.isawaitable(outcome):
            await outcome


async def emit(link: Link, chunk: list[Any]) -> None:
    """Send ``chunk`` downstream, waiting while the channel is full."""
    channel = link.channel
    try:
        channel.send_nowait(chunk)
    except WouldBlock:
        await channel.send(chunk)
    # Counted once it is in the channel, so queue_depth never includes a chunk the
    # sender is still holding.
    link.sent += len(chunk)


def emit_nowait(link: Link, chunk: list[Any]) -> bool:
    """Send ``chunk`` if the downstream has room now; return whether it was sent."""
    try:
        link.channel.send_nowait(chunk)
    except WouldBlock:
        return False
    link.sent += len(chunk)
    return True


class PartialChunk:
    """A stage's partial output chunk, flushable by a callback while the stage waits.

    The stage arms :func:`_flush_soon` with ``call_soon`` before it awaits its
    function. The callback runs only when the stage's task yields to the loop: if that
    happens inside the function (it suspended), the partial chunk goes downstream now
    instead of after the call. Flushing sends a copy and clears ``buffer`` in place, so
    the stage can keep ``buffer.append`` in a local. Before the stage awaits anything
    else it flushes first, so the callback then finds nothing to send. One
    ``call_soon`` per actual suspension, instead of work per item, keeps the trivial
    case (functions that never suspend) at the cost of a plain ``await``.
    """

    __slots__ = ("armed", "buffer", "counters", "live", "output")

    def __init__(self, output: Link, counters: StageCounters) -> None:
        self.output = output
        self.counters = counters
        self.buffer: list[Any] = []
        self.armed = False
        self.live = True

    def arm(self) -> None:
        self.armed = True
        asyncio.get_running_loop().call_soon(_flush_soon, self)

    async def flush(self) -> None:
        """Send the partial chunk (the stage is about to wait for something else)."""
        buffer = self.buffer
        if buffer:
            chunk = buffer.copy()
            buffer.clear()
            self.counters.items_out += len(chunk)
            await emit(self.output, chunk)

    def discard(self) -> None:
        """The stage is finished or torn down: nothing may be sent any more."""
        self.live = False
        self.buffer.clear()


def _flush_soon(partial: PartialChunk) -> None:
    partial.armed = False
    buffer = partial.buffer
    if buffer and partial.live:
        chunk = buffer.copy()
        if emit_nowait(partial.output, chunk):
            partial.counters.items_out += len(chunk)
            buffer.clear()


async def run_source(
    source: Iterable[Any] | AsyncIterable[Any],
    output: Link,
    counters: StageCounters,
    chunk_size: int,
) -> None:
    """Feed the source's items into ``output``; close async/sync generators we iterate."""
    if isinstance(source, AsyncIterable):
        iterator = aiter(source)
        try:
            await _pump_async(iterator, output, counters, chunk_size)
        finally:
            aclose = getattr(iterator, "aclose", None)
            if inspect.isasyncgen(iterator) and aclose is not None:
                await aclose()
    else:
        sync_iterator = iter(source)
        try:
            while True:
                chunk = list(itertools.islice(sync_iterator, chunk_size))
                if not chunk:
                    break
                counters.items_out += len(chunk)
                await emit(output, chunk)
        finally:
            if inspect.isgenerator(sync_iterator):
                sync_iterator.close()
    output.channel.close()


async def _pump_async(
    iterator: Any, output: Link, counters: StageCounters, chunk_size: int
) -> None:
    anext_ = iterator.__anext__
    partial = PartialChunk(output, counters)
    buffer = partial.buffer
    try:
        while True:
            if not partial.armed:
                partial.arm()
            try:
                value = await anext_()
            except StopAsyncIteration:
                break
            buffer.append(value)
            if len(buffer) >= chunk_size:
                await partial.flush()
        await partial.flush()
    finally:
        partial.discard()


async def run_single(
    call: StageCall,
    mode: int,
    source: Link,
    output: Link,
    counters: StageCounters,
    errors: ErrorHandler,
    chunk_size: int,
    clock: Clock,
) -> None:
    """One worker: map / filter / flat_map items from ``source`` into ``output``."""
    channel = source.channel
    fn = call.call
    inline = call.inline
    now = clock.now
    handle = errors.handle
    partial = PartialChunk(output, counters)
    buffer = partial.buffer
    append = buffer.append
    # map and filter emit at most one item per input, so checking the chunk size once
    # per input chunk keeps output chunks under 2 * chunk_size; flat_map checks per item.
    per_item_check = mode == FLAT
    try:
        while True:
            try:
                chunk = channel.receive_nowait()
            except WouldBlock:
                await partial.flush()
                try:
                    chunk = await channel.receive()
                except EndOfChannel:
                    break
            except EndOfChannel:
                break
            counters.items_in += len(chunk)
            started = now()
            if mode == MAP and not inline:
                # The hot path, kept free of per-item branches.
                for item in chunk:
                    if not partial.armed:
                        partial.arm()
                    try:
                        append(await fn(item))
                    except Exception as exc:
                        await handle(item, exc)
            else:
                for item in chunk:
                    try:
                        if inline:
                            result = fn(item)
                        else:
                            if not partial.armed:
                                partial.arm()
                            result = await fn(item)
                    except Exception as exc:
                        await handle(item, exc)
                        continue
                    if mode == MAP:
                        append(result)
                    elif mode == FILTER:
                        if result:
                            append(item)
                    elif isinstance(result, AsyncIterable):
                        async for value in result:
                            append(value)
                    else:
                        buffer.extend(result)
                    if per_item_check and len(buffer) >= chunk_size:
                        waited = now()
                        await partial.flush()
                        started += now() - waited
            if len(buffer) >= chunk_size:
                waited = now()
                await partial.flush()
                started += now() - waited
            counters.busy += now() - started
        await partial.flush()
    finally:
        partial.discard()
    output.channel.close()


async def run_batch(
    size: int,
    max_wait: float | None,
    source: Link,
    output: Link,
    counters: StageCounters,
    chunk_size: int,
    clock: Clock,
) -> None:
    """Group items into lists of ``size``; a partial list goes out after ``max_wait``
    seconds (from its first item) or at the end of the input."""
    channel = source.channel
    now = clock.now
    buffer: list[Any] = []
    batch: list[Any] = []
    batch_deadline = 0.0
    while True:
        try:
            chunk = channel.receive_nowait()
        except WouldBlock:
            if buffer:
                counters.items_out += len(buffer)
                await emit(output, buffer)
                buffer = []
            try:
                if batch and max_wait is not None:
                    remaining = batch_deadline - now()
                    if remaining <= 0:
                        raise DeadlineExceeded("batch max_wait passed")
                    async with deadline(remaining, cause="batch max_wait", clock=clock):
                        chunk = await channel.receive()
                else:
                    chunk = await channel.receive()
            except DeadlineExceeded:
                buffer.append(batch)
                batch = []
                continue
            except EndOfChannel:
                break
        except EndOfChannel:
            break
        counters.items_in += len(chunk)
        for item in chunk:
            if not batch and max_wait is not None:
                batch_deadline = now() + max_wait
            batch.append(item)
            if len(batch) >= size:
                buffer.append(batch)
                batch = []
        if batch and max_wait is not None and now() >= batch_deadline:
            buffer.append(batch)
            batch = []
        if len(buffer) >= chunk_size:
            counters.items_out += len(buffer)
            await emit(output, buffer)
            buffer = []
    if batch:
        buffer.append(batch)
    if buffer:
        counters.items_out += len(buffer)
        await emit(output, buffer)
    output.channel.close()


async def run_tee(source: Link, outputs: list[Link], counters: StageCounters) -> None:
    """Copy every chunk to each branch; the slowest branch sets the pace."""
    channel = source.channel
    while True:
        try:
            chunk = await channel.receive()
        except EndOfChannel:
            break
        counters.items_in += len(chunk)
        counters.items_out += len(chunk)
        for index, link in enumerate(outputs):
            # Later stages never mutate a chunk, but give each branch its own list
            # anyway so that a user's in-place change in one branch cannot leak.
            await emit(link, chunk if index == 0 else list(chunk))
    for link in outputs:
        link.channel.close()


class MergeState:
    """Counts the merge's live inputs; the last one to end closes the output."""

    __slots__ = ("live",)

    def __init__(self, inputs: int) -> None:
        self.live = inputs


async def run_forward(
    source: Link, output: Link, counters: StageCounters, state: MergeState
) -> None:
    """Fan-in: forward one input's chunks into the merged output."""
    channel = source.channel
    while True:
        try:
            chunk = await channel.receive()
        except EndOfChannel:
            break
        counters.items_in += len(chunk)
        counters.items_out += len(chunk)
        await emit(output, chunk)
    state.live -= 1
    if state.live == 0:
        output.channel.close()
