"""Tests for headrace.Pipeline on the virtual clock: stages, ordering, errors, sinks."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from headrace._clock import Clock
from headrace._errors import ConfigurationError, DeadlineExceeded
from headrace._pipeline import (
    FailedItem,
    OnError,
    Pipeline,
    PipelineError,
    PipelineStatistics,
    merge,
)
from headrace._retry import Retry


async def double(x: int) -> int:
    return x * 2


async def agen(n: int, delay: float = 0.0) -> AsyncIterator[int]:
    for i in range(n):
        if delay:
            await asyncio.sleep(delay)
        yield i


# -- building blocks --------------------------------------------------------------


async def test_map_filter_flat_map_in_order() -> None:
    """map, filter and flat_map compose and keep input order."""

    async def keep_even(x: int) -> bool:
        return x % 2 == 0

    result = await (
        Pipeline(range(10))
        .map(double)
        .filter(lambda x: x % 4 == 0, executor="inline")
        .flat_map(lambda x: [x, -x], executor="inline")
        .filter(keep_even)
        .collect()
    )
    assert result == [0, 0, 4, -4, 8, -8, 12, -12, 16, -16]


async def test_empty_input() -> None:
    """An empty source gives an empty result and zero counts, with no hang."""
    pipeline = Pipeline([]).map(double, workers=3).batch(5)
    assert await pipeline.collect() == []
    stats = pipeline.statistics()
    assert [s.items_in for s in stats.stages] == [0, 0, 0]
    assert stats.items_out == 0
    assert not stats.running


async def test_async_generator_source_and_flat_map_async_iterable() -> None:
    """An async generator feeds the pipeline; flat_map may return an async iterable."""

    async def expand(x: int) -> AsyncIterator[int]:
        return agen(x)

    result = await Pipeline(agen(4)).flat_map(expand).collect()
    assert result == [0, 0, 1, 0, 1, 2]


async def test_channel_as_source() -> None:
    """A headrace Channel is an async iterable source; the pipeline ends when it closes."""
    from headrace._channel import Channel

    channel = Channel[int](4)

    async def produce() -> None:
        async with channel:
            for i in range(10):
                await channel.send(i)

    async with asyncio.TaskGroup() as group:
        group.create_task(produce())
        result = await Pipeline(channel).map(double).collect()
    assert result == [2 * i for i in range(10)]


async def test_batch_and_unbatch() -> None:
    """batch groups by size with a partial last batch; unbatch flattens back."""
    batched = await Pipeline(range(7)).batch(3).collect()
    assert batched == [[0, 1, 2], [3, 4, 5], [6]]
    assert await Pipeline(range(7)).batch(3).unbatch().collect() == list(range(7))


async def test_batch_max_wait_flushes_a_trickle(clock: Clock) -> None:
    """A partial batch goes out max_wait seconds after its first item arrived."""
    arrivals: list[tuple[float, list[int]]] = []

    async def source() -> AsyncIterator[int]:
        yield 1
        await asyncio.sleep(0.25)
        yield 2
        await asyncio.sleep(10)
        yield 3

    async for batch in Pipeline(source()).batch(5, max_wait=1.0):
        arrivals.append((clock.now(), batch))
    assert arrivals == [(1.0, [1, 2]), (10.25, [3])]


async def test_tee_and_merge() -> None:
    """tee copies every item to each branch; merge fans the branches back in."""
    left, right = Pipeline(range(5)).tee(2)
    result = merge(left.map(double), right.filter(lambda x: x > 2, executor="inline"))
    assert sorted(await result.collect()) == [0, 2, 3, 4, 4, 6, 8]
    stats = result.statistics()
    assert stats.stage("tee(2)").items_in == 5
    assert stats.stage("merge").items_out == 7


async def test_merge_of_independent_sources() -> None:
    """merge() of separate pipelines ends when all have ended, keeping per-input order."""
    merged = await merge(Pipeline(agen(3, 1.0)), Pipeline(range(10, 13))).collect()
    assert sorted(merged) == [0, 1, 2, 10, 11, 12]
    assert [x for x in merged if x < 10] == [0, 1, 2]


async def test_unconsumed_tee_branch_is_refused() -> None:
    """Running only one branch of a tee is a configuration error, not a hang."""
    left, _right = Pipeline(range(3)).tee(2)
    with pytest.raises(ConfigurationError, match=r"tee\(n=2\).*\[1\]"):
        await left.collect()


async def test_rate_limit_paces_items(clock: Clock) -> None:
    """rate_limit takes one token per item from anything with async acquire()."""

    class EveryHalfSecond:
        def __init__(self) -> None:
            self.next_free = 0.0

        async def acquire(self) -> None:
            now = clock.now()
            wait = max(0.0, self.next_free - now)
            self.next_free = max(now, self.next_free) + 0.5
            await asyncio.sleep(wait)

    times: list[float] = []
    async for _ in Pipeline(range(4)).rate_limit(EveryHalfSecond()):
        times.append(clock.now())
    assert times == [0.0, 0.5, 1.0, 1.5]


async def test_rate_limit_with_token_bucket(clock: Clock) -> None:
    """headrace.TokenBucket plugs into rate_limit (10/s, burst 1)."""
    ratelimit = pytest.importorskip("headrace._ratelimit")
    bucket = ratelimit.TokenBucket(10, 1)
    await Pipeline(range(5)).rate_limit(bucket).run()
    assert clock.now() == pytest.approx(0.4)


async def test_partial_chunk_flushed_while_stage_waits(clock: Clock) -> None:
    """Chunking never holds a finished item while the stage sleeps on the next one."""
    arrivals: list[tuple[float, int]] = []

    async def slow(x: int) -> int:
        await asyncio.sleep(1.0)
        return x

    async for item in Pipeline(range(3)).map(slow):
        arrivals.append((clock.now(), item))
    assert arrivals == [(1.0, 0), (2.0, 1), (3.0, 2)]


async def test_slow_async_source_items_arrive_at_once(clock: Clock) -> None:
    """Items of a slow async source reach the sink when produced, not per chunk."""
    arrivals: list[float] = []
    async for _ in Pipeline(agen(3, 2.0)).map(double):
        arrivals.append(clock.now())
    assert arrivals == [2.0, 4.0, 6.0]


# -- fan-out and ordering -----------------------------------------------------------


@pytest.mark.parametrize("workers", [2, 5, 16])
async def test_ordered_fan_out_with_random_latencies(workers: int) -> None:
    """workers=N with random per-item latency still yields input order."""
    rng = random.Random(workers)
    delays = [rng.random() for _ in range(300)]

    async def jitter(x: int) -> int:
        await asyncio.sleep(delays[x])
        return x

    assert await Pipeline(range(300)).map(jitter, workers=workers).collect() == list(range(300))


async def test_fan_out_runs_workers_concurrently(clock: Clock) -> None:
    """10 one-second items on 5 workers take exactly 2 seconds."""

    async def one_second(x: int) -> int:
        await asyncio.sleep(1.0)
        return x

    result = await Pipeline(range(10)).map(one_second, workers=5).collect()
    assert result == list(range(10))
    assert clock.now() == 2.0


async def test_fan_out_keeps_every_worker_busy_on_a_trickle(clock: Clock) -> None:
    """Items arriving one by one each start at once on an idle worker (no worker
    sleeps while input waits), so the last of 10 finishes 1 s after it arrived."""
    finished: list[float] = []

    async def one_second(x: int) -> int:
        await asyncio.sleep(1.0)
        finished.append(clock.now())
        return x

    result = await Pipeline(agen(10, 0.1)).map(one_second, workers=10).collect()
    assert result == list(range(10))
    assert finished == pytest.approx([1.1 + 0.1 * i for i in range(10)])


@pytest.mark.parametrize("ordered", [True, False])
async def test_fan_out_saturates_workers_with_a_burst(clock: Clock, ordered: bool) -> None:
    """100 one-second items on 10 workers take exactly 10 s, ordered or not."""

    async def one_second(x: int) -> int:
        await asyncio.sleep(1.0)
        return x

    result = await Pipeline(range(100)).map(one_second, workers=10, ordered=ordered).collect()
    assert sorted(result) == list(range(100))
    assert clock.now() == 10.0


async def test_unordered_fan_out_emits_in_completion_order(clock: Clock) -> None:
    """ordered=False yields items as they finish."""

    async def countdown(x: int) -> int:
        await asyncio.sleep(3 - x)
        return x

    assert await Pipeline(range(3)).map(countdown, workers=3, ordered=False).collect() == [
        2,
        1,
        0,
    ]
    assert clock.now() == 3.0


async def test_reorder_window_bounds_run_ahead(clock: Clock) -> None:
    """A slow head item stalls the stage after `window` items instead of buffering all."""
    started: list[int] = []

    async def head_slow(x: int) -> int:
        started.append(x)
        await asyncio.sleep(100.0 if x == 0 else 0.001)
        return x

    task = asyncio.ensure_future(
        Pipeline(range(1000)).map(head_slow, workers=4, window=8).collect()
    )
    await asyncio.sleep(50.0)
    assert max(started) == 7  # items 0..7 taken, item 8 waits for item 0
    assert await task == list(range(1000))


async def test_filter_and_flat_map_fan_out_keep_order() -> None:
    """filter and flat_map with workers > 1 keep input order too."""

    async def jitter_keep(x: int) -> bool:
        await asyncio.sleep((x * 7919) % 13 / 100)
        return x % 3 == 0

    async def jitter_pair(x: int) -> list[int]:
        await asyncio.sleep((x * 7919) % 11 / 100)
        return [x, x]

    kept = await Pipeline(range(60)).filter(jitter_keep, workers=4).collect()
    assert kept == list(range(0, 60, 3))
    pairs = await Pipeline(range(20)).flat_map(jitter_pair, workers=4).collect()
    assert pairs == [x for x in range(20) for _ in range(2)]


# -- backpressure -------------------------------------------------------------------


async def test_slow_sink_bounds_source_run_ahead(clock: Clock) -> None:
    """The source never gets more than the buffers' worth ahead of a slow consumer."""
    produced = 0

    def source() -> Iterator[int]:
        nonlocal produced
        for i in range(10_000):
            produced += 1
            yield i

    pipeline = Pipeline(source(), chunk_size=4, buffer=1).map(double).map(double)
    consumed = 0
    ahead: list[int] = []
    async with pipeline.stream() as items:
        async for _ in items:
            consumed += 1
            await asyncio.sleep(1.0)
            ahead.append(produced - consumed)
            if consumed == 50:
                break
    # 3 links x 1 chunk buffered + 1 chunk held by each of source, 2 stages and sink.
    assert max(ahead) <= 7 * 4
    assert produced < 100
    assert clock.now() == 50.0


async def test_queue_depth_shows_where_items_wait() -> None:
    """queue_depth counts the items buffered in a stage's input channel."""

    async def slow(x: int) -> int:
        await asyncio.sleep(1.0)
        return x

    pipeline = Pipeline(range(100), chunk_size=4, buffer=2).map(slow, name="slow")
    task = asyncio.ensure_future(pipeline.run())
    await asyncio.sleep(0.5)
    stage = pipeline.statistics().stage("slow")
    # The stage holds its first chunk (4 items); its input channel holds 2 chunks.
    assert (stage.items_in, stage.queue_depth) == (4, 8)
    assert pipeline.statistics().running
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# -- errors -------------------------------------------------------------------------


async def test_failure_propagates_with_stage_and_item() -> None:
    """Fail fast: the sink raises PipelineError naming stage and item, cause attached."""

    async def explode_on_3(x: int) -> int:
        if x == 3:
            raise ValueError("bad row")
        return x

    with pytest.raises(PipelineError) as caught:
        await Pipeline(range(10)).map(explode_on_3, name="parse").map(double).collect()
    error = caught.value
    assert error.stage == "parse"
    assert error.context["item"] == 3
    assert isinstance(error.__cause__, ValueError)
    assert error.code == "pipeline_stage_failed"
    assert error.kind == "bug"  # a plain ValueError escaping user code
    assert "parse" in str(error)
    assert "3" in str(error)


async def test_failure_in_fan_out_stage_cancels_everything(clock: Clock) -> None:
    """A failing worker among many cancels the rest at once; nothing hangs."""

    async def slow_or_fail(x: int) -> int:
        if x == 5:
            await asyncio.sleep(1.0)
            raise RuntimeError("boom")
        await asyncio.sleep(1000.0)
        return x

    with pytest.raises(PipelineError) as caught:
        await Pipeline(range(20)).map(slow_or_fail, workers=8).run()
    assert caught.value.context["item"] == 5
    assert clock.now() == 1.0


async def test_source_that_raises() -> None:
    """An exception in the source surfaces as a PipelineError of stage 'source'."""

    def broken() -> Iterator[int]:
        yield 1
        raise OSError("disk gone")

    with pytest.raises(PipelineError) as caught:
        await Pipeline(broken()).map(double).collect()
    assert caught.value.stage == "source"
    assert isinstance(caught.value.__cause__, OSError)


async def test_async_source_that_raises_mid_stream() -> None:
    """Items before an async source's failure are not mistaken for a clean end."""

    async def broken() -> AsyncIterator[int]:
        yield 1
        await asyncio.sleep(1)
        raise ConnectionError("db dropped")

    seen: list[int] = []
    with pytest.raises(PipelineError, match="db dropped"):
        async for item in Pipeline(broken()).map(double):
            seen.append(item)
    assert seen == [2]


async def test_failure_in_one_merged_input_stops_the_others(clock: Clock) -> None:
    """merge(): one input failing cancels the other (endless) input; nothing hangs."""

    async def endless() -> AsyncIterator[int]:
        while True:
            await asyncio.sleep(1.0)
            yield 0

    async def fails_at_3(x: int) -> int:
        await asyncio.sleep(1.0)
        if x == 3:
            raise ValueError("bad")
        return x

    merged = merge(Pipeline(endless()), Pipeline(range(10)).map(fails_at_3, name="checked"))
    with pytest.raises(PipelineError) as caught:
        await merged.run()
    assert caught.value.stage == "checked"
    assert clock.now() == 4.0


async def test_failure_after_tee_stops_both_branches() -> None:
    """A failing branch of a tee fails the whole run, with that branch's stage named."""

    async def fail_on_2(x: int) -> int:
        if x == 2:
            raise RuntimeError("branch b")
        return x

    left, right = Pipeline(agen(50, 0.1)).tee(2)
    with pytest.raises(PipelineError, match="branch b"):
        await merge(left.map(double), right.map(fail_on_2, name="b")).collect()


async def test_skip_records_failures() -> None:
    """on_error='skip' drops failed items, counts them, and keeps them in statistics."""

    async def odd_fails(x: int) -> int:
        if x % 2:
            raise ValueError(f"odd {x}")
        return x

    pipeline = Pipeline(range(6)).map(odd_fails, workers=2, on_error="skip", name="even")
    assert await pipeline.collect() == [0, 2, 4]
    stats = pipeline.statistics()
    assert stats.stage("even").errors == 3
    assert [(f.stage, f.item) for f in stats.failures] == [("even", 1), ("even", 3), ("even", 5)]


async def test_dead_letter_sink_receives_failed_items() -> None:
    """A callable on_error gets a FailedItem per failure; the rest flows on."""
    dead: list[FailedItem] = []

    async def record(failed: FailedItem) -> None:
        await asyncio.sleep(0.1)
        dead.append(failed)

    def fails_on_2(x: int) -> int:
        if x == 2:
            raise KeyError(x)
        return x

    result = await Pipeline(range(4)).map(fails_on_2, executor="inline", on_error=record).collect()
    assert result == [0, 1, 3]
    assert [(f.item, type(f.error)) for f in dead] == [(2, KeyError)]
    assert dead[0].stage == "map:fails_on_2"


async def test_retry_then_succeed(clock: Clock) -> None:
    """retry= retries transient failures with backoff and counts the retries."""
    attempts: dict[int, int] = {}

    async def flaky(x: int) -> int:
        attempts[x] = attempts.get(x, 0) + 1
        if attempts[x] < 3:
            raise ConnectionError("reset")
        return x

    policy = Retry(max_attempts=3, initial_delay=1.0, jitter="none")
    pipeline = Pipeline(range(2)).map(flaky, retry=policy, name="flaky")
    assert await pipeline.collect() == [0, 1]
    assert pipeline.statistics().stage("flaky").retries == 4
    # Sequential: each item waits 1 s + 2 s between its three attempts.
    assert clock.now() == 6.0


async def test_retry_exhausted_goes_to_dead_letter() -> None:
    """After the last attempt the on_error policy applies."""
    dead: list[FailedItem] = []

    async def always_down(x: int) -> int:
        raise ConnectionError("down")

    policy = Retry(max_attempts=2, initial_delay=0.5, jitter="none")
    out = await Pipeline(range(3)).map(always_down, retry=policy, on_error=dead.append).collect()
    assert out == []
    assert [f.item for f in dead] == [0, 1, 2]


async def test_timeout_per_item(clock: Clock) -> None:
    """timeout= bounds each call; the failure is a DeadlineExceeded naming the stage."""

    async def hangs_on_1(x: int) -> int:
        if x == 1:
            await asyncio.sleep(1000)
        return x

    dead: list[FailedItem] = []
    out = await Pipeline(range(3)).map(hangs_on_1, timeout=2.0, on_error=dead.append).collect()
    assert out == [0, 2]
    assert clock.now() == 2.0
    error = dead[0].error
    assert isinstance(error, DeadlineExceeded)
    assert "hangs_on_1" in (error.cause or "")

    with pytest.raises(PipelineError) as caught:
        await Pipeline(range(3)).map(hangs_on_1, timeout=2.0).collect()
    assert isinstance(caught.value.__cause__, DeadlineExceeded)
    assert caught.value.transient  # copied from the DeadlineExceeded
    assert caught.value.kind == "expected"


async def test_failing_dead_letter_sink_fails_the_pipeline() -> None:
    """A dead-letter sink that raises is itself a stage failure, not a silent loss."""

    def broken_sink(failed: FailedItem) -> None:
        raise RuntimeError("dlq down")

    async def fail(x: int) -> int:
        raise ValueError(x)

    with pytest.raises(PipelineError, match="dlq down"):
        await Pipeline(range(3)).map(fail, on_error=broken_sink).collect()


# -- consumer side: break, cancel, exceptions -------------------------------------------


async def test_break_in_stream_closes_source_generator() -> None:
    """Leaving a stream() block early cancels every stage and acloses the source."""
    closed = False

    async def endless() -> AsyncIterator[int]:
        nonlocal closed
        try:
            i = 0
            while True:
                await asyncio.sleep(0.01)
                yield i
                i += 1
        finally:
            closed = True

    async with Pipeline(endless()).map(double, workers=3).stream() as items:
        async for item in items:
            if item >= 10:
                break
    assert closed


async def test_bare_async_for_break_cancels_stages() -> None:
    """break out of a bare async for: the dropped iterator cancels every stage, which
    finish within a couple of loop turns (the leak check counts after three)."""
    closed = False

    async def endless() -> AsyncIterator[int]:
        nonlocal closed
        try:
            while True:
                await asyncio.sleep(0.1)
                yield 1
        finally:
            closed = True

    async for item in Pipeline(endless()).map(double, workers=3):
        if item:
            break
    for _ in range(3):
        await asyncio.sleep(0)
    assert closed


async def test_exception_in_bare_async_for_body_cancels_stages() -> None:
    """An exception escaping a bare async for drops the iterator, which cancels the
    stages at once, without scheduling a task of its own."""

    async def consume() -> None:
        async for item in Pipeline(agen(100, 0.5)).map(double, workers=2):
            if item == 4:
                raise LookupError("consumer bug")

    with pytest.raises(LookupError):
        await consume()
    for _ in range(3):
        await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == 1


async def test_iterator_never_iterated_starts_nothing() -> None:
    """aiter() alone starts no stage; dropping it leaves nothing behind."""
    iterator = aiter(Pipeline(agen(10)).map(double))
    assert len(asyncio.all_tasks()) == 1
    del iterator
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == 1


async def test_iterator_aclose_awaits_teardown() -> None:
    """aclose() on the iterator cancels and awaits every stage; further next() ends."""
    iterator = aiter(Pipeline(agen(1000, 0.1)).map(double))
    assert await anext(iterator) == 0
    await iterator.aclose()
    assert len(asyncio.all_tasks()) == 1
    with pytest.raises(StopAsyncIteration):
        await anext(iterator)


async def test_cancel_while_iterating_awaits_teardown(clock: Clock) -> None:
    """A consumer cancelled inside async for has every stage awaited before it ends."""
    finalized: list[float] = []

    async def slow(x: int) -> int:
        try:
            await asyncio.sleep(10)
        finally:
            finalized.append(clock.now())
        return x

    async def consume() -> None:
        async for _ in Pipeline(range(5)).map(slow, workers=2):
            pass

    task = asyncio.ensure_future(consume())
    await asyncio.sleep(1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finalized == [1.0, 1.0]
    assert len(asyncio.all_tasks()) == 1


async def test_exception_in_consumer_body_tears_down() -> None:
    """An exception in the consumer leaves no stage running (leak check) and propagates."""
    with pytest.raises(LookupError):
        async with Pipeline(agen(100, 0.5)).map(double, workers=2).stream() as items:
            async for item in items:
                if item == 4:
                    raise LookupError("consumer bug")


async def test_cancelling_the_consumer_cancels_every_stage(clock: Clock) -> None:
    """Cancelling run() cancels and awaits all stages, and the source is closed."""
    finalized: list[str] = []

    async def endless() -> AsyncIterator[int]:
        try:
            while True:
                await asyncio.sleep(1.0)
                yield 1
        finally:
            finalized.append("source")

    async def stubborn(x: int) -> int:
        try:
            await asyncio.sleep(10)
        finally:
            finalized.append("stage")
        return x

    task = asyncio.ensure_future(Pipeline(endless()).map(stubborn, workers=2).run())
    await asyncio.sleep(5.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "source" in finalized
    assert finalized.count("stage") == 2


# -- statistics, progress, validation -------------------------------------------------


async def test_statistics_per_stage(clock: Clock) -> None:
    """statistics() reports per-stage in/out/errors/busy time and sink totals."""

    async def half_second(x: int) -> int:
        await asyncio.sleep(0.5)
        return x

    pipeline = (
        Pipeline(range(8))
        .map(half_second, workers=2, name="work")
        .filter(lambda x: x % 2 == 0, executor="inline", name="even")
    )
    stats = await pipeline.run()
    assert isinstance(stats, PipelineStatistics)
    work = stats.stage("work")
    assert (work.items_in, work.items_out, work.errors, work.workers) == (8, 8, 0, 2)
    assert work.busy_time == pytest.approx(4.0)
    assert stats.stage("even").items_out == 4
    assert stats.items_out == 4
    assert stats.elapsed == 2.0
    assert [s.name for s in stats.stages] == ["source", "work", "even"]
    with pytest.raises(KeyError, match="nope"):
        stats.stage("nope")


async def test_statistics_before_any_run() -> None:
    """A pipeline that never ran reports empty statistics."""
    assert Pipeline(range(3)).statistics().stages == ()


async def test_progress_display_runs(clock: Clock) -> None:
    """run(progress=True) draws with rich and still returns the statistics."""
    import io

    from rich.console import Console

    output = io.StringIO()
    console = Console(file=output, force_terminal=False, width=120)

    async def tick(x: int) -> int:
        await asyncio.sleep(0.1)
        return x

    stats = await Pipeline(range(10)).map(tick).run(progress=True, total=10, console=console)
    assert stats.items_out == 10
    assert "10/10" in output.getvalue()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda p: p.map(double, workers=0), r"workers=0"),
        (lambda p: p.map(double, timeout=-1), r"timeout=-1"),
        (lambda p: p.map(double, on_error="ignore"), r"on_error='ignore'"),
        (lambda p: p.map(double, retry=3), r"retry=3"),
        (lambda p: p.map(42), r"not callable"),
        (lambda p: p.batch(0), r"batch\(size\)=0"),
        (lambda p: p.rate_limit(object()), r"async acquire"),
        (lambda p: p.tee(0), r"tee\(n\)=0"),
        (lambda p: p.map(abs, executor="inline", timeout=1), r"cannot interrupt"),
        (lambda p: p.map(double, window=0), r"window=0"),
        (lambda p: p.batch(3, max_wait=0), r"max_wait\)=0"),
    ],
)
def test_bad_configuration_is_refused(build: Any, message: str) -> None:
    """Invalid stage options raise ConfigurationError naming the input."""
    with pytest.raises(ConfigurationError, match=message):
        build(Pipeline(range(3)))


def test_bad_source_and_merge_arguments() -> None:
    """A non-iterable source and an empty merge() are refused."""
    with pytest.raises(ConfigurationError, match="Pipeline"):
        Pipeline(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="merge"):
        merge()


def test_executor_mismatch_is_refused() -> None:
    """executor='inline' with an async function is refused when the stage is added."""
    with pytest.raises(ConfigurationError, match="needs a sync function"):
        Pipeline(range(3)).map(double, executor="inline")


def test_run_sync() -> None:
    """run_sync() runs a pipeline from synchronous code."""
    stats = Pipeline(range(100)).map(double).run_sync()
    assert stats.items_out == 100


def test_on_error_enum_values() -> None:
    """OnError accepts its string spellings."""
    assert OnError("fail") is OnError.FAIL
    assert OnError("skip") is OnError.SKIP
