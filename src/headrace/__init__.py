"""headrace: Go's concurrency-at-scale toolbox for asyncio.

The public names are re-exported here; the modules behind them are private
(``headrace._ratelimit`` ...) and may move. Submodules with optional dependencies are
imported on their own: :mod:`headrace.http`, :mod:`headrace.messaging`,
:mod:`headrace.testing`. Importing ``headrace`` imports no broker client.
"""

from ._cancel import CancelToken as CancelToken
from ._cancel import DeadlineScope as DeadlineScope
from ._cancel import current_cancel_token as current_cancel_token
from ._cancel import deadline as deadline
from ._cancel import deadline_remaining as deadline_remaining
from ._cancel import run_in_thread as run_in_thread
from ._cancel import shielded as shielded
from ._channel import Channel as Channel
from ._channel import ChannelStatistics as ChannelStatistics
from ._clock import Clock as Clock
from ._clock import MonotonicClock as MonotonicClock
from ._clock import default_clock as default_clock
from ._compensation import Compensation as Compensation
from ._compensation import CompensationError as CompensationError
from ._errors import BrokerConnectionError as BrokerConnectionError
from ._errors import BrokerError as BrokerError
from ._errors import ClosedResourceError as ClosedResourceError
from ._errors import ConfigurationError as ConfigurationError
from ._errors import DeadlineExceeded as DeadlineExceeded
from ._errors import EndOfChannel as EndOfChannel
from ._errors import HeadraceError as HeadraceError
from ._errors import HttpError as HttpError
from ._errors import HttpStatusError as HttpStatusError
from ._errors import HttpTransportError as HttpTransportError
from ._errors import InternalError as InternalError
from ._errors import InvalidMessage as InvalidMessage
from ._errors import MessagingError as MessagingError
from ._errors import PublishError as PublishError
from ._errors import RateLimitExceeded as RateLimitExceeded
from ._errors import SupervisorError as SupervisorError
from ._errors import WouldBlock as WouldBlock
from ._errors import error_boundary as error_boundary
from ._errors import redact as redact
from ._errors import translate_errors as translate_errors
from ._heartbeat import Heartbeat as Heartbeat
from ._heartbeat import HeartbeatStatistics as HeartbeatStatistics
from ._heartbeat import Pulse as Pulse
from ._hedge import HedgeBudget as HedgeBudget
from ._hedge import HedgePolicy as HedgePolicy
from ._hedge import HedgeStatistics as HedgeStatistics
from ._hedge import LatencyTracker as LatencyTracker
from ._hedge import LoadBudget as LoadBudget
from ._hedge import PercentileDelay as PercentileDelay
from ._hedge import first_completed as first_completed
from ._hedge import hedge as hedge
from ._pipeline import FailedItem as FailedItem
from ._pipeline import OnError as OnError
from ._pipeline import Pipeline as Pipeline
from ._pipeline import PipelineError as PipelineError
from ._pipeline import PipelineStatistics as PipelineStatistics
from ._pipeline import StageStatistics as StageStatistics
from ._pipeline import merge as merge
from ._ratelimit import KeyedLimiter as KeyedLimiter
from ._ratelimit import MultiLimiter as MultiLimiter
from ._ratelimit import RateLimiterStatistics as RateLimiterStatistics
from ._ratelimit import Reservation as Reservation
from ._ratelimit import TokenBucket as TokenBucket
from ._ratelimit_redis import RedisMultiLimiter as RedisMultiLimiter
from ._ratelimit_redis import RedisTokenBucket as RedisTokenBucket
from ._retry import Retry as Retry
from ._retry import RetryBudget as RetryBudget
from ._supervise import ChildContext as ChildContext
from ._supervise import ChildStatistics as ChildStatistics
from ._supervise import Supervisor as Supervisor
from ._supervise import SupervisorStatistics as SupervisorStatistics

__version__ = "0.1.0.dev0"

__all__ = [
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
]
