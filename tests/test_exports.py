"""The public names are pinned: adding one is a decision, removing one a break."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import headrace

EXPECTED = {
    "BrokerConnectionError",
    "BrokerError",
    "CancelToken",
    "Channel",
    "ChannelStatistics",
    "ChildContext",
    "ChildStatistics",
    "Clock",
    "ClosedResourceError",
    "Compensation",
    "CompensationError",
    "ConfigurationError",
    "DeadlineExceeded",
    "DeadlineScope",
    "EndOfChannel",
    "FailedItem",
    "HeadraceError",
    "Heartbeat",
    "HeartbeatStatistics",
    "HedgeBudget",
    "HedgePolicy",
    "HedgeStatistics",
    "HttpError",
    "HttpStatusError",
    "HttpTransportError",
    "InternalError",
    "InvalidMessage",
    "KeyedLimiter",
    "LatencyTracker",
    "LoadBudget",
    "MessagingError",
    "MonotonicClock",
    "MultiLimiter",
    "OnError",
    "PercentileDelay",
    "Pipeline",
    "PipelineError",
    "PipelineStatistics",
    "PublishError",
    "Pulse",
    "RateLimitExceeded",
    "RateLimiterStatistics",
    "RedisMultiLimiter",
    "RedisTokenBucket",
    "Reservation",
    "Retry",
    "RetryBudget",
    "StageStatistics",
    "Supervisor",
    "SupervisorError",
    "SupervisorStatistics",
    "TokenBucket",
    "WouldBlock",
    "current_cancel_token",
    "deadline",
    "deadline_remaining",
    "default_clock",
    "error_boundary",
    "first_completed",
    "hedge",
    "merge",
    "redact",
    "run_in_thread",
    "shielded",
    "translate_errors",
}

EXPECTED_MESSAGING = {
    "Broker",
    "BrokerCapabilities",
    "DeadLetter",
    "IdempotencyStore",
    "IdempotentTransaction",
    "MemoryBroker",
    "MemoryIdempotencyStore",
    "Message",
    "OutgoingMessage",
    "Producer",
    "ProducerCloseError",
    "ProducerReport",
    "PublishFailure",
    "RedisIdempotencyStore",
    "SqliteBroker",
    "SqliteIdempotencyStore",
    "TopicStats",
    "Worker",
    "WorkerStatistics",
    "open_broker",
}

EXPECTED_HTTP = {
    "DEFAULT_RETRY",
    "Fetcher",
    "FetcherStatistics",
    "IDEMPOTENT_METHODS",
    "RETRYABLE_STATUSES",
    "Request",
    "Response",
    "Result",
    "ResultStream",
    "StreamResponse",
    "SupportsAcquire",
    "Timeouts",
    "parse_retry_after",
    "redact_url",
}


def test_all_is_pinned_and_sorted() -> None:
    """headrace.__all__ is exactly the expected set, sorted, and every name resolves."""
    assert set(headrace.__all__) == EXPECTED
    assert list(headrace.__all__) == sorted(headrace.__all__)
    for name in headrace.__all__:
        assert getattr(headrace, name) is not None


@pytest.mark.parametrize(
    ("module", "expected"),
    [("headrace.messaging", EXPECTED_MESSAGING), ("headrace.http", EXPECTED_HTTP)],
)
def test_submodule_exports_are_pinned(module: str, expected: set[str]) -> None:
    """The messaging and http namespaces export exactly their pinned names."""
    namespace = importlib.import_module(module)
    assert set(namespace.__all__) == expected
    for name in namespace.__all__:
        assert getattr(namespace, name) is not None


def test_import_headrace_imports_no_client_library() -> None:
    """B8: importing headrace loads no broker client, HTTP library or test helper."""
    heavy = ["redis", "nats", "aio_pika", "psycopg", "aiohttp", "httpx", "rich", "looptime"]
    probe = (
        f"import sys, headrace; print(','.join(name for name in {heavy!r} if name in sys.modules))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert completed.stdout.strip() == ""
