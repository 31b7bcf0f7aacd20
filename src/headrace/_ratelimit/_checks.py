"""Argument checks shared by the limiters, and the longest wait a caller accepts."""

from __future__ import annotations

import math

from .._cancel import deadline_remaining
from .._clock import Clock
from .._errors import ConfigurationError

_INF = math.inf
# Token counts are floats advanced by sums like 0.1·10; a shortfall below this many tokens
# is rounding, not a real lack (Go avoids it with integer nanoseconds; asyncio time is float).
_EPSILON = 1e-9


def _check_rate(rate: float, where: str) -> float:
    try:
        value = float(rate)
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"{where}(rate={rate!r}) must be a number of tokens per second",
            code="invalid_rate",
            context={"rate": repr(rate)},
        ) from None
    if not value > 0:  # also rejects NaN
        raise ConfigurationError(
            f"{where}(rate={rate!r}) must be > 0 tokens per second (math.inf disables limiting)",
            code="invalid_rate",
            context={"rate": value},
        )
    return value


def _check_burst(burst: float, where: str) -> float:
    try:
        value = float(burst)
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"{where}(burst={burst!r}) must be a number of tokens",
            code="invalid_burst",
            context={"burst": repr(burst)},
        ) from None
    if not (value >= 1 and math.isfinite(value)):
        raise ConfigurationError(
            f"{where}(burst={burst!r}) must be a finite number >= 1",
            code="invalid_burst",
            context={"burst": value},
        )
    return value


def _check_timeout(timeout: float | None, name: str, where: str) -> float:
    if timeout is None:
        return _INF
    value = float(timeout)
    if not value >= 0:
        raise ConfigurationError(
            f"{where}({name}={timeout!r}) must be >= 0 seconds or None",
            code="invalid_timeout",
            context={name: value},
        )
    return value


def _wait_limit(timeout: float | None, clock: Clock) -> tuple[float, str]:
    """The longest acceptable wait: the caller's timeout or the enclosing deadline."""
    limit = _INF if timeout is None else _check_timeout(timeout, "timeout", "acquire")
    remaining = deadline_remaining(clock)
    if remaining is not None and remaining < limit:
        # Go's Wait(ctx) refuses a wait that would outlast the context's deadline; we do
        # the same with the enclosing headrace deadline(), so nothing is reserved for a
        # caller that is certain to be cancelled first.
        return max(remaining, 0.0), f"the enclosing deadline ({max(remaining, 0.0):g} s left)"
    return limit, f"timeout={limit:g}"
