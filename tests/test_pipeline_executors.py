"""Pipeline stages running sync functions in threads and processes (real time)."""

from __future__ import annotations

import threading
import time

import pytest

from headrace._cancel import current_cancel_token
from headrace._errors import ConfigurationError
from headrace._pipeline import FailedItem, Pipeline, PipelineError


def square(x: int) -> int:
    """Module level, so that worker processes can import it."""
    return x * x


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return x


@pytest.mark.real_time
async def test_sync_function_runs_in_threads() -> None:
    """A sync fn runs off the loop, in at most `workers` threads, results in order."""
    seen_threads: set[str] = set()
    loop_thread = threading.current_thread().name
    lock = threading.Lock()
    running = 0
    peak = 0

    def blocking(x: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            seen_threads.add(threading.current_thread().name)
        time.sleep(0.01)
        with lock:
            running -= 1
        return x + 1

    result = await Pipeline(range(40)).map(blocking, workers=4).collect()
    assert result == list(range(1, 41))
    assert loop_thread not in seen_threads
    assert 1 < peak <= 4


@pytest.mark.real_time
async def test_thread_stage_sees_cancel_token_on_teardown() -> None:
    """When the pipeline fails, a sync fn still running sees its CancelToken set."""
    observed: list[bool] = []

    def waits_for_cancel(x: int) -> int:
        if x == 0:
            raise RuntimeError("first item fails")
        token = current_cancel_token()
        observed.append(token.wait(5.0))
        return x

    with pytest.raises(PipelineError, match="first item fails"):
        await Pipeline(range(2)).map(waits_for_cancel, workers=2).collect()
    # The thread was awaited before collect() returned: its answer is already in.
    assert observed == [True]


@pytest.mark.real_time
@pytest.mark.slow
async def test_process_stage_computes_in_other_processes() -> None:
    """executor='process' runs fn in a process pool; errors keep the policy."""
    result = await Pipeline(range(20)).map(square, workers=2, executor="process").collect()
    assert result == [x * x for x in range(20)]
    dead: list[FailedItem] = []
    out = await (
        Pipeline(range(5))
        .map(fail_on_three, workers=2, executor="process", on_error=dead.append)
        .collect()
    )
    assert out == [0, 1, 2, 4]
    assert [(f.item, type(f.error)) for f in dead] == [(3, ValueError)]


def test_unpicklable_process_function_is_refused() -> None:
    """A lambda cannot go to a process pool: a clear ConfigurationError at build time."""
    with pytest.raises(ConfigurationError, match="cannot be pickled") as caught:
        Pipeline(range(3)).map(lambda x: x, executor="process")
    assert caught.value.code == "unpicklable_function"


@pytest.mark.parametrize("executor", ["thread", "process", "inline"])
def test_async_function_with_sync_executor_is_refused(executor: str) -> None:
    """Thread, process and inline executors need a sync function."""

    async def coro_fn(x: int) -> int:
        return x

    with pytest.raises(ConfigurationError, match="needs a sync function"):
        Pipeline(range(3)).map(coro_fn, executor=executor)  # type: ignore[arg-type]


def test_unknown_executor_is_refused() -> None:
    """An executor name that does not exist is refused with the valid ones listed."""
    with pytest.raises(ConfigurationError, match="auto, async, inline, thread, process"):
        Pipeline(range(3)).map(square, executor="gpu")  # type: ignore[arg-type]


def test_sync_function_with_async_executor_is_refused() -> None:
    """executor='async' needs an async function."""
    with pytest.raises(ConfigurationError, match="not an async function"):
        Pipeline(range(3)).map(square, executor="async")


@pytest.mark.real_time
async def test_thread_timeout_sets_token_and_dead_letters() -> None:
    """A thread call past its timeout has its token cancelled and becomes a
    DeadlineExceeded for the on_error policy; the thread was waited for."""
    from headrace._errors import DeadlineExceeded

    finished: list[int] = []

    def cooperative(x: int) -> int:
        if x == 1:
            current_cancel_token().wait(30.0)  # returns as soon as the token is set
        finished.append(x)
        return x

    dead: list[FailedItem] = []
    started = time.monotonic()
    out = await Pipeline(range(3)).map(cooperative, timeout=0.2, on_error=dead.append).collect()
    assert out == [0, 2]
    assert [(f.item, type(f.error)) for f in dead] == [(1, DeadlineExceeded)]
    assert sorted(finished) == [0, 1, 2]
    # Tolerant bound: far below the 30 s the thread would have slept uncancelled.
    assert time.monotonic() - started < 10.0
