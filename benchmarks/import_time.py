"""B8: what ``import headrace`` costs on top of ``import asyncio``.

Runs ``python -X importtime``-free wall timing of fresh interpreters, interleaved
(asyncio, headrace, asyncio, headrace, ...), and reports the median difference. Also
checks that no broker client or HTTP library is imported eagerly.

    python benchmarks/import_time.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

EAGER_FORBIDDEN = ["redis", "nats", "aio_pika", "psycopg", "aiohttp", "httpx", "rich", "looptime"]


def time_import(statement: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="5 rounds")
    args = parser.parse_args()
    rounds = 5 if args.quick else args.rounds
    baseline, headrace = [], []
    for _ in range(rounds):
        baseline.append(time_import("import asyncio"))
        headrace.append(time_import("import asyncio, headrace"))
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys, headrace; print(','.join(m for m in {EAGER_FORBIDDEN!r} "
            "if m in sys.modules))",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    eager = [name for name in probe.stdout.strip().split(",") if name]
    result = {
        "rounds": rounds,
        "asyncio_ms": statistics.median(baseline) * 1000,
        "headrace_ms": statistics.median(headrace) * 1000,
        "extra_ms": (statistics.median(headrace) - statistics.median(baseline)) * 1000,
        "eager_imports": eager,
        "goal": "extra <= 100 ms; no broker client imported eagerly",
    }
    print(f"{'interpreter + import':<28}{'median ms':>10}")
    print(f"{'import asyncio':<28}{result['asyncio_ms']:>10.1f}")
    print(f"{'import asyncio, headrace':<28}{result['headrace_ms']:>10.1f}")
    print(f"{'extra for headrace':<28}{result['extra_ms']:>10.1f}   (goal <= 100)")
    print(f"eagerly imported heavy modules: {eager or 'none'}")
    out = Path(__file__).parent / "results" / "import_time.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
