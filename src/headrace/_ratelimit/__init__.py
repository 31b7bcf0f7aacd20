"""Rate limiting on the reservation model: token buckets, atomic multi-limits, per-key limits.

A :class:`TokenBucket` of depth ``burst`` (b) refilled at ``rate`` (r) tokens per second
grants at most ``b + r·T`` tokens in any window of ``T`` seconds. It follows the
reservation model of Go's ``golang.org/x/time/rate``: a caller that cannot be served at
once *reserves* its tokens (the level may go negative), computes the instant its tokens
will have accrued, and sleeps exactly once until then. Grants are therefore FIFO, a
large request is never starved by a stream of small ones, and the achieved rate is
exact however late the event loop wakes a sleeper (the schedule, not the wake-up,
decides who goes next). Designs that wake waiters and let them race for tokens
(aiolimiter, pyrate-limiter's async path) lose throughput to every late wake-up: measured
here at 1000/s with burst 1 they delivered 22% and 27-98% too little.

The decision logic is pure: :meth:`TokenBucket.try_acquire_at` and
:meth:`TokenBucket.reserve_at` take ``now`` explicitly and touch no clock; the async
methods read the injected :class:`~headrace.Clock` and sleep through it.

Cancellation. A reservation cancelled before its time gives its tokens back, minus what
later reservations depend on. The bucket keeps the reservations that are still waiting
(the *ledger*, in grant-time order) and, after a cancellation, recomputes the level by
replaying those grants from the settled state. The result depends only on the set of
reservations still standing, not on the order in which others were cancelled: cancel
ten waiters first-to-last or last-to-first and the bucket ends up in the same state.
Go's ``Reservation.CancelAt`` instead subtracts the time between this reservation and the
latest one from the refund, which under-refunds whenever the burst could have absorbed the
gap (golang/go#56924) and loses the refund for good when the later reservations are
cancelled afterwards (golang/go#69419). Replays are batched: cancelling many waiters in a
row costs one pass over the ledger at the next operation.

Rate changes. :meth:`TokenBucket.set_rate` and :meth:`TokenBucket.set_burst` apply from
the moment they are called. Reservations already made keep their grant times (their
owners are asleep until then); the bucket is recomputed as if the new parameters had
held for those scheduled grants, so new callers queue behind them at the new rate.

The package splits the concept by the parts that change independently:

* ``_checks``: argument validation and the longest acceptable wait (timeout or deadline);
* ``_reservation``: :class:`Reservation` and the :class:`Limiter` protocol;
* ``_bucket``: :class:`TokenBucket`, its pure reservation ledger, and its statistics;
* ``_multi``: :class:`MultiLimiter`, all-or-nothing reservations over several buckets;
* ``_keyed``: :class:`KeyedLimiter`, one limiter per key with idle eviction.

:class:`~headrace._ratelimit_redis.RedisTokenBucket` (the same model inside Redis)
lives apart, in ``headrace._ratelimit_redis``, so that only its users import redis-py.
"""

from ._bucket import RateLimiterStatistics, TokenBucket
from ._keyed import KeyedLimiter
from ._multi import MultiLimiter
from ._reservation import Limiter, Reservation

__all__ = [
    "KeyedLimiter",
    "Limiter",
    "MultiLimiter",
    "RateLimiterStatistics",
    "Reservation",
    "TokenBucket",
]
