"""What the benchmark scripts share: arguments, interleaved rounds, ratios, tables, JSON.

A script imports it as a sibling, so that both ``python benchmarks/NAME.py`` (the
script's folder is on ``sys.path``) and ``python -m benchmarks.NAME`` (from the
repository root) work::

    if __package__:
        from . import _harness as harness
    else:
        import _harness as harness

Nothing here runs inside a timed region except the bodies of :func:`worker_rate`,
:func:`fetch_ack_rate` and :func:`drain_rate`, which are the timed loops the scripts
had written out each for itself, moved here unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable, Coroutine, Hashable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:  # the scripts that time no broker need not import the messaging package
    from headrace.messaging import Broker, Message, Worker

Make = Callable[[], Coroutine[Any, Any, float]]
"""One run of a contender: a fresh coroutine per call, returning messages (items) per second."""

K = TypeVar("K", bound=Hashable)


async def noop(_: object) -> None:
    """The no-op handler every contender calls."""
    return None


# -- arguments ----------------------------------------------------------------------


def parser(
    doc: str | None,
    *,
    url: str | None = None,
    only: bool = False,
    messages: int | None = None,
    quick_help: str = "10k messages instead of 50k",
) -> argparse.ArgumentParser:
    """``--messages``, ``--rounds`` (5) and ``--quick``; ``--url`` and ``--only`` on request."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    parser.add_argument("--messages", type=int, default=messages)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    if url is not None:
        parser.add_argument("--url", default=url)
    if only:
        parser.add_argument(
            "--only", action="append", default=None, help="extra contenders whose name has this"
        )
    return parser


def message_count(arguments: argparse.Namespace) -> int:
    """``--messages``, else 10k with ``--quick``, else 50k."""
    count: int = arguments.messages or (10_000 if arguments.quick else 50_000)
    return count


def keep_only(
    contenders: list[tuple[str, Make]], always: Sequence[str], wanted: Sequence[str] | None
) -> list[tuple[str, Make]]:
    """The contenders named in ``always`` and those whose name contains one of ``wanted``."""
    if not wanted:
        return contenders
    return [
        (name, make)
        for name, make in contenders
        if name in always or any(part in name for part in wanted)
    ]


# -- rounds and ratios --------------------------------------------------------------


def run_rounds(
    contenders: Sequence[tuple[K, Make]],
    rounds: int,
    *,
    label: Callable[[K], str] | None = None,
    warmup: Iterable[Make] = (),
) -> dict[K, list[float]]:
    """Run ``warmup`` once each, then every contender once per round, in order (A B C, A B C,
    ...), each in a fresh event loop; the rates per contender, in round order.

    With ``label``, each run prints ``round N <label(key)> <rate> msg/s`` on stderr.
    """
    for make in warmup:
        asyncio.run(make())
    rates: dict[K, list[float]] = {key: [] for key, _ in contenders}
    for round_number in range(rounds):
        for key, make in contenders:
            rate = asyncio.run(make())
            rates[key].append(rate)
            if label is not None:
                print(
                    f"round {round_number + 1} {label(key)} {rate:>10,.0f} msg/s",
                    file=sys.stderr,
                    flush=True,
                )
    return rates


def ratios(mine: Sequence[float], base: Sequence[float]) -> list[float]:
    """The per-round ratios ``mine / base`` (both lists in round order)."""
    return [a / b for a, b in zip(mine, base, strict=True)]


def median_ratio(mine: Sequence[float], base: Sequence[float]) -> float:
    """The median of the per-round ratios ``mine / base``."""
    return statistics.median(ratios(mine, base))


def ratio_table(
    rates: dict[str, list[float]],
    baselines: Sequence[tuple[str, str, int]],
    *,
    width: int,
) -> list[dict[str, object]]:
    """Print ``contender | median msg/s | vs <baseline> ...`` and return the JSON rows.

    ``baselines`` are ``(contender, column title, column width)``; ``width`` is the
    contender column's. Each row in the result has the contender's rates, their median
    and the median ratio to each baseline (``median_ratio_vs``).
    """
    header = "".join(f"{title:>{column}}" for _, title, column in baselines)
    print(f"{'contender':<{width}}{'median msg/s':>14}{header}")
    table: list[dict[str, object]] = []
    for name, mine in rates.items():
        versus = {baseline: median_ratio(mine, rates[baseline]) for baseline, _, _ in baselines}
        cells = "".join(
            f"{versus[baseline]:>{column - 1}.2f}x" for baseline, _, column in baselines
        )
        print(f"{name:<{width}}{statistics.median(mine):>14,.0f}{cells}")
        table.append(
            {
                "contender": name,
                "rates": mine,
                "median_rate": statistics.median(mine),
                "median_ratio_vs": versus,
            }
        )
    return table


def compare(
    contenders: list[tuple[str, Make]],
    baselines: Sequence[tuple[str, str, int]],
    *,
    rounds: int,
    only: Sequence[str] | None,
    width: int,
    title: str,
) -> list[dict[str, object]]:
    """The broker benchmarks' run: keep the baselines and the contenders ``--only`` names,
    warm up with the first contender (imports, connections, the server's caches), run
    ``rounds`` interleaved rounds with progress on stderr, print ``title`` and the
    :func:`ratio_table`; its JSON rows."""
    contenders = keep_only(contenders, [name for name, _, _ in baselines], only)
    rates = run_rounds(
        contenders, rounds, label=lambda name: f"{name:<{width}}", warmup=[contenders[0][1]]
    )
    print(title)
    return ratio_table(rates, baselines, width=width)


def write_json(path: Path, payload: object, *, announce: bool = True) -> None:
    """Write ``payload`` to ``path`` (benchmarks/results/NAME.json), indented; with
    ``announce``, print ``wrote <path>`` after a blank line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    if announce:
        print(f"\nwrote {path}")


# -- brokers --------------------------------------------------------------------------


async def publish(broker: Broker, topic: str, body: bytes, count: int, chunk: int = 1000) -> None:
    """Publish ``count`` copies of ``body`` to ``topic``, ``chunk`` per call (set-up, untimed)."""
    from headrace.messaging import OutgoingMessage

    for start in range(0, count, chunk):
        await broker.publish(topic, [OutgoingMessage(body)] * min(chunk, count - start))


async def worker_rate(
    worker: Worker, count: int, topic: str, concurrency: int, prefetch: int | None = None
) -> float:
    """Run ``worker`` with a counting no-op handler until ``count`` messages were handled
    (then ``stop()``); msg/s over ``worker.run``; every message must have been acked."""
    handled = 0

    @worker.handler(topic, concurrency=concurrency, prefetch=prefetch)
    async def handle(message: Message) -> None:
        nonlocal handled
        handled += 1
        if handled == count:
            worker.stop()

    started = time.perf_counter()
    stats = await worker.run(handle_signals=False)
    elapsed = time.perf_counter() - started
    assert stats.acked == count, stats
    return count / elapsed


async def fetch_ack_rate(broker: Broker, topic: str, count: int, batch_size: int) -> float:
    """The adapter alone: ``fetch(topic, batch_size)``, gather the no-op handlers, ``ack``,
    until ``count`` messages were handled; msg/s."""
    handled = 0
    started = time.perf_counter()
    while handled < count:
        batch = await broker.fetch(topic, batch_size, timeout=1.0, lease=30.0)
        await asyncio.gather(*(noop(message) for message in batch))
        handled += len(batch)
        await broker.ack(batch)
    elapsed = time.perf_counter() - started
    assert handled == count, handled
    return count / elapsed


class _Startable(Protocol):
    async def start(self) -> Any: ...

    async def stop(self) -> Any: ...


async def drain_rate(
    broker: _Startable, done: asyncio.Event, count: int, timeout: float = 600
) -> float:
    """Start a subscriber-style ``broker`` (FastStream) and wait until its handler set
    ``done``; msg/s over start-to-done. The broker is stopped afterwards in any case."""
    started = time.perf_counter()
    try:
        await broker.start()
        await asyncio.wait_for(done.wait(), timeout=timeout)
        elapsed = time.perf_counter() - started
    finally:
        await broker.stop()
    return count / elapsed
