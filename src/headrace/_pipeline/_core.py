"""The fluent :class:`Pipeline` builder, :func:`merge`, and the sinks that run it."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
)
from typing import Any, Generic, TypeVar, overload

from .._clock import Clock, default_clock
from .._errors import ConfigurationError, EndOfChannel, WouldBlock
from .._retry import Retry
from ._executors import Executor, resolve_executor
from ._graph import MergeNode, Node, SourceNode, StageNode, StageSpec, TeeBranch, TeeNode
from ._runtime import Run
from ._sink import iterate
from ._stats import FailedItem, OnError, PipelineStatistics

__all__ = ["Pipeline", "merge"]

_T = TypeVar("_T")
_U = TypeVar("_U")

# Measured with benchmarks/pipeline.py-style runs (3 trivial stages, ns per item):
# chunk 64 / buffer 2: ~1570, 64/4: ~1300, 128/4: ~1000, 256/4: ~910. Every chunk that
# crosses a link costs a task switch or two, so bigger chunks amortise them; the
# flush-before-waiting rule keeps latency independent of the size, and 4 x 256 items
# per link is still a small, bounded amount of memory.
DEFAULT_CHUNK_SIZE = 256
DEFAULT_BUFFER = 4


def _check_positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{what}={value!r} must be an int >= 1", code="invalid_stage")
    return value


def _check_seconds(value: object, what: str) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not value > 0
        or math.isnan(value)
    ):
        raise ConfigurationError(
            f"{what}={value!r} must be a positive number of seconds or None",
            code="invalid_stage",
        )
    return float(value)


def _check_policy(value: object, where: str) -> OnError | Callable[[FailedItem], Any]:
    if isinstance(value, OnError):
        return value
    if isinstance(value, str):
        try:
            return OnError(value)
        except ValueError:
            pass
    elif callable(value):
        return value
    raise ConfigurationError(
        f"{where}: on_error={value!r} must be 'fail', 'skip', or a dead-letter callable "
        "taking a FailedItem",
        code="invalid_stage",
    )


class Pipeline(Generic[_T]):
    """A batch job as source → stages → sink, run by long-lived workers per stage.

    Build it fluently from a sync or async iterable (a list, a generator, an async
    generator, a :class:`~headrace.Channel`), add stages, then consume it with one of
    the sinks: ``async for``, :meth:`collect`, :meth:`run` (drain, return statistics)
    or :meth:`run_sync`. A sync source is iterated on the event loop, so it must not
    block (wrap blocking reads in an async generator that awaits a thread)::

        stats = await (
            Pipeline(read_rows(db))
            .map(fetch, workers=16, timeout=5.0, retry=Retry(max_attempts=4))
            .batch(100, max_wait=1.0)
            .map(write_batch, on_error="skip")
            .run()
        )

    Each stage is a fixed set of tasks (one per worker, plus a collector when
    ``workers > 1``) joined by bounded channels of ``buffer`` chunks of up to
    ``chunk_size`` items, so memory stays bounded and a slow sink slows the source
    (backpressure). Items move in chunks while stages keep up and singly when one
    waits. Measured (``benchmarks/pipeline.py``, 3 trivial async stages): about 4x a
    hand-written ``asyncio.Queue`` pipeline and 25-60x aiostream.

    A pipeline is an immutable description: every method returns a new one and can
    be run more than once (but a generator source is used up by the first run). It
    is not tied to a loop until run; one run at a time per object for
    :meth:`statistics` to be meaningful. A failing stage cancels the others and the
    sink raises :class:`PipelineError`; cancelling or leaving the consumer cancels
    and awaits every stage and closes a source generator with ``aclose()``.
    """

    __slots__ = ("_buffer", "_chunk_size", "_clock", "_last_run", "_node")

    def __init__(
        self,
        source: Iterable[_T] | AsyncIterable[_T],
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        buffer: int = DEFAULT_BUFFER,
        clock: Clock | None = None,
    ) -> None:
        if not isinstance(source, Iterable | AsyncIterable):
            raise ConfigurationError(
                f"Pipeline(source={source!r}) must be an iterable or async iterable",
                code="invalid_source",
            )
        self._node: Node = SourceNode(source)
        self._chunk_size = _check_positive_int(chunk_size, "Pipeline(chunk_size)")
        self._buffer = _check_positive_int(buffer, "Pipeline(buffer)")
        self._clock = clock
        self._last_run: Run | None = None

    def _derive(self, node: Node) -> Pipeline[Any]:
        other: Pipeline[Any] = Pipeline.__new__(Pipeline)
        other._node = node
        other._chunk_size = self._chunk_size
        other._buffer = self._buffer
        other._clock = self._clock
        other._last_run = None
        return other

    def _stage(
        self,
        kind: str,
        fn: Callable[[Any], Any],
        *,
        workers: int,
        ordered: bool,
        window: int | None,
        timeout: float | None,
        retry: Retry | None,
        on_error: object,
        executor: Executor,
        name: str | None,
    ) -> Pipeline[Any]:
        where = f"{kind}({getattr(fn, '__name__', fn)!r})"
        if not callable(fn):
            raise ConfigurationError(f"{where}: fn is not callable", code="invalid_stage")
        if retry is not None and not isinstance(retry, Retry):
            raise ConfigurationError(
                f"{where}: retry={retry!r} must be a headrace.Retry", code="invalid_stage"
            )
        spec = StageSpec(
            kind=kind,
            name=name,
            fn=fn,
            workers=_check_positive_int(workers, f"{where}: workers"),
            ordered=bool(ordered),
            window=None if window is None else _check_positive_int(window, f"{where}: window"),
            timeout=_check_seconds(timeout, f"{where}: timeout"),
            retry=retry,
            on_error=_check_policy(on_error, where),
            executor=executor,
        )
        # Refuse mismatches now, not when the run starts.
        if resolve_executor(fn, executor, where) == "inline" and spec.timeout is not None:
            raise ConfigurationError(
                f"{where}: timeout={timeout!r} cannot interrupt a sync function called "
                "inline on the event loop; use executor='thread' (or an async function)",
                code="invalid_stage",
            )
        return self._derive(StageNode(self._node, spec))

    # -- stages ------------------------------------------------------------------

    @overload
    def map(
        self,
        fn: Callable[[_T], Awaitable[_U]],
        *,
        workers: int = ...,
        ordered: bool = ...,
        window: int | None = ...,
        timeout: float | None = ...,
        retry: Retry | None = ...,
        on_error: OnError | str | Callable[[FailedItem], Any] = ...,
        executor: Executor = ...,
        name: str | None = ...,
    ) -> Pipeline[_U]: ...

    @overload
    def map(
        self,
        fn: Callable[[_T], _U],
        *,
        workers: int = ...,
        ordered: bool = ...,
        window: int | None = ...,
        timeout: float | None = ...,
        retry: Retry | None = ...,
        on_error: OnError | str | Callable[[FailedItem], Any] = ...,
        executor: Executor = ...,
        name: str | None = ...,
    ) -> Pipeline[_U]: ...

    def map(
        self,
        fn: Callable[[_T], Any],
        *,
        workers: int = 1,
        ordered: bool = True,
        window: int | None = None,
        timeout: float | None = None,
        retry: Retry | None = None,
        on_error: OnError | str | Callable[[FailedItem], Any] = OnError.FAIL,
        executor: Executor = "auto",
        name: str | None = None,
    ) -> Pipeline[Any]:
        """Apply ``fn`` to every item.

        ``fn`` may be async (awaited on the loop), sync (run in a pool of ``workers``
        threads, with a :class:`~headrace.CancelToken` from
        :func:`~headrace.current_cancel_token`), sync and cheap
        (``executor="inline"``: called on the loop, no thread hop) or CPU-bound
        (``executor="process"``: a pool of ``workers`` processes; ``fn`` must be
        importable, i.e. picklable). ``workers`` items are processed concurrently;
        ``ordered=True`` keeps input order, holding at most ``window`` results
        (default ``max(4 * workers, 128)``) while a slow item finishes;
        ``ordered=False`` emits in completion order. ``timeout`` (seconds) bounds each
        call (:class:`~headrace.DeadlineExceeded`); a thread or process call that times
        out has its cancel token set and is still waited for, since neither can be
        killed. ``retry`` retries failed calls (each attempt gets its own ``timeout``);
        ``on_error`` decides what a failure after retries does (see :class:`OnError`).
        """
        return self._stage(
            "map",
            fn,
            workers=workers,
            ordered=ordered,
            window=window,
            timeout=timeout,
            retry=retry,
            on_error=on_error,
            executor=executor,
            name=name,
        )

    def filter(
        self,
        predicate: Callable[[_T], Any],
        *,
        workers: int = 1,
        ordered: bool = True,
        window: int | None = None,
        timeout: float | None = None,
        retry: Retry | None = None,
        on_error: OnError | str | Callable[[FailedItem], Any] = OnError.FAIL,
        executor: Executor = "auto",
        name: str | None = None,
    ) -> Pipeline[_T]:
        """Keep the items for which ``predicate`` (sync or async) is true.

        Same options as :meth:`map`. A sync predicate runs in a thread by default;
        pass ``executor="inline"`` for cheap ones (``lambda row: row.active``).
        """
        return self._stage(
            "filter",
            predicate,
            workers=workers,
            ordered=ordered,
            window=window,
            timeout=timeout,
            retry=retry,
            on_error=on_error,
            executor=executor,
            name=name,
        )

    def flat_map(
        self,
        fn: Callable[[_T], Any],
        *,
        workers: int = 1,
        ordered: bool = True,
        window: int | None = None,
        timeout: float | None = None,
        retry: Retry | None = None,
        on_error: OnError | str | Callable[[FailedItem], Any] = OnError.FAIL,
        executor: Executor = "auto",
        name: str | None = None,
    ) -> Pipeline[Any]:
        """Replace every item by the items of the iterable (or async iterable) that
        ``fn(item)`` returns. Same options as :meth:`map`."""
        return self._stage(
            "flat_map",
            fn,
            workers=workers,
            ordered=ordered,
            window=window,
            timeout=timeout,
            retry=retry,
            on_error=on_error,
            executor=executor,
            name=name,
        )

    def batch(
        self, size: int, *, max_wait: float | None = None, name: str | None = None
    ) -> Pipeline[list[_T]]:
        """Group items into lists of ``size``.

        A partial list is emitted at the end of the input and, with ``max_wait``
        (seconds), once its first item has waited that long, so a trickle of input
        still gets written out.
        """
        spec = StageSpec(
            kind="batch",
            name=name,
            size=_check_positive_int(size, "batch(size)"),
            max_wait=_check_seconds(max_wait, "batch(max_wait)"),
        )
        return self._derive(StageNode(self._node, spec))

    def unbatch(self, *, name: str | None = None) -> Pipeline[Any]:
        """Flatten: emit the elements of each item (the inverse of :meth:`batch`)."""
        return self._derive(StageNode(self._node, StageSpec(kind="unbatch", name=name)))

    def rate_limit(self, limiter: Any, *, name: str | None = None) -> Pipeline[_T]:
        """Let items through only as fast as ``limiter`` allows.

        ``limiter`` is anything with ``async acquire()``: a
        :class:`~headrace.TokenBucket`, a ``MultiLimiter``, aiolimiter's
        ``AsyncLimiter``. One token per item, taken in order before the item moves on.
        """
        acquire = getattr(limiter, "acquire", None)
        if acquire is None or not callable(acquire):
            raise ConfigurationError(
                f"rate_limit(limiter={limiter!r}) needs an object with async acquire()",
                code="invalid_stage",
            )
        spec = StageSpec(kind="rate_limit", name=name, limiter=limiter)
        return self._derive(StageNode(self._node, spec))

    def tee(self, n: int = 2) -> tuple[Pipeline[_T], ...]:
        """Split into ``n`` pipelines that each see every item.

        The branches must be consumed by one run, typically ``merge()``-d after each
        went its own way; the slowest branch sets the pace (bounded buffers).
        """
        _check_positive_int(n, "tee(n)")
        tee = TeeNode(self._node, n)
        return tuple(self._derive(TeeBranch(tee, index)) for index in range(n))

    # -- sinks -------------------------------------------------------------------

    def _start(self) -> Run:
        run = Run(
            self._node,
            chunk_size=self._chunk_size,
            buffer=self._buffer,
            clock=self._clock or default_clock(),
        )
        self._last_run = run
        run.start()
        return run

    async def _drain(self, on_chunk: Callable[[list[Any]], object], run: Run) -> None:
        channel = run.output.channel
        try:
            while True:
                try:
                    chunk = channel.receive_nowait()
                except WouldBlock:
                    try:
                        chunk = await channel.receive()
                    except EndOfChannel:
                        break
                except EndOfChannel:
                    break
                if run.error is not None:
                    break
                run.items_out += len(chunk)
                on_chunk(chunk)
            if run.error is None:
                await run.wait()
        finally:
            await run.aclose()
        if run.error is not None:
            raise run.error

    async def collect(self) -> list[_T]:
        """Run the pipeline and return every item that reaches the end, in order."""
        results: list[_T] = []
        await self._drain(results.extend, self._start())
        return results

    async def run(
        self, *, progress: bool = False, total: int | None = None, console: Any = None
    ) -> PipelineStatistics:
        """Run the pipeline to the end, discarding its output; return the statistics.

        ``progress=True`` draws a live rich progress bar (items at the sink, per-stage
        counts) on ``console`` (default: stderr's terminal); ``total`` is the expected
        number of items at the sink, if known, for a percentage and an ETA.
        """
        if progress:
            from ._progress import require_rich, show_progress

            require_rich()  # fail before any stage starts, not after the run
        run = self._start()
        reporter: asyncio.Task[None] | None = None
        if progress:
            reporter = asyncio.create_task(
                show_progress(run, total=total, clock=run.clock, console=console),
                name="headrace.pipeline:progress",
            )
        try:
            await self._drain(_discard, run)
        finally:
            if reporter is not None:
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporter
        return run.statistics()

    def run_sync(self, *, progress: bool = False, total: int | None = None) -> PipelineStatistics:
        """:meth:`run` for synchronous programs: a new event loop, run to the end."""
        return asyncio.run(self.run(progress=progress, total=total))

    def __aiter__(self) -> AsyncGenerator[_T, None]:
        """Iterate the items that reach the end (``async for item in pipeline``).

        The run starts on the first iteration. Cancellation while waiting for an item,
        and ``aclose()``, cancel and await every stage. Leaving the loop early
        (``break``, an exception in the body) cancels every stage when the iterator is
        dropped (at once, in CPython); they finish on the next turns of the loop. Use
        :meth:`stream` when they must be gone before the next line runs.
        """
        generator, _state = iterate(self._start)
        return generator

    @contextlib.asynccontextmanager
    async def stream(self) -> AsyncIterator[AsyncGenerator[_T, None]]:
        """``async with pipeline.stream() as items: async for item in items: ...``

        On leaving the block (normally, by ``break``, by an exception or by
        cancellation) every stage has been cancelled and awaited.
        """
        generator, state = iterate(self._start)
        try:
            yield generator
        finally:
            await generator.aclose()
            if state.run is not None:
                await state.run.aclose()

    def statistics(self) -> PipelineStatistics:
        """Per-stage statistics of the current or latest run of this object."""
        if self._last_run is None:
            return PipelineStatistics(
                stages=(), items_out=0, elapsed=0.0, running=False, failures=()
            )
        return self._last_run.statistics()

    def __repr__(self) -> str:
        return f"Pipeline(chunk_size={self._chunk_size}, buffer={self._buffer})"


def _discard(chunk: list[Any]) -> None:
    return None


def merge(*pipelines: Pipeline[Any]) -> Pipeline[Any]:
    """Fan-in: one pipeline with the items of all of ``pipelines``, as they come.

    Items of one input keep their order; inputs interleave. The result ends when
    every input has ended and fails when any of them fails. It takes the chunk size,
    buffer and clock of the first pipeline.
    """
    if not pipelines:
        raise ConfigurationError("merge() needs at least one pipeline", code="invalid_stage")
    for pipeline in pipelines:
        if not isinstance(pipeline, Pipeline):
            raise ConfigurationError(
                f"merge() takes Pipelines, got {pipeline!r}", code="invalid_stage"
            )
    return pipelines[0]._derive(MergeNode(tuple(p._node for p in pipelines)))
