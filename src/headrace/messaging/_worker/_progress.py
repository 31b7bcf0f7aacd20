"""Live progress of a running worker: a rich panel on a terminal, log lines elsewhere."""

from __future__ import annotations

import asyncio
import sys
from types import TracebackType
from typing import IO, Any

from ..._clock import Clock, default_clock
from ._core import Worker, WorkerStatistics

__all__ = ["Progress", "format_statistics"]


def format_statistics(stats: WorkerStatistics, rate: float) -> str:
    """One line: handled, retried, dead-lettered, rate, in flight (for logs and CI)."""
    return (
        f"handled {stats.handled:,}  retried {stats.retried:,}  "
        f"dead-lettered {stats.dead_lettered:,}  duplicates {stats.duplicates:,}  "
        f"rate {rate:,.0f} msg/s  in flight {stats.in_flight}  acked {stats.acked:,}"
        + (f"  handed back {stats.handed_back:,}" if stats.handed_back else "")
        + (f"  ack failures {stats.ack_failures:,}" if stats.ack_failures else "")
    )


class Progress:
    """Shows a worker's counters while it runs; use as ``async with Progress(worker):``.

    On a terminal (``stream.isatty()``) with ``rich`` installed, a live panel refreshed
    every ``interval`` seconds (default 0.25); otherwise one plain line per
    ``interval`` (default 2 s) on ``stream``, so CI logs stay readable. The rate is
    handled messages per second over the last interval. A final line is printed on
    exit either way. Owns one task, ended on exit.
    """

    def __init__(
        self,
        worker: Worker,
        *,
        interval: float | None = None,
        stream: IO[str] | None = None,
        live: bool | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.worker = worker
        self.stream = stream if stream is not None else sys.stderr
        if live is None:
            live = self.stream.isatty() and _rich_available()
        self.live = live
        self.interval = interval if interval is not None else (0.25 if live else 2.0)
        self._clock = clock or default_clock()
        self._task: asyncio.Task[None] | None = None
        self._last_handled = 0
        self._last_time = 0.0
        self._rate = 0.0
        self._started = 0.0

    def _sample(self) -> WorkerStatistics:
        stats = self.worker.statistics()
        now = self._clock.now()
        elapsed = now - self._last_time
        if elapsed > 0:
            self._rate = (stats.handled - self._last_handled) / elapsed
        self._last_handled, self._last_time = stats.handled, now
        return stats

    async def __aenter__(self) -> Progress:
        self._started = self._last_time = self._clock.now()
        runner = self._run_live if self.live else self._run_lines
        self._task = asyncio.create_task(runner(), name="worker-progress")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        stats = self.worker.statistics()
        total = self._clock.now() - self._started
        average = stats.handled / total if total > 0 else 0.0
        print(
            "done: " + format_statistics(stats, average) + f"  in {total:.1f} s",
            file=self.stream,
            flush=True,
        )

    async def _run_lines(self) -> None:
        while True:
            await self._clock.sleep(self.interval)
            stats = self._sample()
            print(format_statistics(stats, self._rate), file=self.stream, flush=True)

    async def _run_live(self) -> None:
        from rich.console import Console
        from rich.live import Live

        console = Console(file=self.stream)
        with Live(self._table(self._sample()), console=console, transient=True) as live:
            while True:
                await self._clock.sleep(self.interval)
                live.update(self._table(self._sample()))

    def _table(self, stats: WorkerStatistics) -> Any:
        from rich.table import Table

        table = Table(title=f"headrace worker: {', '.join(self.worker.topics)}", expand=False)
        for name in ("handled", "retried", "dead-lettered", "rate /s", "in flight", "acked"):
            table.add_column(name, justify="right")
        table.add_row(
            f"{stats.handled:,}",
            f"{stats.retried:,}",
            f"{stats.dead_lettered:,}",
            f"{self._rate:,.0f}",
            f"{stats.in_flight}",
            f"{stats.acked:,}",
        )
        table.caption = "Ctrl-C: stop cleanly (twice: faster)"
        return table


def _rich_available() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True
