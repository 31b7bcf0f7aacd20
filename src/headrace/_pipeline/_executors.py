"""How a stage calls the user's function: inline, awaited, in threads or in processes.

Every stage turns its ``fn`` into one of two shapes once, at start:

* ``inline``: a plain sync call, for cheap functions (``executor="inline"``);
* ``awaitable``: ``call(item)`` returns an awaitable, for async functions, threads
  (``executor="thread"``), processes (``executor="process"``), and anything with a
  ``timeout`` or ``retry`` wrapped around it.

A sync function called ``inline`` costs a plain call; in a thread it costs a hop to the
pool and back (tens of microseconds), so ``auto`` picks threads for sync functions
only because they may block, and users opt into ``inline`` for cheap ones.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from .._cancel import CancelToken, deadline, run_in_thread_with
from .._clock import Clock
from .._errors import ConfigurationError
from .._retry import Retry

__all__ = ["Executor", "StageCall", "is_async_callable", "make_call"]

Executor = Literal["auto", "async", "inline", "thread", "process"]


def is_async_callable(fn: object) -> bool:
    """Whether calling ``fn`` returns a coroutine (async def, partials, async __call__)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - we want the async-ness of __call__
    return call is not None and inspect.iscoroutinefunction(call)


class StageCall:
    """A stage function prepared for calling: its shape, and what it owns (pools)."""

    __slots__ = ("call", "inline", "pool")

    def __init__(
        self,
        call: Callable[[Any], Any],
        *,
        inline: bool,
        pool: concurrent.futures.Executor | None = None,
    ) -> None:
        self.call = call
        self.inline = inline
        self.pool = pool

    async def aclose(self) -> None:
        """Shut the stage's pool down; every call into it has returned by now."""
        pool, self.pool = self.pool, None
        if pool is None:
            return
        if isinstance(pool, concurrent.futures.ProcessPoolExecutor):
            # Joining worker processes takes a while; keep the loop responsive.
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
        else:
            pool.shutdown(wait=True, cancel_futures=True)


def resolve_executor(fn: Callable[..., Any], executor: Executor, where: str) -> Executor:
    """Pick the executor for ``fn`` (``auto``: async functions awaited, sync in threads)."""
    if executor not in ("auto", "async", "inline", "thread", "process"):
        raise ConfigurationError(
            f"{where}: executor={executor!r} is not one of auto, async, inline, thread, process",
            code="invalid_executor",
        )
    if not callable(fn):
        raise ConfigurationError(f"{where}: fn={fn!r} is not callable", code="invalid_stage")
    is_async = is_async_callable(fn)
    if executor == "auto":
        return "async" if is_async else "thread"
    if executor == "async" and not is_async:
        raise ConfigurationError(
            f"{where}: executor='async' but {fn!r} is not an async function",
            code="invalid_executor",
        )
    if executor in ("inline", "thread", "process") and is_async:
        raise ConfigurationError(
            f"{where}: executor={executor!r} needs a sync function, {fn!r} is async",
            code="invalid_executor",
        )
    if executor == "process":
        check_picklable(fn, where)
    return executor


def check_picklable(fn: Callable[..., Any], where: str) -> None:
    """Refuse a process-pool function that cannot be sent to the worker processes."""
    import pickle  # pickling the function for a local process pool is what the pool does

    try:
        pickle.dumps(fn)
    except Exception as exc:
        raise ConfigurationError(
            f"{where}: executor='process' needs a function the worker processes can import, "
            f"but {fn!r} cannot be pickled ({type(exc).__name__}: {exc}); define it at "
            "module level (not a lambda, closure or bound method of an unpicklable object)",
            code="unpicklable_function",
        ) from exc


async def _in_process(
    pool: concurrent.futures.ProcessPoolExecutor, fn: Callable[[Any], Any], item: Any
) -> Any:
    future = asyncio.get_running_loop().run_in_executor(pool, fn, item)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        # A running process cannot be interrupted; wait for it so that nothing the
        # stage started outlives the stage (a queued call is simply dropped).
        if not future.cancel():
            while not future.done():
                try:
                    await asyncio.shield(future)
                except asyncio.CancelledError:
                    continue
                except BaseException:
                    break
            if not future.cancelled():
                future.exception()
        raise


def make_call(
    fn: Callable[[Any], Any],
    executor: Executor,
    *,
    workers: int,
    timeout: float | None,
    retry: Retry | None,
    clock: Clock,
    stage: str,
    on_retry: Callable[[BaseException, int, float], object],
) -> StageCall:
    """Build the call a stage's workers make per item (see the module docstring)."""
    pool: concurrent.futures.Executor | None = None
    base: Callable[[Any], Any]
    if executor == "inline":
        if timeout is None and retry is None:
            return StageCall(fn, inline=True)

        async def base_inline(item: Any) -> Any:
            return fn(item)

        base = base_inline
    elif executor == "async":
        base = fn
    elif executor == "thread":
        thread_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix=f"headrace-{stage}"
        )
        pool = thread_pool

        def base_thread(item: Any) -> Awaitable[Any]:
            return run_in_thread_with(thread_pool, CancelToken(), functools.partial(fn, item))

        base = base_thread
    else:
        # spawn, not fork: forking a process that runs threads (ours, the user's, the
        # loop's executor) can deadlock the child, and Python 3.12 warns about it.
        import multiprocessing  # only process stages pay for importing it

        process_pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn")
        )
        pool = process_pool

        def base_process(item: Any) -> Awaitable[Any]:
            return _in_process(process_pool, fn, item)

        base = base_process

    if timeout is None and retry is None:
        return StageCall(base, inline=False, pool=pool)

    cause = f"pipeline stage {stage!r} per-item timeout"

    async def once(item: Any) -> Any:
        if timeout is None:
            return await base(item)
        async with deadline(timeout, cause=cause, clock=clock):
            return await base(item)

    if retry is None:
        return StageCall(once, inline=False, pool=pool)

    policy = retry

    async def with_retry(item: Any) -> Any:
        return await policy.call(lambda: once(item), clock=clock, on_retry=on_retry)

    return StageCall(with_retry, inline=False, pool=pool)
