"""The pull → handle → ack worker: :class:`Worker` and its statistics.

``_core`` holds the worker (registration, run, signals, the ordered shutdown);
``_route`` one handler's fetch loop, slots, acker and lease extension;
``_progress`` the live progress display used by the CLI.
"""

from ._core import Worker as Worker
from ._core import WorkerStatistics as WorkerStatistics
from ._route import RateLimiter as RateLimiter
from ._route import idempotency_key as idempotency_key
from ._route import worker_retryable as worker_retryable

__all__ = ["RateLimiter", "Worker", "WorkerStatistics", "idempotency_key", "worker_retryable"]
