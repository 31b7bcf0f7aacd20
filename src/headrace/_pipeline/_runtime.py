"""One run of a pipeline: build channels and tasks from the graph, supervise, tear down.

The run owns every task it starts. The first task to fail records the error (wrapped
in :class:`PipelineError` with the stage's name unless the stage already did) and
cancels all the others; it also closes the sink's channel so that a consumer waiting
for the next item wakes up and raises. :meth:`Run.aclose` cancels what is left and
waits for *every* task, even if the consumer is cancelled again meanwhile, then
shuts the stages' thread and process pools down. Nothing outlives it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from .._channel import Channel
from .._clock import Clock
from .._errors import ConfigurationError, HeadraceError
from ._executors import StageCall, make_call, resolve_executor
from ._graph import MergeNode, Node, SourceNode, StageNode, StageSpec, TeeBranch, TeeNode
from ._ordering import FanOut
from ._stages import (
    FILTER,
    FLAT,
    MAP,
    ErrorHandler,
    MergeState,
    run_batch,
    run_forward,
    run_single,
    run_source,
    run_tee,
)
from ._stats import FailedItem, Link, PipelineError, PipelineStatistics, StageCounters

__all__ = ["Run", "check_graph"]

_MODES = {"map": MAP, "filter": FILTER, "flat_map": FLAT, "unbatch": FLAT, "rate_limit": MAP}


def _identity(item: Any) -> Any:
    return item


def check_graph(terminal: Node) -> None:
    """Refuse a graph that would hang: a tee branch that is not part of this run."""
    seen: set[int] = set()
    used: dict[int, tuple[TeeNode, set[int]]] = {}
    stack = [terminal]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, StageNode):
            stack.append(node.upstream)
        elif isinstance(node, TeeBranch):
            used.setdefault(id(node.tee), (node.tee, set()))[1].add(node.index)
            stack.append(node.tee)
        elif isinstance(node, TeeNode):
            stack.append(node.upstream)
        elif isinstance(node, MergeNode):
            stack.extend(node.upstreams)
    for tee, indexes in used.values():
        missing = sorted(set(range(tee.branches)) - indexes)
        if missing:
            raise ConfigurationError(
                f"tee(n={tee.branches}): branch(es) {missing} are not consumed by this run; "
                "a tee's branches must run together (merge() them), or the unconsumed "
                "branch would stall the others once its buffer fills",
                code="tee_branch_unconsumed",
            )


class Run:
    """The tasks, channels and counters of one execution of a pipeline."""

    def __init__(self, terminal: Node, *, chunk_size: int, buffer: int, clock: Clock) -> None:
        check_graph(terminal)
        self.clock = clock
        self.chunk_size = chunk_size
        self.buffer = buffer
        self.counters: list[StageCounters] = []
        self.failures: list[FailedItem] = []
        self.error: BaseException | None = None
        self.items_out = 0
        self.started = clock.now()
        self.ended: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._calls: list[StageCall] = []
        self._pending: list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]] = []
        self._built: dict[int, Any] = {}
        self._names: set[str] = set()
        self.output = self._build(terminal)

    # -- building ----------------------------------------------------------------

    def _link(self) -> Link:
        return Link(Channel(self.buffer))

    def _counters(self, name: str, workers: int, inputs: list[Link]) -> StageCounters:
        unique = name
        number = 2
        while unique in self._names:
            unique = f"{name}#{number}"
            number += 1
        self._names.add(unique)
        counters = StageCounters(unique, workers, inputs)
        self.counters.append(counters)
        return counters

    def _spawn(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        # Coroutines are created only in start(), so a failed build leaves none unawaited.
        self._pending.append((name, factory))

    def _build(self, node: Node) -> Link:
        if isinstance(node, TeeBranch):
            links: list[Link] = self._built.get(id(node.tee)) or self._build_tee(node.tee)
            return links[node.index]
        built = self._built.get(id(node))
        if built is not None:
            return built  # type: ignore[no-any-return]
        link: Link
        if isinstance(node, SourceNode):
            link = self._link()
            counters = self._counters("source", 1, [])
            source = node.source
            self._spawn(
                counters.name,
                lambda: run_source(source, link, counters, self.chunk_size),
            )
        elif isinstance(node, StageNode):
            link = self._build_stage(node.spec, self._build(node.upstream))
        elif isinstance(node, MergeNode):
            link = self._link()
            inputs = [self._build(upstream) for upstream in node.upstreams]
            counters = self._counters("merge", len(inputs), inputs)
            state = MergeState(len(inputs))
            for upstream_link in inputs:
                self._spawn(
                    counters.name,
                    lambda source=upstream_link: run_forward(source, link, counters, state),  # type: ignore[misc]
                )
        else:  # pragma: no cover - the fluent API makes no other nodes
            raise TypeError(f"unknown pipeline node {node!r}")
        self._built[id(node)] = link
        return link

    def _build_tee(self, tee: TeeNode) -> list[Link]:
        source = self._build(tee.upstream)
        links = [self._link() for _ in range(tee.branches)]
        counters = self._counters(f"tee({tee.branches})", 1, [source])
        self._spawn(counters.name, lambda: run_tee(source, links, counters))
        self._built[id(tee)] = links
        return links

    def _build_stage(self, spec: StageSpec, source: Link) -> Link:
        link = self._link()
        clock = self.clock
        chunk_size = self.chunk_size
        if spec.kind == "batch":
            counters = self._counters(spec.name or f"batch({spec.size})", 1, [source])
            size, max_wait = spec.size, spec.max_wait
            self._spawn(
                counters.name,
                lambda: run_batch(size, max_wait, source, link, counters, chunk_size, clock),
            )
            return link
        if spec.kind == "unbatch":
            counters = self._counters(spec.name or "unbatch", 1, [source])
            call = StageCall(_identity, inline=True)
        elif spec.kind == "rate_limit":
            counters = self._counters(spec.name or "rate_limit", 1, [source])
            acquire = spec.limiter.acquire

            async def pass_through(item: Any) -> Any:
                await acquire()
                return item

            call = StageCall(pass_through, inline=False)
        else:
            assert spec.fn is not None
            fn_name = getattr(spec.fn, "__name__", type(spec.fn).__name__)
            name = spec.name or f"{spec.kind}:{fn_name}"
            counters = self._counters(name, spec.workers, [source])
            executor = resolve_executor(spec.fn, spec.executor, f"{spec.kind}({fn_name})")
            call = make_call(
                spec.fn,
                executor,
                workers=spec.workers,
                timeout=spec.timeout,
                retry=spec.retry,
                clock=clock,
                stage=counters.name,
                on_retry=counters.on_retry,
            )
            self._calls.append(call)
        mode = _MODES[spec.kind]
        errors = ErrorHandler(spec.on_error, counters.name, counters, self.failures)
        if spec.workers == 1:
            self._spawn(
                counters.name,
                lambda: run_single(call, mode, source, link, counters, errors, chunk_size, clock),
            )
            return link
        fan_out = FanOut(
            call,
            mode,
            workers=spec.workers,
            ordered=spec.ordered,
            window=spec.window or max(4 * spec.workers, 128),
            source=source,
            output=link,
            counters=counters,
            errors=errors,
            chunk_size=chunk_size,
            clock=clock,
        )
        for _ in range(spec.workers):
            self._spawn(counters.name, fan_out.worker)
        self._spawn(counters.name, fan_out.collector)
        return link

    # -- running -----------------------------------------------------------------

    def start(self) -> None:
        """Start every stage's tasks (call once, inside the consumer's task)."""
        pending, self._pending = self._pending, []
        for name, factory in pending:
            task = asyncio.create_task(factory(), name=f"headrace.pipeline:{name}")
            task.add_done_callback(self._on_done)
            self._tasks.append(task)

    def _on_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()  # also marks it retrieved
        if exc is None or self.error is not None:
            return
        if not isinstance(exc, PipelineError) and isinstance(exc, Exception):
            stage = task.get_name().removeprefix("headrace.pipeline:")
            exc = PipelineError.wrap(
                exc,
                f"stage {stage!r} failed: {type(exc).__name__}: {exc}",
                context={"stage": stage},
                kind=exc.kind if isinstance(exc, HeadraceError) else "bug",
            )
        self.error = exc
        for other in self._tasks:
            other.cancel()
        # Wake the consumer if it is waiting for the next chunk.
        self.output.channel.close()

    async def wait(self) -> None:
        """Wait for every stage to finish on its own (after the sink saw the end)."""
        if self._tasks:
            await asyncio.wait(self._tasks)

    async def aclose(self) -> None:
        """Cancel every stage, wait for all of them, close the pools. Idempotent."""
        for task in self._tasks:
            task.cancel()
        cancelled = False
        pending = [task for task in self._tasks if not task.done()]
        while pending:
            try:
                await asyncio.wait(pending)
            except asyncio.CancelledError:
                cancelled = True  # we still owe the caller a clean teardown
            pending = [task for task in pending if not task.done()]
        calls, self._calls = self._calls, []
        for call in calls:
            while True:
                try:
                    await call.aclose()
                    break
                except asyncio.CancelledError:
                    cancelled = True
        if self.ended is None:
            self.ended = self.clock.now()
        if cancelled:
            raise asyncio.CancelledError

    def abandon(self) -> None:
        """Cancel every stage without waiting (the consumer dropped its iterator)."""
        if self.ended is None:
            self.ended = self.clock.now()
        try:
            for task in self._tasks:
                task.cancel()
        except RuntimeError:  # the loop is already closed; its tasks are gone with it
            return
        for call in self._calls:
            if call.pool is not None:
                call.pool.shutdown(wait=False, cancel_futures=True)

    def statistics(self) -> PipelineStatistics:
        end = self.ended if self.ended is not None else self.clock.now()
        return PipelineStatistics(
            stages=tuple(counters.snapshot() for counters in self.counters),
            items_out=self.items_out,
            elapsed=end - self.started,
            running=self.ended is None,
            failures=tuple(self.failures),
        )
