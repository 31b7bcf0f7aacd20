"""An optional live progress display for ``Pipeline.run(progress=True)`` (uses rich)."""

from __future__ import annotations

import asyncio
from typing import Any

from .._clock import Clock
from .._errors import ConfigurationError
from ._runtime import Run

__all__ = ["require_rich", "show_progress"]


def _describe_stages(run: Run) -> str:
    parts = []
    for stage in run.statistics().stages:
        part = f"{stage.name} {stage.items_out}"
        if stage.errors:
            part += f" ({stage.errors} err)"
        if stage.queue_depth:
            part += f" q{stage.queue_depth}"
        parts.append(part)
    return " → ".join(parts)


def require_rich() -> None:
    """Raise a clear error if the optional rich package is missing."""
    try:
        import rich  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on installed extras
        raise ConfigurationError(
            "run(progress=True) needs the rich package: pip install 'headrace[progress]'",
            code="missing_dependency",
        ) from exc


async def show_progress(
    run: Run, *, total: int | None, clock: Clock, interval: float = 0.2, console: Any = None
) -> None:
    """Redraw a rich progress bar (items at the sink, per-stage counts) until cancelled.

    ``total`` (items expected at the sink) gives a percentage and an ETA; without it the
    bar shows a count and a rate. Cancel the task to stop; the final state is drawn.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("[bold]pipeline"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=False,
    )
    task_id = progress.add_task("", total=total)
    with progress:
        try:
            while True:
                progress.update(task_id, completed=run.items_out, description=_describe_stages(run))
                await clock.sleep(interval)
        except asyncio.CancelledError:
            progress.update(task_id, completed=run.items_out, description=_describe_stages(run))
            raise
