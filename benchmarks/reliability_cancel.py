"""R1: randomized cancellations across pipelines, workers, hedges and supervisors.

Each trial builds one of the four on a fresh virtual-clock loop with random sizes and
latencies, cancels it at a random instant, and then counts what went wrong:

* leaked tasks (alive after the trial that were not before) and loop errors
  ("Task was destroyed but it is pending", exceptions in callbacks), found by
  :func:`headrace.testing.run` with a garbage collection before the check;
* warnings (``ResourceWarning``, "coroutine ... was never awaited");
* for the worker: messages lost (neither acked nor back in the broker once every lease
  has expired) -- the pass condition is that every count is 0.

    python benchmarks/reliability_cancel.py [--trials 1000] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import random
import sys
import time
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path

from headrace import ChildContext, Pipeline, Supervisor, hedge
from headrace.messaging import MemoryBroker, Message, OutgoingMessage, Worker
from headrace.testing import LeakError, VirtualClock, run

Scenario = Callable[[random.Random, VirtualClock], Awaitable[dict[str, int]]]


async def _cancel_at(awaitable: Awaitable[object], when: float) -> bool:
    """Run ``awaitable`` as a task and cancel it at virtual time ``when``.

    Returns whether it was still running (and so really cancelled)."""
    task = asyncio.ensure_future(awaitable)
    loop = asyncio.get_running_loop()
    handle = loop.call_at(when, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise
        return True
    except Exception:
        return False
    finally:
        handle.cancel()
    return False


async def pipeline_trial(rng: random.Random, clock: VirtualClock) -> dict[str, int]:
    delays = [rng.choice([0, 0, 0.001, 0.01, 0.1]) for _ in range(rng.randint(0, 300))]

    async def work(delay: float) -> float:
        await asyncio.sleep(delay)
        return delay

    pipeline = (
        Pipeline(delays)
        .map(work, workers=rng.randint(1, 8), ordered=rng.random() < 0.5)
        .batch(rng.randint(1, 16), max_wait=rng.choice([None, 0.05]))
    )
    cancelled = await _cancel_at(pipeline.collect(), rng.uniform(0, 1.0))
    return {"cancelled": int(cancelled)}


async def worker_trial(rng: random.Random, clock: VirtualClock) -> dict[str, int]:
    lease = 5.0
    broker = MemoryBroker(max_deliveries=None, clock=clock)
    total = rng.randint(1, 200)
    await broker.publish("jobs", [OutgoingMessage(b"x") for _ in range(total)])
    worker = Worker(broker, clock=clock, lease=lease, shutdown_timeout=rng.choice([0.0, 0.05, 1.0]))

    @worker.handler("jobs", concurrency=rng.randint(1, 16))
    async def handle(message: Message) -> None:
        await asyncio.sleep(rng.choice([0, 0.001, 0.02, 0.2]))

    cancelled = await _cancel_at(
        worker.run(exit_when_idle=0.5, handle_signals=False), rng.uniform(0, 1.5)
    )
    acked = worker.statistics().acked
    # Every lease has expired after this; whatever was not acked must be fetchable.
    await asyncio.sleep(lease + 1)
    remaining: set[str] = set()
    while batch := await broker.fetch("jobs", 500, timeout=0, lease=60):
        remaining.update(message.id for message in batch)
    await broker.close()
    return {"cancelled": int(cancelled), "lost": max(0, total - acked - len(remaining))}


async def hedge_trial(rng: random.Random, clock: VirtualClock) -> dict[str, int]:
    async def call() -> str:
        await asyncio.sleep(rng.choice([0.001, 0.01, 0.5, 2.0]))
        if rng.random() < 0.2:
            raise ConnectionError("replica reset")
        return "ok"

    async def calls() -> None:
        for _ in range(rng.randint(1, 10)):
            try:
                await hedge(
                    call,
                    delay=rng.choice([0.005, 0.05, 0.2]),
                    max_attempts=rng.randint(2, 4),
                    cancel_timeout=rng.choice([None, 0.01, 1.0]),
                )
            except ConnectionError:
                pass

    cancelled = await _cancel_at(calls(), rng.uniform(0, 2.0))
    return {"cancelled": int(cancelled)}


async def supervisor_trial(rng: random.Random, clock: VirtualClock) -> dict[str, int]:
    async def child(ctx: ChildContext) -> None:
        while True:
            await asyncio.sleep(rng.choice([0.01, 0.1, 0.3]))
            roll = rng.random()
            if roll < 0.1:
                raise ConnectionError("crash")
            if roll < 0.15:
                await asyncio.Event().wait()  # hang: only the watchdog helps
            ctx.beat(roll)

    async def supervised() -> None:
        async with Supervisor(
            strategy=rng.choice(["one_for_one", "one_for_all", "rest_for_one"]),
            max_restarts=rng.randint(0, 20),
            within=1.0,
        ) as supervisor:
            for index in range(rng.randint(1, 5)):
                supervisor.add(
                    child,
                    name=f"child-{index}",
                    heartbeat_timeout=rng.choice([None, 0.5]),
                    shutdown_timeout=rng.choice([0.0, 0.1]),
                )
            await asyncio.sleep(10)

    try:
        cancelled = await _cancel_at(supervised(), rng.uniform(0, 3.0))
    except Exception:  # the supervisor gave up before the cancel: also a clean end
        cancelled = False
    return {"cancelled": int(cancelled)}


SCENARIOS: dict[str, Scenario] = {
    "pipeline": pipeline_trial,
    "worker": worker_trial,
    "hedge": hedge_trial,
    "supervisor": supervisor_trial,
}


def run_trials(trials: int, seed: int) -> dict[str, dict[str, int]]:
    """Run ``trials`` randomized trials; return counts per scenario."""
    master = random.Random(seed)
    counts: dict[str, collections.Counter[str]] = {
        name: collections.Counter() for name in SCENARIOS
    }
    for _ in range(trials):
        name = master.choice(sorted(SCENARIOS))
        rng = random.Random(master.getrandbits(64))
        clock = VirtualClock()
        tally = counts[name]
        tally["trials"] += 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = run(SCENARIOS[name](rng, clock), clock=clock, collect_garbage=True)
                tally.update(result)
            except LeakError as exc:
                tally["leaks"] += 1
                print(f"{name}: {exc}", file=sys.stderr)
            gc.collect()
        tally["warnings"] += len(caught)
        for warning in caught:
            print(f"{name}: {warning.category.__name__}: {warning.message}", file=sys.stderr)
    return {name: dict(tally) for name, tally in counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="100 trials")
    args = parser.parse_args()
    trials = 100 if args.quick else args.trials
    started = time.perf_counter()
    counts = run_trials(trials, args.seed)
    elapsed = time.perf_counter() - started
    columns = ["trials", "cancelled", "leaks", "warnings", "lost"]
    print(f"R1: {trials} randomized cancellations, seed {args.seed}, {elapsed:.1f} s")
    print(f"{'scenario':<12}" + "".join(f"{column:>11}" for column in columns))
    for name, tally in counts.items():
        print(f"{name:<12}" + "".join(f"{tally.get(column, 0):>11}" for column in columns))
    bad = sum(
        tally.get(key, 0) for tally in counts.values() for key in ("leaks", "warnings", "lost")
    )
    print("pass: 0 leaks, 0 warnings, 0 lost" if bad == 0 else f"FAIL: {bad} problems")
    out = Path(__file__).parent / "results" / "reliability_cancel.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"trials": trials, "seed": args.seed, "counts": counts}, indent=2))
    sys.exit(0 if bad == 0 else 1)


if __name__ == "__main__":
    main()
