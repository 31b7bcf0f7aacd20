"""Helpers for testing code built on headrace: a virtual clock, a leak check, services.

* :class:`VirtualClock` runs an event loop on virtual time (see its docstring).
* :func:`run` runs a coroutine on a fresh loop and fails if it leaves tasks behind or
  if the loop reported an error nobody retrieved ("Task was destroyed but it is
  pending", an exception in a callback).
* :func:`require_service` skips a test whose local service is down, or fails it when
  ``HEADRACE_REQUIRE_SERVICES=1`` (CI), so a missing broker is never a silent skip.
* ``pytest_plugins = ["headrace.testing.pytest_plugin"]`` runs ``async def`` tests
  this way, on a virtual clock unless they are marked ``real_time``.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NoReturn, TypeVar

from .._clock import Clock, MonotonicClock, VirtualClock

__all__ = ["LeakError", "VirtualClock", "require_service", "run", "service_available"]

_T = TypeVar("_T")


class LeakError(AssertionError):
    """A test left tasks running, or the loop reported an error nobody handled."""


def _describe(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    name = getattr(coro, "__qualname__", repr(coro))
    return f"{task.get_name()} ({name})"


async def _checked(main: Callable[[], Awaitable[_T]], collect_garbage: bool = False) -> _T:
    loop = asyncio.get_running_loop()
    problems: list[str] = []

    def record(_: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        subject = context.get("exception") or context.get("task") or context.get("future")
        problems.append(f"{context.get('message')}: {subject!r}")

    loop.set_exception_handler(record)
    this_task = asyncio.current_task()
    before = asyncio.all_tasks() - {this_task}
    result = await main()
    # Let callbacks that finish already-completed tasks run before we count.
    for _ in range(3):
        await asyncio.sleep(0)
    if collect_garbage:
        # A pending task nobody references is only reported ("Task was destroyed but it
        # is pending") when it is collected; collect now, while our handler listens.
        gc.collect()
    leftover = asyncio.all_tasks() - before - {this_task}
    if leftover:
        names = sorted(_describe(task) for task in leftover)
        for task in leftover:
            task.cancel()
        await asyncio.gather(*leftover, return_exceptions=True)
        raise LeakError(f"{len(leftover)} task(s) outlived the test: {', '.join(names)}")
    if problems:
        raise LeakError("the event loop reported: " + "; ".join(problems))
    return result


def run(
    main: Callable[[], Coroutine[Any, Any, _T]] | Coroutine[Any, Any, _T],
    *,
    clock: Clock | None = None,
    collect_garbage: bool = False,
) -> _T:
    """Run ``main`` on a new loop (virtual time unless ``clock`` is a real clock), checked.

    Fails with :class:`LeakError` if tasks created by ``main`` are still alive when it
    returns (``asyncio.run`` would cancel them quietly and hide the leak), or if the
    loop reported an error. ``collect_garbage=True`` runs the garbage collector before
    the check, so dropped pending tasks are reported too (slower; for stress runs).
    """

    async def call() -> _T:
        return await (main() if callable(main) else main)

    if clock is None:
        clock = VirtualClock()
    if isinstance(clock, VirtualClock):
        with asyncio.Runner(loop_factory=clock.new_event_loop) as runner:
            return runner.run(_checked(call, collect_garbage))
    if not isinstance(clock, MonotonicClock):
        raise TypeError(f"run(clock={clock!r}) takes a VirtualClock or a MonotonicClock")
    with asyncio.Runner() as runner:
        return runner.run(_checked(call, collect_garbage))


def service_available(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip (or, with ``HEADRACE_REQUIRE_SERVICES=1``, fail) when a service is down."""
    if service_available(host, port):
        return
    reason = f"{name} is not reachable at {host}:{port}"
    _skip_or_fail(reason)


def _skip_or_fail(reason: str) -> NoReturn:
    import pytest

    if os.environ.get("HEADRACE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} and HEADRACE_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(f"{reason} (start it, or see README: Services)")
