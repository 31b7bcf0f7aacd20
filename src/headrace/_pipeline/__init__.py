"""Pipelines: batch jobs as source → stages → fan-out → fan-in, fast and leak-free.

The package splits the concept the way its parts change independently:

* ``_core``: the fluent :class:`Pipeline` builder, :func:`merge`, the sinks;
* ``_sink``: ``async for`` over a pipeline (an async generator that owns the run);
* ``_graph``: the immutable description the builder produces;
* ``_runtime``: one run: channels, tasks, supervision, teardown;
* ``_stages``: the long-lived per-stage loops and the chunked handoff;
* ``_ordering``: fan-out with a shared feed and an in-order collector;
* ``_executors``: calling the user's function (async, inline, thread, process);
* ``_stats``: counters, snapshots, error policies (:class:`PipelineError` lives in
  ``headrace._errors`` with the rest of the error tree);
* ``_progress``: the optional rich progress display.
"""

from ._core import Pipeline, merge
from ._stats import (
    FailedItem,
    OnError,
    PipelineError,
    PipelineStatistics,
    StageStatistics,
)

__all__ = [
    "FailedItem",
    "OnError",
    "Pipeline",
    "PipelineError",
    "PipelineStatistics",
    "StageStatistics",
    "merge",
]
