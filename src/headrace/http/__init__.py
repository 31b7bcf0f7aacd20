"""Bounded, pooled, rate-limited HTTP fan-out over aiohttp (``pip install headrace[http]``).

Use :class:`Fetcher` when you have many URLs to fetch and want the number of sockets to
stay at your concurrency limit, every body read so connections are reused, retries that
respect ``Retry-After`` and idempotency, and per-host limits. Importing ``headrace``
does not import this module (nor aiohttp); import ``headrace.http`` yourself::

    from headrace.http import Fetcher

    async with Fetcher(concurrency=100) as fetcher:
        async for result in fetcher.fetch_all(urls):
            print(result.request.url, result.response.status if result.ok else result.error)
"""

from ._admission import SupportsAcquire as SupportsAcquire
from ._fanout import ResultStream as ResultStream
from ._fetcher import Fetcher as Fetcher
from ._models import IDEMPOTENT_METHODS as IDEMPOTENT_METHODS
from ._models import RETRYABLE_STATUSES as RETRYABLE_STATUSES
from ._models import FetcherStatistics as FetcherStatistics
from ._models import Request as Request
from ._models import Response as Response
from ._models import Result as Result
from ._models import Timeouts as Timeouts
from ._models import parse_retry_after as parse_retry_after
from ._models import redact_url as redact_url
from ._retrying import DEFAULT_RETRY as DEFAULT_RETRY
from ._transport import StreamResponse as StreamResponse

__all__ = [
    "DEFAULT_RETRY",
    "IDEMPOTENT_METHODS",
    "RETRYABLE_STATUSES",
    "Fetcher",
    "FetcherStatistics",
    "Request",
    "Response",
    "Result",
    "ResultStream",
    "StreamResponse",
    "SupportsAcquire",
    "Timeouts",
    "parse_retry_after",
    "redact_url",
]
