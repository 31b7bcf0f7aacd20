"""Rate limiter benchmarks B2, B2b, B2c, B2d (see ../shared/BENCHMARKS.md), real clock.

    python benchmarks/ratelimit.py [--quick] [--rounds N] [--only B2,B2b,B2c,B2d]

B2   accuracy: 1000/s, burst 1, 50 tasks acquiring in a loop for D seconds; error of the
     achieved count against the most the limit allows (burst + rate·D).
B2b  CPU per uncontended call (a limiter that always has tokens), 200k calls.
B2c  10k tasks start waiting at once on a 2000/s, burst-1 limiter: wall time against the
     ideal (n-1)/rate, and CPU per waiter (at n and n/4, to show it grows O(n)).
B2d  4 processes x 8 tasks share 500/s through the local Redis for D seconds; error of
     the rate achieved in [1 s, D) (the first second is left out so that a window
     limiter's initial burst does not count).

Baselines: aiolimiter (B2, B2b, B2c), pyrate-limiter (its default in-memory limiter,
its token-bucket limiter, and its RedisBucket for B2d). ``limits`` is used for B2d when
installed, else reported as skipped. Each scenario runs the contenders interleaved
(A B A B ...) for ``--rounds`` rounds (default 5) and prints medians and ratios; the JSON
goes to benchmarks/results/ratelimit.json. The machine is shared: read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from headrace._ratelimit import TokenBucket

REDIS_URL = os.environ.get("HEADRACE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
Acquire = Callable[[], Awaitable[object]]


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# -- contenders ------------------------------------------------------------------------


def make_acquire(lib: str, rate: float, burst: int) -> Acquire:
    """An ``await acquire()`` for ``lib`` limiting to ``rate``/s with ``burst``."""
    if lib == "headrace":
        bucket = TokenBucket(rate, burst)
        return bucket.acquire
    if lib == "aiolimiter":
        from aiolimiter import AsyncLimiter

        limiter = AsyncLimiter(burst, burst / rate)
        return limiter.acquire
    if lib == "pyrate":
        from pyrate_limiter import Limiter, Rate

        # Its default in-memory (sliding log) limiter: `burst` per burst/rate seconds.
        pyrate = Limiter(Rate(burst, max(1, round(burst / rate * 1000))))
        return lambda: pyrate.try_acquire_async("bench")
    if lib.startswith("pyrate-token"):
        from pyrate_limiter import Duration
        from pyrate_limiter.limiter_factory import create_token_bucket_limiter

        # Its token bucket (GCRA); its default buffer_ms=50 sleeps 50 ms past every
        # computed wait, so also measured with buffer_ms=0.
        buffer_ms = 0 if lib.endswith("buffer0") else 50
        token = create_token_bucket_limiter(
            int(rate), Duration.SECOND, burst=burst, buffer_ms=buffer_ms
        )
        return lambda: token.try_acquire_async("bench")
    raise ValueError(lib)


# -- B2: accuracy --------------------------------------------------------------------------


async def _accuracy(lib: str, rate: float, burst: int, tasks: int, duration: float) -> float:
    acquire = make_acquire(lib, rate, burst)
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + duration
    count = 0

    async def worker() -> None:
        nonlocal count
        while True:
            await acquire()
            if loop.time() >= end:
                return
            count += 1

    async with asyncio.TaskGroup() as group:
        for _ in range(tasks):
            group.create_task(worker())
    allowed = burst + rate * duration
    return count / allowed - 1.0


def bench_b2(args: argparse.Namespace) -> dict[str, Any]:
    duration = 1.5 if args.quick else 5.0
    libs = ["headrace", "aiolimiter", "pyrate", "pyrate-token", "pyrate-token-buffer0"]
    errors: dict[str, list[float]] = {lib: [] for lib in libs}
    for _ in range(args.rounds):
        for lib in libs:
            errors[lib].append(asyncio.run(_accuracy(lib, 1000.0, 1, 50, duration)))
    medians = {lib: statistics.median(values) for lib, values in errors.items()}
    rows = [
        [
            lib,
            f"{medians[lib] * 100:+.2f}%",
            f"{min(errors[lib]) * 100:+.2f}%",
            f"{max(errors[lib]) * 100:+.2f}%",
        ]
        for lib in libs
    ]
    _table(
        f"B2  1000/s burst 1, 50 tasks, {duration:g} s: achieved vs allowed (goal |err| <= 0.5%)",
        ["limiter", "median error", "min", "max"],
        rows,
    )
    return {"duration": duration, "errors": errors, "median_error": medians}


# -- B2b: CPU per uncontended call -----------------------------------------------------------


async def _uncontended(kind: str, calls: int) -> float:
    if kind == "headrace try_acquire()":
        bucket = TokenBucket(1e12, 1e9)
        try_acquire = bucket.try_acquire
        started = time.process_time()
        for _ in range(calls):
            try_acquire()
        return (time.process_time() - started) / calls
    if kind == "headrace await acquire()":
        bucket = TokenBucket(1e12, 1e9)
        acquire = bucket.acquire
        started = time.process_time()
        for _ in range(calls):
            await acquire()
        return (time.process_time() - started) / calls
    from aiolimiter import AsyncLimiter

    limiter = AsyncLimiter(1e9, 0.001)
    if kind == "aiolimiter await acquire()":
        acquire_ = limiter.acquire
        started = time.process_time()
        for _ in range(calls):
            await acquire_()
        return (time.process_time() - started) / calls
    if kind == "aiolimiter has_capacity()":
        has_capacity = limiter.has_capacity
        started = time.process_time()
        for _ in range(calls):
            has_capacity()
        return (time.process_time() - started) / calls
    if kind == "aiolimiter has_capacity() + acquire()":
        # aiolimiter's idiom for "take one if there is one, never wait".
        has_capacity, acquire_ = limiter.has_capacity, limiter.acquire
        started = time.process_time()
        for _ in range(calls):
            if has_capacity():
                await acquire_()
        return (time.process_time() - started) / calls
    raise ValueError(kind)


def bench_b2b(args: argparse.Namespace) -> dict[str, Any]:
    calls = 50_000 if args.quick else 200_000
    kinds = [
        "headrace try_acquire()",
        "aiolimiter has_capacity() + acquire()",
        "aiolimiter has_capacity()",
        "headrace await acquire()",
        "aiolimiter await acquire()",
    ]
    per_call: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            gc.collect()
            per_call[kind].append(asyncio.run(_uncontended(kind, calls)))
    medians = {kind: statistics.median(values) for kind, values in per_call.items()}
    base = medians["aiolimiter await acquire()"]
    rows = [[kind, f"{medians[kind] * 1e9:,.0f}", f"{medians[kind] / base:.2f}x"] for kind in kinds]
    _table(
        f"B2b uncontended call, {calls:,} calls: CPU per call (goal <= aiolimiter's)",
        ["call", "ns/call (median)", "vs aiolimiter acquire"],
        rows,
    )
    return {"calls": calls, "ns_per_call": {k: v * 1e9 for k, v in medians.items()}}


# -- B2c: many waiters at once -------------------------------------------------------------------


async def _waiters(lib: str, n: int, rate: float) -> tuple[float, float]:
    acquire = make_acquire(lib, rate, 1)
    loop = asyncio.get_running_loop()
    cpu = time.process_time()
    start = loop.time()
    async with asyncio.TaskGroup() as group:
        for _ in range(n):
            group.create_task(acquire())
    return loop.time() - start, time.process_time() - cpu


def bench_b2c(args: argparse.Namespace) -> dict[str, Any]:
    n = 2_000 if args.quick else 10_000
    rate = 2000.0
    libs = ["headrace", "aiolimiter"]
    result: dict[str, Any] = {"n": n, "rate": rate}
    rows = []
    ideal = (n - 1) / rate
    for size in (n, n // 4):
        walls: dict[str, list[float]] = {lib: [] for lib in libs}
        cpus: dict[str, list[float]] = {lib: [] for lib in libs}
        rounds = args.rounds if size == n else max(3, args.rounds // 2)
        for _ in range(rounds):
            for lib in libs:
                gc.collect()
                wall, cpu = asyncio.run(_waiters(lib, size, rate))
                walls[lib].append(wall)
                cpus[lib].append(cpu)
        size_ideal = (size - 1) / rate
        for lib in libs:
            wall = statistics.median(walls[lib])
            cpu = statistics.median(cpus[lib])
            rows.append(
                [
                    lib,
                    f"{size:,}",
                    f"{wall:.3f}",
                    f"{wall / size_ideal:.4f}x",
                    f"{cpu:.3f}",
                    f"{cpu / size * 1e6:.1f}",
                ]
            )
            result[f"{lib}@{size}"] = {
                "wall": wall,
                "cpu": cpu,
                "ideal": size_ideal,
                "walls": walls[lib],
                "cpus": cpus[lib],
            }
    _table(
        f"B2c {n:,} tasks waiting at once, 2000/s burst 1 (ideal {ideal:.3f} s; goal wall <= 1.05x)",
        ["limiter", "tasks", "wall s", "wall/ideal", "CPU s", "CPU µs/waiter"],
        rows,
    )
    return result


# -- B2d: processes sharing a limit through Redis ---------------------------------------------------


async def _redis_worker(
    lib: str, name: str, start: float, duration: float, tasks: int
) -> list[float]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    stamps: list[float] = []
    try:
        if lib == "headrace":
            from headrace._ratelimit_redis import RedisTokenBucket

            bucket = RedisTokenBucket(client, name, rate=500, burst=1)
            acquire: Acquire = bucket.acquire
        elif lib == "pyrate":
            from pyrate_limiter import Duration, Limiter, Rate, RedisBucket

            redis_bucket = await RedisBucket.init([Rate(500, Duration.SECOND)], client, name)
            pyrate = Limiter(redis_bucket)
            acquire = lambda: pyrate.try_acquire_async("bench")  # noqa: E731
        elif lib == "limits":
            from limits import RateLimitItemPerSecond
            from limits.aio.storage import RedisStorage
            from limits.aio.strategies import MovingWindowRateLimiter

            storage = RedisStorage("async+" + REDIS_URL)
            strategy = MovingWindowRateLimiter(storage)
            item = RateLimitItemPerSecond(500)

            async def acquire() -> None:  # limits has no waiting API: poll, as users do
                while not await strategy.hit(item, name):  # noqa: ASYNC110
                    await asyncio.sleep(0.001)
        else:
            raise ValueError(lib)
        await asyncio.sleep(max(0.0, start - time.time()))  # the common start
        end = start + duration

        async def worker() -> None:
            while True:
                await acquire()
                now = time.time()
                if now >= end:
                    return
                stamps.append(now - start)

        async with asyncio.TaskGroup() as group:
            for _ in range(tasks):
                group.create_task(worker())
    finally:
        await client.aclose()
    return stamps


def _b2d_round(lib: str, duration: float, processes: int, tasks: int) -> float:
    name = f"bench-{lib}-{uuid.uuid4().hex[:8]}"
    start = time.time() + 1.5  # time for the interpreters to start
    children = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--b2d-worker",
                lib,
                name,
                repr(start),
                repr(duration),
                str(tasks),
            ],
            stdout=subprocess.PIPE,
        )
        for _ in range(processes)
    ]
    stamps: list[float] = []
    failed = 0
    for child in children:
        out, _ = child.communicate(timeout=duration + 60)
        if child.returncode != 0:
            failed += 1
        else:
            stamps.extend(json.loads(out))
    if failed:
        raise RuntimeError(f"{failed} B2d worker(s) for {lib} failed")
    counted = sum(1 for stamp in stamps if 1.0 <= stamp < duration)
    return counted / (500 * (duration - 1.0)) - 1.0


def bench_b2d(args: argparse.Namespace) -> dict[str, Any]:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except redis.RedisError as exc:
        print(f"\nB2d skipped: Redis not reachable at {REDIS_URL}: {exc}")
        return {"skipped": str(exc)}
    duration = 3.0 if args.quick else 5.0
    libs = ["headrace", "pyrate"] + (["limits"] if _has("limits") else [])
    errors: dict[str, list[float]] = {lib: [] for lib in libs}
    failures: dict[str, int] = dict.fromkeys(libs, 0)
    for _ in range(args.rounds):
        for lib in libs:
            # Other engineers' tests share this Redis (some drop connections on purpose):
            # a round whose worker lost its connection is run again, up to twice.
            for _attempt in range(3):
                try:
                    errors[lib].append(_b2d_round(lib, duration, 4, 8))
                    break
                except RuntimeError as exc:
                    failures[lib] += 1
                    print(f"  (B2d {lib}: {exc}; running the round again)", file=sys.stderr)
    medians = {lib: statistics.median(values) for lib, values in errors.items()}
    rows = [
        [
            lib,
            f"{medians[lib] * 100:+.2f}%",
            f"{min(errors[lib]) * 100:+.2f}%",
            f"{max(errors[lib]) * 100:+.2f}%",
        ]
        for lib in libs
    ]
    if "limits" not in libs:
        rows.append(["limits", "not installed", "", ""])
    _table(
        f"B2d 4 processes x 8 tasks share 500/s via Redis, rate in [1, {duration:g}) s (goal |err| <= 2%)",
        ["limiter", "median error", "min", "max"],
        rows,
    )
    return {"duration": duration, "errors": errors, "median_error": medians, "failures": failures}


# -- output ------------------------------------------------------------------------------------


def _table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    print("  ".join(cell.ljust(width) for cell, width in zip(header, widths, strict=True)))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (about a minute)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (>= 5 counts)")
    parser.add_argument("--only", default="B2,B2b,B2c,B2d", help="comma-separated scenarios")
    parser.add_argument("--b2d-worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.b2d_worker:
        lib, name, start, duration, tasks = args.b2d_worker
        stamps = asyncio.run(_redis_worker(lib, name, float(start), float(duration), int(tasks)))
        print(json.dumps(stamps))
        return
    chosen = {item.strip().upper() for item in args.only.split(",")}
    benches = {"B2": bench_b2, "B2B": bench_b2b, "B2C": bench_b2c, "B2D": bench_b2d}
    results: dict[str, Any] = {
        "quick": args.quick,
        "rounds": args.rounds,
        "python": sys.version.split()[0],
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    out = Path(__file__).parent / "results" / "ratelimit.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    # Scenarios not run this time keep their last results (each is stamped).
    merged: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    for key, bench in benches.items():
        if key in chosen:
            merged[key] = {**results, **bench(args)}
    out.write_text(json.dumps(merged, indent=2, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
