"""Deadlines with causes, cleanup that survives cancellation, and tokens for threads.

asyncio cancellation is edge-triggered: ``task.cancel()`` throws one ``CancelledError``
into the task, and ``task.cancelling()`` counts the requests not yet withdrawn with
``uncancel()``. Every scope here keeps that count balanced, because an unbalanced
count makes an enclosing ``asyncio.timeout`` or ``TaskGroup`` mistake our own timeout
for an outside cancellation (or the reverse):

* :func:`deadline` withdraws exactly the one request its timer made, whether or not the
  body let the ``CancelledError`` through, and turns it into :class:`DeadlineExceeded`
  only if no other cancellation is pending (cpython #102780, #134471).
* :func:`shielded` runs cleanup in its own task, absorbs the cancellations that arrive
  meanwhile, and re-raises one ``CancelledError`` afterwards, leaving the count as the
  canceller set it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import math
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, TypeVar

from ._clock import Clock, TimerHandle, default_clock
from ._errors import ConfigurationError, DeadlineExceeded

__all__ = [
    "CancelToken",
    "DeadlineScope",
    "current_cancel_token",
    "deadline",
    "deadline_remaining",
    "run_in_thread",
    "shielded",
]

_T = TypeVar("_T")
_P = ParamSpec("_P")


class DeadlineScope:
    """The state of one :func:`deadline` block: when it ends and whether it fired."""

    __slots__ = (
        "_cancelling_at_entry",
        "_clock",
        "_context_token",
        "_expired",
        "_handle",
        "_task",
        "cause",
        "deadline",
        "started",
        "timeout",
    )

    def __init__(self, timeout: float, cause: str | None, clock: Clock) -> None:
        self.timeout = timeout
        self.cause = cause
        self._clock = clock
        self.started = clock.now()
        self.deadline = self.started + timeout
        self._expired = False
        self._handle: TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None
        self._cancelling_at_entry = 0
        self._context_token: contextvars.Token[float | None] | None = None

    @property
    def expired(self) -> bool:
        """Whether the timer fired (the body was, or is being, cancelled by this scope)."""
        return self._expired

    def remaining(self) -> float:
        """Seconds left before the deadline (negative once it has passed)."""
        return self.deadline - self._clock.now()

    def _arm(self) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("deadline() must be used inside a task")
        self._task = task
        self._cancelling_at_entry = task.cancelling()
        if math.isfinite(self.deadline):
            self._handle = self._clock.call_at(self.deadline, self._fire)
        enclosing = _innermost_deadline.get()
        tightest = self.deadline if enclosing is None else min(enclosing, self.deadline)
        self._context_token = _innermost_deadline.set(tightest)

    def _fire(self) -> None:
        assert self._task is not None
        if not self._task.done():
            self._expired = True
            self._task.cancel(msg=f"deadline of {self.timeout} s exceeded")

    def _disarm(self) -> bool:
        """Stop the timer; return True when our own cancellation must become a timeout."""
        if self._handle is not None:
            self._handle.cancel()
        if self._context_token is not None:
            _innermost_deadline.reset(self._context_token)
            self._context_token = None
        if not self._expired:
            return False
        assert self._task is not None
        # Withdraw our one request even if the body swallowed the CancelledError; a
        # left-over count would make every enclosing scope think it is being cancelled.
        return self._task.uncancel() <= self._cancelling_at_entry

    def __repr__(self) -> str:
        return (
            f"DeadlineScope(timeout={self.timeout!r}, cause={self.cause!r}, "
            f"expired={self._expired!r})"
        )


# The tightest deadline (absolute clock time) of the deadline() scopes enclosing the
# current task, so that waits that know their length in advance (a rate limiter's
# reservation) can fail fast instead of sleeping into a certain timeout.
_innermost_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "headrace_innermost_deadline", default=None
)


def deadline_remaining(clock: Clock | None = None) -> float | None:
    """Seconds left before the tightest enclosing :func:`deadline` fires, or ``None``.

    ``None`` when no deadline encloses the caller (``asyncio.timeout`` scopes are not
    visible here). Rate limiters use it to refuse at once a wait that would outlast
    the deadline, as Go's ``Limiter.Wait(ctx)`` does.
    """
    when = _innermost_deadline.get()
    if when is None:
        return None
    return when - (clock or default_clock()).now()


@asynccontextmanager
async def deadline(
    seconds: float | None, *, cause: str | None = None, clock: Clock | None = None
) -> AsyncIterator[DeadlineScope]:
    """Cancel the block after ``seconds`` and raise :class:`DeadlineExceeded` instead.

    ``cause`` says why the deadline exists ("payment API SLO"); it is carried by the
    error along with the elapsed time, for logs. ``None`` or ``math.inf`` means no
    deadline. Deadlines nest: the one that fires is the one that raises. A cancellation
    from outside (shutdown, a sibling's failure) stays a ``CancelledError``, even if
    the deadline fires in the same instant. Uses the injected ``clock`` (virtual in
    tests)::

        async with deadline(2.0, cause="inventory lookup"):
            await lookup(sku)
    """
    timeout = math.inf if seconds is None else float(seconds)
    if math.isnan(timeout):
        raise ConfigurationError(f"deadline(seconds={seconds!r}) must be a number")
    scope = DeadlineScope(timeout, cause, clock or default_clock())
    scope._arm()
    try:
        yield scope
    except asyncio.CancelledError as exc:
        if scope._disarm():
            raise DeadlineExceeded(
                f"deadline of {timeout} s exceeded"
                + (f" ({cause})" if cause else "")
                + f" after {scope._clock.now() - scope.started:.6g} s",
                context={
                    "cause": cause,
                    "timeout": timeout,
                    "elapsed": scope._clock.now() - scope.started,
                },
            ) from exc
        raise
    except BaseException:
        scope._disarm()
        raise
    else:
        scope._disarm()


async def _bounded(
    awaitable: Awaitable[_T], seconds: float | None, cause: str | None, clock: Clock | None
) -> _T:
    async with deadline(seconds, cause=cause, clock=clock):
        return await awaitable


async def shielded(
    awaitable: Awaitable[_T],
    *,
    timeout: float | None,
    cause: str | None = "shielded cleanup",
    clock: Clock | None = None,
) -> _T:
    """Run cleanup or rollback to the end even if the caller is cancelled meanwhile.

    ``awaitable`` runs in its own task under its own deadline of ``timeout`` seconds
    (``None``: no bound; avoid it, a stuck rollback then blocks shutdown forever).
    Cancellations of the caller that arrive while it runs are held back; once it has
    finished (or hit its deadline) one ``CancelledError`` is re-raised, so the caller
    still stops. Without a pending cancellation, its result is returned or its error
    (a :class:`DeadlineExceeded` if it ran out of time) raised::

        try:
            await api2.call()
        except BaseException:
            await shielded(api1.rollback(), timeout=5.0)
            raise

    Why a call and not an ``async with`` block: asyncio delivers ``task.cancel()`` into
    whatever the task awaits, so a block that runs in the cancelled task cannot be
    protected; only another task can (the reason ``asyncio.shield`` takes an awaitable).
    """
    inner = asyncio.ensure_future(_bounded(awaitable, timeout, cause, clock))
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(inner)
        except asyncio.CancelledError:
            if inner.done() and not inner.cancelled():
                # Our own wait was cancelled after the cleanup finished.
                cancelled = True
                break
            if inner.cancelled():
                raise
            cancelled = True
            continue
        except BaseException:
            if cancelled:
                break
            raise
        else:
            if cancelled:
                break
            return result
    # The cleanup finished (or failed); deliver the cancellation we held back.
    if not inner.cancelled() and inner.exception() is not None:
        raise asyncio.CancelledError() from inner.exception()
    raise asyncio.CancelledError()


class CancelToken:
    """A thread-safe cancellation flag for synchronous code running in threads.

    Threads cannot be killed: sync code has to look at the token between units of
    work (``token.raise_if_cancelled()``, ``if token.cancelled: ...``) or sleep with
    ``token.wait(seconds)``, which returns early when the token is cancelled.
    :func:`run_in_thread` cancels the token when the awaiting task is cancelled.
    """

    __slots__ = ("_callbacks", "_event", "_lock", "reason")

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], object]] = []
        self.reason: str | None = None

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self, reason: str | None = None) -> None:
        """Set the flag (idempotent) and run the registered callbacks once."""
        with self._lock:
            if self._event.is_set():
                return
            self.reason = reason
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def on_cancel(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` (from the cancelling thread) when cancelled; now if already."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def wait(self, timeout: float | None = None) -> bool:
        """Block the thread until cancelled or ``timeout`` seconds; return ``cancelled``."""
        return self._event.wait(timeout)

    def raise_if_cancelled(self) -> None:
        """Raise ``CancelledError`` in the calling thread if the token is cancelled."""
        if self._event.is_set():
            raise asyncio.CancelledError(self.reason)

    def __repr__(self) -> str:
        return f"CancelToken(cancelled={self.cancelled!r})"


_current_token: contextvars.ContextVar[CancelToken | None] = contextvars.ContextVar(
    "headrace_cancel_token", default=None
)


def current_cancel_token() -> CancelToken:
    """Return the token of the :func:`run_in_thread` call this thread is serving.

    Outside such a call, a token that is never cancelled.
    """
    token = _current_token.get()
    return token if token is not None else CancelToken()


def _run_with_token(token: CancelToken, fn: Callable[[], _T]) -> _T:
    _current_token.set(token)
    return fn()


async def run_in_thread(
    fn: Callable[_P, _T],
    *args: _P.args,
    **kwargs: _P.kwargs,
) -> _T:
    """Run sync ``fn(*args, **kwargs)`` in a worker thread; cancel its token on cancel.

    Inside ``fn``, :func:`current_cancel_token` returns the token for this call. When
    the awaiting task is cancelled, the token is cancelled and the task waits for the
    thread to return (threads cannot be killed, and a thread that outlives its caller
    is a leak), then re-raises ``CancelledError``. Code that never checks the token
    therefore delays the cancellation until it finishes.
    """
    return await run_in_thread_with(None, CancelToken(), functools.partial(fn, *args, **kwargs))


async def run_in_thread_with(
    executor: Executor | None, token: CancelToken, fn: Callable[[], _T]
) -> _T:
    """:func:`run_in_thread` with an explicit executor and token (for pools and stages)."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    future = loop.run_in_executor(executor, context.run, _run_with_token, token, fn)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        token.cancel("the awaiting task was cancelled")
        # Wait for the thread, holding back further cancellations, then re-raise.
        while not future.done():
            try:
                await asyncio.shield(future)
            except asyncio.CancelledError:
                continue
            except BaseException:
                break
        if future.done() and not future.cancelled():
            future.exception()  # mark retrieved: the cancellation is what the caller sees
        raise
