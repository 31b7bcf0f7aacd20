"""When a fetch tries again: the default policy and the pure retry decision.

Only idempotent requests are retried, and only reads (GET, HEAD) are hedged, since a
hedge sends a second copy of a request that may still be running. :func:`next_delay`
is the whole decision after a failed attempt, a pure function of the failure, the
attempt count and the time since the first attempt (the budget aside): the
:class:`~headrace.Retry` policy's backoff (at least ``Retry-After``), unless the server
asks for longer than ``max_retry_after`` or the :class:`~headrace.RetryBudget` is
spent. ``Fetcher._execute`` runs the loop around it and does the sleeping.
"""

from __future__ import annotations

from .._errors import HeadraceError
from .._retry import Retry, RetryBudget

__all__ = ["DEFAULT_RETRY", "HEDGEABLE", "next_delay"]

#: Three tries, 0.1 s doubling up to 5 s, full jitter: enough to ride out a blip or a
#: 429 without tripling the load on a service that is really down (the budget caps that).
DEFAULT_RETRY = Retry(max_attempts=3, initial_delay=0.1, max_delay=5.0)

# Reads only: a hedge duplicates the request, so only methods without effects qualify.
HEDGEABLE = frozenset({"GET", "HEAD"})


def next_delay(
    policy: Retry | None,
    budget: RetryBudget | None,
    exc: HeadraceError,
    failures: int,
    elapsed: float,
    max_retry_after: float,
) -> float | None:
    """Seconds until the next attempt, or ``None`` to give up (pure but for the budget).

    ``failures`` counts the failed attempts so far, this one included; ``elapsed`` is
    the seconds since the first attempt started; ``max_retry_after`` (seconds) is the
    longest ``Retry-After`` worth waiting for.
    """
    if policy is None or exc.code == "http_slot_timeout":
        # Waiting again for a slot would stretch slot_wait past what the caller set.
        return None
    delay = policy.next_delay(exc, failures, elapsed)
    if delay is None:
        return None
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None and retry_after > max_retry_after:
        return None
    if budget is not None and not budget.try_spend():
        return None
    return delay
