"""Random-time cancellation of pipelines (hypothesis): nothing leaks, nothing hangs."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

from hypothesis import given, settings
from hypothesis import strategies as st

from headrace import testing
from headrace._pipeline import Pipeline, PipelineError, merge

configs = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**32 - 1),
        "items": st.integers(0, 60),
        "workers": st.integers(1, 4),
        "ordered": st.booleans(),
        "batch": st.sampled_from([None, 1, 3]),
        "tee": st.booleans(),
        "chunk_size": st.sampled_from([1, 4, 64]),
        "cancel_at": st.floats(0.0, 2.0),
        "fail_item": st.one_of(st.none(), st.integers(0, 60)),
        "consumer": st.sampled_from(["collect", "run", "iterate", "break", "bare break"]),
    }
)


@settings(max_examples=150, deadline=None)
@given(config=configs)
def test_random_cancellation_leaves_no_tasks(config: dict[str, object]) -> None:
    """Cancel the consumer at a random virtual time: every stage ends, the source
    generator is closed, and a run that finished first has the right result."""

    async def main() -> None:
        rng = random.Random(config["seed"])  # type: ignore[arg-type]
        items = int(config["items"])  # type: ignore[call-overload]
        fail_item = config["fail_item"]
        delays = [rng.random() * 0.05 for _ in range(items)]
        source_started = source_closed = False

        async def source() -> AsyncIterator[int]:
            nonlocal source_started, source_closed
            source_started = True
            try:
                for i in range(items):
                    await asyncio.sleep(delays[i] / 5)
                    yield i
            finally:
                source_closed = True

        async def work(x: int) -> int:
            await asyncio.sleep(delays[x])
            if x == fail_item:
                raise ValueError(x)
            return x

        pipeline = Pipeline(source(), chunk_size=int(config["chunk_size"]))  # type: ignore[call-overload]
        pipeline = pipeline.map(
            work,
            workers=int(config["workers"]),  # type: ignore[call-overload]
            ordered=bool(config["ordered"]),
        )
        if config["tee"]:
            left, right = pipeline.tee(2)
            pipeline = merge(left, right.filter(lambda x: x < 0, executor="inline"))
        if config["batch"] is not None:
            pipeline = pipeline.batch(int(config["batch"])).unbatch()  # type: ignore[call-overload]

        async def consume() -> list[int]:
            kind = config["consumer"]
            if kind == "collect":
                return await pipeline.collect()
            if kind == "run":
                stats = await pipeline.run()
                return list(range(stats.items_out))
            out: list[int] = []
            if kind == "bare break":
                async for item in pipeline:
                    out.append(item)
                    if len(out) >= 5:
                        break
                return out
            async with pipeline.stream() as stream:
                async for item in stream:
                    out.append(item)
                    if kind == "break" and len(out) >= 5:
                        break
            return out

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(float(config["cancel_at"]))  # type: ignore[arg-type]
        task.cancel()
        try:
            result = await task
        except asyncio.CancelledError:
            result = None
        except PipelineError as exc:
            failed_on = exc.context["item"]
            result = None
            assert failed_on == fail_item
        for _ in range(3):  # a dropped iterator's stages finish on the next turns
            await asyncio.sleep(0)
        # However the consumer ended, a source generator that started was closed.
        assert source_closed or not source_started
        if result is not None and fail_item is None and config["consumer"] == "collect":
            expected = list(range(items))
            assert (result if config["ordered"] else sorted(result)) == expected
        if result is not None and config["consumer"] == "run":
            assert len(result) == items

    testing.run(main)
