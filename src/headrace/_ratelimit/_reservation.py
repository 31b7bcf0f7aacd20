"""Reservations: tokens a limiter promised for a time, and the protocol limiters share."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .._clock import Clock
from .._errors import RateLimitExceeded
from ._checks import _INF

if TYPE_CHECKING:
    from ._bucket import TokenBucket


class Reservation:
    """Tokens promised by a limiter at ``time_to_act`` (clock seconds).

    Returned by :meth:`TokenBucket.reserve` and :meth:`MultiLimiter.reserve`. When
    ``ok`` is false nothing was reserved (``reason`` says why) and ``delay`` is the wait
    that was refused. Otherwise the holder may act after ``delay`` seconds: ``await
    reservation.wait()`` sleeps until then (and cancels the reservation if the sleep is
    cancelled), or the holder sleeps by itself. ``cancel()`` gives the tokens back if
    called before ``time_to_act``; afterwards it does nothing (the tokens were used).
    Belongs to one event loop; not thread-safe.
    """

    __slots__ = (
        "_cancelled",
        "_children",
        "_clock",
        "_owner",
        "delay",
        "ok",
        "reason",
        "time_to_act",
        "tokens",
    )

    def __init__(
        self,
        *,
        ok: bool,
        tokens: float,
        time_to_act: float,
        delay: float,
        clock: Clock,
        owner: TokenBucket | None = None,
        children: tuple[Reservation, ...] = (),
        reason: str | None = None,
    ) -> None:
        self.ok = ok
        self.tokens = tokens
        self.time_to_act = time_to_act
        self.delay = delay
        self.reason = reason
        self._clock = clock
        self._owner = owner
        self._children = children
        self._cancelled = False

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` gave the tokens back."""
        return self._cancelled

    def delay_from(self, now: float) -> float:
        """Seconds from ``now`` until the holder may act (0 if already; inf if not ok)."""
        if not self.ok:
            return _INF
        return max(0.0, self.time_to_act - now)

    def cancel(self) -> bool:
        """Give the tokens back if the grant time has not come; return whether it did."""
        return self.cancel_at(self._clock.now())

    def cancel_at(self, now: float) -> bool:
        """:meth:`cancel` at an explicit ``now`` (the pure form, for tests and replays)."""
        if not self.ok or self._cancelled or now >= self.time_to_act:
            return False
        self._cancelled = True
        if self._owner is not None:
            self._owner._note_cancelled(self)
        for child in self._children:
            child.cancel_at(now)
        return True

    async def wait(self) -> None:
        """Sleep until ``time_to_act``; cancel the reservation if the sleep is cancelled.

        Raises :class:`~headrace.RateLimitExceeded` if the reservation is not ``ok``.
        """
        if not self.ok:
            raise RateLimitExceeded(
                f"reservation of {self.tokens:g} tokens was refused: {self.reason}",
                context={"tokens": self.tokens, "delay": self.delay},
            )
        if self._cancelled:
            raise RateLimitExceeded(
                f"reservation of {self.tokens:g} tokens was cancelled",
                context={"tokens": self.tokens},
            )
        try:
            await self._clock.sleep_until(self.time_to_act)
        except BaseException:
            # The holder will not act: hand the tokens to those who come after it.
            self.cancel_at(self._clock.now())
            raise

    def __repr__(self) -> str:
        state = "cancelled" if self._cancelled else ("ok" if self.ok else "refused")
        return (
            f"Reservation({state}, tokens={self.tokens:g}, time_to_act={self.time_to_act!r}, "
            f"delay={self.delay!r})"
        )


class Limiter(Protocol):
    """What :class:`KeyedLimiter` and users need from a limiter (TokenBucket, MultiLimiter)."""

    @property
    def clock(self) -> Clock: ...

    def try_acquire_at(self, now: float, n: float = 1) -> bool: ...

    def reserve_at(
        self, now: float, n: float = 1, *, max_wait: float | None = None
    ) -> Reservation: ...

    def try_acquire(self, n: float = 1) -> bool: ...

    def reserve(self, n: float = 1, *, max_wait: float | None = None) -> Reservation: ...

    async def acquire(self, n: float = 1, *, timeout: float | None = None) -> None: ...

    def is_idle_at(self, now: float) -> bool: ...
